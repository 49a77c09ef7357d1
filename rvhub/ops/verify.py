"""``B + v ≈ A``: checking a vector against the checkpoints it claims to come from."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..constants import CHUNK_ELEMS
from ..errors import CompatibilityError, IntegrityError
from ..io.progress import bar
from ..io.safetensors import FileHandles, iter_chunks
from ..sources import DifferenceSource, VectorSource


def verify_against(
    source: VectorSource,
    recorded_error: Mapping[str, Any] | None,
    ca: Checkpoint,
    cb: Checkpoint,
    *,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Stream ``B + v − A`` over every vector tensor; raise if it exceeds ``tolerance``.

    The default tolerance is the round-trip error the manifest recorded at extraction
    (``recorded_error``, plus a float32 epsilon): a vector reproduces its sources exactly as well as
    when it was made.
    """
    handles = FileHandles()
    pair = DifferenceSource(ca, cb, [])  # reads A and B as extract did (FP8 dequantized)
    names = list(source.shapes)
    err = ref = 0.0
    max_abs = 0.0
    progress = bar(sum(e.nbytes for n, e in ca.entries.items() if n in source.shapes), "verifying")
    try:
        for name in names:
            if name not in ca.entries or name not in cb.entries:
                raise CompatibilityError(f"{name} is in the vector but not in both A and B")
            ea, eb = ca.entries[name], cb.entries[name]
            if ea.shape != source.shapes[name] or eb.shape != source.shapes[name]:
                raise CompatibilityError(f"{name} has another shape in A or B than in the vector")
            for s, e in iter_chunks(ea.numel, CHUNK_ELEMS):
                av, bv = (t.float() for t in pair.parts(name, s, e))
                r = bv + source.chunk(name, s, e) - av
                d = av - bv
                err += float(torch.dot(r, r))
                ref += float(torch.dot(d, d))
                if r.numel():
                    max_abs = max(max_abs, float(r.abs().max()))
                progress.update(ea.nbytes * (e - s) // max(ea.numel, 1))
    finally:
        progress.close()
        handles.close()
    rel = math.sqrt(err) / math.sqrt(ref) if ref > 0 else math.sqrt(err)
    recorded = (recorded_error or {}).get("rel", 0.0)
    limit = tolerance if tolerance is not None else recorded * 1.001 + 1e-6
    if not math.isfinite(rel) or rel > limit:
        raise IntegrityError(
            f"B + v does not reproduce A: relative error {rel:.3e} exceeds {limit:.3e}; "
            "these are not the vector's sources, or the vector is damaged"
        )
    return {"rel": rel, "abs": math.sqrt(err), "max_abs": max_abs, "tensors": len(names)}
