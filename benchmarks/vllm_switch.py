"""Switching α inside a vLLM engine on the Qwen2.5-1.5B shape: time per switch and memory.

    .cache/vllm-venv/bin/python benchmarks/vllm_switch.py --pair DIR --vec DIR

Run with the vLLM environment's Python (`bash .ci/vllm-setup.sh`), on the pair and vector an
earlier `python benchmarks/eval_sweep.py --dir DIR` left (``DIR/*/sft`` is the target,
``DIR/*/vec`` the vector). Starts one engine on the target (no tokenizer: the benchmark
checkpoints have none) with rvhub's worker extension and sets α = 1.5, −1, 0.5, 1 through
:class:`rvhub.evaluation.vllm_engine.VllmSwitch`, timing each switch; samples the summed RSS of
this process and its children (vLLM's engine core and worker) every 0.1 s. Prints the first
switch's time, the median of the later ones, and the RSS before and at the peak of the switches
beside the target's size. Compare the switch with `rvhub apply` of the same vector (the last
line of benchmarks/eval_sweep.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time
from pathlib import Path

SCALES = (1.5, -1.0, 0.5, 1.0)


def tree_rss() -> int:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child may exit between the two calls
            total += p.memory_info().rss
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", type=Path, required=True, help="folder holding sft/ (the target)")
    ap.add_argument("--vec", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from rvhub.evaluation.vllm_engine import VllmSwitch
    from rvhub.evaluation.vllm_worker import WORKER_CLS
    from rvhub.options import ApplyOptions

    target = args.pair / "sft"
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    llm = LLM(model=str(target), skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
              worker_extension_cls=WORKER_CLS, seed=0)  # fmt: skip
    switch = VllmSwitch(llm, args.vec, target, ApplyOptions())
    before = tree_rss()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times, parts = [], []
    for alpha in SCALES:
        start = time.perf_counter()
        (result,) = switch.set_scale(alpha)
        times.append(time.perf_counter() - start)
        parts.append(result["seconds"])
    stop.set()
    sampler.join()
    print(f"target {size / 2**30:.2f} GiB; vLLM engine (this process + engine core + worker)")
    print(f"  RSS after start {before / 2**20:8.0f} MB, peak during switches {peak[0] / 2**20:8.0f} MB"
          f" (+{(peak[0] - before) / 2**20:.0f} MB)")  # fmt: skip
    print(f"  switch: first α {times[0]:.2f} s, later α median {statistics.median(times[1:]):.2f} s"
          f" ({', '.join(f'{t:.2f}' for t in times)})")  # fmt: skip
    print("  of which rvhub making θ + α·v / vLLM loading and repacking: "
          + ", ".join(f"{p['rvhub']:.2f}/{p['vllm']:.2f}" for p in parts))  # fmt: skip
    print(f"  vLLM did not place: {switch.missed or 'nothing'}")


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    main()
