"""The inference server: an aiohttp application over loaded checkpoints, with the web page (src/app/web).

Its endpoints (GET /, POST /api/predict, GET /api/models, /api/health, /api/border, /api/examples) are
described in docs/serve.md; `python -m src.serve` starts it. A missing view is replaced as predict replaces
it (`src.data.quadruplets`); concurrent requests are micro-batched (`MicroBatcher`) in a worker thread so the
event loop stays responsive; every bad request gets a 4xx JSON {"error": ...}, aiohttp's own HTTP parser
errors included.

Hostile input: views are checked from their header before any pixel is decoded (JPEG, PNG or WebP only, a
pixel cap, `src.data.images.check_image`), then decoded strictly in bounded pools (requests with large views in
a lane of their own, so they cannot hold up the others); slow clients are cut off (header and body read
timeouts); only loopback Host names (or --allowed-hosts) are answered, cross-origin POSTs are refused unless
--cors-origin allows them, and /api/* can require a token (Authorization: Bearer TOKEN, or a cookie that
GET /?token=TOKEN sets for the page).
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pandas as pd
import torch
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from PIL import Image

from src.core import geo
from src.data.quadruplets import eval_transform, input_spec, read_quadruplet
from src.core.errors import UserError, brief
from src.evaluation.calibration import UNCALIBRATED_NOTE, member, prediction_details
from src.inference.engine import engine_model
from src.inference.predictor import member_outputs
from src.inference.retrieval import refinement
from src.data.images import TOO_MANY_PIXELS, VIEWS, check_image, decode_checked, image_header
from src.inference.checkpoints import load_model

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent / "web"
FIELDS = {str(view): i for i, view in enumerate(VIEWS)}
MB = 1024 * 1024
SERVER_NAME = "src.serve"  # the Server header: no library or Python version
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
LARGE_REQUEST_PIXELS = 4_000_000  # four 640x640 Street View views are 1.6 M: larger requests decode in their own lane
LARGE_QUEUE = 4  # large requests waiting or decoding at once; more get 503
LARGE_NICENESS = 10  # the large-view worker's priority (0 normal, 19 lowest): about a tenth of a normal one's CPU
LARGE_TASKS_PER_WORKER = 32  # views a large-view worker decodes before a fresh one replaces it
LINGERING_S = 2.0  # how long an unread request body is drained after the answer before the connection closes
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; connect-src 'self' data:; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
SESSION_COOKIE = "serve_session"


@dataclass
class Counters:
    requests: int = 0
    predictions: int = 0
    batches: int = 0
    locations: int = 0
    largest_batch: int = 0


class MicroBatcher:
    """Collects single-location requests for a few milliseconds and runs them as one batch in `executor`."""

    def __init__(self, model, max_batch: int, wait_s: float, executor: ThreadPoolExecutor, counters: Counters):
        self.model = model
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.executor = executor
        self.counters = counters
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def predict(self, views: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray]:
        """(class probabilities [C] or None, EPSG:3766 x/y [2]) of one quadruplet [4, 3, S, S]."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((views, future))
        return await future

    async def _collect(self) -> list:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [(views, future) for views, future in batch if not future.cancelled()]  # clients gone
            if not batch:
                continue
            try:
                views = torch.stack([views for views, _ in batch])
                # the model and the refinement (numpy) in the inference thread, off the event loop
                probabilities, xy = await loop.run_in_executor(self.executor, member_outputs, self.model, views)
            except Exception as error:  # reported to each waiting request as a server error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.counters.batches += 1
            self.counters.locations += len(batch)
            self.counters.largest_batch = max(self.counters.largest_batch, len(batch))
            for i, (_, future) in enumerate(batch):
                if not future.done():
                    future.set_result((None if probabilities is None else probabilities[i], xy[i]))


