"""Building blocks of the model's head: prediction rules over class centroids, haversine label
smoothing, the fusion of the four view embeddings and the hybrid (cell + offset) head.

Prediction rules map class probabilities [B, C] and class points (EPSG:3766 metres) to points [B, 2];
the class points are the centroids [C, 2], or per location [B, C, 2] (the hybrid head's centroids moved
by their predicted offsets): `mean` (probability-weighted mean, minimises expected squared distance), `median`
(probability-weighted geometric median, minimises expected distance, i.e. expected km) and `mode`
(the most likely class's centroid). In EPSG:3766 (a conformal projection with scale error below
0.1% over Croatia) planar distance is great-circle distance to within that error.
"""

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import torch
from torch import nn
from torch.nn import functional as F

from src.core.choices import FUSIONS, PREDICT_RULES
from src.core.geo import haversine_km_torch
from src.data.config import CENTROID_PREFIX



# ---- prediction rules -----------------------------------------------------------------------------
def top_probabilities(probabilities: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """Probabilities [B, C] renormalised to sum to 1; with 0 < topk < C only the k most likely classes
    keep their probability (the rest get 0)."""
    if 0 < topk < probabilities.shape[1]:
        top = probabilities.topk(topk, dim=1)
        probabilities = torch.zeros_like(probabilities).scatter(1, top.indices, top.values)
    return probabilities / probabilities.sum(dim=1, keepdim=True)


def _per_location(class_xy: torch.Tensor, batch: int) -> torch.Tensor:
    """Class points [C, 2] or [B, C, 2] as [B, C, 2] (`batch` from .shape, not len(), so that torch.export
    keeps the batch axis symbolic)."""
    return class_xy.expand(batch, *class_xy.shape) if class_xy.dim() == 2 else class_xy


def weighted_centroid_xy(probabilities: torch.Tensor, class_xy: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """Probability-weighted mean [B, 2] of the class points ([C, 2] or [B, C, 2]); with topk > 0 only the k
    most likely classes count (their probabilities renormalised)."""
    weights = top_probabilities(probabilities.to(class_xy.dtype), topk)
    return (weights.unsqueeze(2) * _per_location(class_xy, weights.shape[0])).sum(1)


def geometric_median_xy(probabilities: torch.Tensor, class_xy: torch.Tensor, topk: int = 0,
                        max_iter: int = 100, tol_m: float = 1e-3, fixed_steps: bool = False) -> torch.Tensor:
    """Probability-weighted geometric median [B, 2] of the class points ([C, 2] or [B, C, 2]): the point
    minimising sum_i p_i * |y - c_i| (expected distance), by Weiszfeld's iteration, batched.

    Uses Vardi and Zhang's (2000) step, so an iterate landing exactly on a centroid neither divides by
    zero nor sticks there unless that centroid is the optimum (its weight >= the pull of the others).
    Starts at the weighted mean; each location stops at the first step that moves it no more than `tol_m`
    metres (so its point does not depend on the other locations of its batch), all of them after `max_iter`
    steps (always all the steps with `fixed_steps`, which needs no host synchronisation, and while it is
    exported to ONNX, so the graph computes the same point to within `tol_m`).
    """
    weights = top_probabilities(probabilities.to(torch.float64), topk)
    points = _per_location(class_xy.to(torch.float64), weights.shape[0])
    current = (weights.unsqueeze(2) * points).sum(1)
    tiny = torch.finfo(torch.float64).tiny
    span = (points.amax(dim=1) - points.amin(dim=1)).amax(dim=1, keepdim=True)  # [B, 1]
    coincide_m = 1e-9 * span.clamp_min(1.0)
    check = not (fixed_steps or torch.compiler.is_exporting() or torch.jit.is_tracing())
    moving = torch.ones(current.shape[0], 1, dtype=torch.bool, device=current.device) if check else None
    for _ in range(max_iter):
        offsets = points - current.unsqueeze(1)  # [B, C, 2]
        distance = offsets.norm(dim=2)  # [B, C]
        at_point = distance <= coincide_m
        inverse = torch.where(at_point, torch.zeros_like(distance), weights / distance.clamp_min(tiny))
        # Weiszfeld's update over the centroids the iterate does not sit on
        update = (inverse.unsqueeze(2) * points).sum(1) / inverse.sum(1, keepdim=True).clamp_min(tiny)
        pull = (inverse.unsqueeze(2) * offsets).sum(1).norm(dim=1, keepdim=True)  # |gradient of the others|
        held = (weights * at_point).sum(1, keepdim=True)  # weight of the centroid under the iterate
        keep = (held / pull.clamp_min(tiny)).clamp(max=1.0)
        stay = (pull <= held) | (inverse.sum(1, keepdim=True) == 0)
        following = torch.where(stay, current, (1 - keep) * update + keep * current)
        if check:  # a location that has converged keeps its point
            following = torch.where(moving, following, current)
            moving = moving & ((following - current).norm(dim=1, keepdim=True) > tol_m)
        current = following
        if check and not moving.any():
            break
    return current


def mode_xy(probabilities: torch.Tensor, class_xy: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """The most likely class's point [B, 2] (`topk` does not change the most likely class)."""
    best = probabilities.argmax(dim=1)
    if class_xy.dim() == 2:
        return class_xy[best]
    return class_xy[torch.arange(best.shape[0], device=best.device), best]


def point_by_rule(rule: str, probabilities: torch.Tensor, class_xy: torch.Tensor, topk: int = 0,
                  fixed_steps: bool = False) -> torch.Tensor:
    """Points [B, 2] (EPSG:3766 metres) from class probabilities [B, C] and class points ([C, 2] or
    [B, C, 2]) by `rule` (see PREDICT_RULES); `fixed_steps`: the median without a convergence test."""
    if rule == "mean":
        return weighted_centroid_xy(probabilities, class_xy, topk)
    if rule == "median":
        return geometric_median_xy(probabilities, class_xy, topk, fixed_steps=fixed_steps).to(class_xy.dtype)
    if rule == "mode":
        return mode_xy(probabilities, class_xy, topk)
    raise ValueError(f"prediction rule must be one of {PREDICT_RULES}, not {rule!r}")


# ---- haversine label smoothing --------------------------------------------------------------------
def haversine_smoothing_targets(lat: torch.Tensor, lng: torch.Tensor, class_lat: torch.Tensor,
                                class_lng: torch.Tensor, tau_km: float) -> torch.Tensor:
    """Soft targets [B, C]: t_i = exp(-(d_i - d_min) / tau) / sum_j exp(-(d_j - d_min) / tau), with d_i
    the great-circle km from the true location (lat/lng [B]) to class centroid i (class_lat/lng [C]).

    This is PIGEON's haversine smoothing (Haas et al., CVPR 2024) normalised to a distribution:
    PIGEON subtracts the distance to the true cell's centroid instead of d_min and does not normalise;
    after normalisation both subtractions cancel, leaving softmax(-d / tau). tau_km > 0.
    """
    if tau_km <= 0:
        raise ValueError("tau_km must be > 0 (use plain cross-entropy for 0)")
    distance = haversine_km_torch(lat.double().unsqueeze(1), lng.double().unsqueeze(1),
                                  class_lat.double().unsqueeze(0), class_lng.double().unsqueeze(0))
    return torch.softmax(-distance / tau_km, dim=1)  # softmax subtracts the max, i.e. d_min


def haversine_smoothing_loss(logits: torch.Tensor, lat: torch.Tensor, lng: torch.Tensor, class_lat: torch.Tensor,
                             class_lng: torch.Tensor, tau_km: float,
                             labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of `logits` [B, C] against haversine-smoothed targets.

    tau_km = 0 is plain one-hot cross-entropy: on `labels` when given (exactly F.cross_entropy), else on
    each location's nearest class centroid (the limit of the soft targets as tau -> 0).
    """
    if tau_km == 0:
        if labels is None:
            distance = haversine_km_torch(lat.double().unsqueeze(1), lng.double().unsqueeze(1),
                                          class_lat.double().unsqueeze(0), class_lng.double().unsqueeze(0))
            labels = distance.argmin(dim=1)
        return F.cross_entropy(logits, labels)
    targets = haversine_smoothing_targets(lat, lng, class_lat, class_lng, tau_km).to(logits.dtype)
    return F.cross_entropy(logits, targets)


# ---- view fusion ----------------------------------------------------------------------------------
class ViewFusion(nn.Module):
    """Maps the view embeddings [B, V, D] (views in heading order 0, 90, 180, 270) to [B, out_dim]."""

    out_dim: int


class ConcatFusion(ViewFusion):
    """The views' embeddings side by side (the reference solution's): out_dim = V * D."""

    def __init__(self, n_views: int, dim: int):
        super().__init__()
        self.out_dim = n_views * dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.flatten(1)


class MeanFusion(ViewFusion):
    """The average of the views' embeddings (PIGEON): out_dim = D, invariant to the order of the views."""

    def __init__(self, n_views: int, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=1)


class AttentionFusion(ViewFusion):
    """One pre-norm self-attention block over the views: each embedding is projected to `width`, a
    learned heading embedding is added (so the block knows which view looks where), the views attend to
    each other, and the attended tokens are averaged: out_dim = width."""

    def __init__(self, n_views: int, dim: int, width: int = 256, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.out_dim = width
        self.project = nn.Linear(dim, width)
        self.heading = nn.Parameter(torch.randn(n_views, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.out_norm = nn.LayerNorm(width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.project(features) + self.heading
        normed = self.norm(tokens)
        attended, _ = self.attention(normed, normed, normed, need_weights=False)
        return self.out_norm(tokens + attended).mean(dim=1)


def create_fusion(name: str, n_views: int, dim: int) -> ViewFusion:
    """The fusion module `name` (see FUSIONS) for `n_views` embeddings of `dim` features."""
    if name == "concat":
        return ConcatFusion(n_views, dim)
    if name == "mean":
        return MeanFusion(n_views, dim)
    if name == "attention":
        return AttentionFusion(n_views, dim)
    raise ValueError(f"fusion must be one of {FUSIONS}, not {name!r}")


# ---- hybrid head: a cell, then an offset inside it -------------------------------------------------
def class_radius_m(table: pd.DataFrame, cells: gpd.GeoDataFrame, centroids: str = "weighted") -> np.ndarray:
    """Size of each class's cell for scaling offsets [C] (metres): the largest distance from the class
    centroid to the cell's land part, so every land point of the cell has a scaled offset of length <= 1.

    `table` is `src.grid.class_table`'s (one row per class, column `cell`), `cells` the cells' table with
    its `land` polygons in EPSG:3766 (`Cells.cells`).
    """
    prefix = CENTROID_PREFIX[centroids]
    centre = shapely.points(table[f"{prefix}_x"].to_numpy(float), table[f"{prefix}_y"].to_numpy(float))
    land = cells.loc[table["cell"].to_numpy(), "land"].to_numpy()
    return np.maximum(shapely.hausdorff_distance(centre, land), 1.0)


class HybridHead(nn.Module):
    """Cell logits [B, C] and, for every cell, the offset [B, C, 2] of the point from that cell's
    centroid in units of the cell's radius (OSV-5M's hybrid head). Only the offset of the true cell is
    trained; at prediction the most likely cell's offset is used."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.logits = nn.Linear(in_features, n_classes)
        self.offsets = nn.Linear(in_features, 2 * n_classes)
        nn.init.zeros_(self.offsets.weight)  # start at the centroids
        nn.init.zeros_(self.offsets.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits(features), self.offsets(features).view(-1, self.n_classes, 2)


def hybrid_targets(xy: torch.Tensor, labels: torch.Tensor, class_xy: torch.Tensor,
                   class_radius: torch.Tensor) -> torch.Tensor:
    """Scaled offsets [B, 2] of the true points xy [B, 2] (EPSG:3766) from their class centroid."""
    return (xy.double() - class_xy[labels].double()) / class_radius[labels].double().unsqueeze(1)


def hybrid_loss(logits: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor, xy: torch.Tensor,
                class_xy: torch.Tensor, class_radius: torch.Tensor, offset_weight: float = 1.0,
                classification_loss: torch.Tensor | None = None) -> torch.Tensor:
    """Cell cross-entropy (or `classification_loss`, e.g. haversine-smoothed) + offset_weight x the
    smooth-L1 error of the true cell's predicted offset."""
    if classification_loss is None:
        classification_loss = F.cross_entropy(logits, labels)
    predicted = offsets[torch.arange(len(labels), device=labels.device), labels]
    target = hybrid_targets(xy, labels, class_xy, class_radius).to(predicted.dtype)
    return classification_loss + offset_weight * F.smooth_l1_loss(predicted, target)


def hybrid_points(offsets: torch.Tensor, class_xy: torch.Tensor, class_radius: torch.Tensor) -> torch.Tensor:
    """Per location, every class's centroid moved by its predicted offset: [B, C, 2] EPSG:3766 points, to
    which the prediction rules apply (`mode` is OSV-5M's decoding: the most likely cell, moved)."""
    return class_xy.unsqueeze(0) + offsets.to(class_xy.dtype) * class_radius.to(class_xy.dtype).view(1, -1, 1)
