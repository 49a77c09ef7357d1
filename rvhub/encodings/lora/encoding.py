"""The LoRA encoding: the PEFT adapter for the modules the target engine takes, the rest
dense beside it, and the reader of such an artifact.

The adapter holds the modules stock PEFT wraps (measured on a meta skeleton,
:mod:`..peft_probe`) that the target engine (``LoraOptions.engine``) takes; biases, norms and
every other tensor stay dense (see ``docs/lora.md``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...architecture import is_embedding, lora_eligible
from ...constants import ADAPTER_CONFIG_NAME
from ...engines import ENGINES, Engine, engine_takes, get_engine, judge, server_rank
from ...errors import InputError, IntegrityError
from ...io.device import resolve_device
from ...io.progress import bar
from ...io.safetensors import DTYPE_NAMES, FileHandles, dtype_name, read_range
from ...manifest import Manifest, file_info, norm_summary
from ...options import LoraOptions
from ...sources import VectorSource
from ..base import Encoded, WriteJob, declared, stored_entries
from ..dense import write_dense_files
from ..peft_probe import WrappedModule, peft_wraps
from .peft_format import (
    adapter_config,
    adapter_layout,
    pad_factor,
    read_peft_adapter,
    write_peft_adapter,
)
from .svd import LoraFactor, factorize


class LoraSource(VectorSource):
    """LoRA factors from the PEFT adapter (``delta = B @ A``) plus the dense remainder."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        shapes, dtypes = declared(manifest)
        super().__init__(shapes, dtypes)
        try:
            self.factors = read_peft_adapter(folder)
        except ValueError as e:
            raise IntegrityError(f"{folder}: the PEFT adapter is unreadable: {e}") from None
        self.entries = stored_entries(folder, manifest)
        self._handles = FileHandles()
        for name, info in manifest.tensors.items():
            stored = info.stored
            if stored == "lora" and info.rank > 0:
                if name not in self.factors:
                    raise IntegrityError(
                        f"{folder}: {name} is declared LoRA but the adapter lacks it"
                    )
                a, b = self.factors[name]
                if (b.shape[0], a.shape[1]) != shapes[name]:
                    raise IntegrityError(
                        f"{folder}: the adapter's factors for {name} do not match its shape"
                    )
            elif stored == "dense":
                entry = self.entries.get(name)
                if entry is None or entry.shape != shapes[name]:
                    raise IntegrityError(f"{folder}: dense tensor {name} is missing or misshapen")
        unknown = set(self.factors) - set(shapes)
        if unknown:
            raise IntegrityError(
                f"{folder}: the adapter holds undeclared modules, e.g. {sorted(unknown)[0]}"
            )

    def delta_on(self, name: str, device: torch.device | str) -> Tensor:
        """``B @ A`` computed on ``device`` (one module at a time), or the dense delta."""
        if name in self.factors:
            a, b = self.factors[name]
            return b.to(device) @ a.to(device)
        if name in self.entries:
            t = read_range(self.entries[name], 0, self.entries[name].numel, self._handles)
            return t.reshape(self.shapes[name]).to(device)
        return torch.zeros(self.shapes[name], device=device)  # rank 0

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> Tensor:
        t = self.delta_on(name, "cpu")
        return t if dtype is None else t.to(dtype)

    def chunk(self, name: str, start: int, stop: int) -> Tensor:
        if name in self.factors:
            a, b = self.factors[name]
            cols = a.shape[1]
            r0, r1 = start // cols, -(-stop // cols)
            rows = (b[r0:r1] @ a).reshape(-1)
            return rows[start - r0 * cols : stop - r0 * cols]
        if name in self.entries:
            return read_range(self.entries[name], start, stop, self._handles).float()
        return torch.zeros(stop - start)


