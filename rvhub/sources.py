"""Where a vector's deltas come from: lazy sources that produce one tensor, or one flat chunk
of one, on request.

A source knows names, shapes and storage dtypes up front. What a consumer may ask of one is a
method here, answered by every source (the default is right for most), so writers and
appliers never test a source's type:

- :meth:`VectorSource.chunk` / :meth:`~VectorSource.get`: float32 deltas;
- :meth:`~VectorSource.raw_chunk`: the stored dtype where no cast is needed;
- :meth:`~VectorSource.store_slab`: one slab rounded into an output buffer with its statistics
  (a difference also measures the round-trip error ‖B + v − A‖ there);
- :meth:`~VectorSource.delta_on`: a whole delta built on a device (LoRA's ``B @ A``);
- :meth:`~VectorSource.stored_entry`: the bytes on disk, for a direct GPU copy;
- :meth:`~VectorSource.track_fingerprints` / :meth:`~VectorSource.fingerprints`: content
  fingerprints of local sources, taken as their bytes stream past;
- :meth:`~VectorSource.lineage`: the sources' lineage fingerprint (:mod:`rvhub.lineage`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .errors import CompatibilityError
from .io.fp8 import BlockScales, Fp8Slab, dequantize_flat
from .io.kernels import Moments, Scratch, diff_into, store_into
from .io.safetensors import FileHandles, TensorEntry, read_range, tensor_bytes
from .io.stream import SlabPool
from .lineage import Lineage, sample_pair
from .manifest import SourceFingerprint

Take = Callable[[int, torch.dtype], torch.Tensor]

_CHUNK_SLAB = 1 << 20  # elements of A and B read at a time by DifferenceSource.chunk


@dataclass(frozen=True)
class Slab:
    """Elements ``[start, stop)`` of the delta ``name``, to be rounded into ``out`` (a flat
    buffer of the storage dtype) with their statistics added to ``moments``."""

    name: str
    start: int
    stop: int
    out: torch.Tensor
    moments: Moments


class VectorSource:
    """What a vector reads from. Subclasses implement :meth:`chunk` or :meth:`get`."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> None:
        self.shapes = shapes
        self.dtypes = dtypes
        self.recorded_lineage: Lineage | None = None  # set when read from an artifact

    def lineage(self) -> Lineage | None:
        """Sampled values of the vector's sources A and B (None when unknown)."""
        return self.recorded_lineage

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Flat elements ``[start, stop)`` of the delta, as float32."""
        return self.get(name).reshape(-1)[start:stop]

    def raw_chunk(self, name: str, start: int, stop: int, take: Take | None = None) -> torch.Tensor:
        """Like :meth:`chunk`, but in the storage dtype when the source can avoid a cast.

        Sources that read stored bytes read them into ``take(numel, dtype)`` when given (a
        :class:`rvhub.io.stream.SlabPool`'s recycled buffers)."""
        return self.chunk(name, start, stop)

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The whole delta, shaped; ``dtype=None`` keeps the storage dtype."""
        numel = math.prod(self.shapes[name])
        out = self.chunk(name, 0, numel).reshape(self.shapes[name])
        return out if dtype is None else out.to(dtype)

    def delta_on(self, name: str, device: torch.device | str) -> torch.Tensor:
        """The whole delta on ``device``, in the storage dtype where it has one."""
        return self.get(name, None).to(device)

    def stored_entry(self, name: str) -> TensorEntry | None:
        """Where the delta's bytes lie on disk as stored (dense), or None."""
        return None

    @property
    def measures_roundtrip(self) -> bool:
        """Whether :meth:`store_slab` measures ‖B + v − A‖ (only a difference can)."""
        return False

    def store_slab(self, slab: Slab, scratch: Scratch, pool: SlabPool, roundtrip: bool) -> None:
        """The slab's elements of its delta rounded into ``slab.out`` (its dtype); adds ‖d‖²
        (and, where :attr:`measures_roundtrip` and ``roundtrip``, ‖B + v − A‖²) to
        ``slab.moments``. ``scratch`` and ``pool`` are the caller's reusable buffers."""
        d = self.chunk(slab.name, slab.start, slab.stop)
        store_into(d, slab.out, slab.moments, scratch)

    def track_fingerprints(self) -> None:
        """Start fingerprinting local sources as their bytes are read (see :meth:`fingerprints`)."""

    def fingerprints(self, names: Iterable[str]) -> dict[str, str]:
        """Content fingerprints by source role of what was read of ``names`` since
        :meth:`track_fingerprints`; empty when there is nothing to fingerprint."""
        return {}


class DifferenceSource(VectorSource):
    """``A − B`` computed in float32, one flat chunk at a time."""

    def __init__(self, a: Checkpoint, b: Checkpoint, names: list[str]) -> None:
        shapes = {n: a.entries[n].shape for n in names}
        # an FP8 source's weights are stored as bfloat16 deltas unless --dtype says otherwise
        dtypes = {
            n: torch.bfloat16 if n in a.fp8_scales else a.entries[n].torch_dtype for n in names
        }
        super().__init__(shapes, dtypes)
        self.a, self.b = a, b
        self._handles = FileHandles()
        self._fingerprints: dict[str, SourceFingerprint] = {}
        self._scales: dict[str, tuple[str, BlockScales]] = {}  # role -> (name, scales)

    def parts(
        self, name: str, start: int, stop: int, take: Take | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw A and B chunks (source dtypes; FP8 weights dequantized to float32), in
        buffers from ``take(numel, dtype)`` when given (e.g.
        :meth:`rvhub.io.stream.SlabPool.take`)."""
        a, b = self._parts(name, start, stop, take, encoded=False)
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        return a, b

    def _parts(
        self, name: str, start: int, stop: int, take: Take | None, *, encoded: bool
    ) -> tuple[torch.Tensor | Fp8Slab, torch.Tensor | Fp8Slab]:
        """:meth:`parts`, or with ``encoded`` FP8 weights as their codes and scales
        (:class:`Fp8Slab`), for a kernel that decodes them block by block."""
        n = stop - start
        out: list[torch.Tensor | Fp8Slab] = []
        for role, ckpt in (("a", self.a), ("b", self.b)):
            entry = ckpt.entries[name]
            fp8 = name in ckpt.fp8_scales
            buf = take(n, entry.torch_dtype) if take is not None and (encoded or not fp8) else None
            part = read_range(entry, start, stop, self._handles, buf)
            fingerprint = self._fingerprints.get(role)
            if fingerprint is not None:
                # Here, while the bytes are in cache, and on the compute thread: with the
                # output's write and hash the writer thread is the busier one.
                fingerprint.update(name, start, stop, entry.numel, tensor_bytes(part))
            if not fp8:
                out.append(part)
            elif encoded:
                out.append(Fp8Slab(part, self._scales_of(role, ckpt, name), start))
            else:  # dequantized block by block, in float32
                into = take(n, torch.float32) if take is not None else None
                out.append(dequantize_flat(part, self._scales_of(role, ckpt, name), start, into))
        return out[0], out[1]

    def _scales_of(self, role: str, ckpt: Checkpoint, name: str) -> BlockScales:
        held = self._scales.get(role)
        if held is None or held[0] != name:  # one tensor's scales per source at a time
            entry = ckpt.fp8_scales[name]
            assert ckpt.fp8_block is not None
            scales = read_range(entry, 0, entry.numel, self._handles).reshape(entry.shape)
            blocks = BlockScales(scales, ckpt.entries[name].shape, ckpt.fp8_block)
            held = self._scales[role] = (name, blocks)
        return held[1]

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        """``A − B`` in float32, read and subtracted one slab at a time into the result, so a
        whole embedding costs its float32 result, not float32 copies of A and B as well."""
        out = torch.empty(stop - start, dtype=torch.float32)
        for s in range(start, stop, _CHUNK_SLAB):
            e = min(stop, s + _CHUNK_SLAB)
            a, b = self.parts(name, s, e)
            part = out[s - start : e - start]
            part.copy_(a)
            part.sub_(b)  # float32 math, as a.float() - b.float()
        return out

    @property
    def measures_roundtrip(self) -> bool:
        return True

    def store_slab(self, slab: Slab, scratch: Scratch, pool: SlabPool, roundtrip: bool) -> None:
        a, b = self._parts(slab.name, slab.start, slab.stop, pool.take, encoded=True)
        diff_into(a, b, slab.out, slab.moments, scratch, roundtrip=roundtrip)
        pool.give(*(x if isinstance(x, torch.Tensor) else x.codes for x in (a, b)))

    def track_fingerprints(self) -> None:
        # Hub sources are identified by their commit sha; only local ones need a fingerprint.
        self._fingerprints = {
            role: SourceFingerprint()
            for role, ckpt in (("a", self.a), ("b", self.b))
            if "revision" not in ckpt.source
        }

    def lineage(self) -> Lineage:
        return sample_pair(self.a, self.b, list(self.shapes))

    def fingerprints(self, names: Iterable[str]) -> dict[str, str]:
        names = list(names)
        out = {}
        for role, fingerprint in self._fingerprints.items():
            ckpt = self.a if role == "a" else self.b
            digest = fingerprint.digest(ckpt.entries, names)
            if digest is not None:
                out[role] = digest
        return out


class TensorDifferenceSource(VectorSource):
    """``a − b`` over two in-memory state dicts (float32 math, stored in ``a``'s dtype)."""

    def __init__(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
        names = [n for n, t in a.items() if t.is_floating_point()]
        problems = [n for n in names if n not in b or tuple(b[n].shape) != tuple(a[n].shape)]
        if problems or set(b) - set(a):
            extra = sorted(set(b) - set(a))
            raise CompatibilityError(
                "the two state dicts are not of one architecture: "
                + ", ".join((problems + extra)[:5])
                + " differ in presence or shape"
            )
        super().__init__({n: tuple(a[n].shape) for n in names}, {n: a[n].dtype for n in names})
        self.a, self.b = a, b

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        a, b = self.a[name].detach(), self.b[name].detach()
        delta = a.to("cpu", torch.float32) - b.to("cpu", torch.float32)
        return delta.to(self.dtypes[name] if dtype is None else dtype)

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name).reshape(-1)[start:stop]


class CombinationSource(VectorSource):
    """``Σ cᵢ·vᵢ`` over sources with compatible shapes; names absent from a term count as 0."""

    def __init__(self, terms: Sequence[tuple[float, VectorSource]]) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, torch.dtype] = {}
        for _, src in terms:
            for name, shape in src.shapes.items():
                if name in shapes and shapes[name] != shape:
                    raise CompatibilityError(
                        f"cannot combine vectors: {name} is {list(shapes[name])} in one and "
                        f"{list(shape)} in the other"
                    )
                shapes.setdefault(name, shape)
                dt = src.dtypes[name]
                prev = dtypes.get(name)
                dtypes[name] = dt if prev is None else torch.promote_types(prev, dt)
        super().__init__(shapes, dtypes)
        self.terms = list(terms)

    def lineage(self) -> Lineage | None:
        """Every term's bases, each once (a target is measured against the nearest)."""
        return Lineage.of_terms(t.lineage() for _, t in self.terms)

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        out: torch.Tensor | None = None
        for coef, src in self.terms:
            if name not in src.shapes:
                continue
            part = src.chunk(name, start, stop)
            if out is None:
                out = part * coef if coef != 1.0 else part.clone()
            else:
                out.add_(part, alpha=coef)
        assert out is not None
        return out
