"""rvhub extract / apply on an FP8 block-quantized pair against the same pair in bf16.

    python benchmarks/fp8.py [--repeat 3] [--layers 28] [--dir DIR]

Builds the Qwen2.5-1.5B-shaped bf16 pair of ``benchmarks/extract_apply.py`` (2 × 3.09 GB),
then the same two models the way FP8 releases ship them (DeepSeek-V3, Qwen3-*-FP8): every
attention and MLP projection as float8_e4m3fn with a float32 ``weight_scale_inv`` per 128×128
block, embeddings, norms and biases in bf16, ``quantization_config`` in config.json. Times, in
one run and interleaved round by round, ``rvhub extract A B`` on both pairs (the FP8 one
dequantizes every block while streaming) and ``rvhub apply v B`` onto both targets (the FP8
one requantizes every block). Prints medians, the FP8 / bf16 ratios and peak RSS.
Targets: FP8 extract ≤ 1.5× the bf16 extract, at ≤ 1.5 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from common import build_pair, drop_cache_hint, rvhub_cmd, work_dir
from extract_apply import measure

from rvhub.io.fp8 import quantize
from rvhub.io.safetensors import SafetensorsWriter, read_header, read_tensor


def to_fp8(src: Path, dst: Path) -> Path:
    """``src`` (bf16) rewritten as a block-quantized FP8 checkpoint in ``dst``."""
    dst.mkdir(parents=True)
    entries, _ = read_header(src / "model.safetensors")
    fp8 = {n for n, e in entries.items() if ".layers." in n and n.endswith("proj.weight")}
    specs = []
    for name, e in entries.items():
        if name in fp8:
            out, inp = e.shape
            specs.append((name, torch.float8_e4m3fn, e.shape))
            specs.append((name + "_scale_inv", torch.float32, (-(-out // 128), -(-inp // 128))))
        else:
            specs.append((name, torch.bfloat16, e.shape))
    writer = SafetensorsWriter(dst / "model.safetensors", specs, {"format": "pt"})
    for name, e in entries.items():
        t = read_tensor(e)
        if name in fp8:
            q, s = quantize(t.float(), (128, 128))
            writer.write_tensor(q)
            writer.write_tensor(s)
        else:
            writer.write_tensor(t.contiguous())
    writer.close()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=28, help="fewer layers for a quick look")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()

    root = work_dir("rvhub-fp8-", args.dir)
    try:
        a, b = build_pair(root, args.layers)
        print("quantizing the pair to FP8 ...", flush=True)
        fa, fb = to_fp8(a, root / "grpo-fp8"), to_fp8(b, root / "sft-fp8")
        sizes = [(p / "model.safetensors").stat().st_size / 1e9 for p in (a, fa)]
        print(f"pair: 2 × {sizes[0]:.2f} GB bf16, 2 × {sizes[1]:.2f} GB FP8", flush=True)
        drop_cache_hint([a, b, fa, fb])
        v, fv, out, fout = root / "v", root / "v-fp8", root / "out", root / "out-fp8"
        print(f"\nextract (median of {args.repeat}, interleaved)", flush=True)
        ext, fext = measure(
            [
                ("bf16 extract", lambda: rvhub_cmd("extract", str(a), str(b), "-o", str(v)), v),
                ("FP8 extract", lambda: rvhub_cmd("extract", str(fa), str(fb), "-o", str(fv)), fv),
            ],
            args.repeat,
        )
        # the vectors the applies use (measure removes its outputs)
        for cmd in (
            rvhub_cmd("extract", str(a), str(b), "-o", str(v)),
            rvhub_cmd("extract", str(fa), str(fb), "-o", str(fv)),
        ):
            import subprocess

            subprocess.run(cmd, check=True, capture_output=True)
        print(f"\napply (median of {args.repeat}, interleaved)", flush=True)
        app, fapp = measure(
            [
                ("bf16 apply", lambda: rvhub_cmd("apply", str(v), str(b), "-o", str(out)), out),
                (
                    "FP8 apply (requantized)",
                    lambda: rvhub_cmd("apply", str(fv), str(fb), "-o", str(fout)),
                    fout,
                ),
            ],
            args.repeat,
        )
        print(
            f"\n  {'':<26}{'wall s':>9}{'peak RSS':>12}\n"
            f"  {'bf16 extract':<26}{ext.seconds:>9.2f}{ext.peak_rss_mb:>9.0f} MB\n"
            f"  {'FP8 extract':<26}{fext.seconds:>9.2f}{fext.peak_rss_mb:>9.0f} MB\n"
            f"  {'bf16 apply':<26}{app.seconds:>9.2f}{app.peak_rss_mb:>9.0f} MB\n"
            f"  {'FP8 apply (requantized)':<26}{fapp.seconds:>9.2f}{fapp.peak_rss_mb:>9.0f} MB\n"
            f"\nratios: FP8 extract {fext.seconds / ext.seconds:.2f}× the bf16 extract at "
            f"{fext.peak_rss_mb:.0f} MB (targets: ≤ 1.5×, ≤ 1.5 GB); FP8 apply "
            f"{fapp.seconds / app.seconds:.2f}× the bf16 apply at {fapp.peak_rss_mb:.0f} MB"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
