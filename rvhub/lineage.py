"""The lineage fingerprint: does a target descend from the vector's base?

Same shapes pass every other check, yet a vector added to a model of another lineage (another
base, another pretraining seed) gives silent garbage. So extraction records, for every
tensor, a few values of each source at fixed, name-seeded positions (``LINEAGE_RUNS``
contiguous runs of ``LINEAGE_RUN_LENGTH`` values: a handful of small reads per tensor), in
``lineage.safetensors``. A later apply reads the same positions of the target and measures
the relative distance ``‖T − B‖ / ‖B‖`` per tensor and overall. Fine-tunes of one base stay a
few percent from it; independently initialised weights lie about √2 away (for two
independent draws of one distribution, ``‖T − B‖² ≈ ‖T‖² + ‖B‖² ≈ 2‖B‖²``).

Only matrices decide: norm weights start at 1 and biases at 0 in every family, so they match
across unrelated models too. The module works in numpy, so ``rvhub check`` reads a target's
samples without importing torch.
"""

from __future__ import annotations

import math
import os
import random
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .constants import LINEAGE_FILE, LINEAGE_REFUSE, LINEAGE_RUN_LENGTH, LINEAGE_RUNS, LINEAGE_WARN
from .errors import IntegrityError
from .io.safetensors import FileHandles, SafetensorsWriter, TensorEntry, read_header
from .manifest import Manifest, artifact_file

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint

ALGORITHM = f"{LINEAGE_RUNS} runs of {LINEAGE_RUN_LENGTH} values per tensor, seeded by crc32(name)"
_ROLE = re.compile(r"([ab])([1-9][0-9]*)?")  # a::, b:: and a<i>::, b<i>:: of base i
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def runs_of(name: str, numel: int) -> list[tuple[int, int]]:
    """The flat ``[start, stop)`` runs sampled of tensor ``name`` (the same on every machine)."""
    if numel <= LINEAGE_RUNS * LINEAGE_RUN_LENGTH:
        return [(0, numel)]
    rng = random.Random(zlib.crc32(name.encode()))
    starts = sorted(rng.randrange(0, numel - LINEAGE_RUN_LENGTH + 1) for _ in range(LINEAGE_RUNS))
    return [(s, s + LINEAGE_RUN_LENGTH) for s in starts]


