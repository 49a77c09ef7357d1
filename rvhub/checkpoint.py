"""Local model checkpoints, opened lazily: a folder or one ``.safetensors`` file.

A :class:`Checkpoint` knows every tensor's name, dtype, shape and byte range from the
safetensors headers alone; tensors are read only when asked for. Pickle checkpoints
(``pytorch_model.bin``) are refused: loading them can run arbitrary code. Hub ids are
resolved to local folders above this layer (:mod:`rvhub.hub.resolve`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .architecture import (
    FP8_SCALE_SUFFIX,
    QUANTIZED_METHODS,
    QUANTIZED_TENSOR_SUFFIXES,
    QUANTIZED_WEIGHT_DTYPES,
    quantization_config,
    tied_embeddings,
)
from .constants import CONFIG_NAME, PICKLE_SUFFIXES, SAFE_INDEX, SAFE_SINGLE
from .errors import InputError
from .io.progress import logger
from .io.safetensors import TensorEntry, read_header, read_tensor
from .manifest import inside_folder

if TYPE_CHECKING:
    import torch

QUANTIZED_FIX = (
    "rvhub needs real-valued weights: use the model's unquantized (bf16/fp16) release, and "
    "quantize after applying"
)
CONVERT_HINT = (
    "convert it once with transformers: "
    "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True) "
    "(only for files you trust: .bin files are pickles and can run code)"
)


@dataclass
class Checkpoint:
    """A model checkpoint's tensors (lazy), config and provenance."""

    path: Path
    entries: dict[str, TensorEntry]
    config: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] | None = None  # the sharded index as found, if any
    config_problem: str | None = None  # why config.json is unusable (missing, not an object, ...)
    # Block-quantized FP8: the block size, and each FP8 weight's float32 weight_scale_inv entry
    # (kept out of ``entries``: a scale is part of its weight, not a tensor of its own).
    fp8_block: tuple[int, int] | None = None
    fp8_scales: dict[str, TensorEntry] = field(default_factory=dict)

    # -- lookup -----------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> torch.Tensor:
        try:
            entry = self.entries[name]
        except KeyError:
            raise InputError(f"tensor {name!r} is not in {self.path}") from None
        return read_tensor(entry)

    @property
    def files(self) -> list[Path]:
        """Weight files in the order their tensors are stored."""
        seen: dict[Path, None] = {}
        for e in [*self.entries.values(), *self.fp8_scales.values()]:
            seen.setdefault(e.path, None)
        return list(seen)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @property
    def model_type(self) -> str | None:
        mt = self.config.get("model_type")
        return str(mt) if mt is not None else None

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def tie_word_embeddings(self) -> bool:
        return tied_embeddings(self.config)

    def in_file_order(self) -> list[TensorEntry]:
        """Entries sorted by (file, offset): reading them in this order is sequential I/O."""
        order = {p: i for i, p in enumerate(sorted(self.files))}
        return sorted(self.entries.values(), key=lambda e: (order[e.path], e.start))


def open_local_checkpoint(path: Path) -> Checkpoint:
    """Open a local model folder or ``.safetensors`` file (see :func:`rvhub.open_checkpoint`)."""
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".safetensors":
            if path.suffix in PICKLE_SUFFIXES:
                raise InputError(
                    f"{path} is a pickle checkpoint, which rvhub refuses to load; {CONVERT_HINT}"
                )
            raise InputError(f"{path} is not a .safetensors file or a model folder")
        single, _ = read_header(path)
        config, problem = _read_config(path.parent)
        ckpt = Checkpoint(path, single, config, {"kind": "local", "path": str(path)})
        ckpt.config_problem = problem
        check_format(ckpt)
        return ckpt
    index_path = path / SAFE_INDEX
    entries: dict[str, TensorEntry] = {}
    index = None
    # transformers' from_pretrained (5.24, modeling_utils._get_resolved_checkpoint_files) takes
    # model.safetensors before the index; so does rvhub, or the two would read other weights.
    if (path / SAFE_SINGLE).is_file():
        if index_path.is_file():
            logger.warning(
                "%s holds both %s and %s; using %s, as transformers' from_pretrained does "
                "(remove the stale one)",
                path,
                SAFE_SINGLE,
                SAFE_INDEX,
                SAFE_SINGLE,
            )
        entries, _ = read_header(path / SAFE_SINGLE)
    elif index_path.is_file():
        entries, index = _read_sharded(path, index_path)
    else:
        shards_found = sorted(path.glob("*.safetensors"))
        if len(shards_found) == 1:
            entries, _ = read_header(shards_found[0])
        elif shards_found:
            raise InputError(f"{path} holds several .safetensors files but no {SAFE_INDEX}")
        elif any(path.glob(f"*{s}") for s in PICKLE_SUFFIXES):
            raise InputError(
                f"{path} holds only pickle weights (*.bin), which rvhub refuses to load; {CONVERT_HINT}"
            )
        else:
            raise InputError(f"{path} holds no model.safetensors or {SAFE_INDEX}")
    config, problem = _read_config(path)
    ckpt = Checkpoint(path, entries, config, {"kind": "local", "path": str(path)}, index)
    ckpt.config_problem = problem
    check_format(ckpt)
    return ckpt


