"""A training run as short named steps: enrich the data, build the data module, the model, the logger and
callbacks and the trainer, fit, test the best checkpoint, report; and K-fold cross-validation over it.

Logs and checkpoints go to <out_dir>/<run_name>/version_N/ (TensorBoard, curves.png, metrics.json,
locations.csv); with folds, K runs go to version_N/fold_k/ and the out-of-fold predictions of every
location to version_N/oof.csv. With the same seed, data and configs a CPU run is repeatable: the same
split, classes, metrics and weights, whether the feature cache is cold or warm.
"""

import contextlib
import json
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from src.core import geo
from src.core.errors import UserError
from src.core.files import write_csv, write_text
from src.core.paths import DEMO_DIR
from src.data.cells import class_samples
from src.data.config import CENTROID_PREFIX, LOCATIONS_FILE, DataConfig
from src.data.datamodule import GeoDataModule
from src.data.enrich import Enriched, enrich_data
from src.data.locations import write_locations_csv
from src.evaluation.calibration import (DETAILS_COLUMNS, VAL_SPLIT, Details, Labelled, Member, Reliability,
                                        cross_fitted, details_columns, variant_details)
from src.evaluation.plots import reliability_figure, training_curves
from src.inference.checkpoints import (checkpoint_phase, read_checkpoint, read_data_config, write_calibration,
                                      write_checkpoint_entry)
from src.model.backbones import backbone_spec, default_backbone
from src.model.config import ClassTable, ModelConfig
from src.model.finetune import FINE_TUNING, FreezeThenUnfreeze, phase_starts
from src.model.geomodel import GeoModel
from src.model.heads import class_radius_m
from src.training.callbacks import (AtomicCheckpointIO, ConstantBaseline, EpochHistory, Interrupt,
                                    QuietTensorBoardLogger, RandomStates, TestCollector)
from src.training.config import CPU_DEFAULTS, DDP_TIMEOUT_MIN, DEMO_DEFAULTS, GPU_DEFAULTS, QUICK_DEFAULTS, RunConfig
from src.training.output import quiet_callbacks, quiet_lightning


RELIABILITY_FIGURE = "reliability.png"


@rank_zero_only
def say(message: str) -> None:
    """A progress/log line on stderr (rank 0 only: DDP processes do not repeat it)."""
    print(message, file=sys.stderr, flush=True)


# ---- defaults that depend on the situation ------------------------------------------------------
def default_precision(accelerator: str) -> tuple[str, str]:
    """(precision, reason): bf16-mixed on a GPU whose hardware supports bfloat16 (Ampere and later), else
    16-mixed on an older GPU (emulated bfloat16 is slow), else 32-true."""
    if accelerator == "cpu" or not torch.cuda.is_available():
        return "32-true", "default without a GPU"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed", "default on a GPU with native bfloat16"
    return "16-mixed", "default on a GPU without native bfloat16"


def gpu_status(accelerator: str) -> tuple[bool, str | None]:
    """(whether CUDA is usable, a one-line warning when an NVIDIA GPU is present but unusable, e.g. a driver
    too old for this torch build)."""
    if accelerator == "cpu":
        return False, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    if usable:
        return True, None
    present = Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()
    reasons = [str(w.message).strip().splitlines()[0] for w in caught if "CUDA" in str(w.message)]
    if not present and not reasons:
        return False, None
    why = reasons[0] if reasons else "torch.cuda.is_available() is False"
    return False, (f"warning: an NVIDIA GPU is present but this torch build (CUDA {torch.version.cuda}) cannot use "
                   f"it ({why}); training on the CPU with the CPU defaults. Update the NVIDIA driver or install "
                   "a torch build for your CUDA version")


def ensure_demo_dataset() -> Path:
    """The synthetic demo dataset in data/demo, generated when missing."""
    if not (DEMO_DIR / "data.csv").exists():
        from src.data.synthetic import write_demo_dataset  # noqa: PLC0415 (only when it is missing)

        say(f"no --dataset-dirs given: generating the demo dataset in {DEMO_DIR} (600 locations, about 3 s)")
        write_demo_dataset(DEMO_DIR, progress=True)
    say(f"no --dataset-dirs given: training on the synthetic demo dataset in {DEMO_DIR}")
    return DEMO_DIR


@dataclass(frozen=True)
class Choices:
    """The situation-dependent choices of a run (flags not given take the demo, GPU or CPU defaults)."""

    backbone: str
    image_size: int
    epochs: int
    unfreeze_at_epoch: int | None  # None: the backbone stays frozen