@dataclass
class ServedModel:
    """A loaded checkpoint: the model (torch or ONNX Runtime), its description and its class cells."""

    name: str
    checkpoint: Path
    model: object
    engine: str
    batcher: MicroBatcher | None = None
    cell_lat: np.ndarray = field(default_factory=lambda: np.empty(0))  # class centroids (the model's kind)
    cell_lng: np.ndarray = field(default_factory=lambda: np.empty(0))
    cell_bounds: list | None = None  # [west, south, east, north] of each class's grid cell
    class_of_cell: dict[int, int] = field(default_factory=dict)  # cell id -> class index
    shown_path: str = ""  # the checkpoint as /api/models names it: relative to the reports folder, else its file name

    @property
    def hparams(self):
        return self.model.hparams

    def describe(self) -> dict:
        hp = self.hparams
        return {"name": self.name, "checkpoint": self.shown_path, "approach": hp["approach"],
                "backbone": hp["backbone"], "image_size": int(hp["image_size"]),
                "classes": len(hp["classes"]["cell"]) if hp["approach"] != "regression" else 0,
                "centroids": hp.get("centroids"), "engine": self.engine,
                "refine": hp.get("refine", "none") if getattr(self.model, "gallery", None) is not None else "none"}


def model_name(checkpoint: Path, taken: set[str]) -> str:
    """A short unique name: <run>/<version> for reports/<run>/<version>/checkpoints/*.ckpt, else the file stem."""
    parts = checkpoint.resolve().parts
    name = f"{parts[-4]}/{parts[-3]}" if len(parts) >= 4 and parts[-2] == "checkpoints" else checkpoint.stem
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}#{n}", n + 1
    return unique


def shown_path(checkpoint: Path, reports_dir: Path | None) -> str:
    """`checkpoint` relative to the reports folder when it lies there, else its file name (no absolute paths)."""
    resolved = checkpoint.resolve()
    if reports_dir is not None and resolved.is_relative_to(Path(reports_dir).resolve()):
        return resolved.relative_to(Path(reports_dir).resolve()).as_posix()
    return checkpoint.name


def class_cells(hparams) -> tuple[np.ndarray, np.ndarray, list | None]:
    """Latitude/longitude of each class's centroid and its grid square's bounds (None for cells that are not
    squares of a grid, e.g. adaptive cells, whose polygons the checkpoint alone cannot rebuild)."""
    classes = hparams["classes"]
    xy = np.asarray(classes[hparams.get("centroids", "weighted")], float)
    lat, lng = geo.unproject(xy[:, 0], xy[:, 1])
    if hparams.get("cells", "grid") != "grid":
        return np.atleast_1d(lat), np.atleast_1d(lng), None
    try:
        from src.data.cells import build_grid

        grid = build_grid(float(hparams.get("spacing", 0.5)), bool(hparams.get("mainland_only", False)))
        bounds = grid.cells.geometry.bounds.loc[classes["cell"]].round(6).to_numpy().tolist()
    except Exception as error:  # a checkpoint whose cells no longer match the grid: no squares on the map
        log.warning("cell squares unavailable for the map: %s", brief(error))
        bounds = None
    return np.atleast_1d(lat), np.atleast_1d(lng), bounds


def load_models(checkpoints: list[Path], engine: str, device: str, threads: int | None,
                reports_dir: Path | None = None, refine_overrides: dict | None = None) -> dict[str, ServedModel]:
    """The checkpoints loaded for `engine`; `refine_overrides` (refine, refine_k, refine_gate: None for as
    trained) change how each refines its points."""
    models: dict[str, ServedModel] = {}
    for path in checkpoints:
        loaded = load_model(path, device, reports_dir=reports_dir, **(refine_overrides or {}))
        model = engine_model(loaded, path, engine, threads)
        served = ServedModel(model_name(path, set(models)), Path(path), model, engine,
                             shown_path=shown_path(Path(path), reports_dir))
        if model.hparams["approach"] != "regression":  # classification and hybrid: class probabilities
            served.cell_lat, served.cell_lng, served.cell_bounds = class_cells(model.hparams)
            served.class_of_cell = {int(cell): k for k, cell in enumerate(model.hparams["classes"]["cell"])}
        models[served.name] = served
        hp = model.hparams
        print(f"model {served.name}: {hp['approach']} {hp['backbone']} {hp['image_size']} px{refinement(model)}, "
              f"engine {engine} ({path})", file=sys.stderr, flush=True)
    return models


