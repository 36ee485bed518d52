"""Feature cache: cached features equal fresh ones, reuse, and keys that notice changes."""

import shutil

import pandas as pd
import pytest
import torch
from PIL import Image

from src.model.backbones import create_backbone
from src.data.quadruplets import eval_transform, load_quadruplet
from src.data.features import FeatureCache
from src.data.ingest import find_image_root


@pytest.fixture()
def image_dirs(demo_dir, tmp_path):
    """Copies of six demo locations (tests may modify them)."""
    uuids = pd.read_csv(demo_dir / "data.csv")["uuid"].head(6)
    root = find_image_root(demo_dir)
    dirs = []
    for uuid in uuids:
        shutil.copytree(root / uuid, tmp_path / "images" / uuid)
        dirs.append(str(tmp_path / "images" / uuid))
    return dirs


TRANSFORM = eval_transform(32)


def load(image_dir):
    return load_quadruplet(image_dir, 32, TRANSFORM)


def fresh_features(backbone, image_dir):
    backbone.eval()
    with torch.no_grad():
        return backbone(load(image_dir))


def test_cached_features_equal_fresh_ones_and_are_reused(image_dirs, tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("tiny", pretrained=False)
    cache = FeatureCache(tmp_path / "cache", "tiny", backbone, 32)
    backbone.train()  # the cache must compute in eval mode regardless
    assert cache.compute_missing(image_dirs, backbone, TRANSFORM, batch_size=4) == 6
    assert backbone.training
    for image_dir in image_dirs:
        torch.testing.assert_close(cache.get(image_dir), fresh_features(backbone, image_dir), rtol=1e-5, atol=1e-6)
    stacked = cache.load_all(image_dirs)
    assert stacked.shape == (6, 4, 64)
    # a later run with the same weights reuses every entry
    again = FeatureCache(tmp_path / "cache", "tiny", backbone, 32)
    assert again.compute_missing(image_dirs, backbone, TRANSFORM) == 0
    assert (cache.computed, cache.reused) == (6, 0) and (again.computed, again.reused) == (0, 6)
    torch.testing.assert_close(again.load_all(image_dirs), stacked)


def test_features_fill_and_stack_in_one_pass(image_dirs, tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("tiny", pretrained=False)
    cache = FeatureCache(tmp_path / "cache", "tiny", backbone, 32)
    cache.compute_missing(image_dirs[:2], backbone, TRANSFORM)  # two entries exist, four are missing
    wanted = [image_dirs[3], *image_dirs, image_dirs[0]]  # a location may come twice: it gets both rows
    stacked = cache.features(wanted, backbone, TRANSFORM, batch_size=4)
    assert (cache.computed, cache.reused) == (6, 2)
    expected = torch.stack([fresh_features(backbone, image_dir) for image_dir in wanted])
    torch.testing.assert_close(stacked, expected, rtol=1e-5, atol=1e-6)
    # what was computed is stored: a later object reads the same features from disk alone
    later = FeatureCache(tmp_path / "cache", "tiny", backbone, 32)
    torch.testing.assert_close(later.load_all(wanted), stacked, rtol=0, atol=0)
    assert torch.equal(later.features(wanted, backbone, TRANSFORM), stacked) and later.computed == 0


def test_cache_key_covers_image_file_weights_and_size(image_dirs, tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("tiny", pretrained=False)
    cache = FeatureCache(tmp_path / "cache", "tiny", backbone, 32)
    cache.compute_missing(image_dirs, backbone, TRANSFORM)
    # a changed image file invalidates its location's entry only
    Image.new("RGB", (64, 64), (255, 0, 0)).save(f"{image_dirs[0]}/90.jpg")
    assert cache.get(image_dirs[0]) is None
    assert cache.compute_missing(image_dirs, backbone, TRANSFORM) == 1
    torch.testing.assert_close(cache.get(image_dirs[0]), fresh_features(backbone, image_dirs[0]), rtol=1e-5, atol=1e-6)
    # other weights or another image size use other entries
    other = create_backbone("tiny", pretrained=False)
    assert FeatureCache(tmp_path / "cache", "tiny", other, 32).directory != cache.directory
    assert FeatureCache(tmp_path / "cache", "tiny", backbone, 48).directory != cache.directory
    assert FeatureCache(tmp_path / "cache", "tiny", backbone, 32).directory == cache.directory
    # another image preprocessing (e.g. other normalisation) uses other entries too
    assert FeatureCache(tmp_path / "cache", "tiny", backbone, 32, preprocessing="Normalize(0.5)").directory != cache.directory


def test_cache_entries_are_written_atomically(image_dirs, tmp_path):
    backbone = create_backbone("tiny", pretrained=False)
    cache = FeatureCache(tmp_path / "cache", "tiny", backbone, 32)
    cache.compute_missing(image_dirs[:2], backbone, TRANSFORM)
    names = sorted(p.name for p in cache.directory.iterdir())
    assert len(names) == 2 and all(name.endswith(".pt") for name in names)  # no temp files left behind


def damage(path, how):
    """Spoil a cache entry the ways an interrupted or buggy writer (or a full disk) could."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\xff\xd8 not a torch file " * 20)
    elif how == "wrong shape":
        torch.save(torch.zeros(4, 32), path)
    elif how == "not a tensor":
        torch.save({"features": torch.zeros(4, 64)}, path)
    elif how == "non-finite":
        torch.save(torch.full((4, 64), float("nan")), path)


@pytest.mark.parametrize("how", ["truncated", "zero-byte", "garbage", "wrong shape", "not a tensor", "non-finite"])
def test_corrupt_entries_are_recomputed_with_a_counted_warning(image_dirs, tmp_path, caplog, how):
    torch.manual_seed(0)
    backbone = create_backbone("tiny", pretrained=False)
    cache = FeatureCache(tmp_path / "cache", "tiny", backbone, 32)
    cache.compute_missing(image_dirs, backbone, TRANSFORM)
    good = cache.load_all(image_dirs)
    spoiled = [cache.entry_path(image_dirs[1]), cache.entry_path(image_dirs[4])]
    for path in spoiled:
        damage(path, how)
    later = FeatureCache(tmp_path / "cache", "tiny", backbone, 32)  # a later run finds the damaged entries
    with caplog.at_level("WARNING", logger="src.data.features"):
        assert later.compute_missing(image_dirs, backbone, TRANSFORM) == 2  # recomputed, the others reused
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "2 corrupt entries" in warnings[0]
    assert all(str(path) in warnings[0] for path in spoiled)
    assert later.corrupt == spoiled
    torch.testing.assert_close(later.load_all(image_dirs), good, rtol=1e-5, atol=1e-6)
    assert FeatureCache(tmp_path / "cache", "tiny", backbone, 32).compute_missing(image_dirs, backbone, TRANSFORM) == 0


def test_a_corrupt_entry_is_never_used(image_dirs, tmp_path):
    backbone = create_backbone("tiny", pretrained=False)
    cache = FeatureCache(tmp_path / "cache", "tiny", backbone, 32)
    cache.compute_missing(image_dirs[:2], backbone, TRANSFORM)
    damage(cache.entry_path(image_dirs[0]), "wrong shape")
    assert cache.get(image_dirs[0]) is None and not cache.entry_path(image_dirs[0]).exists()
    with pytest.raises(RuntimeError, match="no usable entry"):
        cache.load_all(image_dirs[:2])
