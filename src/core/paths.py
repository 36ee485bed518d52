"""The project's folders: one place for every default path the commands and the library use."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: src/core/paths.py -> ../..
DATA_DIR = ROOT / "data"
BORDER_FILE = DATA_DIR / "croatia.geojson"
DEMO_DIR = DATA_DIR / "demo"
CACHE_DIR = DATA_DIR / "cache"
FEATURE_CACHE_DIR = CACHE_DIR / "features"
IMAGE_CHECK_CACHE_DIR = CACHE_DIR / "image_checks"
ONNX_CACHE_DIR = CACHE_DIR / "onnx"
REPORTS_DIR = ROOT / "reports"
# environment variables that move a cache folder (the tests point them at a temporary one)
FEATURE_CACHE_ENV = "FEATURE_CACHE_DIR"
CHECK_CACHE_ENV = "IMAGE_CHECK_CACHE_DIR"
ONNX_CACHE_ENV = "ONNX_CACHE_DIR"


def cache_folder(env: str, default: Path) -> Path:
    """A cache's folder: $`env` when set, else `default`."""
    return Path(os.environ.get(env) or default)


def default_feature_cache_dir() -> Path:
    """The feature cache folder src.train and src.predict use without --cache-dir: $FEATURE_CACHE_DIR, else
    data/cache/features."""
    return cache_folder(FEATURE_CACHE_ENV, FEATURE_CACHE_DIR)


def default_check_cache() -> Path:
    """The default folder of the remembered image checks: $IMAGE_CHECK_CACHE_DIR, else data/cache/image_checks."""
    return cache_folder(CHECK_CACHE_ENV, IMAGE_CHECK_CACHE_DIR)


def onnx_store_dir() -> Path:
    """The ONNX export store's folder: $ONNX_CACHE_DIR, else data/cache/onnx."""
    return cache_folder(ONNX_CACHE_ENV, ONNX_CACHE_DIR)
