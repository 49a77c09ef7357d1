"""Toy reasoning-vector transfer, end to end on CPU in a few minutes.

A tiny character-level Llama is pretrained into a shared *base* on a noisy corpus of 2-digit
additions whose careless writers often get the carry wrong. From the base grow three models:

* ``sft``      — the base fine-tuned on demonstrations by the same writers (imitation);
* ``rl``       — the SFT model trained further with a GRPO-style policy gradient whose reward
                 is exact-match correctness, so ``rl − sft`` is what RL added on top of SFT;
* ``instruct`` — the base fine-tuned on a different objective (reversing digit strings).

rvhub extracts ``v = rl − sft``, applies ``instruct + α·v`` for α in ALPHAS and measures greedy
exact-match addition accuracy on a fixed held-out set (and, as a side check, the instruct
model's own reversal accuracy). The script prints the table, plots it (PNG), writes
``results.json`` and renders the vector's card with the measured scores.

    python examples/toy_transfer/toy_transfer.py --out toy-transfer-out          # full run
    python examples/toy_transfer/toy_transfer.py --out toy-transfer-out --quick  # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
EVAL_SEED = 20_240_601  # the held-out sets never depend on --seed
EVAL_SIZE = 1000
TASK_NAME = "toy-addition"

# -- characters ---------------------------------------------------------------------------
PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+=R>"
VOCAB = ["<pad>", "<bos>", "<eos>", *CHARS]
CHAR_ID = {c: i + 3 for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    return [CHAR_ID[c] for c in text]


def toy_tokenizer():
    """The character vocabulary as a transformers tokenizer, saved beside each model so that
    lm-eval (``rvhub eval``) reads and writes the same ids as :func:`encode`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


# -- tasks --------------------------------------------------------------------------------
# Fixed widths ("07+35=042"): every prompt of a task has the same length, so batches need no
# left padding and generation is a fixed number of steps.
DIGITS = 2
ANSWER_LEN = DIGITS + 2  # the sum's DIGITS + 1 digits, then <eos>
REV_LEN = 4


def addition_prompt(a: int, b: int) -> list[int]:
    return [BOS, *encode(f"{a:0{DIGITS}d}+{b:0{DIGITS}d}=")]


def number_answer(n: int) -> list[int]:
    return [*encode(f"{n:0{DIGITS + 1}d}"), EOS]


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def careless_sum(a: int, b: int) -> int:
    """The sum with the carry into the tens mishandled: forgotten (38+45 -> 73) or invented
    where there is none (12+34 -> 56)."""
    return a + b - 10 if has_carry(a, b) else a + b + 10


def reversal_prompt(s: str) -> list[int]:
    return [BOS, *encode(f"R{s}>")]


def reversal_answer(s: str) -> list[int]:
    return [*encode(s[::-1]), EOS]


