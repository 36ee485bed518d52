"""Cells over Croatia as classes: a square degree grid or adaptive (k-means) cells; plain/clipped/weighted centroids.

Both kinds share one interface (`Cells`): `cells`, a GeoDataFrame indexed by cell id with each cell's
polygon (`geometry`, EPSG:4326) and its land part (`land`, EPSG:3766); `assign(lat, lng)`, the kept cell
of each point; `tag`, a short name for file names; `describe()`, rows for summaries.
"""

from dataclasses import dataclass
from functools import cached_property

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from src.core import geo
from src.data.config import CENTROID_PREFIX
from src.core.choices import CELL_KINDS

# clipped centroids are moved this far inside the land polygon, so they are inside, not on, the border
CLIP_INSET_M = 100.0
# adaptive cells: Voronoi regions are bounded by Croatia's bounding box grown by this margin (covers
# locations up to --max-outside-km outside the border)
VORONOI_MARGIN_M = 20_000.0
KMEANS_MAX_ITER = 300
KMEANS_BLOCK = 2**23  # distances per block (rows x centres): 64 MB of float64
SAMPLES_PER_CLASS = 32  # points per class spreading its probability over its cell (confidence regions)


class Cells:
    """What every kind of cells provides (see the module docstring): `kind`, `cells`, `spacing` (degrees,
    None unless a grid), `assign`, `tag`, `describe`."""

    kind = ""

    def assign(self, lat, lng) -> np.ndarray:
        raise NotImplementedError

    @property
    def tag(self) -> str:
        raise NotImplementedError

    def describe(self) -> list[tuple[str, object]]:
        raise NotImplementedError


@dataclass(frozen=True)
class Grid(Cells):
    """Square cells of `spacing` degrees from Croatia's lower-left bound; cell id = row * n_cols + col.

    `cells` holds the kept cells (those intersecting Croatia), indexed by cell id, with their square
    (`geometry`, EPSG:4326), its `col`/`row` and the square's land part (`land`, EPSG:3766).
    """

    spacing: float
    min_lng: float
    min_lat: float
    n_cols: int
    n_rows: int
    cells: gpd.GeoDataFrame
    kind = "grid"

    @cached_property
    def _cell_tree(self) -> shapely.STRtree:
        return shapely.STRtree(self.cells.to_crs(geo.CROATIA_CRS).geometry.values)

    def cell_of(self, lat, lng) -> np.ndarray:
        """Grid cell id of each point by index arithmetic; -1 outside the grid's extent."""
        lat, lng = np.asarray(lat, float), np.asarray(lng, float)
        col = np.floor((lng - self.min_lng) / self.spacing).astype(np.int64)
        row = np.floor((lat - self.min_lat) / self.spacing).astype(np.int64)
        inside = (col >= 0) & (col < self.n_cols) & (row >= 0) & (row < self.n_rows)
        return np.where(inside, row * self.n_cols + col, -1)

    def assign(self, lat, lng) -> np.ndarray:
        """Kept cell id of each point; points in a dropped cell or off the grid get the nearest kept cell."""
        cell = self.cell_of(lat, lng)
        lost = ~np.isin(cell, self.cells.index.to_numpy())
        if lost.any():
            x, y = geo.project(np.asarray(lat)[lost], np.asarray(lng)[lost])
            nearest = self._cell_tree.query_nearest(shapely.points(x, y), all_matches=False)[1]
            cell[lost] = self.cells.index.to_numpy()[nearest]
        return cell

    @property
    def tag(self) -> str:
        return f"grid{self.spacing:g}"

    def describe(self) -> list[tuple[str, object]]:
        return [("cells", f"square grid, {self.spacing:g} deg"), ("grid cells", self.n_cols * self.n_rows),
                ("cells intersecting Croatia", len(self.cells))]


