"""``rvhub extract --encoding sparse`` on a Qwen2.5-1.5B-shaped pair that differs in few entries.

    python benchmarks/sparse.py [--fraction 0.1] [--repeat 3] [--layers 28] [--dir DIR]

RL fine-tunes are reported to change 5-30% of the parameters. This builds a bf16 pair where
``--fraction`` of the entries of every tensor differ (the rest are bit-identical), then times,
interleaved round by round with ``sync`` before each run:

* the baseline: a dense ``rvhub extract A B`` (every entry stored);
* ``rvhub extract A B --encoding sparse`` (only the changed entries, bit-exact);

and prints wall time, peak RSS and artifact size of each, with the ratios sparse / dense.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    Run,
    base_tensor,
    build_pair,
    drop_cache_hint,
    median_run,
    run_measured,
    rvhub_cmd,
    work_dir,
)


def changed_in_places(fraction: float):  # type: ignore[no-untyped-def]
    def make(name: str, shape: tuple[int, ...], index: int) -> torch.Tensor:
        t = base_tensor(name, shape, index)
        g = torch.Generator().manual_seed(20_000 + index)
        mask = torch.rand(shape, generator=g) < fraction
        return t + mask * (0.01 * torch.randn(shape, generator=g))

    return make


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fraction", type=float, default=0.1, help="share of entries that differ")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=28, help="fewer layers for a quick look")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()

    root = work_dir("rvhub-sparse-", args.dir)
    try:
        a, b = build_pair(root, args.layers, changed_in_places(args.fraction))
        drop_cache_hint([a, b])
        contenders = {
            "dense extract": ["--encoding", "dense"],
            "sparse extract": ["--encoding", "sparse"],
        }
        runs: dict[str, list[Run]] = {k: [] for k in contenders}
        sizes: dict[str, int] = {}
        for _ in range(args.repeat):
            for label, extra in contenders.items():
                out = root / label.replace(" ", "-")
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                runs[label].append(
                    run_measured(rvhub_cmd("extract", str(a), str(b), "-o", str(out), *extra))
                )
                sizes[label] = folder_bytes(out)
                print(
                    f"    {label}: {runs[label][-1].seconds:.2f} s, {runs[label][-1].peak_rss_mb:.0f} MB",
                    flush=True,
                )
        med = {k: median_run(v) for k, v in runs.items()}
        print(f"\n{args.fraction:.0%} of entries changed, median of {args.repeat}")
        print(f"  {'':<16}{'wall s':>8}{'peak RSS':>11}{'size':>11}")
        for label, r in med.items():
            print(
                f"  {label:<16}{r.seconds:8.2f}{r.peak_rss_mb:8.0f} MB{sizes[label] / 1e9:8.2f} GB"
            )
        d, s = med["dense extract"], med["sparse extract"]
        print(
            f"sparse / dense: time {s.seconds / d.seconds:.2f}×, size "
            f"{sizes['sparse extract'] / sizes['dense extract']:.2f}× "
            f"(runs: {', '.join(f'{r.seconds:.2f}' for r in runs['sparse extract'])} s; "
            f"median {statistics.median(r.seconds for r in runs['sparse extract']):.2f})"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
