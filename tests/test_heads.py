"""Head building blocks: prediction rules (hand-computed cases, brute force), haversine label
smoothing (hand-computed targets, tau = 0 is cross-entropy), view fusion (order (in)variance) and the
hybrid head (hand-made tensors)."""

import math

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from torch.nn import functional as F

from src.core.geo import EARTH_RADIUS_KM
from src.model.heads import AttentionFusion, ConcatFusion, HybridHead, MeanFusion, class_radius_m, create_fusion, geometric_median_xy, haversine_smoothing_loss, haversine_smoothing_targets, hybrid_loss, hybrid_points, hybrid_targets, point_by_rule, top_probabilities, weighted_centroid_xy
from src.core.choices import FUSIONS

KM = 1000.0
LINE = torch.tensor([[0.0, 0.0], [10 * KM, 0.0], [20 * KM, 0.0]], dtype=torch.float64)  # three collinear centroids


def expected_distance(point: torch.Tensor, weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """sum_i w_i |point - p_i| for points [..., 2]."""
    return (weights * (point.unsqueeze(-2) - points).norm(dim=-1)).sum(-1)


def test_median_of_collinear_points_is_the_point_holding_most_weight():
    # on a line the geometric median is the weighted median: the point whose weight reaches half
    probabilities = torch.tensor([[0.1, 0.7, 0.2], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    median = point_by_rule("median", probabilities, LINE)
    torch.testing.assert_close(median, LINE[[1, 2, 0]], atol=0.01, rtol=0)
    # the mean is pulled towards the others: 0.1*0 + 0.7*10 + 0.2*20 = 11 km
    torch.testing.assert_close(point_by_rule("mean", probabilities, LINE)[0],
                               torch.tensor([11 * KM, 0.0], dtype=torch.float64))


def test_median_of_a_symmetric_square_is_its_centre():
    square = torch.tensor([[0.0, 0.0], [4 * KM, 0.0], [0.0, 4 * KM], [4 * KM, 4 * KM]], dtype=torch.float64)
    median = geometric_median_xy(torch.full((1, 4), 0.25), square)
    torch.testing.assert_close(median, torch.tensor([[2 * KM, 2 * KM]], dtype=torch.float64), atol=1e-6, rtol=0)


def test_median_leaves_a_centroid_it_starts_on_when_that_centroid_is_not_optimal():
    # the weighted mean (the start) is exactly centroid 0 at (0, 0); the optimum is centroid 2 (weight 0.6 > 1/2)
    points = torch.tensor([[0.0, 0.0], [0.0, 10 * KM], [0.0, -5 * KM]], dtype=torch.float64)
    probabilities = torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64)
    assert torch.equal(weighted_centroid_xy(probabilities, points), torch.zeros(1, 2, dtype=torch.float64))
    median = geometric_median_xy(probabilities, points)
    assert torch.isfinite(median).all()
    torch.testing.assert_close(median, points[2:3], atol=0.01, rtol=0)
    # and stays on a centroid it starts on when that centroid is the optimum (weight 0.5 >= pull of the rest)
    stay = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    points_stay = torch.tensor([[0.0, 0.0], [0.0, 10 * KM], [0.0, -10 * KM]], dtype=torch.float64)
    assert torch.equal(geometric_median_xy(stay, points_stay), torch.zeros(1, 2, dtype=torch.float64))


def test_median_matches_a_brute_force_grid_search():
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(7, 2, generator=generator, dtype=torch.float64) * 100 * KM
    probabilities = torch.rand(5, 7, generator=generator, dtype=torch.float64) ** 3
    weights = probabilities / probabilities.sum(1, keepdim=True)
    median = geometric_median_xy(probabilities, points)
    axis = torch.linspace(0, 100 * KM, 401, dtype=torch.float64)  # 250 m steps
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    for row in range(len(weights)):
        costs = expected_distance(grid, weights[row], points)
        best = grid[costs.argmin()]
        found = expected_distance(median[row], weights[row], points)
        assert found <= costs.min() + 1e-6  # never worse than the best grid point
        assert (median[row] - best).norm() < 500  # and within a grid step or two of it
        assert found < expected_distance(weighted_centroid_xy(weights[row:row + 1], points)[0], weights[row], points)


def test_median_of_a_location_does_not_depend_on_its_batch():
    """Each location stops at its own convergence: alone or beside locations that converge later, its point is
    bit-identical, and within the tolerance of the fixed-step (ONNX) point."""
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(6, 9, 2, generator=generator, dtype=torch.float64) * 300 * KM
    probabilities = torch.rand(6, 9, generator=generator, dtype=torch.float64) ** 4
    batch = geometric_median_xy(probabilities, points)
    for row in range(6):
        alone = geometric_median_xy(probabilities[row:row + 1], points[row:row + 1])
        assert torch.equal(alone[0], batch[row])
    fixed = geometric_median_xy(probabilities, points, fixed_steps=True)
    assert (fixed - batch).norm(dim=1).max() < 0.01  # metres


def test_mode_and_topk():
    probabilities = torch.tensor([[0.1, 0.5, 0.4], [0.45, 0.1, 0.45]])
    torch.testing.assert_close(point_by_rule("mode", probabilities, LINE), LINE[[1, 0]])
    renormalised = top_probabilities(probabilities, topk=2)
    torch.testing.assert_close(renormalised[0], torch.tensor([0.0, 5 / 9, 4 / 9]))
    # top-1 median and mean are the most likely centroid; top-2 mean on the first row: 5/9*10 + 4/9*20 km
    torch.testing.assert_close(point_by_rule("median", probabilities[:1], LINE, topk=1), LINE[1:2])
    torch.testing.assert_close(point_by_rule("mean", probabilities[:1], LINE, topk=2)[0, 0],
                               torch.tensor(130 * KM / 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="median"):
        point_by_rule("centre", probabilities, LINE)


# ---- haversine label smoothing --------------------------------------------------------------------
KM_PER_DEGREE = math.pi * EARTH_RADIUS_KM / 180  # along a meridian


def test_smoothed_targets_follow_the_hand_computed_distances():
    lat, lng = torch.tensor([45.0], dtype=torch.float64), torch.tensor([16.0], dtype=torch.float64)
    class_lat = torch.tensor([45.0, 45.1, 45.3], dtype=torch.float64)
    class_lng = torch.tensor([16.0, 16.0, 16.0], dtype=torch.float64)
    targets = haversine_smoothing_targets(lat, lng, class_lat, class_lng, tau_km=10.0)
    distances = [0.0, 0.1 * KM_PER_DEGREE, 0.3 * KM_PER_DEGREE]  # 0, 11.12, 33.36 km
    unnormalised = [math.exp(-d / 10.0) for d in distances]
    expected = torch.tensor([u / sum(unnormalised) for u in unnormalised], dtype=torch.float64)
    torch.testing.assert_close(targets[0], expected, atol=1e-9, rtol=0)
    # far from every centroid: only distance differences matter (the d_min shift cancels)
    far = haversine_smoothing_targets(torch.tensor([44.9], dtype=torch.float64), lng, class_lat, class_lng, tau_km=10.0)
    torch.testing.assert_close(far[0], expected, atol=1e-6, rtol=0)


def test_tau_zero_is_exactly_cross_entropy_and_small_tau_tends_to_it():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=generator)
    lat = 45.0 + torch.rand(6, generator=generator) * 0.3
    lng = torch.full((6,), 16.0)
    class_lat, class_lng = torch.tensor([45.0, 45.1, 45.3]), torch.tensor([16.0, 16.0, 16.0])
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    assert torch.equal(haversine_smoothing_loss(logits, lat, lng, class_lat, class_lng, 0.0, labels),
                       F.cross_entropy(logits, labels))
    nearest = (lat.unsqueeze(1) - class_lat).abs().argmin(1)
    plain = haversine_smoothing_loss(logits, lat, lng, class_lat, class_lng, 0.0)
    assert torch.equal(plain, F.cross_entropy(logits, nearest))
    torch.testing.assert_close(haversine_smoothing_loss(logits, lat, lng, class_lat, class_lng, 0.01), plain)
    smooth = haversine_smoothing_loss(logits, lat, lng, class_lat, class_lng, 20.0)
    assert not torch.isclose(smooth, plain)


def test_smoothing_loss_gradient_is_softmax_minus_targets():
    logits = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
    lat, lng = torch.tensor([45.05]), torch.tensor([16.0])
    class_lat, class_lng = torch.tensor([45.0, 45.1, 45.3]), torch.tensor([16.0, 16.0, 16.0])
    haversine_smoothing_loss(logits, lat, lng, class_lat, class_lng, 15.0).backward()
    targets = haversine_smoothing_targets(lat, lng, class_lat, class_lng, 15.0).float()
    # equidistant from the first two centroids (5.56 km each): equal targets
    assert targets[0, 0] == pytest.approx(targets[0, 1].item(), abs=1e-6)
    torch.testing.assert_close(logits.grad, logits.detach().softmax(1) - targets)


# ---- view fusion ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, out_dim", [("concat", 4 * 32), ("mean", 32), ("attention", 256)])
def test_fusion_shapes_and_out_dim(name, out_dim):
    torch.manual_seed(0)
    fusion = create_fusion(name, 4, 32)
    assert fusion.out_dim == out_dim
    features = torch.randn(3, 4, 32, requires_grad=True)
    fused = fusion(features)
    assert fused.shape == (3, out_dim)
    # a random projection: the plain sum of a LayerNorm output does not depend on its input
    (fused * torch.randn(fused.shape)).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert set(FUSIONS) == {"concat", "mean", "attention"}


def test_mean_fusion_ignores_view_order_and_concat_keeps_it():
    features = torch.randn(2, 4, 8)
    permuted = features[:, [2, 0, 3, 1]]
    torch.testing.assert_close(MeanFusion(4, 8)(permuted), MeanFusion(4, 8)(features))
    torch.testing.assert_close(MeanFusion(4, 8)(features), features.mean(1))
    assert torch.equal(ConcatFusion(4, 8)(features)[:, 8:16], features[:, 1])
    assert not torch.allclose(ConcatFusion(4, 8)(permuted), ConcatFusion(4, 8)(features))


def test_attention_fusion_sees_the_headings():
    torch.manual_seed(0)
    fusion = AttentionFusion(4, 16, width=32, heads=4).eval()
    features = torch.randn(2, 4, 16)
    permuted = features[:, [1, 2, 3, 0]]  # same four views, rotated by 90 degrees
    with torch.no_grad():
        assert not torch.allclose(fusion(permuted), fusion(features), atol=1e-4)
        # without the heading embedding the block is permutation-invariant (attention + mean): the
        # headings are what tells the views apart
        fusion.heading.zero_()
        torch.testing.assert_close(fusion(permuted), fusion(features), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fusion"):
        create_fusion("max", 4, 16)


# ---- hybrid head ----------------------------------------------------------------------------------
CLASS_XY = torch.tensor([[0.0, 0.0], [100 * KM, 0.0]], dtype=torch.float64)
CLASS_RADIUS = torch.tensor([10 * KM, 20 * KM], dtype=torch.float64)


def test_class_radius_is_the_farthest_land_point_from_the_centroid():
    land = [shapely.box(0, 0, 10 * KM, 10 * KM), shapely.box(50 * KM, 0, 54 * KM, 30 * KM)]
    cells = gpd.GeoDataFrame({"land": land}, geometry=land, index=pd.Index([7, 9], name="cell"))
    table = pd.DataFrame({"cell": [9, 7], "weighted_x": [52 * KM, 2 * KM], "weighted_y": [10 * KM, 3 * KM]})
    radius = class_radius_m(table, cells)
    np.testing.assert_allclose(radius, [math.hypot(2 * KM, 20 * KM), math.hypot(8 * KM, 7 * KM)])


def test_hybrid_targets_and_decoding_by_hand():
    xy = torch.tensor([[5 * KM, -5 * KM], [110 * KM, 20 * KM]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    targets = hybrid_targets(xy, labels, CLASS_XY, CLASS_RADIUS)
    torch.testing.assert_close(targets, torch.tensor([[0.5, -0.5], [0.5, 1.0]], dtype=torch.float64))
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0]])  # most likely: cell 1, then cell 0
    offsets = torch.tensor([[[9.0, 9.0], [0.25, -0.5]], [[-1.0, 0.5], [9.0, 9.0]]])
    points = hybrid_points(offsets, CLASS_XY, CLASS_RADIUS)
    assert points.shape == (2, 2, 2)
    decoded = point_by_rule("mode", logits.softmax(dim=1), points)  # the most likely cell, moved by its offset
    torch.testing.assert_close(decoded, torch.tensor([[105 * KM, -10 * KM], [-10 * KM, 5 * KM]], dtype=torch.float64))
    # offsets equal to the targets in the right cells decode back to the true points
    perfect = torch.zeros(2, 2, 2, dtype=torch.float64)
    perfect[0, 0], perfect[1, 1] = targets[0], targets[1]
    right = torch.tensor([[2.0, 0.0], [0.0, 2.0]]).softmax(dim=1)
    torch.testing.assert_close(point_by_rule("mode", right, hybrid_points(perfect, CLASS_XY, CLASS_RADIUS)), xy)
    # the other rules weigh every cell's moved centroid: mean by hand for location 0
    p = logits.softmax(dim=1)[0].double()
    by_hand = p[0] * points[0, 0] + p[1] * points[0, 1]
    torch.testing.assert_close(point_by_rule("mean", logits.softmax(dim=1), points)[0], by_hand)


def test_hybrid_loss_is_cross_entropy_plus_the_true_cells_offset_error():
    xy = torch.tensor([[5 * KM, -5 * KM], [110 * KM, 20 * KM]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    logits = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    offsets = torch.zeros(2, 2, 2)
    offsets[0, 0] = torch.tensor([0.5, -0.5])
    offsets[1, 1] = torch.tensor([0.5, 1.0])
    cross_entropy = F.cross_entropy(logits, labels)
    torch.testing.assert_close(hybrid_loss(logits, offsets, labels, xy, CLASS_XY, CLASS_RADIUS), cross_entropy)
    offsets[1, 1, 1] = 0.5  # 0.5 short: smooth-L1 0.5 * 0.5^2 = 0.125 on one of the four coordinates
    offsets[0, 1] = 7.0  # another cell's offset does not count
    loss = hybrid_loss(logits, offsets, labels, xy, CLASS_XY, CLASS_RADIUS, offset_weight=2.0)
    torch.testing.assert_close(loss, cross_entropy + 2.0 * 0.125 / 4)


def test_hybrid_head_trains_only_the_true_cells_offsets():
    torch.manual_seed(0)
    head = HybridHead(8, 2)
    logits, offsets = head(torch.randn(2, 8))
    assert logits.shape == (2, 2) and offsets.shape == (2, 2, 2)
    assert torch.equal(offsets, torch.zeros(2, 2, 2))  # starts at the centroids
    offsets.retain_grad()
    xy = torch.tensor([[5 * KM, -5 * KM], [110 * KM, 20 * KM]], dtype=torch.float64)
    hybrid_loss(logits, offsets, torch.tensor([0, 1]), xy, CLASS_XY, CLASS_RADIUS).backward()
    assert (offsets.grad[0, 0] != 0).all() and (offsets.grad[1, 1] != 0).all()
    assert (offsets.grad[0, 1] == 0).all() and (offsets.grad[1, 0] == 0).all()
