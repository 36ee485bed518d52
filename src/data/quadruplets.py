"""The one reader of quadruplets: the four views of a location (the files of its folder, or uploaded bytes)
as tensors, each unreadable or missing view replaced by a readable view of the same location.

Training, the feature cache, predict, export and serve all read views here, with the transforms here, so
the pixels a model sees never depend on which command decoded them.
"""

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from src.data.images import N_VIEWS, VIEWS, check_image, load_image, view_paths
from src.model.config import IMAGENET_MEAN, IMAGENET_STD

# a missing view is replaced by the first readable one in this order: its neighbours, then the opposite view
SUBSTITUTE_ORDER = {i: [(i + 1) % N_VIEWS, (i + 3) % N_VIEWS, (i + 2) % N_VIEWS] for i in range(N_VIEWS)}
InputSpec = tuple[int, tuple[float, ...], tuple[float, ...]]  # image size, mean, std
View = Path | str | bytes | Image.Image | None  # a file, an upload's bytes, an image decoded already, or nothing


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable:
    """PIL image -> normalized tensor [3, H, W] (per-channel `mean`/`std`, ImageNet's by default), resized
    to image_size if needed."""
    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable:
    """Training augmentation: random resized crop and colour jitter, then normalisation (as eval_transform).

    No horizontal flip here: flipping one view alone breaks the geometry of the quadruplet
    (see `mirror_views`, which flips all views and swaps 90 and 270).
    """
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


def input_spec(hparams) -> InputSpec:
    """(image size, mean, std) a model's checkpoint hparams expect (ImageNet's statistics for checkpoints
    written before the normalisation was saved)."""
    return (int(hparams["image_size"]), tuple(hparams.get("image_mean", IMAGENET_MEAN)),
            tuple(hparams.get("image_std", IMAGENET_STD)))


def mirror_views(views: torch.Tensor) -> torch.Tensor:
    """The mirror image of a quadruplet [..., 4, 3, H, W]: every view flipped left-right and the
    90 and 270 views swapped, a geometrically consistent mirrored scene."""
    return views.flip(-1)[..., [0, 3, 2, 1], :, :, :]


def substitute_sources(reasons: Sequence[str | None]) -> list[int | None]:
    """The view index that fills each of the four slots given per-view problems (None: readable):
    itself when readable, else the first readable of SUBSTITUTE_ORDER; None when no view is readable."""
    readable = [i for i in range(N_VIEWS) if reasons[i] is None]
    return [i if reasons[i] is None else next((j for j in SUBSTITUTE_ORDER[i] if j in readable), None)
            for i in range(N_VIEWS)]


@dataclass
class Quadruplet:
    """A location's views per transform key ([4, 3, S, S]; zeros when no view is readable), the problem of
    each view (None: read) and which view fills each slot (None: no readable view)."""

    views: dict[Hashable, torch.Tensor]
    reasons: list[str | None]
    sources: list[int | None]

    @property
    def usable(self) -> bool:
        return self.sources[0] is not None

    def substitutions(self) -> list[tuple[int, str, int]]:
        """(view, reason, used view) of each slot filled by another view (headings in degrees)."""
        return [(VIEWS[i], self.reasons[i], VIEWS[j]) for i, j in enumerate(self.sources) if j is not None and j != i]


def _decode(view: View, size: int) -> Image.Image:
    """A PIL image of `size` x `size` from a file, bytes or an image decoded already (e.g. checked strictly)."""
    if isinstance(view, Image.Image):
        return view if view.size == (size, size) else view.resize((size, size), Image.Resampling.BILINEAR)
    return load_image(io.BytesIO(view) if isinstance(view, bytes) else view, size)


def read_quadruplet(views: Sequence[View], transforms: Mapping[Hashable, tuple[int, Callable]],
                    validate: bool = True) -> Quadruplet:
    """Read four views (view order 0, 90, 180, 270) through each transform of `transforms` (key -> (decode
    size, transform)); JPEGs are decoded at reduced size (`src.data.images.load_image`).

    With `validate`, a file view is checked first (`src.data.images.check_image`: header, end marker); a
    view that is missing or fails to decode is replaced by a readable view of the same location."""
    reasons: list[str | None] = [None] * N_VIEWS
    decoded: dict[Hashable, list[torch.Tensor | None]] = {key: [None] * N_VIEWS for key in transforms}
    for i, view in enumerate(views):
        if view is None:
            reasons[i] = "missing"
            continue
        if validate and isinstance(view, (str, Path)):
            reasons[i] = check_image(view)
            if reasons[i] is not None:
                continue
        try:
            for key, (size, transform) in transforms.items():
                decoded[key][i] = transform(_decode(view, size))
        except Exception as error:  # a file that passes the header check can still fail to decode
            reasons[i] = f"decode failed ({type(error).__name__})"
    sources = substitute_sources(reasons)
    stacked = {key: torch.stack([decoded[key][j] if j is not None else torch.zeros(3, size, size) for j in sources])
               for key, (size, _) in transforms.items()}
    return Quadruplet(stacked, reasons, sources)


def load_quadruplet(image_dir: str | Path, image_size: int, transform: Callable) -> torch.Tensor:
    """The four views of a location folder as a [4, 3, H, W] tensor (view order 0, 90, 180, 270), through
    `transform`, without a header check (the views of a training set were checked when it was read)."""
    return read_quadruplet(view_paths(image_dir), {0: (image_size, transform)}, validate=False).views[0]


class QuadrupletFolders(Dataset):
    """Location folders -> (index, Quadruplet) through `transforms` (see read_quadruplet)."""

    def __init__(self, folders: Sequence[str | Path], transforms: Mapping[Hashable, tuple[int, Callable]],
                 validate: bool = True):
        self.folders = [str(folder) for folder in folders]
        self.transforms = dict(transforms)
        self.validate = validate

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int) -> tuple[int, Quadruplet]:
        return index, read_quadruplet(view_paths(self.folders[index]), self.transforms, self.validate)


def spec_transforms(specs: Sequence[InputSpec]) -> dict[InputSpec, tuple[int, Callable]]:
    """The evaluation transform of each input spec, keyed by the spec (for models of several input specs)."""
    return {spec: (spec[0], eval_transform(*spec)) for spec in dict.fromkeys(specs)}


def collate_quadruplets(items: Sequence[tuple[int, Quadruplet]]):
    """Batch QuadrupletFolders items: (indices [B], {key: Tensor[B, 4, 3, S, S]}, usable: bool Tensor[B],
    substitutions: [(index, view, reason, used view)])."""
    indices = torch.tensor([index for index, _ in items])
    keys = list(items[0][1].views)
    batches = {key: torch.stack([quadruplet.views[key] for _, quadruplet in items]) for key in keys}
    usable = torch.tensor([quadruplet.usable for _, quadruplet in items])
    substitutions = [(index, *s) for index, quadruplet in items for s in quadruplet.substitutions()]
    return indices, batches, usable, substitutions
