"""The phases of one cold `python -m src.train` run: start-up and enrich, feature cache fill, epochs, test.

    python -m benchmarks.train_phases --dataset-dirs DIR [--image-size 96] [--epochs 3] [--baseline CHECKOUT]
                                      [-- extra src.train flags]

Runs `python -m src.train --approach classification --dataset-dirs DIR --image-size 96 --epochs 3` as a
child process with everything cold: a new feature cache folder, ONNX export store and image-check cache
(under --work, default a temporary folder). A small Lightning callback (`PhaseTimer`, registered through
Lightning's `pytorch_lightning.callbacks_factory` entry point, so the timed code is the checkout's own,
unchanged) records when each phase ends; the parent samples the memory of the child's process tree.
With --baseline CHECKOUT the same run is made first in that checkout (e.g. a worktree of an older commit),
then in this one, back to back, and each phase's ratio is printed. The load average (/proc/loadavg) is
printed with every run: the figures follow the free cores.

Phases (wall seconds, from the parent's start of the child):
  start-up and enrich   imports, enrich (image checks, split, cells), the model, until the Trainer exists
  cache fill            the Trainer's creation to the fit's setup: the DataModule's prepare_data (fill)
  load + sanity check   reading the cached features, the validation sanity check
  epochs                training epochs with their validation
  test                  the test of the best checkpoint (loading it, the test loader, the test loop)
  report and exit       metrics.json, the training curves, process exit
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parent.parent
OUT_ENV = "TRAIN_PHASES_OUT"  # the child's callback writes its timestamps (time.time()) here
ENTRY_POINT_GROUP = "pytorch_lightning.callbacks_factory"
GIB = 1024 ** 3


class PhaseTimer(pl.Callback):
    """Wall-clock timestamps (time.time()) of the run's phase boundaries, written as JSON at each teardown."""

    def __init__(self, out: str):
        self.out = out
        self.times: dict[str, float | list[float]] = {"trainer": time.time(), "epoch_start": [], "epoch_end": []}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.times.setdefault(f"setup_{getattr(stage, 'value', stage)}", time.time())  # a TrainerFn

    def on_train_start(self, trainer, pl_module) -> None:
        self.times["train_start"] = time.time()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.times["epoch_start"].append(time.time())

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after the epoch's validation
        self.times["epoch_end"].append(time.time())

    def on_fit_end(self, trainer, pl_module) -> None:
        self.times["fit_end"] = time.time()

    def on_test_start(self, trainer, pl_module) -> None:
        self.times["test_start"] = time.time()

    def on_test_end(self, trainer, pl_module) -> None:
        self.times["test_end"] = time.time()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            Path(self.out).write_text(json.dumps(self.times))


def phase_timer_callbacks() -> list[pl.Callback]:
    """The entry point's factory: a PhaseTimer when $TRAIN_PHASES_OUT is set (in the timed child only)."""
    out = os.environ.get(OUT_ENV)
    return [PhaseTimer(out)] if out else []


