"""Switching α inside a vLLM engine on the Qwen2.5-1.5B shape, both ways, against `rvhub apply`.

    .cache/vllm-venv/bin/python benchmarks/vllm_switch.py --pair DIR --vec DIR [--ways ...]

Run with the vLLM environment's Python (`bash .ci/vllm-setup.sh`), on the pair and vector an
earlier `python benchmarks/eval_sweep.py --dir DIR` left (``DIR/*/sft`` is the target,
``DIR/*/vec`` the vector). For each way of switching (``VllmOptions.switch``: ``layerwise``,
``in-place``), a child process starts one engine on the target (no tokenizer: the benchmark
checkpoints have none) with rvhub's worker extension and sets α = 0.5, 1.5, −1, 1, 0.5 (first
and last alike, so the first switch is compared like with like) through
:class:`rvhub.evaluation.vllm_engine.VllmSwitch`, timing each switch and sampling the summed
RSS of itself and its children (vLLM's engine core and worker) every 0.1 s. Then `rvhub apply`
of the same vector to disk at each α, in this run (the baseline a switch is held to).

Prints per way: RSS after the engine started, what opening the switch cost (on a CPU the
in-place way first makes vLLM's packed layers plain: a reload of every tensor) and what the
switches added at their peak above the opened engine, beside the target's size; the first switch against the last (same α); each switch's time,
and its ratio to `rvhub apply` at the same α (median); the worker's split between rvhub
making θ + α·v and vLLM's loading.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SCALES = (0.5, 1.5, -1.0, 1.0, 0.5)
WAYS = ("layerwise", "in-place")


def tree_rss() -> int:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child may exit between the two calls
            total += p.memory_info().rss
    return total


def child(way: str, target: Path, vec: Path) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from rvhub.evaluation.vllm_engine import VllmSwitch
    from rvhub.evaluation.vllm_worker import WORKER_CLS
    from rvhub.options import ApplyOptions

    llm = LLM(model=str(target), skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
              worker_extension_cls=WORKER_CLS, seed=0)  # fmt: skip
    before = tree_rss()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    switch = VllmSwitch(llm, vec, target, ApplyOptions(), switch=way)
    opened = time.perf_counter() - start
    time.sleep(0.3)
    open_peak, peak[0] = peak[0], tree_rss()  # the switches' peak, from the opened engine on
    after_open = peak[0]
    times, parts = [], []
    for alpha in SCALES:
        start = time.perf_counter()
        (result,) = switch.set_scale(alpha)
        times.append(time.perf_counter() - start)
        parts.append(result["seconds"])
    stop.set()
    sampler.join()
    return {"mode": switch.mode, "before": before, "open_peak": open_peak,
            "after_open": after_open, "peak": peak[0], "open": opened,
            "times": times, "parts": parts, "missed": switch.missed}  # fmt: skip


def apply_times(target: Path, vec: Path) -> list[float]:
    """`rvhub apply` to disk at each α, each in a fresh process, as a user runs it."""
    out = []
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        for alpha in SCALES:
            dest = Path(tmp) / "applied"
            shutil.rmtree(dest, ignore_errors=True)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "rvhub.cli", "apply", str(vec), str(target),
                            "-o", str(dest), "--scale", str(alpha)],
                           check=True, capture_output=True)  # fmt: skip
            out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", type=Path, required=True, help="folder holding sft/ (the target)")
    ap.add_argument("--vec", type=Path, required=True)
    ap.add_argument("--ways", default=",".join(WAYS), help="comma-separated: layerwise,in-place")
    ap.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    target = args.pair / "sft"
    if args.child:
        print("RESULT " + json.dumps(child(args.child, target, args.vec)))
        return
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    print(f"target {size / 2**30:.2f} GiB; α = {', '.join(f'{a:g}' for a in SCALES)}")
    results = {}
    for way in args.ways.split(","):
        done = subprocess.run([sys.executable, __file__, "--pair", str(args.pair), "--vec",
                               str(args.vec), "--child", way],
                              check=True, capture_output=True, text=True)  # fmt: skip
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        results[way] = json.loads(line.removeprefix("RESULT "))
    applied = apply_times(target, args.vec)
    print(f"  rvhub apply to disk: {', '.join(f'{t:.2f}' for t in applied)} s")
    for way, r in results.items():
        times = r["times"]
        ratios = [t / a for t, a in zip(times, applied, strict=True)]
        grown = (r["peak"] - r["after_open"]) / size
        print(f"  {way} (used: {r['mode']}; opening {r['open']:.1f} s)")
        print(f"    RSS after start {r['before'] / 2**20:.0f} MB; opening: peak"
              f" +{(r['open_peak'] - r['before']) / 2**20:.0f} MB, after"
              f" {(r['after_open'] - r['before']) / 2**20:+.0f} MB")  # fmt: skip
        print(f"    switches added {(r['peak'] - r['after_open']) / 2**20:.0f} MB at their peak"
              f" ({grown:.2f}× the target)")  # fmt: skip
        print(f"    switches {', '.join(f'{t:.2f}' for t in times)} s; first / last (same α)"
              f" {times[0] / times[-1]:.2f}×")  # fmt: skip
        print(f"    switch / apply: {', '.join(f'{x:.2f}' for x in ratios)}"
              f" (median {statistics.median(ratios):.2f}×)")  # fmt: skip
        print("    rvhub making θ + α·v / vLLM loading, s: "
              + ", ".join(f"{p['rvhub']:.2f}/{p['vllm']:.2f}" for p in r["parts"]))  # fmt: skip
        print(f"    vLLM did not place: {r['missed'] or 'nothing'}")


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    main()
