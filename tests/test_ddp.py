"""Multi-process (DDP) training on CPU: 2 processes on gloo, the backbone unfreezing at epoch 1 (the fine-tuning
phase is a second fit in the same processes), compared with 1 process on the same data, and resumed in the
fine-tuning phase."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from src.data.enrich import enrich
from src.data.synthetic import write_demo_dataset
from src.train import main

ROOT = Path(__file__).resolve().parent.parent
# a 2-process and a 1-process run differ in batch composition and order (DistributedSampler), so their
# results agree only approximately; after 3 epochs of a tiny model they stay close
MEAN_KM_TOLERANCE = 0.10  # relative difference of the test mean km
EPOCHS, UNFREEZE = 3, 1

pytestmark = pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)")

# src.train with a GeoModel that saves, in every process, its backbone's parameters when each phase's fit ends
# (rank{r}-epoch{e}.pt), and rank 0 a copy of the checkpoints after epoch 1 (what a run interrupted in epoch 2 leaves)
RECORDING_SCRIPT = """
import shutil
import sys
from pathlib import Path

import torch

import src.training.run as run
from src.train import main

out = Path(sys.argv[1])


class RecordedModel(run.GeoModel):
    def on_train_end(self):
        parameters = {k: v.detach().clone() for k, v in self.backbone.named_parameters()}
        torch.save(parameters, out / f"rank{self.global_rank}-epoch{self.current_epoch}.pt")

    def on_train_epoch_start(self):
        if self.current_epoch == 2 and self.global_rank == 0:
            shutil.copytree(Path(self.logger.log_dir) / "checkpoints", out / "after-epoch1")  # (no collective)


run.GeoModel = RecordedModel
main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """68 generated locations at 32 px: 9 test locations, an odd count that DistributedSampler pads."""
    return write_demo_dataset(tmp_path_factory.mktemp("ddp-demo"), n_locations=68, image_size=32, seed=0)


def train_args(demo: Path, out: Path, devices: int, *extra: str) -> list[str]:
    args = ["--approach", "classification", "--dataset-dirs", str(demo), "--backbone", "tiny", "--no-pretrained",
            "--image-size", "32", "--epochs", str(EPOCHS), "--unfreeze-at-epoch", str(UNFREEZE), "--batch-size", "8",
            "--num-workers", "0", "--accelerator", "cpu", "--devices", str(devices), "--out-dir", str(out),
            "--cache-dir", str(out / "cache"), "--run-name", "ddp", *extra]
    return args + (["--strategy", "ddp"] if devices > 1 else [])


def run_two_processes(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `folder` (one run), as (step, value) in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in folder.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in found.items()}


