"""The Street View Static API client: panorama metadata, the four views of each panorama, a LUMEN dataset dir.

Step 1 looks up the panorama near each point (metadata requests, free of quota), step 2 drops repeated
panoramas, step 3 fetches the four views of each kept panorama. One aiohttp session, a bounded pool of
workers, a token bucket capping requests per second, retries with exponential backoff and jitter.
Interrupted runs resume: metadata answers are journaled in DIR/metadata.jsonl, images already on disk are
kept, data.csv lists only complete locations. `python -m src.download` drives it (docs/download.md).
"""

import argparse
import asyncio
import base64
import binascii
import datetime
import email.utils
import hashlib
import hmac
import json
import os
import random
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import aiohttp
import numpy as np
import pandas as pd
from tabulate import tabulate
from tqdm import tqdm
from yarl import URL

from src.collect.defaults import DEFAULT_API_URL, DUPLICATE_M, KEY_ENV
from src.core import geo
from src.core.errors import UserError
from src.core.flags import Rule, at_least, check_ranges, non_negative_finite, positive_finite
from src.core.files import atomic_path, write_csv
from src.data.images import VIEWS, check_image
from src.data.locations import read_coordinates, read_csv_strict
from src.data.sampling import thin

UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, DEFAULT_API_URL)
IMAGE_SIZE = "640x640"
RETRY_STATUSES = {"OVER_QUERY_LIMIT", "UNKNOWN_ERROR"}
BUDGET_REASON = "--max-images budget reached (rerun with a larger budget to resume)"
FATAL_STATUSES = {"REQUEST_DENIED", "INVALID_REQUEST"}
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 60.0
QPS_HEADROOM = 1.02  # pace slightly under --qps so network jitter never shows the server more per second
CSV_FLUSH_S = 30.0  # data.csv is rewritten at most this often while images arrive
DATA_COLUMNS = ["uuid", "latitude", "longitude", "pano_id", "date", "point_id", "sample_latitude", "sample_longitude"]
REPORT_COLUMNS = ["point_id", "latitude", "longitude", "outcome", "pano_id", "uuid"]
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
STOP_GRACE_S = 2.0  # after a signal, requests in flight get this long to finish (their images are kept)


DENIED_HINT = (f"check --key / ${KEY_ENV} (and --secret), and that the Street View Static API is enabled for "
               "the key")


class ApiDenied(Exception):
    """The API refused the credentials or the request, or --api-url is no Street View API: stop the run.
    The message ends with what to check."""


class ApiUnreachable(Exception):
    """Every attempt of a request failed to connect and no answer arrived meanwhile: stop the run instead of
    retrying every point. The message names the address and what to check."""


class BudgetReached(Exception):
    """--max-images image requests were sent: no more in this run."""


class RequestFailed(Exception):
    """A request that still failed after every retry; the message is the reason (never holds the key)."""


class NoImagery(Exception):
    """404 from an image request with return_error_code=true."""


@dataclass
class Settings:
    api_url: str = DEFAULT_API_URL
    key: str = ""
    secret: str | None = None
    radius: float = 500.0
    concurrency: int = 16
    qps: float = 25.0  # 0: no cap
    timeout: float = 30.0
    retries: int = 5
    max_images: int | None = None
    metadata_only: bool = False
    backoff_base: float = BACKOFF_BASE_S


def mask(text: str, *secrets: str | None) -> str:
    """`text` with every secret replaced by a mask."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def location_uuid(pano_id: str) -> str:
    """The location's uuid: uuid5 of the panorama id, so every run names the same folder."""
    return str(uuid.uuid5(UUID_NAMESPACE, pano_id))


def retry_after_seconds(value: str) -> float:
    """Seconds to wait for a Retry-After header: a number of seconds or an HTTP date (RFC 9110); 0 when it is
    neither or lies in the past."""
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate_to_datetime leaves "-0000" naive
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


class TokenBucket:
    """Grants at most `rate` requests per second: one token every 1/rate s, holding at most one token."""

    def __init__(self, rate: float):
        self.interval = QPS_HEADROOM / rate if rate > 0 else 0.0
        self.next_free = 0.0
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            now = time.monotonic()
            wait = self.next_free - now
            self.next_free = max(now, self.next_free) + self.interval
            if wait > 0:
                await asyncio.sleep(wait)


