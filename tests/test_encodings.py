"""LoRA (SVD → stock PEFT adapter) and sparse encodings, on real tiny transformers models."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from rvhub.encodings.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoraFactor,
    _pattern_key,
    factorize,
    read_peft_adapter,
    select_rank,
    write_peft_adapter,
)
from rvhub.encodings.sparse import (
    INDEX_PART,
    VALUE_PART,
    decode_sparse,
    encode_sparse,
    sparse_nbytes,
    sparse_ratio,
    sparse_tensor_names,
)
from tests.models import config_for

ARCHS = ("qwen2", "llama", "gemma2")  # q/k/v biases; plain; tied embeddings + extra norms


def _low_rank_plus_noise(
    shape: tuple[int, ...], generator: torch.Generator, rank: int = 3
) -> torch.Tensor:
    if len(shape) == 1:
        return 0.01 * torch.randn(shape, generator=generator)
    left = torch.randn(shape[0], rank, generator=generator)
    right = torch.randn(rank, shape[1], generator=generator)
    return 0.02 * left @ right / math.sqrt(rank) + 1e-3 * torch.randn(shape, generator=generator)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """B = a fresh random model, A = B + low-rank + noise on every tensor, and v = A − B."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(arch)).eval()
    model.save_pretrained(root / "b")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(_low_rank_plus_noise(tuple(parameter.shape), generator))
    model.save_pretrained(root / "a")
    sd_a = load_file(root / "a" / "model.safetensors")
    sd_b = load_file(root / "b" / "model.safetensors")
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    embedding = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {
        "arch": arch,
        "root": root,
        "a": sd_a,
        "b": sd_b,
        "v": {name: sd_a[name] - sd_b[name] for name in sd_b},
        # tensors PEFT can hold; in a tied model the checkpoint has no lm_head.weight
        "factorable": sorted((linear | embedding) & set(sd_b)),
        "embedding": embedding & set(sd_b),
        "tied": model.config.tie_word_embeddings,
    }


def _merge_with_peft(pair: dict, adapter: Path) -> Any:
    base = AutoModelForCausalLM.from_pretrained(pair["root"] / "b").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about LoRA on tied embeddings
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()


@pytest.mark.parametrize("full_rank", [True, False], ids=["full-rank", "rank-4"])
def test_adapter_merges_with_stock_peft_to_b_plus_factors(
    pair: dict, full_rank: bool, tmp_path: Path
) -> None:
    v = pair["v"]
    factors = {
        name: factorize(v[name], rank=min(v[name].shape) if full_rank else 4)
        for name in pair["factorable"]
    }
    written = write_peft_adapter(
        tmp_path,
        factors,
        embedding_names=pair["embedding"],
        base_model_name_or_path=str(pair["root"] / "b"),
        dtype=torch.float32,
    )
    assert written == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)

    merged = _merge_with_peft(pair, tmp_path)
    state = merged.state_dict()
    for name, tensor in pair["b"].items():
        if name in factors:
            expected = tensor + factors[name].B @ factors[name].A
            torch.testing.assert_close(state[name], expected, atol=1e-6, rtol=1e-5)
            if full_rank:
                torch.testing.assert_close(state[name], pair["a"][name], atol=1e-5, rtol=1e-5)
        else:  # biases and norms are not PEFT's: they stay dense in vector.safetensors
            assert torch.equal(state[name], tensor), name

    if pair["tied"]:  # the shared weight got the embedding delta exactly once
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
    if full_rank:  # adapter + the dense rest rebuild A end to end
        with torch.no_grad():
            for name in set(pair["b"]) - set(factors):
                merged.get_parameter(name).add_(v[name])
        model_a = AutoModelForCausalLM.from_pretrained(pair["root"] / "a").eval()
        ids = torch.tensor([[1, 5, 9, 77, 3]])
        with torch.no_grad():
            torch.testing.assert_close(
                merged(ids).logits, model_a(ids).logits, atol=1e-4, rtol=1e-4
            )


