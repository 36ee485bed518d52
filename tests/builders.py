"""Small builders of the typed configs for tests: a GeoModel or a LoaderConfig from a few keywords."""

from dataclasses import fields

from src.data.config import DataConfig, LoaderConfig
from src.model.config import IMAGENET_MEAN, IMAGENET_STD, ClassTable, ModelConfig, OptimConfig
from src.model.geomodel import GeoModel

MODEL_FIELDS = {f.name for f in fields(ModelConfig)}
OPTIM_FIELDS = {f.name for f in fields(OptimConfig)}


def class_table(classes: dict, scaler: dict, prior=(45.0, 16.0), **extra) -> ClassTable:
    """A ClassTable from the hparams form of a class table ({cell, n_train, weighted, clipped, plain[, radius]})."""
    centroids = {kind: classes[kind] for kind in ("weighted", "clipped", "plain") if kind in classes}
    return ClassTable(cell=list(classes["cell"]), n_train=list(classes["n_train"]), centroids=centroids,
                      scaler=dict(scaler), prior_lat=prior[0], prior_lng=prior[1], radius=classes.get("radius"), **extra)


def enriched_classes(enriched, approach: str = "classification", centroids: str = "weighted",
                     data: DataConfig | None = None) -> ClassTable:
    """The ClassTable a training run builds from enriched data (src.training.run.build_class_table)."""
    from src.training.run import build_class_table

    return build_class_table(enriched, data or DataConfig(), ModelConfig(approach, "tiny", 32, centroids=centroids))


def geo_model(approach: str = "classification", classes: ClassTable | None = None, enriched=None,
              backbone: str = "tiny", image_size: int = 32, pretrained: bool = False, **values) -> GeoModel:
    """A GeoModel; `values` are ModelConfig or OptimConfig fields; classes from `enriched` when not given."""
    unknown = set(values) - MODEL_FIELDS - OPTIM_FIELDS
    assert not unknown, f"not a config field: {unknown}"
    model = ModelConfig(approach, backbone, image_size, **{k: v for k, v in values.items() if k in MODEL_FIELDS})
    optim = OptimConfig(**{k: v for k, v in values.items() if k in OPTIM_FIELDS})
    if classes is None:
        from src.training.run import build_class_table

        classes = build_class_table(enriched, DataConfig(), model)
    return GeoModel(model, optim, classes, pretrained=pretrained)


def loader_config(image_size: int = 32, **values) -> LoaderConfig:
    """A LoaderConfig with ImageNet normalisation."""
    return LoaderConfig(image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, **values)
