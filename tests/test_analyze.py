"""Analysis: oracle ceiling on a hand-made grid, per-class accuracy/confusion, error map and gallery files."""

import contextlib
import io
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image

from src.evaluation.analysis import confusion_summary, confusion_text, error_map, error_map_figure, oracle_ceiling, oracle_ceiling_figure, oracle_errors, per_class_accuracy, worst_gallery, worst_gallery_figure
from src.analyze import main as analyze_main
from src.data.enrich import enrich
from src.core.errors import UserError
from src.core.geo import haversine_km
from src.inference.checkpoints import read_test_locations
from src.predict import main as predict_main
from src.evaluation.scoring import score_files
from src.train import main as train_main

EARTH_RADIUS_KM = 6371.0088
KM_PER_DEG_LAT = math.pi * EARTH_RADIUS_KM / 180


def test_per_class_accuracy_and_confusion_on_hand_made_labels():
    classes = pd.DataFrame({"cell": [10, 11, 12], "n_train": [5, 3, 1], "centroid_lat": [45.0, 44.5, 43.123],
                            "centroid_lng": [16.0, 15.25, 17.0]})
    true = [0, 0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 2, 1, 0, 1]
    km = [1.0, 3.0, 50.0, 70.0, 2.0, 40.0, 90.0]
    table = per_class_accuracy(true, pred, km, classes)
    assert table["class"].tolist() == [2, 0, 1]  # accuracy 0, 0.5, 0.5 (tie broken by larger n first)
    assert table["accuracy"].tolist() == [0.0, 0.5, 0.5]
    assert table["n"].tolist() == [1, 4, 2]
    assert table["cell"].tolist() == [12, 10, 11]
    assert table["centroid_lat"].tolist() == [43.123, 45.0, 44.5]
    assert table["centroid_lng"].tolist() == [17.0, 16.0, 15.25]
    assert table["n_train"].tolist() == [1, 5, 3]
    assert table["mean_km"].tolist() == [90.0, 31.0, 21.0]
    summary = confusion_summary(true, pred, [2, 0], classes, top=2)
    assert summary.to_dict("records") == [
        {"class": 2, "centroid_lat": 43.123, "centroid_lng": 17.0, "n": 1, "accuracy": 0.0,
         "predicted as": "1 (44.50, 15.25): 1"},
        {"class": 0, "centroid_lat": 45.0, "centroid_lng": 16.0, "n": 4, "accuracy": 0.5,
         "predicted as": "0 (45.00, 16.00): 2; 1 (44.50, 15.25): 1"},
    ]
    # printed: each class next to its cell's centroid, accuracy as a percentage
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in confusion_text(summary).splitlines()]
    assert rows[0] == ["class", "centroid (lat, lng)", "n", "accuracy", "predicted as: class (lat, lng): n"]
    assert rows[2] == ["2", "43.12, 17.00", "1", "0.0%", "1 (44.50, 15.25): 1"]
    assert rows[3] == ["0", "45.00, 16.00", "4", "50.0%", "0 (45.00, 16.00): 2; 1 (44.50, 15.25): 1"]


@pytest.fixture
def errors():
    lat = np.array([45.0, 45.5, 43.5, 44.0, 46.0])
    lng = np.array([15.0, 16.0, 16.5, 15.5, 17.0])
    shift = np.array([0.0, 0.2, 1.0, 0.5, 0.05])  # degrees north
    return pd.DataFrame({"uuid": list("abcde"), "true_lat": lat, "true_lng": lng, "pred_lat": lat + shift,
                         "pred_lng": lng, "error_km": shift * KM_PER_DEG_LAT})


