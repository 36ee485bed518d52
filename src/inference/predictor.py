"""Predict a location for every folder of a test set: a `uuid,latitude,longitude` CSV, sorted by uuid.

    python -m src.predict [--checkpoint PATH ...] [--images DIR] [--tta] [--batch-size N] > submission.csv

Without --checkpoint the best checkpoint (lowest val km) of the newest run under reports/ is used;
without --images the test split of that checkpoint's run. --predict-rule / --centroids / --topk change how
a classification or hybrid checkpoint turns class probabilities into a point (default: as trained); a
point outside Croatia (regression, means, ensembles) is moved to the nearest point on land. Several checkpoints form an ensemble: their predictions are averaged
in EPSG:3766 metres. --tta also averages over the mirrored quadruplet (`src.data.mirror_views`: every view
flipped horizontally and the 90 and 270 views swapped, a geometrically consistent mirror image).
Every location gets a row: unreadable views are replaced by readable views of the same location, and
a location without any readable view gets the training prior (train-mean location); both are listed
on stderr. stdout carries only the CSV. --engine picks torch or ONNX Runtime (`src.export`; auto: ONNX
Runtime on the CPU, torch on a GPU); the ONNX export is made once and kept in the shared export store
(data/cache/onnx, `src.inference.engine`).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.data.datamodule import eval_transform, input_spec, mirror_views
from src.core.errors import UserError
from src.core.geo import project, snap_to_land, unproject
from src.data.images import N_VIEWS, VIEWS, check_image, load_image, view_paths
from src.data.ingest import find_image_root, list_location_dirs

# a missing view is replaced by the first readable one in this order: its neighbours, then the opposite view
SUBSTITUTE_ORDER = {i: [(i + 1) % N_VIEWS, (i + 3) % N_VIEWS, (i + 2) % N_VIEWS] for i in range(N_VIEWS)}


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


def locations_from_checkpoint(model, checkpoint: Path) -> list[tuple[str, Path]]:
    """The (uuid, folder) pairs of the test split recorded in a checkpoint's hparams."""
    test_locations = model.hparams.get("test_locations")
    if not test_locations:
        raise UserError(f"--checkpoint {checkpoint}: records no test split (test_locations); pass --images DIR")
    locations = sorted((str(uuid), Path(folder)) for uuid, folder in test_locations)
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


class QuadrupletFolders(Dataset):
    """Location folders -> per input spec (image size, mean, std; `src.data.input_spec`) a [4, 3, S, S]
    tensor whose unreadable views are None.

    Item: (uuid, {spec: [tensor or None] * 4}, [reason or None] * 4). The collate fills the gaps.
    """

    def __init__(self, locations: list[tuple[str, Path]], specs: list[tuple]):
        self.locations = locations
        self.specs = sorted(set(specs))
        self.transforms = {spec: eval_transform(*spec) for spec in self.specs}

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int):
        uuid, folder = self.locations[index]
        views = {spec: [None] * N_VIEWS for spec in self.specs}
        reasons: list[str | None] = [None] * N_VIEWS
        for i, path in enumerate(view_paths(folder)):
            reasons[i] = check_image(path)
            if reasons[i] is not None:
                continue
            try:
                for spec in self.specs:
                    views[spec][i] = self.transforms[spec](load_image(path, spec[0]))
            except Exception as error:  # a file that passes the header check can still fail to decode
                reasons[i] = f"decode failed ({type(error).__name__})"
                for spec in self.specs:
                    views[spec][i] = None
        return uuid, views, reasons


def substitute_sources(reasons: list[str | None]) -> list[int | None]:
    """The view index that fills each of the four slots given per-view problems (None: readable):
    itself when readable, else the first readable of SUBSTITUTE_ORDER; None when no view is readable."""
    readable = [i for i in range(4) if reasons[i] is None]
    return [i if reasons[i] is None else next((j for j in SUBSTITUTE_ORDER[i] if j in readable), None)
            for i in range(4)]


def collate_quadruplets(items):
    """Batch items of QuadrupletFolders, replacing each unreadable view by a readable view of its location.

    Returns (uuids, {spec: Tensor[B, 4, 3, S, S]}, has_views: bool Tensor[B], replaced: list[str]).
    A location with no readable view gets zeros and has_views False (its prediction is replaced by the prior).
    """
    uuids, has_views, replaced = [], [], []
    specs = list(items[0][1].keys())
    per_spec = {spec: [] for spec in specs}
    for uuid, views, reasons in items:
        uuids.append(uuid)
        source = substitute_sources(reasons)
        has_views.append(source[0] is not None)
        replaced += [f"{uuid} {VIEWS[i]}.jpg: {reasons[i]} -> used {VIEWS[j]}.jpg"
                     for i, j in enumerate(source) if j is not None and j != i]
        for spec in specs:
            size = spec[0]
            per_spec[spec].append(torch.stack([views[spec][j] if j is not None else torch.zeros(3, size, size)
                                               for j in source]))
    batches = {spec: torch.stack(per_spec[spec]) for spec in specs}
    return uuids, batches, torch.tensor(has_views), replaced


@torch.no_grad()
def predict_xy(model, views: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """EPSG:3766 x/y [B, 2] of one model; with `tta` the mean over the quadruplet and its mirror."""
    xy = model.predict_xy(views)
    if tta:
        xy = (xy + model.predict_xy(mirror_views(views))) / 2
    return xy.double()


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
    loader = DataLoader(QuadrupletFolders(locations, specs), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_quadruplets,
                        pin_memory=device.startswith("cuda"))
    prior = ensemble_prior(models)
    prior_xy = np.array(project(prior[0], prior[1]), float)
    issues = ViewIssues()
    all_uuids, all_xy = [], []
    for uuids, batches, has_views, replaced in tqdm(loader, desc="predict", unit="batch", file=sys.stderr,
                                                    disable=not progress):
        xy = torch.zeros(len(uuids), 2, dtype=torch.float64)
        for model, spec in zip(models, specs):
            xy += predict_xy(model, batches[spec].to(device, non_blocking=True), tta).cpu()
        xy = (xy / len(models)).numpy()
        xy[~has_views.numpy()] = prior_xy
        issues.replaced += replaced
        issues.no_views += [u for u, ok in zip(uuids, has_views.tolist()) if not ok]
        all_uuids += uuids
        all_xy.append(xy)
    xy = np.concatenate(all_xy)
    lat, lng = unproject(*snap_to_land(xy[:, 0], xy[:, 1]))
    frame = pd.DataFrame({"uuid": all_uuids, "latitude": lat, "longitude": lng})
    return frame.sort_values("uuid", ignore_index=True), issues
