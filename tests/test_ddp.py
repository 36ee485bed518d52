"""Multi-process (DDP) training on CPU: 2 processes on gloo, compared with 1 process on the same data."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from src.data.synthetic import write_demo_dataset
from src.data.enrich import enrich

ROOT = Path(__file__).resolve().parent.parent
# a 2-process and a 1-process run differ in batch composition and order (DistributedSampler), so their
# results agree only approximately; after 2 epochs of a head on frozen features they stay close
MEAN_KM_TOLERANCE = 0.10  # relative difference of the test mean km


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """68 generated locations at 32 px: 9 test locations, an odd count that DistributedSampler pads."""
    return write_demo_dataset(tmp_path_factory.mktemp("ddp-demo"), n_locations=68, image_size=32, seed=0)


def train_cli(demo: Path, out: Path, devices: int, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "src.train", "--approach", "classification", "--dataset-dirs", str(demo),
               "--backbone", "tiny", "--no-pretrained", "--image-size", "32", "--epochs", "2", "--batch-size", "8",
               "--num-workers", "0", "--accelerator", "cpu", "--devices", str(devices), "--out-dir", str(out),
               "--cache-dir", str(out / "cache"), "--run-name", "ddp", *extra]
    if devices > 1:
        command += ["--strategy", "ddp"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_match_one_process(small_demo, tmp_path):
    locations = enrich([small_demo], spacing=0.5, seed=0, progress=False).locations
    test_count = int((locations.split == "test").sum())
    assert test_count % 2 == 1  # so DistributedSampler repeats one location on the second process
    one = train_cli(small_demo, tmp_path / "one", 1)
    two = train_cli(small_demo, tmp_path / "two", 2)
    # only rank 0 prints: one table, one checkpoint line; one version folder; the feature cache filled once
    assert two.stdout.count("checkpoint: ") == 1 and two.stdout.count("constant (train mean location)") == 1
    assert [p.name for p in (tmp_path / "two" / "ddp").iterdir()] == ["version_0"]
    checkpoint = Path(two.stdout.strip().splitlines()[-1].removeprefix("checkpoint: "))
    assert checkpoint.is_file() and checkpoint.parent == tmp_path / "two" / "ddp" / "version_0" / "checkpoints"
    # train + val entries, once each
    assert len(list((tmp_path / "two" / "cache").glob("*/*.pt"))) == len(locations) - test_count
    # --refine knn (the default): every process builds the gallery (its test refines by it), rank 0 says so and
    # writes it into the best checkpoint
    assert two.stderr.count("refine: a gallery of") == 1
    gallery = torch.load(checkpoint, map_location="cpu", weights_only=False)["gallery"]
    assert sorted(gallery["uuids"]) == sorted(locations[locations.split != "test"].uuid)
    metrics = {name: json.loads((tmp_path / name / "ddp" / "version_0" / "metrics.json").read_text())
               for name in ("one", "two")}
    # every test location exactly once, not the padded 10
    assert metrics["one"]["test"]["count"] == metrics["two"]["test"]["count"] == test_count
    assert metrics["two"]["test_constant_baseline"] == metrics["one"]["test_constant_baseline"]
    one_km, two_km = metrics["one"]["test"]["mean_km"], metrics["two"]["test"]["mean_km"]
    print(f"test mean km: 1 process {one_km:.2f}, 2 processes {two_km:.2f}")
    assert abs(two_km - one_km) <= MEAN_KM_TOLERANCE * one_km, (one_km, two_km)
    assert metrics["two"]["epochs"] == metrics["one"]["epochs"] == 2


FINETUNE_SCRIPT = """
import sys
import pytorch_lightning as pl
import torch
from src.data.datamodule import GeoDataModule
from src.data.enrich import enrich
from src.model.geomodel import GeoModel
from src.model.finetune import FreezeThenUnfreeze
from src.data.config import DataConfig, LoaderConfig
from src.model.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, OptimConfig
from src.training.run import build_class_table

demo, out = sys.argv[1], sys.argv[2]
enriched = enrich([demo], spacing=0.5, seed=0, progress=False)
pl.seed_everything(0, workers=True, verbose=False)
config = ModelConfig("classification", "tiny", 32, hidden=0)
model = GeoModel(config, OptimConfig(lr_finetune=1e-2, unfreeze_at_epoch=0, scheduler="none"),
                 build_class_table(enriched, DataConfig(), config))
data = GeoDataModule(enriched.locations, LoaderConfig(32, IMAGENET_MEAN, IMAGENET_STD, batch_size=8, unfreeze_at_epoch=0,
                                                      augment="finetune"))


class SaveBackbone(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        modes = [m.training for m in pl_module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        parameters = {k: v.detach() for k, v in pl_module.backbone.named_parameters()}
        torch.save({"state": parameters, "bn_train": modes}, f"{out}/rank{trainer.global_rank}.pt")


trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                     callbacks=[FreezeThenUnfreeze(0, blocks=1), SaveBackbone()])
trainer.fit(model, datamodule=data)
"""


def test_ddp_finetuning_keeps_backbones_identical(small_demo, tmp_path):
    script = tmp_path / "finetune.py"
    script.write_text(textwrap.dedent(FINETUNE_SCRIPT))
    result = subprocess.run([sys.executable, str(script), str(small_demo), str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    initial = initial_backbone()
    changed = [k for k, v in rank0["state"].items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert changed, "the unfrozen stage did not train"
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key
    # (BatchNorm running statistics are buffers: each rank keeps its own batches' statistics; rank 0's are
    # checkpointed. On GPUs src.train uses SyncBatchNorm, which keeps them equal too; it has no CPU kernel.)
    # the unfrozen last stage's BatchNorm trained with batch statistics, the frozen ones did not
    assert any(rank0["bn_train"]) and not all(rank0["bn_train"])


def initial_backbone() -> dict:
    """The tiny backbone's initial weights under seed 0 (as the script builds them)."""
    import pytorch_lightning as pl

    from src.model.backbones import create_backbone
    pl.seed_everything(0, workers=True, verbose=False)
    return create_backbone("tiny", False).state_dict()
