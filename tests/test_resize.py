"""src.resize: a LUMEN copy at training resolution that enrich reads like the original; resumable, atomic."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data.enrich import enrich
from src.core.errors import UserError
from src.data.images import load_image
from src.resize import main
from src.data.resizing import resize_datasets
from tests.corpus import write_defect_corpus

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("resize") / "corpus"
    return out, write_defect_corpus(out, n_clean=8)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_cli_copy_in_processes_reads_like_the_original(corpus, tmp_path):
    source, expected = corpus
    out = tmp_path / "resized"
    run = subprocess.run([sys.executable, "-m", "src.resize", "--dataset-dirs", str(source), "--size", "16",
                          "--out", str(out), "--workers", "2"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    copy = out / "corpus"
    assert f"resized copy: {copy}" in run.stdout
    assert (copy / "data.csv").read_bytes() == (source / "data.csv").read_bytes()
    # the truncated, empty and non-image views are copied as they are and listed
    assert "3 view(s) could not be decoded and were copied as they are" in run.stderr
    assert not [p for p in copy.rglob(".*")]  # no temporary file left
    original, resized = enrich([source], progress=False), enrich([copy], progress=False)
    assert resized.locations["uuid"].tolist() == original.locations["uuid"].tolist()
    assert resized.locations["split"].tolist() == original.locations["split"].tolist()
    by_reason = lambda e: e.ingested.skipped.groupby("reason")["uuid"].apply(sorted).to_dict()  # noqa: E731
    assert by_reason(resized) == by_reason(original)
    for folder in map(Path, original.locations["image_dir"].head(5)):  # PNG, grey, CMYK, 50x30 ones among them
        for view in ("0", "90", "180", "270"):
            small = Image.open(copy / "data" / folder.name / f"{view}.jpg")
            assert small.size == (16, 16) and small.format == "JPEG"
            # the pixels are what training decodes from the original at 16 px, through the JPEG encoder
            encoded = io.BytesIO()
            load_image(folder / f"{view}.jpg", 16).save(encoded, format="JPEG", quality=95, subsampling=0)
            assert np.array_equal(np.asarray(small), np.asarray(Image.open(encoded)))


def test_a_second_run_only_redoes_what_is_missing_or_changed(corpus, tmp_path):
    source, _ = corpus
    first = resize_datasets([source], tmp_path, 16, workers=1, progress=False)
    views = files_under(tmp_path / "corpus" / "data")
    assert first["written"] + len(first["copied"]) == len(views)
    again = resize_datasets([source], tmp_path, 16, workers=1, progress=False)
    assert again["written"] == 0 and not again["copied"] and again["kept"] == len(views)
    # an interrupted run leaves some views unwritten; a source changed since the copy is redone
    views[0].unlink()
    changed = sorted((source / "data").iterdir())[-1] / "0.jpg"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9 * 3600))
    try:
        third = resize_datasets([source], tmp_path, 16, workers=1, progress=False)
    finally:
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert third["written"] == 2 and third["kept"] == len(views) - 2


def test_user_mistakes_are_one_line_errors(corpus, tmp_path):
    source, _ = corpus
    with pytest.raises(UserError, match="--size 8"):
        main(["--dataset-dirs", str(source), "--size", "8", "--out", str(tmp_path)])
    twin = tmp_path / "other" / "corpus"
    twin.mkdir(parents=True)
    (twin / "data.csv").write_text("uuid,latitude,longitude\n")
    with pytest.raises(UserError, match="several dirs are named corpus"):
        main(["--dataset-dirs", str(source), str(twin), "--size", "16", "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="inside the dataset dir"):
        main(["--dataset-dirs", str(source), "--size", "16", "--out", str(source / "small")])
    with pytest.raises(UserError, match="no such dataset directory"):
        main(["--dataset-dirs", str(tmp_path / "nope"), "--size", "16", "--out", str(tmp_path / "out")])
