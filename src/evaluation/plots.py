"""Figures of the enrich stage: the cells over Croatia, class sizes, the three centroid kinds, the data."""

from pathlib import Path

import geopandas as gpd
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from src.core import geo  # noqa: E402
from src.core.files import atomic_path  # noqa: E402

# train: blue dots; val and test: distinct colours and markers, drawn larger on top (sizes scaled by data)
SPLIT_STYLE = {"train": {"color": "tab:blue", "marker": "o", "scale": 1.0},
               "val": {"color": "darkorange", "marker": "^", "scale": 3.0},
               "test": {"color": "darkviolet", "marker": "s", "scale": 2.5}}
LAND = {"color": "#dfe9d8", "edgecolor": "#4a6b3a"}
CLASS_COLOUR = "tab:blue"
CLASS_FILL = "#a6cbe8"  # opaque light blue: one colour for a class cell wherever it lies


def draw_land(axes) -> None:
    """Croatia filled (longitude x, latitude y)."""
    gpd.GeoSeries([geo.load_border()], crs=geo.WGS84).plot(ax=axes, color=LAND["color"], edgecolor=LAND["edgecolor"],
                                                           linewidth=0.6)


def _draw_coastline(axes) -> None:
    """The border as a line on top of filled cells, so the coast stays visible."""
    gpd.GeoSeries([geo.load_border()], crs=geo.WGS84).boundary.plot(ax=axes, color="black", linewidth=0.5, zorder=5)


def label_axes(axes, title: str = "") -> None:
    """Title, longitude/latitude labels and an aspect that makes degrees look roughly square on the ground."""
    axes.set_title(title)
    # an explicit size: geopandas labels empty axes with fontsize="small", and a later label keeps that size
    size = plt.rcParams["axes.labelsize"]
    axes.set_xlabel("longitude (deg)", fontsize=size)
    axes.set_ylabel("latitude (deg)", fontsize=size)
    axes.set_aspect(1 / 0.71)  # ~1/cos(45 deg)


def croatia_axes(title: str = "", figsize=(9, 8)):
    """A new figure and axes with Croatia's land, labelled."""
    figure, axes = plt.subplots(figsize=figsize)
    draw_land(axes)
    label_axes(axes, title)
    return figure, axes


JPEG_QUALITY = 88  # photos stay clean and text sharp enough at a fraction of a PNG's size


def save_figure(figure, path: str | Path, dpi: int = 130) -> Path:
    """Save `figure` atomically (src.files.atomic_path) and close it; the format from the suffix (.png, .jpg)."""
    extra = {"pil_kwargs": {"quality": JPEG_QUALITY, "optimize": True}} if Path(path).suffix.lower() in (
        ".jpg", ".jpeg") else {}
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=dpi, bbox_inches="tight", **extra)
    finally:
        plt.close(figure)
    return Path(path)


def _cells_title(cells) -> str:
    if cells.kind == "grid":
        return f"grid {cells.spacing:g} deg, {len(cells.cells)} cells kept"
    return f"adaptive cells (k-means of train locations), {len(cells.cells)} cells"


def _draw_grid_lines(axes, grid) -> None:
    """The grid's lines over its extent only."""
    xs = grid.min_lng + np.arange(grid.n_cols + 1) * grid.spacing
    ys = grid.min_lat + np.arange(grid.n_rows + 1) * grid.spacing
    axes.vlines(xs, ys[0], ys[-1], color="0.75", linewidth=0.5, zorder=0)
    axes.hlines(ys, xs[0], xs[-1], color="0.75", linewidth=0.5, zorder=0)