# ---- requests -------------------------------------------------------------------------------------------

class RequestError(Exception):
    """A bad request: answered with `status`, {"error": message} and `headers`."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    """What one request may cost: its body's size and sending time, and the pixels of each view."""

    max_upload_mb: float = 20.0
    max_pixels: int = 16_000_000
    body_timeout_s: float = 60.0


@dataclass(frozen=True)
class Access:
    """Who may use the server: the Host names it answers to, the origins allowed to POST, the /api/* token."""

    token: str | None = None
    allowed_hosts: frozenset[str] = LOOPBACK_NAMES
    cors_origins: frozenset[str] = frozenset()

    def session(self) -> str:
        """The page's cookie value: derived from the token, so browsers never store the token itself."""
        return hmac.new(self.token.encode(), b"src.serve session", hashlib.sha256).hexdigest()

    def authorized(self, request: web.Request) -> bool:
        """The request carries the token (Authorization: Bearer) or the page's cookie; constant-time compares."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(encoded(value.strip()), encoded(self.token)):
            return True
        return hmac.compare_digest(encoded(request.cookies.get(SESSION_COOKIE, "")), encoded(self.session()))


def encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # aiohttp keeps undecodable header bytes as surrogates


def host_names(bind_host: str, allowed_hosts: list[str] | None = None) -> frozenset[str]:
    """The Host names to answer: loopback names, the address listened on (unless a wildcard), `allowed_hosts`."""
    names = set(LOOPBACK_NAMES) | {name.strip().strip("[]").lower() for name in allowed_hosts or []}
    if bind_host not in ("", "0.0.0.0", "::"):
        names.add(bind_host.strip("[]").lower())
    return frozenset(names)


def is_loopback(host: str) -> bool | None:
    """True when the --host value resolves to loopback addresses only (the server stays on this machine), None
    when it does not resolve."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def request_host(request: web.BaseRequest) -> str | None:
    """The Host header's name, lowercased, without the port or IPv6 brackets; None when there is none."""
    host = request.headers.get("Host", "").strip().lower()
    if not host:
        return None
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def secure(response: web.StreamResponse, api: bool) -> None:
    """Headers every answer carries: no versions, no type sniffing, only the page's own scripts, no caching of
    the API."""
    response.headers["Server"] = SERVER_NAME
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store" if api else "no-cache"


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    secure(response, api=request.path.startswith("/api/") or response.status >= 400)
    origin = request.headers.get("Origin")
    if origin is not None and origin in request.app["access"].cors_origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error answer is JSON: aiohttp's own (404, 405, 413, ...) are rewritten, anything unexpected is
    logged and answered 500 without a traceback."""
    try:
        return await handler(request)
    except RequestError as error:
        return web.json_response({"error": str(error)}, status=error.status, headers=error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else {}
        message = {404: f"no such endpoint: {request.method} {request.path[:100]}",
                   405: f"method {request.method} not allowed for {request.path}; use {headers.get('Allow', '')}",
                   413: f"upload too large (over {request.app['limits'].max_upload_mb:g} MB, --max-upload-mb)",
                   }.get(error.status, error.reason)
        return web.json_response({"error": message}, status=error.status, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return web.json_response({"error": "internal error (see the server log)"}, status=500)


@web.middleware
async def guard(request: web.Request, handler):
    """Host names (DNS rebinding), cross-origin POSTs (other web pages) and the token, before any handler."""
    access: Access = request.app["access"]
    host = request_host(request)
    if host is None:
        raise RequestError(400, "missing Host header")
    if host not in access.allowed_hosts:
        raise RequestError(400, f"this server does not answer to the host name {host[:100]!r}; open it under a "
                                "loopback name (127.0.0.1, localhost) or start it with --allowed-hosts NAME")
    origin = request.headers.get("Origin")
    allowed_origin = origin is not None and origin in access.cors_origins
    if request.method == "OPTIONS" and allowed_origin:  # a CORS preflight (the page sends Authorization)
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": "GET, POST",
                                                 "Access-Control-Allow-Headers": "Authorization",
                                                 "Access-Control-Max-Age": "600"})
    if (request.method not in ("GET", "HEAD") and origin is not None and not allowed_origin
            and urlsplit(origin).netloc.lower() != request.host.lower()):
        raise RequestError(403, f"cross-origin {request.method} from {origin[:100]!r} refused; start the server "
                                "with --cors-origin ORIGIN to let that page use it")
    if access.token is not None and request.path.startswith("/api/") and not access.authorized(request):
        raise RequestError(401, "missing or wrong token: send Authorization: Bearer TOKEN (the server's --token), "
                                "or open the page once as /?token=TOKEN", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


PARSER_ERRORS = [  # aiohttp's HTTP parser errors, in plain words (their own text may echo the request)
    (http_exceptions.LineTooLong, "the request line or a header is too long (at most 8190 bytes each)"),
    (http_exceptions.BadHttpMethod, "not an HTTP request, or an unknown method"),
    (http_exceptions.InvalidURLError, "malformed URL in the request line"),
    (http_exceptions.BadStatusLine, "malformed request line: send METHOD /path HTTP/1.1"),
    (http_exceptions.InvalidHeader, "malformed header: check the header names and values"),
    (http_exceptions.PayloadEncodingError, "malformed body framing: send Content-Length or "
                                           "Transfer-Encoding: chunked, not both, and a body that matches it"),
]


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler whose own error answers (HTTP parser errors, which no middleware sees) are
    JSON like every other error, echo nothing of the request and name no library."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: an answer already under way cannot be replaced
            raise ConnectionError("response already started")
        if status >= 500:
            log.error("error while handling a request (%s)", type(exc).__name__ if exc else status)
            text = "the server timed out answering" if status == 504 else "internal error (see the server log)"
        else:
            text = next((text for kind, text in PARSER_ERRORS if isinstance(exc, kind)),
                        "malformed HTTP request: check the request line and headers")
        response = web.json_response({"error": text}, status=status)
        secure(response, api=True)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An AppRunner whose connections are JsonErrorHandlers: aiohttp has no public hook for the answers to its
    parser errors (aio-libs/aiohttp#3287), so the server it makes is rebuilt with that handler class."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return JsonErrorServer(made.request_handler, request_factory=made.request_factory,
                               handler_cancellation=made.handler_cancellation, **made._kwargs)


async def read_views(request: web.Request) -> dict[int, bytes]:
    """The uploaded view files by slot index (0..3); 4xx errors for anything but multipart fields 0/90/180/270,
    and 408 when the body takes longer than the body timeout to arrive."""
    limits: Limits = request.app["limits"]
    limit = int(limits.max_upload_mb * MB)
    if request.content_type != "multipart/form-data":
        raise RequestError(415, f"send multipart/form-data with image fields {', '.join(FIELDS)}, "
                                f"not {request.content_type[:100] or 'no content type'}")
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, f"upload of {request.content_length / MB:.1f} MB is over the limit of "
                                f"{limits.max_upload_mb:g} MB (--max-upload-mb)")
    views: dict[int, bytes] = {}
    total = 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, aiohttp.MultipartReader):
                    raise RequestError(400, "nested multipart part: send each view as a file field of its own "
                                            f"({', '.join(FIELDS)})")
                name = part.name
                if name not in FIELDS:
                    raise RequestError(400, f"unknown field {str(name)[:40]!r}: expected the views "
                                            f"{', '.join(FIELDS)} as file fields")
                if FIELDS[name] in views:
                    raise RequestError(400, f"field {name} sent twice")
                data = bytearray()
                while chunk := await part.read_chunk():
                    total += len(chunk)
                    if total > limit:
                        raise RequestError(413, f"upload is over the limit of {limits.max_upload_mb:g} MB "
                                                "(--max-upload-mb)")
                    data.extend(chunk)
                views[FIELDS[name]] = bytes(data)
    except RequestError:
        raise
    except TimeoutError:
        raise RequestError(408, f"the upload took over {limits.body_timeout_s:g} s (--body-timeout); send it "
                                "in one go, or smaller views") from None
    except Exception:  # malformed multipart bodies fail in many ways inside aiohttp
        raise RequestError(400, "malformed multipart body: send multipart/form-data with the views as file fields "
                                f"{', '.join(FIELDS)}") from None
    if not views:
        raise RequestError(400, f"no views: send at least one of the image fields {', '.join(FIELDS)}")
    return views


def check_views(views: dict[int, bytes], max_pixels: int) -> int:
    """Check every view from its header alone (no pixel decoded): 413 over the pixel cap, 400 for anything else
    unusable. Returns the views' total pixel count."""
    pixels = 0
    for i, data in views.items():
        reason = check_image(data, max_pixels=max_pixels)
        if reason is not None and reason.startswith(TOO_MANY_PIXELS):
            raise RequestError(413, f"field {VIEWS[i]}: {reason}; send views of at most {max_pixels / 1e6:g} "
                                    "megapixels (--max-megapixels); Street View's are 640x640")
        if reason is not None:
            raise RequestError(400, f"field {VIEWS[i]}: {reason}")
        _, width, height = image_header(io.BytesIO(data))
        pixels += width * height
    return pixels


