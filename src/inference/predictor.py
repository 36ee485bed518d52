"""Predicting the locations of folders of views with one model or an ensemble.

Coordinates are averaged over models (and the TTA mirror, `src.data.quadruplets.mirror_views`) in EPSG:3766,
moved onto land when the average lies outside Croatia, then converted to degrees. Every location gets a row:
unreadable views are replaced by readable views of the same location, a location without any readable view
gets the training prior; both are reported (`ViewIssues`).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.data.quadruplets import QuadrupletFolders, collate_quadruplets, input_spec, mirror_views, spec_transforms
from src.inference.checkpoints import read_test_locations
from src.inference.engine import infer
from src.inference.retrieval import refine
from src.core.errors import UserError
from src.core.geo import project, snap_to_land, unproject
from src.data.ingest import find_image_root, list_location_dirs



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


def located(model, views: torch.Tensor) -> np.ndarray:
    """EPSG:3766 x/y [B, 2] of one model (torch or ONNX Runtime), refined by its gallery with `--refine knn`."""
    probabilities, xy, embedding = infer(model, views)
    return refine(model, xy, embedding, probabilities)


@torch.no_grad()
def member_xy(model, views: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """EPSG:3766 x/y [B, 2] of one model; with `tta` the mean over the quadruplet and its mirror."""
    xy = located(model, views)
    if tta:
        xy = (xy + located(model, mirror_views(views))) / 2
    return torch.from_numpy(np.asarray(xy, dtype=np.float64))


def ensemble_prior(models) -> tuple[float, float]:
    """The models' training priors averaged in EPSG:3766, as (lat, lng)."""
    x, y = project([m.hparams["prior_lat"] for m in models], [m.hparams["prior_lng"] for m in models])
    lat, lng = unproject(np.mean(x), np.mean(y))
    return float(lat), float(lng)


def predict_locations(models, locations: list[tuple[str, Path]], tta: bool = False, batch_size: int = 32,
                      num_workers: int = 0, device: str = "cpu", progress: bool = True
                      ) -> tuple[pd.DataFrame, ViewIssues]:
    """Stream `locations` through the ensemble `models`; one row (uuid, latitude, longitude) per location.

    Coordinates are averaged over models (and the TTA mirror) in EPSG:3766, moved onto land when the
    average lies outside Croatia (`src.geo.snap_to_land`), then converted to degrees.
    """
    specs = [input_spec(m.hparams) for m in models]
    uuids = [uuid for uuid, _ in locations]
    folders = QuadrupletFolders([folder for _, folder in locations], spec_transforms(specs))
    loader = DataLoader(folders, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_quadruplets, pin_memory=device.startswith("cuda"))
    prior = ensemble_prior(models)
    prior_xy = np.array(project(prior[0], prior[1]), float)
    issues = ViewIssues()
    all_uuids, all_xy = [], []
    for indices, batches, usable, substitutions in tqdm(loader, desc="predict", unit="batch", file=sys.stderr,
                                                        disable=not progress):
        batch_uuids = [uuids[i] for i in indices.tolist()]
        xy = torch.zeros(len(batch_uuids), 2, dtype=torch.float64)
        for model, spec in zip(models, specs):
            xy += member_xy(model, batches[spec].to(device, non_blocking=True), tta).cpu()
        xy = (xy / len(models)).numpy()
        xy[~usable.numpy()] = prior_xy
        issues.replaced += [f"{uuids[i]} {view}.jpg: {reason} -> used {used}.jpg"
                            for i, view, reason, used in substitutions]
        issues.no_views += [u for u, ok in zip(batch_uuids, usable.tolist()) if not ok]
        all_uuids += batch_uuids
        all_xy.append(xy)
    xy = np.concatenate(all_xy)
    lat, lng = unproject(*snap_to_land(xy[:, 0], xy[:, 1]))
    frame = pd.DataFrame({"uuid": all_uuids, "latitude": lat, "longitude": lng})
    return frame.sort_values("uuid", ignore_index=True), issues
