"""Transforms, quadruplet loading, the consistent mirror, and the data module's splits and loaders."""

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.datamodule import GeoDataModule
from tests.builders import loader_config
from src.data.quadruplets import eval_transform, load_quadruplet, mirror_views, train_transform
from src.model.config import IMAGENET_MEAN, IMAGENET_STD
from src.data.enrich import enrich

COLOURS = {0: (255, 0, 0), 90: (0, 255, 0), 180: (0, 0, 255), 270: (255, 255, 255)}


@pytest.fixture()
def location(tmp_path):
    """A location folder whose four views are solid, distinct colours (80 px JPEGs)."""
    for view, colour in COLOURS.items():
        Image.new("RGB", (80, 80), colour).save(tmp_path / f"{view}.jpg", quality=95)
    return tmp_path


def normalised(colour):
    return (np.array(colour) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def test_eval_transform_normalises_with_imagenet_statistics():
    tensor = eval_transform(16)(Image.new("RGB", (16, 16), (200, 100, 50)))
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.mean(dim=(1, 2)).numpy(), normalised((200, 100, 50)), atol=1e-5)


def test_load_quadruplet_keeps_view_order_and_size(location):
    views = load_quadruplet(location, 32, eval_transform(32))
    assert views.shape == (4, 3, 32, 32)
    for index, colour in enumerate(COLOURS.values()):
        np.testing.assert_allclose(views[index].mean(dim=(1, 2)).numpy(), normalised(colour), atol=0.05)


def test_train_transform_augments_but_keeps_shape(location):
    torch.manual_seed(0)
    image = Image.open(location / "0.jpg").resize((32, 32))
    first, second = train_transform(32)(image), train_transform(32)(image)
    assert first.shape == (3, 32, 32)
    assert not torch.equal(first, second)  # random colour jitter


def test_mirror_flips_every_view_and_swaps_90_with_270():
    views = torch.arange(2 * 4 * 3 * 2 * 3, dtype=torch.float32).view(2, 4, 3, 2, 3)
    mirrored = mirror_views(views)
    for source, target in ((0, 0), (1, 3), (2, 2), (3, 1)):
        torch.testing.assert_close(mirrored[:, target], views[:, source].flip(-1))
    assert mirrored[0, 1, 0, 0, 0] == views[0, 3, 0, 0, 2]  # hand-checked element: right edge becomes left
    torch.testing.assert_close(mirror_views(mirrored), views)


def test_data_module_loads_each_split_with_targets(demo_dir):
    enriched = enrich([demo_dir], spacing=0.5, seed=0, progress=False)
    data = GeoDataModule(enriched.locations, loader_config(32, batch_size=8, augment="none"))
    sizes = {split: len(data.split(split)) for split in ("train", "val", "test")}
    assert sum(sizes.values()) == len(enriched.locations) and min(sizes.values()) > 0
    batch = next(iter(data.val_dataloader()))
    val = data.split("val").head(8)
    assert batch["views"].shape == (8, 4, 3, 32, 32)
    np.testing.assert_array_equal(batch["label"].numpy(), val["label"].to_numpy())
    np.testing.assert_allclose(batch["xy"].numpy(), val[["crs_x", "crs_y"]].to_numpy())
    np.testing.assert_allclose(batch["lat"].numpy(), val["latitude"].to_numpy())
    torch.testing.assert_close(batch["views"][0], load_quadruplet(val.image_dir[0], 32, eval_transform(32)))


def test_cache_and_augmentation_follow_the_phase(demo_dir):
    enriched = enrich([demo_dir], spacing=0.5, seed=0, progress=False)
    frozen = GeoDataModule(enriched.locations, loader_config(32, unfreeze_at_epoch=3, cache_dir="unused", augment="finetune"))
    assert frozen.frozen_epoch() and frozen.uses_cache("train") and frozen.uses_cache("val")
    assert not frozen.uses_cache("test")
    always = GeoDataModule(enriched.locations, loader_config(32, unfreeze_at_epoch=3, cache_dir="unused", augment="always"))
    assert not always.uses_cache("train") and always.uses_cache("val")
    no_cache = GeoDataModule(enriched.locations, loader_config(32, unfreeze_at_epoch=3, cache_dir=None))
    assert not no_cache.uses_cache("train")
    with pytest.raises(ValueError):
        GeoDataModule(enriched.locations, loader_config(32, augment="sometimes"))
