"""The element-wise kernels of extract and apply, against float64 references."""

from __future__ import annotations

import pytest
import torch

from rvhub.io.kernels import APPLY_BLOCK, Moments, Scratch, axpy_into, diff_into

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def reference_axpy(t: torch.Tensor, v: torch.Tensor, alpha: float) -> torch.Tensor:
    """round(t + alpha·v) with alpha as a float32 and a single float32 rounding."""
    a32 = float(torch.tensor(alpha, dtype=torch.float32))
    n = v.numel()
    exact = t.double().clone()
    exact[:n] += a32 * v.double()
    return exact.float().to(t.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.5, 1.5, -0.25, 1.37, -0.3])
def test_axpy_rounds_once_for_every_alpha(dtype, alpha):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(300_001, generator=g).to(dtype)
    v = (0.3 * torch.randn(300_001, generator=g)).to(dtype)
    out = torch.empty_like(t)
    axpy_into(t, v, alpha, out, Scratch(count=2, block=APPLY_BLOCK))
    assert torch.equal(out, reference_axpy(t, v, alpha))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_axpy_single_op_path_equals_the_blocked_float32_path(dtype, alpha):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(200_001, generator=g).to(dtype)
    v = (torch.randn(150_001, generator=g) * torch.logspace(-6, 1, 150_001)).to(dtype)
    fast = torch.empty_like(t)
    axpy_into(t, v, alpha, fast, Scratch(count=2, block=APPLY_BLOCK))
    blocked = torch.empty_like(t)
    # a float32 vector takes the blocked path (mixed dtypes) and computes the same sum
    axpy_into(t, v.float(), alpha, blocked, Scratch(count=2, block=4096))
    assert torch.equal(fast, blocked)
    assert torch.equal(fast, reference_axpy(t, v, alpha))
    assert torch.equal(fast[150_001:], t[150_001:])  # rows only in the target: unchanged


def test_diff_into_moments_match_float64():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(700_000, generator=g).bfloat16()
    b = (a.float() + 0.01 * torch.randn(700_000, generator=g)).bfloat16()
    out = torch.empty_like(a)
    m = Moments()
    diff_into(a, b, out, m, Scratch(block=65_536))
    d = a.double() - b.double()
    assert torch.equal(out, d.float().bfloat16())
    assert m.sumsq == pytest.approx(float((d * d).sum()), rel=1e-5)
    err = b.double() + out.double() - a.double()
    assert m.err_sumsq == pytest.approx(float((err * err).sum()), rel=1e-4)
    assert m.nonfinite == 0
