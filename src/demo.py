"""A synthetic LUMEN-format dataset whose images depend learnably on location.

Each location is a random point on Croatian land. Its four views show a sky whose colour follows
latitude, ground whose colour follows longitude, a sea band when the location is near the coast and
the view faces the sea, and stripes whose frequency follows distance from the coast. Noise keeps the
task from being trivial, but a small CNN beats the constant-prediction baseline by a wide margin.
"""

import argparse
import sys
from pathlib import Path

from src.core.errors import UserError, run_cli
from src.core.flags import SEED_RULE, Rule, at_least, check_ranges
from src.core.paths import DEMO_DIR



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.demo", allow_abbrev=False, description="Write the synthetic demo dataset (LUMEN format).")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output dataset dir (default: data/demo)")
    parser.add_argument("--locations", type=int, default=600, help="number of locations (default: 600)")
    parser.add_argument("--image-size", type=int, default=96, help="image side in pixels (default: 96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from src.data.synthetic import write_demo_dataset  # the library after parsing: --help stays instant

    check_ranges(args, [Rule("locations", at_least(1), "a number of locations >= 1 (e.g. 600)"),
                        Rule("image_size", lambda v: 8 <= v <= 4096, "a side in pixels from 8 to 4096 (e.g. 96)"),
                        SEED_RULE])
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: is a file; pass a new or existing directory")
    if (args.out / "data.csv").exists():
        raise UserError(f"{args.out}: already holds a dataset (data.csv); pick another --out or delete it")
    write_demo_dataset(args.out, args.locations, args.image_size, args.seed, progress=True)
    print(f"wrote {args.locations} locations to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
