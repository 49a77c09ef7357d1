"""Shared pieces of the benchmarks: a Qwen2.5-1.5B-shaped checkpoint pair and measuring.

The pair is written straight to safetensors (no transformers model in memory) with the real
tensor names and shapes, so transformers can load it and rvhub sees a real checkpoint.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rvhub.io.safetensors import SafetensorsWriter

QWEN25_15B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)


def work_dir(prefix: str, parent: Path | None) -> Path:
    """A fresh temp folder for a benchmark's files, under ``parent`` (created) or the default."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def qwen2_config(**shape: object) -> dict[str, object]:
    cfg = {**QWEN25_15B, **shape}
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "attention_dropout": 0.0,
        **cfg,
    }


def qwen2_specs(cfg: dict[str, object]) -> list[tuple[str, tuple[int, ...]]]:
    h = int(cfg["hidden_size"])  # type: ignore[call-overload]
    inter = int(cfg["intermediate_size"])  # type: ignore[call-overload]
    heads = int(cfg["num_attention_heads"])  # type: ignore[call-overload]
    kv = int(cfg["num_key_value_heads"])  # type: ignore[call-overload]
    hd = h // heads
    specs: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (int(cfg["vocab_size"]), h))
    ]  # type: ignore[call-overload]
    for i in range(int(cfg["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.bias", (kv * hd,)),
            (p + "self_attn.k_proj.weight", (kv * hd, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.bias", (kv * hd,)),
            (p + "self_attn.v_proj.weight", (kv * hd, h)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (int(cfg["vocab_size"]), h)))  # type: ignore[call-overload]
    return specs


def write_checkpoint(
    folder: Path,
    cfg: dict[str, object],
    make: Callable[[str, tuple[int, ...], int], torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write ``model.safetensors`` + ``config.json``; ``make(name, shape, index)`` gives each tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = qwen2_specs(cfg)
    writer = SafetensorsWriter(
        folder / "model.safetensors", [(n, dtype, s) for n, s in specs], {"format": "pt"}
    )
    for i, (name, shape) in enumerate(specs):
        writer.write_tensor(make(name, shape, i).to(dtype).contiguous())
    writer.close()
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def build_pair(
    root: Path,
    layers: int = 28,
    make_a: Callable[[str, tuple[int, ...], int], torch.Tensor] | None = None,
) -> tuple[Path, Path]:
    """Write the benchmark pair under ``root``: ``grpo/`` (``make_a``, default
    :func:`finetuned_tensor`) and ``sft/`` (:func:`base_tensor`), Qwen2.5-1.5B-shaped."""
    cfg = qwen2_config(num_hidden_layers=layers)
    print(f"building the pair in {root} ...", flush=True)
    a = write_checkpoint(root / "grpo", cfg, make_a or finetuned_tensor)
    return a, write_checkpoint(root / "sft", cfg, base_tensor)


def base_tensor(name: str, shape: tuple[int, ...], index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(index)
    if len(shape) == 1:
        return (
            1.0 + 0.05 * torch.randn(shape, generator=g)
            if "norm" in name
            else 0.02 * torch.randn(shape, generator=g)
        )
    return 0.02 * torch.randn(shape, generator=g)


def finetuned_tensor(name: str, shape: tuple[int, ...], index: int, rank: int = 16) -> torch.Tensor:
    """The base plus what a fine-tune adds: a low-rank update and small dense noise."""
    base = base_tensor(name, shape, index)
    g = torch.Generator().manual_seed(10_000 + index)
    if len(shape) == 2 and "embed" not in name:
        u = torch.randn(shape[0], rank, generator=g)
        v = torch.randn(rank, shape[1], generator=g)
        base += 1.5e-3 * (u @ v) / rank**0.5  # the fine-tune: low rank, well above the noise
    base += 2e-4 * torch.randn(shape, generator=g)
    return base


def drop_cache_hint(paths: list[Path]) -> None:
    """Read files once so every contender starts from a warm page cache."""
    for p in paths:
        for f in sorted(p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float


MEASURE = r"""
import os, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
elapsed = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    f.write(f"{proc.returncode} {elapsed} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
sys.stderr.write(proc.stderr.decode()[-2000:])
"""


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run a command; wall time and its peak RSS.

    A small wrapper process runs it: Linux children inherit the parent's max RSS across fork,
    so measuring straight from this (large) process would overstate small contenders.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as result:
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, result.name, *cmd], env=env, stderr=subprocess.PIPE
        )
        code, elapsed, maxrss_kb = result.read().split()
    if int(code) != 0 or proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {proc.stderr.decode()[-2000:]}")
    return Run(float(elapsed), int(maxrss_kb) / 1024)


def median_run(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.seconds for r in runs), statistics.median(r.peak_rss_mb for r in runs)
    )


def python_cmd(code: str) -> list[str]:
    return [sys.executable, "-c", code]


IO_FLOOR = r"""
import os, sys
inputs, out = sys.argv[1:-1], sys.argv[-1]
buf = bytearray(16 << 20)
files = [open(p, "rb", buffering=0) for p in inputs]
size = os.path.getsize(inputs[0])
with open(out, "wb", buffering=0) as w:
    done = 0
    while done < size:
        n = 0
        for f in files:
            n = f.readinto(buf)
        w.write(memoryview(buf)[:n])
        done += n
    os.fsync(w.fileno())
"""


# The same with the output written by O_DIRECT from a page-aligned buffer (the last block
# padded, then truncated), as rvhub writes large files (rvhub/io/sink.py): the floor of that
# way of writing, which skips the page cache's per-page cost.
IO_FLOOR_DIRECT = r"""
import mmap, os, sys
inputs, out = sys.argv[1:-1], sys.argv[-1]
buf = mmap.mmap(-1, 16 << 20)
files = [open(p, "rb", buffering=0) for p in inputs]
size = os.path.getsize(inputs[0])
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
done = 0
while done < size:
    n = 0
    for f in files:
        n = f.readinto(buf)
    os.pwrite(fd, memoryview(buf)[: n + (-n % 4096)], done)
    done += n
os.ftruncate(fd, size)
os.fsync(fd)
"""


def io_floor_cmd(inputs: list[Path], out: Path, *, direct: bool = False) -> list[str]:
    """Read every input once and write + fsync as many bytes as the first: the I/O floor
    (``direct``: the output written with O_DIRECT)."""
    return [
        sys.executable,
        "-c",
        IO_FLOOR_DIRECT if direct else IO_FLOOR,
        *map(str, inputs),
        str(out),
    ]


def rvhub_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rvhub.cli", *args]


def table(rows: list[tuple[str, Run]], floor: Run) -> Iterator[str]:
    yield f"  {'contender':<34}{'wall s':>9}{'× floor':>9}{'peak RSS':>12}"
    for label, r in rows:
        yield f"  {label:<34}{r.seconds:>9.2f}{r.seconds / floor.seconds:>9.2f}{r.peak_rss_mb:>9.0f} MB"
