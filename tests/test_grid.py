import numpy as np
import pandas as pd
import pytest
import shapely

from src import geo
from src.demo import sample_land_points
from src.grid import build_grid, class_table, nearest_class

# cells intersecting the Natural Earth 1:10m outline; the reference solution (another outline) got
# about 31, 55, 75 and 115 classes for these spacings
KEPT_CELLS = {0.7: 36, 0.5: 58, 0.4: 82, 0.3: 131}


@pytest.fixture(scope="module")
def grid():
    return build_grid(0.5)


@pytest.mark.parametrize("spacing", sorted(KEPT_CELLS))
def test_cell_and_class_counts_per_spacing(spacing):
    grid = build_grid(spacing)
    assert len(grid.cells) == KEPT_CELLS[spacing]
    assert grid.n_cols == int(np.ceil(5.9077 / spacing)) and grid.n_rows == int(np.ceil(4.1302 / spacing))
    # dense uniform data over the land: nearly every kept cell becomes a class (slivers may stay empty)
    lat, lng = sample_land_points(20000, np.random.default_rng(1))
    x, y = geo.project(lat, lng)
    classes = class_table(grid, grid.assign(lat, lng), x, y)
    assert 0.85 * len(grid.cells) <= len(classes) <= len(grid.cells)
    assert classes.index.tolist() == list(range(len(classes)))
    assert classes["cell"].is_monotonic_increasing  # contiguous, stable ordering by cell id


def test_cell_of_is_index_arithmetic(grid):
    # the lower-left corner of cell (row 2, col 3), nudged inside
    lat = grid.min_lat + 2 * 0.5 + 1e-9
    lng = grid.min_lng + 3 * 0.5 + 1e-9
    assert grid.cell_of([lat], [lng])[0] == 2 * grid.n_cols + 3
    assert grid.cell_of([lat - 2e-9], [lng])[0] == 1 * grid.n_cols + 3
    assert grid.cell_of([30.0], [lng])[0] == -1
    # every kept cell's square contains the points that cell_of maps to it
    lat, lng = sample_land_points(500, np.random.default_rng(2))
    cells = grid.cell_of(lat, lng)
    squares = grid.cells.geometry.reindex(cells).values
    assert shapely.intersects_xy(squares, lng, lat).all()


def test_nearest_cell_fallback_for_points_off_grid_or_in_dropped_cells(grid):
    # Bosnia and Slovenia points: off the kept cells; one far south of the grid
    lat = np.array([44.3, 46.2, 41.0, 43.9])
    lng = np.array([18.9, 14.0, 17.0, 17.9])
    assert not np.isin(grid.cell_of(lat, lng), grid.cells.index).all()
    cells = grid.assign(lat, lng)
    assert np.isin(cells, grid.cells.index).all()
    # brute force: the kept cell whose square is nearest in EPSG:3766
    squares = grid.cells.to_crs(geo.CROATIA_CRS).geometry.values
    x, y = geo.project(lat, lng)
    for i in range(len(lat)):
        distances = shapely.distance(squares, shapely.Point(x[i], y[i]))
        assert distances[grid.cells.index.get_loc(cells[i])] == pytest.approx(distances.min())
    # points inside kept cells keep their own cell
    lat, lng = sample_land_points(200, np.random.default_rng(3))
    np.testing.assert_array_equal(grid.assign(lat, lng), grid.cell_of(lat, lng))


def test_weighted_centroid_is_the_mean_of_train_locations_in_epsg3766(grid):
    # three points in the Zagreb cell, one in the Osijek cell
    lat = np.array([45.80, 45.85, 45.90, 45.55])
    lng = np.array([15.70, 15.80, 15.90, 18.69])
    x, y = geo.project(lat, lng)
    cells = grid.assign(lat, lng)
    assert cells[0] == cells[1] == cells[2] != cells[3]
    table = class_table(grid, cells, x, y).set_index("cell")
    zagreb = table.loc[cells[0]]
    assert zagreb["n_train"] == 3
    assert zagreb["weighted_x"] == pytest.approx((x[0] + x[1] + x[2]) / 3)
    assert zagreb["weighted_y"] == pytest.approx((y[0] + y[1] + y[2]) / 3)
    mean_lat, mean_lng = geo.unproject((x[0] + x[1] + x[2]) / 3, (y[0] + y[1] + y[2]) / 3)
    assert zagreb["weighted_lat"] == pytest.approx(float(mean_lat)) and zagreb["weighted_lng"] == pytest.approx(float(mean_lng))
    osijek = table.loc[cells[3]]
    assert (osijek["weighted_lat"], osijek["weighted_lng"]) == pytest.approx((45.55, 18.69))


def test_plain_centroid_of_a_full_land_cell_is_the_square_centre(grid):
    # the cell around (45.7, 16.2) lies entirely inside Croatia
    cell = grid.assign([45.7], [16.2])
    square = grid.cells.loc[cell[0], "geometry"]
    assert shapely.contains(geo.load_border(), square)
    x, y = geo.project([45.7], [16.2])
    row = class_table(grid, cell, x, y).iloc[0]
    centre = shapely.centroid(shapely.transform(square, lambda c: np.column_stack(geo.project(c[:, 1], c[:, 0]))))
    assert (row["centroid_x"], row["centroid_y"]) == pytest.approx((centre.x, centre.y), abs=1.0)
    assert (row["clipped_x"], row["clipped_y"]) == (row["centroid_x"], row["centroid_y"])


@pytest.mark.parametrize("spacing", [0.5, 0.3])
def test_clipped_centroids_are_inside_croatia(spacing):
    grid = build_grid(spacing)
    lat, lng = sample_land_points(5000, np.random.default_rng(4))
    x, y = geo.project(lat, lng)
    table = class_table(grid, grid.assign(lat, lng), x, y)
    border = geo.load_border()
    assert shapely.contains_xy(border, table["clipped_lng"], table["clipped_lat"]).all()
    # some plain centroids of coastal cells lie at sea: clipping is not a no-op
    assert not shapely.contains_xy(border, table["centroid_lng"], table["centroid_lat"]).all()
    # clipped centroids stay in their own cell
    squares = grid.cells.geometry.reindex(table["cell"]).values
    assert shapely.intersects_xy(squares, table["clipped_lng"], table["clipped_lat"]).all()


def test_nearest_class_for_cells_without_train_data(grid):
    lat = np.array([45.80, 43.51])
    lng = np.array([15.95, 16.46])  # Zagreb has train data, Split does not
    x, y = geo.project(lat[:1], lng[:1])
    table = class_table(grid, grid.assign(lat[:1], lng[:1]), x, y)
    labels = nearest_class(table, grid, grid.assign(lat, lng), lat, lng)
    np.testing.assert_array_equal(labels, [0, 0])
    assert isinstance(table, pd.DataFrame) and len(table) == 1
