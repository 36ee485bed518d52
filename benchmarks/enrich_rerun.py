"""Second-run enrich time: every image re-opened (no check manifest) vs the image-check manifest warm.

    python -m benchmarks.enrich_rerun [--dataset-dir DIR | --locations 20000]

Without --dataset-dir a demo dataset of --locations locations (64 px views) is generated in a temporary
folder first (about 45 s for 20,000 on 2 cores). Both sides run src.enrich.enrich over the same files,
one after the other, after a first run that fills the manifest (so the OS page cache is warm for both).
"""

import argparse
import tempfile
import time
from pathlib import Path

from src.data.synthetic import write_demo_dataset
from src.data.enrich import enrich


def seconds(dataset_dir: Path, check_cache: Path | None) -> float:
    start = time.perf_counter()
    enrich([dataset_dir], progress=False, check_cache=check_cache)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=None, help="(default: a generated demo dataset)")
    parser.add_argument("--locations", type=int, default=20_000, help="generated locations (default: 20000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = args.dataset_dir
        if dataset_dir is None:
            dataset_dir = write_demo_dataset(Path(tmp) / "demo", n_locations=args.locations, image_size=64, seed=1)
        cache = Path(tmp) / "image_checks"
        first = seconds(dataset_dir, cache)  # fills the manifest
        before = seconds(dataset_dir, None)
        after = seconds(dataset_dir, cache)
    print(f"enrich of {dataset_dir}: first run with an empty manifest {first:.2f} s")
    print(f"second run, every image re-opened (before): {before:.2f} s")
    print(f"second run, manifest warm (after):          {after:.2f} s")
    print(f"ratio: {before / after:.1f}x")


if __name__ == "__main__":
    main()
