"""Inference on the CPU: ONNX Runtime vs eager torch, the one-time exports, and the server's micro-batching.

    python -m benchmarks.inference [--dataset-dir DIR] [--locations 40] [--image-size 224]

(a) feature extraction, 640 px JPEG files -> cached features (`FeatureCache.compute_missing`: draft-mode
    decoding in a DataLoader worker overlapping inference), ONNX Runtime vs eager torch with the same weights,
    for efficientnet_lite0 (ImageNet weights) and a torchvision ResNet (resnet50, random weights: the same
    compute; its ImageNet weights need a download). Goals: >= 5x and >= 2x.
(e) a training run with an empty feature cache (and empty export store and image-check cache), the whole
    `python -m src.train --approach classification --dataset-dirs DIR --epochs 3` command timed (the CPU
    defaults: efficientnet_lite0, --refine knn), default engine (ONNX Runtime fills the cache) vs
    `--engine torch`. Goal: >= 2x. The default run's best checkpoint is the model of (b), (c) and (d).
(b) predict latency for one location, warm: 4 JPEG files in, latitude/longitude out (decoding, the model, the
    refinement over the checkpoint's gallery, as the server does it; median of --repeats). Goal: < 100 ms
    with ONNX Runtime.
(c) `src.serve` throughput in locations/s: 16 concurrent clients vs one client at a time. Goal: >= 2x.
(d) the one-time ONNX export (TorchScript exporter in the calling process, checked against torch) of each
    backbone of (a) and of the whole trained classifier of (b). Goal: ~2-3 s for efficientnet_lite0.
Every pair is measured side by side in this run, in an empty export store of its own; the last line is the
ratios.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import aiohttp
import torch

from benchmarks import DEFAULT_DATASET
from src.core import geo
from src.data.features import FeatureCache
from src.data.images import VIEWS
from src.data.quadruplets import eval_transform, load_quadruplet
from src.inference.checkpoints import load_model
from src.inference.engine import OnnxFeatureExtractor, engine_model
from src.inference.predictor import member_outputs
from src.model.backbones import backbone_spec, create_backbone

ROOT = Path(__file__).resolve().parent.parent


def feature_seconds(backbone_name: str, pretrained: bool, image_dirs: list[str], image_size: int, batch_size: int,
                    workers: int) -> dict[str, float]:
    """Seconds to fill an empty feature cache for `image_dirs` with each engine (export time apart)."""
    torch.manual_seed(0)
    backbone = create_backbone(backbone_name, pretrained).eval()
    spec = backbone_spec(backbone_name)
    transform = eval_transform(image_size, spec.mean, spec.std)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("onnx", "torch"):
            cache = FeatureCache(Path(tmp) / engine, backbone_name, backbone, image_size, preprocessing=repr(transform))
            extract = None
            if engine == "onnx":
                extract = OnnxFeatureExtractor(backbone, image_size, preprocessing=repr(transform))
                start = time.perf_counter()
                extract(torch.zeros(1, 3, image_size, image_size))  # the one-time export, timed apart
                result["export"] = time.perf_counter() - start
            start = time.perf_counter()
            cache.compute_missing(image_dirs, backbone, transform, batch_size=batch_size, num_workers=workers,
                                  extract=extract)
            result[engine] = time.perf_counter() - start
    return result


def decode(folder: Path, image_size: int, mean, std) -> torch.Tensor:
    """A location's 4 JPEGs as the model's input [1, 4, 3, S, S], normalised with one torch thread (as src.serve
    does with ONNX Runtime: torch's intra-op threads only slow a 224 px normalisation down on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_quadruplet(folder, image_size, eval_transform(image_size, mean, std))[None]
    finally:
        torch.set_num_threads(threads)


def predict_one(model, folder: Path, image_size: int, mean, std) -> tuple[float, float]:
    """What serving one location costs: decode 4 JPEGs, run the model, refine the point, convert to degrees."""
    _, xy = member_outputs(model, decode(folder, image_size, mean, std))
    lat, lng = geo.unproject(xy[0, 0], xy[0, 1])
    return float(lat), float(lng)


def median_ms(function, repeats: int) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


async def throughput(url: str, bodies: list[dict[str, bytes]], clients: int, requests: int) -> float:
    """Locations/s with `clients` concurrent clients sending `requests` requests each."""

    async def client(session, i):
        for j in range(requests):
            form = aiohttp.FormData()
            for name, data in bodies[(i * requests + j) % len(bodies)].items():
                form.add_field(name, data, filename=f"{name}.jpg", content_type="image/jpeg")
            async with session.post(url + "/api/predict", data=form) as response:
                assert response.status == 200, await response.text()
                await response.read()

    async with aiohttp.ClientSession() as session:
        await client(session, 0)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(session, i) for i in range(clients)))
        return clients * requests / (time.perf_counter() - start)