def views_tensor(images: dict, spec: tuple) -> tuple[torch.Tensor, list[dict]]:
    """The quadruplet [4, 3, S, S] from decoded views {slot: image, or the reason it is unusable}, read by the
    one quadruplet reader (missing views substituted as src.predict does), and what was substituted;
    ValueError naming the field of an unusable view."""
    for i, image in images.items():
        if isinstance(image, str):
            raise ValueError(f"field {VIEWS[i]}: {image}")
    quadruplet = read_quadruplet([images.get(i) for i in range(len(VIEWS))], {0: (spec[0], eval_transform(*spec))})
    substituted = [{"view": view, "reason": reason, "used": used} for view, reason, used in quadruplet.substitutions()]
    return quadruplet.views[0], substituted


def decode_views(views: dict[int, bytes], spec: tuple, max_pixels: int = 16_000_000
                 ) -> tuple[torch.Tensor, list[dict]]:
    """decode_checked for each view, then views_tensor (the normal lane runs this in a thread)."""
    return views_tensor({i: decode_checked(data, spec[0], max_pixels) for i, data in views.items()}, spec)


def large_lane_pool() -> ProcessPoolExecutor:
    """One low-priority worker process: its decodes take mostly the CPU that normal requests leave, hold no lock
    the server needs (a thread would share the GIL, and a low-priority thread holding it stalls everyone), and
    their memory goes back to the system with the worker, replaced every LARGE_TASKS_PER_WORKER views."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice,
                               initargs=(LARGE_NICENESS,), max_tasks_per_child=LARGE_TASKS_PER_WORKER)


@dataclass
class LargeLane:
    """The large-view lane: its worker pool and how many requests it has admitted."""

    pool: ProcessPoolExecutor = field(default_factory=large_lane_pool)
    admitted: int = 0


async def decode_in_pool(app: web.Application, views: dict[int, bytes], spec: tuple, pixels: int):
    """Decode the views off the event loop: requests over LARGE_REQUEST_PIXELS in the large-view lane (at most
    LARGE_QUEUE requests admitted: more get 503), the rest in the normal lane's threads."""
    max_pixels = app["limits"].max_pixels
    try:
        if pixels <= LARGE_REQUEST_PIXELS:
            return await asyncio.get_running_loop().run_in_executor(app["normal_lane"], decode_views, views, spec,
                                                                    max_pixels)
        return await decode_large(app["large_lane"], views, spec, max_pixels)
    except ValueError as error:
        raise RequestError(400, str(error)) from None


