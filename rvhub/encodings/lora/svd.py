"""The math of the LoRA encoding: truncated SVD of a 2-D delta into ``B @ A``, and the rank
rules (``rank``, ``energy``, ``max_error``).

The singular values are split symmetrically (``A = √S·Vᵀ``, ``B = U·√S``) so both factors
have the same magnitude, which keeps them well inside the range of float16/bfloat16 when they
are stored in the sources' dtype (:func:`factorize` has an example).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...constants import SVD_METHODS
from ...errors import InputError
from ...options import check_rank_rules

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
    """Raise ``ValueError`` with a clear message when a rank option is out of range (the
    ranges are :func:`rvhub.options.check_rank_rules`')."""
    if rank is None and energy is None and max_error is None:
        raise ValueError("give at least one of rank, energy or max_error")
    try:
        check_rank_rules(rank=rank, energy=energy, max_error=max_error)
    except InputError as e:
        raise ValueError(str(e)) from None


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
    _check_svd_arguments(delta, method, oversample, niter)
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
    if method == "randomized":
        sketched = _sketched_factor(
            matrix, total, scale, cap, energy, max_error, oversample, niter, seed
        )
        if sketched is not None:
            return sketched
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    squares = s.to(torch.float64) ** 2
    kept, _ = _choose_rank(squares, None, cap=cap, energy=energy, max_error=max_error)
    return _build_factor(matrix, u, s, vh, kept, total, scale)


def _check_svd_arguments(delta: Tensor, method: str, oversample: int, niter: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if oversample < 0 or niter < 0:
        raise ValueError(f"oversample and niter must be ≥ 0, got {oversample} and {niter}")
    if delta.ndim != 2:
        raise ValueError(f"can only factorize a 2-D tensor, got shape {tuple(delta.shape)}")


def _sketched_factor(
    matrix: Tensor,
    total: float,
    scale: float,
    cap: int,
    energy: float | None,
    max_error: float | None,
    oversample: int,
    niter: int,
    seed: int,
) -> LoraFactor | None:
    """The randomized SVD's factor of the (scaled) ``matrix``, doubling the sketch until the
    bounds hold; None where the exact SVD must decide (the sketch grew too wide, or float32
    rounding near a tight bound)."""
    full_rank = min(matrix.shape)
    bounded = energy is not None or max_error is not None
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
            return None  # float32 rounding near a tight bound: let the exact SVD decide
        sketch_rank *= 2
    return None


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
