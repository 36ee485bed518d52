"""Image download throughput: src.download's sliding window vs batches gathered with asyncio.gather.

    python -m benchmarks.download [--images 2000] [--concurrency 16] [--slow-share 0.05]

The Street View emulator (src/collect/emulator.py) answers most requests in about 20 ms and a few
(--slow-share) in about 400 ms; each (pano, heading) gets the same latency in both runs. Both methods use
the same StreetViewClient (one aiohttp session, no QPS cap) and write every image to disk atomically.
The reference method (the 22 km solution's downloader) sends --concurrency requests, gathers them and
waits for the slowest before sending the next batch; src.download keeps --concurrency in flight at all times.
"""

import argparse
import asyncio
import hashlib
import tempfile
import time
from pathlib import Path

import aiohttp

from src.collect.streetview import Counters, Settings, StreetViewClient, run_pool
from src.core.files import atomic_path
from src.data.images import VIEWS
from src.collect.emulator import StreetViewEmulator, running

KEY = "benchmark-key"


def heavy_tailed(slow_share: float):
    """Latency per request: ~400 ms for a fixed `slow_share` of (pano, heading) pairs, else ~20 ms."""
    def latency(request) -> float:
        digest = hashlib.blake2b(request.query_string.split("&key=")[0].encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2**64
        return 0.4 + 0.02 * u if u < slow_share else 0.015 + 0.01 * u
    return latency


async def download(url: str, jobs: list, out: Path, concurrency: int, method: str) -> float:
    """Seconds to fetch and save every (pano, heading) of `jobs` with `method` (window or gather)."""
    settings = Settings(api_url=url, key=KEY, qps=0, concurrency=concurrency, timeout=30)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), connector=connector) as session:
        client = StreetViewClient(session, settings, Counters())

        async def fetch(job) -> None:
            pano, view = job
            body = await client.image(pano, view)
            with atomic_path(out / method / pano / f"{view}.jpg") as tmp:
                tmp.write_bytes(body)

        started = time.perf_counter()
        if method == "window":
            await run_pool(jobs, fetch, concurrency)
        else:
            for start in range(0, len(jobs), concurrency):
                await asyncio.gather(*(fetch(job) for job in jobs[start:start + concurrency]))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.download", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images to download per method (default: 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight / batch size (default: 16)")
    parser.add_argument("--slow-share", type=float, default=0.05, help="share of ~400 ms answers (default: 0.05)")
    args = parser.parse_args()
    panoramas = [(f"pano{i}", 45.0 + i * 1e-4, 16.0) for i in range(args.images // len(VIEWS))]
    jobs = [(pano, view) for pano, _, _ in panoramas for view in VIEWS]
    emulator = StreetViewEmulator(panoramas, key=KEY, latency=heavy_tailed(args.slow_share))
    rates = {}
    with running(emulator) as url, tempfile.TemporaryDirectory() as out:
        for method in ("gather", "window"):
            seconds = asyncio.run(download(url, jobs, Path(out), args.concurrency, method))
            rates[method] = len(jobs) / seconds
            print(f"{method:>6}: {len(jobs)} images in {seconds:.2f} s = {rates[method]:.0f} images/s "
                  f"(max in flight seen by the server: {emulator.stats.max_in_flight})")
            emulator.stats.max_in_flight = 0
    print(f"sliding window (src.download) vs batches of {args.concurrency} with asyncio.gather: "
          f"{rates['window'] / rates['gather']:.2f}x")


if __name__ == "__main__":
    main()
