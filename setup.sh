#!/usr/bin/env bash
# Set-up: everything the project and its tests need, on a Debian/Ubuntu machine (a CPU is enough).
#
#     ./setup.sh [VENV]          (default VENV: .venv; then: . .venv/bin/activate && python -m pytest -q)
#
# 1. Debian packages, with apt-get (through sudo unless root), only when missing: chromium and chromium-driver
#    (the page test drives a real headless browser), python3-venv (when `python3 -m venv` cannot work).
# 2. A virtual environment VENV with requirements.txt (made once, updated on a rerun).
# PYTHON picks the interpreter (default: python3; the project uses Python 3.11).
# The environment is about 6 GB, 4.1 GB of it the CUDA libraries and triton that the PyPI build of torch
# requires even on a machine without a GPU; expect a few minutes on a fast connection.
set -euo pipefail
cd "$(dirname "$0")"
venv="${1:-.venv}"
python="${PYTHON:-python3}"
start=$SECONDS

packages=()
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    packages+=(chromium chromium-driver)
fi
if [ ! -x "$venv/bin/python" ] && ! "$python" -c "import ensurepip, venv" 2>/dev/null; then
    packages+=(python3-venv)
fi
if [ ${#packages[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null; then
        echo "error: ${packages[*]} missing and no apt-get here: install them with your package manager" \
             "(the browser test fails without chromium and chromedriver), then rerun ./setup.sh" >&2
        exit 1
    fi
    sudo_=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "error: installing ${packages[*]} needs root or sudo" >&2; exit 1; }
        sudo_="sudo"
    fi
    echo "installing Debian packages: ${packages[*]}"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${packages[@]}"
fi
for tool in chromium chromedriver; do
    command -v "$tool" >/dev/null || { echo "error: $tool still missing after apt-get; the page test needs it" >&2; exit 1; }
done

if [ ! -x "$venv/bin/python" ]; then
    echo "creating the virtual environment $venv ($("$python" --version 2>&1))"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
echo "installing requirements.txt into $venv"
"$venv/bin/python" -m pip install --quiet -r requirements.txt

echo "set-up done in $((SECONDS - start)) s: $venv holds $(du -sh "$venv" | cut -f1);" \
     "$(command -v chromium) and $(command -v chromedriver) drive the page test"
echo "next: . $venv/bin/activate && python -m pytest -q"