def resolve_choices(backbone: str | None, image_size: int | None, epochs: int | None,
                    unfreeze_at_epoch: int | None, demo: bool, quick: bool) -> Choices:
    """Fill the flags not given (None) from the demo, GPU or CPU defaults (and --quick's), saying why."""
    if backbone is None:
        if demo:
            backbone, reason = DEMO_DEFAULTS["backbone"], "default for the demo set: fast on CPU, offline weights"
        else:
            backbone, reason = default_backbone()
        say(f"backbone: {backbone} ({reason})")
    else:
        say(f"backbone: {backbone} (--backbone)")
    table = DEMO_DEFAULTS if demo else GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    if not demo:  # the backbone's native input size (efficientnet_lite2: 260 px)
        table = {**table, "image_size": backbone_spec(backbone).input_size}
    if quick:
        table = {**table, **QUICK_DEFAULTS}
    image_size = table["image_size"] if image_size is None else image_size
    epochs = table["epochs"] if epochs is None else epochs
    unfreeze_at_epoch = table["unfreeze_at_epoch"] if unfreeze_at_epoch is None else unfreeze_at_epoch
    if unfreeze_at_epoch < 0:
        unfreeze_at_epoch = None
    return Choices(backbone, image_size, epochs, unfreeze_at_epoch)


def trainable_stages(config: RunConfig) -> str:
    """The part of the backbone the fine-tuning phase trains, in words."""
    blocks = config.optim.unfreeze_blocks
    return f"the last {blocks} stages" if blocks > 0 else "all stages"


def say_fine_tuning(config: RunConfig) -> None:
    optim = config.optim
    if optim.unfreeze_at_epoch is None or optim.unfreeze_at_epoch >= config.trainer.epochs:
        say("fine-tuning: the backbone stays frozen (--unfreeze-at-epoch N to train it from epoch N)")
    elif optim.unfreeze_at_epoch == 0:
        say(f"fine-tuning: {trainable_stages(config)} of the backbone train from the start (lr {optim.lr_finetune:g})")
    else:
        say(f"fine-tuning: the backbone unfreezes at epoch {optim.unfreeze_at_epoch} ({trainable_stages(config)}, "
            f"lr {optim.lr_finetune:g}): epochs 0-{optim.unfreeze_at_epoch - 1} train the head on the frozen "
            "backbone, then a second fit in the same processes trains the backbone too")


# ---- resume ---------------------------------------------------------------------------------------
def check_resume(config: RunConfig, saved: dict[str, Any]) -> None:
    """--resume must name a checkpoint of the same approach, backbone, image size and data (`saved`: the
    checkpoint dict)."""
    path, hparams = config.trainer.resume, saved["hyper_parameters"]
    for key in ("approach", "backbone", "image_size"):
        if hparams.get(key) != getattr(config.model, key):
            raise UserError(f"--resume {path}: it was trained with {key} {hparams.get(key)}, not "
                            f"{getattr(config.model, key)}; pass the same --{key.replace('_', '-')}")
    # the phases (and the optimizer's parameter groups) follow from the unfreeze epoch
    trained_unfreeze = hparams.get("unfreeze_at_epoch", config.optim.unfreeze_at_epoch)
    if trained_unfreeze != config.optim.unfreeze_at_epoch:
        given, trained_flag = (-1 if e is None else e for e in (config.optim.unfreeze_at_epoch, trained_unfreeze))
        raise UserError(f"--resume {path}: it was trained with --unfreeze-at-epoch {trained_flag} (its epoch "
                        f"{saved['epoch']} in the {checkpoint_phase(saved)} phase), not {given}; "
                        f"pass --unfreeze-at-epoch {trained_flag}")
    trained = read_data_config(path, "--resume").hparams()
    flags = {"split_fractions": "split", "dataset_dirs": "dataset-dirs", "holdout_dirs": "holdout-dirs"}
    for key, value in config.data.hparams().items():
        if trained.get(key) != value:
            shown = " ".join(map(str, trained[key])) if isinstance(trained[key], list) else trained[key]
            raise UserError(f"--resume {path}: it was trained with {key} {shown}, not the same data; "
                            f"pass the run's own --{flags.get(key, key.replace('_', '-'))}")


