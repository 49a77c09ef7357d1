"""`rvhub eval`: an α sweep through the real lm-evaluation-harness on tiny real models, with the
toy transfer's own lm-eval task (examples/toy_transfer/task: local JSON data, no download)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, parse_eval_result_entries

from rvhub import extract_vector, load_vector
from rvhub.card.scores import parse_lm_eval
from rvhub.checkpoint import open_local_checkpoint
from rvhub.ops.live import FileScaleSwitch, ScaleSwitch
from rvhub.options import ApplyOptions
from tests.cli_helpers import assert_clean_failure, run
from tests.models import finetune_like, state_dict_of

pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "examples" / "toy_transfer" / "task"
sys.path.insert(0, str(TASK_DIR.parent))
import toy_transfer  # noqa: E402  (the example's tokenizer and model)

SCALES = [-1.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A toy-vocabulary Llama family (A, B, target) with its tokenizer, and v = A − B."""
    root = tmp_path_factory.mktemp("eval-toy")
    paths = {}
    for role, seed in (("a", 1), ("b", 2), ("target", 3)):
        torch.manual_seed(0)
        model = toy_transfer.new_model(toy_transfer.QUICK)
        finetune_like(model, seed, scale=0.2)
        model.save_pretrained(root / role)
        toy_transfer.toy_tokenizer().save_pretrained(root / role)
        paths[role] = root / role
    paths["vec"] = extract_vector(paths["a"], paths["b"]).save(root / "vec")
    return paths


