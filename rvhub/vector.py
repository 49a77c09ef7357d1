"""``ReasoningVector``: a lazy map from checkpoint tensor names to weight deltas, and the
functions that make one (:func:`extract_vector`, :func:`load_vector`).

A vector never holds a whole model in memory. Its *source* (:mod:`rvhub.sources`) knows
names, shapes and storage dtypes up front and produces one tensor (or one flat chunk of a
tensor) on request: the difference of two checkpoints, an artifact on disk in any encoding,
or a linear combination of other vectors. Arithmetic builds new lazy vectors, like
``task_vectors.TaskVector``::

    v = extract_vector("org/grpo", "org/sft")
    (0.5 * v + w).save("mix/")
    (-v).apply_to(model)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import Checkpoint, check_config
from .constants import DEFAULT_MAX_SHARD, PICKLE_SUFFIXES
from .encodings import open_source, write_artifact
from .errors import CompatibilityError, InputError, IntegrityError
from .hub.resolve import open_checkpoint, resolve_artifact
from .io.atomic import check_output
from .io.device import resolve_device
from .manifest import BaseModel, Manifest, Provenance, check_files_present, verify_artifact
from .ops.disk import apply_to_checkpoint_files
from .ops.extract import prepare_extract
from .ops.lineage import check_related
from .ops.live import apply_to_model
from .ops.plan import ApplyReport
from .ops.prepare import VectorFacts
from .ops.summary import describe, engine_report, summary
from .ops.verify import verify_against
from .options import ApplyOptions, HubOptions, WriteOptions, either, parse_size
from .sources import CombinationSource, TensorDifferenceSource, VectorSource

if TYPE_CHECKING:
    from .evaluation import Sweep, SweepPoint
    from .evaluation.vllm_engine import VllmOptions
    from .hub.push import PushResult


@dataclass
class ReasoningVector:
    """Weight deltas by checkpoint tensor name, read lazily from ``source``.

    ``provenance`` is what its manifest records of its origin (sources, model, exclusions);
    a loaded vector also has its verified ``manifest``, its ``path`` and, for a Hub vector,
    its ``origin`` (repo id and commit). Build one with :func:`rvhub.extract_vector`,
    :func:`rvhub.load_vector` or :meth:`from_state_dicts`.
    """

    source: VectorSource
    provenance: Provenance = field(default_factory=Provenance)
    path: Path | None = None
    terms: tuple[tuple[float, ReasoningVector], ...] = field(default=(), repr=False)
    manifest: Manifest | None = field(default=None, repr=False)
    origin: dict[str, Any] | None = None
    merged: tuple[ReasoningVector, ...] = field(default=(), repr=False)  # a merge's inputs

    @classmethod
    def from_state_dicts(
        cls,
        a: Mapping[str, torch.Tensor],
        b: Mapping[str, torch.Tensor],
        *,
        config: Mapping[str, Any] | None = None,
    ) -> ReasoningVector:
        """``v = a − b`` for two models already in memory (``model.state_dict()``), like
        ``task_vectors.TaskVector(pretrained, finetuned)`` with the roles of A and B.

        ``config`` (e.g. ``model.config.to_dict()``) is recorded so applies can check the fit.

        Example:
            >>> v = ReasoningVector.from_state_dicts(grpo.state_dict(), sft.state_dict(),
            ...                                      config=grpo.config.to_dict())
        """
        from .architecture import model_identity

        provenance = Provenance(
            sources={"a": {"kind": "memory"}, "b": {"kind": "memory"}},
            model=model_identity(dict(config or {})),
        )
        return cls(TensorDifferenceSource(a, b), provenance)

    # -- mapping-like access ------------------------------------------------------------------
    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.source.shapes

    @property
    def names(self) -> list[str]:
        return list(self.source.shapes)

    def keys(self) -> list[str]:
        return list(self.source.shapes)

    def __len__(self) -> int:
        return len(self.source.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.source.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.source.shapes:
            raise KeyError(name)
        return self.source.get(name)

    def delta(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One delta, shaped; float32 by default, ``dtype=None`` for the stored dtype."""
        if name not in self.source.shapes:
            raise KeyError(name)
        return self.source.get(name, dtype)

    def get(
        self, name: str, default: Any = None, *, dtype: torch.dtype | None = torch.float32
    ) -> Any:
        """``Mapping.get``: the float32 delta of ``name`` (``dtype=`` as :meth:`delta`), or
        ``default`` when the vector has no such tensor."""
        return self.source.get(name, dtype) if name in self.source.shapes else default

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, float32 delta)`` one tensor at a time."""
        for name in self.source.shapes:
            yield name, self.source.get(name)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the deltas are stored in (the widest one if mixed)."""
        dts = set(self.source.dtypes.values())
        out = torch.float32 if not dts else dts.pop()
        for dt in dts:
            out = torch.promote_types(out, dt)
        return out

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def model_info(self) -> dict[str, Any]:
        return dict(self.provenance.model)

    @property
    def meta(self) -> dict[str, Any]:
        """Provenance, origin and manifest as one dict (read-only view, for records)."""
        return {
            "sources": dict(self.provenance.sources),
            "model": self.model_info,
            "origin": self.origin,
            "manifest": self.manifest,
        }

    def facts(self) -> VectorFacts:
        """What the apply pre-flight reads of this vector (:func:`rvhub.ops.prepare.prepare_apply`)."""
        return VectorFacts.of_source(self.source, self.model_info, self.manifest)

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        mt = self.model_info.get("model_type", "?")
        return f"ReasoningVector({len(self)} tensors, {self.numel:,} params, {mt}{where})"

    # -- arithmetic ---------------------------------------------------------------------------
    def _terms(self) -> list[tuple[float, ReasoningVector]]:
        return list(self.terms) if self.terms else [(1.0, self)]

    def _combine(self, terms: list[tuple[float, ReasoningVector]]) -> ReasoningVector:
        return combine(terms)

    def __add__(self, other: object) -> ReasoningVector:
        if isinstance(other, (int, float)) and other == 0:
            return self  # lets sum([v, w]) work
        if not isinstance(other, ReasoningVector):
            return NotImplemented
        return self._combine(self._terms() + other._terms())

    __radd__ = __add__

    def __mul__(self, coef: object) -> ReasoningVector:
        if not isinstance(coef, (int, float)) or isinstance(coef, bool):
            return NotImplemented
        return self._combine([(c * float(coef), v) for c, v in self._terms()])

    __rmul__ = __mul__

    def __truediv__(self, coef: object) -> ReasoningVector:
        if not isinstance(coef, (int, float)) or isinstance(coef, bool):
            return NotImplemented
        return self * (1.0 / float(coef))

    def __neg__(self) -> ReasoningVector:
        return self * -1.0

    def __sub__(self, other: object) -> ReasoningVector:
        if not isinstance(other, ReasoningVector):
            return NotImplemented
        return self + (-other)

    # -- statistics -----------------------------------------------------------------------------
    def norms(self) -> dict[str, float]:
        """Frobenius norm of each delta (computed in float64 accumulation)."""
        out = {}
        for name, delta in self.items():
            out[name] = float(torch.linalg.vector_norm(delta.reshape(-1), dtype=torch.float64))
        return out

    def norm(self) -> float:
        return math.sqrt(sum(n * n for n in self.norms().values()))

    def cosine(self, other: ReasoningVector) -> float:
        """Cosine similarity of two vectors over their shared tensors."""
        dot = na = nb = 0.0
        for name in self.names:
            if name not in other:
                continue
            a = self.delta(name).reshape(-1).double()
            b = other.delta(name).reshape(-1).double()
            dot += float(a @ b)
            na += float(a @ a)
            nb += float(b @ b)
        return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The facts ``rvhub inspect --json`` prints (a saved or loaded vector)."""
        return summary(
            self._saved_manifest(), path=str(self.path) if self.path else None, origin=self.origin
        )

    def describe(self) -> str:
        """What ``rvhub inspect`` prints: sources, encoding, size, norms, round-trip error."""
        return describe(self.summary(), self._saved_manifest())

    def engine_report(self, engine: str) -> dict[str, Any]:
        """What a serving engine (``peft``, ``vllm``, ``sglang``, ``llama.cpp``) applies of this
        LoRA vector: whether it loads the adapter, the share of the whole ‖v‖² it applies, the
        problems, and the server flag to start it with (``rvhub inspect --for ENGINE``)."""
        return engine_report(self._saved_manifest(), self.path, engine)

    def input_paths(self) -> list[str]:
        """The local folders and files this vector reads: its artifact, its local sources."""
        out = [str(self.path)] if self.path else []
        for role in self.provenance.sources:
            record = self.provenance.source(role)
            if record.kind == "local" and record.path:
                out.append(record.path)
        for term in (*(v for _, v in self.terms), *self.merged):
            out.extend(term.input_paths())
        return out

    def _saved_manifest(self) -> Manifest:
        if self.manifest is None:
            raise InputError("this vector is not saved: v.save(folder) first, then load it")
        return self.manifest

    # -- output ---------------------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike[str],
        *,
        encoding: str = "dense",
        dtype: torch.dtype | str | None = None,
        overwrite: bool = False,
        exclude: Iterable[str] = (),
        allow_nonfinite: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD,
        rank: int | None = None,
        energy: float | None = None,
        max_error: float | None = None,
        svd: str = "randomized",
        device: str = "cpu",
        engine: str = "peft",
        base_model: str | None = None,
        threads: int | None = None,
        options: WriteOptions | None = None,
    ) -> Path:
        """Write the vector as an artifact folder (``rvhub.json`` + the encoding's files).

        ``encoding``: ``dense`` (``vector.safetensors``, split above ``max_shard_size``,
        decimal ``"5GB"`` by default like transformers), ``lora`` (a stock PEFT adapter by
        truncated SVD: ``rank``, ``energy`` and/or ``max_error``, on ``device``) or ``sparse``
        (only changed entries, exact). Streams tensor by tensor; the folder appears atomically.
        For ``lora``, ``engine`` (``peft``, ``vllm``, ``sglang``, ``llama.cpp``) picks what the
        adapter holds so that engine loads it (:mod:`rvhub.engines`), and ``base_model`` is the
        adapter's ``base_model_name_or_path`` (default: source A when it is a Hub model); these
        options with another encoding are refused. ``threads`` caps the CPU threads (default:
        every core this process may use); the files are the same on any number. ``options``
        (a :class:`~rvhub.options.WriteOptions`) replaces the individual options.

        Example:
            >>> extract_vector("org/grpo", "org/sft").save("./reasoning-vector")
            >>> load_vector("./reasoning-vector").save("./rv-lora", encoding="lora", rank=64)
        """
        options = either(
            options,
            WriteOptions.build(
                encoding=encoding,
                dtype=dtype,
                allow_nonfinite=allow_nonfinite,
                max_shard_size=max_shard_size,
                threads=threads,
                rank=rank,
                energy=energy,
                max_error=max_error,
                svd=svd,
                device=device,
                engine=engine,
                base_model=base_model,
            ),
        )
        return write_artifact(
            self.source,
            self.provenance,
            path,
            exclude=exclude,
            overwrite=overwrite,
            options=options,
            inputs=self.input_paths(),
        )

    def apply_to(
        self,
        model: torch.nn.Module,
        *,
        scale: float = 1.0,
        exclude: Iterable[str] = (),
        vocab: str = "strict",
        allow_nonfinite: bool = False,
        allow_unrelated: bool = False,
        options: ApplyOptions | None = None,
    ) -> ApplyReport:
        """Add ``scale · v`` to ``model``'s parameters in place, each on its own device.

        A model that does not descend from the vector's base (its lineage fingerprint) is
        refused unless ``allow_unrelated``. Returns an :class:`~rvhub.ApplyReport` (applied /
        skipped / missing names, notes, the lineage figures). ``options`` (an
        :class:`~rvhub.options.ApplyOptions`) replaces the individual options.

        Example:
            >>> report = load_vector("./reasoning-vector").apply_to(model, scale=1.0)
        """
        built = ApplyOptions(
            scale=scale,
            exclude=exclude,
            vocab=vocab,
            allow_nonfinite=allow_nonfinite,
            allow_unrelated=allow_unrelated,
        )
        return apply_to_model(self.facts(), self.source, model, either(options, built))

    def evaluate(
        self,
        model: torch.nn.Module | str | os.PathLike[str],
        tokenizer: Any = None,
        *,
        tasks: Iterable[str] | str,
        scales: Iterable[float] | str = (-1.0, 0.0, 1.0),
        output_dir: str | os.PathLike[str] | None = None,
        target: str | None = None,
        include_path: str | os.PathLike[str] | None = None,
        limit: int | float | None = None,
        batch_size: int | str = 1,
        num_fewshot: int | None = None,
        exclude: Iterable[str] = (),
        vocab: str = "strict",
        allow_unrelated: bool = False,
        overwrite: bool = False,
        on_point: Callable[[SweepPoint], None] | None = None,
        options: ApplyOptions | None = None,
        resume: bool = False,
        engine: str = "hf",
        engine_options: VllmOptions | None = None,
        model_args: Mapping[str, Any] | None = None,
        revision: str | None = None,
        config_check: bool = True,
        seed: int = 0,
        lm_eval_options: Mapping[str, Any] | None = None,
        **more_lm_eval_options: Any,
    ) -> Sweep:
        """Run lm-evaluation-harness on a target at ``θ + α·v`` for each α of ``scales``.

        ``engine="hf"`` (default): ``model`` is a loaded transformers model (and ``tokenizer``
        its tokenizer), set to exactly ``round(θ + α·v)`` from its pristine weights before each
        point and restored afterwards (:class:`~rvhub.ops.live.ScaleSwitch`); ``model_args``
        go to lm-eval's ``HFLM``. ``engine="vllm"``: ``model`` is the target's folder or Hub id
        (``revision``), loaded once by vLLM through lm-eval's ``vllm`` model, and each α is set
        inside the running engine from the target's and the vector's files, keeping no copy of
        either (:mod:`rvhub.evaluation.vllm_engine`; ``engine_options``: tensor parallelism,
        memory, vLLM's own arguments).

        ``tasks`` are lm-eval task names (``include_path``: a folder of your own task YAMLs).
        ``lm_eval_options`` (or keywords): ``apply_chat_template``, ``fewshot_as_multiturn``,
        ``system_instruction``, ``gen_kwargs``, ``log_samples``, as ``simple_evaluate`` takes
        them; ``seed`` seeds lm-eval. With ``output_dir`` each point's lm-eval results,
        ``sweep.json`` and the plot are written there (``rvhub card --eval DIR`` reads them);
        finished points survive an interruption and ``resume=True`` evaluates only the missing
        α. ``options`` (an :class:`~rvhub.options.ApplyOptions`; its scale is ignored) replaces
        ``exclude``, ``vocab`` and ``allow_unrelated``. Needs ``pip install "rvhub[eval]"``
        (and vLLM for ``engine="vllm"``).

        Example:
            >>> sweep = load_vector("user/vec").evaluate(model, tok, tasks=["gsm8k"], scales=[-1, 0, 1])
            >>> sweep.summary()["metrics"][0]["best"]
            >>> load_vector("user/vec").evaluate("Qwen/Qwen2.5-1.5B-Instruct", engine="vllm",
            ...     tasks=["gsm8k"], apply_chat_template=True, output_dir="eval-out")
        """
        from .evaluation import evaluate_vector, evaluate_vector_vllm

        apply = either(
            options, ApplyOptions(exclude=exclude, vocab=vocab, allow_unrelated=allow_unrelated)
        )
        common: dict[str, Any] = dict(
            tasks=tasks, scales=scales, output_dir=output_dir, include_path=include_path,
            limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, apply=apply,
            overwrite=overwrite, resume=resume, on_point=on_point, seed=seed,
            lm_eval_options={**dict(lm_eval_options or {}), **more_lm_eval_options},
        )  # fmt: skip
        _check_engine_call(engine, model, model_args, engine_options)
        if engine == "vllm":
            assert isinstance(model, (str, os.PathLike))
            return evaluate_vector_vllm(
                self, model, revision=revision, engine=engine_options,
                config_check=config_check, **common,
            )  # fmt: skip
        assert isinstance(model, torch.nn.Module)
        return evaluate_vector(
            self.facts(), self.source, model, tokenizer, target=target,
            record=self.origin_record(), inputs=self.input_paths(), model_args=model_args,
            **common,
        )  # fmt: skip

    def origin_record(self) -> dict[str, Any]:
        """Where this vector came from, for records: Hub id and commit, or a folder, and the
        digest of each of its files."""
        origin = dict(self.origin or {})
        if not origin and self.path is not None:
            origin = {"kind": "local", "path": str(self.path)}
        if self.manifest is not None:
            origin["files_digest"] = {n: self.manifest.digest(n) for n in self.manifest.files}
        return origin

    def verify_against(
        self,
        a: str | os.PathLike[str] | Checkpoint,
        b: str | os.PathLike[str] | Checkpoint,
        *,
        tolerance: float | None = None,
    ) -> dict[str, Any]:
        """Check that ``B + v`` reproduces ``A`` within the round-trip error recorded at
        extraction (or ``tolerance``); returns the measured errors."""
        ca = a if isinstance(a, Checkpoint) else open_checkpoint(a)
        cb = b if isinstance(b, Checkpoint) else open_checkpoint(b)
        recorded = self.manifest.stats.roundtrip_error if self.manifest is not None else None
        return verify_against(self.source, recorded, ca, cb, tolerance=tolerance)

    def with_base_model(self, base_model: str) -> ReasoningVector:
        """This vector with its lineage root set to ``base_model`` (a Hub id) when saved."""
        if not base_model.strip():
            raise InputError("`base_model` is empty: give a Hub id (org/name)")
        root = BaseModel(base_model.strip(), "given")
        provenance = dataclasses.replace(self.provenance, base_model=root)
        return dataclasses.replace(self, provenance=provenance)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> PushResult:
        """Publish this vector (it must be saved first) to ``repo_id``; see :func:`rvhub.push_vector`."""
        if self.path is None:
            raise InputError("save the vector first (v.save(folder)), then push the folder")
        from .hub.push import push_vector

        return push_vector(self.path, repo_id, **kwargs)


def merge_vectors(
    vectors: Sequence[ReasoningVector],
    *,
    method: str = "ties",
    weights: Sequence[float] | float | None = None,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float | None = None,
    epsilon: Sequence[float] | float | None = None,
    normalize: bool | None = None,
    rescale: bool | None = None,
    lambda_: float = 1.0,
    seed: int = 0,
    allow_unrelated: bool = False,
) -> ReasoningVector:
    """Merge several vectors' deltas with ``method`` (``linear``, ``ties``, ``dare_linear``,
    ``dare_ties``, ``della``, ``della_linear``, ``breadcrumbs``, ``breadcrumbs_ties``),
    lazily, like ``v + w``; parameters and defaults as mergekit's (:mod:`rvhub.ops.merge`,
    docs/merge.md). ``weights``, ``density``, ``gamma`` and ``epsilon`` take one value or one
    per vector. Vectors of different model types or shapes are refused, and so are vectors of
    different lineages unless ``allow_unrelated``. The result records every input and the
    method with its parameters.

    Example:
        >>> merged = merge_vectors([load_vector("u/reasoning"), load_vector("u/code")],
        ...                        method="ties", density=0.5)
        >>> merged.save("./merged")
    """
    from .ops.merge import MergeOptions, MergeSource

    vectors = list(vectors)
    if not vectors:
        raise InputError("`vectors` is empty: give at least one")
    types = {v.model_info.get("model_type") for v in vectors} - {None}
    if len(types) > 1:
        raise CompatibilityError(
            f"cannot merge vectors of different model types ({', '.join(sorted(map(str, types)))})"
        )
    options = MergeOptions.build(
        method,
        len(vectors),
        weights=weights,
        density=density,
        gamma=gamma,
        epsilon=epsilon,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        seed=seed,
    )
    check_related(
        [(v.source.lineage(), _label(v)) for v in vectors], allow_unrelated=allow_unrelated
    )
    source = MergeSource([v.source for v in vectors], options)
    inputs = tuple(
        {"weight": w, "vector": v.origin_record() or repr(v), "sources": dict(v.provenance.sources)}
        for w, v in zip(options.weights, vectors, strict=True)
    )
    first = vectors[0].provenance
    roots = {v.provenance.base_model for v in vectors}
    provenance = Provenance(
        model=first.model,
        model_config=first.model_config,
        combination=inputs,
        merge=options.as_json(),
        base_model=first.base_model if len(roots) == 1 else None,
    )
    return ReasoningVector(source, provenance, merged=tuple(vectors))


def _check_engine_call(
    engine: str, model: Any, model_args: Mapping[str, Any] | None, engine_options: Any
) -> None:
    """One line for an :meth:`ReasoningVector.evaluate` call that mixes the engines' inputs."""
    if engine == "vllm":
        if not isinstance(model, (str, os.PathLike)):
            raise InputError(
                '`engine="vllm"` loads the target itself: give its folder or Hub id as '
                "`model`, not a loaded model"
            )
        if model_args:
            raise InputError("`model_args` of the vllm engine go in `engine_options`")
        return
    if engine != "hf":
        raise InputError(f"`engine` must be hf or vllm, not {engine!r}")
    if isinstance(model, (str, os.PathLike)):
        raise InputError(
            '`engine="hf"` evaluates a loaded model: load it with '
            '`rvhub.evaluation.load_eval_target(path)` first, or pass `engine="vllm"`'
        )
    if engine_options is not None:
        raise InputError('`engine_options` are options of `engine="vllm"`')