def resumed_version(config: RunConfig) -> str | None:
    """The version folder of a --resume checkpoint of this run (so logs and best tracking continue there)."""
    resume, trainer = config.trainer.resume, config.trainer
    if resume is None:
        return None
    folder = Path(resume).resolve().parent
    if folder.name == "checkpoints" and folder.parent.parent == (trainer.out_dir / trainer.run_name).resolve():
        return folder.parent.name
    return None


# ---- the steps of a run ---------------------------------------------------------------------------
def build_class_table(enriched: Enriched, config: DataConfig, model: ModelConfig) -> ClassTable:
    """The classes a model predicts: cells, train counts and centroids per kind of the enriched data, the
    train prior and scaler; for the hybrid head each class's cell radius around its centroids (the unit of
    its offsets); points over each class's cell for the confidence regions (not for regression)."""
    classes = enriched.classes
    train = enriched.locations[enriched.locations["split"] == "train"]
    radius = (class_radius_m(classes, enriched.grid.cells, model.centroids).tolist()
              if model.approach == "hybrid" else None)
    samples = class_samples(classes, enriched.grid, seed=config.seed) if model.approach != "regression" else None
    return ClassTable(
        cell=[int(c) for c in classes["cell"]], n_train=[int(n) for n in classes["n_train"]],
        centroids={kind: classes[[f"{prefix}_x", f"{prefix}_y"]].to_numpy(float).tolist()
                   for kind, prefix in CENTROID_PREFIX.items()},
        scaler={k: float(v) for k, v in enriched.scaler.items()},
        prior_lat=float(train["latitude"].mean()), prior_lng=float(train["longitude"].mean()), radius=radius,
        cells=config.cells, spacing=float(config.spacing), mainland_only=bool(config.mainland_only), samples=samples)


def adapt_to_splits(config: RunConfig, has_val: bool) -> RunConfig:
    """Without a val split (a final fit, e.g. --split 1 0 0): refuse what needs val and replace the plateau
    scheduler (it follows val km) by cosine."""
    if has_val:
        return config
    if config.trainer.early_stopping_patience is not None:
        raise UserError(f"--early-stopping-patience {config.trainer.early_stopping_patience}: needs a val split; "
                        "give --split with a val fraction > 0")
    if config.optim.scheduler == "plateau":
        say("no val split: the plateau scheduler follows val km, using --scheduler cosine instead")
        return replace(config, optim=replace(config.optim, scheduler="cosine"))
    return config


@dataclass
class RunParts:
    """The objects one fit of a run is made of (the logger, history and test collector serve every phase)."""

    trainer: pl.Trainer
    logger: QuietTensorBoardLogger
    checkpoint: ModelCheckpoint  # the best checkpoint by val km (the last one without a val split)
    last: ModelCheckpoint  # every epoch's state, for --resume and the next phase
    history: EpochHistory
    tests: TestCollector


def run_logger(config: RunConfig, version: str | None) -> QuietTensorBoardLogger:
    """The run's TensorBoard logger: one version folder for all its fits (the loop counters they restore from
    each other's checkpoints keep its epochs and steps continuous)."""
    trainer_config = config.trainer
    return QuietTensorBoardLogger(trainer_config.out_dir, name=trainer_config.run_name,
                                  version=version or resumed_version(config), default_hp_metric=False)


