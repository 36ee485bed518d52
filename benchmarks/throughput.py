"""Training throughput (locations/s) of efficientnet_lite0 and resnext50_32x4d on this machine.

    python -m benchmarks.throughput [--dataset-dir DIR] [--image-size 224] [--batch-size 8] [--steps 3]

Each backbone is fully unfrozen (the fine-tuning phase: forward and backward through backbone and
head, AdamW step) on real quadruplets decoded beforehand, so the figure is the model's compute; the
frozen forward (feature-cache fill, prediction) is timed too. The two backbones alternate step by
step and the median step counts, so load from other processes hits both alike. The last line is the
training ratio efficientnet_lite0 / resnext50_32x4d.
"""

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

from benchmarks import DEFAULT_DATASET
from src.data.quadruplets import eval_transform, load_quadruplet
from src.data.ingest import find_image_root, list_location_dirs
from src.model.config import ClassTable, ModelConfig, OptimConfig
from src.model.geomodel import GeoModel

BACKBONES = ("efficientnet_lite0", "resnext50_32x4d")
POINTS = [[0.0, 0.0], [1.0, 1.0]]
CLASSES = ClassTable(cell=[0, 1], n_train=[1, 1], centroids={"weighted": POINTS, "clipped": POINTS, "plain": POINTS},
                     scaler={"x_min": 0.0, "x_max": 1.0, "y_min": 0.0, "y_max": 1.0}, prior_lat=45.0, prior_lng=16.0)


class Runner:
    """One backbone's model and optimizer; each call times one step."""

    def __init__(self, backbone: str, views: torch.Tensor):
        torch.manual_seed(0)
        self.model = GeoModel(ModelConfig("classification", backbone, views.shape[-1]), OptimConfig(), CLASSES)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.views = views
        self.labels = torch.zeros(len(views), dtype=torch.long)

    def train_step(self) -> float:
        self.model.train()
        start = time.perf_counter()
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(self.views), self.labels).backward()
        self.optimizer.step()
        return time.perf_counter() - start

    def forward_step(self) -> float:
        self.model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            self.model(self.views)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="locations per step (4 images each)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dirs = list(list_location_dirs(find_image_root(args.dataset_dir)).values())[: args.batch_size]
    views = torch.stack([load_quadruplet(d, args.image_size, eval_transform(args.image_size)) for d in dirs])
    print(f"steps of {len(views)} locations ({4 * len(views)} images) at {args.image_size} px, "
          f"{torch.get_num_threads()} threads, backbones alternating")
    runners = {name: Runner(name, views) for name in BACKBONES}
    for runner in runners.values():  # warm-up, not timed
        runner.train_step()
    train = {name: [] for name in BACKBONES}
    forward = {name: [] for name in BACKBONES}
    for _ in range(args.steps):
        for name, runner in runners.items():
            train[name].append(runner.train_step())
            forward[name].append(runner.forward_step())
    rates = {}
    for name in BACKBONES:
        rates[name] = len(views) / statistics.median(train[name])
        print(f"{name}: training {rates[name]:.2f} locations/s, "
              f"frozen forward {len(views) / statistics.median(forward[name]):.2f} locations/s")
    print(f"training ratio efficientnet_lite0 / resnext50_32x4d: {rates[BACKBONES[0]] / rates[BACKBONES[1]]:.2f}x")


if __name__ == "__main__":
    main()
