"""A square degree grid over Croatia: cells as classes, cell assignment, plain/clipped/weighted centroids."""

from dataclasses import dataclass
from functools import cached_property

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from src import geo

CENTROID_KINDS = ("weighted", "clipped", "plain")
# column prefix of each centroid kind in the class table and the enriched CSV
CENTROID_PREFIX = {"plain": "centroid", "clipped": "clipped", "weighted": "weighted"}
# clipped centroids are moved this far inside the land polygon, so they are inside, not on, the border
CLIP_INSET_M = 100.0


@dataclass(frozen=True)
class Grid:
    """Square cells of `spacing` degrees from Croatia's lower-left bound; cell id = row * n_cols + col.

    `cells` holds the kept cells (those intersecting Croatia), indexed by cell id, with their square
    (`geometry`, EPSG:4326) and the square's land part (`land`, EPSG:3766).
    """

    spacing: float
    min_lng: float
    min_lat: float
    n_cols: int
    n_rows: int
    cells: gpd.GeoDataFrame

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


def class_table(grid: Grid, cell: np.ndarray, crs_x: np.ndarray, crs_y: np.ndarray) -> pd.DataFrame:
    """One row per class (kept cell holding >= 1 of the given TRAIN locations), indexed 0..C-1 by cell id.

    `cell`, `crs_x`, `crs_y` describe the train locations. Columns: cell, col, row, n_train and, for
    each centroid kind, `<prefix>_x/_y` (EPSG:3766) and `<prefix>_lat/_lng`:
    plain (`centroid_*`): the area centroid of the cell's land part;
    clipped: the plain centroid, or the nearest point of the cell's land when the plain one is at sea;
    weighted: the mean of the class's train locations in EPSG:3766.
    """
    cells, inverse = np.unique(cell, return_inverse=True)
    n_train = np.bincount(inverse)
    table = grid.cells.loc[cells, ["col", "row"]].reset_index()
    table["n_train"] = n_train
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


def nearest_class(table: pd.DataFrame, grid: Grid, cell: np.ndarray, lat, lng) -> np.ndarray:
    """Class index of each point in `cell`: the cell's class, else the class whose cell square is nearest."""
    label = pd.Series(table.index, index=table["cell"]).reindex(cell).to_numpy(dtype=float, copy=True)
    missing = np.isnan(label)
    if missing.any():
        squares = grid.cells.loc[table["cell"]].to_crs(geo.CROATIA_CRS).geometry.values
        x, y = geo.project(np.asarray(lat)[missing], np.asarray(lng)[missing])
        label[missing] = shapely.STRtree(squares).query_nearest(shapely.points(x, y), all_matches=False)[1]
    return label.astype(np.int64)