def build_trainer(config: RunConfig, first_epoch: int, interrupt: Interrupt, has_val: bool,
                  val_baseline_km: float | None, logger: QuietTensorBoardLogger, history: EpochHistory,
                  tests: TestCollector) -> RunParts:
    """The callbacks and Trainer of the fit of a run that starts at `first_epoch` (its phase: `phase_of`)."""
    trainer_config, optim = config.trainer, config.optim
    interrupt.last_checkpoint = Path(logger.log_dir) / "checkpoints" / "last.ckpt"
    # every epoch's state as last.ckpt, for --resume (save_last=True only follows improvements); an
    # interrupted run keeps the one of its last completed epoch (a mid-epoch state would not resume exactly).
    # Without a val split last.ckpt is also the run's result.
    last = ModelCheckpoint(monitor=None, save_top_k=1, filename="last", enable_version_counter=False)
    checkpoint = (ModelCheckpoint(monitor="val/km_mean", mode="min", auto_insert_metric_name=False,
                                  filename="best-epoch{epoch:02d}-km{val/km_mean:.1f}") if has_val else last)
    limits = {"limit_train_batches": 2, "limit_val_batches": 2, "limit_test_batches": 2} if trainer_config.quick else {}
    if not has_val:
        limits["limit_val_batches"] = 0
    backbone = FreezeThenUnfreeze(optim.unfreeze_at_epoch, optim.unfreeze_blocks, optim.freeze_bn,
                                  restart_lr=optim.lr_finetune if optim.scheduler == "plateau" else None,
                                  first_epoch=first_epoch)
    callbacks = [*([checkpoint, last] if has_val else [last]), history, tests, interrupt, backbone, RandomStates()]
    if val_baseline_km is not None:
        callbacks.append(ConstantBaseline(val_baseline_km))
    # the learning rate of every group that trains (a backbone that never trains has no group)
    callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if trainer_config.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor="val/km_mean", mode="min",
                                       patience=trainer_config.early_stopping_patience))
    if trainer_config.ema is not None:
        callbacks.append(EMAWeightAveraging(decay=trainer_config.ema))
    interval = trainer_config.val_check_interval
    # 1.0 is Lightning's own default: passing it makes Lightning say what it will do anyway
    interval = int(interval) if interval > 1 else None if interval == 1.0 else interval

    trainer = pl.Trainer(
        max_epochs=trainer_config.epochs, accelerator=trainer_config.accelerator, devices=trainer_config.devices,
        precision=trainer_config.precision, strategy=ddp_strategy(trainer_config.strategy),
        num_nodes=trainer_config.num_nodes, logger=logger, callbacks=[*callbacks, *quiet_callbacks()],
        plugins=[AtomicCheckpointIO()], accumulate_grad_batches=trainer_config.accumulate_grad_batches,
        gradient_clip_val=trainer_config.gradient_clip_val, val_check_interval=interval, log_every_n_steps=1,
        deterministic=trainer_config.deterministic, **limits,
        # BatchNorm statistics over all processes' batches, so the ranks' running statistics stay equal; Lightning
        # applies it under every multi-process strategy and not to one process (GPU only: no CPU kernel)
        sync_batchnorm=config.gpu and backbone.phase == FINE_TUNING and not optim.freeze_bn,
    )
    return RunParts(trainer, logger, checkpoint, last, history, tests)


def phase_completed(trainer: pl.Trainer, end_epoch: int) -> bool:
    """Whether a fit trained up to `end_epoch` (not stopped early by EarlyStopping)."""
    early = trainer.early_stopping_callback
    stopped_early = early is not None and early.stopping_reason != EarlyStoppingReason.NOT_STOPPED
    return trainer.current_epoch >= end_epoch and not stopped_early


def ddp_strategy(strategy: str):
    """`--strategy ddp` as a DDPStrategy whose process group waits DDP_TIMEOUT_MIN (a long rank-0 cache fill
    must not time the other ranks out); any other strategy as given."""
    if strategy != "ddp":
        return strategy
    from datetime import timedelta  # noqa: PLC0415

    from pytorch_lightning.strategies import DDPStrategy  # noqa: PLC0415

    return DDPStrategy(timeout=timedelta(minutes=DDP_TIMEOUT_MIN))


def log_run_hparams(parts: RunParts, model: GeoModel, config: RunConfig, n_classes: int) -> None:
    """Scalar hparams (not the class table or lists) plus what the run used, for TensorBoard's HPARAMS tab
    and hparams.yaml; the -1 placeholders (Lightning's convention) are overwritten by the final metrics."""
    scalars = {k: v for k, v in {**model.hparams, **config.data.hparams()}.items() if not isinstance(v, (dict, list))}
    scalars.update(data=",".join(config.data.dataset_dirs), epochs=config.trainer.epochs,
                   batch_size=config.loader.batch_size, n_cells=n_classes, precision=config.trainer.precision)
    parts.logger.log_hyperparams(scalars, metrics={"val/km_best": -1, "test/km_mean": -1})


@dataclass
class FitResult:
    """What one training run leaves behind, for the report (rank 0; None elsewhere)."""

    test: pd.DataFrame  # the enriched test rows, in the order of test_km / test_xy
    test_km: np.ndarray
    test_xy: np.ndarray  # predicted EPSG:3766 x/y, moved onto land
    baseline_km: np.ndarray  # the constant (train mean) prediction's km on the test rows
    checkpoint: Path
    metrics: dict[str, Any]
    member: Member | None = None  # the test rows' predictions with the checkpoint's calibration
    details: dict[str, Details] | None = None  # their confidence regions (variant_details)

    def labelled(self) -> Labelled:
        """The test rows' predictions as labelled data to calibrate another fold's model on."""
        return Labelled.of(self.member, self.test["label"].to_numpy(), self.test_xy,
                           self.test[["crs_x", "crs_y"]].to_numpy(float))


