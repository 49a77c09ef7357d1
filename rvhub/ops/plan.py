"""The one place that decides whether two checkpoints, or a vector and a model, fit together,
and what an apply will do (:class:`ApplyPlan`) and did (:class:`ApplyReport`).

Every check returns or raises with the reasons spelled out, so a user sees the first few
differences rather than a shape error deep inside a matmul.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..architecture import TIED_EMBEDDING_NAMES, TIED_HEAD_NAMES, has_vocab_axis, tied_embeddings
from ..constants import VOCAB_MODES
from ..errors import CompatibilityError, InputError
from ..io.progress import logger
from ..options import one_of

if TYPE_CHECKING:
    import torch

    from ..manifest import Manifest
    from ..sources import VectorSource

MAX_LISTED = 5


def listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return shown + more


def persistent_float_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Floating buffers that ``state_dict()`` holds (so checkpoints store them and on-disk apply
    changes them: DeepSeek-V3's ``e_score_correction_bias``), by name."""
    persistent = set(model.state_dict(keep_vars=True))
    return {n: b for n, b in model.named_buffers() if n in persistent and b.is_floating_point()}


@dataclass
class ApplyPlan:
    """How each vector tensor lands on the target: by target name."""

    # target name -> (vector name, rows to apply or None for all)
    targets: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)  # vector names matched by ``exclude``
    missing: list[str] = field(default_factory=list)  # vector names the target lacks
    untouched: list[str] = field(default_factory=list)  # target names the vector lacks
    notes: list[str] = field(default_factory=list)


def plan_apply(
    vector_shapes: Mapping[str, tuple[int, ...]],
    vector_model: Mapping[str, Any],
    target_shapes: Mapping[str, tuple[int, ...]],
    target_config: Mapping[str, Any],
    *,
    vocab: str = "strict",
    excluded: Sequence[str] = (),
    target_tied: bool | None = None,
) -> ApplyPlan:
    """Decide which vector tensor goes where on a target, or raise saying why it cannot
    (the model type is :func:`~.prepare.check_model_type`'s, run before).

    ``target_shapes`` are the target's tensor names (checkpoint names for an on-disk target);
    ``target_tied`` says whether the target's lm_head shares the embedding storage.
    """
    one_of("vocab", vocab, VOCAB_MODES)
    plan = ApplyPlan(excluded=list(excluded))
    tied = tied_embeddings(dict(target_config)) if target_tied is None else target_tied
    shape_problems: list[str] = []
    vocab_problems: list[str] = []
    for name, vshape in vector_shapes.items():
        if name in excluded:
            continue
        if name not in target_shapes:
            plan.missing.append(name)
            continue
        tshape = tuple(target_shapes[name])
        if tshape == tuple(vshape):
            plan.targets[name] = (name, None)
            continue
        if has_vocab_axis(name) and len(vshape) == len(tshape) and vshape[1:] == tshape[1:]:
            if vocab == "overlap":
                rows = min(vshape[0], tshape[0])
                plan.targets[name] = (name, rows)
                plan.notes.append(
                    f"{name}: vocab {vshape[0]} vs {tshape[0]}, delta added to the first {rows} rows"
                )
            else:
                vocab_problems.append(f"{name} {vshape[0]} vs {tshape[0]} rows")
            continue
        shape_problems.append(f"{name} {list(vshape)} vs {list(tshape)}")
    if shape_problems:
        raise CompatibilityError(
            f"the vector does not fit the target: shape differs for {listing(shape_problems)}"
        )
    if vocab_problems:
        raise CompatibilityError(
            f"vocabulary size differs ({listing(vocab_problems)}); pass `vocab='overlap'` to add "
            "the delta to the shared rows (only valid when both tokenizers give the same ids)"
        )
    if len(plan.targets) == 0 and not plan.excluded:
        raise CompatibilityError(
            "no tensor of the vector matches a tensor of the target; is this the right model?"
        )
    _plan_tied(plan, vector_shapes, vector_model, target_shapes, tied)
    plan.untouched = [n for n in target_shapes if n not in plan.targets]
    return plan