async def decode_large(lane: LargeLane, views: dict[int, bytes], spec: tuple, max_pixels: int):
    if lane.admitted >= LARGE_QUEUE:
        raise RequestError(503, "busy decoding other large uploads: retry in a few seconds, or send smaller views "
                                "(Street View's are 640x640)", {"Retry-After": "2"})
    loop = asyncio.get_running_loop()
    lane.admitted += 1
    try:
        images = await asyncio.gather(*(loop.run_in_executor(lane.pool, decode_checked, data, spec[0], max_pixels)
                                        for data in views.values()))
    except BrokenProcessPool:  # the worker died (killed for memory): a fresh one for the next request
        lane.pool = large_lane_pool()
        raise RequestError(503, "could not decode the large upload: retry, or send smaller views") from None
    finally:
        lane.admitted -= 1
    return views_tensor(dict(zip(views, images)), spec)


def pick_model(request: web.Request) -> ServedModel:
    models = request.app["models"]
    name = request.query.get("model")
    if name is None:
        return next(iter(models.values()))
    if name not in models:
        raise RequestError(404, f"unknown model {name[:100]!r}; loaded: {', '.join(models)} (GET /api/models)")
    return models[name]


async def predict(request: web.Request) -> web.Response:
    """POST /api/predict: multipart views -> coordinates, the most likely cells and substituted views."""
    counters: Counters = request.app["counters"]
    counters.requests += 1
    start = time.perf_counter()
    served = pick_model(request)
    views = await read_views(request)
    pixels = check_views(views, request.app["limits"].max_pixels)
    quadruplet, substituted = await decode_in_pool(request.app, views, input_spec(served.hparams), pixels)
    probabilities, xy = await served.batcher.predict(quadruplet)
    point = np.column_stack(geo.snap_to_land(xy[0], xy[1]))
    lat, lng = geo.unproject(point[0, 0], point[0, 1])
    details = prediction_details([member(served.model, None if probabilities is None else probabilities[None],
                                         xy[None])], point, request.app["top"])
    answer = {"latitude": float(lat), "longitude": float(lng), **answer_details(details),
              "top": [], "substituted_views": substituted, "model": served.name, "engine": served.engine}
    for cell, probability in zip(details.top_cells[0], details.top_probabilities[0]):
        k = served.class_of_cell[int(cell)]
        answer["top"].append({"latitude": float(served.cell_lat[k]), "longitude": float(served.cell_lng[k]),
                              "probability": float(probability), "cell": int(cell),
                              "bounds": served.cell_bounds[k] if served.cell_bounds else None})
    answer["milliseconds"] = round(1000 * (time.perf_counter() - start), 2)
    counters.predictions += 1
    return web.json_response(answer)


