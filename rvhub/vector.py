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

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .architecture import model_identity
from .checkpoint import Checkpoint, check_config
from .constants import DEFAULT_MAX_SHARD, PICKLE_SUFFIXES
from .encodings import WriteOptions, open_source, write_artifact
from .errors import CompatibilityError, InputError, IntegrityError
from .hub.resolve import open_checkpoint, resolve_artifact
from .io.atomic import atomic_dir, check_disjoint, check_output
from .io.cores import resolve_threads
from .io.device import resolve_device
from .io.safetensors import FLOAT_DTYPES, parse_dtype
from .manifest import check_files_present, file_digest, load_manifest, verify_artifact
from .ops.disk import apply_to_checkpoint_files
from .ops.live import apply_to_model
from .ops.plan import ApplyReport, check_pair, check_scale
from .ops.summary import describe, engine_report, summary
from .ops.verify import verify_against
from .sources import (
    CombinationSource,
    DifferenceSource,
    TensorDifferenceSource,
    VectorSource,
    split_excluded,
)

if TYPE_CHECKING:
    from .hub.push import PushResult
    from .ops.evaluate import Sweep, SweepPoint


@dataclass
class ReasoningVector:
    """Weight deltas by checkpoint tensor name, read lazily from ``source``.

    ``meta`` carries provenance (sources, model type, excluded tensors, manifest statistics).
    Build one with :func:`rvhub.extract_vector`, :func:`rvhub.load_vector` or
    :meth:`from_state_dicts`.
    """

    source: VectorSource
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    terms: tuple[tuple[float, ReasoningVector], ...] = field(default=(), repr=False)

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
        meta = {
            "sources": {"a": {"kind": "memory"}, "b": {"kind": "memory"}},
            "model": model_identity(config or {}),
        }
        return cls(TensorDifferenceSource(a, b), meta)

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
        return dict(self.meta.get("model") or {})

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The verified manifest of a loaded artifact (None for an unsaved vector)."""
        return self.meta.get("manifest")

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        mt = self.model_info.get("model_type", "?")
        return f"ReasoningVector({len(self)} tensors, {self.numel:,} params, {mt}{where})"

    # -- arithmetic ---------------------------------------------------------------------------
    def _terms(self) -> list[tuple[float, ReasoningVector]]:
        return list(self.terms) if self.terms else [(1.0, self)]

    def _combine(self, terms: list[tuple[float, ReasoningVector]]) -> ReasoningVector:
        meta = {k: v for k, v in self.meta.items() if k in ("model",)}
        meta["combination"] = [
            {"coef": c, "vector": str(v.path) if v.path else repr(v)} for c, v in terms
        ]
        source = CombinationSource([(c, v.source) for c, v in terms])
        return ReasoningVector(source, meta, terms=tuple(terms))

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
            self._saved_manifest(),
            path=str(self.path) if self.path else None,
            origin=self.meta.get("origin"),
        )

    def describe(self) -> str:
        """What ``rvhub inspect`` prints: sources, encoding, size, norms, round-trip error."""
        manifest = self._saved_manifest()
        return describe(self.summary(), manifest.get("tensors") or {})

    def engine_report(self, engine: str) -> dict[str, Any]:
        """What a serving engine (``peft``, ``vllm``, ``sglang``, ``llama.cpp``) applies of this
        LoRA vector: whether it loads the adapter, the share of the whole ‖v‖² it applies, the
        problems, and the server flag to start it with (``rvhub inspect --for ENGINE``)."""
        return engine_report(self._saved_manifest(), self.path, engine)

    def input_paths(self) -> list[str]:
        """The local folders and files this vector reads: its artifact, its local sources."""
        out = [str(self.path)] if self.path else []
        for info in (self.meta.get("sources") or {}).values():
            if isinstance(info, dict) and info.get("kind") == "local" and info.get("path"):
                out.append(str(info["path"]))
        for _, term in self.terms:
            out.extend(term.input_paths())
        return out

    def _saved_manifest(self) -> dict[str, Any]:
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
    ) -> Path:
        """Write the vector as an artifact folder (``rvhub.json`` + the encoding's files).

        ``encoding``: ``dense`` (``vector.safetensors``), ``lora`` (a stock PEFT adapter by
        truncated SVD: ``rank``, ``energy`` and/or ``max_error``, on ``device``) or ``sparse``
        (only changed entries, exact). Streams tensor by tensor; the folder appears atomically.
        For ``lora``, ``engine`` (``peft``, ``vllm``, ``sglang``, ``llama.cpp``) picks what the
        adapter holds so that engine loads it (:mod:`rvhub.engines`), and ``base_model`` is the
        adapter's ``base_model_name_or_path`` (default: source A when it is a Hub model).
        ``threads`` caps the CPU threads (default: every core this process may use); the
        files are the same on any number.

        Example:
            >>> extract_vector("org/grpo", "org/sft").save("./reasoning-vector")
            >>> load_vector("./reasoning-vector").save("./rv-lora", encoding="lora", rank=64)
        """
        check_disjoint(Path(path), self.input_paths())
        options = WriteOptions(
            dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype,
            allow_nonfinite=allow_nonfinite,
            max_shard_size=parse_size(max_shard_size),
            rank=rank,
            energy=energy,
            max_error=max_error,
            svd=svd,
            device=device,
            engine=engine,
            base_model=base_model,
            threads=resolve_threads(threads),
        )
        return write_artifact(
            self.source,
            self.meta,
            path,
            encoding=encoding,
            exclude=exclude,
            overwrite=overwrite,
            options=options,
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
    ) -> ApplyReport:
        """Add ``scale · v`` to ``model``'s parameters in place, each on its own device.

        A model that does not descend from the vector's base (its lineage fingerprint) is
        refused unless ``allow_unrelated``. Returns an :class:`~rvhub.ApplyReport` (applied /
        skipped / missing names, notes, the lineage figures).

        Example:
            >>> report = load_vector("./reasoning-vector").apply_to(model, scale=1.0)
        """
        how: dict[str, Any] = {
            "scale": scale,
            "exclude": exclude,
            "vocab": vocab,
            "allow_nonfinite": allow_nonfinite,
            "allow_unrelated": allow_unrelated,
        }
        return apply_to_model(self.source, self.model_info, model, manifest=self.manifest, **how)

    def evaluate(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
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
        **lm_eval_options: Any,
    ) -> Sweep:
        """Run lm-evaluation-harness on ``model`` at ``θ + α·v`` for each α of ``scales``.

        The model is set to exactly ``round(θ + α·v)`` from its pristine weights before each
        point and restored afterwards (:class:`~rvhub.ops.live.ScaleSwitch`). ``tasks`` are
        lm-eval task names (``include_path``: a folder of your own task YAMLs). With
        ``output_dir`` each point's lm-eval results, ``sweep.json`` and the plot are written
        there (``rvhub card --eval DIR`` reads them). Needs ``pip install "rvhub[eval]"``.

        Example:
            >>> sweep = load_vector("user/vec").evaluate(model, tok, tasks=["gsm8k"], scales=[-1, 0, 1])
            >>> sweep.summary()["metrics"][0]["best"]
        """
        from .ops.evaluate import parse_scales, parse_tasks, run_sweep, write_sweep
        from .ops.live import ScaleSwitch

        if output_dir is not None:
            check_output(Path(output_dir), overwrite=overwrite)
        switch = ScaleSwitch(
            self.source,
            self.model_info,
            model,
            manifest=self.manifest,
            exclude=exclude,
            vocab=vocab,
            allow_unrelated=allow_unrelated,
        )
        sweep = run_sweep(
            switch,
            model,
            tokenizer,
            tasks=parse_tasks(tasks),
            scales=parse_scales(scales),
            include_path=include_path,
            limit=limit,
            batch_size=batch_size,
            num_fewshot=num_fewshot,
            lm_eval_options=lm_eval_options,
            on_point=on_point,
        )
        sweep.vector = self._provenance()
        config = getattr(model, "config", None)
        sweep.target = {"name": target or getattr(config, "_name_or_path", None) or None}
        if output_dir is not None:
            from .card.plot import sweep_plot

            with atomic_dir(output_dir, overwrite=overwrite) as tmp:
                write_sweep(sweep, tmp, plot=sweep_plot(sweep.summary()))
        return sweep

    def _provenance(self) -> dict[str, Any]:
        """Where this vector came from, for records: Hub id and commit, or a folder."""
        origin = dict(self.meta.get("origin") or {})
        if not origin and self.path is not None:
            origin = {"kind": "local", "path": str(self.path)}
        if self.manifest is not None:
            origin["files_digest"] = {
                n: ":".join(file_digest(self.manifest, n)) for n in self.manifest["files"]
            }
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
        return verify_against(
            self.source, self.meta.get("stats") or {}, ca, cb, tolerance=tolerance
        )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> PushResult:
        """Publish this vector (it must be saved first) to ``repo_id``; see :func:`rvhub.push_vector`."""
        if self.path is None:
            raise InputError("save the vector first (v.save(folder)), then push the folder")
        from .hub.push import push_vector

        return push_vector(self.path, repo_id, **kwargs)


def parse_size(size: int | str) -> int:
    """``"5GB"``/``"500MB"``/``1024`` -> bytes (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not m:
        raise InputError(f"invalid size {size!r}; use e.g. 5GB or 500MB")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(m.group(1)) * units[m.group(2) or "B"])


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
) -> ReasoningVector:
    """The reasoning vector ``v = A − B`` between two checkpoints, computed lazily.

    ``a`` and ``b`` are local folders, ``.safetensors`` files or Hub ids (``org/name`` or
    ``org/name@revision``). Nothing is read beyond the headers until the vector is saved or
    applied; the math is float32. A checkpoint without a usable ``config.json`` is refused
    unless ``config_check=False``.

    Example:
        >>> v = extract_vector("org/qwen-grpo", "org/qwen-sft")
        >>> v.save("./reasoning-vector")
    """
    hub: dict[str, Any] = {
        "token": token,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
    }
    ca = a if isinstance(a, Checkpoint) else open_checkpoint(a, revision=revision_a, **hub)
    cb = b if isinstance(b, Checkpoint) else open_checkpoint(b, revision=revision_b, **hub)
    if config_check:
        check_config(ca)
        check_config(cb)
    check_pair(ca, cb)
    exclude = list(exclude)
    candidates, excluded = split_excluded((e.name for e in ca.in_file_order()), exclude)
    names, skipped = [], []
    for name in candidates:
        if _is_float(ca, name) and _is_float(cb, name):
            names.append(name)
        else:
            skipped.append(name)  # integer buffers (position ids, ...) carry no delta
    if not names:
        raise CompatibilityError("every tensor was excluded: the vector would be empty")
    meta: dict[str, Any] = {
        "sources": {"a": _describe(ca), "b": _describe(cb)},
        "model": model_identity(ca.config),
        "model_config": {k: v for k, v in ca.config.items() if not k.startswith("_")},
        "excluded": excluded,
        "skipped_non_float": skipped,
        "exclude_patterns": exclude,
    }
    return ReasoningVector(DifferenceSource(ca, cb, names), meta)


