"""ONNX export and the ONNX Runtime engine: outputs against torch on real images, dynamic batch, the shared
export store (once per key, across checkpoints, cache folders and processes), training in a process forked
after an export, predict --engine and the feature cache filled by either engine."""

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from src.core import geo
from src.model.backbones import create_backbone
from src.data.quadruplets import eval_transform, load_quadruplet
from src.core.errors import UserError, run_cli
from src.inference.engine import (OPSET, OnnxFeatureExtractor, OnnxGeoModel, backbone_session, engine_model, infer,
                                  resolve_engine, stored_key)
from src.export import build_parser
from src.export import main as export_main
from src.data.features import FeatureCache
from src.inference.checkpoints import load_model
from src.model.config import IMAGENET_MEAN, IMAGENET_STD
from src.data.quadruplets import QuadrupletFolders, collate_quadruplets, spec_transforms
from src.predict import main as predict_main
from src.train import main as train_main

REPO = Path(__file__).resolve().parent.parent


def demo_views(demo_dir, n: int, size: int) -> torch.Tensor:
    """Real quadruplets [n, 4, 3, S, S] of the first n demo locations, as src.predict loads them."""
    folders = sorted((demo_dir / "data").iterdir())[:n]
    spec = (size, IMAGENET_MEAN, IMAGENET_STD)  # the tiny backbone's normalisation
    dataset = QuadrupletFolders(folders, spec_transforms([spec]))
    return collate_quadruplets([dataset[i] for i in range(n)])[1][spec]


