"""PEFT's LoRA adapter format: the one ``adapter_config.json`` builder, and the writer and
reader of ``adapter_model.safetensors``.

The adapter has scale 1 under every engine's reading of it (``lora_alpha == r``, no
``alpha_pattern``, ``r_m / r`` folded into ``lora_B``; :mod:`rvhub.engines`), so
``merge_and_unload()`` adds exactly ``B @ A``.

Example:
    ```python
    >>> write_peft_adapter(folder, {"model.layers.0.mlp.up_proj.weight": factor},
    ...                    embedding_names=set(), base_model_name_or_path=None,
    ...                    dtype=torch.bfloat16)
    ['adapter_config.json', 'adapter_model.safetensors']
    ```
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ...constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PICKLED_ADAPTER_WEIGHTS_NAME
from ...io.atomic import atomic_write
from ...manifest import inside_folder
from .svd import LoraFactor

PEFT_KEY_PREFIX = "base_model.model."


_LINEAR_A, _LINEAR_B = ".lora_A.weight", ".lora_B.weight"


_EMBEDDING_A, _EMBEDDING_B = ".lora_embedding_A", ".lora_embedding_B"


# Keys of adapter_config.json that define what the adapter means; extra_config may not change them.
_STRUCTURAL_CONFIG_KEYS = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "use_rslora",
        "use_dora",
        "lora_bias",
        "bias",
        "fan_in_fan_out",
        "modules_to_save",
        "ensure_weight_tying",
        "init_lora_weights",
    }
)


def adapter_layout(
    factors: Mapping[str, LoraFactor], *, uniform_rank: bool = False
) -> tuple[int, dict[str, int], list[str]]:
    """``(r, rank_pattern, target_modules)`` of the adapter holding ``factors``' nonzero modules.

    ``r`` is the most common rank (the larger on a tie), or the largest with ``uniform_rank``
    (every module is then padded to it); modules of another rank get ``rank_pattern`` entries.
    """
    modules = {n.removesuffix(".weight"): f.rank for n, f in factors.items() if f.rank > 0}
    if not modules:
        raise ValueError("no factor to write: every delta is zero (PEFT needs rank ≥ 1)")
    counts = Counter(modules.values())
    if uniform_rank:
        return max(counts), {}, sorted(modules)
    common = max(counts, key=lambda r: (counts[r], r))
    targets = sorted(modules)
    pattern = {_pattern_key(m, targets): r for m, r in sorted(modules.items()) if r != common}
    return common, pattern, targets


def pad_factor(factor: LoraFactor, rank: int) -> LoraFactor:
    """``factor`` with zero rows of ``A`` and zero columns of ``B`` up to ``rank`` (same ``B @ A``)."""
    extra = rank - factor.rank
    if extra <= 0:
        return factor
    a = torch.cat([factor.A, factor.A.new_zeros(extra, factor.A.shape[1])])
    b = torch.cat([factor.B, factor.B.new_zeros(factor.B.shape[0], extra)], dim=1)
    return LoraFactor(a, b, rank, factor.rel_error, factor.energy_kept)


def write_peft_adapter(
    folder: str | os.PathLike[str],
    factors: Mapping[str, LoraFactor],
    *,
    embedding_names: set[str],
    base_model_name_or_path: str | None,
    dtype: torch.dtype,
    extra_config: Mapping[str, Any] | None = None,
    transposed_names: set[str] | None = None,
    uniform_rank: bool = False,
) -> list[str]:
    """Write factors as a PEFT LoRA adapter that stock ``PeftModel.from_pretrained`` loads.

    Keys of ``factors`` are checkpoint tensor names ending in ``.weight``; the module name is the
    name without it. Names in ``embedding_names`` are ``nn.Embedding`` weights
    (``[num_embeddings, embedding_dim]``) and are written as PEFT's ``lora_embedding_A``
    ``[r, num_embeddings]`` / ``lora_embedding_B`` ``[embedding_dim, r]``; names in
    ``transposed_names`` are GPT-2 ``Conv1D`` weights (``[in, out]``), written for
    ``fan_in_fan_out: true``; the others as ``nn.Linear`` ``lora_A.weight`` ``[r, in]`` /
    ``lora_B.weight`` ``[out, r]``. Rank-0 factors (all-zero deltas) are left out.

    The scale is 1 under every reading of it (see :mod:`rvhub.engines`): ``lora_alpha == r``, no
    ``alpha_pattern``, and a module of rank ``r_m ≠ r`` (a ``rank_pattern`` entry) has
    ``r_m / r`` folded into its ``lora_B``, which PEFT, vLLM and llama.cpp then scale by
    ``lora_alpha / r_m``. With ``uniform_rank`` every module is zero-padded to the largest rank
    and there is no ``rank_pattern`` at all (for engines that read one rank, e.g. SGLang).
    ``target_modules`` is the sorted list of exact module names.

    Args:
        folder: the artifact folder (created if missing); both files are written atomically.
        factors: checkpoint weight name → factor.
        embedding_names: which of those names are embedding weights.
        base_model_name_or_path: the model the adapter is for (a Hub id or path), or ``None``.
        dtype: storage dtype of the factors (e.g. the sources' bfloat16).
        extra_config: more ``adapter_config.json`` keys (e.g. ``revision``, ``task_type``); keys
            that change the adapter's meaning (``r``, ``target_modules``, ...) are refused.
        transposed_names: which names are ``Conv1D`` weights (then ``fan_in_fan_out: true``;
            the adapter may then hold no ``nn.Linear`` module).
        uniform_rank: pad every module to one rank.

    Returns:
        The file names written, relative to ``folder``.

    Raises:
        ValueError: a name without ``.weight``, inconsistent factor shapes, nothing to write, or
            a structural key in ``extra_config``.
    """
    modules: dict[str, LoraFactor] = {}
    for name, factor in sorted(factors.items()):
        _check_factor(name, factor)
        if factor.rank > 0:
            modules[name.removesuffix(".weight")] = factor
    refused = sorted(_STRUCTURAL_CONFIG_KEYS.intersection(extra_config or {}))
    if refused:
        raise ValueError(f"extra_config may not set {', '.join(refused)}")
    common_rank, rank_pattern, targets = adapter_layout(factors, uniform_rank=uniform_rank)
    embedding_modules = {name.removesuffix(".weight") for name in embedding_names}
    conv1d_modules = {name.removesuffix(".weight") for name in transposed_names or ()}
    if conv1d_modules and set(modules) - conv1d_modules - embedding_modules:
        raise ValueError("a fan_in_fan_out (Conv1D) adapter cannot also hold nn.Linear modules")

    tensors = _adapter_tensors(
        modules, common_rank, embedding_modules, conv1d_modules, uniform_rank
    )
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}

    config = adapter_config(
        (common_rank, rank_pattern, targets),
        conv1d=bool(conv1d_modules),
        base_model_name_or_path=base_model_name_or_path,
    )
    config.update(extra_config or {})

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    atomic_write(target / ADAPTER_WEIGHTS_NAME, lambda p: _save_safetensors(tensors, p))
    atomic_write(target / ADAPTER_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]


def _adapter_tensors(
    modules: Mapping[str, LoraFactor],
    common_rank: int,
    embedding_modules: set[str],
    conv1d_modules: set[str],
    uniform_rank: bool,
) -> dict[str, Tensor]:
    """The adapter's tensors by PEFT key, ``r_m / r`` folded into each module's ``lora_B``."""
    tensors: dict[str, Tensor] = {}
    for module, factor in modules.items():
        if uniform_rank:
            factor = pad_factor(factor, common_rank)
        key = PEFT_KEY_PREFIX + module
        b = factor.B * (factor.rank / common_rank) if factor.rank != common_rank else factor.B
        if module in embedding_modules:
            # PEFT's Embedding merges (lora_embedding_B @ lora_embedding_A).T.
            tensors[key + _EMBEDDING_A] = b.T
            tensors[key + _EMBEDDING_B] = factor.A.T
        elif module in conv1d_modules:
            # fan_in_fan_out: PEFT merges (lora_B @ lora_A).T into the [in, out] weight.
            tensors[key + _LINEAR_A] = b.T
            tensors[key + _LINEAR_B] = factor.A.T
        else:
            tensors[key + _LINEAR_A] = factor.A
            tensors[key + _LINEAR_B] = b
    return tensors


def read_peft_adapter(folder: str | os.PathLike[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Read a PEFT LoRA adapter back as checkpoint weight name → ``(A, B)``, ``delta = B @ A``.

    PEFT's scale (``lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``, per module
    through ``rank_pattern``/``alpha_pattern``, matched the way PEFT matches them) is folded into
    ``B``; embedding factors are transposed back so ``B @ A`` has the embedding's
    ``[num_embeddings, embedding_dim]`` shape, and ``fan_in_fan_out`` (GPT-2 ``Conv1D``)
    adapters come back in the checkpoint's ``[in, out]`` layout. Works for adapters written by
    :func:`write_peft_adapter` and by PEFT itself.

    Only ``adapter_model.safetensors`` is read, never a pickled ``adapter_model.bin``, and only
    plain LoRA: DoRA, ``lora_bias``, ``modules_to_save``, trainable tokens, parameter targets and
    layer replication are refused, as is any tensor key that is not a LoRA factor.

    Returns:
        Float32 CPU tensors ``A`` ``[r, in]`` and ``B`` ``[out, r]`` per weight name.

    Raises:
        ValueError: a missing or unsafe file, an unsupported LoRA variant, or inconsistent shapes.
    """
    root = Path(folder)
    config_path = root / ADAPTER_CONFIG_NAME
    weights_path = root / ADAPTER_WEIGHTS_NAME
    if not config_path.is_file():
        raise ValueError(f"no {ADAPTER_CONFIG_NAME} in {root}")
    if not weights_path.is_file():
        if (root / PICKLED_ADAPTER_WEIGHTS_NAME).exists():
            raise ValueError(
                f"refusing {PICKLED_ADAPTER_WEIGHTS_NAME} in {root}: pickled weights can run code;"
                f" convert the adapter to {ADAPTER_WEIGHTS_NAME}"
            )
        raise ValueError(f"no {ADAPTER_WEIGHTS_NAME} in {root}")
    for path in (config_path, weights_path):  # a Hub cache snapshot links into its blobs/
        if not inside_folder(root.resolve(), path.resolve()):
            raise ValueError(f"{path.name} in {root} points outside the folder")

    config = json.loads(config_path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    _check_supported_config(config)
    default_rank = int(config["r"])
    default_alpha = float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    pairs: dict[str, dict[str, Tensor]] = {}
    with safe_open(weights_path, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            module, part = _split_adapter_key(key)
            pairs.setdefault(module, {})[part] = handle.get_tensor(key).to(torch.float32)

    result: dict[str, tuple[Tensor, Tensor]] = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) == {_LINEAR_A, _LINEAR_B}:
            a, b = parts[_LINEAR_A], parts[_LINEAR_B]
            embedding = False
        elif set(parts) == {_EMBEDDING_A, _EMBEDDING_B}:
            a, b = parts[_EMBEDDING_A], parts[_EMBEDDING_B]
            embedding = True
        else:
            raise ValueError(f"module {module} has an incomplete LoRA pair: {sorted(parts)}")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"module {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not form B @ A"
            )
        module_rank = int(_pattern_value(rank_pattern, module, default_rank))
        if module_rank != a.shape[0]:
            raise ValueError(
                f"module {module}: rank {a.shape[0]} in the weights, {module_rank} in the config"
            )
        alpha = float(_pattern_value(alpha_pattern, module, default_alpha))
        scale = alpha / math.sqrt(module_rank) if use_rslora else alpha / module_rank
        b = b * scale
        if embedding or fan_in_fan_out:
            # PEFT merges (B @ A).T = Aᵀ @ Bᵀ for these layers.
            a, b = b.T.contiguous(), a.T.contiguous()
        result[module + ".weight"] = (a, b)
    return result


def _check_factor(name: str, factor: LoraFactor) -> None:
    if not name.endswith(".weight"):
        raise ValueError(f"{name}: LoRA factors are for module weights (names ending '.weight')")
    a, b = factor.A, factor.B
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != factor.rank or b.shape[1] != factor.rank:
        raise ValueError(
            f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not match rank {factor.rank}"
        )


def _peft_pattern_matches(pattern: str, module: str) -> bool:
    """PEFT's rule for rank_pattern/alpha_pattern keys (peft.utils.other.get_pattern_key)."""
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


def _pattern_key(module: str, targets: list[str]) -> str:
    """The module name itself when, read as PEFT's pattern, it matches no other target.

    Module names are identifiers joined by dots, so the only regex character in them is ``.``;
    a name can still match a longer one as a suffix (``lm_head`` vs ``mtp.lm_head``). Then an
    anchored, escaped key that matches only this module is used.
    """
    if not any(other != module and _peft_pattern_matches(module, other) for other in targets):
        return module
    return "^" + re.escape(module)


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in pattern.items():
        if _peft_pattern_matches(key, module):
            return value
    return default


def _check_supported_config(config: Mapping[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type is {config.get('peft_type')!r}")
    if "r" not in config:
        raise ValueError("adapter_config.json has no 'r'")
    unsupported = [
        key
        for key in (
            "use_dora",
            "lora_bias",
            "modules_to_save",
            "trainable_token_indices",
            "target_parameters",
            "layer_replication",
            "use_qalora",
        )
        if config.get(key)
    ]
    if unsupported:
        raise ValueError(f"unsupported LoRA variant: {', '.join(unsupported)} set in the config")


def _split_adapter_key(key: str) -> tuple[str, str]:
    name = key.removeprefix(PEFT_KEY_PREFIX)
    if ".base_layer." in name:
        raise ValueError(
            f"{ADAPTER_WEIGHTS_NAME} holds full base weights ({key}), not only LoRA factors;"
            " save the adapter with save_embedding_layers=False"
        )
    for suffix in (_LINEAR_A, _LINEAR_B, _EMBEDDING_A, _EMBEDDING_B):
        if name.endswith(suffix):
            return name.removesuffix(suffix), suffix
    raise ValueError(f"unexpected tensor {key!r} in {ADAPTER_WEIGHTS_NAME}: not a LoRA factor")


def _save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def adapter_config(
    layout: tuple[int, dict[str, int], list[str]],
    *,
    conv1d: bool,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The one ``adapter_config.json`` rvhub writes for a layout ``(r, rank_pattern,
    target_modules)`` (:func:`adapter_layout`): plain LoRA, scale 1 (``lora_alpha == r``), no
    dropout, bias or DoRA; ``fan_in_fan_out`` for GPT-2 ``Conv1D`` modules."""
    r, pattern, targets = layout
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": {},
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": conv1d,
        "modules_to_save": None,
        "init_lora_weights": True,
        "ensure_weight_tying": False,
        "inference_mode": True,
    }
