"""Typed configuration of a training run: the Trainer's settings and the run as a whole (data, model,
optimisation, input pipeline, trainer), plus the defaults that depend on the situation (demo set, GPU)."""

from dataclasses import dataclass
from pathlib import Path

from src.data.config import DataConfig, LoaderConfig
from src.model.config import ModelConfig, OptimConfig

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
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


@dataclass(frozen=True)
class RunConfig:
    """Everything one `src.train` run needs."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    loader: LoaderConfig
    trainer: TrainerConfig

    @property
    def gpu(self) -> bool:
        """Whether the run trains on a CUDA GPU."""
        import torch  # noqa: PLC0415 (not for building configs from flags)

        return self.trainer.accelerator != "cpu" and torch.cuda.is_available()