def engine_reports(
    adapter_config: Mapping[str, Any],
    ranks: Mapping[str, int],
    norms_sq: Mapping[str, float],
    *,
    architecture: str | None,
    tied: bool,
    peft_applies: set[str] | None,
) -> dict[str, dict[str, Any]]:
    """Per engine: whether it loads the adapter, the share of the whole vector's ‖v‖² it
    applies from the adapter alone, what it does not apply, and how to start its server."""
    total = sum(norms_sq.values())
    out: dict[str, dict[str, Any]] = {}
    for engine in ENGINES.values():
        verdict = judge(
            engine,
            adapter_config,
            ranks,
            architecture=architecture,
            tied=tied,
            peft_applies=peft_applies,
        )
        applied = sum(norms_sq.get(n, 0.0) for n in verdict.applied)
        out[engine.name] = {
            "version": engine.version,
            "loads": verdict.loads,
            "lora_tensors": len(verdict.applied),
            "share": applied / total if total > 0 else 1.0,
            "not_applied_tensors": len(norms_sq) - len(verdict.applied),
            "problems": verdict.problems,
            "server": verdict.hint,
        }
    return out


@dataclass
class _Factorized:
    """What the SVD step produced: factors by tensor name, each candidate's figures."""

    candidates: list[str]
    factors: dict[str, LoraFactor]
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # rank, errors
    norms: dict[str, float] = field(default_factory=dict)
    svd_seconds: float = 0.0
    peft_measured: set[str] | None = None


class LoraEncoding:
    """Write: choose the modules (:func:`_candidates`), factorize them (:func:`_factorize`),
    keep those stock PEFT wraps as written (:func:`_fit_to_peft`), write the adapter and the
    dense rest, and record what each engine applies (:func:`_compression`)."""

    name = "lora"

    def write(self, job: WriteJob) -> Encoded:
        lora = job.options.lora
        assert lora is not None  # WriteOptions refuses encoding="lora" without LoraOptions
        engine = get_engine(lora.engine)
        model = job.provenance.model
        architecture = (model.get("architectures") or [None])[0]
        tied = bool(model.get("tie_word_embeddings"))
        candidates, conv1d = _candidates(job, engine, architecture, tied)
        storage = job.options.dtype
        done = _factorize(job.source, candidates, lora)
        uniform = not engine.per_module_rank
        _fit_engine_rank(engine, done, uniform)
        _fit_to_peft(done, job.provenance.model_config, conv1d, uniform)
        root = job.provenance.base_model
        base_model = lora.base_model or (root.repo_id if root else None)
        base_model = base_model or _hub_id(job.provenance.source("a"))
        try:
            adapter_files = write_peft_adapter(
                job.folder,
                done.factors,
                embedding_names={n for n in done.factors if is_embedding(n)},
                transposed_names=conv1d & set(done.factors),
                base_model_name_or_path=base_model,
                dtype=storage or job.source.dtypes[done.candidates[0]],
                uniform_rank=uniform,
            )
        except ValueError as e:
            raise InputError(f"cannot write the PEFT adapter: {e}") from None
        files = file_info(job.folder, adapter_files)
        tensors, dense_bytes = _write_rest(job, done, files)
        config = json.loads((job.folder / ADAPTER_CONFIG_NAME).read_text())
        engines = engine_reports(
            config,
            {n: done.modules[n]["rank"] for n in done.factors},
            {n: v * v for n, v in done.norms.items()},
            architecture=architecture,
            tied=tied,
            peft_applies=done.peft_measured,
        )
        excluded = len(set(job.source.shapes) - set(job.names)) + len(job.provenance.excluded)
        for report in engines.values():
            report["excluded_tensors"] = excluded
        compression = _compression(job, done, files, engines, dense_bytes)
        compression.update(profile=engine.name, base_model=base_model)
        return Encoded(
            files=files,
            tensors=tensors,
            stats=norm_summary({n: v * v for n, v in done.norms.items()}),
            dtypes=[dtype_name(storage or job.source.dtypes[n]) for n in job.names],
            compression=compression,
        )

    def open(self, folder: Path, manifest: Manifest) -> LoraSource:
        return LoraSource(folder, manifest)


def _hub_id(source: Any) -> str | None:
    return source.repo_id if source.kind == "hub" else None


