"""Analysis: oracle ceiling on a hand-made grid, per-class accuracy/confusion, error map and gallery files."""

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from src.analyze import confusion_summary, error_map, per_class_accuracy, worst_gallery

EARTH_RADIUS_KM = 6371.0088
KM_PER_DEG_LAT = math.pi * EARTH_RADIUS_KM / 180


def test_per_class_accuracy_and_confusion_on_hand_made_labels():
    classes = pd.DataFrame({"cell": [10, 11, 12], "n_train": [5, 3, 1]})
    true = [0, 0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 2, 1, 0, 1]
    km = [1.0, 3.0, 50.0, 70.0, 2.0, 40.0, 90.0]
    table = per_class_accuracy(true, pred, km, classes)
    assert table["class"].tolist() == [2, 0, 1]  # accuracy 0, 0.5, 0.5 (tie broken by larger n first)
    assert table["accuracy"].tolist() == [0.0, 0.5, 0.5]
    assert table["n"].tolist() == [1, 4, 2]
    assert table["cell"].tolist() == [12, 10, 11]
    assert table["n_train"].tolist() == [1, 5, 3]
    assert table["mean_km"].tolist() == [90.0, 31.0, 21.0]
    summary = confusion_summary(true, pred, [2, 0], top=2)
    assert summary.to_dict("records") == [
        {"class": 2, "n": 1, "accuracy": 0.0, "predicted as": "1 (1)"},
        {"class": 0, "n": 4, "accuracy": 0.5, "predicted as": "0 (2), 1 (1)"},
    ]


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


def test_worst_gallery_shows_the_largest_errors_first(tmp_path, errors):
    folder = tmp_path / "c"
    folder.mkdir()
    for view in (0, 90, 180):  # 270 missing
        Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / f"{view}.jpg")
    path, shown = worst_gallery(errors, {"c": folder}, tmp_path / "worst.png", n=3)
    assert shown["uuid"].tolist() == ["c", "d", "b"]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.height > image.width / 2  # three rows of thumbnails
