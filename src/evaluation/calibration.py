"""Calibrated confidence: temperature scaling of the class probabilities, and the confidence regions of a
prediction (the radius of the smallest disc around the predicted point that holds 50% or 90% of the
predicted probability, with the level recalibrated on the val split).

A model's predictive distribution over Croatia is a set of weighted points in EPSG:3766 metres:
- classification and hybrid: each class's probability, scaled by the temperature fitted on the val split
  (softmax(logits / T), the same as p ** (1 / T) renormalised), spread evenly over `class_samples`, points
  drawn uniformly over the land part of the class's cell (`src.data.cells.class_samples`): a cell's mass lies
  over its area, not at its centroid (a disc that only reaches the centroid would count all of it or none);
- regression: the val split's residual vectors (true minus predicted position) added to the model's point;
- an ensemble: the mixture of its members' distributions, each member weighing 1 / members.
The disc of a mass share b around the final point (after the ensemble mean and the move onto land) is the one
whose radius is the distance at which the cumulative mass of the points, nearest first, reaches b. Distances
are planar in EPSG:3766, a conformal projection whose scale error is below 0.1% over Croatia.

The level map: the temperature makes the class probabilities right about the cell, not about the distance (a
model trained with label smoothing places a location within its cell better than a cell-wide spread says: on
the demo set the 50% disc of the temperature-scaled distribution held 74% of the true locations). So the val
split also gives, for each val location, the mass inside the disc that just reaches its true position (its
probability integral transform, `pit`); the region of nominal level a is the disc of mass b(a), b(a) the
ceil((n + 1) a)-th smallest of the n val values (Kuleshov et al. 2018's recalibration, with split-conformal
prediction's quantile), so that a share a of locations like the val ones lies inside.

A checkpoint written before calibration existed loads with temperature 1, no level map and its class
centroids as the only points of each class (`Calibration.fitted_on == 0`: uncalibrated, said so by predict
and serve).
"""

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tabulate import tabulate
from torch.nn import functional as F

LEVELS = (0.5, 0.9)  # the confidence regions predict and serve report
RELIABILITY_LEVELS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 5%, 10%, ..., 95%: the reliability figure
TEMPERATURE_RANGE = (0.05, 20.0)  # the temperatures the fit searches
GOLDEN_STEPS = 60  # golden-section steps over log T: the bracket shrinks by 0.618 ** 60, far below 1e-6
MAX_RESIDUALS = 2048  # regression: val residual vectors kept (evenly spaced in rank of their length)
MAX_PIT = 2048  # val locations the level map is measured on (every k-th of more): bounds its cost per validation
MASS_ROWS = 64  # locations per block when measuring masses (bounds memory: rows x classes x samples)
DETAILS_COLUMNS = ["uuid", "latitude", "longitude", "radius50_km", "radius90_km", "top1_probability", "top"]
DEFAULT_TOP = 5  # cells listed in `top`
UNCALIBRATED_NOTE = ("carries no calibration (written before src.train fitted one, or trained without a val "
                     "split): temperature 1, each class at its centroid; the radii are uncalibrated")


# ---- temperature scaling ------------------------------------------------------------------------------
def fit_temperature(logits: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor | Sequence[torch.Tensor],
                    bounds: tuple[float, float] = TEMPERATURE_RANGE) -> float:
    """The temperature T in `bounds` minimising the mean negative log-likelihood of softmax(logits / T) on
    `labels` (Guo et al. 2017), by golden-section search over log T: the NLL is convex in 1 / T, so it has one
    minimum along log T. `logits` [N, C], `labels` [N] (class indices), or lists of them (models with other
    classes, pooled); no labels give 1."""
    if isinstance(logits, torch.Tensor):
        logits, labels = [logits], [labels]
    parts = [(z.detach().double(), y.detach().long().to(z.device)) for z, y in zip(logits, labels) if len(y)]
    count = sum(len(y) for _, y in parts)
    if count == 0:
        return 1.0

    def nll(log_t: float) -> float:
        scale = math.exp(log_t)
        return sum(float(F.cross_entropy(z / scale, y, reduction="sum")) for z, y in parts) / count

    low, high = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    nll_a, nll_b = nll(a), nll(b)
    for _ in range(GOLDEN_STEPS):
        if nll_a <= nll_b:
            high, b, nll_b = b, a, nll_a
            a = high - ratio * (high - low)
            nll_a = nll(a)
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = nll(b)
    return math.exp((low + high) / 2)


