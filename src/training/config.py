"""Typed configuration of a training run: the Trainer's settings and the run as a whole (data, model,
optimisation, input pipeline, trainer), plus the defaults that depend on the situation (demo set, GPU)."""

import os
from dataclasses import dataclass
from pathlib import Path

from src.data.config import DataConfig, LoaderConfig
from src.model.config import ModelConfig, OptimConfig

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
# offered by Lightning, refused here: they convert the whole module, its float64 centroids and targets included
UNSUPPORTED_PRECISIONS = {
    "16-true": "float16 overflows EPSG:3766 metres (y ~5.2e6 > 65504) and the run scores NaN",
    "bf16-true": "bfloat16 rounds the class centroids by up to 16 km and latitudes by 0.1 degrees",
}
CACHE_SCOPES = ("node", "shared")
DDP_TIMEOUT_MIN = 240  # the process group waits this long (a rank-0 cache fill of 80,000 locations included)
MAX_IMAGE_SIZE = 2048
# defaults that depend on the situation: backbone, image size, epochs, unfreeze epoch (-1 = never)
DEMO_DEFAULTS = {"backbone": "efficientnet_lite0", "image_size": 96, "epochs": 30, "unfreeze_at_epoch": -1}
# on CPU fine-tuning runs at ~1 location/s (benchmarks.throughput): the backbone stays frozen unless asked
CPU_DEFAULTS = {"epochs": 30, "unfreeze_at_epoch": -1}  # image size: the backbone's native one
GPU_DEFAULTS = {"epochs": 20, "unfreeze_at_epoch": 5}
QUICK_DEFAULTS = {"image_size": 64, "epochs": 2}


@dataclass(frozen=True)
class TrainerConfig:
    """What the Lightning Trainer is given, and where the run's files go."""

    epochs: int
    out_dir: Path = Path("reports")
    run_name: str = "run"
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool | str = True  # True, False or "warn" (GPU: some kernels have no deterministic version)
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    early_stopping_patience: int | None = None
    val_check_interval: float = 1.0
    ema: float | None = None
    quick: bool = False  # smoke run: at most 2 batches per loop
    resume: Path | None = None
    folds: int | None = None
    cache_scope: str = "node"  # node: each node's local rank 0 fills its own cache; shared: global rank 0, once


@dataclass(frozen=True)
class RunConfig:
    """Everything one `src.train` run needs."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    loader: LoaderConfig
    trainer: TrainerConfig
    gallery_dirs: tuple[str, ...] = ()  # --refine knn: dataset dirs whose locations join the retrieval gallery

    @property
    def gpu(self) -> bool:
        """Whether the run trains on a CUDA GPU."""
        import torch  # noqa: PLC0415 (not for building configs from flags)

        return self.trainer.accelerator != "cpu" and torch.cuda.is_available()


def usable_cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def processes_per_node(devices: str, accelerator: str, gpus: int) -> int:
    """How many training processes share this node's cores: the --devices count (`auto`: every GPU, or 1)."""
    devices = str(devices).strip()
    if devices in ("auto", "-1"):
        return max(1, gpus) if accelerator != "cpu" else 1
    if "," in devices or devices.startswith("["):
        return max(1, len([d for d in devices.strip("[]").split(",") if d.strip()]))
    try:
        return max(1, int(devices))
    except ValueError:
        return 1


def default_num_workers(processes: int = 1) -> int:
    """Data loader workers of one process: its share of the node's cores, less one for the process itself."""
    return max(0, usable_cores() // max(1, processes) - 1)
