"""Merging vectors: task arithmetic (``linear``), TIES, DARE, DELLA and breadcrumbs, over the
deltas themselves, one tensor at a time.

The methods, their parameters and their defaults are mergekit's (read from mergekit 0.1.5:
``merge_methods/generalized_task_arithmetic.py``, ``merge_methods/registry.py``,
``sparsify.py``): each input's delta is sparsified (``density``, ``gamma``, ``epsilon``;
``rescale`` restores its L1 norm), weighted (``weight``), then either summed (linear) or
merged by sign election (TIES: the sign of the weighted sum per entry; entries of the other
sign are dropped), and divided by the sum of the kept weights when ``normalize``. mergekit
merges models sharing one base (``delta = model − base``); rvhub merges deltas directly, so the
inputs may be vectors made from different pairs, as long as they share a lineage.

Random methods (DARE, DELLA) draw each input's mask from a generator seeded by ``seed``, the
tensor's name and the input's index: the same bytes on any number of threads.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import CompatibilityError, InputError
from ..lineage import Lineage
from ..sources import VectorSource

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Method:
    """One merge method: how deltas are sparsified, whether signs are elected, its defaults."""

    sparsify: str | None  # magnitude | random | magnitude_outliers | della_magprune
    consensus: bool  # TIES sign election ("sum")
    normalize: bool
    rescale: bool
    reference: str


METHODS: dict[str, Method] = {
    "linear": Method(None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    "ties": Method("magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": Method("random", True, False, True, "https://arxiv.org/abs/2311.03099"),
    "dare_linear": Method("random", False, False, True, "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": Method(
        "magnitude_outliers", False, False, False, "https://arxiv.org/abs/2312.06795"
    ),
    "breadcrumbs_ties": Method(
        "magnitude_outliers", True, False, False, "https://arxiv.org/abs/2312.06795"
    ),
    "della": Method("della_magprune", True, True, True, "https://arxiv.org/abs/2406.11617"),
    "della_linear": Method(
        "della_magprune", False, False, True, "https://arxiv.org/abs/2406.11617"
    ),
}
# mergekit's names for what rvhub calls them
MERGEKIT_NAMES = {"linear": "task_arithmetic"}


@dataclass(frozen=True)
class MergeOptions:
    """A merge's parameters, per input where mergekit has them per model; checked here."""

    method: str
    weights: tuple[float, ...]
    density: tuple[float, ...]
    gamma: tuple[float, ...]
    epsilon: tuple[float, ...]
    normalize: bool
    rescale: bool
    lambda_: float = 1.0
    seed: int = 0

    @classmethod
    def build(
        cls,
        method: str,
        count: int,
        *,
        weights: Sequence[float] | float | None = None,
        density: Sequence[float] | float | None = None,
        gamma: Sequence[float] | float | None = None,
        epsilon: Sequence[float] | float | None = None,
        normalize: bool | None = None,
        rescale: bool | None = None,
        lambda_: float = 1.0,
        seed: int = 0,
    ) -> MergeOptions:
        spec = METHODS.get(method)
        if spec is None:
            raise InputError(f"`method` {method!r}: one of {', '.join(METHODS)}")
        if count < 1:
            raise InputError("merge needs at least one vector")
        options = cls(
            method=method,
            weights=_per_input("weights", weights, count, 1.0),
            density=_per_input("density", density, count, 1.0),
            gamma=_per_input("gamma", gamma, count, 0.01),
            epsilon=_per_input("epsilon", epsilon, count, 0.15),
            normalize=spec.normalize if normalize is None else bool(normalize),
            rescale=spec.rescale if rescale is None else bool(rescale),
            lambda_=float(lambda_),
            seed=int(seed),
        )
        options.check()
        return options

    def check(self) -> None:
        spec = METHODS[self.method]
        for name, values in (("density", self.density), ("gamma", self.gamma)):
            if any(not 0.0 <= v <= 1.0 for v in values):
                raise InputError(f"`{name}` must lie in [0, 1], got {list(values)}")
        if spec.sparsify == "della_magprune":
            for d, e in zip(self.density, self.epsilon, strict=True):
                if d < 1 and (d + e >= 1 or d - e <= 0):
                    raise InputError(
                        f"`epsilon` {e:g} with `density` {d:g}: density ± epsilon must lie in (0, 1)"
                    )
        if not all(math.isfinite(w) for w in self.weights):
            raise InputError(f"`weights` must be finite numbers, got {list(self.weights)}")

    def as_json(self) -> dict[str, Any]:
        spec = METHODS[self.method]
        out: dict[str, Any] = {
            "method": self.method,
            "mergekit_method": MERGEKIT_NAMES.get(self.method, self.method),
            "weights": list(self.weights),
            "normalize": self.normalize,
            "lambda": self.lambda_,
        }
        if spec.sparsify:
            out.update(density=list(self.density), rescale=self.rescale)
        if spec.sparsify == "magnitude_outliers":
            out["gamma"] = list(self.gamma)
        if spec.sparsify == "della_magprune":
            out["epsilon"] = list(self.epsilon)
        if spec.sparsify in ("random", "della_magprune"):
            out["seed"] = self.seed
        return out


