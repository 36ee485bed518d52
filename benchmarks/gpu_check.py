"""The README's GPU promises, checked in one command on a CUDA machine (a few minutes on the demo data).

    python -m benchmarks.gpu_check [--out DIR] [--epochs 3]

Runs, each in its own process as a user would:
  1. one GPU: bf16-mixed (or 16-mixed without native bfloat16), channels_last, the backbone unfreezing at
     epoch 1, EMA weights; passes when the run finishes and beats the constant baseline;
  2. every GPU with DDP, the backbone unfreezing at epoch 1 (the fine-tuning phase a second fit in the same
     processes, SyncBatchNorm); passes when it finishes and beats the constant;
  3. predict with --device cuda on that run's test split; passes when every test location gets a row;
  4. serve with --device cuda: one upload of four views; passes on a 200 answer with coordinates.
One PASS/FAIL line per promise with the figure behind it; the exit status is 1 when any fails. Without CUDA
it says so and exits 0, checking nothing.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(*args: str, timeout: float = 600) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, seconds) of `python -m ...` in the checkout."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout, result.stderr, time.perf_counter() - start


def test_means(run_folder: Path) -> tuple[float, float]:
    metrics = json.loads((run_folder / "metrics.json").read_text())
    return metrics["test"]["mean_km"], metrics["test_constant_baseline"]["mean_km"]


def report(name: str, ok: bool, figure: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {figure}", flush=True)
    return ok


def train_check(name: str, out: Path, demo: Path, epochs: int, extra: list[str]) -> tuple[bool, Path | None]:
    code, stdout, stderr, seconds = command("src.train", "--approach", "classification", "--dataset-dirs", str(demo),
                                            "--epochs", str(epochs), "--image-size", "96", "--out-dir", str(out),
                                            "--run-name", name, "--cache-dir", str(out / "cache"), *extra)
    if code != 0:
        return report(name, False, f"exit {code}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"), None
    checkpoint = Path(stdout.strip().splitlines()[-1].removeprefix("checkpoint: "))
    model_km, constant_km = test_means(checkpoint.parent.parent)
    precision = re.search(r"precision: (\S+)", stderr)
    ok = model_km < constant_km
    return report(name, ok, f"{seconds:.0f} s, test mean {model_km:.1f} km vs constant {constant_km:.1f} km, "
                            f"precision {precision.group(1) if precision else '?'}"), checkpoint


def serve_check(checkpoint: Path, demo: Path) -> bool:
    """Start src.serve on a free port with --device cuda, post one location's views, stop it."""
    process = subprocess.Popen([sys.executable, "-m", "src.serve", "--checkpoint", str(checkpoint), "--port", "0",
                                "--device", "cuda", "--engine", "torch"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"serving on (http://\S+)", line)
        if not match:
            return report("serve --device cuda", False, f"no 'serving on' line ({line.strip() or process.stderr.read()[-300:]})")
        folder = next((demo / "data").iterdir())
        boundary = uuid.uuid4().hex
        body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{v}\"; filename=\"{v}.jpg\"\r\n"
                        f"Content-Type: image/jpeg\r\n\r\n".encode() + (folder / f"{v}.jpg").read_bytes() + b"\r\n"
                        for v in (0, 90, 180, 270)) + f"--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{match.group(1)}/api/predict", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as answer:
            result = json.loads(answer.read())
        ok = "latitude" in result and "longitude" in result
        return report("serve --device cuda", ok, f"200 in {1000 * (time.perf_counter() - start):.0f} ms, "
                                                 f"({result.get('latitude', 0):.4f}, {result.get('longitude', 0):.4f})")
    except Exception as error:  # any failure of the check is its FAIL line
        return report("serve --device cuda", False, f"{type(error).__name__}: {error}")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each training run (default: 3)")
    args = parser.parse_args()
    import torch  # noqa: PLC0415 (after parsing: --help stays instant)

    if not torch.cuda.is_available():
        print(f"no CUDA GPU here: nothing checked (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "run this on the GPU machine")
        return
    gpus = torch.cuda.device_count()
    print(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        demo = out / "demo"
        code, _, stderr, _ = command("src.demo", "--out", str(demo), "--locations", "600", "--image-size", "96")
        if code != 0:
            raise SystemExit(f"error: could not write the demo set: {stderr.strip()[-300:]}")
        results = []
        ok, checkpoint = train_check("one GPU, mixed precision, channels_last, unfreeze at epoch 1, EMA", out, demo,
                                     args.epochs, ["--devices", "1", "--channels-last", "--unfreeze-at-epoch", "1",
                                                   "--ema", "--num-workers", str(min(8, os.cpu_count() or 1))])
        results.append(ok)
        if gpus > 1:
            ok_ddp, _ = train_check(f"{gpus} GPUs, DDP, backbone unfreezing at epoch 1 (a second fit)", out, demo,
                                    args.epochs, ["--devices", str(gpus), "--strategy", "ddp", "--unfreeze-at-epoch", "1"])
            results.append(ok_ddp)
        else:
            print("SKIP DDP: one GPU here")
        if checkpoint is not None:
            code, stdout, stderr, seconds = command("src.predict", "--checkpoint", str(checkpoint), "--device", "cuda")
            rows = len(stdout.strip().splitlines()) - 1 if code == 0 else 0
            results.append(report("predict --device cuda", code == 0 and rows > 0,
                                  f"exit {code}, {rows} rows in {seconds:.0f} s"))
            results.append(serve_check(checkpoint, demo))
    if not all(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
