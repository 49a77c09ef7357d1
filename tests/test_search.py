"""Found by the people whose model it fits (issue 29): vectors pushed to the local Hub under
two lineages, dense and LoRA, with and without scores; `rvhub search --for MODEL` and
`search_vectors` find those of MODEL's lineage through the Hub's model listing (the stand-in's
`GET /api/models`, tests/hub_server/model_search.py), and check each from its rvhub.json and
lineage fingerprint only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from rvhub import extract_vector, search_vectors
from tests.cli_helpers import assert_clean_failure, run
from tests.models import build_model, finetune_like, save

pytestmark = [
    pytest.mark.hub,
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning"),
]


def _files(folder: Path, readme: str) -> dict[str, object]:
    return {**{p.name: p for p in folder.iterdir() if p.is_file()}, "README.md": readme}


def _family(root: Path, seed: int) -> dict[str, Path]:
    """A base and three fine-tunes of it (A, B, an instruct model), tiny Qwen2, bf16."""
    out = {}
    for i, role in enumerate(("base", "a", "b", "instruct")):
        model = build_model("qwen2", seed=seed)
        if role != "base":
            finetune_like(model, seed=seed * 10 + i)
        out[role] = save(model.to(torch.bfloat16), root / role)
    return out


def _lm_eval(path: Path, value: float) -> Path:
    path.write_text(
        json.dumps(
            {
                "results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": value}},
                "configs": {"gsm8k": {"dataset_path": "openai/gsm8k", "dataset_name": "main"}},
                "config": {"model": "hf", "model_args": "pretrained=org/instruct"},
            }
        )
    )
    return path


@pytest.fixture
def published(hub, tmp_path, monkeypatch):
    """Two lineages on the Hub: each a base, an instruct model declaring it, and vectors."""
    monkeypatch.setenv("HF_TOKEN", hub.token)
    ids: dict[str, str] = {}
    for n, seed in ((1, 0), (2, 42)):
        fam = _family(tmp_path / f"fam{n}", seed)
        base = ids[f"base{n}"] = hub.new_repo_id(f"base{n}", namespace="org")
        hub.seed_repo(base, _files(fam["base"], "---\nlicense: mit\n---\n"))
        instruct = ids[f"instruct{n}"] = hub.new_repo_id(f"instruct{n}", namespace="org")
        hub.seed_repo(instruct, _files(fam["instruct"], f"---\nbase_model: {base}\n---\n"))
        local = tmp_path / f"local-instruct{n}"
        shutil.copytree(fam["instruct"], local)
        (local / "README.md").write_text(f"---\nbase_model: {instruct}\n---\n")
        ids[f"local{n}"] = str(local)
        vec = extract_vector(fam["a"], fam["b"], base_model=base).save(tmp_path / f"vec{n}")
        ids[f"vec{n}"] = hub.new_repo_id(f"vector{n}")
        if n == 1:  # with scores: +4.5 points on gsm8k
            args = ["--lm-eval", f"baseline={_lm_eval(tmp_path / 'b.json', 0.50)}"]
            args += ["--lm-eval", f"plus={_lm_eval(tmp_path / 'p.json', 0.545)}"]
            assert run("push", vec, ids["vec1"], *args).exit_code == 0
            lora = tmp_path / "lora1"
            assert (
                run("compress", vec, "-o", lora, "--encoding", "lora", "--rank", "2").exit_code == 0
            )
            ids["lora1"] = hub.new_repo_id("vector1-lora")
            assert run("push", lora, ids["lora1"]).exit_code == 0
        else:
            assert run("push", vec, ids[f"vec{n}"]).exit_code == 0
    ids["plain"] = hub.new_repo_id("not-a-vector")  # a model declaring base1, not rvhub's
    hub.seed_repo(ids["plain"], _files(fam["a"], f"---\nbase_model: {ids['base1']}\n---\n"))
    return ids


def test_the_local_hub_lists_models_as_the_hub_does(published):
    api = HfApi()
    base1 = published["base1"]
    tagged = list(api.list_models(filter=f"base_model:adapter:{base1}", expand=["cardData"]))
    assert {m.id for m in tagged} == {published["vec1"], published["lora1"]}
    assert all(m.card_data.base_model == base1 for m in tagged)
    finetunes = {m.id for m in api.list_models(filter=f"base_model:finetune:{base1}")}
    assert finetunes == {published["instruct1"], published["plain"]}
    assert [m.id for m in api.list_models(search="vector1-lora")] == [published["lora1"]]
    licensed = list(api.list_models(author="org", filter="license:mit", expand=["tags"]))
    assert {published["base1"], published["base2"]} <= {m.id for m in licensed}
    assert all(m.id.startswith("org/") and "license:mit" in m.tags for m in licensed)
    assert published["instruct1"] not in {m.id for m in licensed}
    assert len(list(api.list_models(filter="rvhub", limit=2))) == 2
    info = api.model_info(published["vec1"], expand=["baseModels", "cardData"])
    assert info.base_models == {"relation": "adapter", "models": [{"id": base1}]}


@pytest.mark.parametrize("where", ["hub", "local"])
def test_search_finds_the_vectors_of_the_models_lineage(published, where):
    model = published["instruct1"] if where == "hub" else published["local1"]
    matches = {m.repo_id: m for m in search_vectors(model, task="gsm8k")}
    assert set(matches) == {published["vec1"], published["lora1"]}  # not lineage 2's, not plain
    top = search_vectors(model, task="gsm8k")[0]
    assert top.repo_id == published["vec1"] and top.delta("gsm8k") == pytest.approx(0.045)
    assert matches[published["lora1"]].encoding == "lora"
    assert (
        matches[published["vec1"]].size
        and matches[published["vec1"]].base_model == published["base1"]
    )
    if where == "local":  # shapes and lineage checked against the files here
        assert all(m.fits is True for m in matches.values()), matches
        assert "related" in matches[published["vec1"]].reason
    else:  # a Hub target not in the cache: its type only, said so
        assert all(m.fits is None for m in matches.values())
        assert "not checked" in matches[published["vec1"]].reason


def test_search_reads_manifests_and_fingerprints_never_weights(published, hub):
    hub.requests.clear()
    search_vectors(published["local1"])
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}
    assert fetched <= {"rvhub.json", "lineage.safetensors", "config.json"}, fetched
    assert "rvhub.json" in fetched


def test_search_cli_table_json_and_offline(published, monkeypatch):
    r = run("search", "--for", published["instruct2"])
    assert r.exit_code == 0, r.output + r.stderr
    assert published["vec2"] in r.output and published["vec1"] not in r.output
    header = r.output.splitlines()[0].split()
    assert header[:4] == ["vector", "revision", "encoding", "size"] and "downloads" in header
    j = run("search", "--for", published["instruct1"], "--task", "gsm8k", "--json")
    listed = json.loads(j.output)
    assert listed[0]["repo_id"] == published["vec1"]
    assert listed[0]["deltas"] == {"gsm8k exact_match (strict-match)": pytest.approx(0.045)}
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = run("search", "--for", published["instruct1"])
    assert_clean_failure(offline, match="searching needs the Hub")


def test_check_of_a_hub_vector_downloads_its_manifest_and_fingerprint_only(published, hub):
    hub.requests.clear()
    r = run("check", published["vec1"], published["local1"])
    assert r.exit_code == 0, r.output + r.stderr
    fetched = sorted(
        r.path.rsplit("/", 1)[-1]
        for r in hub.requests
        if "/resolve/" in r.path and r.method == "GET"
    )
    assert fetched == ["lineage.safetensors", "rvhub.json"], fetched


def test_the_delta_is_taken_at_the_best_reported_alpha():
    """A sweep's .eval_results (as rvhub writes them) hold every α; the search reports the
    best one against α = 0, per task and metric."""
    from rvhub.card.render import eval_result_entries
    from rvhub.card.scores import Scores
    from rvhub.search import eval_deltas

    sweep = {
        "metrics": [
            {
                "task": "gsm8k",
                "dataset_id": "openai/gsm8k",
                "label": "exact match",
                "points": [
                    {"scale": -1.0, "value": 0.40},
                    {"scale": 0.0, "value": 0.50},
                    {"scale": 0.5, "value": 0.58},
                    {"scale": 1.0, "value": 0.55},
                ],
            }
        ]
    }
    entries = eval_result_entries(Scores(target="org/instruct", sweep=sweep))
    deltas, best = eval_deltas(entries)
    assert deltas == {"gsm8k exact match": pytest.approx(0.08)}
    assert best == {"gsm8k exact match": 0.5}
