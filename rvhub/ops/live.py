"""Adding ``α·v`` to a live ``nn.Module`` in place, each delta on its parameter's own device.

The math is float32 (or the parameter's wider dtype) with one rounding to the parameter's
dtype. Dense deltas of CUDA parameters go straight from the pinned file to the GPU
(:mod:`rvhub.io.gpu`); fused MoE parameters receive deltas mapped through transformers' own
conversion ops (:mod:`rvhub.ops.conversion`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch

from ..errors import CompatibilityError
from ..io.kernels import add_scaled_, set_scaled_
from ..manifest import Manifest
from ..options import ApplyOptions, check_scale, split_excluded
from ..sources import VectorSource
from .lineage import check_change_size, model_lineage
from .plan import ApplyReport, persistent_float_buffers
from .prepare import ApplyTarget, PreparedApply, VectorFacts, prepare_apply


def apply_to_model(
    vector: VectorFacts,
    source: VectorSource,
    model: torch.nn.Module,
    options: ApplyOptions,
    *,
    snapshot: dict[str, torch.Tensor] | None = None,
    deltas: dict[str, tuple[torch.Tensor, int | None]] | None = None,
) -> ApplyReport:
    """Add ``scale · v`` to ``model`` in place; see :meth:`rvhub.ReasoningVector.apply_to`.

    ``vector`` is what the pre-flight reads of the vector (:func:`.prepare.prepare_apply`).
    ``snapshot``: each tensor about to change that it does not hold yet is cloned into it
    first (:class:`ScaleSwitch` keeps the pristine θ this way); ``deltas`` receives each delta
    added, on its device.
    """
    # tied weights appear once; persistent floating buffers (a checkpoint stores them, and
    # on-disk apply changes them: DeepSeek-V3's e_score_correction_bias) are targets too
    params = {**persistent_float_buffers(model), **dict(model.named_parameters())}
    target = model_target(model, params, vector.shapes, options.exclude)
    prepared = prepare_apply(vector, target, options)
    report = prepared.report
    if target.converted:
        _apply_converted(source, model, params, prepared, options.alpha, snapshot)
    else:
        plan = prepared.plan
        work = [(t, params[t], vname, rows) for t, (vname, rows) in plan.targets.items()]
        _refuse_offloaded(plan.targets, params)
        _add_live(source, work, options.alpha, snapshot, deltas)
    _warn_overflow(model, report)
    return report


def model_target(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    vector_shapes: Mapping[str, tuple[int, ...]],
    exclude: Iterable[str],
) -> ApplyTarget:
    """What the pre-flight reads of a live model: its parameters' (and persistent floating
    buffers') names and shapes, config, ties and float16 tensors."""
    tensors = {**dict(model.named_buffers()), **params}
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    wanted, _ = split_excluded(vector_shapes, exclude)
    return ApplyTarget(
        shapes={n: tuple(p.shape) for n, p in params.items()},
        config=config_dict,
        tied=_live_tied(model),
        float16=frozenset(n for n, p in params.items() if p.dtype == torch.float16),
        sample=lambda ref, shapes: model_lineage(ref, shapes, tensors),
        converted=_needs_conversion(model, wanted, params),
    )


def _refuse_offloaded(names: Iterable[str], params: dict[str, torch.Tensor]) -> None:
    """A parameter on the meta device (accelerate's disk offload) would ignore an add_; an FP8
    parameter (transformers' FineGrainedFP8 on a GPU) has per-block scales beside it that an
    add would leave stale."""
    names = list(names)
    fp8 = [
        n
        for n in names
        if n in params and params[n].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    ]
    if fp8:
        raise CompatibilityError(
            f"{fp8[0]} (and {len(fp8) - 1} more) are FP8 weights with block scales: an in-place "
            "add cannot requantize them; apply to the checkpoint with `rvhub apply` (it "
            "requantizes each block), or load the model dequantized "
            "(quantization_config=FineGrainedFP8Config(dequantize=True))"
        )
    offloaded = [n for n in names if n in params and params[n].device.type == "meta"]
    if offloaded:
        raise CompatibilityError(
            f"{offloaded[0]} (and {len(offloaded) - 1} more) are offloaded (meta device): an "
            "in-place add would be lost; apply to the checkpoint on disk with `rvhub apply` "
            "instead, or load the model without disk offload"
        )


