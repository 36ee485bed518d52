"""Shared fixtures: temporary folders for what the commands write, data the tests generate themselves (no
third-party photos), tiny trained runs and a server shared by the session, and the Quickstart started early."""

import os
import signal

import pytest

from src.data.synthetic import write_demo_dataset


def temporary_env_folder(tmp_path_factory, variable: str, name: str):
    """A temporary folder named in the environment variable `variable` while the session runs (for this
    process and the commands it starts); the previous value afterwards."""
    folder = tmp_path_factory.mktemp(name)
    previous = os.environ.get(variable)
    os.environ[variable] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = previous


@pytest.fixture(scope="session", autouse=True)
def onnx_export_store(tmp_path_factory):
    """The engines' ONNX export store (src.inference.engine) in a temporary folder, for this process and the
    commands it starts, instead of the checkout's data/cache/onnx."""
    yield from temporary_env_folder(tmp_path_factory, "ONNX_CACHE_DIR", "onnx_store")


@pytest.fixture(scope="session", autouse=True)
def image_check_cache(tmp_path_factory):
    """The default folder of the remembered image checks (src.data.config, --check-cache) in a temporary folder,
    for this process and the commands it starts, instead of the checkout's data/cache/image_checks."""
    yield from temporary_env_folder(tmp_path_factory, "IMAGE_CHECK_CACHE_DIR", "image_checks")


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """(folder, process): the README's Quickstart running in the background in a fresh copy of the project under
    folder (tests.test_readme.start_quickstart); killed at the end of the session if still running."""
    from tests.test_readme import start_quickstart

    folder = tmp_path_factory.mktemp("quickstart")
    process = start_quickstart(folder)
    yield folder, process
    if process.poll() is None:  # the session ended first (e.g. -x): bash and the command it runs
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session", autouse=True)
def quickstart_early(request):
    """Starts the Quickstart as the session starts when a selected test uses it: it needs nothing from the other
    tests, so its minute of CPU overlaps theirs (the test waits for it). Not in pytest-xdist workers, which all
    see every test: there the test starts it when it runs."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if any("quickstart" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("quickstart")


@pytest.fixture(scope="session", autouse=True)
def feature_cache_dir(tmp_path_factory):
    """The default feature cache folder of src.train and src.predict (src.core.paths) in a temporary folder, for
    this process and the commands it starts, instead of the checkout's data/cache/features."""
    folder = tmp_path_factory.mktemp("feature_cache")
    previous = os.environ.get("FEATURE_CACHE_DIR")
    os.environ["FEATURE_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("FEATURE_CACHE_DIR", None)
    else:
        os.environ["FEATURE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A generated LUMEN-format demo dataset: 120 locations, 64 px views, seed 0. Treat as read-only."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_locations=120, image_size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoints(demo_dir, tmp_path_factory):
    """{approach: best checkpoint} of two 1-epoch runs on the demo set (tiny backbone, 32 px, classification and
    regression), for tests that serve or export a trained model. Treat as read-only."""
    import contextlib
    import io
    from pathlib import Path

    from src.train import main as train_main

    out = tmp_path_factory.mktemp("tiny_runs")
    checkpoints = {}
    for approach in ("classification", "regression"):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            train_main(["--approach", approach, "--dataset-dirs", str(demo_dir), "--backbone", "tiny", "--no-pretrained",
                        "--epochs", "1", "--image-size", "32", "--num-workers", "0", "--batch-size", "16",
                        "--engine", "torch", "--out-dir", str(out), "--cache-dir", str(out / "cache")])
        checkpoints[approach] = Path(stdout.getvalue().splitlines()[-1].removeprefix("checkpoint: "))
    return checkpoints


@pytest.fixture(scope="session")
def tiny_server(tiny_checkpoints):
    """One `python -m src.serve` of both tiny checkpoints (classification first: the default model), the head's points, micro-batches
    of up to 8, uploads up to 1 MB, cross-origin posts from tests.servers.ALLOWED_ORIGIN: for the server and page
    tests that neither stop it nor change it."""
    from tests.servers import ALLOWED_ORIGIN, Server

    # the head's points (--refine none): the refinement's inverse-distance weights magnify a batch's float
    # differences to centimetres, and these tests compare answers across batches and with src.predict to 1e-6
    # degrees; the refinement in serve has its own test (test_serve.test_refinement_in_serve_agrees_with_predict...)
    server = Server("--checkpoint", tiny_checkpoints["classification"], tiny_checkpoints["regression"],
                    "--max-batch", 8, "--batch-wait-ms", 10, "--max-upload-mb", 1, "--cors-origin", ALLOWED_ORIGIN,
                    "--refine", "none")
    yield server
    server.close()
