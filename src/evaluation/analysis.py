"""Analysis of cells and predictions: oracle ceiling, error map, worst-N gallery, per-class accuracy, confusion.

The tables and figures `python -m src.analyze` writes (docs/analyze.md); the locations come from the enrich
stage, of the flags or of a checkpoint's run (`data_of_checkpoint`).
"""

from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MultipleLocator  # noqa: E402
from tabulate import tabulate  # noqa: E402

from src.inference.checkpoints import find_checkpoint, list_checkpoints, read_data_config, val_km
from src.data.config import DataConfig
from src.data.enrich import Enriched, locate_locations
from src.data.config import LOCATIONS_FILE
from src.core.errors import UserError  # noqa: E402
from src.core.geo import haversine_km  # noqa: E402
from src.data.cells import build_grid, nearest_class  # noqa: E402
from src.data.config import CENTROID_PREFIX  # noqa: E402
from src.core.choices import CENTROID_KINDS  # noqa: E402
from src.data.images import VIEWS, check_image, load_image, view_paths  # noqa: E402
from src.evaluation.plots import croatia_axes, draw_land, save_figure  # noqa: E402

ERROR_CMAP = "plasma"


def error_map_figure(errors: pd.DataFrame, title: str = "") -> plt.Figure:
    """Map of true points coloured by error (km, log scale), a cross at each prediction and a line between.

    `errors` has columns true_lat, true_lng, pred_lat, pred_lng, error_km (as `src.score.Scored.errors`).
    """
    km = errors["error_km"].to_numpy()
    fig, ax = croatia_axes(title or f"{len(errors)} locations, mean error {km.mean():.1f} km, "
                                    f"median {np.median(km):.1f} km", figsize=(8, 7))
    segments = np.stack([errors[["true_lng", "true_lat"]].to_numpy(), errors[["pred_lng", "pred_lat"]].to_numpy()], 1)
    ax.add_collection(LineCollection(segments, colors="0.45", linewidths=0.6, alpha=0.6, zorder=2))
    norm = LogNorm(vmin=max(0.5, float(km.min())), vmax=max(1.0, float(km.max())))
    points = ax.scatter(errors["true_lng"], errors["true_lat"], c=np.maximum(km, norm.vmin), cmap=ERROR_CMAP,
                        norm=norm, s=22, edgecolors="k", linewidths=0.3, zorder=3)
    ax.scatter(errors["pred_lng"], errors["pred_lat"], marker="x", s=45, color="black", linewidths=1.3, zorder=4)
    colorbar = fig.colorbar(points, ax=ax, shrink=0.8, label="error km (colour of the true location)")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500) if norm.vmin <= t <= norm.vmax]
    colorbar.set_ticks(ticks or [norm.vmin, norm.vmax])
    colorbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    colorbar.ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.legend(handles=[
        Line2D([], [], linestyle="", marker="o", markersize=6, markerfacecolor=plt.get_cmap(ERROR_CMAP)(0.6),
               markeredgecolor="k", markeredgewidth=0.3, label="true location (colour: error km)"),
        Line2D([], [], linestyle="", marker="x", markersize=7, markeredgewidth=1.3, color="black",
               label="prediction"),
        Line2D([], [], color="0.45", linewidth=0.8, label="true to predicted")], loc="lower left")  # the sea
    return fig


def error_map(errors: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """The error map (error_map_figure) written to `path`."""
    return save_figure(error_map_figure(errors, title), path, dpi=120)


def _degree_ticks(ax: plt.Axes) -> None:
    """Ticks every 2 degrees of longitude and 1 of latitude, labelled 16°E / 45°N (no axis labels needed)."""
    ax.xaxis.set_major_locator(MultipleLocator(2))
    ax.yaxis.set_major_locator(MultipleLocator(1))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}°E"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}°N"))
    ax.tick_params(labelsize=11)