def fit(config: RunConfig, interrupt: Interrupt, version: str | None = None, report: bool = True) -> FitResult | None:
    """One training run: enrich, fit (in phases, `src.model.finetune`), test the best checkpoint (the last one
    without a val split), write metrics.json and the training curves; with `report` print the test table and the
    checkpoint line."""
    enriched = enrich_data(config.data)
    locations = enriched.locations
    counts = locations["split"].value_counts()
    if not counts.get("train"):
        raise UserError(f"--dataset-dirs: no train location; got {counts.to_dict()}")
    has_val, has_test = bool(counts.get("val")), bool(counts.get("test"))
    config = adapt_to_splits(config, has_val)
    pl.seed_everything(config.data.seed, workers=True, verbose=False)
    classes = build_class_table(enriched, config.data, config.model)
    model = GeoModel(config.model, config.optim, classes, pretrained=config.model.backbone_weights == "imagenet")
    datamodule = GeoDataModule(locations, config.loader, config.data)
    # the cache is filled by rank 0 of each node (local disks) or by global rank 0 only (a shared file system)
    datamodule.prepare_data_per_node = config.trainer.cache_scope == "node"
    val, test = datamodule.split("val"), datamodule.split("test")
    val_baseline = geo.haversine_km(classes.prior_lat, classes.prior_lng, val["latitude"].to_numpy(),
                                    val["longitude"].to_numpy())
    logger, history, tests = run_logger(config, version), EpochHistory(), TestCollector()
    starts = phase_starts(config.optim.unfreeze_at_epoch, config.trainer.epochs, config.loader.first_epoch)
    resume = config.trainer.resume
    for index, start in enumerate(starts):
        parts = build_trainer(config, start, interrupt, has_val, float(val_baseline.mean()) if has_val else None,
                              logger, history, tests)
        if index == 0:
            if parts.trainer.is_global_zero:  # reusable with --locations by train, analyze and score
                write_locations_csv(locations, Path(logger.log_dir) / LOCATIONS_FILE)
            say(f"{counts.get('train', 0)} train / {counts.get('val', 0)} val / {len(test)} test locations, "
                f"{len(classes)} classes; "
                + (f"constant baseline (train mean location): val mean {val_baseline.mean():.1f} km; " if has_val else
                   f"no val split: {config.trainer.epochs} epochs, the last checkpoint is kept; ")
                + f"logs in {logger.log_dir}")
            log_run_hparams(parts, model, config, len(classes))
        else:  # the fine-tuning phase: a second fit in the same processes, from the frozen phase's last checkpoint
            say(f"epoch {start}: the fine-tuning phase starts ({trainable_stages(config)} of the backbone trainable, "
                f"lr {config.optim.lr_finetune:g}), continuing from {resume}")
            model = GeoModel(config.model, config.optim, classes)  # its weights come from the checkpoint
            # its loaders are made before Lightning restores the loop's epoch: they serve the phase's images
            datamodule.loader = replace(datamodule.loader, first_epoch=start)
        with contextlib.redirect_stdout(sys.stderr):  # Lightning's progress bars and tables -> stderr
            parts.trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
        if index + 1 < len(starts) and not phase_completed(parts.trainer, starts[index + 1]):
            say(f"early stopping after epoch {parts.trainer.current_epoch - 1}: no fine-tuning phase")
            break
        resume = parts.last.best_model_path
    trainer = parts.trainer
    best = Path(parts.checkpoint.best_model_path or parts.last.best_model_path)
    with contextlib.redirect_stdout(sys.stderr):
        if config.model.refine != "none":
            attach_gallery(config, trainer, model, datamodule, enriched, best)
        if has_test:
            trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    if not trainer.is_global_zero:  # the other DDP processes have the same results: rank 0 reports
        return None
    return report_run(config, parts, datamodule, classes, best, val_baseline if has_val else None, report)


