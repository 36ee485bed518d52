"""The callbacks, logger and checkpoint IO of a training run: atomic checkpoints, TensorBoard without noise,
the per-epoch history, the constant baseline line, the test results collector, the random states a resumed run
continues with, and graceful interruption."""

import contextlib
import random
import shlex
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from src.core.files import atomic_path
from src.evaluation.calibration import Details, Member, member, variant_details
from src.inference.checkpoints import read_checkpoint
from src.model.geomodel import snapped_km


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, then renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class EpochHistory(pl.Callback):
    """Per-epoch train/val loss and val mean km (rank 0), for the training-curves figure."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        self.rows.append({"epoch": trainer.current_epoch, **metrics})


class QuietTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger without the `epoch` scalar Lightning adds to every log call (a line that only
    counts up), and whose hparams.yaml is written to a temporary file and renamed into place."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    @rank_zero_only
    def save(self) -> None:
        super(TensorBoardLogger, self).save()  # flush the event file
        path = Path(self.log_dir) / self.NAME_HPARAMS_FILE
        if path.parent.is_dir() and not path.is_file():
            with atomic_path(path) as tmp:
                save_hparams_to_yaml(tmp, self.hparams)


def random_states() -> dict[str, Any]:
    """This process's random number generators' states (torch's CPU one and, once CUDA is in use, the current
    device's; numpy's; Python's), as tensors and plain values (checkpoints load with torch's weights_only)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
            "python": random.getstate()}


def set_random_states(states: dict[str, Any]) -> None:
    """Set this process's random number generators to `random_states()`'s `states`."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])


class RandomStates(pl.Callback):
    """Every process's random states in each checkpoint (`random_states`), set again when a fit starts from
    it: a resumed run, or the fine-tuning phase continuing from the frozen phase's last checkpoint, draws the
    same shuffles, dropout masks and augmentations as a run that went on without stopping (on the CPU, without
    DataLoader worker processes, which keep random states of their own across epochs). Lightning saves none."""

    def __init__(self):
        self.saved: list[dict[str, Any]] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = [random_states()]
        if trainer.world_size > 1:  # every process writes a checkpoint dict (rank 0 saves it): gather theirs
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, random_states())
        checkpoint["random_states"] = states

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.saved = checkpoint.get("random_states")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before the fit's first draw (Lightning's sanity check runs with isolated random states); with another
        # number of processes than the checkpoint's, the states stay as seeded
        if self.saved is not None and len(self.saved) == trainer.world_size:
            set_random_states(self.saved[trainer.global_rank])
        self.saved = None


class Interrupt(pl.Callback):
    """SIGINT and SIGTERM during a run: the first one raises KeyboardInterrupt (Lightning's graceful
    shutdown: callbacks' on_exception, loggers finalized, no half-written checkpoint thanks to
    AtomicCheckpointIO), later ones are ignored while shutting down. Records which signal came.

    While Lightning's training loop runs (this object is also its callback), the KeyboardInterrupt is raised
    at the next batch boundary instead of wherever the signal lands: raised inside a lock (TensorBoard's
    event queue, a progress bar) it could leave a background thread blocked and the shutdown hanging."""

    def __init__(self):
        self.signal: str | None = None
        self.last_checkpoint: Path | None = None  # this run's last.ckpt, once its folder is known
        self.deferred = False  # True inside the training loop: raise at the next batch boundary

    def handler(self, signum: int, frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            if not self.deferred:
                raise KeyboardInterrupt(self.signal)

    def _raise_if_signalled(self, *_) -> None:
        if self.signal is not None and self.deferred:
            self.deferred = False
            raise KeyboardInterrupt(self.signal)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.deferred = True
        self._raise_if_signalled()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_signalled()
        self.deferred = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.deferred = False

    on_train_batch_end = on_validation_batch_end = on_train_epoch_end = on_validation_epoch_end = _raise_if_signalled

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class ConstantBaseline(pl.Callback):
    """Logs `val/km_baseline`, the constant (train mean) prediction's val mean km, at every validation: a
    flat reference line beside val/km_mean."""

    def __init__(self, km: float):
        self.km = km

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("val/km_baseline", self.km, sync_dist=False)


class TestCollector(pl.Callback):
    """The test step's rows (split index, predicted x, y, true lat, lng, class probabilities) of every batch,
    gathered from every process once the epoch ends (not in the steps): `xy` (moved onto land, as predict moves
    them) and their `km` per test location in the split's order, the locations DistributedSampler repeats to
    even out the processes' shares counted once; `details`, the confidence regions at RELIABILITY_LEVELS with
    the checkpoint's calibration and without parts of it (`src.evaluation.calibration.variant_details`)."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []
        self.km = np.empty(0)
        self.xy = np.empty((0, 2))
        self.member: Member | None = None  # the test rows' predictions with the checkpoint's calibration
        self.details: dict[str, Details] = {}

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.rows.append(outputs.detach())

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        local = (torch.cat(self.rows, dim=1) if self.rows
                 else torch.empty(5, 0, dtype=torch.float64, device=pl_module.device))
        if trainer.world_size > 1:
            local = pl_module.all_gather(local)  # [world, 5, n]: equal shares
            local = local.permute(1, 0, 2).flatten(1)
        local = local.cpu().numpy()
        _, first = np.unique(local[0].astype(np.int64), return_index=True)
        rows = local[:, first]
        self.xy, self.km = snapped_km(rows[1:3].T, rows[3], rows[4])
        self.member = member(pl_module, rows[5:].T if len(rows) > 5 else None, rows[1:3].T)
        self.details = variant_details([self.member], self.xy)


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """The command line that continues this run from `checkpoint` (any earlier --resume replaced)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["python", "-m", "src.train", *kept, "--resume", str(checkpoint)])


def interrupted_message(interrupt: Interrupt, argv: list[str], resume: Path | None, epochs: int | None) -> str:
    """The one line printed when a run is interrupted (`resume`: the checkpoint it was resumed from)."""
    name = interrupt.signal or "SIGINT"
    candidates = [interrupt.last_checkpoint, resume]
    checkpoint = next((Path(p) for p in candidates if p is not None and Path(p).is_file()), None)
    if checkpoint is None:
        return f"interrupted by {name} before the first epoch ended: no checkpoint to resume from; run the same command again"
    try:
        epoch = int(read_checkpoint(checkpoint, "--resume")["epoch"]) + 1
        done = f"{epoch} of {epochs} epochs" if epochs else f"{epoch} epochs"
    except Exception:
        done = "the last completed epoch"
    return f"interrupted by {name}; {checkpoint} holds {done}; continue with: {resume_command(argv, checkpoint)}"