def _per_input(
    name: str, value: Sequence[float] | float | None, count: int, default: float
) -> tuple[float, ...]:
    if value is None:
        return (default,) * count
    if isinstance(value, (int, float)):
        return (float(value),) * count
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise InputError(
            f"`{name}` has {len(values)} values for {count} vectors: give 1 or {count}"
        )
    return values


# -- one tensor: a plan per input, then any range of it ------------------------------------------
#
# mergekit sparsifies a whole tensor at once (an argsort of it for TIES and breadcrumbs, a
# Bernoulli draw over it for DARE). rvhub plans each input's tensor in a few streamed passes
# (float32 |x| bit patterns are ordered like the values, so a 2-level radix histogram finds
# the threshold exactly), and then merges any range of elements on its own: O(slab × inputs)
# memory, and slabs merge in parallel. Among equal magnitudes at a threshold, the one earlier
# in the tensor ranks first (a stable sort's order; mergekit's argsort is not stable, so
# there it depends on torch's sort: docs/merge.md).

_READ = 1 << 22  # elements read at a time by the planning passes
_BLOCK = 1 << 16  # elements per random draw block (DARE): masks do not depend on slabs
_ABOVE_ALL = 0x7F800001  # above every finite |x|'s bits (+inf is 0x7F800000)

Reader = Callable[[int, int], "torch.Tensor"]  # (start, stop) -> float32 flat elements


def _bits(x: torch.Tensor) -> torch.Tensor:
    import torch

    return x.abs().view(torch.int32)


def _generator(seed: int, name: str, index: int, block: int) -> torch.Generator:
    import torch

    key = f"{seed}:{name}:{index}:{block}".encode()
    return torch.Generator().manual_seed(zlib.crc32(key) << 32 | zlib.adler32(key))


def _ranked(read: Reader, n: int, ranks: Sequence[int]) -> list[tuple[int, int, int]]:
    """For each rank r (0-based, ascending |x|): the bits of the r-th smallest |x|, how many
    elements are smaller and how many equal it. Two streamed histogram passes."""
    import torch

    high = torch.zeros(1 << 15, dtype=torch.int64)
    for s in range(0, n, _READ):
        high += torch.bincount(_bits(read(s, min(n, s + _READ))) >> 16, minlength=1 << 15)
    cum = high.cumsum(0)
    buckets = sorted({int(torch.searchsorted(cum, r, right=True)) for r in ranks})
    low = {b: torch.zeros(1 << 16, dtype=torch.int64) for b in buckets}
    for s in range(0, n, _READ):
        bits = _bits(read(s, min(n, s + _READ)))
        top = bits >> 16
        for b in buckets:
            low[b] += torch.bincount(bits[top == b] & 0xFFFF, minlength=1 << 16)
    out = []
    for r in ranks:
        b = int(torch.searchsorted(cum, r, right=True))
        below = int(cum[b - 1]) if b else 0
        cum2 = low[b].cumsum(0)
        v = int(torch.searchsorted(cum2, r - below, right=True))
        out.append(((b << 16) | v, below + (int(cum2[v - 1]) if v else 0), int(low[b][v])))
    return out


