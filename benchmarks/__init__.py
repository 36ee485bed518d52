"""Speed benchmarks: `python -m benchmarks.<name>`; each prints its ratio as the last line."""

from pathlib import Path

# real 640x640 Street View photos beside the repository checkout (not shipped; pass --dataset-dir otherwise)
DEFAULT_DATASET = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lumen_external_subset"
