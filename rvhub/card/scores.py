"""Benchmark scores for a card: rvhub's small YAML/JSON format and lm-evaluation-harness
results files, read strictly (unknown keys are refused with a suggestion) and combined into
one :class:`Scores` of rows measured under up to three conditions.

Example:
    >>> scores = load_scores(["scores.yaml"], lm_eval=[("plus", "plus.json")])
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..evaluation.sweep import as_dict, metric_values, read_sweep, results_model_name

DEFAULT_TASK_TYPE = "text-generation"
# The three measurements a benchmark row can hold: the target alone, target + α·v, target − α·v.
CONDITIONS = ("baseline", "plus_vector", "minus_vector")
CONDITION_LABELS = {"baseline": "baseline", "plus_vector": "+vector", "minus_vector": "-vector"}
# What `lm_eval` (CONDITION=FILE) accepts as CONDITION.
LM_EVAL_CONDITIONS = {
    "baseline": "baseline",
    "base": "baseline",
    "plus": "plus_vector",
    "plus_vector": "plus_vector",
    "minus": "minus_vector",
    "minus_vector": "minus_vector",
}

_TOP_KEYS = {"target", "scale", "source", "benchmarks"}
_BENCHMARK_KEYS = {"task", "task_type", "dataset", "metric", "stderr", *CONDITIONS}
_DATASET_KEYS = {"id", "name", "config", "split", "revision", "args"}
_METRIC_KEYS = {"type", "name"}
_SOURCE_KEYS = {"name", "url"}


@dataclass
class Benchmark:
    """One benchmark metric, measured under up to three conditions (see :data:`CONDITIONS`)."""

    task: str
    metric_type: str
    metric_name: str
    task_type: str = DEFAULT_TASK_TYPE
    dataset_id: str = ""
    dataset_name: str = ""
    dataset_config: str | None = None
    dataset_split: str | None = None
    dataset_revision: str | None = None
    dataset_args: dict[str, Any] | None = None
    values: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # condition -> file it came from

    @property
    def key(self) -> tuple[str, str, str]:
        """What identifies the benchmark when several files are combined."""
        return (self.task, self.metric_type, self.metric_name)

    def delta(self, condition: str) -> float | None:
        """``condition − baseline``, or None when either is missing."""
        if condition not in self.values or "baseline" not in self.values:
            return None
        return self.values[condition] - self.values["baseline"]


@dataclass
class Scores:
    """Benchmark results for a card: which target was measured, at which scale α, and the rows."""

    benchmarks: list[Benchmark] = field(default_factory=list)
    target: str | None = None
    scale: float | None = None
    source_name: str | None = None
    source_url: str | None = None
    sweep: dict[str, Any] | None = None  # an `rvhub eval` sweep.json (see load_sweep)

    def __bool__(self) -> bool:
        return bool(self.benchmarks)


def load_scores(
    paths: Iterable[str | os.PathLike[str]] = (),
    *,
    lm_eval: Mapping[str, str | os.PathLike[str]]
    | Iterable[str | tuple[str, str | os.PathLike[str]]] = (),
    eval_dir: str | os.PathLike[str] | None = None,
) -> Scores:
    """Read and combine score files: rvhub's YAML/JSON format, lm-eval-harness results and an
    ``rvhub eval`` output folder (``eval_dir``, see :func:`load_sweep`).

    ``lm_eval`` maps a condition (``baseline``, ``plus`` or ``minus``) to a results file
    written by ``lm_eval --output_path``, as a mapping, ``(condition, file)`` pairs or
    ``"CONDITION=FILE"`` strings; a condition may repeat (one file per task run).
    Rows of different files with the same task and metric are merged; a condition given twice
    for one row is an error.

    Example:
        >>> load_scores(lm_eval=["baseline=base.json", "plus=plus.json"])
    """
    parts: list[Scores] = [parse_scores_file(p) for p in paths]
    for condition, path in lm_eval_pairs(lm_eval):
        parts.append(parse_lm_eval(path, condition))
    if eval_dir is not None:
        parts.append(load_sweep(eval_dir))
    return combine_scores(parts)


def lm_eval_pairs(
    lm_eval: Mapping[str, str | os.PathLike[str]]
    | Iterable[str | tuple[str, str | os.PathLike[str]]],
) -> list[tuple[str, str | os.PathLike[str]]]:
    """``(condition, file)`` pairs from a mapping, pairs or ``"CONDITION=FILE"`` strings."""
    if isinstance(lm_eval, Mapping):
        return list(lm_eval.items())
    if isinstance(lm_eval, (str, os.PathLike)):
        raise InputError("`lm_eval` takes a list of CONDITION=FILE strings, not one string")
    out: list[tuple[str, str | os.PathLike[str]]] = []
    for item in lm_eval:
        if not isinstance(item, str):
            out.append(item)
            continue
        condition, sep, file = item.partition("=")
        if not sep or not file:
            raise InputError(
                f"`lm_eval` {item!r}: write CONDITION=FILE, e.g. `lm_eval` baseline=results.json"
            )
        out.append((condition, file))
    return out


def combine_scores(parts: Sequence[Scores]) -> Scores:
    """Merge several :class:`Scores` (rows with the same task and metric are joined)."""
    out = Scores()
    rows: dict[tuple[str, str, str], Benchmark] = {}
    for part in parts:
        for attr in ("target", "scale", "source_name", "source_url"):
            value = getattr(part, attr)
            if value is None:
                continue
            if getattr(out, attr) is None:
                setattr(out, attr, value)
            elif getattr(out, attr) != value and attr != "target":
                raise InputError(
                    f"score files disagree on {attr}: {getattr(out, attr)!r} and {value!r}"
                )
        if part.sweep is not None:
            if out.sweep is not None:
                raise InputError("two eval sweeps given; a card shows one (`eval_dir` once)")
            out.sweep = part.sweep
        for bench in part.benchmarks:
            have = rows.get(bench.key)
            if have is None:
                rows[bench.key] = Benchmark(**{**bench.__dict__})
                continue
            for condition, value in bench.values.items():
                if condition in have.values:
                    raise InputError(
                        f"{bench.task} {bench.metric_name}: the {CONDITION_LABELS[condition]} score "
                        f"is given twice ({have.origin.get(condition)} and {bench.origin.get(condition)})"
                    )
                have.values[condition] = value
                have.origin[condition] = bench.origin.get(condition, "")
                if condition in bench.stderr:
                    have.stderr[condition] = bench.stderr[condition]
            for attr in ("dataset_config", "dataset_split", "dataset_revision", "dataset_args"):
                if getattr(have, attr) is None and getattr(bench, attr) is not None:
                    setattr(have, attr, getattr(bench, attr))
    out.benchmarks = list(rows.values())
    return out


def _read_structured(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path}: cannot read it ({e})") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{path}{where}: not valid YAML ({problem})") from None


def _check_keys(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputError(f"{where} must be a mapping, not {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
            hint = (
                f" (did you mean {close[0]!r}?)"
                if close
                else f" (known: {', '.join(sorted(allowed))})"
            )
            raise InputError(f"{where}: unknown key {key!r}{hint}")
    return obj


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where} must be a finite number, not {value!r}")
    return float(value)


def _text(value: Any, where: str, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads `config: 2020` as a number
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where} must be a non-empty string, not {value!r}")
    return value


def parse_scores_file(path: str | os.PathLike[str]) -> Scores:
    """Read rvhub's scores format (YAML or JSON; see ``docs/card.md``), refusing unknown keys."""
    path = Path(path)
    data = _read_structured(path, "scores file")
    if isinstance(data, dict) and "results" in data and "benchmarks" not in data:
        raise InputError(
            f"{path} looks like lm-evaluation-harness output; pass it as `lm_eval` baseline={path} "
            "(or plus=/minus=)"
        )
    top = _check_keys(data, _TOP_KEYS, str(path))
    benches = top.get("benchmarks")
    if not isinstance(benches, list) or not benches:
        raise InputError(f"{path}: 'benchmarks' must be a non-empty list")
    out = Scores(
        target=_text(top.get("target"), f"{path}: target"),
        scale=_number(top["scale"], f"{path}: scale") if top.get("scale") is not None else None,
    )
    if top.get("source") is not None:
        source = _check_keys(top["source"], _SOURCE_KEYS, f"{path}: source")
        out.source_name = _text(source.get("name"), f"{path}: source.name", required=True)
        out.source_url = _text(source.get("url"), f"{path}: source.url", required=True)
    for i, entry in enumerate(benches):
        label = entry.get("task") if isinstance(entry, dict) else None
        where = f"{path}: benchmarks[{i}]" + (f" ({label})" if isinstance(label, str) else "")
        entry = _check_keys(entry, _BENCHMARK_KEYS, where)
        task = _text(entry.get("task"), f"{where}: task", required=True)
        assert task is not None
        metric = _check_keys(entry.get("metric"), _METRIC_KEYS, f"{where}: metric")
        metric_type = _text(metric.get("type"), f"{where}: metric.type", required=True)
        assert metric_type is not None
        dataset = _check_keys(entry.get("dataset") or {}, _DATASET_KEYS, f"{where}: dataset")
        args = dataset.get("args")
        if args is not None and not isinstance(args, dict):
            raise InputError(f"{where}: dataset.args must be a mapping")
        bench = Benchmark(
            task=task,
            metric_type=metric_type,
            metric_name=_text(metric.get("name"), f"{where}: metric.name") or metric_type,
            task_type=_text(entry.get("task_type"), f"{where}: task_type") or DEFAULT_TASK_TYPE,
            dataset_id=_text(dataset.get("id"), f"{where}: dataset.id") or task,
            dataset_name=_text(dataset.get("name"), f"{where}: dataset.name") or task,
            dataset_config=_text(dataset.get("config"), f"{where}: dataset.config"),
            dataset_split=_text(dataset.get("split"), f"{where}: dataset.split"),
            dataset_revision=_text(dataset.get("revision"), f"{where}: dataset.revision"),
            dataset_args=args,
        )
        for condition in CONDITIONS:
            if entry.get(condition) is not None:
                bench.values[condition] = _number(entry[condition], f"{where}: {condition}")
                bench.origin[condition] = str(path)
        stderr = _check_keys(entry.get("stderr") or {}, set(CONDITIONS), f"{where}: stderr")
        for condition, value in stderr.items():
            if value is not None:
                bench.stderr[condition] = _number(value, f"{where}: stderr.{condition}")
        if not bench.values:
            raise InputError(f"{where}: no score; give at least one of {', '.join(CONDITIONS)}")
        out.benchmarks.append(bench)
    return out


