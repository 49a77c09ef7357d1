"""The ``rvhub`` command line: a thin shell over the library.

Every :class:`~rvhub.errors.RvhubError` (and every usage error) becomes one line on stderr
and a non-zero exit code; a traceback means a bug in rvhub.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ._version import __version__
from .constants import ENV_DEBUG
from .engines import ENGINE_NAMES
from .errors import InputError, RvhubError
from .io.progress import human_bytes
from .options import ApplyOptions, WriteOptions

if TYPE_CHECKING:
    from .card.build import CardOptions


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# The library's errors name Python parameters in backticks (`rank`, `vocab='overlap'`,
# `allow_unrelated=True`); this is the one place they become the flags a shell user types.
FLAGS: dict[str, str] = {
    "allow_nonfinite": "--allow-nonfinite",
    "allow_unrelated": "--allow-unrelated",
    "base_model": "--base-model",
    "batch_size": "--batch-size",
    "card": "--card",
    "density": "--density",
    "device": "--device",
    "dtype": "--dtype",
    "encoding": "--encoding",
    "energy": "--energy",
    "engine": "--for",
    "epsilon": "--epsilon",
    "eval_dir": "--eval",
    "exclude": "--exclude",
    "gamma": "--gamma",
    "include_path": "--include-path",
    "license": "--license",
    "limit": "--limit",
    "lm_eval": "--lm-eval",
    "max_error": "--max-error",
    "max_shard_size": "--max-shard-size",
    "method": "--method",
    "num_fewshot": "--num-fewshot",
    "overwrite": "--overwrite",
    "private": "--private",
    "rank": "--rank",
    "resume": "--resume",
    "revision": "--revision",
    "scale": "--scale",
    "scales": "--scales",
    "scores": "--scores",
    "svd": "--svd",
    "tasks": "--tasks",
    "template": "--template",
    "threads": "--threads",
    "vocab": "--vocab",
    "weights": "--weights",
}
NEGATED_FLAGS: dict[str, str] = {"config_check": "--no-config-check"}
_PARAMETER = re.compile(r"`(\w+)(?:=([^`]*))?`")
_PLAIN_VALUE = re.compile(r"[\w.:+-]+")


def flag_message(message: str) -> str:
    """A library message as a shell user should read it: `rank` -> --rank,
    `vocab='overlap'` -> --vocab overlap, `allow_unrelated=True` -> --allow-unrelated,
    `config_check=False` -> --no-config-check; other backticked text is left as it is."""

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if value == "False" and name in NEGATED_FLAGS:
            return NEGATED_FLAGS[name]
        if name not in FLAGS:
            return m.group(0)
        if value is None or value == "True":
            return FLAGS[name]
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        if quoted and _PLAIN_VALUE.fullmatch(value[1:-1]):
            value = value[1:-1]
        return f"{FLAGS[name]} {value}"

    return _PARAMETER.sub(flag, message)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every temp output is removed on the way out."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


class RvhubGroup(click.Group):
    """A click group whose every failure is one line on stderr and an exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = 0
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            result = super().main(
                args=args, prog_name=prog_name or "rvhub", standalone_mode=False, **extra
            )
            if isinstance(result, int):
                code = result
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            code = 130
        except click.ClickException as e:
            click.echo(f"Error: {_one_line(e.format_message())}", err=True)
            code = e.exit_code
        except RvhubError as e:
            if os.environ.get(ENV_DEBUG):
                traceback.print_exc()
            click.echo(f"Error: {_one_line(flag_message(str(e)))}", err=True)
            code = e.exit_code
        except KeyboardInterrupt:
            click.echo("Interrupted; the output path was left as it was.", err=True)
            code = 130
        except Terminated:
            click.echo("Terminated; the output path was left as it was.", err=True)
            code = 143
        except MemoryError:
            click.echo("Error: out of memory", err=True)
            code = 1
        except OSError as e:
            if os.environ.get(ENV_DEBUG):
                traceback.print_exc()
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"Error: {e.strerror or _one_line(str(e))}{where}", err=True)
            code = 1
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if standalone_mode:
            sys.exit(code)
        return code


class _ClickHandler(logging.Handler):
    """rvhub's log lines on the command's stderr (click's, so they land where its errors do),
    naming flags where the library names parameters."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(flag_message(self.format(record)), err=True)
        except Exception:  # a closed stream: logging must never end a command
            self.handleError(record)


def _not_rvhub(record: logging.LogRecord) -> bool:
    """rvhub's records reach the terminal through :class:`_ClickHandler` only, once."""
    return not record.name.startswith("rvhub")


def _setup_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    rvhub_logger = logging.getLogger("rvhub")
    for old in [h for h in rvhub_logger.handlers if isinstance(h, _ClickHandler)]:
        rvhub_logger.removeHandler(old)  # one per process, whatever ran before
    handler = _ClickHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    rvhub_logger.addHandler(handler)
    rvhub_logger.setLevel(level)
    for root_handler in logging.getLogger().handlers:  # the terminal's, not a test's capture
        if getattr(root_handler, "stream", None) is sys.stderr:
            root_handler.addFilter(_not_rvhub)
    if not verbose:
        # huggingface_hub logs retries and "no files have been modified" itself; the CLI says
        # what happened in one line (rvhub -v shows them).
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


