#!/usr/bin/env bash
# mergekit, the reference tests/test_merge.py checks `rvhub merge` against, from PyPI in its own
# environment (.cache/mergekit-venv): its pins are not the project's. The CPU torch wheel goes
# first so mergekit's torch requirement does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
MERGEKIT=0.1.5
venv=.cache/mergekit-venv
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mergekit') != '$MERGEKIT')" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0
    "$venv/bin/pip" install -q "mergekit==$MERGEKIT"
fi
echo "mergekit-setup: mergekit $MERGEKIT in $venv"
