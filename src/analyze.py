"""Analysis of a grid and a submission: oracle ceiling, error map, worst-N gallery, per-class accuracy.

    python -m src.analyze [--submission CSV] [--checkpoint PATH | --locations CSV | --dataset-dirs DIR ...]

The locations (truth, image folders, split, classes) come from the enrich stage: of --dataset-dirs with
the enrich flags, of an enriched --locations CSV, or else of the run of --checkpoint (default: the best
checkpoint of the newest run under reports/): its saved version_N/locations.csv, or (older runs) its
dataset dirs, spacing, seed and split flags. The first line (stderr) names the run and checkpoint used; a
warning names the run whose split the submission's uuids are, when that is another run.
Figures go to figures/ (oracle_ceiling.png, <submission>_error_map.png, <submission>_worst.jpg), tables to
reports/analysis/ (both written atomically); tables also print on stdout.
"""

import argparse
import sys
from types import SimpleNamespace
from pathlib import Path

from src.core.choices import SPLITS
from src.core.errors import UserError, run_cli
from src.core.paths import REPORTS_DIR
from src.data.config import DEFAULT_SPACINGS, add_data_arguments, add_locations_argument


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.analyze", allow_abbrev=False,
        description="Oracle ceiling of the grid; with --submission: error map, worst-N gallery, per-class accuracy.",
    )
    add_data_arguments(parser)
    add_locations_argument(parser)
    group = parser.add_argument_group("analysis")
    group.add_argument("--checkpoint", type=Path,
                       help="take the data flags (dataset dirs, spacing, seed, split, holdout dirs, ...) from "
                            "this run when --dataset-dirs is not given (default: the best checkpoint of the newest run under reports/)")
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


