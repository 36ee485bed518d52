"""Training end to end on a generated demo set: CLI output, checkpoint contents, resume, fine-tuning."""

import contextlib
import io
import shutil
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from src.core import geo
from src.data.datamodule import FeatureDataset, GeoDataModule, QuadrupletDataset
from src.data.features import FeatureCache
from src.data.quadruplets import eval_transform, load_quadruplet
from src.data.enrich import enrich
from src.core.errors import run_cli
from src.model.config import DEFAULT_LABEL_SMOOTHING_KM
from src.model.finetune import FreezeThenUnfreeze, phase_of, phase_starts
from src.model.geomodel import snapped_km
from src.training.callbacks import RandomStates
from src.training.callbacks import TestCollector as Collector  # (pytest would collect a Test* name)
from src.training.run import resolve_choices
from src.inference.checkpoints import load_model, read_data_config, read_test_locations
from tests.builders import enriched_classes, geo_model, loader_config
from src.train import main

# Lightning 2.6 with torch 2.14: a deprecation warning per batch, from Lightning's own code; a phase's fit
# continues in the checkpoints folder of the phase before (src.training.run.train filters it too)
pytestmark = [pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)"),
              pytest.mark.filterwarnings(r"ignore:Checkpoint directory .* exists and is not empty")]


def run_main(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in argv])
    return out.getvalue().splitlines()


def checkpoint_path(lines):
    assert lines[-1].startswith("checkpoint: ")
    return lines[-1].removeprefix("checkpoint: ")


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    """A classification run on the demo set: pretrained efficientnet_lite0, frozen, cached features."""
    out = tmp_path_factory.mktemp("reports")
    lines = run_main(["--approach", "classification", "--dataset-dirs", demo_dir, "--backbone", "efficientnet_lite0",
                      "--image-size", 64, "--epochs", 12, "--lr", 3e-3, "--num-workers", 0,
                      "--out-dir", out, "--cache-dir", out / "cache", "--run-name", "e2e"])
    return lines, out


def test_end_to_end_training_beats_the_constant_baseline(trained, demo_dir):
    lines, out = trained
    path = checkpoint_path(lines)
    assert "/e2e/version_0/checkpoints/best-" in path
    assert any("constant (train mean location)" in line for line in lines)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    best_val_km = next(state["best_model_score"] for key, state in checkpoint["callbacks"].items()
                       if "val/km_mean" in key).item()
    # independent reference: the constant prediction (train mean location) on the same split
    locations = enrich([demo_dir], spacing=0.5, seed=0, progress=False).locations
    train, val = locations[locations.split == "train"], locations[locations.split == "val"]
    baseline = geo.haversine_km(train.latitude.mean(), train.longitude.mean(), val.latitude, val.longitude).mean()
    assert best_val_km <= 0.75 * baseline, (best_val_km, baseline)
    assert (out / "e2e" / "version_0" / "checkpoints" / "last.ckpt").exists()
    assert list((out / "e2e" / "version_0").glob("events.out.tfevents.*"))
    assert "approach: classification" in (out / "e2e" / "version_0" / "hparams.yaml").read_text()
    # the confidence regions on the test split: printed, in metrics.json, drawn
    metrics = json.loads((out / "e2e" / "version_0" / "metrics.json").read_text())
    confidence = metrics["confidence"]
    assert confidence["count"] == metrics["test"]["count"] and confidence["calibrated"]
    assert 0 < confidence["median_radius50_km"] <= confidence["median_radius90_km"]
    assert any(line.startswith("confidence regions on the test split") for line in lines)
    assert (out / "e2e" / "version_0" / "reliability.png").stat().st_size > 10_000


