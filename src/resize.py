"""Write a LUMEN-format copy of dataset dirs at training resolution, once, so that loading is cheap.

    python -m src.resize --dataset-dirs DIR [DIR ...] --size 256 --out DIR [--workers N] [--quality 95]

Each dataset dir becomes OUT/<dir name>/ with its data.csv copied as is and every view of every uuid folder
(under data/ or images/) decoded at reduced scale (src.images.load_image, as training decodes it) and saved
as a SIZE x SIZE JPEG (4:4:4 colour, --quality) under OUT/<dir name>/data/<uuid>/. A view that cannot be decoded is copied byte for
byte, so the copy shows the same defects to src.enrich as the original (and they are listed here).
Every file is written to a temporary name and renamed; a file already in the copy and not older than its
source is kept, so an interrupted run continues where it stopped. Work is spread over processes.
"""

import argparse
import os
import sys
from pathlib import Path

from src.core.errors import run_cli
from src.core.flags import Rule, at_least, check_ranges



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.resize", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dirs", type=Path, nargs="+", required=True, metavar="DIR",
                        help="LUMEN dataset dirs (data.csv + data/ or images/ with one folder per uuid)")
    parser.add_argument("--size", type=int, required=True,
                        help="side of the written views in pixels, e.g. 256 for training at 224")
    parser.add_argument("--out", type=Path, required=True, help="the copy of DIR goes to OUT/<name of DIR>/")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes decoding and encoding (default: CPU cores)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the written views (default: 95)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from src.data.resizing import MAX_SIZE, MIN_SIZE, resize_datasets  # after parsing: --help stays instant

    check_ranges(args, [Rule("size", lambda v: MIN_SIZE <= v <= MAX_SIZE, f"a side in pixels from {MIN_SIZE} to {MAX_SIZE} (e.g. 256)"),
                        Rule("workers", at_least(1), "1 or more processes"),
                        Rule("quality", lambda v: 1 <= v <= 100, "a JPEG quality from 1 to 100 (e.g. 95)")])
    result = resize_datasets(args.dataset_dirs, args.out, args.size, args.workers, args.quality)
    if result["copied"]:
        print(f"warning: {len(result['copied'])} view(s) could not be decoded and were copied as they are "
              "(enrich skips their locations as for the original):", file=sys.stderr)
        print("\n".join(f"  {line}" for line in result["copied"]), file=sys.stderr)
    for target in result["targets"]:
        print(f"resized copy: {target} (use --dataset-dirs {target})")
    print(f"{result['locations']} locations: {result['written']} views written at {args.size} px, "
          f"{result['kept']} already done, {len(result['copied'])} copied as they are")
    return result


if __name__ == "__main__":
    run_cli(main)
