#!/usr/bin/env bash
# Create .venv (once) and install palm into it with the given extras, e.g. `scripts/setup.sh test`.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -qq)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" install "torch>=2.5"          # CUDA build
    else
        "${pip[@]}" install "torch==2.13.0"       # CPU build; a bare `torch` would pull CUDA
    fi
fi

stamp=".venv/.palm-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
    "${pip[@]}" install -e ".${extras:+[$extras]}"
    cp pyproject.toml "$stamp"
fi
