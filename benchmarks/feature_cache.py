"""A frozen-backbone training epoch with the feature cache vs without it, both through the DataModule.

    python -m benchmarks.feature_cache [--dataset-dir DIR] [--backbone efficientnet_lite0] [--image-size 224]

Both epochs train the same model (frozen pretrained backbone, head learning) through Lightning on the train
split. "without" decodes and runs the backbone on every image; "with" is a second run over a cache that a
first run's DataModule filled (as a later epoch or run reads it): the DataModule's own counters must say it
computed no feature. Goal: >= 10x. The last line is the ratio.
"""

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl

from benchmarks import DEFAULT_DATASET
from src.data.config import DataConfig, LoaderConfig
from src.data.datamodule import GeoDataModule
from src.data.enrich import enrich
from src.model.backbones import backbone_spec
from src.model.config import ModelConfig, OptimConfig
from src.model.finetune import FreezeThenUnfreeze
from src.model.geomodel import GeoModel
from src.training.run import build_class_table


def epoch(enriched, backbone: str, image_size: int, cache_dir: Path | None, batch_size: int) -> tuple[float, dict]:
    """(wall time of one frozen training epoch of a fresh model, the DataModule's feature cache counters)."""
    pl.seed_everything(0, verbose=False)
    spec = backbone_spec(backbone)
    config = ModelConfig("classification", backbone, image_size, image_mean=spec.mean, image_std=spec.std)
    model = GeoModel(config, OptimConfig(scheduler="none"), build_class_table(enriched, DataConfig(), config),
                     pretrained=True)
    loader = LoaderConfig(image_size, spec.mean, spec.std, batch_size=batch_size, num_workers=0,
                          cache_dir=None if cache_dir is None else str(cache_dir), backbone=backbone, engine="auto")
    data = GeoDataModule(enriched.locations, loader)
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[FreezeThenUnfreeze(None)])
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start, data.feature_cache_counts()


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    enriched = enrich([args.dataset_dir], progress=False)
    n_train = int((enriched.locations["split"] == "train").sum())
    with tempfile.TemporaryDirectory() as cache_dir, contextlib.redirect_stdout(sys.stderr):
        without, _ = epoch(enriched, args.backbone, args.image_size, None, args.batch_size)
        filling, filled = epoch(enriched, args.backbone, args.image_size, Path(cache_dir), args.batch_size)
        cached, counts = epoch(enriched, args.backbone, args.image_size, Path(cache_dir), args.batch_size)
    if counts["computed"] != 0:
        raise SystemExit(f"error: the cached run computed {counts['computed']} features: the cache was not reused")
    print(f"{args.backbone} at {args.image_size} px, {n_train} train locations from {args.dataset_dir}")
    print(f"frozen epoch without cache:             {without:.2f} s ({n_train / without:.1f} locations/s)")
    print(f"first run, filling the cache:           {filling:.2f} s (computed {filled['computed']})")
    print(f"next run, cache filled by the first:    {cached:.2f} s ({n_train / cached:.1f} locations/s; "
          f"computed {counts['computed']}, reused {counts['reused']})")
    print(f"ratio: {without / cached:.1f}x")


if __name__ == "__main__":
    main()
