"""Retrieval refinement (`--refine knn`): the point from the nearest gallery locations in embedding space.

A gallery holds, for every labelled location a run trained on (its train and val splits, never its test split)
and for the locations of any `--gallery-dirs`, the fused embedding (the head's input after the view fusion:
the mean of the four view features with `--fusion mean`, the four side by side with `concat`, the attention
block's output with `attention`), L2-normalised and stored as float16, with the location's EPSG:3766 x/y, class
index and uuid. It is built after training (`src.training.gallery`) and saved in the checkpoint.

At prediction time, for each location: the candidate classes are the most likely ones whose probabilities first
add up to the gate (PIGEON refines within its top geocells; a cumulative gate takes one class when the head is
sure and more when it is not; regression, which has no class probabilities, searches the whole gallery); among
the gallery locations of those classes the k nearest by cosine similarity are found, and the point is their
geometric median weighted by the inverse cosine distance (`refine_points`). The search runs in numpy on the embedding that both
engines return (`src.inference.engine.infer`), so torch and ONNX Runtime refine alike.
"""

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from src.core.errors import UserError
from src.model.heads import geometric_median_xy

GALLERY_KEY = "gallery"  # the checkpoint entry holding `Gallery.state()`
DEFAULT_WEIGHTING = "inverse"
NEAR_COPY = 1e-3  # cosine distance below which gallery locations count as copies of the query (equal weights)


