"""The project's folders: one place for every default path the commands and the library use."""

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
