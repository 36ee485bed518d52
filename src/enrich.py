"""The enrich stage: dataset dirs -> kept locations with EPSG:3766 coordinates, split, grid class, centroids.

    python -m src.enrich --dataset-dirs DIR [DIR ...] [--spacing 0.5] [--seed 0] [--out reports/enriched.csv]
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from src import geo
from src.errors import UserError, run_cli
from src.files import atomic_path
from src.grid import CENTROID_PREFIX, Grid, build_grid, class_table, nearest_class
from src.ingest import CHECK_CACHE_DIR, SKIP_COLUMNS, Ingested, check_dataset_dirs, read_csv_strict, read_datasets

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
DEFAULT_OUT = Path("reports/enriched.csv")
CENTROID_COLUMNS = [f"{prefix}_{axis}" for prefix in CENTROID_PREFIX.values() for axis in ("lat", "lng")]
OUTPUT_COLUMNS = ["uuid", "latitude", "longitude", "dataset_dir", "image_dir", "split", "crs_x", "crs_y",
                  "cell", "label", *CENTROID_COLUMNS]
# the columns an enriched CSV must have to be reused with --locations (cells, labels, centroids are recomputed)
LOCATIONS_COLUMNS = ["uuid", "latitude", "longitude", "dataset_dir", "image_dir", "split"]
LOCATIONS_FILE = "locations.csv"  # a training run's enriched locations, in its version_N folder
LISTED_PER_REASON = 10
SPACING_RANGE = (0.01, 10.0)  # degrees: below ~1 km cells the grid gets huge, above it is one cell
MAX_SEED = 2**32 - 1  # numpy and Lightning seeds


def check_spacing(spacing: float, flag: str = "--spacing") -> None:
    """A grid spacing must be a finite number of degrees in SPACING_RANGE."""
    low, high = SPACING_RANGE
    if not low <= spacing <= high:  # also false for nan
        raise UserError(f"{flag} {spacing:g}: give a grid cell size in degrees between {low:g} and {high:g} "
                        "(e.g. 0.5)")


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed}: give a whole number from 0 to {MAX_SEED}")


@dataclass
class Enriched:
    """Everything later stages need: locations, the class table, the train scaler and the grid."""

    locations: pd.DataFrame  # OUTPUT_COLUMNS, one row per kept location
    classes: pd.DataFrame  # indexed 0..C-1, see grid.class_table
    scaler: dict  # x_min, x_max, y_min, y_max of TRAIN rows in EPSG:3766 metres
    grid: Grid
    ingested: Ingested


def split_locations(locations: pd.DataFrame, seed: int, fractions=DEFAULT_SPLIT, holdout_dirs=()) -> np.ndarray:
    """'train'/'val'/'test' per row, fixed by `seed` and independent of row order.

    Rows from `holdout_dirs` all go to test; the others are split by the train and val fractions
    (renormalized) when dirs are held out, else by all three.
    """
    fractions = np.asarray(fractions, float)
    if fractions.shape != (3,) or not np.isfinite(fractions).all() or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6 or fractions[0] <= 0:
        raise UserError(f"--split {' '.join(map(str, fractions))}: give three fractions train val test, "
                        "non-negative, summing to 1, train > 0 (e.g. 0.8 0.1 0.1)")
    holdout = locations["dataset_dir"].isin([str(Path(d)) for d in holdout_dirs]).to_numpy()
    if holdout_dirs:
        fractions = np.array([fractions[0], fractions[1], 0.0]) / (fractions[0] + fractions[1])
    split = np.full(len(locations), "test", dtype=object)
    pool = np.flatnonzero(~holdout)
    # a canonical (dataset_dir, uuid) order first: the split depends on the seed and the rows, not their order
    pool = pool[np.lexsort((locations["uuid"].to_numpy()[pool], locations["dataset_dir"].to_numpy()[pool]))]
    pool = pool[np.random.default_rng(seed).permutation(len(pool))]
    n_val, n_test = (np.round(fractions[1:] * len(pool))).astype(int)
    n_train = len(pool) - n_val - n_test
    split[pool[:n_train]] = "train"
    split[pool[n_train:n_train + n_val]] = "val"
    return split


def minmax_scaler(x: np.ndarray, y: np.ndarray) -> dict:
    """Min-max parameters of EPSG:3766 x/y (compute them from TRAIN rows only)."""
    return {"x_min": float(np.min(x)), "x_max": float(np.max(x)), "y_min": float(np.min(y)), "y_max": float(np.max(y))}


def enrich_locations(locations: pd.DataFrame, grid: Grid, seed: int = 0, fractions=DEFAULT_SPLIT,
                     holdout_dirs=()) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Split, then locate (see locate_locations): (locations, classes, scaler)."""
    split = split_locations(locations, seed, fractions, holdout_dirs)
    if not (split == "train").any():
        raise UserError("no location left for training: add data or lower the val/test fractions")
    return locate_locations(locations, split, grid)