@dataclass
class Counters:
    requests: Counter = field(default_factory=Counter)  # metadata, image, retry
    images_received: int = 0


class StreetViewClient:
    """Signed, rate-limited, retried GETs against the Street View Static API."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings, counters: Counters):
        self.session, self.settings, self.counters = session, settings, counters
        self.bucket = TokenBucket(settings.qps)
        self.base = settings.api_url.rstrip("/")
        self.secret = base64.urlsafe_b64decode(settings.secret) if settings.secret else None
        self.answers = 0  # HTTP answers received, of any status

    def url(self, suffix: str, params: dict) -> URL:
        """The request URL; with a secret, signed over path + query as Google documents."""
        query = urlencode({**params, "key": self.settings.key})
        url = f"{self.base}{suffix}?{query}"
        if self.secret is not None:
            parts = urlsplit(url)
            digest = hmac.new(self.secret, f"{parts.path}?{parts.query}".encode(), hashlib.sha1).digest()
            url += "&signature=" + base64.urlsafe_b64encode(digest).decode()
        return URL(url, encoded=True)

    async def _backoff(self, attempt: int, retry_after: str | None) -> None:
        delay = random.uniform(0, min(BACKOFF_MAX_S, self.settings.backoff_base * 2 ** attempt))
        if retry_after is not None:
            delay = max(delay, retry_after_seconds(retry_after))
        self.counters.requests["retry"] += 1
        await asyncio.sleep(delay)

    async def get(self, kind: str, suffix: str, params: dict) -> tuple[int, bytes]:
        """(HTTP status, body) of a GET, retried on 429, 5xx, timeouts, broken connections and bodies that
        `kind` finds incomplete; raises RequestFailed when the retries run out."""
        url = self.url(suffix, params)
        reason = "no attempt"
        answers_before, refused = self.answers, 0
        retry_after = None  # the last answer's Retry-After header
        for attempt in range(self.settings.retries + 1):
            if attempt:
                await self._backoff(attempt - 1, retry_after)
            retry_after = None
            await self.bucket.acquire()
            if kind == "image" and self.settings.max_images is not None \
                    and self.counters.requests["image"] >= self.settings.max_images:
                raise BudgetReached()  # retries count too: the budget is of requests sent
            self.counters.requests[kind] += 1
            try:
                async with self.session.get(url, allow_redirects=False) as response:
                    body = await response.read()
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
                self.answers += 1
            except asyncio.TimeoutError:
                reason = f"timed out after {self.settings.timeout:g} s"
                continue
            except aiohttp.ClientError as error:  # the message may hold the URL (and key): keep only the type
                reason = f"connection error ({type(error).__name__})"
                refused += isinstance(error, aiohttp.ClientConnectorError)  # no connection at all
                continue
            if status == 429 or status >= 500:
                reason = f"HTTP {status}"
                continue
            if kind == "image" and status == 200 and (problem := check_image(body)):
                reason = f"unusable image ({problem})"
                continue
            return status, body
        attempts = self.settings.retries + 1
        if refused == attempts and self.answers == answers_before:
            raise ApiUnreachable(f"cannot connect to {URL(self.base).origin()}: {reason} on {attempts} attempts in a "
                                 "row; check --api-url and the network, then rerun the same command to resume")
        raise RequestFailed(f"{reason} ({attempts} attempts)")

    async def metadata(self, lat: float, lng: float) -> dict:
        """The metadata answer for a point (status OK or ZERO_RESULTS); other statuses raise."""
        params = {"location": f"{lat:.7f},{lng:.7f}", "radius": f"{self.settings.radius:g}", "source": "outdoor"}
        for attempt in range(self.settings.retries + 1):
            if attempt:
                await self._backoff(attempt - 1, None)
            status, body = await self.get("metadata", "/metadata", params)
            if status in (401, 403):
                raise ApiDenied(f"HTTP {status} from the metadata endpoint ({body[:120].decode(errors='replace')}); "
                                f"{DENIED_HINT}")
            if status == 404:  # Google's metadata endpoint answers every location: a wrong URL
                raise ApiDenied(f"HTTP 404 from {self.base}/metadata: not a Street View API; check --api-url "
                                f"(default: {DEFAULT_API_URL})")
            try:
                answer = json.loads(body)
                api_status = answer["status"]
            except (ValueError, KeyError, TypeError):
                raise RequestFailed(f"metadata: HTTP {status}, not a JSON status answer") from None
            if api_status in FATAL_STATUSES:
                raise ApiDenied(f"{api_status} ({answer.get('error_message', 'no message')}); {DENIED_HINT}")
            if api_status not in RETRY_STATUSES:
                return answer
        raise RequestFailed(f"metadata: {api_status} ({self.settings.retries + 1} attempts)")

    async def image(self, pano_id: str, heading: int) -> bytes:
        params = {"pano": pano_id, "heading": heading, "size": IMAGE_SIZE, "fov": 90, "pitch": 0,
                  "return_error_code": "true"}
        status, body = await self.get("image", "", params)
        if status == 404:
            raise NoImagery()
        if status in (400, 401, 403):
            raise ApiDenied(f"HTTP {status} from the image endpoint ({body[:120].decode(errors='replace')}); "
                            f"{DENIED_HINT}")
        if status != 200:
            raise RequestFailed(f"image: HTTP {status}")
        return body


async def run_pool(jobs, handle, workers: int, stopping=lambda: False) -> None:
    """`workers` coroutines take jobs one at a time from a shared iterator: at most `workers` in flight,
    a new one starting as soon as any finishes, none once `stopping()`. The first error cancels the rest."""
    jobs = iter(jobs)

    async def worker() -> None:
        while not stopping():
            job = next(jobs, None)
            if job is None:
                return
            await handle(job)

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())


class Journal:
    """DIR/metadata.jsonl: one JSON line per answered point (and per panorama without imagery)."""

    def __init__(self, path: Path):
        self.path = path
        self.answers: dict[tuple, dict] = {}
        self.no_imagery: set[str] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut by a hard kill
                    continue
                if "no_imagery" in record:
                    self.no_imagery.add(record["no_imagery"])
                else:
                    self.answers[self.point_key(record["point_id"], record["latitude"], record["longitude"])] = record
        self.handle = open(path, "a")

    @staticmethod
    def point_key(point_id, lat, lng) -> tuple:
        return str(point_id), round(float(lat), 7), round(float(lng), 7)

    def add(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if "no_imagery" in record:
            self.no_imagery.add(record["no_imagery"])
        else:
            self.answers[self.point_key(record["point_id"], record["latitude"], record["longitude"])] = record

    def close(self) -> None:
        self.handle.close()


def read_points(path: Path) -> pd.DataFrame:
    """point_id, latitude, longitude from a points CSV (the one coordinate reader); any bad row is a one-line
    UserError naming the file and line."""
    fix = "give the CSV written by python -m src.sample (point_id,latitude,longitude)"
    try:
        rows = read_coordinates(path, "points", fix, key="point_id", lowercase_columns=True)
        return rows.require_valid("points", fix).drop(columns="line")
    except UserError as error:  # the message names the flag the file came from
        raise UserError(f"--points {error}") from None


def previous_rows(path: Path) -> pd.DataFrame:
    """The rows of an existing DIR/data.csv (earlier runs, perhaps over other points): they are kept."""
    if not path.exists():
        return pd.DataFrame(columns=DATA_COLUMNS)
    fix = "give --out a new dir, or one that python -m src.download wrote"
    table = read_csv_strict(path, fix)
    missing = [column for column in DATA_COLUMNS if column not in table.columns]
    if missing:
        raise UserError(f"{path}: not written by src.download (no {', '.join(missing)} column); {fix}")
    return table[DATA_COLUMNS]


def choose_panoramas(points: pd.DataFrame, journal: Journal, exclude_lat, exclude_lng,
                     previous: pd.DataFrame | None = None) -> pd.DataFrame:
    """Step 2: per point its metadata answer and outcome so far; a panorama is kept for its first point only,
    and only if it is at least DUPLICATE_M from every kept panorama, excluded location and row of `previous`
    (data.csv) other than this point's own panorama (a resumed run)."""
    records = [journal.answers.get(Journal.point_key(*row)) for row in
               points[["point_id", "latitude", "longitude"]].itertuples(index=False)]
    table = points.copy()
    table["status"] = [r["status"] if r else None for r in records]
    table["pano_id"] = [r.get("pano_id") if r else None for r in records]
    table["pano_lat"] = [r["location"]["lat"] if r and r["status"] == "OK" else np.nan for r in records]
    table["pano_lng"] = [r["location"]["lng"] if r and r["status"] == "OK" else np.nan for r in records]
    table["date"] = [r.get("date", "") if r else "" for r in records]
    table["outcome"] = None
    table.loc[table["status"].eq("ZERO_RESULTS"), "outcome"] = "no_panorama"
    found = table["status"].eq("OK")
    table.loc[found & table["pano_id"].duplicated(), "outcome"] = "duplicate_panorama"
    candidates = np.flatnonzero(found & table["outcome"].isna())
    if previous is not None and len(previous):  # rows of other points (or of panoramas these points no longer find)
        found_by = set(zip(table["point_id"][found], table["pano_id"][found]))
        other = previous[[key not in found_by for key in zip(previous["point_id"].astype(str), previous["pano_id"])]]
        exclude_lat = np.concatenate([np.asarray(exclude_lat, float), other["latitude"].to_numpy(float)])
        exclude_lng = np.concatenate([np.asarray(exclude_lng, float), other["longitude"].to_numpy(float)])
    fixed_x, fixed_y = geo.project(np.asarray(exclude_lat, float), np.asarray(exclude_lng, float))
    x, y = geo.project(table["pano_lat"].to_numpy()[candidates], table["pano_lng"].to_numpy()[candidates])
    keep = thin(np.concatenate([np.atleast_1d(fixed_x), np.atleast_1d(x)]),
                np.concatenate([np.atleast_1d(fixed_y), np.atleast_1d(y)]), DUPLICATE_M,
                n_fixed=np.size(fixed_x))[np.size(fixed_x):]
    table.loc[table.index[candidates[~keep]], "outcome"] = "duplicate_panorama"
    table["keep"] = found & table["outcome"].isna()
    table["uuid"] = [location_uuid(p) if k else "" for p, k in zip(table["pano_id"], table["keep"])]
    return table


