"""Memory and time of an α sweep's switches, beside the model's size and `rvhub apply`.

    python benchmarks/eval_sweep.py [--layers 28] [--dir DIR] [--pair DIR] [--device cpu|cuda]

Builds the Qwen2.5-1.5B-shaped bf16 pair of benchmarks/extract_apply.py (3.09 GB each),
extracts v once, then, each in its own process (peak RSS is per process), loads the target
with transformers and switches α through (0.5, 1.5, −1, 1, 0.5):

* ``cached``: ``ScaleSwitch`` as `rvhub eval` ran it before (pristine θ of the touched tensors
  and every delta kept, so later points are one fused pass);
* ``host``:   ``ScaleSwitch(keep_deltas=False)``, what `rvhub eval` does for a model with no
  files behind it (the pristine θ in host memory, v re-read at each point);
* ``files``:  ``FileScaleSwitch``, what `rvhub eval` does for a model loaded from a folder (θ
  re-read from the target's files at each point, nothing kept).

Prints, per way: RSS of the libraries before the model is loaded, peak RSS and what the
model and the switches added to it, against the model's size (and CUDA max allocated on a
GPU), the first
point's time against the last (the same α), and every switch's time; then `rvhub apply` of the
same vector to disk at each α (the target for a switch). Needs ~10 GB of free disk.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import build_pair, run_measured, rvhub_cmd, work_dir

# the first and last α are the same, so the first point's cost is compared like with like
# (α = ±1 takes one torch.add per slab, other α a float32 loop: docs/design.md)
SCALES = (0.5, 1.5, -1.0, 1.0, 0.5)
WAYS = ("cached", "host", "files")


def child(way: str, vec_dir: Path, target: Path, device: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from rvhub import load_vector
    from rvhub.checkpoint import open_local_checkpoint
    from rvhub.ops.live import FileScaleSwitch, ScaleSwitch
    from rvhub.options import ApplyOptions

    hf_logging.disable_progress_bar()
    vec = load_vector(vec_dir)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the libraries alone
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).to(device)
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if way == "files":
        switch = FileScaleSwitch.open(
            vec.source, vec.facts(), model, open_local_checkpoint(target), ApplyOptions()
        )
        assert switch is not None
    else:
        switch = ScaleSwitch(vec.source, vec.facts(), model, keep_deltas=way == "cached")
    times = []
    for alpha in SCALES:
        start = time.perf_counter()
        switch.set_scale(alpha)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out = {
        "base_mb": base_mb,
        "loaded_mb": loaded_mb,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "times": times,
    }
    if device.startswith("cuda"):
        out["cuda_max_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--pair", type=Path, default=None, help="reuse grpo/ and sft/ of a run")
    ap.add_argument("--child", nargs=3, metavar=("WAY", "VEC", "TARGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        way, vec, target = args.child
        child(way, Path(vec), Path(target), args.device)
        return
    root = work_dir("rvhub-eval-sweep-", args.dir)
    try:
        a, b = (
            (args.pair / "grpo", args.pair / "sft") if args.pair else build_pair(root, args.layers)
        )
        vec = root / "vec"
        subprocess.run([*rvhub_cmd("extract", str(a), str(b), "-o", str(vec), "--overwrite")],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        size_mb = sum(f.stat().st_size for f in b.glob("*.safetensors")) / 2**20
        print(f"target: {size_mb / 1024:.2f} GiB bf16 ({args.layers} layers), α = {SCALES}")
        print(f"  {'way':<8}{'libraries':>10}{'peak RSS':>10}{'(peak - libs)/model':>20}"
              f"{'first/last':>11}  switch s at each α")  # fmt: skip
        files_times: list[float] = []
        for way in WAYS:
            cmd = [sys.executable, __file__, "--device", args.device, "--child", way, str(vec),
                   str(b)]  # fmt: skip
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            times = r["times"]
            if way == "files":
                files_times = times
            cuda = f"  CUDA max {r['cuda_max_mb']:.0f} MB" if "cuda_max_mb" in r else ""
            each = " ".join(f"{t:.2f}" for t in times)
            grown = (r["peak_mb"] - r["base_mb"]) / size_mb
            print(f"  {way:<8}{r['base_mb']:>8.0f}MB{r['peak_mb']:>8.0f}MB{grown:>19.2f}×"
                  f"{times[0] / times[-1]:>10.2f}×  {each}{cuda}")  # fmt: skip
        out = root / "applied"
        runs = []
        for alpha in SCALES:
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_measured(rvhub_cmd("apply", str(vec), str(b), "-o", str(out),
                                               "--scale", str(alpha))))  # fmt: skip
        applied = [r.seconds for r in runs]
        print(f"  rvhub apply to disk at each α: {' '.join(f'{t:.2f}' for t in applied)} s")
        ratios = [f / a for f, a in zip(files_times, applied, strict=True)]
        print(f"  files switch / apply, α by α: {' '.join(f'{x:.2f}' for x in ratios)}"
              f" (median {statistics.median(ratios):.2f}×)")  # fmt: skip
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
