"""Two skills, two vectors, one instruct model: each vector alone, their plain sum, and TIES.

    python examples/toy_transfer/two_skills.py --out two-skills-out [--seed 0] [--quick]

The toy of toy_transfer.py with a second skill. One *base* is pretrained on the careless
writers' noisy text of two kinds: 2-digit additions (carries mishandled, as in
toy_transfer.py) and "max" problems (``"37>52="`` → ``"52<eos>"``; the writers often compare
the units digits instead of the tens). From the base grow two branches, each made the same
way: SFT on that skill's demonstrations, then GRPO with an exact-match reward on it:

* ``v_add = rl_add − sft_add`` and ``v_max = rl_max − sft_max``: two vectors with different
  B's and one lineage root (the base), so rvhub merges them (mergekit, which takes one
  ``base_model`` for every input, cannot express this merge);
* ``instruct``: the base tuned on digit-string reversal, as in toy_transfer.py.

The instruct model gets each vector alone, their plain sum ``v_add + v_max``, and
``rvhub merge --method ties`` of the two (mergekit's defaults: weights 1, normalize; density
0.5, and density 1 for sign election alone). Each row reports greedy exact-match accuracy on
1000 held-out problems of each skill (and reversal, the instruct model's own task), whatever
it shows; ``results.json`` holds the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_transfer as toy

EVAL_SEED = toy.EVAL_SEED + 7  # the max problems' held-out set (never depends on --seed)
MAX_LEN = 3  # two digits, then <eos>


def max_prompt(a: int, b: int) -> list[int]:
    return [toy.BOS, *toy.encode(f"{a:02d}>{b:02d}=")]


def max_answer(n: int) -> list[int]:
    return [*toy.encode(f"{n:02d}"), toy.EOS]


def careless_max(a: int, b: int) -> int:
    """The larger by the units digit (the first on a tie): right only when it agrees."""
    return a if a % 10 >= b % 10 else b


def max_eval_problems(n: int = toy.EVAL_SIZE) -> list[tuple[int, int]]:
    rng = random.Random(EVAL_SEED)
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < toy.EVAL_SIZE:
        a, b = rng.randrange(100), rng.randrange(100)
        if a // 10 != b // 10 or a % 10 != b % 10:
            pairs[(a, b)] = None
    return list(pairs)[:n]


MAX_HELD_OUT = frozenset(max_eval_problems())


def max_train_pair(rng: random.Random) -> tuple[int, int]:
    while True:
        pair = (rng.randrange(100), rng.randrange(100))
        if pair not in MAX_HELD_OUT:
            return pair


def written_max(a: int, b: int, rng: random.Random, s: toy.Settings) -> int:
    return careless_max(a, b) if rng.random() < s.writer_forget else max(a, b)


def max_batch(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = torch.tensor([max_prompt(a, b) for a, b in pairs])
    answers = torch.tensor([max_answer(max(a, b)) for a, b in pairs])
    return prompts, answers


def max_problems(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return max_batch([max_train_pair(rng) for _ in range(n)])


def max_accuracy(model: torch.nn.Module, pairs: list[tuple[int, int]]) -> float:
    model.eval()
    prompts, answers = max_batch(pairs)
    completions = toy.generate(model, prompts, MAX_LEN)
    return int(toy.exact_match(completions, answers).sum()) / len(pairs)


# -- data streams -----------------------------------------------------------------------------
def pretraining_stream(rng: random.Random, s: toy.Settings):
    """The writers' noisy text: additions, max problems and digit strings."""
    additions = toy.pretraining_stream(rng, s)
    while True:
        if rng.random() < 0.5:
            yield next(additions)
        else:
            a, b = max_train_pair(rng)
            answer = written_max(a, b, rng, s)
            if rng.random() < s.base_noise:
                answer = rng.randrange(100)
            yield max_prompt(a, b), max_answer(answer)


def max_demonstrations(rng: random.Random, s: toy.Settings):
    while True:
        a, b = max_train_pair(rng)
        yield max_prompt(a, b), max_answer(written_max(a, b, rng, s))


def instruct_stream(rng: random.Random, s: toy.Settings):
    replay = pretraining_stream(rng, s)
    while True:
        if rng.random() < s.instruct_replay:
            yield next(replay)
        else:
            text = toy.digit_string(rng, toy.REV_LEN)
            yield toy.reversal_prompt(text), toy.reversal_answer(text)


# -- training ---------------------------------------------------------------------------------
SKILLS = {
    "add": (toy.demonstration_stream, toy.addition_problems, toy.ANSWER_LEN),
    "max": (max_demonstrations, max_problems, MAX_LEN),
}


