"""Predict a location for every folder of a test set: a `uuid,latitude,longitude` CSV, sorted by uuid.

    python -m src.predict [--checkpoint PATH ...] [--images DIR] [--tta] [--batch-size N] > submission.csv

Without --checkpoint the best checkpoint (lowest val km) of the newest run under reports/ is used;
without --images the test split of that checkpoint's run. --predict-rule / --centroids / --topk change how
a classification or hybrid checkpoint turns class probabilities into a point (default: as trained); a
point outside Croatia (regression, means, ensembles) is moved to the nearest point on land. Several checkpoints form an ensemble: their predictions are averaged
in EPSG:3766 metres. --tta also averages over the mirrored quadruplet (`src.data.mirror_views`: every view
flipped horizontally and the 90 and 270 views swapped, a geometrically consistent mirror image).
Every location gets a row: unreadable views are replaced by readable views of the same location, and
a location without any readable view gets the training prior (train-mean location); both are listed
on stderr. stdout carries only the CSV. --engine picks torch or ONNX Runtime (`src.export`; auto: ONNX
Runtime on the CPU, torch on a GPU); the ONNX export is made once and kept in the shared export store
(data/cache/onnx, `src.inference.engine`). A checkpoint whose backbone was never trained (frozen in its run)
reads its backbone features from the feature cache src.train filled (--cache-dir; missing entries computed
with the engine and stored) and runs only its head; --no-cache-features or --tta (mirrored views) use the
images throughout; --details PATH also writes, per location, the radii in km of the
discs around the point that hold 50% and 90% of the calibrated predicted probability, the top cell's
probability and the --details-top most likely cells (`src.evaluation.calibration`).
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from src.core.choices import CENTROID_KINDS, ENGINES, PREDICT_RULES
from src.core.errors import run_cli
from src.core.flags import REFINE_RULES, Rule, add_refine_arguments, at_least, check_ranges
from src.core.paths import REPORTS_DIR, default_feature_cache_dir

if TYPE_CHECKING:
    import pandas as pd

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.predict", allow_abbrev=False,
        description="Write uuid,latitude,longitude for every location folder (CSV on stdout or --out).",
    )
    parser.add_argument("--checkpoint", type=Path, nargs="+", action="extend",
                        help="checkpoint(s); several form an ensemble averaged in EPSG:3766 "
                             "(default: the best checkpoint by val km of the newest run under reports/)")
    parser.add_argument("--images", type=Path,
                        help="dataset dir (with data/ or images/) or a dir of uuid folders; no CSV needed "
                             "(default: the test split of the (first) checkpoint's run)")
    parser.add_argument("--centroids", choices=CENTROID_KINDS, default=None,
                        help="class centroids a classification checkpoint averages (default: the one it was trained with)")
    parser.add_argument("--topk", type=int, default=None,
                        help="average only the k most likely classes, 0 for all (default: as trained)")
    parser.add_argument("--predict-rule", choices=PREDICT_RULES, default=None,
                        help="class probabilities -> point: probability-weighted mean, geometric median (minimises "
                             "the expected km) or mode (the most likely class) (default: as trained)")
    add_refine_arguments(parser)
    parser.add_argument("--tta", action="store_true",
                        help="also predict the mirrored quadruplet (views flipped, 90/270 swapped) and average")
    parser.add_argument("--batch-size", type=int, default=32, help="locations per batch (default: 32)")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1) - 1,
                        help="DataLoader worker processes decoding JPEGs (default: min(4, CPUs) - 1)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="torch, or ONNX Runtime (exported once into data/cache/onnx); auto: onnx on the CPU, "
                             "torch on a GPU (default: auto)")
    parser.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=True,
                        help="a checkpoint whose backbone was never trained reads its backbone features from the "
                             "feature cache (missing entries computed and stored) and runs only its head; not with "
                             "--tta (default: on)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="feature cache folder, the one src.train fills (default: data/cache/features, or "
                             "$FEATURE_CACHE_DIR when set)")
    parser.add_argument("--out", type=Path, help="write the CSV here (atomically) instead of stdout")
    parser.add_argument("--details", type=Path, metavar="PATH",
                        help="also write uuid,latitude,longitude,radius50_km,radius90_km,top1_probability,top to PATH "
                             "(atomically): the 50%% and 90%% confidence radii and the most likely cells")
    parser.add_argument("--details-top", type=int, default=5, metavar="K",
                        help="cells listed in --details' top column (default: 5)")
    parser.add_argument("--reports-dir", type=Path, default=REPORTS_DIR,
                        help="where the default checkpoint is searched (default: reports/)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def main(argv: list[str] | None = None) -> "pd.DataFrame":
    """CLI: predictions as CSV on stdout (or --out); logs, progress and warnings on stderr."""
    args = build_parser().parse_args(argv)
    import torch  # the library after parsing: --help and flag errors stay instant

    from src.core.files import atomic_path, write_csv
    from src.evaluation.calibration import DETAILS_COLUMNS, UNCALIBRATED_NOTE
    from src.inference.checkpoints import backbone_trained, find_checkpoint, load_model
    from src.inference.engine import engine_model, resolve_engine
    from src.inference.predictor import (cached_backbone, check_device, ensemble_prior, locations_from_checkpoint,
                                         locations_from_images, predict_locations)
    from src.inference.retrieval import refinement

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_ranges(args, [Rule("batch_size", at_least(1), "a number of locations >= 1 (e.g. 32)"),
                        Rule("num_workers", at_least(0), "0 (decode in the main process) or more"),
                        Rule("topk", at_least(0), "0 (all classes) or a number of classes >= 1"),
                        Rule("details_top", at_least(1), "a number of cells >= 1 (e.g. 5)"), *REFINE_RULES])
    check_device(args.device)
    engine = resolve_engine(args.engine, args.device)
    stdout = sys.stdout
    # anything a library prints while loading or predicting must not end up in the CSV
    with contextlib.redirect_stdout(sys.stderr):
        checkpoints = args.checkpoint or [find_checkpoint(args.reports_dir)]
        models, caches = [], []
        for path in checkpoints:
            model = load_model(path, args.device, reports_dir=args.reports_dir,
                               centroids=args.centroids, topk=args.topk, predict_rule=args.predict_rule,
                               refine=args.refine, refine_k=args.refine_k, refine_gate=args.refine_gate)
            trained = backbone_trained(path)
            # TTA mirrors the views: the cache holds the features of the unmirrored ones
            cache = (cached_backbone(model, args.cache_dir or default_feature_cache_dir(), engine)
                     if args.cache_features and not args.tta and not trained else None)
            models.append(model if cache is not None else engine_model(model, path, engine))
            caches.append(cache)
            hp = models[-1].hparams
            how = (f", {hp.get('fusion', 'concat')} fusion, rule {hp.get('predict_rule', 'mean')} over "
                   f"{hp.get('centroids')} centroids, top-{hp.get('topk') or 'all'}"
                   if hp.get("approach") != "regression" else "")
            backbone = "fine-tuned" if trained else "frozen"
            features = f", backbone features from the feature cache {cache.cache.directory}" if cache else ""
            print(f"checkpoint {path}: {hp.get('approach')} {hp.get('backbone')} ({backbone}) {hp.get('image_size')} px"
                  f"{how}{refinement(models[-1])}, engine {engine}{features}", file=sys.stderr)
            if args.details is not None and not model.calibration.calibrated:
                print(f"warning: --details: {path} {UNCALIBRATED_NOTE}", file=sys.stderr)
        if args.images is not None:
            locations = locations_from_images(args.images)
            source = f"--images {args.images}"
        else:
            locations = locations_from_checkpoint(checkpoints[0])
            source = f"the test split of {checkpoints[0]}"
        print(f"predicting {len(locations)} location(s) from {source}"
              f"{' with TTA' if args.tta else ''}{f', ensemble of {len(models)}' if len(models) > 1 else ''}",
              file=sys.stderr)
        frame, issues = predict_locations(models, locations, args.tta, args.batch_size, args.num_workers,
                                          args.device, caches=caches, details=args.details is not None,
                                          top=args.details_top)
        for path, cache in zip(checkpoints, caches):
            if cache is not None:
                print(f"feature cache of {path}: {cache.cache.computed} location(s) computed, {cache.cache.reused} "
                      "reused", file=sys.stderr)
        for line in issues.report(ensemble_prior(models)):
            print(line, file=sys.stderr)
    if args.details is not None:
        write_csv(frame[DETAILS_COLUMNS], args.details, float_format="%.7f")
        print(f"wrote the details of {len(frame)} locations to {args.details}", file=sys.stderr)
        frame = frame[DETAILS_COLUMNS[:3]]
    if args.out is not None:
        with atomic_path(args.out) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.7f")
        print(f"wrote {len(frame)} rows to {args.out}", file=sys.stderr)
    else:
        frame.to_csv(stdout, index=False, float_format="%.7f")
        stdout.flush()
    return frame


if __name__ == "__main__":
    run_cli(main)