class Downloader:
    """The three steps over one aiohttp session, with everything needed to stop and resume cleanly."""

    def __init__(self, points: pd.DataFrame, out: Path, settings: Settings, exclude=((), ()), progress: bool = True,
                 previous: pd.DataFrame | None = None):
        self.points, self.out, self.settings, self.exclude, self.progress = points, out, settings, exclude, progress
        self.previous = previous if previous is not None else pd.DataFrame(columns=DATA_COLUMNS)  # data.csv rows
        self.carried = 0  # rows of earlier runs written again to data.csv
        self.images_dir = out / "images"
        self.counters = Counters()
        self.failures: dict[str, str] = {}  # point_id -> reason (metadata) or uuid -> reason (images)
        self.table: pd.DataFrame | None = None
        self.no_imagery_now: set[str] = set()
        self.complete: set[str] = set()  # uuids with all four views on disk
        self.started = time.monotonic()
        self.last_flush = time.monotonic()
        self.journal: Journal | None = None
        self.images_needed = 0  # --metadata-only: image requests a full run would make
        self.stopping = False  # set by a signal: start no new request

    def _bar(self, total: int, desc: str, unit: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, file=sys.stderr, dynamic_ncols=True)

    async def run(self) -> None:
        self.journal = Journal(self.out / "metadata.jsonl")
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        connector = aiohttp.TCPConnector(limit=self.settings.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            client = StreetViewClient(session, self.settings, self.counters)
            await self._metadata_step(client)
            self.table = choose_panoramas(self.points, self.journal, *self.exclude, self.previous)
            if self.stopping:
                return
            if self.settings.metadata_only:
                self.images_needed = len(self.image_budget_plan(budget=None)[0])
            else:
                await self._image_step(client)

    async def _metadata_step(self, client: StreetViewClient) -> None:
        todo = [row for row in self.points.itertuples(index=False)
                if Journal.point_key(row.point_id, row.latitude, row.longitude) not in self.journal.answers]
        bar = self._bar(len(self.points), "points looked up", "pt")
        bar.update(len(self.points) - len(todo))

        async def look_up(row) -> None:
            try:
                answer = await client.metadata(row.latitude, row.longitude)
            except RequestFailed as error:
                self.failures[row.point_id] = f"metadata {error}"
            else:
                record = {"point_id": row.point_id, "latitude": row.latitude, "longitude": row.longitude,
                          "status": answer["status"]}
                if answer["status"] == "OK":
                    record.update(pano_id=answer["pano_id"], location=answer["location"], date=answer.get("date", ""))
                self.journal.add(record)
            bar.update()

        try:
            await run_pool(todo, look_up, self.settings.concurrency, lambda: self.stopping)
        finally:
            bar.close()

    def image_budget_plan(self, budget: int | None = None) -> tuple[list, list[str]]:
        """The (uuid, pano_id, heading) image jobs of the kept panoramas, location by location, and the uuids
        left out because `budget` images would be exceeded (views already on disk cost nothing)."""
        jobs, over_budget = [], []
        for row in self.table[self.table["keep"]].itertuples(index=False):
            if row.pano_id in self.journal.no_imagery:
                continue
            folder = self.images_dir / row.uuid
            missing = [view for view in VIEWS if check_image(folder / f"{view}.jpg") is not None]
            if not missing:
                self.complete.add(row.uuid)
                continue
            if budget is not None and len(missing) > budget:
                over_budget.append(row.uuid)
                continue
            if budget is not None:
                budget -= len(missing)
            jobs.extend((row.uuid, row.pano_id, view) for view in missing)
        return jobs, over_budget

    async def _image_step(self, client: StreetViewClient) -> None:
        jobs, over_budget = self.image_budget_plan(self.settings.max_images)
        for uuid_ in over_budget:
            self.failures[uuid_] = BUDGET_REASON
        remaining = Counter(job[0] for job in jobs)
        bar = self._bar(len(jobs), "images", "img")
        panoramas = self._bar(len(remaining), "panoramas", "pano")

        async def fetch(job) -> None:
            uuid_, pano_id, view = job
            if uuid_ in self.failures or pano_id in self.journal.no_imagery:
                bar.update()
                return
            try:
                body = await client.image(pano_id, view)
            except BudgetReached:
                self.failures[uuid_] = BUDGET_REASON
            except NoImagery:
                self.journal.add({"no_imagery": pano_id})
                self.no_imagery_now.add(uuid_)
                shutil.rmtree(self.images_dir / uuid_, ignore_errors=True)
            except RequestFailed as error:
                self.failures[uuid_] = f"image {view}: {error}"
            else:
                self.counters.images_received += 1
                path = self.images_dir / uuid_ / f"{view}.jpg"
                with atomic_path(path) as tmp:
                    tmp.write_bytes(body)
                remaining[uuid_] -= 1
                if remaining[uuid_] == 0:
                    self.complete.add(uuid_)
                    panoramas.update()
                    if time.monotonic() - self.last_flush > CSV_FLUSH_S:
                        self.write_data_csv()
            bar.update()

        try:
            await run_pool(jobs, fetch, self.settings.concurrency, lambda: self.stopping)
        finally:
            bar.close()
            panoramas.close()

    def outcomes(self) -> pd.DataFrame:
        """Every input point once, with its outcome ('pending' when the run stopped before reaching it)."""
        table = self.table if self.table is not None else choose_panoramas(self.points, self.journal, (), ())
        report = table[["point_id", "latitude", "longitude"]].copy()
        outcome = table["outcome"].copy()
        for i, row in enumerate(table.itertuples(index=False)):
            if outcome.iloc[i] is not None:
                continue
            if row.point_id in self.failures:
                outcome.iloc[i] = f"failed: {self.failures[row.point_id]}"
            elif not row.keep:
                outcome.iloc[i] = "pending"
            elif row.pano_id in self.journal.no_imagery:
                outcome.iloc[i] = "no_imagery"
            elif row.uuid in self.complete:
                outcome.iloc[i] = "downloaded"
            elif row.uuid in self.failures:
                outcome.iloc[i] = f"failed: {self.failures[row.uuid]}"
            elif self.settings.metadata_only:
                outcome.iloc[i] = "to_download"
            else:
                outcome.iloc[i] = "pending"
        report["outcome"] = outcome.to_numpy()
        report["pano_id"] = table["pano_id"].fillna("")
        report["uuid"] = table["uuid"].where(report["outcome"].eq("downloaded"), "")
        return report[REPORT_COLUMNS]

    def write_data_csv(self) -> int:
        """DIR/data.csv (atomically): the rows it held before (earlier runs) and every complete location of
        these points; returns its row count."""
        self.last_flush = time.monotonic()
        if self.table is None:
            return 0
        done = self.table[self.table["keep"] & self.table["uuid"].isin(self.complete)]
        data = pd.DataFrame({"uuid": done["uuid"], "latitude": done["pano_lat"], "longitude": done["pano_lng"],
                             "pano_id": done["pano_id"], "date": done["date"], "point_id": done["point_id"],
                             "sample_latitude": done["latitude"], "sample_longitude": done["longitude"]})
        earlier = self.previous[~self.previous["uuid"].isin(data["uuid"])]
        self.carried = len(earlier)
        if len(earlier):
            data = pd.concat([earlier, data[DATA_COLUMNS]], ignore_index=True)
        if len(data) or not (self.out / "data.csv").exists():
            write_csv(data[DATA_COLUMNS], self.out / "data.csv")
        return len(data)

    def finish(self) -> pd.DataFrame:
        """Write data.csv and points_report.csv; remove folders of panoramas without imagery."""
        if self.table is not None:
            for row in self.table[self.table["keep"]].itertuples(index=False):
                if row.pano_id in self.journal.no_imagery:
                    shutil.rmtree(self.images_dir / row.uuid, ignore_errors=True)
        if not self.settings.metadata_only:
            self.write_data_csv()
        report = self.outcomes()
        write_csv(report, self.out / "points_report.csv")
        self.journal.close()
        return report

    def summary(self, report: pd.DataFrame) -> str:
        kinds = report["outcome"].str.replace(r"^failed: .*", "failed", regex=True)
        rows = [[kind, count] for kind, count in kinds.value_counts().items()]
        elapsed = time.monotonic() - self.started
        rows += [["metadata requests", self.counters.requests["metadata"]],
                 ["image requests", self.counters.requests["image"]],
                 ["retries", self.counters.requests["retry"]],
                 ["images received", self.counters.images_received],
                 ["seconds", f"{elapsed:.1f}"]]
        if self.carried:
            rows.append(["data.csv rows of earlier runs kept", self.carried])
        return tabulate(rows, headers=["points / requests", "count"])


def save_run_parameters(args: argparse.Namespace, out: Path) -> None:
    """DIR/run.json: the flags of the run, the key and secret masked."""
    params = {name: (str(value) if isinstance(value, Path) else value) for name, value in vars(args).items()}
    params["key"] = "***" if args.key else None
    params["secret"] = "***" if args.secret else None
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(params, indent=2, default=str) + "\n")