def test_error_map_writes_a_png(tmp_path, errors):
    path = error_map(errors, tmp_path / "figs" / "error_map.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400
    assert [p.name for p in path.parent.iterdir()] == ["error_map.png"]  # no temporary file left behind


def test_error_map_has_a_legend_for_both_markers_and_large_prediction_crosses(errors):
    figure = error_map_figure(errors)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        "true location (colour: error km)", "prediction", "true to predicted"]
    true_points, predictions = axes.collections[-2:]  # after the land and the lines
    np.testing.assert_allclose(true_points.get_offsets(), errors[["true_lng", "true_lat"]].to_numpy())
    np.testing.assert_allclose(predictions.get_offsets(), errors[["pred_lng", "pred_lat"]].to_numpy())
    assert predictions.get_sizes()[0] >= 2 * true_points.get_sizes()[0]
    assert axes.xaxis.label.get_text() == "longitude (deg)" and axes.yaxis.label.get_text() == "latitude (deg)"


def test_worst_gallery_shows_the_largest_errors_first(tmp_path, errors):
    folder = tmp_path / "c"
    folder.mkdir()
    for view in (0, 90, 180):  # 270 missing
        Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / f"{view}.jpg")
    path, shown = worst_gallery(errors, {"c": folder}, tmp_path / "worst.png", n=3)
    assert shown["uuid"].tolist() == ["c", "d", "b"]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.height > image.width / 2  # three rows of thumbnails
    # as src.analyze writes it: a JPEG, the same size in pixels and much smaller (the photos do not compress
    # well as PNG: 1.9 MB against 0.37 MB for the demo set's 8 worst)
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for view in (0, 90, 180, 270):
        Image.fromarray(noisy).save(folder / f"{view}.jpg")
    png, _ = worst_gallery(errors, {"c": folder}, tmp_path / "noisy.png", n=3)
    jpg, _ = worst_gallery(errors, {"c": folder}, tmp_path / "noisy.jpg", n=3)
    with Image.open(png) as as_png, Image.open(jpg) as as_jpg:
        assert as_jpg.format == "JPEG" and as_jpg.size == as_png.size
    assert jpg.stat().st_size < png.stat().st_size / 2


def test_worst_gallery_maps_have_readable_degree_ticks(errors):
    figure, shown = worst_gallery_figure(errors, {}, n=2)
    figure.canvas.draw()
    maps = [row[4] for row in np.reshape(figure.axes, (2, 5))]
    for axes in maps:
        labels = [t for t in axes.get_xticklabels() + axes.get_yticklabels() if t.get_text() and t.get_visible()]
        assert labels and all(t.get_fontsize() >= 11 for t in labels)
        assert {t.get_text() for t in axes.get_xticklabels() if t.get_text()} >= {"14°E", "16°E", "18°E"}
        assert {t.get_text() for t in axes.get_yticklabels() if t.get_text()} >= {"43°N", "44°N", "45°N"}
    for axes in maps:  # every map explains its two dots
        assert [t.get_text() for t in axes.get_legend().get_texts()] == ["true", "predicted"]
    assert shown["uuid"].tolist() == ["c", "d"]


def test_oracle_errors_on_hand_made_centroids():
    locations = pd.DataFrame({"latitude": [45.0, 44.0], "longitude": [16.0, 15.0]})
    for prefix, shift in (("centroid", 0.1), ("clipped", 0.2), ("weighted", 0.0)):
        locations[f"{prefix}_lat"] = locations["latitude"] + [shift, 2 * shift]
        locations[f"{prefix}_lng"] = locations["longitude"]
    errors = oracle_errors(locations)
    np.testing.assert_allclose(errors["plain"], [0.1 * KM_PER_DEG_LAT, 0.2 * KM_PER_DEG_LAT], atol=1e-6)
    np.testing.assert_allclose(errors["clipped"], [0.2 * KM_PER_DEG_LAT, 0.4 * KM_PER_DEG_LAT], atol=1e-6)
    np.testing.assert_allclose(errors["weighted"], [0.0, 0.0], atol=1e-6)


def oracle_table(plain, clipped, weighted) -> pd.DataFrame:
    return pd.DataFrame({"spacing": [0.25, 0.5, 1.0], "plain_km": plain, "clipped_km": clipped,
                         "weighted_km": weighted})


