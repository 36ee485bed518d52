"""Export a checkpoint (or its backbone) to an ONNX file and check it against torch.

    python -m src.export --checkpoint CKPT --out model.onnx [--backbone-only] [--check-images DIR]

What the graph computes, the exporter and the engines' shared export store: `src.inference.engine`.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from src.core.errors import UserError, run_cli

if TYPE_CHECKING:
    import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.export", allow_abbrev=False,
        description="Export a checkpoint to ONNX (dynamic batch axis) and check it against torch.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by src.train (required)")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write (atomically; required)")
    parser.add_argument("--backbone-only", action="store_true",
                        help="export only the backbone: images [N, 3, S, S] -> features [N, D] (default: off)")
    parser.add_argument("--check-images", type=Path, default=None,
                        help="a location folder (0.jpg ... 270.jpg) or dataset dir to check the export on "
                             "(default: the first folders of the checkpoint's test split, else random input)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def check_inputs(checkpoint: Path, model, images: Path | None, limit: int = 8) -> tuple["torch.Tensor", str]:
    """Real quadruplets [B, 4, 3, S, S] to compare the engines on, and where they came from."""
    from src.data.quadruplets import QuadrupletFolders, collate_quadruplets, input_spec, spec_transforms
    from src.inference.checkpoints import read_test_locations
    from src.inference.engine import example_views
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
    args = build_parser().parse_args(argv)
    from src.inference.checkpoints import load_model  # the library after parsing: --help stays instant
    from src.inference.engine import OPSET, checkpoint_key, compare_with_torch, export_model

    if args.out.is_dir():
        raise UserError(f"--out {args.out}: is a directory; give a file name such as model.onnx")
    model = load_model(args.checkpoint, "cpu", refine="none")  # the refinement runs after the graph
    views, source = check_inputs(args.checkpoint, model, args.check_images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=args.out.parent):  # an unwritable --out fails here, in one line
        pass
    key = checkpoint_key(args.checkpoint, model, args.backbone_only)
    start = time.perf_counter()
    export_model(model, args.out, args.backbone_only, key)
    seconds = time.perf_counter() - start
    check = compare_with_torch(model, args.out, views, args.backbone_only)
    hp = model.hparams
    what = "backbone" if args.backbone_only else f"{hp.approach} model"
    print(f"wrote {args.out}: {what} ({hp.backbone}, {hp.image_size} px), ONNX opset {OPSET}, dynamic batch axis, "
          f"exported in {seconds:.1f} s", file=sys.stderr)
    summary = ", ".join(f"{k} {v:.3g}" for k, v in check.items())
    print(f"checked against torch on {source}: {summary}", file=sys.stderr)
    return check


if __name__ == "__main__":
    run_cli(main)
