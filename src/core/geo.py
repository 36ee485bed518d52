"""Coordinates and distances: EPSG:4326 <-> EPSG:3766, haversine, the Croatia border, error statistics.

The GeoGuessr-style score of one guess is 5000 * exp(-d / s) with d the great-circle error in km.
GeoGuessr scales s with the map: s = (diagonal of the map's bounding box) / 10. For Croatia
(Natural Earth border, bounding box 13.50-19.41 E, 42.42-46.55 N) the diagonal is 655.8 km,
so s = 65.6 km: a guess 65.6 km off scores 5000/e = 1839, one 10 km off scores 4291.
"""

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import shapely
from pyproj import Transformer
from tabulate import tabulate

from src.core.paths import BORDER_FILE

if TYPE_CHECKING:  # for the annotations only: the torch functions import it when called
    import torch

WGS84 = "EPSG:4326"
CROATIA_CRS = "EPSG:3766"  # HTRS96 / Croatia LCC, metres
EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius


@lru_cache(maxsize=None)
def _transformer(source: str, target: str) -> Transformer:
    return Transformer.from_crs(source, target, always_xy=True)


def project(lat, lng) -> tuple[np.ndarray, np.ndarray]:
    """Latitude/longitude in degrees (arrays or scalars) to EPSG:3766 x/y in metres."""
    x, y = _transformer(WGS84, CROATIA_CRS).transform(np.asarray(lng, float), np.asarray(lat, float))
    return np.asarray(x), np.asarray(y)


def unproject(x, y) -> tuple[np.ndarray, np.ndarray]:
    """EPSG:3766 x/y in metres to latitude/longitude in degrees."""
    lng, lat = _transformer(CROATIA_CRS, WGS84).transform(np.asarray(x, float), np.asarray(y, float))
    return np.asarray(lat), np.asarray(lng)


