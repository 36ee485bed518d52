"""The retrieval gallery of a training run (`--refine knn`, `src.inference.retrieval`): built after fit from the
best checkpoint's weights and saved into that checkpoint (`src.inference.checkpoints.write_checkpoint_entry`).

Its locations are the run's labelled locations outside the test split (train and val) and those of any
`--gallery-dirs` (read and checked as the dataset dirs are, labelled with the run's classes by position). A
location that is the same place as a test location is left out: the same uuid, byte-identical views, or a
position within SAME_PLACE_M; so with cross-validation each fold's gallery holds only locations that fold
trained on (or extra ones), and no test location can find itself. The embeddings come from the feature cache
when the backbone stayed frozen (the train and val features the DataModule holds are reused, not read again;
only the extra dirs are read or computed),
else from one pass over the images with the final model.
"""

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from src.core import geo
from src.data.cells import nearest_class
from src.data.config import DataConfig, LoaderConfig
from src.data.datamodule import GeoDataModule
from src.data.enrich import Enriched, skip_listing
from src.data.features import FeatureCache
from src.data.images import view_paths
from src.data.ingest import read_datasets
from src.data.quadruplets import QuadrupletFolders, collate_quadruplets, eval_transform
from src.inference.retrieval import Gallery
from src.model.geomodel import GeoModel

SAME_PLACE_M = 1.0  # gallery locations closer than this to a test location count as that location
COLUMNS = ["uuid", "crs_x", "crs_y", "label", "image_dir"]


@dataclass
class GalleryReport:
    """What went into a gallery, for the run's log line."""

    from_run: int  # labelled locations of the run (train and val)
    from_dirs: int  # locations of --gallery-dirs
    left_out: int  # candidates that were the same place as a test location or as another candidate

    def line(self, size: int) -> str:
        extra = f" + {self.from_dirs} from --gallery-dirs" if self.from_dirs else ""
        left = f"; {self.left_out} left out as copies of a test location or of each other" if self.left_out else ""
        return f"refine: a gallery of {size} locations ({self.from_run} train and val{extra}{left})"


def views_digest(image_dir: str | Path) -> str:
    """A hash of the bytes of a location's four view files (equal for byte-identical copies)."""
    digest = hashlib.sha1()
    for path in view_paths(image_dir):
        digest.update(path.read_bytes() if path.is_file() else b"")
        digest.update(b"|")
    return digest.hexdigest()


def extra_locations(dirs: list[str], enriched: Enriched, data: DataConfig) -> pd.DataFrame:
    """The locations of `dirs` (read and checked as dataset dirs are; skips listed on stderr), with EPSG:3766
    x/y and the class of the run they fall in (its cell's class, else the nearest class's)."""
    ingested = read_datasets(dirs, True, data.full_decode, data.max_outside_km, data.mainland_only, progress=False,
                             check_cache=None if data.check_cache is None else Path(data.check_cache))
    listing = skip_listing(ingested)
    if listing:
        print(listing, file=sys.stderr)
    frame = ingested.locations.copy()
    lat, lng = frame["latitude"].to_numpy(), frame["longitude"].to_numpy()
    frame["crs_x"], frame["crs_y"] = geo.project(lat, lng)
    frame["label"] = nearest_class(enriched.classes, enriched.grid, enriched.grid.assign(lat, lng), lat, lng)
    return frame[COLUMNS]


def view_sizes(image_dir: str | Path) -> tuple[int, ...]:
    """The byte sizes of a location's four view files (-1: missing): equal for byte-identical copies."""
    return tuple(path.stat().st_size if path.is_file() else -1 for path in view_paths(image_dir))


def copy_digests(image_dirs: list[str]) -> list[str | None]:
    """`views_digest` of each location whose four view sizes some other location shares, else None: only those
    can be byte-identical copies, so most locations are never read."""
    sizes = [view_sizes(d) for d in image_dirs]
    shared = pd.Series(sizes).duplicated(keep=False).to_numpy()
    return [views_digest(d) if is_shared else None for d, is_shared in zip(image_dirs, shared)]


