"""Read LUMEN dataset dirs: data.csv rows joined to their image folders, with every defect reported."""

import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from tqdm import tqdm

from src import geo
from src.errors import UserError
from src.images import check_image, view_paths

REQUIRED_COLUMNS = ("uuid", "latitude", "longitude")
IMAGE_SUBDIRS = ("data", "images")
SKIP_COLUMNS = ["dataset_dir", "uuid", "reason", "detail"]


@dataclass
class Ingested:
    """Kept locations and everything left out, with why."""

    locations: pd.DataFrame  # uuid, latitude, longitude, dataset_dir, image_dir
    skipped: pd.DataFrame  # dataset_dir, uuid, reason, detail
    orphans: pd.DataFrame  # dataset_dir, folder: image folders without a CSV row
    n_read: int  # CSV rows read


def find_image_root(dataset_dir: str | Path) -> Path:
    """The folder that holds the uuid folders: `data/` or `images/` inside the dir, else the dir itself."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(f"{dataset_dir}: no such dataset directory")
    for name in IMAGE_SUBDIRS:
        if (dataset_dir / name).is_dir():
            return dataset_dir / name
    return dataset_dir


def list_location_dirs(root: str | Path) -> dict[str, Path]:
    """uuid -> folder for every subfolder of `root` (a location folder is named by its uuid)."""
    return {entry.name: entry for entry in sorted(Path(root).iterdir()) if entry.is_dir() and not entry.name.startswith(".")}


def read_csv_strict(path: str | Path, fix: str) -> pd.DataFrame:
    """pd.read_csv for user files: any unreadable file or ragged row is a one-line UserError ending in `fix`.

    A row with more fields than the header is an error (pandas would silently shift the first row into
    an index); a row with fewer fields gets NaN in its missing columns (the row checks catch those).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a CSV file; {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, dtype={"uuid": str}, skipinitialspace=True, index_col=False)
    except pd.errors.ParserWarning:
        raise UserError(f"{path}: line 2 has more fields than the header; {fix}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        detail = str(error).strip().splitlines()[0].removeprefix("Error tokenizing data. C error: ")
        raise UserError(f"{path}: not a readable CSV ({detail}); {fix}") from None


def read_table(csv_path: Path) -> pd.DataFrame:
    """data.csv as uuid (str), latitude, longitude (float, NaN where not a number) plus its CSV line number."""
    if not csv_path.exists():
        raise UserError(f"{csv_path}: not found; a dataset dir needs a data.csv with columns "
                        f"{', '.join(REQUIRED_COLUMNS)}")
    table = read_csv_strict(csv_path, f"a dataset's data.csv needs the columns {', '.join(REQUIRED_COLUMNS)}")
    table.columns = [str(column).strip().lower() for column in table.columns]
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise UserError(f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    table = table[list(REQUIRED_COLUMNS)].copy()
    table["uuid"] = table["uuid"].fillna("").astype(str).str.strip()
    for column in ("latitude", "longitude"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    table["line"] = np.arange(len(table)) + 2  # 1-based, after the header
    return table


def _bad_views(image_dirs: list[Path], full_decode: bool, progress: bool) -> list[str | None]:
    """For each location folder, None when its four views are usable, else 'VIEW.jpg: reason; ...'."""
    def check(folder: Path) -> str | None:
        problems = [f"{path.name}: {reason}" for path in view_paths(folder)
                    if (reason := check_image(path, full_decode)) is not None]
        return "; ".join(problems) or None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(tqdm(pool.map(check, image_dirs), total=len(image_dirs), desc="checking images",
                         unit="loc", disable=not progress, file=sys.stderr))


def read_dataset(dataset_dir: str | Path, check_images: bool = True, full_decode: bool = False,
                 progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, int]:
    """One dataset dir: (candidate locations, skipped rows, orphan folders, rows read)."""
    dataset_dir = Path(dataset_dir)
    root = find_image_root(dataset_dir)
    table = read_table(dataset_dir / "data.csv")
    folders = list_location_dirs(root)
    table["dataset_dir"] = str(dataset_dir)
    csv_uuids = set(table["uuid"])
    orphans = pd.DataFrame({"dataset_dir": str(dataset_dir),
                            "folder": [str(folder) for uuid, folder in folders.items() if uuid not in csv_uuids]})
    line = "line " + table["line"].astype(str)
    table["image_dir"] = table["uuid"].map(lambda uuid: str(folders[uuid]) if uuid in folders else "")
    reason = pd.Series(None, index=table.index, dtype=object)
    detail = pd.Series(None, index=table.index, dtype=object)

    def skip(mask: pd.Series, why: str, what) -> None:
        mask = mask & reason.isna()  # the first defect found is the one reported
        reason[mask] = why
        detail[mask] = what[mask] if isinstance(what, pd.Series) else what

    skip(table["uuid"].eq("") | table["uuid"].str.lower().eq("nan"), "missing uuid", line)
    skip(table["latitude"].isna() | table["longitude"].isna() | ~table["latitude"].between(-90, 90)
         | ~table["longitude"].between(-180, 180), "invalid coordinates", line)
    skip(table["uuid"].duplicated(), "duplicate uuid", line + " repeats an earlier row")
    skip(table["image_dir"].eq(""), "missing folder", pd.Series(f"no folder {root}/", index=table.index) + table["uuid"])
    if check_images:
        candidates = reason.isna()
        problems = pd.Series(_bad_views([Path(d) for d in table.loc[candidates, "image_dir"]], full_decode, progress),
                             index=table.index[candidates], dtype=object).reindex(table.index)
        skip(problems.notna(), "bad view", problems)
    skipped = pd.DataFrame({"dataset_dir": str(dataset_dir), "uuid": table["uuid"], "reason": reason, "detail": detail})
    return table[reason.isna()], skipped[reason.notna()], orphans, len(table)


def read_datasets(dataset_dirs, check_images: bool = True, full_decode: bool = False,
                  max_outside_km: float = 10.0, mainland_only: bool = False, progress: bool = True) -> Ingested:
    """Merge dataset dirs into one location table; defects are skipped and listed, never dropped silently.

    Skipped: rows without uuid or with invalid coordinates, duplicated uuids (within or across dirs: the
    first one is kept), rows whose folder or any view is missing or unreadable, points farther than
    `max_outside_km` from Croatia (points just outside the coarse 1:10m border are kept).
    """
    if not dataset_dirs:
        raise UserError("no dataset dir given (--dataset-dirs DIR [DIR ...])")
    tables, skips, orphans, n_read = [], [], [], 0
    for dataset_dir in dataset_dirs:
        table, dir_skips, dir_orphans, dir_read = read_dataset(dataset_dir, check_images, full_decode, progress)
        tables.append(table)
        skips.append(dir_skips)
        orphans.append(dir_orphans)
        n_read += dir_read
    locations = pd.concat(tables, ignore_index=True)
    dup = locations["uuid"].duplicated()
    first_dir = locations.drop_duplicates("uuid").set_index("uuid")["dataset_dir"]
    skips.append(pd.DataFrame({"dataset_dir": locations.loc[dup, "dataset_dir"], "uuid": locations.loc[dup, "uuid"],
                               "reason": "duplicate uuid",
                               "detail": "also in " + locations.loc[dup, "uuid"].map(first_dir)}))
    locations = locations[~dup]
    outside_km = distance_outside_km(locations["latitude"].to_numpy(), locations["longitude"].to_numpy(), mainland_only)
    far = outside_km > max_outside_km
    skips.append(pd.DataFrame({"dataset_dir": locations.loc[far, "dataset_dir"], "uuid": locations.loc[far, "uuid"],
                               "reason": "outside Croatia",
                               "detail": [f"{km:.1f} km outside the border" for km in outside_km[far]]}))
    locations = locations[~far]
    skipped = pd.concat([s for s in skips if len(s)] or [pd.DataFrame(columns=SKIP_COLUMNS)], ignore_index=True)
    return Ingested(
        locations=locations[["uuid", "latitude", "longitude", "dataset_dir", "image_dir"]].reset_index(drop=True),
        skipped=skipped[SKIP_COLUMNS],
        orphans=pd.concat(orphans, ignore_index=True),
        n_read=n_read,
    )


def distance_outside_km(lat: np.ndarray, lng: np.ndarray, mainland_only: bool = False) -> np.ndarray:
    """Distance in km from each point to Croatia (0 inside), measured in EPSG:3766."""
    border = geo.load_border(mainland_only, geo.CROATIA_CRS)
    x, y = geo.project(lat, lng)
    km = np.zeros(len(x))
    outside = ~shapely.contains_xy(border, x, y)
    km[outside] = shapely.distance(border, shapely.points(x[outside], y[outside])) / 1000.0
    return km
