"""The GPU path guarded on the CPU: precision choices, native bfloat16 detection, an unusable GPU said aloud,
workers per process, temporary names unique across hosts, a resumed fine-tuning phase without a cache fill, and the
one-command GPU check (which says so and exits 0 without CUDA)."""

import contextlib
import io
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from src.core.errors import run_cli
from src.core.files import atomic_path
from src.data.datamodule import GeoDataModule
from src.data.enrich import enrich
from src.inference.checkpoints import load_model
from src.train import main as train_main
from src.training import config as training_config
from src.training.callbacks import TestCollector
from src.training.run import default_precision, gpu_status
from tests.builders import loader_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_true_half_precisions_are_refused_before_training_in_one_line(demo_dir, tmp_path, precision, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_main, ["--approach", "classification", "--dataset-dirs", str(demo_dir), "--backbone", "tiny",
                             "--no-pretrained", "--out-dir", str(tmp_path), "--precision", precision])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith(f"error: --precision {precision}: not supported: ")
    assert "-mixed" in error and not (tmp_path / "demo").exists()


def test_every_other_precision_keeps_the_geometry_in_float64(demo_dir, tiny_checkpoints):
    """The float64 centroids, targets and distances stay outside the converted module: the same checkpoint
    tested under 64-true scores as under 32-true (within 0.1 km); under the mixed precisions the buffers stay
    float64 and the same logits give the same points inside autocast as outside (only the network's own
    arithmetic changes)."""
    checkpoint = tiny_checkpoints["classification"]  # a 1-epoch tiny run on the demo set at 32 px
    locations = enrich([demo_dir], progress=False).locations
    km = {}
    for precision in ("32-true", "64-true", "bf16-mixed", "16-mixed"):
        model = load_model(checkpoint, reports_dir=None)
        collector = TestCollector()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 16-mixed on a CPU runs as bf16-mixed, and says so
            trainer = pl.Trainer(accelerator="cpu", precision=precision, callbacks=[collector], logger=False,
                                 enable_progress_bar=False, enable_model_summary=False)
            trainer.test(model, datamodule=GeoDataModule(locations, loader_config(32)), verbose=False)
        assert len(collector.km) == int((locations.split == "test").sum()) and collector.km.dtype == "float64"
        assert model.class_xy.dtype == model.class_lat.dtype == torch.float64, precision
        km[precision] = float(collector.km.mean())
    assert abs(km["64-true"] - km["32-true"]) < 0.1, km
    model = load_model(checkpoint, reports_dir=None)
    logits = torch.randn(8, model.n_classes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = model.outputs_to_xy(logits, fixed_steps=True)
    assert inside.dtype == torch.float64 and torch.equal(inside, model.outputs_to_xy(logits, fixed_steps=True))


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_bf16_is_the_default_only_where_the_gpu_has_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # a T4 (sm_75) supports bfloat16 only by emulation: torch says True unless emulation is excluded
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert default_precision("auto")[0] == expected
    assert default_precision("cpu")[0] == "32-true"


def test_a_gpu_the_torch_build_cannot_use_is_said_in_one_line(monkeypatch):
    def unusable():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).\n"
                      "Please update your GPU driver", UserWarning)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unusable)
    usable, warning = gpu_status("auto")
    assert not usable and warning.startswith("warning: an NVIDIA GPU is present but this torch build")
    assert "driver on your system is too old" in warning and "\n" not in warning
    assert gpu_status("cpu") == (False, None)


def test_each_process_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(training_config, "usable_cores", lambda: 32)
    assert training_config.default_num_workers() == 31
    assert training_config.default_num_workers(training_config.processes_per_node("4", "gpu", 8)) == 7
    assert training_config.processes_per_node("auto", "auto", 8) == 8
    assert training_config.processes_per_node("0,1", "gpu", 8) == 2
    assert training_config.processes_per_node("auto", "cpu", 8) == 1


def test_temporary_names_differ_across_hosts_with_the_same_pid(tmp_path, monkeypatch):
    names = []
    for host in ("node-a", "node-b"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        with atomic_path(tmp_path / "cache" / "entry.pt") as tmp:
            names.append(tmp.name)
            tmp.write_bytes(b"x")
    assert names[0] != names[1] and "node-a" in names[0] and (tmp_path / "cache" / "entry.pt").read_bytes() == b"x"


def test_the_gpu_check_says_there_is_no_cuda_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("no CUDA GPU here: nothing checked")


def test_a_run_resumed_past_the_unfreeze_epoch_does_not_fill_the_cache(demo_dir, tmp_path):
    common = ["--approach", "classification", "--dataset-dirs", str(demo_dir), "--backbone", "tiny", "--no-pretrained",
              "--image-size", "32", "--num-workers", "0", "--unfreeze-at-epoch", "1", "--augment", "none",
              "--out-dir", str(tmp_path / "reports"), "--run-name", "run"]
    with contextlib.redirect_stdout(io.StringIO()):
        train_main([*common, "--epochs", "2", "--cache-dir", str(tmp_path / "first")])
    assert list((tmp_path / "first").rglob("*.pt"))  # epoch 0 trained on cached features
    last = tmp_path / "reports" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    with contextlib.redirect_stdout(io.StringIO()):
        train_main([*common, "--epochs", "3", "--cache-dir", str(tmp_path / "second"), "--resume", str(last)])
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 2
    assert not list((tmp_path / "second").rglob("*.pt"))  # epochs 2 on train images: nothing cached


def test_spawning_strategies_are_refused_in_one_line(demo_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(train_main, ["--approach", "classification", "--dataset-dirs", str(demo_dir), "--strategy", "ddp_spawn",
                             "--out-dir", str(tmp_path)])
    assert capsys.readouterr().err.strip().startswith("error: --strategy ddp_spawn: not supported")
