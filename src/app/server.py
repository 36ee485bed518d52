"""The inference server: an aiohttp application over loaded checkpoints, with the web page (src/app/web).

Its endpoints (GET /, POST /api/predict, GET /api/models, /api/health, /api/border, /api/examples) are
described in docs/serve.md; `python -m src.serve` starts it. Uploaded views are read by the one quadruplet
reader (`src.data.quadruplets`: missing views replaced as predict replaces them); concurrent requests are
micro-batched (`MicroBatcher`) in a worker thread so the event loop stays responsive; every bad request gets
a 4xx JSON {"error": ...}.
"""

import asyncio
import base64
import contextlib
import io
import logging
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from aiohttp import web
from PIL import Image

from src.core import geo
from src.data.quadruplets import eval_transform, input_spec
from src.core.errors import UserError, brief
from src.inference.engine import engine_model, infer
from src.data.images import JPEG_EOI, VIEWS, load_image
from src.inference.checkpoints import load_model
from src.data.quadruplets import substitute_sources

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent / "web"
FIELDS = {str(view): i for i, view in enumerate(VIEWS)}
MB = 1024 * 1024


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
                probabilities, xy = await loop.run_in_executor(self.executor, infer, self.model, views)
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

    @property
    def hparams(self):
        return self.model.hparams

    def describe(self) -> dict:
        hp = self.hparams
        return {"name": self.name, "checkpoint": str(self.checkpoint), "approach": hp["approach"],
                "backbone": hp["backbone"], "image_size": int(hp["image_size"]),
                "classes": len(hp["classes"]["cell"]) if hp["approach"] != "regression" else 0,
                "centroids": hp.get("centroids"), "engine": self.engine}


def model_name(checkpoint: Path, taken: set[str]) -> str:
    """A short unique name: <run>/<version> for reports/<run>/<version>/checkpoints/*.ckpt, else the file stem."""
    parts = checkpoint.resolve().parts
    name = f"{parts[-4]}/{parts[-3]}" if len(parts) >= 4 and parts[-2] == "checkpoints" else checkpoint.stem
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}#{n}", n + 1
    return unique


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
                reports_dir: Path | None = None) -> dict[str, ServedModel]:
    models: dict[str, ServedModel] = {}
    for path in checkpoints:
        model = engine_model(load_model(path, device, reports_dir=reports_dir), path, engine, threads)
        served = ServedModel(model_name(path, set(models)), Path(path), model, engine)
        if model.hparams["approach"] != "regression":  # classification and hybrid: class probabilities
            served.cell_lat, served.cell_lng, served.cell_bounds = class_cells(model.hparams)
        models[served.name] = served
        hp = model.hparams
        print(f"model {served.name}: {hp['approach']} {hp['backbone']} {hp['image_size']} px, engine {engine} "
              f"({path})", file=sys.stderr, flush=True)
    return models


# ---- requests -------------------------------------------------------------------------------------------

