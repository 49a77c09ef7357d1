"""The design rules the code keeps (docs/design.md): short functions, library errors that name
Python parameters while the CLI names flags, options refused where they do not apply, one
shard default, one apply pre-flight for every path, lm-eval and manifest keys in one place."""

from __future__ import annotations

import ast
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rvhub import (
    InputError,
    RvhubError,
    apply_to_checkpoint,
    check_target,
    extract_vector,
    load_vector,
)
from rvhub.card.build import CardOptions
from rvhub.card.scores import load_scores
from rvhub.cli import extract as extract_command
from rvhub.cli import flag_message
from rvhub.constants import DEFAULT_MAX_SHARD
from rvhub.options import WriteOptions, parse_size
from tests.cli_helpers import assert_clean_failure, run
from tests.models import finetune_like

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rvhub"
MAX_LINES = 80
TASK_DIR = ROOT / "examples" / "toy_transfer" / "task"
sys.path.insert(0, str(TASK_DIR.parent))
import toy_transfer  # noqa: E402  (the example's tokenizer and model)


def test_no_function_in_rvhub_is_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert long == [], "functions over 80 lines (split them into named steps):\n" + "\n".join(long)


def test_lm_eval_is_imported_by_one_package_only():
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "lm_eval" or n.startswith("lm_eval.") for n in names):
                importers.add(path.relative_to(PACKAGE).parts[0])
    assert importers == {"evaluation"}


def test_no_module_but_manifest_reads_a_manifest_key_by_string():
    pattern = re.compile(r"manifest(\.get\(|\[\s*['\"])")
    readers = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in PACKAGE.rglob("*.py")
        if p.name != "manifest.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert readers == []


# -- library errors name parameters, the CLI names flags ----------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A toy Llama family with its tokenizer (A, B, a related target, an unrelated model)."""
    root = tmp_path_factory.mktemp("design-toy")
    paths: dict[str, Path] = {}
    torch.manual_seed(0)
    base = toy_transfer.new_model(toy_transfer.QUICK)
    for role, seed in (("a", 1), ("b", 2), ("target", 3)):
        model = toy_transfer.new_model(toy_transfer.QUICK)
        model.load_state_dict(base.state_dict())
        finetune_like(model, seed, scale=0.02)
        model.save_pretrained(root / role)
        toy_transfer.toy_tokenizer().save_pretrained(root / role)
        paths[role] = root / role
    torch.manual_seed(7)
    toy_transfer.new_model(toy_transfer.QUICK).save_pretrained(root / "unrelated")
    toy_transfer.toy_tokenizer().save_pretrained(root / "unrelated")
    paths["unrelated"] = root / "unrelated"
    paths["vec"] = extract_vector(paths["a"], paths["b"]).save(root / "vec")
    return paths


def _library_message(call) -> str:
    with pytest.raises(RvhubError) as info:
        call()
    message = str(info.value)
    assert "--" not in message, message
    return message


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


