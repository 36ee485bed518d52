"""Oracle error of square grid cells vs adaptive (k-means) cells at matched class counts.

    python -m benchmarks.geocells --coordinates CSV [--seed 0] [--targets 30 55 115 205]

CSV holds uuid,latitude,longitude (e.g. ../shared/data/lumen_coordinates.csv; extra columns are ignored).
The locations get the seeded 80/10/10 split of src.enrich. For each target class count, the grid spacing
whose class count on the train locations comes closest is found by bisection; the adaptive cells are then
fitted to the same train locations with exactly that many classes. The oracle predicts every test location
at its own class's centroid (weighted: the train mean, the default; plain and clipped also shown): what
the cells alone cost a perfect classifier. A density-driven alternative, a quadtree (squares in EPSG:3766
split in four while they hold more than a cap of train locations, the cap bisected to the same class
count), is measured beside them with weighted centroids. The last line is grid km / adaptive km at the
last target.
"""

import argparse
import time

import numpy as np
import pandas as pd
import shapely
from tabulate import tabulate

from src.core import geo
from src.data.enrich import locate_locations, split_locations
from src.core.errors import run_cli
from src.data.cells import CellSpec, build_grid
from src.core.choices import CENTROID_KINDS
from src.data.locations import read_coordinates
from src.evaluation.analysis import oracle_errors

SPACING_RANGE = (0.05, 3.0)  # degrees searched for a grid with the target class count
BISECTION_STEPS = 12


def read_coordinates_table(path) -> pd.DataFrame:
    """uuid, latitude, longitude of a coordinates CSV (src.data.locations' reader; bad rows skipped and listed)."""
    rows = read_coordinates(path, "--coordinates", "give a CSV with the columns uuid,latitude,longitude")
    table = rows.skip_bad("coordinates").drop(columns="line")
    return table.assign(dataset_dir="coordinates", image_dir="")


def oracle_km(locations: pd.DataFrame, split: np.ndarray, cells) -> tuple[int, dict[str, float]]:
    """(classes, mean km per centroid kind) of the test locations predicted at their class's centroid."""
    located, classes, _ = locate_locations(locations, split, cells)
    errors = oracle_errors(located[located["split"] == "test"])
    return len(classes), {kind: float(errors[kind].mean()) for kind in CENTROID_KINDS}


def quadtree_leaves(xy: np.ndarray, cap: int) -> list[tuple[float, float, float, np.ndarray]]:
    """Leaves (x0, y0, size, point indices) of a quadtree over `xy` split while a square holds > `cap` points.

    Empty quadrants are dropped, so every leaf holds at least one point (a class)."""
    origin = xy.min(0)
    stack = [(origin[0], origin[1], float((xy.max(0) - origin).max()) * (1 + 1e-9) + 1.0, np.arange(len(xy)))]
    leaves = []
    while stack:
        x0, y0, size, index = stack.pop()
        if len(index) <= cap or size < 10.0:  # 10 m: duplicates cannot be split further
            leaves.append((x0, y0, size, index))
            continue
        half = size / 2
        east, north = xy[index, 0] >= x0 + half, xy[index, 1] >= y0 + half
        for dx in (0, 1):
            for dy in (0, 1):
                part = index[(east == dx) & (north == dy)]
                if len(part):
                    stack.append((x0 + dx * half, y0 + dy * half, half, part))
    return leaves


def quadtree_oracle(train: pd.DataFrame, test: pd.DataFrame, target: int) -> tuple[int, float]:
    """(classes, weighted-centroid oracle mean km of `test`) of the quadtree whose leaf count is nearest `target`."""
    xy = np.column_stack(geo.project(train["latitude"], train["longitude"]))
    low, high, tried = 1, len(xy), {}
    while low <= high:  # the leaf count falls as the cap grows
        cap = (low + high) // 2
        tried[cap] = quadtree_leaves(xy, cap)
        if len(tried[cap]) > target:
            low = cap + 1
        else:
            high = cap - 1
    leaves = min(tried.values(), key=lambda leaves: abs(len(leaves) - target))
    boxes = shapely.box(*np.array([(x0, y0, x0 + size, y0 + size) for x0, y0, size, _ in leaves]).T)
    centres = np.array([xy[index].mean(0) for *_, index in leaves])
    test_x, test_y = geo.project(test["latitude"], test["longitude"])
    # the leaf holding each test point (distance 0), else the nearest leaf: an empty quadrant has no class
    leaf = shapely.STRtree(boxes).query_nearest(shapely.points(test_x, test_y), all_matches=False)[1]
    lat, lng = geo.unproject(centres[leaf, 0], centres[leaf, 1])
    return len(leaves), float(geo.haversine_km(test["latitude"], test["longitude"], lat, lng).mean())


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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.geocells", allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--coordinates", required=True, help="CSV with uuid,latitude,longitude")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of k-means (default: 0)")
    parser.add_argument("--targets", type=int, nargs="+", default=[30, 55, 115, 205],
                        help="class counts compared (default: 30 55 115 205)")
    args = parser.parse_args(argv)

    locations = read_coordinates_table(args.coordinates)
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
        n_quadtree, quadtree_km = quadtree_oracle(train, locations[split == "test"], n_grid)
        rows.append([target, spacing, n_grid, grid_km["weighted"], n_adaptive, adaptive_km["weighted"],
                     f"{n_quadtree}: {quadtree_km:.2f}", f"{grid_km['plain']:.1f} / {adaptive_km['plain']:.1f}",
                     f"{grid_km['clipped']:.1f} / {adaptive_km['clipped']:.1f}", seconds,
                     grid_km["weighted"] / adaptive_km["weighted"]])
    print(tabulate(rows, headers=["target", "grid deg", "grid classes", "grid km", "adaptive classes", "adaptive km",
                                  "quadtree classes: km", "plain km grid / adaptive", "clipped km grid / adaptive",
                                  "k-means+Voronoi s", "grid/adaptive"],
                   tablefmt="github", floatfmt=("", ".3f", "", ".2f", "", ".2f", "", "", "", ".1f", ".2f")))
    print("km: mean oracle error of the test locations at their class's weighted (train-mean) centroid")
    print(f"ratio: {rows[-1][-1]:.2f}x")


if __name__ == "__main__":
    run_cli(main)