def test_oracle_figure_keeps_coinciding_lines_visible_and_merges_identical_ones():
    # nearly equal plain and clipped: both drawn, told apart by marker and line style
    figure = oracle_ceiling_figure(oracle_table([10.0, 17.0, 28.0], [10.0, 16.9, 27.9], [11.0, 18.0, 29.0]), "test")
    axes = figure.axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert sorted(lines) == ["clipped", "plain", "weighted"]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [line.get_label() for line in axes.get_lines()]
    plain, clipped = lines["plain"], lines["clipped"]
    assert plain.get_marker() != clipped.get_marker() and plain.get_linestyle() != clipped.get_linestyle()
    assert plain.get_markersize() > clipped.get_markersize() and plain.get_markerfacecolor() == "none"
    assert clipped.get_zorder() > plain.get_zorder()  # the thin dashed line on top of the wide pale one
    plt.close(figure)
    # identical values: one line, one legend entry naming both
    figure = oracle_ceiling_figure(oracle_table([10.0, 17.0, 28.0], [10.0, 17.0, 28.0], [11.0, 18.0, 29.0]), "test")
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["weighted", "clipped = plain (same values)"]
    assert len(axes.get_lines()) == 2
    plt.close(figure)


def write_dataset(folder, points):
    """A LUMEN dataset of tiny grey views at the given (lat, lng) points."""
    rows = []
    for i, (lat, lng) in enumerate(points):
        uuid = f"loc{i}"
        (folder / "data" / uuid).mkdir(parents=True)
        for view in (0, 90, 180, 270):
            Image.new("RGB", (16, 16), (120, 120, 120)).save(folder / "data" / uuid / f"{view}.jpg")
        rows.append((uuid, lat, lng))
    pd.DataFrame(rows, columns=["uuid", "latitude", "longitude"]).to_csv(folder / "data.csv", index=False)
    return folder


def test_oracle_ceiling_on_a_hand_made_grid(tmp_path):
    # 0.5 degree cells start at Croatia's lower-left bound (13.501935 E, 42.415929 N); the cells
    # 16.00-16.50 E x 45.42-45.92 N and 16.50-17.00 E x 45.42-45.92 N lie entirely on Croatian land.
    lng0, lat0 = 13.501935 + 5 * 0.5, 42.415929 + 6 * 0.5
    a, b = (lat0 + 0.10, lng0 + 0.10), (lat0 + 0.20, lng0 + 0.10)  # two train points 0.1 degree apart
    c = (lat0 + 0.30, lng0 + 0.80)  # alone in the next cell east
    enriched = enrich([write_dataset(tmp_path / "hand", [a, b, c])], spacing=0.5, fractions=(1.0, 0.0, 0.0),
                      progress=False)
    cells = enriched.grid.cells.loc[enriched.classes["cell"]]
    # precondition: both class cells are whole squares of land, so the plain centroid is the square's centre
    assert np.allclose(shapely.area(cells["land"].to_numpy()), cells.to_crs("EPSG:3766").geometry.area, rtol=1e-6)
    table = oracle_ceiling(enriched, [0.5, 0.05], split="all")
    coarse = table.set_index("spacing").loc[0.5]
    # weighted: a and b are each half their 0.1 degree separation from their mean; c is its own mean
    assert coarse["weighted_km"] == pytest.approx((2 * 0.05 * KM_PER_DEG_LAT + 0) / 3, rel=2e-3)
    # plain = clipped: distance to the centre of each point's square (a projected square's centroid is within
    # a few hundred metres of the centre in degrees)
    centre = [(lat0 + 0.25, lng0 + 0.25), (lat0 + 0.25, lng0 + 0.25), (lat0 + 0.25, lng0 + 0.75)]
    expected = np.mean([haversine_km(*p, *q) for p, q in zip((a, b, c), centre)])
    assert coarse["plain_km"] == pytest.approx(expected, abs=0.3)
    assert coarse["clipped_km"] == pytest.approx(coarse["plain_km"], abs=1e-9)
    assert (coarse["classes"], coarse["locations"]) == (2, 3)
    # with 0.05 degree cells every point is alone in its class: the weighted oracle is exact
    fine = table.set_index("spacing").loc[0.05]
    assert fine["classes"] == 3 and fine["weighted_km"] == pytest.approx(0.0, abs=1e-6)


