"""The data configuration: which locations (dataset dirs or an enriched CSV), which cells, which split.

Built once from the command line (`add_data_arguments` + `DataConfig.from_args`), saved in every checkpoint
by the DataModule (`hparams`, the keys older checkpoints stored among the model's hparams) and read back with
`DataConfig.from_hparams`, so `analyze` and `--resume` rebuild a run's exact locations.
"""

import argparse
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from src.core.choices import CELL_KINDS, SPLIT_BY
from src.core.errors import UserError
from src.core.flags import SEED_RULE, Rule, check_ranges
from src.core.paths import CHECK_CACHE_ENV, ROOT, default_check_cache

# column prefix of each centroid kind in the class table and the enriched CSV
CENTROID_PREFIX = {"plain": "centroid", "clipped": "clipped", "weighted": "weighted"}
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
DEFAULT_SPACINGS = (0.25, 0.5, 1.0, 2.0)  # the grid spacings of src.analyze's oracle table
SPACING_RANGE = (0.01, 10.0)  # degrees: below ~1 km cells the grid gets huge, above it is one cell
MAX_CLASSES = 5000  # adaptive cells: k-means cost grows with locations x classes
LOCATIONS_FILE = "locations.csv"  # a training run's enriched locations, in its version_N folder


def spacing_rule(name: str = "spacing") -> Rule:
    low, high = SPACING_RANGE
    return Rule(name, lambda v: low <= v <= high, f"a grid cell size in degrees between {low:g} and {high:g} (e.g. 0.5)")


@dataclass(frozen=True)
class DataConfig:
    """What decides a run's locations, split and cells. Paths are absolute strings."""

    dataset_dirs: tuple[str, ...] = ()
    locations_csv: str | None = None  # an enriched CSV reused instead of reading the dataset dirs
    cells: str = "grid"
    spacing: float = 0.5
    n_classes: int = 0
    seed: int = 0
    split: tuple[float, float, float] = DEFAULT_SPLIT
    split_by: str = "location"
    holdout_dirs: tuple[str, ...] = ()
    full_decode: bool = False
    max_outside_km: float = 10.0
    mainland_only: bool = False
    check_cache: str | None = field(default_factory=lambda: str(default_check_cache()))
    fold: tuple[int, int] | None = None  # (k, K): fold k of a K-fold cross-validation is the test split

    def validate(self) -> "DataConfig":
        """One-line UserErrors for values out of range; returns self."""
        check_ranges(self, [spacing_rule(), SEED_RULE,
                            Rule("n_classes", lambda v: 0 <= v <= MAX_CLASSES,
                                 f"a number of adaptive cells from 1 to {MAX_CLASSES} (0: as many as the --spacing "
                                 "grid has classes)", flag="--classes"),
                            Rule("max_outside_km", lambda v: 0 <= v < math.inf, "a distance in km >= 0 (e.g. 10)")])
        if self.cells not in CELL_KINDS:
            raise UserError(f"--cells {self.cells}: choose one of {', '.join(CELL_KINDS)}")
        if self.n_classes and self.cells == "grid":
            raise UserError(f"--classes {self.n_classes}: only for --cells adaptive; the grid's classes follow --spacing")
        if self.split_by not in SPLIT_BY:
            raise UserError(f"--split-by {self.split_by}: choose one of {', '.join(SPLIT_BY)}")
        unknown = [d for d in self.holdout_dirs if d not in self.dataset_dirs]
        if unknown and self.locations_csv is None:
            raise UserError(f"--holdout-dirs {' '.join(unknown)}: not among --dataset-dirs")
        return self

    def with_fold(self, k: int, n_folds: int) -> "DataConfig":
        return replace(self, fold=(k, n_folds))

    def hparams(self) -> dict[str, Any]:
        """The checkpoint form (the keys src.train has always saved; lists, not tuples)."""
        return {"seed": self.seed, "spacing": self.spacing, "dataset_dirs": list(self.dataset_dirs),
                "split_fractions": [float(f) for f in self.split], "holdout_dirs": list(self.holdout_dirs),
                "full_decode": self.full_decode, "max_outside_km": float(self.max_outside_km),
                "mainland_only": self.mainland_only, "cells": self.cells, "n_classes": int(self.n_classes),
                "split_by": self.split_by, "fold": None if self.fold is None else list(self.fold)}

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> "DataConfig":
        """The inverse of `hparams`. dataset_dirs, spacing and seed are required (KeyError without them); keys
        that older checkpoints lack, or hold as None, take the defaults."""
        defaults = cls()

        def get(key, default):
            value = hparams.get(key)
            return default if value is None else value

        fold = hparams.get("fold")
        return cls(dataset_dirs=tuple(map(str, hparams["dataset_dirs"])), spacing=float(hparams["spacing"]),
                   seed=int(hparams["seed"]), split=tuple(get("split_fractions", defaults.split)),
                   holdout_dirs=tuple(map(str, get("holdout_dirs", ()))),
                   full_decode=bool(get("full_decode", False)), max_outside_km=float(get("max_outside_km", 10.0)),
                   mainland_only=bool(get("mainland_only", False)), cells=str(get("cells", "grid")),
                   n_classes=int(get("n_classes", 0)), split_by=str(get("split_by", "location")),
                   fold=None if fold is None else tuple(fold))


