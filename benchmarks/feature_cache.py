"""A frozen-backbone training epoch with the feature cache vs without it.

    python -m benchmarks.feature_cache [--dataset-dir DIR] [--backbone efficientnet_lite0] [--image-size 224]

Both epochs train the same model (frozen pretrained backbone, head learning) through Lightning on
the train split; "without" decodes and runs the backbone on every image, "with" reads the cached
features (filled beforehand, as by an earlier epoch or run). Goal: >= 10x. The last line is the ratio.
"""

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import pytorch_lightning as pl

from benchmarks import DEFAULT_DATASET
from src.data.datamodule import GeoDataModule
from src.data.quadruplets import eval_transform, load_quadruplet
from src.data.enrich import enrich
from src.data.features import FeatureCache
from src.model.geomodel import GeoModel
from src.model.finetune import FreezeThenUnfreeze
from src.training.run import class_table



def epoch_seconds(enriched, backbone: str, image_size: int, cache_dir: Path | None, batch_size: int) -> float:
    """Wall time of one frozen training epoch (no validation) of a fresh model."""
    pl.seed_everything(0, verbose=False)
    model = GeoModel(approach="classification", backbone=backbone, image_size=image_size,
                     classes=class_table(enriched), scaler=enriched.scaler, scheduler="none", pretrained=True)
    data = GeoDataModule(enriched.locations, image_size, batch_size=batch_size, num_workers=0,
                         unfreeze_at_epoch=None, cache_dir=cache_dir, backbone_name=backbone)
    if cache_dir is not None:  # fill the cache first: the benchmark compares a later epoch / run
        image_dirs = data.split("train")["image_dir"].tolist()
        FeatureCache(cache_dir, backbone, model.backbone, image_size).compute_missing(
            image_dirs, model.backbone, partial(load_quadruplet, image_size=image_size,
                                                transform=eval_transform(image_size)), batch_size=batch_size)
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[FreezeThenUnfreeze(None)])
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start


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
        without = epoch_seconds(enriched, args.backbone, args.image_size, None, args.batch_size)
        cached = epoch_seconds(enriched, args.backbone, args.image_size, Path(cache_dir), args.batch_size)
    print(f"{args.backbone} at {args.image_size} px, {n_train} train locations from {args.dataset_dir}")
    print(f"frozen epoch without cache: {without:.2f} s ({n_train / without:.1f} locations/s)")
    print(f"frozen epoch with cache:    {cached:.2f} s ({n_train / cached:.1f} locations/s)")
    print(f"ratio: {without / cached:.1f}x")


if __name__ == "__main__":
    main()