@click.group(cls=RvhubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rvhub")
@click.option("-v", "--verbose", is_flag=True, help="Log what rvhub does.")
def cli(verbose: bool) -> None:
    """Extract, inspect, apply and verify reasoning vectors (v = A − B between fine-tunes).

    \b
    rvhub extract ORG/GRPO ORG/SFT -o ./vec       # v = A − B
    rvhub inspect ./vec                           # sources, norms, round-trip error
    rvhub apply ./vec TARGET -o ./out --scale 1   # TARGET + 1·v, loads with transformers
    rvhub verify ./vec --against A B              # hashes, and B + v ≈ A
    rvhub check ./vec TARGET                      # does TARGET descend from the vector's base?
    rvhub card ./vec --scores s.yaml -o README.md # preview the model card
    rvhub push ./vec user/name                    # publish vector + card in one commit

    Sources are local folders (model.safetensors or a sharded index), .safetensors files or
    Hub ids (org/name or org/name@revision). Set RVHUB_DEBUG=1 for tracebacks.
    """
    _setup_logging(verbose)


def _target_options(func: Any) -> Any:
    """The options ``apply`` and ``check`` share: revisions and the vocabulary rule."""
    for option in reversed(
        [
            click.option("--revision", default=None, help="Hub revision of the vector."),
            click.option(
                "--target-revision", default=None, help="Hub revision of the target model."
            ),
            click.option(
                "--vocab",
                type=click.Choice(["strict", "overlap"]),
                default="strict",
                show_default=True,
                help="On a vocab-size mismatch: refuse, or add the delta to the shared rows (valid only when token ids agree).",
            ),
            no_config_check_option,
        ]
    ):
        func = option(func)
    return func


exclude_option = click.option(
    "--exclude",
    "exclude",
    multiple=True,
    metavar="REGEX",
    help="Skip tensors whose name matches REGEX (repeatable), e.g. 'embed_tokens|lm_head' or 'norm'.",
)
no_config_check_option = click.option(
    "--no-config-check",
    is_flag=True,
    help="Accept checkpoints without a usable config.json (architecture checks are then skipped).",
)
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace the output folder if it exists."
)
nonfinite_option = click.option(
    "--allow-nonfinite", is_flag=True, help="Keep NaN/Inf deltas instead of refusing them."
)


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help=(
        "CPU threads to use, the writer thread included [default: every core this process "
        "may run on]; results are identical for any number."
    ),
)


base_model_option = click.option(
    "--base-model",
    "--target",
    "base_model",
    default=None,
    metavar="MODEL",
    help="The model A and B both descend from (a Hub id): the card's base_model, where the "
    "vector is listed in the Hub's model tree, and a LoRA adapter's base_model_name_or_path "
    "[default: found in A's and B's Hub metadata].",
)


def _encoding_options(func: Any) -> Any:
    """Options for writing a compressed vector (extract --encoding, compress)."""
    for option in reversed(
        [
            click.option(
                "--encoding",
                type=click.Choice(["dense", "lora", "sparse"]),
                default="dense",
                show_default=True,
                help="dense safetensors; lora: a stock PEFT adapter (+ dense biases/norms); sparse: only changed entries, exact.",
            ),
            click.option(
                "--rank",
                type=int,
                default=None,
                help="LoRA rank per module (caps --energy/--max-error).",
            ),
            click.option(
                "--energy",
                type=float,
                default=None,
                help="LoRA: keep this fraction of Σσ² per module, in (0, 1].",
            ),
            click.option(
                "--max-error",
                type=float,
                default=None,
                help="LoRA: relative Frobenius error bound per module, in [0, 1).",
            ),
            click.option(
                "--svd",
                type=click.Choice(["randomized", "exact"]),
                default="randomized",
                show_default=True,
                help="LoRA: randomized SVD (fast, within ~0.2% of exact) or exact SVD.",
            ),
            click.option(
                "--device",
                default="cpu",
                show_default=True,
                help="LoRA: where the SVDs run (cpu, cuda, auto).",
            ),
            click.option(
                "--for",
                "engine",
                type=click.Choice(ENGINE_NAMES),
                default="peft",
                show_default=True,
                help="LoRA: write what this engine loads (its modules, ranks); the rest stays dense.",
            ),
            threads_option,
        ]
    ):
        func = option(func)
    return func