def test_cli_on_an_oracle_submission(demo_dir, tmp_path, capsys):
    """Predicting every test location at its true class's weighted centroid: 100% class accuracy and the
    weighted oracle's mean km."""
    locations = enrich([demo_dir], spacing=0.5, seed=0, progress=False).locations
    test = locations[locations["split"] == "test"]
    submission = tmp_path / "oracle.csv"
    test[["uuid", "weighted_lat", "weighted_lng"]].set_axis(["uuid", "latitude", "longitude"], axis=1).to_csv(
        submission, index=False)
    figures, tables = tmp_path / "figures", tmp_path / "tables"
    out = analyze_main(["--dataset-dirs", str(demo_dir), "--submission", str(submission), "--spacings", "0.5", "1",
                        "--worst", "3", "--figures-dir", str(figures), "--tables-dir", str(tables)])
    printed = capsys.readouterr().out
    oracle = out["oracle"].set_index("spacing")
    assert out["stats"]["mean_km"] == pytest.approx(oracle.loc[0.5, "weighted_km"], abs=1e-6)
    assert out["class_accuracy"] == 1.0 and (out["per_class"]["accuracy"] == 1.0).all()
    assert out["per_class"]["n"].sum() == len(test)
    assert "oracle ceiling" in printed and "class accuracy" in printed
    # the confusion table names each class with its cell's centroid
    first = out["per_class"].iloc[0]
    assert f"| {first['centroid_lat']:.2f}, {first['centroid_lng']:.2f}" in printed
    # the km statistics in the shared format (src.geo.km_table); accuracies as percentages
    row = next(line for line in printed.splitlines() if line.startswith("| oracle.csv"))
    assert [c.strip() for c in row.strip("|").split("|")][:3] == ["oracle.csv", str(len(test)),
                                                                  f"{out['stats']['mean_km']:.1f}"]
    confusion_rows = [line for line in printed.splitlines() if line.startswith("|") and "predicted as" not in line]
    assert any("| 100.0%" in line for line in confusion_rows)
    assert sorted(p.name for p in figures.iterdir()) == ["oracle_ceiling.png", "oracle_error_map.png",
                                                         "oracle_worst.jpg"]
    assert sorted(p.name for p in tables.iterdir()) == ["oracle_ceiling.csv", "oracle_confusion.csv",
                                                        "oracle_errors.csv", "oracle_per_class.csv"]
    # a submission that misses test locations is an error, unless --allow-missing
    test.head(3)[["uuid", "latitude", "longitude"]].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(UserError, match="uuid sets differ"):
        analyze_main(["--dataset-dirs", str(demo_dir), "--submission", str(tmp_path / "short.csv"),
                      "--spacings", "0.5", "--figures-dir", str(figures), "--tables-dir", str(tables)])


