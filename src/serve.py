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
import sys
from pathlib import Path

from src.core.errors import UserError, run_cli
from src.core.flags import (REFINE_RULES, Rule, add_refine_arguments, at_least, check_ranges, non_negative_finite,
                            positive_finite)

# the library (torch, ONNX Runtime, geopandas) is imported in main(), after parsing: --help and flag errors are fast


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.serve",
                                     description="Serve checkpoints over HTTP with a web page (aiohttp).")
    parser.add_argument("--checkpoint", type=Path, nargs="+", action="extend",
                        help="checkpoint(s) to serve; the first is the default model, ?model=NAME picks another "
                             "(default: the newest *best*.ckpt under reports/)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on; any other than loopback needs --token or --no-auth "
                             "(default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port, 0 for any free one (default: 8080)")
    parser.add_argument("--token", default=None,
                        help="require this token on every /api/* request (header Authorization: Bearer TOKEN; "
                             "the page: open /?token=TOKEN once); never printed or logged")
    parser.add_argument("--no-auth", action="store_true",
                        help="listen beyond loopback without a token (a trusted network only)")
    parser.add_argument("--allowed-hosts", nargs="+", action="extend", metavar="NAME",
                        help="Host names to answer besides the loopback ones and --host, e.g. the name a reverse "
                             "proxy or the LAN uses (others get 400: DNS rebinding)")
    parser.add_argument("--cors-origin", nargs="+", action="extend", metavar="ORIGIN",
                        help="web page origins (https://example.org) allowed to POST to the API from a browser; "
                             "other cross-origin POSTs get 403")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="most locations run as one batch (default: 32)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long the first request of a batch waits for others (default: 5.0)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0,
                        help="largest request body in MB; larger uploads get 413 (default: 20.0)")
    parser.add_argument("--max-megapixels", type=float, default=16.0,
                        help="largest view in megapixels, read from the image header before decoding; larger "
                             "views get 413 (default: 16.0)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a client has to send a request's headers (and an idle connection is kept) "
                             "(default: 10.0)")
    parser.add_argument("--body-timeout", type=float, default=60.0,
                        help="seconds a client has to send an upload's body; slower uploads get 408 and are "
                             "disconnected (default: 60.0)")
    parser.add_argument("--top", type=int, default=5, help="most likely cells in each answer (default: 5)")
    add_refine_arguments(parser)
    parser.add_argument("--engine", default="auto", metavar="{auto,torch,onnx}",
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


RULES = [Rule("port", lambda v: 0 <= v <= 65535, "a TCP port from 0 to 65535"),
         Rule("max_batch", at_least(1), "1 or more locations"),
         Rule("batch_wait_ms", lambda v: 0 <= v <= 1000, "0 to 1000 milliseconds"),
         Rule("max_upload_mb", lambda v: 0 < v <= 1024, "a size in MB above 0, at most 1024"),
         Rule("max_megapixels", lambda v: 0 < v <= 1000, "above 0, at most 1000 megapixels"),
         Rule("header_timeout", positive_finite, "more than 0 seconds"),
         Rule("body_timeout", positive_finite, "more than 0 seconds"),
         Rule("top", at_least(0), "0 or more cells"), Rule("threads", at_least(0), "0 (all cores) or more"),
         Rule("shutdown_timeout", non_negative_finite, "0 or more seconds"), *REFINE_RULES]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_ranges(args, RULES)
    if args.token is not None and (not args.token.strip() or args.no_auth):
        raise UserError("--token: must be a non-empty token, and not given with --no-auth")

    import torch

    from src.app.server import (Access, Limits, build_app, check_address, demo_examples, host_names, is_loopback,
                                load_models, serve)
    from src.inference.checkpoints import REPORTS_DIR, find_checkpoint
    from src.inference.engine import resolve_engine
    from src.inference.predictor import check_device

    if is_loopback(args.host) is False:
        if args.token is None and not args.no_auth:
            raise UserError(f"--host {args.host} makes the server reachable from other machines: add --token TOKEN "
                            "(clients send Authorization: Bearer TOKEN) or, on a trusted network, --no-auth")
        print(f"warning: --host {args.host}: other machines can reach this server, "
              f"{'with the token on /api/*' if args.token else 'WITHOUT authentication (--no-auth)'}; "
              "put a reverse proxy with TLS in front of it beyond a trusted network", file=sys.stderr, flush=True)
    check_device(args.device)
    engine = resolve_engine(args.engine, args.device)
    if engine == "onnx":  # torch only normalises uploads here: its thread pool would fight ONNX Runtime's
        torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    check_address(args.host, args.port)
    reports_dir = args.reports_dir or REPORTS_DIR
    checkpoints = args.checkpoint or [find_checkpoint(reports_dir)]
    if not args.checkpoint:  # which run is served when none was named: the first line
        print(f"checkpoint {checkpoints[0]} (the newest run under {reports_dir}; choose another with --checkpoint)",
              file=sys.stderr, flush=True)
    refine = {"refine": args.refine, "refine_k": args.refine_k, "refine_gate": args.refine_gate}
    served = load_models(checkpoints, engine, args.device, args.threads or None, reports_dir, refine)  # "model NAME: ..."
    limits = Limits(args.max_upload_mb, int(args.max_megapixels * 1e6), args.body_timeout)
    access = Access(args.token, host_names(args.host, args.allowed_hosts), frozenset(args.cors_origin or []))
    app = build_app(served, args.max_batch, args.batch_wait_ms, args.top, demo_examples(), limits, access)
    asyncio.run(serve(app, args.host, args.port, args.shutdown_timeout, args.header_timeout))


if __name__ == "__main__":
    run_cli(main)
