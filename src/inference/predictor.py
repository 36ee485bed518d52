"""Predicting the locations of folders of views with one model or an ensemble.

Coordinates are averaged over models (and the TTA mirror, `src.data.quadruplets.mirror_views`) in EPSG:3766,
moved onto land when the average lies outside Croatia, then converted to degrees. Every location gets a row:
unreadable views are replaced by readable views of the same location, a location without any readable view
gets the training prior; both are reported (`ViewIssues`).

A model whose backbone was never trained (frozen in its run) can read its backbone features from the feature
cache that training filled (`CachedBackbone`, `src.data.features`), computing the missing entries, and run
only its head: the same points up to float tolerance, without decoding the images or running the backbone
again. Only locations whose four views pass the image check do; the others go through the whole model.
With `details`, each row also gets the confidence regions and the most likely cells
(`src.evaluation.calibration.prediction_details`).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.data.features import FeatureCache
from src.data.images import check_image, view_paths
from src.data.quadruplets import (QuadrupletFolders, collate_quadruplets, eval_transform, input_spec, mirror_views,
                                  spec_transforms)
from src.evaluation.calibration import DEFAULT_TOP, details_columns, member, prediction_details
from src.inference.checkpoints import read_test_locations
from src.inference.engine import fused_inference, infer
from src.inference.retrieval import refine
from src.core.errors import UserError
from src.core.geo import project, snap_to_land, unproject
from src.data.ingest import find_image_root, list_location_dirs

CACHED_CHUNK = 1024  # locations whose cached features are in memory at once



def check_device(device: str) -> None:
    """A torch device this machine has (e.g. cpu, cuda, cuda:0)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device}: not a torch device; use cpu or cuda (cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU on this machine; use --device cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: unsupported device type; use cpu or cuda (cuda:N)")


def locations_from_images(images: str | Path) -> list[tuple[str, Path]]:
    """(uuid, folder) of every location folder of a dataset dir (data/ or images/ inside) or a folder of uuids."""
    images = Path(images)
    if not images.is_dir():
        raise UserError(f"--images {images}: not a directory; pass a dataset dir or a dir of uuid folders")
    found = list_location_dirs(find_image_root(images))
    if not found:
        raise UserError(f"--images {images}: no location folders found (expected <uuid>/0.jpg ... 270.jpg, "
                        "directly or under data/ or images/)")
    return sorted((str(uuid), Path(folder)) for uuid, folder in found.items())


def locations_from_checkpoint(checkpoint: Path) -> list[tuple[str, Path]]:
    """The (uuid, folder) pairs of the test split of a checkpoint's run, sorted by uuid."""
    locations = read_test_locations(checkpoint)
    if not locations:
        raise UserError(f"--checkpoint {checkpoint}: records no test split (test_locations); pass --images DIR")
    if not any(folder.is_dir() for _, folder in locations):
        raise UserError(f"--checkpoint {checkpoint}: none of the {len(locations)} image folders of its test split "
                        f"exists here (e.g. {locations[0][1]}); pass --images DIR")
    return locations


@dataclass
class ViewIssues:
    """Data defects met while predicting: replaced views and locations that fell back to the prior."""

    replaced: list[str] = field(default_factory=list)  # "uuid view: reason -> used view"
    no_views: list[str] = field(default_factory=list)  # uuids predicted at the prior

    def report(self, prior: tuple[float, float]) -> list[str]:
        lines = []
        if self.replaced:
            lines.append(f"warning: replaced {len(self.replaced)} missing/unreadable view(s) by another view "
                         "of the same location:")
            lines += [f"  {item}" for item in self.replaced]
        if self.no_views:
            lines.append(f"warning: {len(self.no_views)} location(s) have no readable view and get the training "
                         f"prior ({prior[0]:.5f}, {prior[1]:.5f}):")
            lines += [f"  {uuid}" for uuid in self.no_views]
        return lines


@torch.no_grad()
def member_outputs(model, views: torch.Tensor, tta: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
    """(class probabilities [B, C] or None for regression, EPSG:3766 x/y [B, 2] float64) of one model (torch
    or ONNX Runtime), the points refined by its gallery with `--refine knn`; with `tta` the means over the
    quadruplet and its mirror."""
    probabilities, xy = refined(model, *infer(model, views))
    if tta:
        mirrored_probabilities, mirrored_xy = refined(model, *infer(model, mirror_views(views)))
        xy = (xy + mirrored_xy) / 2
        probabilities = None if probabilities is None else (probabilities + mirrored_probabilities) / 2
    return probabilities, xy


def refined(model, probabilities: np.ndarray | None, xy: np.ndarray,
            embedding: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(probabilities, the head's points refined by the model's gallery: `src.inference.retrieval.refine`)."""
    return probabilities, np.asarray(refine(model, xy, embedding, probabilities), dtype=np.float64)


def ensemble_prior(models) -> tuple[float, float]:
    """The models' training priors averaged in EPSG:3766, as (lat, lng)."""
    x, y = project([m.hparams["prior_lat"] for m in models], [m.hparams["prior_lng"] for m in models])
    lat, lng = unproject(np.mean(x), np.mean(y))
    return float(lat), float(lng)


@dataclass
class CachedBackbone:
    """A model's backbone features from the feature cache: `cache` keyed by the model's backbone weights,
    image size and evaluation transform (`transform`), as src.train keys it; missing entries are computed by
    `extract` (ONNX Runtime) or, when None, the model's torch backbone."""

    cache: FeatureCache
    transform: Callable
    extract: Callable[[torch.Tensor], torch.Tensor] | None = None

    @torch.no_grad()
    def infer(self, model, image_dirs: Sequence[str], batch_size: int = 32, num_workers: int = 0,
              device: str = "cpu") -> tuple[np.ndarray | None, np.ndarray]:
        """(class probabilities [N, C] or None for regression, EPSG:3766 x/y [N, 2] float64) of `model` (a
        GeoModel) at the locations in `image_dirs`: the features from the cache (missing entries computed and
        stored), then only the head, chunk by chunk."""
        was_training = model.training
        model.eval()
        try:
            probabilities, xy = [], []
            for start in range(0, len(image_dirs), CACHED_CHUNK):
                features = self.cache.features(image_dirs[start:start + CACHED_CHUNK], model.backbone, self.transform,
                                               batch_size=batch_size, num_workers=num_workers, device=device,
                                               extract=self.extract)
                chunk_probabilities, chunk_xy = refined(model, *fused_inference(model, model.fusion(
                    features.to(model.device))))
                probabilities.append(chunk_probabilities)
                xy.append(chunk_xy)
        finally:
            model.train(was_training)
        if not xy:
            return None, np.empty((0, 2))
        return (None if probabilities[0] is None else np.concatenate(probabilities)), np.concatenate(xy)


@dataclass
class MemberOutputs:
    """One ensemble member's outputs at every location, filled batch by batch (cache and images)."""

    xy: np.ndarray  # [N, 2] EPSG:3766
    probabilities: np.ndarray | None = None  # [N, C], None for regression

    def put(self, rows: np.ndarray, probabilities: np.ndarray | None, xy: np.ndarray) -> None:
        self.xy[rows] = xy
        if probabilities is not None:
            if self.probabilities is None:
                self.probabilities = np.zeros((len(self.xy), probabilities.shape[1]), probabilities.dtype)
            self.probabilities[rows] = probabilities


def cached_backbone(model, cache_dir: str | Path, engine: str = "torch") -> CachedBackbone:
    """The feature cache of a GeoModel's backbone under `cache_dir` (the folder src.train fills), its missing
    entries computed by ONNX Runtime (`engine` "onnx") or torch."""
    from src.inference.engine import OnnxFeatureExtractor  # noqa: PLC0415 (onnx: only here)

    size, mean, std = input_spec(model.hparams)
    transform = eval_transform(size, mean, std)
    preprocessing = repr(transform)  # as the training DataModule describes it: the same cache folder
    cache = FeatureCache(cache_dir, str(model.hparams["backbone"]), model.backbone, size, preprocessing=preprocessing)
    extract = OnnxFeatureExtractor(model.backbone, size, preprocessing=preprocessing) if engine == "onnx" else None
    return CachedBackbone(cache, transform, extract)


def checked_views(folders: Sequence[Path]) -> np.ndarray:
    """Per location folder: whether all four views pass the image check (then no view is replaced)."""
    return np.array([all(check_image(path) is None for path in view_paths(folder)) for folder in folders], bool)


def predict_locations(models, locations: list[tuple[str, Path]], tta: bool = False, batch_size: int = 32,
                      num_workers: int = 0, device: str = "cpu", progress: bool = True,
                      caches: Sequence[CachedBackbone | None] | None = None, details: bool = False,
                      top: int = DEFAULT_TOP) -> tuple[pd.DataFrame, ViewIssues]:
    """Stream `locations` through the ensemble `models`; one row (uuid, latitude, longitude) per location.

    Coordinates are averaged over models (and the TTA mirror) in EPSG:3766, moved onto land when the
    average lies outside Croatia (`src.geo.snap_to_land`), then converted to degrees. A model with a
    CachedBackbone in `caches` (aligned with `models`; not with `tta`: the cache holds the unmirrored views'
    features) reads the features of the locations whose views all pass the image check from the cache and
    runs only its head there; every other location goes through the whole model. With `details` the rows
    also hold the --details columns (`src.evaluation.calibration.DETAILS_COLUMNS`: the 50% and 90% radii, the
    top cell's probability and the `top` most likely cells), empty for a location predicted at the prior.
    """
    caches = list(caches or [None] * len(models))
    if tta and any(caches):
        raise ValueError("TTA mirrors the views: cached features cannot be used with it")
    specs = [input_spec(m.hparams) for m in models]
    uuids = [uuid for uuid, _ in locations]
    folders = [folder for _, folder in locations]
    outputs = [MemberOutputs(np.zeros((len(locations), 2))) for _ in models]
    clean = checked_views(folders) if any(caches) else np.zeros(len(locations), bool)
    clean_dirs = [str(folder) for folder, ok in zip(folders, clean) if ok]
    for model, cache, output in zip(models, caches, outputs):
        if cache is not None and clean_dirs:
            output.put(np.flatnonzero(clean), *cache.infer(model, clean_dirs, batch_size, num_workers, device))
    # the locations some model reads the images of
    streamed = np.flatnonzero(~clean) if all(cache is not None for cache in caches) else np.arange(len(locations))
    usable = np.ones(len(locations), bool)
    issues = ViewIssues()
    if len(streamed):
        dataset = QuadrupletFolders([folders[i] for i in streamed], spec_transforms(specs))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=collate_quadruplets, pin_memory=device.startswith("cuda"))
        for indices, batches, batch_usable, substitutions in tqdm(loader, desc="predict", unit="batch",
                                                                  file=sys.stderr, disable=not progress):
            rows = streamed[indices.numpy()]
            for k, (model, spec, cache) in enumerate(zip(models, specs, caches)):
                take = ~clean[rows] if cache is not None else np.ones(len(rows), bool)
                if take.any():
                    views = batches[spec][torch.from_numpy(take)]
                    outputs[k].put(rows[take], *member_outputs(model, views.to(device, non_blocking=True), tta))
            usable[rows] = batch_usable.numpy()
            issues.replaced += [f"{uuids[streamed[i]]} {view}.jpg: {reason} -> used {used}.jpg"
                                for i, view, reason, used in substitutions]
            issues.no_views += [uuids[row] for row, ok in zip(rows, batch_usable.tolist()) if not ok]
    prior = ensemble_prior(models)
    xy = sum(output.xy for output in outputs) / len(models)
    xy[~usable] = np.array(project(prior[0], prior[1]), float)
    snapped = np.column_stack(snap_to_land(xy[:, 0], xy[:, 1]))
    lat, lng = unproject(snapped[:, 0], snapped[:, 1])
    frame = pd.DataFrame({"uuid": uuids, "latitude": lat, "longitude": lng})
    if details:
        found = prediction_details([member(model, output.probabilities, output.xy)
                                    for model, output in zip(models, outputs)], snapped, top)
        found.blank(~usable)  # at the prior: the model saw no view
        frame = pd.concat([frame, pd.DataFrame(details_columns(found))], axis=1)
    return frame.sort_values("uuid", ignore_index=True), issues