def test_checkpoint_holds_what_predict_needs(trained, demo_dir):
    path = checkpoint_path(trained[0])
    model = load_model(path, reports_dir=None)
    hp = model.hparams
    enriched = enrich([demo_dir], spacing=0.5, seed=0, progress=False)
    test = enriched.locations[enriched.locations.split == "test"]
    train = enriched.locations[enriched.locations.split == "train"]
    assert (hp.approach, hp.backbone, hp.image_size, hp.centroids) == ("classification", "efficientnet_lite0", 64, "weighted")
    assert model.classes == enriched_classes(enriched) and set(hp.classes) >= {"weighted", "clipped", "plain"}
    assert hp.scaler == pytest.approx(enriched.scaler)
    # every data flag that decides the split, paths absolute (predict/analyze from any working directory)
    data = read_data_config(path)
    assert data.dataset_dirs == (str(demo_dir.resolve()),) and data.holdout_dirs == () and (data.seed, data.spacing) == (0, 0.5)
    assert (data.split, data.max_outside_km, data.mainland_only, data.full_decode) == ((0.8, 0.1, 0.1), 10.0, False, False)
    rebuilt = enrich(data.dataset_dirs, data.spacing, data.seed, data.split, data.holdout_dirs, full_decode=data.full_decode,
                     max_outside_km=data.max_outside_km, mainland_only=data.mainland_only, progress=False).locations
    assert rebuilt[["uuid", "split"]].equals(enriched.locations[["uuid", "split"]])
    test_locations = read_test_locations(path)
    assert all(image_dir.is_absolute() for _, image_dir in test_locations)
    assert hp.prior_lat == pytest.approx(train.latitude.mean()) and hp.prior_lng == pytest.approx(train.longitude.mean())
    assert [[u, str(d)] for u, d in test_locations] == sorted(test[["uuid", "image_dir"]].astype(str).values.tolist())
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    # predictions of the reloaded model: metres in EPSG:3766, close to the truth on average
    test = test.sort_values("uuid")
    views = torch.stack([load_quadruplet(d, 64, eval_transform(64)) for _, d in test_locations])
    xy = model.locate(views).numpy()
    lat, lng = geo.unproject(xy[:, 0], xy[:, 1])
    km = geo.haversine_km(lat, lng, test.latitude, test.longitude)
    baseline = geo.haversine_km(hp.prior_lat, hp.prior_lng, test.latitude, test.longitude)
    assert km.mean() < baseline.mean()


def test_resume_continues_from_the_checkpoint(trained, demo_dir):
    lines, out = trained
    last = out / "e2e" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 11 and saved["phase"] == "frozen"
    # the plateau scheduler stepped on epoch 11's val km before the checkpoint was written (12 steps, not 11),
    # so the resumed run's schedule carries on where the uninterrupted one would
    assert saved["lr_schedulers"][0]["last_epoch"] == 12
    lines = run_main(["--approach", "classification", "--dataset-dirs", demo_dir, "--backbone", "efficientnet_lite0",
                      "--image-size", 64, "--epochs", 13, "--num-workers", 0, "--out-dir", out,
                      "--cache-dir", out / "cache", "--run-name", "e2e", "--resume", last])
    assert "/e2e/version_0/" in checkpoint_path(lines)  # continues in the run's own folder
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 12  # one more epoch, not thirteen
    assert not (out / "e2e" / "version_1").exists()


def fit_in_phases(new_model, data: GeoDataModule, epochs: int, tmp_path, callbacks=(), blocks=0, freeze_bn=False,
                  resume=None, first_epoch=0, **trainer_args):
    """The phases of a run on a plain Trainer, as src.training.run.fit runs them: a fit per phase
    (`phase_starts`), the fine-tuning one a new model continuing from the frozen one's last checkpoint.
    Returns the last phase's trainer and model."""
    unfreeze = data.loader.unfreeze_at_epoch
    for start in phase_starts(unfreeze, epochs, first_epoch):
        last = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None, enable_version_counter=False)
        data.loader = replace(data.loader, first_epoch=start)
        trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[FreezeThenUnfreeze(unfreeze, blocks, freeze_bn, first_epoch=start), last,
                                        RandomStates(), *callbacks], **trainer_args)
        model = new_model()
        trainer.fit(model, datamodule=data, ckpt_path=resume)
        resume = last.best_model_path
    return trainer, model


def test_a_run_fits_once_per_phase():
    assert phase_starts(None, 5) == [0] and phase_starts(7, 5) == [0] and phase_starts(5, 5) == [0]
    assert phase_starts(0, 5) == [0] and phase_starts(2, 5) == [0, 2]
    assert phase_starts(2, 5, first_epoch=1) == [1, 2] and phase_starts(2, 5, first_epoch=3) == [3]
    assert [phase_of(2, epoch) for epoch in range(4)] == ["frozen", "frozen", "fine-tuning", "fine-tuning"]
    assert phase_of(None, 9) == "frozen"


class RecordBackbone(pl.Callback):
    """Backbone and head state (parameters and BatchNorm buffers) at the start and the end of each epoch."""

    def __init__(self):
        self.backbone, self.head = [], []

    def snapshot(self, pl_module):
        self.backbone.append({k: v.clone() for k, v in pl_module.backbone.state_dict().items()})
        self.head.append({k: v.clone() for k, v in pl_module.head.state_dict().items()})

    def on_train_start(self, trainer, pl_module):
        if not self.backbone:  # the first fit's start (a later fit starts where the one before ended)
            self.snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshot(pl_module)


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cache", [True, False])
def test_backbone_stays_frozen_until_the_unfreeze_epoch(demo_dir, tmp_path, cache):
    enriched = enrich([demo_dir], spacing=1.0, seed=0, progress=False)
    pl.seed_everything(0)
    data = GeoDataModule(enriched.locations, loader_config(32, batch_size=32, unfreeze_at_epoch=2,
                                                           cache_dir=tmp_path / "cache" if cache else None, backbone="tiny"))
    record = RecordBackbone()
    _, model = fit_in_phases(lambda: geo_model("regression", enriched=enriched, hidden=16, lr=1e-2, lr_finetune=1e-2,
                                               unfreeze_at_epoch=2), data, 3, tmp_path, [record], limit_val_batches=1)
    start, after0, after1, after2 = record.backbone
    assert same(start, after0) and same(start, after1)  # frozen: weights and BatchNorm statistics unchanged
    assert not same(after1, after2)  # the fine-tuning phase from epoch 2: it trains
    assert not same(record.head[0], record.head[1])  # the head trains from the first epoch
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert bool(data._features) == cache