def temperature_scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): probabilities [B, C] scaled by a temperature, the same as softmax(logits / T) of the
    logits they came from (computed in log space, float64; a zero stays zero)."""
    probabilities = np.asarray(probabilities, np.float64)
    if temperature == 1.0:
        return probabilities / probabilities.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        scaled = np.log(probabilities) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled)
    return weights / weights.sum(axis=1, keepdims=True)


# ---- what a checkpoint carries ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """What predict needs to turn a model's output into a predictive distribution: the temperature fitted on
    the val split, where each class's probability lies (classification, hybrid) or the val residuals
    (regression). `fitted_on`: the val locations of the fit; 0 means uncalibrated."""

    temperature: float = 1.0
    fitted_on: int = 0
    class_samples: np.ndarray | None = None  # [C, M, 2] EPSG:3766 metres
    residuals_m: np.ndarray | None = None  # [N, 2] true minus predicted EPSG:3766 position, metres
    pit: np.ndarray | None = None  # [N] sorted: the mass inside the disc reaching each val location's truth

    @property
    def calibrated(self) -> bool:
        return self.fitted_on > 0

    def mass_levels(self, levels: Sequence[float]) -> np.ndarray:
        """The mass share b(a) [L] of the disc of each nominal level a: the ceil((n + 1) a)-th smallest of the n val
        values (the largest when that is past n); the levels themselves without a level map."""
        levels = np.asarray(levels, np.float64)
        if self.pit is None or len(self.pit) == 0:
            return levels
        n = len(self.pit)
        rank = np.clip(np.ceil((n + 1) * levels - 1e-9).astype(int), 1, n)
        return self.pit[rank - 1]

    def without(self, temperature: bool = False, level_map: bool = False) -> "Calibration":
        """This calibration without its temperature (T = 1) and/or its level map: the reliability check's
        comparisons."""
        return replace(self, temperature=1.0 if temperature else self.temperature,
                       pit=None if level_map else self.pit)

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's `calibration` entry: numbers and float64 tensors (what torch.load(weights_only=True)
        reads)."""
        def tensor(array: np.ndarray | None) -> torch.Tensor | None:
            return None if array is None else torch.as_tensor(np.asarray(array, np.float64))

        return {"temperature": float(self.temperature), "fitted_on": int(self.fitted_on),
                "class_samples": tensor(self.class_samples), "residuals_m": tensor(self.residuals_m),
                "pit": tensor(self.pit)}

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any] | None, default: "Calibration | None" = None) -> "Calibration":
        """The inverse of `to_checkpoint`; a checkpoint without the entry gives `default` (or an empty one)."""
        if not saved:
            return default or cls()

        def array(key: str) -> np.ndarray | None:
            value = saved.get(key)
            return None if value is None else torch.as_tensor(value).double().numpy()

        samples = array("class_samples")
        if samples is None and default is not None:
            samples = default.class_samples
        return cls(float(saved.get("temperature", 1.0)), int(saved.get("fitted_on", 0)), samples,
                   array("residuals_m"), array("pit"))


def centroid_samples(class_xy: np.ndarray) -> np.ndarray:
    """Each class's probability at its centroid alone: class points [C, 2] as samples [C, 1, 2]."""
    return np.asarray(class_xy, np.float64)[:, None, :]


def kept_residuals(residuals_m: np.ndarray, limit: int = MAX_RESIDUALS) -> np.ndarray:
    """At most `limit` residual vectors [N, 2], evenly spaced in the order of their length, so the lengths'
    quantiles are kept."""
    residuals_m = np.asarray(residuals_m, np.float64).reshape(-1, 2)
    if len(residuals_m) <= limit:
        return residuals_m
    order = np.argsort(np.hypot(residuals_m[:, 0], residuals_m[:, 1]), kind="stable")
    return residuals_m[order[np.linspace(0, len(order) - 1, limit).round().astype(int)]]


