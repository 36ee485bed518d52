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
FEATURE_CACHE_ENV = "FEATURE_CACHE_DIR"  # overrides the feature cache's default folder (tests: a temporary one)


def default_feature_cache_dir() -> Path:
    """The feature cache folder src.train and src.predict use without --cache-dir: $FEATURE_CACHE_DIR, else
    data/cache/features."""
    return Path(os.environ.get(FEATURE_CACHE_ENV) or FEATURE_CACHE_DIR)