def _candidates(
    job: WriteJob, engine: Engine, architecture: str | None, tied: bool
) -> tuple[list[str], set[str]]:
    """The tensors to hold as LoRA: Linear/Embedding weights the engine takes and stock PEFT
    wraps with the checkpoint's shape; and which of them are GPT-2 ``Conv1D`` weights."""
    if engine.architectures is not None and architecture not in engine.architectures:
        raise InputError(
            f"`engine={engine.name}`: {engine.version} serves LoRA for "
            f"{', '.join(sorted(engine.architectures))}, not "
            f"{architecture or 'this vector (it records no architecture)'}"
        )
    source = job.source
    candidates = [n for n in job.names if lora_eligible(n, source.shapes[n])]
    if engine.name != "peft":
        candidates = [n for n in candidates if engine_takes(engine, n, architecture, tied=tied)]
    wrapped = _peft_structure(job.provenance.model_config, candidates, source.shapes)
    if wrapped is not None:
        candidates = [n for n in candidates if n in wrapped]
    conv1d = {n for n in candidates if wrapped and wrapped[n].kind == "Conv1D"}
    if conv1d:  # PEFT's fan_in_fan_out is one flag: Linear modules then stay dense
        candidates = [n for n in candidates if n in conv1d or is_embedding(n)]
    if not candidates:
        raise InputError(
            f"no tensor of this vector is a Linear/Embedding weight "
            f"{'PEFT' if engine.name == 'peft' else engine.version} can hold as LoRA"
        )
    return candidates, conv1d


def _factorize(source: VectorSource, candidates: list[str], lora: LoraOptions) -> _Factorized:
    """Truncated SVD of each candidate's delta, one tensor in memory at a time."""
    dev = resolve_device(lora.device)
    done = _Factorized(list(candidates), {})
    progress = bar(len(candidates), "factorising", unit="tensor")
    try:
        for name in candidates:
            delta = source.get(name)
            if not bool(torch.isfinite(delta).all()):
                raise InputError(
                    f"the delta of {name} holds NaN/Inf values; LoRA cannot encode them"
                )
            started = time.perf_counter()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            factor = factorize(
                delta,
                rank=lora.rank,
                energy=lora.energy,
                max_error=lora.max_error,
                method=lora.svd,
                device=dev,
            )
            done.svd_seconds += time.perf_counter() - started
            done.norms[name] = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
            done.modules[name] = {
                "rank": factor.rank,
                "rel_error": factor.rel_error,
                "energy_kept": factor.energy_kept,
            }
            if factor.rank > 0:
                done.factors[name] = factor
            del delta
            progress.update(1)
    finally:
        progress.close()
    if not done.factors:
        raise InputError("every LoRA-eligible delta is zero: nothing to encode as LoRA")
    return done


def _fit_engine_rank(engine: Engine, done: _Factorized, uniform: bool) -> None:
    """Refuse a rank the engine's server cannot start with; pad to one rank where the engine
    reads one (SGLang)."""
    max_rank = max(f.rank for f in done.factors.values())
    if engine.max_ranks is not None and server_rank(engine, max_rank) is None:
        raise InputError(
            f"`engine={engine.name}`: rank {max_rank} is above {engine.version}'s largest "
            f"{engine.rank_flag} {engine.max_ranks[-1]}; use `rank={engine.max_ranks[-1]}` "
            "or less"
        )
    if uniform:
        for name, factor in done.factors.items():
            done.factors[name] = pad_factor(factor, max_rank)
            done.modules[name]["rank"] = max_rank


def _fit_to_peft(
    done: _Factorized, model_config: Mapping[str, Any], conv1d: set[str], uniform: bool
) -> None:
    """Measure what stock PEFT wraps with the final config; move modules it would not wrap
    as written (another rank, another layout) to the dense part, until none is left."""
    factors = done.factors
    while True:
        layout = adapter_layout(factors, uniform_rank=uniform)
        final = peft_wraps(model_config, adapter_config(layout, conv1d=bool(conv1d & set(factors))))
        if final is None:
            return
        misfits = [
            n
            for n, f in factors.items()
            if n not in final
            or final[n].rank != f.rank
            or (final[n].fan_in_fan_out != (n in conv1d) and final[n].kind != "Embedding")
        ]
        done.peft_measured = set(final) & set(factors)
        if not misfits:
            return
        for n in misfits:
            del factors[n]
            done.modules.pop(n)
            done.candidates.remove(n)
        if not factors:
            raise InputError("stock PEFT wraps none of this vector's modules as LoRA")


