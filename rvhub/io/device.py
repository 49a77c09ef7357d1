"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from ..errors import InputError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuses a device this machine lacks."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError:
        raise InputError(f"`device` {device!r} is unknown; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"`device={device}` asked for, but this machine has no CUDA GPU; use `device=cpu`"
        )
    return dev