def entry_point_dir(folder: Path) -> Path:
    """A folder that, on PYTHONPATH, registers `phase_timer_callbacks` with Lightning: this module under a
    top-level name and a distribution's metadata naming it as a callbacks factory."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, folder / "train_phases_timer.py")
    info = folder / "train_phases_timer-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: train-phases-timer\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntrain_phases = "
                                           "train_phases_timer:phase_timer_callbacks\n")
    return folder


def tree_pss(pid: int) -> int:
    """Proportional set size in bytes of process `pid` and all its descendants (from /proc): pages shared by
    the processes (a forked DataLoader worker shares the parent's libraries) are counted once in all."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack += children.get(current, [])
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return total


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_train(checkout: Path, dataset_dirs: list[str], image_size: int, epochs: int, work: Path,
              extra: list[str]) -> dict:
    """One cold run of src.train in `checkout`: its phase times, peak memory and the load around it."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out = work / "phases.json"
    env = {**os.environ, OUT_ENV: str(out), "ONNX_CACHE_DIR": str(work / "onnx"),
           "PYTHONPATH": str(entry_point_dir(work / "entry_point"))}
    command = [sys.executable, "-m", "src.train", "--approach", "classification", "--dataset-dirs", *dataset_dirs,
               "--image-size", str(image_size), "--epochs", str(epochs), "--cache-dir", str(work / "features"),
               "--check-cache", str(work / "checks"), "--out-dir", str(work / "runs"), *extra]
    load_before = load_average()
    peak = 0
    start = time.time()
    with open(work / "stdout.log", "w") as stdout, open(work / "stderr.log", "w") as stderr:
        child = subprocess.Popen(command, cwd=checkout, env=env, stdout=stdout, stderr=stderr)
        while True:  # os.wait4: the child's own resource usage (its largest process's peak RSS)
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_pss(child.pid))
            time.sleep(0.2)
        end = time.time()
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"error: src.train in {checkout} failed ({child.returncode}); see {work / 'stderr.log'}")
    times = json.loads(out.read_text())
    phases = {
        "start-up and enrich": times["trainer"] - start,
        "cache fill": times["setup_fit"] - times["trainer"],
        "load + sanity check": times["train_start"] - times["setup_fit"],
        f"{epochs} epochs": times["fit_end"] - times["train_start"],
        "test": times["test_end"] - times["fit_end"],
        "report and exit": end - times["test_end"],
        "total": end - start,
    }
    epoch_seconds = [b - a for a, b in zip(times["epoch_start"], times["epoch_end"])]
    metrics = json.loads(next((work / "runs").glob("*/version_0/metrics.json")).read_text())
    return {"phases": phases, "epochs": epoch_seconds, "peak_tree": peak, "peak_process": usage.ru_maxrss * 1024,
            "load": (load_before, load_average()),
            "test_km": metrics["test"]["mean_km"], "feature_cache": metrics["feature_cache"], "checkout": str(checkout)}


def show(name: str, result: dict) -> None:
    print(f"{name}: {result['checkout']} (load average before {result['load'][0]}, after {result['load'][1]})")
    for phase, seconds in result["phases"].items():
        print(f"  {phase:<22} {seconds:7.1f} s")
    print(f"  per epoch (with val): {', '.join(f'{s:.1f} s' for s in result['epochs'])}")
    print(f"  peak memory: largest process {result['peak_process'] / GIB:.2f} GiB RSS (getrusage, as /usr/bin/time -v "
          f"reports it), process tree {result['peak_tree'] / GIB:.2f} GiB PSS (sampled every 0.2 s)")
    print(f"  test mean {result['test_km']:.3f} km; feature cache entries {result['feature_cache']}")


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dirs", nargs="+", required=True, help="the dataset dirs to train on")
    parser.add_argument("--image-size", type=int, default=96, help="(default: 96)")
    parser.add_argument("--epochs", type=int, default=3, help="(default: 3)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout (e.g. a worktree of an older commit) timed first, back to back")
    parser.add_argument("--checkout", type=Path, default=ROOT,
                        help="the checkout timed (after --baseline's) (default: this one)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the runs' caches and logs go, emptied first (default: a temporary folder)")
    parser.add_argument("extra", nargs="*", help="more src.train flags (after --)")
    args = parser.parse_args()
    dataset_dirs = [str(Path(d).resolve()) for d in args.dataset_dirs]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        runs = {}
        if args.baseline is not None:
            runs["before"] = run_train(args.baseline.resolve(), dataset_dirs, args.image_size, args.epochs,
                                       work / "before", args.extra)
        runs["after" if args.baseline else "run"] = run_train(args.checkout.resolve(), dataset_dirs, args.image_size,
                                                              args.epochs, work / "after", args.extra)
    print(f"src.train --approach classification --dataset-dirs {' '.join(dataset_dirs)} --image-size "
          f"{args.image_size} --epochs {args.epochs} {' '.join(args.extra)}, cold caches, {os.cpu_count()} CPUs")
    for name, result in runs.items():
        show(name, result)
    if args.baseline is not None:
        before, after = runs["before"]["phases"], runs["after"]["phases"]
        print("ratios (before / after): " + ", ".join(f"{phase} {before[phase] / after[phase]:.2f}x"
                                                      for phase in before if after[phase] > 0))


if __name__ == "__main__":
    main()
