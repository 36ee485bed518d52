import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src import geo
from src.enrich import (OUTPUT_COLUMNS, enrich, enrich_from_locations, read_locations_csv, split_locations,
                        write_locations_csv)
from src.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def locations_table(n, dirs=("a",)):
    return pd.DataFrame({"uuid": [f"u{i:04d}" for i in range(n)], "dataset_dir": [dirs[i % len(dirs)] for i in range(n)]})


def test_split_is_deterministic_proportional_and_order_independent():
    table = locations_table(1000)
    split = split_locations(table, seed=3)
    assert (split == split_locations(table, seed=3)).all()
    assert not (split == split_locations(table, seed=4)).all()
    assert [int((split == s).sum()) for s in ("train", "val", "test")] == [800, 100, 100]
    shuffled = table.sample(frac=1, random_state=0)
    again = pd.Series(split_locations(shuffled, seed=3), index=shuffled.index).sort_index()
    assert (again.to_numpy() == split).all()
    custom = split_locations(table, seed=0, fractions=(0.6, 0.3, 0.1))
    assert [int((custom == s).sum()) for s in ("train", "val", "test")] == [600, 300, 100]


def test_holdout_dirs_form_the_test_split():
    table = locations_table(300, dirs=("a", "b", "c"))
    split = split_locations(table, seed=0, holdout_dirs=["c"])
    assert (split[table["dataset_dir"] == "c"] == "test").all()
    rest = split[table["dataset_dir"] != "c"]
    assert set(rest) == {"train", "val"} and (rest == "val").sum() == round(200 * 0.1 / 0.9)


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.5, 0.2, 0.2), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_split_fractions_are_user_errors(fractions):
    with pytest.raises(UserError, match="--split"):
        split_locations(locations_table(10), 0, fractions)


def test_enrich_columns_classes_scaler(demo_dir):
    enriched = enrich([demo_dir], spacing=0.5, seed=0, progress=False)
    locations, classes = enriched.locations, enriched.classes
    assert list(locations.columns) == OUTPUT_COLUMNS
    assert len(locations) == 120
    x, y = geo.project(locations["latitude"], locations["longitude"])
    np.testing.assert_allclose(locations["crs_x"], x)
    train = locations[locations["split"] == "train"]
    assert enriched.scaler == pytest.approx({"x_min": train["crs_x"].min(), "x_max": train["crs_x"].max(),
                                             "y_min": train["crs_y"].min(), "y_max": train["crs_y"].max()})
    # classes are exactly the cells holding train locations; train rows sit in their own class's cell
    assert sorted(classes["cell"]) == sorted(train["cell"].unique())
    assert (classes.loc[train["label"], "cell"].to_numpy() == train["cell"].to_numpy()).all()
    assert classes["n_train"].sum() == len(train)
    # each row carries its class's centroids
    row = locations.iloc[0]
    assert row["weighted_lat"] == classes.loc[row["label"], "weighted_lat"]
    # same data, seed and spacing: same classes and split
    again = enrich([demo_dir], spacing=0.5, seed=0, progress=False)
    pd.testing.assert_frame_equal(again.locations, locations)
    pd.testing.assert_frame_equal(again.classes, classes)


def test_holdout_dir_must_be_a_dataset_dir(demo_dir, tmp_path):
    with pytest.raises(UserError, match="--holdout-dirs"):
        enrich([demo_dir], holdout_dirs=[tmp_path], progress=False)


