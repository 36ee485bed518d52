"""The inference engines: torch or ONNX Runtime (the CPU engine), and the ONNX export of a model or backbone.

An exported model maps `views` [B, 4, 3, S, S] (normalised, view order 0, 90, 180, 270) to `probabilities`
[B, C] (classification; `scaled_xy` [B, 2] for regression), `xy` [B, 2], the head's EPSG:3766 position in
metres (float64; `src.core.geo.unproject` turns it into latitude/longitude), and `embedding` [B, F], the fused
embedding, L2-normalised, that `src.inference.retrieval` searches its gallery with (in numpy, after the
graph). A backbone export maps `images` [N, 3, S, S] to `features` [N, D]. The batch axis is dynamic; the opset is `OPSET`. Exports are
checked against torch, made once and kept, stamped with a key that a stale file fails. `resolve_engine`
picks the engine for --engine {auto,torch,onnx}: auto means ONNX Runtime on the CPU and torch on a GPU.

The exporter is TorchScript's (`torch.onnx.export(dynamo=False)`), in the calling process: ~2 s for
efficientnet_lite0 where torch.export (dynamo) took ~6 s plus a child process to keep its autograd state
away from processes forked later. Tracing runs the model once, like any forward pass, so a process forked
afterwards needs `torch.set_num_threads(1)` before torch computes (as DataLoader workers do);
tests/test_export.py trains in such a child.

`--engine {auto,torch,onnx}` of src.predict, src.train (feature cache) and src.serve picks torch or
ONNX Runtime; auto means ONNX Runtime on the CPU and torch on a GPU. The engines keep their exports in one
store shared by every checkpoint and feature cache folder (data/cache/onnx, or $ONNX_CACHE_DIR), one file per
key: a hash of what changes the graph (the weights, input size, preprocessing, the whole model's hparams
such as its head and prediction rule, but not the refinement's, which runs after the graph; the opset,
exporter, torch version and `EXPORT_VERSION`). A missing file is exported once, under a lock file, to a temporary name unique to the host and process, checked, then
renamed into place, so DDP ranks and commands running at once never read a partial file.
"""

import fcntl
import hashlib
import io
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from src.core.choices import ENGINES
from src.core.errors import UserError
from src.core.files import atomic_path
from src.core.paths import onnx_store_dir
from src.model.backbones import Backbone
from src.model.config import REFINE_HPARAMS

log = logging.getLogger(__name__)

OPSET = 18
EXPORTER = "torchscript"  # torch.onnx.export(dynamo=False)
EXPORT_VERSION = 3  # bump when what an export writes changes: stored files of older versions are not reused
KEY = "src.export.key"  # ONNX metadata entry holding what the file was exported from
FEATURES_RTOL, FEATURES_ATOL = 1e-3, 1e-4  # a backbone export agrees with torch's features within these


def resolve_engine(engine: str, device: str | torch.device = "cpu") -> str:
    """'torch' or 'onnx' for --engine `engine` on `device` (auto: ONNX Runtime on the CPU, torch on a GPU)."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    on_cpu = torch.device(device).type == "cpu"
    if engine == "auto":
        return "onnx" if on_cpu else "torch"
    if engine == "onnx" and not on_cpu:
        raise UserError(f"--engine onnx runs on the CPU (onnxruntime); with --device {device} use --engine torch "
                        "or auto")
    return engine


class QuadrupletGraph(nn.Module):
    """What the exported model computes: views -> (class probabilities, or scaled x/y for regression;
    EPSG:3766 x/y by the checkpoint's prediction rule, before refinement and `src.core.geo.snap_to_land`; the
    normalised fused embedding)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs, embedding = self.model.outputs_and_embedding(views)
        xy = self.model.outputs_to_xy(outputs).double()
        if self.model.hparams.approach == "regression":
            return outputs.float(), xy, embedding
        return self.model.class_logits(outputs).float().softmax(dim=1), xy, embedding


def output_names(approach: str) -> list[str]:
    return ["scaled_xy" if approach == "regression" else "probabilities", "xy", "embedding"]


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session over `path` using `threads` intra-op threads (default: all CPU cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(module: nn.Module, example: torch.Tensor, out: Path, input_name: str, outputs: list[str],
            key: str) -> None:
    """torch.onnx.export (TorchScript exporter) of `module` traced on `example`, with a dynamic batch axis,
    stamped with `key`, written to `out` (the caller makes it atomic)."""
    was_training, fastpath = module.training, torch.backends.mha.get_fastpath_enabled()
    buffer = io.BytesIO()
    try:
        # nn.MultiheadAttention's inference fast path is one fused operator that ONNX has no counterpart for
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings(), torch.no_grad():
            # the exporter's notes about itself; a TracerWarning (a Python branch on a traced value) still shows
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            torch.onnx.export(module.cpu().eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=[input_name], output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in [input_name, *outputs]})
    finally:
        module.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {KEY: key})
    onnx.save(proto, str(out))


