"""How fast can ``rvhub extract`` be on this machine? Its mandatory work, measured piece by piece.

    python benchmarks/extract_budget.py [--pair DIR] [--repeat 3] [--dir DIR]

Extraction must import torch, read A and B, hash them (xxh3-128 per slab: the manifest's
content fingerprint of local sources), compute ``round(A − B)`` with its norms and round-trip
error, hash the output (BLAKE3: the manifest's file digests), and write it. This script times each of
those on one thread, in the same 2 MB slabs rvhub uses, on the Qwen2.5-1.5B-shaped pair
(built here unless ``--pair`` names a folder holding ``grpo/`` and ``sft/``), and the I/O floor
of ``benchmarks/extract_apply.py`` in the same run. With C cores no schedule can finish before

    import + (read + xxh3 + kernel + blake3 + write) / C

(fsync's wait for the disk not counted), which it prints against the floor and the 1.3× target,
next to ``rvhub extract`` itself, timed in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from common import (
    build_pair,
    io_floor_cmd,
    python_cmd,
    run_measured,
    rvhub_cmd,
    work_dir,
)

from rvhub import open_checkpoint
from rvhub.constants import SLAB_ELEMS
from rvhub.io.cores import available_cores
from rvhub.io.hashing import new_hasher, piece_digest
from rvhub.io.kernels import Moments, Scratch, diff_into
from rvhub.io.safetensors import FileHandles, iter_chunks, read_range, tensor_bytes
from rvhub.io.stream import SlabPool

STAGES = ("read", "xxh3", "kernel", "blake3", "write")


def stage_seconds(a_dir: Path, b_dir: Path, out: Path) -> dict[str, float]:
    """One pass over the pair, slab by slab, timing each stage on this thread."""
    a, b = open_checkpoint(a_dir), open_checkpoint(b_dir)
    handles, pool, scratch = FileHandles(), SlabPool(SLAB_ELEMS), Scratch()
    digest = new_hasher()
    spent = dict.fromkeys(STAGES, 0.0)
    clock = time.perf_counter
    with open(out, "wb", buffering=0) as f:
        for entry in a.in_file_order():
            eb = b.entries[entry.name]
            for start, stop in iter_chunks(entry.numel, SLAB_ELEMS):
                t0 = clock()
                xa = read_range(
                    entry, start, stop, handles, pool.take(stop - start, entry.torch_dtype)
                )
                xb = read_range(eb, start, stop, handles, pool.take(stop - start, eb.torch_dtype))
                t1 = clock()
                piece_digest(tensor_bytes(xa))
                piece_digest(tensor_bytes(xb))
                t2 = clock()
                stored = pool.take(stop - start, entry.torch_dtype)
                diff_into(xa, xb, stored, Moments(), scratch)
                t3 = clock()
                digest.update(tensor_bytes(stored))
                t4 = clock()
                f.write(tensor_bytes(stored))
                t5 = clock()
                pool.give(xa, xb, stored)
                for stage, seconds in zip(
                    STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
                ):
                    spent[stage] += seconds
    handles.close()
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", type=Path, default=None, help="folder holding grpo/ and sft/")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    root = work_dir("rvhub-budget-", args.dir)
    try:
        if args.pair is None:
            build_pair(root)
        pair = args.pair or root
        a, b = pair / "grpo", pair / "sft"
        a_w, b_w = a / "model.safetensors", b / "model.safetensors"
        out = root / "out.bin"
        cores = available_cores()

        vec = root / "vec"
        imports, floors, stages, extracts = [], [], [], []
        for _ in range(args.repeat):
            imports.append(run_measured(python_cmd("import os, rvhub.cli; os._exit(0)")).seconds)
            out.unlink(missing_ok=True)
            os.sync()
            floors.append(run_measured(io_floor_cmd([a_w, b_w], out)).seconds)
            out.unlink(missing_ok=True)
            os.sync()
            stages.append(stage_seconds(a, b, out))
            out.unlink(missing_ok=True)
            shutil.rmtree(vec, ignore_errors=True)
            os.sync()
            extracts.append(
                run_measured(rvhub_cmd("extract", str(a), str(b), "-o", str(vec))).seconds
            )
            shutil.rmtree(vec, ignore_errors=True)
        med = {s: statistics.median(run[s] for run in stages) for s in STAGES}
        imp, floor = statistics.median(imports), statistics.median(floors)
        ext = statistics.median(extracts)
        work = sum(med.values())
        bound = imp + work / cores
        print(
            f"medians of {args.repeat}, one thread each, {a_w.stat().st_size / 1e9:.2f} GB per input"
        )
        print(f"  {'python + import rvhub (torch)':<34}{imp:6.2f} s")
        for s in STAGES:
            print(f"  {s:<34}{med[s]:6.2f} s")
        print(f"  {'work after the import':<34}{work:6.2f} s")
        print(f"  {'I/O floor':<34}{floor:6.2f} s")
        print(f"  {'rvhub extract (CLI)':<34}{ext:6.2f} s")
        print(
            f"lower bound on {cores} cores: {imp:.2f} + {work:.2f} / {cores} = {bound:.2f} s "
            f"= {bound / floor:.2f}× the floor (target ≤ 1.3× = {1.3 * floor:.2f} s)"
        )
        print(f"rvhub extract: {ext / bound:.2f}× that bound, {ext / floor:.2f}× the floor")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