def add_data_arguments(parser: argparse.ArgumentParser, require_dataset: bool = False) -> None:
    """The data flags shared by every command that reads dataset dirs (enrich, train, analyze)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset-dirs", nargs="+", type=Path, required=require_dataset, metavar="DIR",
                       help="LUMEN dataset dirs (data.csv + data/ or images/ with one folder per uuid)")
    group.add_argument("--cells", choices=CELL_KINDS, default="grid",
                       help="classes: squares of --spacing, or adaptive k-means cells of the train locations "
                            "(Voronoi polygons clipped to Croatia) (default: grid)")
    group.add_argument("--spacing", type=float, default=0.5,
                       help="grid cell size in degrees; also the blocks of --split-by cell (default: 0.5)")
    group.add_argument("--classes", "--n-classes", type=int, default=0, dest="n_classes", metavar="K",
                       help="number of adaptive cells; 0: as many as the --spacing grid has classes (default: 0)")
    group.add_argument("--seed", type=int, default=0, help="seed of the split, the cells and training (default: 0)")
    group.add_argument("--split", type=float, nargs=3, default=DEFAULT_SPLIT, metavar=("TRAIN", "VAL", "TEST"),
                       help="split fractions (default: 0.8 0.1 0.1)")
    group.add_argument("--split-by", choices=SPLIT_BY, default="location",
                       help="location: a seeded hash of each uuid decides its split; cell: whole --spacing grid "
                            "squares go to one split, so nearby locations never sit in train and test "
                            "(default: location)")
    group.add_argument("--holdout-dirs", nargs="+", type=Path, default=[], metavar="DIR",
                       help="dataset dirs used whole as the test split (default: none)")
    group.add_argument("--full-decode", action="store_true",
                       help="check images by decoding every pixel (default: header and end marker only)")
    group.add_argument("--max-outside-km", type=float, default=10.0,
                       help="reject points farther than this outside the border (default: 10)")
    group.add_argument("--mainland-only", action="store_true",
                       help="use the mainland polygon only, without islands (default: off)")
    check_cache = default_check_cache()
    shown = check_cache.relative_to(ROOT) if check_cache.is_relative_to(ROOT) else check_cache
    group.add_argument("--check-cache", type=Path, default=check_cache, metavar="DIR",
                       help="remember image checks here, keyed by path, size and mtime, so unchanged images are "
                            f"not re-opened (default: {shown}; ${CHECK_CACHE_ENV} when set)")
    group.add_argument("--no-check-cache", dest="check_cache", action="store_const", const=None,
                       help="check every image again and remember nothing")


def add_locations_argument(parser: argparse.ArgumentParser) -> None:
    """--locations CSV: reuse an enriched CSV instead of reading --dataset-dirs (train, analyze)."""
    parser.add_argument("--locations", type=Path, default=None, metavar="CSV",
                        help="reuse this enriched CSV (src.enrich --out, or a run's version_N/locations.csv): its "
                             "locations and split, no image re-checked; instead of --dataset-dirs (default: none)")


AUGMENT_CHOICES = ("none", "finetune", "always")


@dataclass(frozen=True)
class LoaderConfig:
    """The input pipeline: image size and normalisation, batches, workers, augmentation, the feature cache."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    batch_size: int = 32
    num_workers: int = 0
    augment: str = "finetune"  # colour jitter + random resized crop: never, once the backbone trains, always
    mirror_p: float = 0.0
    unfreeze_at_epoch: int | None = None  # epochs before it serve cached features (None: all of them)
    cache_dir: str | None = None  # the feature cache's folder; None: no cache
    backbone: str = ""  # the backbone's name, part of the cache's key
    engine: str = "torch"  # fills the feature cache: torch, onnx or auto (src.inference.engine)
    first_epoch: int = 0  # the fit's first epoch (a resumed run's, the fine-tuning phase's), before Lightning restores it