def store_key(kind: str, weights: str, **graph) -> str:
    """The key of an export: what it is, a hash of the weights, whatever else changes its graph, and the
    opset, exporter, torch version and EXPORT_VERSION."""
    fields = [kind, f"weights={weights}", *(f"{name}={graph[name]!r}" for name in sorted(graph)),
              f"opset={OPSET}", f"exporter={EXPORTER}", f"torch={torch.__version__}", f"version={EXPORT_VERSION}"]
    return "|".join(fields)


def weights_hash(module: nn.Module) -> str:
    """A hash of a module's parameters and buffers, by name."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a lock file) across processes of this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stored_export(what: str, key: str, module: nn.Module, example: torch.Tensor, input_name: str,
                  outputs: list[str], check: Callable[[Path], None]) -> Path:
    """The store's file for `key`, exported now when missing (`check` raises when it disagrees with torch).

    Says `exporting the <what> to ONNX (once): N.N s` on stderr when it has exported. Under the lock, a second
    process waits and then finds the file; the temporary name holds host and pid, so even processes on
    different hosts sharing the folder never write the same file, and the rename is atomic."""
    path = onnx_store_dir() / f"{what.split()[-1]}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.onnx"
    if path.is_file():
        return path
    with _locked(path.with_suffix(".lock")):
        if path.is_file():  # another process exported it while this one waited
            return path
        start = time.perf_counter()
        with atomic_path(path) as tmp:  # a temporary name unique to host and process, renamed once checked
            _export(module, example, tmp, input_name, outputs, key)
            check(tmp)
        # through tqdm, so that a progress bar on stderr (the feature cache's) is not cut by the line
        tqdm.write(f"exporting the {what} to ONNX (once): {time.perf_counter() - start:.1f} s", file=sys.stderr)
        log.info("ONNX export %s: %s", path, key)
    return path


def checkpoint_key(checkpoint: str | Path, model, backbone_only: bool) -> str:
    """What `src.export` stamps in its file: the checkpoint and the store key of the same export."""
    return f"{Path(checkpoint).resolve()}|{model_key(model, backbone_only)}"


def model_key(model, backbone_only: bool = False) -> str:
    """The store key of a GeoModel's export (its backbone's with `backbone_only`)."""
    hp = model.hparams
    if backbone_only:
        return backbone_key(model.backbone, int(hp["image_size"]), input_preprocessing(hp))
    graph_hparams = sorted((k, repr(v)) for k, v in hp.items() if k not in REFINE_HPARAMS)  # refinement: after the graph
    return store_key("model", weights_hash(model), image_size=int(hp["image_size"]),
                     preprocessing=input_preprocessing(hp), hparams=graph_hparams)


def backbone_key(backbone: nn.Module, image_size: int, preprocessing: str = "") -> str:
    """The store key of a backbone's export at `image_size` for inputs prepared by `preprocessing`."""
    return store_key("backbone", weights_hash(backbone), image_size=int(image_size), preprocessing=preprocessing)


def input_preprocessing(hparams) -> str:
    """How a checkpoint's inputs are normalised (mean and std), as text for the store key."""
    return f"mean={tuple(hparams.get('image_mean', ()))} std={tuple(hparams.get('image_std', ()))}"


def stored_key(path: Path) -> str | None:
    """The key stamped in an exported file, or None when it is missing or unreadable."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file
        return None
    return {p.key: p.value for p in model.metadata_props}.get(KEY)


def example_views(model, batch: int = 2) -> torch.Tensor:
    """Deterministic normalised-looking input [batch, 4, 3, S, S] for tracing."""
    size = int(model.hparams.image_size)
    return torch.randn(batch, 4, 3, size, size, generator=torch.Generator().manual_seed(0))


def export_model(model, out: str | Path, backbone_only: bool = False, key: str = "") -> Path:
    """Export a GeoModel (or its backbone) to `out`, atomically; returns `out`."""
    out = Path(out)
    model = model.cpu().eval()
    views = example_views(model)
    with atomic_path(out) as tmp:
        if backbone_only:
            _export(model.backbone, views.flatten(0, 1), tmp, "images", ["features"], key)
        else:
            _export(QuadrupletGraph(model), views, tmp, "views", output_names(model.hparams.approach), key)
    return out


def compare_with_torch(model, path: str | Path, views: torch.Tensor, backbone_only: bool = False) -> dict[str, float]:
    """Run torch and ONNX Runtime on `views` [B, 4, 3, S, S]: the max abs difference of the features,
    probabilities or scaled x/y and, for the whole model, the largest distance in metres between the two
    predicted positions and the max abs difference of the embeddings."""
    model = model.cpu().eval()
    runtime = session(path)
    with torch.no_grad():
        if backbone_only:
            images = views.flatten(0, 1)
            expected = [model.backbone(images).numpy()]
            got = runtime.run(None, {"images": images.numpy()})
        else:
            expected = [t.numpy() for t in QuadrupletGraph(model)(views)]
            got = runtime.run(None, {"views": views.numpy()})
    # the first output: features, probabilities or scaled x/y (the x/y in metres is compared as a distance)
    result = {"max_abs_diff": float(np.abs(expected[0] - got[0]).max())}
    if not backbone_only:
        result["max_distance_m"] = float(np.hypot(*(expected[1] - got[1]).T).max())
        result["embedding_max_abs_diff"] = float(np.abs(expected[2] - got[2]).max())
    return result


class OnnxGeoModel:
    """ONNX Runtime in place of a GeoModel at predict time: the same `hparams`, `calibration`, `gallery` and
    `infer` (the temperature is applied to its probabilities outside the graph, `src.evaluation.calibration`;
    the retrieval search runs after it, `src.inference.retrieval`)."""

    def __init__(self, path: str | Path, hparams, threads: int | None = None, calibration=None, gallery=None):
        self.path = Path(path)
        self.hparams = hparams
        self.calibration = calibration
        self.gallery = gallery  # the GeoModel's retrieval gallery (src.inference.retrieval), or None
        self.session = session(path, threads)
        self.device = torch.device("cpu")

    def infer(self, views: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """[B, 4, 3, S, S] -> (class probabilities [B, C] or None for regression, the head's EPSG:3766 x/y
        [B, 2] float64, the normalised fused embedding [B, F] float32)."""
        outputs, xy, embedding = self.session.run(None, {"views": views.detach().cpu().float().contiguous().numpy()})
        return (outputs if self.hparams["approach"] != "regression" else None), xy, embedding


@torch.no_grad()
def infer(model, views: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(class probabilities or None, the head's EPSG:3766 x/y float64, the normalised fused embedding) of a
    GeoModel or an OnnxGeoModel; `src.inference.retrieval.refine` turns them into the refined point."""
    if isinstance(model, OnnxGeoModel):
        return model.infer(views)
    return fused_inference(model, model.fusion(model.view_features(views.to(model.device))))


