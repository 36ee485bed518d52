"""Score a submission CSV against ground truth: km error statistics and a GeoGuessr-style score.

    python -m src.score SUBMISSION (TRUTH | --locations CSV) [--allow-missing] [--split test]

The statistics (src.geo.summarize_km) are the ones training reports, GeoGuessr-style score included.
"""

import argparse
import sys
from pathlib import Path

from src.core.choices import SPLITS
from src.core.errors import UserError, run_cli



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.score", allow_abbrev=False,
        description="Score a submission (uuid,latitude,longitude) against truth: km statistics and GeoGuessr score.",
    )
    parser.add_argument("submission", help="submission CSV: uuid,latitude,longitude")
    parser.add_argument("truth", nargs="?", help="truth CSV with uuid,latitude,longitude (a data.csv or an enriched "
                                                  "CSV); or give --locations")
    parser.add_argument("--locations", type=Path, metavar="CSV",
                        help="an enriched locations CSV as truth (src.enrich --out, or a run's "
                             "version_N/locations.csv), checked like train's --locations (default: none)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score only the uuids present in both files instead of stopping on a mismatch")
    parser.add_argument("--split", choices=SPLITS,
                        help="only the truth rows of this split (needs a split column)")
    parser.add_argument("--errors-out", type=Path,
                        help="also write the per-location errors (uuid, true/pred lat/lng, error_km) to this CSV")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    """CLI: print the score table; the last stdout line is `mean_km: <value>`."""
    args = build_parser().parse_args(argv)
    from src.core.files import write_csv  # the library after parsing: --help and flag errors stay instant
    from src.core.geo import geoguessr_scale_km, km_table
    from src.data.locations import read_locations_csv
    from src.evaluation.scoring import score_files

    if (args.truth is None) == (args.locations is None):
        raise UserError("the truth is required: give a TRUTH CSV after the submission, or --locations CSV (not both)")
    if args.locations is not None:
        read_locations_csv(args.locations, check_folders=False)  # columns, degrees, uuids, split values
    scored, stats = score_files(args.submission, args.truth or args.locations, args.allow_missing, args.split)
    if scored.missing:
        total = stats["count"] + len(scored.missing)
        print(f"warning: partial score: {len(scored.missing)} of {total} truth location(s) have no submission row "
              f"(first: {', '.join(scored.missing[:5])})", file=sys.stderr)
    if scored.extra:
        print(f"warning: ignored {len(scored.extra)} submission row(s) whose uuid is not in the truth file "
              f"(first: {', '.join(scored.extra[:5])})", file=sys.stderr)
    if args.errors_out:
        write_csv(scored.errors, args.errors_out)
        print(f"per-location errors: {args.errors_out}", file=sys.stderr)
    print(km_table([(Path(args.submission).name, stats)], "submission"))
    print(f"GeoGuessr: mean points per location, 5000 * exp(-km / {geoguessr_scale_km():.1f})")
    if scored.missing:
        print(f"partial: {len(scored.missing)} missing of {stats['count'] + len(scored.missing)}")
    print(f"mean_km: {stats['mean_km']:.4f}")
    return stats


if __name__ == "__main__":
    run_cli(main)
