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

from src.core.errors import UserError, run_cli
from src.core.flags import (REFINE_RULES, Rule, add_refine_arguments, at_least, check_ranges, non_negative_finite,
                            positive_finite)
from src.core.paths import default_feature_cache_dir
from src.data.config import AUGMENT_CHOICES, LoaderConfig, add_data_arguments, add_locations_argument
from src.core.choices import BACKBONES, CENTROID_KINDS, ENGINES, FUSIONS, PREDICT_RULES
from src.model.config import (APPROACHES, DEFAULT_FUSION, DEFAULT_LABEL_SMOOTHING_KM, DEFAULT_PREDICT_RULE,
                              DEFAULT_REFINE, DEFAULT_REFINE_GATE, DEFAULT_REFINE_K, OPTIMIZERS, SCHEDULERS,
                              ModelConfig, OptimConfig)
from src.training.config import (CACHE_SCOPES, MAX_IMAGE_SIZE, PRECISIONS, UNSUPPORTED_PRECISIONS, RunConfig,
                                 TrainerConfig, default_num_workers, processes_per_node, usable_cores)

RULES = [
    Rule("epochs", at_least(1), "a whole number of epochs >= 1"),
    Rule("batch_size", at_least(1), "a number of locations per batch >= 1"),
    Rule("image_size", lambda v: 16 <= v <= MAX_IMAGE_SIZE, f"a side in pixels from 16 to {MAX_IMAGE_SIZE}"),
    Rule("num_workers", at_least(0), "0 (load in the main process) or more worker processes"),
    Rule("lr", positive_finite, "a positive learning rate, e.g. 1e-3"),
    Rule("lr_finetune", positive_finite, "a positive learning rate, e.g. 1e-4"),
    Rule("weight_decay", non_negative_finite, "0 or more"),
    Rule("dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    Rule("mirror_p", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    Rule("topk", at_least(0), "0 (all classes) or more"),
    Rule("hidden", at_least(0), "0 (a linear head) or more units"),
    Rule("warmup_epochs", at_least(0), "0 or more epochs"),
    Rule("unfreeze_blocks", at_least(0), "0 (all stages) or more"),
    Rule("num_nodes", at_least(1), "1 or more"),
    Rule("accumulate_grad_batches", at_least(1), "1 or more batches"),
    Rule("gradient_clip_val", positive_finite, "a positive gradient norm"),
    Rule("early_stopping_patience", at_least(1), "1 or more validations"),
    Rule("val_check_interval", lambda v: 0 < v <= 1 or (v > 1 and float(v).is_integer()),
         "a fraction of an epoch in (0, 1] or a whole number of batches"),
    Rule("ema", lambda v: 0 < v < 1, "a decay in (0, 1), e.g. 0.999"),
    Rule("label_smoothing_km", non_negative_finite, "0 (off) or a distance in km, e.g. 12"),
    Rule("offset_weight", non_negative_finite, "0 or more"),
    Rule("folds", lambda v: 2 <= v <= 100, "a number of folds from 2 to 100"),
    *REFINE_RULES,
]


def build_parser() -> argparse.ArgumentParser:
    """The train CLI's argument parser (enrich's data options included)."""
    parser = argparse.ArgumentParser(prog="python -m src.train", allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--approach", choices=APPROACHES, required=True,
                        help="predict a cell (classification), the x/y position (regression), or a cell and the "
                             "offset inside it (hybrid)")
    add_data_arguments(parser)
    add_locations_argument(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES, default=None,
                       help="(default: resnext101_32x8d with a GPU, else efficientnet_lite0; efficientnet_lite0 on the demo set)")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from ImageNet weights (default: on)")
    model.add_argument("--image-size", type=int, default=None,
                       help="input side in pixels (default: the backbone's native size, e.g. 224 for efficientnet_lite0; "
                            "96 on the demo set; 64 with --quick)")
    model.add_argument("--centroids", choices=CENTROID_KINDS, default="weighted",
                       help="class centroids averaged by the classification prediction (default: weighted)")
    model.add_argument("--topk", type=int, default=0, help="average only the k most likely classes, 0 for all (default: 0)")
    model.add_argument("--predict-rule", choices=PREDICT_RULES, default=DEFAULT_PREDICT_RULE,
                       help="class probabilities -> point: probability-weighted mean, geometric median (minimises the "
                            f"expected km) or mode (the most likely class); saved, predict can override "
                            f"(default: {DEFAULT_PREDICT_RULE})")
    model.add_argument("--fusion", choices=FUSIONS, default=DEFAULT_FUSION,
                       help="how the four view embeddings combine: side by side, averaged, or a self-attention layer "
                            f"with heading embeddings (default: {DEFAULT_FUSION})")
    model.add_argument("--label-smoothing-km", type=float, default=DEFAULT_LABEL_SMOOTHING_KM, metavar="TAU",
                       help="haversine label smoothing: soft targets exp(-d/TAU) over the class centroids, 0 for one-hot "
                            f"cross-entropy (default: {DEFAULT_LABEL_SMOOTHING_KM:g})")
    model.add_argument("--offset-weight", type=float, default=1.0,
                       help="hybrid: weight of the offset loss beside the cell loss (default: 1)")
    add_refine_arguments(model, (DEFAULT_REFINE, DEFAULT_REFINE_K, DEFAULT_REFINE_GATE),
                         knn="after training, keep a gallery of the fused embeddings of the train and val locations "
                             "in the best checkpoint, and predict the geometric median of the k nearest gallery "
                             "locations (cosine) within the most likely classes")
    model.add_argument("--gallery-dirs", nargs="+", type=Path, default=[], metavar="DIR",
                       help="--refine knn: dataset dirs whose locations join the gallery (e.g. a downloaded set; "
                            "copies of test locations are left out) (default: none)")
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
                      help="reuse backbone features from disk while the backbone is frozen and unaugmented, and in the "
                           "test of a backbone that stayed frozen (default: on)")
    data.add_argument("--cache-dir", type=Path, default=None,
                      help="feature cache folder, shared with src.predict (default: data/cache/features, or "
                           "$FEATURE_CACHE_DIR when set)")
    data.add_argument("--engine", choices=ENGINES, default="auto",
                      help="fills the feature cache: torch, or ONNX Runtime (backbone exported once into the cache "
                           "folder); auto: onnx on the CPU, torch on a GPU (default: auto)")
    data.add_argument("--num-workers", type=int, default=None,
                      help="data loader worker processes of each training process, kept alive across epochs (default: "
                           f"its share of the usable CPU cores - 1; here {usable_cores()} cores, one process: "
                           f"{default_num_workers()})")
    data.add_argument("--cache-scope", choices=CACHE_SCOPES, default="node",
                      help="multi-node runs: node, each node fills its own --cache-dir on a local disk; shared, one "
                           "process fills a --cache-dir all nodes see (default: node)")
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
                     help="Lightning precision; 16-true and bf16-true are refused (they convert the float64 "
                          "centroids and targets) (default: bf16-mixed on a GPU with native bfloat16, 16-mixed on an "
                          "older GPU, else 32-true)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels_last memory format for the convolutional backbone (default: on with a GPU)")
    run.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: auto)")
    run.add_argument("--num-nodes", type=int, default=1, help="Lightning nodes, for multi-node DDP (default: 1)")
    run.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                     help="deterministic algorithms (Trainer(deterministic=...)); on a GPU only warnings for "
                          "nondeterministic ops (default: on without a GPU, off with one)")
    run.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def run_config(args: argparse.Namespace, first_epoch: int = 0) -> RunConfig:
    """The typed configs of a run from the flags, with the situation-dependent defaults filled in
    (`first_epoch`: the epoch a resumed run starts at)."""
    import torch  # noqa: PLC0415 (not for --help)

    from src.data.enrich import data_config_from_args  # noqa: PLC0415
    from src.model.backbones import backbone_spec  # noqa: PLC0415
    from src.training.run import default_precision, ensure_demo_dataset, gpu_status, resolve_choices, say  # noqa: PLC0415

    if args.folds is not None and (args.resume is not None or args.locations is not None):
        raise UserError(f"--folds {args.folds}: cross-validation splits the dataset dirs itself; "
                        "drop --resume / --locations")
    if args.gallery_dirs:
        if args.refine != "knn":
            raise UserError(f"--gallery-dirs {' '.join(map(str, args.gallery_dirs))}: the gallery is only built with "
                            "--refine knn")
        from src.data.ingest import check_dataset_dirs  # noqa: PLC0415

        check_dataset_dirs(args.gallery_dirs)
    demo = not args.dataset_dirs and args.locations is None
    if demo:
        args.dataset_dirs = [ensure_demo_dataset()]
    data = data_config_from_args(args)  # a wrong --dataset-dirs or --locations fails here, before the slow start-up
    if args.strategy.startswith(("ddp_spawn", "ddp_notebook", "ddp_fork")):
        raise UserError(f"--strategy {args.strategy}: not supported: the test results are gathered in the processes "
                        "that train, which these strategies discard; use --strategy ddp")
    if args.precision in UNSUPPORTED_PRECISIONS:
        raise UserError(f"--precision {args.precision}: not supported: {UNSUPPORTED_PRECISIONS[args.precision]}; use "
                        f"{args.precision.split('-')[0]}-mixed (the same speed-up, float32 master weights)")
    gpu, warning = gpu_status(args.accelerator)
    if warning:
        say(warning)
    choices = resolve_choices(args.backbone, args.image_size, args.epochs, args.unfreeze_at_epoch, demo, args.quick)
    unfreeze = choices.unfreeze_at_epoch
    if args.scheduler == "onecycle" and unfreeze is not None and 0 < unfreeze < choices.epochs:
        raise UserError(f"--scheduler onecycle: its per-step schedule would have moved the backbone's rate before "
                        f"--unfreeze-at-epoch {unfreeze}; use --scheduler cosine (the backbone's schedule starts when it "
                        "unfreezes) or --unfreeze-at-epoch 0")
    precision, reason = default_precision(args.accelerator) if args.precision is None else (args.precision, "--precision")
    num_workers = args.num_workers
    if num_workers is None:
        processes = processes_per_node(args.devices, args.accelerator, torch.cuda.device_count() if gpu else 0)
        num_workers = default_num_workers(processes)
    channels_last = gpu if args.channels_last is None else args.channels_last
    say(f"precision: {precision} ({reason}); channels_last: {'on' if channels_last else 'off'}")
    deterministic = not gpu if args.deterministic is None else args.deterministic
    # on a GPU some ops (e.g. adaptive pooling's backward) have no deterministic kernel: warn, do not fail
    deterministic = ("warn" if gpu else True) if deterministic else False
    spec = backbone_spec(choices.backbone)
    if args.run_name is None:
        from src.data.enrich import dataset_tag  # noqa: PLC0415
        source = "demo" if demo else dataset_tag(data.dataset_dirs) if args.dataset_dirs else "locations"
        args.run_name = f"{source}-{args.approach}-{choices.backbone}"
    model = ModelConfig(
        approach=args.approach, backbone=choices.backbone, image_size=choices.image_size,
        backbone_weights="imagenet" if args.pretrained else "random", fusion=args.fusion, hidden=args.hidden,
        dropout=args.dropout, centroids=args.centroids, topk=args.topk, predict_rule=args.predict_rule,
        label_smoothing_km=args.label_smoothing_km, offset_weight=args.offset_weight, image_mean=tuple(spec.mean),
        image_std=tuple(spec.std), channels_last=channels_last, refine=args.refine, refine_k=args.refine_k,
        refine_gate=args.refine_gate)
    optim = OptimConfig(lr=args.lr, lr_finetune=args.lr_finetune, unfreeze_at_epoch=choices.unfreeze_at_epoch,
                        unfreeze_blocks=args.unfreeze_blocks, freeze_bn=args.freeze_bn, optimizer=args.optimizer,
                        weight_decay=args.weight_decay, scheduler=args.scheduler, warmup_epochs=args.warmup_epochs)
    cache_dir = args.cache_dir or default_feature_cache_dir()
    loader = LoaderConfig(image_size=choices.image_size, mean=tuple(spec.mean), std=tuple(spec.std),
                          batch_size=args.batch_size, num_workers=num_workers, augment=args.augment,
                          mirror_p=args.mirror_p, unfreeze_at_epoch=choices.unfreeze_at_epoch,
                          cache_dir=str(cache_dir) if args.cache_features else None,
                          backbone=choices.backbone, engine=args.engine, first_epoch=first_epoch)
    trainer = TrainerConfig(
        epochs=choices.epochs, out_dir=args.out_dir, run_name=args.run_name, accelerator=args.accelerator,
        devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy, precision=precision,
        deterministic=deterministic, accumulate_grad_batches=args.accumulate_grad_batches,
        gradient_clip_val=args.gradient_clip_val, early_stopping_patience=args.early_stopping_patience,
        val_check_interval=args.val_check_interval, ema=args.ema, quick=args.quick, resume=args.resume,
        folds=args.folds, cache_scope=args.cache_scope)
    gallery_dirs = tuple(str(Path(d).resolve()) for d in args.gallery_dirs)
    return RunConfig(data, model, optim, loader, trainer, gallery_dirs)


