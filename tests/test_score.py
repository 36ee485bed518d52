"""Score: km statistics and GeoGuessr points on hand-made submissions with known distances."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.core.errors import UserError
from src.core.geo import geoguessr_scale_km, summarize_km
from src.score import main
from src.evaluation.scoring import score_files

REPO = Path(__file__).resolve().parent.parent
EARTH_RADIUS_KM = 6371.0088
KM_PER_DEG_LAT = math.pi * EARTH_RADIUS_KM / 180  # along a meridian the great circle is exact: 111.195 km


def write(path: Path, rows: list[tuple], columns=("uuid", "latitude", "longitude")) -> Path:
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


@pytest.fixture
def files(tmp_path):
    """Truth at (45, 16); predictions 0, 0.01, 0.1 and 1 degree further north (rows shuffled)."""
    truth = write(tmp_path / "truth.csv", [("a", 45.0, 16.0), ("b", 45.0, 16.0), ("c", 45.0, 16.0), ("d", 45.0, 16.0)])
    sub = write(tmp_path / "sub.csv", [("d", 46.0, 16.0), ("a", 45.0, 16.0), ("c", 45.1, 16.0), ("b", 45.01, 16.0)])
    expected = np.array([0.0, 0.01, 0.1, 1.0]) * KM_PER_DEG_LAT  # a, b, c, d
    return sub, truth, expected


def test_scale_is_a_tenth_of_croatias_bounding_box_diagonal():
    # Croatia spans about 13.5-19.4 E and 42.4-46.55 N: a diagonal of roughly 650-660 km
    assert 64.0 < geoguessr_scale_km() < 67.0


def test_statistics_on_known_distances(files):
    sub, truth, expected = files
    scored, stats = score_files(sub, truth)
    assert list(scored.errors["uuid"]) == ["a", "b", "c", "d"]
    np.testing.assert_allclose(scored.errors["error_km"], expected, atol=1e-6)
    assert stats["count"] == 4
    assert stats["mean_km"] == pytest.approx(expected.mean(), abs=1e-6)
    assert stats["median_km"] == pytest.approx((expected[1] + expected[2]) / 2, abs=1e-6)
    # p90 of 4 sorted values (linear interpolation): position 0.9 * 3 = 2.7
    assert stats["p90_km"] == pytest.approx(expected[2] + 0.7 * (expected[3] - expected[2]), abs=1e-6)
    # 1.11 km is not within 1 km; 11.1 km is within 25 but 111 km not within 100
    assert (stats["within_1km"], stats["within_5km"], stats["within_25km"], stats["within_100km"]) == (
        0.25, 0.5, 0.75, 0.75)
    s = geoguessr_scale_km()
    assert stats["geoguessr"] == pytest.approx(np.mean([5000 * math.exp(-d / s) for d in expected]), rel=1e-9)


def test_geoguessr_points_at_zero_and_at_the_scale():
    s = geoguessr_scale_km()
    assert summarize_km([0.0])["geoguessr"] == pytest.approx(5000.0)
    assert summarize_km([s])["geoguessr"] == pytest.approx(5000 / math.e)
    assert summarize_km([10.0], scale_km=10.0)["geoguessr"] == pytest.approx(5000 / math.e)


def test_cli_prints_table_and_mean_last(files, capsys, tmp_path):
    sub, truth, expected = files
    main([str(sub), str(truth), "--errors-out", str(tmp_path / "out" / "errors.csv")])
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors["uuid"].tolist() == ["a", "b", "c", "d"]
    np.testing.assert_allclose(errors["error_km"], expected, atol=1e-6)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"mean_km: {expected.mean():.4f}"
    text = "\n".join(out)
    for label in ("| submission", "median km", "p90 km", "<= 1 km", "<= 100 km", "GeoGuessr /5000", "/ 65.6)"):
        assert label in text
    row = next(line for line in out if line.startswith("| sub.csv"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    d = expected  # 0, 1.11, 11.1 and 111 km
    assert cells == ["sub.csv", "4", f"{d.mean():.1f}", f"{np.median(d):.1f}", f"{np.percentile(d, 90):.1f}",
                     "25.0%", "50.0%", "75.0%", "75.0%", f"{summarize_km(d)['geoguessr']:.0f}"]


def test_uuid_mismatch_is_an_error_unless_allowed(tmp_path, files, capsys):
    sub, truth, expected = files
    short = write(tmp_path / "short.csv", [("a", 45.0, 16.0), ("d", 46.0, 16.0)])
    with pytest.raises(UserError, match=r"2 of 4 truth uuid\(s\) have no submission row"):
        score_files(short, truth)
    stats = main([str(short), str(truth), "--allow-missing"])
    assert stats["count"] == 2
    assert stats["mean_km"] == pytest.approx((expected[0] + expected[3]) / 2, abs=1e-6)
    captured = capsys.readouterr()
    assert "partial score: 2 of 4 truth location(s)" in captured.err
    assert "partial: 2 missing of 4" in captured.out
    extra = write(tmp_path / "extra.csv", [("a", 45.0, 16.0), ("b", 45.0, 16.0), ("c", 45.0, 16.0),
                                           ("d", 45.0, 16.0), ("zzz", 45.0, 16.0)])
    with pytest.raises(UserError, match=r"1 submission .* not in truth"):
        score_files(extra, truth)


@pytest.mark.parametrize("rows, columns, message", [
    ([("a", 45.0, 16.0)], ("uuid", "lat", "lng"), "missing column"),
    ([("a", "north", 16.0)], ("uuid", "latitude", "longitude"), "line 2: latitude 'north' is not a number"),
    ([("a", 45.0, 16.0), ("a", 45.1, 16.0)], ("uuid", "latitude", "longitude"),
     "line 3: uuid a repeats an earlier row"),
    ([("a", 4995000.0, 16.0)], ("uuid", "latitude", "longitude"), "outside"),
])
def test_malformed_submission_is_a_user_error(tmp_path, files, rows, columns, message):
    _, truth, _ = files
    bad = write(tmp_path / "bad.csv", rows, columns)
    with pytest.raises(UserError, match=message):
        score_files(bad, truth, allow_missing=True)


def test_bad_truth_rows_are_skipped_and_listed(tmp_path, capsys):
    truth = write(tmp_path / "truth.csv", [("a", 45.0, 16.0), ("b", "", 16.0), ("c", 45.0, 16.0), ("a", 44.0, 16.0),
                                           ("d", 45.0, 16.0)])
    sub = write(tmp_path / "sub.csv", [("a", 45.0, 16.0), ("c", 45.1, 16.0), ("d", 45.0, 16.0)])
    scored, stats = score_files(sub, truth)
    assert scored.errors["uuid"].tolist() == ["a", "c", "d"]  # the first row of a repeated uuid is kept
    assert stats["mean_km"] == pytest.approx(0.1 * KM_PER_DEG_LAT / 3, abs=1e-6)
    err = capsys.readouterr().err
    assert "skipped 2 truth row(s)" in err
    assert "line 3: latitude nan is not a number" in err and "line 5: uuid a repeats an earlier row" in err


def test_split_filters_an_enriched_truth(tmp_path):
    truth = write(tmp_path / "enriched.csv",
                  [("a", 45.0, 16.0, "train"), ("b", 45.0, 16.0, "test"), ("c", 45.0, 16.0, "test")],
                  ("uuid", "latitude", "longitude", "split"))
    sub = write(tmp_path / "sub.csv", [("b", 45.5, 16.0), ("c", 45.0, 16.0)])
    scored, stats = score_files(sub, truth, split="test")
    assert stats["count"] == 2
    assert stats["mean_km"] == pytest.approx(0.25 * KM_PER_DEG_LAT, abs=1e-6)


def test_command_line_exit_codes(files, tmp_path):
    sub, truth, expected = files
    ok = subprocess.run([sys.executable, "-m", "src.score", str(sub), str(truth)], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == f"mean_km: {expected.mean():.4f}"
    short = write(tmp_path / "short.csv", [("a", 45.0, 16.0)])
    bad = subprocess.run([sys.executable, "-m", "src.score", str(short), str(truth)], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def enriched_truth(path: Path, rows) -> Path:
    """An enriched locations CSV (the --locations columns) from (uuid, lat, lng, split) rows."""
    return write(path, [(u, lat, lng, "/data", f"/data/images/{u}", split) for u, lat, lng, split in rows],
                 ("uuid", "latitude", "longitude", "dataset_dir", "image_dir", "split"))


def test_locations_csv_as_truth(tmp_path, capsys):
    truth = enriched_truth(tmp_path / "locations.csv", [("a", 45.0, 16.0, "train"), ("b", 45.0, 16.0, "test"),
                                                        ("c", 45.0, 16.0, "test")])
    sub = write(tmp_path / "sub.csv", [("b", 45.5, 16.0), ("c", 45.0, 16.0)])
    stats = main([str(sub), "--locations", str(truth), "--split", "test"])
    assert stats["count"] == 2 and stats["mean_km"] == pytest.approx(0.25 * KM_PER_DEG_LAT, abs=1e-6)
    # the enriched CSV's own checks apply; truth must come from exactly one place
    broken = write(tmp_path / "broken.csv", [("b", 45.0, 16.0, "dev")],
                   ("uuid", "latitude", "longitude", "split"))
    with pytest.raises(UserError, match="missing column"):
        main([str(sub), "--locations", str(broken)])
    with pytest.raises(UserError, match="the truth is required"):
        main([str(sub), str(truth), "--locations", str(truth)])
    with pytest.raises(UserError, match="the truth is required"):
        main([str(sub)])


def test_swapped_arguments_are_named(tmp_path):
    truth = enriched_truth(tmp_path / "enriched.csv", [("a", 45.0, 16.0, "test"), ("b", 45.0, 16.0, "test")])
    sub = write(tmp_path / "sub.csv", [("a", 45.5, 16.0), ("b", 45.0, 16.0)])
    with pytest.raises(UserError, match="the arguments look swapped") as error:
        score_files(truth, sub, split="test")
    assert "give the submission first" in str(error.value) and "\n" not in str(error.value)
    assert score_files(sub, truth, split="test")[1]["count"] == 2


def test_a_data_csv_given_first_is_named_swapped(tmp_path):
    """A LUMEN data.csv (index and extra columns, every location) first and a submission of some of its
    locations second: the truth-only columns cannot tell, the extra columns and the uuids can."""
    rows = [(i, i, f"u{i}", 45.0 + i / 100, 16.0, "OK") for i in range(6)]
    data = write(tmp_path / "data.csv", rows, ("", "Unnamed: 0", "uuid", "latitude", "longitude", "status"))
    sub = write(tmp_path / "sub.csv", [("u1", 45.5, 16.0), ("u4", 45.0, 16.0)])
    with pytest.raises(UserError, match="the arguments look swapped") as error:
        score_files(data, sub)
    message = str(error.value)
    assert "the first has 6 uuids and extra columns (Unnamed: 0.1, Unnamed: 0, status)" in message
    assert "uuid,latitude,longitude for 2 of them" in message and "give the submission first" in message
    assert "\n" not in message
    assert score_files(sub, data, allow_missing=True)[1]["count"] == 2  # the right order scores
    # a three-column data.csv first (the demo set's): the mismatch error says the arguments may be swapped
    plain = write(tmp_path / "plain.csv", [(u, lat, lng) for _, _, u, lat, lng, _ in rows])
    with pytest.raises(UserError, match="uuid sets differ") as error:
        score_files(plain, sub)
    assert "if the arguments are swapped (every uuid of" in str(error.value) and "\n" not in str(error.value)
    # a submission for more locations than a truth file: --allow-missing still scores the common ones
    assert score_files(data, sub, allow_missing=True)[1]["count"] == 2
    # an enriched truth second is the truth: more submission rows are a plain mismatch, no swap hint
    truth = enriched_truth(tmp_path / "enriched.csv", [("u1", 45.0, 16.0, "test"), ("u4", 45.0, 16.0, "test")])
    with pytest.raises(UserError, match="uuid sets differ") as error:
        score_files(data, truth, split="test")
    assert "swapped" not in str(error.value)