def test_cli_takes_the_locations_of_a_checkpoints_run(demo_dir, tmp_path, capsys):
    """Without --dataset-dirs the run's data flags come from the checkpoint (a non-default --split too): the
    analysed test split is the one the checkpoint recorded, and the errors agree with src.score."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_main(["--approach", "regression", "--dataset-dirs", str(demo_dir), "--backbone", "tiny",
                    "--no-pretrained", "--epochs", "1", "--image-size", "32", "--spacing", "1.0", "--seed", "3",
                    "--split", "0.6", "0.2", "0.2", "--num-workers", "0", "--out-dir", str(tmp_path / "reports"),
                    "--cache-dir", str(tmp_path / "cache")])
    checkpoint = printed.getvalue().splitlines()[-1].removeprefix("checkpoint: ")
    submission = tmp_path / "sub.csv"
    predict_main(["--checkpoint", checkpoint, "--out", str(submission), "--num-workers", "0"])
    capsys.readouterr()
    out = analyze_main(["--checkpoint", checkpoint, "--submission", str(submission), "--spacings", "1.0",
                        "--worst", "2", "--figures-dir", str(tmp_path / "f"), "--tables-dir", str(tmp_path / "t")])
    err = capsys.readouterr().err
    # the first line names the run and checkpoint used; the run's own locations.csv is reused (no dataset dir
    # re-read, the exact split of the run)
    run = Path(checkpoint).parent.parent
    saved = run / "locations.csv"
    assert err.splitlines()[0].startswith(f"run {run}, checkpoint {Path(checkpoint).name} (--checkpoint); ")
    assert f"--locations {saved} --spacing 1.0 --seed 3" in err and "warning: --submission" not in err
    test_uuids = [u for u, _ in read_test_locations(checkpoint)]
    assert out["errors"]["uuid"].tolist() == test_uuids
    assert out["oracle"]["locations"].tolist() == [len(test_uuids)]
    truth = pd.read_csv(demo_dir / "data.csv")
    _, stats = score_files(submission, write_truth(truth[truth["uuid"].isin(test_uuids)], tmp_path / "truth.csv"))
    assert out["stats"]["mean_km"] == pytest.approx(stats["mean_km"], abs=1e-9)
    # a second run (another seed: another test split) is now the newest: analysing the first run's submission
    # by default names the run used on the first line and warns that the submission is the other run's test split
    with contextlib.redirect_stdout(io.StringIO()) as second:
        train_main(["--approach", "regression", "--dataset-dirs", str(demo_dir), "--backbone", "tiny",
                    "--no-pretrained", "--epochs", "1", "--image-size", "32", "--spacing", "1.0", "--seed", "4",
                    "--num-workers", "0", "--out-dir", str(tmp_path / "reports"), "--cache-dir", str(tmp_path / "cache")])
    newest = Path(second.getvalue().splitlines()[-1].removeprefix("checkpoint: ")).parent.parent
    capsys.readouterr()
    with pytest.raises(UserError, match="uuid sets differ"):
        analyze_main(["--reports-dir", str(tmp_path / "reports"), "--submission", str(submission), "--spacings", "1.0",
                      "--figures-dir", str(tmp_path / "f"), "--tables-dir", str(tmp_path / "t")])
    lines = capsys.readouterr().err.splitlines()
    assert newest != run and lines[0].startswith(f"run {newest}, checkpoint ")
    assert f"(the newest run under {tmp_path / 'reports'}; choose another with --checkpoint)" in lines[0]
    assert lines[1] == (f"warning: --submission {submission}: its {len(test_uuids)} uuids are the test split of the "
                        f"run {run}, not of the run analysed ({newest}); to analyse it against its own run pass "
                        f"--checkpoint {checkpoint}")
    # a submission of other locations analysed against the default (newest) run: say so, suggest --checkpoint
    foreign = write_truth(truth.assign(uuid="x" + truth["uuid"]).head(5), tmp_path / "foreign.csv")
    with pytest.raises(UserError) as error:
        analyze_main(["--reports-dir", str(tmp_path / "reports"), "--submission", str(foreign), "--spacings", "1.0",
                      "--figures-dir", str(tmp_path / "f"), "--tables-dir", str(tmp_path / "t")])
    message = str(error.value)
    assert "none of its 5 uuids is among the" in message and "pass the --checkpoint of the run" in message
    assert checkpoint in message and "--allow-missing" not in message


def write_truth(frame: pd.DataFrame, path):
    frame.to_csv(path, index=False)
    return path
