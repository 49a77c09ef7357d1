"""Loading an evaluation target with transformers, as ``rvhub apply`` opens it first."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpoint import check_config
from ..errors import CompatibilityError, InputError
from ..hub.resolve import open_checkpoint
from ..io.device import resolve_device
from ..options import one_of

LOAD_DTYPES = ("auto", "bfloat16", "float16", "float32")


def load_eval_target(
    target: str | os.PathLike[str],
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    config_check: bool = True,
) -> tuple[torch.nn.Module, Any, str]:
    """Load a model folder or Hub id with transformers for :meth:`ReasoningVector.evaluate`:
    the model (on ``device``, eval mode), its tokenizer, and the name to record.

    The checkpoint is opened as ``rvhub apply`` opens it first (safetensors only, quantized
    formats refused, the same weights transformers loads); no remote code runs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    one_of("dtype", dtype, LOAD_DTYPES)
    dev = resolve_device(device)
    ckpt = open_checkpoint(target, revision=revision)
    if config_check:
        check_config(ckpt)
    if ckpt.fp8_scales:
        raise CompatibilityError(
            f"{target} is block-quantized FP8: transformers dequantizes it on load, so a sweep "
            "would evaluate bfloat16 weights, not the requantized FP8 model `rvhub apply` writes; "
            "evaluate the model's bfloat16 release, or apply with `dtype='bfloat16'` and "
            "evaluate that output with lm_eval"
        )
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(
            f"{target}: no tokenizer transformers can load ({_first_line(e)})"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=False,
            use_safetensors=True,
        )
    except (OSError, ValueError, KeyError) as e:
        raise InputError(
            f"{target}: transformers cannot load it as a causal LM ({_first_line(e)})"
        ) from None
    model = model.to(dev) if dev.type != "cpu" else model  # type: ignore[arg-type]
    model.eval()
    name = str(ckpt.source.get("repo_id") or target) if ckpt.source else str(target)
    return model, tokenizer, name


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
