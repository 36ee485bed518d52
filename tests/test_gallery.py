"""The retrieval gallery of a training run (src.training.gallery): under cross-validation each fold's gallery
holds only locations that fold trained on (and extra --gallery-dirs ones), so no out-of-fold location finds
itself, even in a corpus with duplicated images and a gallery dir holding copies of the dataset."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from src.core import geo
from src.data.images import VIEWS
from src.data.quadruplets import QuadrupletFolders, collate_quadruplets, input_spec, spec_transforms
from src.data.synthetic import write_demo_dataset
from src.inference.checkpoints import load_model, read_test_locations
from src.inference.engine import infer
from src.train import main as train_main
from src.training.gallery import copy_digests, views_digest

pytestmark = pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)")
TINY = ["--backbone", "tiny", "--no-pretrained", "--image-size", 32, "--num-workers", 0, "--engine", "torch",
        "--batch-size", 16]


def copy_location(source: Path, target: Path, reencode: bool = False) -> None:
    """A location folder copied (byte-identical views, or the same pictures saved again: other bytes)."""
    target.mkdir(parents=True)
    for view in VIEWS:
        if reencode:
            Image.open(source / f"{view}.jpg").save(target / f"{view}.jpg", quality=70)
        else:
            shutil.copyfile(source / f"{view}.jpg", target / f"{view}.jpg")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 60-location dataset in which 4 locations carry another location's views (other uuid and place), and a
    gallery dir holding copies of dataset locations (same uuid; same views under a new uuid; the same place
    photographed again under a new uuid) beside 10 new locations."""
    root = tmp_path_factory.mktemp("gallery_corpus")
    dataset = write_demo_dataset(root / "dataset", n_locations=60, image_size=32, seed=3)
    table = pd.read_csv(dataset / "data.csv", dtype={"uuid": str})
    images = dataset / "data"
    for source, target in zip(table.uuid[:4], table.uuid[4:8]):  # duplicated images inside the dataset
        shutil.rmtree(images / target)
        copy_location(images / source, images / target)
    extra = write_demo_dataset(root / "extra", n_locations=10, image_size=32, seed=4)
    rows = [pd.read_csv(extra / "data.csv", dtype={"uuid": str})]
    for i, row in enumerate(table.iloc[8:23].itertuples()):
        kind = i % 3
        uuid = row.uuid if kind == 0 else f"copy-{i:02d}"
        copy_location(images / row.uuid, extra / "data" / uuid, reencode=kind == 2)
        rows.append(pd.DataFrame([{"uuid": uuid, "latitude": row.latitude, "longitude": row.longitude}]))
    pd.concat(rows, ignore_index=True).to_csv(extra / "data.csv", index=False)
    return dataset, extra


def test_no_out_of_fold_location_is_its_own_neighbour(corpus, tmp_path):
    dataset, extra = corpus
    printed, logged = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(logged):
        train_main(["--approach", "classification", "--dataset-dirs", dataset, *map(str, TINY), "--epochs", "1",
                    "--folds", "3", "--out-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                    "--run-name", "cv", "--check-cache", str(tmp_path / "checks"), "--refine", "knn", "--refine-k", "5", "--gallery-dirs", str(extra)])
    folder = tmp_path / "cv" / "version_0"
    assert len(pd.read_csv(folder / "oof.csv")) == 60
    reports = [line for line in logged.getvalue().splitlines() if line.startswith("refine: a gallery of")]
    assert len(reports) == 3 and all("from --gallery-dirs" in line and "left out" in line for line in reports)
    digest = {path: views_digest(path) for path in [*(dataset / "data").iterdir(), *(extra / "data").iterdir()]}
    extra_rows = pd.read_csv(extra / "data.csv", dtype={"uuid": str}).set_index("uuid")
    for k, checkpoint in enumerate(json.loads((folder / "oof_metrics.json").read_text())["checkpoints"]):
        locations = pd.read_csv(folder / f"fold_{k}" / "locations.csv", dtype={"uuid": str})
        test = locations[locations.split == "test"].set_index("uuid")
        model = load_model(checkpoint, refine="knn")
        gallery = model.gallery
        # the gallery: the fold's train and val locations and the new extra ones, never a copy of a test location
        own = set(locations[locations.split != "test"].uuid)
        assert set(gallery.uuids) <= own | set(extra_rows.index)
        assert set(gallery.uuids).isdisjoint(test.index)
        folders = {**{p.name: p for p in (extra / "data").iterdir()}, **{p.name: p for p in (dataset / "data").iterdir()}}
        gallery_digests = {digest[folders[uuid]] for uuid in gallery.uuids}
        assert gallery_digests.isdisjoint({digest[dataset / "data" / uuid] for uuid in test.index})
        test_xy = np.column_stack(geo.project(test.latitude.to_numpy(), test.longitude.to_numpy()))
        assert np.hypot(*(gallery.xy[:, None, :] - test_xy[None]).transpose(2, 0, 1)).min() > 1.0  # metres
        # each test location's neighbours, searched with the model's own embedding: never itself or a copy
        spec = input_spec(model.hparams)
        pairs = read_test_locations(checkpoint)
        quads = QuadrupletFolders([path for _, path in pairs], spec_transforms([spec]))
        probabilities, _, embedding = infer(model, collate_quadruplets([quads[i] for i in range(len(quads))])[1][spec])
        for gate, k_nearest in ((model.hparams.refine_gate, model.hparams.refine_k), (1.0, len(gallery))):
            rows, _ = gallery.neighbours(embedding, k_nearest, probabilities, gate)
            for (uuid, path), found in zip(pairs, rows):
                names = [gallery.uuids[r] for r in found if r >= 0]
                assert names and uuid not in names
                assert digest[path] not in {digest[folders[name]] for name in names}


def test_only_locations_whose_view_sizes_collide_are_hashed(tmp_path):
    """copy_digests reads the views of a location only when another has the same four file sizes; a copy and its
    original get equal digests, a location of other sizes gets none."""
    dataset = write_demo_dataset(tmp_path / "d", n_locations=3, image_size=32, seed=5)
    first, second, third = sorted((dataset / "data").iterdir())
    copy_location(first, tmp_path / "copy")
    shutil.rmtree(third)
    copy_location(second, third, reencode=True)  # the same pictures, other bytes (and other sizes)
    dirs = [str(first), str(second), str(third), str(tmp_path / "copy")]
    digests = copy_digests(dirs)
    assert digests[0] == digests[3] == views_digest(first)
    assert digests[1] is None and digests[2] is None
