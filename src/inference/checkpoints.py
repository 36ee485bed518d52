"""Checkpoints written by src.train: finding them under reports/, reading their hparams, loading a GeoModel.

The one place that opens a checkpoint file. A run's checkpoints live in
`<reports>/<run-name>/version_N/checkpoints/` (`best-epochEE-kmK.K.ckpt` and `last.ckpt`). Every problem
with a file (missing, a directory, damaged, not written by src.train) is a one-line UserError that names
the flag, the file and, where it helps, the checkpoints that do exist.
"""

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from src.core.files import atomic_path
from src.core.paths import REPORTS_DIR
from src.core.errors import UserError, brief

log = logging.getLogger(__name__)
# hparams every GeoModel checkpoint carries (predict needs the rest: prior_lat/lng, scaler, ...)
MODEL_HPARAMS = ("approach", "backbone", "image_size", "classes")
PREDICT_HPARAMS = ("image_size", "prior_lat", "prior_lng")
# the data flags a run was trained with; rebuild its locations without --dataset-dirs
DATA_HPARAMS = ("dataset_dirs", "spacing", "seed")
LISTED = 5
_VAL_KM = re.compile(r"-km(\d+(?:\.\d+)?)")


def list_checkpoints(reports_dir: str | Path = REPORTS_DIR, best_only: bool = False) -> list[Path]:
    """Every `*.ckpt` under `reports_dir`/…/checkpoints/, newest first (only `*best*` ones with `best_only`)."""
    found = [p for p in Path(reports_dir).glob("**/checkpoints/*.ckpt") if not best_only or "best" in p.name]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def checkpoints_listing(reports_dir: str | Path = REPORTS_DIR) -> str:
    """A short phrase naming the checkpoints under `reports_dir` (the newest few), for error messages."""
    found = list_checkpoints(reports_dir) if Path(reports_dir).is_dir() else []
    if not found:
        return (f"there is no checkpoint under {reports_dir}; train one with "
                "`python -m src.train --approach classification`")
    names = ", ".join(map(str, found[:LISTED]))
    more = f" and {len(found) - LISTED} more" if len(found) > LISTED else ""
    return f"checkpoints under {reports_dir} (newest first): {names}{more}"


def val_km(path: Path) -> float:
    """The val mean km a best checkpoint was saved with: from its name (src.train writes `-kmK.K`), else
    from its ModelCheckpoint state; inf when neither says."""
    match = _VAL_KM.search(Path(path).stem)
    if match:
        return float(match.group(1))
    try:
        callbacks = read_checkpoint(path)["callbacks"]
        scores = [state.get("current_score") for key, state in callbacks.items()
                  if key.startswith("ModelCheckpoint") and "val/km_mean" in key]
        return float(next(s for s in scores if s is not None))
    except (UserError, KeyError, StopIteration, AttributeError, TypeError):
        return float("inf")


def find_checkpoint(reports_dir: str | Path = REPORTS_DIR) -> Path:
    """The default checkpoint: of the newest run (the version folder holding the most recently written
    best checkpoint), its best checkpoint by val mean km (ties: the newer one)."""
    candidates = list_checkpoints(reports_dir, best_only=True) if Path(reports_dir).is_dir() else []
    if not candidates:
        raise UserError(
            f"{reports_dir}: no best checkpoint (reports/<run>/version_N/checkpoints/*best*.ckpt) found; "
            "train one with `python -m src.train --approach classification` or pass --checkpoint PATH"
        )
    newest_run = candidates[0].parent.parent
    of_run = [p for p in candidates if p.parent.parent == newest_run]  # newest first: min() keeps the newer on ties
    return min(of_run, key=val_km)


