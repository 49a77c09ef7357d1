"""The whole rvhub workflow, offline, on tiny models built right here.

    python examples/demo.py [--workdir DIR]

1. builds a tiny Qwen2 "base", fine-tunes it two ways into "grpo" and "sft" stand-ins
   (random perturbations: this demo shows the mechanics, examples/toy_transfer shows an
   effect) and a third "instruct" model;
2. runs the real CLI: ``rvhub extract``, ``rvhub inspect``, ``rvhub verify``, ``rvhub apply``;
3. loads the applied model with transformers and generates.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    tie_word_embeddings=True,
)


def finetune(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


def rvhub(*args: object) -> None:
    cmd = ["rvhub", *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    exe = Path(sys.executable).parent / "rvhub"
    subprocess.run([str(exe) if exe.exists() else "rvhub", *map(str, args)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rvhub-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building tiny Qwen2 models in {work}")
    for role, seed in (("grpo", 1), ("sft", 2), ("instruct", 3)):
        torch.manual_seed(0)  # one shared base
        model = AutoModelForCausalLM.from_config(Qwen2Config(**CONFIG))
        finetune(model, seed).to(torch.bfloat16).save_pretrained(work / role)

    rvhub("extract", work / "grpo", work / "sft", "-o", work / "reasoning-vector", "--overwrite")
    rvhub("inspect", work / "reasoning-vector")
    rvhub("verify", work / "reasoning-vector", "--against", work / "grpo", work / "sft")
    rvhub(
        "apply",
        work / "reasoning-vector",
        work / "instruct",
        "-o",
        work / "instruct-plus-reasoning",
        "--scale",
        "1.0",
        "--overwrite",
    )

    model = AutoModelForCausalLM.from_pretrained(work / "instruct-plus-reasoning")
    prompt = torch.tensor([[1, 2, 3, 4]])
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"\nthe applied model loads with transformers and generates: {generated[0].tolist()}")
    print(f"everything is in {work}")


if __name__ == "__main__":
    main()