def fused_inference(model, fused: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(class probabilities or None, the head's EPSG:3766 x/y float64, the normalised fused embedding) of a
    GeoModel's fused view features [B, F]."""
    outputs, embedding = model.head_outputs(fused), model.embedding(fused)
    xy = model.outputs_to_xy(outputs).double().cpu().numpy()
    embedding = embedding.cpu().numpy()
    if model.hparams.approach == "regression":
        return None, xy, embedding
    return model.class_logits(outputs).float().softmax(dim=1).cpu().numpy(), xy, embedding


def engine_model(model, checkpoint: str | Path, engine: str, threads: int | None = None):
    """`model` itself for the torch engine; for onnx an OnnxGeoModel over the store's export of `model`
    (exported and checked now when missing). `checkpoint` names the model in errors."""
    if engine == "torch":
        return model
    model = model.cpu().eval()

    def check(path: Path) -> None:
        result = compare_with_torch(model, path, example_views(model))
        distance, embedding = result["max_distance_m"], result["embedding_max_abs_diff"]
        if not (distance < 1.0 and embedding < FEATURES_RTOL):
            raise RuntimeError(f"ONNX export of {checkpoint} disagrees with torch by {distance:.3g} m "
                               f"(embedding by {embedding:.3g})")

    path = stored_export("model", model_key(model), QuadrupletGraph(model), example_views(model), "views",
                         output_names(model.hparams.approach), check)
    return OnnxGeoModel(path, model.hparams, threads, model.calibration, model.gallery)


def backbone_session(backbone: Backbone, image_size: int, preprocessing: str = "",
                     threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session computing `backbone`'s features, images [N, 3, S, S] -> features [N, D], over
    the store's export (exported and checked against torch now when missing). `preprocessing` describes how
    the images are prepared (e.g. repr of the transform); exports for different preprocessing are kept apart."""
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))

    def check(path: Path) -> None:
        was_training = backbone.training
        with torch.no_grad():
            expected = backbone.cpu().eval()(example).numpy()
        backbone.train(was_training)
        got = session(path, threads).run(None, {"images": example.numpy()})[0]
        if not np.allclose(got, expected, rtol=FEATURES_RTOL, atol=FEATURES_ATOL):
            raise RuntimeError(f"ONNX export of the backbone disagrees with torch by "
                               f"{np.abs(got - expected).max():.3g}")

    path = stored_export("backbone", backbone_key(backbone, image_size, preprocessing), backbone, example,
                         "images", ["features"], check)
    return session(path, threads)


class OnnxFeatureExtractor:
    """ONNX Runtime in place of a backbone's forward: images [N, 3, S, S] -> features [N, D] (torch).

    The session (`backbone_session`) is opened on the first call, so the backbone is exported only when
    features are computed, and once for every caller with the same weights, image size and preprocessing.
    """

    def __init__(self, backbone: Backbone, image_size: int, threads: int | None = None, preprocessing: str = ""):
        self.backbone = backbone
        self.image_size = image_size
        self.threads = threads
        self.preprocessing = preprocessing
        self.session: ort.InferenceSession | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            self.session = backbone_session(self.backbone, self.image_size, self.preprocessing, self.threads)
        return torch.from_numpy(self.session.run(None, {"images": images.detach().cpu().float().numpy()})[0])