def gallery_locations(locations: pd.DataFrame, extra: pd.DataFrame | None) -> tuple[pd.DataFrame, GalleryReport]:
    """The gallery's rows (COLUMNS): the run's train and val rows, then `extra`'s, without any row that is the
    same place as a test row (uuid, identical views, or within SAME_PLACE_M) or as an earlier gallery row."""
    test = locations[locations["split"] == "test"]
    own = locations[locations["split"] != "test"][COLUMNS]
    candidates = pd.concat([own, extra], ignore_index=True) if extra is not None and len(extra) else own.reset_index(drop=True)
    digests = copy_digests([*candidates["image_dir"].astype(str), *test["image_dir"].astype(str)])
    test_digests = {d for d in digests[len(candidates):] if d is not None}
    digests = pd.Series(digests[:len(candidates)], dtype=object)
    keep = ~candidates["uuid"].astype(str).isin(set(test["uuid"].astype(str))).to_numpy()
    keep &= ~digests.isin(test_digests).to_numpy()
    keep &= ~(digests.notna() & digests.duplicated()).to_numpy() & ~candidates["uuid"].astype(str).duplicated().to_numpy()
    if len(test) and len(candidates):
        points = candidates[["crs_x", "crs_y"]].to_numpy(float)
        test_points = test[["crs_x", "crs_y"]].to_numpy(float)
        for start in range(0, len(points), 4096):  # [chunk, n_test] distances stay small
            block = points[start:start + 4096]
            nearest = np.sqrt(((block[:, None, :] - test_points[None, :, :]) ** 2).sum(-1)).min(axis=1)
            keep[start:start + len(block)] &= nearest >= SAME_PLACE_M
    report = GalleryReport(len(own), len(candidates) - len(own), int((~keep).sum()))
    return candidates[keep].reset_index(drop=True), report


@torch.no_grad()
def fused_embeddings(model: GeoModel, image_dirs: list[str], loader: LoaderConfig, use_cache: bool,
                     device: torch.device, known: Callable[[str], dict[str, torch.Tensor]] | None = None
                     ) -> np.ndarray:
    """The normalised fused embeddings [N, F] of the locations in `image_dirs` under `model` (eval mode): from the
    feature cache with `use_cache` (entries missing are computed into it; `known(directory)` gives the features
    already in memory for the cache in that directory, by image dir, which are not read again), else from the
    images."""
    from src.inference.engine import OnnxFeatureExtractor, resolve_engine  # noqa: PLC0415 (onnx: only here)

    was_training = model.training
    model.eval().to(device)
    transform = eval_transform(loader.image_size, loader.mean, loader.std)
    embeddings = []
    try:
        if use_cache:
            cache = FeatureCache(loader.cache_dir, loader.backbone, model.backbone, loader.image_size,
                                 preprocessing=repr(transform))
            in_memory = known(str(cache.directory)) if known is not None else {}
            rest = list(dict.fromkeys(d for d in image_dirs if d not in in_memory))
            if rest:  # one pass: the entries found are read once, the missing ones computed
                extract = (OnnxFeatureExtractor(model.backbone, loader.image_size, preprocessing=repr(transform))
                           if resolve_engine(loader.engine, device) == "onnx" else None)
                read = cache.features(rest, model.backbone, transform, batch_size=loader.batch_size,
                                      num_workers=loader.num_workers, device=device, extract=extract)
                in_memory = {**in_memory, **dict(zip(rest, read))}
            for start in range(0, len(image_dirs), loader.batch_size):
                batch = torch.stack([in_memory[d] for d in image_dirs[start:start + loader.batch_size]])
                embeddings.append(model.embedding(model.fusion(batch.to(device))).cpu())
        else:
            folders = QuadrupletFolders(image_dirs, {"views": (loader.image_size, transform)}, validate=False)
            batches = DataLoader(folders, batch_size=loader.batch_size, num_workers=loader.num_workers,
                                 collate_fn=collate_quadruplets)
            for _, views, _, _ in batches:
                _, embedding = model.outputs_and_embedding(views["views"].to(device))
                embeddings.append(embedding.cpu())
    finally:
        model.train(was_training)
    return torch.cat(embeddings).numpy() if embeddings else np.empty((0, model.fusion.out_dim), np.float32)


def build_gallery(model: GeoModel, datamodule: GeoDataModule, enriched: Enriched, data: DataConfig,
                  gallery_dirs: tuple[str, ...], backbone_trained: bool, device: torch.device
                  ) -> tuple[Gallery, GalleryReport]:
    """The gallery of a run whose best weights `model` holds (see the module docstring); `backbone_trained`:
    whether the run fine-tuned the backbone (then the feature cache does not hold its features)."""
    extra = extra_locations(list(gallery_dirs), enriched, data) if gallery_dirs else None
    rows, report = gallery_locations(datamodule.locations, extra)
    use_cache = datamodule.loader.cache_dir is not None and not backbone_trained
    embeddings = fused_embeddings(model, rows["image_dir"].astype(str).tolist(), datamodule.loader, use_cache, device,
                                  known=datamodule.features_in_memory)
    gallery = Gallery(embeddings, rows[["crs_x", "crs_y"]].to_numpy(float), rows["label"].to_numpy(),
                      rows["uuid"].astype(str).tolist())
    return gallery, report

