#!/usr/bin/env bash
# The serving engines the LoRA tests run for real (tests/test_engines.py), from PyPI:
# llama-cpp-python builds llama.cpp (about 7 minutes on 2 cores the first time; pip caches the
# wheel), and its sdist carries llama.cpp's own converters (convert_hf_to_gguf.py,
# convert_lora_to_gguf.py, gguf-py), unpacked under .cache/engines/.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_PYTHON=0.3.36
dest=.cache/engines
mkdir -p "$dest"
if [ ! -f "$dest/llama-cpp-python-$LLAMA_CPP_PYTHON/vendor/llama.cpp/convert_lora_to_gguf.py" ]; then
    pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$dest"
    rm -rf "$dest/llama-cpp-python-$LLAMA_CPP_PYTHON"
    mkdir -p "$dest/llama-cpp-python-$LLAMA_CPP_PYTHON"
    tar xzf "$dest/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" --strip-components=1 \
        -C "$dest/llama-cpp-python-$LLAMA_CPP_PYTHON"
fi
if ! python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON')" 2>/dev/null; then
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF}" \
        pip install -q "llama-cpp-python==$LLAMA_CPP_PYTHON"
fi
# the converters read a SentencePiece tokenizer.model; the tests train a tiny one
pip install -q "sentencepiece>=0.2,<0.3"
echo "engines-setup: llama-cpp-python $LLAMA_CPP_PYTHON, converters in $dest/llama-cpp-python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
