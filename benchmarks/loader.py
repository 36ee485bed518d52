"""Training DataLoader throughput: locations/s from the 640 px originals vs from a resized copy (src.resize).

    python -m benchmarks.loader [--dataset-dir DIR] [--size 256] [--image-size 224] [--passes 3]

The copy is written first (src.resize, timed and reported), into a temporary folder. Both sides iterate
the fine-tuning phase's train loader of src.data.GeoDataModule (augmentation on, no feature cache) over the
same train split, alternating pass by pass so that machine noise falls on both.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks import DEFAULT_DATASET
from src.data.config import LoaderConfig
from src.data.datamodule import GeoDataModule
from src.model.config import IMAGENET_MEAN, IMAGENET_STD
from src.data.enrich import enrich
from src.data.resizing import resize_datasets


def one_pass(datamodule: GeoDataModule) -> tuple[int, float]:
    """(locations, seconds) of one full pass over the train loader, worker start-up included."""
    start = time.perf_counter()
    count = sum(len(batch["views"]) for batch in datamodule.train_dataloader())
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--size", type=int, default=256, help="side of the resized copy (default: 256)")
    parser.add_argument("--image-size", type=int, default=224, help="training input side (default: 224)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        resized = resize_datasets([args.dataset_dir], Path(tmp), args.size, workers=os.cpu_count() or 1,
                                  progress=False)["targets"][0]
        resize_seconds = time.perf_counter() - start
        modules = {}
        for name, folder in (("originals", args.dataset_dir), ("resized", resized)):
            locations = enrich([folder], progress=False).locations
            loader = LoaderConfig(args.image_size, IMAGENET_MEAN, IMAGENET_STD, batch_size=args.batch_size,
                                  num_workers=args.num_workers, augment="always")
            modules[name] = GeoDataModule(locations, loader)
        totals = {name: [0, 0.0] for name in modules}
        for _ in range(args.passes):
            for name, datamodule in modules.items():
                count, seconds = one_pass(datamodule)
                totals[name][0] += count
                totals[name][1] += seconds
    rate = {name: count / seconds for name, (count, seconds) in totals.items()}
    print(f"{args.dataset_dir}: resized copy at {args.size} px written in {resize_seconds:.1f} s")
    print(f"train loader, {args.image_size} px, batch {args.batch_size}, {args.num_workers} workers, "
          f"{args.passes} passes over {totals['originals'][0] // args.passes} train locations")
    print(f"from the originals: {rate['originals']:.1f} locations/s")
    print(f"from the resized copy: {rate['resized']:.1f} locations/s")
    print(f"ratio: {rate['resized'] / rate['originals']:.2f}x")


if __name__ == "__main__":
    main()
