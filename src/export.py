"""ONNX export of a trained model and the ONNX Runtime engine for CPU inference.

    python -m src.export --checkpoint CKPT --out model.onnx [--backbone-only]

The whole model maps `views` [B, 4, 3, S, S] (ImageNet-normalised, view order 0, 90, 180, 270) to
`probabilities` [B, C] (classification; `scaled_xy` [B, 2] for regression) and `xy` [B, 2], the predicted
EPSG:3766 position in metres (float64); `src.geo.unproject` turns it into latitude/longitude, so the
projection has one implementation. `--backbone-only` exports the feature extractor, `images` [N, 3, S, S]
-> `features` [N, D]. The batch axis is dynamic; the opset is `OPSET`. Every export is checked against
torch on real inputs before it is written.

`--engine {auto,torch,onnx}` of src.predict, src.train (feature cache) and src.serve picks torch or
ONNX Runtime; auto means ONNX Runtime on the CPU and torch on a GPU. The engines export once and keep the
file: next to the checkpoint (`<checkpoint>.onnx`) for predict and serve, in the feature cache's folder
for the backbone, each stamped with a key (checkpoint file, centroids, topk, opset) that a stale file fails.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from src.core.errors import UserError, run_cli
from src.inference.engine import OPSET, checkpoint_key, compare_with_torch, example_views, export_model



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.export",
        description=f"Export a checkpoint to ONNX (opset {OPSET}, dynamic batch axis) and check it against torch.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by src.train (required)")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write (atomically; required)")
    parser.add_argument("--backbone-only", action="store_true",
                        help="export only the backbone: images [N, 3, S, S] -> features [N, D] (default: off)")
    parser.add_argument("--check-images", type=Path, default=None,
                        help="a location folder (0.jpg ... 270.jpg) or dataset dir to check the export on "
                             "(default: the first folders of the checkpoint's test split, else random input)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def check_inputs(checkpoint: Path, model, images: Path | None, limit: int = 8) -> tuple[torch.Tensor, str]:
    """Real quadruplets [B, 4, 3, S, S] to compare the engines on, and where they came from."""
    from src.data.quadruplets import QuadrupletFolders, collate_quadruplets, input_spec, spec_transforms
    from src.inference.checkpoints import read_test_locations
    from src.inference.predictor import locations_from_images

    if images is not None and not images.is_dir():
        raise UserError(f"--check-images {images}: not a directory; give a location folder (0.jpg ... 270.jpg) "
                        "or a dataset dir")
    if images is not None and (images / "0.jpg").exists():
        locations = [(images.name, images)]
    elif images is not None:
        try:
            locations = locations_from_images(images)[:limit]
        except UserError as error:  # src.predict's message names its own flag
            raise UserError(str(error).replace("--images", "--check-images", 1)) from None
    else:
        locations = [(u, f) for u, f in read_test_locations(checkpoint) if f.is_dir()][:limit]
    spec = input_spec(model.hparams)
    if not locations:
        return example_views(model), "random input (no test split images here; pass --check-images)"
    folders = QuadrupletFolders([folder for _, folder in locations], spec_transforms([spec]))
    _, batches, has_views, _ = collate_quadruplets([folders[i] for i in range(len(locations))])
    if not has_views.any():
        raise UserError(f"--check-images {images or 'the test split'}: none of the first {len(locations)} location "
                        "folders holds a readable view (0.jpg ... 270.jpg)")
    return batches[spec][has_views], f"{int(has_views.sum())} location(s) from {locations[0][1].parent}"


def main(argv: list[str] | None = None) -> dict[str, float]:
    from src.inference.checkpoints import load_model

    args = build_parser().parse_args(argv)
    if args.out.is_dir():
        raise UserError(f"--out {args.out}: is a directory; give a file name such as model.onnx")
    model = load_model(args.checkpoint, "cpu")
    views, source = check_inputs(args.checkpoint, model, args.check_images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=args.out.parent):  # an unwritable --out fails here, in one line
        pass
    key = checkpoint_key(args.checkpoint, model, args.backbone_only)
    export_model(model, args.out, args.backbone_only, key)
    check = compare_with_torch(model, args.out, views, args.backbone_only)
    hp = model.hparams
    what = "backbone" if args.backbone_only else f"{hp.approach} model"
    print(f"wrote {args.out}: {what} ({hp.backbone}, {hp.image_size} px), ONNX opset {OPSET}, dynamic batch axis",
          file=sys.stderr)
    summary = ", ".join(f"{k} {v:.3g}" for k, v in check.items())
    print(f"checked against torch on {source}: {summary}", file=sys.stderr)
    return check


if __name__ == "__main__":
    # through the imported module: the export child unpickles QuadrupletGraph from src.export, not __main__
    from src.export import main as export_main

    run_cli(export_main)