def round_degree_ticks(axes) -> None:
    """Ticks at round degrees (1, 0.5, 0.2, ... apart) labelled without trailing zeros: the grid starts at
    Croatia's corner (42.42 N), so ticks on cell edges would read 42.42, 43.42, ..."""
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10]))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def grid_figure(enriched):
    """The cells over Croatia's border: classes (cells with train data) filled, kept cells without data outlined.

    Land is drawn as its outline only, so a class cell has the one colour of its legend entry, on land and sea."""
    cells = enriched.grid
    figure, axes = plt.subplots(figsize=(9, 8))
    label_axes(axes, f"Cells: {_cells_title(cells)}, {len(enriched.classes)} classes")
    if cells.kind == "grid":
        _draw_grid_lines(axes, cells)
    is_class = cells.cells.index.isin(enriched.classes["cell"])
    if cells.kind == "grid":
        cells.cells[is_class].plot(ax=axes, color=CLASS_FILL, edgecolor="none")
    else:  # Voronoi polygons reach far out to sea: fill their land parts
        land = gpd.GeoSeries(cells.cells["land"].to_numpy(), crs=geo.CROATIA_CRS).to_crs(geo.WGS84)
        land[is_class].plot(ax=axes, color=CLASS_FILL, edgecolor="none")
    cells.cells.boundary.plot(ax=axes, color="black", linewidth=0.6)
    gpd.GeoSeries([geo.load_border()], crs=geo.WGS84).boundary.plot(ax=axes, color=LAND["edgecolor"], linewidth=1.0,
                                                                    zorder=5)
    round_degree_ticks(axes)
    handles = [Patch(facecolor=CLASS_FILL, edgecolor="black", label="class (has train data)"),
               Patch(facecolor="none", edgecolor="black", label="kept cell without train data"),
               Line2D([], [], color=LAND["edgecolor"], linewidth=1.0, label="Croatia's border and coast")]
    if cells.kind != "grid":  # every adaptive cell is a class; the part of it at sea stays white
        handles[:2] = [Patch(facecolor=CLASS_FILL, edgecolor="black", label="class (its cell's land part)")]
    axes.legend(handles=handles, loc="lower left")
    return figure


def class_sizes_figure(enriched):
    """Kept cells coloured by their number of train locations; cells with none hatched grey (no class)."""
    cells = enriched.grid.cells.copy()
    cells["n_train"] = enriched.classes.set_index("cell")["n_train"].reindex(cells.index).fillna(0).astype(int)
    figure, axes = plt.subplots(figsize=(9, 8))
    label_axes(axes, f"Train locations per cell (class size): {_cells_title(enriched.grid)}")
    empty = cells[cells["n_train"] == 0]
    if len(empty):
        empty.plot(ax=axes, facecolor="0.92", edgecolor="0.6", hatch="///", linewidth=0.4)
    classes = cells[cells["n_train"] > 0]
    norm = LogNorm(vmin=1, vmax=max(2, classes["n_train"].max()))
    classes.plot(ax=axes, column="n_train", cmap="viridis", norm=norm, edgecolor="white", linewidth=0.4)
    colour_bar = figure.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=axes, shrink=0.7,
                                 label="train locations (log scale; 1 is the darkest)")
    colour_bar.set_ticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= norm.vmax])
    colour_bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    colour_bar.ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    _draw_coastline(axes)
    handles = [Line2D([], [], color="black", linewidth=0.8, label="coastline / border")]
    if len(empty):  # adaptive cells are all classes
        handles.insert(0, Patch(facecolor="0.92", edgecolor="0.6", hatch="///",
                                label="0 train locations (not a class)"))
    axes.legend(handles=handles, loc="lower left")
    return figure


def centroids_figure(enriched):
    """The plain, clipped and weighted centroid of every class."""
    classes = enriched.classes
    figure, axes = croatia_axes(f"Class centroids: {_cells_title(enriched.grid)}")
    enriched.grid.cells.loc[classes["cell"]].boundary.plot(ax=axes, color="0.5", linewidth=0.5)
    # the plain and clipped centroids often coincide: plain is a large open ring, so a cross inside still shows it
    for prefix, label, style in (("centroid", "plain (cell land)", {"marker": "o", "s": 70, "facecolors": "none",
                                                                   "edgecolors": "0.3", "linewidths": 1.2}),
                                 ("clipped", "clipped to land", {"marker": "x", "s": 28, "color": "tab:red",
                                                                 "linewidths": 1.4}),
                                 ("weighted", "weighted (train mean)", {"marker": "^", "s": 20, "color": "tab:blue"})):
        axes.scatter(classes[f"{prefix}_lng"], classes[f"{prefix}_lat"], label=label, zorder=3, **style)
    axes.legend(loc="upper right")
    return figure


def distribution_figure(enriched):
    """Locations by split on the map, and the histogram of train locations per class."""
    locations = enriched.locations
    figure, (axes_map, axes_hist) = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [3, 2]})
    draw_land(axes_map)
    size = float(np.clip(2000 / max(len(locations), 1), 3, 12))  # dots shrink as locations grow
    for split, style in SPLIT_STYLE.items():
        part = locations[locations["split"] == split]
        axes_map.scatter(part["longitude"], part["latitude"], label=f"{split} ({len(part)})", zorder=3,
                         linewidths=0, color=style["color"], marker=style["marker"], s=size * style["scale"])
    label_axes(axes_map, f"{len(locations)} locations by split")
    axes_map.legend(loc="upper right", markerscale=2)
    sizes = enriched.classes["n_train"]
    axes_hist.hist(sizes, bins=np.arange(0, sizes.max() + 2) - 0.5 if sizes.max() < 40 else 30, color=CLASS_COLOUR,
                   edgecolor="white", linewidth=1.0)  # edges keep neighbouring bars apart
    axes_hist.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes_hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes_hist.set_xlabel("train locations in the class")
    axes_hist.set_ylabel("number of classes")
    axes_hist.set_title(f"Class sizes ({len(sizes)} classes, median {sizes.median():g})")
    return figure


