"""Scoring predictions against ground truth: matching uuids, km errors and their statistics.

The statistics (`src.core.geo.summarize_km`) are the ones training reports, GeoGuessr-style score included.
"""

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from src.core.errors import UserError
from src.core.geo import haversine_km, summarize_km
from src.data.locations import read_coordinates

SUBMISSION_COLUMNS = ["uuid", "latitude", "longitude"]
# columns of a data.csv or an enriched CSV that a predict submission never has
TRUTH_ONLY_COLUMNS = ("split", "dataset_dir", "image_dir", "label", "cell")


def header(path: str | Path) -> list[str]:
    """The column names of a CSV (empty when it cannot be read: the full read reports why)."""
    try:
        return [str(c).strip() for c in pd.read_csv(path, nrows=0, index_col=False).columns]
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return []


def check_not_swapped(submission_path: str | Path, truth_path: str | Path) -> None:
    """A submission that looks like truth (enriched or extra columns) next to a truth file that looks like a
    submission (exactly uuid,latitude,longitude) means the two arguments were given the wrong way round."""
    submission, truth = header(submission_path), header(truth_path)
    extra = [c for c in TRUTH_ONLY_COLUMNS if c in submission]
    if extra and truth and sorted(truth) == sorted(SUBMISSION_COLUMNS):
        raise UserError(f"{submission_path} and {truth_path}: the arguments look swapped: the first has truth "
                        f"columns ({', '.join(extra)}), the second only uuid,latitude,longitude; "
                        "give the submission first, then the truth: python -m src.score SUBMISSION TRUTH")


def swap_hint(submission: pd.DataFrame, truth: pd.DataFrame, submission_path: str | Path,
              truth_path: str | Path) -> str:
    """For a uuid mismatch: a UserError when the first file has extra columns, the second exactly
    uuid,latitude,longitude and a strict subset of its uuids (a data.csv given first); a hint to append to the
    mismatch message when only the uuids suggest a swap; else ""."""
    sub_ids, truth_ids = set(submission["uuid"]), set(truth["uuid"])
    truth_columns = header(truth_path)
    if not truth_ids < sub_ids or any(c in truth_columns for c in TRUTH_ONLY_COLUMNS):
        return ""
    extra = [c for c in header(submission_path) if c not in SUBMISSION_COLUMNS]
    if extra and sorted(truth_columns) == sorted(SUBMISSION_COLUMNS):
        raise UserError(f"{submission_path} and {truth_path}: the arguments look swapped: the first has "
                        f"{len(sub_ids)} uuids and extra columns ({', '.join(extra[:4])}), the second only "
                        f"uuid,latitude,longitude for {len(truth_ids)} of them; give the submission first, then the "
                        "truth: python -m src.score SUBMISSION TRUTH")
    return (f"; if the arguments are swapped (every uuid of {truth_path} is in {submission_path}), give the "
            "submission first, then the truth: python -m src.score SUBMISSION TRUTH")


def read_locations(path: str | Path, what: str, strict: bool = True) -> pd.DataFrame:
    """Read uuid/latitude/longitude (extra columns kept) from a CSV, validating every row.

    `what` names the file's role ("submission", "truth") in messages. A bad row (empty or repeated uuid,
    coordinates that are not WGS84 degrees) is a UserError when `strict` (a submission is the user's
    output); otherwise (truth data) it is skipped and listed in a warning on stderr.
    """
    fix = "every row needs a unique uuid and latitude/longitude in degrees (header uuid,latitude,longitude)"
    rows = read_coordinates(path, what, fix, keep_other_columns=True)
    frame = rows.require_valid(what, fix) if strict else rows.skip_bad(what, "scored")
    if frame.empty:
        raise UserError(f"{path}: no usable {what} row left")
    return frame.drop(columns="line")


@dataclass
class Scored:
    """Per-location errors of a submission against truth, plus the uuids that did not match."""

    errors: pd.DataFrame  # uuid, true_lat, true_lng, pred_lat, pred_lng, error_km (sorted by uuid)
    missing: list[str]  # truth uuids with no submission row
    extra: list[str]  # submission uuids not in truth


def match_and_measure(submission: pd.DataFrame, truth: pd.DataFrame, allow_missing: bool = False,
                      where: str = "submission vs truth", hint: str = "") -> Scored:
    """Join submission and truth on uuid and compute each location's great-circle error in km.

    A differing uuid set raises UserError (with `hint` appended) unless `allow_missing`, which scores the
    common uuids.
    """
    sub_ids, truth_ids = set(submission["uuid"]), set(truth["uuid"])
    missing, extra = sorted(truth_ids - sub_ids), sorted(sub_ids - truth_ids)
    if (missing or extra) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(truth_ids)} truth uuid(s) have no submission row (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} submission uuid(s) are not in truth (e.g. {extra[0]})")
        raise UserError(
            f"{where}: uuid sets differ: {'; '.join(parts)}; score against the matching truth "
            f"file (or --split), or pass --allow-missing for a partial score{hint}"
        )
    joined = truth[SUBMISSION_COLUMNS].merge(submission[SUBMISSION_COLUMNS], on="uuid", suffixes=("_true", "_pred"))
    if joined.empty:
        raise UserError(f"{where}: no uuid in common; are these files for the same locations?")
    joined = joined.sort_values("uuid", ignore_index=True)
    errors = pd.DataFrame({
        "uuid": joined["uuid"],
        "true_lat": joined["latitude_true"], "true_lng": joined["longitude_true"],
        "pred_lat": joined["latitude_pred"], "pred_lng": joined["longitude_pred"],
    })
    errors["error_km"] = haversine_km(errors["true_lat"], errors["true_lng"], errors["pred_lat"], errors["pred_lng"])
    return Scored(errors=errors, missing=missing, extra=extra)


def score_files(submission_path: str | Path, truth_path: str | Path, allow_missing: bool = False,
                split: str | None = None) -> tuple[Scored, dict[str, float]]:
    """Read, validate, match and summarize a submission against a truth CSV (optionally one split of it)."""
    check_not_swapped(submission_path, truth_path)
    submission = read_locations(submission_path, "submission")
    truth = read_locations(truth_path, "truth", strict=False)
    if split is not None:
        if "split" not in truth.columns:
            raise UserError(f"{truth_path}: --split {split} given but the file has no split column; "
                            "use an enriched CSV or drop --split")
        truth = truth[truth["split"] == split]
        if truth.empty:
            raise UserError(f"{truth_path}: no row has split == {split!r}; splits present: train, val, test")
    hint = "" if allow_missing else swap_hint(submission, truth, submission_path, truth_path)
    scored = match_and_measure(submission, truth, allow_missing, where=f"{submission_path} vs {truth_path}", hint=hint)
    return scored, summarize_km(scored.errors["error_km"])