# (what, library call on (toy, out), CLI arguments on (toy, out), the flag the CLI names)
CASES = [
    (
        "rank out of range",
        lambda t, o: load_vector(t["vec"]).save(o, encoding="lora", rank=0),
        lambda t, o: ["compress", t["vec"], "-o", o, "--encoding", "lora", "--rank", "0"],
        "--rank",
    ),
    (
        "LoRA option without lora",
        lambda t, o: load_vector(t["vec"]).save(o, encoding="dense", rank=64),
        lambda t, o: ["compress", t["vec"], "-o", o, "--rank", "64"],
        "--rank",
    ),
    (
        "bad shard size",
        lambda t, o: load_vector(t["vec"]).save(o, max_shard_size="5XB"),
        lambda t, o: ["extract", t["a"], t["b"], "-o", o, "--max-shard-size", "5XB"],
        "--max-shard-size",
    ),
    (
        "bad threads",
        lambda t, o: load_vector(t["vec"]).save(o, threads=0),
        lambda t, o: ["compress", t["vec"], "-o", o, "--threads", "0"],
        "--threads",
    ),
    (
        "bad exclude regex",
        lambda t, o: extract_vector(t["a"], t["b"], exclude=["("]),
        lambda t, o: ["extract", t["a"], t["b"], "-o", o, "--exclude", "("],
        "--exclude",
    ),
    (
        "bad scale",
        lambda t, o: load_vector(t["vec"]).apply_to(_model(t["target"]), scale="nan"),  # type: ignore[arg-type]
        lambda t, o: ["apply", t["vec"], t["target"], "-o", o, "--scale", "nan"],
        "--scale",
    ),
    (
        "bad vocab",
        lambda t, o: apply_to_checkpoint(load_vector(t["vec"]), t["target"], o, vocab="some"),
        lambda t, o: ["apply", t["vec"], t["target"], "-o", o, "--vocab", "some"],
        "--vocab",
    ),
    (
        "bad dtype",
        lambda t, o: apply_to_checkpoint(load_vector(t["vec"]), t["target"], o, dtype="float16"),
        lambda t, o: ["apply", t["vec"], t["target"], "-o", o, "--dtype", "float16"],
        "--dtype",
    ),
    (
        "existing output",
        lambda t, o: apply_to_checkpoint(load_vector(t["vec"]), t["target"], t["unrelated"]),
        lambda t, o: ["apply", t["vec"], t["target"], "-o", t["unrelated"]],
        "--overwrite",
    ),
    (
        "empty tasks",
        lambda t, o: _evaluate(t, o, tasks=""),
        lambda t, o: [*_eval_args(t, o), "--tasks", ""],
        "--tasks",
    ),
    (
        "bad scales",
        lambda t, o: _evaluate(t, o, scales="1,x"),
        lambda t, o: [*_eval_args(t, o), "--tasks", "toy_addition", "--scales", "1,x"],
        "--scales",
    ),
    (
        "bad limit",
        lambda t, o: _evaluate(t, o, limit=-1),
        lambda t, o: [*_eval_args(t, o), "--tasks", "toy_addition", "--limit", "-1"],
        "--limit",
    ),
    (
        "bad batch size",
        lambda t, o: _evaluate(t, o, batch_size="many"),
        lambda t, o: [*_eval_args(t, o), "--tasks", "toy_addition", "--batch-size", "many"],
        "--batch-size",
    ),
    (
        "lm-eval file without a condition",
        lambda t, o: CardOptions.from_files(lm_eval=[str(o / "results.json")]),
        lambda t, o: ["card", t["vec"], "-o", o / "README.md", "--lm-eval", o / "results.json"],
        "--lm-eval",
    ),
    (
        "unknown lm-eval condition",
        lambda t, o: load_scores(lm_eval=["plsu=results.json"]),
        lambda t, o: ["card", t["vec"], "-o", o / "README.md", "--lm-eval", "plsu=results.json"],
        "--lm-eval: unknown condition 'plsu'",
    ),
]


def _evaluate(t: dict[str, Path], out: Path, **options):
    kwargs = {"tasks": ["toy_addition"], "include_path": TASK_DIR, "scales": [1.0], **options}
    return load_vector(t["vec"]).evaluate(_model(t["target"]), None, output_dir=out, **kwargs)


def _eval_args(t: dict[str, Path], out: Path) -> list[object]:
    return ["eval", t["vec"], t["target"], "-o", out, "--include-path", TASK_DIR]


@pytest.mark.parametrize(("what", "library", "cli", "flag"), CASES, ids=[c[0] for c in CASES])
def test_library_errors_name_the_parameter_and_the_cli_the_flag(
    toy, tmp_path, what, library, cli, flag
):
    pytest.importorskip("lm_eval")
    message = _library_message(lambda: library(toy, tmp_path / "lib"))
    assert "`" in message or "dtype" in message, message
    result = run(*cli(toy, tmp_path / "cli"))
    assert_clean_failure(result, match=flag, output=None)