def _write_rest(
    job: WriteJob, done: _Factorized, files: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], int]:
    """Write the deltas not held as LoRA densely beside the adapter; the tensor table of the
    whole vector and the dense part's size."""
    source, storage = job.source, job.options.dtype
    lora_names = [n for n in done.candidates if n in done.modules]
    dense_names = [n for n in job.names if n not in set(lora_names)]
    tensors: dict[str, Any] = {}
    dense_bytes = 0
    if dense_names:
        w = write_dense_files(
            source, dense_names, job.folder, job.options, desc="writing dense part"
        )
        files.update(w.files)
        for n, info in w.tensor_table().items():
            tensors[n] = {**info, "stored": "dense"}
            done.norms[n] = info["norm"]
            dense_bytes += math.prod(w.shapes[n]) * w.dtypes[n].itemsize
    for n in lora_names:
        tensors[n] = {
            "shape": list(source.shapes[n]),
            "dtype": DTYPE_NAMES[storage or source.dtypes[n]],
            "norm": done.norms[n],
            "stored": "lora",
            **done.modules[n],
        }
    return {n: tensors[n] for n in job.names}, dense_bytes


def _compression(
    job: WriteJob,
    done: _Factorized,
    files: Mapping[str, Mapping[str, Any]],
    engines: dict[str, dict[str, Any]],
    dense_bytes: int,
) -> dict[str, Any]:
    """The manifest's ``compression`` record of a LoRA artifact."""
    lora = job.options.lora
    assert lora is not None
    storage = job.options.dtype
    lora_names = [n for n in done.candidates if n in done.modules]
    dense_tensors = len(job.names) - len(lora_names)
    norms_sq = {n: v * v for n, v in done.norms.items()}
    total_sq = sum(norms_sq.values())
    err_sq = sum((done.modules[n]["rel_error"] * done.norms[n]) ** 2 for n in lora_names)
    lora_bytes_dense = sum(
        math.prod(job.source.shapes[n]) * (storage or job.source.dtypes[n]).itemsize
        for n in lora_names
    )
    artifact_bytes = sum(f["size"] for f in files.values())
    ranks = sorted(m["rank"] for m in done.modules.values())
    peft_share = engines["peft"]["share"]
    return {
        "encoding": "lora",
        "svd": lora.svd,
        "device": str(resolve_device(lora.device)),
        "svd_seconds": round(done.svd_seconds, 3),
        "rank_rule": {"rank": lora.rank, "energy": lora.energy, "max_error": lora.max_error},
        "ranks": {"min": ranks[0], "median": ranks[len(ranks) // 2], "max": ranks[-1]},
        "lora_tensors": len(done.factors),
        "dense_tensors": dense_tensors,
        "overall_rel_error": math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0,
        "bytes": artifact_bytes,
        "dense_bytes": lora_bytes_dense + dense_bytes,
        "ratio": artifact_bytes / max(1, lora_bytes_dense + dense_bytes),
        "peft_norm_share": peft_share,
        "rvhub_norm_share": 1.0 - peft_share,
        "peft_modules": "measured" if done.peft_measured is not None else "name rules",
        "engines": engines,
    }


def _peft_structure(
    model_config: Mapping[str, Any] | None,
    names: list[str],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, WrappedModule] | None:
    """The modules among ``names`` that PEFT wraps with a layer of the checkpoint's shape."""
    if not names:
        return {}
    targets = sorted(n.removesuffix(".weight") for n in names)
    found = peft_wraps(model_config, adapter_config((1, {}, targets), conv1d=False))
    if found is None:
        return None
    return {n: w for n, w in found.items() if n in set(names) and w.weight_shape == shapes[n]}
