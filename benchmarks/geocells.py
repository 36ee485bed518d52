"""Oracle error of square grid cells vs adaptive (k-means) cells at matched class counts.

    python -m benchmarks.geocells --coordinates CSV [--seed 0] [--targets 30 55 115 205]

CSV holds uuid,latitude,longitude (e.g. ../shared/data/lumen_coordinates.csv; extra columns are ignored).
The locations get the seeded 80/10/10 split of src.enrich. For each target class count, the grid spacing
whose class count on the train locations comes closest is found by bisection; the adaptive cells are then
fitted to the same train locations with exactly that many classes. The oracle predicts every test location
at its own class's centroid (weighted: the train mean, the default; plain and clipped also shown): what
the cells alone cost a perfect classifier. The last line is grid km / adaptive km at the last target.
"""

import argparse
import time

import numpy as np
import pandas as pd
from tabulate import tabulate

from src import geo
from src.enrich import locate_locations, split_locations
from src.errors import UserError, run_cli
from src.grid import CENTROID_PREFIX, CellSpec, build_grid

KINDS = ("weighted", "plain", "clipped")
SPACING_RANGE = (0.05, 3.0)  # degrees searched for a grid with the target class count
BISECTION_STEPS = 12


def read_coordinates(path) -> pd.DataFrame:
    """uuid, latitude, longitude of a coordinates CSV; a one-line UserError when columns are missing."""
    try:
        table = pd.read_csv(path, usecols=lambda c: c in ("uuid", "latitude", "longitude"))
    except (OSError, ValueError) as error:
        raise UserError(f"--coordinates {path}: cannot read it as CSV ({error})") from None
    missing = {"uuid", "latitude", "longitude"} - set(table.columns)
    if missing:
        raise UserError(f"--coordinates {path}: missing column(s) {', '.join(sorted(missing))}")
    table = table.dropna().drop_duplicates("uuid")
    return table.assign(uuid=table["uuid"].astype(str), dataset_dir="coordinates", image_dir="")


def oracle_km(locations: pd.DataFrame, split: np.ndarray, cells) -> tuple[int, dict[str, float]]:
    """(classes, mean km per centroid kind) of the test locations predicted at their class's centroid."""
    located, classes, _ = locate_locations(locations, split, cells)
    test = located[located["split"] == "test"]
    return len(classes), {kind: float(geo.haversine_km(test["latitude"], test["longitude"],
                                                       test[f"{CENTROID_PREFIX[kind]}_lat"],
                                                       test[f"{CENTROID_PREFIX[kind]}_lng"]).mean())
                          for kind in KINDS}


def grid_classes(spacing: float, lat, lng) -> int:
    return len(np.unique(build_grid(spacing).assign(lat, lng)))


def spacing_for(target: int, lat, lng) -> float:
    """The grid spacing whose class count on these locations is closest to `target` (bisection in log spacing)."""
    low, high = np.log(SPACING_RANGE[0]), np.log(SPACING_RANGE[1])  # many classes at low, few at high
    tried = {}
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        spacing = round(float(np.exp(middle)), 3)
        tried[spacing] = grid_classes(spacing, lat, lng)
        if tried[spacing] > target:
            low = middle
        else:
            high = middle
    return min(tried, key=lambda s: (abs(tried[s] - target), s))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.geocells", description=__doc__.splitlines()[0])
    parser.add_argument("--coordinates", required=True, help="CSV with uuid,latitude,longitude")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of k-means (default: 0)")
    parser.add_argument("--targets", type=int, nargs="+", default=[30, 55, 115, 205],
                        help="class counts compared (default: 30 55 115 205)")
    args = parser.parse_args(argv)

    locations = read_coordinates(args.coordinates)
    split = split_locations(locations, args.seed)
    train = locations[split == "train"]
    lat, lng = train["latitude"].to_numpy(), train["longitude"].to_numpy()
    print(f"{len(locations)} locations: {', '.join(f'{s} {(split == s).sum()}' for s in ('train', 'val', 'test'))}")
    rows = []
    for target in args.targets:
        spacing = spacing_for(target, lat, lng)
        n_grid, grid_km = oracle_km(locations, split, build_grid(spacing))
        start = time.perf_counter()
        adaptive = CellSpec("adaptive", spacing, n_grid).build(lat, lng, args.seed)
        seconds = time.perf_counter() - start
        n_adaptive, adaptive_km = oracle_km(locations, split, adaptive)
        rows.append([target, spacing, n_grid, grid_km["weighted"], n_adaptive, adaptive_km["weighted"],
                     grid_km["weighted"] / adaptive_km["weighted"], f"{grid_km['plain']:.1f} / {adaptive_km['plain']:.1f}",
                     f"{grid_km['clipped']:.1f} / {adaptive_km['clipped']:.1f}", seconds])
    print(tabulate(rows, headers=["target", "grid deg", "grid classes", "grid km", "adaptive classes", "adaptive km",
                                  "grid/adaptive", "plain km grid / adaptive", "clipped km grid / adaptive",
                                  "k-means+Voronoi s"],
                   tablefmt="github", floatfmt=("", ".3f", "", ".2f", "", ".2f", ".2f", "", "", ".1f")))
    print("km: mean oracle error of the test locations at their class's weighted (train-mean) centroid")
    print(f"ratio: {rows[-1][6]:.2f}x")


if __name__ == "__main__":
    run_cli(main)