def _as_float32(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<")).astype(np.float32)


def sample_entry(
    entry: TensorEntry,
    handles: FileHandles,
    fp8: tuple[TensorEntry, tuple[int, int]] | None = None,
) -> np.ndarray:
    """The sampled values of a stored float tensor, as float32 (a few small reads); ``fp8``
    (its ``weight_scale_inv`` entry and block) dequantizes an FP8 weight's samples."""
    size = entry.nbytes // max(entry.numel, 1)
    fd = handles.fd(entry.path)
    parts = []
    scales, block, table = None, (1, 1), None
    if fp8 is not None:
        from .io.fp8 import e4m3_values

        scale_entry, block = fp8
        raw = os.pread(handles.fd(scale_entry.path), scale_entry.nbytes, scale_entry.start)
        scales = np.frombuffer(raw, dtype="<f4").reshape(scale_entry.shape)
        table = e4m3_values()
    for s, e in runs_of(entry.name, entry.numel):
        raw = os.pread(fd, (e - s) * size, entry.start + s * size)
        if len(raw) != (e - s) * size:
            raise IntegrityError(f"{entry.path} ended early while reading {entry.name!r}")
        if scales is not None and table is not None:
            flat = np.arange(s, e)
            rows, cols = flat // entry.shape[1], flat % entry.shape[1]
            values = table[np.frombuffer(raw, dtype=np.uint8)]
            parts.append(values * scales[rows // block[0], cols // block[1]])
        else:
            parts.append(_as_float32(raw, entry.dtype))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def sample_tensor(name: str, t: torch.Tensor) -> np.ndarray:
    """The sampled values of a live tensor (any device), as float32 on the CPU."""
    flat = t.detach().reshape(-1)
    return np.concatenate([flat[s:e].float().cpu().numpy() for s, e in runs_of(name, flat.numel())])


def sample_entries(
    entries: Mapping[str, TensorEntry],
    names: Iterable[str],
    fp8_scales: Mapping[str, TensorEntry] | None = None,
    fp8_block: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Samples of the float tensors ``names`` of a checkpoint (others are skipped); FP8
    weights with an entry in ``fp8_scales`` are sampled dequantized."""
    handles = FileHandles()
    scales = fp8_scales or {}
    try:
        out = {}
        for n in names:
            if n in scales and fp8_block is not None:
                out[n] = sample_entry(entries[n], handles, (scales[n], fp8_block))
            elif entries[n].dtype in _FLOATS:
                out[n] = sample_entry(entries[n], handles)
        return out
    finally:
        handles.close()


_FLOATS = ("F64", "F32", "F16", "BF16")


@dataclass
class Lineage:
    """Sampled values of the vector's sources A and B, by tensor name; a combination of
    vectors keeps one such pair per further base in :attr:`more`."""

    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    more: tuple[Lineage, ...] = ()

    def bases(self) -> list[Lineage]:
        """One fingerprint per base: this one, then those of :attr:`more`."""
        return [Lineage(self.a, self.b, self.shapes), *self.more]

    @classmethod
    def of_terms(cls, lineages: Iterable[Lineage | None]) -> Lineage | None:
        """The fingerprint of a combination: every term's bases, each once."""
        bases: list[Lineage] = []
        for lineage in lineages:
            for base in lineage.bases() if lineage is not None else []:
                if not any(_same_base(base, seen) for seen in bases):
                    bases.append(base)
        if not bases:
            return None
        first = bases[0]
        return cls(first.a, first.b, first.shapes, tuple(bases[1:]))

    def write(self, folder: Path, names: Iterable[str]) -> str:
        """Write ``lineage.safetensors`` for ``names`` into ``folder``; returns its file name.

        Entries are ``a::<name>`` and ``b::<name>``, and ``a<i>::``/``b<i>::`` for the i-th
        further base. Written by rvhub's own writer: safetensors' ``save_file`` orders metadata
        keys differently from run to run (a hash map), and the same vector should give the same
        bytes."""
        names = list(names)
        tensors = {}
        for i, base in enumerate(self.bases()):
            suffix = str(i) if i else ""
            keep = [n for n in names if n in base.b]
            for role, values in (("a", base.a), ("b", base.b)):
                for n in keep:
                    tensors[f"{role}{suffix}::{n}"] = np.ascontiguousarray(values[n], dtype="<f4")
        meta = {"format": "np", "rvhub_lineage": ALGORITHM}
        specs = [(key, "F32", t.shape) for key, t in tensors.items()]
        writer = SafetensorsWriter(folder / LINEAGE_FILE, specs, meta, hash_contents=False)
        try:
            for t in tensors.values():
                writer.write(t.tobytes())
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return LINEAGE_FILE


def _same_base(x: Lineage, y: Lineage) -> bool:
    names = [n for n in x.b if n in y.b]
    return bool(names) and all(np.array_equal(x.b[n], y.b[n]) for n in names)


def read_lineage(folder: Path, manifest: Manifest | Mapping[str, Any]) -> Lineage | None:
    """The fingerprint an artifact recorded, or None for one made before it existed
    (``manifest`` typed, or as ``rvhub.json`` holds it)."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_json(dict(manifest))
    if LINEAGE_FILE not in manifest.files:
        return None
    path = artifact_file(folder, LINEAGE_FILE)
    entries, _ = read_header(path)
    out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    shapes = manifest.shapes
    with open(path, "rb") as f:
        for key, entry in entries.items():
            role, _, name = key.partition("::")
            m = _ROLE.fullmatch(role)
            if m is None or name not in shapes:
                raise IntegrityError(f"{folder}: {LINEAGE_FILE} holds an unexpected entry {key!r}")
            expected = sum(e - s for s, e in runs_of(name, math.prod(shapes[name])))
            if entry.numel != expected or entry.dtype != "F32":
                raise IntegrityError(f"{folder}: {LINEAGE_FILE} entry {key!r} has the wrong size")
            f.seek(entry.start)
            base = out.setdefault(int(m.group(2) or 0), {"a": {}, "b": {}})
            base[m.group(1)][name] = _as_float32(f.read(entry.nbytes), "F32")
    if sorted(out) != list(range(len(out))):
        raise IntegrityError(f"{folder}: {LINEAGE_FILE} skips a base ({sorted(out)})")
    bases = [Lineage(out[i]["a"], out[i]["b"], shapes) for i in sorted(out)]
    if not bases:
        return Lineage({}, {}, shapes)
    return Lineage(bases[0].a, bases[0].b, shapes, tuple(bases[1:]))


def sample_pair(a: Checkpoint, b: Checkpoint, names: list[str]) -> Lineage:
    """The fingerprint of two checkpoints over ``names`` (FP8 weights dequantized)."""
    return Lineage(
        sample_entries(a.entries, names, a.fp8_scales, a.fp8_block),
        sample_entries(b.entries, names, b.fp8_scales, b.fp8_block),
        {n: b.entries[n].shape for n in names},
    )


@dataclass
class Carried:
    """How much of v = A − B a target T already holds, at the fingerprinted positions: the
    least-squares coefficient of T − B on v (1: T is as far along v as A, e.g. T is A; 0: as
    far as B). Its standard error is a jackknife over tensors (values within a tensor's runs
    are not independent), and :meth:`explained` says how much of ‖T − B‖² lies along v
    (docs/reliability.md calibrates both)."""

    parts: list[tuple[float, float, float]] = field(
        default_factory=list
    )  # per tensor: v·v, d·v, d·d

    def add(self, v: np.ndarray, d: np.ndarray) -> None:
        self.parts.append((float(v @ v), float(d @ v), float(d @ d)))

    def share(self) -> float | None:
        vv = sum(p[0] for p in self.parts)
        return sum(p[1] for p in self.parts) / vv if vv > 0.0 else None

    def standard_error(self) -> float | None:
        share, k = self.share(), len(self.parts)
        if share is None or k < 3:
            return None
        vv, dv = sum(p[0] for p in self.parts), sum(p[1] for p in self.parts)
        leave_out = [(dv - p[1]) / (vv - p[0]) for p in self.parts if vv - p[0] > 0.0]
        mean = sum(leave_out) / len(leave_out)
        return math.sqrt((k - 1) / k * sum((x - mean) ** 2 for x in leave_out))

    def explained(self) -> float | None:
        """The share of ‖T − B‖² along v (1: T lies on the line through B and A)."""
        share = self.share()
        dd = sum(p[2] for p in self.parts)
        if share is None or dd == 0.0:
            return None
        return min(1.0, share * sum(p[1] for p in self.parts) / dd)


@dataclass
class LineageReport:
    """How far a target lies from the vector's B at the fingerprinted positions."""

    overall: float | None  # relative distance over the compared matrices; None: not checked
    tensors: dict[str, float] = field(default_factory=dict)  # per compared tensor
    compared: int = 0
    verdict: str = "unknown"  # related | uncertain | unrelated | unknown
    reason: str = ""
    # how much of v the target already holds: 1 = as far along v as A (see Carried)
    carried: float | None = None
    carried_se: float | None = None
    carried_fit: float | None = None  # share of ‖T − B‖² along v

    def far(self, limit: int = 3) -> list[tuple[str, float]]:
        return sorted(self.tensors.items(), key=lambda kv: -kv[1])[:limit]

    def describe(self) -> str:
        if self.overall is None:
            return f"lineage not checked: {self.reason}"
        worst = ", ".join(f"{n} {d:.3f}" for n, d in self.far())
        carried = ""
        if self.carried is not None:
            se = f" ± {self.carried_se:.0%}" if self.carried_se is not None else ""
            carried = f"; it already carries {self.carried:.0%}{se} of the vector"
        return (
            f"lineage: the target lies {self.overall:.3f} (relative) from the vector's B over "
            f"{self.compared} matrices ({self.verdict}){carried}; farthest: {worst}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "verdict": self.verdict,
            "compared": self.compared,
            "farthest": dict(self.far(5)),
            "carried": self.carried,
            "carried_se": self.carried_se,
            "carried_fit": self.carried_fit,
            **({"reason": self.reason} if self.reason else {}),
        }


def compare(reference: Lineage | None, target: Mapping[str, np.ndarray]) -> LineageReport:
    """Distances between the vector's B and the target's samples (same names, same shapes),
    and how much of the vector the target already carries (:class:`Carried`).

    A combination of vectors carries one fingerprint per term (:attr:`Lineage.more`): the
    target is measured against the nearest of their bases."""
    if reference is None:
        return LineageReport(
            None, reason="the vector has no lineage fingerprint (made before rvhub recorded one)"
        )
    reports = [_compare_one(ref, target) for ref in reference.bases()]
    measured = [r for r in reports if r.overall is not None]
    return min(measured, key=lambda r: r.overall or 0.0) if measured else reports[0]


def _compare_one(reference: Lineage, target: Mapping[str, np.ndarray]) -> LineageReport:
    num = den = 0.0
    carried = Carried()
    report = LineageReport(None)
    for name, t in target.items():
        b = reference.b.get(name)
        if b is None or b.size != t.size or len(reference.shapes.get(name, ())) < 2:
            continue
        b64, t64 = b.astype(np.float64), t.astype(np.float64)
        nb = float(np.linalg.norm(b64))
        if nb == 0.0:
            continue
        nd = float(np.linalg.norm(t64 - b64))
        report.tensors[name] = nd / nb
        num += nd * nd
        den += nb * nb
        a = reference.a.get(name)
        if a is not None and a.size == b.size:
            carried.add(a.astype(np.float64) - b64, t64 - b64)
    report.compared = len(report.tensors)
    if not report.compared:
        report.reason = "no fingerprinted matrix of the vector is in the target with its shape"
        return report
    report.overall = math.sqrt(num / den)
    report.carried = carried.share()
    report.carried_se = carried.standard_error()
    report.carried_fit = carried.explained()
    if report.overall > LINEAGE_REFUSE:
        report.verdict = "unrelated"
    elif report.overall > LINEAGE_WARN:
        report.verdict = "uncertain"
    else:
        report.verdict = "related"
    return report
