"""Out-of-fold accuracy of the model levers, each alone and combined: K-fold cross-validation (`src.train
--folds`) of the CPU setup (frozen backbone on cached features) on one LUMEN dataset dir.

    python -m benchmarks.accuracy_levers [--dataset-dir ../shared/data/lumen_external_subset] [--folds 5]

Every configuration trains K runs with the same seeded folds, so each location is predicted once by a run
that never saw it; the table gives the out-of-fold mean and median km, the share within 25 km, the standard
error of the mean, and the constant baseline (each fold's train-mean location). The levers are measured on top
of the head before the levers; the `defaults --refine` rows on top of src.train's defaults. The last line is
the best configuration's mean km against the constant's.
"""

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from src.core import geo

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = ROOT.parent / "shared" / "data" / "lumen_external_subset"
# the head before the levers (the reference's: concatenated views, one-hot cross-entropy); each lever's
# flags follow it (argparse keeps the last value), "current defaults" is src.train as it is
BEFORE = ["--fusion", "concat", "--label-smoothing-km", "0"]
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


def run(dataset: Path, out: Path, name: str, flags: list[str], folds: int, seed: int) -> dict:
    """One cross-validated configuration (`flags` None: src.train's defaults); its oof_metrics.json."""
    flags = flags or []
    run_name = "".join(c if c.isalnum() else "_" for c in name)
    command = [sys.executable, "-m", "src.train", "--approach", "classification", "--dataset-dirs", str(dataset),
               "--folds", str(folds), "--seed", str(seed), "--out-dir", str(out), "--run-name", run_name,
               "--cache-dir", str(out / "cache"), *flags]
    if "--approach" in flags:  # the lever replaces the approach
        at = command.index("--approach")
        del command[at:at + 2]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name}: src.train failed:\n{result.stderr[-3000:]}")
    folder = out / run_name / "version_0"
    metrics = json.loads((folder / "oof_metrics.json").read_text())
    oof = pd.read_csv(folder / "oof.csv", dtype={"uuid": str}).set_index("uuid")
    truth = pd.read_csv(folder / "fold_0" / "locations.csv", dtype={"uuid": str}).set_index("uuid").loc[oof.index]
    km = geo.haversine_km(oof.latitude, oof.longitude, truth.latitude, truth.longitude)
    metrics["oof"]["se_km"] = float(np.std(km, ddof=1) / math.sqrt(len(km)))
    return metrics


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
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or Path(tmp)
        rows, constant = [], None
        for name, flags in levers:
            metrics = run(args.dataset_dir, out, name, flags, args.folds, args.seed)
            constant = metrics["oof_constant_baseline"]
            rows.append((name, metrics["oof"]))
            print(f"{name}: out-of-fold mean {metrics['oof']['mean_km']:.1f} km, median "
                  f"{metrics['oof']['median_km']:.1f} km", file=sys.stderr, flush=True)
    table = [["constant (train mean)", constant["count"], f"{constant['mean_km']:.1f}", f"{constant['median_km']:.1f}",
              f"{100 * constant['within_25km']:.0f}%", "", ""]]
    for name, oof in rows:
        table.append([name, oof["count"], f"{oof['mean_km']:.1f}", f"{oof['median_km']:.1f}",
                      f"{100 * oof['within_25km']:.0f}%", f"{oof['se_km']:.1f}",
                      f"{100 * (oof['mean_km'] / constant['mean_km'] - 1):+.1f}%"])
    print(f"{args.folds}-fold cross-validation on {args.dataset_dir}:")
    print(tabulate(table, headers=["configuration", "n", "oof mean km", "oof median km", "<= 25 km", "se of mean",
                                   "mean vs constant"], tablefmt="github", disable_numparse=True))
    best_name, best = min(rows, key=lambda row: row[1]["mean_km"])
    print(f"best: {best_name}: {best['mean_km']:.1f} km vs constant {constant['mean_km']:.1f} km: "
          f"ratio {constant['mean_km'] / best['mean_km']:.2f}x")


if __name__ == "__main__":
    main()
