"""src.download against the Street View emulator (a real aiohttp server on 127.0.0.1)."""

import base64
import email.utils
import hashlib
import hmac
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from aiohttp import web

from src import download
from src.collect import streetview
from src.data.images import check_image
from src.data.ingest import read_datasets
from src.data.sampling import sample_points
from src.collect.emulator import StreetViewEmulator, running
from src.collect.streetview import retry_after_seconds
from tests.test_cli import assert_user_error, run_command
from tests.test_cli import test_help_lists_every_flag_with_its_default as check_help

ROOT = Path(__file__).resolve().parent.parent
KEY = "AIzaTEST-key-0123456789"
SECRET = base64.urlsafe_b64encode(b"a signing secret of twenty+ bytes").decode()


def make_world(tmp_path: Path, n: int = 24, seed: int = 7):
    """Points 3+ km apart and panoramas ~100 m from most of them; returns (points CSV, panoramas, expectations).

    Points 0-17: a panorama each (pano0..pano17). Points 18-19: nothing near. Point 20 and 21: next to pano0 and
    pano1 (duplicate panoramas). Point 22: next to pano18, which is 2 m from pano2 (a duplicate place).
    Point 23: a panorama of its own (pano19).
    """
    points = sample_points(n, seed=seed, min_distance_m=3000)
    lat, lng = points["latitude"].to_numpy().copy(), points["longitude"].to_numpy().copy()
    panoramas = [(f"pano{i}", lat[i] + 0.0009, lng[i]) for i in range(18)]
    lat[20], lng[20] = lat[0] + 0.0015, lng[0]
    lat[21], lng[21] = lat[1] + 0.0015, lng[1]
    panoramas.append(("pano18", lat[2] + 0.0009, lng[2] + 0.000025))  # ~2 m east of pano2
    lat[22], lng[22] = lat[2] + 0.0009, lng[2] + 0.0015  # nearest to pano18
    panoramas.append(("pano19", lat[23] - 0.0009, lng[23]))
    points["latitude"], points["longitude"] = lat, lng
    path = tmp_path / "points.csv"
    points.to_csv(path, index=False)
    return path, panoramas