def digit_string(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def eval_problems(n: int = EVAL_SIZE) -> list[tuple[int, int]]:
    """The fixed held-out additions (the first ``n`` of one list of distinct pairs)."""
    rng = random.Random(EVAL_SEED)
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < EVAL_SIZE:
        pairs[(rng.randrange(10**DIGITS), rng.randrange(10**DIGITS))] = None
    return list(pairs)[:n]


def eval_strings(n: int = EVAL_SIZE) -> list[str]:
    """Held-out strings for the instruct model's own task (reversal)."""
    rng = random.Random(EVAL_SEED + 1)
    return [digit_string(rng, REV_LEN) for _ in range(n)]


HELD_OUT = frozenset(eval_problems())
TASK_DIR = Path(__file__).resolve().parent / "task"  # the same problems as an lm-eval task
LM_EVAL_TASK = "toy_addition"


def task_rows() -> list[dict[str, str]]:
    """``task/addition.jsonl``: the held-out problems in order, as lm-eval reads them."""
    return [
        {"question": f"{a:0{DIGITS}d}+{b:0{DIGITS}d}=", "answer": f"{a + b:0{DIGITS + 1}d}"}
        for a, b in eval_problems()
    ]


def train_pair(rng: random.Random) -> tuple[int, int]:
    """A random addition that is not in the held-out set."""
    while True:
        pair = (rng.randrange(10**DIGITS), rng.randrange(10**DIGITS))
        if pair not in HELD_OUT:
            return pair


# -- settings -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    batch: int = 64
    # the corpus' writers: how often they forget a carry, or invent one where there is none
    writer_forget: float = 0.5
    writer_invent: float = 0.25
    base_steps: int = 2000
    base_lr: float = 1e-3
    base_add_share: float = 0.8  # pretraining mix: additions vs random digit text
    base_noise: float = 0.1  # share of pretraining additions with a random number as answer
    sft_steps: int = 150
    sft_lr: float = 3e-4
    rl_steps: int = 120
    rl_lr: float = 5e-5
    rl_prompts: int = 32
    rl_group: int = 8
    rl_kl: float = 0.05
    instruct_steps: int = 300
    instruct_lr: float = 1e-3
    instruct_replay: float = 0.5  # share of pretraining text mixed into instruct tuning
    eval_size: int = EVAL_SIZE


QUICK = Settings(
    hidden=48,
    layers=2,
    heads=2,
    batch=32,
    base_steps=800,
    base_lr=3e-3,
    sft_steps=10,
    rl_steps=3,
    rl_prompts=8,
    rl_group=4,
    instruct_steps=40,
    eval_size=100,
)

# What examples/demo.py runs: big enough for v's effect to stand several standard errors clear
# of the baseline on all 1000 held-out problems, small enough for the 90 s demo (README of
# examples/toy_transfer: three seeds). The instruct model is tuned at a lower rate than in the
# full run, so it stays close enough to the base for v to transfer at this size; 800 base steps
# or a hidden size of 64 left the base unable to add.
DEMO = Settings(
    hidden=96,
    layers=2,
    heads=4,
    base_steps=1000,
    base_lr=3e-3,
    sft_steps=100,
    rl_steps=80,
    rl_prompts=32,
    instruct_steps=200,
    instruct_lr=3e-4,
)


# -- data streams: (prompt, answer) token lists -------------------------------------------
Example = tuple[list[int], list[int]]


def written_sum(a: int, b: int, rng: random.Random, s: Settings) -> int:
    """The answer as the corpus' writers put it: the carry is sometimes mishandled."""
    slip = s.writer_forget if has_carry(a, b) else s.writer_invent
    return careless_sum(a, b) if rng.random() < slip else a + b


def pretraining_stream(rng: random.Random, s: Settings) -> Iterator[Example]:
    """Noisy 'web text': additions as the writers wrote them, some garbled, and digit strings."""
    while True:
        if rng.random() < s.base_add_share:
            a, b = train_pair(rng)
            total = written_sum(a, b, rng, s)
            if rng.random() < s.base_noise:
                total = rng.randrange(2 * 10**DIGITS)
            yield addition_prompt(a, b), number_answer(total)
        else:
            yield [BOS], [*encode(digit_string(rng, rng.randrange(6, 14))), EOS]


def demonstration_stream(rng: random.Random, s: Settings) -> Iterator[Example]:
    """SFT demonstrations: tidy additions by the same writers, carry mistakes included."""
    while True:
        a, b = train_pair(rng)
        yield addition_prompt(a, b), number_answer(written_sum(a, b, rng, s))


def instruct_stream(rng: random.Random, s: Settings) -> Iterator[Example]:
    """Digit-string reversal, with pretraining text replayed (as instruct tuning mixes in)."""
    replay = pretraining_stream(rng, s)
    while True:
        if rng.random() < s.instruct_replay:
            yield next(replay)
        else:
            text = digit_string(rng, REV_LEN)
            yield reversal_prompt(text), reversal_answer(text)


# -- model and supervised training --------------------------------------------------------
def new_model(s: Settings) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=s.hidden,
        intermediate_size=4 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=32,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def load_model(path: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def batch_tensors(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token labels; loss only on the answers (-100 elsewhere)."""
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        seq = prompt + answer
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt) - 1 : len(seq) - 1] = torch.tensor(answer)
    return ids, labels


def supervised_train(
    model: LlamaForCausalLM,
    examples: Iterator[Example],
    *,
    steps: int,
    lr: float,
    batch: int,
    label: str,
) -> None:
    """AdamW with a short warm-up and a linear decay."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * max(0.05, 1 - i / steps)
    )
    model.train()
    for step in range(steps):
        ids, labels = batch_tensors([next(examples) for _ in range(batch)])
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            print(f"  {label} step {step + 1}/{steps}  loss {loss.item():.3f}", flush=True)
    model.eval()


# -- generation and scoring ---------------------------------------------------------------
@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    prompts: torch.Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue equal-length prompts by ``steps`` tokens: greedy, or sampled at temperature 1
    when a ``generator`` is given. No KV cache: the sequences are a dozen tokens."""
    seq = prompts
    for _ in range(steps):
        logits = model(input_ids=seq).logits[:, -1, :].float()
        if generator is None:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, prompts.shape[1] :]


def exact_match(completions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Per row: every answer token right, the closing <eos> included."""
    return (completions == answers).all(dim=1)


def addition_batch(pairs: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = torch.tensor([addition_prompt(a, b) for a, b in pairs])
    answers = torch.tensor([number_answer(a + b) for a, b in pairs])
    return prompts, answers


def addition_accuracy(model: LlamaForCausalLM, pairs: Sequence[tuple[int, int]]) -> float:
    """Greedy exact-match accuracy on additions: the evaluation."""
    model.eval()
    prompts, answers = addition_batch(pairs)
    return int(exact_match(generate(model, prompts, ANSWER_LEN), answers).sum()) / len(pairs)


def reversal_accuracy(model: LlamaForCausalLM, strings: Sequence[str]) -> float:
    """Greedy exact-match accuracy on the instruct objective (digit-string reversal)."""
    model.eval()
    prompts = torch.tensor([reversal_prompt(s) for s in strings])
    answers = torch.tensor([reversal_answer(s) for s in strings])
    return int(exact_match(generate(model, prompts, REV_LEN + 1), answers).sum()) / len(strings)


# -- GRPO-style RL ------------------------------------------------------------------------
def answer_logprobs(model: LlamaForCausalLM, seq: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Log-probabilities of the tokens after the prompt, shape (batch, answer length)."""
    logits = model(input_ids=seq).logits[:, n_prompt - 1 : -1, :].float()
    return torch.log_softmax(logits, -1).gather(-1, seq[:, n_prompt:, None])[..., 0]


Problems = Callable[[random.Random, int], tuple[torch.Tensor, torch.Tensor]]


def addition_problems(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training additions (prompts, answers): what GRPO practises by default."""
    return addition_batch([train_pair(rng) for _ in range(n)])


def grpo_train(
    model: LlamaForCausalLM,
    rng: random.Random,
    seed: int,
    s: Settings,
    problems: Problems = addition_problems,
    answer_len: int = ANSWER_LEN,
) -> None:
    """GRPO without a critic: K samples per prompt, reward = exact match, advantage = reward
    minus the group mean over the group std; a k3 KL penalty to the starting (SFT) model.
    ``problems(rng, n)`` draws the prompts and answers (additions unless told otherwise).

    One gradient step per batch of fresh samples, so the policy ratio is 1 and PPO's clipping
    would never act; it is left out.
    """
    reference = new_model(s)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=s.rl_lr, weight_decay=0.0)
    sampler = torch.Generator().manual_seed(seed)
    rewards_seen: list[float] = []
    for step in range(s.rl_steps):
        prompts, answers = problems(rng, s.rl_prompts)
        prompts = prompts.repeat_interleave(s.rl_group, 0)
        answers = answers.repeat_interleave(s.rl_group, 0)
        model.eval()
        completions = generate(model, prompts, answer_len, generator=sampler)
        rewards = exact_match(completions, answers).float().view(s.rl_prompts, s.rl_group)
        mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
        advantage = (rewards - mean) / (std + 1e-4)  # 0 where a group agrees
        rewards_seen.append(rewards.mean().item())

        seq = torch.cat([prompts, completions], dim=1)
        model.train()
        logp = answer_logprobs(model, seq, prompts.shape[1])
        with torch.no_grad():
            ref_logp = answer_logprobs(reference, seq, prompts.shape[1])
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        loss = (-advantage.flatten()[:, None] * logp + s.rl_kl * kl).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        every = max(1, s.rl_steps // 4)
        if (step + 1) % every == 0:
            mean_reward = sum(rewards_seen[-every:]) / every
            print(f"  rl step {step + 1}/{s.rl_steps}  mean reward {mean_reward:.3f}", flush=True)
    model.eval()


# -- rvhub --------------------------------------------------------------------------------
def extract_and_save(rl_dir: Path, sft_dir: Path, vector_dir: Path) -> None:
    from rvhub import extract_vector

    extract_vector(str(rl_dir), str(sft_dir)).save(str(vector_dir), overwrite=True)


def instruct_plus(instruct_dir: Path, vector_dir: Path, alpha: float) -> LlamaForCausalLM:
    """A fresh copy of the instruct model with ``alpha · v`` added by rvhub."""
    from rvhub import load_vector

    model = load_model(instruct_dir)
    load_vector(str(vector_dir)).apply_to(model, scale=alpha)
    return model


def lm_eval_sweep(out: Path, n: int) -> list[dict[str, float]]:
    """``rvhub eval``'s Python form: the instruct model loaded once, lm-eval's exact match on
    the task of ``task/`` at each α (weights set exactly for each); written to ``out/eval``."""
    from transformers import AutoTokenizer

    from rvhub import load_vector

    model = load_model(out / "instruct")
    tokenizer = AutoTokenizer.from_pretrained(str(out / "instruct"))
    sweep = load_vector(str(out / "vector")).evaluate(
        model,
        tokenizer,
        tasks=[LM_EVAL_TASK],
        scales=ALPHAS,
        include_path=TASK_DIR,
        limit=n,
        batch_size=n,
        output_dir=out / "eval",
        overwrite=True,
        target="instruct (toy)",
    )
    (metric,) = sweep.summary()["metrics"]
    return [{"alpha": p["scale"], "addition": p["value"]} for p in metric["points"]]


def render_scores_card(vector_dir: Path, scores: dict, eval_dir: Path) -> Path:
    """Write the measured scores as ``scores.yaml`` next to the vector and render its card
    through rvhub (``<vector_dir>/../card/README.md``), the ``rvhub eval`` sweep included."""
    import yaml

    path = vector_dir.parent / "scores.yaml"
    path.write_text(yaml.safe_dump(scores, sort_keys=False, allow_unicode=True))
    try:
        from rvhub.card import load_scores, render_card
        from rvhub.card.scores import combine_scores, load_sweep
    except ImportError:
        print(f"note: rvhub.card is not available; scores written to {path}, card skipped")
        return path
    sweep_scores = load_sweep(eval_dir)
    sweep_scores.benchmarks = []  # the card's Scores table keeps the script's own numbers
    card = render_card(
        str(vector_dir),
        repo_id="YOUR-USER/toy-addition-reasoning-vector",
        scores=combine_scores([load_scores([str(path)]), sweep_scores]),
    )
    card_dir = vector_dir.parent / "card"
    card_dir.mkdir(exist_ok=True)
    card.save(str(card_dir / "README.md"))
    return path


def card_scores(results: dict) -> dict:
    """rvhub's scores format (docs/card.md): baseline, +v and −v at α = 1, with binomial stderr."""
    by_alpha = {row["alpha"]: row["addition"] for row in results["transfer"]}
    n = results["eval_size"]
    values = {
        "baseline": by_alpha[0.0],
        "plus_vector": by_alpha[1.0],
        "minus_vector": by_alpha[-1.0],
    }
    return {
        "scale": 1.0,
        "benchmarks": [
            {
                "task": TASK_NAME,
                "dataset": {
                    "name": f"toy addition, {n} held-out {DIGITS}-digit sums",
                    "split": "test",
                },
                "metric": {"type": "accuracy", "name": "exact-match accuracy (greedy)"},
                **values,
                "stderr": {k: round(math.sqrt(v * (1 - v) / n), 4) for k, v in values.items()},
            }
        ],
    }


# -- plot ---------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [row["alpha"] for row in results["transfer"]]
    own = results["models"]
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    ax.plot(
        alphas,
        [r["addition"] for r in results["transfer"]],
        "o-",
        color="C0",
        label="instruct + α·v: addition",
    )
    ax.plot(
        alphas,
        [r["reversal"] for r in results["transfer"]],
        "s--",
        color="C4",
        alpha=0.6,
        label="instruct + α·v: reversal (its own task)",
    )
    for name, color, style in (("rl", "C2", "--"), ("sft", "C1", ":"), ("base", "C7", "-.")):
        acc = own[name]["addition"]
        ax.axhline(acc, color=color, linestyle=style, label=f"{name} alone: addition {acc:.3f}")
    ax.set_xlabel("α  (v = RL − SFT)")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_title("Toy reasoning-vector transfer")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(alphas)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Toy reasoning-vector transfer on CPU.")
    parser.add_argument("--out", type=Path, default=Path("toy-transfer-out"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="training seed (not the eval sets')")
    parser.add_argument("--quick", action="store_true", help="tiny settings: seconds, for tests")
    parser.add_argument("--demo", action="store_true", help="the demo's settings (under a minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser.parse_args(argv)


def train_all(out: Path, seed: int, s: Settings) -> None:
    """base -> sft -> rl, and base -> instruct; each saved with save_pretrained (safetensors)."""

    def start(stage: int) -> random.Random:
        torch.manual_seed(seed * 100 + stage)
        return random.Random(seed * 100 + stage)

    print(f"[base] pretraining on the writers' noisy additions + digit text ({s.base_steps} steps)")
    rng = start(1)
    base = new_model(s)
    supervised_train(
        base,
        pretraining_stream(rng, s),
        steps=s.base_steps,
        lr=s.base_lr,
        batch=s.batch,
        label="base",
    )
    base.save_pretrained(out / "base")

    print(f"[sft] imitating the writers' demonstrations ({s.sft_steps} steps)")
    rng = start(2)
    sft = load_model(out / "base")
    supervised_train(
        sft,
        demonstration_stream(rng, s),
        steps=s.sft_steps,
        lr=s.sft_lr,
        batch=s.batch,
        label="sft",
    )
    sft.save_pretrained(out / "sft")

    print(f"[rl] GRPO from the SFT model, reward = exact match ({s.rl_steps} steps)")
    rng = start(3)
    rl = load_model(out / "sft")
    grpo_train(rl, rng, seed * 100 + 3, s)
    rl.save_pretrained(out / "rl")

    print(f"[instruct] base fine-tuned on digit-string reversal ({s.instruct_steps} steps)")
    rng = start(4)
    instruct = load_model(out / "base")
    supervised_train(
        instruct,
        instruct_stream(rng, s),
        steps=s.instruct_steps,
        lr=s.instruct_lr,
        batch=s.batch,
        label="instruct",
    )
    instruct.save_pretrained(out / "instruct")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # one bar per save/load would drown the log
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def run(args: argparse.Namespace) -> dict:
    s = QUICK if args.quick else DEMO if args.demo else Settings()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_all(out, args.seed, s)
    for name in ("base", "sft", "rl", "instruct"):
        toy_tokenizer().save_pretrained(out / name)
    train_seconds = time.perf_counter() - started

    problems, strings = eval_problems(s.eval_size), eval_strings(s.eval_size)

    def scores(model: LlamaForCausalLM) -> dict[str, float]:
        return {
            "addition": addition_accuracy(model, problems),
            "reversal": reversal_accuracy(model, strings),
        }

    models = {name: scores(load_model(out / name)) for name in ("base", "sft", "rl", "instruct")}
    print("[rvhub] v = rl − sft; instruct + α·v")
    extract_and_save(out / "rl", out / "sft", out / "vector")
    transfer = [
        {"alpha": alpha, **scores(instruct_plus(out / "instruct", out / "vector", alpha))}
        for alpha in ALPHAS
    ]
    print(f"[rvhub eval] the same sweep through lm-evaluation-harness (task {LM_EVAL_TASK})")
    sweep = lm_eval_sweep(out, len(problems))
    results = {
        "task": TASK_NAME,
        "metric": "greedy exact-match accuracy",
        "eval_size": len(problems),
        "seed": args.seed,
        "quick": args.quick,
        "settings": asdict(s),
        "models": models,
        "transfer": transfer,
        "transfer_lm_eval": sweep,
        "train_seconds": round(train_seconds, 1),
    }

    print(f"\nheld-out greedy exact match, {len(problems)} problems per task")
    print(f"  {'model':<16}{'addition':>9}{'reversal':>10}")
    for name, acc in models.items():
        print(f"  {name:<16}{acc['addition']:>9.3f}{acc['reversal']:>10.3f}")
    lm_eval_at = {row["alpha"]: row["addition"] for row in sweep}
    print(f"  {'':<16}{'':>9}{'':>10}  addition via rvhub eval (lm-eval)")
    for row in transfer:
        label = f"instruct{row['alpha']:+.1f}·v"
        print(
            f"  {label:<16}{row['addition']:>9.3f}{row['reversal']:>10.3f}"
            f"  {lm_eval_at[row['alpha']]:.3f}"
        )
    plot(results, out / "accuracy_vs_alpha.png")
    render_scores_card(out / "vector", card_scores(results), out / "eval")
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"done in {results['total_seconds']:.0f}s (training {train_seconds:.0f}s); see {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
