"""Publishing and downloading vectors through a real Hub client against the local Hub.

Pushes go through huggingface_hub to the write stand-in, downloads through huggingface_hub from
olah: a push is proven by pulling it back and applying it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, list_repo_files
from huggingface_hub.errors import RepositoryNotFoundError

from rvhub import extract_vector, load_vector
from rvhub.hub.push import push_vector
from rvhub.manifest import load_manifest, published
from tests.cli_helpers import assert_clean_failure, run
from tests.models import state_dict_of

pytestmark = [
    pytest.mark.hub,
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning"),
]

ARTIFACT_FILES = [
    "README.md",
    "layer_norms.png",
    "lineage.safetensors",
    "rvhub.json",
    "vector.safetensors",
]


@pytest.fixture
def vec(family, tmp_path):
    fam = family("qwen2")
    return fam, extract_vector(fam["a"], fam["b"]).save(tmp_path / "vec")


@pytest.fixture
def logged_in(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    return hub


def _commits(hub, repo_id, revision="main"):
    return [
        c.commit_id for c in HfApi(token=hub.token).list_repo_commits(repo_id, revision=revision)
    ]


def _writes(hub):
    return [(r.method, r.path) for r in hub.requests if r.method in ("POST", "PUT", "DELETE")]


def test_pushed_vector_pulls_back_and_applies_like_the_local_one(logged_in, vec, tmp_path):
    hub, (fam, folder) = logged_in, vec
    repo_id = hub.new_repo_id("vec")

    pushed = run("push", folder, repo_id)
    commits = _commits(hub, repo_id)
    hub.requests.clear()
    pulled = load_vector(repo_id)
    local_out, hub_out = tmp_path / "local-out", tmp_path / "hub-out"
    applied_local = run("apply", folder, fam["target"], "-o", local_out, "--device", "cpu")
    applied_hub = run(
        "apply", repo_id, fam["target"], "-o", hub_out, "--revision", commits[0], "--device", "cpu"
    )
    inspected = run("inspect", repo_id)
    verified = run("verify", repo_id, "--revision", commits[0])

    assert pushed.exit_code == 0, pushed.output
    assert pushed.output == f"pushed to {hub.endpoint}/{repo_id} (commit {commits[0]})\n"
    assert len(commits) == 2  # the Hub's initial commit + one commit with every file
    assert sorted(list_repo_files(repo_id)) == [".gitattributes", *ARTIFACT_FILES]
    assert pulled.path is not None and pulled.path.name == commits[0]
    assert sorted(p.name for p in pulled.path.iterdir()) == ARTIFACT_FILES  # no .gitattributes
    assert pulled.meta["origin"] == {
        "kind": "hub",
        "repo_id": repo_id,
        "revision": commits[0],
        "requested_revision": "main",
    }
    assert (pulled.path / "vector.safetensors").read_bytes() == (
        folder / "vector.safetensors"
    ).read_bytes()
    # the manifest as published: the local sources by folder name and fingerprint, no paths
    local = json.loads((folder / "rvhub.json").read_text())
    assert json.loads((pulled.path / "rvhub.json").read_text()) == published(local)
    assert str(fam["a"]) not in (pulled.path / "rvhub.json").read_text()
    assert applied_local.exit_code == 0 and applied_hub.exit_code == 0, applied_hub.output
    local_sd, hub_sd = state_dict_of(local_out), state_dict_of(hub_out)
    assert local_sd.keys() == hub_sd.keys()
    assert all(torch.equal(local_sd[k], hub_sd[k]) for k in local_sd)
    assert inspected.exit_code == 0 and "27 tensors" in inspected.output
    assert verified.exit_code == 0 and "2 files match their blake3" in verified.output
    card = ModelCard.load(repo_id)
    assert card.data.library_name == "rvhub" and "reasoning-vector" in card.data.tags
    assert "![‖v‖ per layer](layer_norms.png)" in card.text


def test_unchanged_repush_makes_no_commit(logged_in, vec):
    hub, (_, folder) = logged_in, vec
    repo_id = hub.new_repo_id("same")
    first = push_vector(folder, repo_id)
    hub.requests.clear()

    again = run("push", folder, repo_id)

    assert first.changed and first.commit_sha == _commits(hub, repo_id)[0]
    assert again.exit_code == 0, again.output
    assert again.output == f"no changes; {hub.endpoint}/{repo_id} already at {first.commit_sha}\n"
    assert again.stderr == ""  # huggingface_hub's own warning is not shown
    assert not [w for w in _writes(hub) if w[0] == "PUT" or w[1].endswith("/commit/main")]
    assert len(_commits(hub, repo_id)) == 2


def test_revision_pins_the_first_push_after_a_second_one(logged_in, vec, tmp_path):
    hub, (fam, folder) = logged_in, vec
    repo_id = hub.new_repo_id("pinned")
    sharded = extract_vector(fam["a"], fam["b"]).save(
        tmp_path / "sharded", dtype="float32", max_shard_size=20_000
    )
    first = push_vector(folder, repo_id)
    second = push_vector(sharded, repo_id, commit_message="float32, sharded")
    third = push_vector(folder, repo_id)

    old = load_vector(repo_id, revision=first.commit_sha)
    new = load_vector(f"{repo_id}@{second.commit_sha}")
    latest = load_vector(repo_id)

    assert first.commit_sha != second.commit_sha != third.commit_sha and third.changed
    assert old.dtype == torch.bfloat16 and new.dtype == torch.float32
    assert sorted(load_manifest(new.path)["files"]) == sorted(load_manifest(sharded)["files"])
    assert len(load_manifest(sharded)["files"]) > 1
    assert torch.equal(old.get("lm_head.weight"), latest.get("lm_head.weight"))
    # the shards of the second push are deleted by the third, in the same commit
    assert sorted(list_repo_files(repo_id)) == [".gitattributes", *ARTIFACT_FILES]
    assert HfApi(token=hub.token).list_repo_commits(repo_id)[1].title == "float32, sharded"


def test_offline_loads_are_served_from_the_cache(logged_in, vec, tmp_path):
    hub, (_, folder) = logged_in, vec
    repo_id = hub.new_repo_id("offline")
    sha = push_vector(folder, repo_id).commit_sha
    online = load_vector(repo_id)
    hub.requests.clear()

    with hub.offline():
        by_name = load_vector(repo_id)
        by_sha = load_vector(repo_id, revision=sha)
        inspected = run("inspect", repo_id)
        never_downloaded = run("inspect", hub.new_repo_id("not-cached"))
    with hub.use_endpoint(tmp_path / "hf_home", endpoint=hub.dead_endpoint):
        network_down = load_vector(repo_id)

    assert hub.requests == []
    assert by_name.path == by_sha.path == online.path == network_down.path
    assert inspected.exit_code == 0, inspected.output
    assert_clean_failure(never_downloaded, match="not in the local cache")


def test_private_push_is_visible_to_its_owner_only(logged_in, vec, tmp_path, monkeypatch):
    hub, (_, folder) = logged_in, vec
    repo_id = hub.new_repo_id("private")

    pushed = run("push", folder, repo_id, "--private")
    mine = load_vector(repo_id)
    with hub.use_endpoint(tmp_path / "anonymous_home"):  # an empty cache, no token
        anonymous = run("inspect", repo_id)

    assert pushed.exit_code == 0, pushed.output
    assert HfApi(token=hub.token).model_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=hub.other_token).model_info(repo_id)
    assert mine.path is not None
    assert_clean_failure(anonymous, match="no such repo on the Hub (or it is private")


def test_branch_and_pull_request_leave_main_alone(logged_in, vec, family, tmp_path):
    hub, (fam, folder) = logged_in, vec
    repo_id = hub.new_repo_id("pr")
    HfApi(token=hub.token).create_repo(repo_id)
    other = extract_vector(fam["b"], fam["a"]).save(tmp_path / "reverse")

    branch = run("push", folder, repo_id, "--revision", "dev", "--commit-message", "to dev")
    pr = run("push", other, repo_id, "--create-pr", "--scores", _scores(tmp_path))

    assert branch.exit_code == 0, branch.output
    assert branch.output.startswith(f"pushed to {hub.endpoint}/{repo_id}/tree/dev (commit ")
    assert pr.exit_code == 0, pr.output
    assert pr.output.startswith(f"opened {hub.endpoint}/{repo_id}/discussions/1 (commit ")
    assert list_repo_files(repo_id) == [".gitattributes"]  # main untouched
    assert "rvhub.json" in list_repo_files(repo_id, revision="dev")
    on_dev, in_pr = load_vector(repo_id, revision="dev"), load_vector(repo_id, revision="refs/pr/1")
    assert torch.equal(on_dev.get("lm_head.weight"), -in_pr.get("lm_head.weight"))
    card = ModelCard.load(in_pr.path / "README.md")  # downloaded with the vector
    assert [r.metric_value for r in card.data.eval_results] == [62.1, 67.0, 50.3]


def test_card_names_hub_sources_their_revisions_and_license(logged_in, family, tmp_path):
    """The card declares the lineage root found by walking A's and B's Hub metadata (their
    cards' base_model) as its one base_model, an adapter; A and B stay in the body (issue 29:
    a list of base models reads as a merge, and puts the vector in the wrong trees)."""
    hub = logged_in
    fam = family("llama")
    a_id, b_id = hub.new_repo_id("grpo", namespace="org"), hub.new_repo_id("sft", namespace="org")
    base_id = hub.new_repo_id("base", namespace="org")
    hub.seed_repo(
        base_id, {**_folder_files(fam["target"]), "README.md": "---\nlicense: mit\n---\n"}
    )
    readme = f"---\nlicense: apache-2.0\nbase_model: {base_id}\n---\n# model\n"
    b_sha = hub.seed_repo(b_id, {**_folder_files(fam["b"]), "README.md": readme})
    a_readme = f"---\nlicense: apache-2.0\nbase_model: {b_id}\n---\n# RL from the SFT model\n"
    a_sha = hub.seed_repo(a_id, {**_folder_files(fam["a"]), "README.md": a_readme})
    folder = tmp_path / "vec"
    assert run("extract", a_id, b_id, "-o", folder).exit_code == 0
    assert load_manifest(folder)["base_model"] == {"id": base_id, "from": "hub"}
    repo_id = hub.new_repo_id("from-hub")

    pushed = run("push", folder, repo_id)

    assert pushed.exit_code == 0, pushed.output
    card = ModelCard.load(repo_id)
    assert card.data.base_model == base_id and card.data.base_model_relation == "adapter"
    assert card.data.license == "apache-2.0"
    assert a_sha in card.text and b_sha in card.text and a_id in card.text and b_id in card.text

    # set or correct it on an existing vector, without extracting again
    again = run("push", folder, repo_id, "--base-model", "org/another-base")
    assert again.exit_code == 0, again.output
    assert ModelCard.load(repo_id).data.base_model == "org/another-base"


def test_local_sources_give_no_base_model_and_say_how_to_set_it(vec, tmp_path):
    _, folder = vec
    from rvhub.card import build_card

    card = build_card(folder, repo_id="alice/vec")
    assert card.metadata.get("base_model") is None
    assert "rvhub card --base-model ORG/NAME" in card.text
    given = extract_vector(vec[0]["a"], vec[0]["b"], base_model="org/base").save(tmp_path / "v")
    assert build_card(given, repo_id="alice/vec").metadata["base_model"] == "org/base"


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_vector_pulls_back_and_its_card_snippet_works_with_stock_peft(
    logged_in, vec, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hub, (fam, folder) = logged_in, vec
    lora = tmp_path / "lora"
    assert run("compress", folder, "-o", lora, "--encoding", "lora", "--rank", "4").exit_code == 0
    repo_id = hub.new_repo_id("lora")

    assert run("push", lora, repo_id).exit_code == 0
    pulled = load_vector(repo_id)
    model = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, repo_id).merge_and_unload()  # as the card says
    reference = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.float32)
    pulled.apply_to(reference)

    assert sorted(p.name for p in pulled.path.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", *ARTIFACT_FILES]
    )
    assert "PeftModel.from_pretrained(model, " + f'"{repo_id}")' in ModelCard.load(repo_id).text
    q = "model.layers.0.self_attn.q_proj.weight"  # in the adapter: PEFT adds what rvhub adds
    got, want = merged.state_dict()[q], reference.state_dict()[q]
    assert torch.allclose(got, want, atol=1e-6)
    norm = "model.layers.0.input_layernorm.weight"  # dense in vector.safetensors: only rvhub
    assert not torch.equal(merged.state_dict()[norm], reference.state_dict()[norm])


# -- bad input: one line, exit != 0, nothing published ---------------------------------------


def test_tampered_artifact_is_refused_before_any_request(logged_in, vec, tmp_path):
    hub, (_, folder) = logged_in, vec
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    weights = tampered / "vector.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    hub.requests.clear()

    r = run("push", tampered, hub.new_repo_id("tampered"))

    assert_clean_failure(r, match="vector.safetensors does not match its blake3")
    assert hub.requests == []


def test_push_without_a_token_says_how_to_log_in(hub, vec):
    r = run("push", vec[1], hub.new_repo_id("anon"))
    assert_clean_failure(
        r, match="no Hugging Face token found: log in with `hf auth login` or set HF_TOKEN"
    )
    assert hub.requests == []


def test_push_with_a_rejected_token(hub, vec, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    r = run("push", vec[1], hub.new_repo_id("badtoken"))
    assert_clean_failure(r, match="the Hub rejected the token (HTTP 401)")


def test_push_to_someone_elses_namespace_is_refused(hub, vec, monkeypatch):
    repo_id = hub.new_repo_id("alices")
    HfApi(token=hub.token).create_repo(repo_id)
    monkeypatch.setenv("HF_TOKEN", hub.other_token)

    existing = run("push", vec[1], repo_id)
    new = run("push", vec[1], hub.new_repo_id("alices-new"))

    assert_clean_failure(existing, match=f"no write access to {repo_id} (HTTP 403)")
    assert_clean_failure(new, match="(HTTP 403)")
    assert list_repo_files(repo_id) == [".gitattributes"]
    assert not [w for w in _writes(hub) if "/commit/" in w[1] or w[0] == "PUT"]


def test_push_with_the_network_down(hub, vec, tmp_path, monkeypatch):
    with hub.use_endpoint(tmp_path / "hf_home", endpoint=hub.dead_endpoint):
        monkeypatch.setenv("HF_TOKEN", hub.token)
        r = run("push", vec[1], hub.new_repo_id("down"))
    assert_clean_failure(r, match=f"cannot reach the Hub at {hub.dead_endpoint}")


def test_push_while_offline(logged_in, vec):
    hub = logged_in
    with hub.offline():
        r = run("push", vec[1], hub.new_repo_id("offline-push"))
    assert_clean_failure(r, match="cannot push with HF_HUB_OFFLINE=1")
    assert hub.requests == []


def test_unknown_revision(logged_in, vec, tmp_path):
    hub, (fam, folder) = logged_in, vec
    repo_id = hub.new_repo_id("rev")
    push_vector(folder, repo_id)
    out = tmp_path / "out"

    applied = run("apply", repo_id, fam["target"], "-o", out, "--revision", "no-such-branch")
    pushed = run("push", folder, repo_id, "--revision", "refs/pr/42")

    assert_clean_failure(applied, match="has no revision 'no-such-branch'", output=out)
    assert_clean_failure(pushed, match="has no revision 'refs/pr/42'")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("template", "card template"),
        ("scores", "unknown key 'baselin' (did you mean 'baseline'?)"),
    ],
)
def test_bad_card_inputs_publish_nothing(logged_in, vec, tmp_path, bad, match):
    hub, (_, folder) = logged_in, vec
    repo_id = hub.new_repo_id("bad-card")
    broken = tmp_path / "broken"
    if bad == "template":
        broken.write_text("# {{ name }}\n{% for x in %}\n")
        args = ["--template", broken]
    else:
        broken.write_text("benchmarks:\n  - task: gsm8k\n    metric: {type: acc}\n    baselin: 1\n")
        args = ["--scores", broken]
    hub.requests.clear()

    r = run("push", folder, repo_id, *args)

    assert_clean_failure(r, match=match)
    assert _writes(hub) == []
    assert not HfApi(token=hub.token).repo_exists(repo_id)


def _scores(tmp_path: Path) -> Path:
    path = tmp_path / "scores.yaml"
    path.write_text(
        "benchmarks:\n"
        "  - task: gsm8k\n"
        "    dataset: {id: openai/gsm8k, name: GSM8K, config: main, split: test}\n"
        "    metric: {type: exact_match}\n"
        "    baseline: 62.1\n    plus_vector: 67.0\n    minus_vector: 50.3\n"
    )
    return path


def _folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def test_push_uploads_the_card_built_by_the_card_module(logged_in, vec, tmp_path):
    """The card is built in rvhub.card (what `rvhub card` shows); push uploads that object as
    it is: its text, its plot and its .eval_results, and checks the artifact first."""
    from rvhub.card import Benchmark, Scores
    from rvhub.card.build import CardOptions, build_card

    hub, (_, folder) = logged_in, vec
    repo_id = hub.new_repo_id("built")
    scores = Scores(target="Org/Instruct")
    scores.benchmarks.append(
        Benchmark(
            task="gsm8k",
            metric_type="exact_match",
            metric_name="exact match",
            dataset_id="openai/gsm8k",
            values={"baseline": 0.5, "plus_vector": 0.6},
        )
    )
    options = CardOptions(scores=scores, license="apache-2.0", target="Org/Instruct")
    card = build_card(folder, repo_id=repo_id, **options.arguments())
    assert card.files.keys() >= {"README.md", "layer_norms.png"}

    result = push_vector(folder, repo_id, card=card)

    pulled = Path(HfApi(token=hub.token).snapshot_download(repo_id, cache_dir=tmp_path / "c"))
    for name, data in card.files.items():
        assert (pulled / name).read_bytes() == data, name
    assert result.changed and any(n.startswith(".eval_results/") for n in card.files)

    # the card object is checked like a rendered one: a damaged artifact is still refused
    data = (folder / "vector.safetensors").read_bytes()
    (folder / "vector.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    hub.requests.clear()
    with pytest.raises(Exception, match="vector.safetensors"):
        push_vector(folder, repo_id, card=card)
    assert not _writes(hub)


def test_nothing_pushed_names_a_local_path(logged_in, vec, tmp_path):
    """The demo's card said "Measured on `<temp>/rvhub-demo-…/toy/instruct`", its usage lines
    and .eval_results notes carried the path, and rvhub.json had `"path": "<temp>/.../rl"`
    (issue 29, item 2). Local inputs under a temporary folder; the folder appears in none of
    the uploaded files."""
    hub, (fam, folder) = logged_in, vec
    target = tmp_path / "models" / "my-instruct"
    shutil.copytree(fam["target"], target)
    results = {}
    for cond, value in (("baseline", 0.5), ("plus", 0.6), ("minus", 0.4)):
        data = {
            "results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": value}},
            "configs": {"gsm8k": {"dataset_path": "openai/gsm8k", "dataset_name": "main"}},
            "n-shot": {"gsm8k": 5},
            "config": {"model": "hf", "model_args": f"pretrained={target}"},
        }
        results[cond] = tmp_path / f"{cond}.json"
        results[cond].write_text(json.dumps(data))
    repo_id = hub.new_repo_id("no-paths")
    args = [f"{c}={p}" for c, p in results.items()]
    pushed = run(
        "push", folder, repo_id, "--target", target,
        *[x for a in args for x in ("--lm-eval", a)],
    )  # fmt: skip
    assert pushed.exit_code == 0, pushed.output + pushed.stderr
    pulled = Path(HfApi(token=hub.token).snapshot_download(repo_id, cache_dir=tmp_path / "c"))
    uploaded = [p for p in pulled.rglob("*") if p.is_file()]
    assert any(p.parent.name == ".eval_results" for p in uploaded)
    local_roots = {str(tmp_path), str(fam["a"].parent), str(folder.parent), "/tmp/"}
    for path in uploaded:
        data = path.read_bytes()
        for root in local_roots:
            assert root.encode() not in data, (path.name, root)
    card = (pulled / "README.md").read_text()
    assert "`my-instruct` (a local model)" in card  # named by folder, said to be local
    assert "rvhub apply " + repo_id + " TARGET_MODEL" in card
