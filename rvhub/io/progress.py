"""The one place rvhub shows progress and logs: the library itself never prints."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ..constants import ENV_DISABLE_PROGRESS

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger("rvhub")


def progress_disabled() -> bool:
    flag = os.environ.get(ENV_DISABLE_PROGRESS) or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    return flag is not None and flag.strip().lower() not in ("", "0", "false", "no")


def human_bytes(n: float) -> str:
    """``184048`` -> ``184.0 KB`` (decimal units, like the Hub shows sizes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def bar(total: int | None, desc: str, *, unit: str = "B", **kwargs: Any) -> tqdm:
    """A progress bar on stderr (bytes by default); silent when disabled or not a terminal."""
    from tqdm.auto import tqdm

    # None lets tqdm hide the bar when stderr is not a terminal (logs, CI, pipes).
    disable = True if progress_disabled() else None
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=disable,
        leave=False,
        dynamic_ncols=True,
        **kwargs,
    )
