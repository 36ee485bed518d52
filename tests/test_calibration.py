"""Calibrated confidence (src.evaluation.calibration): the temperature fit, the confidence radii against hand
computations, ensembles, the checkpoint entry, the reliability check."""

import io

import numpy as np
import pytest
import torch

from src.evaluation.calibration import (Calibration, Details, Labelled, Member, Reliability, confidence_radii,
                                        coverage, cross_fitted, details_columns, fit_calibration, fit_temperature,
                                        kept_residuals, mass_within, prediction_details, temperature_scaled,
                                        variant_details)

KM = 1000.0  # metres


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_the_fit_recovers_a_known_temperature(true_temperature):
    """Labels drawn from softmax(z / T): the NLL fit over z finds T again."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 10, generator=generator)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, dim=1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)
    # the minimum it found is the NLL's: a step either side is worse
    fitted = fit_temperature(logits, labels)
    nll = [float(torch.nn.functional.cross_entropy(logits / t, labels)) for t in (0.97 * fitted, fitted, 1.03 * fitted)]
    assert nll[1] < nll[0] and nll[1] < nll[2]


def test_the_fit_stays_in_its_bounds_and_needs_data():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert fit_temperature(logits, torch.tensor([0, 1])) == pytest.approx(0.05, rel=1e-3)  # always right: sharpen
    assert fit_temperature(logits, torch.tensor([1, 0])) == pytest.approx(20.0, rel=1e-3)  # always wrong: flatten
    assert fit_temperature(torch.empty(0, 2), torch.empty(0, dtype=torch.long)) == 1.0


def test_the_fit_pools_models_with_other_classes():
    """Two folds' logits over 6 and 9 classes, both drawn at T = 1.8: the pooled fit finds it."""
    generator = torch.Generator().manual_seed(2)
    logits = [3 * torch.randn(8000, classes, generator=generator) for classes in (6, 9)]
    labels = [torch.multinomial(torch.softmax(z / 1.8, dim=1), 1, generator=generator).squeeze(1) for z in logits]
    assert fit_temperature(logits, labels) == pytest.approx(1.8, rel=0.05)


