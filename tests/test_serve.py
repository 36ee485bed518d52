"""The server: a real `python -m src.serve` process on 127.0.0.1 driven by an aiohttp client and raw sockets
(every endpoint, every bad or hostile request, slow clients, bounded load tests), graceful SIGINT/SIGTERM, and
the web page in a real browser."""

import asyncio
import contextlib
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image

from src.core import geo
from src.data.images import VIEWS
from src.core.errors import run_cli
from src.predict import main as predict_main
from src.serve import build_parser
from src.serve import main as serve_main
from tests.servers import ALLOWED_ORIGIN, Server
from tests.test_images import encode, photo, with_size, zeroed_middle

REPO = Path(__file__).resolve().parent.parent


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


TOKEN = "t0ken-for-the-tests-only"


@pytest.fixture(scope="module")
def server(tiny_server):
    """The session's server (conftest.tiny_server): both tiny checkpoints, classification first (the default
    model), micro-batches of up to 8, uploads up to 1 MB, CORS for ALLOWED_ORIGIN."""
    return tiny_server


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
    assert cls["classes"] > 10 and reg["classes"] == 0
    # no absolute paths: checkpoints outside the reports folder are named by their file name
    assert cls["checkpoint"] == tiny_checkpoints["classification"].name
    status, _, border = run(call(server.url, path="/api/border"))
    assert status == 200 and border["type"] == "FeatureCollection"
    status, _, examples = run(call(server.url, path="/api/examples"))
    example = examples["examples"][0]
    assert status == 200 and len(examples["examples"]) >= 4 and set(example["views"]) == {"0", "90", "180", "270"}
    assert example["views"]["0"].startswith("data:image/jpeg;base64,/9j/")
    assert geo.load_border().contains(shapely.Point(example["longitude"], example["latitude"]))


def test_predict_gives_src_predicts_coordinates_and_reports_substituted_views(server, tiny_checkpoints, demo_dir,
                                                                                tmp_path, capsys):
    folders = sorted((demo_dir / "data").iterdir())[:3]
    sent = {folders[0].name: VIEWS, folders[1].name: (0, 180, 270), folders[2].name: (180,)}
    # the same images as a test set for src.predict (missing views deleted there too)
    for folder in folders:
        shutil.copytree(folder, tmp_path / "images" / folder.name)
        for view in set(VIEWS) - set(sent[folder.name]):
            (tmp_path / "images" / folder.name / f"{view}.jpg").unlink()
    _, _, models = run(call(server.url, path="/api/models"))
    [cls, _] = models["models"]
    expected = predict_main(["--checkpoint", str(tiny_checkpoints["classification"]), "--images", str(tmp_path),
                             "--engine", "onnx", "--details", str(tmp_path / "details.csv"), "--refine", "none"])
    assert "replaced 4 missing" in capsys.readouterr().err
    details = pd.read_csv(tmp_path / "details.csv", dtype={"uuid": str, "top": str})
    for folder, row, detail in zip(folders, expected.itertuples(), details.itertuples()):
        status, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(folder, sent[folder.name])))
        assert status == 200, answer
        assert (answer["latitude"], answer["longitude"]) == pytest.approx((row.latitude, row.longitude), abs=1e-6)
        assert answer["model"] == cls["name"] and answer["engine"] == "onnx"
        top = answer["top"]
        assert len(top) == 5 and all(a["probability"] >= b["probability"] for a, b in zip(top, top[1:]))
        assert all(0 < t["probability"] <= 1 and len(t["bounds"]) == 4 for t in top)
        # the confidence fields are src.predict --details' (its CSV rounds to 2 and 4 decimals)
        assert answer["calibrated"] is True and "note" not in answer
        assert (answer["radius50_km"], answer["radius90_km"]) == pytest.approx((detail.radius50_km, detail.radius90_km),
                                                                               abs=0.0051)
        assert answer["top1_probability"] == pytest.approx(detail.top1_probability, abs=5.1e-5)
        assert detail.top == ";".join(f"{t['cell']}:{t['probability']:.4f}" for t in top)
        assert answer["top1_probability"] == pytest.approx(top[0]["probability"], abs=1e-4)
        west, south, east, north = top[0]["bounds"]
        assert west < east and south < north and east - west == pytest.approx(0.5)  # the run's 0.5 degree cells
    status, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(folders[1], (0, 180, 270))))
    assert answer["substituted_views"] == [{"view": 90, "reason": "missing", "used": 180}]
    status, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(folders[2], (180,))))
    assert [(s["view"], s["used"]) for s in answer["substituted_views"]] == [(0, 180), (90, 180), (270, 180)]


