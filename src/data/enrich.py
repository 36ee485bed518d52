"""The enrich stage: dataset dirs -> kept locations with EPSG:3766 coordinates, split, cell class, centroids.

`enrich_data` runs it for a DataConfig (`enrich` over dataset dirs, `enrich_from_locations` over an enriched
CSV); the split is a seeded hash of each uuid (or of its grid square), the cells are built from the train
locations only.
"""

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from src.core import geo
from src.core.choices import SPLITS
from src.core.errors import UserError
from src.core.files import write_csv
from src.data.cells import Cells, CellSpec, Grid, class_table, nearest_class
from src.data.config import CENTROID_PREFIX, DEFAULT_SPLIT, DataConfig
from src.data.ingest import SKIP_COLUMNS, Ingested, check_dataset_dirs, read_datasets
from src.data.locations import LOCATIONS_COLUMNS, read_locations_csv

CENTROID_COLUMNS = [f"{prefix}_{axis}" for prefix in CENTROID_PREFIX.values() for axis in ("lat", "lng")]
OUTPUT_COLUMNS = ["uuid", "latitude", "longitude", "dataset_dir", "image_dir", "split", "crs_x", "crs_y",
                  "cell", "label", *CENTROID_COLUMNS]
LISTED_PER_REASON = 10
THIN_CLASS_MEDIAN = 5  # warn when the median class has fewer train locations than this
TAG_LENGTH = 40  # dataset tags in file names stay short


@dataclass
class Enriched:
    """Everything later stages need: locations, the class table, the train scaler and the grid."""

    locations: pd.DataFrame  # OUTPUT_COLUMNS, one row per kept location
    classes: pd.DataFrame  # indexed 0..C-1, see grid.class_table
    scaler: dict  # x_min, x_max, y_min, y_max of TRAIN rows in EPSG:3766 metres
    grid: Cells  # the cells (a Grid or AdaptiveCells; named grid for history)
    ingested: Ingested
    split_by: str = "location"


def unit_hash(keys, seed: int) -> np.ndarray:
    """A number in [0, 1) per key, decided by (seed, key) alone: blake2b of the key, keyed by the seed."""
    salt = int(seed).to_bytes(8, "little")
    words = [int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8, key=salt).digest(), "little") >> 11
             for key in keys]
    return np.asarray(words, dtype=float) / 2.0**53


def split_locations(locations: pd.DataFrame, seed: int, fractions=DEFAULT_SPLIT, holdout_dirs=(),
                    blocks=None, fold: tuple[int, int] | None = None) -> np.ndarray:
    """'train'/'val'/'test' per row, fixed by `seed`, independent of row order.

    Without `blocks` a seeded hash of each uuid decides its split, so adding or removing locations never
    moves the others (split sizes follow the fractions up to sampling noise). With `blocks` (a block id
    per row, e.g. its grid cell) whole blocks go to one split: in seeded-hash order of the block ids, the
    blocks fill train, then val, then test by their number of locations.
    Rows from `holdout_dirs` all go to test; the others are split by the train and val fractions
    (renormalized) when dirs are held out, else by all three.

    With `fold` (k, K), for K-fold cross-validation: the same positions cut into K equal folds, fold k is
    the test split and the rest is split into train and val by the train and val fractions (renormalized),
    using the position within its fold; so the K test splits partition the rows (or blocks).
    """
    fractions = np.asarray(fractions, float)
    if fractions.shape != (3,) or not np.isfinite(fractions).all() or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6 or fractions[0] <= 0:
        raise UserError(f"--split {' '.join(map(str, fractions))}: give three fractions train val test, "
                        "non-negative, summing to 1, train > 0 (e.g. 0.8 0.1 0.1)")
    holdout = locations["dataset_dir"].isin([str(Path(d)) for d in holdout_dirs]).to_numpy()
    if holdout_dirs:
        fractions = np.array([fractions[0], fractions[1], 0.0]) / (fractions[0] + fractions[1])
    split = np.full(len(locations), "test", dtype=object)
    pool = ~holdout
    if not pool.any():
        return split
    if blocks is None:
        position = unit_hash(locations["uuid"].to_numpy()[pool], seed)
    else:
        ids, inverse, counts = np.unique(np.asarray(blocks)[pool], return_inverse=True, return_counts=True)
        order = np.argsort(unit_hash(ids, seed), kind="stable")
        filled = np.cumsum(counts[order])
        middle = np.empty(len(ids))
        middle[order] = (filled - counts[order] / 2) / filled[-1]
        position = middle[inverse.ravel()]
    if fold is not None:
        k, n_folds = fold
        scaled = position * n_folds
        in_fold = np.minimum(np.floor(scaled), n_folds - 1)
        within = scaled - in_fold
        train_share = fractions[0] / (fractions[0] + fractions[1])
        split[pool] = np.where(in_fold == k, "test", np.where(within < train_share, "train", "val"))
        return split
    train_end, val_end = np.cumsum(fractions)[:2]
    split[pool] = np.where(position < train_end, "train", np.where(position < val_end, "val", "test"))
    return split


