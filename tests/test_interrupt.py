"""Interruption for real: a training subprocess gets SIGINT or SIGTERM in its fine-tuning phase, leaves a
usable last checkpoint and a one-line --resume command, and that command finishes the run with the weights of
a run that was not interrupted."""

import contextlib
import io
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.inference.checkpoints import load_model, read_data_config
from src.training.callbacks import Interrupt, interrupted_message, resume_command
from src.train import main

ROOT = Path(__file__).resolve().parent.parent
EPOCHS, UNFREEZE = 3, 1

pytestmark = pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)")


def train_args(demo_dir, out):
    # images, not cached features, and small batches: an epoch takes a second or more, so the signal (sent
    # within ~50 ms of the fine-tuning phase's first last.ckpt) arrives while the last epoch is still to come
    return ["--approach", "classification", "--dataset-dirs", str(demo_dir), "--backbone", "tiny", "--no-pretrained",
            "--image-size", "32", "--hidden", "16", "--batch-size", "8", "--num-workers", "0", "--no-cache-features",
            "--epochs", str(EPOCHS), "--unfreeze-at-epoch", str(UNFREEZE), "--out-dir", str(out), "--run-name", "run"]


def wait_for_epoch(path, epoch, process, timeout=180):
    """Until `path` (replaced atomically at every epoch's end) holds `epoch` or a later one."""
    deadline, seen = time.monotonic() + timeout, None
    while True:
        assert process.poll() is None, f"training ended early: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} appeared"
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp is not None and stamp != seen:  # read only a new file
            seen = stamp
            if torch.load(path, map_location="cpu", weights_only=False)["epoch"] >= epoch:
                return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory):
    """The last checkpoint of the same run without an interruption."""
    out = tmp_path_factory.mktemp("uninterrupted")
    with contextlib.redirect_stdout(io.StringIO()):
        main(train_args(demo_dir, out))
    return torch.load(out / "run" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_leaves_a_usable_checkpoint_and_resume_finishes_the_run(demo_dir, tmp_path, signum, uninterrupted):
    out = tmp_path / "reports"
    process = subprocess.Popen([sys.executable, "-m", "src.train", *train_args(demo_dir, out)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = out / "run" / "version_0" / "checkpoints" / "last.ckpt"
    try:
        wait_for_epoch(last, UNFREEZE, process)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "checkpoint:" not in stdout
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: interrupted by {signum.name}; {last} holds ")
    # the state at the end of a completed epoch of the fine-tuning phase, before the last one: it loads as a model
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert UNFREEZE <= saved["epoch"] < EPOCHS - 1 and saved["phase"] == "fine-tuning"
    assert f"holds {saved['epoch'] + 1} of {EPOCHS} epochs" in line
    model = load_model(last, reports_dir=None)
    assert model.hparams.backbone == "tiny" and read_data_config(last).dataset_dirs == (str(Path(demo_dir).resolve()),)
    assert not list(last.parent.glob(".*tmp*"))  # no temporary file left behind
    # the printed command, run as given (from another working directory), finishes the run in its folder
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:3] == ["python", "-m", "src.train"] and command[-2:] == ["--resume", str(last)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(command[3:])
    final = stdout.getvalue().splitlines()[-1]
    assert final.startswith(f"checkpoint: {out / 'run' / 'version_0' / 'checkpoints'}/best-")
    assert not (out / "run" / "version_1").exists()
    # the fine-tuning phase went on where it stopped: the weights of the run that was not interrupted
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["epoch"] == uninterrupted["epoch"] == EPOCHS - 1
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_message_without_a_checkpoint_says_to_start_again(tmp_path):
    interrupt = Interrupt()
    interrupt.signal, interrupt.last_checkpoint = "SIGTERM", tmp_path / "last.ckpt"
    message = interrupted_message(interrupt, [], None, 5)
    assert message.startswith("interrupted by SIGTERM before the first epoch ended: no checkpoint")


def test_resume_command_replaces_an_earlier_resume():
    argv = ["--approach", "regression", "--resume", "old.ckpt", "--run-name", "a b", "--resume=older.ckpt"]
    assert resume_command(argv, Path("x/last.ckpt")) == \
        "python -m src.train --approach regression --run-name 'a b' --resume x/last.ckpt"