def test_two_processes_fine_tune_in_a_second_fit_like_one_process_and_resume_exactly(small_demo, tmp_path):
    locations = enrich([small_demo], spacing=0.5, seed=0, progress=False).locations
    test_count = int((locations.split == "test").sum())
    assert test_count % 2 == 1  # so DistributedSampler repeats one location on the second process
    script, recorded = tmp_path / "record.py", tmp_path / "recorded"
    script.write_text(textwrap.dedent(RECORDING_SCRIPT))
    recorded.mkdir()
    two = run_two_processes([sys.executable, str(script), str(recorded), *train_args(small_demo, tmp_path / "two", 2)])
    with contextlib.redirect_stdout(io.StringIO()):
        main(train_args(small_demo, tmp_path / "one", 1))

    # only rank 0 prints: one table, one checkpoint line; one version folder; the feature cache filled once
    assert two.stdout.count("checkpoint: ") == 1 and two.stdout.count("constant (train mean location)") == 1
    assert "epoch 1: the fine-tuning phase starts" in two.stderr
    assert [p.name for p in (tmp_path / "two" / "ddp").iterdir()] == ["version_0"]
    version = tmp_path / "two" / "ddp" / "version_0"
    checkpoint = Path(two.stdout.strip().splitlines()[-1].removeprefix("checkpoint: "))
    assert checkpoint.is_file() and checkpoint.parent == version / "checkpoints"
    # train + val entries, once each, by the frozen phase (the fine-tuning phase reads images)
    assert len(list((tmp_path / "two" / "cache").glob("*/*.pt"))) == len(locations) - test_count

    # the fine-tuning phase's DDP synchronised the backbone: both processes hold the same parameters, which trained
    # in the fine-tuning phase only
    after = [torch.load(recorded / f"rank{rank}-epoch{EPOCHS}.pt") for rank in (0, 1)]
    frozen = [torch.load(recorded / f"rank{rank}-epoch{UNFREEZE}.pt") for rank in (0, 1)]
    initial = initial_backbone()
    for key, value in after[0].items():
        assert torch.equal(value, after[1][key]), key
        assert torch.equal(frozen[0][key], initial[key]) and torch.equal(frozen[1][key], initial[key]), key
        assert not torch.equal(value, initial[key]), key

    # --refine knn (the default): every process builds the gallery (its test refines by it), rank 0 says so and
    # writes it into the best checkpoint
    assert two.stderr.count("refine: a gallery of") == 1
    gallery = torch.load(checkpoint, map_location="cpu", weights_only=False)["gallery"]
    assert sorted(gallery["uuids"]) == sorted(locations[locations.split != "test"].uuid)

    # every test location exactly once (not the padded 10), close to one process's two-phase run
    metrics = {name: json.loads((tmp_path / name / "ddp" / "version_0" / "metrics.json").read_text())
               for name in ("one", "two")}
    assert metrics["one"]["test"]["count"] == metrics["two"]["test"]["count"] == test_count
    assert metrics["two"]["test_constant_baseline"] == metrics["one"]["test_constant_baseline"]
    one_km, two_km = metrics["one"]["test"]["mean_km"], metrics["two"]["test"]["mean_km"]
    print(f"test mean km: 1 process {one_km:.2f}, 2 processes {two_km:.2f}")
    assert abs(two_km - one_km) <= MEAN_KM_TOLERANCE * one_km, (one_km, two_km)
    assert metrics["two"]["epochs"] == metrics["one"]["epochs"] == EPOCHS

    # one TensorBoard run whose epochs continue across the phases: one val point per epoch, at growing steps
    logged = scalars(version)
    steps = [step for step, _ in logged["val/km_mean"]]
    assert len(steps) == EPOCHS and steps == sorted(set(steps))
    assert len(logged["lr-AdamW/backbone"]) == EPOCHS

    # resumed in the fine-tuning phase from the checkpoints an interruption in epoch 2 leaves: the same weights and
    # test results as without the interruption
    checkpoints = version / "checkpoints"
    last = checkpoints / "last.ckpt"
    uninterrupted = torch.load(last, weights_only=False)
    shutil.rmtree(checkpoints)
    shutil.copytree(recorded / "after-epoch1", checkpoints)
    interrupted = torch.load(last, weights_only=False)
    assert interrupted["epoch"] == UNFREEZE and interrupted["phase"] == "fine-tuning"
    resumed = run_two_processes([sys.executable, "-m", "src.train", *train_args(small_demo, tmp_path / "two", 2),
                                 "--resume", str(last)])
    assert resumed.stdout.strip().splitlines()[-1] == f"checkpoint: {checkpoint}"
    assert "fine-tuning phase starts" not in resumed.stderr  # it resumes in it
    resumed_last = torch.load(last, weights_only=False)
    assert resumed_last["epoch"] == uninterrupted["epoch"] == EPOCHS - 1
    assert resumed_last["phase"] == uninterrupted["phase"] == "fine-tuning"
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(value, resumed_last["state_dict"][key]), key
    resumed_metrics = json.loads((version / "metrics.json").read_text())
    assert resumed_metrics["test"] == metrics["two"]["test"]


def initial_backbone() -> dict[str, torch.Tensor]:
    """The tiny backbone's parameters as a run with seed 0 creates them (the first random draws after seeding)."""
    import pytorch_lightning as pl

    from src.model.backbones import create_backbone

    pl.seed_everything(0, workers=True, verbose=False)
    return {k: v.detach() for k, v in create_backbone("tiny", False).named_parameters()}