def test_adapter_config_is_plain_lora_with_scale_one(pair: dict, tmp_path: Path) -> None:
    v = pair["v"]
    factors = {name: factorize(v[name], rank=min(v[name].shape)) for name in pair["factorable"]}
    write_peft_adapter(
        tmp_path,
        factors,
        embedding_names=pair["embedding"],
        base_model_name_or_path="org/base",
        dtype=torch.bfloat16,
        extra_config={"revision": "abc123"},
    )
    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    ranks = [f.rank for f in factors.values()]
    assert config["r"] == config["lora_alpha"] == max(set(ranks), key=ranks.count)
    # One scale for every reader: no alpha_pattern (llama.cpp and SGLang ignore it); a module of
    # rank r_m != r carries r_m / r in its lora_B, which PEFT/vLLM/llama.cpp scale by alpha / r_m.
    assert config["alpha_pattern"] == {}
    assert config["rank_pattern"]  # k/v projections are narrower than q
    modules = [name.removesuffix(".weight") for name in sorted(factors)]
    assert config["target_modules"] == modules
    for module in modules:
        key = get_pattern_key(list(config["rank_pattern"]), module)
        assert config["rank_pattern"].get(key, config["r"]) == factors[f"{module}.weight"].rank
    assert config["modules_to_save"] is None and config["lora_bias"] is False
    assert (config["peft_type"], config["task_type"]) == ("LORA", "CAUSAL_LM")
    assert config["revision"] == "abc123"
    stored = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    for name in pair["embedding"]:
        module = "base_model.model." + name.removesuffix(".weight")
        vocab, dim = v[name].shape
        assert stored[module + ".lora_embedding_A"].shape == (factors[name].rank, vocab)
        assert stored[module + ".lora_embedding_B"].shape == (dim, factors[name].rank)

    for name in set(factors) - pair["embedding"]:
        module = "base_model.model." + name.removesuffix(".weight")
        fold = factors[name].rank / config["r"]
        expected_b = (factors[name].B * fold).bfloat16()
        assert torch.equal(stored[module + ".lora_B.weight"], expected_b), name

    read = read_peft_adapter(tmp_path)
    assert set(read) == set(factors)
    for name, (a, b) in read.items():
        fold = factors[name].rank / config["r"]
        expected = (factors[name].B * fold).bfloat16().float() / fold
        expected = expected @ factors[name].A.bfloat16().float()
        torch.testing.assert_close(b @ a, expected, atol=1e-6, rtol=1e-5)


def test_read_peft_adapter_matches_peft_delta_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for("qwen2"))
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(tmp_path / "full"), save_embedding_layers=True)
    with pytest.raises(ValueError, match="base weights"):
        read_peft_adapter(tmp_path / "full")
    peft_model.save_pretrained(str(tmp_path), save_embedding_layers=False)
    read = read_peft_adapter(tmp_path)
    layers: dict[str, Any] = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert set(read) == {f"{name}.weight" for name in layers}
    for name, layer in layers.items():
        a, b = read[f"{name}.weight"]
        torch.testing.assert_close(b @ a, layer.get_delta_weight("default"))


def test_read_peft_adapter_refuses_pickles_and_lora_variants(tmp_path: Path) -> None:
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickled"):
        read_peft_adapter(tmp_path)
    factors = {"m.weight": factorize(torch.randn(8, 6), rank=2)}
    write_peft_adapter(
        tmp_path, factors, embedding_names=set(), base_model_name_or_path=None, dtype=torch.float32
    )
    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        read_peft_adapter(tmp_path)


def test_write_peft_adapter_refuses_bad_input_and_skips_zero_deltas(tmp_path: Path) -> None:
    zero = factorize(torch.zeros(8, 6), rank=4)
    assert (zero.rank, zero.A.shape, zero.B.shape, zero.rel_error) == (0, (0, 6), (8, 0), 0.0)
    some = factorize(torch.randn(8, 6), rank=2)
    common: dict[str, Any] = {
        "embedding_names": set(),
        "base_model_name_or_path": None,
        "dtype": torch.float32,
    }
    with pytest.raises(ValueError, match="every delta is zero"):
        write_peft_adapter(tmp_path, {"m.weight": zero}, **common)
    with pytest.raises(ValueError, match=r"\.weight"):
        write_peft_adapter(tmp_path, {"m.bias": some}, **common)
    with pytest.raises(ValueError, match="target_modules"):
        write_peft_adapter(
            tmp_path, {"m.weight": some}, **common, extra_config={"target_modules": ["x"]}
        )
    write_peft_adapter(tmp_path, {"m.weight": some, "z.weight": zero}, **common)
    assert json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())["target_modules"] == ["m"]