def read_checkpoint(path: str | Path, flag: str = "--checkpoint", reports_dir: str | Path | None = None,
                    training_state: bool = False) -> dict[str, Any]:
    """The checkpoint dict of a src.train checkpoint (tensors memory-mapped, so reading hparams is cheap).

    `flag` names the option in messages; with `reports_dir` a missing file's message lists the checkpoints
    there. `training_state` also requires the loop state that --resume needs.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "file not found"
        where = f"; {checkpoints_listing(reports_dir)}" if reports_dir is not None else ""
        raise UserError(f"{flag} {path}: {what}; pass a .ckpt written by src.train{where}")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # an old (non-zip) torch file cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, empty or not a torch file at all: torch/pickle raise many types
        raise UserError(f"{flag} {path}: not a readable checkpoint ({brief(error)}); the file is damaged or not "
                        "a checkpoint; pass a .ckpt written by src.train") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint or not set(MODEL_HPARAMS) <= set(hparams):
        raise UserError(f"{flag} {path}: not a checkpoint written by src.train (no GeoModel hparams); "
                        "pass a .ckpt written by src.train")
    if training_state and "loops" not in checkpoint:
        raise UserError(f"{flag} {path}: not a training checkpoint (no loop state); "
                        "give the last.ckpt of the interrupted run")
    return checkpoint


def read_hparams(path: str | Path, flag: str = "--checkpoint", reports_dir: str | Path | None = None,
                 required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The model hparams of a src.train checkpoint; `required` keys missing is a one-line UserError."""
    hparams = read_checkpoint(path, flag, reports_dir)["hyper_parameters"]
    require_hparams(hparams, required, flag, path)
    return dict(hparams)


def require_hparams(hparams, required: tuple[str, ...], flag: str, path: str | Path) -> None:
    """A one-line UserError when a checkpoint's hparams lack any of `required`."""
    missing = [key for key in required if key not in hparams]
    if missing:
        raise UserError(f"{flag} {path}: lacks {', '.join(missing)} in its hparams (an older src.train?); "
                        "retrain it with the current src.train")


def _run_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What the DataModule saved (`data`, `test_locations`); checkpoints written before the DataModule saved
    them hold the same keys among the model's hparams."""
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    if saved.get("data") is not None:
        return {**saved["data"], "test_locations": saved.get("test_locations")}
    return checkpoint["hyper_parameters"]


def read_data_config(path: str | Path, flag: str = "--checkpoint", reports_dir: str | Path | None = None):
    """The DataConfig a checkpoint's run was trained on (its dataset dirs, cells, split)."""
    from src.data.config import DataConfig  # noqa: PLC0415

    saved = _run_hparams(read_checkpoint(path, flag, reports_dir))
    missing = [key for key in DATA_HPARAMS if key not in saved]
    if missing:
        raise UserError(f"{flag} {path}: lacks {', '.join(missing)} in its data hparams (an older src.train?); "
                        "pass --dataset-dirs or --locations")
    return DataConfig.from_hparams(saved)


def read_test_locations(path: str | Path, flag: str = "--checkpoint") -> list[tuple[str, Path]]:
    """The (uuid, image folder) pairs of the test split of a checkpoint's run, sorted by uuid."""
    saved = _run_hparams(read_checkpoint(path, flag)).get("test_locations") or []
    return sorted((str(uuid), Path(folder)) for uuid, folder in saved)


def checkpoint_phase(checkpoint: dict[str, Any]) -> str:
    """The training phase a checkpoint dict was written in: 'fine-tuning' (its backbone had trained) or 'frozen'
    (`src.model.finetune`); for checkpoints from before src.train saved it, the phase of their epoch."""
    from src.model.finetune import PHASE_KEY, phase_of  # noqa: PLC0415 (Lightning: only when asked)

    if PHASE_KEY in checkpoint:
        return str(checkpoint[PHASE_KEY])
    return phase_of(checkpoint["hyper_parameters"].get("unfreeze_at_epoch"), int(checkpoint.get("epoch", 0)))