def lm_eval_condition(name: str) -> str:
    """``baseline``/``plus``/``minus`` (and long forms) -> the condition key; InputError otherwise."""
    condition = LM_EVAL_CONDITIONS.get(name.strip().lower())
    if condition is None:
        raise InputError(
            f"`lm_eval`: unknown condition {name!r}; write baseline=FILE, plus=FILE or minus=FILE"
        )
    return condition


def parse_lm_eval(path: str | os.PathLike[str], condition: str) -> Scores:
    """Read an lm-evaluation-harness results JSON as the scores of one condition.

    Every ``results[task]["metric,filter"]`` number becomes a row (``metric_stderr,filter`` its
    standard error; ``alias``, ``name`` and ``sample_len`` are not metrics); subtasks of a
    group are left out, the group's own row is kept. Datasets come from ``configs``
    (``dataset_path`` unless it names a loader such as ``json``, then the task; ``dataset_name``;
    test or validation split) and the number of shots from ``n-shot``
    (:func:`rvhub.evaluation.metric_values`). Values are copied as lm-eval reports them.
    """
    path = Path(path)
    cond = lm_eval_condition(condition)
    data = _read_structured(path, "lm-eval results file")
    if not isinstance(data, dict):
        raise InputError(f"{path}: not an lm-evaluation-harness results file (no 'results' object)")
    out = Scores()
    if cond == "baseline":
        out.target = results_model_name(data)
    for m in metric_values(data, str(path)):
        bench = Benchmark(
            task=m.task,
            metric_type=m.metric,
            metric_name=m.label,
            dataset_id=m.dataset_id,
            dataset_name=m.alias,
            dataset_config=m.dataset_config,
            dataset_split=m.dataset_split,
            dataset_args={"num_few_shot": m.num_fewshot} if m.num_fewshot is not None else None,
            values={cond: m.value},
            origin={cond: str(path)},
        )
        if m.stderr is not None:
            bench.stderr[cond] = m.stderr
        out.benchmarks.append(bench)
    if not out.benchmarks:
        raise InputError(f"{path}: the lm-eval results hold no numeric metric")
    return out


def load_sweep(folder: str | os.PathLike[str]) -> Scores:
    """The scores of an ``rvhub eval`` output folder: α = 0 as the baseline, α = +1 and −1 as
    the ±vector conditions (when swept), and the whole sweep in :attr:`Scores.sweep`."""
    sweep = read_sweep(folder)
    parts = [Scores()]
    for point in sweep["points"]:
        cond = {0.0: "baseline", 1.0: "plus_vector", -1.0: "minus_vector"}.get(point.get("scale"))
        if cond is not None:
            parts.append(parse_lm_eval(point["results_path"], cond))
    out = combine_scores(parts)
    target = as_dict(sweep.get("target"))
    out.target = target.get("name") or out.target
    out.scale = 1.0
    out.sweep = sweep
    return out