def train_all(out: Path, seed: int, s: toy.Settings) -> None:
    def start(stage: int) -> random.Random:
        torch.manual_seed(seed * 100 + stage)
        return random.Random(seed * 100 + stage)

    def supervised(model, stream, steps, lr, label):
        toy.supervised_train(model, stream, steps=steps, lr=lr, batch=s.batch, label=label)

    print(f"[base] pretraining on noisy additions, max problems and digit text ({s.base_steps})")
    rng = start(1)  # seeds torch before the model's initialisation
    base = toy.new_model(s)
    supervised(base, pretraining_stream(rng, s), s.base_steps, s.base_lr, "base")
    base.save_pretrained(out / "base")
    for k, (name, (demos, problems, answer_len)) in enumerate(SKILLS.items()):
        print(f"[{name}] SFT ({s.sft_steps} steps), then GRPO ({s.rl_steps} steps)")
        sft = toy.load_model(out / "base")
        supervised(sft, demos(start(10 + k), s), s.sft_steps, s.sft_lr, f"sft-{name}")
        sft.save_pretrained(out / f"sft-{name}")
        rl = toy.load_model(out / f"sft-{name}")
        toy.grpo_train(rl, start(20 + k), seed * 100 + 20 + k, s, problems, answer_len)
        rl.save_pretrained(out / f"rl-{name}")
    print(f"[instruct] base tuned on digit-string reversal ({s.instruct_steps} steps)")
    instruct = toy.load_model(out / "base")
    supervised(instruct, instruct_stream(start(4), s), s.instruct_steps, s.instruct_lr, "instruct")
    instruct.save_pretrained(out / "instruct")


# -- the comparison ---------------------------------------------------------------------------
def combinations(out: Path):
    """(label, vector or None, the rvhub command that makes it) for each row of the table."""
    from rvhub import extract_vector, load_vector, merge_vectors

    vectors = {}
    for name in SKILLS:
        path = out / f"v-{name}"
        extract_vector(str(out / f"rl-{name}"), str(out / f"sft-{name}")).save(
            str(path), overwrite=True
        )
        vectors[name] = load_vector(str(path))
    v_add, v_max = vectors["add"], vectors["max"]
    rows = [
        ("instruct", None, ""),
        ("+ v_add", v_add, "rvhub extract rl-add sft-add -o v-add"),
        ("+ v_max", v_max, "rvhub extract rl-max sft-max -o v-max"),
        ("+ v_add + v_max (sum)", v_add + v_max, "rvhub merge v-add v-max --method linear"),
    ]
    for density in (0.5, 1.0):
        merged = merge_vectors([v_add, v_max], method="ties", density=density)
        path = merged.save(str(out / f"v-ties-{density:g}"), overwrite=True)
        rows.append(
            (
                f"+ TIES(v_add, v_max), density {density:g}",
                load_vector(str(path)),
                f"rvhub merge v-add v-max --method ties --density {density:g}",
            )
        )
    return rows


def evaluate(out: Path, n: int) -> list[dict]:
    additions, maxes = toy.eval_problems(n), max_eval_problems(n)
    strings = toy.eval_strings(n)
    table = []
    for label, vector, command in combinations(out):
        model = toy.load_model(out / "instruct")
        if vector is not None:
            vector.apply_to(model, scale=1.0)
        row = {
            "model": label,
            "addition": toy.addition_accuracy(model, additions),
            "max": max_accuracy(model, maxes),
            "reversal": toy.reversal_accuracy(model, strings),
            "command": command,
        }
        print(f"  {label:<34}{row['addition']:>9.3f}{row['max']:>7.3f}{row['reversal']:>10.3f}")
        table.append(row)
    return table


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("two-skills-out"), help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="training seed (not the eval sets')")
    ap.add_argument("--quick", action="store_true", help="tiny settings: seconds, for tests")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="change one of the settings (toy_transfer.Settings), e.g. --set rl_steps=200",
    )  # fmt: skip
    return ap.parse_args(argv)


# The demo size of toy_transfer.py, with longer pretraining, SFT and RL for two skills (1500
# base steps and 80 RL steps left the addition RL unable to improve on its SFT model; see
# examples/toy_transfer/README.md).
SETTINGS = replace(toy.DEMO, base_steps=2000, sft_steps=150, rl_steps=160)


def main(argv=None) -> dict:
    args = parse_args(argv)
    s = toy.QUICK if args.quick else SETTINGS
    for item in args.set:
        name, _, value = item.partition("=")
        s = replace(s, **{name: type(getattr(s, name))(value)})
    torch.set_num_threads(args.threads)
    toy.hf_logging.disable_progress_bar()  # one bar per load would drown the table
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_all(out, args.seed, s)
    models = {}
    for name in ("base", "sft-add", "rl-add", "sft-max", "rl-max", "instruct"):
        model = toy.load_model(out / name)
        models[name] = {
            "addition": toy.addition_accuracy(model, toy.eval_problems(s.eval_size)),
            "max": max_accuracy(model, max_eval_problems(s.eval_size)),
        }
    print(f"\nheld-out greedy exact match, {s.eval_size} problems per skill")
    print(f"  {'model':<34}{'addition':>9}{'max':>7}{'reversal':>10}")
    table = evaluate(out, s.eval_size)
    results = {
        "seed": args.seed,
        "quick": args.quick,
        "eval_size": s.eval_size,
        "settings": asdict(s),
        "models": models,
        "instruct_plus": table,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("the models alone: " + ", ".join(
        f"{k} {v['addition']:.3f}/{v['max']:.3f}" for k, v in models.items()
    ))  # fmt: skip
    print(f"done in {results['seconds']:.0f}s; see {out}/results.json")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