def _report_written(path: Path) -> None:
    from .manifest import Manifest

    manifest = Manifest.read(path)
    size = human_bytes(manifest.nbytes)
    comp = manifest.compression
    if comp is not None:
        head = f"wrote {path} ({manifest.encoding}, {len(manifest.tensors)} tensors, {size}, "
        figures = comp.figures
        extra = f"{figures['ratio']:.1%} of dense"
        if comp.encoding == "lora":
            extra += (
                f", LoRA error {figures['overall_rel_error']:.3f} relative, "
                f"ranks {figures['ranks']['min']}–{figures['ranks']['max']}"
            )
        click.echo(head + extra + ")")
        report = comp.engines.get(comp.profile) if comp.encoding == "lora" else None
        if report and (report["share"] < 0.99 or not report["loads"] or report["server"]):
            from .ops.summary import engine_line

            click.echo(engine_line(comp.profile, report))
        return
    err = manifest.stats.roundtrip_error or {}
    click.echo(
        f"wrote {path} ({len(manifest.tensors)} tensors, {size}, ‖v‖ = {manifest.stats.norm:.4g}, "
        f"round-trip error {err.get('rel', 0):.2e} relative)"
    )


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder."
)
@click.option("--revision-a", default=None, help="Hub revision of A (or write A as org/name@rev).")
@click.option("--revision-b", default=None, help="Hub revision of B.")
@click.option(
    "--dtype",
    default=None,
    metavar="DTYPE",
    help="Storage dtype of the vector: bfloat16, float16, float32 [default: the sources' dtype].",
)
@exclude_option
@overwrite_option
@nonfinite_option
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Split vector.safetensors above this size.",
)
@no_config_check_option
@_encoding_options
@base_model_option
def extract(
    a: str,
    b: str,
    output: Path,
    revision_a: str | None,
    revision_b: str | None,
    dtype: str | None,
    exclude: tuple[str, ...],
    overwrite: bool,
    allow_nonfinite: bool,
    max_shard_size: str,
    no_config_check: bool,
    base_model: str | None,
    **encoding_options: Any,
) -> None:
    """Compute the reasoning vector v = A − B and save it to OUTPUT.

    A and B are two fine-tunes of one base model (e.g. GRPO and SFT). The difference is
    computed in float32, streamed tensor by tensor, and written atomically.
    """
    from .io.atomic import check_output
    from .vector import extract_vector

    options = WriteOptions.build(
        **encoding_options,
        dtype=dtype,
        allow_nonfinite=allow_nonfinite,
        max_shard_size=max_shard_size,
    )
    check_output(output, overwrite=overwrite, inputs=[a, b])
    vec = extract_vector(
        a,
        b,
        revision_a=revision_a,
        revision_b=revision_b,
        exclude=exclude,
        config_check=not no_config_check,
        base_model=base_model,
    )
    _report_written(vec.save(output, options=options, overwrite=overwrite))


@cli.command()
@click.argument("vector")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit sha).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@click.option(
    "--for",
    "engine",
    type=click.Choice(ENGINE_NAMES),
    default=None,
    help="LoRA: what this engine applies of the vector, and why not the rest.",
)
def inspect(vector: str, revision: str | None, as_json: bool, engine: str | None) -> None:
    """Show a vector's sources, encoding, size, norms and round-trip error."""
    from .vector import load_vector

    vec = load_vector(vector, revision=revision)
    if engine is not None:
        report = vec.engine_report(engine)
        click.echo(json.dumps(report, indent=2) if as_json else _engine_text(engine, report))
        return
    click.echo(json.dumps(vec.summary(), indent=2) if as_json else vec.describe())


def _engine_text(engine: str, report: dict[str, Any]) -> str:
    from .ops.summary import engine_line

    lines = [engine_line(engine, report)]
    if report["loads"]:
        lines.extend(f"  {p}" for p in report["problems"])
    lines.append(
        "  rvhub apply / load_vector(...).apply_to(model) applies the whole vector, dense part included"
    )
    return "\n".join(lines)


@cli.command()
@click.argument("vector")
@click.argument("target")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output model folder."
)
@click.option(
    "--scale",
    "-a",
    "scale",
    default="1.0",
    show_default=True,
    help="α in θ + α·v; negative removes.",
)
@_target_options
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the additions run: auto (cuda if available), cpu, cuda, cuda:1, ...",
)
@exclude_option
@overwrite_option
@nonfinite_option
@click.option(
    "--allow-unrelated",
    is_flag=True,
    help="Apply even when TARGET does not descend from the vector's base (see `rvhub check`).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16"]),
    default=None,
    help="FP8 target: write the result dequantized as bfloat16 [default: FP8, requantized].",
)
@threads_option
def apply(
    vector: str,
    target: str,
    output: Path,
    scale: str,
    revision: str | None,
    target_revision: str | None,
    vocab: str,
    no_config_check: bool,
    device: str,
    exclude: tuple[str, ...],
    overwrite: bool,
    allow_nonfinite: bool,
    allow_unrelated: bool,
    dtype: str | None,
    threads: int | None,
) -> None:
    """Write TARGET + scale·VECTOR as a new model folder OUTPUT.

    VECTOR is an rvhub folder or Hub id; TARGET a model folder or Hub id. The result keeps the
    target's dtype, shards, config and tokenizer, and loads with transformers.
    """
    from .io.atomic import check_output
    from .vector import apply_to_checkpoint, load_vector

    options = ApplyOptions(
        scale=scale,
        exclude=exclude,
        vocab=vocab,
        allow_nonfinite=allow_nonfinite,
        allow_unrelated=allow_unrelated,
        dtype=dtype,
        device=device,
        threads=threads,
    )
    check_output(output, overwrite=overwrite, inputs=[vector, target])
    vec = load_vector(vector, revision=revision)
    report = apply_to_checkpoint(
        vec,
        target,
        output,
        options=options,
        overwrite=overwrite,
        revision=target_revision,
        config_check=not no_config_check,
    )
    for note in report.notes:
        if note not in report.warned:  # a warning was shown once already, by the logger
            click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {report.output}: {report.summary()}")


