"""Everything issue 15 asks of a GPU machine, in one run of under 5 minutes.

    python benchmarks/gpu_session.py [--layers 28] [--repeat 3] [--threads 1,4,16] [--dir DIR]
    python benchmarks/gpu_session.py --smoke        # on a CPU: 2 layers, every step that can run

On the Qwen2.5-1.5B-shaped bf16 pair (benchmarks/common.py; 2 × 3.09 GB), in order:

1. CPU scaling: ``extract`` and on-disk ``apply`` at each ``--threads`` (medians, output
   bytes compared with the 1-thread run's);
2. the *first* ``load_vector(path).apply_to(model)`` of a freshly written vector (empty
   integrity cache: BLAKE3 of every file, then pinning and DMA), split into its hash and
   apply parts, and later applies, each against one pinned host-to-device copy of the
   vector's bytes (targets ≤ 1.5× and ≤ 1.25×);
3. α = 1.5 on CUDA equals one rounding of θ + 1.5·v, tensor by tensor;
4. a model split over CPU and GPU (half its layers moved, as ``device_map`` places them):
   every delta lands on its parameter's own device, equal to the all-CPU apply;
5. ``compress --encoding lora --rank 64 --device cuda`` over the 196 matrices (target ≤ 2 s
   for the SVDs; benchmarks/gpu_svd_probe.py splits it further);
6. an α sweep's switch on CUDA (``rvhub eval``'s ``FileScaleSwitch``, through
   benchmarks/eval_sweep.py's child): CUDA max allocated beside the model's size (target: the
   model + 10 % + the largest tensor), the first switch against the last at the same α
   (target ≤ 1.5×).

The device machine has torch, transformers, peft, safetensors and huggingface_hub but not
rvhub's other dependencies; bring them as wheels in an ignored folder it carries:
``pip download blake3 xxhash click jinja2 pyyaml tqdm --only-binary :all: -d .cache/gpu-wheels``
here, then on the device ``pip install --no-index --find-links .cache/gpu-wheels blake3 xxhash
click jinja2 pyyaml tqdm && python benchmarks/gpu_session.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from common import base_tensor, finetuned_tensor, qwen2_config, work_dir, write_checkpoint


def timed(fn: Callable[[], object], repeat: int, cuda: bool) -> list[float]:
    out = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def cpu_scaling(a: Path, b: Path, root: Path, counts: list[int], repeat: int) -> Path:
    from rvhub import apply_to_checkpoint, extract_vector, load_vector

    print(f"1. CPU scaling on {os.cpu_count()} logical CPUs (medians of {repeat})", flush=True)
    first: dict[str, dict[str, bytes]] = {}
    base_ext = base_app = 0.0
    vec = root / "vec"
    for n in counts:
        out, vec_n = root / f"out-{n}", root / f"vec-{n}"

        def extract(n: int = n, vec_n: Path = vec_n) -> None:
            shutil.rmtree(vec_n, ignore_errors=True)
            extract_vector(a, b).save(vec_n, threads=n)

        ext = statistics.median(timed(extract, repeat, False))
        v = load_vector(vec_n)

        def apply(n: int = n, out: Path = out, v=v) -> None:  # type: ignore[no-untyped-def]
            shutil.rmtree(out, ignore_errors=True)
            apply_to_checkpoint(v, b, out, threads=n, scale=0.5)

        app = statistics.median(timed(apply, repeat, False))
        got = {"vec": weights(vec_n), "out": weights(out)}
        if not first:
            first, base_ext, base_app = got, ext, app
        same = got == first
        print(
            f"  --threads {n:>2}: extract {ext:6.2f} s ({base_ext / ext:4.2f}× the first), "
            f"apply {app:6.2f} s ({base_app / app:4.2f}×), bytes identical: {same}",
            flush=True,
        )
        assert same, f"--threads {n} wrote other bytes than --threads {counts[0]}"
        shutil.rmtree(out, ignore_errors=True)
        if vec_n != root / f"vec-{counts[0]}":
            shutil.rmtree(vec_n, ignore_errors=True)
    (root / f"vec-{counts[0]}").rename(vec)
    return vec


def pinned_copy_seconds(nbytes: int, repeat: int) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return statistics.median(timed(lambda: dev.copy_(host, non_blocking=True), repeat, True))


def base_model(b: Path) -> torch.nn.Module:
    """B itself, loaded by transformers: a target of the vector's lineage."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(b, dtype=torch.bfloat16).eval()


