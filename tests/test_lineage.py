"""The lineage guard: a vector refuses a target that does not descend from its base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rvhub import (
    CompatibilityError,
    apply_to_checkpoint,
    check_target,
    extract_vector,
    load_vector,
)
from rvhub.constants import LINEAGE_FILE, LINEAGE_WARN
from rvhub.manifest import load_manifest
from tests.cli_helpers import run
from tests.models import build_model, finetune_like, save, state_dict_of


@pytest.fixture
def unrelated(tmp_path):
    """Same architecture and shapes as the family, another random init."""
    return save(build_model("qwen2", seed=42, dtype=torch.bfloat16), tmp_path / "unrelated")


@pytest.fixture
def vec(family, tmp_path):
    fam = family("qwen2")
    return extract_vector(fam["a"], fam["b"]).save(tmp_path / "vec")


def test_extract_records_a_small_hashed_fingerprint(vec):
    m = load_manifest(vec)
    assert LINEAGE_FILE in m["files"] and m["lineage"]["file"] == LINEAGE_FILE
    size = (vec / LINEAGE_FILE).stat().st_size
    assert size == m["files"][LINEAGE_FILE]["size"] < 20_000
    # a few hundred KB at most for a 70B model: 2 sources x 64 float32 values per tensor
    assert 723 * 2 * 64 * 4 < 400_000


def test_a_related_target_passes_and_the_report_carries_the_figures(vec, family, tmp_path):
    report = apply_to_checkpoint(load_vector(vec), family("qwen2")["target"], tmp_path / "out")
    assert report.lineage["verdict"] == "related"
    assert report.lineage["overall"] < LINEAGE_WARN / 2
    assert report.lineage["compared"] >= 10
    record = json.loads((tmp_path / "out" / "rvhub_applied.json").read_text())
    assert record["lineage"]["verdict"] == "related"


def test_an_unrelated_target_is_refused_on_disk_and_live(vec, unrelated, tmp_path):
    v = load_vector(vec)
    with pytest.raises(CompatibilityError, match=r"not of the vector's lineage.*lie 1\.[2-6]"):
        apply_to_checkpoint(v, unrelated, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model = AutoModelForCausalLM.from_pretrained(unrelated)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CompatibilityError, match="`allow_unrelated=True`"):
        v.apply_to(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    report = v.apply_to(model, allow_unrelated=True)
    assert report.lineage["verdict"] == "unrelated" and any("lineage" in n for n in report.notes)
    apply_to_checkpoint(v, unrelated, tmp_path / "out", allow_unrelated=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_lineage_warning_is_shown_once(vec, unrelated, tmp_path):
    """`--allow-unrelated` printed the lineage warning twice, as WARNING: and as note: (issue
    26, item 9)."""
    r = run("apply", vec, unrelated, "-o", tmp_path / "out", "--allow-unrelated")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if "lineage" in line]
    assert len(lines) == 1, r.stderr


def test_a_long_finetune_of_the_base_is_still_related(family, tmp_path):
    fam = family("qwen2", torch.float32)
    target = AutoModelForCausalLM.from_pretrained(fam["b"])
    for step in range(10):  # ten fine-tune-sized moves in a row
        finetune_like(target, seed=500 + step)
    report = extract_vector(fam["a"], fam["b"]).apply_to(target)
    assert report.lineage["verdict"] == "related", report.lineage


def test_check_reads_the_figures_without_writing(vec, family, unrelated):
    ok = run("check", vec, family("qwen2")["target"])
    assert ok.exit_code == 0, ok.output
    assert "(related)" in ok.output and "fits:" in ok.output
    bad = run("check", vec, unrelated)
    assert bad.exit_code == 3 and "not of the vector's lineage" in bad.output
    as_json = run("check", vec, family("qwen2")["target"], "--json")
    assert json.loads(as_json.output)["lineage"]["verdict"] == "related"


def test_a_vector_without_a_fingerprint_says_the_check_was_not_done(vec, family, tmp_path):
    m = load_manifest(vec)
    del m["files"][LINEAGE_FILE], m["lineage"]
    (vec / LINEAGE_FILE).unlink()
    (vec / "rvhub.json").write_text(json.dumps(m))
    report = apply_to_checkpoint(load_vector(vec), family("qwen2")["target"], tmp_path / "out")
    assert report.lineage["overall"] is None
    assert any("lineage not checked" in n for n in report.notes)
    assert "none recorded" in run("inspect", vec).output


@pytest.mark.parametrize("encoding", ["lora", "dense"])
def test_re_encoding_keeps_the_fingerprint(vec, tmp_path, encoding, unrelated):
    opts = {"rank": 4} if encoding == "lora" else {"dtype": "float32"}
    out = load_vector(vec).save(tmp_path / encoding, encoding=encoding, **opts)
    kept, recorded = load_file(out / LINEAGE_FILE), load_file(vec / LINEAGE_FILE)
    assert kept.keys() == recorded.keys()
    assert all(torch.equal(kept[k], recorded[k]) for k in kept)
    with pytest.raises(CompatibilityError, match="lineage"):
        apply_to_checkpoint(load_vector(out), unrelated, tmp_path / "applied")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_samples_read_without_torch_equal_torchs_values(family, dtype):
    from rvhub import open_checkpoint
    from rvhub.io.safetensors import FileHandles
    from rvhub.lineage import runs_of, sample_entry

    ckpt = open_checkpoint(family("llama", dtype)["a"])
    handles = FileHandles()
    for name, entry in ckpt.entries.items():
        whole = ckpt.get(name).reshape(-1).float()
        expected = torch.cat([whole[s:e] for s, e in runs_of(name, whole.numel())])
        assert torch.equal(torch.from_numpy(sample_entry(entry, handles)), expected), name


# -- a target that already carries the vector (issue 26, item 4) -------------------------------
def _b_plus(fam, k: float, folder):
    """``B + k·(A − B)`` as a model folder (float32 arithmetic, stored in bf16)."""
    a, b = state_dict_of(fam["a"]), state_dict_of(fam["b"])
    model = AutoModelForCausalLM.from_pretrained(fam["b"])
    model.load_state_dict(
        {n: (b[n].float() + k * (a[n].float() - b[n].float())).to(b[n].dtype) for n in b},
        strict=False,
    )
    return save(model, folder)


@pytest.mark.parametrize(("where", "share"), [("a", 1.0), ("b+3v", 3.0), ("b+0.6v", 0.6)])
def test_a_target_that_already_carries_the_vector_is_named(vec, family, tmp_path, where, share):
    """Applying v = A − B onto A itself gives B + 2·v, with no word (issue 26, item 4)."""
    fam = family("qwen2")
    target = fam["a"] if where == "a" else _b_plus(fam, share, tmp_path / where)
    result = check_target(vec, target)
    assert result.lineage.carried == pytest.approx(share, abs=0.02)
    assert result.lineage.carried_fit == pytest.approx(1.0, abs=0.02)
    r = run("apply", vec, target, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    warned = [line for line in r.stderr.splitlines() if "already carries" in line]
    assert len(warned) == 1, r.stderr
    assert f"~{share:.0%}" in warned[0]
    assert ("it looks like A" in warned[0]) == (where == "a")
    checked = run("check", vec, target)
    assert checked.exit_code == 0 and "already carries" in checked.stderr
    assert f"it already carries {share:.0%}" in checked.output
    live = load_vector(vec).apply_to(AutoModelForCausalLM.from_pretrained(target))
    assert any("already carries" in n for n in live.notes)
    assert live.lineage["carried"] == pytest.approx(share, abs=0.02)


def test_a_sibling_fine_tune_is_not_said_to_carry_the_vector(vec, family, tmp_path):
    """The family's target is another fine-tune of the base: its difference from B does not
    lie along v, so no warning, whatever its measured share."""
    r = run("apply", vec, family("qwen2")["target"], "-o", tmp_path / "out")
    assert r.exit_code == 0 and "already carries" not in r.stderr, r.stderr
    lineage = check_target(vec, family("qwen2")["target"]).lineage
    assert lineage.carried_fit is not None and lineage.carried_fit < 0.5


# -- combinations of vectors (issue 26, item 6) ------------------------------------------------
def _other_lineage_vector(tmp_path):
    """A vector of a family with the architecture of the others but another base (seed 42):
    its A, B and target under ``tmp_path/other-family``."""
    root = tmp_path / "other-family"
    for i, role in enumerate(("a", "b", "target")):
        model = build_model("qwen2", seed=42)
        finetune_like(model, seed=200 + i)
        save(model.to(torch.bfloat16), root / role)
    return extract_vector(root / "a", root / "b").save(tmp_path / "other-vec")


def test_combining_vectors_of_different_lineages_is_refused(vec, tmp_path):
    from rvhub import combine

    other = _other_lineage_vector(tmp_path)
    v, w = load_vector(vec), load_vector(other)
    for build in (lambda: v + w, lambda: w + v, lambda: (v - 0.5 * w) / 2):
        with pytest.raises(CompatibilityError, match="cannot combine .* their bases lie"):
            build()
    both = combine([(1.0, v), (1.0, w)], allow_unrelated=True)
    assert len(both.terms) == 2


def test_a_combination_keeps_every_operand_and_fits_both_families(vec, family, tmp_path):
    """(v + w).save wrote `sources: {}`, a list of absolute paths and v's fingerprint only, so
    apply accepted v's family and refused w's, and w + v swapped that."""
    from rvhub import combine

    fam = family("qwen2")
    other = _other_lineage_vector(tmp_path)
    other_fam_target = tmp_path / "other-family" / "target"
    v, w = load_vector(vec), load_vector(other)
    for name, terms in (("vw", [(1.0, v), (0.5, w)]), ("wv", [(0.5, w), (1.0, v)])):
        folder = combine(terms, allow_unrelated=True).save(tmp_path / name)
        manifest = load_manifest(folder)
        recorded = manifest["combination"]
        assert [t["coef"] for t in recorded] == [c for c, _ in terms]
        for entry, (_, term) in zip(recorded, terms, strict=True):
            assert entry["sources"] == json.loads(json.dumps(dict(term.provenance.sources)))
            assert entry["vector"]["files_digest"] == {
                n: term.manifest.digest(n) for n in term.manifest.files
            }
        lineage = load_vector(folder).source.lineage()
        assert lineage is not None and len(lineage.bases()) == 2
        for target in (fam["target"], other_fam_target):  # both families fit, in any order
            assert check_target(folder, target).lineage.verdict == "related"
