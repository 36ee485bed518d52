"""Points sampled on Croatia's land, uniform by area, to look up Street View panoramas at.

Rejection sampling in EPSG:3766 (metres), vectorised over batches; `thin` keeps every point at least a
distance from every other kept point and from the locations of excluded dataset dirs.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import shapely

from src.core import geo
from src.core.errors import UserError
from src.core.files import write_text
from src.data.ingest import read_table

MAX_POINTS = 10_000_000
MAX_ROUNDS = 50  # candidate batches before giving up on --min-distance-m
FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "tif", "tiff")  # matplotlib writes these


def sample_xy(n: int, rng: np.random.Generator, mainland_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform by area on Croatia's land, as EPSG:3766 x/y in metres."""
    border = geo.load_border(mainland_only, geo.CROATIA_CRS)
    min_x, min_y, max_x, max_y = border.bounds
    fill = border.area / ((max_x - min_x) * (max_y - min_y))
    xs, ys, have = [], [], 0
    while have < n:
        m = int((n - have) / fill * 1.1) + 16
        x, y = rng.uniform(min_x, max_x, m), rng.uniform(min_y, max_y, m)
        inside = shapely.contains_xy(border, x, y)
        xs.append(x[inside])
        ys.append(y[inside])
        have += int(inside.sum())
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def sample_land_points(n: int, rng: np.random.Generator, mainland_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n points (lat, lng) in degrees, uniform by area on Croatia's land."""
    return geo.unproject(*sample_xy(n, rng, mainland_only))


def close_pairs(x: np.ndarray, y: np.ndarray, distance_m: float) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i, j), i < j, of points closer than distance_m (an STRtree over the points)."""
    points = shapely.points(x, y)
    i, j = shapely.STRtree(points).query(points, predicate="dwithin", distance=distance_m)
    keep = i < j
    i, j = i[keep], j[keep]
    exact = np.hypot(x[i] - x[j], y[i] - y[j]) < distance_m  # dwithin is <=; the rule is "at least d apart"
    return i[exact], j[exact]


def thin(x: np.ndarray, y: np.ndarray, distance_m: float, n_fixed: int = 0) -> np.ndarray:
    """Keep mask: greedy in index order, each kept point at least distance_m from every earlier kept point.

    The first n_fixed points are always kept (existing locations); a candidate near one is dropped.
    Vectorised in rounds: a point is decided once no undecided earlier point conflicts with it.
    """
    n = len(x)
    state = np.zeros(n, np.int8)  # 0 undecided, 1 kept, -1 dropped
    state[:n_fixed] = 1
    if distance_m <= 0 or n == 0:
        return np.ones(n, bool)
    i, j = close_pairs(x, y, distance_m)
    while True:
        dropped = np.zeros(n, bool)
        dropped[j[state[i] == 1]] = True  # j comes later than a kept i
        state[dropped & (state == 0)] = -1
        live = (state[i] == 0) & (state[j] == 0)
        i, j = i[live], j[live]
        blocked = np.zeros(n, bool)
        blocked[j] = True  # an undecided earlier neighbour may still be kept
        ready = (state == 0) & ~blocked
        if not ready.any():
            break
        state[ready] = 1
    return state == 1


def excluded_locations(dataset_dirs) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes and longitudes of every valid row of the dataset dirs' data.csv files."""
    lats, lngs = [np.empty(0)], [np.empty(0)]
    for dataset_dir in dataset_dirs:
        if not Path(dataset_dir).is_dir():
            raise UserError(f"--exclude-dataset-dirs {dataset_dir}: no such dataset directory")
        table = read_table(Path(dataset_dir) / "data.csv").table.dropna(subset=["latitude", "longitude"])
        lats.append(table["latitude"].to_numpy(float))
        lngs.append(table["longitude"].to_numpy(float))
    return np.concatenate(lats), np.concatenate(lngs)


def sample_points(n: int, seed: int = 0, mainland_only: bool = False, min_distance_m: float = 0.0,
                  exclude_lat=(), exclude_lng=()) -> pd.DataFrame:
    """point_id, latitude, longitude of n land points (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if min_distance_m <= 0:
        x, y = sample_xy(n, rng, mainland_only)
    else:
        fixed_x, fixed_y = geo.project(np.asarray(exclude_lat, float), np.asarray(exclude_lng, float))
        fixed_x, fixed_y = np.atleast_1d(fixed_x), np.atleast_1d(fixed_y)
        x, y = np.empty(0), np.empty(0)
        for _ in range(MAX_ROUNDS):
            cx, cy = sample_xy(int((n - len(x)) * 1.3) + 64, rng, mainland_only)
            all_x = np.concatenate([fixed_x, x, cx])
            all_y = np.concatenate([fixed_y, y, cy])
            keep = thin(all_x, all_y, min_distance_m, n_fixed=len(fixed_x) + len(x))[len(fixed_x):]
            had = len(x)
            x, y = np.concatenate([x, cx])[keep][:n], np.concatenate([y, cy])[keep][:n]
            if len(x) == n or len(x) == had:  # done, or a whole batch found no room: the land is full
                break
        if len(x) < n:
            raise UserError(f"--min-distance-m {min_distance_m:g}: only {len(x)} of {n} points fit on the land "
                            "that far apart; ask for fewer points or a smaller distance")
    lat, lng = geo.unproject(x, y)
    return pd.DataFrame({"point_id": np.arange(n), "latitude": np.round(lat, 7), "longitude": np.round(lng, 7)})


def write_points(points: pd.DataFrame, path: Path) -> None:
    """The points CSV, atomically (formatted by hand: 4-5x faster than DataFrame.to_csv for 1M rows)."""
    rows = zip(points["point_id"].tolist(), points["latitude"].tolist(), points["longitude"].tolist())
    write_text("point_id,latitude,longitude\n" + "".join([f"{i},{a:.7f},{b:.7f}\n" for i, a, b in rows]), path)


def plot_points(points: pd.DataFrame, path: Path, exclude_lat=(), exclude_lng=()) -> Path:
    """The points (and excluded locations) over Croatia's border."""
    from src.evaluation.plots import croatia_axes, save_figure  # matplotlib only when a figure is drawn

    figure, axes = croatia_axes(f"{len(points):,} sampled points")
    size = float(np.clip(3000 / max(len(points), 1), 0.05, 8))
    if len(exclude_lat):
        axes.scatter(exclude_lng, exclude_lat, s=size, color="tab:grey", label=f"excluded ({len(exclude_lat):,})")
    axes.scatter(points["longitude"], points["latitude"], s=size, color="tab:red", label="sampled points")
    axes.legend(loc="lower left", markerscale=max(1.0, 4 / size))
    return save_figure(figure, path)
