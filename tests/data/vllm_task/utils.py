"""The toy transfer's held-out additions (examples/toy_transfer/task/addition.jsonl)."""

from pathlib import Path

import datasets


def load_addition(**kwargs):  # lm-eval passes the task's metadata as keyword arguments
    data = Path(__file__).resolve().parents[3] / "examples/toy_transfer/task/addition.jsonl"
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(data))})