class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error answer is JSON: aiohttp's own (404, 405, 413, ...) are rewritten, anything unexpected is
    logged and answered 500 without a traceback."""
    try:
        return await handler(request)
    except RequestError as error:
        return web.json_response({"error": str(error)}, status=error.status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else {}
        message = {404: f"no such endpoint: {request.method} {request.path}",
                   405: f"method {request.method} not allowed for {request.path}; use {headers.get('Allow', '')}",
                   413: f"upload too large (over {request.app['max_upload_mb']:g} MB, --max-upload-mb)",
                   }.get(error.status, error.reason)
        return web.json_response({"error": message}, status=error.status, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return web.json_response({"error": "internal error (see the server log)"}, status=500)


async def read_views(request: web.Request) -> dict[int, bytes]:
    """The uploaded view files by slot index (0..3); 4xx errors for anything but multipart fields 0/90/180/270."""
    limit = int(request.app["max_upload_mb"] * MB)
    if request.content_type != "multipart/form-data":
        raise RequestError(415, f"send multipart/form-data with image fields {', '.join(FIELDS)}, "
                              f"not {request.content_type or 'no content type'}")
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, f"upload of {request.content_length / MB:.1f} MB is over the limit of "
                              f"{request.app['max_upload_mb']:g} MB (--max-upload-mb)")
    views: dict[int, bytes] = {}
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name not in FIELDS:
                raise RequestError(400, f"unknown field {part.name!r}: expected the views {', '.join(FIELDS)}")
            if FIELDS[part.name] in views:
                raise RequestError(400, f"field {part.name} sent twice")
            data = bytearray()
            while chunk := await part.read_chunk():
                total += len(chunk)
                if total > limit:
                    raise RequestError(413, f"upload is over the limit of {request.app['max_upload_mb']:g} MB "
                                          "(--max-upload-mb)")
                data.extend(chunk)
            views[FIELDS[part.name]] = bytes(data)
    except RequestError:
        raise
    except Exception as error:  # malformed multipart bodies fail in many ways inside aiohttp
        raise RequestError(400, f"malformed multipart body ({brief(error)})") from None
    if not views:
        raise RequestError(400, f"no views: send at least one of the image fields {', '.join(FIELDS)}")
    return views


def decode_view(name: str, data: bytes, spec: tuple) -> torch.Tensor:
    """One uploaded view -> normalised [3, S, S]; ValueError naming the field when it is not a usable image."""
    if not data:
        raise ValueError(f"field {name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, width, height = image.format, image.width, image.height
    except Image.DecompressionBombError as error:
        raise ValueError(f"field {name}: image too large ({brief(error)})") from None
    except Exception:
        raise ValueError(f"field {name}: not an image (JPEG or another format PIL reads)") from None
    if kind == "JPEG" and JPEG_EOI not in data[-64:]:
        raise ValueError(f"field {name}: truncated JPEG (no end-of-image marker)")
    if width < 8 or height < 8:
        raise ValueError(f"field {name}: image too small ({width}x{height})")
    try:
        return eval_transform(*spec)(load_image(io.BytesIO(data), spec[0]))
    except Exception as error:  # corrupt data past the header
        raise ValueError(f"field {name}: corrupt image ({brief(error)})") from None


def decode_views(views: dict[int, bytes], spec: tuple) -> tuple[torch.Tensor, list[dict]]:
    """The quadruplet [4, 3, S, S] with missing views substituted as src.predict does, and what was substituted."""
    tensors = {i: decode_view(str(VIEWS[i]), data, spec) for i, data in views.items()}
    reasons = [None if i in tensors else "missing" for i in range(4)]
    source = substitute_sources(reasons)
    substituted = [{"view": VIEWS[i], "reason": reasons[i], "used": VIEWS[j]}
                   for i, j in enumerate(source) if j != i]
    return torch.stack([tensors[j] for j in source]), substituted


def pick_model(request: web.Request) -> ServedModel:
    models = request.app["models"]
    name = request.query.get("model")
    if name is None:
        return next(iter(models.values()))
    if name not in models:
        raise RequestError(404, f"unknown model {name!r}; loaded: {', '.join(models)} (GET /api/models)")
    return models[name]


async def predict(request: web.Request) -> web.Response:
    """POST /api/predict: multipart views -> coordinates, the most likely cells and substituted views."""
    counters: Counters = request.app["counters"]
    counters.requests += 1
    start = time.perf_counter()
    served = pick_model(request)
    views = await read_views(request)
    spec = input_spec(served.hparams)
    loop = asyncio.get_running_loop()
    try:
        quadruplet, substituted = await loop.run_in_executor(request.app["decoders"], decode_views, views, spec)
    except ValueError as error:
        raise RequestError(400, str(error)) from None
    probabilities, xy = await served.batcher.predict(quadruplet)
    lat, lng = geo.unproject(*geo.snap_to_land(xy[0], xy[1]))
    answer = {"latitude": float(lat), "longitude": float(lng), "top": [], "substituted_views": substituted,
              "model": served.name, "engine": served.engine}
    if probabilities is not None:
        top = np.argsort(-probabilities)[:request.app["top"]]
        answer["top"] = [{"latitude": float(served.cell_lat[k]), "longitude": float(served.cell_lng[k]),
                          "probability": float(probabilities[k]), "cell": int(served.hparams["classes"]["cell"][k]),
                          "bounds": served.cell_bounds[k] if served.cell_bounds else None} for k in top]
    answer["milliseconds"] = round(1000 * (time.perf_counter() - start), 2)
    counters.predictions += 1
    return web.json_response(answer)


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
    return web.FileResponse(WEB_DIR / "index.html")


async def static_file(request: web.Request) -> web.Response:
    """GET /static/NAME: a file of the page (src/web); anything else is a 404 JSON error (aiohttp's own static
    route answers a missing file with an empty, non-JSON 404 that no middleware sees)."""
    name = request.match_info["name"]
    path = (WEB_DIR / name).resolve()
    if not path.is_relative_to(WEB_DIR.resolve()) or not path.is_file():
        raise RequestError(404, f"no such file: /static/{name}")
    return web.FileResponse(path)


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


def build_app(served: dict[str, ServedModel], max_batch: int = 32, batch_wait_ms: float = 5.0,
              max_upload_mb: float = 20.0, top: int = 5, examples: list[dict] | None = None) -> web.Application:
    """The aiohttp application over loaded models (batchers start with the app, stop at cleanup)."""
    app = web.Application(middlewares=[json_errors], client_max_size=int(max_upload_mb * MB) + MB)
    app["models"] = served
    app["max_upload_mb"] = max_upload_mb
    app["top"] = top
    app["counters"] = Counters()
    app["examples"] = examples or []
    app["started"] = time.monotonic()
    inference = ThreadPoolExecutor(1, thread_name_prefix="inference")  # one batch at a time; ORT/torch use the cores
    app["decoders"] = ThreadPoolExecutor(2, thread_name_prefix="decode")

    async def start_batchers(app: web.Application) -> None:
        for model in served.values():
            model.batcher = MicroBatcher(model.model, max_batch, batch_wait_ms / 1000, inference, app["counters"])
            model.batcher.start()

    async def stop_batchers(app: web.Application) -> None:
        for model in served.values():
            await model.batcher.stop()
        inference.shutdown(wait=True)
        app["decoders"].shutdown(wait=True)

    app.on_startup.append(start_batchers)
    app.on_cleanup.append(stop_batchers)
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


async def serve(app: web.Application, host: str, port: int, shutdown_timeout: float) -> None:
    """Listen until SIGINT/SIGTERM, then finish in-flight requests and clean up."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout, access_log=None)
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