def _label(v: ReasoningVector) -> str:
    return str(v.path) if v.path else (v.origin or {}).get("repo_id") or repr(v)


def combine(
    terms: Iterable[tuple[float, ReasoningVector]], *, allow_unrelated: bool = False
) -> ReasoningVector:
    """``Σ cᵢ·vᵢ``, lazily (what ``a * v + b * w`` builds), for vectors of one lineage.

    Each term's lineage fingerprint is compared with the first's, as apply compares a target:
    vectors whose bases lie farther apart than fine-tunes of one base do are refused unless
    ``allow_unrelated`` (their sum would fit no model). The result records every term's
    origin, sources and fingerprint.

    Example:
        >>> both = combine([(1.0, load_vector("user/reasoning")), (0.5, load_vector("user/code"))])
    """
    flat = [(c * k, leaf) for c, v in terms for k, leaf in v._terms()]
    if not flat:
        raise InputError("`terms` is empty: give at least one (coefficient, vector)")
    first = flat[0][1]
    types = {v.model_info.get("model_type") for _, v in flat} - {None}
    if len(types) > 1:
        raise CompatibilityError(
            f"cannot combine vectors of different model types ({', '.join(sorted(map(str, types)))})"
        )
    check_related(
        [(v.source.lineage(), _label(v)) for _, v in flat], allow_unrelated=allow_unrelated
    )
    combination = tuple(
        {
            "coef": c,
            "vector": v.origin_record() or repr(v),
            "sources": dict(v.provenance.sources),
            **({"combination": list(v.provenance.combination)} if v.provenance.combination else {}),
        }
        for c, v in flat
    )
    provenance = Provenance(
        model=first.provenance.model,
        model_config=first.provenance.model_config,
        combination=combination,
    )
    source = CombinationSource([(c, v.source) for c, v in flat])
    return ReasoningVector(source, provenance, terms=tuple(flat))