def build_grid(spacing: float = 0.5, mainland_only: bool = False) -> Grid:
    """The grid over Croatia's bounds; keeps the cells that intersect Croatia."""
    if not spacing > 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    border = geo.load_border(mainland_only)
    min_lng, min_lat, max_lng, max_lat = border.bounds
    n_cols = int(np.ceil((max_lng - min_lng) / spacing))
    n_rows = int(np.ceil((max_lat - min_lat) / spacing))
    row, col = np.divmod(np.arange(n_rows * n_cols), n_cols)
    squares = shapely.box(min_lng + col * spacing, min_lat + row * spacing,
                          min_lng + (col + 1) * spacing, min_lat + (row + 1) * spacing)
    keep = shapely.intersects(border, squares)
    cells = gpd.GeoDataFrame({"col": col[keep], "row": row[keep]}, geometry=squares[keep], crs=geo.WGS84,
                             index=pd.Index(np.flatnonzero(keep), name="cell"))
    border_m = geo.load_border(mainland_only, geo.CROATIA_CRS)
    cells["land"] = shapely.intersection(border_m, cells.to_crs(geo.CROATIA_CRS).geometry.values)
    return Grid(spacing, min_lng, min_lat, n_cols, n_rows, cells)


@dataclass(frozen=True)
class AdaptiveCells(Cells):
    """Voronoi cells of `seeds` (EPSG:3766 x/y, one row per cell id 0..K-1) clipped to Croatia's border.

    The seeds are k-means centres of the train locations (see build_adaptive); a point belongs to the cell
    of its nearest seed, which is the Voronoi polygon holding it, so `assign` needs no fallback.
    """

    seeds: np.ndarray
    cells: gpd.GeoDataFrame
    kind = "adaptive"
    spacing = None

    @cached_property
    def _seed_tree(self) -> shapely.STRtree:
        return shapely.STRtree(shapely.points(self.seeds))

    def assign(self, lat, lng) -> np.ndarray:
        """Cell id of each point: its nearest seed in EPSG:3766 (inside or outside Croatia)."""
        x, y = geo.project(np.atleast_1d(lat), np.atleast_1d(lng))
        nearest = self._seed_tree.query_nearest(shapely.points(x, y), all_matches=False)[1]
        return self.cells.index.to_numpy()[nearest]

    @property
    def tag(self) -> str:
        return f"adaptive{len(self.cells)}"

    def describe(self) -> list[tuple[str, object]]:
        return [("cells", f"adaptive (k-means of train locations), {len(self.cells)} cells")]


