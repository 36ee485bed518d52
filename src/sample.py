"""Sample points on Croatia's land to look up Street View panoramas at.

    python -m src.sample --n N --out points.csv [--seed 0] [--mainland-only] [--exclude-dataset-dirs DIR ...]
                         [--min-distance-m 0] [--figure PNG]

Points are uniform by area: rejection sampling in EPSG:3766 (metres), vectorised over batches. With
--min-distance-m every kept point is at least that far from every other kept point and from every
location of the excluded dataset dirs (so new data neither repeats nor leaks into an existing set).
"""

import argparse
import sys
from pathlib import Path

from src.core.errors import UserError, run_cli
from src.core.flags import SEED_RULE, Rule, check_ranges



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.sample", allow_abbrev=False,
                                     description="Sample uniform random points on Croatia's land (point_id,latitude,longitude).")
    parser.add_argument("--n", type=int, required=True, help="number of points (required)")
    parser.add_argument("--out", type=Path, required=True, help="output CSV (required)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--mainland-only", action="store_true", help="sample the mainland only, no islands")
    parser.add_argument("--exclude-dataset-dirs", nargs="+", type=Path, default=[], metavar="DIR",
                        help="dataset dirs whose locations the points keep --min-distance-m away from (default: none)")
    parser.add_argument("--min-distance-m", type=float, default=0.0,
                        help="minimum distance in metres between points and from excluded locations (default: 0)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="figure of the points over the border (default: --out with .png; 'none' to skip)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # the library after parsing: --help and flag errors stay instant
    from src.data.sampling import (FIGURE_FORMATS, MAX_POINTS, excluded_locations, plot_points, sample_points,
                                   write_points)

    check_ranges(args, [Rule("n", lambda v: 1 <= v <= MAX_POINTS, f"a number of points from 1 to {MAX_POINTS:,}"),
                        SEED_RULE,
                        Rule("min_distance_m", lambda v: 0 <= v <= 100_000, "metres from 0 to 100000 (e.g. 200)")])
    if args.out.is_dir():
        raise UserError(f"--out {args.out}: is a directory; give a CSV file path")
    figure = args.out.with_suffix(".png") if args.figure is None else args.figure
    if str(figure).lower() == "none":
        figure = None
    elif figure.is_dir() or figure.suffix.lower().lstrip(".") not in FIGURE_FORMATS:
        raise UserError(f"--figure {figure}: give an image file ending in .{', .'.join(FIGURE_FORMATS)}, or none")
    exclude_lat, exclude_lng = excluded_locations(args.exclude_dataset_dirs)
    if args.exclude_dataset_dirs and args.min_distance_m <= 0:
        print("warning: --exclude-dataset-dirs has no effect without --min-distance-m", file=sys.stderr)
    points = sample_points(args.n, args.seed, args.mainland_only, args.min_distance_m, exclude_lat, exclude_lng)
    write_points(points, args.out)
    print(f"wrote {len(points):,} points to {args.out}", file=sys.stderr)
    if figure is not None:
        print(f"figure: {plot_points(points, figure, exclude_lat, exclude_lng)}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
