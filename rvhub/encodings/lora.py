"""LoRA encoding: truncated SVD of 2-D deltas, stored as a stock PEFT LoRA adapter.

A delta ``D`` of shape ``[out, in]`` becomes ``B @ A`` with ``A`` ``[r, in]`` and ``B``
``[out, r]``. The singular values are split symmetrically (``A = √S·Vᵀ``, ``B = U·√S``) so both
factors have the same magnitude, which keeps them well inside the range of float16/bfloat16
when they are stored in the sources' dtype.

The adapter is written in PEFT's own format (``adapter_config.json`` +
``adapter_model.safetensors``) with scale 1 under every engine's reading of it (``lora_alpha ==
r``, no ``alpha_pattern``, ``r_m / r`` folded into ``lora_B``; :mod:`rvhub.engines`), so
``merge_and_unload()`` adds exactly ``B @ A``. The adapter holds the modules stock PEFT wraps
(measured on a meta skeleton, :mod:`.peft_probe`) that the target engine (``--for``) takes;
biases, norms and every other tensor stay dense beside it (see ``docs/lora.md``).

Example:
    ```python
    >>> factor = factorize(delta, rank=64)
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
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..architecture import is_embedding, lora_eligible
from ..constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PICKLED_ADAPTER_WEIGHTS_NAME,
    SVD_METHODS,
)
from ..engines import ENGINES, Engine, engine_takes, get_engine, judge, server_rank
from ..errors import InputError, IntegrityError
from ..io.atomic import atomic_write
from ..io.device import resolve_device
from ..io.progress import bar
from ..io.safetensors import DTYPE_NAMES, FileHandles, dtype_name, read_range
from ..manifest import file_info, inside_folder, norm_summary
from ..sources import VectorSource
from .base import Encoded, WriteJob, WriteOptions, declared, stored_entries
from .dense import write_dense_files
from .peft_probe import WrappedModule, peft_wraps

PEFT_KEY_PREFIX = "base_model.model."

METHODS = SVD_METHODS
DEFAULT_OVERSAMPLE = 16
DEFAULT_NITER = 4
# Randomized SVD only pays off while its sketch is narrow; beyond this fraction of min(out, in)
# a full SVD is as fast and exact.
_RANDOMIZED_MAX_SKETCH_FRACTION = 0.25
# First sketch rank when only --energy/--max-error is given; doubled until the bound is met.
_FIRST_SKETCH_RANK = 64
# Slack for float32 rounding when checking a measured error against --max-error/--energy.
_BOUND_SLACK = 1e-5
# Rows per block when measuring the reconstruction error (bounds the temporary memory).
_ERROR_BLOCK_ELEMENTS = 1 << 24

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


@dataclass(frozen=True)
class LoraFactor:
    """A rank-``rank`` factorization ``delta ≈ B @ A`` of one 2-D delta.

    Attributes:
        A: ``[rank, in]`` float32 on the CPU (``√S·Vᵀ``).
        B: ``[out, rank]`` float32 on the CPU (``U·√S``).
        rank: number of kept singular values; 0 only for an all-zero delta.
        rel_error: measured ``‖delta − B @ A‖_F / ‖delta‖_F`` in float32 (0.0 for a zero delta).
        energy_kept: fraction of ``‖delta‖_F²`` held by the kept singular values (1.0 for zero).
    """

    A: Tensor
    B: Tensor
    rank: int
    rel_error: float
    energy_kept: float


def select_rank(
    singular_values: Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    total_energy: float | None = None,
) -> int:
    """Choose how many singular values to keep.

    ``energy`` asks for the smallest rank whose singular values hold at least that fraction of
    ``Σσ²``; ``max_error`` for the smallest rank with relative Frobenius error
    ``√(Σ_{i>r} σᵢ² / Σσ²) ≤ max_error``. Given both, both hold. ``rank`` caps the result
    (alone, it is the result). The result never exceeds ``len(singular_values)`` (which is at
    most ``min(out, in)``), is at least 1 for a nonzero spectrum and 0 for an all-zero one (an
    all-zero delta needs no factor; PEFT itself cannot hold a rank-0 module).

    Args:
        singular_values: the spectrum, largest first (any float dtype, any device).
        rank: maximum rank, ≥ 1.
        energy: fraction of ``Σσ²`` to keep, in ``(0, 1]``.
        max_error: bound on the relative Frobenius error, in ``[0, 1)``.
        total_energy: ``‖delta‖_F²`` when ``singular_values`` is only the top of the spectrum
            (a randomized SVD); the energy the given values miss counts as error. Default:
            ``Σσ²`` of the given values.

    Returns:
        The rank to keep. When the bounds cannot be met with the given values (a partial
        spectrum), all of them (capped by ``rank``).

    Raises:
        ValueError: an option is out of range, or none of ``rank``/``energy``/``max_error``.

    Example:
        ```python
        >>> select_rank(torch.tensor([3.0, 2.0, 1.0]), energy=0.9)
        2
        ```
    """
    check_rank_options(rank=rank, energy=energy, max_error=max_error)
    squares = singular_values.detach().to(device="cpu", dtype=torch.float64).flatten() ** 2
    chosen, _ = _choose_rank(squares, total_energy, cap=rank, energy=energy, max_error=max_error)
    return chosen


def check_rank_options(*, rank: int | None, energy: float | None, max_error: float | None) -> None:
    """Raise ``ValueError`` with a clear message when a rank option is out of range."""
    if rank is None and energy is None and max_error is None:
        raise ValueError("give at least one of rank, energy or max_error")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1] (the fraction of Σσ² kept), got {energy!r}")
    if max_error is not None and not (0.0 <= max_error < 1.0):
        raise ValueError(
            f"max_error must be in [0, 1) (a relative Frobenius error), got {max_error!r}"
        )


def factorize(
    delta: Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    method: str = "randomized",
    device: str | torch.device = "cpu",
    oversample: int = DEFAULT_OVERSAMPLE,
    niter: int = DEFAULT_NITER,
    seed: int = 0,
) -> LoraFactor:
    """Factorize a 2-D delta into ``B @ A`` by truncated SVD in float32.

    ``method="randomized"`` (default) sketches the top of the spectrum (Halko et al. 2011:
    ``rank + oversample`` random probes, ``niter`` power iterations with QR re-orthonormalization,
    a fixed ``seed`` so artifacts are reproducible and the global RNG is untouched). It falls back
    to an exact SVD where that is as cheap (sketch wider than a quarter of ``min(out, in)``).
    With only ``energy``/``max_error`` the needed rank is unknown: the sketch starts at rank 64
    and doubles until the bound holds, using the exact ``‖delta‖_F²`` as total energy, so the
    missed energy counts as error and the bound holds for the factor returned, not an estimate;
    past a quarter of ``min(out, in)`` it switches to the exact SVD. ``method="exact"`` always
    uses ``torch.linalg.svd``.

    Args:
        delta: ``[out, in]`` tensor, any float dtype and device; must be finite.
        rank, energy, max_error: see :func:`select_rank`.
        method: ``"randomized"`` or ``"exact"``.
        device: where the SVD runs (``"cuda"`` is much faster for big models); factors come
            back on the CPU.
        oversample: extra random probes beyond the rank (randomized only).
        niter: power iterations (randomized only); 4 kept the error within 0.2% of exact on
            fine-tune-like spectra (2: within 0.6%, about 30% faster).
        seed: seed of the random probes.

    Returns:
        A :class:`LoraFactor` with the measured relative error.

    Raises:
        ValueError: bad options, a tensor that is not 2-D, or non-finite values.

    Example:
        ```python
        >>> f = factorize(torch.randn(512, 256), rank=16)
        >>> f.A.shape, f.B.shape
        (torch.Size([16, 256]), torch.Size([512, 16]))
        ```
    """
    check_rank_options(rank=rank, energy=energy, max_error=max_error)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if oversample < 0 or niter < 0:
        raise ValueError(f"oversample and niter must be ≥ 0, got {oversample} and {niter}")
    if delta.ndim != 2:
        raise ValueError(f"can only factorize a 2-D tensor, got shape {tuple(delta.shape)}")
    matrix = delta.detach().to(device=device, dtype=torch.float32)
    out_features, in_features = matrix.shape
    full_rank = min(out_features, in_features)
    # Work on delta / max|delta| so squared entries neither underflow nor overflow in float32.
    scale = float(torch.linalg.vector_norm(matrix, ord=math.inf).item()) if matrix.numel() else 0.0
    if not math.isfinite(scale):
        raise ValueError("cannot factorize a delta with non-finite values (inf or nan)")
    if scale == 0.0:
        return LoraFactor(
            A=torch.zeros(0, in_features),
            B=torch.zeros(out_features, 0),
            rank=0,
            rel_error=0.0,
            energy_kept=1.0,
        )
    # In place when .to() made a copy (the caller's tensor is never modified).
    matrix = matrix / scale if matrix.data_ptr() == delta.data_ptr() else matrix.div_(scale)
    total = float(torch.linalg.vector_norm(matrix).item()) ** 2
    cap = full_rank if rank is None else min(rank, full_rank)
    bounded = energy is not None or max_error is not None

    if method == "randomized":
        generator = torch.Generator(device=matrix.device).manual_seed(seed)
        sketch_rank = min(cap, _FIRST_SKETCH_RANK) if bounded else cap
        while sketch_rank + oversample <= _RANDOMIZED_MAX_SKETCH_FRACTION * full_rank:
            u, s, vh = _randomized_svd(matrix, sketch_rank + oversample, niter, generator)
            squares = s.to(torch.float64) ** 2
            kept, met = _choose_rank(squares, total, cap=cap, energy=energy, max_error=max_error)
            if met:
                factor = _build_factor(matrix, u, s, vh, kept, total, scale)
                # At the cap the bound is allowed to fail; below it, it must hold as measured.
                if kept == cap or _bounds_hold(factor, energy=energy, max_error=max_error):
                    return factor
                break  # float32 rounding near a tight bound: let the exact SVD decide
            sketch_rank *= 2

    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    squares = s.to(torch.float64) ** 2
    kept, _ = _choose_rank(squares, None, cap=cap, energy=energy, max_error=max_error)
    return _build_factor(matrix, u, s, vh, kept, total, scale)


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
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}

    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": common_rank,
        "lora_alpha": common_rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": bool(conv1d_modules),
        "modules_to_save": None,
        "init_lora_weights": True,
        "ensure_weight_tying": False,
        "inference_mode": True,
    }
    config.update(extra_config or {})

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    atomic_write(target / ADAPTER_WEIGHTS_NAME, lambda p: _save_safetensors(tensors, p))
    atomic_write(target / ADAPTER_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]


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


def _choose_rank(
    squares: Tensor,
    total_energy: float | None,
    *,
    cap: int | None,
    energy: float | None,
    max_error: float | None,
) -> tuple[int, bool]:
    """Return (rank, met): met is False when the bounds need more values than were given."""
    available = squares.numel()
    limit = available if cap is None else min(cap, available)
    spectrum_energy = float(squares.sum().item())
    total = spectrum_energy if total_energy is None else float(total_energy)
    if total <= 0.0 or spectrum_energy <= 0.0:
        return 0, True
    if energy is None and max_error is None:
        return limit, True
    allowed = min(
        1.0 - energy if energy is not None else 1.0,
        max_error**2 if max_error is not None else 1.0,
    )
    # tails[r] = energy missed when keeping r values: the given values after r (summed from the
    # small end, exact for small tails) plus what the given values do not hold at all.
    reverse_cumsum = torch.flip(torch.cumsum(torch.flip(squares, [0]), 0), [0])
    tails = torch.cat([reverse_cumsum[1:], reverse_cumsum.new_zeros(1)])
    tails = tails + max(total - spectrum_energy, 0.0)
    ok = torch.nonzero(tails <= allowed * total)
    if ok.numel() == 0:
        return limit, cap is not None and available >= cap
    return min(int(ok[0].item()) + 1, limit), True


def _randomized_svd(
    matrix: Tensor, sketch: int, niter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``sketch`` SVD by random range finding with power iterations (Halko et al.)."""
    tall = matrix.shape[0] >= matrix.shape[1]
    m = matrix if tall else matrix.T
    probes = torch.randn(m.shape[1], sketch, generator=generator, device=m.device, dtype=m.dtype)
    q = torch.linalg.qr(m @ probes).Q
    for _ in range(niter):
        q = torch.linalg.qr(m.T @ q).Q
        q = torch.linalg.qr(m @ q).Q
    u_small, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    u = q @ u_small
    if tall:
        return u, s, vh
    return vh.T, s, u.T


