"""The data flags of the commands that read dataset dirs (enrich, train, analyze) and their defaults.

Plain argparse, no pandas or geopandas: a command's --help and argument errors need only this module.
`src.data.enrich.enrich_from_args` reads the flags.
"""

import argparse
from pathlib import Path

from src.core.choices import CELL_KINDS, SPLIT_BY
from src.core.paths import IMAGE_CHECK_CACHE_DIR

DEFAULT_SPLIT = (0.8, 0.1, 0.1)
DEFAULT_SPACINGS = (0.25, 0.5, 1.0, 2.0)  # the grid spacings of src.analyze's oracle table


def add_locations_argument(parser: argparse.ArgumentParser) -> None:
    """--locations CSV: reuse an enriched CSV instead of reading --dataset-dirs (train, analyze)."""
    parser.add_argument("--locations", type=Path, default=None, metavar="CSV",
                        help="reuse this enriched CSV (src.enrich --out, or a run's version_N/locations.csv): its "
                             "locations and split, no image re-checked; instead of --dataset-dirs (default: none)")


def add_enrich_arguments(parser: argparse.ArgumentParser, require_dataset: bool = False) -> None:
    """The data flags shared by every command that reads dataset dirs (enrich, train)."""
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
    group.add_argument("--check-cache", type=Path, default=IMAGE_CHECK_CACHE_DIR, metavar="DIR",
                       help="remember image checks here, keyed by path, size and mtime, so unchanged images are "
                            "not re-opened (default: data/cache/image_checks)")
    group.add_argument("--no-check-cache", dest="check_cache", action="store_const", const=None,
                       help="check every image again and remember nothing")
