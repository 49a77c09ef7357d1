"""Writing a vector in a compressed encoding: ``lora`` (a stock PEFT adapter) or ``sparse``.

``lora``: every Linear/Embedding weight delta is factorised by truncated SVD
(:mod:`rvhub.encodings.lora`) into a PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``); deltas PEFT cannot hold as LoRA (biases, norms, fused MoE
experts, other 1-D tensors) stay dense beside it in ``vector.safetensors``. ``sparse``: each
tensor stores only its bit-nonzero entries where that is smaller (:mod:`rvhub.encodings.sparse`),
exact to the bit. Both artifacts read back with :func:`rvhub.load_vector`.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_dir, check_output
from .errors import InputError
from .kernels import Scratch
from .manifest import write_manifest
from .progress import bar
from .safetensors_io import (
    DTYPE_NAMES,
    DTYPES,
    SafetensorsWriter,
    parse_dtype,
    sha256_file,
    tensor_bytes,
)
from .vector import (
    DEFAULT_MAX_SHARD,
    ReasoningVector,
    compile_excludes,
    dtype_name,
    is_excluded,
    norm_summary,
)
from .writer import (
    SLAB_ELEMS,
    SlabPool,
    base_manifest,
    stored_delta,
    tensor_json,
    write_dense_files,
)

ENCODINGS = ("dense", "lora", "sparse")
SVD_METHODS = ("randomized", "exact")
# 2-D weights that are not plain nn.Linear / nn.Embedding live: keep them dense.
NOT_LORA = re.compile(r"(norm|\.experts\.|\.gate\.weight$|router)")
EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
SPARSE_WORTH_IT = 0.9  # refuse a sparse artifact that would not save at least 10%


def lora_eligible(name: str, shape: tuple[int, ...]) -> bool:
    """Whether PEFT can hold this delta as LoRA (a Linear or Embedding weight)."""
    return len(shape) == 2 and name.endswith(".weight") and not NOT_LORA.search(name)


def _file_info(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {
        n: {"sha256": sha256_file(folder / n), "size": (folder / n).stat().st_size} for n in names
    }


def compress_vector(
    vec: ReasoningVector,
    out: str | os.PathLike[str],
    *,
    encoding: str,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    svd: str = "randomized",
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    exclude: list[str] | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD,
) -> Path:
    """Write ``vec`` to ``out`` as a ``lora`` or ``sparse`` artifact (or ``dense``).

    Example:
        >>> compress_vector(load_vector("./vec"), "./vec-lora", encoding="lora", rank=64)
    """
    out_path = Path(out)
    check_output(out_path, overwrite=overwrite)
    if encoding not in ENCODINGS:
        raise InputError(f"--encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    storage = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    exclude = list(exclude or [])
    if encoding == "dense":
        return vec.save(
            out_path,
            dtype=storage,
            overwrite=overwrite,
            exclude=exclude,
            allow_nonfinite=allow_nonfinite,
            max_shard_size=max_shard_size,
        )
    patterns = compile_excludes(exclude)
    names = [n for n in vec.names if not is_excluded(n, patterns)]
    excluded = [n for n in vec.names if is_excluded(n, patterns)]
    if not names:
        raise InputError("every tensor was excluded: the vector would be empty")
    if encoding == "lora":
        return _write_lora(
            vec,
            out_path,
            names,
            excluded,
            exclude,
            rank=rank,
            energy=energy,
            max_error=max_error,
            svd=svd,
            device=device,
            storage=storage,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            max_shard_size=max_shard_size,
        )
    return _write_sparse(
        vec,
        out_path,
        names,
        excluded,
        exclude,
        storage=storage,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
    )


def _check_lora_options(
    rank: int | None, energy: float | None, max_error: float | None, svd: str
) -> None:
    from .encodings.lora import check_rank_options

    if svd not in SVD_METHODS:
        raise InputError(f"--svd must be one of {', '.join(SVD_METHODS)}, not {svd!r}")
    if rank is None and energy is None and max_error is None:
        raise InputError("--encoding lora needs --rank, --energy or --max-error (e.g. --rank 64)")
    try:
        check_rank_options(rank=rank, energy=energy, max_error=max_error)
    except ValueError as e:
        msg = str(e).replace("rank must", "--rank must").replace("energy must", "--energy must")
        raise InputError(msg.replace("max_error must", "--max-error must")) from None


def _write_lora(
    vec: ReasoningVector,
    out: Path,
    names: list[str],
    excluded: list[str],
    exclude: list[str],
    *,
    rank: int | None,
    energy: float | None,
    max_error: float | None,
    svd: str,
    device: str,
    storage: torch.dtype | None,
    overwrite: bool,
    allow_nonfinite: bool,
    max_shard_size: int,
) -> Path:
    from .apply import resolve_device
    from .encodings.lora import factorize, write_peft_adapter

    _check_lora_options(rank, energy, max_error, svd)
    dev = resolve_device(device)
    lora_names = [n for n in names if lora_eligible(n, vec.shapes[n])]
    dense_names = [n for n in names if n not in set(lora_names)]
    if not lora_names:
        raise InputError(
            "no tensor of this vector is a Linear/Embedding weight PEFT can hold as LoRA"
        )
    factor_dtype = storage or vec.source.dtypes[lora_names[0]]
    norms: dict[str, float] = {}
    modules: dict[str, dict[str, Any]] = {}
    factors = {}
    err_sq = 0.0
    lora_bytes_dense = 0
    svd_seconds = 0.0
    with atomic_dir(out, overwrite=overwrite) as tmp:
        progress = bar(len(lora_names), "factorising", unit="tensor")
        try:
            for name in lora_names:
                delta = vec.get(name)
                if not bool(torch.isfinite(delta).all()):
                    raise InputError(
                        f"the delta of {name} holds NaN/Inf values; LoRA cannot encode them"
                    )
                started = time.perf_counter()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                factor = factorize(
                    delta, rank=rank, energy=energy, max_error=max_error, method=svd, device=dev
                )
                svd_seconds += time.perf_counter() - started
                norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
                norms[name] = norm
                err_sq += (factor.rel_error * norm) ** 2
                lora_bytes_dense += delta.numel() * (storage or vec.source.dtypes[name]).itemsize
                modules[name] = {
                    "rank": factor.rank,
                    "rel_error": factor.rel_error,
                    "energy_kept": factor.energy_kept,
                }
                if factor.rank > 0:
                    factors[name] = factor
                del delta
                progress.update(1)
        finally:
            progress.close()
        if not factors:
            raise InputError("every LoRA-eligible delta is zero: nothing to encode as LoRA")
        embeddings = {n for n in factors if EMBEDDING.search(n)}
        a_src = (vec.meta.get("sources") or {}).get("a") or {}
        base = a_src.get("repo_id") if a_src.get("kind") == "hub" else None
        try:
            adapter_files = write_peft_adapter(
                tmp,
                factors,
                embedding_names=embeddings,
                base_model_name_or_path=base,
                dtype=factor_dtype,
            )
        except ValueError as e:
            raise InputError(f"cannot write the PEFT adapter: {e}") from None
        files = _file_info(tmp, adapter_files)
        dense_json: dict[str, Any] = {}
        dense_bytes = 0
        if dense_names:
            w = write_dense_files(
                vec,
                dense_names,
                tmp,
                dtype=storage,
                allow_nonfinite=allow_nonfinite,
                max_shard_size=max_shard_size,
                desc="writing dense part",
            )
            files.update(w.files)
            for n in dense_names:
                dense_json[n] = {
                    **tensor_json(w.book.tensors[n], w.shapes[n], w.dtypes[n]),
                    "stored": "dense",
                }
                norms[n] = dense_json[n]["norm"]
                dense_bytes += math.prod(w.shapes[n]) * w.dtypes[n].itemsize
        tensors: dict[str, Any] = {}
        for n in names:
            if n in dense_json:
                tensors[n] = dense_json[n]
            else:
                dt = storage or vec.source.dtypes[n]
                tensors[n] = {
                    "shape": list(vec.shapes[n]),
                    "dtype": DTYPE_NAMES[dt],
                    "norm": norms[n],
                    "stored": "lora",
                    **modules[n],
                }
        total_sq = sum(v * v for v in norms.values())
        peft_sq = sum(norms[n] ** 2 for n in factors)
        artifact_bytes = sum(f["size"] for f in files.values())
        ranks = sorted(m["rank"] for m in modules.values())
        manifest = base_manifest(vec, "lora", excluded, exclude)
        manifest["dtype"] = sorted({dtype_name(storage or vec.source.dtypes[n]) for n in names})
        manifest["files"] = files
        manifest["tensors"] = tensors
        manifest["stats"] = norm_summary({n: v * v for n, v in norms.items()})
        manifest["compression"] = {
            "encoding": "lora",
            "svd": svd,
            "device": str(dev),
            "svd_seconds": round(svd_seconds, 3),
            "rank_rule": {"rank": rank, "energy": energy, "max_error": max_error},
            "ranks": {"min": ranks[0], "median": ranks[len(ranks) // 2], "max": ranks[-1]},
            "lora_tensors": len(factors),
            "dense_tensors": len(dense_names),
            "overall_rel_error": math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0,
            "bytes": artifact_bytes,
            "dense_bytes": lora_bytes_dense + dense_bytes,
            "ratio": artifact_bytes / max(1, lora_bytes_dense + dense_bytes),
            "peft_norm_share": peft_sq / total_sq if total_sq > 0 else 1.0,
            "rvhub_norm_share": 1.0 - (peft_sq / total_sq if total_sq > 0 else 1.0),
        }
        write_manifest(tmp, manifest)
    return out.absolute()


def _write_sparse(
    vec: ReasoningVector,
    out: Path,
    names: list[str],
    excluded: list[str],
    exclude: list[str],
    *,
    storage: torch.dtype | None,
    overwrite: bool,
    allow_nonfinite: bool,
) -> Path:
    """Encode every tensor once, spooling the parts; then write header + spool as one file.

    The safetensors header (every part's dtype and length) must come first, and is only known
    once everything is encoded; so the parts go to a spool file beside the output and are
    copied after the header (hashed on the way). That costs one write and read of the sparse
    bytes, much less than encoding twice, and keeps one tensor in memory at a time.
    """
    from .encodings.sparse import INDEX_PART, VALUE_PART, encode_sparse, sparse_tensor_names

    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    tensors: dict[str, Any] = {}
    dense_total = sparse_total = 0
    pool, scratch = SlabPool(SLAB_ELEMS), Scratch()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        spool_path = tmp / "parts.spool"
        with open(spool_path, "wb") as spool:
            progress = bar(len(names), "encoding sparse parts", unit="tensor")
            try:
                for name in names:
                    t, moments = stored_delta(
                        vec, name, storage or vec.source.dtypes[name], pool, scratch
                    )
                    if moments.nonfinite and not allow_nonfinite:
                        raise InputError(
                            f"the delta of {name} holds NaN/Inf values; pass --allow-nonfinite "
                            "to keep them"
                        )
                    parts = encode_sparse(t)
                    dense_total += t.nbytes
                    info: dict[str, Any] = {
                        "shape": list(t.shape),
                        "dtype": DTYPE_NAMES[t.dtype],
                        "norm": math.sqrt(moments.sumsq),
                    }
                    if moments.nonfinite:
                        info["nonfinite"] = moments.nonfinite
                    if parts is None:
                        specs.append((name, t.dtype, tuple(t.shape)))
                        spool.write(tensor_bytes(t))
                        info["stored"] = "dense"
                        sparse_total += t.nbytes
                    else:
                        idx, val = sparse_tensor_names(name)
                        for part_name, part in ((idx, parts[INDEX_PART]), (val, parts[VALUE_PART])):
                            specs.append((part_name, part.dtype, tuple(part.shape)))
                            spool.write(tensor_bytes(part))
                            sparse_total += part.nbytes
                        info["stored"] = "sparse"
                        info["nonzero"] = int(parts[VALUE_PART].numel())
                    tensors[name] = info
                    del t, parts
                    progress.update(1)
            finally:
                progress.close()
        ratio = sparse_total / max(1, dense_total)
        if ratio > SPARSE_WORTH_IT:
            raise InputError(
                f"sparse encoding would keep {ratio:.0%} of the dense size for this vector (most "
                "entries changed): not worth it; keep it dense or use --encoding lora"
            )
        writer = SafetensorsWriter(
            tmp / "vector.safetensors", specs, {"format": "pt", "rvhub_encoding": "sparse"}
        )
        try:
            with open(spool_path, "rb") as spool:
                buf = bytearray(16 << 20)
                view = memoryview(buf)
                while n := spool.readinto(buf):
                    writer.write(view[:n])
            sha, size = writer.close()
        except BaseException:
            writer.abort()
            raise
        spool_path.unlink()
        manifest = base_manifest(vec, "sparse", excluded, exclude)
        manifest["dtype"] = sorted({dtype_name(DTYPES[i["dtype"]]) for i in tensors.values()})
        manifest["files"] = {"vector.safetensors": {"sha256": sha, "size": size}}
        manifest["tensors"] = tensors
        manifest["stats"] = norm_summary({n: i["norm"] ** 2 for n, i in tensors.items()})
        manifest["compression"] = {
            "encoding": "sparse",
            "sparse_tensors": sum(1 for i in tensors.values() if i["stored"] == "sparse"),
            "dense_tensors": sum(1 for i in tensors.values() if i["stored"] == "dense"),
            "nonzero_fraction": sum(
                i.get("nonzero", math.prod(i["shape"])) for i in tensors.values()
            )
            / max(1, sum(math.prod(i["shape"]) for i in tensors.values())),
            "bytes": size,
            "dense_bytes": dense_total,
            "ratio": ratio,
            "lossless": True,
        }
        write_manifest(tmp, manifest)
    return out.absolute()
