"""Out-of-fold accuracy of the model levers, each alone and combined: K-fold cross-validation (`src.train
--folds`) of the CPU setup (frozen backbone on cached features) on one LUMEN dataset dir.

    python -m benchmarks.accuracy_levers [--dataset-dir ../shared/data/lumen_external_subset] [--folds 5]

Every configuration trains K runs with the same seeded folds, so each location is predicted once by a run
that never saw it; the table gives the out-of-fold mean and median km, the share within 25 km, the standard
error of the mean, the share of true locations inside the calibrated 50% and 90% confidence regions, and the
constant baseline (each fold's train-mean location). The levers are measured on top of the head before the
levers (its own point, no refinement); the `defaults --refine` rows on top of src.train's defaults. A second
table holds the calibration rows: each configuration's shares inside the regions with the saved calibration
(temperature and level map, fitted out of fold), with the temperature only, and uncalibrated. The last line
is the best configuration's mean km against the constant's.
"""

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmarks import DEFAULT_DATASET
from src.core import geo
from src.data.ingest import read_datasets

ROOT = Path(__file__).resolve().parent.parent
# the head before the levers (the reference's: concatenated views, one-hot cross-entropy, the head's own point
# without the retrieval refinement); each lever's flags follow it (argparse keeps the last value), "current
# defaults" is src.train as it is
BEFORE = ["--fusion", "concat", "--label-smoothing-km", "0", "--refine", "none"]
LEVERS = [
    ("current defaults", None),
    ("before the levers", []),
    ("--cells adaptive", ["--cells", "adaptive"]),
    ("--label-smoothing-km 12", ["--label-smoothing-km", "12"]),
    ("--label-smoothing-km 40", ["--label-smoothing-km", "40"]),
    ("--predict-rule median", ["--predict-rule", "median"]),
    ("--predict-rule mode", ["--predict-rule", "mode"]),
    ("--approach hybrid", ["--approach", "hybrid"]),
    ("--approach regression", ["--approach", "regression"]),
    ("--fusion mean", ["--fusion", "mean"]),
    ("--fusion attention", ["--fusion", "attention"]),
    ("--backbone efficientnet_lite2", ["--backbone", "efficientnet_lite2"]),
    ("--spacing 0.7", ["--spacing", "0.7"]),
]
# on top of src.train's defaults: the retrieval refinement against the head's own point
ON_DEFAULTS = [
    ("defaults --refine none", ["--refine", "none"]),
    ("defaults --refine knn", ["--refine", "knn"]),
]


def run_name(name: str) -> str:
    """The run folder of a configuration."""
    return "".join(c if c.isalnum() else "_" for c in name)


def run(dataset: Path, out: Path, name: str, flags: list[str], folds: int, seed: int,
        cache_dir: Path | None = None) -> dict:
    """One cross-validated configuration (`flags` None: src.train's defaults); its oof_metrics.json. A run
    already complete under `out` (same name) is read, not repeated, so an interrupted benchmark resumes."""
    flags = flags or []
    metrics_path = out / run_name(name) / "version_0" / "oof_metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())
    if (out / run_name(name)).exists():  # an interrupted run: start it again
        shutil.rmtree(out / run_name(name))
    command = [sys.executable, "-m", "src.train", "--approach", "classification", "--dataset-dirs", str(dataset),
               "--folds", str(folds), "--seed", str(seed), "--out-dir", str(out), "--run-name", run_name(name),
               "--cache-dir", str(cache_dir or out / "cache"), *flags]
    if "--approach" in flags:  # the lever replaces the approach
        at = command.index("--approach")
        del command[at:at + 2]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name}: src.train failed:\n{result.stderr[-3000:]}")
    return json.loads(metrics_path.read_text())


def read_truth(dataset: Path) -> pd.DataFrame:
    """uuid, latitude, longitude, image_dir of the dataset's usable locations (as src.train reads them)."""
    truth = read_datasets([dataset], progress=False).locations[["uuid", "latitude", "longitude", "image_dir"]]
    return truth.assign(uuid=truth["uuid"].astype(str))


def errors_km(out: Path, name: str, truth: pd.DataFrame) -> pd.Series:
    """Great-circle error of each out-of-fold prediction of a configuration's run, indexed by uuid."""
    oof = pd.read_csv(out / run_name(name) / "version_0" / "oof.csv", dtype={"uuid": str})
    joined = oof.merge(truth[["uuid", "latitude", "longitude"]], on="uuid", suffixes=("", "_true"), validate="one_to_one")
    km = geo.haversine_km(joined["latitude_true"], joined["longitude_true"], joined["latitude"], joined["longitude"])
    return pd.Series(np.asarray(km, float), index=joined["uuid"])


