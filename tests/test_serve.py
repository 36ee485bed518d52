"""The server: a real `python -m src.serve` process on 127.0.0.1 driven by an aiohttp client (every endpoint,
every bad request, a bounded load test), graceful SIGINT/SIGTERM, and the web page in a real browser."""

import asyncio
import base64
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import shapely

from src.core import geo
from src.data.images import VIEWS
from src.core.errors import run_cli
from src.predict import main as predict_main
from src.serve import build_parser
from src.serve import main as serve_main

REPO = Path(__file__).resolve().parent.parent
FIGURES = REPO / "figures"


class Server:
    """`python -m src.serve ... --port 0` in a subprocess; `url` once it listens."""

    def __init__(self, *args, timeout: float = 120):
        self.process = subprocess.Popen([sys.executable, "-m", "src.serve", "--port", "0", *map(str, args)], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()  # blocks until the first stdout line (or exit)
        if not line.startswith("serving on "):
            self.process.kill()
            raise AssertionError(f"server did not start: {line!r} {self.process.stderr.read()[-3000:]}")
        self.url = line.split()[2]

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> tuple[int, float, str]:
        """Send `sig`; (exit code, seconds to exit, stderr)."""
        start = time.monotonic()
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        return code, time.monotonic() - start, self.process.stderr.read()


def run(coroutine):
    return asyncio.run(coroutine)


def views_form(folder: Path | None = None, views=VIEWS, files: dict | None = None) -> aiohttp.FormData:
    """Multipart form with the view files of `folder` (only `views`), or with raw `files` {field: bytes}."""
    form = aiohttp.FormData()
    files = files if files is not None else {str(v): (folder / f"{v}.jpg").read_bytes() for v in views}
    for name, data in files.items():
        form.add_field(name, data, filename=f"{name}.jpg", content_type="image/jpeg")
    return form


async def call(url: str, method: str = "GET", path: str = "/api/health", **kwargs) -> tuple[int, str, object]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, **kwargs) as response:
            body = await response.read()
            kind = response.content_type
            return response.status, kind, json.loads(body) if kind.endswith("json") else body


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    """One server with both tiny checkpoints (classification first: the default model), micro-batches of up to 8."""
    server = Server("--checkpoint", tiny_checkpoints["classification"], tiny_checkpoints["regression"],
                    "--max-batch", 8, "--batch-wait-ms", 10, "--max-upload-mb", 1)
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def test_page_health_models_border_examples(server, tiny_checkpoints):
    status, kind, page = run(call(server.url, path="/"))
    assert status == 200 and kind == "text/html" and b"Try an example" in page and b"/static/app.js" in page
    assert b"http" not in page.replace(b"http://www.w3.org/2000/svg", b"")  # no CDN: everything comes from here
    status, kind, script = run(call(server.url, path="/static/app.js"))
    assert status == 200 and b"/api/predict" in script and b"http" not in script.replace(b"http://www.w3.org", b"")
    status, _, health = run(call(server.url))
    assert status == 200 and health["status"] == "ok" and health["models"] == 2
    status, _, models = run(call(server.url, path="/api/models"))
    assert status == 200
    [cls, reg] = models["models"]
    assert cls["approach"] == "classification" and reg["approach"] == "regression"
    assert cls["backbone"] == "tiny" and cls["image_size"] == 32 and cls["engine"] == "onnx"
    assert cls["classes"] > 10 and reg["classes"] == 0 and cls["checkpoint"] == str(tiny_checkpoints["classification"])
    status, _, border = run(call(server.url, path="/api/border"))
    assert status == 200 and border["type"] == "FeatureCollection"
    status, _, examples = run(call(server.url, path="/api/examples"))
    example = examples["examples"][0]
    assert status == 200 and len(examples["examples"]) >= 4 and set(example["views"]) == {"0", "90", "180", "270"}
    assert example["views"]["0"].startswith("data:image/jpeg;base64,/9j/")
    assert geo.load_border().contains(shapely.Point(example["longitude"], example["latitude"]))