def backbone_trained(path: str | Path, flag: str = "--checkpoint") -> bool:
    """Whether a checkpoint's backbone was trained in its run (written in the fine-tuning phase); False means it
    holds the weights its run started from, as the feature cache keys them. Checkpoints that record neither
    their phase nor their unfreeze epoch count as trained."""
    from src.model.finetune import FINE_TUNING, PHASE_KEY  # noqa: PLC0415 (Lightning: only when asked)

    checkpoint = read_checkpoint(path, flag)
    if PHASE_KEY not in checkpoint and "unfreeze_at_epoch" not in checkpoint["hyper_parameters"]:
        return True
    return checkpoint_phase(checkpoint) == FINE_TUNING


def write_checkpoint_entry(path: str | Path, key: str, value: Any) -> None:
    """Set one entry of a checkpoint file (the gallery of --refine knn, a refitted calibration), rewritten
    atomically: a reader sees the old or the new file."""
    checkpoint = read_checkpoint(path)  # memory-mapped: the old file stays readable until the rename
    checkpoint[key] = value
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def write_calibration(path: str | Path, calibration) -> None:
    """Replace the calibration a checkpoint carries (`src.evaluation.calibration.Calibration`; the
    cross-validation's out-of-fold fit)."""
    write_checkpoint_entry(path, "calibration", calibration.to_checkpoint())


def load_model(path: str | Path, device: str = "cpu", flag: str = "--checkpoint",
               reports_dir: str | Path | None = REPORTS_DIR, **overrides):
    """A GeoModel from a src.train checkpoint, in eval mode on `device`; a missing file's message lists the
    checkpoints under `reports_dir` (default: reports/, for commands without --reports-dir).

    `overrides` replace model config values that only change how outputs become coordinates (`centroids`,
    `topk`, `predict_rule`, `refine`, `refine_k`, `refine_gate`); None values are ignored. Every checkpoint
    src.train has written loads here. The model's `calibration` is the checkpoint's
    (`src.evaluation.calibration`); a checkpoint written before calibration existed gets an uncalibrated one
    (temperature 1, each class at its centroid). The checkpoint's retrieval gallery, when it has one, is loaded
    as `model.gallery`: asking for `refine` knn without one is a one-line UserError; a checkpoint trained with
    knn that holds none (the last.ckpt beside a best checkpoint, an interrupted run) predicts the head's points,
    with a warning.
    """
    from src.evaluation.calibration import Calibration  # noqa: PLC0415
    from src.inference.retrieval import checkpoint_gallery  # noqa: PLC0415
    from src.model.config import configs_from_hparams  # noqa: PLC0415 (Lightning: only where a model is built)
    from src.model.geomodel import GeoModel  # noqa: PLC0415

    checkpoint = read_checkpoint(path, flag, reports_dir)
    hparams = checkpoint["hyper_parameters"]
    require_hparams(hparams, PREDICT_HPARAMS, flag, path)
    gallery = checkpoint_gallery(checkpoint, overrides.get("refine"), flag, path)
    try:
        model_config, optim, classes = configs_from_hparams(hparams)
        model_config = replace(model_config, channels_last=model_config.channels_last and str(device).startswith("cuda"),
                               **{key: value for key, value in overrides.items() if value is not None})
        if model_config.refine == "knn" and gallery is None:
            log.warning("warning: %s %s: trained with --refine knn but holds no gallery (a run keeps it in its best "
                        "checkpoint); predicting the head's points", flag, path)
            model_config = replace(model_config, refine="none")
        model = GeoModel(model_config, optim, classes)
        model.load_state_dict(checkpoint["state_dict"])
        model.calibration = Calibration.from_checkpoint(checkpoint.get("calibration"), default=model.calibration)
    except Exception as error:  # a state dict that does not fit the hparams (edited or foreign weights)
        raise UserError(f"{flag} {path}: not a loadable GeoModel checkpoint ({brief(error)}); "
                        "pass a .ckpt written by src.train") from None
    model.gallery = gallery
    return model.to(device).eval()