def locate_locations(locations: pd.DataFrame, split: np.ndarray, grid: Grid) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
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
           mainland_only: bool = False, progress: bool = True, check_cache: Path | None = None) -> Enriched:
    """Read the dataset dirs and enrich their locations (see the module docstring)."""
    check_spacing(spacing)
    check_seed(seed)
    if not 0 <= max_outside_km < float("inf"):  # also false for nan
        raise UserError(f"--max-outside-km {max_outside_km:g}: give a distance in km >= 0 (e.g. 10)")
    unknown = [d for d in holdout_dirs if str(Path(d)) not in {str(Path(x)) for x in dataset_dirs}]
    if unknown:
        raise UserError(f"--holdout-dirs {' '.join(map(str, unknown))}: not among --dataset-dirs")
    ingested = read_datasets(dataset_dirs, check_images, full_decode, max_outside_km, mainland_only, progress,
                             check_cache)
    if ingested.locations.empty:
        raise UserError(f"{', '.join(map(str, dataset_dirs))}: no usable location "
                        f"({len(ingested.skipped)} skipped; see the skip list)")
    grid = build_grid(spacing, mainland_only)
    locations, classes, scaler = enrich_locations(ingested.locations, grid, seed, fractions, holdout_dirs)
    return Enriched(locations, classes, scaler, grid, ingested)


def read_locations_csv(path: str | Path, check_folders: bool = True) -> pd.DataFrame:
    """An enriched locations CSV (`src.enrich --out`, or a run's version_N/locations.csv) to reuse as is.

    Checked: the columns of LOCATIONS_COLUMNS, numeric degrees, unique uuids, split values, a train row
    and (`check_folders`) that the image folders exist here; each problem is a one-line UserError naming the file and line.
    """
    path = Path(path)
    fix = "pass a CSV written by `python -m src.enrich` or a run's version_N/locations.csv"
    if not path.exists():
        raise UserError(f"--locations {path}: file not found; {fix}")
    frame = read_csv_strict(path, fix)
    missing = [c for c in LOCATIONS_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"--locations {path}: lacks column(s) {', '.join(missing)} (has "
                        f"{', '.join(map(str, frame.columns))}); {fix}")
    if frame.empty:
        raise UserError(f"--locations {path}: has a header but no rows; {fix}")
    frame = frame[LOCATIONS_COLUMNS].copy()
    degrees = frame[["latitude", "longitude"]].apply(pd.to_numeric, errors="coerce")
    problems = [
        (frame["uuid"].isna() | frame["uuid"].duplicated(keep=False), "empty or repeated uuid"),
        (degrees.isna().any(axis=1) | ~degrees["latitude"].between(-90, 90) | ~degrees["longitude"].between(-180, 180),
         "latitude/longitude not in degrees"),
        (~frame["split"].isin(SPLITS), f"split not one of {', '.join(SPLITS)}"),
        (frame["image_dir"].isna() | frame["dataset_dir"].isna(), "empty image_dir or dataset_dir"),
    ]
    for bad, what in problems:
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"--locations {path}: line {first + 2}: {what} ({bad.sum()} row(s)); {fix}")
    if not (frame["split"] == "train").any():
        raise UserError(f"--locations {path}: no train row; {fix}")
    absent = [d for d in frame["image_dir"] if not Path(d).is_dir()] if check_folders else []
    if absent:
        raise UserError(f"--locations {path}: {len(absent)} of {len(frame)} image folders do not exist here "
                        f"(e.g. {absent[0]}); re-run enrich on this machine's --dataset-dirs")
    frame[["latitude", "longitude"]] = degrees.astype(float)
    return frame