def test_scaling_probabilities_equals_scaling_the_logits():
    logits = torch.randn(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
    for temperature in (0.3, 1.0, 4.0):
        expected = torch.softmax(logits / temperature, dim=1).numpy()
        np.testing.assert_allclose(temperature_scaled(torch.softmax(logits, 1).numpy(), temperature), expected,
                                   rtol=1e-9, atol=1e-15)
    # a class with probability 0 keeps 0
    assert temperature_scaled(np.array([[0.0, 0.2, 0.8]]), 2.0)[0, 0] == 0.0


def test_radii_of_a_hand_made_example():
    """Point at the origin; classes 10 km east (0.3), 20 km north (0.3) and 50 km west (0.4): the 50% disc reaches
    the second class, the 90% disc the third; a level held exactly (60% within 20 km) needs the next class."""
    class_xy = np.array([[10 * KM, 0.0], [0.0, 20 * KM], [-50 * KM, 0.0]])
    probabilities = np.array([[0.3, 0.3, 0.4], [0.0, 0.0, 1.0]])
    point = np.zeros((2, 2))
    radii = confidence_radii(probabilities, class_xy, point, levels=(0.25, 0.5, 0.6, 0.9))
    np.testing.assert_allclose(radii[0], [10.0, 20.0, 50.0, 50.0])
    np.testing.assert_allclose(radii[1], [50.0, 50.0, 50.0, 50.0])
    # a class's mass spread over its samples: 4 points 5, 15, 25 and 35 km east of the point, a quarter each
    samples = np.array([[[5 * KM, 0.0], [15 * KM, 0.0], [25 * KM, 0.0], [35 * KM, 0.0]]])
    np.testing.assert_allclose(confidence_radii(np.array([[1.0]]), samples, np.zeros((1, 2)), (0.4, 0.9)),
                               [[15.0, 35.0]])
    # around a point 2 km east and 4 km north of the origin the samples lie 5, hypot(13, 4), ... km away
    shifted = confidence_radii(np.array([[1.0]]), samples, np.array([[2 * KM, 4 * KM]]), (0.2, 0.45))
    np.testing.assert_allclose(shifted, [[5.0, np.hypot(13.0, 4.0)]])


def test_an_ensemble_mixes_classification_and_regression_members():
    """Half the mass: a class 30 km east of the point; half: a regression member's residuals 10, 20, 40, 80 km
    north of its own point (which lies 0 km from the final point)."""
    classification = Member(Calibration(1.0, 10, class_samples=np.array([[[30 * KM, 0.0]]])), np.array([[1.0]]),
                            np.zeros((1, 2)), cells=np.array([7]), grid=("grid", 0.5, False))
    residuals = np.array([[0.0, 10 * KM], [0.0, 20 * KM], [0.0, 40 * KM], [0.0, 80 * KM]])
    regression = Member(Calibration(fitted_on=4, residuals_m=residuals), None, np.zeros((1, 2)))
    details = prediction_details([classification, regression], np.zeros((1, 2)), levels=(0.2, 0.5, 0.8, 0.9))
    # sorted masses: 10 (1/8), 20 (1/8), 30 (1/2), 40 (1/8), 80 (1/8)
    np.testing.assert_allclose(details.radii[0], [20.0, 30.0, 40.0, 80.0])
    assert details.calibrated and details.top1[0] == pytest.approx(1.0) and details.top_cells[0].tolist() == [7]
    # a regression member without residuals (an old checkpoint): no radii, and uncalibrated
    old = Member(Calibration(), None, np.zeros((1, 2)))
    details = prediction_details([old], np.zeros((1, 2)))
    assert np.isnan(details.radii).all() and not details.calibrated and np.isnan(details.top1).all()
    assert details_columns(details) == {"radius50_km": [""], "radius90_km": [""], "top1_probability": [""],
                                        "top": [""]}


def test_top_cells_average_the_members_on_one_grid_by_cell_id():
    grid = ("grid", 0.5, False)
    a = Member(Calibration(2.0, 5, np.zeros((2, 1, 2))), np.array([[0.8, 0.2]]), np.zeros((1, 2)),
               cells=np.array([4, 9]), grid=grid)
    b = Member(Calibration(1.0, 5, np.zeros((2, 1, 2))), np.array([[0.5, 0.5]]), np.zeros((1, 2)),
               cells=np.array([9, 11]), grid=grid)
    other = Member(Calibration(1.0, 5, np.zeros((1, 1, 2))), np.array([[1.0]]), np.zeros((1, 2)),
                   cells=np.array([4]), grid=("grid", 1.0, False))
    details = prediction_details([a, b, other], np.zeros((1, 2)), top=2)
    p4, p9 = 0.8 ** 0.5 / (0.8 ** 0.5 + 0.2 ** 0.5), 0.2 ** 0.5 / (0.8 ** 0.5 + 0.2 ** 0.5)  # a at T = 2
    expected = sorted([(p4 / 2, 4), ((p9 + 0.5) / 2, 9), (0.25, 11)], reverse=True)[:2]
    assert details.top_cells[0].tolist() == [cell for _, cell in expected]
    np.testing.assert_allclose(details.top_probabilities[0], [p for p, _ in expected])
    assert details_columns(details)["top"] == [";".join(f"{c}:{p:.4f}" for p, c in expected)]
    assert details.temperatures == [2.0, 1.0, 1.0]
    # no cells listed: the top cell's probability all the same
    listless = prediction_details([a, b], np.zeros((1, 2)), top=0)
    assert listless.top_cells.shape == (1, 0) and listless.top1[0] == pytest.approx(expected[0][0])


def test_the_checkpoint_entry_round_trips_through_a_weights_only_load():
    calibration = Calibration(1.7, 42, np.arange(12.0).reshape(2, 3, 2), np.ones((5, 2)))
    buffer = io.BytesIO()
    torch.save({"calibration": calibration.to_checkpoint()}, buffer)
    buffer.seek(0)
    loaded = Calibration.from_checkpoint(torch.load(buffer, weights_only=True)["calibration"])
    assert (loaded.temperature, loaded.fitted_on, loaded.calibrated) == (1.7, 42, True)
    np.testing.assert_array_equal(loaded.class_samples, calibration.class_samples)
    np.testing.assert_array_equal(loaded.residuals_m, calibration.residuals_m)
    default = Calibration(class_samples=np.zeros((2, 1, 2)))
    assert Calibration.from_checkpoint(None, default) is default and not default.calibrated


def test_kept_residuals_keep_the_quantiles_of_their_lengths():
    rng = np.random.default_rng(0)
    residuals = rng.normal(size=(10_000, 2)) * 20 * KM
    kept = kept_residuals(residuals, limit=500)
    lengths, kept_lengths = np.hypot(*residuals.T), np.hypot(*kept.T)
    assert len(kept) == 500 and kept_lengths.max() == lengths.max() and kept_lengths.min() == lengths.min()
    np.testing.assert_allclose(np.quantile(kept_lengths, [0.5, 0.9]), np.quantile(lengths, [0.5, 0.9]), rtol=0.01)
    assert kept_residuals(residuals[:10]).shape == (10, 2)


def test_coverage_and_the_reliability_summary():
    radii = np.array([[10.0, 30.0], [10.0, 30.0], [5.0, 50.0], [1.0, 2.0]])
    error = np.array([9.0, 10.0, 20.0, 3.0])
    np.testing.assert_allclose(coverage(radii, error), [0.5, 0.75])  # an error equal to the radius is inside

    def details(radii: np.ndarray, temperatures=()) -> Details:
        return Details((0.5, 0.9), radii, np.full((len(radii), 0), -1), np.full((len(radii), 0), np.nan),
                       np.full(len(radii), np.nan), True, list(temperatures))

    # two folds of two locations each, pooled
    folds = [{"calibrated": details(radii[:2], [1.3]), "uncalibrated": details(radii[:2] / 2)},
             {"calibrated": details(radii[2:], [0.7]), "uncalibrated": details(radii[2:] / 2)}]
    reliability = Reliability.of(folds, error)
    summary = reliability.summary()
    assert (summary["inside_50"], summary["inside_90"], summary["inside_50_uncalibrated"]) == (0.5, 0.75, 0.0)
    assert summary["median_radius90_km"] == 30.0 and summary["temperatures"] == [1.3, 0.7]
    assert reliability.describe_temperatures() == "temperatures 0.70 to 1.30"
    table = reliability.table().splitlines()
    assert table[0].split("|")[1:-1] == [" region   ", "   true location inside ", "   uncalibrated ",
                                         "   median radius "]
    assert "50.0%" in table[2] and "0.0%" in table[2] and "75.0%" in table[3] and "30.0 km" in table[3]


def cloud_member(samples: np.ndarray, n: int) -> Member:
    """One class whose mass lies on `samples` [M, 2], predicted at the origin for `n` locations."""
    return Member(Calibration(class_samples=samples[None]), np.ones((n, 1)), np.zeros((n, 2)), cells=np.array([0]))


def test_the_level_map_makes_an_over_dispersed_distribution_honest():
    """The model spreads its mass like a 30 km normal cloud, the truth lies like a 10 km one: the 50% disc of the
    raw distribution holds almost every true location; with the level map fitted on 1000 val locations, 50% and
    90% of 2000 new ones."""
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(4096, 2)) * 30 * KM
    val, test = rng.normal(size=(1000, 2)) * 10 * KM, rng.normal(size=(2000, 2)) * 10 * KM
    model = cloud_member(samples, len(val))
    fitted = fit_calibration(model.calibration, [Labelled(model.calibration, torch.zeros(len(val), 1),
                                                          torch.zeros(len(val), dtype=torch.long), model.xy,
                                                          np.zeros((len(val), 2)), val)])
    assert fitted.fitted_on == 1000 and len(fitted.pit) == 1000 and np.all(np.diff(fitted.pit) >= 0)
    # the mass share of the 50% region: the cloud's share within the 501st of the 1000 val distances
    median_m = np.sort(np.hypot(*val.T))[500]
    assert fitted.mass_levels([0.5])[0] == (np.hypot(*samples.T) <= median_m).mean()
    found = variant_details([Member(fitted, np.ones((len(test), 1)), np.zeros((len(test), 2)), cells=np.array([0]))],
                            np.zeros((2000, 2)), levels=(0.5, 0.9))
    error = np.hypot(*test.T) / KM
    np.testing.assert_allclose(coverage(found["calibrated"].radii, error), [0.5, 0.9], atol=0.04)
    assert coverage(found["uncalibrated"].radii, error)[0] > 0.95
    # the calibrated 50% disc holds just more than the share the map chose: one sample more
    shares = mass_within(cloud_member(samples, 3), np.zeros((3, 2)), found["calibrated"].radii[:3, 0])
    np.testing.assert_allclose(shares, fitted.mass_levels([0.5])[0] + 1 / 4096)


