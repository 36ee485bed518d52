import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.core import geo
from src.data.config import DataConfig
from src.data.enrich import OUTPUT_COLUMNS, data_config_from_args, dataset_tag, enrich, enrich_from_locations, split_locations, thin_data_warning, unit_hash
from src.data.locations import read_locations_csv, write_locations_csv
from src.enrich import build_parser
from src.enrich import main as enrich_main
from src.core.errors import UserError, run_cli
from src.data.cells import build_grid

ROOT = Path(__file__).resolve().parent.parent


def locations_table(n, dirs=("a",)):
    return pd.DataFrame({"uuid": [f"u{i:04d}" for i in range(n)], "dataset_dir": [dirs[i % len(dirs)] for i in range(n)]})


def counts(split):
    return np.array([int((split == s).sum()) for s in ("train", "val", "test")])


def test_split_is_deterministic_proportional_and_order_independent():
    table = locations_table(4000)
    split = split_locations(table, seed=3)
    assert (split == split_locations(table, seed=3)).all()
    assert not (split == split_locations(table, seed=4)).all()
    # a hash per uuid: binomial shares, within 4 standard deviations of the fractions
    assert np.abs(counts(split) - [3200, 400, 400]).max() < 4 * np.sqrt(4000 * 0.8 * 0.2)
    shuffled = table.sample(frac=1, random_state=0)
    again = pd.Series(split_locations(shuffled, seed=3), index=shuffled.index).sort_index()
    assert (again.to_numpy() == split).all()
    custom = split_locations(table, seed=0, fractions=(0.6, 0.3, 0.1))
    assert np.abs(counts(custom) - [2400, 1200, 400]).max() < 4 * np.sqrt(4000 * 0.6 * 0.4)


def test_split_is_stable_per_location():
    """Removing or adding locations never moves the others: each uuid's split is its own seeded hash."""
    table = locations_table(500)
    split = pd.Series(split_locations(table, seed=7), index=table["uuid"])
    fewer = table.drop(index=[17])  # e.g. one location skipped for a bad view
    assert (split_locations(fewer, seed=7) == split.drop("u0017").to_numpy()).all()
    more = pd.concat([table, pd.DataFrame({"uuid": ["new1", "new2"], "dataset_dir": "b"})], ignore_index=True)
    assert (split_locations(more, seed=7)[:500] == split.to_numpy()).all()
    # the hash is the split: thresholds 0.8 and 0.9 on unit_hash(uuid, seed)
    position = unit_hash(table["uuid"], 7)
    assert ((position < 0.8) == (split.to_numpy() == "train")).all()
    assert (((position >= 0.8) & (position < 0.9)) == (split.to_numpy() == "val")).all()


def test_split_by_block_keeps_every_block_in_one_split():
    table = locations_table(3000)
    blocks = np.random.default_rng(0).integers(0, 120, len(table))
    split = split_locations(table, seed=1, blocks=blocks)
    per_block = pd.Series(split).groupby(blocks).nunique()
    assert (per_block == 1).all() and set(split) == {"train", "val", "test"}
    # blocks of ~25 locations: the shares stay near the fractions
    assert np.abs(counts(split) / 3000 - [0.8, 0.1, 0.1]).max() < 0.05
    # with held-out dirs, their rows are test and the blocks of the others fill train and val only
    table["dataset_dir"] = np.where(np.arange(3000) < 300, "held", "a")
    split = split_locations(table, seed=1, holdout_dirs=["held"], blocks=blocks)
    assert (split[:300] == "test").all() and set(split[300:]) == {"train", "val"}
    assert (pd.Series(split[300:]).groupby(blocks[300:]).nunique() == 1).all()


def test_holdout_dirs_form_the_test_split():
    table = locations_table(300, dirs=("a", "b", "c"))
    split = split_locations(table, seed=0, holdout_dirs=["c"])
    assert (split[table["dataset_dir"] == "c"] == "test").all()
    rest = split[table["dataset_dir"] != "c"]
    assert set(rest) == {"train", "val"}
    # val keeps its share of the non-held-out rows (0.1 / 0.9): the same hash thresholds, renormalized
    position = unit_hash(table["uuid"][table["dataset_dir"] != "c"], 0)
    assert ((position >= 0.8 / 0.9) == (rest == "val")).all()


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


