"""A Street View Static API emulator (aiohttp.web on 127.0.0.1) for tests and benchmarks.

Serves `/maps/api/streetview/metadata` and `/maps/api/streetview` like Google does (JSON status answers,
JPEG images, `return_error_code=true` 404s), checks the key and, when a secret is set, the URL signature,
injects faults on demand and measures what it sees: requests in flight at once, requests per second,
images served successfully per (pano, heading).
"""

import asyncio
import base64
import hashlib
import hmac
import io
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from aiohttp import web
from PIL import Image

from src.core import geo

API_PATH = "/maps/api/streetview"
FAULTS = ("429", "500", "slow", "truncated", "zero_results", "no_imagery", "denied", "over_query_limit")


@dataclass
class Fault:
    kind: str  # one of FAULTS
    target: str  # "metadata" or "image"
    match: str = ""  # only requests whose query contains this text
    times: int | None = 1  # None: forever


@dataclass
class Stats:
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list = field(default_factory=list)  # monotonic arrival times
    requests: Counter = field(default_factory=Counter)  # (target, answer) -> count
    served: Counter = field(default_factory=Counter)  # (pano_id, heading) -> complete images served

    def max_per_second(self) -> int:
        """The most requests that arrived within any window of one second."""
        times = np.sort(np.asarray(self.arrivals))
        if times.size == 0:
            return 0
        return int((np.searchsorted(times, times + 1.0, side="left") - np.arange(times.size)).max())


def jpeg_bytes(lat: float, lng: float, heading: int, size: int = 64) -> bytes:
    """A small real JPEG whose colours follow the position (so a model can learn from it) and the heading."""
    t_lat, t_lng = (lat - 42.4) / 4.2, (lng - 13.5) / 5.9
    image = np.empty((size, size, 3), np.uint8)
    image[: size // 2] = (90 + 120 * t_lat, 150 + 60 * (1 - t_lat), 235 - 60 * t_lat)
    image[size // 2:] = (60 + 150 * t_lng, 150 - 70 * t_lng, 40 + 60 * (1 - t_lng))
    image[:, heading * size // 360: heading * size // 360 + 4] = 0
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def sign(path_and_query: str, secret: str) -> str:
    """Google's URL signature: url-safe base64 of HMAC-SHA1(url-safe-base64-decoded secret, path?query)."""
    digest = hmac.new(base64.urlsafe_b64decode(secret), path_and_query.encode(), hashlib.sha1).digest()
    return base64.urlsafe_b64encode(digest).decode()


class StreetViewEmulator:
    """Panoramas at given positions; a metadata lookup answers the nearest one within the radius."""

    def __init__(self, panoramas: list[tuple[str, float, float]], key: str = "test-key", secret: str | None = None,
                 latency: Callable[[web.Request], float] | None = None, image_size: int = 64):
        self.ids = [pano for pano, _, _ in panoramas]
        self.lat = np.array([lat for _, lat, _ in panoramas], float)
        self.lng = np.array([lng for _, _, lng in panoramas], float)
        self.by_id = {pano: (lat, lng) for pano, lat, lng in panoramas}
        self.key, self.secret, self.latency, self.image_size = key, secret, latency, image_size
        self.faults: list[Fault] = []
        self.stats = Stats()
        self._images: dict[tuple[str, int], bytes] = {}

    def inject(self, kind: str, target: str, match: str = "", times: int | None = 1) -> None:
        assert kind in FAULTS and target in ("metadata", "image"), (kind, target)
        self.faults.append(Fault(kind, target, match, times))

    def _fault(self, target: str, query: str) -> str | None:
        for fault in self.faults:
            if fault.target == target and fault.match in query and (fault.times is None or fault.times > 0):
                if fault.times is not None:
                    fault.times -= 1
                return fault.kind
        return None

    def _authorised(self, request: web.Request) -> bool:
        if request.query.get("key") != self.key:
            return False
        if self.secret is None:
            return True
        raw = request.raw_path
        signed, _, signature = raw.rpartition("&signature=")
        return bool(signed) and hmac.compare_digest(signature, sign(signed, self.secret))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._measure])
        app.router.add_get(f"{API_PATH}/metadata", self._metadata)
        app.router.add_get(API_PATH, self._image)
        return app

    @web.middleware
    async def _measure(self, request: web.Request, handler):
        self.stats.arrivals.append(time.monotonic())
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            if self.latency is not None:
                await asyncio.sleep(self.latency(request))
            return await handler(request)
        finally:
            self.stats.in_flight -= 1

    async def _answer_fault(self, fault: str | None, request: web.Request) -> web.StreamResponse | None:
        if fault == "429":
            return web.json_response({"error": "rate limited"}, status=429, headers={"Retry-After": "1"})
        if fault == "500":
            return web.json_response({"error": "backend error"}, status=500)
        if fault == "slow":  # 5 s, or until the client gives up (aiohttp does not cancel the handler)
            for _ in range(500):
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.01)
            else:
                return None
            return web.Response(status=504, text="client gone")  # nobody reads this
        return None

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        fault = self._fault("metadata", request.query_string)
        self.stats.requests["metadata", fault or "ok"] += 1
        if not self._authorised(request) or fault == "denied":
            if self.secret is not None and request.query.get("key") == self.key and fault != "denied":
                return web.Response(status=403, text="The signature is invalid for this URL.")
            return web.json_response({"status": "REQUEST_DENIED", "error_message": "The provided API key is invalid."})
        answer = await self._answer_fault(fault, request)
        if answer is not None:
            return answer
        if fault == "over_query_limit":
            return web.json_response({"status": "OVER_QUERY_LIMIT"})
        try:
            lat, lng = (float(v) for v in request.query["location"].split(","))
            radius = float(request.query.get("radius", 50))
        except (KeyError, ValueError):
            return web.json_response({"status": "INVALID_REQUEST"})
        if fault != "zero_results" and self.ids:
            km = geo.haversine_km(lat, lng, self.lat, self.lng)
            nearest = int(np.argmin(km))
            if km[nearest] * 1000 <= radius:
                pano = self.ids[nearest]
                return web.json_response({"status": "OK", "pano_id": pano, "date": "2021-07", "copyright": "© Google",
                                          "location": {"lat": float(self.lat[nearest]), "lng": float(self.lng[nearest])}})
        return web.json_response({"status": "ZERO_RESULTS"})

    async def _image(self, request: web.Request) -> web.StreamResponse:
        fault = self._fault("image", request.query_string)
        self.stats.requests["image", fault or "ok"] += 1
        if not self._authorised(request) or fault == "denied":
            return web.Response(status=403, text="The Google Maps Platform server rejected your request.")
        answer = await self._answer_fault(fault, request)
        if answer is not None:
            return answer
        pano, heading = request.query.get("pano", ""), int(float(request.query.get("heading", 0)))
        if pano not in self.by_id or fault == "no_imagery":
            return web.Response(status=404, text="no imagery")
        body = self._images.get((pano, heading))
        if body is None:
            body = self._images[pano, heading] = jpeg_bytes(*self.by_id[pano], heading, self.image_size)
        if fault == "truncated":  # a body cut short: the JPEG lacks its end
            return web.Response(body=body[: len(body) // 2], content_type="image/jpeg")
        self.stats.served[pano, heading] += 1
        return web.Response(body=body, content_type="image/jpeg")


@contextmanager
def running(emulator: StreetViewEmulator) -> Iterator[str]:
    """Serve the emulator on 127.0.0.1 (random port) in a background thread; yields the API url."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(emulator.app(), access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}{API_PATH}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()
