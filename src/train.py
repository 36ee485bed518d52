"""Train a quadruplet geolocation model (classification, regression or hybrid) with Lightning.

    python -m src.train --approach classification [--dataset-dirs DIR ...] [options]

Without --dataset-dirs the synthetic demo dataset in data/demo is used (generated when missing).
Logs and checkpoints go to <out-dir>/<run-name>/version_N/ (TensorBoard, curves.png); the test split's
metrics print as a table (and go to metrics.json there) and the last stdout line is
`checkpoint: <best checkpoint>`. With --folds K, K runs go to version_N/fold_k/ and the out-of-fold
predictions of every location to version_N/oof.csv.

Ctrl+C (SIGINT) or SIGTERM stops training gracefully: checkpoints/last.ckpt keeps the state at the end
of the last completed epoch, and the command exits with status 130 (143 for SIGTERM) and one line
naming the `--resume` command that continues the run, in the same folder, to the same --epochs.
With the same --seed, data and flags a CPU run is repeatable: the same split, classes, metrics and
weights, whether the feature cache is cold or warm.
"""

import argparse
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from src.model.backbones import list_backbones
from src.data.datamodule import AUGMENT_CHOICES
from src.data.enrich import add_enrich_arguments, add_locations_argument
from src.core.errors import run_cli
from src.inference.engine import ENGINES
from src.data.cells import CENTROID_KINDS
from src.model.heads import FUSIONS, PREDICT_RULES
from src.model.geomodel import APPROACHES, OPTIMIZERS, SCHEDULERS
from src.training.run import DEFAULTS, DEFAULT_CACHE_DIR, Interrupt, PRECISIONS, check_numbers, default_num_workers, interrupted_message, train