def train_seconds(dataset_dir: Path, engine: str, epochs: int, work: Path) -> tuple[float, Path]:
    """Wall seconds of a whole `python -m src.train` command with an empty feature cache, export store and
    image-check cache, and its best checkpoint."""
    env = {**os.environ, "ONNX_CACHE_DIR": str(work / "onnx")}
    command = [sys.executable, "-m", "src.train", "--approach", "classification", "--dataset-dirs", str(dataset_dir),
               "--epochs", str(epochs), "--cache-dir", str(work / "features"), "--check-cache", str(work / "checks"),
               "--out-dir", str(work / "runs"), "--engine", engine]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"src.train --engine {engine} failed:\n{result.stderr[-3000:]}")
    return seconds, Path(result.stdout.strip().splitlines()[-1].removeprefix("checkpoint: "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET,
                        help=f"a LUMEN dataset dir with real 640 px photos (default: {DEFAULT_DATASET})")
    parser.add_argument("--locations", type=int, default=40, help="locations (x4 JPEGs) per feature run (default: 40)")
    parser.add_argument("--image-size", type=int, default=224, help="input size of (a) (default: 224)")
    parser.add_argument("--batch-size", type=int, default=16, help="locations per batch (default: 16)")
    parser.add_argument("--workers", type=int, default=1, help="JPEG-decoding DataLoader workers (default: 1)")
    parser.add_argument("--repeats", type=int, default=20, help="latency repeats (default: 20)")
    parser.add_argument("--train-epochs", type=int, default=3, help="epochs of the training runs of (e) (default: 3)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    store = tempfile.TemporaryDirectory()
    os.environ["ONNX_CACHE_DIR"] = store.name  # every export of this run is cold (and the checkout stays clean)
    from src.inference.predictor import locations_from_images

    folders = [folder for _, folder in locations_from_images(args.dataset_dir)]
    image_dirs = [str(f) for f in folders[:args.locations]]
    n_images = 4 * len(image_dirs)
    print(f"{len(image_dirs)} locations ({n_images} JPEGs) from {args.dataset_dir}, {args.image_size} px, "
          f"{torch.get_num_threads()} torch threads")

    ratios, exports = {}, {}
    for name, pretrained in (("efficientnet_lite0", True), ("resnet50", False)):
        seconds = feature_seconds(name, pretrained, image_dirs, args.image_size, args.batch_size, args.workers)
        ratios[f"features {name}"] = seconds["torch"] / seconds["onnx"]
        exports[f"{name} backbone"] = seconds["export"]
        print(f"(a) features {name}: torch {seconds['torch']:.2f} s ({n_images / seconds['torch']:.1f} images/s), "
              f"onnxruntime {seconds['onnx']:.2f} s ({n_images / seconds['onnx']:.1f} images/s); "
              f"one-time export {seconds['export']:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        cold = {engine: train_seconds(args.dataset_dir, engine, args.train_epochs, Path(tmp) / engine)
                for engine in ("auto", "torch")}
        ratios["cold-cache training run"] = cold["torch"][0] / cold["auto"][0]
        print(f"(e) src.train, {args.train_epochs} epochs, empty feature cache, whole command: default engine "
              f"(onnxruntime) {cold['auto'][0]:.1f} s, --engine torch {cold['torch'][0]:.1f} s")

        checkpoint = cold["auto"][1]
        model = load_model(checkpoint)
        hp = model.hparams
        size, spec = hp.image_size, backbone_spec(hp.backbone)
        start = time.perf_counter()
        onnx_model = engine_model(model, checkpoint, "onnx")
        exports[f"{hp.backbone} {hp.approach} model"] = time.perf_counter() - start
        one = partial(predict_one, folder=folders[0], image_size=size, mean=spec.mean, std=spec.std)
        torch_ms = median_ms(lambda: one(model), args.repeats)
        onnx_ms = median_ms(lambda: one(onnx_model), args.repeats)
        decode_ms = median_ms(lambda: decode(folders[0], size, spec.mean, spec.std), args.repeats)
        ratios["predict latency"] = torch_ms / onnx_ms
        print(f"(b) predict one location (4 JPEGs -> lat/lng, refine {hp.refine}, gallery of {len(model.gallery or [])})"
              f", median of {args.repeats}: torch {torch_ms:.1f} ms, onnxruntime {onnx_ms:.1f} ms (of which JPEG "
              f"decoding {decode_ms:.1f} ms)")

        server = subprocess.Popen([sys.executable, "-m", "src.serve", "--checkpoint", str(checkpoint), "--port", "0",
                                   "--max-batch", "16"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True)
        try:
            url = server.stdout.readline().split()[2]
            bodies = [{str(v): (f / f"{v}.jpg").read_bytes() for v in VIEWS} for f in folders[:16]]
            one_client = asyncio.run(throughput(url, bodies, clients=1, requests=32))
            many = asyncio.run(throughput(url, bodies, clients=16, requests=8))
        finally:
            server.terminate()
            server.wait(30)
    ratios["server 16 clients vs 1"] = many / one_client
    print(f"(c) src.serve (onnxruntime, --max-batch 16): one client at a time {one_client:.1f} locations/s, "
          f"16 concurrent clients {many:.1f} locations/s")
    print("(d) ONNX export, once per key (TorchScript exporter in process, checked against torch): "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in exports.items()))
    print("ratios: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))


if __name__ == "__main__":
    main()