def _read_sharded(path: Path, index_path: Path) -> tuple[dict[str, TensorEntry], dict[str, Any]]:
    """Every tensor of every shard the index names, and the index."""
    entries: dict[str, TensorEntry] = {}
    try:
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{index_path} is not a valid sharded-checkpoint index") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(
            f"{index_path} is not a valid sharded-checkpoint index: weight_map must map "
            "tensor names to shard file names"
        )
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    # transformers (5.25, modeling_utils: every key of each `safe_open` shard) loads every
    # tensor of every shard the index names, listed in weight_map or not: so does rvhub, or
    # an apply would write a model without the tensors the index forgot.
    for shard, names in sorted(shards.items()):
        shard_path = _inside(path, shard)
        if not shard_path.is_file():
            raise InputError(f"{path}: shard {shard} named by the index is missing")
        found, _ = read_header(shard_path)
        missing = [n for n in names if n not in found]
        if missing:
            raise InputError(f"{shard_path} lacks {missing[0]!r}, which the index places there")
        twice = [n for n in found if n in entries]
        if twice:
            raise InputError(
                f"{path}: {twice[0]!r} is stored in two shards ({shard} and "
                f"{entries[twice[0]].path.name}); which one a loader takes is undefined"
            )
        unlisted = [n for n in found if n not in weight_map]
        if unlisted:
            logger.warning(
                "%s holds %d tensor(s) its index does not list (e.g. %s); they are read, "
                "as transformers reads them",
                shard_path,
                len(unlisted),
                unlisted[0],
            )
        entries.update(found)
    return entries, index


def check_format(ckpt: Checkpoint) -> None:
    """Refuse a quantized checkpoint rvhub cannot take differences of, from its
    ``quantization_config`` or from its tensors (packed weights without a config)."""
    q = quantization_config(ckpt.config)
    if q is not None and str(q.get("quant_method") or "").lower() == "fp8":
        _take_fp8(ckpt, q)
        q = None
    if q is not None:
        method = str(q.get("quant_method") or "").lower()
        name = QUANTIZED_METHODS.get(method, method or "an unnamed method")
        raise InputError(
            f"{ckpt.path} is quantized with {name} (quantization_config.quant_method = "
            f"{method!r}); {QUANTIZED_FIX}"
        )
    for tname, entry in ckpt.entries.items():
        for suffix, fmt in QUANTIZED_TENSOR_SUFFIXES.items():
            if tname.endswith(suffix):
                raise InputError(
                    f"{ckpt.path} holds {fmt}-quantized tensors ({tname}) without a "
                    f"quantization_config rvhub reads; {QUANTIZED_FIX}"
                )
        if (
            entry.dtype in QUANTIZED_WEIGHT_DTYPES
            and tname.endswith(".weight")
            and tname not in ckpt.fp8_scales
        ):
            raise InputError(
                f"{ckpt.path} holds packed or quantized weights ({tname} is {entry.dtype}) "
                f"without a quantization_config rvhub reads; {QUANTIZED_FIX}"
            )


def _take_fp8(ckpt: Checkpoint, q: dict[str, Any]) -> None:
    """Accept block-quantized e4m3 FP8 (``quant_method: fp8``, ``weight_block_size``): move each
    weight's ``weight_scale_inv`` out of ``entries``; refuse every other FP8 layout."""
    block = q.get("weight_block_size")
    fmt = str(q.get("fmt", "e4m3")).lower()
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        or fmt not in ("e4m3", "float8_e4m3fn")
    ):
        raise InputError(
            f"{ckpt.path} is FP8 without block scales (weight_block_size {block!r}, fmt "
            f"{fmt!r}); rvhub reads block-quantized e4m3 FP8 (DeepSeek-V3 style) only: "
            f"{QUANTIZED_FIX}"
        )
    bh, bw = block
    for name, entry in list(ckpt.entries.items()):
        if entry.dtype == "F8_E5M2":
            raise InputError(f"{ckpt.path}: {name} is float8_e5m2; FP8 weights must be e4m3")
        if entry.dtype != "F8_E4M3":
            continue
        scale = ckpt.entries.get(name + FP8_SCALE_SUFFIX)
        want = (
            (-(-entry.shape[0] // bh), -(-entry.shape[1] // bw)) if len(entry.shape) == 2 else None
        )
        if scale is None or scale.dtype != "F32" or want is None or scale.shape != want:
            raise InputError(
                f"{ckpt.path}: FP8 weight {name} {list(entry.shape)} lacks a float32 "
                f"{name}{FP8_SCALE_SUFFIX} of shape {list(want or [])} (blocks of {bh}×{bw})"
            )
        ckpt.fp8_scales[name] = scale
    for name in ckpt.fp8_scales:
        del ckpt.entries[name + FP8_SCALE_SUFFIX]
    if not ckpt.fp8_scales:
        raise InputError(f"{ckpt.path} declares FP8 quantization but holds no FP8 weights")
    ckpt.fp8_block = (bh, bw)


def check_config(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint without a usable config.json: every architecture check reads it."""
    if ckpt.config_problem:
        raise InputError(
            f"{ckpt.path}: {ckpt.config_problem}, so rvhub cannot check the architecture, the "
            "tied embeddings or the vocabulary; add the model's config.json, or pass "
            "`config_check=False` if you know the checkpoints match"
        )


def _inside(folder: Path, name: str) -> Path:
    """Resolve ``name`` inside ``folder``, refusing anything that escapes it."""
    candidate = (folder / name).resolve()
    if candidate == folder.resolve() or not inside_folder(folder.resolve(), candidate):
        raise InputError(f"{folder}: refusing path {name!r}, which points outside the folder")
    return candidate


def _read_config(folder: Path) -> tuple[dict[str, Any], str | None]:
    """The folder's config.json, and why it is unusable (``None`` when it is fine)."""
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        return {}, f"there is no {CONFIG_NAME} beside the weights"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        raise InputError(f"{cfg} is not valid JSON") from None
    if not isinstance(data, dict):
        return {}, f"{CONFIG_NAME} is not a JSON object"
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        return data, f"{CONFIG_NAME} has no model_type"
    return data, None