def test_rank_pattern_keys_match_only_their_module() -> None:
    targets = ["lm_head", "mtp.lm_head", "model.layers.1.mlp.up_proj"]
    keys = {module: _pattern_key(module, targets) for module in targets}
    assert keys["mtp.lm_head"] == "mtp.lm_head"
    assert keys["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.up_proj"
    for module in targets:  # PEFT's own lookup picks each module's key, in any order
        for order in (list(keys.values()), list(reversed(keys.values()))):
            assert get_pattern_key(order, module) == keys[module]


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_energy_and_max_error_bounds_hold_on_every_module(pair: dict, method: str) -> None:
    for name in pair["factorable"]:
        delta = pair["v"][name]
        spectrum = torch.linalg.svdvals(delta.double()) ** 2
        share = spectrum / spectrum.sum()
        for energy, max_error in ((0.9, None), (None, 0.2), (0.5, 0.5), (1.0, None)):
            factor = factorize(delta, energy=energy, max_error=max_error, method=method)
            measured = float(torch.linalg.norm(delta - factor.B @ factor.A) / delta.norm())
            assert measured == pytest.approx(factor.rel_error, abs=1e-5)
            if energy is not None:
                assert factor.energy_kept >= energy - 1e-5
                assert 1 - measured**2 >= energy - 1e-5
            if max_error is not None:
                assert measured <= max_error + 1e-5
            # minimal: one rank less would break a bound
            tail = float(share[factor.rank - 1 :].sum())
            allowed = min(1 - (energy or 0.0), (max_error if max_error is not None else 1) ** 2)
            assert tail > allowed - 1e-6


def test_randomized_error_is_within_two_percent_of_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    m, n, k = 600, 400, 400
    u = torch.linalg.qr(torch.randn(m, k, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=generator)).Q
    spectrum = torch.cat([torch.linspace(10, 4, 8), 3 * torch.arange(1, k - 7).float() ** -0.8])
    delta = (u * spectrum) @ v.T + 0.01 * torch.randn(m, n, generator=generator)
    exact = factorize(delta, rank=16, method="exact")
    randomized = factorize(delta, rank=16)
    assert randomized.rank == exact.rank == 16
    assert randomized.rel_error <= 1.02 * exact.rel_error
    again = factorize(delta, rank=16)
    assert torch.equal(again.A, randomized.A) and torch.equal(again.B, randomized.B)
    # an energy bound the rank cap cuts off keeps the cheap randomized factor
    capped = factorize(delta, rank=16, energy=0.999)
    assert torch.equal(capped.A, randomized.A) and capped.energy_kept < 0.999


def test_randomized_energy_search_widens_its_sketch() -> None:
    generator = torch.Generator().manual_seed(0)
    m, n = 1200, 800
    u = torch.linalg.qr(torch.randn(m, n, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=generator)).Q
    spectrum = torch.cat([torch.linspace(2, 1, 100), torch.full((n - 100,), 0.01)])
    delta = (u * spectrum) @ v.T
    exact = factorize(delta, energy=0.99, method="exact")
    factor = factorize(delta, energy=0.99)
    assert factor.energy_kept >= 0.99 and 1 - factor.rel_error**2 >= 0.99 - 1e-5
    assert exact.rank <= factor.rank <= exact.rank + 2
    capped = factorize(delta, energy=0.99, rank=40)
    assert capped.rank == 40


def test_select_rank_caps_and_bounds() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert select_rank(s, energy=0.9) == 2
    assert select_rank(s, max_error=0.3) == 2
    assert select_rank(s, max_error=0.2) == 3
    assert select_rank(s, max_error=0.0) == 3
    assert select_rank(s, energy=0.9, max_error=0.2) == 3
    assert select_rank(s, energy=1.0, rank=2) == 2
    assert select_rank(s, rank=10) == 3
    assert select_rank(torch.tensor([3.0, 2.0, 0.0]), energy=1.0) == 2
    assert select_rank(torch.zeros(3), energy=0.5) == 0
    assert select_rank(s[:2], energy=0.9, total_energy=14.0) == 2
    assert select_rank(s[:2], energy=0.95, total_energy=14.0) == 2  # not met: all it has


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": -3}, "rank"),
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.5}, "energy"),
        ({"max_error": 1.0}, "max_error"),
        ({"max_error": -0.1}, "max_error"),
        ({}, "at least one"),
    ],
)
def test_bad_rank_options_raise_value_error(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_rank(torch.ones(3), **options)
    with pytest.raises(ValueError, match=message):
        factorize(torch.ones(3, 3), **options)


def test_factorize_refuses_bad_tensors_and_methods() -> None:
    with pytest.raises(ValueError, match="2-D"):
        factorize(torch.ones(3), rank=1)
    with pytest.raises(ValueError, match="non-finite"):
        factorize(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), rank=1)
    with pytest.raises(ValueError, match="method"):
        factorize(torch.ones(3, 3), rank=1, method="qr")


