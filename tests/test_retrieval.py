"""The retrieval refinement (src.inference.retrieval) against neighbour sets and geometric medians worked out by
hand."""

import numpy as np
import pytest
import torch

from src.core.errors import UserError
from src.inference.retrieval import (Gallery, checkpoint_gallery, gated_classes, neighbour_weights, refine,
                                     refine_points)


def unit(degrees) -> np.ndarray:
    """Unit 2-d embeddings at these angles: the cosine similarity of two is the cosine of their angle."""
    radians = np.radians(np.asarray(degrees, float))
    return np.column_stack([np.cos(radians), np.sin(radians)])


# six gallery locations in three classes; the query below points at 0 degrees
ANGLES = [0, 60, 10, 90, 30, 5]
LABELS = [0, 0, 1, 1, 0, 2]
XY = [[0, 0], [1000, 0], [0, 5000], [7000, 7000], [0, 1000], [3000, 3000]]
UUIDS = ["a", "b", "c", "d", "e", "f"]
QUERY = unit([0])
PROBABILITIES = np.array([[0.7, 0.2, 0.1]])


@pytest.fixture
def gallery() -> Gallery:
    return Gallery(unit(ANGLES), np.array(XY, float), np.array(LABELS), UUIDS)


def uuids(gallery, rows) -> list[str]:
    return [gallery.uuids[r] for r in rows if r >= 0]


def test_gated_classes_take_the_most_likely_up_to_the_cumulative_probability():
    p = np.array([0.1, 0.6, 0.25, 0.05])
    assert gated_classes(p, 0.0).tolist() == [1]  # always the most likely class
    assert gated_classes(p, 0.6).tolist() == [1]
    assert gated_classes(p, 0.61).tolist() == [1, 2]
    assert gated_classes(p, 0.9).tolist() == [1, 2, 0]
    assert gated_classes(p, 1.0).tolist() == [1, 2, 0, 3]


def test_neighbours_by_cosine_within_the_gated_classes(gallery):
    # gate 0.5: class 0 only (rows a, b, e); nearest first: a (cos 0 = 1), e (cos 30), b (cos 60)
    rows, similarity = gallery.neighbours(QUERY, 2, PROBABILITIES, 0.5)
    assert uuids(gallery, rows[0]) == ["a", "e"]
    np.testing.assert_allclose(similarity[0], [1.0, np.cos(np.radians(30))], atol=1e-6)
    # gate 0.8: classes 0 and 1 (0.7 + 0.2): c (10 degrees) comes before e
    rows, _ = gallery.neighbours(QUERY, 3, PROBABILITIES, 0.8)
    assert uuids(gallery, rows[0]) == ["a", "c", "e"]
    # gate 1: every class; f (5 degrees, class 2) is second
    rows, _ = gallery.neighbours(QUERY, 3, PROBABILITIES, 1.0)
    assert uuids(gallery, rows[0]) == ["a", "f", "c"]
    # regression (no probabilities): the whole gallery; fewer candidates than k leave -1 rows at the end
    rows, similarity = gallery.neighbours(QUERY, 8, None)
    assert uuids(gallery, rows[0]) == ["a", "f", "c", "e", "b", "d"] and rows[0, 6:].tolist() == [-1, -1]
    assert np.isneginf(similarity[0, 6:]).all()


def test_refined_point_is_the_weighted_geometric_median_of_the_neighbours():
    # three neighbours on a line at x = 0, 1000, 5000 m: with equal weights the geometric median is the middle one
    gallery = Gallery(unit([0, 20, 40]), np.array([[0, 0], [1000, 0], [5000, 0]], float), np.zeros(3, int),
                      ["p", "q", "r"])
    far_away = np.array([[9e5, 9e5]])
    point = refine_points(gallery, far_away, QUERY, np.array([[1.0]]), k=3, gate=1.0, weighting="uniform")
    np.testing.assert_allclose(point, [[1000, 0]], atol=0.01)
    # inverse cosine distances 1 / (1 - cos): the weighted median on a line is where half the weight is reached
    weights = 1 / (1 - np.cos(np.radians([5, 20, 40])))
    np.testing.assert_allclose(neighbour_weights(np.cos(np.radians([5, 20, 40]))[None], np.ones((1, 3), bool),
                                                 "inverse")[0], weights, rtol=1e-5)
    point = refine_points(gallery, far_away, unit([5]), None, k=3, gate=1.0, weighting="inverse")
    assert weights[0] > weights[1:].sum()  # p outweighs the others: the median sits on p
    np.testing.assert_allclose(point, [[0, 0]], atol=0.01)
    # four neighbours symmetric about (2000, 3000), equally similar in pairs: the median is the centre
    square = Gallery(unit([10, -10, 30, -30]), np.array([[1000, 3000], [3000, 3000], [2000, 2000], [2000, 4000]]),
                     np.zeros(4, int), list("wxyz"))
    point = refine_points(square, far_away, QUERY, None, k=4, gate=1.0, weighting="inverse")
    np.testing.assert_allclose(point, [[2000, 3000]], atol=0.01)


def test_a_location_without_candidates_keeps_its_point(gallery):
    probabilities = np.array([[0.05, 0.05, 0.0, 0.9]])  # class 3 has no gallery location
    xy = np.array([[123.0, 456.0]])
    np.testing.assert_array_equal(refine_points(gallery, xy, QUERY, probabilities, 5, 0.5, "inverse"), xy)


def test_refine_follows_the_hparams_and_the_state_round_trips(gallery):
    class Model:
        hparams = {"approach": "classification", "refine": "knn", "refine_k": 1, "refine_gate": 0.5}

    model = Model()
    model.gallery = Gallery.from_state(gallery.state())  # float16 embeddings, exact points and uuids
    # the rows in class order (stable): a, b, e of class 0, then c, d, then f
    assert model.gallery.uuids == gallery.uuids == ["a", "b", "e", "c", "d", "f"]
    assert model.gallery.state()["embeddings"].dtype == torch.float16
    np.testing.assert_array_equal(model.gallery.xy, np.array(XY, float)[[0, 1, 4, 2, 3, 5]])
    xy = np.array([[50.0, 50.0]])
    np.testing.assert_allclose(refine(model, xy, QUERY, PROBABILITIES), [[0, 0]], atol=1e-6)
    model.hparams = {**model.hparams, "refine": "none"}
    assert refine(model, xy, QUERY, PROBABILITIES) is xy
    assert checkpoint_gallery({}, "none", "--checkpoint", "x.ckpt") is None
    with pytest.raises(UserError, match=r"^--checkpoint x.ckpt: holds no gallery for --refine knn"):
        checkpoint_gallery({}, "knn", "--checkpoint", "x.ckpt")