@dataclass(frozen=True)
class Labelled:
    """Predictions of labelled locations to fit a calibration on: the predicting model's calibration (its class
    samples), its class logits [N, C] and the labels [N] (None for regression), its points `xy` [N, 2], the final
    points `point_xy` [N, 2] (moved onto land) and the true positions `true_xy` [N, 2], EPSG:3766 metres."""

    calibration: Calibration
    logits: torch.Tensor | None
    labels: torch.Tensor | None
    xy: np.ndarray
    point_xy: np.ndarray
    true_xy: np.ndarray

    @classmethod
    def of(cls, m: "Member", labels: np.ndarray, point_xy: np.ndarray, true_xy: np.ndarray) -> "Labelled":
        """A Member's predictions of labelled locations (its log-probabilities stand for the logits: they differ
        by a constant per row, which softmax ignores)."""
        logits = (None if m.probabilities is None
                  else torch.log(torch.as_tensor(m.probabilities, dtype=torch.float64).clamp_min(1e-300)))
        return cls(m.calibration, logits, None if logits is None else torch.as_tensor(np.asarray(labels, np.int64)),
                   m.xy, np.asarray(point_xy, np.float64), np.asarray(true_xy, np.float64))


def fit_calibration(base: Calibration, parts: Sequence[Labelled]) -> Calibration:
    """`base` (a model's calibration: its class samples) fitted on labelled predictions: a run's val split (one
    part, the model's own; `src.model.geomodel.GeoModel` after each validation), or the out-of-fold predictions
    of the other folds of a cross-validation (`cross_fitted`). First the temperature of the class logits on
    their labels (classification, hybrid), or for regression the residuals, true minus predicted positions;
    then the level map: the sorted mass inside the disc around each final point that reaches its true
    position, with that temperature (or those residuals)."""
    regression = base.class_samples is None
    classifying = [part for part in parts if part.logits is not None]
    fitted = replace(base, pit=None, fitted_on=sum(len(part.xy) for part in parts))
    if regression:
        fitted = replace(fitted, residuals_m=kept_residuals(np.concatenate([part.true_xy - part.xy for part in parts])))
    else:
        fitted = replace(fitted, temperature=fit_temperature([part.logits for part in classifying],
                                                             [part.labels for part in classifying]))
    pit = []
    every = max(1, math.ceil(fitted.fitted_on / MAX_PIT))
    for part in parts:
        own = part.calibration
        measured = replace(own, temperature=fitted.temperature, pit=None,
                           residuals_m=fitted.residuals_m if regression else own.residuals_m)
        probabilities = (None if part.logits is None
                         else torch.softmax(part.logits.detach().double(), dim=1).cpu().numpy()[::every])
        error_km = np.hypot(*(part.true_xy - part.point_xy)[::every].T) / 1000.0
        pit.append(mass_within(Member(measured, probabilities, np.asarray(part.xy, np.float64)[::every]),
                               part.point_xy[::every], error_km))
    return replace(fitted, pit=np.sort(np.concatenate(pit)))


def cross_fitted(bases: Sequence[Calibration], parts: Sequence[Labelled]) -> list[Calibration]:
    """For each fold k of a cross-validation, its model's calibration `bases[k]` fitted on the out-of-fold
    predictions of the other folds (`parts[j]`, j != k): every location it is checked on is unseen by both the
    model and its calibration, and each fit sees (K - 1) / K of the labelled locations instead of a val split."""
    return [fit_calibration(base, [part for j, part in enumerate(parts) if j != k]) for k, base in enumerate(bases)]