def run_download(*args) -> None:
    download.main([str(a) for a in args] + ["--no-progress"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One signed run with every fault injected once (or forever where noted)."""
    tmp = tmp_path_factory.mktemp("download")
    points_csv, panoramas = make_world(tmp)
    points = pd.read_csv(points_csv)
    emulator = StreetViewEmulator(panoramas, key=KEY, secret=SECRET, latency=lambda request: 0.01)
    emulator.inject("429", "image", match="pano=pano3&heading=90")
    emulator.inject("500", "image", match="pano=pano4&heading=0")
    emulator.inject("slow", "image", match="pano=pano5&heading=180")
    emulator.inject("truncated", "image", match="pano=pano6&heading=270")
    emulator.inject("no_imagery", "image", match="pano=pano7&", times=None)
    emulator.inject("500", "metadata", match=f"location={points['latitude'][8]:.7f}")
    emulator.inject("over_query_limit", "metadata", match=f"location={points['latitude'][9]:.7f}")
    emulator.inject("zero_results", "metadata", match=f"location={points['latitude'][10]:.7f}")
    out = tmp / "out"
    with running(emulator) as url:
        started = time.monotonic()
        run_download("--points", points_csv, "--out", out, "--api-url", url, "--key", KEY, "--secret", SECRET,
                     "--concurrency", 4, "--qps", 30, "--timeout", 1)
        seconds = time.monotonic() - started
    return out, points, panoramas, emulator, seconds


def test_full_run_accounts_for_every_point(full_run):
    out, points, panoramas, emulator, _ = full_run
    report = pd.read_csv(out / "points_report.csv", dtype={"point_id": str}, keep_default_na=False)
    assert report["point_id"].tolist() == points["point_id"].astype(str).tolist()
    expected = {i: "downloaded" for i in range(24)}
    expected.update({7: "no_imagery", 10: "no_panorama", 18: "no_panorama", 19: "no_panorama",
                     20: "duplicate_panorama", 21: "duplicate_panorama", 22: "duplicate_panorama"})
    assert dict(enumerate(report["outcome"])) == expected
    data = pd.read_csv(out / "data.csv")
    assert list(data.columns) == streetview.DATA_COLUMNS
    downloaded = [i for i, outcome in expected.items() if outcome == "downloaded"]
    positions = {pano: (lat, lng) for pano, lat, lng in panoramas}
    assert data["pano_id"].tolist() == [f"pano{i}" if i < 18 else "pano19" for i in downloaded]
    assert data["uuid"].tolist() == [str(__import__("uuid").uuid5(streetview.UUID_NAMESPACE, p)) for p in data["pano_id"]]
    pano_lat, pano_lng = zip(*(positions[p] for p in data["pano_id"]))
    assert np.allclose(data["latitude"], pano_lat) and np.allclose(data["longitude"], pano_lng)
    assert np.allclose(data["sample_latitude"], points["latitude"][downloaded])
    # only complete JPEGs on disk, four per row, and nothing else (no folder of pano7, no temporary file)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(data["uuid"])
    for folder in (out / "images").iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["0.jpg", "180.jpg", "270.jpg", "90.jpg"]
        assert all(check_image(p, full_decode=True) is None for p in folder.iterdir())
    # every fault was met and recovered from: one successful fetch per image
    assert all(emulator.stats.requests[target, fault] == 1 for target, fault in
               [("image", "429"), ("image", "500"), ("image", "slow"), ("image", "truncated"),
                ("metadata", "500"), ("metadata", "over_query_limit"), ("metadata", "zero_results")])
    assert set(emulator.stats.served.values()) == {1} and len(emulator.stats.served) == 4 * len(data)


def test_concurrency_and_qps_limits_seen_by_the_server(full_run):
    _, _, _, emulator, seconds = full_run
    assert 2 <= emulator.stats.max_in_flight <= 4
    assert emulator.stats.max_per_second() <= 30
    requests = sum(emulator.stats.requests.values())
    assert seconds >= (requests - 30) / 30  # the cap held the pace down


def test_output_is_a_dataset_that_trains(full_run, tmp_path):
    out = full_run[0]
    ingested = read_datasets([out], progress=False)
    assert len(ingested.locations) == 17 and ingested.skipped.empty and ingested.orphans.empty
    run = run_command("train", "--approach", "classification", "--quick", "--dataset-dirs", out, "--backbone", "tiny",
                      "--no-pretrained", "--batch-size", 8, "--num-workers", 0, "--spacing", 2, "--out-dir",
                      tmp_path / "reports", "--cache-dir", tmp_path / "cache", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip().splitlines()[-1].removeprefix("checkpoint: ")).exists()


def test_key_and_secret_never_leave_the_process(full_run):
    out = full_run[0]
    for path in out.rglob("*"):
        if path.is_file() and path.suffix != ".jpg":
            text = path.read_text()
            assert KEY not in text and SECRET not in text, path
    assert '"key": "***"' in (out / "run.json").read_text()


def test_signature_matches_googles_recipe():
    settings = streetview.Settings(api_url="https://maps.googleapis.com/maps/api/streetview", key=KEY, secret=SECRET)
    client = streetview.StreetViewClient(None, settings, streetview.Counters())
    url = str(client.url("/metadata", {"location": "45.1,15.2", "radius": "50"}))
    signed, signature = url.split("&signature=")
    path_and_query = signed.removeprefix("https://maps.googleapis.com")
    assert path_and_query == f"/maps/api/streetview/metadata?location=45.1%2C15.2&radius=50&key={KEY}"
    digest = hmac.new(base64.urlsafe_b64decode(SECRET), path_and_query.encode(), hashlib.sha1).digest()
    assert signature == base64.urlsafe_b64encode(digest).decode()


def test_bad_key_stops_after_a_few_requests(tmp_path):
    points_csv, panoramas = make_world(tmp_path)
    emulator = StreetViewEmulator(panoramas, key=KEY)
    with running(emulator) as url:
        run = run_command("download", "--points", points_csv, "--out", tmp_path / "out", "--api-url", url,
                          "--key", "wrong-key-123", "--concurrency", 3, "--no-progress", cwd=tmp_path)
    assert_user_error(run, "REQUEST_DENIED", "--key")
    assert "wrong-key-123" not in run.stderr + run.stdout
    assert sum(emulator.stats.requests.values()) <= 3
    assert pd.read_csv(tmp_path / "out" / "points_report.csv")["outcome"].eq("pending").all()


def test_metadata_only_estimate_and_image_budget(tmp_path):
    points_csv, panoramas = make_world(tmp_path)
    emulator = StreetViewEmulator(panoramas, key=KEY)
    out = tmp_path / "out"
    with running(emulator) as url:
        run = run_command("download", "--points", points_csv, "--out", out, "--api-url", url, "--key", KEY,
                          "--qps", 0, "--metadata-only", "--no-progress", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert "19 panoramas to download = 76 image requests" in run.stderr
        assert emulator.stats.requests["image", "ok"] == 0 and not (out / "data.csv").exists()
        run_download("--points", points_csv, "--out", out, "--api-url", url, "--key", KEY, "--qps", 0,
                     "--max-images", 10)
    assert emulator.stats.requests["metadata", "ok"] == 24  # the rerun used the journal
    assert sum(emulator.stats.served.values()) == 8  # two whole locations; a third would exceed 10
    report = pd.read_csv(out / "points_report.csv")
    assert report["outcome"].eq("downloaded").sum() == 2 and len(pd.read_csv(out / "data.csv")) == 2
    assert report["outcome"].str.contains("--max-images").sum() == 17


def test_sigint_then_rerun_resumes_without_refetching(tmp_path):
    points_csv, panoramas = make_world(tmp_path)
    emulator = StreetViewEmulator(panoramas, key=KEY, latency=lambda request: 0.15)
    out = tmp_path / "out"
    with running(emulator) as url:
        args = ["--points", points_csv, "--out", out, "--api-url", url, "--qps", 0, "--concurrency", 2]
        env = {**os.environ, streetview.KEY_ENV: KEY}
        process = subprocess.Popen([sys.executable, "-m", "src.download", *map(str, args)], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(list((out / "images").glob("*/*.jpg"))) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        assert time.monotonic() - sent < 5
        assert process.returncode == 130, stderr
        assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
        assert not list(out.rglob("*.tmp*"))
        on_disk = {(p.parent.name, int(p.stem)) for p in (out / "images").glob("*/*.jpg")}
        partial = pd.read_csv(out / "data.csv") if (out / "data.csv").exists() else pd.DataFrame(columns=["uuid"])
        assert 0 < len(on_disk) < 76 and set(partial["uuid"]) <= {uuid for uuid, _ in on_disk}
        emulator.latency = lambda request: 0.005
        os.environ[streetview.KEY_ENV] = KEY
        try:
            run_download(*args)
        finally:
            del os.environ[streetview.KEY_ENV]
    data = pd.read_csv(out / "data.csv")
    assert sorted(data["pano_id"]) == sorted(f"pano{i}" for i in [*range(18), 19])
    assert data["uuid"].is_unique
    assert emulator.stats.requests["metadata", "ok"] == 24  # no point looked up twice
    by_uuid = {streetview.location_uuid(pano): pano for pano in data["pano_id"]}
    assert all(emulator.stats.served[by_uuid[uuid], view] == 1 for uuid, view in on_disk)
    assert set(emulator.stats.served.values()) == {1}  # the requests in flight at the signal were finished


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "bad.csv").write_text("point_id,latitude,longitude\n0,45.1,15.2\n1,north,15.0\n")
    (tmp_path / "cols.csv").write_text("id,lat,lon\n0,45.1,15.2\n")
    (tmp_path / "noid.csv").write_text("point_id,latitude,longitude\n0,45.1,15.2\n,45.2,15.3\n")
    (tmp_path / "afile").write_text("x")
    good = tmp_path / "good.csv"
    good.write_text("point_id,latitude,longitude\n0,45.1,15.2\n")
    base = ["--key", KEY, "--api-url", "http://127.0.0.1:9/maps/api/streetview"]
    cases = [
        (["--points", tmp_path / "missing.csv", "--out", tmp_path / "o"], "missing.csv"),
        (["--points", tmp_path / "bad.csv", "--out", tmp_path / "o"], "line 3"),
        (["--points", tmp_path / "cols.csv", "--out", tmp_path / "o"], "point_id"),
        (["--points", tmp_path / "noid.csv", "--out", tmp_path / "o"], "line 3: empty point_id"),
        (["--points", good, "--out", tmp_path / "afile"], "--out"),
        (["--points", good, "--out", tmp_path / "afile" / "sub"], "--out"),
        (["--points", good, "--out", tmp_path / "o", "--qps", -1], "--qps"),
        (["--points", good, "--out", tmp_path / "o", "--concurrency", 0], "--concurrency"),
        (["--points", good, "--out", tmp_path / "o", "--secret", "not base64!"], "--secret"),
        (["--points", good, "--out", tmp_path / "o", "--api-url", "ftp://x"], "--api-url"),
    ]
    for args, fragment in cases:
        assert_user_error(run_command("download", *base, *args, cwd=tmp_path), fragment)
    run = run_command("download", "--points", good, "--out", tmp_path / "o", "--key", "", cwd=tmp_path)
    assert_user_error(run, "STREETVIEW_API_KEY")


def test_help_lists_every_flag_with_its_default(tmp_path):
    check_help("download", tmp_path)


def test_failed_points_are_reported_then_retried_by_a_rerun(tmp_path):
    points_csv, panoramas = make_world(tmp_path)
    points = pd.read_csv(points_csv)
    emulator = StreetViewEmulator(panoramas, key=KEY)
    emulator.inject("500", "metadata", match=f"location={points['latitude'][4]:.7f}", times=None)
    emulator.inject("500", "image", match="pano=pano5&heading=90", times=None)
    out = tmp_path / "out"
    with running(emulator) as url:
        args = ["download", "--points", points_csv, "--out", out, "--api-url", url, "--key", KEY, "--qps", 0,
                "--retries", 1, "--no-progress"]
        run = run_command(*args, cwd=tmp_path)
        assert run.returncode == 0 and "2 points failed" in run.stderr, run.stderr
        report = pd.read_csv(out / "points_report.csv")
        assert report["outcome"][4] == "failed: metadata HTTP 500 (2 attempts)"
        assert report["outcome"][5] == "failed: image 90: HTTP 500 (2 attempts)"
        assert "pano5" not in pd.read_csv(out / "data.csv")["pano_id"].tolist()
        emulator.faults.clear()
        assert run_command(*args, cwd=tmp_path).returncode == 0
    report = pd.read_csv(out / "points_report.csv")
    assert report["outcome"][4] == report["outcome"][5] == "downloaded"
    assert set(emulator.stats.served.values()) == {1}  # pano5's three good views were kept, not fetched again


def test_the_image_budget_counts_retries(tmp_path):
    """--max-images is a hard cap on image requests sent: retried requests count, so none is sent past it."""
    points_csv, panoramas = make_world(tmp_path)
    emulator = StreetViewEmulator(panoramas, key=KEY)
    emulator.inject("500", "image", match="pano=pano0&heading=0", times=3)
    out = tmp_path / "out"
    with running(emulator) as url:
        run_download("--points", points_csv, "--out", out, "--api-url", url, "--key", KEY, "--qps", 0,
                     "--max-images", 8, "--concurrency", 2)
    assert sum(count for (target, _), count in emulator.stats.requests.items() if target == "image") == 8
    report = pd.read_csv(out / "points_report.csv")
    # which of pano0 and pano1 completes (if either) depends on how the two workers interleave with the
    # retries; never both, and every other point waits for a later run
    downloaded = int(report["outcome"].eq("downloaded").sum())
    assert downloaded <= 1 and report["outcome"].str.contains("--max-images").sum() == 19 - downloaded
    assert len(pd.read_csv(out / "data.csv")) == downloaded if downloaded else not (out / "data.csv").exists() or \
        pd.read_csv(out / "data.csv").empty


def test_a_run_over_other_points_keeps_the_earlier_rows_and_dedupes_against_them(tmp_path):
    """Growing one dataset dir with a second points file: earlier rows stay, their panoramas are not repeated."""
    points_csv, panoramas = make_world(tmp_path)
    points = pd.read_csv(points_csv)
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    points[:12].to_csv(first, index=False)
    points[12:].assign(point_id=range(12)).to_csv(second, index=False)  # point ids 0-11 again, other places
    emulator = StreetViewEmulator(panoramas, key=KEY)
    out = tmp_path / "out"
    with running(emulator) as url:
        common = ["--out", out, "--api-url", url, "--key", KEY, "--qps", 0]
        run_download("--points", first, *common)
        before = pd.read_csv(out / "data.csv")
        run_download("--points", second, *common)
        run_download("--points", second, *common)  # a rerun of the same command adds nothing
    after = pd.read_csv(out / "data.csv")
    assert after[:len(before)].equals(before) and after["uuid"].is_unique
    assert sorted(after["pano_id"]) == sorted(f"pano{i}" for i in [*range(18), 19])
    report = pd.read_csv(out / "points_report.csv")  # of the second points: 20, 21 and 22 found pano0, 1, 18
    assert report["outcome"].tolist()[6:] == ["no_panorama"] * 2 + ["duplicate_panorama"] * 3 + ["downloaded"]
    assert set(emulator.stats.served.values()) == {1}
    assert len(read_datasets([out], progress=False).locations) == 19


def test_stops_at_once_when_the_url_is_not_a_street_view_api(tmp_path):
    points_csv, panoramas = make_world(tmp_path)
    emulator = StreetViewEmulator(panoramas, key=KEY)
    with running(emulator) as url:
        run = run_command("download", "--points", points_csv, "--out", tmp_path / "out", "--api-url",
                          url.replace("/maps/api/streetview", "/maps/api/streetvue"), "--key", KEY,
                          "--concurrency", 3, "--no-progress", cwd=tmp_path)
    assert_user_error(run, "HTTP 404", "--api-url")
    assert len(emulator.stats.arrivals) <= 3


def test_an_out_dir_holding_another_dataset_is_refused(tmp_path, demo_dir):
    points_csv, _ = make_world(tmp_path)
    lumen = tmp_path / "lumen"
    shutil.copytree(demo_dir, lumen)
    data_csv = (lumen / "data.csv").read_bytes()
    run = run_command("download", "--points", points_csv, "--out", lumen, "--key", KEY, "--api-url",
                      "http://127.0.0.1:9/maps/api/streetview", cwd=tmp_path)
    assert_user_error(run, "data.csv: not written by src.download", "pano_id")
    assert (lumen / "data.csv").read_bytes() == data_csv and not (lumen / "run.json").exists()


def test_sigterm_cancels_the_requests_that_outlast_the_grace(tmp_path):
    """Image answers take 4 s: SIGTERM waits STOP_GRACE_S for them, then cancels; exit 143, nothing partial."""
    points_csv, panoramas = make_world(tmp_path)
    emulator = StreetViewEmulator(panoramas, key=KEY, latency=lambda request: 4.0 if "heading=" in request.query_string
                                  else 0.0)
    out = tmp_path / "out"
    with running(emulator) as url:
        args = ["--points", points_csv, "--out", out, "--api-url", url, "--qps", 0, "--concurrency", 4, "--no-progress"]
        process = subprocess.Popen([sys.executable, "-m", "src.download", *map(str, args)], cwd=ROOT,
                                   env={**os.environ, streetview.KEY_ENV: KEY}, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (emulator.stats.requests["metadata", "ok"] == 24 and emulator.stats.in_flight == 4) \
                and time.monotonic() < deadline:  # four image requests held by the emulator
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        assert streetview.STOP_GRACE_S <= time.monotonic() - sent < streetview.STOP_GRACE_S + 3
    assert process.returncode == 143 and "interrupted (SIGTERM): rerun the same command" in stderr, stderr
    assert "Traceback" not in stderr and not list(out.rglob("*.tmp*")) and not list(out.rglob("*.jpg"))
    report = pd.read_csv(out / "points_report.csv")
    assert len(report) == 24 and report["outcome"].eq("pending").sum() == 19


def test_an_output_that_cannot_be_written_mid_run_is_one_line(tmp_path):
    points_csv, panoramas = make_world(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").write_text("a file where the image folders go")
    with running(StreetViewEmulator(panoramas, key=KEY)) as url:
        run = run_command("download", "--points", points_csv, "--out", out, "--api-url", url, "--key", KEY,
                          "--qps", 0, "--no-progress", cwd=tmp_path)
    assert_user_error(run, "images/", "Not a directory")
    assert len(pd.read_csv(out / "points_report.csv")) == 24


class DatedRetryAfterEmulator(StreetViewEmulator):
    """Its 429 answers say when to come back as an HTTP date (RFC 9110) `ahead_s` from now, not in seconds;
    it notes when each request for `watched` arrives."""

    def __init__(self, *args, watched: str, ahead_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.watched, self.ahead_s, self.watched_arrivals = watched, ahead_s, []

    async def _image(self, request):
        if self.watched in request.query_string:
            self.watched_arrivals.append(time.time())
        return await super()._image(request)

    async def _answer_fault(self, fault, request):
        if fault == "429":
            when = email.utils.formatdate(time.time() + self.ahead_s, usegmt=True)
            return web.json_response({"error": "rate limited"}, status=429, headers={"Retry-After": when})
        return await super()._answer_fault(fault, request)


def test_a_retry_after_date_is_honoured(tmp_path):
    points_csv, panoramas = make_world(tmp_path)
    watched = "pano=pano3&heading=90"
    emulator = DatedRetryAfterEmulator(panoramas, key=KEY, watched=watched, ahead_s=3.0)
    emulator.inject("429", "image", match=watched)
    with running(emulator) as url:
        run_download("--points", points_csv, "--out", tmp_path / "out", "--api-url", url, "--key", KEY,
                     "--concurrency", 4, "--qps", 0)
    first, retry = emulator.watched_arrivals
    # the date has whole seconds: it lies 2-3 s after the 429; the backoff alone waits at most 0.5 s
    assert retry - first >= 2.0, retry - first
    assert emulator.stats.served["pano3", 90] == 1


def test_retry_after_seconds_reads_both_forms():
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds("-3") == 0.0
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 58.0 <= retry_after_seconds(later) <= 60.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait
    assert retry_after_seconds("soon") == 0.0


def test_an_unreachable_endpoint_stops_the_run_with_one_line(tmp_path):
    """Connections refused (a closed port on 127.0.0.1): the run stops after one point's attempts, not every
    point's, with one error line; the points stay pending for a rerun."""
    points_csv, _ = make_world(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    run = run_command("download", "--points", points_csv, "--out", tmp_path / "out", "--api-url",
                      f"http://127.0.0.1:{port}/maps/api/streetview", "--key", KEY, "--retries", 2,
                      "--concurrency", 2, "--no-progress", cwd=tmp_path)
    line = assert_user_error(run, f"cannot connect to http://127.0.0.1:{port}", "3 attempts in a row", "--api-url")
    assert KEY not in run.stderr + run.stdout and "points failed" not in run.stderr, line
    assert pd.read_csv(tmp_path / "out" / "points_report.csv")["outcome"].eq("pending").all()
