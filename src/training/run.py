"""Train a quadruplet geolocation model (classification, regression or hybrid) with Lightning.

    python -m src.train --approach classification [--dataset-dirs DIR ...] [options]

Without --dataset-dirs the synthetic demo dataset in data/demo is used (generated when missing).
Logs and checkpoints go to <out-dir>/<run-name>/version_N/ (TensorBoard, curves.png); the test split's
metrics print as a table (and go to metrics.json there) and the last stdout line is
`checkpoint: <best checkpoint>`. With --folds K, K runs go to version_N/fold_k/ and the out-of-fold
predictions of every location to version_N/oof.csv.

Ctrl+C (SIGINT) or SIGTERM stops training gracefully: checkpoints/last.ckpt keeps the state at the end
of the last completed epoch, and the command exits with status 130 (143 for SIGTERM) and one line
naming the `--resume` command that continues the run, in the same folder, to the same --epochs.
With the same --seed, data and flags a CPU run is repeatable: the same split, classes, metrics and
weights, whether the feature cache is cold or warm.
"""

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import EarlyStopping, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from src.core.paths import DEMO_DIR, FEATURE_CACHE_DIR
from src.core import geo
from src.model.backbones import backbone_spec, default_backbone
from src.inference.checkpoints import read_checkpoint
from src.data.datamodule import GeoDataModule
from src.data.enrich import LOCATIONS_FILE, check_data_flags, data_hparams, dataset_tag, enrich_from_args, write_locations_csv
from src.core.errors import UserError
from src.core.files import atomic_path
from src.data.cells import CENTROID_PREFIX
from src.model.heads import DEFAULT_LABEL_SMOOTHING_KM, class_radius_m
from src.model.geomodel import FreezeThenUnfreeze, GeoModel
from src.evaluation.plots import training_curves
from src.training.output import quiet_callbacks, quiet_lightning

DEFAULT_CACHE_DIR = FEATURE_CACHE_DIR
# defaults that depend on the situation: (backbone, image size, epochs, unfreeze epoch; -1 = never)
DEMO_DEFAULTS = {"backbone": "efficientnet_lite0", "image_size": 96, "epochs": 30, "unfreeze_at_epoch": -1}
# on CPU fine-tuning runs at ~1 location/s (benchmarks.throughput): the backbone stays frozen unless asked
CPU_DEFAULTS = {"epochs": 30, "unfreeze_at_epoch": -1}  # image size: the backbone's native one
GPU_DEFAULTS = {"epochs": 20, "unfreeze_at_epoch": 5}
QUICK_DEFAULTS = {"image_size": 64, "epochs": 2}
MAX_IMAGE_SIZE = 2048


# model defaults chosen by 5-fold cross-validation on real LUMEN locations (README, "Accuracy levers")
DEFAULTS = {"predict_rule": "mean", "fusion": "mean", "label_smoothing_km": DEFAULT_LABEL_SMOOTHING_KM}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@rank_zero_only
def say(message: str) -> None:
    """A progress/log line on stderr (rank 0 only: DDP processes do not repeat it)."""
    print(message, file=sys.stderr, flush=True)


