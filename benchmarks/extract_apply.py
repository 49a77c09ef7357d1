"""rvhub extract / apply on a Qwen2.5-1.5B-shaped bf16 pair vs the naive script and the I/O floor.

    python benchmarks/extract_apply.py [--repeat 3] [--skip-naive] [--layers 28] [--dir DIR]
        [--threads 1,2] [--baseline DIR]

Builds two 3.09 GB bf16 checkpoints (hidden 1536, 28 layers, intermediate 8960, vocab
151936, tied embeddings) in a temp folder, warms the page cache, then times, in one run:

* the I/O floor: reading the inputs and writing + fsyncing the output's bytes, through the
  page cache and (a second floor) with O_DIRECT, as rvhub writes large files;
* ``rvhub extract A B`` and ``rvhub apply v B`` (the CLI, as users run it);
* the naive scripts a user writes: load with transformers, subtract/add, save.

Prints medians of ``--repeat`` runs (the naive scripts run once: they take minutes) and
ratios to the floor measured in the same run. Needs ~20 GB of free disk.

``--threads 1,2,...`` runs rvhub at each ``--threads`` (default: rvhub's own default, every
core) and prints the scaling. ``--baseline DIR`` adds an older rvhub checkout (e.g. ``git
worktree add /tmp/rvhub-base <commit>``) as a contender, run from DIR with ``PYTHONPATH``,
and times each version's *first* ``load_vector`` of its own 3.09 GB vector (the hash check
included: a fresh integrity cache) in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
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


FIRST_LOAD = r"""
import sys, time
from rvhub import load_vector
start = time.perf_counter()
v = load_vector(sys.argv[1])
print(f"{time.perf_counter() - start:.4f}")
"""


def first_load_seconds(vec: Path, env: dict[str, str] | None, cache: Path) -> float:
    """Seconds of one ``load_vector`` in a fresh process with an empty integrity cache (the
    whole hash check runs), page cache warm, torch import excluded."""
    shutil.rmtree(cache, ignore_errors=True)
    proc = subprocess.run(
        [*python_cmd(FIRST_LOAD), str(vec)],
        env={**(env or os.environ), "RVHUB_CACHE": str(cache)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(proc.stdout.strip().splitlines()[-1])


def _clean(path: Path) -> None:
    if path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


Contender = (
    tuple[str, Callable[[], list[str]], Path]
    | tuple[str, Callable[[], list[str]], Path, dict[str, str] | None]
)


def measure(contenders: list[Contender], repeat: int) -> list[Run]:
    """Median runs of each contender, interleaved round by round (floor, rvhub, floor, ...).

    Each run starts after ``sync`` with its output removed: a previous run's gigabytes still
    being written back would otherwise slow whichever contender comes next (the first floor
    run after building the pair took 7-8 s instead of 1.5-2.5 s that way), and interleaving
    gives every contender the same share of the machine's slower and faster moments.
    """
    runs: list[list[Run]] = [[] for _ in contenders]
    for _ in range(repeat):
        for i, (label, cmd_for, cleanup, *env) in enumerate(contenders):
            _clean(cleanup)
            os.sync()
            runs[i].append(run_measured(cmd_for(), env[0] if env else None))
            print(
                f"    {label}: {runs[i][-1].seconds:.2f} s, {runs[i][-1].peak_rss_mb:.0f} MB",
                flush=True,
            )
    for _, _, cleanup, *_env in contenders:
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
    ap.add_argument(
        "--threads",
        default="",
        help="comma-separated --threads values to run rvhub at (default: rvhub's own default)",
    )
    ap.add_argument(
        "--baseline", type=Path, default=None, help="an older rvhub checkout to compare"
    )
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",") if t] or [0]
    base_env = (
        {
            **os.environ,
            "PYTHONPATH": str(args.baseline.resolve()),
            "RVHUB_DISABLE_PROGRESS_BARS": "1",
        }
        if args.baseline
        else None
    )

    def threads_args(n: int) -> list[str]:
        return ["--threads", str(n)] if n else []

    def label(n: int) -> str:
        return f"rvhub --threads {n}" if n else "rvhub"

    root = work_dir("rvhub-bench-", args.dir).resolve()
    # Run every command from the work folder: `python -c` and `-m` put the working directory
    # first on sys.path, so from a checkout they would import its rvhub, not the baseline's.
    os.chdir(root)
    try:
        a, b = build_pair(root, args.layers)
        size = (a / "model.safetensors").stat().st_size
        print(f"pair: 2 × {size / 1e9:.2f} GB bf16", flush=True)
        drop_cache_hint([a, b])
        vec, out, floor_out = root / "vec", root / "out", root / "floor.bin"
        base_vec = root / "base-vec"
        a_w, b_w = a / "model.safetensors", b / "model.safetensors"

        env_note = f"median of {args.repeat}"
        print(f"\nextract ({env_note})", flush=True)
        contenders: list[Contender] = [
            ("I/O floor", lambda: io_floor_cmd([a_w, b_w], floor_out), floor_out),
            (
                "I/O floor, O_DIRECT",
                lambda: io_floor_cmd([a_w, b_w], floor_out, direct=True),
                floor_out,
            ),
        ]
        if base_env:
            contenders.append(
                (
                    "baseline extract",
                    lambda: rvhub_cmd("extract", str(a), str(b), "-o", str(base_vec)),
                    base_vec,
                    base_env,
                )
            )
        for n in thread_counts:
            contenders.append(
                (
                    f"{label(n)} extract",
                    lambda n=n: rvhub_cmd(
                        "extract", str(a), str(b), "-o", str(vec), *threads_args(n)
                    ),
                    vec,
                )
            )
        floor, dfloor, *runs = measure(contenders, args.repeat)
        rows = [("I/O floor (read A+B, write+fsync v)", floor), ("same, O_DIRECT writes", dfloor)]
        rows += [(c[0], r) for c, r in zip(contenders[2:], runs, strict=True)]
        extracts = runs[-len(thread_counts) :]
        if not args.skip_naive:
            naive_out = root / "naive"

            def naive_cmd() -> list[str]:
                naive_out.mkdir()
                return [*python_cmd(NAIVE_EXTRACT), str(a), str(b), str(naive_out)]

            (naive,) = measure([("naive (transformers)", naive_cmd, naive_out)], 1)
            rows.append(("naive: load both, subtract, save", naive))
        print("\n".join(table(rows, floor)))
        if base_env:
            print(
                "  extract vs baseline: "
                + ", ".join(
                    f"{label(n)} {r.seconds / runs[0].seconds:.2f}×"
                    for n, r in zip(thread_counts, extracts, strict=True)
                )
            )

        run_measured(rvhub_cmd("extract", str(a), str(b), "-o", str(vec)))
        v_w = vec / "vector.safetensors"
        drop_cache_hint([vec])
        print(f"\napply ({env_note})", flush=True)
        contenders = [
            ("I/O floor", lambda: io_floor_cmd([b_w, v_w], floor_out), floor_out),
            (
                "I/O floor, O_DIRECT",
                lambda: io_floor_cmd([b_w, v_w], floor_out, direct=True),
                floor_out,
            ),
        ]
        if base_env:
            run_measured(rvhub_cmd("extract", str(a), str(b), "-o", str(base_vec)), base_env)
            drop_cache_hint([base_vec])
            contenders.append(
                (
                    "baseline apply",
                    lambda: rvhub_cmd("apply", str(base_vec), str(b), "-o", str(out)),
                    out,
                    base_env,
                )
            )
        for n in thread_counts:
            contenders.append(
                (
                    f"{label(n)} apply",
                    lambda n=n: rvhub_cmd(
                        "apply", str(vec), str(b), "-o", str(out), *threads_args(n)
                    ),
                    out,
                )
            )
        # every rvhub process pays this before its first byte of work: the floor does not
        contenders.append(("torch import", lambda: [sys.executable, "-c", "import torch"], out))
        floor2, dfloor2, *runs2, torch_import = measure(contenders, args.repeat)
        rows = [("I/O floor (read θ+v, write+fsync)", floor2), ("same, O_DIRECT writes", dfloor2)]
        rows += [(c[0], r) for c, r in zip(contenders[2:], [*runs2, torch_import], strict=True)]
        applies = runs2[-len(thread_counts) :]
        app = applies[-1]
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

        print(f"\nfirst load_vector, hash check included ({env_note})", flush=True)
        cache = root / "integrity-cache"
        loads: list[tuple[str, float]] = []
        if base_env:
            loads.append(
                (
                    "baseline",
                    statistics.median(
                        first_load_seconds(base_vec, base_env, cache) for _ in range(args.repeat)
                    ),
                )
            )
        loads.append(
            (
                "rvhub",
                statistics.median(first_load_seconds(vec, None, cache) for _ in range(args.repeat)),
            )
        )
        for name, secs in loads:
            ratio = f" = {secs / loads[0][1]:.2f}× baseline" if base_env else ""
            print(f"  {name:<10} {secs:.3f} s{ratio}")

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
        for n, ext, ap_run in zip(thread_counts, extracts, applies, strict=True):
            print(
                f"\nratios ({label(n)}): extract {ext.seconds / floor.seconds:.2f}× floor at "
                f"{ext.peak_rss_mb:.0f} MB; apply {ap_run.seconds / floor2.seconds:.2f}× floor at "
                f"{ap_run.peak_rss_mb:.0f} MB (targets: ≤ 1.6×, ≤ 1.1×); apply without "
                f"the torch import {(ap_run.seconds - torch_import.seconds) / floor2.seconds:.2f}×"
            )
            print(
                f"  against the O_DIRECT floor: extract {ext.seconds / dfloor.seconds:.2f}×, "
                f"apply {ap_run.seconds / dfloor2.seconds:.2f}×"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
