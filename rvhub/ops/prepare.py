"""The one pre-flight of every apply: disk (:mod:`.disk`), live (:mod:`.live`), ``rvhub check``
and ``rvhub eval`` all call :func:`prepare_apply`, so a bad target is refused by the same
checks, in the same order, with the same message, once per command.

The order is cheapest and clearest first: model type, then names and shapes (vocabulary and
tied embeddings included: :func:`~.plan.plan_apply`), then the lineage fingerprint (a few
values per tensor), then the size of ``α·v`` against the weights, then the deltas' finiteness
(answered by a verified manifest without reading them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CompatibilityError
from ..lineage import Lineage, LineageReport
from ..options import ApplyOptions, split_excluded
from .lineage import carried_warning, check_change_size, checkpoint_lineage, enforce
from .plan import ApplyPlan, ApplyReport, check_finite, plan_apply, zero_scale_note

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..manifest import Manifest
    from ..sources import VectorSource


@dataclass(frozen=True)
class ApplyTarget:
    """What the pre-flight reads of a target, on disk or live.

    ``shapes``: its tensor names (checkpoint names on disk, parameter names live) and shapes;
    ``tied``: whether its lm_head shares the embedding's storage; ``float16``: names held in
    float16 (their overflow is checked value by value while adding, not by size); ``sample``
    measures its distance from a vector's lineage fingerprint; ``converted``: a live model
    whose parameters are fused from checkpoint tensors (MoE), mapped by the live apply itself.
    """

    shapes: Mapping[str, tuple[int, ...]]
    config: Mapping[str, Any]
    tied: bool
    float16: frozenset[str]
    sample: Callable[[Lineage | None, Mapping[str, tuple[int, ...]]], LineageReport]
    converted: bool = False

    @classmethod
    def of_checkpoint(cls, ckpt: Checkpoint) -> ApplyTarget:
        """A checkpoint on disk (its safetensors headers; values are read only to sample)."""
        return cls(
            shapes={n: e.shape for n, e in ckpt.entries.items()},
            config=ckpt.config,
            tied=ckpt.tie_word_embeddings and "lm_head.weight" not in ckpt.entries,
            float16=frozenset(n for n, e in ckpt.entries.items() if e.dtype == "F16"),
            sample=lambda ref, shapes: checkpoint_lineage(ref, shapes, ckpt),
        )


@dataclass(frozen=True)
class VectorFacts:
    """What the pre-flight reads of a vector: shapes, recorded model identity, verified
    manifest (if any), lineage fingerprint (if any) and, when it can be read, its source."""

    shapes: Mapping[str, tuple[int, ...]]
    model_info: Mapping[str, Any]
    manifest: Manifest | None = None
    lineage: Lineage | None = None
    source: VectorSource | None = None

    @classmethod
    def of_source(
        cls, source: VectorSource, model_info: Mapping[str, Any], manifest: Manifest | None
    ) -> VectorFacts:
        return cls(source.shapes, model_info, manifest, source.lineage(), source)


@dataclass
class PreparedApply:
    """What passed the pre-flight: the plan, the lineage figures, and the report to fill."""

    plan: ApplyPlan
    lineage: LineageReport
    report: ApplyReport
    wanted: list[str] = field(default_factory=list)  # vector names not excluded


def check_model_type(model_info: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """A vector only fits models of the architecture it was extracted from."""
    vt, tt = model_info.get("model_type"), config.get("model_type")
    if vt and tt and vt != tt:
        raise CompatibilityError(
            f"the vector was made for model_type {vt}, the target is {tt}; "
            "a vector only fits models of the architecture it was extracted from"
        )


def prepare_apply(vector: VectorFacts, target: ApplyTarget, options: ApplyOptions) -> PreparedApply:
    """Run every check an apply makes before changing anything; raise on the first that fails.

    Returns the plan (which vector tensor lands on which target tensor), the lineage figures
    and an :class:`~.plan.ApplyReport` with the notes a user should see (α = 0, a doubtful
    lineage). Reads nothing but headers, a few values per tensor and the manifest, unless the
    vector has no verified manifest to answer for its finiteness.
    """
    check_model_type(vector.model_info, target.config)
    wanted, excluded = split_excluded(vector.shapes, options.exclude)
    if target.converted:  # the live apply maps checkpoint names onto fused parameters itself
        plan = ApplyPlan(excluded=excluded)
        applied: Iterable[str] = [
            n for n in wanted if n in target.shapes and n not in target.float16
        ]
        changed = wanted
    else:
        plan = plan_apply(
            vector.shapes,
            vector.model_info,
            target.shapes,
            target.config,
            vocab=options.vocab,
            excluded=excluded,
            target_tied=target.tied,
        )
        applied = [v for t, (v, _) in plan.targets.items() if t not in target.float16]
        changed = sorted({v for v, _ in plan.targets.values()})
    lineage = target.sample(vector.lineage, vector.shapes)
    note = enforce(lineage, allow_unrelated=options.allow_unrelated)
    check_change_size(vector.lineage, options.alpha, applied)
    check_finite(vector.source, vector.manifest, changed, options.allow_nonfinite)
    report = ApplyReport.from_plan(plan, options.alpha)
    report.lineage = lineage.as_json()
    zero = zero_scale_note(options.alpha, options.given_scale)
    for warning in (zero, note, carried_warning(lineage)):
        if warning:
            report.warn(warning)
    return PreparedApply(plan, lineage, report, wanted)


__all__ = ["ApplyTarget", "PreparedApply", "VectorFacts", "check_model_type", "prepare_apply"]
