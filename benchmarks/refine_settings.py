"""Out-of-fold accuracy of the retrieval refinement's settings (k, gate, neighbour weighting) beside the head's
own point, from one cross-validated `--refine knn` run.

    python -m benchmarks.refine_settings [--dataset-dir DIR] [--folds 5] [--train-flags="..."] [--run-dir DIR]

`src.train --folds K --refine knn` trains K runs (or `--run-dir` names the version_N folder of such a run);
each fold's checkpoint holds the gallery of the locations that fold trained on. Its test locations are run
through the model once (class probabilities, the head's point, the fused embedding), then every setting
refines those points in numpy (`src.inference.retrieval.refine_points`), so the settings are compared on the
same out-of-fold predictions. The table gives each setting's mean, median, share within 25 km, the standard
error of the mean, and the paired difference of its mean from the head's (± its standard error). The last line
is the best setting's mean against the head's.
"""

import argparse
import contextlib
import itertools
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmarks import DEFAULT_DATASET
from benchmarks.accuracy_levers import run, run_name
from src.core import geo
from src.data.config import LOCATIONS_FILE
from src.data.quadruplets import QuadrupletFolders, collate_quadruplets, input_spec, spec_transforms
from src.inference.checkpoints import load_model, read_test_locations
from src.inference.engine import engine_model, infer
from src.inference.retrieval import WEIGHTINGS, refine_points

KS = (1, 5, 10, 20)
GATES = (0.5, 0.8, 0.95, 1.0)


def fold_outputs(checkpoint: Path, truth: pd.DataFrame) -> dict:
    """The fold model's outputs on its test locations (ONNX Runtime), with their true positions."""
    with contextlib.redirect_stdout(sys.stderr):
        model = engine_model(load_model(checkpoint, "cpu", refine="knn"), checkpoint, "onnx")
    locations = read_test_locations(checkpoint)
    spec = input_spec(model.hparams)
    folders = QuadrupletFolders([folder for _, folder in locations], spec_transforms([spec]))
    _, batches, usable, _ = collate_quadruplets([folders[i] for i in range(len(folders))])
    if not usable.all():
        raise SystemExit(f"{checkpoint}: a test location has no readable view")
    probabilities, xy, embedding = infer(model, batches[spec])
    rows = truth.set_index("uuid").loc[[uuid for uuid, _ in locations]]
    return {"gallery": model.gallery, "probabilities": probabilities, "xy": xy, "embedding": embedding,
            "lat": rows["latitude"].to_numpy(float), "lng": rows["longitude"].to_numpy(float)}


def km(xy: np.ndarray, fold: dict) -> np.ndarray:
    lat, lng = geo.unproject(*geo.snap_to_land(xy[:, 0], xy[:, 1]))
    return geo.haversine_km(lat, lng, fold["lat"], fold["lng"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refine_settings", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET, help="a LUMEN dataset dir")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-flags", default="", metavar="FLAGS",
                        help='flags added to the training run, quoted (e.g. --train-flags="--image-size 96")')
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="the version_N folder of a finished `src.train --folds K --refine knn` run to reuse")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the run goes (default: a temporary dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or Path(tmp)
        if args.run_dir is None:  # one `src.train --folds K --refine knn` run (resumed when --out-dir holds it)
            run(args.dataset_dir, out, "refine", ["--refine", "knn", *shlex.split(args.train_flags)], args.folds,
                args.seed)
        run_dir = args.run_dir or out / run_name("refine") / "version_0"
        checkpoints = [Path(p) for p in json.loads((run_dir / "oof_metrics.json").read_text())["checkpoints"]]
        folds = [fold_outputs(path, pd.read_csv(path.parent.parent / LOCATIONS_FILE)) for path in checkpoints]
    regression = folds[0]["probabilities"] is None
    head = np.concatenate([km(fold["xy"], fold) for fold in folds])
    settings = [(k, gate, weighting) for k, gate, weighting in itertools.product(KS, (1.0,) if regression else GATES,
                                                                                 WEIGHTINGS)]
    rows, results = [["head (no refinement)", *statistics(head, head)]], []
    for k, gate, weighting in settings:
        refined = np.concatenate([km(refine_points(fold["gallery"], fold["xy"], fold["embedding"],
                                                   fold["probabilities"], k, gate, weighting), fold) for fold in folds])
        name = f"k {k}, gate {gate:g}, {weighting}"
        rows.append([name, *statistics(refined, head)])
        results.append((name, refined.mean()))
    print(f"{len(folds)}-fold out-of-fold refinement settings on {len(head)} locations ({run_dir}):")
    print(tabulate(rows, headers=["setting", "mean km", "median km", "<= 25 km", "se of mean", "mean - head (paired se)"],
                   tablefmt="github", disable_numparse=True))
    best_name, best = min(results, key=lambda row: row[1])
    print(f"best: {best_name}: {best:.1f} km vs the head's {head.mean():.1f} km: ratio {head.mean() / best:.2f}x")


def statistics(distances: np.ndarray, head: np.ndarray) -> list[str]:
    n = len(distances)
    difference = distances - head
    return [f"{distances.mean():.1f}", f"{np.median(distances):.1f}", f"{100 * (distances <= 25).mean():.0f}%",
            f"{distances.std(ddof=1) / np.sqrt(n):.1f}",
            f"{difference.mean():+.1f} ({difference.std(ddof=1) / np.sqrt(n):.1f})"]


if __name__ == "__main__":
    main()
