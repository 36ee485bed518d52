"""Predict: the TTA mirror, view substitution, row-per-uuid CSV output, ensemble averaging, cached features."""

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src.core import geo
from src.data.quadruplets import eval_transform, mirror_views
from src.core.errors import UserError, run_cli
from src.data.images import VIEWS, load_image
from src.inference.checkpoints import backbone_trained, load_model, read_test_locations
from src.inference.predictor import predict_locations
from src.predict import main as predict_main
from src.train import main as train_main

REPO = Path(__file__).resolve().parent.parent


def panorama_views(panorama: np.ndarray) -> torch.Tensor:
    """Cut a [C, H, 4W] 360-degree panorama into the views at headings 0, 90, 180, 270 (each 90 degrees wide).

    Column j of the panorama looks at heading (j + 0.5) * 90 / W - 45 degrees, so view k is columns kW..(k+1)W.
    """
    width = panorama.shape[-1] // 4
    return torch.from_numpy(np.stack([panorama[..., k * width:(k + 1) * width] for k in range(4)]))


def test_mirror_equals_the_views_of_the_mirrored_panorama():
    rng = np.random.default_rng(0)
    width = 5
    panorama = rng.random((3, 4, 4 * width)).astype(np.float32)
    # mirroring the world maps heading t to -t: column j shows what column (W - 1 - j) mod 4W showed
    source = (width - 1 - np.arange(4 * width)) % (4 * width)
    mirrored = panorama[..., source]
    expected = panorama_views(mirrored)
    assert torch.equal(mirror_views(panorama_views(panorama)), expected)
    # batched input, and mirroring twice is the identity
    batch = torch.stack([panorama_views(panorama), panorama_views(mirrored)])
    assert torch.equal(mirror_views(batch)[0], expected)
    assert torch.equal(mirror_views(mirror_views(batch)), batch)


def test_mirror_on_a_hand_made_quadruplet():
    # view v is a 1x1x2 image [10v + 1, 10v + 2] (left pixel, right pixel)
    views = torch.tensor([[[[10.0 * v + 1, 10.0 * v + 2]]] for v in range(4)])  # [4, 1, 1, 2]
    expected = torch.tensor([[[[2.0, 1.0]]], [[[32.0, 31.0]]], [[[22.0, 21.0]]], [[[12.0, 11.0]]]])
    assert torch.equal(mirror_views(views), expected)


# ---- with real (tiny) checkpoints trained through the train CLI ---------------------------------------------

def train_checkpoint(argv) -> Path:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_main([str(a) for a in argv])
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("checkpoint: ")
    return Path(last.removeprefix("checkpoint: "))


@pytest.fixture(scope="module")
def checkpoints(demo_dir, tmp_path_factory):
    """Two 1-epoch runs on the demo set: tiny classification at 32 px and tiny regression at 48 px."""
    out = tmp_path_factory.mktemp("predict_reports")
    common = ["--dataset-dirs", demo_dir, "--backbone", "tiny", "--no-pretrained", "--epochs", 1,
              "--num-workers", 0, "--batch-size", 16, "--out-dir", out, "--cache-dir", out / "cache"]
    classification = train_checkpoint(["--approach", "classification", "--image-size", 32, "--run-name", "cls",
                                       *common])
    regression = train_checkpoint(["--approach", "regression", "--image-size", 48, "--run-name", "reg", *common])
    return out, classification, regression


def reference_xy(model, folder: Path, views: list[int] | None = None, mirror: bool = False) -> np.ndarray:
    """One location's prediction [x, y] built by hand: load the chosen view files (default 0, 90, 180, 270)."""
    size = model.hparams.image_size
    transform = eval_transform(size, model.hparams.image_mean, model.hparams.image_std)
    files = [folder / f"{v}.jpg" for v in (views or VIEWS)]
    quad = torch.stack([transform(load_image(f, size)) for f in files])
    if mirror:  # flip every view left-right, then the 90 view shows the old 270 and vice versa
        quad = torch.stack([quad[0].flip(-1), quad[3].flip(-1), quad[2].flip(-1), quad[1].flip(-1)])
    return model.locate(quad[None]).double().numpy()[0]


def reference_xys(model, folders: list[Path], mirror: bool = False) -> np.ndarray:
    """reference_xy of many locations (all four views each) in one forward pass: [len(folders), 2]."""
    size = model.hparams.image_size
    transform = eval_transform(size, model.hparams.image_mean, model.hparams.image_std)
    quads = torch.stack([torch.stack([transform(load_image(f / f"{v}.jpg", size)) for v in VIEWS]) for f in folders])
    if mirror:  # as reference_xy: every view flipped left-right, the 90 and 270 views swapped
        quads = quads[:, [0, 3, 2, 1]].flip(-1)
    return model.locate(quads).double().numpy()