def worst_gallery_figure(errors: pd.DataFrame, image_dirs: dict[str, str | Path], n: int = 8,
                         thumb_size: int = 128) -> tuple[plt.Figure, pd.DataFrame]:
    """The `n` largest errors: four views per row and a map with the true (green) and predicted (red) point.

    Returns the figure and the rows shown (largest error first). Views that cannot be read show a note.
    """
    worst = errors.sort_values("error_km", ascending=False, kind="stable").head(n).reset_index(drop=True)
    fig, axes = plt.subplots(len(worst), 5, figsize=(12, 2.5 * len(worst)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.3]})
    for row, record in worst.iterrows():
        folder = image_dirs.get(record["uuid"])
        for i, view in enumerate(VIEWS):
            ax = axes[row, i]
            ax.set_xticks([])
            ax.set_yticks([])
            file = view_paths(folder)[i] if folder is not None else None
            reason = "no folder" if file is None else check_image(file)
            if reason is None:
                ax.imshow(load_image(file, thumb_size))
            else:
                ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, fontsize=8, transform=ax.transAxes)
            if row == 0:
                ax.set_title(f"{view} deg", fontsize=12)
        axes[row, 0].set_ylabel(f"#{row + 1} {record['uuid'][:8]}\n{record['error_km']:.0f} km", fontsize=12)
        ax = axes[row, 4]
        draw_land(ax)
        ax.set_xlabel("")  # geopandas names the axes; the tick labels say degrees
        ax.set_ylabel("")
        ax.set_aspect(1 / 0.71)
        _degree_ticks(ax)
        ax.plot([record["true_lng"], record["pred_lng"]], [record["true_lat"], record["pred_lat"]], color="0.3",
                linewidth=0.9)
        ax.scatter([record["true_lng"]], [record["true_lat"]], color="tab:green", s=30, zorder=3, label="true")
        ax.scatter([record["pred_lng"]], [record["pred_lat"]], color="tab:red", s=30, zorder=3, label="predicted")
        ax.legend(fontsize=9, loc="lower left", handletextpad=0.2, borderpad=0.3)  # the sea, on every map
    fig.suptitle(f"{len(worst)} largest errors", y=1.0, fontsize=13)
    fig.tight_layout()
    return fig, worst


def worst_gallery(errors: pd.DataFrame, image_dirs: dict[str, str | Path], path: str | Path, n: int = 8,
                  thumb_size: int = 128) -> tuple[Path, pd.DataFrame]:
    """The worst-N gallery (worst_gallery_figure) written to `path`; the path and the rows shown.
    A .jpg path keeps the photos at a tenth of a PNG's size (save_figure)."""
    fig, worst = worst_gallery_figure(errors, image_dirs, n, thumb_size)
    return save_figure(fig, path, dpi=100), worst


def oracle_errors(locations: pd.DataFrame) -> pd.DataFrame:
    """Per-location km error when predicting each location at its true class's centroid, per centroid kind.

    `locations` has latitude, longitude and, per centroid kind, `<prefix>_lat`/`<prefix>_lng` (the centroids
    of the row's class, as in `src.enrich.Enriched.locations`). Columns: plain, clipped, weighted.
    """
    return pd.DataFrame({
        kind: haversine_km(locations["latitude"], locations["longitude"], locations[f"{CENTROID_PREFIX[kind]}_lat"],
                           locations[f"{CENTROID_PREFIX[kind]}_lng"])
        for kind in CENTROID_KINDS
    }, index=locations.index)


