"""Predict: the TTA mirror, view substitution, row-per-uuid CSV output and ensemble averaging."""

import numpy as np
import torch

from src.predict import collate_quadruplets, mirror_quadruplet


def panorama_views(panorama: np.ndarray) -> torch.Tensor:
    """Cut a [C, H, 4W] 360-degree panorama into the views at headings 0, 90, 180, 270 (each 90 degrees wide).

    Column j of the panorama looks at heading (j + 0.5) * 90 / W - 45 degrees, so view k is columns kW..(k+1)W.
    """
    width = panorama.shape[-1] // 4
    return torch.from_numpy(np.stack([panorama[..., k * width:(k + 1) * width] for k in range(4)]))


def test_mirror_equals_the_views_of_the_mirrored_panorama():
    rng = np.random.default_rng(0)
    width = 5
    panorama = rng.random((3, 4, 4 * width)).astype(np.float32)
    # mirroring the world maps heading t to -t: column j shows what column (W - 1 - j) mod 4W showed
    source = (width - 1 - np.arange(4 * width)) % (4 * width)
    mirrored = panorama[..., source]
    expected = panorama_views(mirrored)
    assert torch.equal(mirror_quadruplet(panorama_views(panorama)), expected)
    # batched input, and mirroring twice is the identity
    batch = torch.stack([panorama_views(panorama), panorama_views(mirrored)])
    assert torch.equal(mirror_quadruplet(batch)[0], expected)
    assert torch.equal(mirror_quadruplet(mirror_quadruplet(batch)), batch)


def test_mirror_on_a_hand_made_quadruplet():
    # view v is a 1x1x2 image [10v + 1, 10v + 2] (left pixel, right pixel)
    views = torch.tensor([[[[10.0 * v + 1, 10.0 * v + 2]]] for v in range(4)])  # [4, 1, 1, 2]
    expected = torch.tensor([[[[2.0, 1.0]]], [[[32.0, 31.0]]], [[[22.0, 21.0]]], [[[12.0, 11.0]]]])
    assert torch.equal(mirror_quadruplet(views), expected)


def test_collate_substitutes_unreadable_views_and_flags_empty_locations():
    size = 2
    view = [torch.full((3, size, size), float(v)) for v in range(4)]
    items = [
        ("a", {size: [view[0], None, view[2], view[3]]}, [None, "missing", None, None]),
        ("b", {size: [None, None, None, view[3]]}, ["missing", "truncated JPEG", "empty file", None]),
        ("c", {size: [None] * 4}, ["missing"] * 4),
        ("d", {size: list(view)}, [None] * 4),
    ]
    uuids, batches, has_views, replaced = collate_quadruplets(items)
    assert uuids == ["a", "b", "c", "d"]
    got = batches[size][:, :, 0, 0, 0]  # [B, 4]: which original view fills each slot
    # a's 90 view takes its neighbour 180; b has only 270 left; c has nothing (zeros + flagged); d untouched
    assert got.tolist() == [[0, 2, 2, 3], [3, 3, 3, 3], [0, 0, 0, 0], [0, 1, 2, 3]]
    assert has_views.tolist() == [True, True, False, True]
    assert replaced == [
        "a 90.jpg: missing -> used 180.jpg",
        "b 0.jpg: missing -> used 270.jpg",
        "b 90.jpg: truncated JPEG -> used 270.jpg",
        "b 180.jpg: empty file -> used 270.jpg",
    ]