def build_parser() -> argparse.ArgumentParser:
    """The train CLI's argument parser (enrich's data options included)."""
    parser = argparse.ArgumentParser(prog="python -m src.train", allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--approach", choices=APPROACHES, required=True,
                        help="predict a cell (classification), the x/y position (regression), or a cell and the "
                             "offset inside it (hybrid)")
    add_enrich_arguments(parser)
    add_locations_argument(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=list_backbones(), default=None,
                       help="(default: resnext101_32x8d with a GPU, else efficientnet_lite0; efficientnet_lite0 on the demo set)")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from ImageNet weights (default: on)")
    model.add_argument("--image-size", type=int, default=None,
                       help="input side in pixels (default: the backbone's native size, e.g. 224 for efficientnet_lite0; "
                            "96 on the demo set; 64 with --quick)")
    model.add_argument("--centroids", choices=CENTROID_KINDS, default="weighted",
                       help="class centroids averaged by the classification prediction (default: weighted)")
    model.add_argument("--topk", type=int, default=0, help="average only the k most likely classes, 0 for all (default: 0)")
    model.add_argument("--predict-rule", choices=PREDICT_RULES, default=DEFAULTS["predict_rule"],
                       help="class probabilities -> point: probability-weighted mean, geometric median (minimises the "
                            f"expected km) or mode (the most likely class); saved, predict can override "
                            f"(default: {DEFAULTS['predict_rule']})")
    model.add_argument("--fusion", choices=FUSIONS, default=DEFAULTS["fusion"],
                       help="how the four view embeddings combine: side by side, averaged, or a self-attention layer "
                            f"with heading embeddings (default: {DEFAULTS['fusion']})")
    model.add_argument("--label-smoothing-km", type=float, default=DEFAULTS["label_smoothing_km"], metavar="TAU",
                       help="haversine label smoothing: soft targets exp(-d/TAU) over the class centroids, 0 for one-hot "
                            f"cross-entropy (default: {DEFAULTS['label_smoothing_km']:g})")
    model.add_argument("--offset-weight", type=float, default=1.0,
                       help="hybrid: weight of the offset loss beside the cell loss (default: 1)")
    model.add_argument("--hidden", type=int, default=512, help="hidden units of the head, 0 for a linear head (default: 512)")
    model.add_argument("--dropout", type=float, default=0.2, help="dropout in the head (default: 0.2)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=None, help="(default: 20 with a GPU, else 30; 2 with --quick)")
    opt.add_argument("--batch-size", type=int, default=32, help="locations per batch, 4 images each (default: 32)")
    opt.add_argument("--lr", type=float, default=1e-3, help="learning rate of the head (default: 1e-3)")
    opt.add_argument("--lr-finetune", type=float, default=1e-4, help="learning rate of the unfrozen backbone (default: 1e-4)")
    opt.add_argument("--unfreeze-at-epoch", type=int, default=None,
                     help="epoch at which the backbone unfreezes, -1 for never (default: 5 with a GPU, else never)")
    opt.add_argument("--unfreeze-blocks", type=int, default=0,
                     help="unfreeze only the backbone's last N stages, 0 for all (default: 0)")
    opt.add_argument("--freeze-bn", action="store_true",
                     help="keep the unfrozen backbone's BatchNorm on its running statistics (for small batches; default: off, batch statistics)")
    opt.add_argument("--accumulate-grad-batches", type=int, default=1,
                     help="sum gradients over N batches per optimizer step, passed to Lightning (default: 1)")
    opt.add_argument("--gradient-clip-val", type=float, default=None,
                     help="clip the gradient norm to this value (Lightning; default: no clipping)")
    opt.add_argument("--early-stopping-patience", type=int, default=None,
                     help="stop after N validations without a better val mean km (default: never)")
    opt.add_argument("--val-check-interval", type=float, default=1.0,
                     help="validate every fraction of an epoch (<= 1) or every N batches (> 1), passed to Lightning (default: 1.0)")
    opt.add_argument("--ema", type=float, nargs="?", const=0.999, default=None, metavar="DECAY",
                     help="keep an exponential moving average of the weights (decay, 0.999 when no value), "
                          "used for validation, test and checkpoints (Lightning EMAWeightAveraging; default: off)")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="(default: adamw)")
    opt.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 1e-4)")
    opt.add_argument("--scheduler", choices=SCHEDULERS, default="plateau",
                     help="plateau: ReduceLROnPlateau on val mean km; onecycle: per step; cosine: after --warmup-epochs linear warmup (default: plateau)")
    opt.add_argument("--warmup-epochs", type=int, default=1, help="linear warmup epochs of the cosine scheduler (default: 1)")
    data = parser.add_argument_group("input pipeline")
    data.add_argument("--augment", choices=AUGMENT_CHOICES, default="finetune",
                      help="colour jitter + random resized crop: never, once the backbone unfreezes, or always (default: finetune)")
    data.add_argument("--mirror-p", type=float, default=0.0,
                      help="probability of mirroring an augmented training quadruplet: all views flipped, 90/270 swapped (default: 0)")
    data.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=True,
                      help="reuse backbone features from disk while the backbone is frozen and unaugmented (default: on)")
    data.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="feature cache folder (default: data/cache/features)")
    data.add_argument("--engine", choices=ENGINES, default="auto",
                      help="fills the feature cache: torch, or ONNX Runtime (backbone exported once into the cache "
                           "folder); auto: onnx on the CPU, torch on a GPU (default: auto)")
    data.add_argument("--num-workers", type=int, default=default_num_workers(),
                      help=f"data loader worker processes, kept alive across epochs (default: usable CPU cores - 1, here {default_num_workers()})")
    run = parser.add_argument_group("run")
    run.add_argument("--out-dir", type=Path, default=Path("reports"), help="TensorBoard logs and checkpoints go to OUT_DIR/RUN_NAME/version_N (default: reports)")
    run.add_argument("--run-name", default=None, help="(default: <data>-<approach>-<backbone>, data = demo or the dataset dirs' names)")
    run.add_argument("--resume", type=Path, default=None, help="continue training from this checkpoint (same approach, backbone, image size)")
    run.add_argument("--folds", type=int, default=None, metavar="K",
                     help="K-fold cross-validation: K runs, each testing on one seeded fold (val from the rest by --split's "
                          "train:val ratio); out-of-fold predictions in version_N/oof.csv (default: off)")
    run.add_argument("--quick", action="store_true",
                     help="smoke run: 2 epochs of at most 2 batches, 64 px (unless given)")
    run.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ... (default: auto)")
    run.add_argument("--devices", default="auto", help="Lightning devices: auto, N or a list (default: auto)")
    run.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="Lightning precision (default: bf16-mixed on a GPU that supports it, else 32-true)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels_last memory format for the convolutional backbone (default: on with a GPU)")
    run.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: auto)")
    run.add_argument("--num-nodes", type=int, default=1, help="Lightning nodes, for multi-node DDP (default: 1)")
    run.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                     help="deterministic algorithms (Trainer(deterministic=...)); on a GPU only warnings for "
                          "nondeterministic ops (default: on without a GPU, off with one)")
    run.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the CLI, train, test the best checkpoint, print the table and the checkpoint path.

    SIGINT/SIGTERM: one line with the --resume command on stderr, exit status 128 + signal number.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    check_numbers(args)
    interrupt = Interrupt()
    with interrupt.installed():
        try:
            train(args, interrupt)
        except (KeyboardInterrupt, SystemExit) as exception:
            # Lightning turns a KeyboardInterrupt inside fit/test into sys.exit(1) after its graceful shutdown
            if interrupt.signal is None and not isinstance(exception, KeyboardInterrupt):
                raise
            for bar in list(getattr(tqdm, "_instances", ())):  # Lightning's bars: closed now, not after our line
                bar.close()
            print(f"error: {interrupted_message(interrupt, argv, args, args.epochs)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signal.Signals[interrupt.signal or "SIGINT"].value) from None


if __name__ == "__main__":
    run_cli(main)
