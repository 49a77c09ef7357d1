"""Tiny block-quantized FP8 checkpoints, built the way DeepSeek-V3 / Qwen3-FP8 releases are:
e4m3 linear weights with a float32 ``weight_scale_inv`` per 128×128 block (ragged last blocks
included), embeddings, norms and the head in bfloat16, and ``quantization_config`` in config.json.

The quantizer here is written independently of ``rvhub.io.fp8``: the tests compare the two.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.models import make_family

BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
SHAPE = {"hidden_size": 256, "intermediate_size": 320, "num_attention_heads": 4,
         "num_key_value_heads": 2}  # fmt: skip


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = w.shape
    rows, cols = -(-out // BLOCK), -(-inp // BLOCK)
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(rows):
        for j in range(cols):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].float()
            amax = float(block.abs().max())
            s = amax / FP8_MAX if amax > 0 else 1.0
            scale[i, j] = s
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / s).to(
                torch.float8_e4m3fn
            )
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = q.float().clone()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] *= float(scale[i, j])
    return out


def is_quantized(name: str) -> bool:
    return ".layers." in name and name.endswith("proj.weight")


def to_fp8(folder: Path) -> Path:
    """Rewrite a bf16 checkpoint folder in place as block-quantized FP8."""
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if is_quantized(name):
            q, s = quantize(t)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t.to(torch.bfloat16)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fp8_family(root: Path, **overrides: object) -> dict[str, Path]:
    """A, B and a target of one tiny Qwen2 (hidden 256; the MLP's 320 makes ragged blocks),
    all FP8."""
    fam = make_family(root, "qwen2", dtype=torch.bfloat16, **{**SHAPE, **overrides})
    return {role: to_fp8(folder) for role, folder in fam.items()}


def dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an FP8 folder as float32 (weights dequantized), scales dropped."""
    t = load_file(folder / "model.safetensors")
    return {
        n: dequantize(v, t[n + "_scale_inv"]) if n + "_scale_inv" in t else v.float()
        for n, v in t.items()
        if not n.endswith("_scale_inv")
    }