def _needs_conversion(model: torch.nn.Module, names: list[str], params: Mapping[str, Any]) -> bool:
    """True when the vector's checkpoint names are not the model's live parameter names."""
    # A tied lm_head is not in named_parameters(); plan_apply handles it.
    unknown = [n for n in names if n not in params and n != "lm_head.weight"]
    if not unknown:
        return False
    from .conversion import has_conversions  # imports transformers: only when needed

    return has_conversions(model)


def _apply_converted(
    source: VectorSource,
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    prepared: PreparedApply,
    scale: float,
    snapshot: dict[str, torch.Tensor] | None,
) -> None:
    """Map checkpoint-format deltas through transformers' own conversion ops (fused MoE)."""
    from .conversion import plan_live_mapping

    live = plan_live_mapping(model, prepared.wanted)
    report = prepared.report
    report.missing = list(live.unmapped)
    _refuse_offloaded((t for g in live.groups for t in g.targets), params)
    seen: set[int] = set()
    with torch.no_grad():
        for pname, delta in live.deltas(lambda n: source.get(n, None)):
            p = params[pname]
            if p.data_ptr() in seen:
                report.notes.append(
                    f"{pname}: shares storage with a tensor already changed; skipped"
                )
                continue
            seen.add(p.data_ptr())
            if tuple(p.shape) != tuple(delta.shape):
                raise CompatibilityError(
                    f"the vector does not fit the target: {pname} is {list(p.shape)}, "
                    f"the mapped delta {list(delta.shape)}"
                )
            _keep(snapshot, pname, p)
            add_scaled_(p.data, delta.to(p.device, non_blocking=False), scale)
            report.applied.append(pname)
    report.untouched = [n for n in params if n not in set(report.applied)]