def test_refinement_in_serve_agrees_with_predict_with_either_engine(tiny_checkpoints, demo_dir, tmp_path, capsys):
    """A torch-engine server refining with the nearest gallery location (--refine-k 1) answers what src.predict
    writes with ONNX Runtime and with torch; --refine knn on a checkpoint without a gallery is one error line."""
    checkpoint = tiny_checkpoints["classification"]
    folders = sorted((demo_dir / "data").iterdir())[-6:]
    for folder in folders:
        shutil.copytree(folder, tmp_path / "images" / folder.name)
    refine = ["--refine-k", "1", "--refine-gate", "0.6"]
    server = Server("--checkpoint", checkpoint, "--engine", "torch", *refine)
    try:
        _, _, models = run(call(server.url, path="/api/models"))
        assert models["models"][0]["refine"] == "knn" and models["models"][0]["engine"] == "torch"
        answers = [run(call(server.url, "POST", "/api/predict", data=views_form(folder)))[2] for folder in folders]
    finally:
        server.stop(timeout=60)
    assert any("refine knn (k 1, classes up to p 0.6, gallery of" in line for line in server.stderr)
    for engine in ("onnx", "torch"):
        expected = predict_main(["--checkpoint", str(checkpoint), "--images", str(tmp_path), "--engine", engine,
                                 "--num-workers", "0", *refine])
        for answer, row in zip(answers, expected.itertuples()):
            assert (answer["latitude"], answer["longitude"]) == pytest.approx((row.latitude, row.longitude), abs=1e-6)
    head = predict_main(["--checkpoint", str(checkpoint), "--images", str(tmp_path), "--num-workers", "0",
                         "--refine", "none"])
    assert not np.allclose(head[["latitude", "longitude"]], [[a["latitude"], a["longitude"]] for a in answers])
    capsys.readouterr()
    last = checkpoint.parent / "last.ckpt"  # a run with a val split keeps its gallery in the best checkpoint only
    with pytest.raises(SystemExit) as exit_:
        run_cli(serve_main, ["--checkpoint", str(last), "--refine", "knn", "--port", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: --checkpoint {last}: holds no gallery for --refine knn"), err


def test_model_parameter_selects_a_checkpoint(server, demo_dir):
    folder = sorted((demo_dir / "data").iterdir())[0]
    _, _, models = run(call(server.url, path="/api/models"))
    regression = models["models"][1]["name"]
    status, _, answer = run(call(server.url, "POST", "/api/predict", params={"model": regression},
                                 data=views_form(folder)))
    assert status == 200 and answer["model"] == regression and answer["top"] == []
    # a regression model's regions come from its val residuals; it has no cell probabilities
    assert answer["calibrated"] is True and 0 < answer["radius50_km"] <= answer["radius90_km"]
    assert answer["top1_probability"] is None
    status, _, default = run(call(server.url, "POST", "/api/predict", data=views_form(folder)))
    assert default["latitude"] != answer["latitude"]
    status, kind, error = run(call(server.url, "POST", "/api/predict", params={"model": "nope"},
                                   data=views_form(folder)))
    assert status == 404 and kind == "application/json" and "unknown model 'nope'" in error["error"]


def jpeg(demo_dir) -> bytes:
    return (sorted((demo_dir / "data").iterdir())[0] / "0.jpg").read_bytes()


BAD_REQUESTS = {
    "not an image": (lambda j: {"data": views_form(files={"0": b"GIF? no, plain text"})}, 400,
                     "field 0: not a readable image (JPEG, PNG or WebP expected)"),
    "EPS named .jpg": (lambda j: {"data": views_form(files={"0": EPS})}, 400, "field 0: not a readable image"),
    "GIF named .jpg": (lambda j: {"data": views_form(files={"0": encode(photo(64), "GIF")})}, 400,
                       "field 0: not a readable image"),
    "TIFF named .jpg": (lambda j: {"data": views_form(files={"90": encode(photo(64), "TIFF")})}, 400,
                        "field 90: not a readable image"),
    "BMP named .jpg": (lambda j: {"data": views_form(files={"0": encode(photo(64), "BMP")})}, 400,
                       "field 0: not a readable image"),
    "truncated JPEG": (lambda j: {"data": views_form(files={"90": j[:len(j) // 2]})}, 400, "field 90: truncated JPEG"),
    "zeroed JPEG end": (lambda j: {"data": views_form(files={"0": j[:200] + bytes(len(j) - 200)})}, 400, "field 0:"),
    "JPEG with a zeroed middle": (lambda j: {"data": views_form(files={"0": zeroed_middle(encode(photo()))})}, 400,
                                  "field 0: corrupt JPEG"),
    "JPEG cut short, end marker put back": (lambda j: {"data": views_form(files={"0": j[:len(j) // 2] + b"\xff\xd9"})},
                                            400, "field 0: corrupt JPEG"),
    "2000x2000 header over 96 px of data": (lambda j: {"data": views_form(files={"0": with_size(
        encode(photo(96)), 2000, 2000)})}, 400, "field 0: corrupt JPEG"),
    "12000x12000 header over 96 px of data": (lambda j: {"data": views_form(files={"0": with_size(
        encode(photo(96)), 12000, 12000)})}, 413, "field 0: too many pixels (12000x12000, over 16 megapixels)"),
    "decompression bomb": (lambda j: {"data": views_form(files={"0": png(15000, 15000)})}, 413,
                           "field 0: too many pixels"),
    "truncated PNG": (lambda j: {"data": views_form(files={"270": encode(photo(), "PNG")[:-3000]})}, 400,
                      "field 270: corrupt PNG"),
    "empty file": (lambda j: {"data": views_form(files={"180": b""})}, 400, "field 180: empty file"),
    "no views": (lambda j: {"data": aiohttp.FormData({"x": "1"}, default_to_multipart=True)}, 400, "unknown field 'x'"),
    "empty body": (lambda j: {"data": b"", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, 400,
                   "malformed multipart body"),
    "no fields": (lambda j: {"data": b"--zz--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}},
                  400, "no views"),
    "nested multipart": (lambda j: {"data": NESTED, "headers": {"Content-Type": "multipart/form-data; boundary=zz"}},
                         400, "nested multipart part"),
    "unknown field": (lambda j: {"data": views_form(files={"0": j, "45": j})}, 400, "unknown field '45'"),
    "field twice": (lambda j: {"data": twice(j)}, 400, "field 0 sent twice"),
    "not multipart": (lambda j: {"json": {"0": "abc"}}, 415, "send multipart/form-data"),
    "over --max-upload-mb": (lambda j: {"data": views_form(files={"0": j + bytes(1_200_000)})}, 413,
                             "over the limit of 1 MB"),
}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 640 640\nshowpage\n" + bytes(2000)
NESTED = (b"--zz\r\nContent-Disposition: form-data; name=\"0\"\r\nContent-Type: multipart/mixed; boundary=yy\r\n\r\n"
          b"--yy\r\nContent-Type: text/plain\r\n\r\nhello\r\n--yy--\r\n--zz--\r\n")
LEAKS = ("Error", "aiohttp", "Python/", "Traceback", "/tmp/", "/work/", "Ghostscript", "PIL")


def png(width: int, height: int, mode: str = "1") -> bytes:
    """A black PNG, tiny on the wire: 15000x15000 is 225 M pixels decoded (over PIL's own bomb limit)."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
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
    assert not any(leak in answer["error"] for leak in LEAKS), answer


@pytest.mark.parametrize("kind", ["PNG", "WEBP"])
def test_png_and_webp_views_are_accepted(server, demo_dir, kind):
    folder = sorted((demo_dir / "data").iterdir())[0]
    from PIL import Image

    files = {str(v): encode(Image.open(folder / f"{v}.jpg"), kind) for v in VIEWS}
    status, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(files=files)))
    assert status == 200 and "latitude" in answer, answer


@pytest.mark.parametrize("method, path, status, fragment", [
    ("GET", "/api/predict", 405, "method GET not allowed for /api/predict; use POST"),
    ("DELETE", "/api/models", 405, "not allowed"),
    ("POST", "/api/health", 405, "not allowed"),
    ("GET", "/api/nothing", 404, "no such endpoint"),
    ("GET", "/static/../src/serve.py", 404, ""),
    ("GET", "/static/nope.js", 404, "no such file: /static/nope.js"),
    ("GET", "/static/", 404, ""),
    ("GET", "/static/app.js%00.png", 404, "no such file"),
    ("GET", "/static/" + "a" * 5000, 404, "no such file"),
    ("GET", "/static/%2e%2e/server.py", 404, ""),
    ("GET", "/static/..%2fserver.py", 404, ""),
    ("GET", "/api/models?model=%00", 200, None),
    ("POST", "/api/predict?model=%00", 404, "unknown model"),
])
def test_wrong_methods_and_paths_get_a_4xx_json_error(server, method, path, status, fragment):
    got, kind, answer = run(call(server.url, method, path))
    assert got == status and kind == "application/json", (got, answer)
    assert fragment is None or fragment in answer["error"], answer


def raw(url: str, request: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send `request` as is on a new connection; (status, headers, body) of the answer, read until the server
    closes the connection."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {key.strip().lower(): value.strip() for key, value in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


PARSER_PROBES = {
    "request line over 8190 bytes": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "header over 8190 bytes": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    "invalid method": b"G(T / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "TLS hello on the HTTP port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
    "space in a header name": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: 1\r\n\r\n",
    "Content-Length with Transfer-Encoding": b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "missing Host": b"GET /api/health HTTP/1.1\r\nConnection: close\r\n\r\n",
    "foreign Host": b"GET /api/health HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
}


@pytest.mark.parametrize("case", list(PARSER_PROBES))
def test_malformed_http_gets_a_json_error_without_versions(server, case):
    status, headers, body = raw(server.url, PARSER_PROBES[case])
    assert status == 400 and headers["content-type"].startswith("application/json"), (status, headers, body)
    error = json.loads(body)["error"]
    assert error and not any(leak in error for leak in LEAKS) and "aaaa" not in error, error
    assert headers["server"] == "src.serve" and headers["x-content-type-options"] == "nosniff"


def test_security_headers_and_no_versions(server):
    async def heads():
        async with aiohttp.ClientSession() as session:
            answers = {}
            for path in ("/", "/static/app.js", "/api/models", "/api/nothing"):
                async with session.get(server.url + path) as response:
                    answers[path] = response.headers
            return answers

    for path, headers in run(heads()).items():
        assert headers["Server"] == "src.serve" and headers["X-Content-Type-Options"] == "nosniff", path
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self';" in policy and "default-src 'none'" in policy and "unsafe-eval" not in policy
        assert headers["Cache-Control"] == ("no-store" if path.startswith("/api/") else "no-cache"), path


def test_host_names_and_cross_origin_posts(server, demo_dir):
    folder = sorted((demo_dir / "data").iterdir())[0]
    port = server.url.rsplit(":", 1)[1].rstrip("/")
    status, _, answer = run(call(server.url, headers={"Host": "rebound.attacker.example"}))
    assert status == 400 and "does not answer to the host name 'rebound.attacker.example'" in answer["error"]
    assert run(call(server.url, headers={"Host": f"localhost:{port}"}))[0] == 200
    status, _, answer = run(call(server.url, "POST", "/api/predict", data=views_form(folder),
                                 headers={"Origin": "https://attacker.example"}))
    assert status == 403 and "--cors-origin" in answer["error"], answer
    same = server.url.rstrip("/")  # the page's own origin
    assert run(call(server.url, "POST", "/api/predict", data=views_form(folder), headers={"Origin": same}))[0] == 200

    async def allowed():
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/api/predict", data=views_form(folder),
                                    headers={"Origin": ALLOWED_ORIGIN}) as response:
                posted = response.status, response.headers.get("Access-Control-Allow-Origin")
            async with session.options(server.url + "/api/predict", headers={
                    "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization"}) as response:
                preflight = response.status, response.headers.get("Access-Control-Allow-Headers")
            async with session.get(server.url + "/api/models", headers={"Origin": "https://attacker.example"}) as r:
                foreign_get = r.status, r.headers.get("Access-Control-Allow-Origin")
            return posted, preflight, foreign_get

    posted, preflight, foreign_get = run(allowed())
    assert posted == (200, ALLOWED_ORIGIN) and preflight == (204, "Authorization")
    assert foreign_get == (200, None)  # a cross-origin GET is answered, but the browser may not read it


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_bombs_are_refused_from_the_header_and_large_views_do_not_keep_memory(server):
    """Views over the pixel cap get 413 without being decoded; views under it but large (16 megapixels) decode
    in the large-view lane and the memory they took is given back."""
    pid = server.process.pid
    start_mb = rss_mb(pid)
    bombs = {"12000x12000 PNG": png(12000, 12000), "9000x9000 PNG": png(9000, 9000),
             "12000x12000 progressive JPEG": with_size(encode(photo(96), progressive=True), 12000, 12000)}
    timings = []
    for name, data in bombs.items():
        begin = time.perf_counter()
        status, kind, answer = run(call(server.url, "POST", "/api/predict", data=views_form(files={"0": data})))
        timings.append(time.perf_counter() - begin)
        assert status == 413 and "too many pixels" in answer["error"] and "--max-megapixels" in answer["error"]
    after_bombs_mb = rss_mb(pid)
    large = png(4000, 4000, "RGB")  # 16 megapixels, at the cap: decoded (48 MB of pixels per view)
    statuses = []

    async def large_requests():
        async with aiohttp.ClientSession() as session:
            async def one():
                async with session.post(server.url + "/api/predict", data=views_form(
                        files={"0": large, "90": large})) as response:
                    statuses.append(response.status)
            await asyncio.gather(*(one() for _ in range(3)))

    run(large_requests())
    assert statuses == [200] * 3
    time.sleep(0.5)
    after_large_mb = rss_mb(pid)
    print(f"\nbombs: 413 in {', '.join(f'{1000 * t:.0f}' for t in timings)} ms; RSS {start_mb:.0f} MB at start, "
          f"{after_bombs_mb:.0f} MB after the bombs, {after_large_mb:.0f} MB after 3 requests of 2x16 megapixels")
    assert after_bombs_mb - start_mb < 30  # nothing decoded
    assert after_large_mb - start_mb < 100  # given back (a decoded 16 MP view alone takes 48 MB)


@pytest.fixture(scope="module")
def guarded(tiny_checkpoints):
    """A server with --token and short read timeouts (1 s for headers, 2 s for a body), without --checkpoint: it
    serves the best checkpoint of the newest run under the tiny runs' reports dir. At the end: the token appears
    nowhere in what it printed."""
    reports = Path(tiny_checkpoints["classification"]).parents[3]  # <reports>/<run>/version_N/checkpoints/
    server = Server("--reports-dir", reports, "--token", TOKEN, "--header-timeout", 1, "--body-timeout", 2)
    yield server
    _, _, stderr = server.stop()
    assert TOKEN not in stderr + server.process.stdout.read()


def test_token_guards_the_api_not_the_page(guarded, demo_dir):
    folder = sorted((demo_dir / "data").iterdir())[0]
    status, _, answer = run(call(guarded.url))
    assert status == 401 and "Authorization: Bearer TOKEN" in answer["error"] and TOKEN not in answer["error"]
    for wrong in ("Bearer nope", f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer \u00e9t\u00e9", TOKEN):
        assert run(call(guarded.url, headers={"Authorization": wrong}))[0] == 401, wrong
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert run(call(guarded.url, headers=bearer))[0] == 200
    status, _, answer = run(call(guarded.url, "POST", "/api/predict", data=views_form(folder), headers=bearer))
    assert status == 200 and "latitude" in answer
    assert run(call(guarded.url, path="/"))[0] == 200  # the page itself is public
    assert run(call(guarded.url, path="/?token=nope"))[0] == 401

    async def page_login():  # as a browser does, the session keeps cookies of IP-address hosts
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(guarded.url + f"?token={TOKEN}", allow_redirects=False) as response:
                cookie = response.headers["Set-Cookie"]
                login = response.status, response.headers["Location"]
            async with session.get(guarded.url + "/api/models") as response:  # the session sends the cookie
                return login, cookie, response.status

    login, cookie, models_status = run(page_login())
    assert login == (303, "/") and "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert models_status == 200
    # the token in a malformed request is not echoed back
    status, _, body = raw(guarded.url, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                          + TOKEN.encode() + b"\x01\r\n\r\n")
    assert status == 400 and TOKEN.encode() not in body


async def trickle(url: str, head: bytes, body: bytes, every_s: float, limit_s: float) -> tuple[float, bytes]:
    """Send `head` at once (or byte by byte when `body` is empty), then `body` one byte every `every_s` seconds;
    (seconds until the server closed the connection, what it answered). Gives up after `limit_s`."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    start = time.monotonic()
    slow = body or head

    async def send():
        if body:
            writer.write(head)
        for i in range(len(slow)):
            writer.write(slow[i:i + 1])
            await writer.drain()
            await asyncio.sleep(every_s)

    sender = asyncio.create_task(send())
    answer = b""
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                answer += chunk
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        writer.close()
    return time.monotonic() - start, answer


def test_slow_clients_are_disconnected(guarded):
    """Headers sent a byte every 0.2 s: closed after the 1 s header timeout; a body sent a byte every 0.2 s: 408
    JSON after the 2 s body timeout, then closed (after at most 2 s of draining)."""
    head = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    seconds, answer = run(trickle(guarded.url, head, b"", 0.2, 20))
    assert 0.9 < seconds < 3 and answer == b"", (seconds, answer)
    body = b"--zz\r\nContent-Disposition: form-data; name=\"0\"; filename=\"0.jpg\"\r\n\r\n" + b"x" * 500
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() +
            b"\r\nContent-Type: multipart/form-data; boundary=zz\r\nContent-Length: 600\r\n\r\n")
    seconds, answer = run(trickle(guarded.url, head, body, 0.2, 20))
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408") and b"--body-timeout" in rest, answer
    assert 1.9 < seconds < 6, seconds


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


def test_normal_requests_stay_fast_beside_bombs_large_views_and_slow_clients(server, demo_dir):
    """2 clients send normal four-view requests one after another: 3 s alone, then 8 s beside a client sending
    10 bombs a second (413), a client sending 16-megapixel views one after another (decoded in the large-view
    lane) and 10 clients trickling headers. The normal requests' p99 stays under 200 ms."""
    folders = sorted((demo_dir / "data").iterdir())[:2]
    files = [{str(v): (f / f"{v}.jpg").read_bytes() for v in VIEWS} for f in folders]
    bomb, large = png(12000, 12000), png(4000, 4000, "RGB")
    host, port = server.url.split("//")[1].rstrip("/").split(":")

    async def load(duration: float, hostile_too: bool):
        latencies, others = [], {"bomb": [], "large": []}
        deadline = time.monotonic() + duration

        async def normal(session, i):
            while time.monotonic() < deadline:
                start = time.perf_counter()
                async with session.post(server.url + "/api/predict", data=views_form(files=files[i])) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                latencies.append(time.perf_counter() - start)

        async def hostile(session, kind, data, pause_s):  # the last large request may still decode at the end
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - time.monotonic() + 2):
                    while time.monotonic() < deadline:
                        async with session.post(server.url + "/api/predict",
                                                data=views_form(files={"0": data})) as response:
                            others[kind].append(response.status)
                            await response.read()
                        await asyncio.sleep(pause_s)

        async def slow():
            reader, writer = await asyncio.open_connection(host, int(port))
            for byte in b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                if time.monotonic() > deadline:
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.5)
            writer.close()

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            clients = [normal(session, 0), normal(session, 1)]
            if hostile_too:
                clients += [hostile(session, "bomb", bomb, 0.1), hostile(session, "large", large, 0),
                            *(slow() for _ in range(10))]
            await asyncio.gather(*clients)
        return np.array(latencies) * 1000, others

    alone, _ = run(load(3.0, False))
    mixed, others = run(load(8.0, True))
    for name, latencies in (("alone", alone), ("mixed", mixed)):
        p50, p99 = np.percentile(latencies, [50, 99])
        print(f"\n{name}: {len(latencies)} normal requests, p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies.max():.1f} ms",
              end="")
    print(f"; beside {len(others['bomb'])} bombs, {len(others['large'])} requests of 16 megapixels, 10 slow clients")
    assert set(others["bomb"]) == {413} and set(others["large"]) <= {200, 503}
    assert len(mixed) > 50 and np.percentile(mixed, 99) < 200


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
    server.drain.join(10)
    assert "shutting down" in "".join(server.stderr)
    # the server said which run and checkpoint it serves
    assert any(line.startswith("model demo") and "best-" in line for line in server.stderr)
    with pytest.raises(aiohttp.ClientConnectionError):
        run(call(server.url))


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    for args, fragment in [(["--checkpoint", tmp_path / "none.ckpt"], "file not found"),
                           (["--port", "70000"], "--port 70000"), (["--max-batch", "0"], "--max-batch 0"),
                           (["--max-upload-mb", "0"], "--max-upload-mb 0"), (["--top", "-1"], "--top -1"),
                           (["--device", "cuda"], "--device cuda"), (["--engine", "tensorrt"], "--engine"),
                           (["--reports-dir", tmp_path, "--port", "0"], "no best checkpoint"),
                           (["--host", "no-such-host.invalid"], "--host no-such-host.invalid"),
                           (["--host", "0.0.0.0"], "--host 0.0.0.0 makes the server reachable from other machines"),
                           (["--token", "abc", "--no-auth"], "--token"), (["--token", " "], "--token"),
                           (["--max-megapixels", "0"], "--max-megapixels 0"),
                           (["--header-timeout", "0"], "--header-timeout 0"),
                           (["--body-timeout", "-1"], "--body-timeout -1"), (["--refine-k", "0"], "--refine-k 0"),
                           (["--refine-gate", "2"], "--refine-gate 2"), (["--refine", "vote"], "--refine")]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(serve_main, [str(a) for a in args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fragment in err, err


def test_beyond_loopback_without_auth_is_refused_and_with_no_auth_warned(capsys):
    with pytest.raises(SystemExit):  # stops at the --device check, before listening anywhere
        run_cli(serve_main, ["--host", "0.0.0.0", "--no-auth", "--device", "cuda"])
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0: other machines can reach this server, WITHOUT authentication" in err
    with pytest.raises(SystemExit):
        run_cli(serve_main, ["--host", "0.0.0.0", "--token", TOKEN, "--device", "cuda"])
    err = capsys.readouterr().err
    assert "with the token on /api/*" in err and TOKEN not in err


def test_serve_help_imports_no_heavy_library():
    code = ("import sys; from src.serve import build_parser; build_parser().format_help(); "
            "print([m for m in ('torch', 'pytorch_lightning', 'geopandas', 'onnxruntime') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_serve_help_lists_every_flag_with_its_default():
    text = " ".join(build_parser().format_help().split())
    for action in build_parser()._actions:
        assert all(option in text for option in action.option_strings)
        if action.default not in (None, False, "==SUPPRESS=="):
            assert f"(default: {action.default}" in text, action.option_strings


def test_a_port_in_use_is_a_one_line_error(server, tiny_checkpoints, capsys):
    port = server.url.rsplit(":", 1)[1].rstrip("/")
    with pytest.raises(SystemExit) as exit_:
        run_cli(serve_main, ["--checkpoint", str(tiny_checkpoints["regression"]), "--port", port])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen")


# ---- the page in a real browser ------------------------------------------------------------------------------

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


def test_the_default_checkpoint_is_named_on_the_first_line(guarded, tiny_checkpoints):
    reports = Path(tiny_checkpoints["classification"]).parents[3]  # guarded's --reports-dir, no --checkpoint
    deadline = time.monotonic() + 10
    while not any(line.startswith("model ") for line in guarded.stderr) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert guarded.stderr[0].startswith("checkpoint ") and f"the newest run under {reports}" in guarded.stderr[0]
    assert any(line.startswith("model ") for line in guarded.stderr)
