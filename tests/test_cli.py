"""Every command as a separate process: user mistakes (exit 2, one `error:` line, no traceback), the defect
corpus end to end, `--help` with every flag and default, and atomic outputs.

Each command runs in its own process with its own exit code, stdout and stderr (`run_command`): a child
forked from this test process, which has already imported torch and the project, executes the module as
`__main__` exactly like `python -m src.<command> ARGS` (runpy). That costs a fraction of a second per case
instead of the 6-14 s of a fresh interpreter importing torch; test_readme.py, test_enrich.py, test_score.py
and test_predict.py run real `python -m` subprocesses.
"""

import argparse
import importlib
import io
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from src.core.errors import unknown_flags, unknown_flags_message
from tests.corpus import write_defect_corpus

REPO = Path(__file__).resolve().parent.parent

COMMANDS = ("enrich", "train", "predict", "score", "analyze", "demo", "resize")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_command(command: str, *args, cwd: Path, timeout: float = 240) -> Run:
    """`python -m src.<command> ARGS` in a child process (forked, see the module docstring)."""
    argv = [str(a) for a in args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.chdir(cwd)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                sys.stdin = open(os.devnull)
                sys.argv = [f"src.{command}", *argv]
                torch.set_num_threads(1)  # OpenMP thread pools do not survive fork
                warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
                try:
                    runpy.run_module(f"src.{command}", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as exit_:
                    if exit_.code is None or isinstance(exit_.code, int):
                        code = exit_.code or 0
                    else:
                        print(exit_.code, file=sys.stderr)
                except BaseException:  # what the interpreter does with an uncaught exception
                    traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"src.{command} {' '.join(argv)}: still running after {timeout} s")
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return Run(os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode())


def assert_user_error(run: Run, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one `error:` line (the last on stderr) containing `fragments`."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_corpus")
    return out, write_defect_corpus(out)


@pytest.fixture(scope="module")
def corpus_train(corpus, tmp_path_factory):
    """A --quick run on the defect corpus (tiny backbone, random weights): the run the other tests use."""
    root, _ = corpus
    work = tmp_path_factory.mktemp("cli_work")
    run = run_command("train", "--approach", "classification", "--dataset-dirs", root, "--backbone", "tiny",
                      "--no-pretrained", "--quick", "--batch-size", 8, "--num-workers", 0, "--out-dir",
                      work / "reports", "--cache-dir", work / "cache", cwd=work)
    assert run.returncode == 0, run.stderr
    checkpoint = run.stdout.strip().splitlines()[-1].removeprefix("checkpoint: ")
    return work, Path(checkpoint), run


@pytest.fixture(scope="module")
def bad(corpus_train, demo_dir):
    """Broken inputs of every kind, beside a good checkpoint and dataset."""
    work, checkpoint, _ = corpus_train
    root = work / "bad"
    root.mkdir()
    (root / "empty").mkdir()
    for name, content in {"garbage": b"\x00\xff\x13\x89PNG binary \xfe\x00", "zero": b"",
                          "columns": b"id,lat,lon\na,45.0,16.0\n", "ragged": b"uuid,latitude,longitude\na,45,16,7\n"
                          }.items():
        (root / name / "data").mkdir(parents=True)
        (root / name / "data.csv").write_bytes(content)
        (root / f"{name}.csv").write_bytes(content)
    (root / "no_uuid_folders" / "data").mkdir(parents=True)
    (root / "no_uuid_folders" / "data" / "0.jpg").write_bytes((demo_dir / "data.csv").read_bytes()[:10])
    (root / "semicolons.csv").write_text("uuid;latitude;longitude\na;45;16\n")
    (root / "header_only.csv").write_text("uuid,latitude,longitude\n")
    (root / "bad_rows.csv").write_text("uuid,latitude,longitude\na,45.1,16.0\nb,north,16.0\n")
    (root / "repeated.csv").write_text("uuid,latitude,longitude\na,45.1,16.0\na,45.2,16.0\n")
    (root / "degrees_wrong.csv").write_text("uuid,latitude,longitude\na,4995000,16.0\n")
    (root / "text.ckpt").write_text("hello, not a checkpoint\n")
    data = checkpoint.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    torch.save({"state_dict": {}}, root / "foreign.ckpt")
    (root / "a_file").write_text("x")
    return root, checkpoint, demo_dir


# (command, args, fragments of the error line); {bad}, {ckpt}, {demo} are filled in
CASES = {
    "enrich": [
        ("missing dir", "--dataset-dirs {bad}/nope", ["nope", "no such dataset directory"]),
        ("empty dir", "--dataset-dirs {bad}/empty", ["data.csv: not found", "uuid, latitude, longitude"]),
        ("no required column", "--dataset-dirs {bad}/columns", ["data.csv: missing column(s) uuid"]),
        ("binary CSV", "--dataset-dirs {bad}/garbage", ["data.csv: not a readable CSV"]),
        ("empty CSV", "--dataset-dirs {bad}/zero", ["data.csv: not a readable CSV"]),
        ("ragged CSV", "--dataset-dirs {bad}/ragged", ["data.csv: line 2 has more fields than the header"]),
        ("file as dataset dir", "--dataset-dirs {bad}/a_file", ["a_file: no such dataset directory"]),
        ("non-numeric spacing", "--dataset-dirs {demo} --spacing abc", ["--spacing", "invalid float value: 'abc'",
                                                                         "--help"]),
        ("zero spacing", "--dataset-dirs {demo} --spacing 0", ["--spacing 0", "between 0.01 and 10"]),
        ("tiny spacing", "--dataset-dirs {demo} --spacing 1e-6", ["--spacing 1e-06"]),
        ("infinite spacing", "--dataset-dirs {demo} --spacing inf", ["--spacing inf"]),
        ("nan split", "--dataset-dirs {demo} --split nan 0.1 0.1", ["--split nan"]),
        ("split not summing to 1", "--dataset-dirs {demo} --split 0.9 0.2 0.1", ["--split", "summing to 1"]),
        ("negative seed", "--dataset-dirs {demo} --seed -1", ["--seed -1"]),
        ("nan max-outside-km", "--dataset-dirs {demo} --max-outside-km nan", ["--max-outside-km nan"]),
        ("unknown holdout dir", "--dataset-dirs {demo} --holdout-dirs {bad}/empty", ["--holdout-dirs"]),
        ("output inside a file", "--dataset-dirs {demo} --no-figures --out {bad}/a_file/e.csv", ["a_file"]),
        ("unknown flag", "--dataset-dirs {demo} --spacnig 0.5",
         ["unrecognized argument --spacnig (did you mean --spacing?)"]),
        ("no dataset dirs", "", ["--dataset-dirs"]),
    ],
    "train": [
        ("missing dir", "--approach classification --dataset-dirs {bad}/nope", ["no such dataset directory"]),
        ("empty dir", "--approach classification --dataset-dirs {bad}/empty", ["data.csv: not found"]),
        ("no required column", "--approach regression --dataset-dirs {bad}/columns", ["missing column(s) uuid"]),
        ("binary CSV", "--approach classification --dataset-dirs {bad}/garbage", ["not a readable CSV"]),
        ("empty CSV", "--approach classification --dataset-dirs {bad}/zero", ["not a readable CSV"]),
        ("no approach", "--dataset-dirs {demo}", ["--approach"]),
        ("bad approach", "--approach clustering --dataset-dirs {demo}", ["--approach", "invalid choice"]),
        ("non-numeric epochs", "--approach classification --dataset-dirs {demo} --epochs ten", ["--epochs"]),
        ("zero epochs", "--approach classification --dataset-dirs {demo} --epochs 0", ["--epochs"]),
        ("zero batch size", "--approach classification --dataset-dirs {demo} --batch-size 0", ["--batch-size"]),
        ("zero spacing", "--approach classification --dataset-dirs {demo} --spacing 0", ["--spacing 0"]),
        ("negative seed", "--approach classification --dataset-dirs {demo} --seed -5", ["--seed -5"]),
    ],
    "predict": [
        ("missing checkpoint", "--checkpoint {bad}/nope.ckpt --images {demo}", ["--checkpoint", "file not found"]),
        ("directory as checkpoint", "--checkpoint {bad}/empty --images {demo}", ["is a directory"]),
        ("text file as checkpoint", "--checkpoint {bad}/text.ckpt --images {demo}",
         ["text.ckpt: not a readable checkpoint"]),
        ("truncated checkpoint", "--checkpoint {bad}/truncated.ckpt --images {demo}",
         ["truncated.ckpt: not a readable checkpoint"]),
        ("foreign checkpoint", "--checkpoint {bad}/foreign.ckpt --images {demo}",
         ["foreign.ckpt: not a checkpoint written by src.train"]),
        ("no checkpoint under reports", "--reports-dir {bad}/empty", ["no best checkpoint", "--checkpoint PATH"]),
        ("missing images dir", "--checkpoint {ckpt} --images {bad}/nope", ["--images", "not a directory"]),
        ("empty images dir", "--checkpoint {ckpt} --images {bad}/empty", ["--images", "no location folders"]),
        ("no cells in details", "--checkpoint {ckpt} --images {demo} --details {bad}/d.csv --details-top 0",
         ["--details-top 0"]),
        ("images without uuid folders", "--checkpoint {ckpt} --images {bad}/no_uuid_folders",
         ["no location folders"]),
        ("zero batch size", "--checkpoint {ckpt} --images {demo} --batch-size 0", ["--batch-size 0"]),
        ("non-numeric batch size", "--checkpoint {ckpt} --images {demo} --batch-size many", ["--batch-size"]),
        ("negative workers", "--checkpoint {ckpt} --images {demo} --num-workers -1", ["--num-workers -1"]),
        ("unknown device", "--checkpoint {ckpt} --images {demo} --device tpu9", ["--device tpu9"]),
        ("output inside a file", "--checkpoint {ckpt} --images {demo} --out {bad}/a_file/s.csv", ["a_file"]),
    ],
    "score": [
        ("missing submission", "{bad}/nope.csv {demo}/data.csv", ["nope.csv: submission file not found"]),
        ("directory as submission", "{bad}/empty {demo}/data.csv", ["empty: is a directory"]),
        ("binary submission", "{bad}/garbage.csv {demo}/data.csv", ["garbage.csv: not a readable CSV"]),
        ("empty submission", "{bad}/zero.csv {demo}/data.csv", ["zero.csv: not a readable CSV"]),
        ("bad header", "{bad}/semicolons.csv {demo}/data.csv", ["semicolons.csv: missing column(s)"]),
        ("wrong columns", "{bad}/columns.csv {demo}/data.csv", ["columns.csv: missing column(s) uuid"]),
        ("header only", "{bad}/header_only.csv {demo}/data.csv", ["header but no rows"]),
        ("ragged row", "{bad}/ragged.csv {demo}/data.csv", ["ragged.csv: line 2 has more fields"]),
        ("non-numeric row", "{bad}/bad_rows.csv {demo}/data.csv", ["line 3: latitude 'north' is not a number"]),
        ("repeated uuid", "{bad}/repeated.csv {demo}/data.csv", ["line 3: uuid a repeats an earlier row"]),
        ("not degrees", "{bad}/degrees_wrong.csv {demo}/data.csv", ["line 2: latitude", "outside"]),
        ("binary truth", "{demo}/data.csv {bad}/garbage.csv", ["garbage.csv: not a readable CSV"]),
        ("split without split column", "{demo}/data.csv {demo}/data.csv --split test", ["no split column"]),
        ("bad split", "{demo}/data.csv {demo}/data.csv --split tset", ["--split", "invalid choice"]),
        ("one file only", "{demo}/data.csv", ["required", "truth"]),
        ("errors-out inside a file", "{demo}/data.csv {demo}/data.csv --errors-out {bad}/a_file/e.csv", ["a_file"]),
    ],
    "analyze": [
        ("missing checkpoint", "--checkpoint {bad}/nope.ckpt", ["--checkpoint", "file not found"]),
        ("text file as checkpoint", "--checkpoint {bad}/text.ckpt", ["text.ckpt: not a readable checkpoint"]),
        ("truncated checkpoint", "--checkpoint {bad}/truncated.ckpt", ["truncated.ckpt: not a readable checkpoint"]),
        ("foreign checkpoint", "--checkpoint {bad}/foreign.ckpt", ["foreign.ckpt: not a checkpoint written by src.train"]),
        ("no checkpoint under reports", "--reports-dir {bad}/empty", ["no best checkpoint"]),
        ("missing dir", "--dataset-dirs {bad}/nope", ["no such dataset directory"]),
        ("empty dir", "--dataset-dirs {bad}/empty", ["data.csv: not found"]),
        ("no required column", "--dataset-dirs {bad}/columns", ["missing column(s) uuid"]),
        ("binary CSV", "--dataset-dirs {bad}/garbage", ["not a readable CSV"]),
        ("binary submission", "--dataset-dirs {demo} --spacings 0.5 --submission {bad}/garbage.csv",
         ["garbage.csv: not a readable CSV"]),
        ("submission bad header", "--dataset-dirs {demo} --spacings 0.5 --submission {bad}/semicolons.csv",
         ["missing column(s)"]),
        ("zero spacings", "--dataset-dirs {demo} --spacings 0", ["--spacings 0"]),
        ("tiny spacings", "--dataset-dirs {demo} --spacings 1e-6", ["--spacings 1e-06"]),
        ("zero worst", "--dataset-dirs {demo} --worst 0", ["--worst 0"]),
        ("bad eval split", "--dataset-dirs {demo} --eval-split dev", ["--eval-split", "invalid choice"]),
    ],
    "resize": [
        ("missing dir", "--dataset-dirs {bad}/nope --size 64 --out {bad}/r", ["nope", "no such dataset directory"]),
        ("dir without data.csv", "--dataset-dirs {bad}/empty --size 64 --out {bad}/r", ["data.csv: not found"]),
        ("no size", "--dataset-dirs {demo} --out {bad}/r", ["required", "--size"]),
        ("tiny size", "--dataset-dirs {demo} --size 4 --out {bad}/r", ["--size 4"]),
        ("zero workers", "--dataset-dirs {demo} --size 64 --out {bad}/r --workers 0", ["--workers 0"]),
        ("out inside a file", "--dataset-dirs {demo} --size 64 --out {bad}/a_file/r", ["a_file"]),
    ],
    "demo": [
        ("existing dataset", "--out {demo}", ["already holds a dataset"]),
        ("out is a file", "--out {bad}/a_file --locations 2", ["--out", "is a file"]),
        ("out inside a file", "--out {bad}/a_file/d --locations 2", ["a_file"]),
        ("zero locations", "--out {bad}/d0 --locations 0", ["--locations 0"]),
        ("non-numeric locations", "--out {bad}/d0 --locations lots", ["--locations", "invalid int value"]),
        ("tiny images", "--out {bad}/d0 --image-size 4", ["--image-size 4"]),
        ("negative seed", "--out {bad}/d0 --seed -4", ["--seed -4"]),
    ],
}


@pytest.mark.parametrize("command, case, args, fragments",
                         [(command, *case) for command, cases in CASES.items() for case in cases],
                         ids=[f"{command}-{case[0]}" for command, cases in CASES.items() for case in cases])
def test_user_mistakes_end_in_one_line_and_exit_2(bad, command, case, args, fragments):
    root, checkpoint, demo = bad
    argv = args.format(bad=root, ckpt=checkpoint, demo=demo).split()
    run = run_command(command, *argv, cwd=root)
    assert_user_error(run, *fragments)


@pytest.mark.parametrize("command, argv, fragment", [
    ("train", "--approach classification --dataset-dir {demo}", "argument --dataset-dir (did you mean --dataset-dirs?)"),
    ("analyze", "--dataset-dir {demo}", "unrecognized argument --dataset-dir (did you mean --dataset-dirs?)"),
    ("enrich", "--dataset-dir {demo}", "unrecognized argument --dataset-dir (did you mean --dataset-dirs?)"),
    ("resize", "--dataset-dir {demo} --size 64 --out x", "unrecognized argument --dataset-dir (did you mean"),
    ("predict", "--check {ckpt}", "unrecognized argument --check (did you mean --checkpoint?)"),
    ("score", "{demo}/data.csv --loc {demo}/data.csv", "unrecognized argument --loc")])
def test_abbreviated_flags_are_rejected(bad, command, argv, fragment):
    """`--dataset-dir` is not silently taken for `--dataset-dirs` (argparse's allow_abbrev is off); it is named,
    even where a required flag is missing too (enrich, resize)."""
    root, checkpoint, demo = bad
    run = run_command(command, *argv.format(demo=demo, ckpt=checkpoint).split(), cwd=root)
    assert_user_error(run, fragment)


@pytest.mark.parametrize("command, argv, expected", [
    ("train", "--aproach classification --dataset-dirs {demo}", "--aproach (did you mean --approach?)"),
    ("predict", "--chekpoint {ckpt} --images {demo}", "--chekpoint (did you mean --checkpoint?)"),
    ("export", "--checkpoint {ckpt} --out {root}/m.onnx --backbone", "--backbone (did you mean --backbone-only?)"),
    ("download", "--points {root}/p.csv --out {root}/o --retires 3", "--retires (did you mean --retries?)"),
    ("sample", "--n 5 --out {root}/p.csv --mindistance-m 10", "--mindistance-m (did you mean --min-distance-m?)"),
    ("score", "{demo}/data.csv --locatoins={demo}/data.csv", "--locatoins (did you mean --locations?)"),
    ("demo", "--out {root}/d --locatoins 3", "--locatoins (did you mean --locations?)"),
    ("serve", "--prot 8000", "--prot (did you mean --port?)")])
def test_an_unknown_flag_is_named_with_the_closest_known_flag(bad, command, argv, expected):
    """Also where argparse would first complain that a required flag (--approach, --checkpoint, --truth) is
    missing: the typo is why."""
    root, checkpoint, demo = bad
    run = run_command(command, *argv.format(root=root, demo=demo, ckpt=checkpoint).split(), cwd=root)
    line = assert_user_error(run, f"error: unrecognized argument {expected}; see python -m src.{command} --help")
    assert line.count("unrecognized") == 1


def test_unknown_flags_are_told_from_values_abbreviations_and_positionals():
    parser = argparse.ArgumentParser(prog="p")  # allow_abbrev on, as argparse's default
    parser.add_argument("--min-distance-m", type=float)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("name", nargs="*")
    args = ["--seed", "-3", "--min-dist", "5", "--speed=4", "x", "-q", "--", "--after-dashes"]
    assert unknown_flags(parser, args) == ["--speed", "-q"]
    assert unknown_flags_message(parser, ["--speed", "-q"]) == \
        "unrecognized arguments --speed (did you mean --seed?), -q"
    strict = argparse.ArgumentParser(prog="p", allow_abbrev=False)
    strict.add_argument("--min-distance-m")
    assert unknown_flags(strict, ["--min-dist", "5"]) == ["--min-dist"]


LIGHT_COMMANDS = ("train", "predict", "serve", "export", "enrich", "score", "analyze", "download", "sample", "demo",
                  "resize")
HEAVY_LIBRARIES = ("torch", "pytorch_lightning", "lightning", "geopandas")


@pytest.mark.parametrize("argv", [["--help"], ["--zzzz"]], ids=["help", "unknown flag"])
@pytest.mark.parametrize("command", LIGHT_COMMANDS)
def test_help_and_flag_errors_import_no_heavy_library(command, argv, tmp_path):
    """`python -X importtime -m src.<command> --help` (a real process): the interpreter lists every module it
    imports; torch, Lightning and geopandas are not among them (the library is imported after parsing)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", f"src.{command}", *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert f"src.{command}" in imported or "src" in imported, run.stderr[-2000:]
    assert not {name for name in imported if name.split(".")[0] in HEAVY_LIBRARIES}, \
        sorted(name for name in imported if name.split(".")[0] in HEAVY_LIBRARIES)[:10]
    if argv == ["--help"]:
        assert run.returncode == 0 and run.stdout.startswith(f"usage: python -m src.{command}")
    else:
        assert run.returncode == 2
        assert [line for line in run.stderr.splitlines() if not line.startswith("import time:")] == \
            [f"error: unrecognized argument --zzzz; see python -m src.{command} --help"]


def test_debug_keeps_the_traceback(bad):
    root, _, _ = bad
    run = run_command("enrich", "--dataset-dirs", root / "columns", "--debug", cwd=root)
    assert run.returncode == 1 and "Traceback" in run.stderr and "UserError: " in run.stderr


def test_every_command_has_cases():
    assert set(CASES) == set(COMMANDS)


# ---- the defect corpus through every command --------------------------------------------------------------

def skip_warnings(stderr: str) -> dict[str, int]:
    return {reason: int(count) for count, reason in re.findall(r"warning: skipped (\d+) location\(s\): (.+)", stderr)}


EXPECTED_SKIPS = ("invalid coordinates", "duplicate uuid", "missing folder", "bad view", "outside Croatia",
                  "missing uuid")


def test_train_on_the_corpus_lists_every_skip(corpus, corpus_train):
    _, expected = corpus
    _, checkpoint, run = corpus_train
    assert checkpoint.is_file()
    assert skip_warnings(run.stderr) == {reason: len(expected[reason]) for reason in EXPECTED_SKIPS}
    assert "warning: 1 image folder(s) have no row in data.csv (not used)" in run.stderr
    assert expected["orphan"][0] in run.stderr
    for uuid in expected["bad view"]:
        assert uuid in run.stderr
    # the odd-but-usable images trained (PNG, grayscale, CMYK, 50x30): they are in the run's locations
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    n_classes_train = sum(saved["hyper_parameters"]["classes"]["n_train"])
    test = {uuid for uuid, _ in saved["datamodule_hyper_parameters"]["test_locations"]}
    assert n_classes_train + len(test) < len(expected["clean"]) and test < set(expected["clean"])


def test_enrich_on_the_corpus_writes_every_skip_to_the_report(corpus, tmp_path):
    root, expected = corpus
    run = run_command("enrich", "--dataset-dirs", root, "--out", tmp_path / "e.csv", "--no-figures", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert skip_warnings(run.stderr) == {reason: len(expected[reason]) for reason in EXPECTED_SKIPS}
    report = pd.read_csv(tmp_path / "e_skipped.csv", keep_default_na=False)
    for reason in EXPECTED_SKIPS:
        assert sorted(report.loc[report["reason"] == reason, "uuid"]) == sorted(expected[reason])
    assert report.loc[report["reason"] == "folder without CSV row", "uuid"].tolist() == expected["orphan"]
    assert sorted(pd.read_csv(tmp_path / "e.csv")["uuid"]) == sorted(expected["clean"])


@pytest.fixture(scope="module")
def corpus_predictions(corpus, corpus_train):
    root, _ = corpus
    work, checkpoint, _ = corpus_train
    every = run_command("predict", "--checkpoint", checkpoint, "--images", root, "--num-workers", 0,
                        "--batch-size", 5, cwd=work)
    split = run_command("predict", "--checkpoint", checkpoint, "--out", work / "test_split.csv", "--num-workers", 0,
                        cwd=work)
    return every, split, work / "test_split.csv"


def test_predict_writes_a_row_for_every_uuid_folder_of_the_corpus(corpus, corpus_predictions):
    root, expected = corpus
    every, _, _ = corpus_predictions
    assert every.returncode == 0, every.stderr
    submission = pd.read_csv(io.StringIO(every.stdout))
    assert list(submission.columns) == ["uuid", "latitude", "longitude"]
    # folders whose rows were skipped (bad views, bad coordinates, no row at all) still get a prediction
    assert submission["uuid"].tolist() == expected["folders"]
    assert submission[["latitude", "longitude"]].notna().all().all()
    assert f"warning: replaced {len(expected['bad view'])} missing/unreadable view(s)" in every.stderr
    for uuid in expected["bad view"]:
        assert uuid in every.stderr
    assert "90.jpg: not a readable image (IsADirectoryError)" in every.stderr


def test_score_and_analyze_on_the_corpus_run(corpus, corpus_train, corpus_predictions):
    root, expected = corpus
    work, checkpoint, _ = corpus_train
    every, split, test_split = corpus_predictions
    assert split.returncode == 0, split.stderr
    # the run's test split against enrich's table of the same data, seed and spacing
    enriched = run_command("enrich", "--dataset-dirs", root, "--out", work / "enriched.csv", "--no-figures", cwd=work)
    assert enriched.returncode == 0, enriched.stderr
    score = run_command("score", test_split, work / "enriched.csv", "--split", "test", cwd=work)
    assert score.returncode == 0, score.stderr
    assert re.fullmatch(r"mean_km: \d+\.\d{4}", score.stdout.strip().splitlines()[-1])
    # every folder's prediction against the raw data.csv: its bad rows are skipped and listed
    (work / "every.csv").write_text(every.stdout)
    raw = run_command("score", work / "every.csv", root / "data.csv", "--allow-missing", cwd=work)
    assert raw.returncode == 0, raw.stderr
    assert "warning: " in raw.stderr and "truth row(s) that cannot be scored" in raw.stderr
    assert "latitude 'not-a-number' is not a number" in raw.stderr and "repeats an earlier row" in raw.stderr
    assert "partial score" in raw.stderr and raw.stdout.strip().splitlines()[-1].startswith("mean_km: ")
    analyze = run_command("analyze", "--checkpoint", checkpoint, "--submission", test_split, "--spacings", 0.5, 1,
                          "--worst", 2, "--figures-dir", work / "figures", "--tables-dir", work / "tables", cwd=work)
    assert analyze.returncode == 0, analyze.stderr
    # the run's saved locations are reused (its skips were listed by train): the dataset is not re-read
    assert f"--locations {checkpoint.parent.parent / 'locations.csv'}" in analyze.stderr
    assert skip_warnings(analyze.stderr) == {}
    errors = pd.read_csv(work / "tables" / "test_split_errors.csv")
    assert sorted(errors["uuid"]) == sorted(pd.read_csv(test_split)["uuid"])


# ---- --help -----------------------------------------------------------------------------------------------

def default_shown(action: argparse.Action) -> str | None:
    """The text of `(default: ...)` in an action's help, None when absent."""
    match = re.search(r"\(default: ([^)]*)\)", action.help or "")
    return match.group(1) if match else None


def matches_default(shown: str, default) -> bool:
    """Whether the help's default text states `default` (numbers by value, paths by their tail)."""
    if isinstance(default, bool):
        return shown.split()[0] in ("on", "True", "true")
    if isinstance(default, (list, tuple)):
        return [float(x) for x in shown.split()[:len(default)]] == [float(x) for x in default] if default else (
            shown.startswith("none"))
    if isinstance(default, (int, float)):
        token = shown.split()[0].rstrip(";,")
        try:
            return float(token) == float(default)
        except ValueError:  # a computed default explained in words, e.g. min(4, CPUs) - 1
            return bool(token)
    if isinstance(default, Path):
        return str(default).rstrip("/").endswith(shown.split()[0].rstrip("/;,"))
    return str(default) in shown  # e.g. "cuda when available, else cpu"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_flag_with_its_default(command, tmp_path):
    run = run_command(command, "--help", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: python -m src.{command}")
    compact = "".join(run.stdout.split())  # help text wraps at spaces and hyphens
    parser = importlib.import_module(f"src.{command}").build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            assert option in run.stdout, option
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            continue
        shown = default_shown(action)
        assert shown is not None, f"{action.option_strings}: default {action.default!r} not in its help"
        assert matches_default(shown, action.default), (action.option_strings, shown, action.default)
        assert "".join(f"(default: {shown})".split()) in compact


# ---- atomic outputs ---------------------------------------------------------------------------------------

def test_every_output_file_is_written_atomically(bad, tmp_path, monkeypatch):
    """Every file enrich, predict --out and --details, score --errors-out and analyze write arrives by a rename of a
    temporary file in the same folder (src.files.atomic_path), never by writing the final name."""
    _, checkpoint, demo = bad
    renamed = []
    real_replace = os.replace

    def recording_replace(src, dst, *args, **kwargs):
        renamed.append((Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", recording_replace)
    from src.analyze import main as analyze_main
    from src.enrich import main as enrich_main
    from src.predict import main as predict_main
    from src.score import main as score_main

    out = tmp_path / "out"
    with open(os.devnull, "w") as null, pytest.MonkeyPatch.context() as streams:
        streams.setattr(sys, "stdout", null)
        streams.setattr(sys, "stderr", null)
        enrich_main(["--dataset-dirs", str(demo), "--out", str(out / "enriched.csv"), "--figures-dir",
                     str(out / "figures")])
        predict_main(["--checkpoint", str(checkpoint), "--images", str(demo), "--out", str(out / "sub.csv"),
                      "--details", str(out / "details.csv"), "--num-workers", "0"])
        score_main([str(out / "sub.csv"), str(demo / "data.csv"), "--errors-out", str(out / "errors.csv")])
        locations = pd.read_csv(out / "enriched.csv")
        test = locations[locations["split"] == "test"][["uuid", "latitude", "longitude"]]
        test.to_csv(tmp_path / "oracle.csv", index=False)
        analyze_main(["--dataset-dirs", str(demo), "--submission", str(tmp_path / "oracle.csv"), "--spacings", "0.5",
                      "--worst", "2", "--figures-dir", str(out / "figures"), "--tables-dir", str(out / "tables")])
    written = sorted(p for p in out.rglob("*") if p.is_file())
    # enriched + skip report + 4 figures, submission, details, errors, analysis: 4 tables + 3 figures
    assert len(written) == 16
    destinations = {dst for _, dst in renamed}
    for path in written:
        assert path in destinations, f"{path} was not renamed into place"
    for src, dst in renamed:
        if dst in written:
            assert src.parent == dst.parent and src.name.startswith(".") and ".tmp" in src.name
            assert not src.exists()
    assert not [p for p in out.rglob(".*tmp*")]
