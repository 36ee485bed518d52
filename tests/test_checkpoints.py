"""The one checkpoint loader: finding the default checkpoint, reading hparams, loading a GeoModel, one-line errors."""

import contextlib
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src.inference.checkpoints import REPORTS_DIR, checkpoints_listing, find_checkpoint, list_checkpoints, load_model, read_checkpoint, read_hparams, val_km
from src.core.errors import UserError
from src.data.quadruplets import QuadrupletFolders, collate_quadruplets, input_spec, spec_transforms
from src.train import main as train_main


@pytest.fixture(scope="module")
def trained(tiny_checkpoints):
    """The session's tiny classification run on the demo set (conftest.tiny_checkpoints, read-only): (its
    reports dir, its best checkpoint)."""
    best = tiny_checkpoints["classification"]
    return best.parents[3], best  # <reports>/<run>/version_N/checkpoints/best-...


def place(source: Path, reports: Path, run: str, name: str, mtime: float) -> Path:
    path = reports / run / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    os.utime(path, (mtime, mtime))
    return path


def test_default_is_the_best_by_val_km_of_the_newest_run(trained, tmp_path):
    _, best = trained
    reports = tmp_path / "reports"
    place(best, reports, "a/version_0", "best-epoch09-km10.0.ckpt", 1000)  # best overall, but an older run
    wanted = place(best, reports, "a/version_1", "best-epoch02-km30.5.ckpt", 2000)
    place(best, reports, "a/version_1", "best-epoch05-km41.0.ckpt", 3000)  # the newest file, worse val km
    place(best, reports, "a/version_1", "last.ckpt", 3500)  # not a best checkpoint
    assert find_checkpoint(reports) == wanted
    assert list_checkpoints(reports, best_only=True)[0].name == "best-epoch05-km41.0.ckpt"
    assert [p.name for p in list_checkpoints(reports)][0] == "last.ckpt"


def test_val_km_from_the_name_or_the_checkpoint_state(trained, tmp_path):
    _, best = trained
    assert val_km(Path("x/best-epoch03-km28.4.ckpt")) == 28.4
    unnamed = tmp_path / "best.ckpt"
    shutil.copyfile(best, unnamed)
    # the saved ModelCheckpoint score is the unrounded value the file name shows to 1 decimal
    assert val_km(unnamed) == pytest.approx(val_km(best), abs=0.05)
    assert val_km(unnamed) != float("inf")


def test_load_model_matches_the_saved_weights_and_takes_overrides(trained):
    _, best = trained
    saved = torch.load(best, map_location="cpu", weights_only=False)
    model = load_model(best)
    assert not model.training
    for key, value in saved["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.hparams.centroids == "weighted"
    plain = load_model(best, centroids="plain", topk=3)
    assert plain.hparams.centroids == "plain" and plain.hparams.topk == 3
    assert torch.equal(plain.class_xy, torch.tensor(saved["hyper_parameters"]["classes"]["plain"], dtype=torch.float64))
    assert not torch.equal(plain.class_xy, model.class_xy)
    assert read_hparams(best)["image_size"] == 32


def test_bad_files_are_one_line_errors(trained, tmp_path):
    reports, best = trained
    (tmp_path / "text.ckpt").write_text("hello\n")
    (tmp_path / "truncated.ckpt").write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    cases = {
        tmp_path / "nope.ckpt": "file not found",
        tmp_path: "is a directory",
        tmp_path / "text.ckpt": "not a readable checkpoint",
        tmp_path / "truncated.ckpt": "not a readable checkpoint",
        tmp_path / "foreign.ckpt": "not a checkpoint written by src.train",
    }
    for path, fragment in cases.items():
        with pytest.raises(UserError, match=fragment) as error:
            load_model(path, flag="--checkpoint")
        assert "\n" not in str(error.value) and str(error.value).startswith(f"--checkpoint {path}: ")
    # Lightning saves the loop state in every checkpoint; without it a file cannot be resumed from
    assert "loops" in read_checkpoint(best, "--resume", training_state=True)
    stripped = {k: v for k, v in torch.load(best, map_location="cpu", weights_only=False).items() if k != "loops"}
    torch.save(stripped, tmp_path / "weights_only.ckpt")
    with pytest.raises(UserError, match="not a training checkpoint"):
        read_checkpoint(tmp_path / "weights_only.ckpt", "--resume", training_state=True)
    with pytest.raises(UserError, match="lacks no_such_key"):
        read_hparams(best, required=("no_such_key",))


def test_a_missing_file_lists_the_checkpoints_that_exist(trained, tmp_path):
    reports, best = trained
    with pytest.raises(UserError) as error:
        read_checkpoint(tmp_path / "typo.ckpt", reports_dir=reports)
    assert str(best) in str(error.value) and "newest first" in str(error.value)
    assert "no checkpoint under" in checkpoints_listing(tmp_path / "empty")
    # load_model (export, serve) lists reports/ unless told another dir
    with pytest.raises(UserError) as error:
        load_model(tmp_path / "typo.ckpt")
    assert f"under {REPORTS_DIR}" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError) as error:
        load_model(tmp_path / "typo.ckpt", reports_dir=reports)
    assert str(best) in str(error.value)
    with pytest.raises(UserError, match="no best checkpoint"):
        find_checkpoint(tmp_path / "empty")


