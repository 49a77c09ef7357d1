"""`rvhub merge` / `merge_vectors` (issue 25): equal to mergekit itself where mergekit can
express the merge (installed from PyPI in its own environment by .ci/mergekit-setup.sh; the
equality tests skip without it), deterministic and statistically faithful for the random
methods, refusals before any work, and streaming on any number of threads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from rvhub import apply_to_checkpoint, extract_vector, load_vector, merge_vectors
from rvhub.errors import CompatibilityError, InputError
from rvhub.manifest import load_manifest
from rvhub.ops.merge import MergeOptions, merge_tensor
from tests.cli_helpers import assert_clean_failure, run
from tests.models import build_model, finetune_like, save, state_dict_of

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = Path(
    os.environ.get("RVHUB_MERGEKIT", ROOT / ".cache" / "mergekit-venv" / "bin" / "mergekit-yaml")
)
if os.environ.get("RVHUB_REQUIRE_MERGEKIT") and not MERGEKIT.is_file():
    raise RuntimeError(f"RVHUB_REQUIRE_MERGEKIT is set but {MERGEKIT} is missing")
needs_mergekit = pytest.mark.skipif(
    not MERGEKIT.is_file(), reason="mergekit not installed (bash .ci/mergekit-setup.sh)"
)


def _family(root: Path, arch: str) -> dict[str, Path]:
    """A base B and three fine-tunes A1..A3 of it, as mergekit merges them. float32: with
    bf16 weights many deltas have equal magnitudes, and which of several equal magnitudes at a
    threshold mergekit keeps depends on torch's unstable argsort (rvhub keeps the earliest:
    test_equal_magnitudes_rank_in_tensor_order); continuous deltas make the ranking unique."""
    out = {}
    for i, role in enumerate(("b", "a1", "a2", "a3")):
        model = build_model(arch, seed=0)
        if role != "b":
            finetune_like(model, seed=300 + i, scale=0.05)
        out[role] = save(model.to(torch.float32), root / role)
    return out


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"merge-{request.param}")
    fam = _family(root, request.param)
    for i in (1, 2, 3):  # float32 storage: Ai − B exactly, as mergekit computes it
        fam[f"v{i}"] = extract_vector(fam[f"a{i}"], fam["b"]).save(root / f"v{i}", dtype="float32")
    return fam


def _mergekit(fam: dict[str, Path], out: Path, method: str, per_model: dict, shared: dict) -> Path:
    config = {
        "merge_method": method,
        "base_model": str(fam["b"]),
        "models": [
            {"model": str(fam[f"a{i}"]), "parameters": {k: v[i - 1] for k, v in per_model.items()}}
            for i in (1, 2, 3)
        ],
        "parameters": shared,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [str(MERGEKIT), str(path), str(out), "--no-copy-tokenizer", "--lazy-unpickle"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 and "no such option" in done.stderr:
        done = subprocess.run([str(MERGEKIT), str(path), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


CASES = [
    ("linear", "task_arithmetic", {"weight": [1.0, 0.5, 0.3]}, {}, {}),
    (
        "ties",
        "ties",
        {"weight": [1.0, 0.7, 0.4], "density": [0.5, 0.6, 0.7]},
        {},
        {},
    ),
    ("ties", "ties", {"weight": [1.0, 1.0, 1.0], "density": [0.3, 0.3, 0.3]}, {"normalize": False}, {"normalize": False}),
    (
        "breadcrumbs",
        "breadcrumbs",
        {"weight": [1.0, 0.5, 0.5], "density": [0.8, 0.8, 0.7], "gamma": [0.05, 0.02, 0.01]},
        {},
        {},
    ),
]  # fmt: skip


@needs_mergekit
@pytest.mark.parametrize(("method", "theirs", "per_model", "shared", "ours"), CASES)
def test_merge_equals_mergekit(family, tmp_path, method, theirs, per_model, shared, ours):
    """From B and A1..A3: rvhub's merge of Ai − B applied to B equals mergekit-yaml with
    base_model B, tensor by tensor, within one bf16 rounding (both compute in float32)."""
    theirs_out = _mergekit(family, tmp_path / "mergekit", theirs, per_model, shared)
    merged = merge_vectors(
        [load_vector(family[f"v{i}"]) for i in (1, 2, 3)],
        method=method,
        weights=per_model.get("weight"),
        density=per_model.get("density"),
        gamma=per_model.get("gamma"),
        **ours,
    )
    saved = load_vector(merged.save(tmp_path / "merged", dtype="float32"))
    apply_to_checkpoint(saved, family["b"], tmp_path / "ours")
    mine, ref = state_dict_of(tmp_path / "ours"), state_dict_of(theirs_out)
    assert set(mine) == set(ref)
    exact = total = 0
    for name, t in ref.items():
        # B is float32, so rvhub's model is too; mergekit's out_dtype rounds B + merged to bf16
        a, b = mine[name].to(torch.bfloat16).float(), t.float()
        ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(a.abs(), b.abs())
        assert bool(((a - b).abs() <= ulp + 1e-30).all()), name
        exact += int((a == b).sum())
        total += a.numel()
    assert exact / total > 0.99  # almost every entry is bit-identical


def test_random_methods_are_deterministic_on_any_thread_count(family, tmp_path):
    vs = [load_vector(family[f"v{i}"]) for i in (1, 2, 3)]
    outs = []
    for threads in (1, 2):
        merged = merge_vectors(vs, method="dare_ties", density=0.4, seed=7)
        outs.append(merged.save(tmp_path / f"t{threads}", threads=threads, dtype="float32"))
    data = [(o / "vector.safetensors").read_bytes() for o in outs]
    assert data[0] == data[1]
    other = merge_vectors(vs, method="dare_ties", density=0.4, seed=8).save(
        tmp_path / "s8", dtype="float32"
    )
    assert (other / "vector.safetensors").read_bytes() != data[0]


def test_dare_keeps_the_density_and_rescales_what_it_keeps():
    """mergekit's DARE: each entry kept with probability `density`, the kept ones scaled so
    the L1 norm is unchanged (rescale=True by default)."""
    torch.manual_seed(0)
    delta = torch.randn(400, 500)
    options = MergeOptions.build("dare_linear", 1, density=0.3, seed=1)
    out = merge_tensor("w", [delta], options)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    ratio = out[kept] / delta[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one factor for the tensor
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4)


def test_della_keeps_larger_entries_more_often():
    """DELLA: keep probability rises linearly with magnitude rank, from density − ε to
    density + ε (mergekit's della_magprune), per row."""
    torch.manual_seed(0)
    delta = torch.randn(200, 1000)
    options = MergeOptions.build("della_linear", 1, density=0.5, epsilon=0.2, seed=3)
    out = merge_tensor("w", [delta], options)
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    kept = (out != 0).float()
    low = kept[ranks < 100].mean().item()  # the 10 % smallest of each row
    high = kept[ranks >= 900].mean().item()  # the 10 % largest
    assert low == pytest.approx(0.32, abs=0.03) and high == pytest.approx(0.68, abs=0.03)
    assert kept.mean().item() == pytest.approx(0.5, abs=0.01)


def test_equal_magnitudes_rank_in_tensor_order(monkeypatch):
    """TIES and breadcrumbs keep what a stable sort of |delta| keeps (the earlier of equal
    magnitudes first), whatever the number of planning passes: on quantized deltas with many
    ties at every threshold, against torch's stable sort, for many densities."""
    import rvhub.ops.merge as merge

    monkeypatch.setattr(merge, "_READ", 1000)  # several histogram and tie-finding passes

    def reference(delta, method, density, gamma):
        n, flat = delta.numel(), delta.reshape(-1).abs()
        keep = torch.zeros(n)
        if method == "ties":
            order = torch.sort(flat, descending=True, stable=True).indices
            keep[order[: max(1, int(density * n))]] = 1
        else:
            target, top = int(density * n), int(gamma * n)
            bottom = max(0, n - target - top)
            keep[torch.sort(flat, stable=True).indices[bottom : bottom + target]] = 1
        return delta * keep.reshape_as(delta)

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        delta = torch.randint(-20, 21, (37, 53), generator=gen).float() / 16
        density = 0.05 + 0.9 * torch.rand(1, generator=gen).item()
        for method, gamma in (("ties", 0.0), ("breadcrumbs", 0.03), ("breadcrumbs", 0.0)):
            options = MergeOptions.build(method, 1, density=density, gamma=gamma, normalize=False)
            ours = merge_tensor("w", [delta], options)
            assert torch.equal(ours, reference(delta, method, density, gamma)), (trial, method)


def test_ties_elects_the_sign_and_averages_what_agrees():
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b = torch.tensor([-3.0, -1.0, 1.0, 0.0])
    out = merge_tensor("w", [a, b], MergeOptions.build("ties", 2))
    # sign of the sum: -, -, +, + ; kept: b | a,b | a,b | a ; normalized by the kept weights
    assert out.tolist() == [-3.0, -1.5, 2.0, 0.5]


def test_merge_records_inputs_and_method_and_the_cli_names_flags(family, tmp_path):
    out = tmp_path / "cli"
    r = run(
        "merge", family["v1"], family["v2"], "-o", out, "--method", "ties",
        "--density", "0.5,0.7", "--weights", "1,0.5",
    )  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    manifest = load_manifest(out)
    assert manifest["merge"]["method"] == "ties" and manifest["merge"]["density"] == [0.5, 0.7]
    assert [t["weight"] for t in manifest["combination"]] == [1.0, 0.5]
    digests = [t["vector"]["files_digest"] for t in manifest["combination"]]
    assert all(d["vector.safetensors"] for d in digests)
    bad = run("merge", family["v1"], family["v2"], "-o", tmp_path / "bad", "--density", "1,2,3")
    assert_clean_failure(bad, match="--density has 3 values for 2 vectors", output=tmp_path / "bad")
    bad = run("merge", family["v1"], family["v2"], "-o", tmp_path / "bad", "--density", "1.5")
    assert_clean_failure(bad, match="--density must lie in [0, 1]", output=tmp_path / "bad")


def test_merge_refuses_other_lineages_and_shapes_before_any_work(family, tmp_path):
    other = tmp_path / "other"
    for i, role in enumerate(("a", "b")):
        model = build_model("qwen2", seed=77)
        finetune_like(model, seed=i)
        save(model.to(torch.bfloat16), other / role)
    stranger = load_vector(extract_vector(other / "a", other / "b").save(tmp_path / "sv"))
    mine = load_vector(family["v1"])
    if mine.model_info.get("model_type") == "qwen2":
        with pytest.raises(CompatibilityError, match="their bases lie"):
            merge_vectors([mine, stranger])
        assert len(merge_vectors([mine, stranger], allow_unrelated=True, method="linear")) > 0
    else:
        with pytest.raises(CompatibilityError, match="different model types"):
            merge_vectors([mine, stranger])
    with pytest.raises(InputError, match="`method`"):
        merge_vectors([mine], method="slerp")
    with pytest.raises(InputError, match="density ± epsilon"):
        merge_vectors([mine], method="della", density=0.1, epsilon=0.2)
    json.dumps(MergeOptions.build("della", 2).as_json())
