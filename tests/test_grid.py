import numpy as np
import pandas as pd
import pytest
import shapely

from src.core import geo
from src.data.sampling import sample_land_points
from src.data.cells import CellSpec, Grid, build_adaptive, build_grid, class_table, kmeans, nearest_class

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


# ---- adaptive cells ---------------------------------------------------------------------------------------

def hand_clusters(rng, per_cluster=40):
    """Three tight clusters (2 km spread) around hand-placed centres 100 km apart, in EPSG:3766 metres."""
    centres = np.array([[480_000.0, 5_080_000.0], [580_000.0, 5_080_000.0], [480_000.0, 4_980_000.0]])
    points = np.concatenate([c + rng.normal(0, 2_000, (per_cluster, 2)) for c in centres])
    return centres, points, np.repeat(np.arange(3), per_cluster)


def test_kmeans_recovers_hand_placed_clusters_in_any_order():
    centres, points, truth = hand_clusters(np.random.default_rng(0))
    found, label = kmeans(points, 3, seed=0)
    # each found centre is the mean of one true cluster (a permutation of them)
    match = np.argmin(((found[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert sorted(match) == [0, 1, 2]
    for k in range(3):
        np.testing.assert_allclose(found[k], points[truth == match[k]].mean(0), atol=1e-6)
        assert (label[truth == match[k]] == k).all()
    # same points in another order, same seed: the same centres and the same label per point
    order = np.random.default_rng(1).permutation(len(points))
    again, again_label = kmeans(points[order], 3, seed=0)
    np.testing.assert_array_equal(again, found)
    np.testing.assert_array_equal(again_label, label[order])
    with pytest.raises(ValueError, match="distinct"):
        kmeans(points[:2], 3)


def test_kmeans_never_leaves_a_cluster_empty():
    # duplicates weigh in; k equals the number of distinct points: every point is its own centre
    points = np.array([[0.0, 0.0]] * 5 + [[10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    found, label = kmeans(points, 4, seed=3)
    assert sorted(map(tuple, found)) == [(0.0, 0.0), (0.0, 10.0), (10.0, 0.0), (10.0, 10.0)]
    assert len(np.unique(label)) == 4 and (label[:5] == label[0]).all()


@pytest.fixture(scope="module")
def adaptive():
    lat, lng = sample_land_points(3000, np.random.default_rng(5))
    x, y = geo.project(lat, lng)
    return build_adaptive(x, y, 25, seed=0), lat, lng, x, y


def test_adaptive_cells_partition_croatia_and_assign_by_polygon(adaptive):
    cells, lat, lng, x, y = adaptive
    assert len(cells.cells) == 25 and cells.cells.index.tolist() == list(range(25))
    land = cells.cells["land"].to_numpy()
    border = geo.load_border(False, geo.CROATIA_CRS)
    # the land parts tile the border: areas add up to the border's and no two overlap
    assert shapely.area(land).sum() == pytest.approx(border.area, rel=1e-9)
    assert shapely.union_all(land).area == pytest.approx(border.area, rel=1e-9)
    polygons = cells.cells.to_crs(geo.CROATIA_CRS).geometry.values
    assert shapely.area(polygons).sum() == pytest.approx(shapely.union_all(polygons).area, rel=1e-6)
    # assign = the nearest seed (brute force) = the Voronoi polygon that holds the point
    assigned = cells.assign(lat, lng)
    nearest = ((np.column_stack([x, y])[:, None] - cells.seeds[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(assigned, cells.cells.index.to_numpy()[nearest])
    assert shapely.contains_xy(polygons[assigned], x, y).mean() > 0.999  # polygon edges are a few m off in 4326
    # the seeds are the k-means centres: the weighted centroid of each class is its seed
    table = class_table(cells, assigned, x, y)
    np.testing.assert_allclose(table[["weighted_x", "weighted_y"]].to_numpy(), cells.seeds[table["cell"]], atol=1e-3)
    assert table["n_train"].sum() == len(lat) and len(table) == 25
    # same data and seed: the same cells; another seed: other cells
    again = build_adaptive(x[::-1], y[::-1], 25, seed=0)
    np.testing.assert_array_equal(again.seeds, cells.seeds)
    assert not np.array_equal(build_adaptive(x, y, 25, seed=1).seeds, cells.seeds)


def test_two_adaptive_cells_split_the_land_by_the_bisector():
    # Zagreb (two locations) and Osijek (one): two cells, the bisector of the two k-means centres between them
    lat, lng = np.array([45.80, 45.84, 45.55]), np.array([15.95, 16.05, 18.69])
    x, y = geo.project(lat, lng)
    cells = build_adaptive(x, y, 2, seed=0)
    table = class_table(cells, cells.assign(lat, lng), x, y).set_index("cell")
    zagreb = table.loc[cells.assign(lat[:1], lng[:1])[0]]
    assert zagreb["n_train"] == 2
    assert (zagreb["weighted_x"], zagreb["weighted_y"]) == pytest.approx(((x[0] + x[1]) / 2, (y[0] + y[1]) / 2))
    # by hand: Zagreb's land = the border on Zagreb's side of the perpendicular bisector
    a, b = np.array([(x[0] + x[1]) / 2, (y[0] + y[1]) / 2]), np.array([x[2], y[2]])
    middle, normal = (a + b) / 2, (b - a) / np.linalg.norm(b - a)
    along = np.array([-normal[1], normal[0]]) * 2e6
    half_plane = shapely.Polygon([middle + along, middle + along - normal * 2e6, middle - along - normal * 2e6,
                                  middle - along])
    by_hand = shapely.intersection(geo.load_border(False, geo.CROATIA_CRS), half_plane)
    land = cells.cells.loc[zagreb.name, "land"]
    assert land.area == pytest.approx(by_hand.area, rel=1e-6)
    centroid = (by_hand.centroid.x, by_hand.centroid.y)
    assert (zagreb["centroid_x"], zagreb["centroid_y"]) == pytest.approx(centroid, abs=1.0)
    assert shapely.contains_xy(geo.load_border(), zagreb["clipped_lng"], zagreb["clipped_lat"])


def test_cell_spec_builds_the_grid_or_adaptive_cells_matching_its_class_count():
    lat, lng = sample_land_points(800, np.random.default_rng(6))
    grid = CellSpec("grid", 0.5).build(lat, lng)
    assert isinstance(grid, Grid) and grid.tag == "grid0.5"
    matched = CellSpec("adaptive", 0.5).build(lat, lng, seed=0)
    assert len(matched.cells) == len(np.unique(grid.assign(lat, lng)))
    assert matched.tag == f"adaptive{len(matched.cells)}"
    assert len(CellSpec("adaptive", 0.5, n_classes=12).build(lat, lng).cells) == 12
    # more cells asked than distinct locations: one cell per location
    assert len(CellSpec("adaptive", 0.5, n_classes=50).build(lat[:7], lng[:7]).cells) == 7
    with pytest.raises(ValueError, match="cells must be one of"):
        CellSpec("hexagons")


def test_nearest_class_with_adaptive_cells(adaptive):
    cells, lat, lng, x, y = adaptive
    # train data in only the first half of the cells: the others' points go to the nearest class polygon
    assigned = cells.assign(lat, lng)
    train = assigned < 12
    table = class_table(cells, assigned[train], x[train], y[train])
    labels = nearest_class(table, cells, assigned, lat, lng)
    polygons = cells.cells.loc[table["cell"]].to_crs(geo.CROATIA_CRS).geometry.values
    for i in np.flatnonzero(~train)[:20]:
        distances = shapely.distance(polygons, shapely.Point(x[i], y[i]))
        assert distances[labels[i]] == pytest.approx(distances.min())
    np.testing.assert_array_equal(table["cell"].to_numpy()[labels[train]], assigned[train])
