"""Quadruplet data: transforms, datasets and the LightningDataModule over the enrich stage.

A batch is a dict: `views` [B, 4, 3, H, W] (or `features` [B, 4, D] from the feature cache while
the backbone is frozen), `label` [B] (class index), `xy` [B, 2] (EPSG:3766 metres), `lat`/`lng` [B]
(degrees) and `index` [B] (row in the split's table).
"""

import logging
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from src.inference.engine import OnnxFeatureExtractor, resolve_engine
from src.model.backbones import IMAGENET_MEAN, IMAGENET_STD
from src.data.features import FeatureCache
from src.data.images import load_image, view_paths

log = logging.getLogger(__name__)

AUGMENT_CHOICES = ("none", "finetune", "always")


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable:
    """PIL image -> normalized tensor [3, H, W] (per-channel `mean`/`std`, ImageNet's by default), resized
    to image_size if needed."""
    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def input_spec(hparams) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(image size, mean, std) a model's checkpoint hparams expect (ImageNet's statistics for checkpoints
    written before the normalisation was saved)."""
    return (int(hparams["image_size"]), tuple(hparams.get("image_mean", IMAGENET_MEAN)),
            tuple(hparams.get("image_std", IMAGENET_STD)))


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable:
    """Training augmentation: random resized crop and colour jitter, then normalisation (as eval_transform).

    No horizontal flip here: flipping one view alone breaks the geometry of the quadruplet
    (see `mirror_views`, which flips all views and swaps 90 and 270).
    """
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


def load_quadruplet(image_dir: str | Path, image_size: int, transform: Callable) -> torch.Tensor:
    """The four views of a location as a [4, 3, H, W] tensor (view order 0, 90, 180, 270).

    JPEGs are decoded at reduced size (`src.images.load_image`), then `transform` is applied.
    """
    return torch.stack([transform(load_image(path, image_size)) for path in view_paths(image_dir)])


def mirror_views(views: torch.Tensor) -> torch.Tensor:
    """The mirror image of a quadruplet [..., 4, 3, H, W]: every view flipped left-right and the
    90 and 270 views swapped, a geometrically consistent mirrored scene."""
    return views.flip(-1)[..., [0, 3, 2, 1], :, :, :]


def _targets(locations: pd.DataFrame) -> dict[str, torch.Tensor]:
    return {
        "label": torch.tensor(locations["label"].to_numpy(), dtype=torch.long),
        "xy": torch.tensor(locations[["crs_x", "crs_y"]].to_numpy(), dtype=torch.float64),
        "lat": torch.tensor(locations["latitude"].to_numpy(), dtype=torch.float64),
        "lng": torch.tensor(locations["longitude"].to_numpy(), dtype=torch.float64),
    }


class QuadrupletDataset(Dataset):
    """Rows of an enriched locations table -> dicts with `views` and the targets."""

    def __init__(self, locations: pd.DataFrame, image_size: int, transform: Callable, mirror_p: float = 0.0):
        self.image_dirs = locations["image_dir"].astype(str).tolist()
        self.targets = _targets(locations)
        self.image_size = image_size
        self.transform = transform
        self.mirror_p = mirror_p

    def __len__(self) -> int:
        return len(self.image_dirs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        views = load_quadruplet(self.image_dirs[index], self.image_size, self.transform)
        if self.mirror_p and torch.rand(()) < self.mirror_p:
            views = mirror_views(views)
        return {"views": views, "index": index, **{k: v[index] for k, v in self.targets.items()}}


class FeatureDataset(Dataset):
    """Cached backbone features [N, 4, D] -> dicts with `features` and the targets."""

    def __init__(self, locations: pd.DataFrame, features: torch.Tensor):
        self.features = features
        self.targets = _targets(locations)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "index": index, **{k: v[index] for k, v in self.targets.items()}}


class GeoDataModule(pl.LightningDataModule):
    """Train/val/test loaders over an enriched locations table (column `split`).

    While the backbone is frozen (epochs before `unfreeze_at_epoch`) and `cache_dir` is set, the
    train and val loaders serve cached backbone features instead of images (the cache is filled on
    first use with the model's own backbone); with augmentation `always` training uses images
    throughout. Set the Trainer's `reload_dataloaders_every_n_epochs=1` so the loaders switch.
    """

    def __init__(
        self,
        locations: pd.DataFrame,
        image_size: int,
        batch_size: int = 32,
        num_workers: int = 0,
        augment: str = "finetune",
        mirror_p: float = 0.0,
        unfreeze_at_epoch: int | None = None,
        cache_dir: str | Path | None = None,
        backbone_name: str = "",
        feature_engine: str = "torch",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        super().__init__()
        if augment not in AUGMENT_CHOICES:
            raise ValueError(f"augment must be one of {AUGMENT_CHOICES}")
        self.locations = locations.reset_index(drop=True)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.mirror_p = mirror_p
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.cache_dir = cache_dir
        self.backbone_name = backbone_name
        self.feature_engine = feature_engine  # fills the feature cache: torch, onnx or auto (src.export)
        self.mean, self.std = tuple(mean), tuple(std)  # the backbone's input normalisation
        self._features: dict[str, torch.Tensor] = {}

    def split(self, name: str) -> pd.DataFrame:
        """The rows of split `name` ('train', 'val' or 'test')."""
        return self.locations[self.locations["split"] == name].reset_index(drop=True)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def frozen_epoch(self) -> bool:
        """Whether the backbone is frozen in the current epoch."""
        return self.unfreeze_at_epoch is None or self._epoch() < self.unfreeze_at_epoch

    def uses_cache(self, split: str) -> bool:
        """Whether `split`'s loader serves cached features in the current epoch."""
        if self.cache_dir is None or not self.frozen_epoch() or split == "test":
            return False
        return split == "val" or self.augment != "always"

    def _augmented(self) -> bool:
        return self.augment == "always" or (self.augment == "finetune" and not self.frozen_epoch())

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        in_memory = isinstance(dataset, FeatureDataset)  # worker processes would only add start-up time
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=0 if in_memory else self.num_workers,
            pin_memory=torch.cuda.is_available(),
            # workers live across epochs; the loaders are rebuilt when the cache/augmentation switches
            persistent_workers=not in_memory and self.num_workers > 0,
        )

    def prepare_data(self) -> None:
        """Fill the feature cache of the splits that use it now, once (Lightning calls this on
        rank 0 of each node only, the other processes wait, then read the cache)."""
        for split in ("train", "val"):
            if self.uses_cache(split):
                self._fill_cache(split)

    def _cache(self) -> FeatureCache:
        return FeatureCache(self.cache_dir, self.backbone_name, self.trainer.lightning_module.backbone,
                            self.image_size, preprocessing=repr(self.eval_transform()))

    def eval_transform(self) -> Callable:
        """The evaluation transform (cached features are computed with it)."""
        return eval_transform(self.image_size, self.mean, self.std)

    def _fill_cache(self, split: str) -> None:
        device = self.trainer.strategy.root_device  # in prepare_data the model is not on it yet
        backbone = self.trainer.lightning_module.backbone.to(device)
        image_dirs = self.split(split)["image_dir"].astype(str).tolist()
        cache = self._cache()
        extract = None  # ONNX Runtime exports the backbone on its first call, so only when entries are missing
        if resolve_engine(self.feature_engine, device) == "onnx":
            extract = OnnxFeatureExtractor(backbone, self.image_size, cache.directory / "backbone.onnx")
        computed = cache.compute_missing(
            image_dirs, backbone, partial(load_quadruplet, image_size=self.image_size, transform=self.eval_transform()),
            batch_size=self.batch_size, num_workers=self.num_workers, device=device, extract=extract,
        )
        log.info("feature cache (%s): %d computed, %d reused", split, computed, len(image_dirs) - computed)

    def cached_features(self, split: str) -> torch.Tensor:
        """[N, 4, D] backbone features of `split`, computed into the cache when missing, loaded once."""
        if split not in self._features:
            if self.trainer.world_size == 1:  # under DDP prepare_data filled it; ranks must not race
                self._fill_cache(split)
            self._features[split] = self._cache().load_all(self.split(split)["image_dir"].astype(str).tolist())
        return self._features[split]

    def _dataset(self, split: str, train: bool) -> Dataset:
        locations = self.split(split)
        if self.uses_cache(split):
            return FeatureDataset(locations, self.cached_features(split))
        if train and self._augmented():
            return QuadrupletDataset(locations, self.image_size, train_transform(self.image_size, self.mean, self.std),
                                     self.mirror_p)
        return QuadrupletDataset(locations, self.image_size, self.eval_transform())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train", train=True), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", train=False), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", train=False), shuffle=False)
