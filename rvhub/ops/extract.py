"""Extraction's pre-flight and provenance: do two checkpoints make a vector, which tensors
carry a delta, and what the manifest will record about where it came from.

:func:`prepare_extract` returns the lazy difference and its :class:`~rvhub.manifest.Provenance`;
nothing beyond the headers is read until the vector is written or applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..architecture import model_identity
from ..checkpoint import Checkpoint, check_config
from ..errors import CompatibilityError
from ..io.safetensors import FLOAT_DTYPES
from ..manifest import Provenance
from ..options import exclude_patterns, split_excluded
from ..sources import DifferenceSource
from .plan import listing


def prepare_extract(
    a: Checkpoint,
    b: Checkpoint,
    *,
    exclude: Iterable[str] = (),
    config_check: bool = True,
) -> tuple[DifferenceSource, Provenance]:
    """``A − B`` as a lazy source, with its provenance; refuses a pair that is not two
    fine-tunes of one model, and a vector that would be empty."""
    if config_check:
        check_config(a)
        check_config(b)
    check_pair(a, b)
    patterns = exclude_patterns(exclude)
    candidates, excluded = split_excluded((e.name for e in a.in_file_order()), patterns)
    names, skipped = [], []
    for name in candidates:
        if _is_float(a, name) and _is_float(b, name):
            names.append(name)
        else:
            skipped.append(name)  # integer buffers (position ids, ...) carry no delta
    if not names:
        raise CompatibilityError("every tensor was excluded: the vector would be empty")
    provenance = Provenance(
        sources={"a": describe_source(a), "b": describe_source(b)},
        model=model_identity(a.config),
        model_config={k: v for k, v in a.config.items() if not k.startswith("_")},
        excluded=tuple(excluded),
        exclude_patterns=tuple(patterns),
        skipped_non_float=tuple(skipped),
    )
    return DifferenceSource(a, b, names), provenance


def check_pair(a: Checkpoint, b: Checkpoint) -> None:
    """A and B must share architecture, tensor names and shapes (dtypes may differ)."""
    problems: list[str] = []
    if a.model_type and b.model_type and a.model_type != b.model_type:
        problems.append(f"model_type {a.model_type} vs {b.model_type}")
    if a.architectures and b.architectures and a.architectures != b.architectures:
        problems.append(f"architectures {a.architectures} vs {b.architectures}")
    only_a = [n for n in a.entries if n not in b.entries]
    only_b = [n for n in b.entries if n not in a.entries]
    if only_a:
        problems.append(f"only in A: {listing(only_a)}")
    if only_b:
        problems.append(f"only in B: {listing(only_b)}")
    shape_diff = [
        f"{n} {list(a.entries[n].shape)} vs {list(b.entries[n].shape)}"
        for n in a.entries
        if n in b.entries and a.entries[n].shape != b.entries[n].shape
    ]
    if shape_diff:
        problems.append(f"shape differs: {listing(shape_diff)}")
    if problems:
        raise CompatibilityError(
            "A and B are not fine-tunes of the same model: "
            + "; ".join(problems)
            + " (a reasoning vector needs two checkpoints of one architecture)"
        )


def _is_float(ckpt: Checkpoint, name: str) -> bool:
    return ckpt.entries[name].dtype in FLOAT_DTYPES or name in ckpt.fp8_scales


def describe_source(ckpt: Checkpoint) -> dict[str, Any]:
    """A source as the manifest records it: repo and commit or local path, dtypes, size, and
    an FP8 checkpoint's quantization."""
    info = dict(ckpt.source)
    if ckpt.fp8_block is not None:
        info["quantization"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": list(ckpt.fp8_block),
            "fp8_weights": len(ckpt.fp8_scales),
        }
    info.setdefault("kind", "local")
    info["dtype"] = sorted({e.dtype for e in ckpt.entries.values()})
    info["nbytes"] = ckpt.nbytes
    return info


__all__ = ["check_pair", "describe_source", "prepare_extract"]
