"""Shared fixtures: datasets the tests generate themselves (no third-party photos)."""

import pytest

from src.demo import write_demo_dataset


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A generated LUMEN-format demo dataset: 120 locations, 64 px views, seed 0. Treat as read-only."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_locations=120, image_size=64, seed=0)
