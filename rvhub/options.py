"""The options several commands share, each a frozen dataclass that checks itself.

Like PEFT's ``LoraConfig``, every class validates in ``__post_init__`` and its errors name the
**Python parameter** in backticks (`` `rank` must be a positive integer``); the CLI builds the
same classes from its flags and rewrites those names into flags in one place
(:func:`rvhub.cli.flag_message`), so a shell user still reads ``--rank``. An option that does
not apply to what was asked (``rank`` with ``encoding="dense"``) is refused here, for the
library and the CLI alike.

Nothing here imports torch: ``rvhub --help`` stays fast.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from .constants import DEFAULT_MAX_SHARD, SVD_METHODS, VOCAB_MODES
from .engines import ENGINE_NAMES, get_engine, server_rank
from .errors import InputError

ENCODING_NAMES = ("dense", "lora", "sparse")
APPLY_DTYPES = ("bfloat16",)  # the one output dtype an apply may ask for: FP8 dequantized

# A decimal number as users write one: no underscores (float("1_5") is 15), no hex, no inf/nan.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def one_of(param: str, value: object, allowed: Iterable[str]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``, naming ``param``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise InputError(f"`{param}` must be one of {', '.join(allowed)}, not {value!r}")


def check_scale(scale: float | str, param: str = "scale") -> float:
    """α as a finite float that float32 math can hold; strings are parsed strictly."""
    if isinstance(scale, str):
        if not _NUMBER.fullmatch(scale.strip()):
            raise InputError(f"`{param}` must be a finite number, not {scale!r}")
        value = float(scale)
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        value = float(scale)
    else:
        raise InputError(f"`{param}` must be a number, not {scale!r}")
    if not math.isfinite(value):
        raise InputError(f"`{param}` must be a finite number, not {scale!r}")
    if abs(value) > _FLOAT32_MAX:
        raise InputError(
            f"`{param}` {scale!r} is beyond float32's range (±{_FLOAT32_MAX:.3g}), in which the "
            "addition is computed"
        )
    return value


def check_threads(threads: int | None) -> int | None:
    """None (every core) or a whole number ≥ 1."""
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise InputError(f"`threads` must be a whole number of at least 1, not {threads!r}")
    return threads


def parse_size(size: int | str, param: str = "max_shard_size") -> int:
    """``"5GB"``/``"500MB"``/``1024`` -> bytes (decimal units like transformers; ``GiB`` binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise InputError(f"`{param}` must be positive, not {size!r}")
        return size
    if not isinstance(size, str):
        raise InputError(f"`{param}` must be a size like 5GB, not {size!r}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not m:
        raise InputError(f"`{param}` {size!r} is not a size; use e.g. 5GB or 500MB")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    value = int(float(m.group(1)) * units[m.group(2) or "B"])
    if value < 1:
        raise InputError(f"`{param}` must be positive, not {size!r}")
    return value


def exclude_patterns(exclude: Iterable[str] | str) -> list[str]:
    """The ``exclude`` regexes as a list: one string is one pattern, not its characters."""
    return [exclude] if isinstance(exclude, str) else list(exclude)


def compile_excludes(patterns: Iterable[str] | str) -> list[re.Pattern[str]]:
    out = []
    for p in exclude_patterns(patterns):
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise InputError(f"`exclude` {p!r} is not a valid regular expression: {e}") from None
    return out


def split_excluded(
    names: Iterable[str], exclude: Iterable[str] | str
) -> tuple[list[str], list[str]]:
    """``(kept, excluded)``: ``names`` split by the ``exclude`` regexes (``re.search``)."""
    patterns = compile_excludes(exclude)
    kept: list[str] = []
    excluded: list[str] = []
    for name in names:
        (excluded if any(p.search(name) for p in patterns) else kept).append(name)
    return kept, excluded


_LORA_NEEDS_A_RULE = '`encoding="lora"` needs `rank`, `energy` or `max_error` (e.g. `rank=64`)'


def check_rank_rules(*, rank: int | None, energy: float | None, max_error: float | None) -> None:
    """The LoRA rank rules' ranges (each may be None): a positive whole ``rank``, ``energy``
    in (0, 1], ``max_error`` in [0, 1)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"`rank` must be a positive integer, got {rank!r}")
    if energy is not None and not (_is_number(energy) and 0.0 < energy <= 1.0):
        raise InputError(f"`energy` must be in (0, 1] (the fraction of Σσ² kept), got {energy!r}")
    if max_error is not None and not (_is_number(max_error) and 0.0 <= max_error < 1.0):
        raise InputError(
            f"`max_error` must be in [0, 1) (a relative Frobenius error), got {max_error!r}"
        )


@dataclass(frozen=True)
class LoraOptions:
    """How a vector becomes a LoRA adapter: truncated SVD per module, for one serving engine.

    ``rank`` caps each module's rank, ``energy`` keeps that fraction of Σσ², ``max_error``
    bounds the relative Frobenius error (at least one is needed); ``svd`` is ``randomized`` or
    ``exact``; ``device`` runs the SVDs; ``engine`` (``peft``, ``vllm``, ``sglang``,
    ``llama.cpp``) picks what the adapter holds; ``base_model`` is the adapter's
    ``base_model_name_or_path``.
    """

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    svd: str = "randomized"
    device: str = "cpu"
    engine: str = "peft"
    base_model: str | None = None

    def __post_init__(self) -> None:
        one_of("svd", self.svd, SVD_METHODS)
        one_of("engine", self.engine, ENGINE_NAMES)
        rank, energy, max_error = self.rank, self.energy, self.max_error
        if rank is None and energy is None and max_error is None:
            raise InputError(_LORA_NEEDS_A_RULE)
        check_rank_rules(rank=rank, energy=energy, max_error=max_error)
        engine = get_engine(self.engine)
        if rank is not None and engine.max_ranks is not None and server_rank(engine, rank) is None:
            raise InputError(
                f"`engine={engine.name}`: rank {rank} is above {engine.version}'s largest "
                f"{engine.rank_flag} {engine.max_ranks[-1]}; use `rank={engine.max_ranks[-1]}` "
                "or less"
            )


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class WriteOptions:
    """How a vector is written: its encoding, storage dtype, limits and threads.

    ``dtype`` is a name (``bfloat16``, ``float16``, ``float32``) or a ``torch.dtype``; None
    keeps each delta's own dtype. ``max_shard_size`` (bytes, or ``"5GB"``, decimal units like
    transformers) splits ``vector.safetensors``. ``lora`` is required with
    ``encoding="lora"`` and refused with any other encoding.
    """

    encoding: str = "dense"
    dtype: Any = None
    allow_nonfinite: bool = False
    max_shard_size: int | str = DEFAULT_MAX_SHARD
    threads: int | None = None
    lora: LoraOptions | None = None

    def __post_init__(self) -> None:
        one_of("encoding", self.encoding, ENCODING_NAMES)
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
        check_threads(self.threads)
        if isinstance(self.dtype, str):
            from .io.safetensors import parse_dtype

            object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.encoding == "lora" and self.lora is None:
            raise InputError(_LORA_NEEDS_A_RULE)
        if self.encoding != "lora" and self.lora is not None:
            raise InputError(f'`lora` options need `encoding="lora"`, not {self.encoding!r}')

    @classmethod
    def build(cls, *, encoding: str = "dense", **options: Any) -> WriteOptions:
        """The options of ``ReasoningVector.save``: LoRA ones go into :class:`LoraOptions`,
        and any of them given with another encoding is refused by name."""
        lora_names = [f.name for f in fields(LoraOptions)]
        lora = {k: options.pop(k) for k in list(options) if k in lora_names}
        if encoding != "lora":
            defaults = LoraOptions.__dataclass_fields__
            given = [k for k, v in lora.items() if v != defaults[k].default]
            if given:
                names = ", ".join(f"`{k}`" for k in given)
                one_of("encoding", encoding, ENCODING_NAMES)
                raise InputError(
                    f'{names} need `encoding="lora"` (the encoding asked for is {encoding!r})'
                )
            return cls(encoding=encoding, **options)
        return cls(encoding=encoding, lora=LoraOptions(**lora), **options)

    @property
    def max_shard_bytes(self) -> int:
        """``max_shard_size`` in bytes (``__post_init__`` parsed it)."""
        return parse_size(self.max_shard_size)


@dataclass(frozen=True)
class ApplyOptions:
    """How a vector is added to a target, on disk or live: ``θ + scale·v``.

    ``exclude`` (regexes) skips vector tensors; ``vocab`` is ``strict`` or ``overlap`` (add the
    delta to the shared rows of a different vocabulary); ``allow_nonfinite`` /
    ``allow_unrelated`` override the NaN/Inf and lineage refusals. On disk only: ``dtype``
    (``bfloat16`` dequantizes an FP8 target), ``device``, ``threads``.
    """

    scale: float | str = 1.0
    exclude: Iterable[str] = ()  # one string is one regex; kept as a tuple
    vocab: str = "strict"
    allow_nonfinite: bool = False
    allow_unrelated: bool = False
    dtype: str | None = None
    device: str = "cpu"
    threads: int | None = None
    given_scale: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        given = self.scale if self.given_scale is None else self.given_scale
        object.__setattr__(self, "given_scale", given)
        object.__setattr__(self, "scale", check_scale(self.scale))
        object.__setattr__(self, "exclude", tuple(exclude_patterns(self.exclude)))
        one_of("vocab", self.vocab, VOCAB_MODES)
        if self.dtype is not None:
            one_of("dtype", self.dtype, APPLY_DTYPES)
        check_threads(self.threads)

    @property
    def alpha(self) -> float:
        """``scale`` as the float ``__post_init__`` checked it to be."""
        return float(self.scale)


def either(options: Any, built: Any) -> Any:
    """``options`` when given, else ``built`` (the same class, from the individual
    parameters); both at once is refused rather than one silently ignored."""
    if options is None:
        return built
    if built != type(built)():
        raise InputError(
            "pass `options` or the individual options it holds, not both (they would be ignored)"
        )
    return options


@dataclass(frozen=True)
class HubOptions:
    """How Hub ids are resolved, as huggingface_hub means them: ``revision`` (a branch, tag or
    commit sha), ``token``, ``cache_dir``, ``local_files_only``."""

    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | None = None
    local_files_only: bool = False

    def __post_init__(self) -> None:
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision):
            raise InputError(
                f"`revision` must be a branch, tag or commit sha, not {self.revision!r}"
            )

    def download_kwargs(self) -> dict[str, Any]:
        """The keyword arguments huggingface_hub's downloads take (revision aside)."""
        return {
            "token": self.token,
            "cache_dir": self.cache_dir,
            "local_files_only": self.local_files_only,
        }


__all__ = [
    "ApplyOptions",
    "HubOptions",
    "LoraOptions",
    "WriteOptions",
    "check_rank_rules",
    "check_scale",
    "compile_excludes",
    "either",
    "exclude_patterns",
    "parse_size",
    "split_excluded",
]