def test_flag_message_translates_parameter_spellings():
    assert flag_message("`rank` must be positive") == "--rank must be positive"
    assert flag_message("pass `vocab='overlap'` to add") == "pass --vocab overlap to add"
    assert flag_message("pass `allow_unrelated=True`") == "pass --allow-unrelated"
    assert flag_message("or pass `config_check=False`") == "or pass --no-config-check"
    assert flag_message("`engine=vllm`: rank 600") == "--for vllm: rank 600"
    assert flag_message("run `rvhub apply` first") == "run `rvhub apply` first"


# -- options that do not apply are refused by the library ---------------------------------------


@pytest.mark.parametrize(
    ("encoding", "options", "named"),
    [
        ("dense", {"rank": 64}, "`rank`"),
        ("dense", {"svd": "exact"}, "`svd`"),
        ("sparse", {"engine": "vllm"}, "`engine`"),
        ("dense", {"base_model": "org/base", "energy": 0.9}, "`energy`, `base_model`"),
        ("sparse", {"device": "cuda"}, "`device`"),
    ],
)
def test_save_refuses_options_of_another_encoding(toy, tmp_path, encoding, options, named):
    with pytest.raises(InputError, match=re.escape(named) + r".*need `encoding=\"lora\"`"):
        load_vector(toy["vec"]).save(tmp_path / "out", encoding=encoding, **options)
    assert not (tmp_path / "out").exists()


def test_write_options_refuse_lora_options_with_another_encoding():
    from rvhub.options import LoraOptions

    with pytest.raises(InputError, match="`lora` options need"):
        WriteOptions(encoding="sparse", lora=LoraOptions(rank=4))
    with pytest.raises(InputError, match="needs `rank`, `energy` or `max_error`"):
        WriteOptions(encoding="lora")


# -- one shard default ----------------------------------------------------------------------------


def test_library_and_cli_share_one_decimal_shard_default(toy, tmp_path):
    cli_default = next(p.default for p in extract_command.params if p.name == "max_shard_size")
    assert cli_default == DEFAULT_MAX_SHARD == "5GB"
    assert WriteOptions().max_shard_bytes == parse_size(cli_default) == 5 * 10**9
    # the same vector, saved from Python and extracted from the shell, shards identically
    library = extract_vector(toy["a"], toy["b"]).save(tmp_path / "lib", max_shard_size="200KB")
    shell = tmp_path / "cli"
    result = run("extract", toy["a"], toy["b"], "-o", shell, "--max-shard-size", "200KB")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in library.iterdir() if p.suffix == ".safetensors")
    assert len(names) > 2
    assert names == sorted(p.name for p in shell.iterdir() if p.suffix == ".safetensors")
    for name in names:
        assert (library / name).read_bytes() == (shell / name).read_bytes()
    default = extract_vector(toy["a"], toy["b"]).save(tmp_path / "default")
    result = run("extract", toy["a"], toy["b"], "-o", tmp_path / "default-cli")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in default.iterdir() if p.suffix == ".safetensors") == sorted(
        p.name for p in (tmp_path / "default-cli").iterdir() if p.suffix == ".safetensors"
    )


# -- one pre-flight for disk apply, live apply, check and eval ------------------------------------


def _other_type_target(toy: dict[str, Path], family, root: Path) -> Path:
    folder = root / "qwen2-target"
    shutil.copytree(family("qwen2")["target"], folder)
    toy_transfer.toy_tokenizer().save_pretrained(folder)
    return folder


def _reshaped_target(toy: dict[str, Path], root: Path, bad: str) -> Path:
    """The toy target with a wider MLP (``shapes``) or 8 more tokens (``vocab``)."""
    from transformers import AutoConfig

    folder = root / f"{bad}-target"
    if bad == "vocab":
        model = _model(toy["target"])
        model.resize_token_embeddings(model.config.vocab_size + 8)
    else:
        config = AutoConfig.from_pretrained(toy["target"])
        config.intermediate_size += 16
        model = type(_model(toy["target"]))(config)
    model.save_pretrained(folder)
    toy_transfer.toy_tokenizer().save_pretrained(folder)
    return folder


