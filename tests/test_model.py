"""GeoModel: batched views, centroid averaging, regression scaling, km metric."""

import numpy as np
import pytest
import torch

from src.core import geo
from src.model.heads import weighted_centroid_xy
from src.inference.checkpoints import load_model
from src.model.geomodel import GeoModel, scale_xy, snapped_km, unscale_xy, xy_to_km
from tests.builders import class_table, geo_model

SCALER = {"x_min": 300_000.0, "x_max": 800_000.0, "y_min": 4_700_000.0, "y_max": 5_100_000.0}
CLASSES = {
    "cell": [3, 7, 9], "n_train": [5, 2, 1],
    "weighted": [[400_000.0, 5_000_000.0], [500_000.0, 4_900_000.0], [600_000.0, 4_800_000.0]],
    "clipped": [[410_000.0, 5_010_000.0], [510_000.0, 4_910_000.0], [610_000.0, 4_810_000.0]],
    "plain": [[420_000.0, 5_020_000.0], [520_000.0, 4_920_000.0], [620_000.0, 4_820_000.0]],
}


def make_model(approach="classification", **kwargs) -> GeoModel:
    torch.manual_seed(0)
    return geo_model(approach, class_table(CLASSES, SCALER), hidden=16, **kwargs).eval()


def test_batched_views_equal_four_separate_forwards():
    model = make_model()
    views = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        batched = model(views)
        separate = torch.cat([model.backbone(views[:, v]) for v in range(4)], dim=1)  # view order 0, 90, 180, 270
        expected = model.head(separate)
    assert batched.shape == (2, 3)
    torch.testing.assert_close(batched, expected)


def test_view_order_matters():
    model = make_model()
    views = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(views), model(views[:, [1, 0, 2, 3]]))


