"""Where the time of a GPU apply goes: mapping, pinning, DMA, per-tensor overhead.

    python benchmarks/gpu_probe.py [--gb 3.09] [--repeat 3]

Writes a file of the vector's size and tensor layout (Qwen2.5-1.5B-shaped), warms the page
cache, and times ways of getting its bytes onto the GPU tensor by tensor. Used to choose the
strategy in rvhub/io/gpu.py; without a GPU it skips.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import mmap
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import qwen2_config, qwen2_specs

PAGE = mmap.PAGESIZE


def med(fn, repeat):  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_probe: no CUDA GPU; skipped")
        return
    specs = qwen2_specs(qwen2_config())
    ranges, pos = [], 4096
    for _, shape in specs:
        n = 2
        for d in shape:
            n *= d
        ranges.append((pos, pos + n))
        pos += n
    size = pos
    path = Path(tempfile.mkdtemp()) / "blob.bin"
    with open(path, "wb") as f:
        chunk = torch.randint(0, 255, (256 << 20,), dtype=torch.uint8).numpy().tobytes()
        left = size
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    with open(path, "rb") as f:
        while f.read(256 << 20):
            pass
    print(f"file {size / 1e9:.2f} GB, {len(ranges)} tensors")
    cudart = torch.cuda.cudart()
    targets = [torch.empty(e - s, dtype=torch.uint8, device="cuda") for s, e in ranges]

    def frombuf(mm):  # type: ignore[no-untyped-def]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.frombuffer(mm, dtype=torch.uint8)

    def open_map(populate: bool) -> mmap.mmap:
        fd = os.open(path, os.O_RDONLY)
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        os.close(fd)
        return mm

    results = {}
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    results["floor: one pinned copy"] = med(lambda: dev.copy_(host, non_blocking=True), args.repeat)
    results["pinned, per-tensor copies"] = med(
        lambda: [
            t.copy_(host[s:e], non_blocking=True) for t, (s, e) in zip(targets, ranges, strict=True)
        ],
        args.repeat,
    )

    for populate in (False, True):
        tag = "populate" if populate else "plain"
        parts: dict[str, list[float]] = {"map": [], "register": [], "dma": [], "unregister": []}

        def variant(populate: bool = populate, parts: dict[str, list[float]] = parts) -> None:
            t0 = time.perf_counter()
            mm = open_map(populate)
            base = frombuf(mm)
            t1 = time.perf_counter()
            err = int(cudart.cudaHostRegister(base.data_ptr(), size, 1 | 8))
            assert err == 0, err
            t2 = time.perf_counter()
            for t, (s, e) in zip(targets, ranges, strict=True):
                t.copy_(base[s:e], non_blocking=True)
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            cudart.cudaHostUnregister(base.data_ptr())
            t4 = time.perf_counter()
            parts["map"].append(t1 - t0)
            parts["register"].append(t2 - t1)
            parts["dma"].append(t3 - t2)
            parts["unregister"].append(t4 - t3)

        results[f"mmap({tag}) + register + DMA + unregister"] = med(variant, args.repeat)
        print(
            f"  {tag}: "
            + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in parts.items())
        )

    # rvhub.gpu: chunked registration in threads, pipelined with per-tensor DMA + add
    from rvhub.io import gpu
    from rvhub.io.safetensors import TensorEntry

    entries = [
        TensorEntry(f"t{i}", "BF16", ((e - s) // 2,), path, s, e) for i, (s, e) in enumerate(ranges)
    ]
    params = [torch.zeros((e - s) // 2, dtype=torch.bfloat16, device="cuda") for s, e in ranges]
    work = [(p, en, None) for p, en in zip(params, entries, strict=True)]

    def cold() -> None:
        gpu.release_pinned()
        gpu.apply_dense_cuda(work, 1.0)

    results["rvhub.gpu cold: pin + DMA + add per tensor"] = med(cold, args.repeat)
    results["rvhub.gpu warm: pinned kept from the last apply"] = med(
        lambda: gpu.apply_dense_cuda(work, 1.0), args.repeat
    )
    gpu.release_pinned()

    # staging: threads pread into pinned ring buffers, copies pipelined
    def staging(workers: int, buf_mb: int) -> None:
        nbuf = workers * 2
        bufs = [torch.empty(buf_mb << 20, dtype=torch.uint8, pin_memory=True) for _ in range(nbuf)]
        events: list[torch.cuda.Event | None] = [None] * nbuf
        fd = os.open(path, os.O_RDONLY)
        jobs = []  # (tensor index, offset in tensor, length)
        for i, (s, e) in enumerate(ranges):
            off = 0
            while off < e - s:
                n = min(buf_mb << 20, e - s - off)
                jobs.append((i, off, n))
                off += n

        def read(k: int, job: tuple[int, int, int]) -> int:
            i, off, n = job
            view = memoryview(bufs[k].numpy())[:n]
            got = 0
            while got < n:
                got += os.preadv(fd, [view[got:]], ranges[i][0] + off + got)
            return k

        with cf.ThreadPoolExecutor(workers) as ex:
            futures = []
            for j, job in enumerate(jobs):
                k = j % nbuf
                if events[k] is not None:
                    events[k].synchronize()  # type: ignore[union-attr]
                futures.append((ex.submit(read, k, job), job, k))
                if len(futures) >= workers:
                    fut, (i, off, n), kk = futures.pop(0)
                    fut.result()
                    targets[i][off : off + n].copy_(bufs[kk][:n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record()
                    events[kk] = ev
            for fut, (i, off, n), kk in futures:
                fut.result()
                targets[i][off : off + n].copy_(bufs[kk][:n], non_blocking=True)
        torch.cuda.synchronize()
        os.close(fd)

    for workers, buf_mb in ((8, 32), (16, 16)):
        results[f"staging {workers} threads × {buf_mb} MB pinned"] = med(
            lambda w=workers, b=buf_mb: staging(w, b), args.repeat
        )

    floor = results["floor: one pinned copy"]
    for k, v in results.items():
        print(f"  {k:<58}{v * 1e3:9.1f} ms {v / floor:6.2f}×")
    path.unlink()


if __name__ == "__main__":
    main()
