"""The lineage guard of every apply: refuse a target of another lineage, warn on a doubtful
one, and say so when a vector carries no fingerprint to check with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint
from ..constants import LINEAGE_REFUSE, LINEAGE_WARN
from ..errors import CompatibilityError
from ..io.progress import logger
from ..lineage import Lineage, LineageReport, compare, sample_entries, sample_tensor

if TYPE_CHECKING:
    import torch


def checkpoint_lineage(
    reference: Lineage | None, shapes: Mapping[str, tuple[int, ...]], ckpt: Checkpoint
) -> LineageReport:
    """Compare a checkpoint on disk with a vector's fingerprint (a few reads per tensor).

    ``shapes`` are the vector's; only tensors the target holds with the same name and shape
    are compared."""
    names = _comparable(reference, shapes, {k: e.shape for k, e in ckpt.entries.items()})
    return compare(reference, sample_entries(ckpt.entries, names))


def model_lineage(
    reference: Lineage | None,
    shapes: Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, torch.Tensor],
) -> LineageReport:
    """Compare a live model's parameters (and buffers) with a vector's fingerprint."""
    # offloaded (meta) tensors hold no values; live apply refuses them itself
    present = {k: tuple(t.shape) for k, t in tensors.items() if t.device.type != "meta"}
    names = _comparable(reference, shapes, present)
    return compare(reference, {n: sample_tensor(n, tensors[n]) for n in names})


def _comparable(
    reference: Lineage | None,
    shapes: Mapping[str, tuple[int, ...]],
    target: Mapping[str, tuple[int, ...]],
) -> list[str]:
    if reference is None:
        return []
    return [
        n for n, s in shapes.items() if n in reference.b and tuple(target.get(n, ())) == tuple(s)
    ]


def enforce(report: LineageReport, *, allow_unrelated: bool) -> str | None:
    """Raise for an unrelated target (unless allowed); return the note to show, if any."""
    if report.verdict == "unrelated" and not allow_unrelated:
        worst = ", ".join(f"{n} at {d:.2f}" for n, d in report.far())
        raise CompatibilityError(
            f"the target is not of the vector's lineage: its weights lie {report.overall:.2f} "
            f"(relative) from the vector's base over {report.compared} matrices (fine-tunes of "
            f"one base stay under {LINEAGE_WARN}; farthest: {worst}); a vector only transfers "
            "to descendants of the base it was extracted from; pass --allow-unrelated "
            "(allow_unrelated=True) to apply it anyway"
        )
    if report.verdict in ("uncertain", "unrelated") or report.overall is None:
        note = report.describe()
        if report.verdict == "uncertain":
            note += f"; between {LINEAGE_WARN} and {LINEAGE_REFUSE} the target may not descend from the vector's base"
        logger.warning("%s", note)
        return note
    return None