def _position(read: Reader, n: int, bits: int, j: int, equal: int) -> int:
    """Where the j-th (0-based, in tensor order) element with |x| bits ``bits`` lies; 0 for
    j ≤ 0 and n for j ≥ ``equal`` (so ``[position(a), position(b))`` holds ties a..b−1)."""
    if j <= 0:
        return 0
    if j >= equal:
        return n
    seen = 0
    for s in range(0, n, _READ):
        eq = _bits(read(s, min(n, s + _READ))) == bits
        c = int(eq.sum())
        if seen + c > j:
            return s + int(eq.nonzero()[j - seen, 0])
        seen += c
    raise AssertionError("tie count changed between passes")


@dataclass(frozen=True)
class Window:
    """The entries a magnitude method keeps: |x| strictly between ``lo`` and ``hi`` (float32
    bit patterns), and those equal to ``lo`` (``hi``) at positions in ``lo_at`` (``hi_at``)."""

    lo: int
    lo_at: tuple[int, int]
    hi: int
    hi_at: tuple[int, int]

    def mask(self, x: torch.Tensor, start: int) -> torch.Tensor:
        bits = _bits(x)
        keep = (bits > self.lo) & (bits < self.hi)
        for value, (p0, p1) in ((self.lo, self.lo_at), (self.hi, self.hi_at)):
            a, b = max(p0 - start, 0), min(p1 - start, x.numel())
            if a < b:
                keep[a:b] |= bits[a:b] == value
        return keep


NOTHING = Window(-1, (0, 0), -1, (0, 0))


def top_window(read: Reader, n: int, k: int) -> Window:
    """The k largest |x| (mergekit's ``magnitude``), ties kept in tensor order."""
    if k <= 0 or n == 0:
        return NOTHING
    if k >= n:
        return Window(-1, (0, 0), _ABOVE_ALL, (0, 0))
    ((t, less, equal),) = _ranked(read, n, [n - k])
    greater = n - less - equal
    return Window(t, (0, _position(read, n, t, k - greater, equal)), _ABOVE_ALL, (0, 0))


def band_window(read: Reader, n: int, first: int, count: int) -> Window:
    """Ascending ranks ``[first, first + count)`` of |x| (mergekit's ``magnitude_outliers``)."""
    if count <= 0 or n == 0:
        return NOTHING
    (lo, lo_less, lo_eq), (hi, hi_less, hi_eq) = _ranked(read, n, [first, first + count - 1])
    lo_from = _position(read, n, lo, first - lo_less, lo_eq)
    hi_to = _position(read, n, hi, first + count - hi_less, hi_eq)
    if lo == hi:
        return Window(lo, (lo_from, hi_to), hi, (lo_from, hi_to))
    return Window(lo, (lo_from, n), hi, (0, hi_to))


