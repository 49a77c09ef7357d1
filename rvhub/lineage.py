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
_ROLES = ("a", "b")
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
    """Sampled values of the vector's sources A and B, by tensor name."""

    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]

    def write(self, folder: Path, names: Iterable[str]) -> str:
        """Write ``lineage.safetensors`` for ``names`` into ``folder``; returns its file name.

        Written by rvhub's own writer: safetensors' ``save_file`` orders metadata keys
        differently from run to run (a hash map), and the same vector should give the same
        bytes."""
        keep = [n for n in names if n in self.b]
        tensors = {
            f"{role}::{n}": np.ascontiguousarray(values[n], dtype="<f4")
            for role, values in (("a", self.a), ("b", self.b))
            for n in keep
        }
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


def read_lineage(folder: Path, manifest: Manifest | Mapping[str, Any]) -> Lineage | None:
    """The fingerprint an artifact recorded, or None for one made before it existed
    (``manifest`` typed, or as ``rvhub.json`` holds it)."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_json(dict(manifest))
    if LINEAGE_FILE not in manifest.files:
        return None
    path = artifact_file(folder, LINEAGE_FILE)
    entries, _ = read_header(path)
    out: dict[str, dict[str, np.ndarray]] = {"a": {}, "b": {}}
    shapes = manifest.shapes
    with open(path, "rb") as f:
        for key, entry in entries.items():
            role, _, name = key.partition("::")
            if role not in _ROLES or name not in shapes:
                raise IntegrityError(f"{folder}: {LINEAGE_FILE} holds an unexpected entry {key!r}")
            expected = sum(e - s for s, e in runs_of(name, math.prod(shapes[name])))
            if entry.numel != expected or entry.dtype != "F32":
                raise IntegrityError(f"{folder}: {LINEAGE_FILE} entry {key!r} has the wrong size")
            f.seek(entry.start)
            out[role][name] = _as_float32(f.read(entry.nbytes), "F32")
    return Lineage(out["a"], out["b"], shapes)


def sample_pair(a: Checkpoint, b: Checkpoint, names: list[str]) -> Lineage:
    """The fingerprint of two checkpoints over ``names`` (FP8 weights dequantized)."""
    return Lineage(
        sample_entries(a.entries, names, a.fp8_scales, a.fp8_block),
        sample_entries(b.entries, names, b.fp8_scales, b.fp8_block),
        {n: b.entries[n].shape for n in names},
    )


@dataclass
class LineageReport:
    """How far a target lies from the vector's B at the fingerprinted positions."""

    overall: float | None  # relative distance over the compared matrices; None: not checked
    tensors: dict[str, float] = field(default_factory=dict)  # per compared tensor
    compared: int = 0
    verdict: str = "unknown"  # related | uncertain | unrelated | unknown
    reason: str = ""

    def far(self, limit: int = 3) -> list[tuple[str, float]]:
        return sorted(self.tensors.items(), key=lambda kv: -kv[1])[:limit]

    def describe(self) -> str:
        if self.overall is None:
            return f"lineage not checked: {self.reason}"
        worst = ", ".join(f"{n} {d:.3f}" for n, d in self.far())
        return (
            f"lineage: the target lies {self.overall:.3f} (relative) from the vector's B over "
            f"{self.compared} matrices ({self.verdict}); farthest: {worst}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "verdict": self.verdict,
            "compared": self.compared,
            "farthest": dict(self.far(5)),
            **({"reason": self.reason} if self.reason else {}),
        }


def compare(reference: Lineage | None, target: Mapping[str, np.ndarray]) -> LineageReport:
    """Distances between the vector's B and the target's samples (same names, same shapes)."""
    if reference is None:
        return LineageReport(
            None, reason="the vector has no lineage fingerprint (made before rvhub recorded one)"
        )
    num = den = 0.0
    report = LineageReport(None)
    for name, t in target.items():
        b = reference.b.get(name)
        if b is None or b.size != t.size or len(reference.shapes.get(name, ())) < 2:
            continue
        nb = float(np.linalg.norm(b.astype(np.float64)))
        if nb == 0.0:
            continue
        nd = float(np.linalg.norm(t.astype(np.float64) - b.astype(np.float64)))
        report.tensors[name] = nd / nb
        num += nd * nd
        den += nb * nb
    report.compared = len(report.tensors)
    if not report.compared:
        report.reason = "no fingerprinted matrix of the vector is in the target with its shape"
        return report
    report.overall = math.sqrt(num / den)
    if report.overall > LINEAGE_REFUSE:
        report.verdict = "unrelated"
    elif report.overall > LINEAGE_WARN:
        report.verdict = "uncertain"
    else:
        report.verdict = "related"
    return report
