"""CSV files of locations: the one reader and validator of `<key>,latitude,longitude` tables (a dataset's
data.csv, a submission, a truth file, a points file) and the enriched locations CSV of a run.

Every reader reports a problem as a one-line UserError naming the file, the line and what is wrong, or
returns the defects per row (`CoordinateRows`) for the caller to skip and list them.
"""

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import UserError
from src.core.files import write_csv
from src.core.choices import SPLITS

# defect categories of a coordinate row, in the order they are looked for (the first found is reported)
MISSING_KEY, INVALID_COORDINATES, DUPLICATE_KEY = "missing {key}", "invalid coordinates", "duplicate {key}"
LIMITS = {"latitude": 90.0, "longitude": 180.0}
# the columns an enriched CSV must have to be reused with --locations (cells, labels, centroids are recomputed)
LOCATIONS_COLUMNS = ["uuid", "latitude", "longitude", "dataset_dir", "image_dir", "split"]


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


@dataclass
class CoordinateRows:
    """A coordinate CSV read as is: `table` has the key (stripped text), latitude and longitude (float, NaN
    where not a number), the other requested columns and `line` (the CSV line, header = 1); `defect` and
    `detail` say per row what is wrong (None for a usable row)."""

    path: Path
    key: str
    table: pd.DataFrame
    defect: pd.Series
    detail: pd.Series

    @property
    def bad(self) -> np.ndarray:
        return self.defect.notna().to_numpy()

    def listing(self) -> list[str]:
        """`line N: detail` per bad row."""
        return [f"line {line}: {detail}" for line, detail in zip(self.table["line"][self.bad], self.detail[self.bad])]

    def require_valid(self, what: str, fix: str) -> pd.DataFrame:
        """The table; any bad row is a one-line UserError naming the first one."""
        if self.bad.any():
            listing = self.listing()
            raise UserError(f"{self.path}: {len(listing)} bad {what} row(s), first {listing[0]}; {fix}")
        return self.table

    def skip_bad(self, what: str, use: str = "used") -> pd.DataFrame:
        """The usable rows; the others are counted and listed in a warning on stderr (rows that cannot be `use`d)."""
        if self.bad.any():
            listing = self.listing()
            print(f"warning: {self.path}: skipped {len(listing)} {what} row(s) that cannot be {use}:", file=sys.stderr)
            print("\n".join(f"  {line}" for line in listing), file=sys.stderr)
        return self.table[~self.bad].reset_index(drop=True)


def read_coordinates(path: str | Path, what: str, fix: str, key: str = "uuid", columns: tuple[str, ...] = (),
                     lowercase_columns: bool = False, keep_other_columns: bool = False) -> CoordinateRows:
    """Read `key`,latitude,longitude (plus `columns`) from the CSV at `path`, checking every row.

    `what` names the file in messages ("submission", "truth", "data.csv"), `fix` says how to fix it;
    `keep_other_columns` keeps the columns not asked for, after the asked ones. A
    missing file or column or an empty table is a UserError; row defects (empty key, a coordinate that is
    not a number in degrees, a repeated key) are returned for the caller to refuse or skip.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} file not found; {fix}")
    frame = read_csv_strict(path, fix)
    frame.columns = [str(c).strip().lower() if lowercase_columns else str(c).strip() for c in frame.columns]
    wanted = [key, "latitude", "longitude", *columns]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, frame.columns))}); "
                        f"{fix}")
    if frame.empty:
        raise UserError(f"{path}: {what} has a header but no rows; {fix}")
    table = frame[wanted + [c for c in frame.columns if c not in wanted and keep_other_columns]].copy()
    table[key] = table[key].astype(object).where(table[key].notna(), "").astype(str).str.strip()
    raw = {c: table[c].copy() for c in LIMITS}
    for column in LIMITS:
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    table["line"] = np.arange(len(table)) + 2
    defect = pd.Series(None, index=table.index, dtype=object)
    detail = pd.Series(None, index=table.index, dtype=object)

    def mark(mask, category: str, text) -> None:
        mask = mask & defect.isna()
        defect[mask] = category.format(key=key)
        detail[mask] = text[mask] if isinstance(text, pd.Series) else text

    mark(table[key].eq("") | table[key].str.lower().eq("nan"), MISSING_KEY, f"empty {key}")
    for column, limit in LIMITS.items():
        values = table[column]
        mark(values.isna(), INVALID_COORDINATES, f"{column} " + raw[column].map(repr) + " is not a number")
        mark(values.abs() > limit, INVALID_COORDINATES,
             f"{column} " + values.astype(str) + f" is outside +-{limit:g} (not WGS84 degrees?)")
    mark(table[key].duplicated(), DUPLICATE_KEY, f"{key} " + table[key] + " repeats an earlier row")
    return CoordinateRows(path, key, table, defect, detail)


def read_locations_csv(path: str | Path, check_folders: bool = True) -> pd.DataFrame:
    """An enriched locations CSV (`src.enrich --out`, or a run's version_N/locations.csv) to reuse as is.

    Checked: the columns of LOCATIONS_COLUMNS, coordinates in degrees, unique uuids, split values, a train
    row and (`check_folders`) that the image folders exist here; each problem is a one-line UserError naming
    the file and line.
    """
    fix = "pass a CSV written by `python -m src.enrich` or a run's version_N/locations.csv"
    try:
        rows = read_coordinates(path, "locations CSV", fix, columns=("dataset_dir", "image_dir", "split"))
        frame = rows.require_valid("locations", fix)
    except UserError as error:  # the message names the flag the file came from
        raise UserError(f"--locations {error}") from None
    problems = [(~frame["split"].isin(SPLITS), f"split not one of {', '.join(SPLITS)}"),
                (frame["image_dir"].isna() | frame["dataset_dir"].isna(), "empty image_dir or dataset_dir")]
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
    return frame[LOCATIONS_COLUMNS].reset_index(drop=True)


def write_locations_csv(locations: pd.DataFrame, path: str | Path) -> Path:
    """The enriched locations as a CSV (atomically), reusable with --locations."""
    return write_csv(locations, path)
