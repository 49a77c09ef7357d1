"""The whole rvhub workflow, offline, on tiny models built right here.

    python examples/demo.py [--workdir DIR] [--seed N]

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
import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


def rvhub(*args: object, log: Path) -> None:
    """Run one rvhub command as a user would; its stdout is shown, its stderr (progress bars,
    library warnings) goes to ``log`` unless the command fails."""
    cmd = ["rvhub", *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    exe = Path(sys.executable).parent / "rvhub"
    done = subprocess.run(
        [str(exe) if exe.exists() else "rvhub", *map(str, args)],
        stdout=None,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n{done.stderr}\n")
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(done.returncode)


@contextlib.contextmanager
def quiet(log: Path) -> Iterator[None]:
    """Library warnings and transformers' save/load progress bars go to ``log``."""
    from transformers.utils import logging as hf_logging

    handler = logging.FileHandler(log, encoding="utf-8")
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0, help="the toy transfer's training seed")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rvhub-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "demo.log"
    with quiet(log):
        run(work, log, args.seed)


def run(work: Path, log: Path, seed: int) -> None:
    print(f"building tiny Qwen2 models in {work} (warnings and progress bars: {log})")
    for role, perturbation in (("grpo", 1), ("sft", 2), ("instruct", 3)):
        torch.manual_seed(0)  # one shared base
        model = AutoModelForCausalLM.from_config(Qwen2Config(**CONFIG))
        finetune(model, perturbation).to(torch.bfloat16).save_pretrained(work / role)

    vec = work / "reasoning-vector"
    rvhub("extract", work / "grpo", work / "sft", "-o", vec, "--overwrite", log=log)
    rvhub("inspect", vec, log=log)
    rvhub("verify", vec, "--against", work / "grpo", work / "sft", log=log)
    applied = work / "instruct-plus-reasoning"
    rvhub("apply", vec, work / "instruct", "-o", applied, "--scale", "1.0", "--overwrite", log=log)
    model = AutoModelForCausalLM.from_pretrained(applied)
    print(f"\nthe applied model loads with transformers ({type(model).__name__})")
    transfer(work / "toy", log, seed)


def transfer(toy: Path, log: Path, seed: int) -> None:
    """The effect: train the toy transfer, extract v = rl − sft, sweep α with `rvhub eval`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "toy_transfer"))
    import toy_transfer

    s = toy_transfer.DEMO
    print(f"\ntraining the toy transfer's models (examples/toy_transfer, demo size) in {toy}")
    with torch_threads():
        toy_transfer.train_all(toy, seed, s)
    for name in ("sft", "rl", "instruct"):
        toy_transfer.toy_tokenizer().save_pretrained(toy / name)
    rvhub("extract", toy / "rl", toy / "sft", "-o", toy / "vector", "--overwrite", log=log)
    rvhub(
        "eval", toy / "vector", toy / "instruct", "--tasks", toy_transfer.LM_EVAL_TASK,
        "--include-path", toy_transfer.TASK_DIR, "--scales", "-1,0,1",
        "--limit", s.eval_size, "--batch-size", s.eval_size,
        "-o", toy / "eval", "--overwrite", log=log,
    )  # fmt: skip
    card = toy / "card" / "README.md"
    rvhub("card", toy / "vector", "--eval", toy / "eval", "-o", card, log=log)
    summary = json.loads((toy / "eval" / "sweep.json").read_text())
    (metric,) = summary["metrics"]
    points = {p["scale"]: p for p in metric["points"]}
    n = points[0.0]["n"]
    print(f"\ninstruct + α·v, addition accuracy on {n} held-out problems (lm-eval exact match):")
    for scale, point in sorted(points.items()):
        print(f"  α = {scale:+g}: {point['value']:.3f} ± {point['stderr']:.3f}")
    print(reading(points))
    print(f"\ncard: {card} (α plot: {card.parent / 'eval_sweep.png'})")
    print(f"everything is in {toy.parent}; warnings and progress bars in {log}")
    print(
        "next, publish it (after `hf auth login`):\n"
        f"  rvhub push {toy / 'vector'} YOUR-USER/toy-addition-vector --eval {toy / 'eval'}"
    )


def reading(points: dict[float, dict]) -> str:
    """One line: what +v and −v did, in points, against the baseline's standard error."""
    base = points[0.0]
    plus = 100 * (points[1.0]["value"] - base["value"])
    minus = 100 * (points[-1.0]["value"] - base["value"])
    se = 100 * base["stderr"]
    return (
        f"reading: +v: {plus:+.1f} points ({plus / se:+.1f} standard errors), "
        f"−v: {minus:+.1f} points ({minus / se:+.1f} standard errors), n = {base['n']}"
    )


def torch_threads():
    """Train on every core the demo has (the example defaults to one)."""

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