def answer_details(details) -> dict:
    """The confidence fields of an answer: the --details columns of src.predict as JSON numbers (null where
    unknown), whether the radii are calibrated and, when not, a note saying so."""
    def number(value: float, decimals: int) -> float | None:
        return round(float(value), decimals) if np.isfinite(value) else None

    fields = {"radius50_km": number(details.radius(0.5)[0], 2), "radius90_km": number(details.radius(0.9)[0], 2),
              "top1_probability": number(details.top1[0], 4), "calibrated": details.calibrated}
    if not details.calibrated:
        fields["note"] = f"this model {UNCALIBRATED_NOTE}"
    return fields


async def health(request: web.Request) -> web.Response:
    counters: Counters = request.app["counters"]
    return web.json_response({"status": "ok", "models": len(request.app["models"]),
                              "uptime_s": round(time.monotonic() - request.app["started"], 1),
                              **counters.__dict__})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"models": [m.describe() for m in request.app["models"].values()]})


async def border(request: web.Request) -> web.Response:
    return web.FileResponse(geo.BORDER_FILE, headers={"Content-Type": "application/geo+json"})


async def list_examples(request: web.Request) -> web.Response:
    """GET /api/examples: generated demo locations (true coordinates and the four views as data: URLs)."""
    return web.json_response({"examples": request.app["examples"]})


async def index(request: web.Request) -> web.Response:
    """GET /: the page; GET /?token=TOKEN sets the cookie that lets the page call /api/* and reloads it bare."""
    access: Access = request.app["access"]
    if access.token is not None and "token" in request.query:
        if not hmac.compare_digest(encoded(request.query["token"]), encoded(access.token)):
            raise RequestError(401, "wrong token: open the page as /?token=TOKEN with the server's --token")
        redirect = web.HTTPSeeOther("/")
        redirect.set_cookie(SESSION_COOKIE, access.session(), httponly=True, samesite="Strict", path="/")
        raise redirect
    return web.FileResponse(WEB_DIR / "index.html")


