"""A local inference server with a web page: upload the four views of a location, get its coordinates.

    python -m src.serve --checkpoint CKPT [--checkpoint CKPT2 ...] [--host 127.0.0.1] [--port 8080]

Endpoints (aiohttp.web):
  GET  /                 the web page (offline: no CDN): four photos in, a map of Croatia out
  POST /api/predict      multipart fields 0, 90, 180, 270 (?model=NAME picks a checkpoint) -> JSON
  GET  /api/models       the loaded checkpoints (name, approach, backbone, classes, image size, engine)
  GET  /api/health       status and counters (requests, batches, locations)
  GET  /api/border       Croatia's border (GeoJSON) for the map
  GET  /api/examples     generated demo locations (src.demo) for the page's "try an example" button

A missing view is replaced by a view of the same location as `src.predict` does (neighbours first, then
the opposite view) and the answer lists it. Concurrent requests are micro-batched: the first waits up to
--batch-wait-ms for others, then up to --max-batch locations run as one batch in a worker thread, so the
event loop stays responsive. Every bad request gets a 4xx JSON {"error": ...}. SIGINT/SIGTERM stop the
server gracefully (in-flight requests finish, within --shutdown-timeout seconds).
"""

import argparse
import asyncio
import logging
from pathlib import Path

import torch

from src.core.errors import UserError, run_cli
from src.inference.engine import ENGINES, resolve_engine
from src.inference.predictor import check_device
from src.app.server import build_app, check_address, demo_examples, load_models, serve



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.serve",
                                     description="Serve checkpoints over HTTP with a web page (aiohttp).")
    parser.add_argument("--checkpoint", type=Path, nargs="+", action="extend",
                        help="checkpoint(s) to serve; the first is the default model, ?model=NAME picks another "
                             "(default: the newest *best*.ckpt under reports/)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port, 0 for any free one (default: 8080)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="most locations run as one batch (default: 32)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long the first request of a batch waits for others (default: 5.0)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0,
                        help="largest request body in MB; larger uploads get 413 (default: 20.0)")
    parser.add_argument("--top", type=int, default=5, help="most likely cells in each answer (default: 5)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="torch or ONNX Runtime; auto: onnx on the CPU, torch on a GPU (default: auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads, 0 for all CPU cores (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device for --engine torch (default: cpu)")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="seconds in-flight requests get after SIGINT/SIGTERM (default: 5.0)")
    parser.add_argument("--reports-dir", type=Path, default=None,
                        help="where to look for the newest best checkpoint (default: reports/)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def main(argv: list[str] | None = None) -> None:
    from src.inference.checkpoints import REPORTS_DIR, find_checkpoint

    args = build_parser().parse_args(argv)
    checks = [("port", 0 <= args.port <= 65535, "a TCP port from 0 to 65535"),
              ("max_batch", args.max_batch >= 1, "1 or more locations"),
              ("batch_wait_ms", 0 <= args.batch_wait_ms <= 1000, "0 to 1000 milliseconds"),
              ("max_upload_mb", 0 < args.max_upload_mb <= 1024, "a size in MB above 0, at most 1024"),
              ("top", args.top >= 0, "0 or more cells"), ("threads", args.threads >= 0, "0 (all cores) or more"),
              ("shutdown_timeout", args.shutdown_timeout >= 0, "0 or more seconds")]
    for key, ok, expected in checks:
        if not ok:
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be {expected}")
    check_device(args.device)
    engine = resolve_engine(args.engine, args.device)
    if engine == "onnx":  # torch only normalises uploads here: its thread pool would fight ONNX Runtime's
        torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    check_address(args.host, args.port)
    checkpoints = args.checkpoint or [find_checkpoint(args.reports_dir or REPORTS_DIR)]
    served = load_models(checkpoints, engine, args.device, args.threads or None, args.reports_dir or REPORTS_DIR)
    app = build_app(served, args.max_batch, args.batch_wait_ms, args.max_upload_mb, args.top, demo_examples())
    asyncio.run(serve(app, args.host, args.port, args.shutdown_timeout))


if __name__ == "__main__":
    run_cli(main)