def _nearest_centre(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of and squared distance to the nearest centre of each point (in blocks of KMEANS_BLOCK distances)."""
    label = np.empty(len(points), np.int64)
    distance = np.empty(len(points))
    centre_norm = (centres ** 2).sum(1)
    rows = max(1, KMEANS_BLOCK // len(centres))
    for start in range(0, len(points), rows):
        block = points[start:start + rows]
        d2 = (block ** 2).sum(1)[:, None] - 2 * block @ centres.T + centre_norm[None, :]
        label[start:start + len(block)] = d2.argmin(1)
        distance[start:start + len(block)] = np.maximum(d2[np.arange(len(block)), label[start:start + len(block)]], 0)
    return label, distance


def kmeans(points, k: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: (centres k x 2, label of each point).

    Deterministic for the same points (in any order) and seed. Empty clusters are re-seeded at the point
    farthest from its centre. Needs at least `k` distinct points.
    """
    points = np.asarray(points, float)
    # distinct points, sorted: the canonical order that makes the result independent of the row order
    distinct, inverse, weight = np.unique(points, axis=0, return_inverse=True, return_counts=True)
    if not 1 <= k <= len(distinct):
        raise ValueError(f"k-means needs 1 <= k <= {len(distinct)} distinct points, got k={k}")
    rng = np.random.default_rng(seed)
    offset = distinct.mean(0)  # centred coordinates keep the expanded squared distances accurate
    data = distinct - offset
    centres = np.empty((k, 2))
    centres[0] = data[rng.choice(len(data), p=weight / weight.sum())]
    d2 = ((data - centres[0]) ** 2).sum(1)
    for i in range(1, k):  # k-means++: the next centre with probability ~ weight x squared distance
        p = weight * d2
        centres[i] = data[rng.choice(len(data), p=p / p.sum())]
        d2 = np.minimum(d2, ((data - centres[i]) ** 2).sum(1))
    label = np.full(len(data), -1)
    for _ in range(max_iter):
        new_label, d2 = _nearest_centre(data, centres)
        if np.array_equal(new_label, label):
            break
        label = new_label
        counts = np.bincount(label, weights=weight, minlength=k)
        for empty in np.flatnonzero(counts == 0):
            far = int(np.argmax(d2))
            label[far], d2[far] = empty, 0.0
            counts = np.bincount(label, weights=weight, minlength=k)
        centres = np.column_stack([np.bincount(label, weights=weight * data[:, axis], minlength=k) / counts
                                   for axis in (0, 1)])
    return centres + offset, label[inverse.ravel()]


def _voronoi_cells(seeds: np.ndarray, mainland_only: bool) -> gpd.GeoDataFrame:
    """The Voronoi polygon of each seed within the padded bounding box, and its land part (EPSG:3766)."""
    border_m = geo.load_border(mainland_only, geo.CROATIA_CRS)
    box = shapely.box(*border_m.bounds).buffer(VORONOI_MARGIN_M, join_style="mitre")
    if len(seeds) == 1:
        regions = np.array([box])
    else:
        diagram = shapely.voronoi_polygons(shapely.multipoints(seeds), extend_to=box, ordered=True)
        regions = shapely.intersection(np.asarray(shapely.get_parts(diagram)), box)
    if len(regions) != len(seeds):
        raise ValueError("adaptive cells: two cell seeds coincide")
    return gpd.GeoDataFrame({"land": shapely.intersection(border_m, regions)}, geometry=regions,
                            crs=geo.CROATIA_CRS, index=pd.Index(np.arange(len(seeds)), name="cell"))


def build_adaptive(x, y, n_cells: int, seed: int = 0, mainland_only: bool = False) -> AdaptiveCells:
    """Adaptive cells: k-means of the (train) locations at EPSG:3766 `x`/`y` into `n_cells` clusters.

    Cells whose Voronoi polygon holds no land (seeds of locations just outside the border) are dropped
    and the Voronoi diagram redrawn without them, so every cell id 0..K-1 has land and the polygons
    partition the padded bounding box.
    """
    points = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    seeds = kmeans(points, n_cells, seed)[0]
    while True:
        cells = _voronoi_cells(seeds, mainland_only)
        has_land = ~shapely.is_empty(cells["land"].to_numpy())
        if has_land.all() or not has_land.any():
            break
        seeds = seeds[has_land]
    cells = cells.to_crs(geo.WGS84)  # the polygon in degrees like the grid's squares; `land` stays in metres
    return AdaptiveCells(seeds, cells)


@dataclass(frozen=True)
class CellSpec:
    """How to build a run's cells: `kind` grid (`spacing` degrees) or adaptive (`n_classes` k-means cells of
    the train locations; 0 matches the grid: as many cells as the `spacing` grid has classes)."""

    kind: str = "grid"
    spacing: float = 0.5
    n_classes: int = 0
    mainland_only: bool = False

    def __post_init__(self):
        if self.kind not in CELL_KINDS:
            raise ValueError(f"cells must be one of {CELL_KINDS}, got {self.kind}")

    def grid(self) -> Grid:
        """The square grid at `spacing` (the cells of kind grid; the split blocks of --split-by cell)."""
        return build_grid(self.spacing, self.mainland_only)

    def build(self, train_lat, train_lng, seed: int = 0) -> Cells:
        """The cells for these train locations (a grid ignores them); deterministic for the same data and seed."""
        grid = self.grid()
        if self.kind == "grid":
            return grid
        n_cells = self.n_classes or len(np.unique(grid.assign(train_lat, train_lng)))
        x, y = geo.project(train_lat, train_lng)
        n_distinct = len(np.unique(np.column_stack([x, y]), axis=0))
        return build_adaptive(x, y, min(n_cells, n_distinct), seed, self.mainland_only)


def class_table(grid: Cells, cell: np.ndarray, crs_x: np.ndarray, crs_y: np.ndarray) -> pd.DataFrame:
    """One row per class (kept cell holding >= 1 of the given TRAIN locations), indexed 0..C-1 by cell id.

    `cell`, `crs_x`, `crs_y` describe the train locations. Columns: cell, n_train and, for
    each centroid kind, `<prefix>_x/_y` (EPSG:3766) and `<prefix>_lat/_lng`:
    plain (`centroid_*`): the area centroid of the cell's land part;
    clipped: the plain centroid, or the nearest point of the cell's land when the plain one is at sea;
    weighted: the mean of the class's train locations in EPSG:3766.
    """
    cells, inverse = np.unique(cell, return_inverse=True)
    n_train = np.bincount(inverse)
    table = pd.DataFrame({"cell": cells, "n_train": n_train})
    table["weighted_x"] = np.bincount(inverse, weights=crs_x) / n_train
    table["weighted_y"] = np.bincount(inverse, weights=crs_y) / n_train
    land = grid.cells.loc[cells, "land"].to_numpy()
    plain = shapely.centroid(land)
    clipped = plain.copy()
    at_sea = ~shapely.contains(land, plain)
    inset = shapely.buffer(land[at_sea], -CLIP_INSET_M)
    target = np.where(shapely.is_empty(inset), land[at_sea], inset)
    clipped[at_sea] = shapely.get_point(shapely.shortest_line(target, plain[at_sea]), 0)
    table["centroid_x"], table["centroid_y"] = shapely.get_x(plain), shapely.get_y(plain)
    table["clipped_x"], table["clipped_y"] = shapely.get_x(clipped), shapely.get_y(clipped)
    for prefix in CENTROID_PREFIX.values():
        table[f"{prefix}_lat"], table[f"{prefix}_lng"] = geo.unproject(table[f"{prefix}_x"], table[f"{prefix}_y"])
    table.index.name = "class"
    return table


def class_samples(table: pd.DataFrame, grid: Cells, per_class: int = SAMPLES_PER_CLASS, seed: int = 0) -> np.ndarray:
    """Points [C, per_class, 2] (EPSG:3766) drawn uniformly over the land part of each class's cell (seeded):
    where a class's probability lies, for the confidence regions (`src.evaluation.calibration`). A cell without
    land area gets its plain centroid repeated."""
    land = gpd.GeoSeries(grid.cells.loc[table["cell"].to_numpy(), "land"].to_numpy(), crs=geo.CROATIA_CRS)
    samples = np.repeat(table[["centroid_x", "centroid_y"]].to_numpy(float)[:, None, :], per_class, axis=1)
    has_area = (land.area > 0).to_numpy()
    if has_area.any():
        drawn = land[has_area].sample_points(per_class, rng=np.random.default_rng(seed))
        samples[has_area] = np.stack([shapely.get_coordinates(points) for points in drawn])
    return samples


def nearest_class(table: pd.DataFrame, grid: Cells, cell: np.ndarray, lat, lng) -> np.ndarray:
    """Class index of each point in `cell`: the cell's class, else the class whose cell polygon is nearest."""
    label = pd.Series(table.index, index=table["cell"]).reindex(cell).to_numpy(dtype=float, copy=True)
    missing = np.isnan(label)
    if missing.any():
        squares = grid.cells.loc[table["cell"]].to_crs(geo.CROATIA_CRS).geometry.values
        x, y = geo.project(np.asarray(lat)[missing], np.asarray(lng)[missing])
        label[missing] = shapely.STRtree(squares).query_nearest(shapely.points(x, y), all_matches=False)[1]
    return label.astype(np.int64)