def test_predict_gives_src_predicts_coordinates_and_reports_substituted_views(server, demo_dir, tmp_path, capsys):
    folders = sorted((demo_dir / "data").iterdir())[:3]
    sent = {folders[0].name: VIEWS, folders[1].name: (0, 180, 270), folders[2].name: (180,)}
    # the same images as a test set for src.predict (missing views deleted there too)
    for folder in folders:
        shutil.copytree(folder, tmp_path / "images" / folder.name)
        for view in set(VIEWS) - set(sent[folder.name]):
            (tmp_path / "images" / folder.name / f"{view}.jpg").unlink()
    _, _, models = run(call(server.url, path="/api/models"))
    [cls, _] = models["models"]
    expected = predict_main(["--checkpoint", cls["checkpoint"], "--images", str(tmp_path), "--engine", "onnx"])
    assert "replaced 4 missing" in capsys.readouterr().err
    for folder, row in zip(folders, expected.itertuples()):
        status, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(folder, sent[folder.name])))
        assert status == 200, answer
        assert (answer["latitude"], answer["longitude"]) == pytest.approx((row.latitude, row.longitude), abs=1e-6)
        assert answer["model"] == cls["name"] and answer["engine"] == "onnx"
        top = answer["top"]
        assert len(top) == 5 and all(a["probability"] >= b["probability"] for a, b in zip(top, top[1:]))
        assert all(0 < t["probability"] <= 1 and len(t["bounds"]) == 4 for t in top)
        west, south, east, north = top[0]["bounds"]
        assert west < east and south < north and east - west == pytest.approx(0.5)  # the run's 0.5 degree cells
    status, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(folders[1], (0, 180, 270))))
    assert answer["substituted_views"] == [{"view": 90, "reason": "missing", "used": 180}]
    status, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(folders[2], (180,))))
    assert [(s["view"], s["used"]) for s in answer["substituted_views"]] == [(0, 180), (90, 180), (270, 180)]


def test_model_parameter_selects_a_checkpoint(server, demo_dir):
    folder = sorted((demo_dir / "data").iterdir())[0]
    _, _, models = run(call(server.url, path="/api/models"))
    regression = models["models"][1]["name"]
    status, _, answer = run(call(server.url, "POST", "/api/predict", params={"model": regression},
                                 data=views_form(folder)))
    assert status == 200 and answer["model"] == regression and answer["top"] == []
    status, _, default = run(call(server.url, "POST", "/api/predict", data=views_form(folder)))
    assert default["latitude"] != answer["latitude"]
    status, kind, error = run(call(server.url, "POST", "/api/predict", params={"model": "nope"},
                                   data=views_form(folder)))
    assert status == 404 and kind == "application/json" and "unknown model 'nope'" in error["error"]


def jpeg(demo_dir) -> bytes:
    return (sorted((demo_dir / "data").iterdir())[0] / "0.jpg").read_bytes()


