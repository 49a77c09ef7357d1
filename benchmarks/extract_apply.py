"""rvhub extract / apply on a Qwen2.5-1.5B-shaped bf16 pair vs the naive script and the I/O floor.

    python benchmarks/extract_apply.py [--repeat 3] [--skip-naive] [--layers 28] [--dir DIR]

Builds two 3.09 GB bf16 checkpoints (hidden 1536, 28 layers, intermediate 8960, vocab
151936, tied embeddings) in a temp folder, warms the page cache, then times, in one run:

* the I/O floor: reading the inputs and writing + fsyncing the output's bytes;
* ``rvhub extract A B`` and ``rvhub apply v B`` (the CLI, as users run it);
* the naive scripts a user writes: load with transformers, subtract/add, save.

Prints medians of ``--repeat`` runs (the naive scripts run once: they take minutes) and
ratios to the floor measured in the same run. Needs ~20 GB of free disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    Run,
    build_pair,
    drop_cache_hint,
    io_floor_cmd,
    median_run,
    python_cmd,
    run_measured,
    rvhub_cmd,
    table,
    work_dir,
)

NAIVE_EXTRACT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
a = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).state_dict()
b = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16).state_dict()
v = {k: (a[k].float() - b[k].float()).to(torch.bfloat16).contiguous() for k in a if k != "lm_head.weight"}
save_file(v, sys.argv[3] + "/vector.safetensors")
"""

NAIVE_APPLY = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file
m = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
v = load_file(sys.argv[1] + "/vector.safetensors")
with torch.no_grad():
    for k, p in m.named_parameters():
        if k in v:
            p.add_(v[k])
m.save_pretrained(sys.argv[3])
"""


def _clean(path: Path) -> None:
    if path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def measure(contenders: list[tuple[str, Callable[[], list[str]], Path]], repeat: int) -> list[Run]:
    """Median runs of each contender, interleaved round by round (floor, rvhub, floor, ...).

    Each run starts after ``sync`` with its output removed: a previous run's gigabytes still
    being written back would otherwise slow whichever contender comes next (the first floor
    run after building the pair took 7-8 s instead of 1.5-2.5 s that way), and interleaving
    gives every contender the same share of the machine's slower and faster moments.
    """
    runs: list[list[Run]] = [[] for _ in contenders]
    for _ in range(repeat):
        for i, (label, cmd_for, cleanup) in enumerate(contenders):
            _clean(cleanup)
            os.sync()
            runs[i].append(run_measured(cmd_for()))
            print(
                f"    {label}: {runs[i][-1].seconds:.2f} s, {runs[i][-1].peak_rss_mb:.0f} MB",
                flush=True,
            )
    for _, _, cleanup in contenders:
        _clean(cleanup)
    os.sync()
    return [median_run(r) for r in runs]


def lineage_seconds(vec: Path, target: Path, repeat: int) -> float:
    """Median seconds of the lineage check an apply runs: read the fingerprint, sample the
    target at the same positions, compare (in this process, torch already imported)."""
    import statistics
    import time

    from rvhub import open_checkpoint
    from rvhub.lineage import read_lineage
    from rvhub.manifest import load_manifest
    from rvhub.ops.lineage import checkpoint_lineage

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        manifest = load_manifest(vec)
        shapes = {n: tuple(i["shape"]) for n, i in manifest["tensors"].items()}
        report = checkpoint_lineage(read_lineage(vec, manifest), shapes, open_checkpoint(target))
        times.append(time.perf_counter() - start)
        assert report.verdict == "related", report.describe()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=28, help="fewer layers for a quick look")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()

    root = work_dir("rvhub-bench-", args.dir)
    try:
        a, b = build_pair(root, args.layers)
        size = (a / "model.safetensors").stat().st_size
        print(f"pair: 2 × {size / 1e9:.2f} GB bf16", flush=True)
        drop_cache_hint([a, b])
        vec, out, floor_out = root / "vec", root / "out", root / "floor.bin"
        a_w, b_w = a / "model.safetensors", b / "model.safetensors"

        env_note = f"median of {args.repeat}"
        print(f"\nextract ({env_note})", flush=True)
        floor, ext = measure(
            [
                ("I/O floor", lambda: io_floor_cmd([a_w, b_w], floor_out), floor_out),
                (
                    "rvhub extract",
                    lambda: rvhub_cmd("extract", str(a), str(b), "-o", str(vec)),
                    vec,
                ),
            ],
            args.repeat,
        )
        rows = [("I/O floor (read A+B, write+fsync v)", floor), ("rvhub extract", ext)]
        if not args.skip_naive:
            naive_out = root / "naive"

            def naive_cmd() -> list[str]:
                naive_out.mkdir()
                return [*python_cmd(NAIVE_EXTRACT), str(a), str(b), str(naive_out)]

            (naive,) = measure([("naive (transformers)", naive_cmd, naive_out)], 1)
            rows.append(("naive: load both, subtract, save", naive))
        print("\n".join(table(rows, floor)))

        run_measured(rvhub_cmd("extract", str(a), str(b), "-o", str(vec)))
        v_w = vec / "vector.safetensors"
        drop_cache_hint([vec])
        print(f"\napply ({env_note})", flush=True)
        floor2, app = measure(
            [
                ("I/O floor", lambda: io_floor_cmd([b_w, v_w], floor_out), floor_out),
                ("rvhub apply", lambda: rvhub_cmd("apply", str(vec), str(b), "-o", str(out)), out),
            ],
            args.repeat,
        )
        rows = [("I/O floor (read θ+v, write+fsync)", floor2), ("rvhub apply", app)]
        if not args.skip_naive:
            (naive2,) = measure(
                [
                    (
                        "naive (transformers)",
                        lambda: [*python_cmd(NAIVE_APPLY), str(vec), str(b), str(out)],
                        out,
                    )
                ],
                1,
            )
            rows.append(("naive: load, add, save_pretrained", naive2))
        print("\n".join(table(rows, floor2)))
        print(f"\nlineage check ({env_note})", flush=True)
        check = median_run(
            [run_measured(rvhub_cmd("check", str(vec), str(b))) for _ in range(args.repeat)]
        )
        in_apply = lineage_seconds(vec, b, args.repeat)
        print(
            f"rvhub check (CLI, start-up included): {check.seconds:.2f} s (target < 1 s); the "
            f"check inside apply: {in_apply * 1000:.1f} ms = {in_apply / app.seconds:.2%} of "
            "rvhub apply (target ≤ 2%)"
        )
        print(
            f"\nratios: extract {ext.seconds / floor.seconds:.2f}× floor at {ext.peak_rss_mb:.0f} MB; "
            f"apply {app.seconds / floor2.seconds:.2f}× floor at {app.peak_rss_mb:.0f} MB "
            "(targets: ≤ 1.3×, ≤ 1.5 GB)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
