"""The whole rvhub workflow, offline, on tiny models built right here.

    python examples/demo.py [--workdir DIR]

1. the mechanics: builds a tiny Qwen2 "base", perturbs it into "grpo" and "sft" stand-ins
   and an "instruct" model, and runs the real CLI: ``rvhub extract``, ``inspect``,
   ``verify``, ``apply``; the applied model loads with transformers;
2. the effect: trains the toy transfer of examples/toy_transfer (a tiny Llama learns
   2-digit addition; RL on top of SFT fixes its carries) in its demo size, extracts
   ``v = rl − sft``, and ``rvhub eval`` measures the instruct model's addition accuracy with
   lm-evaluation-harness at α = −1, 0, 1; ``rvhub card --eval`` renders the card.

Needs ``pip install -e ".[eval]"`` (lm-evaluation-harness, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
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
    print(f"\nthe applied model loads with transformers ({type(model).__name__})")

    toy = work / "toy"
    print(f"\ntraining the toy transfer's models (examples/toy_transfer, demo size) in {toy}")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "toy_transfer"))
    import toy_transfer

    with torch_threads():
        toy_transfer.train_all(toy, 0, toy_transfer.DEMO)
    for name in ("sft", "rl", "instruct"):
        toy_transfer.toy_tokenizer().save_pretrained(toy / name)
    rvhub("extract", toy / "rl", toy / "sft", "-o", toy / "vector", "--overwrite")
    rvhub(
        "eval", toy / "vector", toy / "instruct", "--tasks", toy_transfer.LM_EVAL_TASK,
        "--include-path", toy_transfer.TASK_DIR, "--scales", "-1,0,1",
        "--limit", toy_transfer.DEMO.eval_size, "--batch-size", toy_transfer.DEMO.eval_size,
        "-o", toy / "eval", "--overwrite",
    )  # fmt: skip
    rvhub("card", toy / "vector", "--eval", toy / "eval", "-o", toy / "card" / "README.md")
    summary = json.loads((toy / "eval" / "sweep.json").read_text())
    (metric,) = summary["metrics"]
    print("\ninstruct + α·v, addition accuracy (lm-evaluation-harness exact match):")
    for point in metric["points"]:
        print(f"  α = {point['scale']:+g}: {point['value']:.3f} ± {point['stderr']:.3f}")
    print(f"everything is in {work}")


def torch_threads():
    """Train on every core the demo has (the example defaults to one)."""
    import contextlib

    @contextlib.contextmanager
    def threads():
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return threads()


if __name__ == "__main__":
    main()
