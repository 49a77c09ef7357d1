"""Model checkpoints, opened lazily: a folder, one ``.safetensors`` file, or a Hub id.

A :class:`Checkpoint` knows every tensor's name, dtype, shape and byte range from the
safetensors headers alone; tensors are read only when asked for. Pickle checkpoints
(``pytorch_model.bin``) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .safetensors_io import TensorEntry, read_header, read_tensor

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

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

    # -- lookup -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

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

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    @property
    def files(self) -> list[Path]:
        """Weight files in the order their tensors are stored."""
        seen: dict[Path, None] = {}
        for e in self.entries.values():
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


def tied_embeddings(config: dict[str, Any]) -> bool:
    """transformers' rule: ``tie_word_embeddings`` (top level or text sub-config), default True."""
    for key in ("text_config", "llm_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and "tie_word_embeddings" in sub:
            return bool(sub["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", True))


def split_revision(source: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); local paths never carry a revision."""
    if "@" in source and not Path(source).exists():
        repo, _, rev = source.rpartition("@")
        if repo and rev:
            return repo, rev
    return source, None


def looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not source.startswith((".", "/", "~"))


def open_checkpoint(source: str | os.PathLike[str], *, revision: str | None = None) -> Checkpoint:
    """Open a checkpoint from a local folder or file, or a Hub id (``org/name[@revision]``).

    Only safetensors weights and small side files (config, tokenizer) are downloaded from the
    Hub; the resolved commit sha is recorded in ``checkpoint.source``.

    Example:
        >>> ckpt = open_checkpoint("./my-model")
        >>> ckpt.get("model.embed_tokens.weight").shape
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if revision:
            raise InputError(f"--revision applies to Hub ids, but {text} is a local path")
        return _open_local(path)
    repo_id, rev = split_revision(text)
    if looks_like_hub_id(repo_id):
        from .hub import download_checkpoint

        folder, info = download_checkpoint(repo_id, revision=revision or rev)
        ckpt = _open_local(folder)
        ckpt.source = info
        return ckpt
    raise InputError(f"{text}: no such file or folder, and not a Hub id (org/name)")


def _open_local(path: Path) -> Checkpoint:
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".safetensors":
            if path.suffix in PICKLE_SUFFIXES:
                raise InputError(
                    f"{path} is a pickle checkpoint, which rvhub refuses to load; {CONVERT_HINT}"
                )
            raise InputError(f"{path} is not a .safetensors file or a model folder")
        single, _ = read_header(path)
        return Checkpoint(
            path, single, _read_config(path.parent), {"kind": "local", "path": str(path)}
        )
    index_path = path / SAFE_INDEX
    entries: dict[str, TensorEntry] = {}
    index = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{index_path} is not a valid sharded-checkpoint index") from None
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            shard_path = _inside(path, shard)
            if not shard_path.is_file():
                raise InputError(f"{path}: shard {shard} named by the index is missing")
            found, _ = read_header(shard_path)
            missing = [n for n in names if n not in found]
            if missing:
                raise InputError(f"{shard_path} lacks {missing[0]!r}, which the index places there")
            for n in names:
                entries[n] = found[n]
    elif (path / SAFE_SINGLE).is_file():
        entries, _ = read_header(path / SAFE_SINGLE)
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
    return Checkpoint(
        path, entries, _read_config(path), {"kind": "local", "path": str(path)}, index
    )


def _inside(folder: Path, name: str) -> Path:
    """Resolve ``name`` inside ``folder``, refusing anything that escapes it."""
    from .manifest import inside_folder

    candidate = (folder / name).resolve()
    if candidate == folder.resolve() or not inside_folder(folder.resolve(), candidate):
        raise InputError(f"{folder}: refusing path {name!r}, which points outside the folder")
    return candidate


def _read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        raise InputError(f"{cfg} is not valid JSON") from None
    return data if isinstance(data, dict) else {}