def minmax_scaler(x: np.ndarray, y: np.ndarray) -> dict:
    """Min-max parameters of EPSG:3766 x/y (compute them from TRAIN rows only)."""
    return {"x_min": float(np.min(x)), "x_max": float(np.max(x)), "y_min": float(np.min(y)), "y_max": float(np.max(y))}


def split_and_cells(locations: pd.DataFrame, cells: CellSpec | Cells, seed: int = 0, fractions=DEFAULT_SPLIT,
                    holdout_dirs=(), split_by: str = "location",
                    fold: tuple[int, int] | None = None) -> tuple[np.ndarray, Cells]:
    """The split of the rows (see split_locations) and the cells built from its TRAIN rows.

    `cells` is a CellSpec, or cells already built (used as they are). With `split_by` 'cell' the split
    blocks are the squares of the spacing grid (for grid cells: the cells themselves), so the blocks never
    depend on the split they decide.
    """
    lat, lng = locations["latitude"].to_numpy(), locations["longitude"].to_numpy()
    blocks = None
    if split_by == "cell":
        block_grid = cells if isinstance(cells, Grid) else cells.grid() if isinstance(cells, CellSpec) else None
        if block_grid is None:
            raise ValueError("--split-by cell needs a CellSpec or a Grid")
        blocks = block_grid.assign(lat, lng)
    split = split_locations(locations, seed, fractions, holdout_dirs, blocks, fold)
    train = split == "train"
    if not train.any():
        raise UserError("no location left for training: add data or lower the val/test fractions")
    if isinstance(cells, CellSpec):
        cells = cells.build(lat[train], lng[train], seed)
    return split, cells


