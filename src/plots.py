"""Figures of the enrich stage: the grid over Croatia, class sizes, the three centroid kinds, the data."""

from pathlib import Path

import geopandas as gpd
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)

from src import geo  # noqa: E402
from src.files import atomic_path  # noqa: E402

SPLIT_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:red"}


def _croatia_axes(title: str):
    figure, axes = plt.subplots(figsize=(9, 8))
    gpd.GeoSeries([geo.load_border()], crs=geo.WGS84).plot(ax=axes, color="#dfe9d8", edgecolor="#4a6b3a", linewidth=0.6)
    axes.set_title(title)
    axes.set_xlabel("longitude")
    axes.set_ylabel("latitude")
    axes.set_aspect(1 / 0.71)  # ~1/cos(45 deg): degrees look roughly square on the ground
    return figure, axes


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_grid(enriched, path: Path) -> Path:
    """Croatia with every grid cell; kept cells (intersecting Croatia) outlined, classes shaded."""
    grid = enriched.grid
    figure, axes = _croatia_axes(f"Grid: {grid.spacing} deg, {len(grid.cells)} cells kept, "
                                 f"{len(enriched.classes)} classes")
    for i in range(grid.n_cols + 1):
        axes.axvline(grid.min_lng + i * grid.spacing, color="0.8", linewidth=0.5, zorder=0)
    for j in range(grid.n_rows + 1):
        axes.axhline(grid.min_lat + j * grid.spacing, color="0.8", linewidth=0.5, zorder=0)
    grid.cells.boundary.plot(ax=axes, color="black", linewidth=0.6)
    grid.cells.loc[enriched.classes["cell"]].plot(ax=axes, color="tab:blue", alpha=0.2)
    return _save(figure, path)


def plot_class_sizes(enriched, path: Path) -> Path:
    """Kept cells coloured by their number of train locations (0: no class)."""
    cells = enriched.grid.cells.copy()
    cells["n_train"] = enriched.classes.set_index("cell")["n_train"].reindex(cells.index).fillna(0)
    figure, axes = _croatia_axes("Train locations per cell (class size)")
    cells.plot(ax=axes, column="n_train", cmap="viridis", edgecolor="white", linewidth=0.4, alpha=0.85,
               legend=True, legend_kwds={"label": "train locations", "shrink": 0.7})
    return _save(figure, path)


def plot_centroids(enriched, path: Path) -> Path:
    """The plain, clipped and weighted centroid of every class."""
    classes = enriched.classes
    figure, axes = _croatia_axes("Class centroids")
    enriched.grid.cells.loc[classes["cell"]].boundary.plot(ax=axes, color="0.5", linewidth=0.5)
    for prefix, label, marker, colour in (("centroid", "plain (cell land)", "o", "tab:gray"),
                                          ("clipped", "clipped to land", "x", "tab:red"),
                                          ("weighted", "weighted (train mean)", "^", "tab:blue")):
        axes.scatter(classes[f"{prefix}_lng"], classes[f"{prefix}_lat"], marker=marker, s=22, color=colour, label=label)
    axes.legend(loc="upper right")
    return _save(figure, path)


def plot_distribution(enriched, path: Path) -> Path:
    """Locations by split on the map, and the histogram of train locations per class."""
    locations = enriched.locations
    figure, (axes_map, axes_hist) = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [3, 2]})
    gpd.GeoSeries([geo.load_border()], crs=geo.WGS84).plot(ax=axes_map, color="#dfe9d8", edgecolor="#4a6b3a", linewidth=0.6)
    for split, colour in SPLIT_COLOURS.items():
        part = locations[locations["split"] == split]
        axes_map.scatter(part["longitude"], part["latitude"], s=4, color=colour, label=f"{split} ({len(part)})")
    axes_map.set_aspect(1 / 0.71)
    axes_map.set_title(f"{len(locations)} locations")
    axes_map.legend(loc="upper right", markerscale=3)
    axes_hist.hist(enriched.classes["n_train"], bins=min(30, max(5, len(enriched.classes) // 2)), color="tab:blue")
    axes_hist.set_xlabel("train locations in the class")
    axes_hist.set_ylabel("classes")
    axes_hist.set_title("Class sizes")
    return _save(figure, path)


def enrich_figures(enriched, out_dir: str | Path) -> list[Path]:
    """All enrich figures into `out_dir`, named by spacing; returns their paths."""
    out_dir = Path(out_dir)
    tag = f"spacing_{enriched.grid.spacing:g}"
    return [plot_grid(enriched, out_dir / f"grid_{tag}.png"),
            plot_class_sizes(enriched, out_dir / f"class_sizes_{tag}.png"),
            plot_centroids(enriched, out_dir / f"centroids_{tag}.png"),
            plot_distribution(enriched, out_dir / f"distribution_{tag}.png")]