def to_latlng(xy) -> tuple[float, float]:
    """A predicted EPSG:3766 point as the submission writes it: moved onto land, in degrees."""
    lat, lng = geo.unproject(*geo.snap_to_land(xy[0], xy[1]))
    return float(lat), float(lng)


@pytest.fixture
def damaged_images(demo_dir, tmp_path):
    """Eight demo locations as a LUMEN test set without CSV, with a truncated, a missing, a non-image view and
    a location without any view."""
    source = sorted((demo_dir / "data").iterdir())[:8]
    root = tmp_path / "testset" / "images"
    for folder in source:
        shutil.copytree(folder, root / folder.name)
    names = [f.name for f in source]
    truncated = root / names[0] / "90.jpg"
    data = truncated.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    (root / names[1] / "0.jpg").unlink()
    (root / names[2] / "270.jpg").write_text("not a jpeg")
    for view in VIEWS:
        (root / names[3] / f"{view}.jpg").unlink()
    return tmp_path / "testset", root, names


def test_row_for_every_folder_with_corrupt_and_missing_views(checkpoints, damaged_images, capfd):
    _, classification, _ = checkpoints
    dataset, root, names = damaged_images
    run_cli(predict_main, ["--checkpoint", str(classification), "--images", str(dataset), "--batch-size", "3"])
    run = capfd.readouterr()  # the command ended without SystemExit: exit status 0
    assert run.out.splitlines()[0] == "uuid,latitude,longitude"
    submission = pd.read_csv(io.StringIO(run.out))
    assert submission["uuid"].tolist() == sorted(names)
    assert np.isfinite(submission[["latitude", "longitude"]].to_numpy()).all()
    got = submission.set_index("uuid")
    model = load_model(classification, reports_dir=None).eval()
    # the location without views sits at the training prior (train-mean location), moved onto land when the
    # mean of Croatia's crescent falls outside it
    prior = geo.unproject(*geo.snap_to_land(*geo.project(model.hparams.prior_lat, model.hparams.prior_lng)))
    assert got.loc[names[3]].tolist() == pytest.approx([float(prior[0]), float(prior[1])], abs=1e-6)
    # a replaced view is its nearest readable neighbour: 90 -> 180, 0 -> 90, 270 -> 0
    expected = {
        names[0]: [0, 180, 180, 270], names[1]: [90, 90, 180, 270], names[2]: [0, 90, 180, 0],
        names[4]: [0, 90, 180, 270],
    }
    # (ONNX Runtime, the default engine, against torch: within 5e-5 degrees, a few metres: the refinement's inverse
    # distance weights magnify the engines' 1e-6 differences of the embedding)
    for uuid, views in expected.items():
        assert got.loc[uuid].tolist() == pytest.approx(to_latlng(reference_xy(model, root / uuid, views)), abs=5e-5)
    for text in (f"{names[0]} 90.jpg: truncated JPEG", f"{names[1]} 0.jpg: missing -> used 90.jpg",
                 f"{names[2]} 270.jpg: not a readable image", "1 location(s) have no readable view", names[3]):
        assert text in run.err