def tiny_classifier(enriched, unfreeze_at_epoch: int | None = None):
    pl.seed_everything(0, verbose=False)
    return geo_model("classification", enriched=enriched, hidden=16, lr_finetune=1e-2, scheduler="none",
                     unfreeze_at_epoch=unfreeze_at_epoch)


def fit_then_test(enriched, loader, epochs: int, tmp_path, unfreeze_at_epoch: int | None = None):
    """A tiny classifier fitted in its phases through `loader`'s DataModule for `epochs`, then tested on its last
    weights (the phases' checkpoints under tmp_path/phases)."""
    data = GeoDataModule(enriched.locations, loader)
    tests = Collector()
    trainer, model = fit_in_phases(lambda: tiny_classifier(enriched, unfreeze_at_epoch), data, epochs,
                                   tmp_path / "phases", [tests], limit_val_batches=1)
    trainer.test(model, datamodule=data, verbose=False)
    return model, data, trainer, tests


@pytest.mark.parametrize("augment", ["finetune", "always"])
def test_a_frozen_run_tests_on_cached_features_with_the_metrics_of_the_images(demo_dir, tmp_path, augment):
    enriched = enrich([demo_dir], spacing=1.0, seed=0, progress=False)
    locations = enriched.locations
    loader = loader_config(32, batch_size=32, augment=augment, cache_dir=tmp_path / "cache", backbone="tiny",
                           engine="onnx")
    model, data, trainer, tests = fit_then_test(enriched, loader, 1, tmp_path)
    assert isinstance(trainer.test_dataloaders.dataset, FeatureDataset)  # even with augment always: eval features
    # one pass of ONNX Runtime filled the test entries with the others; the test computed none
    cached_splits = ["val", "test"] if augment == "always" else ["train", "val", "test"]
    assert data.feature_cache_counts() == {"computed": locations.split.isin(cached_splits).sum(), "reused": 0}
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) == data.feature_cache.computed
    on_cache = tests.km.copy()
    assert len(on_cache) == (locations.split == "test").sum()
    # the same weights tested on the images (a DataModule without a cache): the same km
    trainer.test(model, datamodule=GeoDataModule(locations, loader_config(32, batch_size=32)), verbose=False)
    assert isinstance(trainer.test_dataloaders.dataset, QuadrupletDataset)
    assert on_cache.mean() == pytest.approx(tests.km.mean(), rel=1e-4)
    np.testing.assert_allclose(on_cache, tests.km, rtol=1e-3, atol=1e-3)


def test_a_fine_tuned_run_tests_on_images_through_the_fine_tuned_backbone(demo_dir, tmp_path):
    enriched = enrich([demo_dir], spacing=1.0, seed=0, progress=False)
    locations = enriched.locations
    loader = loader_config(32, batch_size=32, unfreeze_at_epoch=1, augment="none", cache_dir=tmp_path / "cache",
                           backbone="tiny", engine="onnx")
    model, data, trainer, tests = fit_then_test(enriched, loader, 2, tmp_path, unfreeze_at_epoch=1)
    assert isinstance(trainer.test_dataloaders.dataset, QuadrupletDataset)
    # the frozen epoch filled train and val, in the folder of the starting weights; no test entry anywhere
    assert data.feature_cache.computed == locations.split.isin(["train", "val"]).sum()
    assert [len(list(folder.iterdir())) for folder in (tmp_path / "cache").iterdir()] == [data.feature_cache.computed]
    tuned = FeatureCache(tmp_path / "cache", "tiny", model.backbone, 32, preprocessing=repr(data.eval_transform()))
    assert tuned.directory != data.feature_cache.directory  # the key holds the weights: no stale entry can match
    # the test's points are the fine-tuned model's on the images...
    test = data.split("test")
    lat, lng = test["latitude"].to_numpy(), test["longitude"].to_numpy()
    views = torch.stack([load_quadruplet(d, 32, data.eval_transform()) for d in test["image_dir"]])
    expected, km = snapped_km(model.locate(views).numpy(), lat, lng)
    np.testing.assert_allclose(tests.xy, expected, atol=1e-3)  # metres
    np.testing.assert_allclose(tests.km, km, rtol=1e-6)
    # ...not the ones the starting (frozen-phase) backbone's features would give through the fine-tuned head
    start = tiny_classifier(enriched, unfreeze_at_epoch=1).backbone.eval()
    with torch.no_grad():
        stale = model.outputs_to_xy(model.head_forward(start(views.flatten(0, 1)).view(len(test), 4, -1)))
    assert np.abs(snapped_km(stale.numpy(), lat, lng)[0] - tests.xy).max() > 100  # metres


