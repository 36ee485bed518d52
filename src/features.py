"""On-disk cache of frozen-backbone features, one file per location.

An entry holds the [4, D] features of a location's four views (view order 0, 90, 180, 270),
computed with the evaluation transform. Its key covers the four image files (resolved path,
size, modification time), the backbone (name and a hash of its weights) and the image size,
so a changed image, other weights or another input size never reuse a stale entry.
"""

import hashlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.backbones import Backbone
from src.files import atomic_path
from src.images import view_paths

log = logging.getLogger(__name__)


class _Quadruplets(Dataset):
    def __init__(self, image_dirs: Sequence[str], load: Callable[[str], torch.Tensor]):
        self.image_dirs = list(image_dirs)
        self.load = load

    def __len__(self) -> int:
        return len(self.image_dirs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.load(self.image_dirs[index])


class FeatureCache:
    """Backbone features per location under `root/<backbone>-<size>px-<weights hash>/`."""

    def __init__(self, root: str | Path, backbone_name: str, backbone: Backbone, image_size: int):
        self.backbone_name = backbone_name
        self.image_size = image_size
        self.weights_hash = backbone.fingerprint()[:16]
        self.directory = Path(root) / f"{backbone_name}-{image_size}px-{self.weights_hash}"

    def entry_path(self, image_dir: str | Path) -> Path:
        """The cache file of the location whose four views are in `image_dir`."""
        digest = hashlib.sha1()
        for path in view_paths(image_dir):
            path = path.resolve()
            stat = path.stat()
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return self.directory / f"{digest.hexdigest()}.pt"

    def get(self, image_dir: str | Path) -> torch.Tensor | None:
        """The cached [4, D] features of a location, or None."""
        path = self.entry_path(image_dir)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def put(self, image_dir: str | Path, features: torch.Tensor) -> None:
        """Store a location's [4, D] features (atomically)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.entry_path(image_dir)) as tmp:
            torch.save(features.detach().cpu().contiguous().clone(), tmp)

    @torch.no_grad()
    def compute_missing(
        self,
        image_dirs: Sequence[str],
        backbone: Backbone,
        load: Callable[[str], torch.Tensor],
        batch_size: int = 32,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
    ) -> int:
        """Compute and store the entries missing for `image_dirs`; returns how many were computed.

        `load(image_dir)` gives the [4, 3, H, W] evaluation-transformed quadruplet. The backbone
        runs in eval mode; its previous mode is restored afterwards.
        """
        missing = [image_dir for image_dir in dict.fromkeys(image_dirs) if not self.entry_path(image_dir).exists()]
        if not missing:
            return 0
        log.info("feature cache: computing %d of %d locations into %s", len(missing), len(set(image_dirs)), self.directory)
        was_training = backbone.training
        backbone.eval()
        loader = DataLoader(_Quadruplets(missing, load), batch_size=batch_size, num_workers=num_workers)
        try:
            for indices, views in tqdm(loader, desc="caching features", unit="batch", leave=False):
                batch, n_views = views.shape[:2]
                features = backbone(views.flatten(0, 1).to(device)).view(batch, n_views, -1)
                for index, location_features in zip(indices.tolist(), features):
                    self.put(missing[index], location_features)
        finally:
            backbone.train(was_training)
        return len(missing)

    def load_all(self, image_dirs: Sequence[str]) -> torch.Tensor:
        """Stacked [len(image_dirs), 4, D] features; every entry must exist."""
        return torch.stack([torch.load(self.entry_path(d), map_location="cpu", weights_only=True) for d in image_dirs])
