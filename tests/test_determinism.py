"""Determinism: two CPU runs with the same seed, data and flags give the same split, classes, metrics
and weights, with the feature cache cold then warm, and without the cache (augmentation in a worker)."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from src.train import main

pytestmark = pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)")


def run(demo_dir, out, *extra):
    """One training run in its own out dir; (metrics.json, last checkpoint, best checkpoint)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["--approach", "classification", "--dataset-dirs", str(demo_dir), "--backbone", "tiny", "--no-pretrained",
              "--image-size", "32", "--hidden", "16", "--epochs", "2", "--batch-size", "16", "--lr", "3e-3",
              "--out-dir", str(out), "--run-name", "run", "--seed", "3", *map(str, extra)])
    best = Path(stdout.getvalue().splitlines()[-1].removeprefix("checkpoint: "))
    version = out / "run" / "version_0"
    metrics = json.loads((version / "metrics.json").read_text())
    load = lambda path: torch.load(path, map_location="cpu", weights_only=False)  # noqa: E731
    return metrics, load(version / "checkpoints" / "last.ckpt"), load(best)


def assert_same_run(a, b):
    (metrics_a, last_a, best_a), (metrics_b, last_b, best_b) = a, b
    assert metrics_a["val_km_best"] == metrics_b["val_km_best"]  # exactly, not approximately
    assert metrics_a["test"] == metrics_b["test"]
    assert Path(metrics_a["checkpoint"]).name == Path(metrics_b["checkpoint"]).name
    for key in ("classes", "scaler", "prior_lat", "prior_lng"):
        assert last_a["hyper_parameters"][key] == last_b["hyper_parameters"][key], key
    assert last_a["datamodule_hyper_parameters"] == last_b["datamodule_hyper_parameters"]  # data config, test split
    for saved_a, saved_b in ((last_a, last_b), (best_a, best_b)):
        assert saved_a["state_dict"].keys() == saved_b["state_dict"].keys()
        for key, value in saved_a["state_dict"].items():
            assert torch.equal(value, saved_b["state_dict"][key]), key


def test_cold_and_warm_feature_cache_give_the_same_run(demo_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.chdir(demo_dir.parent)  # the first run names the dataset relatively, the second absolutely
    cold = run(demo_dir.name, tmp_path / "cold", "--cache-dir", cache, "--num-workers", 0)
    assert len(list(cache.rglob("*.pt"))) > 0
    monkeypatch.chdir(tmp_path)
    warm = run(demo_dir, tmp_path / "warm", "--cache-dir", cache, "--num-workers", 0)
    assert_same_run(cold, warm)
    assert cold[1]["datamodule_hyper_parameters"]["data"]["dataset_dirs"] == [str(demo_dir.resolve())]
    # the warm run read every feature from the cache the cold run filled (the cache's own counters)
    train_val = cold[0]["feature_cache"]["computed"]
    assert train_val > 0 and cold[0]["feature_cache"]["reused"] == 0
    assert warm[0]["feature_cache"] == {"computed": 0, "reused": train_val}
    assert cold[0]["test"]["count"] > 0 and cold[0]["val_km_best"] > 0


def test_runs_without_the_cache_repeat_with_augmentation_in_workers(demo_dir, tmp_path):
    flags = ["--no-cache-features", "--num-workers", 1, "--augment", "always", "--mirror-p", 0.5]
    first = run(demo_dir, tmp_path / "first", *flags)
    second = run(demo_dir, tmp_path / "second", *flags)
    assert_same_run(first, second)