def haversine_km(lat1, lng1, lat2, lng2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (numpy, broadcasting)."""
    lat1, lng1, lat2, lng2 = (np.radians(np.asarray(v, float)) for v in (lat1, lng1, lat2, lng2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lng2 - lng1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def haversine_km_torch(lat1: "torch.Tensor", lng1: "torch.Tensor", lat2: "torch.Tensor",
                       lng2: "torch.Tensor") -> "torch.Tensor":
    """Great-circle distance in km (torch, batched, differentiable, finite gradient at zero distance)."""
    import torch  # here, so that commands without a model (src.sample, src.download) start fast

    lat1, lng1, lat2, lng2 = (torch.deg2rad(v) for v in (lat1, lng1, lat2, lng2))
    a = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lng2 - lng1) / 2) ** 2
    # the clamp keeps sqrt's gradient finite at zero distance without biasing small distances
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(torch.finfo(a.dtype).tiny, 1.0)))


# EPSG:3766 is a Lambert conformal conic projection with two standard parallels on GRS80 (+lat_0=0 +lon_0=16.5
# +lat_1=45.91666666666667 +lat_2=43.08333333333333 +x_0=0 +y_0=0); its constants, for the torch inverse below
_GRS80_A = 6378137.0
_GRS80_E = math.sqrt(2 / 298.257222101 - (1 / 298.257222101) ** 2)
_LON_0 = math.radians(16.5)


def _lcc_m(phi: float) -> float:
    return math.cos(phi) / math.sqrt(1 - (_GRS80_E * math.sin(phi)) ** 2)


def _lcc_t(phi: float) -> float:
    e_sin = _GRS80_E * math.sin(phi)
    return math.tan(math.pi / 4 - phi / 2) / ((1 - e_sin) / (1 + e_sin)) ** (_GRS80_E / 2)


_PHI_1, _PHI_2 = math.radians(45 + 55 / 60), math.radians(43 + 5 / 60)
_LCC_N = (math.log(_lcc_m(_PHI_1)) - math.log(_lcc_m(_PHI_2))) / (math.log(_lcc_t(_PHI_1)) - math.log(_lcc_t(_PHI_2)))
_LCC_AF = _GRS80_A * _lcc_m(_PHI_1) / (_LCC_N * _lcc_t(_PHI_1) ** _LCC_N)  # a * F; rho_0 = a * F at lat_0 = 0
LCC_LATITUDE_STEPS = 8  # fixed-point steps for the latitude: far below a millimetre after 5 (tested)


def unproject_torch(x: "torch.Tensor", y: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """EPSG:3766 x/y in metres to latitude/longitude in degrees, in torch on the tensors' device (float64),
    with no host synchronisation (a fixed number of latitude steps); agrees with `unproject` (pyproj) to
    well under a millimetre over Croatia (Snyder, Map Projections: A Working Manual, eqs. 15-7 to 15-11)."""
    import torch  # noqa: PLC0415 (commands without a model start fast)

    x, y = x.double(), y.double()
    dy = _LCC_AF - y
    rho = torch.sqrt(x * x + dy * dy)
    t = (rho / _LCC_AF) ** (1 / _LCC_N)
    lng = torch.atan2(x, dy) / _LCC_N + _LON_0
    lat = math.pi / 2 - 2 * torch.atan(t)
    for _ in range(LCC_LATITUDE_STEPS):
        e_sin = _GRS80_E * torch.sin(lat)
        lat = math.pi / 2 - 2 * torch.atan(t * ((1 - e_sin) / (1 + e_sin)) ** (_GRS80_E / 2))
    return torch.rad2deg(lat), torch.rad2deg(lng)


@lru_cache(maxsize=4)
def load_border(mainland_only: bool = False, crs: str = WGS84) -> shapely.MultiPolygon | shapely.Polygon:
    """Croatia's border (Natural Earth 1:10m) in `crs`; `mainland_only` keeps the largest polygon."""
    border = gpd.read_file(BORDER_FILE).to_crs(crs).geometry.union_all()
    if mainland_only and isinstance(border, shapely.MultiPolygon):
        border = max(border.geoms, key=lambda part: part.area)
    shapely.prepare(border)
    return border


def snap_to_land(x, y, mainland_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Move EPSG:3766 points (metres, arrays or scalars) that lie outside Croatia's land to the nearest
    point of it; points on land (islands included unless `mainland_only`) and NaNs are returned unchanged.

    Used for predictions at sea or abroad (regression, means of centroids, ensembles).
    """
    x, y = np.array(x, float), np.array(y, float)
    land = load_border(mainland_only, CROATIA_CRS)
    outside = np.isfinite(x) & np.isfinite(y) & ~shapely.intersects_xy(land, x, y)
    if outside.any():
        # shortest_line(land, point) starts at the point of land nearest to the point
        nearest = shapely.get_point(shapely.shortest_line(land, shapely.points(x[outside], y[outside])), 0)
        x[outside], y[outside] = shapely.get_x(nearest), shapely.get_y(nearest)
    return x, y


WITHIN_KM = (1, 5, 25, 100)
GEOGUESSR_MAX = 5000.0


@lru_cache(maxsize=1)
def geoguessr_scale_km() -> float:
    """GeoGuessr's distance scale s for a Croatia-sized map: bounding-box diagonal of the border / 10."""
    lng_min, lat_min, lng_max, lat_max = load_border().bounds
    return float(haversine_km(lat_min, lng_min, lat_max, lng_max)) / 10.0


def geoguessr_score(distances_km, scale_km: float | None = None) -> np.ndarray:
    """Per-guess GeoGuessr-style points 5000 * exp(-d / s) (s defaults to Croatia's scale)."""
    scale_km = geoguessr_scale_km() if scale_km is None else scale_km
    return GEOGUESSR_MAX * np.exp(-np.asarray(distances_km, float) / scale_km)


def summarize_km(distances_km, scale_km: float | None = None) -> dict[str, float]:
    """Error statistics of great-circle distances in km.

    Keys: count, mean_km, median_km, p90_km, within_{1,5,25,100}km (shares in 0..1), geoguessr
    (mean points per location, 0..5000).
    """
    d = np.asarray(distances_km, float).ravel()
    if d.size == 0:
        raise ValueError("summarize_km needs at least one distance")
    stats = {
        "count": int(d.size),
        "mean_km": float(d.mean()),
        "median_km": float(np.median(d)),
        "p90_km": float(np.percentile(d, 90)),
    }
    for km in WITHIN_KM:
        stats[f"within_{km}km"] = float((d <= km).mean())
    stats["geoguessr"] = float(geoguessr_score(d, scale_km).mean())
    return stats


GEOGUESSR_COLUMN = f"GeoGuessr /{GEOGUESSR_MAX:.0f}"


def format_km_stats(stats: dict[str, float]) -> dict[str, str]:
    """`summarize_km` output as display strings: km with 1 decimal, shares as percentages, GeoGuessr as an
    integer out of 5000. The keys are the column names every command's table uses."""
    row = {"n": f"{stats['count']:d}", "mean km": f"{stats['mean_km']:.1f}", "median km": f"{stats['median_km']:.1f}",
           "p90 km": f"{stats['p90_km']:.1f}"}
    row.update({f"<= {km} km": f"{100 * stats[f'within_{km}km']:.1f}%" for km in WITHIN_KM})
    row[GEOGUESSR_COLUMN] = f"{stats['geoguessr']:.0f}"
    return row


def km_table(rows, first_column: str = "") -> str:
    """One table of km statistics, a row per (label, summarize_km stats) pair in `rows` (train's test table,
    src.score and src.analyze print this)."""
    table = [{first_column: label, **format_km_stats(stats)} for label, stats in rows]
    return tabulate(table, headers="keys", tablefmt="github", disable_numparse=True,
                    colalign=("left",) + ("right",) * (len(table[0]) - 1))