def enrich_from_locations(path: str | Path, spacing: float = 0.5, mainland_only: bool = False) -> Enriched:
    """Enriched from a locations CSV (read_locations_csv): its locations and split, no dataset dir read and
    no image opened; cells, classes, centroids and scaler are recomputed at `spacing`."""
    check_spacing(spacing)
    frame = read_locations_csv(path)
    grid = build_grid(spacing, mainland_only)
    base = frame[LOCATIONS_COLUMNS[:-1]].reset_index(drop=True)
    locations, classes, scaler = locate_locations(base, frame["split"].to_numpy(), grid)
    ingested = Ingested(locations=base, skipped=pd.DataFrame(columns=SKIP_COLUMNS),
                        orphans=pd.DataFrame(columns=["dataset_dir", "folder"]), n_read=len(frame))
    return Enriched(locations, classes, scaler, grid, ingested)


def write_locations_csv(locations: pd.DataFrame, path: str | Path) -> Path:
    """The enriched locations as a CSV (atomically), reusable with --locations."""
    with atomic_path(path) as tmp:
        locations.to_csv(tmp, index=False)
    return Path(path)


def add_locations_argument(parser: argparse.ArgumentParser) -> None:
    """--locations CSV: reuse an enriched CSV instead of reading --dataset-dirs (train, analyze)."""
    parser.add_argument("--locations", type=Path, default=None, metavar="CSV",
                        help="reuse this enriched CSV (src.enrich --out, or a run's version_N/locations.csv): its "
                             "locations and split, no image re-checked; instead of --dataset-dirs (default: none)")


def check_data_flags(args: argparse.Namespace) -> None:
    """Cheap checks of the data flags before any slow start-up: the dataset dirs exist and hold a data.csv;
    with --locations the CSV is valid and its dataset dirs become args.dataset_dirs."""
    if getattr(args, "locations", None) is not None:
        if args.dataset_dirs:
            raise UserError("--locations and --dataset-dirs: give one of them (the CSV already names its dataset dirs)")
        args.dataset_dirs = [Path(d) for d in dict.fromkeys(read_locations_csv(args.locations)["dataset_dir"])]
    else:
        check_dataset_dirs(args.dataset_dirs)


