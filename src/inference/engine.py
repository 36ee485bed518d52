"""The inference engines: torch or ONNX Runtime (the CPU engine), and the ONNX export of a model or backbone.

An exported model maps `views` [B, 4, 3, S, S] (normalised, view order 0, 90, 180, 270) to `probabilities`
[B, C] (classification; `scaled_xy` [B, 2] for regression) and `xy` [B, 2], the predicted EPSG:3766 position
in metres (float64); `src.core.geo.unproject` turns it into latitude/longitude. A backbone export maps
`images` [N, 3, S, S] to `features` [N, D]. The batch axis is dynamic; the opset is `OPSET`. Exports are
checked against torch, made once and kept, stamped with a key that a stale file fails. `resolve_engine`
picks the engine for --engine {auto,torch,onnx}: auto means ONNX Runtime on the CPU and torch on a GPU.
"""

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from src.core.paths import ONNX_CACHE_DIR, ROOT
from src.model.backbones import Backbone
from src.core.errors import UserError
from src.core.files import atomic_path

log = logging.getLogger(__name__)

OPSET = 18
ENGINES = ("auto", "torch", "onnx")
KEY = "src.export.key"  # ONNX metadata entry holding what the file was exported from
FALLBACK_DIR = ONNX_CACHE_DIR  # used when a checkpoint's folder is read-only


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
    EPSG:3766 x/y by the checkpoint's prediction rule, before `src.geo.snap_to_land`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(views)
        xy = self.model.outputs_to_xy(outputs).double()
        if self.model.hparams.approach == "regression":
            return outputs.float(), xy
        return self.model.class_logits(outputs).float().softmax(dim=1), xy


