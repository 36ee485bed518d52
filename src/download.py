"""Download Street View quadruplets for sampled points into a LUMEN-format dataset dir.

    python -m src.download --points points.csv --out DIR [--key KEY] [--secret SECRET] [--api-url URL]
                           [--radius 500] [--concurrency 16] [--qps 25] [--max-images N] [--timeout 30]
                           [--retries 5] [--metadata-only] [--exclude-dataset-dirs DIR ...]

Step 1 looks up the panorama near each point (metadata requests, free of quota), step 2 drops repeated
panoramas, step 3 fetches the four views of each kept panorama. One aiohttp session, at most --concurrency
requests in flight (a pool of workers: a sliding window), a token bucket capping requests per second,
retries with exponential backoff and jitter. Interrupted runs resume: metadata answers are journaled in
DIR/metadata.jsonl, images already on disk are kept, data.csv only lists complete locations.
"""

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from src.collect.defaults import DEFAULT_API_URL, DUPLICATE_M, KEY_ENV
from src.core.errors import UserError, run_cli



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.download", allow_abbrev=False,
                                     description="Download Street View quadruplets for sampled points (LUMEN format).")
    parser.add_argument("--points", type=Path, required=True, help="points CSV from python -m src.sample (required)")
    parser.add_argument("--out", type=Path, required=True, help="output dataset dir; rerun to resume (required)")
    parser.add_argument("--key", default=None, help=f"API key (default: ${KEY_ENV}); never printed or saved")
    parser.add_argument("--secret", default=None, help="URL signing secret; every request is signed (default: none)")
    parser.add_argument("--api-url", default=DEFAULT_API_URL, help=f"API base URL (default: {DEFAULT_API_URL})")
    parser.add_argument("--radius", type=float, default=500.0, help="metadata search radius in metres (default: 500)")
    parser.add_argument("--concurrency", type=int, default=16, help="most requests in flight (default: 16)")
    parser.add_argument("--qps", type=float, default=25.0, help="most requests per second; 0: no cap (default: 25)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="hard budget of image requests for this run (default: no limit)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: 30)")
    parser.add_argument("--retries", type=int, default=5, help="retries per request (default: 5)")
    parser.add_argument("--metadata-only", action="store_true",
                        help="look up and dedupe panoramas, report the image cost, download nothing")
    parser.add_argument("--exclude-dataset-dirs", nargs="+", type=Path, default=[], metavar="DIR",
                        help=f"drop panoramas within {DUPLICATE_M:g} m of these datasets' locations (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # the library after parsing: --help and flag errors stay instant
    from src.collect.streetview import (ApiDenied, ApiUnreachable, Downloader, SIGNAL_EXIT, Settings, _run_until_signal, check_args,
                                        mask, previous_rows, read_points, save_run_parameters)
    from src.data.sampling import excluded_locations

    args.key = args.key or os.environ.get(KEY_ENV, "")
    if not args.key:
        raise UserError(f"no API key: pass --key KEY or set {KEY_ENV}")
    check_args(args)
    points = read_points(args.points)
    exclude = excluded_locations(args.exclude_dataset_dirs)
    settings = Settings(api_url=args.api_url, key=args.key, secret=args.secret, radius=args.radius,
                        concurrency=args.concurrency, qps=args.qps, timeout=args.timeout, retries=args.retries,
                        max_images=args.max_images, metadata_only=args.metadata_only)
    previous = previous_rows(args.out / "data.csv")
    save_run_parameters(args, args.out)
    downloader = Downloader(points, args.out, settings, exclude, progress=not args.no_progress, previous=previous)
    try:
        signum = asyncio.run(_run_until_signal(downloader))
    except ExceptionGroup as group:  # from the worker pool's TaskGroup
        denied, unwritable = group.subgroup((ApiDenied, ApiUnreachable)), group.subgroup(OSError)
        if denied is None and unwritable is None:
            raise
        error = denied or unwritable
        while isinstance(error, ExceptionGroup):
            error = error.exceptions[0]
        try:
            downloader.finish()
        except OSError:
            if denied is not None:
                raise
        if denied is None:  # e.g. a full disk or a file where a folder goes: run_cli's one line
            raise error from None
        message = mask(str(error), args.key, args.secret)
        if isinstance(error, ApiUnreachable):
            raise UserError(message) from None
        raise UserError(f"the Street View API refused the request: {message}") from None
    report = downloader.finish()
    print(mask(downloader.summary(report), args.key, args.secret), file=sys.stderr)
    if signum is not None:
        print(f"interrupted ({signal.Signals(signum).name}): rerun the same command to resume", file=sys.stderr)
        raise SystemExit(SIGNAL_EXIT[signum])
    if args.metadata_only:
        to_get = int(report["outcome"].eq("to_download").sum())
        print(f"metadata only: {to_get} panoramas to download = {downloader.images_needed} image requests "
              f"(rerun without --metadata-only to download them)", file=sys.stderr)
    failed = int(report["outcome"].str.startswith("failed").sum())
    if failed:
        print(f"warning: {failed} points failed (see {args.out / 'points_report.csv'}); rerun the same command "
              "to retry them", file=sys.stderr)
    print(f"data: {args.out / 'data.csv'}  report: {args.out / 'points_report.csv'}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
