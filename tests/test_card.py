"""Model cards: Hub metadata checked by huggingface_hub's own classes, score import, templates."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from rvhub import InputError, extract_vector
from rvhub.card import PLOT_NAME, load_scores, render_card
from tests.cli_helpers import assert_clean_failure, run

SCORES = """\
target: Qwen/Qwen2.5-1.5B-Instruct
scale: 1.0
benchmarks:
  - task: gsm8k
    dataset: {id: openai/gsm8k, name: GSM8K, config: main, split: test}
    metric: {type: exact_match, name: exact match}
    baseline: 62.1
    plus_vector: 67.0
    minus_vector: 50.3
    stderr: {baseline: 1.3, plus_vector: 1.2}
  - task: math500
    dataset: {id: HuggingFaceH4/MATH-500, split: test}
    metric: {type: accuracy}
    baseline: 30.2
    plus_vector: 34.8
"""


def lm_eval_results(gsm8k: float, mmlu: float, model: str = "Qwen/Qwen2.5-1.5B-Instruct") -> dict:
    """The shape `lm_eval --output_path` writes (v0.4): a plain task, and a group with subtasks."""
    return {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": gsm8k,
                "exact_match_stderr,strict-match": 0.0133,
                "exact_match,flexible-extract": gsm8k + 0.01,
                "exact_match_stderr,flexible-extract": 0.0132,
            },
            "mmlu": {"acc,none": mmlu, "acc_stderr,none": 0.0038, "alias": "mmlu"},
            "mmlu_humanities": {
                "acc,none": 0.5,
                "acc_stderr,none": "N/A",
                "alias": " - humanities",
            },
        },
        "groups": {"mmlu": {"acc,none": mmlu, "acc_stderr,none": 0.0038, "alias": "mmlu"}},
        "group_subtasks": {"mmlu_humanities": [], "mmlu": ["mmlu_humanities"], "gsm8k": []},
        "configs": {
            "gsm8k": {
                "task": "gsm8k",
                "dataset_path": "gsm8k",
                "dataset_name": "main",
                "training_split": "train",
                "test_split": "test",
                "output_type": "generate_until",
            }
        },
        "versions": {"gsm8k": 3.0, "mmlu": 2},
        "n-shot": {"gsm8k": 5, "mmlu": 0},
        "higher_is_better": {"gsm8k": {"exact_match": True}},
        "config": {"model": "hf", "model_args": f"pretrained={model},dtype=bfloat16"},
        "model_name": model,
    }


@pytest.fixture(scope="module")
def vec(family, tmp_path_factory):
    fam = family("qwen2")
    folder = extract_vector(fam["a"], fam["b"]).save(tmp_path_factory.mktemp("card") / "vec")
    # Sources as the Hub would record them (the manifest's own hash is not part of its files).
    manifest = json.loads((folder / "rvhub.json").read_text())
    manifest["sources"] = {
        "a": {"kind": "hub", "repo_id": "org/qwen-grpo", "revision": "a" * 40},
        "b": {"kind": "hub", "repo_id": "org/qwen-sft", "revision": "b" * 40},
    }
    manifest["base_model"] = {"id": "org/qwen-base", "from": "hub"}  # their shared root
    (folder / "rvhub.json").write_text(json.dumps(manifest))
    return folder


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


def test_default_card_metadata_is_what_the_hub_reads(vec, tmp_path):
    scores = load_scores([_write(tmp_path, "scores.yaml", SCORES)])
    card = render_card(vec, repo_id="alice/qwen-reasoning", scores=scores, license="apache-2.0")

    parsed = ModelCard(card.text)  # huggingface_hub's parser, metadata errors raise
    data: ModelCardData = parsed.data
    results = data.eval_results

    assert data.library_name == "rvhub"
    assert data.tags == ["rvhub", "reasoning-vector", "task-arithmetic", "dense"]
    # the lineage root, one id, as an adapter: the vector sits in the tree of the base its
    # targets descend from (issue 29); A and B are named in the body
    assert data.base_model == "org/qwen-base" and data.base_model_relation == "adapter"
    assert "org/qwen-grpo" in card.text.split("---", 2)[2] and "org/qwen-sft" in card.text
    assert data.license == "apache-2.0"
    assert data.model_name == "qwen-reasoning"
    assert [(r.dataset_type, r.metric_name, r.metric_value) for r in results] == [
        ("openai/gsm8k", "exact match (baseline)", 62.1),
        ("openai/gsm8k", "exact match (+vector)", 67.0),
        ("openai/gsm8k", "exact match (-vector)", 50.3),
        ("HuggingFaceH4/MATH-500", "accuracy (baseline)", 30.2),
        ("HuggingFaceH4/MATH-500", "accuracy (+vector)", 34.8),
    ]
    gsm8k = results[0]
    assert (gsm8k.task_type, gsm8k.dataset_name, gsm8k.dataset_config, gsm8k.dataset_split) == (
        "text-generation",
        "GSM8K",
        "main",
        "test",
    )
    assert gsm8k.metric_type == "exact_match"
    # the body: sources at their revisions, the scores table, usage, compression, plot, hashes
    body = parsed.text
    assert "[org/qwen-grpo](https://huggingface.co/org/qwen-grpo)" in body and "a" * 40 in body
    assert "| GSM8K | exact match | 62.1 ± 1.3 | 67.0 ± 1.2 | 50.3 | +4.9 | −11.8 |" in body
    assert "| math500 | accuracy | 30.2 | 34.8 | – | +4.6 | – |" in body
    assert "rvhub apply alice/qwen-reasoning Qwen/Qwen2.5-1.5B-Instruct" in body
    assert 'load_vector("alice/qwen-reasoning")' in body
    assert "PeftModel" not in body  # dense: no PEFT section
    assert "## Compression" in body and f"![‖v‖ per layer]({PLOT_NAME})" in body
    manifest = json.loads((vec / "rvhub.json").read_text())
    assert manifest["files"]["vector.safetensors"]["blake3"] in body
    assert card.plot_png is not None and card.plot_png.startswith(b"\x89PNG")
    assert (
        render_card(vec, repo_id="alice/qwen-reasoning", scores=scores, license="apache-2.0")
        == card
    )


def test_lm_eval_results_are_read_directly(tmp_path):
    path = _write(tmp_path, "base.json", lm_eval_results(0.621, 0.601))

    scores = load_scores(lm_eval={"baseline": path})

    rows = {(b.task, b.metric_name): b for b in scores.benchmarks}
    assert sorted(rows) == [
        ("gsm8k", "exact_match (flexible-extract)"),
        ("gsm8k", "exact_match (strict-match)"),
        ("mmlu", "acc"),  # the group's row; its subtasks are left out
    ]
    strict = rows["gsm8k", "exact_match (strict-match)"]
    assert strict.values == {"baseline": 0.621} and strict.stderr == {"baseline": 0.0133}
    assert (strict.dataset_id, strict.dataset_config, strict.dataset_split) == (
        "gsm8k",
        "main",
        "test",
    )
    assert strict.dataset_args == {"num_few_shot": 5}
    assert scores.target == "Qwen/Qwen2.5-1.5B-Instruct"


def test_several_score_files_combine_into_one_table(vec, tmp_path):
    base = _write(tmp_path, "base.json", lm_eval_results(0.62, 0.60))
    plus = _write(tmp_path, "plus.json", lm_eval_results(0.67, 0.61, model="./plus"))
    minus = _write(tmp_path, "minus.json", lm_eval_results(0.50, 0.55, model="./minus"))
    extra = _write(tmp_path, "scores.yaml", SCORES)
    out = tmp_path / "card" / "README.md"
    out.parent.mkdir()

    r = run(
        "card", vec, "-o", out, "--repo-id", "alice/v", "--scores", extra,
        "--lm-eval", f"baseline={base}", "--lm-eval", f"plus={plus}", "--lm-eval", f"minus={minus}",
    )  # fmt: skip

    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out}, {out.parent / PLOT_NAME}, ")
    # every score also goes to the Hub's .eval_results/<task>.yaml, one entry per condition
    from huggingface_hub import parse_eval_result_entries

    written = sorted((out.parent / ".eval_results").glob("*.yaml"))
    assert r.output.count(".eval_results/") == len(written) > 0
    entries = [e for p in written for e in parse_eval_result_entries(yaml.safe_load(p.read_text()))]
    assert len(entries) == 3 * 3 + 5
    assert {e.notes for e in entries if e.task_id == "mmlu"} == {
        f"acc: Qwen/Qwen2.5-1.5B-Instruct {c}" for c in ("alone", "+ 1·v", "− 1·v")
    }  # fmt: skip
    card = ModelCard.load(out)
    mmlu = [e for e in card.data.eval_results if e.dataset_type == "mmlu"]
    assert [(e.metric_name, e.metric_value) for e in mmlu] == [
        ("acc (baseline)", 0.60),
        ("acc (+vector)", 0.61),
        ("acc (-vector)", 0.55),
    ]
    assert len(card.data.eval_results) == 3 * 3 + 5  # 3 lm-eval rows × 3 conditions + the YAML's
    assert (
        "| mmlu | acc | 0.6 ± 0.0038 | 0.61 ± 0.0038 | 0.55 ± 0.0038 | +0.01 | −0.05 |" in card.text
    )
    assert (out.parent / PLOT_NAME).read_bytes().startswith(b"\x89PNG")

    twice = run("card", vec, "-o", out, "--lm-eval", f"plus={base}", "--lm-eval", f"plus={plus}")
    assert_clean_failure(
        twice, match="gsm8k exact_match (strict-match): the +vector score is given twice"
    )
    wrong = run("card", vec, "-o", out, "--lm-eval", f"plsu={plus}")
    assert_clean_failure(wrong, match="--lm-eval: unknown condition 'plsu'")


def test_user_template_renders_in_a_sandbox(vec, tmp_path):
    body_only = _write(
        tmp_path,
        "body.md.j2",
        "# {{ name }} for {{ model_type }}\n{% for s in sources %}- {{ s.repo_id }}@{{ s.revision[:7] }}\n{% endfor %}",
    )
    own_meta = _write(
        tmp_path,
        "meta.md.j2",
        "---\n{{ metadata_yaml }}extra: yes\n---\nnorm {{ norm | num(3) }}\n",
    )

    with_ours = render_card(vec, repo_id="alice/v", template=body_only)
    with_theirs = render_card(vec, repo_id="alice/v", template=own_meta)

    assert with_ours.text.endswith(
        "# v for qwen2\n- org/qwen-grpo@aaaaaaa\n- org/qwen-sft@bbbbbbb\n"
    )
    assert ModelCard(with_ours.text).data.library_name == "rvhub"
    assert ModelCard(with_theirs.text).data.to_dict()["extra"] is True
    assert with_theirs.text.endswith("norm 0.342\n")


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("ok\n{{ ''.__class__.__mro__[1].__subclasses__() }}\n", "line 2: refused by the sandbox"),
        ("{{ name.__class__ }}", "line 1: refused by the sandbox"),
        ("a\nb\n{% if name %}\n", "line 3: Unexpected end of template"),
        ("{{ no_such_variable }}", "line 1: 'no_such_variable' is undefined"),
    ],
)
def test_template_errors_are_one_line_naming_the_line(vec, tmp_path, template, match):
    path = _write(tmp_path, "bad.md.j2", template)
    out = tmp_path / "README.md"

    r = run("card", vec, "-o", out, "--template", path)

    line = assert_clean_failure(r, match=match)
    assert str(path) in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            SCORES.replace("plus_vector: 67.0", "plus_vectr: 67.0"),
            "benchmarks[0] (gsm8k): unknown key 'plus_vectr' (did you mean 'plus_vector'?)",
        ),
        (
            SCORES.replace("metric: {type: accuracy}", "metric: {typ: accuracy}"),
            "benchmarks[1] (math500): metric: unknown key 'typ' (did you mean 'type'?)",
        ),
        (
            SCORES.replace("baseline: 62.1", "baseline: 62.1%"),
            "benchmarks[0] (gsm8k): baseline must be a finite number, not '62.1%'",
        ),
        (SCORES.replace("target:", "targte:"), "unknown key 'targte' (did you mean 'target'?)"),
        ("benchmarks:\n  - task: x\n    metric: {type: acc}\n", "benchmarks[0] (x): no score"),
        ("benchmarks: [\n", "line 2: not valid YAML"),
    ],
)
def test_scores_file_mistakes_are_one_line(vec, tmp_path, text, match):
    path = _write(tmp_path, "scores.yaml", text)
    r = run("card", vec, "-o", tmp_path / "README.md", "--scores", path)
    assert_clean_failure(r, match=match)


def test_lm_eval_file_passed_as_scores_says_what_to_do(tmp_path):
    path = _write(tmp_path, "results.json", lm_eval_results(0.5, 0.5))
    with pytest.raises(
        InputError, match="looks like lm-evaluation-harness output; pass it as `lm_eval`"
    ):
        load_scores([path])


def test_license_is_carried_from_local_sources(family, tmp_path):
    fam = family("llama")
    a, b = tmp_path / "a", tmp_path / "b"
    for src, dst in ((fam["a"], a), (fam["b"], b)):
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        (dst / "README.md").write_text("---\nlicense: llama3.1\n---\n")
    folder = extract_vector(a, b).save(tmp_path / "vec")

    same = render_card(folder).metadata
    (b / "README.md").write_text("---\nlicense: mit\n---\n")
    differ = render_card(folder).metadata

    assert same["license"] == "llama3.1"
    assert "license" not in differ
    assert "base_model" not in same  # local sources are not Hub ids


def test_card_without_matplotlib_has_no_plot(vec, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` raises ImportError
    card = render_card(vec, repo_id="alice/v")
    assert card.plot_png is None and PLOT_NAME not in card.text
    assert list(card.files) == ["README.md"]
    assert yaml.safe_load(card.text.split("---")[1])["library_name"] == "rvhub"
