"""Typed configuration of the model: its architecture and prediction rule (ModelConfig), its optimisation
(OptimConfig) and the classes it predicts (ClassTable: the cells, their centroids, the train scaler and
prior). GeoModel takes these three; its checkpoint hparams are their flat union (`model_hparams`), the
same keys src.train has always saved, so every checkpoint reads back with `configs_from_hparams`.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from src.core.choices import CENTROID_KINDS

APPROACHES = ("classification", "regression", "hybrid")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("plateau", "onecycle", "cosine", "none")
# the defaults of src.train, chosen by 5-fold cross-validation on real LUMEN locations (docs/accuracy.md)
DEFAULT_FUSION = "mean"
DEFAULT_PREDICT_RULE = "mean"
# Haversine label smoothing's tau, measured: 5-fold cross-validation on the 100 real shared LUMEN locations
# (0.5-degree grid, 55.6 x 39.7 km cells, frozen efficientnet_lite0; `benchmarks.accuracy_levers`) gave
# out-of-fold mean km 110.2 (one-hot), 108.1 (tau 12 km) and 100.3 (tau 40 km) against 111.8 for the
# constant. At 12 km the runner-up centroid gets e^-1 of the nearest's weight (the median gap between them is
# 11.7 km on the 32,922 real coordinates) and the true class keeps 53% of the target mass; at 40 km the
# targets spread over the neighbouring cells, which suits thin data (a median of 2 train locations per
# class). PIGEON's 65-75 km suits world-scale cells. Scale tau with the cell size for other spacings.
DEFAULT_LABEL_SMOOTHING_KM = 40.0
# retrieval refinement (src.inference.retrieval): the k nearest gallery locations within the most likely classes
# whose probabilities first add up to the gate (see docs/accuracy.md for how these were chosen)
DEFAULT_REFINE = "knn"
DEFAULT_REFINE_K = 5
DEFAULT_REFINE_GATE = 0.8
# hparams that change only the numpy refinement after the graph, not the graph (the ONNX store key leaves them out)
REFINE_HPARAMS = ("refine", "refine_k", "refine_gate")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """The network and how its outputs become a point."""

    approach: str
    backbone: str
    image_size: int
    backbone_weights: str = "imagenet"  # or "random": what the backbone started from (a record; not reloaded)
    fusion: str = "concat"
    hidden: int = 512
    dropout: float = 0.2
    centroids: str = "weighted"
    topk: int = 0
    predict_rule: str = "mean"
    label_smoothing_km: float = 0.0
    offset_weight: float = 1.0
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    channels_last: bool = False  # the backbone's memory format (a GPU speed choice, not a result)
    refine: str = "none"  # "knn": the point from the nearest gallery locations (src.inference.retrieval)
    refine_k: int = DEFAULT_REFINE_K
    refine_gate: float = DEFAULT_REFINE_GATE


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser, its schedule and the fine-tuning of the backbone."""

    lr: float = 1e-3
    lr_finetune: float = 1e-4
    unfreeze_at_epoch: int | None = None  # None: the backbone stays frozen
    unfreeze_blocks: int = 0
    freeze_bn: bool = False
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    scheduler: str = "plateau"
    warmup_epochs: int = 1


@dataclass(frozen=True)
class ClassTable:
    """The classes (cells with train data): their cell ids, train counts and centroids per kind (EPSG:3766
    x/y), each class's cell radius (hybrid offsets' unit), the train scaler and prior, and the kind of cells
    they are (for drawing them)."""

    cell: list[int]
    n_train: list[int]
    centroids: dict[str, list[list[float]]]  # kind -> [[x, y], ...]
    scaler: dict[str, float]  # x_min, x_max, y_min, y_max of the train rows
    prior_lat: float
    prior_lng: float
    radius: list[float] | None = None
    cells: str = "grid"
    spacing: float = 0.5
    mainland_only: bool = False
    # [C, M, 2] EPSG:3766 points over each class's cell (`src.data.cells.class_samples`): where its probability
    # lies, for the confidence regions; saved in the checkpoint's calibration, not among the hparams
    samples: Any = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.cell)

    def classes_hparam(self) -> dict[str, list]:
        table = {"cell": list(self.cell), "n_train": list(self.n_train), **self.centroids}
        if self.radius is not None:
            table["radius"] = list(self.radius)
        return table


def model_hparams(model: ModelConfig, optim: OptimConfig, classes: ClassTable) -> dict[str, Any]:
    """The checkpoint hparams of a GeoModel: the configs' fields side by side and the class table."""
    hparams = {**asdict(model), **asdict(optim)}
    hparams["image_mean"], hparams["image_std"] = list(model.image_mean), list(model.image_std)
    hparams.update(classes=classes.classes_hparam(), scaler=dict(classes.scaler), prior_lat=classes.prior_lat,
                   prior_lng=classes.prior_lng, cells=classes.cells, spacing=classes.spacing,
                   mainland_only=classes.mainland_only)
    return hparams


def configs_from_hparams(hparams: Mapping[str, Any]) -> tuple[ModelConfig, OptimConfig, ClassTable]:
    """The inverse of `model_hparams`, for every checkpoint src.train has written (keys missing in older
    ones take the defaults; data keys stored among them by older versions are ignored here)."""

    def pick(cls) -> dict[str, Any]:
        return {f.name: hparams[f.name] for f in fields(cls) if f.name in hparams and hparams[f.name] is not None
                or f.name in hparams and f.name == "unfreeze_at_epoch"}

    model_values = pick(ModelConfig)
    for key in ("image_mean", "image_std"):
        if key in model_values:
            model_values[key] = tuple(model_values[key])
    table = hparams["classes"]
    classes = ClassTable(
        cell=list(table["cell"]), n_train=list(table["n_train"]),
        centroids={kind: table[kind] for kind in CENTROID_KINDS if kind in table},
        scaler=dict(hparams["scaler"]), prior_lat=float(hparams.get("prior_lat", 0.0)),
        prior_lng=float(hparams.get("prior_lng", 0.0)), radius=table.get("radius"),
        cells=str(hparams.get("cells") or "grid"), spacing=float(hparams.get("spacing") or 0.5),
        mainland_only=bool(hparams.get("mainland_only") or False))
    return ModelConfig(**model_values), OptimConfig(**pick(OptimConfig)), classes