BAD_REQUESTS = {
    "not an image": (lambda j: {"data": views_form(files={"0": b"GIF? no, plain text"})}, 400, "field 0: not an image"),
    "truncated JPEG": (lambda j: {"data": views_form(files={"90": j[:len(j) // 2]})}, 400, "field 90: truncated JPEG"),
    "corrupt JPEG": (lambda j: {"data": views_form(files={"0": j[:200] + bytes(len(j) - 200)})}, 400, "field 0:"),
    "decompression bomb": (lambda j: {"data": views_form(files={"0": png(15000, 15000)})}, 400,
                           "field 0: image too large"),
    "empty file": (lambda j: {"data": views_form(files={"180": b""})}, 400, "field 180: empty file"),
    "no views": (lambda j: {"data": aiohttp.FormData({"x": "1"}, default_to_multipart=True)}, 400, "unknown field 'x'"),
    "empty body": (lambda j: {"data": b"", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, 400,
                   "malformed multipart body"),
    "no fields": (lambda j: {"data": b"--zz--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}},
                  400, "no views"),
    "unknown field": (lambda j: {"data": views_form(files={"0": j, "45": j})}, 400, "unknown field '45'"),
    "field twice": (lambda j: {"data": twice(j)}, 400, "field 0 sent twice"),
    "not multipart": (lambda j: {"json": {"0": "abc"}}, 415, "send multipart/form-data"),
    "over --max-upload-mb": (lambda j: {"data": views_form(files={"0": j + bytes(1_200_000)})}, 413,
                             "over the limit of 1 MB"),
}


def png(width: int, height: int) -> bytes:
    """A black PNG: 15000x15000 is 650 kB on the wire, 225 M pixels decoded (over PIL's bomb limit)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def twice(data: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("0", data, filename="a.jpg")
    form.add_field("0", data, filename="b.jpg")
    return form


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_uploads_get_a_4xx_json_error(server, demo_dir, case):
    make, expected_status, fragment = BAD_REQUESTS[case]
    status, kind, answer = run(call(server.url, "POST", "/api/predict", **make(jpeg(demo_dir))))
    assert status == expected_status and kind == "application/json", (status, answer)
    assert fragment in answer["error"], answer


@pytest.mark.parametrize("method, path, status, fragment", [
    ("GET", "/api/predict", 405, "method GET not allowed for /api/predict; use POST"),
    ("DELETE", "/api/models", 405, "not allowed"),
    ("POST", "/api/health", 405, "not allowed"),
    ("GET", "/api/nothing", 404, "no such endpoint"),
    ("GET", "/static/../src/serve.py", 404, ""),
    ("GET", "/static/nope.js", 404, "no such file: /static/nope.js"),
    ("GET", "/static/", 404, ""),
])
def test_wrong_methods_and_paths_get_a_4xx_json_error(server, method, path, status, fragment):
    got, kind, answer = run(call(server.url, method, path))
    assert got == status and kind == "application/json" and fragment in answer["error"], answer


def test_micro_batched_load(server, demo_dir):
    """16 concurrent clients x 25 requests: every answer 200 and right; requests were batched together."""
    folders = sorted((demo_dir / "data").iterdir())[:16]
    files = [{str(v): (f / f"{v}.jpg").read_bytes() for v in VIEWS} for f in folders]
    _, _, before = run(call(server.url))

    async def client(session, i, latencies, answers):
        for _ in range(25):
            start = time.perf_counter()
            async with session.post(server.url + "/api/predict", data=views_form(files=files[i])) as response:
                answers[i].append((response.status, await response.json()))
            latencies.append(time.perf_counter() - start)

    async def load():
        latencies, answers = [], [[] for _ in folders]
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(client(session, i, latencies, answers) for i in range(16)))
        return latencies, answers

    start = time.perf_counter()
    latencies, answers = run(load())
    seconds = time.perf_counter() - start
    assert all(status == 200 for per_client in answers for status, _ in per_client)
    for per_client in answers:  # each client always gets its own location's (deterministic) answer
        assert len({(a["latitude"], a["longitude"]) for _, a in per_client}) == 1
    # the clients' locations get different answers (compared on the class probabilities: the points of a
    # barely trained model can all be moved to the same nearest land point)
    assert len({str(a[0][1]["top"]) for a in answers}) > 8
    _, _, after = run(call(server.url))
    batches, locations = after["batches"] - before["batches"], after["locations"] - before["locations"]
    assert locations == 400 and batches < 400 and after["largest_batch"] > 1 and after["largest_batch"] <= 8
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    print(f"\nload: 16 clients x 25 requests in {seconds:.2f} s ({400 / seconds:.0f} locations/s), "
          f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms, {batches} batches (mean {locations / batches:.1f}, "
          f"largest {after['largest_batch']})")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_the_server_gracefully(tiny_checkpoints, demo_dir, sig):
    """An in-flight request (held in the batcher for 1.5 s) is answered; then the process exits 0 within seconds."""
    server = Server("--checkpoint", tiny_checkpoints["classification"], "--batch-wait-ms", 1000, "--max-batch", 4)
    folder = sorted((demo_dir / "data").iterdir())[0]

    async def request_then_signal():
        async with aiohttp.ClientSession() as session:
            async def post():
                async with session.post(server.url + "/api/predict", data=views_form(folder)) as response:
                    return response.status, await response.json()
            task = asyncio.create_task(post())
            await asyncio.sleep(0.4)
            server.process.send_signal(sig)
            return await task

    start = time.monotonic()
    status, answer = run(request_then_signal())
    assert status == 200 and "latitude" in answer
    code = server.process.wait(10)
    assert code == 0 and time.monotonic() - start < 8
    assert "shutting down" in server.process.stderr.read()
    with pytest.raises(aiohttp.ClientConnectionError):
        run(call(server.url))


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    for args, fragment in [(["--checkpoint", tmp_path / "none.ckpt"], "file not found"),
                           (["--port", "70000"], "--port 70000"), (["--max-batch", "0"], "--max-batch 0"),
                           (["--max-upload-mb", "0"], "--max-upload-mb 0"), (["--top", "-1"], "--top -1"),
                           (["--device", "cuda"], "--device cuda"), (["--engine", "tensorrt"], "--engine"),
                           (["--reports-dir", tmp_path, "--port", "0"], "no best checkpoint"),
                           (["--host", "no-such-host.invalid"], "--host no-such-host.invalid")]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(serve_main, [str(a) for a in args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fragment in err, err


def test_serve_help_lists_every_flag_with_its_default():
    text = " ".join(build_parser().format_help().split())
    for action in build_parser()._actions:
        assert all(option in text for option in action.option_strings)
        if action.default not in (None, False, "==SUPPRESS=="):
            assert f"(default: {action.default}" in text, action.option_strings


def test_a_port_in_use_is_a_one_line_error(server, tiny_checkpoints):
    port = server.url.rsplit(":", 1)[1].rstrip("/")
    run_ = subprocess.run([sys.executable, "-m", "src.serve", "--checkpoint", str(tiny_checkpoints["regression"]),
                           "--port", port], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run_.returncode == 2 and "Traceback" not in run_.stderr, run_.stderr
    assert run_.stderr.strip().splitlines()[-1].startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen")


# ---- the page in a real browser ------------------------------------------------------------------------------

def test_page_in_a_real_browser(server, demo_dir):
    """Headless Chromium: upload four demo photos, predict, compare with the API; then the example button."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, "install Debian's chromium and chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "yes")
        assert driver.find_element(By.CSS_SELECTOR, "#land path").get_attribute("d").startswith("M")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#model option")) == 2

        folder = sorted((demo_dir / "data").iterdir())[5]
        for view in VIEWS:
            driver.find_element(By.ID, f"file-{view}").send_keys(str(folder / f"{view}.jpg"))
        driver.find_element(By.ID, "predict").click()
        coords = driver.find_element(By.ID, "coords")
        wait.until(lambda d: coords.get_attribute("data-lat"))
        page = float(coords.get_attribute("data-lat")), float(coords.get_attribute("data-lng"))
        _, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(folder)))
        assert page == pytest.approx((answer["latitude"], answer["longitude"]), abs=1e-9)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#cells rect")) == 5
        assert driver.find_element(By.ID, "predicted-point") and "° N" in coords.text

        driver.find_element(By.ID, "example").click()
        wait.until(lambda d: "km off" in d.page_source)
        _, _, examples = run(call(server.url, path="/api/examples"))
        example = examples["examples"][0]
        files = {v: base64.b64decode(example["views"][v].split(",", 1)[1]) for v in example["views"]}
        _, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(files=files)))
        assert float(coords.get_attribute("data-lat")) == pytest.approx(answer["latitude"], abs=1e-9)
        assert float(coords.get_attribute("data-lng")) == pytest.approx(answer["longitude"], abs=1e-9)
        assert driver.find_elements(By.CSS_SELECTOR, "#points circle.truth")
        assert driver.find_element(By.ID, "error").text == ""
        FIGURES.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(FIGURES / "serve_page.png"))
    finally:
        driver.quit()


def test_class_cells_are_the_runs_grid_squares_and_none_for_other_cells(tiny_checkpoints):
    from src.inference.checkpoints import load_model
    from src.app.server import class_cells

    hparams = dict(load_model(tiny_checkpoints["classification"]).hparams)
    lat, lng, bounds = class_cells(hparams)
    assert len(lat) == len(bounds) == len(hparams["classes"]["cell"])
    for la, ln, (west, south, east, north) in zip(lat, lng, bounds):
        # a weighted centroid is the mean of the cell's train locations: inside its (convex) square
        assert west <= ln <= east and south <= la <= north and east - west == pytest.approx(0.5)
    assert class_cells({**hparams, "cells": "adaptive"})[2] is None