def default_num_workers() -> int:
    """Data loader workers: one per CPU core this process may use, less one for the main process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cores - 1)


def default_precision(accelerator: str) -> tuple[str, str]:
    """(precision, reason): bf16-mixed on a GPU that supports bfloat16, else 32-true."""
    if accelerator != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed", "default on a GPU with bfloat16 support"
    return "32-true", "default without a bfloat16-capable GPU"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, then renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def resolve_defaults(args: argparse.Namespace, demo: bool) -> None:
    """Fill the situation-dependent defaults (backbone, image size, epochs, unfreeze epoch) in place."""
    if args.backbone is None:
        if demo:
            args.backbone, reason = DEMO_DEFAULTS["backbone"], "default for the demo set: fast on CPU, offline weights"
        else:
            args.backbone, reason = default_backbone()
        say(f"backbone: {args.backbone} ({reason})")
    else:
        say(f"backbone: {args.backbone} (--backbone)")
    table = DEMO_DEFAULTS if demo else GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    if not demo:  # the backbone's native input size (efficientnet_lite2: 260 px)
        table = {**table, "image_size": backbone_spec(args.backbone).input_size}
    if args.quick:
        table = {**table, **QUICK_DEFAULTS}
    for key in ("image_size", "epochs", "unfreeze_at_epoch"):
        if getattr(args, key) is None:
            setattr(args, key, table[key])
    if args.unfreeze_at_epoch is not None and args.unfreeze_at_epoch < 0:
        args.unfreeze_at_epoch = None
    if args.unfreeze_at_epoch is None or args.unfreeze_at_epoch >= args.epochs:
        say("fine-tuning: the backbone stays frozen (--unfreeze-at-epoch N to train it from epoch N)")
    else:
        stages = f"its last {args.unfreeze_blocks} stages" if args.unfreeze_blocks > 0 else "all of it"
        say(f"fine-tuning: the backbone unfreezes at epoch {args.unfreeze_at_epoch} ({stages}, lr {args.lr_finetune:g})")
    check_numbers(args)
    if args.run_name is None:
        data = "demo" if demo else dataset_tag(args.dataset_dirs) if args.dataset_dirs else "locations"
        args.run_name = f"{data}-{args.approach}-{args.backbone}"


def check_numbers(args: argparse.Namespace) -> None:
    """One-line UserErrors for numeric flags out of range (None: not given, a default follows)."""
    checks = [
        ("epochs", lambda v: v >= 1, "a whole number of epochs >= 1"),
        ("batch_size", lambda v: v >= 1, "a number of locations per batch >= 1"),
        ("image_size", lambda v: 16 <= v <= MAX_IMAGE_SIZE, f"a side in pixels from 16 to {MAX_IMAGE_SIZE}"),
        ("num_workers", lambda v: v >= 0, "0 (load in the main process) or more worker processes"),
        ("lr", lambda v: 0 < v < float("inf"), "a positive learning rate, e.g. 1e-3"),
        ("lr_finetune", lambda v: 0 < v < float("inf"), "a positive learning rate, e.g. 1e-4"),
        ("weight_decay", lambda v: 0 <= v < float("inf"), "0 or more"),
        ("dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
        ("mirror_p", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
        ("topk", lambda v: v >= 0, "0 (all classes) or more"),
        ("hidden", lambda v: v >= 0, "0 (a linear head) or more units"),
        ("warmup_epochs", lambda v: v >= 0, "0 or more epochs"),
        ("unfreeze_blocks", lambda v: v >= 0, "0 (all stages) or more"),
        ("num_nodes", lambda v: v >= 1, "1 or more"),
        ("accumulate_grad_batches", lambda v: v >= 1, "1 or more batches"),
        ("gradient_clip_val", lambda v: 0 < v < float("inf"), "a positive gradient norm"),
        ("early_stopping_patience", lambda v: v >= 1, "1 or more validations"),
        ("val_check_interval", lambda v: 0 < v <= 1 or (v > 1 and float(v).is_integer()),
         "a fraction of an epoch in (0, 1] or a whole number of batches"),
        ("ema", lambda v: 0 < v < 1, "a decay in (0, 1), e.g. 0.999"),
        ("label_smoothing_km", lambda v: 0 <= v < float("inf"), "0 (off) or a distance in km, e.g. 12"),
        ("offset_weight", lambda v: 0 <= v < float("inf"), "0 or more"),
        ("folds", lambda v: 2 <= v <= 100, "a number of folds from 2 to 100"),
    ]
    for key, ok, expected in checks:
        value = getattr(args, key, None)
        if value is not None and not ok(value):
            raise UserError(f"--{key.replace('_', '-')} {value}: must be {expected}")


def use_demo_dataset_if_none(args: argparse.Namespace) -> bool:
    """Point --dataset-dirs at the demo set when none was given (generating it when missing)."""
    if args.dataset_dirs or args.locations:
        return False
    if not (DEMO_DIR / "data.csv").exists():
        from src.data.synthetic import write_demo_dataset

        say(f"no --dataset-dirs given: generating the demo dataset in {DEMO_DIR} (600 locations, about 3 s)")
        write_demo_dataset(DEMO_DIR, progress=True)
    say(f"no --dataset-dirs given: training on the synthetic demo dataset in {DEMO_DIR}")
    args.dataset_dirs = [str(DEMO_DIR)]
    return True


def check_resume(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """--resume must name a checkpoint of the same approach, backbone, image size and data (`saved`: its hparams)."""
    path = args.resume
    for key in ("approach", "backbone", "image_size"):
        if saved.get(key) != getattr(args, key):
            raise UserError(f"--resume {path}: it was trained with {key} {saved.get(key)}, not "
                            f"{getattr(args, key)}; pass the same --{key.replace('_', '-')}")
    flags = {"split_fractions": "split", "dataset_dirs": "dataset-dirs", "holdout_dirs": "holdout-dirs"}
    for key, value in data_hparams(args).items():
        if key in saved and saved[key] != value:  # older checkpoints lack some keys: not compared
            shown = " ".join(map(str, saved[key])) if isinstance(saved[key], list) else saved[key]
            raise UserError(f"--resume {path}: it was trained with {key} {shown}, not the same data; "
                            f"pass the run's own --{flags.get(key, key.replace('_', '-'))}")


def resumed_version(args: argparse.Namespace) -> str | None:
    """The version folder of a --resume checkpoint of this run (so logs and best tracking continue there)."""
    if args.resume is None:
        return None
    folder = args.resume.resolve().parent
    if folder.name == "checkpoints" and folder.parent.parent == (args.out_dir / args.run_name).resolve():
        return folder.parent.name
    return None


def class_table(enriched, centroids: str = "weighted", hybrid: bool = False) -> dict[str, list]:
    """The enriched class table as checkpoint hparams: cells, train counts and centroid x/y per kind; for the
    hybrid head also each class's cell radius around its `centroids` (the unit of its offsets)."""
    classes = enriched.classes
    table = {"cell": [int(c) for c in classes["cell"]], "n_train": [int(n) for n in classes["n_train"]]}
    for kind, prefix in CENTROID_PREFIX.items():
        table[kind] = classes[[f"{prefix}_x", f"{prefix}_y"]].to_numpy(float).tolist()
    if hybrid:
        table["radius"] = class_radius_m(classes, enriched.grid.cells, centroids).tolist()
    return table


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