# ---- confidence regions ----------------------------------------------------------------------------------
def _class_mass(probabilities: np.ndarray, class_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(points [1, C*M, 2], weights [B, C*M]): probabilities [B, C] spread evenly over class points [C, 2] or
    samples [C, M, 2]."""
    samples = class_xy[:, None, :] if class_xy.ndim == 2 else class_xy
    n_classes, per_class = samples.shape[:2]
    weights = np.repeat(np.asarray(probabilities, np.float64) / per_class, per_class, axis=1)
    return samples.reshape(1, n_classes * per_class, 2), weights


def radii_of_mass(points: np.ndarray, weights: np.ndarray, point_xy: np.ndarray,
                  levels: Sequence[float] = LEVELS) -> np.ndarray:
    """Radii [B, L] in km: for each location, the distance from `point_xy` [B, 2] at which the mass of
    `points` ([B or 1, S, 2], `weights` [B, S]), nearest first, first exceeds each level (of its total); the
    farthest point's distance where it never does. Exceeds, not reaches: then a location counts inside exactly
    when the mass within its distance (its `pit`) is at most the level, which the level map relies on."""
    point_xy = np.asarray(point_xy, np.float64).reshape(-1, 2)
    offsets = np.asarray(points, np.float64) - point_xy[:, None, :]
    distance_km = np.hypot(offsets[..., 0], offsets[..., 1]) / 1000.0
    order = np.argsort(distance_km, axis=1, kind="stable")
    distance_km = np.take_along_axis(distance_km, order, axis=1)
    cumulative = np.cumsum(np.take_along_axis(np.asarray(weights, np.float64), order, axis=1), axis=1)
    total = cumulative[:, -1:]
    radii = np.empty((len(point_xy), len(levels)))
    for j, level in enumerate(levels):
        reached = (cumulative <= level * total * (1 + 1e-12)).sum(axis=1)  # points before the level is exceeded
        radii[:, j] = distance_km[np.arange(len(point_xy)), np.minimum(reached, distance_km.shape[1] - 1)]
    return radii


def confidence_radii(probabilities: np.ndarray, class_xy: np.ndarray, point_xy: np.ndarray,
                     levels: Sequence[float] = LEVELS) -> np.ndarray:
    """Radii [B, L] in km of the smallest discs around `point_xy` [B, 2] (EPSG:3766) holding more than each level
    of the class probabilities [B, C], each class's probability spread evenly over its points `class_xy` ([C, 2]
    centroids, or [C, M, 2] samples over its cell)."""
    points, weights = _class_mass(probabilities, np.asarray(class_xy, np.float64))
    return radii_of_mass(points, weights, point_xy, levels)


# ---- one prediction's details (predict, serve and the test step call this) --------------------------
@dataclass(frozen=True)
class Member:
    """One model's answer for a batch: its calibration, class cell ids (which cells: `grid`), its class
    probabilities [B, C] as the engine gives them (softmax, T = 1; None for regression) and its point [B, 2]."""

    calibration: Calibration
    probabilities: np.ndarray | None
    xy: np.ndarray
    cells: np.ndarray | None = None
    grid: tuple = ()


def member(model, probabilities: np.ndarray | None, xy: np.ndarray) -> Member:
    """The Member of a GeoModel or OnnxGeoModel (`calibration`, `hparams`) for its outputs on a batch."""
    hp = model.hparams
    calibration = getattr(model, "calibration", None) or Calibration()
    if probabilities is None or hp["approach"] == "regression":
        return Member(calibration, None, np.asarray(xy, np.float64))
    cells = np.asarray(hp["classes"]["cell"], np.int64)
    grid = (hp.get("cells", "grid"), float(hp.get("spacing") or 0.5), bool(hp.get("mainland_only") or False))
    if grid[0] != "grid":  # adaptive cells are a run's own: the same ids are the same cells only with the same cells
        grid += (tuple(np.asarray(hp["classes"]["plain"], np.float64).round().ravel()),)
    return Member(calibration, np.asarray(probabilities, np.float64), np.asarray(xy, np.float64), cells, grid)


@dataclass
class Details:
    """Per location: the radii [B, L] in km at `levels`, the top cells (ids [B, k], -1 where fewer) and their
    probabilities [B, k], the top cell's probability [B] (NaN for regression), and whether every member was
    calibrated."""

    levels: tuple[float, ...]
    radii: np.ndarray
    top_cells: np.ndarray
    top_probabilities: np.ndarray
    top1: np.ndarray
    calibrated: bool
    temperatures: list[float] = field(default_factory=list)

    def blank(self, rows: np.ndarray) -> None:
        """Forget the details of `rows` (a boolean mask): locations the model saw nothing of."""
        self.radii[rows] = np.nan
        self.top_cells[rows] = -1
        self.top_probabilities[rows] = np.nan
        self.top1[rows] = np.nan

    def radius(self, level: float) -> np.ndarray:
        """The radii [B] in km at `level` (one of `levels`)."""
        return self.radii[:, int(np.argmin(np.abs(np.asarray(self.levels) - level)))]


def member_mass(m: Member, batch: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(points [B or 1, S, 2], weights [B, S]) of one member's predictive distribution, or None when its
    checkpoint lacks what it needs (a regression checkpoint without val residuals)."""
    calibration = m.calibration
    if m.probabilities is not None:
        samples = calibration.class_samples
        if samples is None:
            return None
        return _class_mass(temperature_scaled(m.probabilities, calibration.temperature), samples)
    if calibration.residuals_m is None or len(calibration.residuals_m) == 0:
        return None
    residuals = calibration.residuals_m
    points = m.xy.reshape(-1, 1, 2) + residuals[None]
    return points, np.full((batch, len(residuals)), 1.0 / len(residuals))


