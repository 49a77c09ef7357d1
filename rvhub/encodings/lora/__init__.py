"""LoRA encoding: truncated SVD of 2-D deltas, stored as a stock PEFT LoRA adapter.

A delta ``D`` of shape ``[out, in]`` becomes ``B @ A`` with ``A`` ``[r, in]`` and ``B``
``[out, r]``. Three modules, one concern each: :mod:`.svd` (the factorisation and the rank
rules), :mod:`.peft_format` (PEFT's adapter files, one config builder) and :mod:`.encoding`
(which modules go into the adapter for the chosen engine, the dense rest, the reader).
"""

from __future__ import annotations

from ...constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from .encoding import LoraEncoding, LoraSource, engine_reports
from .peft_format import (
    PEFT_KEY_PREFIX,
    _pattern_key,
    adapter_config,
    adapter_layout,
    pad_factor,
    read_peft_adapter,
    write_peft_adapter,
)
from .svd import (
    DEFAULT_NITER,
    DEFAULT_OVERSAMPLE,
    METHODS,
    LoraFactor,
    check_rank_options,
    factorize,
    select_rank,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_NITER",
    "DEFAULT_OVERSAMPLE",
    "METHODS",
    "PEFT_KEY_PREFIX",
    "LoraEncoding",
    "LoraFactor",
    "LoraSource",
    "_pattern_key",
    "adapter_config",
    "adapter_layout",
    "check_rank_options",
    "engine_reports",
    "factorize",
    "pad_factor",
    "read_peft_adapter",
    "select_rank",
    "write_peft_adapter",
]