def output_names(approach: str) -> list[str]:
    return ["scaled_xy" if approach == "regression" else "probabilities", "xy"]


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session over `path` using `threads` intra-op threads (default: all CPU cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(module: nn.Module, example: torch.Tensor, out: Path, input_name: str, outputs: list[str],
            key: str) -> None:
    """torch.onnx.export (dynamo) with a dynamic batch axis, stamped with `key`, written atomically.

    The export runs in a child Python process: torch.export leaves autograd state behind that breaks
    backward passes in any process forked later (https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork),
    and the caller may be a training run, or a harness that forks."""
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.pt"
        torch.save({"module": module.cpu().eval(), "example": example, "out": str(out), "input_name": input_name,
                    "outputs": outputs, "key": key}, job)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        run = subprocess.run([sys.executable, "-c", f"from src.inference.engine import export_job; export_job({str(job)!r})"],
                             env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ONNX export to {out} failed: {run.stderr.strip()[-2000:]}")


def export_job(job: str) -> None:
    """The child process of `_export`: read the job file, export."""
    _export_here(**torch.load(job, map_location="cpu", weights_only=False))


def _export_here(module: nn.Module, example: torch.Tensor, out: str, input_name: str, outputs: list[str],
                 key: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=[input_name], output_names=outputs,
                                    dynamic_shapes=({0: batch},), external_data=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {KEY: key})
    with atomic_path(out) as tmp:
        onnx.save(proto, tmp)


def checkpoint_key(checkpoint: str | Path, model, backbone_only: bool) -> str:
    """What an export of `checkpoint` depends on: the file (path, size, mtime), centroids, topk, prediction
    rule, opset."""
    path = Path(checkpoint).resolve()
    stat = path.stat()
    hp = model.hparams
    return (f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{hp.get('centroids')}|{hp.get('topk')}"
            f"|{hp.get('predict_rule', 'mean')}|opset{OPSET}"
            f"|{'backbone' if backbone_only else 'model'}")


def stored_key(path: Path) -> str | None:
    """The key stamped in an exported file, or None when it is missing or unreadable."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file is simply re-exported
        return None
    return {p.key: p.value for p in model.metadata_props}.get(KEY)


def example_views(model, batch: int = 2) -> torch.Tensor:
    """Deterministic normalised-looking input [batch, 4, 3, S, S] for tracing."""
    size = int(model.hparams.image_size)
    return torch.randn(batch, 4, 3, size, size, generator=torch.Generator().manual_seed(0))


def export_model(model, out: str | Path, backbone_only: bool = False, key: str = "") -> Path:
    """Export a GeoModel (or its backbone) to `out`; returns `out`."""
    out = Path(out)
    model = model.cpu().eval()
    views = example_views(model)
    if backbone_only:
        _export(model.backbone, views.flatten(0, 1), out, "images", ["features"], key)
    else:
        _export(QuadrupletGraph(model), views, out, "views", output_names(model.hparams.approach), key)
    return out


def compare_with_torch(model, path: str | Path, views: torch.Tensor, backbone_only: bool = False) -> dict[str, float]:
    """Run torch and ONNX Runtime on `views` [B, 4, 3, S, S]: the max abs difference of the features,
    probabilities or scaled x/y and, for the whole model, the largest distance in metres between the two
    predicted positions."""
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
    return result


class OnnxGeoModel:
    """ONNX Runtime in place of a GeoModel at predict time: the same `hparams`, `locate` and `infer`."""

    def __init__(self, path: str | Path, hparams, threads: int | None = None):
        self.path = Path(path)
        self.hparams = hparams
        self.session = session(path, threads)
        self.device = torch.device("cpu")

    def infer(self, views: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray]:
        """[B, 4, 3, S, S] -> (class probabilities [B, C] or None for regression, EPSG:3766 x/y [B, 2] float64)."""
        outputs, xy = self.session.run(None, {"views": views.detach().cpu().float().contiguous().numpy()})
        return (outputs if self.hparams["approach"] != "regression" else None), xy

    def locate(self, views: torch.Tensor) -> torch.Tensor:
        """[B, 4, 3, S, S] -> EPSG:3766 x/y [B, 2] (torch float64), like GeoModel.locate."""
        return torch.from_numpy(self.infer(views)[1])


@torch.no_grad()
def infer(model, views: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray]:
    """(class probabilities or None, EPSG:3766 x/y float64) of a GeoModel or an OnnxGeoModel."""
    if isinstance(model, OnnxGeoModel):
        return model.infer(views)
    outputs = model(views.to(model.device))
    xy = model.outputs_to_xy(outputs).double().cpu().numpy()
    if model.hparams.approach == "regression":
        return None, xy
    return model.class_logits(outputs).float().softmax(dim=1).cpu().numpy(), xy


def cached_export_path(checkpoint: str | Path) -> Path:
    """Where the engine keeps the export of `checkpoint`: beside it, or under data/cache/onnx when that
    folder is read-only."""
    checkpoint = Path(checkpoint).resolve()
    beside = checkpoint.with_name(checkpoint.name + ".onnx")
    if os.access(checkpoint.parent, os.W_OK):
        return beside
    digest = hashlib.sha1(str(checkpoint).encode()).hexdigest()[:16]
    return FALLBACK_DIR / f"{checkpoint.stem}-{digest}.onnx"


def engine_model(model, checkpoint: str | Path, engine: str, threads: int | None = None):
    """`model` itself for the torch engine; for onnx an OnnxGeoModel over the cached export of
    `checkpoint` (exported and checked now when missing or stale)."""
    if engine == "torch":
        return model
    path = cached_export_path(checkpoint)
    key = checkpoint_key(checkpoint, model, backbone_only=False)
    if stored_key(path) != key:
        log.info("exporting %s to %s (ONNX opset %d)", checkpoint, path, OPSET)
        export_model(model, path, key=key)
        check = compare_with_torch(model, path, example_views(model))
        if not check["max_distance_m"] < 1.0:
            path.unlink(missing_ok=True)
            raise RuntimeError(f"ONNX export of {checkpoint} disagrees with torch by {check['max_distance_m']:.3g} m")
    return OnnxGeoModel(path, model.hparams, threads)


class OnnxFeatureExtractor:
    """ONNX Runtime in place of a backbone's forward: images [N, 3, S, S] -> features [N, D] (torch).

    The backbone is exported to `path` on the first call (not when nothing needs computing), once: the file
    is stamped with the weights' fingerprint, the image size and the opset, and reused while they match.
    `path` normally lies in the feature cache's folder, which is keyed the same way.
    """

    def __init__(self, backbone: Backbone, image_size: int, path: str | Path, threads: int | None = None):
        self.backbone = backbone
        self.image_size = image_size
        self.path = Path(path)
        self.threads = threads
        self.session: ort.InferenceSession | None = None

    def _open(self) -> ort.InferenceSession:
        key = f"backbone|{self.backbone.fingerprint()}|{self.image_size}px|opset{OPSET}"
        if stored_key(self.path) != key:
            size = self.image_size
            example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            log.info("exporting the backbone to %s (ONNX opset %d)", self.path, OPSET)
            was_training = self.backbone.training
            try:
                _export(self.backbone.cpu().eval(), example, self.path, "images", ["features"], key)
            finally:
                self.backbone.train(was_training)
        return session(self.path, self.threads)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            self.session = self._open()
        return torch.from_numpy(self.session.run(None, {"images": images.detach().cpu().float().numpy()})[0])