FIGURES = {"grid": grid_figure, "class_sizes": class_sizes_figure, "centroids": centroids_figure,
           "distribution": distribution_figure}


def enrich_figures(enriched, out_dir: str | Path, tag: str) -> list[Path]:
    """All enrich figures into `out_dir` as <figure>_<tag>.png (tag: see src.enrich.output_tag); their paths."""
    return [save_figure(make(enriched), Path(out_dir) / f"{name}_{tag}.png") for name, make in FIGURES.items()]


def training_curves(history: list[dict[str, float]], baseline_km: float | None, path: Path) -> Path:
    """Loss (train, val) and val mean km per epoch, with the constant baseline's val km as a flat line:
    the TensorBoard curves as a PNG, for a run's folder. `history`: one dict per epoch (EpochHistory)."""
    figure, (loss_axes, km_axes) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [row["epoch"] for row in history]
    for key, colour in (("train/loss", "tab:blue"), ("val/loss", "darkorange")):
        points = [(e, row[key]) for e, row in zip(epochs, history) if key in row]
        if points:
            loss_axes.plot(*zip(*points), marker="o", markersize=3, color=colour, label=key.split("/")[0])
    loss_axes.set(title="loss", xlabel="epoch", ylabel="loss")
    for key, colour, label in (("train/km_mean", "tab:blue", "train"), ("val/km_mean", "darkorange", "val")):
        points = [(e, row[key]) for e, row in zip(epochs, history) if key in row]
        if points:
            km_axes.plot(*zip(*points), marker="o", markersize=3, color=colour, label=label)
    if baseline_km is not None:
        km_axes.axhline(baseline_km, color="grey", linestyle="--", label=f"val, constant baseline ({baseline_km:.1f} km)")
    km_axes.set(title="mean error", xlabel="epoch", ylabel="mean great-circle error (km)")
    for axes in (loss_axes, km_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.tight_layout()
    return save_figure(figure, Path(path))


def reliability_figure(levels, inside: dict, count: int, title: str, path: Path, tolerance: float = 0.05) -> Path:
    """The reliability of the confidence regions: the share of true locations inside the disc of each nominal
    level, for each variant of `inside` (name -> shares: calibrated, temperature only, uncalibrated), against
    the diagonal and a band of +-`tolerance`; the calibrated 50% and 90% points labelled."""
    levels = np.asarray(levels, float)
    figure, axes = plt.subplots(figsize=(6.4, 7.4))
    axes.fill_between([0, 1], [-tolerance, 1 - tolerance], [tolerance, 1 + tolerance], color="0.9",
                      label=f"within {100 * tolerance:.0f} points")
    axes.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1, label="perfectly calibrated")
    styles = {"uncalibrated": ("tab:orange", "uncalibrated (T = 1, no level map)"),
              "temperature only": ("tab:green", "temperature only"),
              "val split only": ("tab:purple", "calibrated on each fold's val split"),
              "calibrated": ("tab:blue", "calibrated (temperature and level map)")}
    for name, (colour, label) in styles.items():
        if name in inside:
            axes.plot(levels, inside[name], marker="o", markersize=4 if name == "calibrated" else 3, color=colour,
                      label=label, zorder=3 if name == "calibrated" else 2)
    calibrated = inside["calibrated"]
    for level, offset in ((0.5, (10, -22)), (0.9, (-10, 14))):
        j = int(np.argmin(np.abs(levels - level)))
        axes.annotate(f"{100 * calibrated[j]:.0f}% inside the {100 * level:.0f}% disc", (levels[j], calibrated[j]),
                      xytext=offset, textcoords="offset points", ha="left" if offset[0] > 0 else "right",
                      color="tab:blue", arrowprops={"arrowstyle": "-", "color": "tab:blue", "linewidth": 0.8})
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal level of the disc around the prediction",
             ylabel=f"share of true locations inside ({count} locations)", title=title)
    percent = FuncFormatter(lambda value, _: f"{100 * value:.0f}%")
    axes.xaxis.set_major_formatter(percent)
    axes.yaxis.set_major_formatter(percent)
    axes.set_aspect("equal")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize="small")
    figure.tight_layout()
    return save_figure(figure, Path(path))