def attach_gallery(config: RunConfig, trainer: pl.Trainer, model: GeoModel, datamodule: GeoDataModule,
                   enriched: Enriched, best: Path) -> None:
    """The post-fit step of --refine knn: the retrieval gallery of the run, built with the best checkpoint's
    weights (`src.training.gallery`), set on `model` (its test refines by it; every process builds it) and added
    to the best checkpoint (rank 0 writes)."""
    from src.inference.retrieval import GALLERY_KEY, Gallery  # noqa: PLC0415
    from src.training.gallery import build_gallery  # noqa: PLC0415

    checkpoint = read_checkpoint(best)
    model.load_state_dict(checkpoint["state_dict"])
    backbone_trained = checkpoint_phase(checkpoint) == FINE_TUNING
    gallery, report = build_gallery(model, datamodule, enriched, config.data, config.gallery_dirs, backbone_trained,
                                    trainer.strategy.root_device)
    model.gallery = Gallery.from_state(gallery.state())  # as predict loads it (float16 embeddings)
    if trainer.is_global_zero:
        write_checkpoint_entry(best, GALLERY_KEY, gallery.state())
    say(report.line(len(gallery)))


def report_run(config: RunConfig, parts: RunParts, datamodule: GeoDataModule, classes: ClassTable, best: Path,
               val_baseline: np.ndarray | None, report: bool) -> FitResult:
    """metrics.json, the test table in TensorBoard, the training curves and (with `report`) the console table."""
    test = datamodule.split("test")
    has_test = len(test) > 0
    test_km, test_xy = (parts.tests.km, parts.tests.xy) if has_test else (np.empty(0), np.empty((0, 2)))
    baseline_km = geo.haversine_km(classes.prior_lat, classes.prior_lng, test["latitude"].to_numpy(),
                                   test["longitude"].to_numpy())
    score = parts.checkpoint.best_model_score
    best_val = float(score) if score is not None else float("nan")
    logger, trainer = parts.logger, parts.trainer
    logger.log_metrics({"val/km_best": best_val, "test/km_mean": float(test_km.mean()) if has_test else float("nan")})
    name = f"{config.model.approach} ({config.model.backbone})"
    rows = [(name, geo.summarize_km(test_km)),
            ("constant (train mean location)", geo.summarize_km(baseline_km))] if has_test else []
    if rows:  # the test table as text (TensorBoard's TEXT tab), not as single-point charts
        logger.experiment.add_text("test", geo.km_table(rows, "model"), trainer.global_step)
    logger.save()
    metrics = {"checkpoint": str(best), "epochs": trainer.current_epoch, "val_km_best": best_val,
               "val_constant_baseline_km": None if val_baseline is None else float(val_baseline.mean()),
               "test": geo.summarize_km(test_km) if has_test else None,
               "test_constant_baseline": geo.summarize_km(baseline_km) if has_test else None,
               "feature_cache": datamodule.feature_cache_counts()}
    details = parts.tests.details if has_test else None
    reliability = Reliability.of([details], test_km) if details else None
    if reliability is not None:
        metrics["confidence"] = reliability.summary()
    write_text(json.dumps(metrics, indent=2) + "\n", Path(logger.log_dir) / "metrics.json")
    curves = training_curves(parts.history.rows, metrics["val_constant_baseline_km"],
                             Path(logger.log_dir) / "curves.png")
    dirs = ", ".join(config.data.dataset_dirs)
    if report:
        say(f"training curves: {curves}")
        if rows:
            print(f"test split of {dirs}:")
            print(geo.km_table(rows, "model"))
            if reliability is not None:
                report_reliability(reliability, "the test split", Path(logger.log_dir))
        else:
            print(f"no test split: nothing to test ({dirs})")
        print(f"checkpoint: {best}")
    return FitResult(test, test_km, test_xy, baseline_km, best, metrics, parts.tests.member if has_test else None,
                     details)


def report_reliability(reliability: Reliability, what: str, folder: Path) -> None:
    """Print the share of true locations inside the 50% and 90% regions and draw reliability.png in `folder`."""
    print(f"confidence regions on {what} ({reliability.count} locations, {reliability.describe_temperatures()}):")
    print(reliability.table())
    figure = reliability_figure(reliability.levels, reliability.inside, reliability.count,
                                f"Confidence regions on {what}", folder / RELIABILITY_FIGURE)
    say(f"reliability figure: {figure}")


