"""What stock PEFT does with an adapter, measured rather than assumed.

The target architecture is built from its ``config.json`` on the meta device (no weights, no
memory), PEFT injects the adapter's own config into it, and each LoRA layer PEFT created is
read back: its module name, kind (``Linear``, ``Embedding``, GPT-2's ``Conv1D``), rank and
``fan_in_fan_out``. The LoRA writer keeps in the adapter only the modules PEFT wraps with the
rank the factors have; everything else stays dense beside it.

Only architectures transformers knows natively are built (never ``trust_remote_code``); for any
other the probe returns ``None`` and the writer falls back on the name rules of
:mod:`rvhub.architecture`, saying so in the manifest.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..io.progress import logger

PROBE_ADAPTER = "rvhub_probe"


@dataclass(frozen=True)
class WrappedModule:
    """One module PEFT wrapped: ``kind`` is Linear, Embedding or Conv1D."""

    kind: str
    rank: int
    fan_in_fan_out: bool
    weight_shape: tuple[int, ...]


def _skeleton(model_config: Mapping[str, Any]) -> torch.nn.Module | None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(model_config)
    model_type = config.pop("model_type", None)
    if not isinstance(model_type, str):
        return None
    try:
        cfg = AutoConfig.for_model(model_type, **config)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception as e:  # an architecture transformers cannot build here
        logger.debug("meta skeleton of %s failed: %s", model_type, e)
        return None


def peft_wraps(
    model_config: Mapping[str, Any] | None, adapter_config: Mapping[str, Any]
) -> dict[str, WrappedModule] | None:
    """Checkpoint weight name → what PEFT wraps there, for ``adapter_config`` on the model of
    ``model_config``; ``None`` when the architecture cannot be built here."""
    if not model_config:
        return None
    model = _skeleton(model_config)
    if model is None:
        return None
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    fields = set(LoraConfig.__dataclass_fields__)
    config = {k: v for k, v in adapter_config.items() if k in fields}
    config.pop("base_model_name_or_path", None)
    config.pop("revision", None)
    try:
        lora_config = LoraConfig(**config)
        # PEFT prints warnings (fan_in_fan_out on Linear, tied weights) that belong to the probe.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            peft_logger = logging.getLogger("peft")
            level = peft_logger.level
            peft_logger.setLevel(logging.ERROR)
            try:
                inject_adapter_in_model(
                    lora_config, model, adapter_name=PROBE_ADAPTER, low_cpu_mem_usage=True
                )
            finally:
                peft_logger.setLevel(level)
    except (ValueError, TypeError, RuntimeError) as e:
        logger.debug("PEFT refused the probe adapter: %s", e)
        return {}
    found: dict[str, WrappedModule] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or PROBE_ADAPTER not in module.r:
            continue
        base = module.get_base_layer()
        kind = type(base).__name__
        weight = getattr(base, "weight", None)
        if kind not in ("Linear", "Embedding", "Conv1D") or not isinstance(weight, torch.Tensor):
            continue
        found[name + ".weight"] = WrappedModule(
            kind=kind,
            rank=int(module.r[PROBE_ADAPTER]),
            fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
            weight_shape=tuple(weight.shape),
        )
    return found