def extract_vector(
    a: str | os.PathLike[str] | Checkpoint,
    b: str | os.PathLike[str] | Checkpoint,
    *,
    revision_a: str | None = None,
    revision_b: str | None = None,
    exclude: Iterable[str] = (),
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    config_check: bool = True,
    base_model: str | None = None,
) -> ReasoningVector:
    """The reasoning vector ``v = A − B`` between two checkpoints, computed lazily.

    ``a`` and ``b`` are local folders, ``.safetensors`` files or Hub ids (``org/name`` or
    ``org/name@revision``). Nothing is read beyond the headers until the vector is saved or
    applied; the math is float32. A checkpoint without a usable ``config.json`` is refused
    unless ``config_check=False``.

    ``base_model`` is the model A and B both descend from (the vector's lineage root, what its
    card declares as ``base_model``); by default it is looked up in A's and B's Hub metadata
    (:func:`rvhub.hub.lineage.shared_root`), and stays unknown for local sources.

    Example:
        >>> v = extract_vector("org/qwen-grpo", "org/qwen-sft")
        >>> v.save("./reasoning-vector")
    """
    hub = HubOptions(
        token=token, cache_dir=_path_or_none(cache_dir), local_files_only=local_files_only
    )
    ca = a if isinstance(a, Checkpoint) else _open(a, revision_a, hub)
    cb = b if isinstance(b, Checkpoint) else _open(b, revision_b, hub)
    source, provenance = prepare_extract(ca, cb, exclude=exclude, config_check=config_check)
    root = _lineage_root(provenance, base_model, hub)
    return ReasoningVector(source, dataclasses.replace(provenance, base_model=root))