def _nonfinite_vector(toy: dict[str, Path], root: Path) -> Path:
    """A vector whose one delta holds a NaN (extracted with ``allow_nonfinite=True``)."""
    from safetensors.torch import load_file, save_file

    a = root / "a-nan"
    shutil.copytree(toy["a"], a)
    weights = load_file(a / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, a / "model.safetensors", metadata={"format": "pt"})
    return extract_vector(a, toy["b"]).save(root / "vec-nan", allow_nonfinite=True)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("unrelated", "not of the vector's lineage"),
        ("model_type", "the vector was made for model_type llama, the target is qwen2"),
        ("shapes", "the vector does not fit the target: shape differs for"),
        ("vocab", "vocabulary size differs"),
        ("scale", "would change the weights by"),
        ("nonfinite", "holds NaN/Inf values"),
    ],
)
def test_every_apply_path_refuses_a_bad_target_with_one_message(
    toy, family, tmp_path, bad, expected
):
    pytest.importorskip("lm_eval")
    if bad == "model_type":
        target = _other_type_target(toy, family, tmp_path)
    elif bad in ("shapes", "vocab"):
        target = _reshaped_target(toy, tmp_path, bad)
    else:
        target = toy["unrelated"] if bad == "unrelated" else toy["target"]
    scale = 1e6 if bad == "scale" else 1.0
    vector = _nonfinite_vector(toy, tmp_path) if bad == "nonfinite" else toy["vec"]
    vec = load_vector(vector)
    messages = {
        "disk": _library_message(
            lambda: apply_to_checkpoint(vec, target, tmp_path / "disk", scale=scale)
        ),
        "live": _library_message(lambda: vec.apply_to(_model(target), scale=scale)),
        "eval": _library_message(
            lambda: vec.evaluate(
                _model(target),
                toy_transfer.toy_tokenizer(),
                tasks=["toy_addition"],
                include_path=TASK_DIR,
                scales=[scale],
                limit=1,
            )
        ),
    }
    if bad != "scale":  # check answers for α = 1: the scale has no flag there
        messages["check"] = _library_message(lambda: check_target(vector, target))
    assert expected in messages["disk"]
    assert len(set(messages.values())) == 1, messages
    cli = run("apply", vector, target, "-o", tmp_path / "cli", "--scale", str(scale))
    line = assert_clean_failure(cli, match=expected, output=tmp_path / "cli")
    assert line == "Error: " + " ".join(flag_message(messages["disk"]).split())
    if bad != "scale":
        checked = run("check", vector, target)
        assert checked.exit_code == cli.exit_code and line in checked.stderr


def test_options_and_individual_parameters_are_not_mixed(toy, tmp_path):
    from rvhub.options import ApplyOptions

    vec = load_vector(toy["vec"])
    with pytest.raises(InputError, match="pass `options` or the individual options"):
        vec.save(tmp_path / "out", dtype="float32", options=WriteOptions())
    with pytest.raises(InputError, match="pass `options` or the individual options"):
        apply_to_checkpoint(vec, toy["target"], tmp_path / "out", scale=2, options=ApplyOptions())
    assert not (tmp_path / "out").exists()
    # the options alone, or the parameters alone, are used as given
    report = vec.apply_to(_model(toy["target"]), options=ApplyOptions(scale=0.5))
    assert report.scale == 0.5


def test_one_exclude_string_is_one_pattern(toy, tmp_path):
    vec = extract_vector(toy["a"], toy["b"], exclude="embed_tokens")
    assert not any("embed_tokens" in n for n in vec.names)
    assert any("layers" in n for n in vec.names)
