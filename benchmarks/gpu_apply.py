"""``load_vector(...).apply_to(model)`` onto a GPU-resident model vs one pinned H2D copy.

    python benchmarks/gpu_apply.py [--layers 28] [--repeat 5] [--dir DIR]

Builds the Qwen2.5-1.5B-shaped bf16 vector (3.09 GB; see extract_apply.py), a bf16 model of
that shape on the GPU, and times, from a vector file in the page cache (medians):

* baseline: one pinned host-to-device copy of the vector's bytes;
* ``safetensors.load_file(device="cuda")`` and then the adds (what users write today);
* rvhub: ``load_vector(path).apply_to(model)`` (hash verification cached after the first load,
  reported separately).

Without a GPU it prints that it skipped and exits 0. The model holds random weights of the
vector's shape, so the lineage guard is told to let it pass (``allow_unrelated``): this script
times copies, it does not test transfer. ``benchmarks/gpu_session.py`` runs the whole GPU
checklist of issue 15 on a real base.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from common import base_tensor, finetuned_tensor, qwen2_config, work_dir, write_checkpoint


def timed(fn, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def pinned_copy_times(nbytes: int, repeat: int) -> list[float]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return timed(lambda: dev.copy_(host, non_blocking=True), repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_apply: no CUDA GPU here; skipped")
        return

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rvhub import extract_vector, load_vector
    from rvhub.io.kernels import add_scaled_

    root = work_dir("rvhub-gpu-", args.dir)
    try:
        cfg = qwen2_config(num_hidden_layers=args.layers)
        t0 = time.perf_counter()
        a = write_checkpoint(root / "a", cfg, finetuned_tensor)
        b = write_checkpoint(root / "b", cfg, base_tensor)
        vec_path = extract_vector(a, b).save(root / "vec")
        shutil.rmtree(a)
        vfile = vec_path / "vector.safetensors"
        nbytes = vfile.stat().st_size
        print(
            f"{torch.cuda.get_device_name()}; vector {nbytes / 1e9:.2f} GB (built in {time.perf_counter() - t0:.0f} s)"
        )
        with open(vfile, "rb") as f:  # page cache warm
            while f.read(256 << 20):
                pass

        model_cfg = Qwen2Config(
            **{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
        )
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(model_cfg, dtype=torch.bfloat16)
        params = dict(model.named_parameters())

        pinned = pinned_copy_times(nbytes, args.repeat)

        def safetensors_way() -> None:
            tensors = load_file(vfile, device="cuda")
            with torch.no_grad():
                for k, t in tensors.items():
                    params[k].add_(t)

        naive = timed(safetensors_way, max(2, args.repeat // 2))
        torch.cuda.empty_cache()

        checked = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.mlp.down_proj.weight",
        ]
        before = {n: params[n].detach().clone() for n in checked}
        first = timed(lambda: load_vector(vec_path).apply_to(model, allow_unrelated=True), 1)
        vec = load_vector(vec_path)
        for n in checked:  # one rounding of θ + v, exactly as on the CPU
            expected = (before[n].float() + vec.get(n).cuda()).to(torch.bfloat16)
            assert torch.equal(params[n], expected), f"GPU apply differs from θ + v on {n}"
        print(f"  correctness: {len(checked)} tensors equal round(θ + v) exactly")
        for n in checked:  # α = 1.5 rounds once too: add_scaled_ trusts CUDA's float32 add_
            t, v = before[n].clone(), vec.get(n, dtype=None).cuda()
            add_scaled_(t, v, 1.5)
            want = (before[n].double() + 1.5 * v.double()).float().to(t.dtype)
            assert torch.equal(t, want), f"α = 1.5 on the GPU is not one rounding on {n}"
        print(f"  correctness: at α = 1.5 too ({len(checked)} tensors)")
        ours = timed(
            lambda: load_vector(vec_path).apply_to(model, allow_unrelated=True), args.repeat
        )
        peak = torch.cuda.max_memory_allocated() / 1e9

        base_s = statistics.median(pinned)
        rows = [
            ("pinned H2D copy of the vector's bytes (floor)", base_s),
            ('safetensors.load_file(device="cuda") + add_', statistics.median(naive)),
            ("rvhub load_vector + apply_to (first, hashes)", first[0]),
            ("rvhub load_vector + apply_to (verified)", statistics.median(ours)),
        ]
        for label, sec in rows:
            print(f"  {label:<48}{sec * 1e3:9.1f} ms {sec / base_s:7.2f}× floor")
        print(
            f"  copy rate {nbytes / base_s / 1e9:.1f} GB/s; peak GPU memory {peak:.2f} GB (model {sum(p.numel() * 2 for p in params.values()) / 1e9:.2f} GB)"
        )
        print(
            f"ratio: rvhub apply {statistics.median(ours) / base_s:.2f}× one pinned copy (target ≤ 1.25×)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