def test_adaptive_cells_from_train_locations(demo_dir):
    enriched = enrich([demo_dir], seed=0, cells="adaptive", n_classes=20, progress=False)
    locations, classes, cells = enriched.locations, enriched.classes, enriched.grid
    train = locations[locations["split"] == "train"]
    assert cells.kind == "adaptive" and len(classes) == len(cells.cells) == 20
    # every cell is a class; train rows sit in their class's cell; weighted centroids are the k-means centres
    assert (classes["cell"].to_numpy() == np.arange(20)).all()
    assert (classes.loc[train["label"], "cell"].to_numpy() == train["cell"].to_numpy()).all()
    np.testing.assert_allclose(classes[["weighted_x", "weighted_y"]], cells.seeds, atol=1e-3)
    # val/test rows get the cell of their nearest centre, as a predicted point would (analyze)
    other = locations[locations["split"] != "train"]
    nearest = ((other[["crs_x", "crs_y"]].to_numpy()[:, None] - cells.seeds[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(other["label"], nearest)
    # deterministic for the same data and seed; the default class count matches the grid's
    again = enrich([demo_dir], seed=0, cells="adaptive", n_classes=20, progress=False)
    pd.testing.assert_frame_equal(again.classes, classes)
    matched = enrich([demo_dir], seed=0, cells="adaptive", progress=False)
    grid = enrich([demo_dir], seed=0, progress=False)
    assert len(matched.classes) == len(grid.classes)
    pd.testing.assert_series_equal(matched.locations["split"], grid.locations["split"])


@pytest.mark.parametrize("cells", ["grid", "adaptive"])
def test_split_by_cell_keeps_every_grid_cell_in_one_split(demo_dir, cells):
    enriched = enrich([demo_dir], spacing=1.0, seed=2, cells=cells, split_by="cell", progress=False)
    locations = enriched.locations
    blocks = build_grid(1.0).assign(locations["latitude"], locations["longitude"])
    assert (locations.groupby(blocks)["split"].nunique() == 1).all()
    assert set(locations["split"]) == {"train", "val", "test"}
    if cells == "grid":  # the blocks are the class cells: val/test cells are never classes
        held = locations[locations["split"] != "train"]
        assert not set(held["cell"]) & set(enriched.classes["cell"])


def test_thin_data_warning_suggests_the_right_fix(demo_dir):
    coarse = enrich([demo_dir], spacing=3.0, progress=False)
    assert coarse.classes["n_train"].median() >= 5 and thin_data_warning(coarse) is None
    fine = enrich([demo_dir], spacing=0.3, progress=False)
    median = fine.classes["n_train"].median()
    assert median < 5
    assert f"median of {median:g} train location(s)" in thin_data_warning(fine)
    assert "larger --spacing" in thin_data_warning(fine)
    many = enrich([demo_dir], cells="adaptive", n_classes=60, progress=False)
    assert "fewer --classes" in thin_data_warning(many)


def test_dataset_tag_is_short_and_file_safe(tmp_path):
    assert dataset_tag([tmp_path / "demo"]) == "demo"
    assert dataset_tag([tmp_path / "a b", tmp_path / "c/"]) == "a-b+c"
    tag = dataset_tag([tmp_path / ("x" * 60), tmp_path / "y", tmp_path / "z"])
    assert len(tag) <= 40 and tag.endswith("+2more")


def test_holdout_dir_must_be_a_dataset_dir(demo_dir, tmp_path):
    with pytest.raises(UserError, match="--holdout-dirs"):
        enrich([demo_dir], holdout_dirs=[tmp_path], progress=False)


# the temporary folder of the image checks (conftest.image_check_cache), and no bytecode written into the checkout
PASSED_ENV = ("IMAGE_CHECK_CACHE_DIR", "PYTHONDONTWRITEBYTECODE")


def run_enrich(*args, cwd):
    """`python -m src.enrich ARGS` in its own process (for its exit status), with a bare environment."""
    return subprocess.run([sys.executable, "-m", "src.enrich", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                          **{name: os.environ[name] for name in PASSED_ENV if name in os.environ}})


def test_enrich_cli_end_to_end(demo_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "enriched.csv"
    run_cli(enrich_main, ["--dataset-dirs", str(demo_dir), "--spacing", "0.4", "--seed", "1", "--out", str(out),
                          "--figures-dir", str(tmp_path / "figures")])
    result = capsys.readouterr()  # the command ended without SystemExit: exit status 0
    table = pd.read_csv(out)
    assert list(table.columns) == OUTPUT_COLUMNS and len(table) == 120
    assert "locations kept" in result.out and "classes (cells with train data)" in result.out
    tag = f"{demo_dir.name}_grid0.4"
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == [f"{name}_{tag}.png" for name in ("centroids", "class_sizes", "distribution", "grid")]
    assert (tmp_path / "enriched_skipped.csv").exists()
    assert "warning: training data is thin" in result.err  # 96 train locations over ~60 cells
    # without --out, outputs are named by dataset and cells (another dataset or cells never overwrite them)
    # and the command says where they went
    monkeypatch.chdir(tmp_path)
    enrich_main(["--dataset-dirs", str(demo_dir), "--cells", "adaptive", "--classes", "8", "--split-by", "cell",
                 "--figures-dir", "figures"])
    named = tmp_path / "reports" / f"enriched_{demo_dir.name}_adaptive8_cellsplit.csv"
    assert pd.read_csv(named)["label"].nunique() <= 8
    stdout = capsys.readouterr().out
    assert f"enriched CSV: reports/{named.name}" in stdout
    assert f"figures/grid_{demo_dir.name}_adaptive8_cellsplit.png" in stdout
    assert len(list((tmp_path / "figures").iterdir())) == 8


def test_enrich_cli_lists_skips_and_writes_the_report(demo_dir, tmp_path, capsys):
    shutil.copytree(demo_dir, tmp_path / "d")
    folders = sorted((tmp_path / "d" / "data").iterdir())
    for folder in folders[:12]:
        (folder / "90.jpg").unlink()
    run_cli(enrich_main, ["--dataset-dirs", str(tmp_path / "d"), "--out", str(tmp_path / "e.csv"), "--no-figures"])
    result = capsys.readouterr()  # the command ended without SystemExit: exit status 0
    assert "warning: skipped 12 location(s): bad view" in result.err
    assert "... and 2 more in" in result.err
    report = pd.read_csv(tmp_path / "e_skipped.csv")
    assert sorted(report["uuid"]) == sorted(f.name for f in folders[:12])
    assert len(pd.read_csv(tmp_path / "e.csv")) == 108


def test_enrich_cli_user_errors_are_one_line_exit_2(demo_dir, tmp_path, capsys):
    shutil.copytree(demo_dir, tmp_path / "d")
    pd.read_csv(demo_dir / "data.csv").drop(columns=["uuid"]).to_csv(tmp_path / "d" / "data.csv", index=False)
    result = run_enrich("--dataset-dirs", tmp_path / "d", cwd=tmp_path)  # the real command's exit status
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing column(s) uuid" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(SystemExit) as exit_:
        run_cli(enrich_main, ["--dataset-dirs", str(demo_dir), "--split", "0.9", "0.2", "0.1"])
    assert exit_.value.code == 2 and "--split" in capsys.readouterr().err


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
    (lambda t: t.drop(columns=["split", "image_dir"]), "missing column(s) image_dir, split"),
    (lambda t: t.assign(latitude=t["latitude"].astype(object).where(t.index != 3, "north")), "line 5: latitude 'north' is not a number"),
    (lambda t: t.assign(split=t["split"].where(t.index != 0, "dev")), "line 2: split not one of train, val, test"),
    (lambda t: pd.concat([t, t.head(1)]), "line 122: uuid"),
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


@pytest.mark.parametrize("argv, message", [
    ("--classes 12", "--classes 12: only for --cells adaptive"),
    ("--cells adaptive --classes -3", "--classes -3: must be a number of adaptive cells"),
    ("--cells hexagons", "--cells: invalid choice"),
    ("--split-by road", "--split-by: invalid choice"),
])
def test_cell_flag_mistakes_are_one_line_errors(demo_dir, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(enrich_main, ["--dataset-dirs", str(demo_dir), "--no-figures", *argv.split()])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and message in error and error.count("\n") == 1


def test_data_config_round_trips_and_old_checkpoints_fall_back_to_defaults(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "data.csv").write_text("uuid,latitude,longitude\n")
    argv = ["--dataset-dirs", str(tmp_path / "a"), "--cells", "adaptive", "--classes", "9", "--split-by", "cell",
            "--spacing", "0.7", "--seed", "5", "--split", "0.7", "0.2", "0.1", "--mainland-only"]
    config = data_config_from_args(build_parser().parse_args(argv))
    hparams = config.hparams()
    assert (hparams["cells"], hparams["n_classes"], hparams["split_by"]) == ("adaptive", 9, "cell")
    assert hparams["dataset_dirs"] == [str((tmp_path / "a").resolve())]
    restored = DataConfig.from_hparams(hparams)
    assert restored.hparams() == hparams and restored == replace(config, locations_csv=None)
    # a checkpoint from before the split and cell flags were saved (the model stored None for some)
    old = {"dataset_dirs": ["/d"], "spacing": 1.0, "seed": 2, "split_fractions": None, "holdout_dirs": None}
    assert DataConfig.from_hparams(old).hparams() == {
        "seed": 2, "spacing": 1.0, "dataset_dirs": ["/d"], "split_fractions": [0.8, 0.1, 0.1], "holdout_dirs": [],
        "full_decode": False, "max_outside_km": 10.0, "mainland_only": False, "cells": "grid", "n_classes": 0,
        "split_by": "location", "fold": None}
    with pytest.raises(KeyError):
        DataConfig.from_hparams({"spacing": 1.0})


def test_a_runs_cells_and_split_flags_flow_through_its_checkpoint_into_analyze(demo_dir, tmp_path):
    """train saves --cells/--classes/--split-by in the checkpoint; analyze rebuilds the same cells and split."""
    import contextlib
    import io

    from src.evaluation.analysis import data_of_checkpoint
    from src.inference.checkpoints import load_model, read_test_locations
    from src.train import main as train_main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        train_main(["--approach", "classification", "--dataset-dirs", str(demo_dir), "--backbone", "tiny",
                    "--no-pretrained", "--epochs", "1", "--image-size", "32", "--cells", "adaptive", "--classes", "7",
                    "--split-by", "cell", "--spacing", "1.0", "--seed", "4", "--num-workers", "0",
                    "--out-dir", str(tmp_path / "reports"), "--cache-dir", str(tmp_path / "cache")])
    checkpoint = Path(printed.getvalue().splitlines()[-1].removeprefix("checkpoint: "))
    hparams = load_model(checkpoint, reports_dir=None).hparams
    assert (hparams.cells, hparams.spacing) == ("adaptive", 1.0)
    _, data = data_of_checkpoint(checkpoint, tmp_path / "reports")
    assert (data.cells, data.n_classes, data.split_by, data.spacing, data.seed) == ("adaptive", 7, "cell", 1.0, 4)
    assert data.locations_csv == str(checkpoint.parent.parent / "locations.csv")  # the run's own table
    rebuilt = enrich(data.dataset_dirs, data.spacing, data.seed, data.split, data.holdout_dirs, progress=False,
                     cells=data.cells, n_classes=data.n_classes, split_by=data.split_by)
    assert rebuilt.grid.kind == "adaptive" and rebuilt.classes["n_train"].tolist() == hparams.classes["n_train"]
    np.testing.assert_allclose(rebuilt.classes[["weighted_x", "weighted_y"]].to_numpy(), hparams.classes["weighted"])
    test = rebuilt.locations[rebuilt.locations["split"] == "test"]
    assert sorted(test["uuid"]) == [u for u, _ in read_test_locations(checkpoint)]