def run_enrich(*args, cwd):
    return subprocess.run([sys.executable, "-m", "src.enrich", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_enrich_cli_end_to_end(demo_dir, tmp_path):
    out = tmp_path / "enriched.csv"
    result = run_enrich("--dataset-dirs", demo_dir, "--spacing", "0.4", "--seed", "1", "--out", out,
                        "--figures-dir", tmp_path / "figures", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out)
    assert list(table.columns) == OUTPUT_COLUMNS and len(table) == 120
    assert "locations kept" in result.stdout and "classes (cells with train data)" in result.stdout
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "centroids_spacing_0.4.png", "class_sizes_spacing_0.4.png", "distribution_spacing_0.4.png",
        "grid_spacing_0.4.png"]
    assert (tmp_path / "enriched_skipped.csv").exists()


def test_enrich_cli_lists_skips_and_writes_the_report(demo_dir, tmp_path):
    shutil.copytree(demo_dir, tmp_path / "d")
    folders = sorted((tmp_path / "d" / "data").iterdir())
    for folder in folders[:12]:
        (folder / "90.jpg").unlink()
    result = run_enrich("--dataset-dirs", tmp_path / "d", "--out", tmp_path / "e.csv", "--no-figures", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: skipped 12 location(s): bad view" in result.stderr
    assert "... and 2 more in" in result.stderr
    report = pd.read_csv(tmp_path / "e_skipped.csv")
    assert sorted(report["uuid"]) == sorted(f.name for f in folders[:12])
    assert len(pd.read_csv(tmp_path / "e.csv")) == 108


def test_enrich_cli_user_errors_are_one_line_exit_2(demo_dir, tmp_path):
    shutil.copytree(demo_dir, tmp_path / "d")
    pd.read_csv(demo_dir / "data.csv").drop(columns=["uuid"]).to_csv(tmp_path / "d" / "data.csv", index=False)
    result = run_enrich("--dataset-dirs", tmp_path / "d", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing column(s) uuid" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_enrich("--dataset-dirs", demo_dir, "--split", "0.9", "0.2", "0.1", cwd=tmp_path)
    assert result.returncode == 2 and "--split" in result.stderr


def test_an_enriched_csv_is_reused_without_reading_the_dataset(demo_dir, tmp_path):
    """--locations: the CSV's locations and split; cells, classes and centroids recomputed at the given spacing
    give exactly what enrich computes from the dataset dir."""
    original = enrich([demo_dir], spacing=0.5, seed=2, progress=False)
    path = write_locations_csv(original.locations, tmp_path / "runs" / "locations.csv")
    for spacing in (0.5, 1.0):
        reused = enrich_from_locations(path, spacing=spacing)
        expected = original if spacing == 0.5 else enrich([demo_dir], spacing=spacing, seed=2, progress=False)
        pd.testing.assert_frame_equal(reused.locations, expected.locations, check_dtype=False)
        pd.testing.assert_frame_equal(reused.classes, expected.classes, check_dtype=False)
        assert reused.scaler == pytest.approx(expected.scaler)
    # the split is the CSV's own, whatever seed the enrich flags say
    edited = pd.read_csv(path)
    edited.loc[edited["split"] == "val", "split"] = "test"
    edited.to_csv(path, index=False)
    assert set(enrich_from_locations(path).locations["split"]) == {"train", "test"}


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.drop(columns=["split", "image_dir"]), "lacks column(s) image_dir, split"),
    (lambda t: t.assign(latitude=t["latitude"].astype(object).where(t.index != 3, "north")), "line 5: latitude/longitude"),
    (lambda t: t.assign(split=t["split"].where(t.index != 0, "dev")), "line 2: split not one of train, val, test"),
    (lambda t: pd.concat([t, t.head(1)]), "empty or repeated uuid"),
    (lambda t: t.assign(split="test"), "no train row"),
    (lambda t: t.assign(image_dir=t["image_dir"].where(t.index != 1, "/nowhere/x")), "1 of 120 image folders do not"),
    (lambda t: t.head(0), "header but no rows"),
])
def test_a_bad_locations_csv_is_a_one_line_error(demo_dir, tmp_path, edit, message):
    table = enrich([demo_dir], progress=False).locations
    path = tmp_path / "locations.csv"
    edit(table).to_csv(path, index=False)
    with pytest.raises(UserError, match=re.escape(message)) as error:
        read_locations_csv(path)
    assert str(error.value).startswith(f"--locations {path}: ") and "\n" not in str(error.value)