def per_class_accuracy(true_class, pred_class, error_km, classes: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (prediction in the true class) and mean km per true class, least accurate first.

    `classes` is the class table (index = class); columns: class, cell, centroid_lat, centroid_lng (the
    cell's plain centroid), n_train, n, correct, accuracy, mean_km.
    """
    frame = pd.DataFrame({"class": np.asarray(true_class, int), "pred": np.asarray(pred_class, int),
                          "error_km": np.asarray(error_km, float)})
    grouped = frame.assign(correct=frame["class"] == frame["pred"]).groupby("class")
    table = pd.DataFrame({"n": grouped.size(), "correct": grouped["correct"].sum(),
                          "mean_km": grouped["error_km"].mean()})
    table["accuracy"] = table["correct"] / table["n"]
    for column in ("cell", "centroid_lat", "centroid_lng", "n_train"):
        if column in classes.columns:
            table[column] = classes.loc[table.index, column].to_numpy()
    table = table.reset_index()
    order = ["class", "cell", "centroid_lat", "centroid_lng", "n_train", "n", "correct", "accuracy", "mean_km"]
    table = table[[c for c in order if c in table.columns]]
    return table.sort_values(["accuracy", "n", "class"], ascending=[True, False, True], ignore_index=True)


def lat_lng(lat: float, lng: float) -> str:
    """A point as '45.42, 16.11' (degrees, about 1 km)."""
    return f"{lat:.2f}, {lng:.2f}"


def class_place(classes: pd.DataFrame, label: int) -> str:
    """A class with its cell's (plain) centroid, e.g. '27 (45.42, 16.11)'."""
    return f"{label} ({lat_lng(classes.loc[label, 'centroid_lat'], classes.loc[label, 'centroid_lng'])})"


def confusion_summary(true_class, pred_class, shown: list[int], classes: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """For each class in `shown`: its centroid, count, accuracy and the `top` classes it was predicted as.

    `classes` is the class table (index = class, with centroid_lat/centroid_lng); "predicted as" names each
    class with its centroid and count, e.g. '27 (45.42, 16.11): 6; 3 (43.51, 16.44): 1'.
    """
    frame = pd.DataFrame({"class": np.asarray(true_class, int), "pred": np.asarray(pred_class, int)})
    rows = []
    for label in shown:
        mine = frame.loc[frame["class"] == label, "pred"]
        counts = mine.value_counts().sort_index().sort_values(ascending=False, kind="stable")
        rows.append({
            "class": int(label), "centroid_lat": float(classes.loc[label, "centroid_lat"]),
            "centroid_lng": float(classes.loc[label, "centroid_lng"]), "n": int(len(mine)),
            "accuracy": float((mine == label).mean()) if len(mine) else float("nan"),
            "predicted as": "; ".join(f"{class_place(classes, int(c))}: {int(k)}" for c, k in counts.head(top).items()),
        })
    return pd.DataFrame(rows, columns=["class", "centroid_lat", "centroid_lng", "n", "accuracy", "predicted as"])


def confusion_text(confusion: pd.DataFrame) -> str:
    """The confusion summary as a printed table: centroid as 'lat, lng', accuracy as a percentage."""
    shown = pd.DataFrame({
        "class": confusion["class"],
        "centroid (lat, lng)": [lat_lng(*point) for point in zip(confusion["centroid_lat"], confusion["centroid_lng"])],
        "n": confusion["n"],
        "accuracy": [f"{100 * a:.1f}%" for a in confusion["accuracy"]],
        "predicted as: class (lat, lng): n": confusion["predicted as"],
    })
    return tabulate(shown, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)


def rows_of_split(locations: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split ('all' keeps every row)."""
    return locations if split == "all" else locations[locations["split"] == split]


def oracle_ceiling(enriched: Enriched, spacings, split: str = "test", mainland_only: bool = False) -> pd.DataFrame:
    """Mean and median km of the oracle (true class's centroid) per spacing and centroid kind on `split`.

    The locations of `enriched` are re-gridded at every spacing, each keeping its split.
    Columns: spacing, classes, locations, plain_km, clipped_km, weighted_km, plain_median_km, ...
    """
    rows = []
    for spacing in sorted(set(float(s) for s in spacings)):
        if spacing == enriched.grid.spacing:
            locations, classes = enriched.locations, enriched.classes
        else:
            locations, classes, _ = locate_locations(enriched.ingested.locations, enriched.locations["split"].to_numpy(),
                                                     build_grid(spacing, mainland_only))
        chosen = rows_of_split(locations, split)
        if chosen.empty:
            raise UserError(f"--eval-split {split}: no {split} location at spacing {spacing}; pick another split or all")
        errors = oracle_errors(chosen)
        row = {"spacing": spacing, "classes": len(classes), "locations": len(chosen)}
        row.update({f"{kind}_km": float(errors[kind].mean()) for kind in CENTROID_KINDS})
        row.update({f"{kind}_median_km": float(errors[kind].median()) for kind in CENTROID_KINDS})
        rows.append(row)
    return pd.DataFrame(rows)


ORACLE_STYLE = {"weighted": {"marker": "^", "linestyle": "-", "markersize": 7},
                "plain": {"marker": "o", "linestyle": "-", "markersize": 11, "markerfacecolor": "none",
                          "markeredgewidth": 1.5, "linewidth": 3.5, "alpha": 0.6, "zorder": 1.5},
                "clipped": {"marker": "x", "linestyle": "--", "markersize": 8, "markeredgewidth": 1.8, "zorder": 3}}


def oracle_ceiling_figure(table: pd.DataFrame, split: str) -> plt.Figure:
    """Oracle mean km against grid spacing, one line per centroid kind. The plain and clipped centroids
    often coincide: a wide pale line with open rings under a dashed line with crosses keeps both visible,
    and kinds whose values are all equal (to the 0.1 km printed) share one line and one legend entry."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: list[list[str]] = []
    for kind in CENTROID_KINDS:
        same = next((group for group in drawn if np.allclose(table[f"{group[0]}_km"], table[f"{kind}_km"], rtol=0,
                                                             atol=0.05)), None)
        if same is None:
            drawn.append([kind])
        else:
            same.append(kind)
    for group in drawn:
        label = group[0] if len(group) == 1 else " = ".join(group) + " (same values)"
        ax.plot(table["spacing"], table[f"{group[0]}_km"], label=label, **ORACLE_STYLE[group[0]])
    ax.set_xlabel("grid spacing (degrees)")
    ax.set_ylabel(f"oracle mean km ({split} locations)")
    ax.set_title("What the grid alone costs: every location at its true class's centroid", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(title="centroid")
    return fig


def oracle_figure(table: pd.DataFrame, path: str | Path, split: str) -> Path:
    """The oracle ceiling figure (oracle_ceiling_figure) written to `path`."""
    return save_figure(oracle_ceiling_figure(table, split), path)


def predicted_classes(enriched: Enriched, lat, lng) -> np.ndarray:
    """The class a predicted point falls in: its cell's class, else the nearest class (as for labels)."""
    cell = enriched.grid.assign(lat, lng)
    return nearest_class(enriched.classes, enriched.grid, cell, lat, lng)


def data_of_checkpoint(checkpoint: Path | None, reports_dir: Path) -> tuple[Path, DataConfig]:
    """The checkpoint (default: `find_checkpoint(reports_dir)`) and the DataConfig of its run.

    When the run saved its locations (version_N/locations.csv) they are reused: the run's exact locations and
    split, without re-reading the dataset dirs."""
    path = Path(checkpoint or find_checkpoint(reports_dir))
    data = read_data_config(path, reports_dir=reports_dir)
    saved = path.parent.parent / LOCATIONS_FILE
    if path.parent.name == "checkpoints" and saved.is_file():
        data = replace(data, locations_csv=str(saved))
    return path, data


def runs_whose_split_is(reports_dir: str | Path, split: str, uuids) -> list[Path]:
    """The best checkpoint of every run under `reports_dir` whose saved `split` rows (version_N/locations.csv)
    are exactly `uuids`: the runs a submission of those uuids was predicted from. Newest run first."""
    wanted = set(uuids)
    best: dict[Path, Path] = {}
    for path in list_checkpoints(reports_dir, best_only=True) if Path(reports_dir).is_dir() else []:
        run = path.parent.parent
        if run not in best or val_km(path) < val_km(best[run]):  # newest first: ties keep the newer
            best[run] = path
    found = []
    for run, path in best.items():
        saved = run / LOCATIONS_FILE
        if path.parent.name != "checkpoints" or not saved.is_file():
            continue
        rows = pd.read_csv(saved, usecols=["uuid", "split"], dtype=str)
        if set(rows_of_split(rows, split)["uuid"]) == wanted:
            found.append(path)
    return found
