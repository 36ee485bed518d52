"""The LightningDataModule over the enrich stage: train/val/test loaders of quadruplets or cached features.

A batch is a dict: `views` [B, 4, 3, H, W] (or `features` [B, 4, D] from the feature cache while
the backbone is frozen, and at test time when it was never trained), `label` [B] (class index), `xy` [B, 2]
(EPSG:3766 metres), `lat`/`lng` [B] (degrees) and `index` [B] (row in the split's table).
"""

import logging
from typing import Callable

import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from src.data.config import AUGMENT_CHOICES, DataConfig, LoaderConfig
from src.data.features import FeatureCache
from src.data.quadruplets import QuadrupletFolders, eval_transform, mirror_views, train_transform

log = logging.getLogger(__name__)


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
        self.folders = QuadrupletFolders(locations["image_dir"].astype(str).tolist(),
                                         {"views": (image_size, transform)}, validate=False)
        self.targets = _targets(locations)
        self.mirror_p = mirror_p

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        views = self.folders[index][1].views["views"]
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

    While the backbone is frozen (epochs before `loader.unfreeze_at_epoch`) and `loader.cache_dir` is set,
    the train and val loaders serve cached backbone features instead of images (the cache is filled on
    first use with the model's own backbone); with augmentation `always` training uses images
    throughout. A run fits each phase on its own (`src.model.finetune`), `loader.first_epoch` set to the
    phase's first epoch; a single fit across the unfreeze epoch needs `reload_dataloaders_every_n_epochs=1`.
    The test loader serves the cached features too when the tested backbone's weights are the ones the cache
    was filled with (a backbone never trained in the run; the test never augments), and images through the
    backbone otherwise (fine-tuned): the cache's key holds the weights, so no stale entry can be read.

    `data` (the DataConfig the locations came from) and the test split's (uuid, folder) pairs are saved
    in every checkpoint (Lightning's `datamodule_hyper_parameters`): analyze and predict read them there.
    """

    def __init__(self, locations: pd.DataFrame, loader: LoaderConfig, data: DataConfig | None = None):
        super().__init__()
        if loader.augment not in AUGMENT_CHOICES:
            raise ValueError(f"augment must be one of {AUGMENT_CHOICES}")
        self.locations = locations.reset_index(drop=True)
        self.loader = loader
        test = self.split("test")
        self.save_hyperparameters({"data": None if data is None else data.hparams(),
                                   "test_locations": test[["uuid", "image_dir"]].astype(str).values.tolist()},
                                  ignore=["locations"], logger=False)
        self._features: dict[str, torch.Tensor] = {}
        self._feature_cache: FeatureCache | None = None
        self._filled: set[str] = set()  # splits whose cache entries were filled by this module

    def split(self, name: str) -> pd.DataFrame:
        """The rows of split `name` ('train', 'val' or 'test')."""
        return self.locations[self.locations["split"] == name].reset_index(drop=True)

    def _epoch(self) -> int:
        # prepare_data and the loaders run before a resumed fit's loop state is restored: its first epoch comes from
        # the config
        return max(self.trainer.current_epoch if self.trainer is not None else 0, self.loader.first_epoch)

    def frozen_epoch(self) -> bool:
        """Whether the backbone is frozen in the current epoch."""
        return self.loader.unfreeze_at_epoch is None or self._epoch() < self.loader.unfreeze_at_epoch

    def uses_cache(self, split: str) -> bool:
        """Whether `split`'s loader serves cached features in the current epoch (while fitting, for the test
        split: whether prepare_data fills its entries, see `frozen_throughout`)."""
        if self.loader.cache_dir is None:
            return False
        if split == "test":
            return self.test_uses_cache() if self.trainer is not None and self.trainer.testing \
                else self.frozen_throughout()
        if not self.frozen_epoch():
            return False
        return split == "val" or self.loader.augment != "always"

    def frozen_throughout(self) -> bool:
        """Whether the backbone stays frozen in every epoch of the run (no unfreeze epoch before max_epochs):
        then prepare_data fills the test split's entries along with the train and val ones."""
        unfreeze, epochs = self.loader.unfreeze_at_epoch, self.trainer.max_epochs if self.trainer else None
        return unfreeze is None or (epochs is not None and 0 <= epochs <= unfreeze)

    def test_uses_cache(self) -> bool:
        """Whether the test reads cached features: the run's cache exists and the tested backbone's weights are
        those it was keyed with (never trained), and, with several processes, prepare_data filled the test
        entries (`frozen_throughout`); else the test runs the images through the backbone."""
        if self.loader.cache_dir is None or self._feature_cache is None:
            return False
        if self.trainer.world_size > 1 and not self.frozen_throughout():
            return False
        return self._new_feature_cache().directory == self._feature_cache.directory

    def _augmented(self) -> bool:
        augment = self.loader.augment
        return augment == "always" or (augment == "finetune" and not self.frozen_epoch())

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        in_memory = isinstance(dataset, FeatureDataset)  # worker processes would only add start-up time
        workers = self.loader.num_workers
        return DataLoader(
            dataset,
            batch_size=self.loader.batch_size,
            shuffle=shuffle,
            num_workers=0 if in_memory else workers,
            pin_memory=torch.cuda.is_available(),
            # workers live across epochs; the loaders are rebuilt when the cache/augmentation switches
            persistent_workers=not in_memory and workers > 0,
        )

    def prepare_data(self) -> None:
        """Fill the feature cache of the splits that use it now (the test split's too when the backbone stays
        frozen throughout), once, in one pass (Lightning calls this on rank 0 of each node only, the other
        processes wait, then read the cache). trainer.test calls it again: it fills nothing then (with one
        process a test entry still missing is filled when the test loader is built)."""
        if self.trainer is not None and self.trainer.testing:
            return
        splits = [split for split in ("train", "val", "test") if self.uses_cache(split) and split not in self._filled]
        if splits:
            self._fill_cache(splits)

    def eval_transform(self) -> Callable:
        """The evaluation transform (cached features are computed with it)."""
        return eval_transform(self.loader.image_size, self.loader.mean, self.loader.std)

    def _new_feature_cache(self) -> FeatureCache:
        """The cache of the model's backbone as its weights are now (they are part of its key)."""
        return FeatureCache(self.loader.cache_dir, self.loader.backbone, self.trainer.lightning_module.backbone,
                            self.loader.image_size, preprocessing=repr(self.eval_transform()))

    @property
    def feature_cache(self) -> FeatureCache:
        """The cache of the model's (frozen) backbone; its `computed`/`reused` count this run's entries."""
        if self._feature_cache is None:
            self._feature_cache = self._new_feature_cache()
        return self._feature_cache

    def feature_cache_counts(self) -> dict[str, int] | None:
        """{"computed": n, "reused": m}: the cache entries this module computed and reused (None: no cache used)."""
        cache = self._feature_cache
        return None if cache is None else {"computed": cache.computed, "reused": cache.reused}

    def _fill_cache(self, splits: list[str]) -> None:
        """Compute the missing entries of `splits` in one pass; this process keeps their features (read or
        computed on the way), so it does not read them back."""
        from src.inference.engine import OnnxFeatureExtractor, resolve_engine  # noqa: PLC0415 (onnx: only here)

        device = self.trainer.strategy.root_device  # in prepare_data the model is not on it yet
        backbone = self.trainer.lightning_module.backbone.to(device)
        image_dirs = {split: self.split(split)["image_dir"].astype(str).tolist() for split in splits}
        every = [d for split in splits for d in image_dirs[split]]
        cache = self.feature_cache
        extract = None  # ONNX Runtime exports the backbone on its first call, so only when entries are missing
        if resolve_engine(self.loader.engine, device) == "onnx":
            extract = OnnxFeatureExtractor(backbone, self.loader.image_size, preprocessing=repr(self.eval_transform()))
        computed_before = cache.computed
        features = cache.features(every, backbone, self.eval_transform(), batch_size=self.loader.batch_size,
                                  num_workers=self.loader.num_workers, device=device, extract=extract)
        computed = cache.computed - computed_before
        log.info("feature cache (%s): %d computed, %d reused", ", ".join(splits), computed, len(set(every)) - computed)
        for split, part in zip(splits, features.split([len(image_dirs[split]) for split in splits])):
            self._features[split] = part
        self._filled.update(splits)

    def cached_features(self, split: str) -> torch.Tensor:
        """[N, 4, D] backbone features of `split`, computed into the cache when missing, loaded once."""
        if split not in self._features:
            if self.trainer.world_size == 1 and split not in self._filled:  # under DDP prepare_data filled it
                self._fill_cache([split])
            else:  # filled by another process
                self._features[split] = self.feature_cache.load_all(self.split(split)["image_dir"].astype(str).tolist())
        return self._features[split]

    def features_in_memory(self, cache_directory: str) -> dict[str, torch.Tensor]:
        """The [4, D] features this process holds (of the splits read or filled so far), by image dir, if they are
        those of the cache in `cache_directory` (the same backbone weights and preprocessing), else none."""
        if self._feature_cache is None or str(self._feature_cache.directory) != cache_directory:
            return {}
        return {image_dir: row for split, features in self._features.items()
                for image_dir, row in zip(self.split(split)["image_dir"].astype(str), features)}

    def _dataset(self, split: str, train: bool) -> Dataset:
        locations = self.split(split)
        if self.uses_cache(split):
            return FeatureDataset(locations, self.cached_features(split))
        size = self.loader.image_size
        if train and self._augmented():
            return QuadrupletDataset(locations, size, train_transform(size, self.loader.mean, self.loader.std),
                                     self.loader.mirror_p)
        return QuadrupletDataset(locations, size, self.eval_transform())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train", train=True), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", train=False), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", train=False), shuffle=False)
