"""File names, environment variables, defaults and sizes: the values every layer shares.

This module imports nothing of rvhub, so any module may use it.
"""

from __future__ import annotations

# -- the artifact -------------------------------------------------------------------------------
MANIFEST_NAME = "rvhub.json"
FORMAT = "rvhub.reasoning-vector"
FORMAT_VERSION = 2  # 2: BLAKE3 file digests (1: sha256, still read)
VECTOR_STEM = "vector"
VECTOR_FILE = "vector.safetensors"
VECTOR_INDEX = "vector.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_ADAPTER_WEIGHTS_NAME = "adapter_model.bin"
LINEAGE_FILE = "lineage.safetensors"
CARD_NAME = "README.md"
PLOT_NAME = "layer_norms.png"
EVAL_RESULTS_DIR = ".eval_results"  # the Hub's eval results (huggingface_hub EVAL_RESULTS_FOLDER)
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

# -- model checkpoints --------------------------------------------------------------------------
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
APPLIED_RECORD = "rvhub_applied.json"  # what `rvhub apply` writes beside the weights

# -- environment variables ----------------------------------------------------------------------
ENV_CACHE = "RVHUB_CACHE"  # where the integrity cache lives (default ~/.cache/rvhub)
ENV_DEBUG = "RVHUB_DEBUG"  # the CLI prints tracebacks
ENV_DISABLE_PROGRESS = "RVHUB_DISABLE_PROGRESS_BARS"  # HF_HUB_DISABLE_PROGRESS_BARS works too
ENV_GPU_PIN_CACHE_GB = "RVHUB_GPU_PIN_CACHE_GB"  # pinned vector files kept for later applies
ENV_BUFFERED_WRITES = "RVHUB_BUFFERED_WRITES"  # 1: write outputs through the page cache

# -- defaults and sizes -------------------------------------------------------------------------
DEFAULT_MAX_SHARD = "5GB"  # decimal: transformers 5.25's convert_file_size_to_int gives 5e9
# Elements per read/compute/write unit (2 MB of bf16) and how many finished slabs may wait for
# the writer thread (docs/design.md says why these values).
SLAB_ELEMS = 1024 * 1024
QUEUE_SLABS = 8
CHUNK_ELEMS = 8 * 1024 * 1024  # elements per chunk asked of a source that is not streamed
GPU_PIN_CACHE_GB = 16.0
SPARSE_WORTH_IT = 0.9  # refuse a sparse artifact that would not save at least 10%
VOCAB_MODES = ("strict", "overlap")
# The lineage fingerprint: per tensor, RUNS contiguous runs of RUN_LENGTH values of each source
# at name-seeded positions; a target whose matrices lie further than LINEAGE_REFUSE (relative,
# overall) from the vector's B is refused, beyond LINEAGE_WARN it is warned about
# (docs/reliability.md has the calibration).
LINEAGE_RUNS = 4
LINEAGE_RUN_LENGTH = 16
LINEAGE_WARN = 0.5
LINEAGE_REFUSE = 0.9
# The "already carries" guard (docs/reliability.md): warn when the target holds at least this
# share of v, and at least this share of its difference from the vector's B lies along v.
CARRIED_WARN = 0.5
CARRIED_FIT = 0.5
SVD_METHODS = ("randomized", "exact")

# -- the import layers (tests/test_layering.py holds the package to them) -----------------------
# A module may import from its own layer (without a cycle) or a lower one, never a higher one.
LAYERS: dict[str, int] = {
    "_version": 0,
    "constants": 0,
    "errors": 0,
    "io": 1,
    "architecture": 1,
    "engines": 1,
    "lineage": 1,
    "checkpoint": 1,
    "manifest": 1,
    "options": 1,
    "sources": 2,
    "encodings": 2,
    "ops": 3,
    "hub": 4,
    "card": 4,
    "evaluation": 4,
    "vector": 5,
    "check": 5,
    "search": 5,
    "cli": 6,
    "__init__": 6,
}