async def _run_until_signal(downloader: Downloader) -> int | None:
    """Run the downloader until done or SIGINT/SIGTERM; returns the signal number, or None.

    A signal starts no new request and gives those in flight STOP_GRACE_S to finish (so no image that
    arrives is fetched again by the rerun), then cancels the rest; a second signal cancels at once."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received: list[int] = []
    timers = []

    def stop(signum: int) -> None:
        if received:
            task.cancel()
            return
        received.append(signum)
        downloader.stopping = True
        timers.append(loop.call_later(STOP_GRACE_S, task.cancel))

    for signum in SIGNAL_EXIT:
        loop.add_signal_handler(signum, stop, signum)
    try:
        await downloader.run()
    except asyncio.CancelledError:
        if not received:
            raise
    finally:
        for timer in timers:
            timer.cancel()
        for signum in SIGNAL_EXIT:
            loop.remove_signal_handler(signum)
    return received[0] if received else None


def check_args(args: argparse.Namespace) -> None:
    check_ranges(args, [Rule("radius", lambda v: 0 < v <= 50_000, "metres from 1 to 50000 (e.g. 500)"),
                        Rule("concurrency", lambda v: 1 <= v <= 1000, "requests in flight from 1 to 1000"),
                        Rule("qps", non_negative_finite, "requests per second >= 0 (0: no cap)"),
                        Rule("timeout", positive_finite, "seconds > 0 (e.g. 30)"),
                        Rule("retries", lambda v: 0 <= v <= 20, "a count from 0 to 20"),
                        Rule("max_images", at_least(0), "a count >= 0")])
    url = urlsplit(args.api_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise UserError(f"--api-url {args.api_url}: give an http(s) URL (default: {DEFAULT_API_URL})")
    if args.secret:
        try:
            base64.urlsafe_b64decode(args.secret)
        except (binascii.Error, ValueError):
            raise UserError("--secret: not a url-safe base64 signing secret (copy it from the Cloud console)") from None
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: is a file; give a new or existing directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {args.out}: cannot create it ({error.strerror})") from None
    if not os.access(args.out, os.W_OK | os.X_OK):
        raise UserError(f"--out {args.out}: not writable")
