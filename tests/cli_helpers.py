"""Running the CLI as a user does, and asserting how it fails."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from rvhub.cli import cli


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def tree_snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its bytes (None if absent), to prove nothing changed."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def assert_clean_failure(
    result: Result, *, match: str, output: Path | None = None, before: object = None
) -> str:
    """One line on stderr naming the problem, a documented non-zero exit (2 bad input,
    3 incompatible, 4 integrity, 5 Hub; never the generic 1), no traceback, output unchanged."""
    assert result.exit_code in (2, 3, 4, 5), (result.exit_code, result.output, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("Error: "), lines[0]
    assert match.lower() in lines[0].lower(), f"{match!r} not in {lines[0]!r}"
    if output is not None:
        assert tree_snapshot(output) == before, "the output path changed"
        if output.parent.exists():
            leftovers = [p.name for p in output.parent.iterdir() if ".rvhub-tmp-" in p.name]
            assert leftovers == [], leftovers
    return lines[0]