def add_enrich_arguments(parser: argparse.ArgumentParser, require_dataset: bool = False) -> None:
    """The data flags shared by every command that reads dataset dirs (enrich, train)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset-dirs", nargs="+", type=Path, required=require_dataset, metavar="DIR",
                       help="LUMEN dataset dirs (data.csv + data/ or images/ with one folder per uuid)")
    group.add_argument("--spacing", type=float, default=0.5, help="grid cell size in degrees (default: 0.5)")
    group.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default: 0)")
    group.add_argument("--split", type=float, nargs=3, default=DEFAULT_SPLIT, metavar=("TRAIN", "VAL", "TEST"),
                       help="split fractions (default: 0.8 0.1 0.1)")
    group.add_argument("--holdout-dirs", nargs="+", type=Path, default=[], metavar="DIR",
                       help="dataset dirs used whole as the test split (default: none)")
    group.add_argument("--full-decode", action="store_true",
                       help="check images by decoding every pixel (default: header and end marker only)")
    group.add_argument("--max-outside-km", type=float, default=10.0,
                       help="reject points farther than this outside the border (default: 10)")
    group.add_argument("--mainland-only", action="store_true",
                       help="use the mainland polygon only, without islands (default: off)")
    group.add_argument("--check-cache", type=Path, default=CHECK_CACHE_DIR, metavar="DIR",
                       help="remember image checks here, keyed by path, size and mtime, so unchanged images are "
                            "not re-opened (default: data/cache/image_checks)")
    group.add_argument("--no-check-cache", dest="check_cache", action="store_const", const=None,
                       help="check every image again and remember nothing")


def enrich_from_args(args: argparse.Namespace, progress: bool = True, report: bool = True) -> Enriched:
    """enrich() with the flags of add_enrich_arguments (enrich_from_locations with --locations).

    With `report`, the skipped rows and orphan folders are listed on stderr (a few per reason), so a
    command that reads dataset dirs (train, analyze) never loses a location silently.
    """
    if getattr(args, "locations", None) is not None:
        return enrich_from_locations(args.locations, args.spacing, args.mainland_only)
    enriched = enrich(args.dataset_dirs, args.spacing, args.seed, args.split, args.holdout_dirs,
                      full_decode=args.full_decode, max_outside_km=args.max_outside_km,
                      mainland_only=args.mainland_only, progress=progress, check_cache=args.check_cache)
    if report:
        listing = skip_listing(enriched.ingested)
        if listing:
            print(listing, file=sys.stderr)
    return enriched


def summary(enriched: Enriched) -> str:
    """A tabulate summary: locations read / kept / skipped per reason, cells, classes, class sizes."""
    ingested, locations = enriched.ingested, enriched.locations
    rows = [("CSV rows read", ingested.n_read), ("locations kept", len(locations))]
    rows += [(f"skipped: {reason}", count) for reason, count in ingested.skipped["reason"].value_counts().items()]
    rows += [("image folders without a CSV row", len(ingested.orphans))]
    rows += [(f"split: {name}", int((locations["split"] == name).sum())) for name in SPLITS]
    sizes = enriched.classes["n_train"]
    rows += [("grid spacing (deg)", enriched.grid.spacing), ("grid cells", enriched.grid.n_cols * enriched.grid.n_rows),
             ("cells intersecting Croatia", len(enriched.grid.cells)), ("classes (cells with train data)", len(sizes)),
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
    with atomic_path(path) as tmp:
        pd.concat([ingested.skipped, orphans], ignore_index=True).to_csv(tmp, index=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.enrich", allow_abbrev=False,
                                     description="Read LUMEN dataset dirs and write the enriched location table.")
    add_enrich_arguments(parser, require_dataset=True)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"enriched CSV, written atomically; the skip report goes beside it as "
                             f"<stem>_skipped.csv (default: {DEFAULT_OUT})")
    parser.add_argument("--figures-dir", type=Path, default=Path("figures"), help="where figures go (default: figures)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    enriched = enrich_from_args(args, report=False)
    report_path = args.out.with_name(f"{args.out.stem}_skipped.csv")
    write_locations_csv(enriched.locations, args.out)
    write_skip_report(enriched.ingested, report_path)
    listing = skip_listing(enriched.ingested, report_path)
    if listing:
        print(listing, file=sys.stderr)
    if not args.no_figures:
        from src.plots import enrich_figures  # matplotlib is only needed here

        for path in enrich_figures(enriched, args.figures_dir):
            print(f"figure: {path}", file=sys.stderr)
    print(summary(enriched))
    print(f"enriched CSV: {args.out} ({len(enriched.locations)} rows); skip report: {report_path}")


if __name__ == "__main__":
    run_cli(main)