def mixture_mass(members: Sequence[Member], batch: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(points [B, S, 2], weights [B, S]) of the mixture of the members' distributions (each weighing 1 / members),
    or None when one of them has none."""
    masses = [member_mass(m, batch) for m in members]
    if any(mass is None for mass in masses):
        return None
    points = np.concatenate([np.broadcast_to(p, (batch, *p.shape[1:])) for p, _ in masses], axis=1)
    return points, np.concatenate([w / len(members) for _, w in masses], axis=1)


def mass_within(m: Member, point_xy: np.ndarray, radius_km: np.ndarray) -> np.ndarray:
    """The share [B] of one member's predicted mass within `radius_km` [B] of `point_xy` [B, 2] (in blocks of
    MASS_ROWS locations)."""
    point_xy, radius_km = np.asarray(point_xy, np.float64).reshape(-1, 2), np.asarray(radius_km, np.float64)
    shares = np.empty(len(point_xy))
    for start in range(0, len(point_xy), MASS_ROWS):
        rows = slice(start, start + MASS_ROWS)
        block = Member(m.calibration, None if m.probabilities is None else m.probabilities[rows], m.xy[rows])
        points, weights = member_mass(block, len(point_xy[rows]))
        offsets = points - point_xy[rows, None, :]
        inside = np.hypot(offsets[..., 0], offsets[..., 1]) / 1000.0 <= radius_km[rows, None]
        shares[rows] = (weights * inside).sum(axis=1) / weights.sum(axis=1)
    return shares


def prediction_details(members: Sequence[Member], point_xy: np.ndarray, top: int = DEFAULT_TOP,
                       levels: Sequence[float] = LEVELS) -> Details:
    """The confidence radii at `levels` around the final points `point_xy` [B, 2] (EPSG:3766, after the ensemble
    mean and the move onto land) of the mixture of the members' distributions, each level through the members'
    level maps (averaged over an ensemble's members), and the `top` most likely cells: the calibrated
    probabilities of the classification/hybrid members on the first such member's cells, averaged (members on
    other cells and regression members count only in the radii). Radii are NaN when a member has no
    distribution (a regression checkpoint without val residuals)."""
    point_xy = np.asarray(point_xy, np.float64).reshape(-1, 2)
    batch = len(point_xy)
    mass = mixture_mass(members, batch) if batch else None
    if mass is None:
        radii = np.full((batch, len(levels)), np.nan)
    else:
        shares = np.mean([m.calibration.mass_levels(levels) for m in members], axis=0)
        radii = radii_of_mass(*mass, point_xy, shares)
    top_cells, top_probabilities, top1 = _top_cells(members, batch, top)
    return Details(tuple(levels), radii, top_cells, top_probabilities, top1,
                   calibrated=all(m.calibration.calibrated for m in members),
                   temperatures=[m.calibration.temperature for m in members if m.probabilities is not None])


def _top_cells(members: Sequence[Member], batch: int, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell ids [B, k], probabilities [B, k], top-1 probability [B]) of the averaged calibrated class
    probabilities of the members on the first classifying member's cells."""
    classifying = [m for m in members if m.probabilities is not None]
    if not classifying:
        return np.full((batch, 0), -1), np.full((batch, 0), np.nan), np.full(batch, np.nan)
    same = [m for m in classifying if m.grid == classifying[0].grid]
    cells = np.unique(np.concatenate([m.cells for m in same]))
    mass = np.zeros((batch, len(cells)))
    for m in same:
        mass[:, np.searchsorted(cells, m.cells)] += temperature_scaled(m.probabilities, m.calibration.temperature)
    mass /= len(same)
    order = np.argsort(-mass, axis=1, kind="stable")[:, :max(0, top)]
    return cells[order], np.take_along_axis(mass, order, axis=1), mass.max(axis=1)


# ---- output ----------------------------------------------------------------------------------------------
def format_top(cells: np.ndarray, probabilities: np.ndarray) -> str:
    """`cell:probability` pairs of one location, most likely first, separated by `;` (probabilities with 4
    decimals): `57:0.4123;58:0.2011`."""
    return ";".join(f"{int(c)}:{p:.4f}" for c, p in zip(cells, probabilities) if c >= 0)


def details_columns(details: Details) -> dict[str, list[str]]:
    """The --details columns after uuid, latitude, longitude, as text: radii in km with 2 decimals and the top
    cell's probability with 4 (empty where unknown), and `top` (`format_top`)."""
    def text(values: np.ndarray, decimals: int) -> list[str]:
        return ["" if not np.isfinite(v) else f"{v:.{decimals}f}" for v in values]

    return {"radius50_km": text(details.radius(0.5), 2), "radius90_km": text(details.radius(0.9), 2),
            "top1_probability": text(details.top1, 4),
            "top": [format_top(c, p) for c, p in zip(details.top_cells, details.top_probabilities)]}


