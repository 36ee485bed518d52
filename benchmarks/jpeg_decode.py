"""Reduced-size JPEG decoding (PIL draft mode, src.images.load_image) vs a full decode + resize.

    python -m benchmarks.jpeg_decode [--dataset-dir DIR] [--image-size 224] [--repeats 3]

Goal: >= 1.7x. The last line is the ratio.
"""

import argparse
import time
from pathlib import Path

from PIL import Image

from benchmarks import DEFAULT_DATASET
from src.data.images import load_image, view_paths
from src.data.ingest import find_image_root, list_location_dirs



def plain_decode(path: Path, image_size: int) -> Image.Image:
    """The baseline: decode every pixel, then resize."""
    with Image.open(path) as image:
        return image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)


def best_time(function, paths, image_size: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            function(path, image_size)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    paths = [p for d in list_location_dirs(find_image_root(args.dataset_dir)).values() for p in view_paths(d)]
    with Image.open(paths[0]) as first:
        print(f"{len(paths)} JPEGs of {first.size[0]}x{first.size[1]} px from {args.dataset_dir} -> {args.image_size} px")
    plain = best_time(plain_decode, paths, args.image_size, args.repeats)
    draft = best_time(load_image, paths, args.image_size, args.repeats)
    print(f"full decode + resize: {plain:.2f} s ({len(paths) / plain:.0f} images/s)")
    print(f"reduced-size decode (draft): {draft:.2f} s ({len(paths) / draft:.0f} images/s)")
    print(f"ratio: {plain / draft:.2f}x")


if __name__ == "__main__":
    main()