def _live_tied(model: torch.nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    try:
        emb, head = get_in(), get_out()
    except (AttributeError, NotImplementedError):
        return False
    return emb is not None and head is not None and head.weight is emb.weight


def _keep(snapshot: dict[str, torch.Tensor] | None, name: str, tensor: torch.Tensor) -> None:
    """The pristine value, kept in host memory (never a second copy on the GPU)."""
    if snapshot is not None and name not in snapshot:
        snapshot[name] = tensor.detach().to("cpu", copy=True)


def _add_live(
    source: VectorSource,
    work: list[tuple[str, torch.Tensor, str, int | None]],
    scale: float,
    snapshot: dict[str, torch.Tensor] | None = None,
    deltas: dict[str, tuple[torch.Tensor, int | None]] | None = None,
) -> None:
    seen: set[int] = set()
    gpu_work = []
    with torch.no_grad():
        for name, param, vname, rows in work:
            key = param.data_ptr()
            if key in seen:
                continue  # a tied weight reached twice: one storage, one delta
            seen.add(key)
            _keep(snapshot, name, param)
            entry = source.stored_entry(vname) if param.device.type == "cuda" else None
            if entry is not None:  # dense bytes on disk: one DMA from the pinned file
                gpu_work.append((param.data, entry, rows))
                continue
            delta = source.delta_on(vname, param.device)  # LoRA: B @ A on that device
            target = param.data
            if rows is not None:
                target = target[:rows]
                delta = delta[:rows]
            delta = delta.to(param.device)
            if deltas is not None:
                deltas[name] = (delta, rows)
            add_scaled_(target, delta, scale)
        if gpu_work:
            from ..io.gpu import apply_dense_cuda

            apply_dense_cuda(gpu_work, scale)


def _warn_overflow(model: torch.nn.Module, report: ApplyReport) -> None:
    params = {n: p for n, p in model.named_parameters() if p.dtype == torch.float16}
    if not params:
        return
    bad = [
        n
        for n in report.applied
        if n in params
        and params[n].dtype == torch.float16
        and not bool(torch.isfinite(params[n]).all())
    ]
    if bad:
        msg = (
            f"float16 overflow: {bad[0]} (and {len(bad) - 1} more) now hold Inf/NaN after "
            f"adding {report.scale:g}·v; use a smaller scale or a bfloat16/float32 model"
        )
        report.warn(msg)


class FileScaleSwitch:
    """Hold a live model loaded from a checkpoint at exactly ``round(θ + α·v)`` for any α in
    turn, keeping no copy of θ or v: each :meth:`set_scale` re-reads the touched tensors' θ
    from the checkpoint's files and v from the vector's, one tensor at a time, and writes
    ``round(θ + α·v)`` (the code ``rvhub apply`` writes with) into the parameters. Memory: the
    model plus one tensor.

    :meth:`open` checks first that every tensor the vector touches holds exactly the files'
    values, in their dtype; otherwise (a model changed after loading, loaded in another dtype,
    or one whose parameters transformers renamed) it returns None and :class:`ScaleSwitch`
    is the way.
    """

    def __init__(
        self, source: VectorSource, model: torch.nn.Module, ckpt: Any, prepared: Any, lineage: Any
    ):
        self.source, self.model, self.ckpt, self.prepared = source, model, ckpt, prepared
        self.lineage = lineage  # the vector's, for the α-dependent check
        self.scale: float | None = None

    @classmethod
    def open(
        cls,
        source: VectorSource,
        vector: VectorFacts,
        model: torch.nn.Module,
        ckpt: Any,
        options: ApplyOptions,
    ) -> FileScaleSwitch | None:
        from .disk import prepare_streamed, stream_applied

        if ckpt.fp8_scales:
            return None
        params = {**persistent_float_buffers(model), **dict(model.named_parameters())}
        entries = ckpt.entries
        # the plan does not depend on α (1 here: no "α = 0" note at the pre-flight)
        prepared = prepare_streamed(vector, ckpt, replace(options, scale=1.0, given_scale=1.0))
        touched = list(prepared.plan.targets)
        for name in touched:
            p = params.get(name)
            if p is None or p.dtype != entries[name].torch_dtype or p.shape != entries[name].shape:
                return None
        with torch.no_grad():
            for name, theta in stream_applied(source, ckpt, {}, 0.0, only=touched, reuse=True):
                if not torch.equal(params[name].detach().to("cpu"), theta):
                    return None  # the model is not what its files hold
                # Writing the same values back gives a model transformers mapped from its
                # files private pages now, so the first α does not pay for those page faults.
                params[name].data.copy_(theta)
        return cls(source, model, ckpt, prepared, vector.lineage)

    def check_scale(self, scale: float) -> None:
        """The pre-flight's α-dependent refusal (a change far larger than the weights), for
        an α set after it."""
        names = [v for v, _ in self.prepared.plan.targets.values()]
        check_change_size(self.lineage, check_scale(scale), names)

    def set_scale(self, scale: float) -> ApplyReport:
        """Set the model to ``round(θ + scale·v)``; returns that apply's report."""
        self.check_scale(scale)
        scale = check_scale(scale)
        self._write(self.prepared.plan.targets, scale)
        self.scale = scale
        report = copy.copy(self.prepared.report)
        report.scale = scale
        return report

    def restore(self) -> None:
        """Write θ back (re-read from the files) into every tensor the vector touches."""
        if self.scale is not None:
            self._write({}, 0.0)  # no targets: θ as stored
        self.scale = None

    def _write(self, targets: Mapping[str, tuple[str, int | None]], alpha: float) -> None:
        """Stream the touched tensors (``round(θ + α·v)`` for ``targets``) into the model."""
        from .disk import stream_applied

        model = self.model
        params = {**persistent_float_buffers(model), **dict(model.named_parameters())}
        only = self.prepared.plan.targets
        with torch.no_grad():
            applied = stream_applied(self.source, self.ckpt, targets, alpha, only=only, reuse=True)
            for name, value in applied:
                params[name].data.copy_(value)


class ScaleSwitch:
    """Hold a live model at exactly ``round(θ + α·v)`` for any α in turn, from the pristine θ.

    Each :meth:`set_scale` first writes back the pristine values of every tensor an earlier
    call changed (kept in host memory, never on the GPU, the first time each was touched), then adds
    ``α·v`` as :func:`apply_to_model` does: the result is bit-identical to applying ``α·v``
    to a freshly loaded target, never a sum of differences of α. :meth:`restore` brings the
    model back to θ. With ``keep_deltas`` (default) the first call also keeps each delta on its
    parameter's device (memory: the vector's size once more, beside θ's copy), and later calls
    compute ``round(θ + α·δ)`` straight into the parameters in one pass (fused MoE parameters
    and the pinned-DMA CUDA path always take the first call's route). For a model loaded from
    files, :class:`FileScaleSwitch` keeps neither copy.

    Example:
        >>> switch = ScaleSwitch(v.source, v.model_info, model, manifest=v.manifest)
        >>> for alpha in (-1, 0, 1):
        ...     switch.set_scale(alpha)
        ...     evaluate(model)
        >>> switch.restore()
    """

    def __init__(
        self,
        source: VectorSource,
        vector: VectorFacts | Mapping[str, Any],
        model: torch.nn.Module,
        *,
        manifest: Manifest | None = None,
        keep_deltas: bool = True,
        options: ApplyOptions | None = None,
    ) -> None:
        """``vector``: what the pre-flight reads of the vector (:class:`.prepare.VectorFacts`),
        or its recorded model identity with its verified ``manifest``."""
        self.source, self.model = source, model
        self.facts = (
            vector
            if isinstance(vector, VectorFacts)
            else VectorFacts.of_source(source, vector, manifest)
        )
        self.options = options or ApplyOptions()
        self.keep_deltas = keep_deltas
        self.pristine: dict[str, torch.Tensor] = {}
        self.scale: float | None = None
        self._deltas: dict[str, tuple[torch.Tensor, int | None]] = {}
        self._report: ApplyReport | None = None

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**persistent_float_buffers(self.model), **dict(self.model.named_parameters())}

    def restore(self) -> None:
        """Write the pristine θ back into every tensor a :meth:`set_scale` changed."""
        if not self.pristine:
            self.scale = None
            return
        tensors = self._tensors()
        with torch.no_grad():
            for name, value in self.pristine.items():
                tensors[name].copy_(value)
        self.scale = None

    def check_scale(self, scale: float) -> None:
        """The pre-flight's α-dependent refusal (a change far larger than the weights), for
        an α set after it (the first :meth:`set_scale` runs the whole pre-flight)."""
        names = list(self.facts.shapes) if self._report is None else self._report.applied
        check_change_size(self.facts.lineage, check_scale(scale), names)

    def set_scale(self, scale: float) -> ApplyReport:
        """Set the model to ``round(θ + scale·v)``; returns that apply's report."""
        if self._report is not None and len(self._deltas) == len(self.pristine):
            self.check_scale(scale)
            return self._set_from_cache(check_scale(scale))
        self.restore()
        self._deltas.clear()
        report = apply_to_model(
            self.facts,
            self.source,
            self.model,
            replace(self.options, scale=scale, given_scale=scale),
            snapshot=self.pristine,
            deltas=self._deltas if self.keep_deltas else None,
        )
        self.scale = check_scale(scale)
        self._report = report
        return report

    def _set_from_cache(self, scale: float) -> ApplyReport:
        """Every delta is held: one pass per tensor, ``out = round(θ + α·δ)``, no restore copy
        and no file read (the checks ran on the first call, on the same pristine θ)."""
        tensors = self._tensors()
        with torch.no_grad():
            for name, (delta, rows) in self._deltas.items():
                target, base = tensors[name].data, self.pristine[name].to(tensors[name].device)
                if rows is not None:
                    target[rows:].copy_(base[rows:])
                    target, base = target[:rows], base[:rows]
                set_scaled_(target, base, delta, scale)
        self.scale = scale
        assert self._report is not None
        report = copy.copy(self._report)
        report.scale = scale
        return report
