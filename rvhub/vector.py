"""``ReasoningVector``: a lazy map from checkpoint tensor names to weight deltas.

A vector never holds a whole model in memory. Its *source* knows names, shapes and storage
dtypes up front and produces one tensor (or one flat chunk of a tensor) on request: the
difference of two checkpoints, an artifact on disk in any encoding, or a linear combination
of other vectors. Arithmetic builds new lazy vectors, like ``task_vectors.TaskVector``::

    v = extract_vector("org/grpo", "org/sft")
    (0.5 * v + w).save("mix/")
    (-v).apply_to(model)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import CompatibilityError, InputError

if TYPE_CHECKING:
    from .apply import ApplyReport

LAYER_RE = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
DEFAULT_MAX_SHARD = 5 * 1024**3


def layer_of(name: str) -> str:
    """The transformer block a tensor belongs to (``"12"``), or ``"other"``."""
    m = LAYER_RE.search(name)
    return m.group(1) if m else "other"


class VectorSource:
    """What a vector reads from. Subclasses implement :meth:`chunk` (and may override ``get``)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> None:
        self.shapes = shapes
        self.dtypes = dtypes

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Flat elements ``[start, stop)`` of the delta, as float32."""
        return self.get(name).reshape(-1)[start:stop]

    def raw_chunk(
        self, name: str, start: int, stop: int, take: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Like :meth:`chunk`, but in the storage dtype when the source can avoid a cast.

        Sources that read stored bytes read them into ``take(numel, dtype)`` when given (a
        :class:`rvhub.writer.SlabPool`'s recycled buffers)."""
        return self.chunk(name, start, stop)

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The whole delta, shaped; ``dtype=None`` keeps the storage dtype."""
        numel = math.prod(self.shapes[name])
        out = self.chunk(name, 0, numel).reshape(self.shapes[name])
        return out if dtype is None else out.to(dtype)


class CombinationSource(VectorSource):
    """``Σ cᵢ·vᵢ`` over vectors with compatible shapes; names absent from a term count as 0."""

    def __init__(self, terms: Sequence[tuple[float, ReasoningVector]]) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, torch.dtype] = {}
        for _, vec in terms:
            for name, shape in vec.shapes.items():
                if name in shapes and shapes[name] != shape:
                    raise CompatibilityError(
                        f"cannot combine vectors: {name} is {list(shapes[name])} in one and "
                        f"{list(shape)} in the other"
                    )
                shapes.setdefault(name, shape)
                dt = vec.source.dtypes[name]
                prev = dtypes.get(name)
                dtypes[name] = dt if prev is None else torch.promote_types(prev, dt)
        super().__init__(shapes, dtypes)
        self.terms = list(terms)

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        out: torch.Tensor | None = None
        for coef, vec in self.terms:
            if name not in vec.shapes:
                continue
            part = vec.source.chunk(name, start, stop)
            if out is None:
                out = part * coef if coef != 1.0 else part.clone()
            else:
                out.add_(part, alpha=coef)
        assert out is not None
        return out


@dataclass
class ReasoningVector:
    """Weight deltas by checkpoint tensor name, read lazily from ``source``.

    ``meta`` carries provenance (sources, model type, excluded tensors, manifest statistics).
    Build one with :func:`rvhub.extract_vector` or :func:`rvhub.load_vector`.
    """

    source: VectorSource
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # -- mapping-like access ------------------------------------------------------------------
    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.source.shapes

    @property
    def names(self) -> list[str]:
        return list(self.source.shapes)

    def __len__(self) -> int:
        return len(self.source.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.source.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.source.shapes:
            raise KeyError(name)
        return self.source.get(name)

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One delta, shaped; float32 by default, ``dtype=None`` for the stored dtype."""
        return self.source.get(name, dtype)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, float32 delta)`` one tensor at a time."""
        for name in self.source.shapes:
            yield name, self.source.get(name)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the deltas are stored in (the widest one if mixed)."""
        dts = set(self.source.dtypes.values())
        out = torch.float32 if not dts else dts.pop()
        for dt in dts:
            out = torch.promote_types(out, dt)
        return out

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def model_info(self) -> dict[str, Any]:
        return dict(self.meta.get("model") or {})

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        mt = self.model_info.get("model_type", "?")
        return f"ReasoningVector({len(self)} tensors, {self.numel:,} params, {mt}{where})"

    # -- arithmetic ---------------------------------------------------------------------------
    def _terms(self) -> list[tuple[float, ReasoningVector]]:
        if isinstance(self.source, CombinationSource):
            return list(self.source.terms)
        return [(1.0, self)]

    def _combine(self, terms: list[tuple[float, ReasoningVector]]) -> ReasoningVector:
        meta = {k: v for k, v in self.meta.items() if k in ("model",)}
        meta["combination"] = [
            {"coef": c, "vector": str(v.path) if v.path else repr(v)} for c, v in terms
        ]
        return ReasoningVector(CombinationSource(terms), meta)

    def __add__(self, other: object) -> ReasoningVector:
        if isinstance(other, (int, float)) and other == 0:
            return self  # lets sum([v, w]) work
        if not isinstance(other, ReasoningVector):
            return NotImplemented
        return self._combine(self._terms() + other._terms())

    __radd__ = __add__

    def __mul__(self, coef: object) -> ReasoningVector:
        if not isinstance(coef, (int, float)) or isinstance(coef, bool):
            return NotImplemented
        return self._combine([(c * float(coef), v) for c, v in self._terms()])

    __rmul__ = __mul__

    def __truediv__(self, coef: object) -> ReasoningVector:
        if not isinstance(coef, (int, float)) or isinstance(coef, bool):
            return NotImplemented
        return self * (1.0 / float(coef))

    def __neg__(self) -> ReasoningVector:
        return self * -1.0

    def __sub__(self, other: object) -> ReasoningVector:
        if not isinstance(other, ReasoningVector):
            return NotImplemented
        return self + (-other)

    # -- statistics -----------------------------------------------------------------------------
    def norms(self) -> dict[str, float]:
        """Frobenius norm of each delta (computed in float64 accumulation)."""
        out = {}
        for name, delta in self.items():
            out[name] = float(torch.linalg.vector_norm(delta.reshape(-1), dtype=torch.float64))
        return out

    def norm(self) -> float:
        return math.sqrt(sum(n * n for n in self.norms().values()))

    def cosine(self, other: ReasoningVector) -> float:
        """Cosine similarity of two vectors over their shared tensors."""
        dot = na = nb = 0.0
        for name in self.names:
            if name not in other:
                continue
            a = self.get(name).reshape(-1).double()
            b = other.get(name).reshape(-1).double()
            dot += float(a @ b)
            na += float(a @ a)
            nb += float(b @ b)
        return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0

    # -- output ---------------------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype | str | None = None,
        overwrite: bool = False,
        exclude: Iterable[str] = (),
        allow_nonfinite: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD,
    ) -> Path:
        """Write the vector as a dense artifact folder (``vector.safetensors`` + ``rvhub.json``).

        Streams tensor by tensor (large tensors in chunks); the folder appears atomically.

        Example:
            >>> extract_vector("org/grpo", "org/sft").save("./reasoning-vector")
        """
        from .writer import write_dense

        return write_dense(
            self,
            Path(path),
            dtype=dtype,
            overwrite=overwrite,
            exclude=list(exclude),
            allow_nonfinite=allow_nonfinite,
            max_shard_size=parse_size(max_shard_size),
        )

    def apply_to(
        self,
        model: torch.nn.Module,
        *,
        scale: float = 1.0,
        exclude: Iterable[str] = (),
        vocab: str = "strict",
        allow_nonfinite: bool = False,
    ) -> ApplyReport:
        """Add ``scale · v`` to ``model``'s parameters in place, each on its own device.

        Returns an :class:`~rvhub.apply.ApplyReport` (applied / skipped / missing names).

        Example:
            >>> report = load_vector("./reasoning-vector").apply_to(model, scale=1.0)
        """
        from .apply import apply_to_model

        return apply_to_model(
            self,
            model,
            scale=scale,
            exclude=list(exclude),
            vocab=vocab,
            allow_nonfinite=allow_nonfinite,
        )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Publish this vector (it must be saved first) to ``repo_id``; see :func:`rvhub.push_vector`."""
        if self.path is None:
            raise InputError("save the vector first (v.save(folder)), then push the folder")
        from .hub import push_vector

        return push_vector(self.path, repo_id, **kwargs)


def parse_size(size: int | str) -> int:
    """``"5GB"``/``"500MB"``/``1024`` -> bytes (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not m:
        raise InputError(f"invalid size {size!r}; use e.g. 5GB or 500MB")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(m.group(1)) * units[m.group(2) or "B"])


def compile_excludes(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise InputError(f"--exclude {p!r} is not a valid regular expression: {e}") from None
    return out


def is_excluded(name: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    return any(p.search(name) for p in patterns)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def norm_summary(sumsq: dict[str, float]) -> dict[str, Any]:
    """Global and per-block norms from each tensor's ‖Δ‖² (blocks in numeric order)."""
    layers: dict[str, float] = {}
    for name, sq in sumsq.items():
        layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + sq
    ordered = sorted(layers.items(), key=lambda kv: (0, int(kv[0])) if kv[0].isdigit() else (1, 0))
    return {
        "norm": math.sqrt(sum(sumsq.values())),
        "layer_norms": {k: math.sqrt(v) for k, v in ordered},
    }
