"""A synthetic LUMEN-format dataset whose images depend learnably on location.

Each location is a random point on Croatian land. Its four views show a sky whose colour follows
latitude, ground whose colour follows longitude, a sea band when the location is near the coast and
the view faces the sea, and stripes whose frequency follows distance from the coast. Noise keeps the
task from being trivial, but a small CNN beats the constant-prediction baseline by a wide margin.
"""

import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from PIL import Image
from tqdm import tqdm

from src.core.paths import DEMO_DIR
from src.core import geo
from src.core.files import atomic_path
from src.data.images import VIEWS
from src.data.sampling import sample_land_points

DEFAULT_OUT = DEMO_DIR
COAST_KM = 25.0


def _coast_distance_km(lat: np.ndarray, lng: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the sea coast (km) and the compass bearing (deg) of the nearest coast point.

    The Adriatic lies south-west of the country; the coast is the part of the land border that faces
    it, approximated as border points south-west of the line from (45.6N, 13.5E) to (42.4N, 18.6E)
    offset inland by 0.25 degrees.
    """
    border = geo.load_border(crs=geo.CROATIA_CRS)
    x, y = geo.project(lat, lng)
    boundary = shapely.get_coordinates(shapely.boundary(border))
    blat, blng = geo.unproject(boundary[:, 0], boundary[:, 1])
    side = (blng - 13.5) * (42.4 - 45.6) - (blat - 45.6) * (18.6 - 13.5)
    coast = boundary[side > -0.25 * np.hypot(3.2, 5.1) * 1.0]
    tree = shapely.STRtree(shapely.points(coast))
    points = shapely.points(x, y)
    nearest = tree.nearest(points)
    dx, dy = coast[nearest, 0] - x, coast[nearest, 1] - y
    return np.hypot(dx, dy) / 1000.0, np.degrees(np.arctan2(dx, dy)) % 360


def render_views(lat: float, lng: float, coast_km: float, coast_bearing: float, size: int,
                 rng: np.random.Generator) -> list[Image.Image]:
    """The four synthetic views (0, 90, 180, 270) of one location."""
    t_lat = (lat - 42.4) / 4.2  # 0 south .. 1 north
    t_lng = (lng - 13.5) / 5.9  # 0 west .. 1 east
    sky = np.array([90 + 120 * t_lat, 150 + 60 * (1 - t_lat), 235 - 60 * t_lat])
    ground = np.array([60 + 150 * t_lng, 150 - 70 * t_lng, 40 + 60 * (1 - t_lng)])
    rows = np.arange(size)[:, None] / size
    cols = np.arange(size)[None, :] / size
    frequency = 2 + 10 * min(coast_km, 150.0) / 150.0
    views = []
    for view in VIEWS:
        image = np.empty((size, size, 3))
        horizon = 0.45 + 0.1 * np.sin(np.radians(view) + 6 * t_lng)
        is_sky = rows < horizon
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (cols + 0.3 * rows) + view)
        image[:] = ground * (0.75 + 0.25 * stripes)[..., None]
        image[np.broadcast_to(is_sky, (size, size))] = sky
        facing = abs((view - coast_bearing + 180) % 360 - 180) < 60
        if coast_km < COAST_KM and facing:
            sea = (rows >= horizon) & (rows < horizon + 0.25)
            image[np.broadcast_to(sea, (size, size))] = (30, 90, 170)
        image += rng.normal(0, 12, image.shape) + rng.normal(0, 10, 3)
        views.append(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)))
    return views


def write_demo_dataset(out_dir: str | Path = DEFAULT_OUT, n_locations: int = 600, image_size: int = 96,
                       seed: int = 0, progress: bool = False) -> Path:
    """Write a LUMEN-format dataset (data.csv + data/<uuid>/{0,90,180,270}.jpg); returns out_dir.

    The CSV is written last (atomically), so a dir with a data.csv is complete.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    lat, lng = sample_land_points(n_locations, rng)
    coast_km, coast_bearing = _coast_distance_km(lat, lng)
    uuids = [str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63)), version=4))
             for _ in range(n_locations)]
    for i in tqdm(range(n_locations), desc="demo images", disable=not progress, file=sys.stderr):
        folder = out_dir / "data" / uuids[i]
        folder.mkdir(parents=True, exist_ok=True)
        for view, image in zip(VIEWS, render_views(lat[i], lng[i], coast_km[i], coast_bearing[i],
                                                   image_size, rng)):
            image.save(folder / f"{view}.jpg", quality=90)
    table = pd.DataFrame({"uuid": uuids, "latitude": lat, "longitude": lng})
    with atomic_path(out_dir / "data.csv") as tmp:
        table.to_csv(tmp, index=False)
    return out_dir