def interrupted_message(interrupt: Interrupt, argv: list[str], args: argparse.Namespace, epochs: int | None) -> str:
    """The one line printed when a run is interrupted."""
    name = interrupt.signal or "SIGINT"
    candidates = [interrupt.last_checkpoint, args.resume]
    checkpoint = next((Path(p) for p in candidates if p is not None and Path(p).is_file()), None)
    if checkpoint is None:
        return f"interrupted by {name} before the first epoch ended: no checkpoint to resume from; run the same command again"
    try:
        epoch = int(read_checkpoint(checkpoint, "--resume")["epoch"]) + 1
        done = f"{epoch} of {epochs} epochs" if epochs else f"{epoch} epochs"
    except Exception:
        done = "the last completed epoch"
    return f"interrupted by {name}; {checkpoint} holds {done}; continue with: {resume_command(argv, checkpoint)}"


def prepare(args: argparse.Namespace) -> bool:
    """Checks and situation-dependent defaults before anything slow; returns whether the demo set is used."""
    if args.folds is not None and (args.resume is not None or args.locations is not None):
        raise UserError(f"--folds {args.folds}: cross-validation splits the dataset dirs itself; "
                        "drop --resume / --locations")
    demo = use_demo_dataset_if_none(args)
    check_data_flags(args)  # a wrong --dataset-dirs or --locations fails here, before the slow start-up
    # absolute paths: the split's canonical order, the hparams and the test folders do not depend on the cwd
    args.dataset_dirs = [Path(d).resolve() for d in args.dataset_dirs]
    args.holdout_dirs = [Path(d).resolve() for d in args.holdout_dirs]
    resolve_defaults(args, demo)
    return demo


def train(args: argparse.Namespace, interrupt: Interrupt) -> None:
    """Enrich, train, test and report (see the module docstring); with --folds, cross-validate."""
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per batch: noise, not news
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    quiet_lightning()  # no GPU/TPU availability lines, no litlogger advert
    # the test step gathers every process's locations and drops DistributedSampler's repeats itself
    warnings.filterwarnings("ignore", message=r".*`DistributedSampler` with the dataloaders. During `trainer.test")
    # the --resume file is read before anything else is printed
    saved = read_checkpoint(args.resume, "--resume", training_state=True)["hyper_parameters"] if args.resume else None
    prepare(args)
    if saved is not None:
        check_resume(args, saved)
    if args.folds is None:
        fit(args, interrupt)
    else:
        cross_validate(args, interrupt)