def _build_factor(
    matrix: Tensor, u: Tensor, s: Tensor, vh: Tensor, rank: int, total: float, scale: float
) -> LoraFactor:
    """Split the kept singular values symmetrically and measure the error on ``matrix``."""
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    error_sq = 0.0
    rows = max(1, _ERROR_BLOCK_ELEMENTS // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        residual = torch.addmm(matrix[start : start + rows], b[start : start + rows], a, alpha=-1)
        error_sq += float(torch.linalg.vector_norm(residual).item()) ** 2
    kept = float((s[:rank].to(torch.float64) ** 2).sum().item())
    unscale = math.sqrt(scale)
    return LoraFactor(
        A=(a * unscale).to("cpu").contiguous(),
        B=(b * unscale).to("cpu").contiguous(),
        rank=rank,
        rel_error=math.sqrt(error_sq / total),
        energy_kept=min(1.0, kept / total),
    )


def _bounds_hold(factor: LoraFactor, *, energy: float | None, max_error: float | None) -> bool:
    if max_error is not None and factor.rel_error > max_error + _BOUND_SLACK:
        return False
    return energy is None or 1.0 - factor.rel_error**2 >= energy - _BOUND_SLACK


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


# -- the encoding: the adapter, plus dense deltas PEFT cannot hold -------------------------------


class LoraSource(VectorSource):
    """LoRA factors from the PEFT adapter (``delta = B @ A``) plus the dense remainder."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        shapes, dtypes = declared(manifest)
        super().__init__(shapes, dtypes)
        try:
            self.factors = read_peft_adapter(folder)
        except ValueError as e:
            raise IntegrityError(f"{folder}: the PEFT adapter is unreadable: {e}") from None
        self.entries = stored_entries(folder, manifest)
        self._handles = FileHandles()
        for name, info in manifest["tensors"].items():
            stored = info.get("stored")
            if stored == "lora" and info.get("rank", 1) > 0:
                if name not in self.factors:
                    raise IntegrityError(
                        f"{folder}: {name} is declared LoRA but the adapter lacks it"
                    )
                a, b = self.factors[name]
                if (b.shape[0], a.shape[1]) != shapes[name]:
                    raise IntegrityError(
                        f"{folder}: the adapter's factors for {name} do not match its shape"
                    )
            elif stored == "dense":
                entry = self.entries.get(name)
                if entry is None or entry.shape != shapes[name]:
                    raise IntegrityError(f"{folder}: dense tensor {name} is missing or misshapen")
        unknown = set(self.factors) - set(shapes)
        if unknown:
            raise IntegrityError(
                f"{folder}: the adapter holds undeclared modules, e.g. {sorted(unknown)[0]}"
            )

    def delta_on(self, name: str, device: torch.device | str) -> Tensor:
        """``B @ A`` computed on ``device`` (one module at a time), or the dense delta."""
        if name in self.factors:
            a, b = self.factors[name]
            return b.to(device) @ a.to(device)
        if name in self.entries:
            t = read_range(self.entries[name], 0, self.entries[name].numel, self._handles)
            return t.reshape(self.shapes[name]).to(device)
        return torch.zeros(self.shapes[name], device=device)  # rank 0

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> Tensor:
        t = self.delta_on(name, "cpu")
        return t if dtype is None else t.to(dtype)

    def chunk(self, name: str, start: int, stop: int) -> Tensor:
        if name in self.factors:
            a, b = self.factors[name]
            cols = a.shape[1]
            r0, r1 = start // cols, -(-stop // cols)
            rows = (b[r0:r1] @ a).reshape(-1)
            return rows[start - r0 * cols : stop - r0 * cols]
        if name in self.entries:
            return read_range(self.entries[name], start, stop, self._handles).float()
        return torch.zeros(stop - start)


def check_lora_options(options: WriteOptions) -> None:
    """The CLI's spelling of :func:`check_rank_options`, plus the SVD method and engine."""
    if options.svd not in SVD_METHODS:
        raise InputError(f"--svd must be one of {', '.join(SVD_METHODS)}, not {options.svd!r}")
    try:
        engine = get_engine(options.engine)
    except ValueError as e:
        raise InputError(str(e)) from None
    if options.rank is None and options.energy is None and options.max_error is None:
        raise InputError("--encoding lora needs --rank, --energy or --max-error (e.g. --rank 64)")
    try:
        check_rank_options(rank=options.rank, energy=options.energy, max_error=options.max_error)
    except ValueError as e:
        msg = str(e).replace("rank must", "--rank must").replace("energy must", "--energy must")
        raise InputError(msg.replace("max_error must", "--max-error must")) from None
    _check_engine_rank(engine, options.rank)


def _check_engine_rank(engine: Engine, rank: int | None) -> None:
    if rank is not None and engine.max_ranks is not None and server_rank(engine, rank) is None:
        raise InputError(
            f"--for {engine.name}: rank {rank} is above {engine.version}'s largest "
            f"{engine.rank_flag} {engine.max_ranks[-1]}; use --rank {engine.max_ranks[-1]} or less"
        )


def engine_reports(
    adapter_config: Mapping[str, Any],
    ranks: Mapping[str, int],
    norms_sq: Mapping[str, float],
    *,
    architecture: str | None,
    tied: bool,
    peft_applies: set[str] | None,
) -> dict[str, dict[str, Any]]:
    """Per engine: whether it loads the adapter, the share of the whole vector's ‖v‖² it
    applies from the adapter alone, what it does not apply, and how to start its server."""
    total = sum(norms_sq.values())
    out: dict[str, dict[str, Any]] = {}
    for engine in ENGINES.values():
        verdict = judge(
            engine,
            adapter_config,
            ranks,
            architecture=architecture,
            tied=tied,
            peft_applies=peft_applies,
        )
        applied = sum(norms_sq.get(n, 0.0) for n in verdict.applied)
        out[engine.name] = {
            "version": engine.version,
            "loads": verdict.loads,
            "lora_tensors": len(verdict.applied),
            "share": applied / total if total > 0 else 1.0,
            "not_applied_tensors": len(norms_sq) - len(verdict.applied),
            "problems": verdict.problems,
            "server": verdict.hint,
        }
    return out


class LoraEncoding:
    name = "lora"

    def check(self, options: WriteOptions) -> None:
        check_lora_options(options)

    def write(self, job: WriteJob) -> Encoded:
        source, names, folder, options = job.source, job.names, job.folder, job.options
        engine = get_engine(options.engine)
        dev = resolve_device(options.device)
        model = job.meta.get("model") or {}
        architecture = (model.get("architectures") or [None])[0]
        model_config = job.meta.get("model_config")
        if engine.architectures is not None and architecture not in engine.architectures:
            raise InputError(
                f"--for {engine.name}: {engine.version} serves LoRA for "
                f"{', '.join(sorted(engine.architectures))}, not "
                f"{architecture or 'this vector (it records no architecture)'}"
            )
        candidates = [n for n in names if lora_eligible(n, source.shapes[n])]
        tied = bool(model.get("tie_word_embeddings"))
        if engine.name != "peft":
            candidates = [n for n in candidates if engine_takes(engine, n, architecture, tied=tied)]
        wrapped = _peft_structure(model_config, candidates, source.shapes)
        if wrapped is not None:
            candidates = [n for n in candidates if n in wrapped]
        conv1d = {n for n in candidates if wrapped and wrapped[n].kind == "Conv1D"}
        if conv1d:  # PEFT's fan_in_fan_out is one flag: Linear modules then stay dense
            candidates = [n for n in candidates if n in conv1d or is_embedding(n)]
        if not candidates:
            raise InputError(
                f"no tensor of this vector is a Linear/Embedding weight "
                f"{'PEFT' if engine.name == 'peft' else engine.version} can hold as LoRA"
            )
        storage = options.dtype
        norms: dict[str, float] = {}
        modules: dict[str, dict[str, Any]] = {}
        factors: dict[str, LoraFactor] = {}
        svd_seconds = 0.0
        progress = bar(len(candidates), "factorising", unit="tensor")
        try:
            for name in candidates:
                delta = source.get(name)
                if not bool(torch.isfinite(delta).all()):
                    raise InputError(
                        f"the delta of {name} holds NaN/Inf values; LoRA cannot encode them"
                    )
                started = time.perf_counter()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                factor = factorize(
                    delta,
                    rank=options.rank,
                    energy=options.energy,
                    max_error=options.max_error,
                    method=options.svd,
                    device=dev,
                )
                svd_seconds += time.perf_counter() - started
                norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
                norms[name] = norm
                modules[name] = {
                    "rank": factor.rank,
                    "rel_error": factor.rel_error,
                    "energy_kept": factor.energy_kept,
                }
                if factor.rank > 0:
                    factors[name] = factor
                del delta
                progress.update(1)
        finally:
            progress.close()
        if not factors:
            raise InputError("every LoRA-eligible delta is zero: nothing to encode as LoRA")
        max_rank = max(f.rank for f in factors.values())
        _check_engine_rank(engine, max_rank)
        uniform = not engine.per_module_rank
        if uniform:
            for name, factor in factors.items():
                factors[name] = pad_factor(factor, max_rank)
                modules[name]["rank"] = max_rank
        a_src = (job.meta.get("sources") or {}).get("a") or {}
        base_model = options.base_model or (
            a_src.get("repo_id") if a_src.get("kind") == "hub" else None
        )
        embeddings = {n for n in factors if is_embedding(n)}
        peft_measured: set[str] | None = None
        while True:  # measure what PEFT wraps with the final config; move misfits to dense
            layout = adapter_layout(factors, uniform_rank=uniform)
            probe_config = _adapter_config(layout, conv1d=bool(conv1d & set(factors)))
            final = peft_wraps(model_config, probe_config)
            if final is None:
                break
            misfits = [
                n
                for n, f in factors.items()
                if n not in final
                or final[n].rank != f.rank
                or (final[n].fan_in_fan_out != (n in conv1d) and final[n].kind != "Embedding")
            ]
            peft_measured = set(final) & set(factors)
            if not misfits:
                break
            for n in misfits:
                del factors[n]
                modules.pop(n)
                candidates.remove(n)
            if not factors:
                raise InputError("stock PEFT wraps none of this vector's modules as LoRA")
        try:
            adapter_files = write_peft_adapter(
                folder,
                factors,
                embedding_names=embeddings & set(factors),
                transposed_names=conv1d & set(factors),
                base_model_name_or_path=base_model,
                dtype=storage or source.dtypes[candidates[0]],
                uniform_rank=uniform,
            )
        except ValueError as e:
            raise InputError(f"cannot write the PEFT adapter: {e}") from None
        files = file_info(folder, adapter_files)
        lora_names = [n for n in candidates if n in modules]
        dense_names = [n for n in names if n not in set(lora_names)]
        tensors: dict[str, Any] = {}
        dense_bytes = 0
        lora_bytes_dense = sum(
            math.prod(source.shapes[n]) * (storage or source.dtypes[n]).itemsize for n in lora_names
        )
        if dense_names:
            w = write_dense_files(source, dense_names, folder, options, desc="writing dense part")
            files.update(w.files)
            for n, info in w.tensor_table().items():
                tensors[n] = {**info, "stored": "dense"}
                norms[n] = info["norm"]
                dense_bytes += math.prod(w.shapes[n]) * w.dtypes[n].itemsize
        for n in lora_names:
            tensors[n] = {
                "shape": list(source.shapes[n]),
                "dtype": DTYPE_NAMES[storage or source.dtypes[n]],
                "norm": norms[n],
                "stored": "lora",
                **modules[n],
            }
        tensors = {n: tensors[n] for n in names}
        norms_sq = {n: v * v for n, v in norms.items()}
        total_sq = sum(norms_sq.values())
        err_sq = sum((modules[n]["rel_error"] * norms[n]) ** 2 for n in lora_names)
        config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
        engines = engine_reports(
            config,
            {n: modules[n]["rank"] for n in factors},
            norms_sq,
            architecture=architecture,
            tied=tied,
            peft_applies=peft_measured,
        )
        excluded = len(set(source.shapes) - set(names)) + len(job.meta.get("excluded") or [])
        for report in engines.values():
            report["excluded_tensors"] = excluded
        peft_share = engines["peft"]["share"]
        artifact_bytes = sum(f["size"] for f in files.values())
        ranks = sorted(m["rank"] for m in modules.values())
        compression = {
            "encoding": "lora",
            "svd": options.svd,
            "device": str(dev),
            "svd_seconds": round(svd_seconds, 3),
            "rank_rule": {
                "rank": options.rank,
                "energy": options.energy,
                "max_error": options.max_error,
            },
            "ranks": {"min": ranks[0], "median": ranks[len(ranks) // 2], "max": ranks[-1]},
            "lora_tensors": len(factors),
            "dense_tensors": len(dense_names),
            "overall_rel_error": math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0,
            "bytes": artifact_bytes,
            "dense_bytes": lora_bytes_dense + dense_bytes,
            "ratio": artifact_bytes / max(1, lora_bytes_dense + dense_bytes),
            "peft_norm_share": peft_share,
            "rvhub_norm_share": 1.0 - peft_share,
            "profile": engine.name,
            "base_model": base_model,
            "peft_modules": "measured" if peft_measured is not None else "name rules",
            "engines": engines,
        }
        return Encoded(
            files=files,
            tensors=tensors,
            stats=norm_summary(norms_sq),
            dtypes=[dtype_name(storage or source.dtypes[n]) for n in names],
            compression=compression,
        )

    def open(self, folder: Path, manifest: dict[str, Any]) -> LoraSource:
        return LoraSource(folder, manifest)


def _adapter_config(
    layout: tuple[int, dict[str, int], list[str]], *, conv1d: bool
) -> dict[str, Any]:
    r, pattern, targets = layout
    return {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "target_modules": targets,
        "fan_in_fan_out": conv1d,
        "init_lora_weights": True,
    }


def _peft_structure(
    model_config: Mapping[str, Any] | None,
    names: list[str],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, WrappedModule] | None:
    """The modules among ``names`` that PEFT wraps with a layer of the checkpoint's shape."""
    if not names:
        return {}
    targets = sorted(n.removesuffix(".weight") for n in names)
    found = peft_wraps(model_config, _adapter_config((1, {}, targets), conv1d=False))
    if found is None:
        return None
    return {n: w for n, w in found.items() if n in set(names) and w.weight_shape == shapes[n]}
