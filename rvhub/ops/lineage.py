"""The lineage guard of every apply: refuse a target of another lineage, warn on a doubtful
one, and say so when a vector carries no fingerprint to check with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..checkpoint import Checkpoint
from ..constants import CARRIED_FIT, CARRIED_WARN, LINEAGE_REFUSE, LINEAGE_WARN
from ..errors import CompatibilityError, InputError
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
    return compare(reference, sample_entries(ckpt.entries, names, ckpt.fp8_scales, ckpt.fp8_block))


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
    """Raise for an unrelated target (unless allowed); return the warning to show, if any
    (the caller logs it once: :meth:`~.plan.ApplyReport.warn`)."""
    if report.verdict == "unrelated" and not allow_unrelated:
        worst = ", ".join(f"{n} at {d:.2f}" for n, d in report.far())
        raise CompatibilityError(
            f"the target is not of the vector's lineage: its weights lie {report.overall:.2f} "
            f"(relative) from the vector's base over {report.compared} matrices (fine-tunes of "
            f"one base stay under {LINEAGE_WARN}; farthest: {worst}); a vector only transfers "
            "to descendants of the base it was extracted from; pass `allow_unrelated=True` "
            "to apply it anyway"
        )
    if report.verdict in ("uncertain", "unrelated") or report.overall is None:
        note = report.describe()
        if report.verdict == "uncertain":
            note += f"; between {LINEAGE_WARN} and {LINEAGE_REFUSE} the target may not descend from the vector's base"
        return note
    return None


def carried_warning(report: LineageReport) -> str | None:
    """The warning for a target that already holds much of the vector (it is A, or an earlier
    apply's output), or None. Only a target whose difference from B lies mostly along v is
    judged: for one that moved far in other directions (an instruct model) the share is too
    uncertain to act on (docs/reliability.md)."""
    share, fit = report.carried, report.carried_fit
    if share is None or fit is None or share < CARRIED_WARN or fit < CARRIED_FIT:
        return None
    looks = (
        "it looks like A, the model the vector was taken from"
        if abs(share - 1.0) < 0.1
        else f"it looks like the vector's B + {share:.2g}·v"
    )
    return (
        f"the target already carries ~{share:.0%} of this vector ({fit:.0%} of its difference "
        f"from the vector's B lies along it): {looks}; adding α·v gives B + ({share:.2g} + α)·v"
    )


def check_related(
    lineages: Sequence[tuple[Lineage | None, str]], *, allow_unrelated: bool
) -> LineageReport | None:
    """Refuse to combine vectors whose bases are of different lineages (unless allowed): each
    term's B is measured against the first fingerprinted term's as a target would be.
    ``lineages`` pairs each term's fingerprint with the name to show; returns the farthest
    report (None when fewer than two terms carry a fingerprint)."""
    known = [(lin, label) for lin, label in lineages if lin is not None]
    if len(known) < 2:
        return None
    (reference, first), worst = known[0], None
    for lineage, label in known[1:]:
        for base in lineage.bases():
            report = compare(reference, base.b)
            if report.overall is None:
                continue
            if worst is None or report.overall > (worst.overall or 0.0):
                worst = report
            if report.verdict == "unrelated" and not allow_unrelated:
                raise CompatibilityError(
                    f"cannot combine {label} with {first}: their bases lie "
                    f"{report.overall:.2f} (relative) apart over {report.compared} matrices "
                    f"(fine-tunes of one base stay under {LINEAGE_WARN}); a sum of vectors of "
                    "different lineages fits no model; pass `allow_unrelated=True` to build it "
                    "anyway"
                )
    if worst is not None and worst.verdict in ("uncertain", "unrelated"):
        logger.warning(
            "the vectors' bases lie %.2f (relative) apart: they may not share a lineage",
            worst.overall,
        )
    return worst


MAX_RELATIVE_CHANGE = 10.0  # ‖α·v‖ / ‖B‖ beyond which the result is the vector, not the model


def check_change_size(reference: Lineage | None, scale: float, names: Iterable[str]) -> None:
    """Refuse an α that makes the change an order of magnitude larger than the weights.

    ``--scale 1e30`` on a bf16 target gave finite, meaningless weights of ~1e36: bfloat16 and
    float32 hold such numbers, so only the size of the change tells. Measured over the
    fingerprinted values of the matrices ``names``, as ``|α|·‖A − B‖ / ‖B‖``. (float16 targets
    overflow long before this and are checked value by value as the apply writes them.)
    """
    if reference is None or scale == 0.0:
        return
    num = den = 0.0
    for name in names:
        a, b = reference.a.get(name), reference.b.get(name)
        if a is None or b is None or len(reference.shapes.get(name, ())) < 2:
            continue
        num += float(np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        den += float(np.sum(b.astype(np.float64) ** 2))
    if num == 0.0 or den == 0.0:
        return
    change = abs(scale) * (num / den) ** 0.5
    if change > MAX_RELATIVE_CHANGE:
        raise InputError(
            f"at scale {scale:g} the vector would change the weights by {change:.3g}× their own "
            f"size (‖α·v‖ / ‖B‖; beyond {MAX_RELATIVE_CHANGE:g}× the result is the vector, not "
            "the model); a reasoning vector is a small change: use |α| of a few"
        )
