"""Analysis of a grid and a submission: oracle ceiling, error map, worst-N gallery, per-class accuracy.

    python -m src.analyze [--submission CSV] [--checkpoint PATH | --dataset-dirs DIR ...] [--spacings ...]

The locations (truth, image folders, split, classes) come from the enrich stage: of --dataset-dirs with
the enrich flags, or, without --dataset-dirs, of the run of --checkpoint (default: the newest best
checkpoint under reports/), with its dataset dirs, spacing and seed.
Figures go to figures/, tables to reports/analysis/ (both written atomically); tables also print on stdout.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from tabulate import tabulate  # noqa: E402

from src.enrich import (SPLITS, Enriched, add_enrich_arguments, apply_data_hparams, check_spacing,  # noqa: E402
                        enrich_from_args, locate_locations)  # noqa: E402
from src.errors import UserError, brief, run_cli  # noqa: E402
from src.files import atomic_path  # noqa: E402
from src.geo import haversine_km, load_border  # noqa: E402
from src.grid import CENTROID_PREFIX, build_grid, nearest_class  # noqa: E402
from src.images import VIEWS, check_image, load_image, view_paths  # noqa: E402
from src.predict import REPORTS_DIR, latest_checkpoint  # noqa: E402
from src.geo import summarize_km  # noqa: E402
from src.score import format_summary, match_and_measure, read_locations  # noqa: E402

KINDS = ("plain", "clipped", "weighted")
DEFAULT_SPACINGS = (0.25, 0.5, 1.0, 2.0)


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
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500) if norm.vmin <= t <= norm.vmax]
    colorbar.set_ticks(ticks or [norm.vmin, norm.vmax])
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

    `locations` has latitude, longitude and, per centroid kind, `<prefix>_lat`/`<prefix>_lng` (the centroids
    of the row's class, as in `src.enrich.Enriched.locations`). Columns: plain, clipped, weighted.
    """
    return pd.DataFrame({
        kind: haversine_km(locations["latitude"], locations["longitude"], locations[f"{CENTROID_PREFIX[kind]}_lat"],
                           locations[f"{CENTROID_PREFIX[kind]}_lng"])
        for kind in KINDS
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


def rows_of_split(locations: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split ('all' keeps every row)."""
    return locations if split == "all" else locations[locations["split"] == split]


def oracle_ceiling(enriched: Enriched, spacings, split: str = "test", seed: int = 0, fractions=(0.8, 0.1, 0.1),
                   holdout_dirs=(), mainland_only: bool = False) -> pd.DataFrame:
    """Mean and median km of the oracle (true class's centroid) per spacing and centroid kind on `split`.

    The kept locations of `enriched` are re-gridded at every spacing with the same split settings.
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
        row.update({f"{kind}_km": float(errors[kind].mean()) for kind in KINDS})
        row.update({f"{kind}_median_km": float(errors[kind].median()) for kind in KINDS})
        rows.append(row)
    return pd.DataFrame(rows)


def oracle_figure(table: pd.DataFrame, path: str | Path, split: str) -> Path:
    """Oracle mean km against grid spacing, one line per centroid kind."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in KINDS:
        ax.plot(table["spacing"], table[f"{kind}_km"], marker="o", label=kind)
    ax.set_xlabel("grid spacing (degrees)")
    ax.set_ylabel(f"oracle mean km ({split} locations)")
    ax.set_title("What the grid alone costs: every location at its true class's centroid")
    ax.grid(alpha=0.3)
    ax.legend(title="centroid")
    return save_figure(fig, path)


def predicted_classes(enriched: Enriched, lat, lng) -> np.ndarray:
    """The class a predicted point falls in: its cell's class, else the nearest class (as for labels)."""
    cell = enriched.grid.assign(lat, lng)
    return nearest_class(enriched.classes, enriched.grid, cell, lat, lng)


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """A CSV table, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def enrich_args_from_checkpoint(args: argparse.Namespace) -> Path:
    """Fill the data flags (dirs, spacing, seed, split, ...) from a checkpoint's hparams; returns its path.

    Checkpoints written before the split flags were saved fall back to the enrich defaults.
    """
    path = args.checkpoint or latest_checkpoint(args.reports_dir)
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "file not found"
        raise UserError(f"--checkpoint {path}: {what}; pass a .ckpt written by src.train or --dataset-dirs")
    try:
        hparams = torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"]
        apply_data_hparams(args, hparams)
    except Exception as error:  # torch/pickle raise many types for a file that is not a checkpoint
        raise UserError(f"--checkpoint {path}: not a src.train checkpoint ({brief(error)}); "
                        "pass a .ckpt written by src.train or --dataset-dirs") from None
    return Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.analyze",
        description="Oracle ceiling of the grid; with --submission: error map, worst-N gallery, per-class accuracy.",
    )
    add_enrich_arguments(parser)
    group = parser.add_argument_group("analysis")
    group.add_argument("--checkpoint", type=Path,
                       help="take the data flags (dataset dirs, spacing, seed, split, holdout dirs, ...) from "
                            "this run when --dataset-dirs is not given (default: the newest *best*.ckpt under reports/)")
    group.add_argument("--reports-dir", type=Path, default=REPORTS_DIR,
                       help="where to find checkpoints (default: reports/)")
    group.add_argument("--submission", type=Path, help="a predict CSV (uuid,latitude,longitude) to analyse")
    group.add_argument("--eval-split", choices=[*SPLITS, "all"], default="test",
                       help="the locations analysed: oracle rows and the submission's truth (default: test)")
    group.add_argument("--allow-missing", action="store_true",
                       help="analyse the uuids common to submission and --eval-split instead of stopping on a mismatch")
    group.add_argument("--spacings", type=float, nargs="+", default=list(DEFAULT_SPACINGS), metavar="DEG",
                       help="grid spacings of the oracle table (default: 0.25 0.5 1 2)")
    group.add_argument("--worst", type=int, default=8, help="rows of the worst-N gallery (default: 8)")
    group.add_argument("--least-accurate", type=int, default=10,
                       help="classes in the confusion summary (default: 10)")
    group.add_argument("--figures-dir", type=Path, default=Path("figures"), help="figure folder (default: figures)")
    group.add_argument("--tables-dir", type=Path, default=Path("reports/analysis"),
                       help="table folder (default: reports/analysis)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """CLI: oracle table, and for a submission its scores, figures and per-class tables. Returns the tables."""
    args = build_parser().parse_args(argv)
    for flag, value in (("--worst", args.worst), ("--least-accurate", args.least_accurate)):
        if value < 1:
            raise UserError(f"{flag} {value}: give a number of rows >= 1")
    for spacing in args.spacings:
        check_spacing(spacing, "--spacings")
    if not args.dataset_dirs:
        checkpoint = enrich_args_from_checkpoint(args)
        print(f"locations of the run of {checkpoint}: --dataset-dirs {' '.join(map(str, args.dataset_dirs))} "
              f"--spacing {args.spacing} --seed {args.seed}", file=sys.stderr)
    enriched = enrich_from_args(args, progress=False)
    out: dict = {}

    oracle = oracle_ceiling(enriched, [*args.spacings, args.spacing], args.eval_split, args.seed, args.split,
                            args.holdout_dirs, args.mainland_only)
    out["oracle"] = oracle
    print(f"oracle ceiling ({args.eval_split} locations at their true class's centroid), mean / median km:")
    print(tabulate([[r.spacing, r.classes, r.locations, *(f"{getattr(r, f'{k}_km'):.2f} / "
                                                          f"{getattr(r, f'{k}_median_km'):.2f}" for k in KINDS)]
                    for r in oracle.itertuples()],
                   headers=["spacing", "classes", "locations", *KINDS], tablefmt="github"))
    paths = [write_table(oracle, args.tables_dir / "oracle_ceiling.csv"),
             oracle_figure(oracle, args.figures_dir / "oracle_ceiling.png", args.eval_split)]

    if args.submission is not None:
        name = args.submission.stem
        truth = rows_of_split(enriched.locations, args.eval_split)
        scored = match_and_measure(read_locations(args.submission, "submission"), truth, args.allow_missing,
                                   where=f"{args.submission} vs the {args.eval_split} locations")
        if scored.missing or scored.extra:
            print(f"warning: analysing {len(scored.errors)} common uuid(s); {len(scored.missing)} {args.eval_split} "
                  f"location(s) without a submission row, {len(scored.extra)} submission row(s) not among them",
                  file=sys.stderr)
        errors = scored.errors
        stats = summarize_km(errors["error_km"])
        print(f"\nsubmission {args.submission} on {len(errors)} {args.eval_split} locations:")
        print(format_summary(stats))
        labels = truth.set_index("uuid").loc[errors["uuid"]]
        errors["true_class"] = labels["label"].to_numpy()
        errors["pred_class"] = predicted_classes(enriched, errors["pred_lat"].to_numpy(), errors["pred_lng"].to_numpy())
        accuracy = per_class_accuracy(errors["true_class"], errors["pred_class"], errors["error_km"], enriched.classes)
        confusion = confusion_summary(errors["true_class"], errors["pred_class"],
                                      accuracy["class"].head(args.least_accurate).tolist())
        overall = float((errors["true_class"] == errors["pred_class"]).mean())
        print(f"\nclass accuracy (prediction in the true class's cell): {100 * overall:.1f}% over "
              f"{accuracy['class'].nunique()} classes; the {len(confusion)} least accurate:")
        print(tabulate(confusion, headers="keys", tablefmt="github", showindex=False, floatfmt=".2f"))
        image_dirs = dict(zip(labels.index, labels["image_dir"]))
        gallery, worst = worst_gallery(errors, image_dirs, args.figures_dir / f"{name}_worst.png", n=args.worst)
        paths += [
            write_table(errors, args.tables_dir / f"{name}_errors.csv"),
            write_table(accuracy, args.tables_dir / f"{name}_per_class.csv"),
            write_table(confusion, args.tables_dir / f"{name}_confusion.csv"),
            error_map(errors, args.figures_dir / f"{name}_error_map.png"),
            gallery,
        ]
        out.update(errors=errors, stats=stats, per_class=accuracy, confusion=confusion, worst=worst,
                   class_accuracy=overall)
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return out


if __name__ == "__main__":
    run_cli(main)