def _plan_tied(
    plan: ApplyPlan,
    vector_shapes: Mapping[str, tuple[int, ...]],
    vector_model: Mapping[str, Any],
    target_shapes: Mapping[str, tuple[int, ...]],
    target_tied: bool,
) -> None:
    """Apply an embedding delta exactly once per storage, whatever ties the two sides use."""
    embed = next((n for n in TIED_EMBEDDING_NAMES if n in vector_shapes), None)
    head = next((n for n in TIED_HEAD_NAMES if n in vector_shapes), None)
    head_in_target = next((n for n in TIED_HEAD_NAMES if n in target_shapes), None)
    if target_tied and head and head in plan.targets and embed and embed in plan.targets:
        # The target's lm_head is its embedding: two deltas for one storage.
        raise CompatibilityError(
            "the target ties lm_head to the embeddings, but the vector has separate deltas for "
            f"{embed} and {head}; pass `exclude='{re.escape(head)}'` to apply only the "
            "embedding delta"
        )
    if target_tied and head and head in plan.targets and not embed:
        plan.notes.append(f"{head}: the target ties it to the embeddings; delta applied once")
    vector_tied = bool(vector_model.get("tie_word_embeddings")) and head is None
    if (
        vector_tied
        and not target_tied
        and embed
        and embed in plan.targets
        and head_in_target
        and head_in_target not in plan.excluded
    ):
        # Sources tied lm_head to the embeddings, so lm_head moved by the embedding delta too.
        rows = plan.targets[embed][1]
        if target_shapes[head_in_target][1:] == target_shapes[embed][1:]:
            plan.targets[head_in_target] = (embed, rows)
            plan.notes.append(
                f"{head_in_target}: the vector's sources tie it to {embed}; the same delta is "
                "added to the target's separate lm_head"
            )
        if head_in_target in plan.missing:
            plan.missing.remove(head_in_target)


@dataclass
class ApplyReport:
    """What an apply did: target tensor names changed, and vector/target names left alone."""

    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # vector tensors matched by ``exclude``
    missing: list[str] = field(default_factory=list)  # vector tensors the target lacks
    untouched: list[str] = field(default_factory=list)  # target tensors the vector lacks
    notes: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)  # notes already logged as warnings
    scale: float = 1.0
    output: str | None = None
    lineage: dict[str, Any] | None = None  # the target's distance from the vector's base
    # FP8 targets: how much of ‖α·v‖ survived requantization, overall and per tensor
    requantization: dict[str, Any] | None = None

    @classmethod
    def from_plan(cls, plan: ApplyPlan, scale: float) -> ApplyReport:
        return cls(
            applied=list(plan.targets),
            skipped=list(plan.excluded),
            missing=list(plan.missing),
            untouched=list(plan.untouched),
            notes=list(plan.notes),
            scale=scale,
        )

    def warn(self, note: str) -> None:
        """Log ``note`` as a warning, once, and keep it with the notes (a CLI prints the notes
        it has not seen logged: :attr:`warned`)."""
        logger.warning("%s", note)
        self.notes.append(note)
        self.warned.append(note)

    def summary(self) -> str:
        parts = [f"applied {len(self.applied)} tensors at scale {self.scale:g}"]
        if self.skipped:
            parts.append(f"excluded {len(self.skipped)}")
        if self.missing:
            parts.append(f"{len(self.missing)} vector tensors absent from the target")
        if self.untouched:
            parts.append(f"{len(self.untouched)} target tensors left as they were")
        return ", ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "applied": self.applied,
            "skipped": self.skipped,
            "missing": self.missing,
            "untouched": self.untouched,
            "notes": self.notes,
            "lineage": self.lineage,
            **({"requantization": self.requantization} if self.requantization else {}),
        }


def zero_scale_note(scale: float, given: object) -> str | None:
    """The warning for α = 0 (``-0``, ``1e-400``): the result is the target unchanged."""
    if scale != 0.0:
        return None
    return f"scale {given!r} is 0: the result equals the target (nothing is added)"


def check_finite(
    source: VectorSource | None,
    manifest: Manifest | None,
    names: Iterable[str],
    allow_nonfinite: bool,
) -> None:
    """Refuse deltas holding NaN/Inf unless allowed. A verified manifest answers without
    reading the deltas; without one, ``source``'s deltas are read (without either, nothing is
    known and nothing is refused)."""
    if allow_nonfinite:
        return
    hint = "pass `allow_nonfinite=True` to apply it anyway"
    if manifest is not None:
        for name in names:
            record = manifest.tensors.get(name)
            if record is not None and record.nonfinite:
                raise InputError(f"the vector's delta for {name} holds NaN/Inf values; {hint}")
        return  # hashes verified against a manifest that records none
    if source is None:
        return
    import torch

    for name in names:
        d = source.get(name, None)
        if d.is_floating_point() and not bool(torch.isfinite(d).all()):
            raise InputError(f"the vector's delta for {name} holds NaN/Inf values; {hint}")
