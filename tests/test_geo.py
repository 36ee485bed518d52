import numpy as np
import pytest
import shapely
import torch
from pyproj import Geod, Proj

from src.core import geo

# EPSG:3766 (HTRS96 / Croatia LCC) written out from its definition, independent of the EPSG database
HTRS96_LCC = Proj("+proj=lcc +lat_1=45.9166666666667 +lat_2=43.0833333333333 +lat_0=0 +lon_0=16.5 "
                  "+x_0=0 +y_0=0 +ellps=GRS80 +units=m +no_defs")
CITIES = {  # lat, lng
    "Zagreb": (45.8150, 15.9819),
    "Split": (43.5081, 16.4402),
    "Osijek": (45.5550, 18.6955),
    "Dubrovnik": (42.6507, 18.0944),
    "Pula": (44.8666, 13.8496),
}


def test_projection_matches_the_crs_definition():
    lat, lng = np.array(list(CITIES.values())).T
    x, y = geo.project(lat, lng)
    ref_x, ref_y = HTRS96_LCC(lng, lat)
    np.testing.assert_allclose(x, ref_x, atol=0.01)
    np.testing.assert_allclose(y, ref_y, atol=0.01)


def test_projection_round_trip_and_scalars():
    lat, lng = np.array(list(CITIES.values())).T
    back_lat, back_lng = geo.unproject(*geo.project(lat, lng))
    np.testing.assert_allclose(back_lat, lat, atol=1e-9)
    np.testing.assert_allclose(back_lng, lng, atol=1e-9)
    x, y = geo.project(45.0, 16.5)
    assert abs(float(x)) < 1e-6  # the central meridian maps to x = 0


def test_haversine_numpy_matches_geodesic_within_half_percent():
    geod = Geod(ellps="WGS84")
    names = list(CITIES)
    for a in names:
        for b in names:
            if a == b:
                continue
            (lat1, lng1), (lat2, lng2) = CITIES[a], CITIES[b]
            reference = geod.inv(lng1, lat1, lng2, lat2)[2] / 1000
            assert geo.haversine_km(lat1, lng1, lat2, lng2) == pytest.approx(reference, rel=0.005)
    assert geo.haversine_km(45.0, 16.0, 45.0, 16.0) == 0.0


def test_haversine_known_distance_zagreb_split():
    # great-circle Zagreb-Split is about 259 km
    assert geo.haversine_km(*CITIES["Zagreb"], *CITIES["Split"]) == pytest.approx(259.2, abs=1.0)


def test_haversine_torch_matches_numpy_batched_and_differentiable():
    rng = np.random.default_rng(0)
    lat1, lat2 = rng.uniform(42.4, 46.5, (2, 64))
    lng1, lng2 = rng.uniform(13.5, 19.4, (2, 64))
    expected = geo.haversine_km(lat1, lng1, lat2, lng2)
    t = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (lat1, lng1, lat2, lng2)]
    got = geo.haversine_km_torch(*t)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-9)
    got.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in t)
    same = torch.tensor([45.0], requires_grad=True)
    d = geo.haversine_km_torch(same, same, same, same)
    d.backward()
    assert torch.isfinite(same.grad).all() and float(d.detach()) < 1e-9


def test_border_contains_cities_and_mainland_option():
    import shapely

    border = geo.load_border()
    inland = [name for name in CITIES if name not in ("Split", "Dubrovnik")]  # coastal centres can fall at sea at 1:10m
    lat, lng = np.array([CITIES[name] for name in inland]).T
    assert shapely.contains_xy(border, lng, lat).all()
    mainland = geo.load_border(mainland_only=True)
    assert mainland.geom_type == "Polygon"
    assert not shapely.contains_xy(mainland, 16.65, 43.35)  # Brač island
    assert shapely.contains_xy(border, 16.65, 43.35)
    # Ljubljana (Slovenia) is not in Croatia
    assert not shapely.contains_xy(border, 14.5058, 46.0569)


def test_km_statistics_format_and_table():
    stats = {"count": 3, "mean_km": 12.345, "median_km": 0.05, "p90_km": 99.95, "within_1km": 1 / 3,
             "within_5km": 0.5, "within_25km": 0.999, "within_100km": 1.0, "geoguessr": 3695.6}
    assert geo.format_km_stats(stats) == {
        "n": "3", "mean km": "12.3", "median km": "0.1", "p90 km": "100.0", "<= 1 km": "33.3%", "<= 5 km": "50.0%",
        "<= 25 km": "99.9%", "<= 100 km": "100.0%", "GeoGuessr /5000": "3696"}
    lines = geo.km_table([("model", stats), ("constant", {**stats, "count": 12})], "name").splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["name", *geo.format_km_stats(stats)]
    assert [c.strip() for c in lines[3].strip("|").split("|")][:2] == ["constant", "12"]


SEA_BETWEEN_SPLIT_AND_BRAC = (43.45, 16.45)
BRAC_INTERIOR = (43.32, 16.65)
SEA_SOUTH_OF_BOL = (43.245, 16.655)  # about 2 km off Brač, 15 km from the mainland


def test_snap_to_land_moves_a_sea_point_onto_the_coast_by_its_distance_to_land():
    land = geo.load_border(crs=geo.CROATIA_CRS)
    lat, lng = SEA_BETWEEN_SPLIT_AND_BRAC
    x, y = geo.project(lat, lng)
    snapped_x, snapped_y = geo.snap_to_land(np.array([x]), np.array([y]))
    snapped = shapely.Point(snapped_x[0], snapped_y[0])
    assert shapely.distance(snapped, land.boundary) < 1e-6  # on the coast
    moved_m = float(np.hypot(snapped_x[0] - x, snapped_y[0] - y))
    assert moved_m == pytest.approx(shapely.distance(land, shapely.Point(x, y)), abs=1e-6)
    assert 2_000 < moved_m < 10_000
    # the same move on the ellipsoid (pyproj's geodesic): EPSG:3766 scale error is below 0.1% here
    snapped_lat, snapped_lng = geo.unproject(snapped_x, snapped_y)
    geodesic_m = Geod(ellps="GRS80").inv(lng, lat, snapped_lng[0], snapped_lat[0])[2]
    assert geodesic_m == pytest.approx(moved_m, rel=1e-3)


def test_snap_to_land_keeps_land_points_and_counts_islands_as_land():
    lat, lng = np.array([CITIES["Zagreb"], CITIES["Osijek"], BRAC_INTERIOR, SEA_SOUTH_OF_BOL]).T
    x, y = geo.project(lat, lng)
    snapped_x, snapped_y = geo.snap_to_land(x, y)
    assert np.array_equal(snapped_x[:3], x[:3]) and np.array_equal(snapped_y[:3], y[:3])
    # the sea point south of Bol goes to Brač (the nearest land), not to the mainland
    mainland = geo.load_border(mainland_only=True, crs=geo.CROATIA_CRS)
    snapped = shapely.Point(snapped_x[3], snapped_y[3])
    assert np.hypot(snapped_x[3] - x[3], snapped_y[3] - y[3]) < 3_000
    assert shapely.distance(mainland, snapped) > 5_000
    # with the mainland only, Brač is sea: its interior point moves to the mainland coast
    main_x, main_y = geo.snap_to_land(x[2], y[2], mainland_only=True)
    assert shapely.distance(mainland.boundary, shapely.Point(main_x, main_y)) < 1e-6
    assert np.hypot(main_x - x[2], main_y - y[2]) > 5_000
    nan_x, nan_y = geo.snap_to_land([np.nan], [np.nan])
    assert np.isnan(nan_x).all() and np.isnan(nan_y).all()