def _is_float(ckpt: Checkpoint, name: str) -> bool:
    return ckpt.entries[name].dtype in FLOAT_DTYPES or name in ckpt.fp8_scales


def _describe(ckpt: Checkpoint) -> dict[str, Any]:
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
    hub: dict[str, Any] = {
        "token": token,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
    }
    return resolve_artifact(repo_id, revision=revision, **hub)[0]


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
    hub: dict[str, Any] = {
        "token": token,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
    }
    folder, origin = resolve_artifact(source, revision=revision, **hub)
    manifest = load_manifest(folder)
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
    keys = ("sources", "model", "model_config", "excluded", "stats", "encoding")
    meta = {k: manifest.get(k) for k in keys}
    meta["manifest"] = manifest
    meta["origin"] = origin
    return ReasoningVector(open_source(folder, manifest), meta, path=folder)


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
) -> ApplyReport:
    """Write a new model folder ``out`` = ``target + scale · vec``, streamed and atomic.

    A target that does not descend from the vector's base is refused unless
    ``allow_unrelated`` (:func:`rvhub.check_target` shows the figures without writing).

    Weights keep the target's dtype and shard layout; config, tokenizer and generation files
    are copied, so ``AutoModelForCausalLM.from_pretrained(out)`` loads it. ``revision`` is the
    target's Hub revision. A block-quantized FP8 target stays FP8, each block requantized (the
    report says how much of ``α·v`` survived), unless ``dtype="bfloat16"`` writes it
    dequantized. ``threads`` caps the CPU threads (default: every core this process may
    use); the output is the same on any number.

    Example:
        >>> apply_to_checkpoint(load_vector("user/vec"), "Qwen/Qwen2.5-1.5B-Instruct", "out/")
    """
    check_scale(scale)
    resolve_device(device)
    resolve_threads(threads)
    check_output(Path(out), overwrite=overwrite)  # before any download
    ckpt = target if isinstance(target, Checkpoint) else open_checkpoint(target, revision=revision)
    if config_check:
        check_config(ckpt)
    check_disjoint(Path(out), [ckpt.path, *vec.input_paths()])
    provenance = {
        "vector": vec.meta.get("origin") or (str(vec.path) if vec.path else None),
        "vector_sources": vec.meta.get("sources"),
    }
    how: dict[str, Any] = {
        "scale": scale,
        "exclude": exclude,
        "vocab": vocab,
        "allow_nonfinite": allow_nonfinite,
        "allow_unrelated": allow_unrelated,
    }
    return apply_to_checkpoint_files(
        vec.source,
        vec.model_info,
        ckpt,
        out,
        manifest=vec.manifest,
        provenance=provenance,
        overwrite=overwrite,
        device=device,
        dtype=dtype,
        threads=threads,
        **how,
    )


__all__ = [
    "ReasoningVector",
    "apply_to_checkpoint",
    "compress_vector",
    "download_vector",
    "extract_vector",
    "load_vector",
    "parse_size",
]


def load_eval_target(
    target: str | os.PathLike[str],
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    config_check: bool = True,
) -> tuple[torch.nn.Module, Any, str]:
    """Load a model folder or Hub id with transformers for :meth:`ReasoningVector.evaluate`:
    the model (on ``device``, eval mode), its tokenizer, and the name to record.

    The checkpoint is opened as ``rvhub apply`` opens it first (safetensors only, quantized
    formats refused, the same weights transformers loads); no remote code runs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = open_checkpoint(target, revision=revision)
    if config_check:
        check_config(ckpt)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(
            f"{target}: no tokenizer transformers can load ({_first_line(e)})"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=False,
            use_safetensors=True,
        )
    except (OSError, ValueError, KeyError) as e:
        raise InputError(
            f"{target}: transformers cannot load it as a causal LM ({_first_line(e)})"
        ) from None
    model = model.to(dev) if dev.type != "cpu" else model  # type: ignore[arg-type]
    model.eval()
    source = ckpt.source or {}
    name = str(source.get("repo_id") or target)
    return model, tokenizer, name


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