@cli.command()
@click.argument("vector")
@click.option("--revision", default=None, help="Hub revision of the vector.")
@click.option(
    "--against",
    nargs=2,
    default=None,
    metavar="A B",
    help="Also check that B + v reproduces A within the recorded round-trip error.",
)
@click.option("--tolerance", default=None, type=float, help="Relative error allowed for --against.")
def verify(
    vector: str, revision: str | None, against: tuple[str, str] | None, tolerance: float | None
) -> None:
    """Check a vector's files against their hashes in rvhub.json (and optionally B + v ≈ A)."""
    from .manifest import verify_artifact
    from .vector import load_vector

    vec = load_vector(vector, revision=revision, verify=False)
    assert vec.path is not None and vec.manifest is not None
    files = verify_artifact(vec.path, vec.manifest, full=True)
    click.echo(f"ok: {len(files)} files match their {vec.manifest.file_hash} in rvhub.json")
    if against:
        result = vec.verify_against(against[0], against[1], tolerance=tolerance)
        click.echo(
            f"ok: B + v reproduces A: relative error {result['rel']:.3e} "
            f"(max abs {result['max_abs']:.3e}) over {result['tensors']} tensors"
        )


@cli.command()
@click.argument("vector")
@click.argument("target")
@_target_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def check(
    vector: str,
    target: str,
    revision: str | None,
    target_revision: str | None,
    vocab: str,
    no_config_check: bool,
    as_json: bool,
) -> None:
    """Check that VECTOR fits TARGET, without writing anything: shapes, model type, vocab,
    and lineage (does TARGET descend from the vector's base?).

    Reads the manifest, the lineage fingerprint, TARGET's headers and a few values per tensor,
    and checks the digest of every vector file on this machine (a Hub vector's weights are not
    downloaded). Exits 0 when an apply would go ahead, and with the code the apply would exit
    with when it would refuse (2 bad input, 3 incompatible, 4 a damaged vector).
    """
    from .check import check_target

    result = check_target(
        vector,
        target,
        revision=revision,
        target_revision=target_revision,
        vocab=vocab,
        config_check=not no_config_check,
    )
    lineage = result.lineage
    if as_json:
        record = {"lineage": lineage.as_json(), "applies": len(result.plan.targets)}
        record.update(verified=result.verified, not_downloaded=result.absent)
        click.echo(json.dumps(record))
        return
    click.echo(f"fits: {len(result.plan.targets)} tensors would be applied")
    absent = f"; {len(result.absent)} not downloaded (apply checks them)" if result.absent else ""
    click.echo(f"integrity: {len(result.verified)} vector files match rvhub.json{absent}")
    click.echo(lineage.describe())
    for name, dist in sorted(lineage.tensors.items(), key=lambda kv: -kv[1])[:10]:
        click.echo(f"  {dist:8.4f}  {name}")