# A checkpoint written by src.train before the redesign (typed configs, the DataModule's saved data config):
# `python -m src.train --approach classification --dataset-dirs /tmp/legacy/demo --backbone tiny --no-pretrained
#  --epochs 2 --image-size 32 --num-workers 0 --batch-size 16 --engine torch --run-name legacy` on
# `write_demo_dataset('/tmp/legacy/demo', n_locations=120, image_size=64, seed=0)`, its last.ckpt (epoch 2 of 2,
# the same weights as its best checkpoint). That run's test split: 9 locations, mean 134.67172395898783 km.
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_classification_last.ckpt"
LEGACY_TEST_MEAN_KM = 134.67172395898783


def legacy_checkpoint(tmp_path: Path, demo: Path) -> tuple[Path, Path]:
    """(the legacy checkpoint in a run folder under tmp_path, `demo`), its data paths moved to `demo`, the demo set
    it was trained on regenerated elsewhere (as after moving the data): conftest's demo_dir is that set."""
    saved = torch.load(LEGACY, map_location="cpu", weights_only=False)
    hparams = saved["hyper_parameters"]
    assert "datamodule_hyper_parameters" not in saved and hparams["dataset_dirs"] == ["/tmp/legacy/demo"]
    hparams["dataset_dirs"] = [str(demo.resolve())]
    hparams["test_locations"] = [[u, folder.replace("/tmp/legacy/demo", str(demo.resolve()))]
                                 for u, folder in hparams["test_locations"]]
    path = tmp_path / "reports" / "legacy" / "version_0" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(saved, path)
    return path, demo