# the calibration rows: the variants the out-of-fold reliability check saves (oof_metrics.json "confidence")
CALIBRATION_VARIANTS = [("calibrated (saved)", ""), ("temperature only", "_temperature_only"),
                        ("uncalibrated", "_uncalibrated")]


def coverage(confidence: dict | None, variant: str) -> str:
    """'inside 50% / inside 90%' of one calibration variant ('' for the calibrated one) of a run's confidence
    summary (display string; blank for a regression run, which has none of these variants' keys)."""
    keys = (f"inside_50{variant}", f"inside_90{variant}")
    if not confidence or any(key not in confidence for key in keys):
        return ""
    return " / ".join(f"{100 * confidence[key]:.0f}%" for key in keys)


def summary(km) -> list[str]:
    """n, mean ± standard error, median, share within 25 km (display strings)."""
    km = np.asarray(km, float)
    se = km.std(ddof=1) / np.sqrt(km.size)
    return [str(km.size), f"{km.mean():.1f} ± {se:.1f}", f"{np.median(km):.1f}", f"{100 * (km <= 25).mean():.0f}%"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_levers", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET, help="a LUMEN dataset dir")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levers", nargs="+", default=None, help="names of the levers to run (default: all)")
    parser.add_argument("--combination", action="append", default=[], metavar="FLAGS",
                        help='flags of a combined configuration to run after the levers, quoted '
                             '(e.g. --combination="--fusion mean --label-smoothing-km 40"); repeatable')
    parser.add_argument("--train-flags", default="", metavar="FLAGS",
                        help='flags added to every run, quoted (e.g. --train-flags="--image-size 96")')
    parser.add_argument("--out-dir", type=Path, default=None, help="where the runs go (default: a temporary dir)")
    args = parser.parse_args(argv)
    levers = [(n, None if f is None else BEFORE + f) for n, f in LEVERS if args.levers is None or n in args.levers]
    levers += [(n, f) for n, f in ON_DEFAULTS if args.levers is None or n in args.levers]
    levers += [(flags, shlex.split(flags)) for flags in args.combination]
    common = shlex.split(args.train_flags)
    levers = [(name, None if flags is None and not common else common + (flags or [])) for name, flags in levers]
    truth = read_truth(args.dataset_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or Path(tmp)
        rows, constant = [], None
        for name, flags in levers:
            metrics = run(args.dataset_dir, out, name, flags, args.folds, args.seed)
            constant = metrics["oof_constant_baseline"]
            km = errors_km(out, name, truth)
            rows.append((name, km, metrics.get("confidence")))
            print(f"{name}: out-of-fold mean {km.mean():.1f} km, median {np.median(km):.1f} km",
                  file=sys.stderr, flush=True)
    table = [["constant (each fold's train mean)", str(constant["count"]), f"{constant['mean_km']:.1f}",
              f"{constant['median_km']:.1f}", f"{100 * constant['within_25km']:.0f}%", "", ""]]
    for name, km, confidence in rows:
        table.append([name, *summary(km), coverage(confidence, ""),
                      f"{100 * (km.mean() / constant['mean_km'] - 1):+.1f}%"])
    print(f"{args.folds}-fold cross-validation on {args.dataset_dir}:")
    print(tabulate(table, headers=["configuration", "n", "oof mean km ± se", "oof median km", "within 25 km",
                                   "inside 50% / 90%", "mean vs constant"], tablefmt="github", disable_numparse=True))
    calibration = [[f"{name}: {label}", coverage(confidence, variant)]
                   for name, _, confidence in rows if confidence for label, variant in CALIBRATION_VARIANTS]
    print("confidence regions out of fold (goal: within 5 points of 50% and 90%):")
    print(tabulate(calibration, headers=["configuration: probabilities", "inside 50% / 90%"], tablefmt="github",
                   disable_numparse=True))
    best_name, best, _ = min(rows, key=lambda row: row[1].mean())
    print(f"best: {best_name}: {best.mean():.1f} km vs constant {constant['mean_km']:.1f} km: "
          f"{best.mean() / constant['mean_km']:.2f}x (the minimum of {len(rows)} noisy figures: optimistic; "
          f"python -m benchmarks.nested_selection gives the honest figure)")

if __name__ == "__main__":
    main()