def gpu_apply(vec: Path, b: Path, root: Path, repeat: int) -> None:
    from rvhub import load_vector
    from rvhub.io.gpu import release_pinned
    from rvhub.io.kernels import add_scaled_

    nbytes = sum(p.stat().st_size for p in vec.glob("*.safetensors"))
    model = base_model(b).to("cuda")
    params = dict(model.named_parameters())
    floor = pinned_copy_seconds(nbytes, repeat)
    print(f"2. GPU apply, {torch.cuda.get_device_name()}, vector {nbytes / 1e9:.2f} GB", flush=True)
    os.environ["RVHUB_CACHE"] = str(root / "fresh-integrity-cache")  # a fresh download's state
    release_pinned()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    v = load_vector(vec)  # BLAKE3 of every file
    t1 = time.perf_counter()
    v.apply_to(model)  # pin + DMA + add
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    later = statistics.median(
        timed(lambda: load_vector(vec).apply_to(model, scale=-1.0), repeat, True)
    )
    rows = [
        ("one pinned H2D copy (floor)", floor),
        ("first: load_vector (hash check)", t1 - t0),
        ("first: apply_to (pin + DMA + add)", t2 - t1),
        ("first: both", t2 - t0),
        ("later: load_vector + apply_to", later),
    ]
    for label, sec in rows:
        print(f"  {label:<36}{sec * 1e3:9.1f} ms {sec / floor:7.2f}× floor", flush=True)
    print(
        f"  targets: first ≤ 1.5× ({(t2 - t0) / floor:.2f}×), later ≤ 1.25× ({later / floor:.2f}×)"
    )

    print("3. α = 1.5 on CUDA", flush=True)
    names = [n for n in v if n in params][:8]
    for n in names:
        theta = params[n].detach().clone()
        delta = v.get(n, dtype=None).cuda()
        add_scaled_(theta_out := theta.clone(), delta, 1.5)
        want = (theta.double() + 1.5 * delta.double()).float().to(theta.dtype)
        assert torch.equal(theta_out, want), f"α = 1.5 is not one rounding on {n}"
    print(f"  {len(names)} tensors equal round(θ + 1.5·v) exactly")
    torch.cuda.empty_cache()
    release_pinned()


def split_model(vec: Path, b: Path, layers: int, cuda: bool) -> None:
    from rvhub import load_vector

    print("4. a model split over CPU and GPU", flush=True)
    reference, split = base_model(b), base_model(b)
    if cuda:  # the first half of the blocks and the final norm on the GPU, as device_map would
        for block in split.model.layers[: layers // 2]:
            block.to("cuda")
        split.model.norm.to("cuda")
    v = load_vector(vec)
    v.apply_to(reference, scale=0.5)
    v.apply_to(split, scale=0.5)
    devices = {p.device.type for p in split.parameters()}
    ref = dict(reference.named_parameters())
    for name, p in split.named_parameters():
        assert torch.equal(p.detach().cpu(), ref[name].detach()), f"{name} differs on {p.device}"
    print(f"  parameters on {sorted(devices)}: every one equals the all-CPU apply")


def lora(vec: Path, root: Path, device: str) -> None:
    from rvhub import load_vector

    print(f"5. LoRA rank 64 on {device}", flush=True)
    v = load_vector(vec)
    sync = device.startswith("cuda")
    (sec,) = timed(lambda: v.save(root / "lora", encoding="lora", rank=64, device=device), 1, sync)
    print(f"  compress --encoding lora --rank 64: {sec:.2f} s end to end (SVD target ≤ 2 s)")


def eval_switch(vec: Path, b: Path, device: str) -> None:
    """6. The file switch of an α sweep on ``device``, in its own process (its peak RSS is
    not shown: a child's high-water mark starts at this large process's; eval_sweep.py run
    on its own measures it)."""
    import json
    import subprocess

    script = Path(__file__).parent / "eval_sweep.py"
    cmd = [sys.executable, str(script), "--device", device, "--child", "files", str(vec), str(b)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    size_mb = sum(f.stat().st_size for f in b.glob("*.safetensors")) / 2**20
    times = r["times"]
    print(f"6. sweep switch ({device}): α {' '.join(f'{t:.2f}' for t in times)} s; first/last"
          f" {times[0] / times[-1]:.2f}× (target ≤ 1.5×); model {size_mb:.0f} MB", flush=True)  # fmt: skip
    if "cuda_max_mb" in r:
        over = (r["cuda_max_mb"] - size_mb) / size_mb
        print(f"   CUDA max allocated {r['cuda_max_mb']:.0f} MB = the model + {over:.1%}"
              " (target: + 10 % + the largest tensor)", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="2 layers, 1 repeat, threads 1,2")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.repeat, args.threads = 2, 1, "1,2"
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA GPU here: steps 2, 3 and 5 on CUDA are skipped; 4 and 6 run on the CPU")
    counts = [int(t) for t in args.threads.split(",")]
    root = work_dir("rvhub-gpu-session-", args.dir)
    start = time.perf_counter()
    try:
        cfg = qwen2_config(num_hidden_layers=args.layers)
        a = write_checkpoint(root / "a", cfg, finetuned_tensor)
        b = write_checkpoint(root / "b", cfg, base_tensor)
        print(f"pair built in {time.perf_counter() - start:.0f} s", flush=True)
        vec = cpu_scaling(a, b, root, counts, args.repeat)
        if cuda:
            gpu_apply(vec, b, root, args.repeat)
        split_model(vec, b, args.layers, cuda)
        lora(vec, root, "cuda" if cuda else "cpu")
        eval_switch(vec, b, "cuda" if cuda else "cpu")
        print(f"done in {time.perf_counter() - start:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
