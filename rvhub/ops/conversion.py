"""Map checkpoint-format deltas onto the parameters of a live transformers model.

A vector's tensor names are the checkpoint's (Hub-format) names. transformers 5 loads some
architectures into live parameters of other names and shapes: Mixtral's per-expert
``block_sparse_moe.experts.3.w1.weight`` becomes one fused ``mlp.experts.gate_up_proj``, a fused
``linear_attn.in_proj`` is split into four projections, and so on. This module reuses
transformers' own conversion objects (``conversion_mapping.get_model_conversion_mapping`` and the
``WeightRenaming`` / ``WeightConverter`` transforms of ``core_model_loading``) and applies the same
forward ops that ``from_pretrained`` applies. Those ops only stack, concatenate, split, transpose,
permute and rename, so they are linear: converting the deltas of a checkpoint gives the delta of
each live parameter, and ``live += converted(A - B)`` equals what loading ``B + (A - B)`` gives.

Ops that are not linear (dequantization, casts with an offset, log, ...) are refused with a
``ValueError`` rather than applied to a delta.

Example:
    ```python
    >>> from rvhub.ops.conversion import live_deltas, plan_live_mapping
    >>> mapping = plan_live_mapping(model, vector.keys())
    >>> mapping.unmapped                       # checkpoint names with no live parameter
    []
    >>> params = dict(model.named_parameters())
    >>> for name, delta in mapping.deltas(vector.__getitem__):
    ...     params[name].data.add_(delta.to(params[name].device, params[name].dtype))
    ```
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import core_model_loading as cml
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    get_model_conversion_mapping,
)

from .plan import persistent_float_buffers

__all__ = ["LiveGroup", "LiveMapping", "has_conversions", "live_deltas", "plan_live_mapping"]

TensorGetter = Callable[[str], torch.Tensor]

# transformers' conversion ops that are linear maps of their inputs (they only stack, concatenate,
# split, slice, transpose, reshape or permute), so they map a delta to the live parameter's delta.
# Kept as names so that a transformers release lacking one of them still imports this module.
_LINEAR_OP_NAMES = (
    "Chunk",
    "Split",
    "Concatenate",
    "Interleave",
    "MergeModulelist",
    "SplitModulelist",
    "Transpose",
    "Conv3dToLinear",
    "LinearToConv3d",
    "PermuteForRope",
    "VisionFuseAndPermuteForRope",
    "VisionUnfuseAndPermuteForRope",
    "ErnieFuseAndSplitTextVisionExperts",
    "ErnieSplitAndDecoupleTextVisionExperts",
    "Inkling2LoopMergeMessageQueries",
    "Inkling2UnpadVocab",
)
_LINEAR_OPS: tuple[type, ...] = tuple(
    op for op in (getattr(cml, name, None) for name in _LINEAR_OP_NAMES) if isinstance(op, type)
)


@dataclass(frozen=True)
class LiveGroup:
    """One unit of work: the checkpoint tensors that together build one or more live parameters.

    Attributes:
        sources: checkpoint names the group reads, in the order ``from_pretrained`` feeds them
            to the converter (experts in numeric order).
        targets: live parameter names (as in ``model.named_parameters()``) the group produces.
            For a converter that splits one tensor into several, these are derived the way
            transformers reports them and are exact for ordinary patterns.
        converter: the transformers ``WeightConverter`` to run, or ``None`` when the group is
            one tensor that is only renamed (or not renamed at all).
        layer_name: the state-dict name of the first target, which transformers uses to name
            the converter's outputs.
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    converter: cml.WeightConverter | None = None
    layer_name: str = ""
    _entries: tuple[tuple[str, str], ...] = ()  # (converter source pattern, checkpoint name)

    def _build(
        self, model: torch.nn.Module, get: TensorGetter, live_names: dict[str, str]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Fetch this group's deltas with ``get`` and yield ``(live name, live-shaped delta)``.

        Raises:
            ValueError: the converted delta does not have its live parameter's shape (a part
                of a fused group is missing from the vector), or an op failed on it.
        """
        if self.converter is None:
            yield self.targets[0], get(self.sources[0])
            return
        converter = copy.deepcopy(self.converter)
        for pattern, source in self._entries:
            tensor = get(source)
            converter.add_tensor(self.layer_name, source, pattern, tensor)  # type: ignore[arg-type]
        try:
            converted = converter.convert(
                self.layer_name, model=model, config=getattr(model, "config", None)
            )
        except (RuntimeError, ValueError, IndexError) as error:
            raise ValueError(
                f"cannot convert the vector's tensors {list(self.sources)} into "
                f"{list(self.targets)}: {error}; a fused parameter needs every one of its parts "
                "(e.g. every expert) in the vector, each shaped as in the checkpoint"
            ) from error
        for state_name, value in converted.items():
            delta = value[0] if isinstance(value, list) else value
            live_name = live_names.get(state_name)
            if live_name is None:
                raise ValueError(
                    f"the conversion of {list(self.sources)} produced {state_name!r}, "
                    "which is not a parameter of the model"
                )
            expected = model.get_parameter(live_name).shape
            if delta.shape != expected:
                raise ValueError(
                    f"the vector's tensors {list(self.sources)} convert to a delta of shape "
                    f"{tuple(delta.shape)} for {live_name!r}, which has shape {tuple(expected)}: "
                    "a fused parameter needs every one of its parts (e.g. every expert) in the "
                    "vector"
                )
            yield live_name, delta


@dataclass
class LiveMapping:
    """How a vector's checkpoint-format names land on a model's live parameters.

    Attributes:
        groups: the units of work, each building one or more live parameters.
        unmapped: checkpoint names that map to no live parameter (tensors the model lacks,
            buffers).
        identity: whether every mapped name is a live parameter name (no renaming, no fusing).
    """

    model: torch.nn.Module
    groups: list[LiveGroup] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    identity: bool = True
    _live_names: dict[str, str] = field(default_factory=dict, repr=False)

    def deltas(self, get: TensorGetter) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(live parameter name, delta shaped like it)``, one group at a time.

        Only the tensors of the group being built are fetched through ``get``, so peak memory
        is a small multiple of the largest fused parameter, never the whole vector. The deltas
        keep the dtype ``get`` returns them in.
        """
        for group in self.groups:
            yield from group._build(self.model, get, self._live_names)