def locate_locations(locations: pd.DataFrame, split: np.ndarray,
                     grid: Cells) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Project to EPSG:3766, assign cells and classes, attach class centroids and the train scaler."""
    out = locations.copy()
    out["split"] = split
    train = split == "train"
    out["crs_x"], out["crs_y"] = geo.project(out["latitude"].to_numpy(), out["longitude"].to_numpy())
    out["cell"] = grid.assign(out["latitude"].to_numpy(), out["longitude"].to_numpy())
    classes = class_table(grid, out["cell"].to_numpy()[train], out["crs_x"].to_numpy()[train],
                          out["crs_y"].to_numpy()[train])
    out["label"] = nearest_class(classes, grid, out["cell"].to_numpy(), out["latitude"].to_numpy(),
                                 out["longitude"].to_numpy())
    out[CENTROID_COLUMNS] = classes[CENTROID_COLUMNS].to_numpy()[out["label"].to_numpy()]
    scaler = minmax_scaler(out["crs_x"].to_numpy()[train], out["crs_y"].to_numpy()[train])
    return out[OUTPUT_COLUMNS], classes, scaler


def enrich(dataset_dirs, spacing: float = 0.5, seed: int = 0, fractions=DEFAULT_SPLIT, holdout_dirs=(),
           check_images: bool = True, full_decode: bool = False, max_outside_km: float = 10.0,
           mainland_only: bool = False, progress: bool = True, cells: str = "grid", n_classes: int = 0,
           split_by: str = "location", check_cache: Path | None = None,
           fold: tuple[int, int] | None = None) -> Enriched:
    """Read the dataset dirs and enrich their locations (see the module docstring); `fold` (k, K) makes
    fold k of a K-fold cross-validation the test split (see split_locations)."""
    DataConfig(dataset_dirs=tuple(str(Path(d)) for d in dataset_dirs), cells=cells, spacing=spacing,
               n_classes=n_classes, seed=seed, split_by=split_by, holdout_dirs=tuple(str(Path(d)) for d in holdout_dirs),
               max_outside_km=max_outside_km).validate()
    ingested = read_datasets(dataset_dirs, check_images, full_decode, max_outside_km, mainland_only, progress,
                             check_cache)
    if ingested.locations.empty:
        raise UserError(f"{', '.join(map(str, dataset_dirs))}: no usable location "
                        f"({len(ingested.skipped)} skipped; see the skip list)")
    spec = CellSpec(cells, spacing, n_classes, mainland_only)
    split, built = split_and_cells(ingested.locations, spec, seed, fractions, holdout_dirs, split_by,
                                   None if fold is None else tuple(fold))
    locations, classes, scaler = locate_locations(ingested.locations, split, built)
    return Enriched(locations, classes, scaler, built, ingested, split_by)


def enrich_from_locations(path: str | Path, spacing: float = 0.5, mainland_only: bool = False, cells: str = "grid",
                          n_classes: int = 0, seed: int = 0) -> Enriched:
    """Enriched from a locations CSV (read_locations_csv): its locations and split, no dataset dir read and
    no image opened; cells (built from its train rows), classes, centroids and scaler are recomputed."""
    DataConfig(cells=cells, spacing=spacing, n_classes=n_classes, seed=seed).validate()
    frame = read_locations_csv(path)
    base = frame[LOCATIONS_COLUMNS[:-1]].reset_index(drop=True)
    split = frame["split"].to_numpy()
    train = split == "train"
    built = CellSpec(cells, spacing, n_classes, mainland_only).build(
        base["latitude"].to_numpy()[train], base["longitude"].to_numpy()[train], seed)
    locations, classes, scaler = locate_locations(base, split, built)
    ingested = Ingested(locations=base, skipped=pd.DataFrame(columns=SKIP_COLUMNS),
                        orphans=pd.DataFrame(columns=["dataset_dir", "folder"]), n_read=len(frame))
    return Enriched(locations, classes, scaler, built, ingested, split_by="as in the locations CSV")


def enrich_data(config: DataConfig, progress: bool = True, report: bool = True) -> Enriched:
    """The enrich stage for a DataConfig: `enrich` over its dataset dirs, or `enrich_from_locations` when it
    names an enriched CSV.

    With `report`, the skipped rows and orphan folders are listed on stderr (a few per reason), so a
    command that reads dataset dirs (train, analyze) never loses a location silently.
    """
    if config.locations_csv is not None:  # checked when it was written: nothing skipped, nothing to warn of
        return enrich_from_locations(config.locations_csv, config.spacing, config.mainland_only, config.cells,
                                     config.n_classes, config.seed)
    enriched = enrich(config.dataset_dirs, config.spacing, config.seed, config.split, config.holdout_dirs,
                      full_decode=config.full_decode, max_outside_km=config.max_outside_km,
                      mainland_only=config.mainland_only, progress=progress, cells=config.cells,
                      n_classes=config.n_classes, split_by=config.split_by,
                      check_cache=None if config.check_cache is None else Path(config.check_cache), fold=config.fold)
    if report:
        for text in (skip_listing(enriched.ingested), thin_data_warning(enriched)):
            if text:
                print(text, file=sys.stderr)
    return enriched


def thin_data_warning(enriched: Enriched) -> str | None:
    """A warning line when the median class has fewer than THIN_CLASS_MEDIAN train locations, else None."""
    sizes = enriched.classes["n_train"]
    if sizes.median() >= THIN_CLASS_MEDIAN:
        return None
    fix = ("a larger --spacing" if enriched.grid.kind == "grid" else "fewer --classes")
    return (f"warning: training data is thin for the classes: {len(sizes)} classes hold a median of "
            f"{sizes.median():g} train location(s) each (below {THIN_CLASS_MEDIAN}); most classes can hardly "
            f"be learnt. Use {fix}, or more data")


def dataset_tag(dataset_dirs) -> str:
    """A short name of the dataset dirs for file and run names: their folder names joined by '+'."""
    names = [re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(d).resolve().name) or "root" for d in dataset_dirs]
    tag = "+".join(names)
    if len(tag) > TAG_LENGTH:
        tag = f"{names[0][:TAG_LENGTH - 8]}+{len(names) - 1}more" if len(names) > 1 else names[0][:TAG_LENGTH]
    return tag


def output_tag(dataset_dirs, cells: Cells, split_by: str = "location") -> str:
    """The name part of enrich's outputs: dataset tag, cells (grid0.5, adaptive30) and a cell split."""
    return f"{dataset_tag(dataset_dirs)}_{cells.tag}" + ("_cellsplit" if split_by == "cell" else "")


