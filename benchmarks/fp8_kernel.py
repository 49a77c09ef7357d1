"""The FP8 extract kernel on one core: decoded per slab against decoded per kernel block.

    python benchmarks/fp8_kernel.py [--repeat 15]

Two random e4m3 weights of Qwen2.5-1.5B's MLP shape (8960 × 1536, 128 × 128 block scales),
cut into 1 M-element slabs the way extract cuts them. Times, on one torch thread:

* per slab (the old way): ``dequantize_flat`` of A's and B's whole slab into 4 MB float32
  buffers, then ``diff_into`` on them;
* per block (today): ``diff_into`` on two :class:`rvhub.io.fp8.Fp8Slab`, which decodes each
  64 K block into the kernel's scratch just before subtracting;
* the decode alone, into a whole slab and into 64 K blocks.

Prints medians in ns per element and the ratio to the per-slab way, and checks that both
ways give the same bytes and the same sums.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from rvhub.io.fp8 import BlockScales, Fp8Slab, decode_e4m3, dequantize_flat
from rvhub.io.kernels import BLOCK, Moments, Scratch, diff_into

SHAPE, SCALE_BLOCK, SLAB = (8960, 1536), (128, 128), 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    codes = [(torch.randn(SHAPE, generator=gen) * 0.1).to(torch.float8_e4m3fn).reshape(-1)]
    codes.append((torch.randn(SHAPE, generator=gen) * 0.1).to(torch.float8_e4m3fn).reshape(-1))
    bands = (-(-SHAPE[0] // 128), -(-SHAPE[1] // 128))
    scales = [BlockScales(torch.rand(bands, generator=gen), SHAPE, SCALE_BLOCK) for _ in "ab"]
    starts = list(range(SLAB, SHAPE[0] * SHAPE[1] - SLAB, SLAB))  # slabs that start mid-row
    fa, fb = torch.empty(SLAB), torch.empty(SLAB)
    outs = [torch.empty(SLAB * len(starts), dtype=torch.bfloat16) for _ in range(2)]
    sums = [Moments(), Moments()]
    scratch = Scratch()
    elems = SLAB * len(starts)

    def per_slab() -> None:
        sums[0] = Moments()
        for i, s in enumerate(starts):
            dequantize_flat(codes[0][s : s + SLAB], scales[0], s, fa)
            dequantize_flat(codes[1][s : s + SLAB], scales[1], s, fb)
            diff_into(fa, fb, outs[0][i * SLAB : (i + 1) * SLAB], sums[0], scratch)

    def per_block() -> None:
        sums[1] = Moments()
        for i, s in enumerate(starts):
            a, b = (Fp8Slab(c[s : s + SLAB], sc, s) for c, sc in zip(codes, scales, strict=True))
            diff_into(a, b, outs[1][i * SLAB : (i + 1) * SLAB], sums[1], scratch)

    def decode_slab() -> None:
        for s in starts:
            decode_e4m3(codes[0][s : s + SLAB].view(torch.uint8).numpy(), fa.numpy())

    def decode_blocks() -> None:
        block = fa[:BLOCK].numpy()
        for s in starts:
            for b in range(s, s + SLAB, BLOCK):
                decode_e4m3(codes[0][b : b + BLOCK].view(torch.uint8).numpy(), block)

    def ns(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) / elems * 1e9

    rows = [
        ("extract kernel, decoded per slab", ns(per_slab)),
        ("extract kernel, decoded per block", ns(per_block)),
        ("decode only, into a whole slab", ns(decode_slab)),
        ("decode only, into 64 K blocks", ns(decode_blocks)),
    ]
    assert torch.equal(outs[0], outs[1]) and sums[0] == sums[1], "the two ways disagree"
    base = rows[0][1]
    print(f"{len(starts)} slabs of {SLAB} elements, one thread, median of {args.repeat}")
    for label, t in rows:
        print(f"  {label:<36}{t:6.2f} ns/element  {t / base:5.2f}×")
    print("same bytes and sums: yes")


if __name__ == "__main__":
    main()