def main(argv: list[str] | None = None) -> None:
    """Parse the CLI, train, test the best checkpoint, print the table and the checkpoint path.

    SIGINT/SIGTERM: one line with the --resume command on stderr, exit status 128 + signal number.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    check_ranges(args, RULES)
    from tqdm import tqdm  # noqa: PLC0415

    from src.inference.checkpoints import read_checkpoint  # noqa: PLC0415
    from src.training.callbacks import Interrupt, interrupted_message  # noqa: PLC0415
    from src.training.run import check_resume, say_fine_tuning, train  # noqa: PLC0415

    interrupt = Interrupt()
    epochs = args.epochs
    with interrupt.installed():
        try:
            # the --resume file is read before anything else is printed
            saved = read_checkpoint(args.resume, "--resume", training_state=True) if args.resume else None
            config = run_config(args, first_epoch=int(saved["epoch"]) + 1 if saved is not None else 0)
            epochs = config.trainer.epochs
            say_fine_tuning(config)
            if saved is not None:
                check_resume(config, saved)
            train(config, interrupt)
        except (KeyboardInterrupt, SystemExit) as exception:
            # Lightning turns a KeyboardInterrupt inside fit/test into sys.exit(1) after its graceful shutdown
            if interrupt.signal is None and not isinstance(exception, KeyboardInterrupt):
                raise
            for bar in list(getattr(tqdm, "_instances", ())):  # Lightning's bars: closed now, not after our line
                bar.close()
            print(f"error: {interrupted_message(interrupt, argv, args.resume, epochs)}",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signal.Signals[interrupt.signal or "SIGINT"].value) from None


if __name__ == "__main__":
    run_cli(main)