def warn_of_other_runs(args: argparse.Namespace, checkpoint: Path, uuids) -> None:
    """Warn when the submission's uuids are the --eval-split of other runs than the one analysed."""
    from src.evaluation.analysis import runs_whose_split_is  # noqa: PLC0415 (matplotlib: after parsing)

    others = [path for path in runs_whose_split_is(args.reports_dir, args.eval_split, uuids)
              if path.parent.parent.resolve() != checkpoint.parent.parent.resolve()]
    if others:
        print(f"warning: --submission {args.submission}: its {len(set(uuids))} uuids are the {args.eval_split} split "
              f"of {'the run' if len(others) == 1 else 'the runs'} {', '.join(str(p.parent.parent) for p in others)}, "
              f"not of the run analysed ({checkpoint.parent.parent}); to analyse it against its own run pass "
              f"--checkpoint {others[0]}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    """CLI: oracle table, and for a submission its scores, figures and per-class tables. Returns the tables."""
    args = build_parser().parse_args(argv)
    from tabulate import tabulate  # the library after parsing: --help and flag errors stay instant

    from src.core.choices import CENTROID_KINDS
    from src.core.geo import km_table, summarize_km
    from src.core.files import write_csv
    from src.core.flags import check_ranges
    from src.data.config import spacing_rule
    from src.data.enrich import data_config_from_args, enrich_data
    from src.evaluation.analysis import (confusion_summary, confusion_text, data_of_checkpoint, error_map,
                                         oracle_ceiling, oracle_figure, per_class_accuracy, predicted_classes,
                                         rows_of_split, worst_gallery)
    from src.evaluation.scoring import match_and_measure, read_locations
    from src.inference.checkpoints import checkpoints_listing

    for flag, value in (("--worst", args.worst), ("--least-accurate", args.least_accurate)):
        if value < 1:
            raise UserError(f"{flag} {value}: give a number of rows >= 1")
    for spacing in args.spacings:
        check_ranges(SimpleNamespace(spacings=spacing), [spacing_rule("spacings")])
    checkpoint = None
    if not args.dataset_dirs and args.locations is None:
        checkpoint, data = data_of_checkpoint(args.checkpoint, args.reports_dir)
        where = f"--locations {data.locations_csv}" if data.locations_csv is not None else \
            f"--dataset-dirs {' '.join(data.dataset_dirs)}"
        chosen = "--checkpoint" if args.checkpoint is not None else \
            f"the newest run under {args.reports_dir}; choose another with --checkpoint"
        print(f"run {checkpoint.parent.parent}, checkpoint {checkpoint.name} ({chosen}); its locations: {where} "
              f"--spacing {data.spacing} --seed {data.seed}", file=sys.stderr)
    else:
        data = data_config_from_args(args)
    enriched = enrich_data(data, progress=False)
    scored = truth = None
    if args.submission is not None:  # checked before the oracle table, so a wrong run is named first
        truth = rows_of_split(enriched.locations, args.eval_split)
        submission = read_locations(args.submission, "submission")
        if checkpoint is not None and set(submission["uuid"]) != set(truth["uuid"]):
            warn_of_other_runs(args, checkpoint, submission["uuid"])
        if checkpoint is not None and not set(submission["uuid"]) & set(truth["uuid"]):
            raise UserError(f"--submission {args.submission}: none of its {len(submission)} uuids is among the "
                            f"{len(truth)} {args.eval_split} locations of the run of {checkpoint}"
                            f"{' (the default: the newest run)' if args.checkpoint is None else ''}; pass the "
                            f"--checkpoint of the run it was predicted from "
                            f"({checkpoints_listing(args.reports_dir)})")
        scored = match_and_measure(submission, truth, args.allow_missing,
                                   where=f"{args.submission} vs the {args.eval_split} locations")
    out: dict = {}

    oracle = oracle_ceiling(enriched, [*args.spacings, data.spacing], args.eval_split, data.mainland_only)
    out["oracle"] = oracle
    print(f"oracle ceiling ({args.eval_split} locations at their true class's centroid), mean / median km:")
    print(tabulate([[r.spacing, r.classes, r.locations, *(f"{getattr(r, f'{k}_km'):.1f} / "
                                                          f"{getattr(r, f'{k}_median_km'):.1f}" for k in CENTROID_KINDS)]
                    for r in oracle.itertuples()],
                   headers=["spacing", "classes", "locations", *CENTROID_KINDS], tablefmt="github"))
    paths = [write_csv(oracle, args.tables_dir / "oracle_ceiling.csv"),
             oracle_figure(oracle, args.figures_dir / "oracle_ceiling.png", args.eval_split)]

    if args.submission is not None:
        name = args.submission.stem
        if scored.missing or scored.extra:
            print(f"warning: analysing {len(scored.errors)} common uuid(s); {len(scored.missing)} {args.eval_split} "
                  f"location(s) without a submission row, {len(scored.extra)} submission row(s) not among them",
                  file=sys.stderr)
        errors = scored.errors
        stats = summarize_km(errors["error_km"])
        print(f"\nsubmission {args.submission} on {len(errors)} {args.eval_split} locations:")
        print(km_table([(args.submission.name, stats)], "submission"))
        labels = truth.set_index("uuid").loc[errors["uuid"]]
        errors["true_class"] = labels["label"].to_numpy()
        errors["pred_class"] = predicted_classes(enriched, errors["pred_lat"].to_numpy(), errors["pred_lng"].to_numpy())
        accuracy = per_class_accuracy(errors["true_class"], errors["pred_class"], errors["error_km"], enriched.classes)
        confusion = confusion_summary(errors["true_class"], errors["pred_class"],
                                      accuracy["class"].head(args.least_accurate).tolist(), enriched.classes)
        overall = float((errors["true_class"] == errors["pred_class"]).mean())
        print(f"\nclass accuracy (prediction in the true class's cell): {100 * overall:.1f}% over "
              f"{accuracy['class'].nunique()} classes; the {len(confusion)} least accurate:")
        print(confusion_text(confusion))
        image_dirs = dict(zip(labels.index, labels["image_dir"]))
        gallery, worst = worst_gallery(errors, image_dirs, args.figures_dir / f"{name}_worst.jpg", n=args.worst)
        paths += [
            write_csv(errors, args.tables_dir / f"{name}_errors.csv"),
            write_csv(accuracy, args.tables_dir / f"{name}_per_class.csv"),
            write_csv(confusion, args.tables_dir / f"{name}_confusion.csv"),
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