@pytest.mark.parametrize("approach", ["classification", "regression"])
def test_export_matches_torch_on_real_images_with_any_batch_size(approach, tiny_checkpoints, demo_dir, tmp_path):
    checkpoint = tiny_checkpoints[approach]
    out = tmp_path / "model.onnx"
    check = export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--check-images", str(demo_dir)])
    assert check["max_abs_diff"] < 1e-4 and check["max_distance_m"] < 1.0 and check["embedding_max_abs_diff"] < 1e-4
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    assert [i.name for i in proto.graph.input] == ["views"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    expected_outputs = ["probabilities" if approach == "classification" else "scaled_xy", "xy", "embedding"]
    assert [o.name for o in proto.graph.output] == expected_outputs

    model = load_model(checkpoint)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        views = demo_views(demo_dir, batch, 32)
        outputs, xy, embedding = session.run(None, {"views": views.numpy()})
        assert xy.shape == (batch, 2) and xy.dtype == np.float64
        _, reference, reference_embedding = infer(model, views)  # the head's point: the refinement follows the graph
        np.testing.assert_allclose(embedding, reference_embedding, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
        got_lat, got_lng = geo.unproject(xy[:, 0], xy[:, 1])
        ref_lat, ref_lng = geo.unproject(reference[:, 0], reference[:, 1])
        assert geo.haversine_km(got_lat, got_lng, ref_lat, ref_lng).max() * 1000 < 1.0
        if approach == "classification":
            np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=1e-5)
            np.testing.assert_allclose(outputs, model(views).softmax(dim=1).detach().numpy(), atol=1e-5)


def test_the_export_command_as_a_user_runs_it(tiny_checkpoints, demo_dir, tmp_path):
    """`python -m src.export` in its own process (its export child must not look for classes in __main__)."""
    run = subprocess.run([sys.executable, "-m", "src.export", "--checkpoint", str(tiny_checkpoints["regression"]),
                          "--out", str(tmp_path / "m.onnx"), "--check-images", str(demo_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ONNX opset" in run.stderr and "checked against torch on 8 location(s)" in run.stderr
    assert ort.InferenceSession(str(tmp_path / "m.onnx")).get_inputs()[0].name == "views"


def test_backbone_only_export(tiny_checkpoints, demo_dir, tmp_path):
    checkpoint = tiny_checkpoints["classification"]
    out = tmp_path / "backbone.onnx"
    check = export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--backbone-only"])
    assert check["max_abs_diff"] < 1e-5 and "max_distance_m" not in check
    images = demo_views(demo_dir, 3, 32).flatten(0, 1)
    features = ort.InferenceSession(str(out)).run(None, {"images": images.numpy()})[0]
    model = load_model(checkpoint)
    assert features.shape == (12, model.backbone.out_features)
    np.testing.assert_allclose(features, model.backbone(images).detach().numpy(), atol=1e-5)


def test_export_cli_errors_are_one_line(tiny_checkpoints, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "no_views" / "a").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    ckpt = ["--checkpoint", str(tiny_checkpoints["classification"]), "--out", str(tmp_path / "m.onnx")]
    cases = [(ckpt + ["--check-images", str(tmp_path / "nope")], "--check-images"),
             (ckpt + ["--check-images", str(tmp_path / "no_views")], "holds a readable view"),
             (ckpt + ["--check-images", str(tmp_path / "empty")], "--check-images"),
             (ckpt[:3] + [str(tmp_path / "afile" / "m.onnx")], "afile"),
             (["--checkpoint", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "m.onnx")], "file not found"),
             (["--checkpoint", str(tiny_checkpoints["classification"]), "--out", str(tmp_path)], "is a directory"),
             (["--checkpoint", str(tiny_checkpoints["classification"])], "--out"),
             (["--checkpoint", str(REPO / "README.md"), "--out", str(tmp_path / "m.onnx")],
              "not a readable checkpoint")]
    for args, fragment in cases:
        with pytest.raises(SystemExit) as exit_:
            run_cli(export_main, args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_export_help_lists_every_flag_with_its_default():
    text = " ".join(build_parser().format_help().split())
    for flag, default in (("--checkpoint", None), ("--out", None), ("--backbone-only", "off"),
                          ("--check-images", "the first folders")):
        assert flag in text
        if default:
            assert f"(default: {default}" in text


def store_files(store: Path) -> list[Path]:
    return sorted(store.glob("*.onnx"))


def test_engine_exports_once_into_the_store_shared_by_checkpoints(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    monkeypatch.setenv("ONNX_CACHE_DIR", str(store))
    checkpoint = tmp_path / "run" / "best.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(tiny_checkpoints["classification"].read_bytes())
    model = load_model(checkpoint)
    engine = engine_model(model, checkpoint, "onnx")
    [path] = store_files(store)
    assert isinstance(engine, OnnxGeoModel) and engine.path == path and not list(checkpoint.parent.glob("*.onnx"))
    assert "weights=" in stored_key(path) and "exporter=torchscript" in stored_key(path)
    said = capsys.readouterr().err
    assert len(re.findall(r"^exporting the model to ONNX \(once\): \d+\.\d s$", said, re.M)) == 1, said
    first = path.stat().st_mtime_ns
    # the same weights under another name (a copied checkpoint, another run folder) reuse the file, silently
    copy = tmp_path / "elsewhere" / "copy.ckpt"
    copy.parent.mkdir()
    copy.write_bytes(checkpoint.read_bytes())
    assert engine_model(load_model(copy), copy, "onnx").path == path and path.stat().st_mtime_ns == first
    assert "exporting" not in capsys.readouterr().err
    # the refinement runs after the graph: other refinement settings reuse the file too
    refined_otherwise = load_model(checkpoint, refine="none", refine_k=3, refine_gate=0.2)
    assert engine_model(refined_otherwise, checkpoint, "onnx").path == path and len(store_files(store)) == 1
    # another prediction rule changes the graph: a second file; other weights: a third
    median = engine_model(load_model(checkpoint, predict_rule="median"), checkpoint, "onnx")
    regression = engine_model(load_model(tiny_checkpoints["regression"]), tiny_checkpoints["regression"], "onnx")
    assert len({path, median.path, regression.path}) == 3 and len(store_files(store)) == 3
    assert not [p for p in store.iterdir() if ".tmp" in p.name]
    assert engine_model(model, checkpoint, "torch") is model


def test_backbone_export_is_shared_by_cache_folders_and_concurrent_processes(tmp_path, monkeypatch, capsys):
    """Two processes ask for the same export at once: one exports (under the lock), the other waits and reads
    the finished file; a later caller (this process) finds it without exporting."""
    store = tmp_path / "store"
    script = ("import torch; from src.model.backbones import create_backbone; "
              "from src.inference.engine import backbone_session; torch.manual_seed(0); "
              "b = create_backbone('tiny', pretrained=False); "
              "s = backbone_session(b, 40, 'normalise-imagenet'); "
              "print(s.run(None, {'images': torch.ones(1, 3, 40, 40).numpy()})[0].sum())")
    env = {**os.environ, "ONNX_CACHE_DIR": str(store), "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    said = "".join(err for _, err in outputs)
    assert len(re.findall(r"exporting the backbone to ONNX \(once\): \d+\.\d s", said)) == 1, said
    assert len(store_files(store)) == 1 and not [p for p in store.iterdir() if ".tmp" in p.name]
    assert outputs[0][0] == outputs[1][0]  # the same features
    monkeypatch.setenv("ONNX_CACHE_DIR", str(store))
    torch.manual_seed(0)  # the script's backbone, built here
    session = backbone_session(create_backbone("tiny", pretrained=False), 40, "normalise-imagenet")
    later = session.run(None, {"images": torch.ones(1, 3, 40, 40).numpy()})[0].sum()
    assert "exporting" not in capsys.readouterr().err and str(later) + "\n" == outputs[0][0]


def test_training_after_an_export_still_trains_in_this_process_and_a_forked_one(tmp_path, monkeypatch, capsys):
    """The export runs in the calling process (no child): backward passes after it work, here and in a process
    forked afterwards (which, like DataLoader workers, uses one torch thread)."""
    monkeypatch.setenv("ONNX_CACHE_DIR", str(tmp_path / "store"))  # an empty store: this export is made here
    torch.manual_seed(0)
    backbone = create_backbone("tiny", pretrained=False)
    backbone_session(backbone, 32)
    images, targets = torch.randn(8, 3, 32, 32), torch.randn(8, backbone.out_features)

    def train(steps=5):
        backbone.train()
        optimizer = torch.optim.SGD(backbone.parameters(), lr=0.05)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(backbone(images), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses[-1] < losses[0]

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            torch.set_num_threads(1)
            code = 0 if train() else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert ["child", os.waitstatus_to_exitcode(status), "parent", train()] == ["child", 0, "parent", True]
    assert "exporting the backbone" in capsys.readouterr().err


def test_resolve_engine():
    assert resolve_engine("auto", "cpu") == "onnx" and resolve_engine("auto", "cuda:0") == "torch"
    assert resolve_engine("torch", "cpu") == "torch" and resolve_engine("onnx", "cpu") == "onnx"
    with pytest.raises(UserError, match="--engine onnx runs on the CPU"):
        resolve_engine("onnx", "cuda")


@pytest.mark.parametrize("refine, within_m", [("none", 1.0), ("knn", 25.0)])
def test_predict_engines_agree(tiny_checkpoints, demo_dir, capsys, refine, within_m):
    """The head's points agree within 1 m; the refined ones within metres: the neighbours' inverse cosine distance
    weights magnify the engines' ~1e-6 differences of the embedding (max 8 m on these 120 locations). The whole
    model on each engine (a frozen checkpoint's head would read one cache whichever engine filled it)."""
    frames = {engine: predict_main(["--checkpoint", str(tiny_checkpoints["classification"]), "--images",
                                    str(demo_dir), "--engine", engine, "--num-workers", "0", "--no-cache-features",
                                    "--refine", refine])
              for engine in ("torch", "onnx")}
    assert "engine onnx" in capsys.readouterr().err
    torch_frame, onnx_frame = frames["torch"], frames["onnx"]
    assert onnx_frame["uuid"].tolist() == torch_frame["uuid"].tolist() and len(onnx_frame) == 120
    metres = 1000 * geo.haversine_km(torch_frame["latitude"], torch_frame["longitude"],
                                     onnx_frame["latitude"], onnx_frame["longitude"])
    assert metres.max() < within_m, metres.max()


def test_feature_cache_entries_from_either_engine_are_interchangeable(demo_dir, tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("ONNX_CACHE_DIR", str(store))
    torch.manual_seed(0)
    backbone = create_backbone("tiny", pretrained=False)
    folders = [str(f) for f in sorted((demo_dir / "data").iterdir())[:10]]

    transform = eval_transform(48)

    def load(image_dir):
        return load_quadruplet(image_dir, 48, transform)

    caches = {}
    for engine in ("torch", "onnx"):
        cache = FeatureCache(tmp_path / engine, "tiny", backbone, 48)
        extract = OnnxFeatureExtractor(backbone, 48) if engine == "onnx" else None
        assert cache.compute_missing(folders, backbone, transform, batch_size=4, extract=extract) == 10
        caches[engine] = cache
    [export] = store_files(store)
    assert not list(caches["onnx"].directory.glob("*.onnx"))  # the export is in the store, not the cache folder
    assert caches["onnx"].directory.name == caches["torch"].directory.name  # same key: entries interchangeable
    torch_features, onnx_features = caches["torch"].load_all(folders), caches["onnx"].load_all(folders)
    assert torch_features.shape == (10, 4, 64)
    torch.testing.assert_close(onnx_features, torch_features, atol=1e-5, rtol=1e-4)
    # the export is made once: a new extractor (any cache folder) with the same weights and size reuses it
    mtime = export.stat().st_mtime_ns
    again = OnnxFeatureExtractor(backbone, 48)
    torch.testing.assert_close(again(load(folders[0])), torch_features[0], atol=1e-5, rtol=1e-4)
    assert store_files(store) == [export] and export.stat().st_mtime_ns == mtime
    # other weights are another export
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)
    OnnxFeatureExtractor(backbone, 48)(load(folders[0]))
    assert len(store_files(store)) == 2


def test_train_fills_the_cache_with_onnx_runtime(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CACHE_DIR", str(tmp_path / "store"))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train_main(["--approach", "classification", "--dataset-dirs", str(demo_dir), "--backbone", "tiny",
                    "--no-pretrained", "--quick", "--image-size", "32", "--num-workers", "1", "--engine", "onnx",
                    "--out-dir", str(tmp_path / "reports"), "--cache-dir", str(tmp_path / "cache")])
    [folder] = list((tmp_path / "cache").iterdir())
    assert len(store_files(tmp_path / "store")) == 1 and len(list(folder.glob("*.pt"))) > 50
    # the entries match torch's features of the same (seeded, frozen) backbone
    checkpoint = Path(stdout.getvalue().strip().splitlines()[-1].removeprefix("checkpoint: "))
    backbone = load_model(checkpoint).backbone
    entries = pd.read_csv(demo_dir / "data.csv")["uuid"].head(120)
    cache = FeatureCache(tmp_path / "cache", "tiny", backbone, 32, preprocessing=repr(eval_transform(32)))
    checked = 0
    for uuid in entries:
        cached = cache.get(demo_dir / "data" / uuid)
        if cached is not None:
            fresh = backbone(load_quadruplet(demo_dir / "data" / uuid, 32, eval_transform(32))).detach()
            torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked > 50


def test_hybrid_median_export_matches_torch(demo_dir, tmp_path):
    """A hybrid checkpoint with attention fusion and the median rule (Weiszfeld's steps inside the graph)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train_main(["--approach", "hybrid", "--fusion", "attention", "--predict-rule", "median", "--dataset-dirs",
                    str(demo_dir), "--backbone", "tiny", "--no-pretrained", "--quick", "--image-size", "32",
                    "--num-workers", "0", "--engine", "torch", "--out-dir", str(tmp_path / "reports"),
                    "--cache-dir", str(tmp_path / "cache")])
    checkpoint = Path(stdout.getvalue().strip().splitlines()[-1].removeprefix("checkpoint: "))
    out = tmp_path / "hybrid.onnx"
    check = export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--check-images", str(demo_dir)])
    assert check["max_abs_diff"] < 1e-4 and check["max_distance_m"] < 1.0
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["probabilities", "xy", "embedding"]
    model = load_model(checkpoint)
    views = demo_views(demo_dir, 5, 32)
    probabilities, xy, embedding = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"views": views.numpy()})
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    _, head_xy, reference_embedding = infer(model, views)
    assert np.hypot(*(xy - head_xy).T).max() < 1.0  # metres
    np.testing.assert_allclose(embedding, reference_embedding, atol=1e-5)  # the attention block's output
    # the mode rule, chosen at predict time: the ONNX engine's export has a symbolic batch axis too
    images = tmp_path / "seven"
    for folder in sorted((demo_dir / "data").iterdir())[:7]:
        shutil.copytree(folder, images / folder.name)
    common = ["--checkpoint", str(checkpoint), "--images", str(images), "--predict-rule", "mode", "--num-workers", "0",
              "--no-cache-features"]
    onnx_rows = predict_main([*common, "--engine", "onnx", "--batch-size", "7"])
    torch_rows = predict_main([*common, "--engine", "torch"])
    np.testing.assert_allclose(onnx_rows[["latitude", "longitude"]], torch_rows[["latitude", "longitude"]], atol=1e-6)
