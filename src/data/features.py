"""On-disk cache of frozen-backbone features, one file per location.

An entry holds the [4, D] features of a location's four views (view order 0, 90, 180, 270),
computed with the evaluation transform. Its key covers the four image files (resolved path,
size, modification time), the backbone (name and a hash of its weights) and the image size,
so a changed image, other weights or another input size never reuse a stale entry.

Entries are written to a temporary file and renamed. An entry that cannot be read back as a
finite float [4, D] tensor (truncated, zero-byte, garbage, wrong shape) is treated as missing:
it is deleted and recomputed, with a warning that counts and lists such entries.

`features` fills the cache and returns the stacked features of every location in one pass: each entry is
read at most once (to check it) and none that it has just computed is read back.
"""

import hashlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.model.backbones import Backbone
from src.core.files import atomic_path
from src.data.images import N_VIEWS, view_paths
from src.data.quadruplets import QuadrupletFolders, collate_quadruplets

log = logging.getLogger(__name__)
LISTED_CORRUPT = 5


class FeatureCache:
    """Backbone features per location under `root/<backbone>-<size>px-<weights hash>/`."""

    def __init__(self, root: str | Path, backbone_name: str, backbone: Backbone, image_size: int,
                 preprocessing: str = ""):
        """`preprocessing`: a description of the image transform (e.g. its repr); a different one
        gives a different cache folder."""
        self.backbone_name = backbone_name
        self.image_size = image_size
        digest = hashlib.sha1(f"{backbone.fingerprint()}|{preprocessing}".encode()).hexdigest()
        self.weights_hash = digest[:16]
        self.directory = Path(root) / f"{backbone_name}-{image_size}px-{self.weights_hash}"
        self.dim = backbone.out_features
        self.corrupt: list[Path] = []  # entries found unusable (and deleted) by this object
        self.computed = 0  # entries this object computed and stored
        self.reused = 0  # entries this object found usable and did not recompute

    def _read(self, path: Path) -> torch.Tensor | None:
        """The entry at `path`, or None when it is missing or unusable (then it is deleted)."""
        if not path.exists():
            return None
        try:
            features = torch.load(path, map_location="cpu", weights_only=True)
            problem = None
            if not isinstance(features, torch.Tensor):
                problem = f"holds a {type(features).__name__}, not a tensor"
            elif tuple(features.shape) != (N_VIEWS, self.dim) or not features.is_floating_point():
                problem = f"shape {tuple(features.shape)} {features.dtype}, expected ({N_VIEWS}, {self.dim}) float"
            elif not torch.isfinite(features).all():
                problem = "non-finite values"
        except Exception as error:  # truncated, zero-byte or garbage files fail in many ways
            features, problem = None, f"unreadable ({type(error).__name__})"
        if problem is None:
            return features
        log.debug("feature cache: %s: %s", path, problem)
        self.corrupt.append(path)
        path.unlink(missing_ok=True)
        return None

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
        return self._read(self.entry_path(image_dir))

    def put(self, image_dir: str | Path, features: torch.Tensor) -> None:
        """Store a location's [4, D] features (atomically)."""
        self._write(self.entry_path(image_dir), features)

    def _write(self, path: Path, features: torch.Tensor) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(features.detach().cpu().contiguous().clone(), tmp)

    def compute_missing(
        self,
        image_dirs: Sequence[str],
        backbone: Backbone,
        transform: Callable,
        batch_size: int = 32,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        extract: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> int:
        """Compute and store the entries missing for `image_dirs`; returns how many were computed.

        The views are read with `transform` (the evaluation transform, `src.data.quadruplets`). The backbone
        runs in eval mode; its previous mode is restored afterwards. Unusable entries count as missing
        (see the module docstring). The loader has its own random generator: filling the cache
        draws nothing from torch's global RNG, so a cold and a warm cache give the same training run.
        `extract` computes the features in place of the backbone's forward (ONNX Runtime,
        `src.export.OnnxFeatureExtractor`); its features agree with torch's, so entries stay interchangeable.
        """
        return self._fill(image_dirs, backbone, transform, batch_size, num_workers, device, extract, out=None)

    def features(
        self,
        image_dirs: Sequence[str],
        backbone: Backbone,
        transform: Callable,
        batch_size: int = 32,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        extract: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`compute_missing`, then the stacked [len(image_dirs), 4, D] features (as `load_all` gives them),
        in one pass: the entries found are read once, the ones computed are not read back."""
        out = torch.empty(len(image_dirs), N_VIEWS, self.dim)
        self._fill(image_dirs, backbone, transform, batch_size, num_workers, device, extract, out=out)
        return out

    @torch.no_grad()
    def _fill(self, image_dirs: Sequence[str], backbone: Backbone, transform: Callable, batch_size: int,
              num_workers: int, device: torch.device | str, extract: Callable | None,
              out: torch.Tensor | None) -> int:
        """Compute and store the missing entries; with `out`, also write every location's features into its row."""
        rows: dict[str, list[int]] = {}  # each distinct location and its rows in `out`
        for row, image_dir in enumerate(image_dirs):
            rows.setdefault(str(image_dir), []).append(row)
        corrupt_before = len(self.corrupt)
        paths, missing = {}, []
        for image_dir, location_rows in rows.items():
            paths[image_dir] = path = self.entry_path(image_dir)
            found = self._read(path)
            if found is None:
                missing.append(image_dir)
            elif out is not None:
                for row in location_rows:  # basic indexing: a plain copy (a list index would scatter)
                    out[row] = found
        corrupt = self.corrupt[corrupt_before:]
        if corrupt:
            listed = ", ".join(str(p) for p in corrupt[:LISTED_CORRUPT])
            more = f" and {len(corrupt) - LISTED_CORRUPT} more" if len(corrupt) > LISTED_CORRUPT else ""
            log.warning("warning: feature cache: %d corrupt entr%s (truncated, unreadable or wrong shape) "
                        "deleted and recomputed: %s%s", len(corrupt), "y" if len(corrupt) == 1 else "ies", listed, more)
        self.reused += len(rows) - len(missing)
        if not missing:
            return 0
        log.info("feature cache: computing %d of %d locations into %s", len(missing), len(rows), self.directory)
        was_training = backbone.training
        backbone.eval()
        folders = QuadrupletFolders(missing, {"views": (self.image_size, transform)}, validate=False)
        loader = DataLoader(folders, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_quadruplets,
                            generator=torch.Generator().manual_seed(0))
        try:
            for indices, batches, _, _ in tqdm(loader, desc="caching features", unit="batch", leave=False):
                views = batches["views"]
                batch, n_views = views.shape[:2]
                features = (extract or backbone)(views.flatten(0, 1).to(device)).view(batch, n_views, -1).cpu()
                for index, location_features in zip(indices.tolist(), features):
                    image_dir = missing[index]
                    self._write(paths[image_dir], location_features)
                    if out is not None:
                        for row in rows[image_dir]:
                            out[row] = location_features
                    self.computed += 1
        finally:
            backbone.train(was_training)
        return len(missing)

    def load_all(self, image_dirs: Sequence[str]) -> torch.Tensor:
        """Stacked [len(image_dirs), 4, D] features; every entry must exist and be usable
        (call `compute_missing` first)."""
        entries = []
        for image_dir in image_dirs:
            features = self.get(image_dir)
            if features is None:
                raise RuntimeError(f"feature cache: no usable entry for {image_dir}; call compute_missing first")
            entries.append(features)
        return torch.stack(entries)