async def static_file(request: web.Request) -> web.Response:
    """GET /static/NAME: a file of the page (src/app/web), looked up in the list of its files (never a path
    built from the request); anything else is a 404 JSON error."""
    name = request.match_info["name"]
    if name not in request.app["static_files"]:
        raise RequestError(404, f"no such file: /static/{name[:100]}")
    return web.FileResponse(WEB_DIR / name)


def demo_examples(n: int = 6, image_size: int = 96, seed: int = 1) -> list[dict]:
    """`n` synthetic locations from src.demo (the images the demo checkpoints learn from), views inlined."""
    from src.data.synthetic import write_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = write_demo_dataset(Path(tmp), n_locations=n, image_size=image_size, seed=seed)
        table = pd.read_csv(root / "data.csv")
        return [{"uuid": row.uuid, "latitude": row.latitude, "longitude": row.longitude,
                 "views": {str(v): "data:image/jpeg;base64," + base64.b64encode(
                     (root / "data" / row.uuid / f"{v}.jpg").read_bytes()).decode() for v in VIEWS}}
                for row in table.itertuples()]




def build_app(served: dict[str, ServedModel], max_batch: int = 32, batch_wait_ms: float = 5.0, top: int = 5,
              examples: list[dict] | None = None, limits: Limits = Limits(), access: Access = Access()
              ) -> web.Application:
    """The aiohttp application over loaded models (batchers start with the app, stop at cleanup)."""
    app = web.Application(middlewares=[json_errors, guard], client_max_size=int(limits.max_upload_mb * MB) + MB)
    app["models"] = served
    app["limits"] = limits
    app["access"] = access
    app["top"] = top
    app["counters"] = Counters()
    app["examples"] = examples or []
    app["started"] = time.monotonic()
    app["static_files"] = frozenset(path.name for path in WEB_DIR.iterdir() if path.is_file())
    inference = ThreadPoolExecutor(1, thread_name_prefix="inference")  # one batch at a time; ORT/torch use the cores
    app["normal_lane"] = ThreadPoolExecutor(2, thread_name_prefix="decode")
    app["large_lane"] = LargeLane()

    async def start_batchers(app: web.Application) -> None:
        for model in served.values():
            model.batcher = MicroBatcher(model.model, max_batch, batch_wait_ms / 1000, inference, app["counters"])
            model.batcher.start()

    async def stop_batchers(app: web.Application) -> None:
        for model in served.values():
            await model.batcher.stop()
        for pool in (inference, app["normal_lane"], app["large_lane"].pool):
            pool.shutdown(wait=True)

    app.on_startup.append(start_batchers)
    app.on_cleanup.append(stop_batchers)
    app.on_response_prepare.append(on_prepare)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name:.+}", static_file)
    app.router.add_post("/api/predict", predict)
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/models", models)
    app.router.add_get("/api/border", border)
    app.router.add_get("/api/examples", list_examples)
    return app


def check_address(host: str, port: int) -> None:
    """Fail fast, before loading models, when `host`:`port` cannot be listened on (the real bind follows)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as error:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error}); "
                        "pick another --port or --host") from None



async def serve(app: web.Application, host: str, port: int, shutdown_timeout: float,
                header_timeout: float = 10.0) -> None:
    """Listen until SIGINT/SIGTERM, then finish in-flight requests and clean up. A connection whose request
    headers are not all in within `header_timeout` seconds (aiohttp's keep-alive timer, which also runs
    before the first request) is closed; so is an idle keep-alive connection after that long."""
    # the views' pixel cap is stricter than PIL's bomb limit, whose warning would be printed for every bomb
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    runner = Runner(app, handle_signals=False, shutdown_timeout=shutdown_timeout, access_log=None,
                    keepalive_timeout=header_timeout, lingering_time=LINGERING_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as error:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); "
                            "pick another --port or --host") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda sig=sig: (log.info("got %s", sig.name), stop.set()))
        bound_host, bound_port = runner.addresses[0][:2]
        print(f"serving on http://{bound_host}:{bound_port} (Ctrl+C to stop)", flush=True)
        await stop.wait()
        print("shutting down", file=sys.stderr, flush=True)
    finally:
        await runner.cleanup()