def test_weighted_mean_of_hand_made_probabilities():
    class_xy = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 20.0]], dtype=torch.float64)
    probabilities = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    expected = torch.tensor([[2.5, 5.0], [10.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(weighted_centroid_xy(probabilities, class_xy), expected)
    # top-2: 0.5 and 0.25 renormalised to 2/3 and 1/3
    top2 = weighted_centroid_xy(probabilities[:1], class_xy, topk=2)
    torch.testing.assert_close(top2, torch.tensor([[10 / 3, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["weighted", "clipped", "plain"])
def test_confident_classifier_predicts_the_chosen_centroid(kind):
    model = make_model(centroids=kind)
    last = model.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    xy = model.locate(torch.randn(2, 4, 3, 32, 32))
    assert xy.shape == (2, 2)
    np.testing.assert_allclose(xy.numpy(), [CLASSES[kind][1]] * 2, atol=1e-3)


def test_regression_scaling_round_trip():
    xy = torch.tensor([[300_000.0, 4_700_000.0], [800_000.0, 5_100_000.0], [512_345.6, 4_987_654.3]],
                      dtype=torch.float64)
    scaled = scale_xy(xy, SCALER)
    torch.testing.assert_close(scaled[:2], torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(unscale_xy(scaled, SCALER), xy)


def test_regression_predicts_unscaled_metres():
    model = make_model("regression")
    last = model.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.5, 0.25]))
    xy = model.locate(torch.randn(3, 4, 3, 32, 32))
    np.testing.assert_allclose(xy.numpy(), [[550_000.0, 4_800_000.0]] * 3, rtol=1e-6)


def test_locate_restores_training_mode():
    model = make_model().train()
    model.locate(torch.randn(1, 4, 3, 32, 32))
    assert model.training


def test_xy_to_km_matches_haversine_on_degrees():
    lat = np.array([45.815, 45.551]); lng = np.array([15.982, 18.694])  # Zagreb, Osijek
    x, y = geo.project(lat, lng)
    predicted = torch.tensor(np.stack([x, y], axis=1)[::-1].copy())  # swapped: each predicts the other city
    km = xy_to_km(predicted, torch.tensor(lat), torch.tensor(lng))
    expected = geo.haversine_km(lat[::-1], lng[::-1], lat, lng)
    np.testing.assert_allclose(km.numpy(), expected, rtol=1e-6)
    assert 205 < km[0] < 220  # Zagreb - Osijek is about 212 km


def test_evaluation_scores_a_prediction_at_sea_from_the_nearest_land():
    # a point in the Adriatic, ~25 km off the coast, is scored as src.predict writes it: moved onto land
    sea_x, sea_y = (float(v) for v in geo.project(43.3, 15.9))
    land_x, land_y = (float(v) for v in geo.snap_to_land(sea_x, sea_y))
    assert np.hypot(land_x - sea_x, land_y - sea_y) > 5_000
    snapped, km = snapped_km(np.array([[sea_x, sea_y]]), np.array([45.815]), np.array([15.982]))
    np.testing.assert_allclose(snapped, [[land_x, land_y]])
    land_lat, land_lng = geo.unproject(land_x, land_y)
    np.testing.assert_allclose(km, geo.haversine_km(land_lat, land_lng, 45.815, 15.982), rtol=1e-9)
    # the steps' metric is the same distance from the point itself, computed on the device
    step_km = xy_to_km(torch.tensor([[sea_x, sea_y]], dtype=torch.float64), torch.tensor([45.815], dtype=torch.float64),
                       torch.tensor([15.982], dtype=torch.float64))
    np.testing.assert_allclose(step_km.numpy(), geo.haversine_km(43.3, 15.9, 45.815, 15.982), rtol=1e-9)


def test_training_and_validation_steps_make_no_host_transfer(monkeypatch):
    """On a GPU a CPU tensor logged with sync_dist breaks NCCL's all_reduce, and a host copy stalls the queue:
    the steps must neither copy to the host nor read a value back, for every approach and prediction rule."""
    cases = [("classification", "mean"), ("classification", "median"), ("classification", "mode"),
             ("hybrid", "median"), ("regression", "mean")]
    batch = {"features": torch.randn(3, 4, 64), "label": torch.tensor([0, 2, 1]),
             "xy": torch.tensor([[450_000.0, 4_990_000.0], [520_000.0, 4_910_000.0], [600_000.0, 4_800_000.0]],
                                dtype=torch.float64),
             "lat": torch.tensor([45.0, 44.3, 43.3], dtype=torch.float64),
             "lng": torch.tensor([16.0, 16.9, 17.9], dtype=torch.float64), "index": torch.arange(3)}
    for approach, rule in cases:
        classes = class_table({**CLASSES, "radius": [30_000.0] * 3}, SCALER)
        model = geo_model(approach, classes, hidden=16, predict_rule=rule, label_smoothing_km=40.0)
        logged = {}
        monkeypatch.setattr(model, "log", lambda name, value, **kwargs: logged.update({name: (value, kwargs)}))

        def forbidden(*args, **kwargs):
            raise AssertionError("host transfer inside a step")

        with monkeypatch.context() as guard:
            for name in ("cpu", "numpy", "item", "tolist", "__bool__", "__float__", "__int__"):
                guard.setattr(torch.Tensor, name, forbidden)
            loss = model.training_step(batch, 0)
            model.validation_step(batch, 0)
        assert torch.isfinite(loss)
        assert {"train/km_mean", "val/km_mean", "train/loss", "val/loss"} <= set(logged), (approach, rule)
        for name, (value, kwargs) in logged.items():
            assert isinstance(value, torch.Tensor) and value.device == model.device, name
            assert kwargs["sync_dist"] and value.dtype == torch.float32, name


def test_pretrained_is_not_saved_so_a_checkpoint_rebuilds_offline():
    model = make_model()
    assert "pretrained" not in model.hparams
    assert model.hparams.backbone == "tiny" and model.hparams.classes == CLASSES


def test_configs_round_trip_through_the_checkpoint_hparams(tmp_path):
    torch.manual_seed(0)
    classes = class_table({**CLASSES, "radius": [10_000.0, 20_000.0, 30_000.0]}, SCALER, cells="adaptive", spacing=0.3)
    model = geo_model("hybrid", classes, hidden=16, fusion="attention", predict_rule="median", lr=3e-3,
                      unfreeze_at_epoch=2)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    loaded = load_model(path, reports_dir=None)
    assert loaded.config == model.config and loaded.optim == model.optim and loaded.classes == model.classes
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_checkpoint_with_the_old_flat_hparams_still_loads(tmp_path):
    """Checkpoints written before the typed configs held the data flags and test split among the model's hparams
    and lacked later keys (normalisation, fusion, channels_last ...): they load with the defaults."""
    model = make_model("regression")
    old_keys = {"approach", "backbone", "image_size", "classes", "scaler", "centroids", "topk", "hidden", "dropout",
                "lr", "lr_finetune", "unfreeze_at_epoch", "unfreeze_blocks", "optimizer", "weight_decay",
                "scheduler", "warmup_epochs", "prior_lat", "prior_lng", "backbone_weights"}
    hparams = {k: v for k, v in model.hparams.items() if k in old_keys}
    hparams.update(seed=3, spacing=1.0, dataset_dirs=["/data/a"], test_locations=[["u1", "/data/a/data/u1"]])
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.0"}, path)
    loaded = load_model(path, reports_dir=None)
    assert loaded.config.fusion == "concat" and loaded.config.image_mean == (0.485, 0.456, 0.406)
    assert loaded.classes.spacing == 1.0 and loaded.classes.cells == "grid"
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