def plan_live_mapping(
    model: torch.nn.Module,
    names: Iterable[str],
    *,
    conversions: list[cml.WeightTransform] | None = None,
) -> LiveMapping:
    """Plan how the checkpoint-format tensors ``names`` map onto ``model``'s live parameters.

    Nothing is fetched: only names are looked at. Models whose checkpoint names are their live
    names (Llama, Qwen2, Gemma2, ...) take a fast path of one dict lookup per name. Others use
    ``conversions``, by default the transforms ``from_pretrained`` used to load the model
    (``model._weight_conversions``) or, for a model built from a config, the ones transformers
    registers for its architecture (``get_model_conversion_mapping(model)``).

    A tied weight (``lm_head.weight`` sharing ``model.embed_tokens.weight``) maps to the one
    name ``model.named_parameters()`` gives it; the vector yields one group per name it holds.

    Args:
        model: the live model (a transformers ``PreTrainedModel``, any device).
        names: the vector's tensor names, in checkpoint format.
        conversions: the transforms to map through, overriding the model's own.

    Returns:
        A `LiveMapping` with the groups to build and the names that map to nothing.

    Raises:
        ValueError: a fused group lacks some of its parts in ``names`` (e.g. expert 3's
            ``w1``), two names map to one live parameter, or a needed conversion op is not
            linear.

    Example:
        ```python
        >>> mapping = plan_live_mapping(mixtral, vector.keys())
        >>> [(g.sources, g.targets) for g in mapping.groups][-1]
        (('model.layers.1.block_sparse_moe.experts.0.w2.weight', ...),
         ('model.layers.1.mlp.experts.down_proj',))
        ```
    """
    live_names = _live_parameter_names(model)
    if conversions is None:
        conversions, fast = _model_conversions(model)
    else:
        conversions, fast = copy.deepcopy(list(conversions)), not conversions
    mapping = LiveMapping(model=model, _live_names=live_names)

    if fast:
        names = _map_by_name(mapping, names, live_names)
    names = sorted(names, key=cml.dot_natural_key)
    if not names:
        return mapping
    state = model.state_dict(keep_vars=True)  # names of parameters and persistent buffers
    renamings = [t for t in conversions if isinstance(t, cml.WeightRenaming)]
    converters = [t for t in conversions if isinstance(t, cml.WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    rename = functools.partial(
        cml.rename_source_key,
        weight_renamings=renamings,
        weight_converters=converters,
        base_model_prefix=prefix,
        meta_state_dict=state,
    )
    fused = _map_renamed(mapping, names, live_names, state, rename, prefix)
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    for layer_name, entries in fused.items():
        converter = pattern_to_converter[entries[0][0]]
        _require_linear(converter, layer_name)
        first = converter.target_patterns[0]
        state_targets = [layer_name.replace(first, p) for p in converter.target_patterns]
        group = LiveGroup(
            sources=tuple(name for _, name in entries),
            targets=tuple(live_names.get(t, t) for t in state_targets),
            converter=converter,
            layer_name=layer_name,
            _entries=tuple(entries),
        )
        _require_complete(model, group, conversions, rename)
        mapping.groups.append(group)
        mapping.identity = False
    return mapping


def _map_by_name(
    mapping: LiveMapping, names: Iterable[str], live_names: Mapping[str, str]
) -> list[str]:
    """Map the names that are live names already (one lookup each); return the others."""
    slow_names = []
    for name in names:
        live = live_names.get(name)
        if live is None:
            slow_names.append(name)
        else:
            mapping.groups.append(LiveGroup(sources=(name,), targets=(live,)))
            mapping.identity = mapping.identity and live == name
    return slow_names


def _map_renamed(
    mapping: LiveMapping,
    names: list[str],
    live_names: Mapping[str, str],
    state: dict[str, Any],
    rename: Callable[[str], tuple[str, str | None]],
    prefix: str | None,
) -> dict[str, list[tuple[str, str]]]:
    """Map names through transformers' renamings as ``from_pretrained`` does; return the
    parts of fused parameters by fused name, ``(source pattern, name)`` each."""
    # a name renamed onto a parameter the vector also holds under its live name is a clash
    renamed_to = {g.sources[0]: g.sources[0] for g in mapping.groups}
    fused: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        renamed, pattern = rename(name)
        # from_pretrained keeps a checkpoint name that is already live when its renaming is not
        if renamed not in state and name in state:
            renamed, pattern = cml.rename_source_key(
                name, [], [], base_model_prefix=prefix, meta_state_dict=state
            )
        if renamed not in state:
            mapping.unmapped.append(name)
        elif pattern is not None:
            fused.setdefault(renamed, []).append((pattern, name))
        elif renamed not in live_names:
            mapping.unmapped.append(name)  # a buffer
        elif renamed in renamed_to:
            raise ValueError(
                f"the vector's tensors {renamed_to[renamed]!r} and {name!r} both map to the live "
                f"parameter {renamed!r}"
            )
        else:
            renamed_to[renamed] = name
            mapping.groups.append(LiveGroup(sources=(name,), targets=(live_names[renamed],)))
            mapping.identity = mapping.identity and live_names[renamed] == name
    return fused


def live_deltas(
    model: torch.nn.Module,
    names: Iterable[str],
    get: TensorGetter,
    *,
    conversions: list[cml.WeightTransform] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(live parameter name, delta shaped like that parameter)`` for a vector.

    ``names`` are the vector's checkpoint-format tensor names and ``get`` returns one delta by
    such a name. The mapping is planned (and checked) before the first delta is fetched, then
    deltas are fetched one live group at a time. Names that map to no live parameter are
    skipped; call `plan_live_mapping` to see them.

    Args:
        model: the live model the deltas are for.
        names: the vector's tensor names, in checkpoint format.
        get: returns the delta of one checkpoint name (any float dtype, any device).
        conversions: the transforms to map through, overriding the model's own.

    Raises:
        ValueError: as `plan_live_mapping`, raised before anything is yielded.

    Example:
        ```python
        >>> params = dict(model.named_parameters())
        >>> for name, delta in live_deltas(model, v.keys(), v.__getitem__):
        ...     params[name].data.add_(delta.to(params[name].dtype), alpha=0.5)
        ```
    """
    mapping = plan_live_mapping(model, names, conversions=conversions)
    return mapping.deltas(get)


def has_conversions(model: torch.nn.Module) -> bool:
    """Whether loading ``model`` converts checkpoint names beyond the legacy renamings.

    False for ordinary models (Llama, Qwen2, Gemma2, ...), whose checkpoint names are their
    live names; true for fused-expert MoE models (Mixtral, Qwen2-MoE, ...) and renamed layouts.
    """
    return not _model_conversions(model)[1]


def _live_parameter_names(model: torch.nn.Module) -> dict[str, str]:
    """Every name a parameter has (tied aliases included) → its name in ``named_parameters()``,
    plus the persistent floating buffers a checkpoint stores (DeepSeek-V3's
    ``e_score_correction_bias``), which on-disk apply changes too."""
    canonical = {id(param): name for name, param in model.named_parameters()}
    names = {
        name: canonical[id(param)] for name, param in model.named_parameters(remove_duplicate=False)
    }
    names.update({n: n for n in persistent_float_buffers(model) if n not in names})
    return names


def _model_conversions(model: torch.nn.Module) -> tuple[list[cml.WeightTransform], bool]:
    """The model's conversion transforms, and whether it has none beyond the legacy renamings.

    ``from_pretrained`` stores the transforms that matched its checkpoint in
    ``model._weight_conversions``; a model built from a config has no such attribute, and one
    loaded from a checkpoint already in live format stores an empty list. In both of those
    cases the architecture's registered transforms are used.
    """
    stored = getattr(model, "_weight_conversions", None)
    if stored:
        return copy.deepcopy(list(stored)), False
    registered = get_model_conversion_mapping(model, add_legacy=False)  # type: ignore[arg-type]
    legacy = get_checkpoint_conversion_mapping("legacy") or []
    return registered + legacy, not registered


def _require_linear(converter: cml.WeightConverter, layer_name: str) -> None:
    for op in converter.operations:
        if not isinstance(op, _LINEAR_OPS):
            raise ValueError(
                f"cannot map a delta onto {layer_name!r}: its conversion uses "
                f"{type(op).__name__}, which is not a linear op"
            )


def _require_complete(
    model: torch.nn.Module,
    group: LiveGroup,
    conversions: list[cml.WeightTransform],
    rename: Callable[[str], tuple[str, str | None]],
) -> None:
    """Raise if the vector lacks checkpoint tensors the group's fused parameter is built from.

    The expected tensors are found without touching any data: transformers' reverse conversion
    (the one ``save_pretrained`` uses) is run on a meta tensor shaped like the live parameter,
    and its outputs that the forward conversion sends back into this group are the parts.
    """
    live_name = group.targets[0]
    try:
        live = model.get_parameter(live_name)
        meta = torch.empty(live.shape, dtype=live.dtype, device="meta")
        view = _ReverseView(model, conversions)
        expected = cml.revert_weight_conversion(view, {group.layer_name: meta})  # type: ignore[arg-type]
    except Exception:  # the shape check when the group is built still guards
        return
    parts = []
    for name in expected:
        renamed, pattern = rename(name)
        if renamed == group.layer_name and pattern is not None:
            parts.append(name)
    present = set(group.sources)
    missing = sorted((name for name in parts if name not in present), key=cml.dot_natural_key)
    if missing and len(present) < len(parts):
        raise ValueError(
            f"the live parameter {live_name!r} is fused from {len(parts)} checkpoint tensors; "
            f"{len(missing)} of them are missing from the vector: {missing}"
        )


class _ReverseView:
    """What ``revert_weight_conversion`` reads from a model, with our transforms in place."""

    def __init__(self, model: torch.nn.Module, conversions: list[cml.WeightTransform]) -> None:
        self._model = model
        self._weight_conversions = conversions
        self.config = getattr(model, "config", None)

    def get_parameter(self, target: str) -> torch.nn.Parameter:
        return self._model.get_parameter(target)
