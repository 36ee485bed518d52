"""Analysis of a grid and a submission: oracle ceiling, error map, worst-N gallery, per-class accuracy.

    python -m src.analyze [--dataset-dirs DIR ...] [--spacing 0.5] [--seed 0] [--submission CSV]

Figures go to figures/, tables to reports/analysis/ (both written atomically) and print on stdout.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import shapely  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from src.files import atomic_path  # noqa: E402
from src.geo import haversine_km, load_border  # noqa: E402
from src.images import VIEWS, check_image, load_image, view_paths  # noqa: E402

CENTROID_KINDS = ("centroid", "clipped", "weighted")  # column prefixes: plain, clipped to land, train-weighted


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save `fig` atomically (src.files.atomic_path) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def draw_border(ax: plt.Axes) -> None:
    """Croatia's border outline on `ax` (longitude x, latitude y) with an equal-distance aspect."""
    border = load_border()
    for polygon in getattr(border, "geoms", [border]):
        x, y = polygon.exterior.xy
        ax.plot(x, y, color="0.35", linewidth=0.6, zorder=1)
    ax.set_aspect(1 / np.cos(np.radians(44.5)))
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")


def error_map(errors: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Map of true points coloured by error (km, log scale) with a line to each prediction.

    `errors` has columns true_lat, true_lng, pred_lat, pred_lng, error_km (as `src.score.Scored.errors`).
    """
    fig, ax = plt.subplots(figsize=(8, 7))
    draw_border(ax)
    segments = np.stack([errors[["true_lng", "true_lat"]].to_numpy(), errors[["pred_lng", "pred_lat"]].to_numpy()], 1)
    ax.add_collection(LineCollection(segments, colors="0.5", linewidths=0.5, alpha=0.6, zorder=2))
    km = errors["error_km"].to_numpy()
    norm = LogNorm(vmin=max(0.5, float(km.min())), vmax=max(1.0, float(km.max())))
    points = ax.scatter(errors["true_lng"], errors["true_lat"], c=np.maximum(km, norm.vmin), cmap="plasma",
                        norm=norm, s=16, edgecolors="k", linewidths=0.3, zorder=3)
    ax.scatter(errors["pred_lng"], errors["pred_lat"], marker="x", s=10, color="0.2", linewidths=0.6, zorder=3,
               label="prediction")
    colorbar = fig.colorbar(points, ax=ax, shrink=0.8, label="error km (true point colour)")
    colorbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    colorbar.ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.legend(loc="upper right")
    ax.set_title(title or f"{len(errors)} locations, mean error {km.mean():.1f} km, median {np.median(km):.1f} km")
    return save_figure(fig, path)


def worst_gallery(errors: pd.DataFrame, image_dirs: dict[str, str | Path], path: str | Path, n: int = 8,
                  thumb_size: int = 128) -> tuple[Path, pd.DataFrame]:
    """The `n` largest errors: four views per row and a map with the true (green) and predicted (red) point.

    Returns the figure path and the rows shown (largest error first). Views that cannot be read show a note.
    """
    worst = errors.sort_values("error_km", ascending=False, kind="stable").head(n).reset_index(drop=True)
    fig, axes = plt.subplots(len(worst), 5, figsize=(13, 2.6 * len(worst)), squeeze=False,
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
                ax.set_title(f"{view} deg")
        axes[row, 0].set_ylabel(f"#{row + 1} {record['uuid'][:8]}\n{record['error_km']:.0f} km", fontsize=9)
        ax = axes[row, 4]
        draw_border(ax)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(labelsize=6)
        ax.plot([record["true_lng"], record["pred_lng"]], [record["true_lat"], record["pred_lat"]], color="0.4",
                linewidth=0.8)
        ax.scatter([record["true_lng"]], [record["true_lat"]], color="tab:green", s=25, zorder=3, label="true")
        ax.scatter([record["pred_lng"]], [record["pred_lat"]], color="tab:red", s=25, zorder=3, label="predicted")
        if row == 0:
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{len(worst)} largest errors", y=1.0)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90), worst


def oracle_errors(locations: pd.DataFrame) -> pd.DataFrame:
    """Per-location km error when predicting each location at its true class's centroid, per centroid kind.

    `locations` has latitude, longitude and, per kind in CENTROID_KINDS, `<kind>_lat`/`<kind>_lng`
    (the centroids of the row's class, as in `src.enrich.Enriched.locations`). Columns: plain, clipped,
    weighted.
    """
    return pd.DataFrame({
        name: haversine_km(locations["latitude"], locations["longitude"], locations[f"{kind}_lat"],
                           locations[f"{kind}_lng"])
        for name, kind in zip(("plain", "clipped", "weighted"), CENTROID_KINDS)
    }, index=locations.index)


def per_class_accuracy(true_class, pred_class, error_km, classes: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (prediction in the true class) and mean km per true class, least accurate first.

    `classes` is the class table (index = class); columns: class, cell, n_train, n, correct, accuracy, mean_km.
    """
    frame = pd.DataFrame({"class": np.asarray(true_class, int), "pred": np.asarray(pred_class, int),
                          "error_km": np.asarray(error_km, float)})
    grouped = frame.assign(correct=frame["class"] == frame["pred"]).groupby("class")
    table = pd.DataFrame({"n": grouped.size(), "correct": grouped["correct"].sum(),
                          "mean_km": grouped["error_km"].mean()})
    table["accuracy"] = table["correct"] / table["n"]
    for column in ("cell", "n_train"):
        if column in classes.columns:
            table[column] = classes.loc[table.index, column].to_numpy()
    table = table.reset_index()
    order = ["class", "cell", "n_train", "n", "correct", "accuracy", "mean_km"]
    table = table[[c for c in order if c in table.columns]]
    return table.sort_values(["accuracy", "n", "class"], ascending=[True, False, True], ignore_index=True)


def confusion_summary(true_class, pred_class, classes: list[int], top: int = 3) -> pd.DataFrame:
    """For each class in `classes`: its count, accuracy and the `top` classes its locations were predicted as."""
    frame = pd.DataFrame({"class": np.asarray(true_class, int), "pred": np.asarray(pred_class, int)})
    rows = []
    for label in classes:
        mine = frame.loc[frame["class"] == label, "pred"]
        counts = mine.value_counts().sort_index().sort_values(ascending=False, kind="stable")
        rows.append({
            "class": int(label), "n": int(len(mine)),
            "accuracy": float((mine == label).mean()) if len(mine) else float("nan"),
            "predicted as": ", ".join(f"{int(c)} ({int(k)})" for c, k in counts.head(top).items()),
        })
    return pd.DataFrame(rows, columns=["class", "n", "accuracy", "predicted as"])
