"""Server latency of one location with and without the retrieval refinement, and the refinement's own cost as
the gallery grows.

    python -m benchmarks.refine_latency [--dataset-dir DIR] [--checkpoint CKPT] [--requests 40] [--rounds 3]

(a) `src.serve` (ONNX Runtime, the defaults) on a `--refine knn` checkpoint of efficientnet_lite0 at 224 px
    (trained here for 3 epochs on the dataset dir's cached features unless --checkpoint names one), started with
    `--refine none` and with `--refine knn` in alternation, `--rounds` times each; one client posts the four views
    of a real location `--requests` times, one request at a time; the p50 and p90 of the round trips per side.
(b) `refine_points` alone for one location against galleries of 100, 2,000 and 20,000 random unit embeddings of
    the checkpoint's width, the most likely classes holding a few percent of them (median of 50 calls).
The last line is the p50 ratio knn / none.
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks import DEFAULT_DATASET
from src.data.images import VIEWS
from src.inference.checkpoints import load_model
from src.inference.predictor import locations_from_images
from src.inference.retrieval import Gallery, refine_points

ROOT = Path(__file__).resolve().parent.parent


def train(dataset: Path, work: Path) -> Path:
    """A 3-epoch `--refine knn` run of the CPU defaults; its best checkpoint."""
    command = [sys.executable, "-m", "src.train", "--approach", "classification", "--dataset-dirs", str(dataset),
               "--epochs", "3", "--refine", "knn", "--out-dir", str(work / "runs"), "--cache-dir", str(work / "cache")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"src.train failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1].removeprefix("checkpoint: "))


async def round_trips(url: str, files: dict[str, bytes], requests: int) -> list[float]:
    """Seconds of each of `requests` posts of one location, one at a time (after two not timed)."""
    times = []
    async with aiohttp.ClientSession() as session:
        for i in range(requests + 2):
            form = aiohttp.FormData()
            for name, data in files.items():
                form.add_field(name, data, filename=f"{name}.jpg", content_type="image/jpeg")
            start = time.perf_counter()
            async with session.post(url + "/api/predict", data=form) as response:
                assert response.status == 200, await response.text()
                await response.read()
            if i >= 2:
                times.append(time.perf_counter() - start)
    return times


def serve_times(checkpoint: Path, refine: str, files: dict[str, bytes], requests: int) -> list[float]:
    server = subprocess.Popen([sys.executable, "-m", "src.serve", "--checkpoint", str(checkpoint), "--port", "0",
                               "--refine", refine], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        url = server.stdout.readline().split()[2]
        return asyncio.run(round_trips(url, files, requests))
    finally:
        server.terminate()
        server.wait(30)


def refine_ms(width: int, size: int, rng: np.random.Generator) -> float:
    """Median ms of `refine_points` for one location against a random gallery of `size` rows in 30 classes."""
    embeddings = rng.normal(size=(size, width)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = rng.integers(0, 30, size)
    gallery = Gallery(embeddings, rng.uniform(0, 3e5, (size, 2)), labels, [str(i) for i in range(size)])
    probabilities = rng.dirichlet(np.full(30, 0.1), 1)
    query = embeddings[:1] + 0.1 * rng.normal(size=(1, width)).astype(np.float32)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        refine_points(gallery, np.zeros((1, 2)), query, probabilities, 10, 0.8)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refine_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET, help="a LUMEN dataset dir")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a --refine knn checkpoint (default: train one)")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per server start (default: 40)")
    parser.add_argument("--rounds", type=int, default=3, help="server starts per side, alternating (default: 3)")
    args = parser.parse_args()
    folder = locations_from_images(args.dataset_dir)[0][1]
    files = {str(v): (folder / f"{v}.jpg").read_bytes() for v in VIEWS}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or train(args.dataset_dir, Path(tmp))
        gallery = load_model(checkpoint, refine="knn").gallery
        times = {"none": [], "knn": []}
        for _ in range(args.rounds):
            for refine in times:
                times[refine] += serve_times(checkpoint, refine, files, args.requests)
    p50 = {}
    for refine, seconds in times.items():
        p50[refine], p90 = (1000 * np.percentile(seconds, q) for q in (50, 90))
        print(f"(a) src.serve --refine {refine}: one location at a time, {len(seconds)} requests: p50 "
              f"{p50[refine]:.1f} ms, p90 {p90:.1f} ms (gallery of {len(gallery)} locations)")
    rng = np.random.default_rng(0)
    width = gallery.embeddings.shape[1]
    costs = ", ".join(f"{size:,} rows {refine_ms(width, size, rng):.2f} ms" for size in (100, 2_000, 20_000))
    print(f"(b) refine_points for one location, {width}-d embeddings, k 10, gate 0.8: {costs}")
    print(f"ratio of the p50s, knn / none: {p50['knn'] / p50['none']:.2f}x")


if __name__ == "__main__":
    main()