def test_factor_dataclass_holds_float32_cpu_factors() -> None:
    factor = factorize(torch.randn(10, 7, dtype=torch.bfloat16), rank=3)
    assert isinstance(factor, LoraFactor)
    assert (factor.A.shape, factor.B.shape) == ((3, 7), (10, 3))
    assert factor.A.dtype == factor.B.dtype == torch.float32
    tiny = 1e-25 * torch.randn(10, 7)  # squares underflow float32 unless rescaled
    exact = factorize(tiny, rank=7)
    assert exact.rank == 7 and exact.rel_error < 1e-5
    torch.testing.assert_close(exact.B @ exact.A, tiny, atol=1e-30, rtol=1e-4)


def _from_bits(bits: list[int], dtype: torch.dtype, bits_dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(bits, dtype=bits_dtype).view(dtype)


@pytest.mark.parametrize(
    ("dtype", "bits_dtype", "specials"),
    [
        (torch.float32, torch.int32, [0x7FC00001, 0xFFC12345 - 2**32, -(2**31)]),  # NaNs, -0.0
        (torch.bfloat16, torch.int16, [0x7FC1, 0xFFC3 - 2**16, -(2**15)]),
        (torch.float16, torch.int16, [0x7E01, -(2**15)]),
    ],
)
def test_sparse_round_trip_is_bit_exact(
    dtype: torch.dtype, bits_dtype: torch.dtype, specials: list[int]
) -> None:
    dense = torch.zeros(64, 48, dtype=dtype)
    dense[3, 5], dense[40, 47], dense[63, 0] = 1.5, -2.0, 1e-3
    dense.view(-1)[[7, 300, 3000][: len(specials)]] = _from_bits(specials, dtype, bits_dtype)
    parts = encode_sparse(dense)
    assert parts is not None and set(parts) == {INDEX_PART, VALUE_PART}
    assert sparse_nbytes(parts) < dense.nbytes
    assert sparse_ratio(dense) == pytest.approx(sparse_nbytes(parts) / dense.nbytes)
    restored = decode_sparse(parts, dense.shape, dtype)
    assert restored.dtype == dtype and restored.shape == dense.shape
    assert torch.equal(restored.view(bits_dtype), dense.view(bits_dtype))


def test_sparse_picks_the_smallest_index_layout() -> None:
    close = torch.zeros(10_000)
    close[::200] = 1.0
    far = torch.zeros(1_000_000)
    far[::5000] = 1.0
    farther = torch.zeros(1_000_000)
    farther[[0, 900_000]] = 1.0
    for tensor, index_dtype in ((close, torch.uint8), (far, torch.uint16), (farther, torch.int32)):
        parts = encode_sparse(tensor)
        assert parts is not None and parts[INDEX_PART].dtype == index_dtype
        assert torch.equal(decode_sparse(parts, tensor.shape, tensor.dtype), tensor)
    empty = encode_sparse(torch.zeros(5, 5))
    assert empty is not None and sparse_nbytes(empty) == 0
    assert torch.equal(decode_sparse(empty, (5, 5), torch.float32), torch.zeros(5, 5))


def test_sparse_returns_none_when_not_smaller() -> None:
    assert encode_sparse(torch.randn(32, 32)) is None
    half = torch.zeros(1000)
    half[::2] = 1.0  # 500 × (4-byte value + 1-byte gap) = 2500 < 4000 bytes
    assert encode_sparse(half) is not None
    assert encode_sparse(torch.ones(1000)) is None
    assert sparse_ratio(torch.ones(1000)) > 1
    assert sparse_tensor_names("w") == ("w.__sparse_idx", "w.__sparse_val")


def test_decode_sparse_refuses_inconsistent_parts() -> None:
    parts = encode_sparse(torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0, 0.0]))
    assert parts is not None
    with pytest.raises(ValueError, match="positions"):
        decode_sparse(parts, (2,), torch.float32)
    with pytest.raises(ValueError, match="expected"):
        decode_sparse(parts, (6,), torch.float16)
    bad = {INDEX_PART: torch.tensor([2, 2], dtype=torch.int32), VALUE_PART: torch.ones(2)}
    with pytest.raises(ValueError, match="increasing"):
        decode_sparse(bad, (6,), torch.float32)
