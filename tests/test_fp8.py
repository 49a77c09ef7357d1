"""FP8 block-quantized checkpoints in and out, checked against an independent quantizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rvhub import load_vector
from tests.cli_helpers import assert_clean_failure, run
from tests.fp8_models import dequantized, fp8_family


def test_extract_dequantizes_fp8_sources(tmp_path: Path) -> None:
    fam = fp8_family(tmp_path)
    vec = tmp_path / "vec"
    r = run("extract", fam["a"], fam["b"], "-o", vec)
    assert r.exit_code == 0, r.output
    manifest = json.loads((vec / "rvhub.json").read_text())
    assert manifest["sources"]["a"]["quantization"]["weight_block_size"] == [128, 128]
    assert not any(n.endswith("_scale_inv") for n in manifest["tensors"])
    a, b = dequantized(fam["a"]), dequantized(fam["b"])
    v = load_vector(vec)
    assert set(v.keys()) == set(a)
    for name in a:
        expected = (a[name] - b[name]).to(torch.bfloat16)
        got = v.get(name, dtype=None)
        assert got.dtype == torch.bfloat16, name
        assert torch.equal(got, expected), name


def test_apply_onto_fp8_target_requantizes_each_block(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tests.fp8_models import dequantize, is_quantized, quantize

    fam = fp8_family(tmp_path)
    vec, out = tmp_path / "vec", tmp_path / "out"
    assert run("extract", fam["a"], fam["b"], "-o", vec).exit_code == 0
    r = run("apply", vec, fam["target"], "-o", out, "--scale", "1.5")
    assert r.exit_code == 0, r.output
    assert "FP8 target: requantizing each 128×128 block kept" in r.output + (r.stderr or "")

    written = load_file(out / "model.safetensors")
    original = load_file(fam["target"] / "model.safetensors")
    assert set(written) == set(original)  # weights and their scales, nothing else
    v = load_vector(vec)
    target = dequantized(fam["target"])
    record = json.loads((out / "rvhub_applied.json").read_text())["requantization"]
    for name, theta in target.items():
        exact = theta + 1.5 * v.get(name)
        if not is_quantized(name):
            assert written[name].dtype == torch.bfloat16
            assert torch.equal(written[name], exact.to(torch.bfloat16)), name
            continue
        assert written[name].dtype == torch.float8_e4m3fn
        q, s = quantize(exact)  # the test's own quantizer
        torch.testing.assert_close(written[name + "_scale_inv"], s, rtol=1e-6, atol=0)
        ours, theirs = dequantize(written[name], written[name + "_scale_inv"]), dequantize(q, s)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        # the reported error is the measured one
        err = float((ours - theta - 1.5 * v.get(name)).norm() / (1.5 * v.get(name)).norm())
        assert abs(record["tensors"][name]["rel_error"] - err) < 1e-4, name


def test_transformers_loads_the_fp8_result(tmp_path: Path) -> None:
    """transformers 5.24 dequantizes FP8 on the CPU, but refuses ragged blocks ("Weight shape
    (320, 256) not divisible by scale grid (3, 2)"), its own target too: whole blocks here."""
    from transformers import AutoModelForCausalLM

    fam = fp8_family(tmp_path, intermediate_size=384)
    vec, out = tmp_path / "vec", tmp_path / "out"
    assert run("extract", fam["a"], fam["b"], "-o", vec).exit_code == 0
    assert run("apply", vec, fam["target"], "-o", out).exit_code == 0
    ids = torch.tensor([[1, 5, 9, 77]])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert bool(torch.isfinite(logits).all())
    # the same as a float model holding the dequantized FP8 weights
    from tests.fp8_models import dequantized

    reference = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.float32).eval()
    weights = dequantized(out)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(weights[name].float())
        torch.testing.assert_close(logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_vector_below_one_fp8_step_is_reported_lost(tmp_path: Path) -> None:
    fam = fp8_family(tmp_path)
    vec, out = tmp_path / "vec", tmp_path / "out"
    assert run("extract", fam["a"], fam["b"], "-o", vec).exit_code == 0
    r = run("apply", vec, fam["target"], "-o", out, "--scale", "0.001")
    assert r.exit_code == 0, r.output
    record = json.loads((out / "rvhub_applied.json").read_text())["requantization"]
    assert record["kept"] < 0.5


def test_live_apply_on_fp8_models(tmp_path: Path) -> None:
    """On the CPU transformers dequantizes FP8 on load: live apply then adds to real weights.
    FP8 parameters (FineGrainedFP8 on a GPU keeps them) are refused with one line."""
    import pytest
    from transformers import AutoModelForCausalLM

    from rvhub.errors import CompatibilityError

    fam = fp8_family(tmp_path, intermediate_size=384)
    vec = tmp_path / "vec"
    assert run("extract", fam["a"], fam["b"], "-o", vec).exit_code == 0
    v = load_vector(vec)
    model = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.float32)
    name = "model.layers.0.mlp.up_proj.weight"
    before = model.get_parameter(name).detach().clone()
    report = v.apply_to(model)
    assert name in report.applied
    torch.testing.assert_close(model.get_parameter(name), before + v.get(name))

    fp8_model = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.float32)
    module = fp8_model.get_submodule(name.removesuffix(".weight"))
    module.weight = torch.nn.Parameter(module.weight.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(CompatibilityError, match="FP8 weights with block scales"):
        v.apply_to(fp8_model)


def test_apply_dtype_bfloat16_writes_a_dequantized_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fam = fp8_family(tmp_path)
    vec, out = tmp_path / "vec", tmp_path / "out"
    assert run("extract", fam["a"], fam["b"], "-o", vec).exit_code == 0
    r = run("apply", vec, fam["target"], "-o", out, "--dtype", "bfloat16", "--scale", "-1")
    assert r.exit_code == 0, r.output
    written = load_file(out / "model.safetensors")
    v = load_vector(vec)
    target = dequantized(fam["target"])
    assert set(written) == set(target)  # no scales left
    for name, theta in target.items():
        assert written[name].dtype == torch.bfloat16
        assert torch.equal(written[name], (theta - v.get(name)).to(torch.bfloat16)), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    AutoModelForCausalLM.from_pretrained(out)  # ragged shapes load once dequantized


def test_fp8_lineage_samples_are_dequantized(tmp_path: Path) -> None:
    """The lineage fingerprint of FP8 sources holds their weights, dequantized, and an FP8
    target is checked on them too."""
    from rvhub import check_target
    from rvhub.lineage import read_lineage
    from rvhub.manifest import load_manifest

    fam = fp8_family(tmp_path)
    vec = tmp_path / "vec"
    assert run("extract", fam["a"], fam["b"], "-o", vec).exit_code == 0
    lineage = read_lineage(vec, load_manifest(vec))
    assert lineage is not None
    name = "model.layers.0.mlp.up_proj.weight"
    b = dequantized(fam["b"])[name].reshape(-1)
    from rvhub.lineage import runs_of

    expected = torch.cat([b[s:e] for s, e in runs_of(name, b.numel())])
    torch.testing.assert_close(torch.from_numpy(lineage.b[name].copy()), expected)
    result = check_target(vec, fam["target"])
    assert name in result.lineage.tensors and result.lineage.verdict == "related"


def test_verify_against_fp8_sources(tmp_path: Path) -> None:
    fam = fp8_family(tmp_path)
    vec = tmp_path / "vec"
    assert run("extract", fam["a"], fam["b"], "-o", vec).exit_code == 0
    r = run("verify", vec, "--against", fam["a"], fam["b"])
    assert r.exit_code == 0 and "B + v reproduces A" in r.output, r.output
    r = run("verify", vec, "--against", fam["target"], fam["b"])
    assert r.exit_code != 0


def test_e4m3_decoding_matches_torch_for_every_byte_length_and_alignment() -> None:
    import numpy as np

    from rvhub.io.fp8 import decode_e4m3

    codes = torch.arange(256, dtype=torch.uint8).repeat(9)[:2049]  # every byte, odd length
    expected = codes.view(torch.float8_e4m3fn).to(torch.float32)  # torch's own conversion
    for lo, hi in ((0, 2049), (0, 2048), (1, 2049), (1, 2000), (3, 4)):
        out = torch.full((hi - lo,), 7.0)
        decode_e4m3(codes.numpy()[lo:hi], out.numpy())
        assert torch.equal(out.isnan(), expected[lo:hi].isnan())
        assert torch.equal(out.nan_to_num(), expected[lo:hi].nan_to_num()), (lo, hi)
        unaligned = torch.empty(hi - lo + 1)[1:]  # a float32 buffer 4 bytes off an 8-byte line
        decode_e4m3(codes.numpy()[lo:hi], unaligned.numpy())
        assert np.array_equal(unaligned.numpy(), out.numpy(), equal_nan=True)


def test_any_flat_range_is_dequantized_like_the_whole_weight() -> None:
    """Slabs and kernel blocks start anywhere: mid-row, mid-band, on a ragged last block."""
    from rvhub.io.fp8 import BlockScales, Fp8Slab, dequantize_flat
    from tests.fp8_models import dequantize, quantize

    w = torch.randn(300, 200) * 0.05  # 3 bands of rows (the last 44 rows), 2 of columns (72)
    q, scale = quantize(w)
    expected = dequantize(q, scale).reshape(-1)  # the test's own dequantizer
    scales = BlockScales(scale, (300, 200), (128, 128))
    gen = torch.Generator().manual_seed(0)
    ranges = [(0, 60000), (199, 201), (25599, 25601), (128 * 200 - 7, 256 * 200 + 9)]
    ranges += [
        tuple(sorted(torch.randint(0, 60001, (2,), generator=gen).tolist())) for _ in range(40)
    ]
    for lo, hi in ranges:
        got = dequantize_flat(q.reshape(-1)[lo:hi], scales, lo)
        assert torch.equal(got, expected[lo:hi]), (lo, hi)
        slab = Fp8Slab(q.reshape(-1)[lo:hi], scales, lo)
        mid = (hi - lo) // 3
        part = slab.decode(mid, hi - lo, torch.empty(hi - lo - mid))
        assert torch.equal(part, expected[lo + mid : hi]), (lo, hi)


def test_eval_refuses_an_fp8_target_it_cannot_evaluate_as_apply_writes_it(tmp_path: Path) -> None:
    """transformers dequantized the FP8 target and the sweep evaluated round_bf16(θ + α·v)
    while `rvhub apply` writes a requantized FP8 model (issue 26, item 5): refused, one line."""
    pytest.importorskip("lm_eval")
    fam = fp8_family(tmp_path)
    vec, out = tmp_path / "vec", tmp_path / "eval"
    assert run("extract", fam["a"], fam["b"], "-o", vec).exit_code == 0
    r = run("eval", vec, fam["target"], "--tasks", "toy_addition", "-o", out)
    assert_clean_failure(r, match="is block-quantized FP8", output=out)
    assert r.exit_code == 3 and "--dtype bfloat16" in r.stderr
