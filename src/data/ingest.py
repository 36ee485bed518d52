"""Read LUMEN dataset dirs: data.csv rows joined to their image folders, with every defect reported."""

import hashlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from tqdm import tqdm

from src.core import geo
from src.core.errors import UserError
from src.core.files import atomic_path
from src.data.locations import CoordinateRows, read_coordinates
from src.data.images import VIEWS, check_image

REQUIRED_COLUMNS = ("uuid", "latitude", "longitude")
IMAGE_SUBDIRS = ("data", "images")
SKIP_COLUMNS = ["dataset_dir", "uuid", "reason", "detail"]
MANIFEST_COLUMNS = ["path", "size", "mtime_ns", "full_decode", "reason"]
CHECK_CHUNK = 64  # location folders per image-check task


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


def check_dataset_dirs(dataset_dirs) -> None:
    """Fail fast (before any slow start-up) on a dataset dir that does not exist or has no data.csv."""
    for dataset_dir in dataset_dirs:
        find_image_root(dataset_dir)
        csv_path = Path(dataset_dir) / "data.csv"
        if not csv_path.is_file():
            raise UserError(f"{csv_path}: not found; a dataset dir needs a data.csv with columns "
                            f"{', '.join(REQUIRED_COLUMNS)}")


def list_location_dirs(root: str | Path) -> dict[str, Path]:
    """uuid -> folder for every subfolder of `root` (a location folder is named by its uuid)."""
    return {name: Path(root) / name for name in location_names(root)}


def location_names(root: str | Path) -> list[str]:
    """The sorted names of the subfolders of `root` (uuids), without building a Path per folder."""
    with os.scandir(root) as entries:  # DirEntry.is_dir needs no extra stat on most file systems
        return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))


def read_table(csv_path: Path) -> CoordinateRows:
    """A dataset's data.csv (column names case-insensitive, extra columns ignored) with its row defects."""
    if not csv_path.exists():
        raise UserError(f"{csv_path}: not found; a dataset dir needs a data.csv with columns "
                        f"{', '.join(REQUIRED_COLUMNS)}")
    return read_coordinates(csv_path, "data.csv", f"a dataset's data.csv needs the columns {', '.join(REQUIRED_COLUMNS)}",
                            lowercase_columns=True)


class CheckManifest:
    """`check_image` results of one image root, kept in `<cache_dir>/<hash of the root>.csv` and keyed by
    each file's path (`<uuid>/<view>.jpg` under the root), size and modification time (ns): a second run over unchanged
    files only stats them instead of opening them. A fast check never reuses a `--full-decode` miss or
    vice versa: a full-decode result also serves a fast check, not the other way round.

    `cache_dir` None: no manifest, every file is checked. An unreadable manifest is ignored (rebuilt).
    """

    def __init__(self, root: Path, cache_dir: Path | None, full_decode: bool):
        self.root = Path(root).resolve()
        self.full_decode = full_decode
        self.path = None if cache_dir is None else \
            Path(cache_dir) / f"{hashlib.sha1(str(self.root).encode()).hexdigest()[:16]}.csv"
        self.known: dict[str, tuple] = {}
        self.seen: dict[str, tuple] = {}
        self.rechecked = 0
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            try:
                table = pd.read_csv(self.path, dtype={"path": str, "reason": str}, keep_default_na=False)
                reasons = [reason or None for reason in table["reason"]]
                self.known = dict(zip(table["path"], zip(table["size"].astype(int).tolist(),
                                                         table["mtime_ns"].astype(int).tolist(),
                                                         table["full_decode"].astype(bool).tolist(), reasons)))
            except (ValueError, KeyError, pd.errors.ParserError, UnicodeDecodeError):
                self.known = {}

    def check(self, path: str | Path) -> str | None:
        """check_image(path) from the manifest when the file is unchanged, else from the file."""
        path = os.fspath(path)
        try:
            stat = os.stat(path)
        except OSError:
            return check_image(path, self.full_decode)  # missing or unreadable: nothing to key on
        head, name = os.path.split(path)
        key = f"{os.path.basename(head)}/{name}"  # <uuid>/<view>.jpg under the root
        entry = self.known.get(key)
        fresh = entry is None or entry[:2] != (stat.st_size, stat.st_mtime_ns) or (self.full_decode and not entry[2])
        if fresh:
            entry = (stat.st_size, stat.st_mtime_ns, self.full_decode, check_image(path, self.full_decode))
        with self._lock:
            self.rechecked += fresh
            self.seen[key] = entry
        return entry[3]

    def save(self) -> None:
        """Write the entries of the files checked in this run (atomically), when anything changed."""
        if self.path is None or (not self.rechecked and self.seen.keys() == self.known.keys()):
            return
        table = pd.DataFrame([(key, *entry) for key, entry in sorted(self.seen.items())], columns=MANIFEST_COLUMNS)
        with atomic_path(self.path) as tmp:
            table.to_csv(tmp, index=False)