@dataclass(repr=False)
class Gallery:
    """Embeddings [N, D] (float32 in memory, rows of unit length), EPSG:3766 x/y [N, 2] (metres), class index
    [N] and uuid of each gallery location. The rows are kept in class order (a stable sort of the given rows), so
    a class's embeddings are one contiguous block that the search multiplies without copying."""

    embeddings: np.ndarray
    xy: np.ndarray
    labels: np.ndarray
    uuids: list[str]

    def __post_init__(self):
        labels = np.asarray(self.labels, dtype=np.int64)
        if not len(self.embeddings) == len(self.xy) == len(labels) == len(self.uuids):
            raise ValueError("a gallery needs one embedding, point, class and uuid per location")
        order = np.argsort(labels, kind="stable")
        self.labels = labels[order]
        self.embeddings = np.ascontiguousarray(np.asarray(self.embeddings, dtype=np.float32)[order])
        self.xy = np.asarray(self.xy, dtype=np.float64).reshape(-1, 2)[order]
        self.uuids = [str(self.uuids[i]) for i in order]
        n_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.class_start = np.searchsorted(self.labels, np.arange(n_classes), side="left")
        self.class_end = np.searchsorted(self.labels, np.arange(n_classes), side="right")

    def __len__(self) -> int:
        return len(self.uuids)

    def __repr__(self) -> str:
        return f"Gallery({len(self)} locations, {self.embeddings.shape[1]}-d embeddings)"

    # ---- storage --------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint form: tensors (memory-mapped when the checkpoint is read) and the uuids."""
        return {"embeddings": torch.tensor(self.embeddings, dtype=torch.float16), "xy": torch.tensor(self.xy),
                "labels": torch.tensor(self.labels), "uuids": list(self.uuids)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Gallery":
        """The inverse of `state`."""
        return cls(np.asarray(state["embeddings"], dtype=np.float32), np.asarray(state["xy"]),
                   np.asarray(state["labels"]), list(state["uuids"]))

    # ---- search ---------------------------------------------------------------------------------------------
    def spans_of(self, classes: np.ndarray) -> list[tuple[int, int]]:
        """The (start, end) row ranges of `classes` (those with gallery locations)."""
        classes = classes[classes < len(self.class_start)]
        return [(int(self.class_start[c]), int(self.class_end[c])) for c in classes
                if self.class_end[c] > self.class_start[c]]

    def neighbours(self, embeddings: np.ndarray, k: int, probabilities: np.ndarray | None = None,
                   gate: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest gallery rows [B, k] of each embedding [B, D] by cosine similarity, nearest first, and
        their similarities [B, k]; with `probabilities` [B, C] only among the rows of each location's
        `gated_classes`. Fewer candidates than k leave -1 rows (similarity -inf) at the end."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        rows = np.full((len(embeddings), k), -1, np.int64)
        similarity = np.full((len(embeddings), k), -np.inf, np.float32)
        for i, query in enumerate(embeddings):
            spans = [(0, len(self))] if probabilities is None else self.spans_of(gated_classes(probabilities[i], gate))
            if not spans:
                continue
            candidates = np.concatenate([np.arange(start, end) for start, end in spans])
            scores = np.concatenate([self.embeddings[start:end] @ query for start, end in spans])
            n = min(k, len(candidates))
            top = np.argpartition(-scores, n - 1)[:n] if n < len(candidates) else np.arange(n)
            top = top[np.lexsort((candidates[top], -scores[top]))]  # nearest first; ties: the lower row
            rows[i, :n], similarity[i, :n] = candidates[top], scores[top]
        return rows, similarity


def gated_classes(probabilities: np.ndarray, gate: float) -> np.ndarray:
    """The most likely classes, most likely first, up to the first whose cumulative probability reaches `gate`
    (at least one; every class with gate >= 1)."""
    order = np.argsort(-probabilities, kind="stable")
    cumulative = np.cumsum(probabilities[order])
    n = int(np.searchsorted(cumulative, gate, side="left")) + 1
    return order[:min(n, len(order))]


def neighbour_weights(similarity: np.ndarray, found: np.ndarray, weighting: str) -> np.ndarray:
    """Weights [B, k] of the neighbours found (0 for the -1 rows): `uniform`, or `inverse`, the inverse cosine
    distance 1 / max(1 - s, NEAR_COPY) (a copy of a gallery location dominates; the floor keeps the engines'
    1e-6 differences of similarity from moving the point)."""
    if weighting == "uniform":
        return found.astype(np.float64)
    if weighting == "inverse":
        distance = np.clip(1.0 - similarity.astype(np.float64), NEAR_COPY, None)
        return np.where(found, 1.0 / distance, 0.0)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, not {weighting!r}")


WEIGHTINGS = ("uniform", "inverse")


def refine_points(gallery: Gallery, xy: np.ndarray, embeddings: np.ndarray, probabilities: np.ndarray | None,
                  k: int, gate: float, weighting: str = DEFAULT_WEIGHTING) -> np.ndarray:
    """Refined EPSG:3766 points [B, 2]: the weighted geometric median of each location's `k` nearest gallery
    locations (`Gallery.neighbours`, `neighbour_weights`); a location without any candidate keeps its `xy`."""
    rows, similarity = gallery.neighbours(embeddings, k, probabilities, gate)
    found = rows >= 0
    refined = np.array(xy, dtype=np.float64, copy=True).reshape(-1, 2)
    has = found.any(axis=1)
    if not has.any():
        return refined
    rows, found = rows[has], found[has]
    weights = neighbour_weights(similarity[has], found, weighting)
    points = gallery.xy[np.where(found, rows, rows[:, :1])]  # [b, k, 2]; missing rows repeat the nearest (weight 0)
    # each location stops at its own convergence: its point does not depend on the others in its batch
    refined[has] = geometric_median_xy(torch.from_numpy(weights), torch.from_numpy(points)).numpy()
    return refined


def refine(model, xy: np.ndarray, embeddings: np.ndarray, probabilities: np.ndarray | None) -> np.ndarray:
    """`xy` refined by `model`'s gallery when its hparams say `refine: knn` (else `xy` as it is); `model` is a
    GeoModel or an OnnxGeoModel (both carry `hparams` and `gallery`)."""
    hparams = model.hparams
    gallery = getattr(model, "gallery", None)
    if hparams.get("refine", "none") == "none" or gallery is None:
        return xy
    return refine_points(gallery, xy, embeddings, probabilities, int(hparams["refine_k"]), float(hparams["refine_gate"]))


def refinement(model) -> str:
    """How `model` refines its points, for the line a command prints about it ('' without refinement)."""
    hparams, gallery = model.hparams, getattr(model, "gallery", None)
    if hparams.get("refine", "none") == "none" or gallery is None:
        return ""
    gate = "" if hparams["approach"] == "regression" else f", classes up to p {float(hparams['refine_gate']):g}"
    return f", refine knn (k {int(hparams['refine_k'])}{gate}, gallery of {len(gallery)})"


def checkpoint_gallery(checkpoint: Mapping[str, Any], refine_method: str, flag: str, path) -> Gallery | None:
    """The gallery saved in a checkpoint dict (None when it has none); a one-line UserError when `refine_method`
    is knn and there is none."""
    state = checkpoint.get(GALLERY_KEY)
    if state is None:
        if refine_method == "knn":
            raise UserError(f"{flag} {path}: holds no gallery for --refine knn (train with --refine knn; a run with "
                            "a val split keeps it in its best checkpoint, not in last.ckpt); use --refine none")
        return None
    return Gallery.from_state(state)
