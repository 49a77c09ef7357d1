"""The toy transfer example (examples/toy_transfer) end to end, shortened with --quick."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from rvhub import load_vector

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "toy_transfer" / "toy_transfer.py"
ALPHAS = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
MODELS = ("base", "sft", "rl", "instruct")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy-transfer")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_toy_transfer_writes_models_vector_plot_and_card(quick_run: Path) -> None:
    for name in MODELS:
        assert (quick_run / name / "config.json").is_file()
        assert (quick_run / name / "model.safetensors").is_file()
    assert (quick_run / "vector" / "rvhub.json").is_file()
    assert (quick_run / "vector" / "vector.safetensors").is_file()
    assert (quick_run / "accuracy_vs_alpha.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (quick_run / "card" / "README.md").read_text().startswith("---")


def test_toy_transfer_reports_accuracy_for_every_alpha(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    assert [row["alpha"] for row in results["transfer"]] == ALPHAS
    for row in results["transfer"]:
        assert 0.0 <= row["addition"] <= 1.0
        assert 0.0 <= row["reversal"] <= 1.0
    for name in MODELS:
        assert 0.0 <= results["models"][name]["addition"] <= 1.0


def test_toy_transfer_alpha_zero_reproduces_the_instruct_model(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    at_zero = next(row for row in results["transfer"] if row["alpha"] == 0.0)
    instruct = results["models"]["instruct"]
    assert at_zero["addition"] == instruct["addition"]
    assert at_zero["reversal"] == instruct["reversal"]

    model = LlamaForCausalLM.from_pretrained(str(quick_run / "instruct"), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_vector(str(quick_run / "vector")).apply_to(model, scale=0.0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_toy_transfer_card_scores_are_the_measured_ones(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    by_alpha = {row["alpha"]: row["addition"] for row in results["transfer"]}
    bench = yaml.safe_load((quick_run / "scores.yaml").read_text())["benchmarks"][0]
    assert bench["baseline"] == by_alpha[0.0]
    assert bench["plus_vector"] == by_alpha[1.0]
    assert bench["minus_vector"] == by_alpha[-1.0]


def test_toy_transfer_sweep_through_lm_eval_matches_its_own_evaluation(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    own = {row["alpha"]: row["addition"] for row in results["transfer"]}
    via_lm_eval = {row["alpha"]: row["addition"] for row in results["transfer_lm_eval"]}
    assert list(via_lm_eval) == ALPHAS
    # lm-eval generates with a KV cache, the script without: allow one problem in 100 to flip
    for alpha in ALPHAS:
        assert abs(via_lm_eval[alpha] - own[alpha]) <= 0.01, alpha
    sweep = json.loads((quick_run / "eval" / "sweep.json").read_text())
    assert sweep["scales"] == ALPHAS and sweep["tasks"] == ["toy_addition"]
    assert "## Score against α" in (quick_run / "card" / "README.md").read_text()


def test_toy_task_data_is_the_scripts_held_out_set() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    import toy_transfer

    shipped = (SCRIPT.parent / "task" / "addition.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in shipped] == toy_transfer.task_rows()


TWO_SKILLS = SCRIPT.with_name("two_skills.py")


def test_two_skills_reports_each_vector_their_sum_and_ties(tmp_path: Path) -> None:
    """examples/toy_transfer/two_skills.py --quick: two vectors with different B's and one
    base, merged by rvhub (which mergekit, with one base_model, cannot express); every row
    of the table measured on both skills, twice the same numbers for one seed."""
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        proc = subprocess.run(
            [sys.executable, str(TWO_SKILLS), "--quick", "--out", str(out)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs.append(json.loads((out / "results.json").read_text()))
    rows = runs[0]["instruct_plus"]
    assert [r["model"] for r in rows] == [
        "instruct", "+ v_add", "+ v_max", "+ v_add + v_max (sum)",
        "+ TIES(v_add, v_max), density 0.5", "+ TIES(v_add, v_max), density 1",
    ]  # fmt: skip
    for row in rows:
        assert all(0.0 <= row[k] <= 1.0 for k in ("addition", "max", "reversal"))
    assert runs[0]["instruct_plus"] == runs[1]["instruct_plus"]  # deterministic for a seed
    merged = load_vector(tmp_path / "run0" / "v-ties-0.5")
    record = json.loads((tmp_path / "run0" / "v-ties-0.5" / "rvhub.json").read_text())
    assert record["merge"]["method"] == "ties" and record["merge"]["density"] == [0.5, 0.5]
    sources = [t["sources"]["b"]["path"] for t in record["combination"]]
    assert sources[0] != sources[1] and all(s.endswith(("sft-add", "sft-max")) for s in sources)
    assert len(merged) > 0
