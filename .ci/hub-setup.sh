#!/usr/bin/env bash
# Install what the local-Hub tests (tests/hub_server, tests/test_hub_server.py) need, idempotently,
# on a fresh Debian/Ubuntu machine that can reach the package registries:
#   - git and git-lfs (apt): git stores the repos olah serves; git-lfs only checks their LFS layout
#   - olah (pip, into the active Python environment): the Hub mirror that serves downloads
# Usage: activate the project's environment, then `.ci/hub-setup.sh`. Called by .ci/run.
set -euo pipefail

missing=()
command -v git >/dev/null 2>&1 || missing+=(git)
command -v git-lfs >/dev/null 2>&1 || missing+=(git-lfs)
if ((${#missing[@]})); then
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python}
if ! "$python" -c "import olah" >/dev/null 2>&1; then
    "$python" -m pip install --quiet "olah>=0.5,<0.6"
fi

olah_cli="$(dirname "$("$python" -c 'import sys; print(sys.executable)')")/olah-cli"
[[ -x "$olah_cli" ]] || olah_cli="$(command -v olah-cli)"
echo "hub-setup: $(git --version), $(git lfs version | cut -d' ' -f1), olah-cli at $olah_cli"
