"""The ``rvhub`` command line: a thin shell over the library.

Every :class:`~rvhub.errors.RvhubError` (and every usage error) becomes one line on stderr
and a non-zero exit code; a traceback means a bug in rvhub.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import RvhubError

DEBUG_ENV = "RVHUB_DEBUG"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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
            if os.environ.get(DEBUG_ENV):
                traceback.print_exc()
            click.echo(f"Error: {_one_line(str(e))}", err=True)
            code = e.exit_code
        except KeyboardInterrupt:
            click.echo("Interrupted; the output path was left as it was.", err=True)
            code = 130
        except MemoryError:
            click.echo("Error: out of memory", err=True)
            code = 1
        except OSError as e:
            if os.environ.get(DEBUG_ENV):
                traceback.print_exc()
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"Error: {e.strerror or _one_line(str(e))}{where}", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def _emit(text: str) -> None:
    click.echo(text)


def _float_arg(value: str, what: str) -> float:
    from .apply import check_scale

    try:
        return check_scale(value)
    except RvhubError:
        raise click.UsageError(f"{what} must be a finite number, not {value!r}") from None


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

    Sources are local folders (model.safetensors or a sharded index), .safetensors files or
    Hub ids (org/name or org/name@revision). Set RVHUB_DEBUG=1 for tracebacks.
    """
    _setup_logging(verbose)


exclude_option = click.option(
    "--exclude",
    "exclude",
    multiple=True,
    metavar="REGEX",
    help="Skip tensors whose name matches REGEX (repeatable), e.g. 'embed_tokens|lm_head' or 'norm'.",
)
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace the output folder if it exists."
)
nonfinite_option = click.option(
    "--allow-nonfinite", is_flag=True, help="Keep NaN/Inf deltas instead of refusing them."
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
) -> None:
    """Compute the reasoning vector v = A − B and save it to OUTPUT.

    A and B are two fine-tunes of one base model (e.g. GRPO and SFT). The difference is
    computed in float32, streamed tensor by tensor, and written atomically.
    """
    from .atomic import check_output
    from .extract import extract_vector
    from .safetensors_io import parse_dtype

    check_output(output, overwrite=overwrite)
    torch_dtype = parse_dtype(dtype) if dtype else None
    vec = extract_vector(a, b, revision_a=revision_a, revision_b=revision_b, exclude=exclude)
    path = vec.save(
        output,
        dtype=torch_dtype,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        max_shard_size=max_shard_size,
    )
    from .manifest import load_manifest

    manifest = load_manifest(path)
    stats = manifest["stats"]
    err = stats.get("roundtrip_error", {})
    _emit(
        f"wrote {path} ({len(manifest['tensors'])} tensors, "
        f"{_human(sum(f['size'] for f in manifest['files'].values()))}, "
        f"‖v‖ = {stats['norm']:.4g}, round-trip error {err.get('rel', 0):.2e} relative)"
    )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@cli.command()
@click.argument("vector")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit sha).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def inspect(vector: str, revision: str | None, as_json: bool) -> None:
    """Show a vector's sources, encoding, size, norms and round-trip error."""
    from .inspect import describe, summary
    from .load import load_vector

    vec = load_vector(vector, revision=revision)
    if as_json:
        _emit(json.dumps(summary(vec), indent=2))
    else:
        _emit(describe(vec))


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
@click.option("--revision", default=None, help="Hub revision of the vector.")
@click.option("--target-revision", default=None, help="Hub revision of the target model.")
@click.option(
    "--vocab",
    type=click.Choice(["strict", "overlap"]),
    default="strict",
    show_default=True,
    help="On a vocab-size mismatch: refuse, or add the delta to the shared rows (valid only when token ids agree).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the additions run: auto (cuda if available), cpu, cuda, cuda:1, ...",
)
@exclude_option
@overwrite_option
@nonfinite_option
def apply(
    vector: str,
    target: str,
    output: Path,
    scale: str,
    revision: str | None,
    target_revision: str | None,
    vocab: str,
    device: str,
    exclude: tuple[str, ...],
    overwrite: bool,
    allow_nonfinite: bool,
) -> None:
    """Write TARGET + scale·VECTOR as a new model folder OUTPUT.

    VECTOR is an rvhub folder or Hub id; TARGET a model folder or Hub id. The result keeps the
    target's dtype, shards, config and tokenizer, and loads with transformers.
    """
    from .apply import apply_to_checkpoint
    from .atomic import check_output
    from .load import load_vector

    alpha = _float_arg(scale, "--scale")
    check_output(output, overwrite=overwrite)
    vec = load_vector(vector, revision=revision)
    report = apply_to_checkpoint(
        vec,
        target,
        output,
        scale=alpha,
        exclude=list(exclude),
        vocab=vocab,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        revision=target_revision,
        device=device,
    )
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    _emit(f"wrote {report.output}: {report.summary()}")


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
    """Check a vector's files against their sha256 hashes (and optionally B + v ≈ A)."""
    from .load import load_vector, verify_artifact
    from .verify import verify_against

    vec = load_vector(vector, revision=revision, verify=False)
    assert vec.path is not None
    files = verify_artifact(vec.path, vec.meta["manifest"], full=True)
    _emit(f"ok: {len(files)} files match their sha256 in rvhub.json")
    if against:
        result = verify_against(vec, against[0], against[1], tolerance=tolerance)
        _emit(
            f"ok: B + v reproduces A: relative error {result['rel']:.3e} "
            f"(max abs {result['max_abs']:.3e}) over {result['tensors']} tensors"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="rvhub")


if __name__ == "__main__":  # pragma: no cover
    main()
