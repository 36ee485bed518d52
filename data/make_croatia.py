"""Rebuild data/croatia.geojson from Natural Earth 1:10m (npm package world-atlas).

    cd /tmp && npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
    python data/make_croatia.py /tmp/package/countries-10m.json

Geopandas reads the TopoJSON directly (GDAL's TopoJSON driver, layer "countries").
The quantized TopoJSON rings are not always valid, so the geometry is repaired with
shapely's make_valid and written rounded to 6 decimals (~0.1 m).
"""

import argparse
from pathlib import Path

import geopandas as gpd
import shapely

OUT = Path(__file__).with_name("croatia.geojson")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("topojson", type=Path, help="world-atlas countries-10m.json")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    countries = gpd.read_file(args.topojson, layer="countries")
    croatia = countries[countries["name"] == "Croatia"].set_crs("EPSG:4326", allow_override=True)
    if len(croatia) != 1:
        raise SystemExit(f"{args.topojson}: expected one feature named Croatia, found {len(croatia)}")
    geometry = shapely.set_precision(shapely.make_valid(croatia.geometry.iloc[0]), 1e-6)
    out = gpd.GeoDataFrame(
        {"name": ["Croatia"], "source": ["Natural Earth 1:10m v4.1.0 via world-atlas 2.0.2"]},
        geometry=[geometry],
        crs="EPSG:4326",
    )
    tmp = args.out.with_suffix(".tmp")
    out.to_file(tmp, driver="GeoJSON")
    tmp.replace(args.out)
    print(f"{args.out}: {geometry.geom_type} with {len(getattr(geometry, 'geoms', [geometry]))} parts, "
          f"bounds {tuple(round(b, 4) for b in geometry.bounds)}")


if __name__ == "__main__":
    main()
