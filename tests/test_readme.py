"""The README's Quickstart, run verbatim in a fresh copy of the project; Set-up and Tests match .ci/run.

The Quickstart's commands need nothing from the other tests: when its test is selected they start in the
background as the session starts (conftest.quickstart) and the test waits for them, so their minute of CPU
overlaps the rest of the suite instead of adding to it."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from src.core import geo

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_setup_and_tests_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    for title in ("Set-up", "Tests"):
        for line in "".join(bash_blocks(section(title))).splitlines():
            for command in line.replace("python3 -m venv .venv", "python3 -m venv .ci-venv").replace(
                    ". .venv/bin/activate", ". .ci-venv/bin/activate").replace("pip install", "python -m pip install").split(" && "):
                assert command.split(" --quiet")[0] in ci or command.replace("python -m pip install",
                                                                            "python -m pip install --quiet") in ci, command


def quickstart_lines() -> list[str]:
    """The Quickstart's command lines, in order (not tensorboard, which serves until stopped)."""
    return [line for block in bash_blocks(section("Quickstart")) for line in block.splitlines()
            if line.strip() and not line.startswith("tensorboard")]


def start_quickstart(folder: Path) -> subprocess.Popen:
    """The Quickstart's lines as one bash script run in folder/project, a fresh copy of the project (src/ and the
    border, nothing else; a bare environment), started in the background; its output goes to folder/stdout and
    folder/stderr."""
    project = folder / "project"
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "data").mkdir()
    shutil.copy(ROOT / "data" / "croatia.geojson", project / "data" / "croatia.geojson")
    script = "set -euo pipefail\n" + "\n".join(quickstart_lines()) + "\n"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(project)}
    with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
        return subprocess.Popen(["bash", "-c", script], cwd=project, stdout=stdout, stderr=stderr, env=env,
                                start_new_session=True)  # its own process group: stopped as one


def test_quickstart_verbatim(quickstart):
    folder, process = quickstart  # started as the session started (conftest.quickstart_early)
    lines = quickstart_lines()
    assert lines[0].startswith("python -m src.train") and any(line.startswith("python -m src.score") for line in lines)
    process.wait(timeout=600)
    run = subprocess.CompletedProcess(process.args, process.returncode, (folder / "stdout").read_text(),
                                      (folder / "stderr").read_text())
    tmp_path = folder / "project"
    assert run.returncode == 0, run.stderr[-3000:]
    # Lightning's noise is filtered: no availability lines, no advert, no word about the default val interval
    assert not re.search(r"GPU available|Tip:|val_check_interval|litlogger", run.stderr), run.stderr[-3000:]
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert list(submission.columns) == ["uuid", "latitude", "longitude"]
    enriched = pd.read_csv(tmp_path / "reports" / "enriched_demo_grid0.5.csv")
    test = enriched[enriched["split"] == "test"]
    assert sorted(submission["uuid"]) == sorted(test["uuid"]) and submission["uuid"].is_unique
    last = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"mean_km: \d+\.\d+", last), last
    train = enriched[enriched["split"] == "train"]
    baseline = geo.haversine_km(train["latitude"].mean(), train["longitude"].mean(), test["latitude"],
                                test["longitude"]).mean()
    assert float(last.split()[1]) < baseline