def _lineage_root(provenance: Provenance, given: str | None, hub: HubOptions) -> BaseModel | None:
    """The vector's lineage root: ``given``, else the nearest Hub model A and B share."""
    if given is not None:
        if not given.strip():
            raise InputError("`base_model` is empty: give a Hub id (org/name)")
        return BaseModel(given.strip(), "given")
    a, b = provenance.source("a"), provenance.source("b")
    if a.kind != "hub" or b.kind != "hub" or not a.repo_id or not b.repo_id:
        return None
    from huggingface_hub import HfApi

    from .hub.lineage import shared_root

    api = HfApi(token=hub.token)
    root = shared_root(a.repo_id, b.repo_id, api=api, revision_a=a.revision, revision_b=b.revision)
    return BaseModel(root, "hub") if root else None


def _path_or_none(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.fspath(path)


def _open(ref: str | os.PathLike[str], revision: str | None, hub: HubOptions) -> Checkpoint:
    HubOptions(revision=revision)  # names `revision` if it is not a revision
    return open_checkpoint(ref, revision=revision, **hub.download_kwargs())


def download_vector(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> Path:
    """Download a vector repo into huggingface_hub's cache; returns the snapshot folder.

    Fetches ``rvhub.json`` first, then exactly the files it lists (refusing any name outside
    the repo), like ``huggingface_hub.snapshot_download`` with the manifest as the pattern
    list. Hashes are checked by :func:`load_vector`, not here.

    Example:
        >>> folder = download_vector("user/qwen-reasoning-vector", revision="v1.0")
    """
    hub = HubOptions(revision, token, _path_or_none(cache_dir), local_files_only)
    return resolve_artifact(repo_id, revision=revision, **hub.download_kwargs())[0]


def load_vector(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    verify: bool = True,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> ReasoningVector:
    """Open a reasoning vector from a folder or a Hub repo (``user/name[@revision]``).

    Every file is checked against its digest in ``rvhub.json`` before use (``verify=False``
    skips the hashes, never the path checks). Works for every encoding. ``token``,
    ``cache_dir`` and ``local_files_only`` mean what they mean to huggingface_hub.

    Example:
        >>> v = load_vector("user/qwen2.5-1.5b-reasoning-vector")
        >>> v.apply_to(model, scale=1.0)
    """
    hub = HubOptions(revision, token, _path_or_none(cache_dir), local_files_only)
    folder, origin = resolve_artifact(source, revision=revision, **hub.download_kwargs())
    manifest = Manifest.read(folder)
    for entry in folder.iterdir():
        if entry.suffix in PICKLE_SUFFIXES:
            raise IntegrityError(
                f"{folder} contains a pickle file ({entry.name}); rvhub never loads pickles, "
                "and refuses artifacts that ship them"
            )
    if verify:
        verify_artifact(folder, manifest)
    else:
        check_files_present(folder, manifest)
    return ReasoningVector(
        open_source(folder, manifest),
        Provenance.of_manifest(manifest),
        path=folder,
        manifest=manifest,
        origin=origin,
    )


def compress_vector(
    vec: ReasoningVector, out: str | os.PathLike[str], *, encoding: str, **options: Any
) -> Path:
    """Write ``vec`` to ``out`` in ``encoding`` (``dense``, ``lora`` or ``sparse``): the same
    as ``vec.save(out, encoding=encoding, **options)``.

    Example:
        >>> compress_vector(load_vector("./vec"), "./vec-lora", encoding="lora", rank=64)
    """
    return vec.save(out, encoding=encoding, **options)


def apply_to_checkpoint(
    vec: ReasoningVector,
    target: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    exclude: Iterable[str] = (),
    vocab: str = "strict",
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    allow_unrelated: bool = False,
    revision: str | None = None,
    device: str = "cpu",
    config_check: bool = True,
    dtype: str | None = None,
    threads: int | None = None,
    options: ApplyOptions | None = None,
) -> ApplyReport:
    """Write a new model folder ``out`` = ``target + scale · vec``, streamed and atomic.

    A target that does not descend from the vector's base is refused unless
    ``allow_unrelated`` (:func:`rvhub.check_target` shows the figures without writing).

    Weights keep the target's dtype and shard layout; config, tokenizer and generation files
    are copied, so ``AutoModelForCausalLM.from_pretrained(out)`` loads it. ``revision`` is the
    target's Hub revision. A block-quantized FP8 target stays FP8, each block requantized (the
    report says how much of ``α·v`` survived), unless ``dtype="bfloat16"`` writes it
    dequantized. ``threads`` caps the CPU threads (default: every core this process may
    use); the output is the same on any number. ``options`` (an
    :class:`~rvhub.options.ApplyOptions`) replaces the individual options.

    Example:
        >>> apply_to_checkpoint(load_vector("user/vec"), "Qwen/Qwen2.5-1.5B-Instruct", "out/")
    """
    built = ApplyOptions(
        scale=scale,
        exclude=exclude,
        vocab=vocab,
        allow_nonfinite=allow_nonfinite,
        allow_unrelated=allow_unrelated,
        dtype=dtype,
        device=device,
        threads=threads,
    )
    options = either(options, built)
    resolve_device(options.device)
    inputs = vec.input_paths()
    given = None if isinstance(target, Checkpoint) else target
    check_output(Path(out), overwrite=overwrite, inputs=[*inputs, given])  # before downloads
    ckpt = target if isinstance(target, Checkpoint) else open_checkpoint(target, revision=revision)
    if config_check:
        check_config(ckpt)
    provenance = {
        "vector": vec.origin or (str(vec.path) if vec.path else None),
        "vector_sources": dict(vec.provenance.sources),
    }
    return apply_to_checkpoint_files(
        vec.facts(),
        vec.source,
        ckpt,
        out,
        options,
        provenance=provenance,
        overwrite=overwrite,
        inputs=inputs,
    )


__all__ = [
    "ReasoningVector",
    "apply_to_checkpoint",
    "combine",
    "compress_vector",
    "download_vector",
    "extract_vector",
    "load_vector",
    "merge_vectors",
    "parse_size",
]
