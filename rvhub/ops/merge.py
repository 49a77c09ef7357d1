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
from dataclasses import dataclass, field
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


# -- one tensor ----------------------------------------------------------------------------------


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(
        (seed * 1_000_003 + zlib.crc32(name.encode())) * 64 + index
    )


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm."""
    masked = delta * mask
    if not rescale:
        return masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def sparsify(
    delta: torch.Tensor, method: str, density: float, *, rescale: bool, gamma: float = 0.01,
    epsilon: float = 0.15, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """One input's delta, sparsified as mergekit's ``sparsify`` does (float32 in and out)."""
    import torch

    if density >= 1:
        return delta
    n = delta.numel()
    flat = delta.reshape(-1)
    if method == "magnitude":
        if density <= 0 or n == 0:
            return torch.zeros_like(delta)
        keep = torch.zeros(n, dtype=delta.dtype)
        keep[torch.argsort(flat.abs(), descending=True)[: max(1, int(density * n))]] = 1
        return _rescaled(delta, keep.reshape_as(delta), rescale)
    if method == "magnitude_outliers":
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        order = torch.sort(flat.abs(), descending=False).indices
        keep = torch.zeros(n, dtype=delta.dtype)
        keep[order[bottom : bottom + target]] = 1
        return _rescaled(delta, keep.reshape_as(delta), rescale)
    if method == "random":
        keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
        return _rescaled(delta, keep, rescale)
    if method == "della_magprune":
        if density <= 0:
            return torch.zeros_like(delta)
        rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
        ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(delta.dtype) + 1
        low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
        probs = (density - epsilon) + rank_norm * 2 * epsilon
        keep = torch.bernoulli(probs, generator=generator)
        return _rescaled(rows, keep, rescale).reshape(delta.shape)
    raise InputError(f"unknown sparsification {method!r}")


def merge_tensor(name: str, deltas: Sequence[torch.Tensor], options: MergeOptions) -> torch.Tensor:
    """The merged delta of one tensor from each input's delta (float32, same shape)."""
    return merge_stream(name, lambda i: deltas[i], len(deltas), tuple(deltas[0].shape), options)


def merge_stream(
    name: str,
    read: Callable[[int], torch.Tensor],
    count: int,
    shape: tuple[int, ...],
    options: MergeOptions,
) -> torch.Tensor:
    """:func:`merge_tensor` reading input ``i``'s delta with ``read(i)`` only when it is
    sparsified and stacked, so at most one input's float32 copy exists beside the stack."""
    import torch

    spec = METHODS[options.method]
    stacked = torch.empty((count, *shape), dtype=torch.float32)
    for i in range(count):
        delta = read(i)
        if spec.sparsify:
            random = spec.sparsify in ("random", "della_magprune")
            delta = sparsify(
                delta,
                spec.sparsify,
                options.density[i],
                rescale=options.rescale,
                gamma=options.gamma[i],
                epsilon=options.epsilon[i],
                generator=_generator(options.seed, name, i) if random else None,
            )
        stacked[i] = delta
        del delta
    weights = torch.tensor(options.weights, dtype=stacked.dtype).reshape(-1, *[1] * len(shape))
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


# -- a lazy source -------------------------------------------------------------------------------


@dataclass
class _Cache:
    """The merged tensors being read (a few: the writer's slabs of one tensor come from several
    threads), and one lock per tensor so that it is merged once, not by every thread at once."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    computing: dict[str, threading.Lock] = field(default_factory=dict)


class MergeSource(VectorSource):
    """The merge of several vectors' deltas, computed one whole tensor at a time (the methods
    rank, elect signs and draw masks over a tensor), O(tensor × inputs) memory."""

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
        self._cache = _Cache()

    def lineage(self) -> Lineage | None:
        return Lineage.of_terms(s.lineage() for s in self.sources)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        cache = self._cache
        with cache.lock:
            cached = cache.tensors.get(name)
            guard = cache.computing.setdefault(name, threading.Lock())
        if cached is None:
            with guard:  # the first thread merges; the others wait for its result
                with cache.lock:
                    cached = cache.tensors.get(name)
                if cached is None:
                    cached = merge_stream(
                        name,
                        lambda i: self.sources[i].get(name, torch.float32),
                        len(self.sources),
                        self.shapes[name],
                        self.options,
                    )
                    with cache.lock:
                        while len(cache.tensors) >= 4:  # the tensors being streamed out
                            cache.tensors.pop(next(iter(cache.tensors)))
                        cache.tensors[name] = cached
        return cached if dtype is None else cached.to(dtype)

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name).reshape(-1)[start:stop]


def _promoted(dtypes: Sequence[Any], torch: Any) -> Any:
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out


__all__ = ["METHODS", "MergeOptions", "MergeSource", "merge_tensor", "sparsify"]