def cross_validate(config: RunConfig, interrupt: Interrupt) -> None:
    """K runs in version_N/fold_k, each testing on fold k; out-of-fold predictions of every location in
    version_N/oof.csv and their km against the constant baseline in version_N/oof_metrics.json."""
    trainer_config, n_folds = config.trainer, config.trainer.folds
    version = f"version_{TensorBoardLogger(trainer_config.out_dir, name=trainer_config.run_name).version}"
    predictions, truths, baselines, results = [], [], [], []
    for k in range(n_folds):
        say(f"fold {k + 1} of {n_folds}")
        fold = replace(config, data=config.data.with_fold(k, n_folds))
        result = fit(fold, interrupt, version=f"{version}/fold_{k}", report=False)
        if result is None:  # not rank 0
            continue
        lat, lng = geo.unproject(result.test_xy[:, 0], result.test_xy[:, 1])
        predictions.append(pd.DataFrame({"uuid": result.test["uuid"].astype(str).to_numpy(),
                                         "latitude": np.atleast_1d(lat), "longitude": np.atleast_1d(lng)}))
        truths.append(result.test_km)
        baselines.append(result.baseline_km)
        results.append(result)
        say(f"fold {k + 1}: {len(result.test_km)} test locations, mean {result.test_km.mean():.1f} km "
            f"(constant {result.baseline_km.mean():.1f} km)")
    if not predictions:
        return
    folder = trainer_config.out_dir / trainer_config.run_name / version
    details = calibrate_out_of_fold(results)
    oof = pd.concat(predictions, ignore_index=True)
    # the out-of-fold predictions with their confidence regions, in --details' format
    columns = [details_columns(d["calibrated"]) for d in details]  # the folds' test rows, as `predictions`
    oof_details = oof.assign(**{column: [value for fold in columns for value in fold[column]]
                                for column in DETAILS_COLUMNS[3:]})
    oof = oof.sort_values("uuid", ignore_index=True)
    write_csv(oof, folder / "oof.csv", float_format="%.7f")
    write_csv(oof_details.sort_values("uuid", ignore_index=True), folder / "oof_details.csv", float_format="%.7f")
    km, baseline = np.concatenate(truths), np.concatenate(baselines)
    rows = [(f"{config.model.approach} ({config.model.backbone}), out of fold", geo.summarize_km(km)),
            ("constant (each fold's train mean)", geo.summarize_km(baseline))]
    reliability = Reliability.of(details, km)
    metrics = {"folds": n_folds, "checkpoints": [str(result.checkpoint) for result in results],
               "oof": geo.summarize_km(km),
               "oof_constant_baseline": geo.summarize_km(baseline), "confidence": reliability.summary()}
    write_text(json.dumps(metrics, indent=2) + "\n", folder / "oof_metrics.json")
    print(f"{n_folds}-fold cross-validation of {', '.join(config.data.dataset_dirs)} "
          f"({len(oof)} locations, each predicted by the run that did not train on it):")
    print(geo.km_table(rows, "model"))
    report_reliability(reliability, "out-of-fold predictions", folder)
    print(f"out-of-fold predictions: {folder / 'oof.csv'}")


def calibrate_out_of_fold(results: list[FitResult]) -> list[dict[str, Details]]:
    """Each fold's calibration refitted on the out-of-fold predictions of the other folds
    (`src.evaluation.calibration.cross_fitted`: a val split of a few locations is too few to fit it), written
    into the fold's best checkpoint; the confidence regions of each fold's test rows with it and, for the
    reliability check, with its own val split's."""
    calibrations = cross_fitted([result.member.calibration for result in results],
                                [result.labelled() for result in results])
    details = []
    for result, calibration in zip(results, calibrations):
        write_calibration(result.checkpoint, calibration)
        found = variant_details([replace(result.member, calibration=calibration)], result.test_xy)
        details.append({"calibrated": found.pop("calibrated"), VAL_SPLIT: result.details["calibrated"], **found})
    return details


def train(config: RunConfig, interrupt: Interrupt) -> None:
    """Fit, test and report one run, or cross-validate with `config.trainer.folds`."""
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per batch: noise, not news
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    quiet_lightning()  # no GPU/TPU availability lines, no litlogger advert
    # the test step gathers every process's locations and drops DistributedSampler's repeats itself
    warnings.filterwarnings("ignore", message=r".*`DistributedSampler` with the dataloaders. During `trainer.test")
    # a resumed run and the fine-tuning phase continue in the run's own checkpoints folder
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    if config.trainer.folds is None:
        fit(config, interrupt)
    else:
        cross_validate(config, interrupt)