def summary(enriched: Enriched) -> str:
    """A tabulate summary: locations read / kept / skipped per reason, cells, classes, class sizes."""
    ingested, locations = enriched.ingested, enriched.locations
    rows = [("CSV rows read", ingested.n_read), ("locations kept", len(locations))]
    rows += [(f"skipped: {reason}", count) for reason, count in ingested.skipped["reason"].value_counts().items()]
    rows += [("image folders without a CSV row", len(ingested.orphans))]
    rows += [(f"split: {name}", int((locations["split"] == name).sum())) for name in SPLITS]
    rows += [("split by", enriched.split_by)]
    sizes = enriched.classes["n_train"]
    rows += enriched.grid.describe()
    rows += [("classes (cells with train data)", len(sizes)),
             ("train locations per class (min / median / max)", f"{sizes.min()} / {sizes.median():g} / {sizes.max()}")]
    return tabulate(rows, headers=["", "count"], tablefmt="github")


def skip_listing(ingested: Ingested, report_path: Path | None = None) -> str:
    """Console listing of skipped rows and orphan folders, a few per reason; the full list is in the report.

    Without a report file (`report_path` None) the rest is pointed to `python -m src.enrich`'s report.
    """
    if report_path is None:
        dirs = " ".join(sorted(set(map(str, [*ingested.skipped["dataset_dir"], *ingested.orphans["dataset_dir"]]))))
        report_path = f"the skip report of `python -m src.enrich --dataset-dirs {dirs}`"
    lines = []
    for reason, group in ingested.skipped.groupby("reason", sort=True):
        lines.append(f"warning: skipped {len(group)} location(s): {reason}")
        lines += [f"  {row.dataset_dir}: {row.uuid} ({row.detail})" for row in group.head(LISTED_PER_REASON).itertuples()]
        if len(group) > LISTED_PER_REASON:
            lines.append(f"  ... and {len(group) - LISTED_PER_REASON} more in {report_path}")
    if len(ingested.orphans):
        lines.append(f"warning: {len(ingested.orphans)} image folder(s) have no row in data.csv (not used)")
        lines += [f"  {folder}" for folder in ingested.orphans["folder"].head(LISTED_PER_REASON)]
        if len(ingested.orphans) > LISTED_PER_REASON:
            lines.append(f"  ... and {len(ingested.orphans) - LISTED_PER_REASON} more in {report_path}")
    return "\n".join(lines)


def write_skip_report(ingested: Ingested, path: Path) -> None:
    """All skipped rows and orphan folders as one CSV (reason 'folder without CSV row' for orphans)."""
    orphans = pd.DataFrame({"dataset_dir": ingested.orphans["dataset_dir"], "uuid": ingested.orphans["folder"].map(lambda f: Path(f).name),
                            "reason": "folder without CSV row", "detail": ingested.orphans["folder"]})
    write_csv(pd.concat([ingested.skipped, orphans], ignore_index=True), path)


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    """The DataConfig of the flags of `add_data_arguments` (and `add_locations_argument`); cheap checks only,
    before any slow start-up: the dataset dirs exist and hold a data.csv, or the --locations CSV is valid (its
    dataset dirs are used)."""
    locations = getattr(args, "locations", None)
    if locations is not None:
        if args.dataset_dirs:
            raise UserError("--locations and --dataset-dirs: give one of them (the CSV already names its "
                            "dataset dirs)")
        dirs = list(dict.fromkeys(read_locations_csv(locations)["dataset_dir"]))
    else:
        check_dataset_dirs(args.dataset_dirs or [])
        dirs = args.dataset_dirs or []
    config = DataConfig(dataset_dirs=tuple(str(Path(d).resolve()) for d in dirs),
                        locations_csv=None if locations is None else str(locations), cells=args.cells,
                        spacing=args.spacing, n_classes=args.n_classes, seed=args.seed, split=tuple(args.split),
                        split_by=args.split_by, holdout_dirs=tuple(str(Path(d).resolve()) for d in args.holdout_dirs),
                        full_decode=args.full_decode, max_outside_km=args.max_outside_km,
                        mainland_only=args.mainland_only,
                        check_cache=None if args.check_cache is None else str(args.check_cache))
    return config.validate()