@dataclass
class FitResult:
    """What one training run leaves behind, for the report (rank 0; None elsewhere)."""

    test: Any  # the enriched test rows, in the order of test_km / test_xy
    test_km: np.ndarray
    test_xy: np.ndarray  # predicted EPSG:3766 x/y, moved onto land
    baseline_km: np.ndarray  # the constant (train mean) prediction's km on the test rows
    checkpoint: Path


def fit(args: argparse.Namespace, interrupt: Interrupt, version: str | None = None,
        report: bool = True) -> FitResult | None:
    """One training run: enrich, fit, test the best checkpoint (the last one without a val split), write
    metrics.json and the training curves; with `report` print the test table and the checkpoint line."""
    enriched = enrich_from_args(args)
    locations = enriched.locations
    counts = locations["split"].value_counts()
    if not counts.get("train"):
        raise UserError(f"--dataset-dirs: no train location; got {counts.to_dict()}")
    has_val, has_test = bool(counts.get("val")), bool(counts.get("test"))
    if not has_val:
        no_val_fixes(args)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    train = locations[locations["split"] == "train"]
    test = locations[locations["split"] == "test"]
    spec = backbone_spec(args.backbone)
    model = GeoModel(
        approach=args.approach, backbone=args.backbone, image_size=args.image_size,
        classes=class_table(enriched, args.centroids, hybrid=args.approach == "hybrid"),
        scaler={k: float(v) for k, v in enriched.scaler.items()},
        centroids=args.centroids, topk=args.topk, hidden=args.hidden, dropout=args.dropout,
        lr=args.lr, lr_finetune=args.lr_finetune, unfreeze_at_epoch=args.unfreeze_at_epoch,
        unfreeze_blocks=args.unfreeze_blocks, optimizer=args.optimizer, weight_decay=args.weight_decay,
        scheduler=args.scheduler, warmup_epochs=args.warmup_epochs, **data_hparams(args),
        prior_lat=float(train["latitude"].mean()), prior_lng=float(train["longitude"].mean()),
        test_locations=test[["uuid", "image_dir"]].astype(str).values.tolist(),
        backbone_weights="imagenet" if args.pretrained else "random", fusion=args.fusion,
        predict_rule=args.predict_rule, label_smoothing_km=args.label_smoothing_km, offset_weight=args.offset_weight,
        image_mean=list(spec.mean), image_std=list(spec.std), pretrained=args.pretrained,
    )
    datamodule = GeoDataModule(
        locations, image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers,
        augment=args.augment, mirror_p=args.mirror_p, unfreeze_at_epoch=args.unfreeze_at_epoch,
        cache_dir=args.cache_dir if args.cache_features else None, backbone_name=args.backbone,
        feature_engine=args.engine, mean=spec.mean, std=spec.std,
    )
    logger = QuietTensorBoardLogger(args.out_dir, name=args.run_name, version=version or resumed_version(args),
                                    default_hp_metric=False)
    interrupt.last_checkpoint = Path(logger.log_dir) / "checkpoints" / "last.ckpt"
    # every epoch's state as last.ckpt, for --resume (save_last=True only follows improvements); an
    # interrupted run keeps the one of its last completed epoch (a mid-epoch state would not resume exactly).
    # Without a val split last.ckpt is also the run's result.
    last = ModelCheckpoint(monitor=None, save_top_k=1, filename="last", enable_version_counter=False)
    checkpoint = (ModelCheckpoint(monitor="val/km_mean", mode="min", auto_insert_metric_name=False,
                                  filename="best-epoch{epoch:02d}-km{val/km_mean:.1f}") if has_val else last)
    limits = {"limit_train_batches": 2, "limit_val_batches": 2, "limit_test_batches": 2} if args.quick else {}
    if not has_val:
        limits["limit_val_batches"] = 0
    gpu = args.accelerator not in ("cpu",) and torch.cuda.is_available()
    if args.deterministic is None:
        args.deterministic = not gpu
    # on a GPU some ops (e.g. adaptive pooling's backward) have no deterministic kernel: warn, do not fail
    deterministic = ("warn" if gpu else True) if args.deterministic else False
    if args.precision is None:
        args.precision, reason = default_precision(args.accelerator)
    else:
        reason = "--precision"
    model.channels_last = gpu if args.channels_last is None else args.channels_last
    if model.channels_last:  # every registered backbone is convolutional
        model.backbone.to(memory_format=torch.channels_last)
    if report:
        say(f"precision: {args.precision} ({reason}); channels_last: {'on' if model.channels_last else 'off'}")
    history = EpochHistory()
    callbacks = [*([checkpoint, last] if has_val else [last]), history, interrupt, FreezeThenUnfreeze(args.unfreeze_at_epoch, args.unfreeze_blocks, args.freeze_bn)]
    if args.unfreeze_at_epoch is not None:  # a backbone that never trains has no learning rate to show
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if args.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor="val/km_mean", mode="min", patience=args.early_stopping_patience))
    if args.ema is not None:
        callbacks.append(EMAWeightAveraging(decay=args.ema))
    interval = int(args.val_check_interval) if args.val_check_interval > 1 else args.val_check_interval
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices, precision=args.precision,
        strategy=args.strategy, num_nodes=args.num_nodes, logger=logger, callbacks=[*callbacks, *quiet_callbacks()],
        plugins=[AtomicCheckpointIO()], reload_dataloaders_every_n_epochs=1,
        accumulate_grad_batches=args.accumulate_grad_batches, gradient_clip_val=args.gradient_clip_val,
        val_check_interval=interval, log_every_n_steps=1, deterministic=deterministic, **limits,
        # BatchNorm statistics over all processes' batches, so the ranks' running statistics stay equal
        # (GPU only: SyncBatchNorm has no CPU implementation)
        sync_batchnorm=gpu and args.unfreeze_at_epoch == 0 and not args.freeze_bn and args.strategy.startswith("ddp"),
    )
    if trainer.world_size > 1 and args.unfreeze_at_epoch not in (None, 0):
        # DDP synchronises only the parameters trainable when it wraps the model (Lightning issue #20340)
        raise UserError(f"--unfreeze-at-epoch {args.unfreeze_at_epoch}: with several processes the backbone "
                        "must train from the start (--unfreeze-at-epoch 0) or stay frozen (-1)")
    if trainer.is_global_zero:  # reusable with --locations by train, analyze and score
        write_locations_csv(locations, Path(logger.log_dir) / LOCATIONS_FILE)
    val = locations[locations["split"] == "val"]
    baseline_val = geo.haversine_km(model.hparams.prior_lat, model.hparams.prior_lng,
                                    val["latitude"].to_numpy(), val["longitude"].to_numpy())
    model.val_baseline_km = float(baseline_val.mean()) if has_val else None
    say(f"{len(train)} train / {counts.get('val', 0)} val / {len(test)} test locations, {len(enriched.classes)} classes; "
        + (f"constant baseline (train mean location): val mean {baseline_val.mean():.1f} km; " if has_val else
           f"no val split: {args.epochs} epochs, the last checkpoint is kept; ")
        + f"logs in {logger.log_dir}")
    # scalar hparams (not the class table or lists) plus what the run used, for TensorBoard's HPARAMS tab
    # and hparams.yaml; the -1 placeholders (Lightning's convention) are overwritten by the final metrics
    run_hparams = {k: v for k, v in model.hparams.items() if not isinstance(v, (dict, list))}
    run_hparams.update(data=",".join(map(str, args.dataset_dirs)), epochs=args.epochs, batch_size=args.batch_size,
                       n_cells=len(enriched.classes), precision=args.precision)
    logger.log_hyperparams(run_hparams, metrics={"val/km_best": -1, "test/km_mean": -1})
    with contextlib.redirect_stdout(sys.stderr):  # Lightning's progress bars and tables -> stderr
        trainer.fit(model, datamodule=datamodule, ckpt_path=args.resume)
        best = Path(checkpoint.best_model_path or last.best_model_path)
        if has_test:
            trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    if not trainer.is_global_zero:  # the other DDP processes have the same results: rank 0 reports
        return None
    test_km, test_xy = (model.test_km, model.test_xy) if has_test else (np.empty(0), np.empty((0, 2)))
    test_xy = np.column_stack(geo.snap_to_land(test_xy[:, 0], test_xy[:, 1]))  # as test_km scores them
    baseline_km = geo.haversine_km(model.hparams.prior_lat, model.hparams.prior_lng,
                                   test["latitude"].to_numpy(), test["longitude"].to_numpy())
    best_val = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan")
    logger.log_metrics({"val/km_best": best_val, "test/km_mean": float(test_km.mean()) if has_test else float("nan")})
    rows = [(f"{args.approach} ({args.backbone})", geo.summarize_km(test_km)),
            ("constant (train mean location)", geo.summarize_km(baseline_km))] if has_test else []
    if rows:  # the test table as text (TensorBoard's TEXT tab), not as single-point charts
        logger.experiment.add_text("test", geo.km_table(rows, "model"), trainer.global_step)
    logger.save()
    metrics = {"checkpoint": str(best), "epochs": trainer.current_epoch, "val_km_best": best_val,
               "val_constant_baseline_km": model.val_baseline_km,
               "test": geo.summarize_km(test_km) if has_test else None,
               "test_constant_baseline": geo.summarize_km(baseline_km) if has_test else None}
    with atomic_path(Path(logger.log_dir) / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    curves = training_curves(history.rows, model.val_baseline_km, Path(logger.log_dir) / "curves.png")
    if report:
        say(f"training curves: {curves}")
        if rows:
            print(f"test split of {', '.join(map(str, args.dataset_dirs))}:")
            print(geo.km_table(rows, "model"))
        else:
            print(f"no test split: nothing to test ({', '.join(map(str, args.dataset_dirs))})")
        print(f"checkpoint: {best}")
    return FitResult(test, test_km, test_xy, baseline_km, best)


def no_val_fixes(args: argparse.Namespace) -> None:
    """Without a val split (a final fit, e.g. --split 1 0 0): refuse what needs val, replace the plateau
    scheduler (it follows val km) by cosine."""
    if args.early_stopping_patience is not None:
        raise UserError(f"--early-stopping-patience {args.early_stopping_patience}: needs a val split; "
                        "give --split with a val fraction > 0")
    if args.scheduler == "plateau":
        args.scheduler = "cosine"
        say("no val split: the plateau scheduler follows val km, using --scheduler cosine instead")


def cross_validate(args: argparse.Namespace, interrupt: Interrupt) -> None:
    """--folds K: K runs in version_N/fold_k, each testing on fold k; out-of-fold predictions of every
    location in version_N/oof.csv and their km against the constant baseline in version_N/oof_metrics.json."""
    version = f"version_{TensorBoardLogger(args.out_dir, name=args.run_name).version}"
    predictions, truths, baselines, checkpoints = [], [], [], []
    for k in range(args.folds):
        args.fold = [k, args.folds]
        say(f"fold {k + 1} of {args.folds}")
        result = fit(args, interrupt, version=f"{version}/fold_{k}", report=False)
        if result is None:  # not rank 0
            continue
        lat, lng = geo.unproject(result.test_xy[:, 0], result.test_xy[:, 1])
        predictions.append(pd.DataFrame({"uuid": result.test["uuid"].astype(str).to_numpy(),
                                         "latitude": np.atleast_1d(lat), "longitude": np.atleast_1d(lng)}))
        truths.append(result.test_km)
        baselines.append(result.baseline_km)
        checkpoints.append(str(result.checkpoint))
        say(f"fold {k + 1}: {len(result.test_km)} test locations, mean {result.test_km.mean():.1f} km "
            f"(constant {result.baseline_km.mean():.1f} km)")
    if not predictions:
        return
    folder = args.out_dir / args.run_name / version
    oof = pd.concat(predictions, ignore_index=True).sort_values("uuid", ignore_index=True)
    with atomic_path(folder / "oof.csv") as tmp:
        oof.to_csv(tmp, index=False, float_format="%.7f")
    km, baseline = np.concatenate(truths), np.concatenate(baselines)
    rows = [(f"{args.approach} ({args.backbone}), out of fold", geo.summarize_km(km)),
            ("constant (each fold's train mean)", geo.summarize_km(baseline))]
    metrics = {"folds": args.folds, "checkpoints": checkpoints, "oof": geo.summarize_km(km),
               "oof_constant_baseline": geo.summarize_km(baseline)}
    with atomic_path(folder / "oof_metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"{args.folds}-fold cross-validation of {', '.join(map(str, args.dataset_dirs))} "
          f"({len(oof)} locations, each predicted by the run that did not train on it):")
    print(geo.km_table(rows, "model"))
    print(f"out-of-fold predictions: {folder / 'oof.csv'}")