def coverage(radii: np.ndarray, error_km: np.ndarray) -> np.ndarray:
    """Share [L] of the locations whose true position lies inside each level's disc (error <= radius),
    radii [N, L] in km and errors [N] in km."""
    radii = np.asarray(radii, np.float64)
    return (np.asarray(error_km, np.float64)[:, None] <= radii).mean(axis=0)


# the reliability check's comparisons: (name, drop the temperature, drop the level map)
VARIANTS = (("calibrated", False, False), ("temperature only", False, True), ("uncalibrated", True, True))
VAL_SPLIT = "val split only"  # cross-validation: each fold with the calibration of its own val split


def variant_details(members: Sequence[Member], point_xy: np.ndarray,
                    levels: Sequence[float] = RELIABILITY_LEVELS) -> dict[str, Details]:
    """The details of `members` at `levels` as calibrated, with the temperature only (no level map) and
    uncalibrated (T = 1, no level map)."""
    return {name: prediction_details([replace(m, calibration=m.calibration.without(temperature, level_map))
                                      for m in members], point_xy, levels=levels)
            for name, temperature, level_map in VARIANTS}


@dataclass
class Reliability:
    """The reliability check of the confidence regions on labelled predictions (a test split, or out of fold):
    at every level the share of true locations inside its disc, for each of VARIANTS (calibrated, temperature
    only, uncalibrated)."""

    levels: tuple[float, ...]
    inside: dict[str, np.ndarray]  # variant -> [L]
    radii: np.ndarray  # [N, L] km, calibrated
    temperatures: list[float]
    calibrated: bool

    @classmethod
    def of(cls, details: Sequence[dict[str, Details]], error_km: np.ndarray) -> "Reliability":
        """Pooled over `details` (`variant_details` of each fold or run, rows in the order of `error_km`; the
        variants every one of them has)."""
        names = [name for name in details[0] if all(name in d for d in details)]
        inside = {name: coverage(np.concatenate([d[name].radii for d in details]), error_km) for name in names}
        calibrated = [d["calibrated"] for d in details]
        return cls(calibrated[0].levels, inside, np.concatenate([d.radii for d in calibrated]),
                   [t for d in calibrated for t in d.temperatures], all(d.calibrated for d in calibrated))

    @property
    def count(self) -> int:
        return len(self.radii)

    def at(self, level: float) -> int:
        return int(np.argmin(np.abs(np.asarray(self.levels) - level)))

    def summary(self) -> dict[str, Any]:
        """The 50% and 90% figures for metrics.json: the share of true locations inside for each variant
        (`inside_50`: calibrated; `inside_50_<variant>` for the others), the median radii, the temperatures."""
        result: dict[str, Any] = {"count": self.count, "calibrated": self.calibrated,
                                  "temperatures": [round(t, 4) for t in self.temperatures]}
        for level in LEVELS:
            j, name = self.at(level), f"{100 * level:.0f}"
            for variant, inside in self.inside.items():
                key = f"inside_{name}" if variant == "calibrated" else f"inside_{name}_{variant.replace(' ', '_')}"
                result[key] = float(inside[j])
            result[f"median_radius{name}_km"] = float(np.median(self.radii[:, j]))
        return result

    def table(self) -> str:
        """The 50% and 90% rows: the share of true locations inside the calibrated disc, the same for the other
        variants, and the calibrated median radius."""
        rows = []
        for level in LEVELS:
            j = self.at(level)
            row = {"region": f"{100 * level:.0f}%"}
            for variant, inside in self.inside.items():
                row["true location inside" if variant == "calibrated" else variant] = f"{100 * inside[j]:.1f}%"
            rows.append({**row, "median radius": f"{np.median(self.radii[:, j]):.1f} km"})
        return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True,
                        colalign=("left",) + ("right",) * (len(rows[0]) - 1))

    def describe_temperatures(self) -> str:
        """How the regions were calibrated, in words."""
        shown = sorted(self.temperatures)
        if not self.calibrated:
            return "uncalibrated (no val split: temperature 1, no level map)"
        if not shown:
            return "radii from the val residuals"
        if len(shown) == 1:
            return f"temperature {shown[0]:.2f}"
        return f"temperatures {shown[0]:.2f} to {shown[-1]:.2f}"