@pytest.fixture(scope="module")
def sweep_dir(toy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "eval-out"
    result = run(
        "eval", toy["vec"], toy["target"], "--tasks", "toy_addition", "--include-path",
        TASK_DIR, "--scales", "-1,0,1", "--limit", "24", "--batch-size", "8", "-o", out,
        "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "α = -1: toy_addition exact_match" in result.output
    assert "best α for toy_addition exact_match" in result.output
    return out


def test_eval_writes_lm_eval_results_per_alpha_sweep_json_and_plot(sweep_dir: Path) -> None:
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["format"] == "rvhub.eval-sweep" and summary["scales"] == SCALES
    assert summary["tasks"] == ["toy_addition"]
    assert summary["vector"]["kind"] == "local" and summary["vector"]["files_digest"]
    assert summary["target"]["name"].endswith("target")
    (metric,) = summary["metrics"]  # exact_match only: no sample_len/name/alias rows
    assert (metric["task"], metric["metric"], metric["dataset_id"]) == (
        "toy_addition", "exact_match", "toy_addition",
    )  # fmt: skip
    assert [p["scale"] for p in metric["points"]] == SCALES
    for point in summary["points"]:
        results = json.loads((sweep_dir / point["results"]).read_text())
        # lm-eval's own results dict, unchanged: its keys, its numbers
        assert {"results", "configs", "versions", "n-samples", "config"} <= results.keys()
        value = results["results"]["toy_addition"]["exact_match,none"]
        row = next(p for p in metric["points"] if p["scale"] == point["scale"])
        assert row["value"] == value and row["n"] == 24
    assert metric["baseline"] == metric["points"][1]["value"]
    best = max(metric["points"], key=lambda p: (p["value"], -abs(p["scale"])))
    assert metric["best"] == {"scale": best["scale"], "value": best["value"]}
    assert (sweep_dir / "eval_sweep.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("way", ["cached", "host", "files"])
def test_every_alpha_of_a_sweep_is_bit_identical_to_on_disk_apply(family, tmp_path, way) -> None:
    """Each way of switching α: the pristine θ and the deltas kept (cached), the pristine θ
    kept in host memory and v re-read (host: a model with no files), θ re-read from the
    target's files (files: what `rvhub eval` does for a model loaded from a folder)."""
    fam = family("qwen2")  # bf16: α = 0.5 and 1.5 round, so accumulated differences would show
    vec = load_vector(extract_vector(fam["a"], fam["b"]).save(tmp_path / "vec"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.bfloat16)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    if way == "files":
        switch = FileScaleSwitch.open(
            vec.source, vec.facts(), model, open_local_checkpoint(fam["target"]), ApplyOptions()
        )
        assert switch is not None
    else:
        switch = ScaleSwitch(vec.source, vec.facts(), model, keep_deltas=way == "cached")
    for i, alpha in enumerate((1.5, -1.0, 0.5, 0.0, 1.0, 1.5)):
        switch.set_scale(alpha)
        out = tmp_path / f"disk{i}"
        assert run("apply", tmp_path / "vec", fam["target"], "-o", out, "-a", alpha).exit_code == 0
        disk = state_dict_of(out)
        live = model.state_dict()
        for name, tensor in disk.items():
            assert torch.equal(live[name], tensor), (alpha, name)
    switch.restore()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, pristine[name]), name


def test_file_switch_is_refused_when_the_model_is_not_what_its_files_hold(family, tmp_path):
    """θ is re-read from the files only when every touched tensor holds exactly the files'
    values in their dtype; a model changed after loading, or loaded in another dtype, keeps
    its own θ instead (ScaleSwitch) — never the files' θ silently."""
    from transformers import AutoModelForCausalLM

    fam = family("qwen2")
    vec = load_vector(extract_vector(fam["a"], fam["b"]).save(tmp_path / "vec"))
    ckpt = open_local_checkpoint(fam["target"])
    model = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    assert FileScaleSwitch.open(vec.source, vec.facts(), model, ckpt, ApplyOptions()) is None
    wider = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.float32)
    assert FileScaleSwitch.open(vec.source, vec.facts(), wider, ckpt, ApplyOptions()) is None


def test_card_eval_puts_the_sweep_in_the_card_and_eval_results(sweep_dir, toy, tmp_path) -> None:
    result = run("card", toy["vec"], "--eval", sweep_dir, "-o", tmp_path / "card" / "README.md")
    assert result.exit_code == 0, result.output
    card = ModelCard.load(tmp_path / "card" / "README.md")
    assert len(card.data.eval_results) == 3  # model-index: baseline, +v, −v at α = ±1
    assert "## Score against α" in card.text and "![score against α](eval_sweep.png)" in card.text
    import transformers

    assert f"on transformers {transformers.__version__}" in card.text  # the engine it ran on
    assert (tmp_path / "card" / "eval_sweep.png").is_file()
    data = yaml.safe_load((tmp_path / "card" / ".eval_results" / "toy_addition.yaml").read_text())
    entries = parse_eval_result_entries(data)
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    values = [p["value"] for p in summary["metrics"][0]["points"]]
    assert [e.value for e in entries] == values
    assert {e.dataset_id for e in entries} == {"toy_addition"}
    assert entries[0].notes.endswith("− 1·v (rvhub eval)") and "target" in entries[0].notes


@pytest.mark.hub
def test_push_eval_uploads_card_and_eval_results_in_one_commit(hub, monkeypatch, sweep_dir, toy):
    from huggingface_hub import HfApi, hf_hub_download, list_repo_files

    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo_id = hub.new_repo_id("evalvec")
    result = run("push", toy["vec"], repo_id, "--eval", sweep_dir)
    assert result.exit_code == 0, result.output
    commits = HfApi(token=hub.token).list_repo_commits(repo_id)
    assert len(commits) == 2  # the initial commit + one with everything
    files = set(list_repo_files(repo_id))
    assert {"README.md", "eval_sweep.png", ".eval_results/toy_addition.yaml"} <= files
    pulled = hf_hub_download(repo_id, ".eval_results/toy_addition.yaml")
    assert len(parse_eval_result_entries(yaml.safe_load(Path(pulled).read_text()))) == 3


def test_lm_eval_import_keeps_only_metrics_and_names_the_dataset(sweep_dir: Path) -> None:
    path = sweep_dir / "alpha_+0" / "results.json"
    data = json.loads(path.read_text())
    assert {"sample_len", "name", "alias"} <= data["results"]["toy_addition"].keys()
    scores = parse_lm_eval(path, "baseline")
    assert [b.metric_type for b in scores.benchmarks] == ["exact_match"]
    assert scores.benchmarks[0].dataset_id == "toy_addition"  # not "json", not a loader
    assert scores.target and scores.target.endswith("target")  # model_name is None in the file


def test_a_sweep_without_the_card_conditions_still_reaches_the_card(toy, tmp_path) -> None:
    """A sweep at α = 0.5 and 1.5 only (no α = 0 or ±1, so no baseline/± rows): the card
    still shows it and its .eval_results, with the lm-eval options it ran with."""
    out = tmp_path / "eval-out"
    result = run(
        "eval", toy["vec"], toy["target"], "--tasks", "toy_addition", "--include-path",
        TASK_DIR, "--scales", "0.5,1.5", "--limit", "8", "--batch-size", "8", "-o", out,
        "--device", "cpu", "--system-instruction", "Add the numbers.",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    card_dir = tmp_path / "card"
    assert run("card", toy["vec"], "--eval", out, "-o", card_dir / "README.md").exit_code == 0
    text = (card_dir / "README.md").read_text()
    assert "## Score against α" in text and "α = +0.5" in text and "α = +1.5" in text
    assert "(options: `system_instruction=Add the numbers.`)" in text
    data = yaml.safe_load((card_dir / ".eval_results" / "toy_addition.yaml").read_text())
    notes = sorted(e.notes for e in parse_eval_result_entries(data))
    assert len(notes) == 2 and "+ 0.5·v" in notes[0] and "+ 1.5·v" in notes[1], notes


def test_eval_refuses_bad_input_with_one_line(toy, tmp_path) -> None:
    base = ["eval", toy["vec"], toy["target"], "-o", tmp_path / "o", "--include-path", TASK_DIR]
    cases = [
        (["--tasks", "toy_additon", "--scales", "0"], "unknown lm-eval task 'toy_additon'"),
        (["--tasks", "toy_addition", "--scales", ""], "--scales is empty"),
        (["--tasks", "toy_addition", "--scales", "1,x"], "'x' is not a number"),
        (["--tasks", "toy_addition", "--scales", "1,1"], "given twice"),
        (["--tasks", " , ", "--scales", "1"], "--tasks is empty"),
        (["--tasks", "toy_addition", "--batch-size", "0"], "--batch-size"),
        # a later α too large is refused before the first point is evaluated
        (["--tasks", "toy_addition", "--scales", "1,1e6"], "would change the weights by"),
        # the engines' options
        (["--tasks", "toy_addition", "--tensor-parallel-size", "2"], "an option of --engine vllm"),
        (["--tasks", "toy_addition", "--max-model-len", "64"], "an option of --engine vllm"),
        (["--tasks", "toy_addition", "--vllm-switch", "in-place"], "an option of --engine vllm"),
        (["--tasks", "toy_addition", "--vllm-switch", "inplace"], "--vllm-switch"),
        (
            ["--tasks", "toy_addition", "--engine", "vllm", "--device", "cpu"],
            "options of --engine hf",
        ),
        (["--tasks", "toy_addition", "--fewshot-as-multiturn"], "needs `apply_chat_template`"),
        (
            ["--tasks", "toy_addition", "--model-args", "max_length"],
            "'max_length' is not key=value",
        ),
        (["--tasks", "toy_addition", "--model-args", "pretrained=x"], "may not set pretrained"),
        (
            ["--tasks", "toy_addition", "--engine", "vllm", "--model-args", "data_parallel_size=2"],
            "rvhub cannot set α",
        ),
        (
            ["--tasks", "toy_addition", "--engine", "vllm", "--model-args", "load_format=dummy"],
            "load_format='dummy'",
        ),
        (
            ["--tasks", "toy_addition", "--gpu-memory-utilization", "1.5"],
            "--gpu-memory-utilization",
        ),
    ]
    if importlib.util.find_spec("vllm") is None:  # the project's venv: vLLM lives in its own
        cases.append((["--tasks", "toy_addition", "--engine", "vllm"], "needs vLLM"))
    for extra, match in cases:
        assert_clean_failure(run(*base, *extra), match=match, output=tmp_path / "o", before=None)


def test_eval_without_lm_eval_names_the_extra(toy, tmp_path) -> None:
    code = (
        "import sys; sys.modules['lm_eval'] = None; from rvhub.cli import main; "
        f"main(['eval', {str(toy['vec'])!r}, {str(toy['target'])!r}, '--tasks', 'x', "
        f"'-o', {str(tmp_path / 'o')!r}])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "rvhub[eval]"' in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()
