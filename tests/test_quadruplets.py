"""The one quadruplet reader: view order, substitution of unreadable or missing views, files and bytes alike."""

import io

import pytest
import torch
from PIL import Image

from src.data.images import VIEWS
from src.data.quadruplets import (QuadrupletFolders, collate_quadruplets, eval_transform, read_quadruplet,
                                  substitute_sources)


def jpeg(value: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("reasons, sources", [
    ([None, None, None, None], [0, 1, 2, 3]),
    ([None, "missing", None, None], [0, 2, 2, 3]),  # 90 takes its neighbour 180 first
    (["missing", "bad", "bad", None], [3, 3, 3, 3]),
    (["missing", None, "bad", "bad"], [1, 1, 1, 1]),
    (["missing"] * 4, [None] * 4),
])
def test_each_slot_takes_itself_then_its_neighbours_then_the_opposite_view(reasons, sources):
    assert substitute_sources(reasons) == sources


def test_bytes_and_files_read_alike_and_bad_views_are_replaced(tmp_path):
    files = []
    for view, value in zip(VIEWS, (10, 90, 170, 250)):
        files.append(tmp_path / f"{view}.jpg")
        files[-1].write_bytes(jpeg(value))
    transform = {"v": (16, eval_transform(16))}
    from_files = read_quadruplet(files, transform)
    from_bytes = read_quadruplet([f.read_bytes() for f in files], transform)
    assert torch.equal(from_files.views["v"], from_bytes.views["v"]) and from_files.usable
    # 90 missing and 180 not an image: 90 tries 180, then 0; 180 tries 270 first
    broken = read_quadruplet([files[0], None, b"not an image", files[3]], transform)
    assert broken.reasons[1] == "missing" and broken.reasons[2].startswith("decode failed")
    assert broken.sources == [0, 0, 3, 3]
    assert torch.equal(broken.views["v"][1], from_files.views["v"][0])
    assert torch.equal(broken.views["v"][2], from_files.views["v"][3])
    assert broken.substitutions() == [(90, "missing", 0), (180, broken.reasons[2], 270)]


def test_collate_flags_locations_without_any_readable_view(tmp_path):
    good, empty = tmp_path / "good", tmp_path / "empty"
    good.mkdir(), empty.mkdir()
    for view in VIEWS:
        (good / f"{view}.jpg").write_bytes(jpeg(view % 250))
    folders = QuadrupletFolders([good, empty], {"v": (16, eval_transform(16))})
    indices, batches, usable, substitutions = collate_quadruplets([folders[0], folders[1]])
    assert indices.tolist() == [0, 1] and usable.tolist() == [True, False]
    assert batches["v"].shape == (2, 4, 3, 16, 16) and not batches["v"][1].any()
    assert substitutions == []  # nothing to substitute from: the location falls back to the prior