def test_unfreezing_only_the_last_stages(demo_dir, tmp_path):
    enriched = enrich([demo_dir], spacing=1.0, seed=0, progress=False)
    data = GeoDataModule(enriched.locations, loader_config(32, batch_size=64, unfreeze_at_epoch=1,
                                                           cache_dir=tmp_path / "cache", backbone="tiny"))
    record = RecordBackbone()
    fit_in_phases(lambda: geo_model("classification", enriched=enriched, hidden=16, unfreeze_at_epoch=1), data, 2,
                  tmp_path, [record], blocks=1, limit_val_batches=1)
    before, after = record.backbone[1], record.backbone[2]
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"2"}  # body.2 is the last stage of the tiny CNN; the first two stay as they were


def test_cli_offline_weights_error_is_one_line(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--approach", "regression", "--dataset-dirs", str(demo_dir), "--backbone", "resnet50",
                       "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --backbone resnet50:") and "resnet50-11ad3fa6.pth" in error


class RecordLearningRates(pl.Callback):
    """Learning rates of the (head, backbone) parameter groups at each epoch and step start."""

    def __init__(self):
        self.epochs, self.steps = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def fit_with_scheduler(demo_dir, tmp_path, **hparams):
    enriched = enrich([demo_dir], spacing=1.0, seed=0, progress=False)
    model = geo_model("classification", enriched=enriched, hidden=16, lr=0.01, lr_finetune=0.001, unfreeze_at_epoch=10,
                      **hparams)
    data = GeoDataModule(enriched.locations, loader_config(32, batch_size=32, cache_dir=tmp_path, backbone="tiny"))
    record = RecordLearningRates()
    trainer = pl.Trainer(max_epochs=3, callbacks=[FreezeThenUnfreeze(None), record], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         reload_dataloaders_every_n_epochs=1, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    return record


def test_cosine_schedule_with_linear_warmup(demo_dir, tmp_path):
    record = fit_with_scheduler(demo_dir, tmp_path, scheduler="cosine", warmup_epochs=1)
    # hand-computed factors for 3 epochs, 1 warmup epoch: 1/2, then cos from 1: 1, (1 + cos(pi/2)) / 2; the
    # backbone (unfreezing at epoch 10, after the run: no room for a warm-up) holds its schedule's start, 1
    np.testing.assert_allclose(record.epochs, [[0.005, 0.001], [0.01, 0.001], [0.005, 0.001]])


def test_the_backbones_cosine_schedule_starts_when_it_unfreezes(demo_dir, tmp_path):
    enriched = enrich([demo_dir], spacing=1.0, seed=0, progress=False)
    data = GeoDataModule(enriched.locations, loader_config(32, batch_size=64, unfreeze_at_epoch=2, augment="none",
                                                           cache_dir=tmp_path / "cache", backbone="tiny"))
    record = RecordLearningRates()
    fit_in_phases(lambda: geo_model("classification", enriched=enriched, hidden=16, lr=0.01, lr_finetune=0.001,
                                    unfreeze_at_epoch=2, scheduler="cosine", warmup_epochs=1),
                  data, 4, tmp_path, [record], blocks=1, limit_val_batches=1, limit_train_batches=1)
    # head: 4 epochs, 1 warm-up: 1/2, 1, (1 + cos(pi/3)) / 2, (1 + cos(2 pi/3)) / 2; backbone: 2 epochs from
    # epoch 2, 1 warm-up: its warm-up start (1/2) until and at the unfreeze epoch, then 1
    np.testing.assert_allclose(record.epochs, [[0.005, 0.0005], [0.01, 0.0005], [0.0075, 0.0005], [0.0025, 0.001]])


def test_a_plateau_reduction_before_the_unfreeze_epoch_is_undone_then(demo_dir):
    enriched = enrich([demo_dir], spacing=1.0, seed=0, progress=False)
    model = geo_model("classification", enriched=enriched, hidden=16, lr=0.01, lr_finetune=0.001, unfreeze_at_epoch=3)
    optimizer = torch.optim.AdamW([{"params": list(model.head.parameters()), "lr": 0.0025, "name": "head"},
                                   {"params": list(model.backbone.parameters()), "lr": 0.00025, "name": "backbone"}])
    frozen_phase = FreezeThenUnfreeze(3, restart_lr=0.001)
    frozen_phase.freeze_before_training(model)
    frozen_phase.finetune_function(model, 2, optimizer)
    assert optimizer.param_groups[1]["lr"] == 0.00025  # still frozen: untouched
    fine_tuning = FreezeThenUnfreeze(3, restart_lr=0.001, first_epoch=3)
    fine_tuning.freeze_before_training(model)
    fine_tuning.finetune_function(model, 3, optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0025, 0.001]
    optimizer.param_groups[1]["lr"] = 0.0005  # reduced after the unfreeze: a resumed run keeps it
    fine_tuning.finetune_function(model, 4, optimizer)
    assert optimizer.param_groups[1]["lr"] == 0.0005


def test_one_cycle_schedule_per_step(demo_dir, tmp_path):
    record = fit_with_scheduler(demo_dir, tmp_path, scheduler="onecycle", optimizer="adam")
    head, backbone = np.array(record.steps).T
    assert len(head) >= 6
    np.testing.assert_allclose([head[0], backbone[0]], [0.01 / 25, 0.001 / 25])  # OneCycle's default div_factor
    assert 0.005 < head.max() <= 0.01 and head[-1] < head.max() / 2
    np.testing.assert_allclose(head / backbone, 10)


def test_resume_with_another_approach_is_refused(trained, demo_dir, tmp_path, capsys):
    last = trained[1] / "e2e" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        run_cli(main, ["--approach", "regression", "--dataset-dirs", str(demo_dir), "--backbone", "efficientnet_lite0",
                       "--image-size", "64", "--out-dir", str(tmp_path), "--resume", str(last)])
    assert "trained with approach classification" in capsys.readouterr().err


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err.strip().splitlines()[-1]


def spoil(path, how, source):
    if how == "truncated":
        path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif how == "foreign":
        torch.save({"model": {"weight": torch.zeros(2)}}, path)


@pytest.mark.parametrize("how", ["truncated", "empty", "text", "foreign", "missing"])
def test_resume_from_a_damaged_or_foreign_file_is_a_one_line_error(trained, demo_dir, tmp_path, capsys, how):
    bad = tmp_path / "last.ckpt"
    spoil(bad, how, trained[1] / "e2e" / "version_0" / "checkpoints" / "last.ckpt")
    error = one_line_error(["--approach", "classification", "--dataset-dirs", demo_dir, "--backbone", "efficientnet_lite0",
                            "--image-size", 64, "--out-dir", tmp_path, "--resume", bad], capsys)
    assert error.startswith(f"error: --resume {bad}: ")
    expected = {"truncated": "not a readable checkpoint", "empty": "not a readable checkpoint",
                "text": "not a readable checkpoint", "foreign": "not a checkpoint written by src.train",
                "missing": "file not found"}[how]
    assert expected in error


def test_resume_with_other_data_flags_is_refused(trained, demo_dir, tmp_path, capsys):
    last = trained[1] / "e2e" / "version_0" / "checkpoints" / "last.ckpt"
    error = one_line_error(["--approach", "classification", "--dataset-dirs", demo_dir, "--backbone", "efficientnet_lite0",
                            "--image-size", 64, "--out-dir", tmp_path, "--resume", last, "--seed", 7], capsys)
    assert "trained with seed 0" in error and "--seed" in error
    error = one_line_error(["--approach", "classification", "--dataset-dirs", demo_dir, "--backbone", "efficientnet_lite0",
                            "--image-size", 64, "--out-dir", tmp_path, "--resume", last, "--split", 0.7, 0.2, 0.1], capsys)
    assert "trained with split_fractions 0.8 0.1 0.1" in error and "--split" in error


@pytest.mark.parametrize("flag, value", [("--epochs", 0), ("--epochs", -3), ("--batch-size", 0), ("--image-size", 8),
                                         ("--image-size", 100000), ("--num-workers", -2), ("--lr", 0),
                                         ("--dropout", 1.5), ("--mirror-p", -0.1), ("--refine-k", 0),
                                         ("--refine-gate", 1.5)])
def test_nonsense_numbers_are_one_line_errors(flag, value, tmp_path, capsys):
    error = one_line_error(["--approach", "regression", "--dataset-dirs", tmp_path / "nowhere", flag, value], capsys)
    assert error.startswith(f"error: {flag} ") and ": must be " in error


def test_gallery_dirs_need_refine_knn_and_a_dataset_dir(demo_dir, tmp_path, capsys):
    common = ["--approach", "classification", "--dataset-dirs", demo_dir, "--out-dir", tmp_path]
    error = one_line_error([*common, "--refine", "none", "--gallery-dirs", demo_dir], capsys)
    assert error.startswith(f"error: --gallery-dirs {demo_dir}: the gallery is only built with --refine knn")
    error = one_line_error([*common, "--gallery-dirs", tmp_path / "nowhere"], capsys)
    assert "nowhere" in error and "no such dataset directory" in error


def test_demo_backbone_reason_reads_cleanly(capsys):
    choices = resolve_choices(None, None, None, None, demo=True, quick=False)
    line = capsys.readouterr().err.splitlines()[0]
    assert line == "backbone: efficientnet_lite0 (default for the demo set: fast on CPU, offline weights)"
    assert (choices.backbone, choices.image_size, choices.epochs, choices.unfreeze_at_epoch) == \
        ("efficientnet_lite0", 96, 30, None)


def test_a_run_saves_its_locations_and_locations_reuses_them(demo_dir, tmp_path, capsys):
    """version_N/locations.csv is the run's enriched table; --locations trains on it without the dataset dir."""
    dataset = tmp_path / "demo"
    shutil.copytree(demo_dir, dataset)
    common = ["--approach", "regression", "--backbone", "tiny", "--no-pretrained", "--epochs", 1, "--image-size", 32,
              "--num-workers", 0, "--out-dir", tmp_path / "reports", "--cache-dir", tmp_path / "cache"]
    first = Path(checkpoint_path(run_main([*common, "--dataset-dirs", dataset, "--seed", 4])))
    saved = first.parent.parent / "locations.csv"
    expected = enrich([dataset.resolve()], seed=4, progress=False).locations
    pd.testing.assert_frame_equal(pd.read_csv(saved, dtype={"uuid": str}), expected, check_dtype=False)
    (dataset / "data.csv").unlink()  # the dataset dir can no longer be read: --locations does not need it
    second = Path(checkpoint_path(run_main([*common, "--locations", saved])))
    assert second.parent.parent != first.parent.parent
    assert read_test_locations(second) == read_test_locations(first)
    assert read_data_config(second).dataset_dirs == read_data_config(first).dataset_dirs == (str(dataset.resolve()),)
    assert (second.parent.parent / "locations.csv").read_text() == saved.read_text()
    capsys.readouterr()
    error = one_line_error([*common, "--locations", saved, "--dataset-dirs", demo_dir], capsys)
    assert "--locations and --dataset-dirs: give one of them" in error


def test_bf16_mixed_precision_end_to_end_keeps_float32_cache_and_targets(demo_dir, tmp_path):
    lines = run_main(["--approach", "regression", "--dataset-dirs", demo_dir, "--backbone", "tiny", "--no-pretrained",
                      "--image-size", 32, "--epochs", 1, "--num-workers", 0, "--accelerator", "cpu",
                      "--precision", "bf16-mixed", "--accumulate-grad-batches", 2, "--gradient-clip-val", 1.0,
                      "--ema", "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache", "--run-name", "bf16"])
    metrics = json.loads((tmp_path / "bf16" / "version_0" / "metrics.json").read_text())
    test_count = int((enrich([demo_dir], seed=0, progress=False).locations.split == "test").sum())
    assert np.isfinite(metrics["test"]["mean_km"]) and metrics["test"]["count"] == test_count
    entries = list((tmp_path / "cache").glob("*/*.pt"))
    assert entries and all(torch.load(e, weights_only=True).dtype == torch.float32 for e in entries)
    assert checkpoint_path(lines).endswith(".ckpt")


def test_resume_with_another_unfreeze_epoch_is_refused(trained, demo_dir, tmp_path, capsys):
    last = trained[1] / "e2e" / "version_0" / "checkpoints" / "last.ckpt"
    error = one_line_error(["--approach", "classification", "--dataset-dirs", demo_dir, "--backbone", "efficientnet_lite0",
                            "--image-size", 64, "--out-dir", tmp_path, "--unfreeze-at-epoch", 5, "--resume", last], capsys)
    assert error.startswith(f"error: --resume {last}: it was trained with --unfreeze-at-epoch -1 (its epoch ")
    assert error.endswith(" in the frozen phase), not 5; pass --unfreeze-at-epoch -1")


class RecordBatchNormModes(pl.Callback):
    """Per epoch: the training flag of every BatchNorm of the backbone during the first training batch."""

    def __init__(self):
        self.modes: dict[int, list[bool]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.setdefault(trainer.current_epoch, [m.training for m in pl_module.backbone.modules()
                                                     if isinstance(m, torch.nn.BatchNorm2d)])


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_unfrozen_batchnorm_trains_and_a_resumed_run_matches(demo_dir, tmp_path, freeze_bn):
    enriched = enrich([demo_dir], spacing=1.0, seed=0, progress=False)

    def fit(epochs, folder, resume=None):
        pl.seed_everything(0, workers=True, verbose=False)
        data = GeoDataModule(enriched.locations, loader_config(32, batch_size=64, unfreeze_at_epoch=1, augment="none",
                                                               cache_dir=tmp_path / "cache", backbone="tiny"))
        record = RecordBatchNormModes()
        trainer, model = fit_in_phases(
            lambda: geo_model("classification", enriched=enriched, hidden=16, unfreeze_at_epoch=1, scheduler="none"),
            data, epochs, tmp_path / folder, [record], blocks=1, freeze_bn=freeze_bn,
            resume=resume, first_epoch=0 if resume is None else 1, deterministic=True, limit_val_batches=1)
        return trainer, model, record

    _, whole, whole_record = fit(2, "whole")
    assert not any(whole_record.modes[0])  # frozen epoch: every BatchNorm on running statistics
    last_stage = whole_record.modes[1][-1:]  # the tiny CNN's last stage holds its last BatchNorm
    assert last_stage == [not freeze_bn] and not any(whole_record.modes[1][:-1])
    first, first_model, _ = fit(1, "interrupted")
    path = tmp_path / "after-epoch-1.ckpt"
    first.save_checkpoint(path)
    before = {k: v.clone() for k, v in first_model.backbone.state_dict().items()}
    resumed_trainer, resumed, resumed_record = fit(2, "interrupted", resume=path)
    # same epoch count and the same BatchNorm modes in the epoch after the resume as without the interruption
    assert resumed_trainer.current_epoch == whole.trainer.current_epoch == 2
    assert resumed_record.modes == {1: whole_record.modes[1]}
    # the resumed run's fine-tuning phase trained the last stage; the others stayed as they were
    after = resumed.backbone.state_dict()
    changed = {k.split(".")[1] for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert changed == {"2"}


TINY = ["--backbone", "tiny", "--no-pretrained", "--image-size", 32, "--num-workers", 0, "--engine", "torch"]


def test_cross_validation_predicts_every_location_once_out_of_fold(demo_dir, tmp_path):
    lines = run_main(["--approach", "classification", "--dataset-dirs", demo_dir, *TINY, "--epochs", 1,
                      "--folds", 3, "--seed", 1, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
                      "--run-name", "cv"])
    folder = tmp_path / "cv" / "version_0"
    oof = pd.read_csv(folder / "oof.csv", dtype={"uuid": str})
    assert list(oof.columns) == ["uuid", "latitude", "longitude"]
    truth = pd.read_csv(demo_dir / "data.csv", dtype={"uuid": str}).set_index("uuid")
    assert sorted(oof.uuid) == sorted(truth.index)  # every labelled location exactly once
    tests = [set(pd.read_csv(folder / f"fold_{k}" / "locations.csv", dtype={"uuid": str}).query("split == 'test'").uuid)
             for k in range(3)]
    assert sum(map(len, tests)) == len(truth) and set.union(*tests) == set(truth.index)  # the folds partition
    # the printed and saved out-of-fold km against an independent haversine over oof.csv
    km = geo.haversine_km(oof.latitude, oof.longitude, truth.loc[oof.uuid, "latitude"], truth.loc[oof.uuid, "longitude"])
    metrics = json.loads((folder / "oof_metrics.json").read_text())
    assert metrics["oof"]["count"] == len(truth) and metrics["oof"]["mean_km"] == pytest.approx(km.mean(), rel=1e-6)
    # the constant baseline: each fold's train-mean location
    baseline = []
    for k in range(3):
        fold = pd.read_csv(folder / f"fold_{k}" / "locations.csv", dtype={"uuid": str})
        train, test = fold[fold.split == "train"], fold[fold.split == "test"]
        baseline.append(geo.haversine_km(train.latitude.mean(), train.longitude.mean(), test.latitude, test.longitude))
    assert metrics["oof_constant_baseline"]["mean_km"] == pytest.approx(np.concatenate(baseline).mean(), rel=1e-9)
    assert any("out of fold" in line for line in lines) and lines[-1] == f"out-of-fold predictions: {folder / 'oof.csv'}"
    # the reliability check: the printed and saved shares inside the 50% and 90% discs against oof_details.csv's
    # radii (2 decimals) and the independent haversine
    details = pd.read_csv(folder / "oof_details.csv", dtype={"uuid": str, "top": str})
    assert list(details.columns) == ["uuid", "latitude", "longitude", "radius50_km", "radius90_km",
                                     "top1_probability", "top"]
    assert details["uuid"].tolist() == oof["uuid"].tolist()
    np.testing.assert_allclose(details[["latitude", "longitude"]], oof[["latitude", "longitude"]], atol=1e-7)
    confidence = metrics["confidence"]
    assert len(confidence["temperatures"]) == 3 and confidence["calibrated"]
    for level in ("50", "90"):
        inside = (km <= details[f"radius{level}_km"]).mean()
        assert confidence[f"inside_{level}"] == pytest.approx(inside, abs=1.01 / len(truth))
        row = next(line for line in lines if line.startswith(f"| {level}%"))
        assert f"{100 * confidence[f'inside_{level}']:.1f}%" in row
    assert any(line.startswith("confidence regions on out-of-fold predictions (120 locations") for line in lines)
    assert (folder / "reliability.png").stat().st_size > 10_000


def test_a_final_fit_on_all_labelled_data_keeps_the_last_checkpoint(demo_dir, tmp_path, capsys):
    lines = run_main(["--approach", "classification", "--dataset-dirs", demo_dir, *TINY, "--epochs", 2,
                      "--split", 1, 0, 0, "--out-dir", tmp_path, "--run-name", "final", "--cache-dir", tmp_path / "c"])
    assert lines[-2].startswith("no test split") and checkpoint_path(lines).endswith("/checkpoints/last.ckpt")
    assert "plateau scheduler follows val km, using --scheduler cosine" in capsys.readouterr().err
    checkpoint = torch.load(checkpoint_path(lines), map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["hyper_parameters"]["scheduler"] == "cosine"
    assert pd.read_csv(tmp_path / "final" / "version_0" / "locations.csv").split.eq("train").all()


@pytest.mark.parametrize("approach, extra", [
    ("hybrid", ["--fusion", "attention", "--label-smoothing-km", 20, "--predict-rule", "median"]),
    ("classification", ["--fusion", "mean", "--predict-rule", "mode", "--cells", "adaptive", "--classes", 6]),
])
def test_head_levers_train_end_to_end_and_are_saved(demo_dir, tmp_path, approach, extra):
    lines = run_main(["--approach", approach, "--dataset-dirs", demo_dir, *TINY, "--epochs", 1,
                      "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache", *extra])
    path = checkpoint_path(lines)
    assert f"/{demo_dir.name}-{approach}-tiny/version_0/" in path  # the run name says which data it used
    model = load_model(path, reports_dir=None)
    flags = dict(zip(extra[::2], extra[1::2]))
    assert model.hparams.fusion == flags["--fusion"] and model.hparams.predict_rule == flags["--predict-rule"]
    assert model.hparams.label_smoothing_km == float(flags.get("--label-smoothing-km", DEFAULT_LABEL_SMOOTHING_KM))
    metrics = json.loads((Path(path).parent.parent / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["mean_km"])
    # the checkpoint's test km comes from the saved rule: recompute it from the images
    hp = model.hparams
    test_locations = read_test_locations(path)
    views = torch.stack([load_quadruplet(d, 32, eval_transform(32, hp.image_mean, hp.image_std))
                         for _, d in test_locations])
    xy = model.locate(views).numpy()
    lat, lng = geo.unproject(*geo.snap_to_land(xy[:, 0], xy[:, 1]))
    truth = pd.read_csv(demo_dir / "data.csv", dtype={"uuid": str}).set_index("uuid")
    uuids = [u for u, _ in test_locations]
    km = geo.haversine_km(lat, lng, truth.loc[uuids, "latitude"], truth.loc[uuids, "longitude"])
    assert metrics["test"]["mean_km"] == pytest.approx(km.mean(), rel=1e-5)


def test_tensorboard_opens_on_train_and_val_curves(demo_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = run_main(["--approach", "classification", "--dataset-dirs", demo_dir, *TINY, "--epochs", 3,
                      "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache", "--run-name", "tb"])
    folder = tmp_path / "tb" / "version_0"
    scalars, baseline = set(), []
    for events in folder.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        scalars |= set(accumulator.Tags()["scalars"])
        if "val/km_baseline" in accumulator.Tags()["scalars"]:
            baseline += [e.value for e in accumulator.Scalars("val/km_baseline")]
    assert {"train/loss", "val/loss", "val/km_mean", "val/km_baseline"} <= scalars
    # no single-point charts: no epoch counter, no test scalars but the HParams metric, no frozen backbone lr
    assert "epoch" not in scalars and not any(t.startswith("test/") and t != "test/km_mean" for t in scalars)
    # the head's learning rate (it trains); no backbone rate (the backbone never trains here)
    assert [t for t in scalars if t.startswith("lr-")] == ["lr-AdamW/head"]
    assert len(baseline) == 3 and len(set(baseline)) == 1  # a flat line, one point per epoch
    hparams = (folder / "hparams.yaml").read_text()
    assert f"data: {demo_dir.resolve()}" in hparams and "n_cells:" in hparams and "epochs: 3" in hparams
    assert (folder / "curves.png").stat().st_size > 10_000
    assert checkpoint_path(lines)
