"""What rvhub knows about model families, kept as data: which tensors hold the vocabulary,
which are embeddings or output heads, which ties transformers applies, which 2-D weights
are plain ``nn.Linear`` / ``nn.Embedding`` layers that PEFT can hold as LoRA, and which block
a tensor belongs to.

Checks elsewhere read these tables; a new family is a new row here, not an ``if`` there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Module names (the last component before ``.weight``) of input embeddings, across families:
# Llama/Qwen/Gemma/Mistral (embed_tokens), GPT-2 (wte), BLOOM/Falcon (word_embeddings),
# GPT-NeoX (embed_in), InternLM (tok_embeddings).
EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
# Output heads whose first axis is the vocabulary: most (lm_head), GPT-NeoX (embed_out),
# Llama-1 style checkpoints (output).
OUTPUT_HEAD_MODULES = ("lm_head", "embed_out", "output")
# Full checkpoint names of the embedding and head that transformers ties (tie_word_embeddings).
TIED_EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "embed_tokens.weight",
    "transformer.wte.weight",
)
TIED_HEAD_NAMES = ("lm_head.weight",)
# 2-D weights that are not plain nn.Linear / nn.Embedding in the live model: norms, fused MoE
# experts and routers stay dense in a LoRA artifact.
NOT_LORA_PATTERNS = ("norm", r"\.experts\.", r"\.gate\.weight$", "router")
# The transformer block of a tensor: ``model.layers.12.…`` / ``transformer.h.3.…``.
BLOCK_PATTERN = r"(?:^|\.)layers?\.(\d+)\."


def _module_regex(modules: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(rf"(?:^|\.)({'|'.join(modules)})\.weight$")


_EMBEDDING = _module_regex(EMBEDDING_MODULES)
_VOCAB = _module_regex(EMBEDDING_MODULES + OUTPUT_HEAD_MODULES)
_NOT_LORA = re.compile("|".join(f"(?:{p})" for p in NOT_LORA_PATTERNS))
_BLOCK = re.compile(BLOCK_PATTERN)


def is_embedding(name: str) -> bool:
    """Whether the checkpoint tensor ``name`` is an input embedding (``[vocab, hidden]``)."""
    return _EMBEDDING.search(name) is not None


def has_vocab_axis(name: str) -> bool:
    """Whether the first axis of ``name`` is the vocabulary (embeddings and output heads)."""
    return _VOCAB.search(name) is not None


def lora_eligible(name: str, shape: tuple[int, ...]) -> bool:
    """Whether PEFT can hold this delta as LoRA (a Linear or Embedding weight)."""
    return len(shape) == 2 and name.endswith(".weight") and not _NOT_LORA.search(name)


def layer_of(name: str) -> str:
    """The transformer block a tensor belongs to (``"12"``), or ``"other"``."""
    m = _BLOCK.search(name)
    return m.group(1) if m else "other"


def tied_embeddings(config: Mapping[str, Any]) -> bool:
    """transformers' rule: ``tie_word_embeddings`` (top level or text sub-config), default True."""
    for key in ("text_config", "llm_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and "tie_word_embeddings" in sub:
            return bool(sub["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", True))


def model_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields a vector records to check fit later."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return {
        "model_type": config.get("model_type"),
        "architectures": list(config.get("architectures") or []),
        "tie_word_embeddings": tied_embeddings(config),
        "vocab_size": config.get("vocab_size", (text or {}).get("vocab_size")),
        "hidden_size": config.get("hidden_size", (text or {}).get("hidden_size")),
        "num_hidden_layers": config.get("num_hidden_layers", (text or {}).get("num_hidden_layers")),
    }


# -- checkpoint formats ----------------------------------------------------------------------
# quantization_config.quant_method values rvhub cannot take the difference of (the weights are
# packed integers or codebooks, not values): the format's name for the one-line refusal.
QUANTIZED_METHODS = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "bitsandbytes": "bitsandbytes",
    "compressed-tensors": "compressed-tensors",
    "compressed_tensors": "compressed-tensors",
    "hqq": "HQQ",
    "aqlm": "AQLM",
    "quanto": "Quanto",
    "eetq": "EETQ",
    "exl2": "EXL2",
    "marlin": "Marlin",
    "gptq_marlin": "GPTQ (Marlin)",
    "awq_marlin": "AWQ (Marlin)",
    "torchao": "torchao",
    "fbgemm_fp8": "FBGEMM FP8 (per-channel)",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
    "spqr": "SpQR",
    "bitnet": "BitNet",
    "mxfp4": "MXFP4",
}
# Tensor-name endings that only quantized checkpoints hold, by format (found even without a
# quantization_config).
QUANTIZED_TENSOR_SUFFIXES = {
    ".qweight": "GPTQ/AWQ",
    ".qzeros": "GPTQ/AWQ",
    ".g_idx": "GPTQ",
    ".weight_packed": "compressed-tensors",
    ".weight_zero_point": "compressed-tensors",
    ".SCB": "bitsandbytes int8",
    ".absmax": "bitsandbytes 4-bit",
    ".quant_map": "bitsandbytes 4-bit",
    ".nested_absmax": "bitsandbytes 4-bit",
    ".quant_state.bitsandbytes__nf4": "bitsandbytes 4-bit",
    ".quant_state.bitsandbytes__fp4": "bitsandbytes 4-bit",
    ".W_q": "HQQ",
}
# Weight dtypes that mean packed or quantized values in a `.weight` tensor.
QUANTIZED_WEIGHT_DTYPES = ("I8", "U8", "I16", "I32", "U32", "F8_E4M3", "F8_E5M2")
# Block-quantized FP8 (DeepSeek-V3/R1, Qwen3-*-FP8): e4m3 weights with a float32
# ``<name>_scale_inv`` per block.
FP8_SCALE_SUFFIX = "_scale_inv"


def quantization_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``quantization_config`` of a config (top level or text sub-config), if any."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, Mapping) and isinstance(cfg.get("quantization_config"), Mapping):
            return dict(cfg["quantization_config"])
    return None