def test_a_small_val_split_maps_levels_by_rank_and_cross_fitting_uses_the_other_folds():
    pit = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    calibration = Calibration(fitted_on=9, pit=pit)
    # the ceil((n + 1) a)-th smallest of n = 9: a = 0.5 -> 5th, a = 0.9 -> 9th, a = 0.95 -> past the last: the last
    np.testing.assert_allclose(calibration.mass_levels([0.05, 0.5, 0.9, 0.95]), [0.1, 0.5, 0.9, 0.9])
    np.testing.assert_allclose(Calibration().mass_levels([0.5, 0.9]), [0.5, 0.9])  # no map: the levels
    # regression folds: each fold's residuals come from the others' out-of-fold predictions
    rng = np.random.default_rng(1)
    parts = []
    for size in (5, 7, 9):
        xy, true = rng.normal(size=(size, 2)) * KM, rng.normal(size=(size, 2)) * 20 * KM
        parts.append(Labelled(Calibration(), None, None, xy, xy, true))
    fitted = cross_fitted([Calibration()] * 3, parts)
    assert [c.fitted_on for c in fitted] == [16, 14, 12] and all(c.calibrated for c in fitted)
    np.testing.assert_allclose(fitted[0].residuals_m, np.concatenate([p.true_xy - p.xy for p in parts[1:]]))
    assert np.array_equal(fitted[1].pit, fit_calibration(Calibration(), [parts[0], parts[2]]).pit)
