"""Calibrate the lineage guard: how far do related and unrelated targets lie from a base?

    python benchmarks/lineage_calibration.py [--seeds 3] [--pretrain 400] [--finetune 400]

Trains tiny Qwen2 models (hidden 64, 2 layers) on CPU, as the real pipeline does at scale:
each *base* is pretrained from its own random init on one synthetic language (a random
Markov chain over 256 tokens); *fine-tunes* continue from a base on other languages with a
smaller learning rate. For every base it measures rvhub's lineage distance (``‖T − B‖/‖B‖``
over the fingerprinted matrix values, ``rvhub.lineage.compare``) from B = a fine-tune of the
base to targets that are:

- related: another fine-tune of the same base (other data, as many steps), and one trained
  twice as long with a 3× larger learning rate;
- unrelated: a fine-tune of a base pretrained the same way from another seed, and a fresh
  random init.

Prints every distance and, per kind, min / median / max next to the thresholds in
``rvhub.constants`` (LINEAGE_WARN, LINEAGE_REFUSE).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from rvhub.constants import LINEAGE_REFUSE, LINEAGE_WARN
from rvhub.lineage import Lineage, compare, sample_tensor

VOCAB, SEQ, BATCH = 256, 32, 16


def tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg)


def language(seed: int) -> torch.Tensor:
    """A random sparse Markov chain: each token has 4 likely successors."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((VOCAB, VOCAB), -8.0)
    succ = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)
    logits.scatter_(1, succ, 2.0)
    return torch.softmax(logits, dim=1)


def batch(chain: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    tok = torch.randint(0, VOCAB, (BATCH,), generator=g)
    out = [tok]
    for _ in range(SEQ - 1):
        tok = torch.multinomial(chain[tok], 1, generator=g).squeeze(1)
        out.append(tok)
    return torch.stack(out, 1)


def train(model: torch.nn.Module, chain: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids = batch(chain, g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def samples(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: sample_tensor(n, p) for n, p in model.state_dict().items()}


def distance(b: torch.nn.Module, target: torch.nn.Module) -> float:
    sb = samples(b)
    shapes = {n: tuple(p.shape) for n, p in b.state_dict().items()}
    report = compare(Lineage(a=sb, b=sb, shapes=shapes), samples(target))
    assert report.overall is not None
    return report.overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain", type=int, default=400)
    parser.add_argument("--finetune", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(2)
    kinds: dict[str, list[float]] = {
        "related: other fine-tune, same base": [],
        "related: 2x steps at 3x lr": [],
        "unrelated: other pretraining seed": [],
        "unrelated: fresh random init": [],
    }
    for s in range(args.seeds):
        base = tiny(seed=10 + s)
        train(base, language(1000), args.pretrain, 1e-3, seed=s)
        other_base = tiny(seed=50 + s)
        train(other_base, language(1000), args.pretrain, 1e-3, seed=100 + s)

        def finetune(model: torch.nn.Module, data: int, steps: int, lr: float) -> torch.nn.Module:
            out = copy.deepcopy(model)
            train(out, language(data), steps, lr, seed=data)
            return out

        b = finetune(base, 2000 + s, args.finetune, 1e-4)
        found = {
            "related: other fine-tune, same base": finetune(base, 3000 + s, args.finetune, 1e-4),
            "related: 2x steps at 3x lr": finetune(base, 4000 + s, 2 * args.finetune, 3e-4),
            "unrelated: other pretraining seed": finetune(
                other_base, 3000 + s, args.finetune, 1e-4
            ),
            "unrelated: fresh random init": tiny(seed=90 + s),
        }
        for kind, target in found.items():
            d = distance(b, target)
            kinds[kind].append(d)
            print(f"seed {s}  {kind:38s} {d:.4f}", flush=True)
    print(f"\nthresholds: warn above {LINEAGE_WARN}, refuse above {LINEAGE_REFUSE}")
    for kind, values in kinds.items():
        print(
            f"{kind:38s} min {min(values):.4f}  median {statistics.median(values):.4f}  "
            f"max {max(values):.4f}"
        )


if __name__ == "__main__":
    main()
