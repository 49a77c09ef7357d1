"""Where do the GPU seconds of ``rvhub compress --encoding lora --rank 64 --device cuda`` go?

    python benchmarks/gpu_svd_probe.py [--layers 28] [--rank 64] [--device cuda]

Issue 3 asks for all 196 attention/MLP matrices of a Qwen2.5-1.5B-shaped delta at rank 64 in
≤ 2 s on a GPU (an H200 runs the randomized SVDs alone in 1.3 s); rvhub measured 2.70 s,
per module, including each float32 delta's copy to the GPU and the exact error. This script
builds such deltas (rank-16 structure plus noise, as in benchmarks/common.py) in memory and
times, each over all matrices, with the device synchronised around every variant:

1. ``torch.svd_lowrank`` alone on device-resident matrices (the issue's reference);
2. rvhub's ``factorize`` on device-resident matrices (sketch, rank choice, exact error);
3. ``factorize`` from float32 CPU tensors (what ``compress`` does today: a copy per module);
4. ``factorize`` from bfloat16 CPU tensors copied, then widened on the device (half the bytes);
5. ``torch.svd_lowrank`` on each group of same-shaped matrices stacked (one batched call).

It only measures; it changes nothing in rvhub. On a CPU (``--device cpu --layers 1``) it
runs as a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import base_tensor, finetuned_tensor, qwen2_config, qwen2_specs

from rvhub.encodings.lora import DEFAULT_NITER, DEFAULT_OVERSAMPLE, factorize

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    q = args.rank + DEFAULT_OVERSAMPLE

    cfg = qwen2_config(num_hidden_layers=args.layers)
    deltas_cpu = []
    for index, (name, shape) in enumerate(qwen2_specs(cfg)):
        if len(shape) == 2 and any(m in name for m in MATRICES):
            a = finetuned_tensor(name, shape, index).bfloat16()
            b = base_tensor(name, shape, index).bfloat16()
            deltas_cpu.append((a.float() - b.float()).bfloat16())
    f32_cpu = [d.float() for d in deltas_cpu]
    on_device = [d.to(device) for d in f32_cpu]
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for d in on_device:
        groups.setdefault(tuple(d.shape), []).append(d)
    stacks = [torch.stack(g) for g in groups.values()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: {len(on_device)} matrices in {len(stacks)} shape groups, rank {args.rank}")

    def lowrank_each() -> None:
        for m in on_device:
            torch.svd_lowrank(m, q=q, niter=DEFAULT_NITER)

    def factorize_each(tensors: list[torch.Tensor], widen: bool = False) -> Callable[[], None]:
        def run() -> None:
            for m in tensors:
                m = m.to(device).float() if widen else m
                factorize(m, rank=args.rank, device=device)

        return run

    def lowrank_batched() -> None:
        for stack in stacks:
            torch.svd_lowrank(stack, q=q, niter=DEFAULT_NITER)

    rows = [
        ("1. torch.svd_lowrank, device-resident", timed(lowrank_each, device, args.repeat)),
        (
            "2. rvhub factorize, device-resident",
            timed(factorize_each(on_device), device, args.repeat),
        ),
        (
            "3. rvhub factorize from float32 on the CPU",
            timed(factorize_each(f32_cpu), device, args.repeat),
        ),
        (
            "4. rvhub factorize from bfloat16 on the CPU",
            timed(factorize_each(deltas_cpu, widen=True), device, args.repeat),
        ),
        ("5. torch.svd_lowrank, batched by shape", timed(lowrank_batched, device, args.repeat)),
    ]
    for label, seconds in rows:
        print(f"  {label:<46}{seconds:8.3f} s")
    print("target: all matrices in ≤ 2 s on a GPU (issue 3)")


if __name__ == "__main__":
    main()