@dataclass(frozen=True)
class Plan:
    """How one input's tensor is sparsified: which entries are kept (a magnitude window, or
    random draws keyed by the tensor, input and block) and the factor restoring its L1 norm."""

    name: str
    index: int
    shape: tuple[int, ...]
    method: str | None
    density: float
    epsilon: float
    seed: int
    window: Window | None = None
    scale: float = 1.0
    read: Reader | None = field(default=None, repr=False, compare=False)

    def mask(self, x: torch.Tensor, start: int) -> torch.Tensor | None:
        """Which of the elements ``x`` (flat, from ``start``) are kept; None for all."""
        if self.window is not None:
            return self.window.mask(x, start)
        if self.method == "random":
            return self._random(start, start + x.numel())
        if self.method == "della_magprune":
            return self._della(x, start)
        return None

    def _random(self, start: int, stop: int) -> torch.Tensor:
        import torch

        parts = []
        for block in range(start // _BLOCK, (stop - 1) // _BLOCK + 1):
            b0 = block * _BLOCK
            n = min(_BLOCK, math.prod(self.shape) - b0)
            gen = _generator(self.seed, self.name, self.index, block)
            keep = torch.rand(n, generator=gen) < self.density
            parts.append(keep[max(start - b0, 0) : stop - b0])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _della(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """mergekit's ``della_magprune`` per row: keep probability from density − ε (smallest
        |x| of the row) to density + ε (largest), drawn per block of whole rows."""
        import torch

        assert self.read is not None
        stop = start + x.numel()
        cols = math.prod(self.shape[1:]) if len(self.shape) >= 2 else math.prod(self.shape)
        total = math.prod(self.shape) // cols
        per = max(1, _BLOCK // cols)
        r0, r1 = start // cols, -(-stop // cols)
        parts = []
        for block in range(r0 // per, (r1 - 1) // per + 1):
            b0, b1 = block * per, min((block + 1) * per, total)
            rows = self.read(b0 * cols, b1 * cols).reshape(b1 - b0, cols)
            ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
            rank_norm = ranks / max(cols - 1, 1)
            probs = (self.density - self.epsilon) + rank_norm * 2 * self.epsilon
            gen = _generator(self.seed, self.name, self.index, block)
            parts.append((torch.rand(probs.shape, generator=gen) < probs).reshape(-1))
        keep = torch.cat(parts) if len(parts) > 1 else parts[0]
        first = (r0 // per) * per * cols
        return keep[start - first : stop - first]


def plan_input(
    name: str, index: int, read: Reader, shape: tuple[int, ...], options: MergeOptions
) -> Plan:
    """Input ``index``'s plan for tensor ``name``, from streamed passes over ``read``."""
    import torch

    spec = METHODS[options.method]
    n = math.prod(shape)
    density = options.density[index]
    method = spec.sparsify if density < 1 else None
    plan = Plan(name, index, shape, method, density, options.epsilon[index], options.seed,
                read=read)  # fmt: skip
    if method == "magnitude":
        window = top_window(read, n, max(1, int(density * n)) if density > 0 else 0)
        plan = replace(plan, window=window)
    elif method == "magnitude_outliers":
        target, top = int(density * n), int(options.gamma[index] * n)
        bottom = max(0, n - target - top)
        plan = replace(plan, window=band_window(read, n, bottom, target))
    elif method == "della_magprune" and density <= 0:
        plan = replace(plan, window=NOTHING)
    if method is None or not options.rescale:
        return plan
    before = after = 0.0  # mergekit's rescaled_masked_tensor, with the L1 norm
    for s in range(0, n, _READ):
        x = read(s, min(n, s + _READ))
        keep = plan.mask(x, s)
        before += float(x.abs().sum(dtype=torch.float64))
        after += float(x.abs().sum(dtype=torch.float64) if keep is None else
                       x.abs()[keep].sum(dtype=torch.float64))  # fmt: skip
    if before < 1e-7 or after < 1e-7:
        return plan
    return replace(plan, scale=before / after)


def merge_range(
    plans: Sequence[Plan],
    read: Callable[[int, int, int], torch.Tensor],
    start: int,
    stop: int,
    options: MergeOptions,
) -> torch.Tensor:
    """The merged delta's flat elements ``[start, stop)`` (float32); ``read(i, start, stop)``
    gives input i's. The arithmetic is mergekit's, in its order: sparsify (× rescale),
    × weight, sign election, disjoint sum, ÷ kept weights."""
    import torch

    spec = METHODS[options.method]
    count = len(plans)
    stacked = torch.empty((count, stop - start), dtype=torch.float32)
    for i, plan in enumerate(plans):
        x = read(i, start, stop)
        keep = plan.mask(x, start)
        if keep is None:
            stacked[i] = x
        else:
            torch.mul(x, keep, out=stacked[i])
        if plan.scale != 1.0:
            stacked[i] *= torch.tensor(plan.scale, dtype=torch.float32)
        del x, keep
    weights = torch.tensor(options.weights, dtype=stacked.dtype).reshape(-1, 1)
    stacked.mul_(weights)
    if spec.consensus:
        majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
        mask = (stacked.sign() == majority).to(stacked.dtype)
        del majority
        divisor = (weights * mask).sum(dim=0)
        merged = stacked.mul_(mask).sum(dim=0)
        del mask
        divisor[divisor == 0] = 1
    else:
        merged = stacked.sum(dim=0)
        divisor = weights.sum(dim=0).expand_as(merged).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if options.normalize:
        merged /= divisor
    if options.lambda_ != 1:
        merged *= options.lambda_
    return merged


def _slicer(flat: torch.Tensor) -> Reader:
    return lambda s, e: flat[s:e]


def merge_tensor(name: str, deltas: Sequence[torch.Tensor], options: MergeOptions) -> torch.Tensor:
    """The merged delta of one tensor from each input's delta (float32, same shape)."""
    import torch

    flats = [d.to(torch.float32).reshape(-1) for d in deltas]
    shape = tuple(deltas[0].shape)
    plans = [plan_input(name, i, _slicer(f), shape, options) for i, f in enumerate(flats)]
    merged = merge_range(plans, lambda i, s, e: flats[i][s:e], 0, flats[0].numel(), options)
    return merged.reshape(shape)


# -- a lazy source -------------------------------------------------------------------------------


class MergeSource(VectorSource):
    """The merge of several vectors' deltas, planned once per tensor (a few streamed passes
    over each input) and then merged slab by slab: O(slab × inputs) memory, slabs in parallel."""

    def __init__(self, sources: Sequence[VectorSource], options: MergeOptions) -> None:
        import torch

        first = sources[0]
        for src in sources[1:]:
            if set(src.shapes) != set(first.shapes):
                extra = sorted(set(src.shapes) ^ set(first.shapes))
                raise CompatibilityError(
                    f"cannot merge vectors holding different tensors (e.g. {extra[0]}); "
                    "exclude it when extracting, or merge vectors of one model"
                )
            for name, shape in src.shapes.items():
                if first.shapes[name] != shape:
                    raise CompatibilityError(
                        f"cannot merge vectors: {name} is {list(first.shapes[name])} in one "
                        f"and {list(shape)} in another"
                    )
        dtypes = {n: _promoted([s.dtypes[n] for s in sources], torch) for n in first.shapes}
        super().__init__(dict(first.shapes), dtypes)
        self.sources, self.options = list(sources), options
        self._lock = threading.Lock()
        self._plans: dict[str, list[Plan]] = {}
        self._planning: dict[str, threading.Lock] = {}

    def lineage(self) -> Lineage | None:
        return Lineage.of_terms(s.lineage() for s in self.sources)

    def plans(self, name: str) -> list[Plan]:
        """Each input's plan for ``name``, made once (other threads wait for it)."""
        with self._lock:
            plans = self._plans.get(name)
            guard = self._planning.setdefault(name, threading.Lock())
        if plans is not None:
            return plans
        with guard:
            with self._lock:
                plans = self._plans.get(name)
            if plans is None:
                shape = self.shapes[name]
                plans = [
                    plan_input(name, i, partial(src.chunk, name), shape, self.options)
                    for i, src in enumerate(self.sources)
                ]
                with self._lock:
                    self._plans[name] = plans
        return plans

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        plans = self.plans(name)
        return merge_range(
            plans, lambda i, s, e: self.sources[i].chunk(name, s, e), start, stop, self.options
        )


def _promoted(dtypes: Sequence[Any], torch: Any) -> Any:
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out


__all__ = [
    "METHODS",
    "MergeOptions",
    "MergeSource",
    "Plan",
    "Window",
    "merge_range",
    "merge_tensor",
    "plan_input",
]