def test_default_checkpoint_and_test_split_to_out_file(checkpoints, tmp_path, capsys):
    reports, classification, regression = checkpoints
    os.utime(classification)  # the newest best checkpoint is the default
    out = tmp_path / "sub" / "submission.csv"
    frame = predict_main(["--reports-dir", str(reports), "--out", str(out)])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"checkpoint {classification}" in captured.err
    written = pd.read_csv(out)
    assert written["uuid"].tolist() == [u for u, _ in read_test_locations(classification)]
    assert written[["latitude", "longitude"]].to_numpy() == pytest.approx(frame[["latitude", "longitude"]].to_numpy(),
                                                                           abs=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["submission.csv"]


def test_tta_averages_the_quadruplet_and_its_mirror(checkpoints, demo_dir):
    _, classification, _ = checkpoints
    # the head's points (the refinement would move both onto the gallery's copy of these demo locations)
    model = load_model(classification, reports_dir=None, refine="none").eval()
    folders = sorted((demo_dir / "data").iterdir())[:5]
    frame, issues = predict_locations([model], [(f.name, f) for f in folders], tta=True, batch_size=2,
                                      progress=False)
    assert not issues.replaced and not issues.no_views
    for folder, row in zip(folders, frame.itertuples()):
        plain, mirrored = reference_xy(model, folder), reference_xy(model, folder, mirror=True)
        assert not np.allclose(plain, mirrored)  # the mirror is a different input, so TTA changes something
        assert (row.latitude, row.longitude) == pytest.approx(to_latlng((plain + mirrored) / 2), abs=1e-6)


def test_ensemble_averages_x_y_across_checkpoints(checkpoints, demo_dir, capsys):
    _, classification, regression = checkpoints
    images = str(demo_dir)
    # as the reference below: torch (ONNX Runtime agrees within metres, not 1e-6 degrees) and the head's points (the
    # refinement's inverse-distance weights magnify batch-size float differences to metres)
    torch_engine = ["--engine", "torch", "--refine", "none"]
    single = [predict_main(["--checkpoint", str(path), "--images", images]) for path in (classification, regression)]
    ensemble = predict_main(["--checkpoint", str(classification), str(regression), "--images", images, "--tta",
                             *torch_engine])
    tta = [predict_main(["--checkpoint", str(path), "--images", images, "--tta", *torch_engine])
           for path in (classification, regression)]
    capsys.readouterr()
    assert len(ensemble) == 120 and ensemble["uuid"].is_monotonic_increasing
    assert not np.allclose(single[0][["latitude"]], single[1][["latitude"]])
    # by hand: each model's TTA mean in EPSG:3766, averaged over the two models, then moved onto land
    models = [load_model(p, reports_dir=None, refine="none").eval() for p in (classification, regression)]
    folders = sorted((demo_dir / "data").iterdir())
    xy = np.mean([(reference_xys(m, folders) + reference_xys(m, folders, mirror=True)) / 2 for m in models], axis=0)
    lat, lng = geo.unproject(*geo.snap_to_land(xy[:, 0], xy[:, 1]))
    np.testing.assert_allclose(ensemble["latitude"], lat, atol=1e-6)
    np.testing.assert_allclose(ensemble["longitude"], lng, atol=1e-6)
    assert len(tta) == 2 and not np.allclose(tta[0]["latitude"], tta[1]["latitude"])


def test_centroids_and_topk_flags(checkpoints, demo_dir, tmp_path, capsys):
    """--centroids plain --topk 1: every location lands exactly on the plain centroid of its most likely class."""
    _, classification, _ = checkpoints
    folders = sorted((demo_dir / "data").iterdir())[:6]
    images = tmp_path / "subset"
    for folder in folders:
        shutil.copytree(folder, images / folder.name)
    frame = predict_main(["--checkpoint", str(classification), "--images", str(images), "--centroids", "plain",
                          "--topk", "1", "--num-workers", "0", "--refine", "none"])
    assert "plain centroids, top-1" in capsys.readouterr().err
    model = load_model(classification, reports_dir=None).eval()
    size = model.hparams.image_size
    plain = np.array(model.hparams.classes["plain"])
    for folder, row in zip(folders, frame.itertuples()):
        quad = torch.stack([eval_transform(size)(load_image(folder / f"{v}.jpg", size)) for v in VIEWS])
        with torch.no_grad():
            best = int(model(quad[None]).argmax())
        assert (row.latitude, row.longitude) == pytest.approx(to_latlng(plain[best]), abs=1e-6)
    default = predict_main(["--checkpoint", str(classification), "--images", str(images), "--num-workers", "0",
                            "--refine", "none"])
    assert not np.allclose(default[["latitude", "longitude"]], frame[["latitude", "longitude"]])
    with pytest.raises(UserError, match="--topk -1"):
        predict_main(["--checkpoint", str(classification), "--images", str(images), "--topk", "-1"])


def test_details_hold_the_confidence_regions_and_the_top_cells(checkpoints, demo_dir, tmp_path, capsys):
    """--details: the columns promised, a row per location with the submission's coordinates; the top cells are
    softmax(logits / T) of the torch model; each radius is the smallest holding more than its level's share (the
    level map's) of that mass spread over the class samples (checked by brute force)."""
    _, classification, _ = checkpoints
    folders = sorted((demo_dir / "data").iterdir())[:6]
    images = tmp_path / "subset"
    for folder in folders:
        shutil.copytree(folder, images / folder.name)
    path = tmp_path / "out" / "details.csv"
    submission = predict_main(["--checkpoint", str(classification), "--images", str(images), "--details", str(path),
                               "--details-top", "3", "--num-workers", "0"])
    assert list(submission.columns) == ["uuid", "latitude", "longitude"]
    assert f"wrote the details of 6 locations to {path}" in capsys.readouterr().err
    details = pd.read_csv(path, dtype={"uuid": str, "top": str})
    assert list(details.columns) == ["uuid", "latitude", "longitude", "radius50_km", "radius90_km", "top1_probability",
                                     "top"]
    assert details["uuid"].tolist() == submission["uuid"].tolist() == [f.name for f in folders]
    np.testing.assert_allclose(details[["latitude", "longitude"]], submission[["latitude", "longitude"]], atol=1e-7)
    model = load_model(classification, reports_dir=None).eval()
    calibration, size = model.calibration, model.hparams.image_size
    assert calibration.calibrated and calibration.class_samples.shape == (len(model.hparams.classes["cell"]), 32, 2)
    cells = np.asarray(model.hparams.classes["cell"])
    for folder, row in zip(folders, details.itertuples()):
        quad = torch.stack([eval_transform(size)(load_image(folder / f"{v}.jpg", size)) for v in VIEWS])
        with torch.no_grad():
            probabilities = torch.softmax(model(quad[None])[0].double() / calibration.temperature, dim=0).numpy()
        best = np.argsort(-probabilities)[:3]
        assert row.top == ";".join(f"{cells[k]}:{probabilities[k]:.4f}" for k in best)
        assert row.top1_probability == pytest.approx(probabilities[best[0]], abs=5.1e-5)
        x, y = geo.project(row.latitude, row.longitude)
        distance_km = np.hypot(calibration.class_samples[..., 0] - x, calibration.class_samples[..., 1] - y) / 1000

        def mass_within(km: float) -> float:
            return float((probabilities * (distance_km <= km).mean(axis=1)).sum())

        # the disc of each level holds just more than the mass share the level map gives it (the CSV rounds radii
        # to 0.01 km)
        for share, radius in zip(calibration.mass_levels([0.5, 0.9]), (row.radius50_km, row.radius90_km)):
            assert mass_within(radius + 0.006) > share and mass_within(radius - 0.006) <= share + 1e-9
    with pytest.raises(UserError, match="--details-top 0"):
        predict_main(["--checkpoint", str(classification), "--images", str(images), "--details", str(path),
                      "--details-top", "0"])


def test_details_of_regression_and_of_an_ensemble(checkpoints, demo_dir, tmp_path):
    """Regression: the radii are order statistics of the distances from the final point to the model's own point
    moved by each val residual (at the level map's shares), no cells. An ensemble: the mixture of both, the cells
    of its classification member."""
    _, classification, regression = checkpoints
    folders = sorted((demo_dir / "data").iterdir())[:8]
    images = tmp_path / "subset"
    for folder in folders:
        shutil.copytree(folder, images / folder.name)
    run = {}
    for name, paths in (("regression", [regression]), ("classification", [classification]),
                        ("ensemble", [classification, regression])):
        predict_main(["--checkpoint", *map(str, paths), "--images", str(images), "--details",
                      str(tmp_path / f"{name}.csv"), "--num-workers", "0", "--refine", "none"])
        run[name] = pd.read_csv(tmp_path / f"{name}.csv", dtype={"uuid": str, "top": str}, keep_default_na=False)
    model = load_model(regression, reports_dir=None, refine="none").eval()  # the head's points, as predicted above
    residuals = model.calibration.residuals_m
    assert model.calibration.calibrated and residuals.shape[1] == 2 and len(residuals) == model.calibration.fitted_on
    # the first distance at which more than the share of the residuals lies within
    ranks = np.minimum(np.floor(model.calibration.mass_levels([0.5, 0.9]) * len(residuals) + 1e-9).astype(int),
                       len(residuals) - 1)
    for folder, row in zip(folders, run["regression"].itertuples()):
        final = np.array(geo.project(row.latitude, row.longitude))
        distance_km = np.sort(np.hypot(*(reference_xy(model, folder) + residuals - final).T)) / 1000
        assert (float(row.radius50_km), float(row.radius90_km)) == pytest.approx(distance_km[ranks], abs=0.0051)
        assert row.top == row.top1_probability == ""
    ensemble, single = run["ensemble"], run["classification"]
    assert (ensemble["top"] == single["top"]).all() and (ensemble["top1_probability"] == single["top1_probability"]).all()
    assert (ensemble["radius50_km"].astype(float) <= ensemble["radius90_km"].astype(float)).all()
    assert not np.allclose(ensemble["radius90_km"].astype(float), single["radius90_km"].astype(float))


def nearest_in_gated_classes(model, folder: Path, gate: float) -> np.ndarray:
    """By hand: the gallery point of the location whose embedding is most similar (cosine) to the folder's, among
    the gallery locations of the most likely classes whose probabilities first add up to `gate` (all for
    regression)."""
    size = model.hparams.image_size
    transform = eval_transform(size, model.hparams.image_mean, model.hparams.image_std)
    quad = torch.stack([transform(load_image(folder / f"{v}.jpg", size)) for v in VIEWS])[None]
    with torch.no_grad():
        views = model.backbone(quad.flatten(0, 1)).view(1, 4, -1)
        fused, outputs = model.fusion(views), model.head_forward(views)
    embedding = (fused / fused.norm()).numpy()[0]
    gallery = model.gallery
    allowed = np.ones(len(gallery), bool)
    if model.hparams.approach != "regression":
        probabilities = outputs.softmax(dim=1).numpy()[0]
        ranked = sorted(range(len(probabilities)), key=lambda c: -probabilities[c])
        classes, total = [], 0.0
        for c in ranked:
            classes.append(c)
            total += probabilities[c]
            if total >= gate:
                break
        allowed = np.isin(gallery.labels, classes)
    similarity = np.where(allowed, gallery.embeddings @ embedding, -np.inf)
    return gallery.xy[int(np.argmax(similarity))]


@pytest.mark.parametrize("approach", ["classification", "regression"])
def test_refine_knn_moves_each_point_onto_its_nearest_gallery_location_with_either_engine(checkpoints, demo_dir,
                                                                                          tmp_path, approach, capsys):
    """--refine-k 1: every location lands on the gallery location nearest to it in embedding space (within the
    gated classes; regression: the whole gallery), found here by brute force; torch and ONNX Runtime agree."""
    _, classification, regression = checkpoints
    checkpoint = classification if approach == "classification" else regression
    folders = sorted((demo_dir / "data").iterdir())[-12:]
    images = tmp_path / "subset"
    for folder in folders:
        shutil.copytree(folder, images / folder.name)
    common = ["--checkpoint", str(checkpoint), "--images", str(images), "--num-workers", "0", "--refine-k", "1",
              "--refine-gate", "0.6"]
    frames = {engine: predict_main([*common, "--engine", engine]) for engine in ("torch", "onnx")}
    said = capsys.readouterr().err
    assert "refine knn (k 1" in said and ("classes up to p 0.6" in said) == (approach == "classification")
    model = load_model(checkpoint, reports_dir=None)
    for folder, row, onnx_row in zip(folders, frames["torch"].itertuples(), frames["onnx"].itertuples()):
        expected = to_latlng(nearest_in_gated_classes(model, folder, 0.6))
        assert (row.latitude, row.longitude) == pytest.approx(expected, abs=1e-6)
        assert (onnx_row.latitude, onnx_row.longitude) == pytest.approx(expected, abs=1e-6)
    # the default settings (several neighbours, inverse cosine distance weights): the engines agree within metres
    torch_rows, onnx_rows = (predict_main([*common[:4], "--num-workers", "0", "--engine", engine])
                             for engine in ("torch", "onnx"))
    metres = 1000 * geo.haversine_km(torch_rows.latitude, torch_rows.longitude, onnx_rows.latitude, onnx_rows.longitude)
    assert metres.max() < 5.0, metres.max()
    head = predict_main([*common, "--refine", "none"])
    assert not np.allclose(head[["latitude", "longitude"]], frames["onnx"][["latitude", "longitude"]])
    with pytest.raises(UserError, match="--refine-gate 1.5"):
        predict_main([*common, "--refine-gate", "1.5"])


def test_a_reader_that_went_away_ends_predict_quietly(checkpoints, demo_dir):
    """`python -m src.predict | head` once head has exited: no BrokenPipeError traceback, and the exit status
    of a process killed by SIGPIPE (141), as other command-line tools end."""
    _, classification, _ = checkpoints
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the CSV is written
    try:
        run = subprocess.run([sys.executable, "-m", "src.predict", "--checkpoint", str(classification), "--images",
                              str(demo_dir), "--num-workers", "0", "--engine", "torch"], cwd=REPO, stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert run.returncode == 141, run.stderr
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr and "error" not in run.stderr.lower()


def predict_quietly(argv, capsys) -> tuple[pd.DataFrame, str]:
    frame = predict_main([str(a) for a in argv])
    return frame, capsys.readouterr().err


def test_a_frozen_checkpoint_reads_the_features_train_cached_and_runs_only_its_head(checkpoints, demo_dir, tmp_path,
                                                                                   capsys):
    reports, classification, regression = checkpoints
    train_cache = reports / "cache"  # filled by the two training runs: train, val and test entries
    assert not backbone_trained(classification) and not backbone_trained(regression)
    n_test = len(read_test_locations(classification))
    # the default run (the checkpoint's test split): src.train cached every test location already; the head's
    # points (the refinement's inverse-distance weights magnify float differences to metres: checked below)
    cached, err = predict_quietly(["--checkpoint", classification, "--cache-dir", train_cache, "--num-workers", 0,
                                   "--refine", "none"], capsys)
    assert "backbone features from the feature cache" in err
    assert f"0 location(s) computed, {n_test} reused" in err
    full, err = predict_quietly(["--checkpoint", classification, "--num-workers", 0, "--no-cache-features",
                                 "--refine", "none"], capsys)
    assert "feature cache" not in err
    assert cached["uuid"].tolist() == full["uuid"].tolist()
    np.testing.assert_allclose(cached[["latitude", "longitude"]], full[["latitude", "longitude"]], atol=1e-6)
    refined = [predict_quietly(["--checkpoint", classification, "--cache-dir", train_cache, "--num-workers", 0, *flags],
                               capsys)[0] for flags in ([], ["--no-cache-features"])]
    metres = 1000 * geo.haversine_km(refined[0].latitude, refined[0].longitude, refined[1].latitude,
                                     refined[1].longitude)
    assert metres.max() < 25.0, metres.max()
    # --images: the missing entries are computed (ONNX Runtime) and stored, then read by the next run
    common = ["--checkpoint", regression, "--images", demo_dir, "--cache-dir", tmp_path / "cache", "--num-workers", 0,
              "--refine", "none"]
    first, err = predict_quietly(common, capsys)
    assert "120 location(s) computed, 0 reused" in err
    second, err = predict_quietly(common, capsys)
    assert "0 location(s) computed, 120 reused" in err
    full, _ = predict_quietly([*common, "--no-cache-features"], capsys)
    assert len(full) == 120 and first["uuid"].tolist() == full["uuid"].tolist()
    np.testing.assert_allclose(first[["latitude", "longitude"]], full[["latitude", "longitude"]], atol=1e-6)
    pd.testing.assert_frame_equal(first, second)
    # the head on the cached features is the model on the images, by hand
    model = load_model(regression, reports_dir=None, refine="none").eval()
    folders = sorted((demo_dir / "data").iterdir())[:5]
    np.testing.assert_allclose(first[["latitude", "longitude"]].to_numpy()[:5],
                               [to_latlng(reference_xy(model, folder)) for folder in folders], atol=1e-6)


def test_a_fine_tuned_checkpoint_and_tta_predict_from_the_images(checkpoints, demo_dir, tmp_path, capsys):
    reports, classification, _ = checkpoints
    tuned = train_checkpoint(["--approach", "classification", "--dataset-dirs", demo_dir, "--backbone", "tiny",
                              "--no-pretrained", "--image-size", 32, "--epochs", 1, "--unfreeze-at-epoch", 0,
                              "--num-workers", 0, "--out-dir", tmp_path / "runs", "--cache-dir", tmp_path / "train"])
    assert backbone_trained(tuned)
    images = tmp_path / "subset"
    for folder in sorted((demo_dir / "data").iterdir())[:6]:
        shutil.copytree(folder, images / folder.name)
    cache = tmp_path / "cache"
    frames = []
    for argv in (["--checkpoint", tuned], ["--checkpoint", classification, "--tta"]):
        argv = [*argv, "--refine", "none"]  # the head's points, as reference_xy below
        frame, err = predict_quietly([*argv, "--images", images, "--cache-dir", cache, "--num-workers", 0], capsys)
        assert "feature cache" not in err and not cache.exists()  # the whole model on the images
        full, _ = predict_quietly([*argv, "--images", images, "--no-cache-features", "--num-workers", 0], capsys)
        pd.testing.assert_frame_equal(frame, full)
        frames.append(frame)
    model = load_model(tuned, reports_dir=None, refine="none").eval()
    for row in frames[0].itertuples():  # the fine-tuned backbone on the images
        assert (row.latitude, row.longitude) == pytest.approx(to_latlng(reference_xy(model, images / row.uuid)),
                                                               abs=1e-6)
