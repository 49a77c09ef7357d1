"""Reading compressed artifacts back as vector sources (the same API as dense ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import IntegrityError
from ..extract import FileHandles, read_range
from ..safetensors_io import TensorEntry
from ..vector import VectorSource
from .sparse import INDEX_PART, VALUE_PART, decode_sparse, sparse_tensor_names


def _declared(
    manifest: dict[str, Any],
) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    from ..safetensors_io import DTYPES

    shapes, dtypes = {}, {}
    for name, info in manifest["tensors"].items():
        dt = info.get("dtype")
        if dt not in DTYPES:
            raise IntegrityError(f"rvhub.json: tensor {name!r} has unknown dtype {dt!r}")
        shapes[name] = tuple(info["shape"])
        dtypes[name] = DTYPES[dt]
    return shapes, dtypes


def _entries(folder: Path, manifest: dict[str, Any]) -> dict[str, TensorEntry]:
    from ..load import dense_entries

    return dense_entries(folder, manifest)


class LoraSource(VectorSource):
    """LoRA factors from the PEFT adapter (``delta = B @ A``) plus the dense remainder."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        from .lora import read_peft_adapter

        shapes, dtypes = _declared(manifest)
        super().__init__(shapes, dtypes)
        try:
            self.factors = read_peft_adapter(folder)
        except ValueError as e:
            raise IntegrityError(f"{folder}: the PEFT adapter is unreadable: {e}") from None
        self.entries = _entries(folder, manifest)
        self._handles = FileHandles()
        for name, info in manifest["tensors"].items():
            stored = info.get("stored")
            if stored == "lora" and info.get("rank", 1) > 0:
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

    def delta_on(
        self, name: str, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``B @ A`` computed on ``device`` (one module at a time), or the dense delta."""
        if name in self.factors:
            a, b = self.factors[name]
            return (b.to(device) @ a.to(device)).to(dtype or torch.float32)
        if name in self.entries:
            t = read_range(self.entries[name], 0, self.entries[name].numel, self._handles)
            return t.reshape(self.shapes[name]).to(device)
        return torch.zeros(self.shapes[name], device=device, dtype=dtype or torch.float32)  # rank 0

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        t = self.delta_on(name, "cpu")
        return t if dtype is None else t.to(dtype)

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.factors:
            a, b = self.factors[name]
            cols = a.shape[1]
            r0, r1 = start // cols, -(-stop // cols)
            rows = (b[r0:r1] @ a).reshape(-1)
            return rows[start - r0 * cols : stop - r0 * cols]
        if name in self.entries:
            return read_range(self.entries[name], start, stop, self._handles).float()
        return torch.zeros(stop - start)


class SparseSource(VectorSource):
    """Tensors stored as (index, value) parts where that was smaller, dense elsewhere."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        shapes, dtypes = _declared(manifest)
        super().__init__(shapes, dtypes)
        self.entries = _entries(folder, manifest)
        self._handles = FileHandles()
        self.stored = {n: info.get("stored", "dense") for n, info in manifest["tensors"].items()}
        for name, how in self.stored.items():
            needed = sparse_tensor_names(name) if how == "sparse" else (name,)
            if any(n not in self.entries for n in needed):
                raise IntegrityError(f"{folder}: {name} is declared {how} but its data is missing")

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        if self.stored[name] == "sparse":
            idx, val = sparse_tensor_names(name)
            parts = {
                INDEX_PART: read_range(
                    self.entries[idx], 0, self.entries[idx].numel, self._handles
                ),
                VALUE_PART: read_range(
                    self.entries[val], 0, self.entries[val].numel, self._handles
                ),
            }
            try:
                t = decode_sparse(parts, self.shapes[name], self.dtypes[name])
            except ValueError as e:
                raise IntegrityError(f"sparse tensor {name} is corrupt: {e}") from None
        else:
            entry = self.entries[name]
            t = read_range(entry, 0, entry.numel, self._handles).reshape(self.shapes[name])
        return t if dtype is None else t.to(dtype)

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self.stored[name] == "dense":
            return read_range(self.entries[name], start, stop, self._handles).float()
        return self.get(name).reshape(-1)[start:stop]


def open_encoded(folder: Path, manifest: dict[str, Any]) -> VectorSource:
    """The source for a ``lora`` or ``sparse`` artifact."""
    encoding = manifest["encoding"]
    if encoding == "lora":
        return LoraSource(folder, manifest)
    if encoding == "sparse":
        return SparseSource(folder, manifest)
    raise IntegrityError(f"{folder}: encoding {encoding!r} is not readable by this rvhub version")


__all__ = ["LoraSource", "SparseSource", "open_encoded"]