def _floats(text: str | None, flag: str) -> list[float] | None:
    """``0.5`` or ``0.5,0.3`` (one value, or one per vector) as floats."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: numbers separated by commas", param_hint=flag
        ) from None


@cli.command()
@click.argument("vectors", nargs=-1, required=True)
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder."
)
@click.option(
    "--method",
    type=click.Choice(
        ["linear", "ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs",
         "breadcrumbs_ties"]
    ),
    default="ties",
    show_default=True,
    help="How the deltas are combined (docs/merge.md); mergekit's methods and defaults.",
)  # fmt: skip
@click.option("--weights", default=None, help="Weight per vector (w1,w2,...; one for all) [1].")
@click.option("--density", default=None, help="Share of each delta kept (one, or per vector) [1].")
@click.option(
    "--gamma", default=None, help="breadcrumbs: share of the largest entries dropped [0.01]."
)
@click.option("--epsilon", default=None, help="DELLA: spread of keep probabilities [0.15].")
@click.option(
    "--normalize/--no-normalize",
    default=None,
    help="Divide by the sum of the kept weights [the method's default].",
)
@click.option("--seed", default=0, show_default=True, type=int, help="DARE/DELLA masks' seed.")
@click.option(
    "--allow-unrelated",
    is_flag=True,
    help="Merge even when the vectors' bases are of different lineages.",
)
@_encoding_options
@overwrite_option
@nonfinite_option
def merge(
    vectors: tuple[str, ...],
    output: Path,
    method: str,
    weights: str | None,
    density: str | None,
    gamma: str | None,
    epsilon: str | None,
    normalize: bool | None,
    seed: int,
    allow_unrelated: bool,
    overwrite: bool,
    allow_nonfinite: bool,
    **encoding_options: Any,
) -> None:
    """Merge VECTORS (folders or Hub ids) into one vector with TIES, DARE, DELLA, breadcrumbs
    or a weighted sum, streamed one tensor at a time.

    \b
    rvhub merge ./reasoning ./code -o ./both --method ties --density 0.5
    rvhub merge ./v1 ./v2 ./v3 -o ./avg --method linear --weights 0.5,0.3,0.2
    """
    from .io.atomic import check_output
    from .vector import load_vector, merge_vectors

    options = WriteOptions.build(**encoding_options, allow_nonfinite=allow_nonfinite)
    check_output(output, overwrite=overwrite, inputs=list(vectors))
    merged = merge_vectors(
        [load_vector(v) for v in vectors],
        method=method,
        weights=_floats(weights, "--weights"),
        density=_floats(density, "--density"),
        gamma=_floats(gamma, "--gamma"),
        epsilon=_floats(epsilon, "--epsilon"),
        normalize=normalize,
        seed=seed,
        allow_unrelated=allow_unrelated,
    )
    _report_written(merged.save(output, options=options, overwrite=overwrite))


@cli.command()
@click.option(
    "--for",
    "model",
    required=True,
    metavar="MODEL",
    help="The model you hold: a Hub id or a local folder (its card or config names its base).",
)
@click.option("--task", default=None, help="Sort by this task's Δ (e.g. gsm8k), best first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of the table.")
def search(model: str, task: str | None, as_json: bool) -> None:
    """List the rvhub vectors on the Hub made for MODEL's lineage, and whether each fits.

    Walks MODEL up its base_model chain, lists the vectors whose card declares one of those
    models as base_model, and checks each as `rvhub check` does from its rvhub.json and lineage
    fingerprint (never its weights): model type always; shapes and lineage when MODEL's files
    are on this machine.

    \b
    rvhub search --for Qwen/Qwen2.5-1.5B-Instruct --task gsm8k
    """
    from .search import search_vectors

    matches = search_vectors(model, task=task)
    if as_json:
        click.echo(json.dumps([m.as_json() for m in matches], indent=2))
        return
    if not matches:
        click.echo(f"no rvhub vector on the Hub declares {model} or its base models as base_model")
        return
    rows = [
        (
            "vector",
            "revision",
            "encoding",
            "size",
            f"Δ {task or 'first metric'}",
            "downloads",
            "fits",
        )
    ]
    for m in matches:
        fits = {True: "yes", False: "no", None: "?"}[m.fits]
        rows.append(
            (
                m.repo_id,
                (m.revision or "")[:8],
                m.encoding or "?",
                human_bytes(m.size) if m.size is not None else "?",
                _delta_cell(m, task),
                str(m.downloads if m.downloads is not None else "?"),
                fits,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for m in matches:
        if m.fits is not True and m.reason:
            click.echo(f"{m.repo_id}: {m.reason}")


def _delta_cell(match: Any, task: str | None) -> str:
    """``+0.045 (α +1)``: the best reported Δ of the first metric matching ``task``."""
    name = match.metric(task)
    if name is None:
        return "–"
    scale = match.best_scales.get(name)
    return f"{match.deltas[name]:+.3f}" + (f" (α {scale:+g})" if scale is not None else "")


@cli.command("eval")
@click.argument("vector")
@click.argument("target")
@click.option(
    "--tasks", required=True, help="lm-eval task names, comma-separated (e.g. gsm8k,bbh)."
)
@click.option(
    "--scales",
    default="-1,0,1",
    show_default=True,
    help="The α values to evaluate, comma-separated (α = 0 is the target alone).",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder."
)
@click.option(
    "--include-path",
    type=click.Path(path_type=Path),
    default=None,
    help="A folder of your own lm-eval task YAMLs.",
)
@click.option(
    "--limit",
    default=None,
    type=float,
    help="At most this many examples per task (lm-eval's --limit).",
)
@click.option(
    "--num-fewshot", default=None, type=int, help="Few-shot examples (lm-eval's --num_fewshot)."
)
@click.option(
    "--batch-size", default="1", show_default=True, help="lm-eval batch size (an int, or auto)."
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the model runs: auto (cuda if available), cpu, cuda, cuda:1, ...",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
    help="The dtype the target is loaded in (auto: as stored).",
)
@_target_options
@exclude_option
@overwrite_option
@click.option(
    "--resume",
    is_flag=True,
    help="Take up an interrupted sweep of OUTPUT (same vector, target, tasks and settings): "
    "only the missing α are evaluated.",
)
@click.option(
    "--allow-unrelated",
    is_flag=True,
    help="Evaluate even when TARGET does not descend from the vector's base.",
)
@click.option(
    "--engine",
    type=click.Choice(["hf", "vllm"]),
    default="hf",
    show_default=True,
    help="hf: transformers in this process (lm-eval's hf model). vllm: a vLLM engine (lm-eval's "
    "vllm model), α switched inside it; needs vLLM installed (docs/eval.md).",
)
@click.option(
    "--tensor-parallel-size", default=1, show_default=True, type=click.IntRange(min=1),
    help="vllm: GPUs the model is split across.",
)  # fmt: skip
@click.option(
    "--gpu-memory-utilization", default=None, type=click.FloatRange(0, 1, min_open=True),
    help="vllm: the share of each GPU's memory vLLM may take (vLLM's default: 0.9).",
)  # fmt: skip
@click.option(
    "--max-model-len", default=None, type=click.IntRange(min=1),
    help="vllm: the longest sequence the engine serves (prompt + generation).",
)  # fmt: skip
@click.option(
    "--vllm-switch", type=click.Choice(["auto", "in-place", "layerwise"]), default="auto",
    show_default=True,
    help="vllm: how α is set in the engine. layerwise: every tensor through vLLM's reload "
    "(exact anywhere). in-place: only the touched tensors, into the parameters vLLM computes "
    "with (on a CPU its packed layers are made plain F.linear first). auto: in-place where "
    "vLLM computes with its parameters as loaded (unquantized, GPU), else layerwise.",
)  # fmt: skip
@click.option(
    "--model-args", default=None, metavar="K=V,...",
    help="More arguments for lm-eval's model (as lm_eval --model_args spells them): vLLM's "
    "engine arguments with --engine vllm (e.g. enforce_eager=True), HFLM's with hf.",
)  # fmt: skip
@click.option(
    "--apply-chat-template", is_flag=False, flag_value="", default=None, metavar="[TEMPLATE]",
    help="Wrap prompts in the target's chat template (or the named one), as lm-eval's "
    "--apply_chat_template; instruct targets need it.",
)  # fmt: skip
@click.option(
    "--fewshot-as-multiturn", is_flag=True,
    help="Few-shot examples as chat turns (needs --apply-chat-template).",
)  # fmt: skip
@click.option("--system-instruction", default=None, help="A system prompt for every example.")
@click.option(
    "--gen-kwargs", default=None, metavar="K=V,...",
    help="Generation arguments for generate_until tasks (lm-eval's --gen_kwargs), e.g. "
    "temperature=0,max_gen_toks=512.",
)  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int, help="lm-eval's seeds.")
@click.option(
    "--log-samples", is_flag=True,
    help="Keep every example's prompt and response: alpha_<α>/samples_<task>.jsonl.",
)  # fmt: skip
def eval_(
    vector: str,
    target: str,
    tasks: str,
    scales: str,
    output: Path,
    include_path: Path | None,
    limit: float | None,
    num_fewshot: int | None,
    batch_size: str,
    device: str,
    dtype: str,
    revision: str | None,
    target_revision: str | None,
    vocab: str,
    no_config_check: bool,
    exclude: tuple[str, ...],
    overwrite: bool,
    resume: bool,
    allow_unrelated: bool,
    **flags: Any,
) -> None:
    """Evaluate TARGET + α·VECTOR with lm-evaluation-harness for each α of --scales.

    TARGET (a model folder or Hub id) is loaded once, by transformers (--engine hf) or by a vLLM
    engine (--engine vllm); for each α its weights are set to exactly round(θ + α·v), θ
    re-read from TARGET's files (no copy of the model is kept). OUTPUT gets lm-eval's results per α
    (alpha_<α>/results.json), sweep.json (per metric: value and stderr at each α, the best α)
    and eval_sweep.png; lm-eval's own log goes to lm-eval.log there. Each finished α is kept
    when the sweep is interrupted: rerun with --resume to evaluate only the rest.
    `rvhub card --eval OUTPUT` and `rvhub push --eval OUTPUT` publish it. Needs
    `pip install "rvhub[eval]"` (and vLLM for --engine vllm; docs/eval.md).

    \b
    rvhub eval ./vec Qwen/Qwen2.5-1.5B-Instruct --tasks gsm8k --scales -1,0,0.5,1 -o eval-out
    """
    from .evaluation import LOG_NAME, load_eval_target, require_lm_eval
    from .io.atomic import check_output
    from .vector import load_vector

    options = ApplyOptions(exclude=exclude, vocab=vocab, allow_unrelated=allow_unrelated)
    engine, engine_options, extra, lm_options = _eval_flags(
        flags, device != "auto" or dtype != "auto"
    )
    require_lm_eval()
    check_output(output, overwrite=overwrite, inputs=[vector, target, include_path])
    vec = load_vector(vector, revision=revision)
    common: dict[str, Any] = dict(
        tasks=tasks, scales=scales, output_dir=output, include_path=include_path, limit=limit,
        batch_size=batch_size, num_fewshot=num_fewshot, options=options, overwrite=overwrite,
        resume=resume, on_point=_echo_point, seed=flags["seed"], lm_eval_options=lm_options,
    )  # fmt: skip
    if engine == "vllm":
        sweep = vec.evaluate(
            target, engine="vllm", revision=target_revision, config_check=not no_config_check,
            engine_options=engine_options, **common,
        )  # fmt: skip
    else:
        model, tokenizer, name = load_eval_target(
            target, revision=target_revision, device=device, dtype=dtype,
            config_check=not no_config_check,
        )  # fmt: skip
        sweep = vec.evaluate(model, tokenizer, target=name, model_args=extra, **common)
    for m in sweep.summary()["metrics"]:
        click.echo(
            f"best α for {m['task']} {m['label']}: {m['best']['scale']:+g} ({m['best']['value']:.4g}; reported, not applied)"
        )
    click.echo(f"wrote {output} (lm-eval's log: {output / LOG_NAME})")


def _echo_point(point: Any) -> None:
    """One line per finished α of ``rvhub eval``."""
    from .evaluation import metric_values

    shown = ", ".join(f"{m.task} {m.label} {m.value:.4g}" for m in metric_values(point.results))
    click.echo(
        f"α = {point.scale:+g}: {shown} (set in {point.switch_seconds:.2f} s, evaluated in {point.eval_seconds:.1f} s)"
    )


def _eval_flags(flags: dict[str, Any], hf_flags: bool) -> tuple[str, Any, dict[str, Any], dict]:
    """``rvhub eval``'s engine and lm-eval options: the engine, vLLM's options, the
    ``--model-args`` and the lm-eval options; one line for an option of the other engine."""
    from .evaluation.vllm_engine import VllmOptions, parse_model_args

    engine = flags["engine"]
    vllm_flags = {
        "--tensor-parallel-size": flags["tensor_parallel_size"] != 1,
        "--gpu-memory-utilization": flags["gpu_memory_utilization"] is not None,
        "--max-model-len": flags["max_model_len"] is not None,
        "--vllm-switch": flags["vllm_switch"] != "auto",
    }
    if engine == "hf" and any(vllm_flags.values()):
        given = next(k for k, v in vllm_flags.items() if v)
        raise InputError(f"{given} is an option of --engine vllm")
    if engine == "vllm" and hf_flags:
        raise InputError(
            "--device and --dtype are options of --engine hf: vLLM places the model itself "
            "(pass dtype=... in --model-args)"
        )
    extra = parse_model_args(flags["model_args"])
    template = flags["apply_chat_template"]
    lm_options = {
        "apply_chat_template": True if template == "" else template,
        "fewshot_as_multiturn": flags["fewshot_as_multiturn"] or None,
        "system_instruction": flags["system_instruction"],
        "gen_kwargs": flags["gen_kwargs"],
        "log_samples": flags["log_samples"] or None,
    }
    if engine != "vllm":
        return engine, None, extra, lm_options
    engine_options = VllmOptions(
        tensor_parallel_size=flags["tensor_parallel_size"],
        gpu_memory_utilization=flags["gpu_memory_utilization"],
        max_model_len=flags["max_model_len"],
        model_args=extra,
        switch=flags["vllm_switch"],
    )
    return engine, engine_options, {}, lm_options


def _card_options(func: Any) -> Any:
    """The options ``card`` and ``push`` share: scores, template, license, target."""
    for option in reversed(
        [
            click.option(
                "--scores",
                "scores",
                multiple=True,
                type=click.Path(path_type=Path),
                metavar="FILE",
                help="Benchmark scores in rvhub's YAML/JSON format (repeatable; see docs/card.md).",
            ),
            click.option(
                "--lm-eval",
                "lm_eval",
                multiple=True,
                metavar="COND=FILE",
                help="An lm-evaluation-harness results JSON for one condition: baseline=, plus= or minus= (repeatable).",
            ),
            click.option(
                "--eval",
                "eval_dir",
                default=None,
                type=click.Path(path_type=Path),
                metavar="DIR",
                help="An `rvhub eval` output folder: the α sweep goes in the card (table + plot) and in .eval_results/.",
            ),
            click.option(
                "--template",
                type=click.Path(path_type=Path),
                default=None,
                metavar="FILE",
                help="Your own jinja2 card template (rendered in a sandbox) instead of the default.",
            ),
            click.option(
                "--license",
                "license_",
                default=None,
                help="License id for the card [default: the sources' license when known].",
            ),
            click.option(
                "--target",
                default=None,
                help="The model the vector is meant for, shown in the usage examples.",
            ),
            click.option(
                "--base-model",
                "base_model",
                default=None,
                metavar="MODEL",
                help="Set or correct the card's base_model: the Hub id of the model A and B "
                "descend from [default: the one recorded at extract].",
            ),
        ]
    ):
        func = option(func)
    return func


def _card_arguments(options: dict[str, Any]) -> CardOptions:
    """The ``_card_options`` as :class:`~rvhub.card.build.CardOptions`."""
    from .card.build import CardOptions

    return CardOptions.from_files(
        options["scores"],
        lm_eval=options["lm_eval"],
        eval_dir=options["eval_dir"],
        template=options["template"],
        license=options["license_"],
        target=options["target"],
        base_model=options["base_model"],
    )


@cli.command()
@click.argument("vector")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write the card (README.md); the norm plot goes next to it.",
)
@click.option(
    "--repo-id", default=None, help="The repo the card is for [default: YOUR-USER/<folder>]."
)
@click.option("--revision", default=None, help="Hub revision, when VECTOR is a Hub id.")
@_card_options
def card(
    vector: str,
    output: Path,
    repo_id: str | None,
    revision: str | None,
    **card_options: Any,
) -> None:
    """Render VECTOR's model card (README.md with Hub metadata and scores) to preview it.

    \b
    rvhub card ./vec --scores scores.yaml -o README.md
    rvhub card ./vec --lm-eval baseline=base.json --lm-eval plus=plus.json -o README.md
    """
    from .card.build import build_card, default_repo_id
    from .hub.resolve import resolve_artifact

    options = _card_arguments(card_options)
    folder, origin = resolve_artifact(vector, revision=revision)
    repo_id = repo_id or default_repo_id(folder, origin)
    rendered = build_card(folder, repo_id=repo_id, **options.arguments())
    written = rendered.save(output, inputs=[folder, *options.read])
    click.echo("wrote " + ", ".join(str(p) for p in written))


@cli.command()
@click.argument("vector", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option(
    "--private", is_flag=True, help="Create the repo as private (when it does not exist)."
)
@click.option("--revision", default=None, help="Branch to push to (created from main if missing).")
@click.option("--commit-message", default=None, help="Commit summary.")
@click.option(
    "--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch."
)
@click.option(
    "--card",
    "card_file",
    type=click.Path(path_type=Path),
    default=None,
    metavar="README",
    help="Upload this ready card (e.g. an edited `rvhub card` output) instead of rendering one.",
)
@_card_options
def push(
    vector: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    create_pr: bool,
    card_file: Path | None,
    **card_options: Any,
) -> None:
    """Publish the vector folder VECTOR to the Hub repo REPO_ID (user/name) in one commit.

    Every file is checked against its hash first; the model card (README.md + norm plot) is
    rendered and uploaded with it. The token comes from HF_TOKEN or `hf auth login`.
    Pushing an unchanged vector makes no commit.
    """
    from .hub.push import push_vector

    card_args = _card_arguments(card_options).arguments()
    result = push_vector(
        vector,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        card=card_file,
        **card_args,
    )
    if not result.changed:
        click.echo(f"no changes; {result.url} already at {result.commit_sha}")
    elif result.pr_url:
        click.echo(f"opened {result.pr_url} (commit {result.commit_sha})")
    else:
        click.echo(f"pushed to {result.url} (commit {result.commit_sha})")


@cli.command()
@click.argument("vector")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder."
)
@click.option("--revision", default=None, help="Hub revision of the vector.")
@click.option(
    "--dtype", default=None, metavar="DTYPE", help="Storage dtype [default: the vector's]."
)
@_encoding_options
@base_model_option
@exclude_option
@overwrite_option
@nonfinite_option
def compress(
    vector: str,
    output: Path,
    revision: str | None,
    dtype: str | None,
    exclude: tuple[str, ...],
    overwrite: bool,
    allow_nonfinite: bool,
    base_model: str | None,
    **encoding_options: Any,
) -> None:
    """Re-encode an existing vector: LoRA (a stock PEFT adapter) or lossless sparse.

    \b
    rvhub compress ./vec -o ./vec-lora --encoding lora --rank 64
    rvhub compress ./vec -o ./vec-lora --encoding lora --energy 0.95
    rvhub compress ./vec -o ./vec-sparse --encoding sparse
    """
    from .io.atomic import check_output
    from .vector import load_vector

    options = WriteOptions.build(**encoding_options, dtype=dtype, allow_nonfinite=allow_nonfinite)
    check_output(output, overwrite=overwrite, inputs=[vector])
    vec = load_vector(vector, revision=revision)
    if base_model is not None:
        vec = vec.with_base_model(base_model)
    _report_written(vec.save(output, options=options, exclude=exclude, overwrite=overwrite))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run one command, then leave without the interpreter's
    teardown (tearing torch down costs a noticeable share of a short command; docs/design.md).

    By the time a command returns its files are written, fsynced and closed and its threads
    joined, so running the atexit handlers and flushing the standard streams is all that is
    left to do. A crash (a bug, not a user error) still ends the normal way, with its traceback.
    """
    code = cli.main(
        args=list(argv) if argv is not None else None, prog_name="rvhub", standalone_mode=False
    )
    _exit_now(code if isinstance(code, int) else 0)


def _exit_now(code: int) -> NoReturn:
    # atexit handlers still run (logging's flush, torch's and huggingface_hub's clean-ups,
    # rvhub.io.gpu's unpinning); only the interpreter's own teardown is skipped.
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # a closed pipe (rvhub inspect | head) has nothing left to keep
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
