"""The cost of one α point of a sweep: in memory (`rvhub eval`) vs apply to disk + reload.

    python benchmarks/eval_sweep.py [--repeat 3] [--layers 28] [--device cpu|cuda] [--dir DIR] [--pair DIR]

Builds the Qwen2.5-1.5B-shaped bf16 pair of benchmarks/extract_apply.py (3.09 GB each),
extracts v once, loads the target once, then per α of (1.5, -1, 0.5, 1) times in one run:

* ``rvhub eval``'s switch: ``ScaleSwitch.set_scale(α)`` (write back the pristine θ of the
  tensors v touches, add α·v from the vector file; exact ``round(θ + α·v)``);
* what users do today: ``rvhub apply v target -o out --scale α`` (the CLI) followed by
  ``AutoModelForCausalLM.from_pretrained(out)`` (and ``.to(device)``).

Prints the medians and their ratio. On CUDA it also prints one pinned host-to-device copy of
the vector's bytes, the floor a switch is compared with. Needs ~13 GB of free disk.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from common import build_pair, work_dir

from rvhub import load_vector
from rvhub.ops.live import ScaleSwitch

SCALES = (1.5, -1.0, 0.5, 1.0)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument(
        "--pair", type=Path, default=None, help="reuse grpo/ and sft/ of an earlier run's folder"
    )
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = work_dir("rvhub-eval-sweep-", args.dir)
    try:
        if args.pair is not None:
            a, b = args.pair / "grpo", args.pair / "sft"
        else:
            a, b = build_pair(root, layers=args.layers)
        rvhub = [sys.executable, "-m", "rvhub.cli"]
        subprocess.run([*rvhub, "extract", str(a), str(b), "-o", str(root / "vec")], check=True)
        vec = load_vector(root / "vec")
        model = AutoModelForCausalLM.from_pretrained(b, dtype=torch.bfloat16).to(args.device)
        switch = ScaleSwitch(vec.source, vec.model_info, model, manifest=vec.manifest)
        switch.set_scale(1.0)  # the first switch also keeps the pristine copy: not timed
        in_memory, today = [], []
        out = root / "applied"
        for _ in range(args.repeat):
            for alpha in SCALES:
                in_memory.append(timed(lambda a=alpha: switch.set_scale(a)))
                shutil.rmtree(out, ignore_errors=True)

                def disk_and_reload(alpha: float = alpha) -> None:
                    cmd = [*rvhub, "apply", str(root / "vec"), str(b), "-o", str(out)]
                    subprocess.run([*cmd, "--scale", str(alpha), "--device", "cpu"], check=True)
                    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
                    reloaded.to(args.device)

                today.append(timed(disk_and_reload))
        mem, disk = statistics.median(in_memory), statistics.median(today)
        print(f"\nper α point, median of {len(in_memory)} ({args.device}):")
        print(f"  rvhub eval switch (ScaleSwitch.set_scale)   {mem:8.2f} s")
        print(f"  rvhub apply to disk + from_pretrained         {disk:8.2f} s")
        print(f"  ratio (today / in memory)                     {disk / mem:8.1f}×")
        if args.device.startswith("cuda"):
            nbytes = sum(p.stat().st_size for p in (root / "vec").glob("vector*.safetensors"))
            host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
            dev = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
            copies = [timed(lambda: dev.copy_(host, non_blocking=True)) for _ in range(5)]
            floor = statistics.median(copies)
            print(f"  one pinned H2D copy of the vector ({nbytes / 1e9:.2f} GB)   {floor:8.3f} s")
            print(f"  switch / copy                                 {mem / floor:8.2f}×")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
