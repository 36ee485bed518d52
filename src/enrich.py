"""The enrich stage: dataset dirs -> kept locations with EPSG:3766 coordinates, split, cell class, centroids.

    python -m src.enrich --dataset-dirs DIR [DIR ...] [--cells {grid,adaptive}] [--spacing 0.5] [--classes K]
                         [--split-by {location,cell}] [--seed 0] [--out CSV]
"""

import argparse
import sys
from pathlib import Path

from src.core.errors import run_cli
from src.data.config import add_data_arguments

REPORTS_DIR = Path("reports")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.enrich", allow_abbrev=False,
                                     description="Read LUMEN dataset dirs and write the enriched location table.")
    add_data_arguments(parser, require_dataset=True)
    parser.add_argument("--out", type=Path,
                        help=f"enriched CSV, written atomically; the skip report goes beside it as <stem>_skipped.csv "
                             f"(default: {REPORTS_DIR}/enriched_<dataset>_<cells>.csv, e.g. enriched_demo_grid0.5.csv)")
    parser.add_argument("--figures-dir", type=Path, default=Path("figures"),
                        help="where figures go, named <figure>_<dataset>_<cells>.png (default: figures)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # the library after parsing: --help and flag errors stay instant
    from src.data.enrich import (data_config_from_args, enrich_data, output_tag, skip_listing, summary,
                                 thin_data_warning, write_skip_report)
    from src.data.locations import write_locations_csv

    enriched = enrich_data(data_config_from_args(args), report=False)
    tag = output_tag(args.dataset_dirs, enriched.grid, args.split_by)
    out = args.out or REPORTS_DIR / f"enriched_{tag}.csv"
    report_path = out.with_name(f"{out.stem}_skipped.csv")
    write_locations_csv(enriched.locations, out)
    write_skip_report(enriched.ingested, report_path)
    listing = skip_listing(enriched.ingested, report_path)
    if listing:
        print(listing, file=sys.stderr)
    warning = thin_data_warning(enriched)
    if warning:
        print(warning, file=sys.stderr)
    figures = []
    if not args.no_figures:
        from src.evaluation.plots import enrich_figures  # matplotlib is only needed here

        figures = enrich_figures(enriched, args.figures_dir, tag)
    print(summary(enriched))
    print(f"enriched CSV: {out} ({len(enriched.locations)} rows); skip report: {report_path}")
    if figures:
        print(f"figures: {', '.join(map(str, figures))}")


if __name__ == "__main__":
    run_cli(main)