def test_a_checkpoint_written_before_the_redesign_predicts_analyzes_and_resumes(demo_dir, tmp_path, capsys):
    import pandas as pd

    from src.analyze import main as analyze_main
    from src.core import geo
    from src.inference.checkpoints import read_data_config, read_test_locations
    from src.predict import main as predict_main

    path, demo = legacy_checkpoint(tmp_path, demo_dir)
    model = load_model(path, reports_dir=None)
    assert (model.config.approach, model.config.backbone, model.config.fusion) == ("classification", "tiny", "mean")
    data = read_data_config(path)
    assert (data.dataset_dirs, data.spacing, data.seed, data.split) == ((str(demo.resolve()),), 0.5, 0, (0.8, 0.1, 0.1))
    assert len(read_test_locations(path)) == 9
    # predict: the test split of its run, scored by hand, gives the run's own test mean
    submission = predict_main(["--checkpoint", str(path), "--engine", "torch", "--num-workers", "0"])
    truth = pd.read_csv(demo / "data.csv", dtype={"uuid": str}).set_index("uuid").loc[submission["uuid"]]
    km = geo.haversine_km(submission["latitude"], submission["longitude"], truth["latitude"], truth["longitude"])
    assert len(km) == 9 and km.mean() == pytest.approx(LEGACY_TEST_MEAN_KM, rel=1e-6)
    # analyze rebuilds the run's locations from the old hparams
    tables = analyze_main(["--checkpoint", str(path), "--spacings", "1.0", "--figures-dir", str(tmp_path / "figures"),
                           "--tables-dir", str(tmp_path / "tables")])
    assert len(tables["oracle"]) == 2 and f"run {path.parent.parent}, checkpoint {path.name}" in capsys.readouterr().err
    # --resume continues the old run to a third epoch, in its folder
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_main(["--approach", "classification", "--dataset-dirs", str(demo), "--backbone", "tiny", "--no-pretrained",
                    "--epochs", "3", "--image-size", "32", "--num-workers", "0", "--batch-size", "16", "--engine", "torch",
                    "--out-dir", str(tmp_path / "reports"), "--run-name", "legacy", "--cache-dir", str(tmp_path / "cache"),
                    "--resume", str(path)])
    assert printed.getvalue().splitlines()[-1].startswith(f"checkpoint: {path.parent}/")
    resumed = torch.load(path, map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["datamodule_hyper_parameters"]["data"]["dataset_dirs"] == [str(demo.resolve())]


def test_each_checkpoint_carries_the_calibration_fitted_on_its_val_split(trained):
    """The temperature in the best checkpoint is the NLL fit on the val locations' logits of its own weights; its
    class samples lie on the land of their class's cell."""
    import numpy as np
    import pandas as pd
    import shapely

    from src.data.cells import build_grid
    from src.data.quadruplets import eval_transform, load_quadruplet
    from src.evaluation.calibration import fit_temperature

    _, best = trained
    saved = read_checkpoint(best)["calibration"]
    model = load_model(best, reports_dir=None)
    assert model.calibration.calibrated and model.calibration.temperature == saved["temperature"]
    locations = pd.read_csv(best.parents[1] / "locations.csv", dtype={"uuid": str})
    val = locations[locations["split"] == "val"]
    assert saved["fitted_on"] == len(val) > 0
    hp = model.hparams
    transform = eval_transform(hp.image_size, hp.image_mean, hp.image_std)
    views = torch.stack([load_quadruplet(Path(folder), hp.image_size, transform) for folder in val["image_dir"]])
    with torch.no_grad():
        logits = model(views)
    expected = fit_temperature(logits, torch.tensor(val["label"].to_numpy()))
    assert saved["temperature"] == pytest.approx(expected, rel=1e-3)
    samples = model.calibration.class_samples
    land = build_grid(0.5).cells.loc[hp.classes["cell"], "land"].to_numpy()
    assert samples.shape == (len(land), 32, 2)
    assert all(shapely.intersects_xy(polygon, *points.T).all() for polygon, points in zip(land, samples))
    assert len(np.unique(samples.reshape(-1, 2), axis=0)) == samples.shape[0] * 32  # spread, not repeated
    # last.ckpt carries the last validation's own fit
    assert read_checkpoint(best.parent / "last.ckpt")["calibration"]["fitted_on"] == len(val)


def test_a_checkpoint_without_calibration_loads_uncalibrated_and_says_so(tmp_path, capsys, demo_dir):
    import pandas as pd

    from src.predict import main as predict_main

    path, demo = legacy_checkpoint(tmp_path, demo_dir)
    assert "calibration" not in read_checkpoint(path)
    model = load_model(path, reports_dir=None)
    calibration = model.calibration
    assert not calibration.calibrated and calibration.temperature == 1.0
    assert calibration.class_samples.tolist() == [[xy] for xy in model.hparams.classes["weighted"]]  # the centroids
    details = tmp_path / "details.csv"
    predict_main(["--checkpoint", str(path), "--details", str(details), "--engine", "torch", "--num-workers", "0"])
    assert f"warning: --details: {path} carries no calibration" in capsys.readouterr().err
    written = pd.read_csv(details)
    assert len(written) == 9 and (written["radius50_km"] <= written["radius90_km"]).all()
    assert (written["top1_probability"] > 0).all()


def test_the_best_checkpoint_holds_the_gallery_of_its_train_and_val_locations(trained, caplog):
    """--refine knn (the default): the best checkpoint carries the fused embeddings (here the mean of the four view
    features, normalised) of the run's train and val locations with their points, classes and uuids."""
    _, best = trained
    locations = pd.read_csv(best.parent.parent / "locations.csv", dtype={"uuid": str})
    labelled = locations[locations.split != "test"].set_index("uuid")
    model = load_model(best)
    gallery = model.gallery
    assert model.hparams.refine == "knn" and sorted(gallery.uuids) == sorted(labelled.index)
    rows = labelled.loc[gallery.uuids]
    np.testing.assert_allclose(gallery.xy, rows[["crs_x", "crs_y"]].to_numpy(float), atol=1e-6)
    np.testing.assert_array_equal(gallery.labels, rows["label"].to_numpy())
    spec = input_spec(model.hparams)
    folders = QuadrupletFolders(rows["image_dir"].tolist()[:8], spec_transforms([spec]))
    views = collate_quadruplets([folders[i] for i in range(8)])[1][spec]
    with torch.no_grad():
        features = model.backbone(views.flatten(0, 1)).view(8, 4, -1).mean(dim=1)
    expected = (features / features.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(gallery.embeddings[:8], expected, atol=2e-3)  # stored as float16
    assert read_checkpoint(best)["gallery"]["embeddings"].dtype == torch.float16
    tuned = load_model(best, refine_k=3, refine_gate=0.4)
    assert (tuned.hparams.refine_k, tuned.hparams.refine_gate) == (3, 0.4) and len(tuned.gallery) == len(gallery)
    # last.ckpt (a run with a val split) has no gallery: asking for knn is a one-line error; as trained it loads
    # with the head's points, and says so
    last = best.parent / "last.ckpt"
    with pytest.raises(UserError, match=r"holds no gallery for --refine knn") as error:
        load_model(last, refine="knn")
    assert "\n" not in str(error.value) and str(error.value).startswith(f"--checkpoint {last}: ")
    with caplog.at_level(logging.WARNING):
        as_trained = load_model(last)
    assert as_trained.gallery is None and as_trained.hparams.refine == "none"
    assert f"{last}: trained with --refine knn but holds no gallery" in caplog.text