def _bad_views(image_dirs: list[str], manifest: CheckManifest, progress: bool) -> list[str | None]:
    """For each location folder, None when its four views are usable, else 'VIEW.jpg: reason; ...'."""
    def check(folders: list[str]) -> list[str | None]:
        problems = [[f"{view}.jpg: {reason}" for view in VIEWS
                     if (reason := manifest.check(f"{folder}{os.sep}{view}.jpg")) is not None] for folder in folders]
        return ["; ".join(p) or None for p in problems]

    # chunks of folders per thread task: with a warm manifest a location costs a few stats, less than a task
    chunks = [image_dirs[i:i + CHECK_CHUNK] for i in range(0, len(image_dirs), CHECK_CHUNK)]
    bad: list[str | None] = []
    with ThreadPoolExecutor(max_workers=8) as pool, \
            tqdm(total=len(image_dirs), desc="checking images", unit="loc", disable=not progress, file=sys.stderr) as bar:
        for result in pool.map(check, chunks):
            bad += result
            bar.update(len(result))
    manifest.save()
    return bad


def read_dataset(dataset_dir: str | Path, check_images: bool = True, full_decode: bool = False,
                 progress: bool = True, check_cache: Path | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, int]:
    """One dataset dir: (candidate locations, skipped rows, orphan folders, rows read).

    Image checks are remembered in a CheckManifest under `check_cache` (None: not remembered)."""
    dataset_dir = Path(dataset_dir)
    root = find_image_root(dataset_dir)
    rows = read_table(dataset_dir / "data.csv")
    table = rows.table
    folders = {name: f"{root}{os.sep}{name}" for name in location_names(root)}  # uuid -> folder (str)
    table["dataset_dir"] = str(dataset_dir)
    csv_uuids = set(table["uuid"])
    orphans = pd.DataFrame({"dataset_dir": str(dataset_dir),
                            "folder": [folder for uuid, folder in folders.items() if uuid not in csv_uuids]})
    line = "line " + table["line"].astype(str)
    table["image_dir"] = table["uuid"].map(folders).fillna("")
    reason = pd.Series(None, index=table.index, dtype=object)
    detail = pd.Series(None, index=table.index, dtype=object)

    def skip(mask: pd.Series, why: str, what) -> None:
        mask = mask & reason.isna()  # the first defect found is the one reported
        reason[mask] = why
        detail[mask] = what[mask] if isinstance(what, pd.Series) else what

    bad_row = rows.defect.notna()  # missing uuid, invalid coordinates, duplicate uuid
    reason[bad_row] = rows.defect[bad_row]
    detail[bad_row] = line[bad_row] + ": " + rows.detail[bad_row]
    skip(table["image_dir"].eq(""), "missing folder", pd.Series(f"no folder {root}/", index=table.index) + table["uuid"])
    if check_images:
        candidates = reason.isna()
        manifest = CheckManifest(root, check_cache, full_decode)
        problems = pd.Series(_bad_views(table.loc[candidates, "image_dir"].tolist(), manifest, progress),
                             index=table.index[candidates], dtype=object).reindex(table.index)
        skip(problems.notna(), "bad view", problems)
    skipped = pd.DataFrame({"dataset_dir": str(dataset_dir), "uuid": table["uuid"], "reason": reason, "detail": detail})
    return table[reason.isna()], skipped[reason.notna()], orphans, len(table)


def read_datasets(dataset_dirs, check_images: bool = True, full_decode: bool = False,
                  max_outside_km: float = 10.0, mainland_only: bool = False, progress: bool = True,
                  check_cache: Path | None = None) -> Ingested:
    """Merge dataset dirs into one location table; defects are skipped and listed, never dropped silently.

    Skipped: rows without uuid or with invalid coordinates, duplicated uuids (within or across dirs: the
    first one is kept), rows whose folder or any view is missing or unreadable, points farther than
    `max_outside_km` from Croatia (points just outside the coarse 1:10m border are kept). Image check
    results are cached under `check_cache` (see CheckManifest).
    """
    if not dataset_dirs:
        raise UserError("no dataset dir given (--dataset-dirs DIR [DIR ...])")
    tables, skips, orphans, n_read = [], [], [], 0
    for dataset_dir in dataset_dirs:
        table, dir_skips, dir_orphans, dir_read = read_dataset(dataset_dir, check_images, full_decode, progress,
                                                               check_cache)
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
