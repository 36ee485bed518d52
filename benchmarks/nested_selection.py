"""Nested cross-validation of the choice among configurations: how good is "the best configuration" when the
choice itself is made without seeing the locations it is scored on.

    python -m benchmarks.nested_selection [--dataset-dir ../shared/data/lumen_external_subset] [--folds 5]
        [--inner-folds 4] [--candidates NAME ...] [--combination="FLAGS" ...] [--train-flags="FLAGS"]

Outer loop: the same seeded K folds as `src.train --folds K` (so each candidate's outer predictions are its
ordinary out-of-fold predictions, from runs that never saw the fold). Inside outer fold k, each candidate is
cross-validated again (`--inner-folds`, another seed) on the locations outside fold k only, and the one with
the lowest inner out-of-fold mean is chosen; fold k's locations are then scored with that candidate's
outer run. The nested figure is the mean over all locations of those scores: an honest estimate of what
"pick the best of these by cross-validation" delivers on new locations. The non-nested rows (each
candidate's plain out-of-fold figures) are printed beside it, with standard errors, so the optimism of
picking the minimum of them shows.
"""

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmarks.accuracy_levers import BEFORE, DEFAULT_DATASET, LEVERS, ON_DEFAULTS, errors_km, read_truth, run, summary
from src.inference.checkpoints import read_test_locations

# the defaults with and without the refinement, the head before the levers and each of the defaults' two head
# levers alone (their runs: the head's own point)
DEFAULT_CANDIDATES = ["defaults --refine knn", "defaults --refine none", "before the levers", "--fusion mean",
                      "--label-smoothing-km 40"]


def inner_dataset(locations: pd.DataFrame, out: Path) -> Path:
    """A LUMEN dataset dir holding `locations` only: data.csv and links to their image folders."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for uuid, folder in zip(locations["uuid"], locations["image_dir"]):
        link = images / str(uuid)
        if not link.exists():
            link.symlink_to(Path(folder).resolve(), target_is_directory=True)
    locations[["uuid", "latitude", "longitude"]].to_csv(out / "data.csv", index=False)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nested_selection", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET, help="a LUMEN dataset dir")
    parser.add_argument("--folds", type=int, default=5, help="outer folds")
    parser.add_argument("--inner-folds", type=int, default=4, help="inner folds (within each outer training set)")
    parser.add_argument("--seed", type=int, default=0, help="outer seed (the inner runs use seed + 1)")
    names = [name for name, _ in LEVERS + ON_DEFAULTS]
    parser.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES, choices=names, metavar="NAME",
                        help=f"levers of benchmarks.accuracy_levers to choose among (default: {DEFAULT_CANDIDATES})")
    parser.add_argument("--combination", action="append", default=[], metavar="FLAGS",
                        help="flags of a further candidate, quoted; repeatable")
    parser.add_argument("--train-flags", default="", metavar="FLAGS", help="flags added to every run, quoted")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the runs go (default: a temporary dir)")
    args = parser.parse_args(argv)

    # as benchmarks.accuracy_levers builds them: None runs src.train's defaults, a lever follows the head before
    # the levers, an ON_DEFAULTS row follows the defaults
    levers = {**{name: None if flags is None else BEFORE + flags for name, flags in LEVERS}, **dict(ON_DEFAULTS)}
    common = shlex.split(args.train_flags)
    candidates = []
    for name in args.candidates:
        flags = levers[name]
        candidates.append((name, None if flags is None and not common else common + (flags or [])))
    candidates += [(flags, common + shlex.split(flags)) for flags in args.combination]

    truth = read_truth(args.dataset_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or Path(tmp)
        cache = out / "cache"  # one feature cache for every run: the inner datasets link to the same images
        outer_errors, fold_of, constant = {}, {}, None
        for name, flags in candidates:
            metrics = run(args.dataset_dir, out / "outer", name, flags, args.folds, args.seed, cache)
            outer_errors[name] = errors_km(out / "outer", name, truth)
            constant = metrics["oof_constant_baseline"]
            for k, checkpoint in enumerate(metrics["checkpoints"]):
                fold_of.update({uuid: k for uuid, _ in read_test_locations(checkpoint)})
            print(f"{name}: outer out-of-fold mean {outer_errors[name].mean():.1f} km", file=sys.stderr, flush=True)
        chosen, inner_rows = [], []
        for k in range(args.folds):
            inside = truth[truth["uuid"].map(fold_of).ne(k) & truth["uuid"].isin(fold_of)]
            dataset = inner_dataset(inside, out / f"inner_{k}" / "dataset")
            inner = {}
            for name, flags in candidates:
                metrics = run(dataset, out / f"inner_{k}", name, flags, args.inner_folds, args.seed + 1, cache)
                inner[name] = metrics["oof"]["mean_km"]
            best = min(inner, key=inner.get)
            chosen.append(best)
            inner_rows.append([k, len(inside), best] + [f"{inner[name]:.1f}" for name, _ in candidates])
            print(f"outer fold {k}: chose {best} ({inner[best]:.1f} km inside)", file=sys.stderr, flush=True)

    uuids = sorted(fold_of)
    nested = np.array([outer_errors[chosen[fold_of[uuid]]][uuid] for uuid in uuids])
    print(f"inner {args.inner_folds}-fold out-of-fold mean km of each candidate, per outer fold:")
    print(tabulate(inner_rows, headers=["outer fold", "n inside", "chosen"] + [name for name, _ in candidates],
                   tablefmt="github", disable_numparse=True))
    rows = [["constant (each fold's train mean)", str(constant["count"]), f"{constant['mean_km']:.1f}",
             f"{constant['median_km']:.1f}", f"{100 * constant['within_25km']:.0f}%"],
            ["nested: the inner choice, scored on the outer fold"] + summary(nested)]
    rows += [[f"{name} (not nested)"] + summary(outer_errors[name].loc[uuids].to_numpy()) for name, _ in candidates]
    print(f"{args.folds}-fold nested cross-validation on {args.dataset_dir}:")
    print(tabulate(rows, headers=["configuration", "n", "mean km ± se", "median km", "within 25 km"],
                   tablefmt="github", disable_numparse=True))
    print(f"nested: {nested.mean():.1f} km against the constant's {constant['mean_km']:.1f} km: "
          f"{nested.mean() / constant['mean_km']:.2f}x")


if __name__ == "__main__":
    main()
