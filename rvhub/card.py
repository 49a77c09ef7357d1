"""Model cards for vector repos: score import, Hub metadata (model-index) and rendering.

A card is YAML front matter the Hub understands (``library_name: rvhub``, tags, ``base_model``,
``license``, ``model-index`` with one result per benchmark and condition) followed by a
Markdown body rendered with jinja2 from ``templates/vector_card.md.j2`` (or the user's own
template) in a sandbox. Scores come from a small YAML/JSON format or straight from
lm-evaluation-harness results files; ``docs/card.md`` documents both and every template
variable.

Example:
    >>> scores = load_scores(["scores.yaml"], lm_eval=[("plus", "plus.json")])
    >>> card = render_card("./reasoning-vector", repo_id="user/vec", scores=scores)
    >>> Path("README.md").write_text(card.text)
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import math
import os
import re
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import InputError
from .manifest import MANIFEST_NAME, load_manifest
from .progress import human_bytes
from .safetensors_io import sha256_file

logger = logging.getLogger("rvhub")

CARD_NAME = "README.md"
PLOT_NAME = "layer_norms.png"
DEFAULT_TEMPLATE = "vector_card.md.j2"
TAGS = ("rvhub", "reasoning-vector", "task-arithmetic")
DEFAULT_TASK_TYPE = "text-generation"
# The three measurements a benchmark row can hold: the target alone, target + α·v, target − α·v.
CONDITIONS = ("baseline", "plus_vector", "minus_vector")
CONDITION_LABELS = {"baseline": "baseline", "plus_vector": "+vector", "minus_vector": "-vector"}
# What `--lm-eval COND=FILE` accepts as COND.
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


# -- scores ---------------------------------------------------------------------------------


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

    def __bool__(self) -> bool:
        return bool(self.benchmarks)


def load_scores(
    paths: Iterable[str | os.PathLike[str]] = (),
    *,
    lm_eval: Mapping[str, str | os.PathLike[str]]
    | Iterable[tuple[str, str | os.PathLike[str]]] = (),
) -> Scores:
    """Read and combine score files: rvhub's YAML/JSON format and lm-eval-harness results.

    ``lm_eval`` maps a condition (``baseline``, ``plus`` or ``minus``) to a results file
    written by ``lm_eval --output_path``; pairs may repeat a condition (one file per task run).
    Rows of different files with the same task and metric are merged; a condition given twice
    for one row is an error.

    Example:
        >>> load_scores(lm_eval=[("baseline", "base.json"), ("plus", "plus.json")])
    """
    parts: list[Scores] = [parse_scores_file(p) for p in paths]
    pairs = lm_eval.items() if isinstance(lm_eval, Mapping) else lm_eval
    for condition, path in pairs:
        parts.append(parse_lm_eval(path, condition))
    return combine_scores(parts)


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
            f"{path} looks like lm-evaluation-harness output; pass it as --lm-eval baseline={path} "
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
            f"--lm-eval: unknown condition {name!r}; write baseline=FILE, plus=FILE or minus=FILE"
        )
    return condition


def _grouped_subtasks(data: dict[str, Any]) -> set[str]:
    """Tasks that lm-eval reports inside a group (e.g. the 57 MMLU subjects): the group row stays."""
    out: set[str] = set()
    groups = data.get("group_subtasks")
    if isinstance(groups, dict):
        for members in groups.values():
            if isinstance(members, list):
                out.update(str(m) for m in members)
    return out


def parse_lm_eval(path: str | os.PathLike[str], condition: str) -> Scores:
    """Read an lm-evaluation-harness results JSON as the scores of one condition.

    Every ``results[task]["metric,filter"]`` number becomes a row (``metric_stderr,filter`` its
    standard error); subtasks of a group are left out, the group's own row is kept. Datasets
    come from ``configs`` (``dataset_path``, ``dataset_name``, test or validation split) and
    the number of shots from ``n-shot``. Values are copied as lm-eval reports them.
    """
    path = Path(path)
    cond = lm_eval_condition(condition)
    data = _read_structured(path, "lm-eval results file")
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise InputError(f"{path}: not an lm-evaluation-harness results file (no 'results' object)")
    configs: dict[str, Any] = data["configs"] if isinstance(data.get("configs"), dict) else {}
    nshot: dict[str, Any] = data["n-shot"] if isinstance(data.get("n-shot"), dict) else {}
    skip = _grouped_subtasks(data)
    out = Scores()
    if cond == "baseline":
        out.target = _lm_eval_model(data)
    for task, metrics in results.items():
        if task in skip:
            continue
        if not isinstance(metrics, dict):
            raise InputError(f"{path}: results[{task!r}] is not an object")
        cfg: dict[str, Any] = configs[task] if isinstance(configs.get(task), dict) else {}
        for key, value in metrics.items():
            metric, _, filt = str(key).partition(",")
            if key == "alias" or metric.endswith("_stderr"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            bench = Benchmark(
                task=task,
                metric_type=metric,
                metric_name=metric if filt in ("", "none") else f"{metric} ({filt})",
                dataset_id=str(cfg.get("dataset_path") or task),
                dataset_name=str(metrics.get("alias") or task).strip(" -"),
                dataset_config=_opt_str(cfg.get("dataset_name")),
                dataset_split=_opt_str(cfg.get("test_split") or cfg.get("validation_split")),
                dataset_args=(
                    {"num_few_shot": nshot[task]} if isinstance(nshot.get(task), int) else None
                ),
                values={cond: float(value)},
                origin={cond: str(path)},
            )
            if (
                isinstance(stderr, (int, float))
                and not isinstance(stderr, bool)
                and math.isfinite(stderr)
            ):
                bench.stderr[cond] = float(stderr)
            out.benchmarks.append(bench)
    if not out.benchmarks:
        raise InputError(f"{path}: the lm-eval results hold no numeric metric")
    return out


def _opt_str(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int)) and str(value) else None


def _lm_eval_model(data: dict[str, Any]) -> str | None:
    name = data.get("model_name")
    if isinstance(name, str) and name:
        return name
    args = (
        (data.get("config") or {}).get("model_args")
        if isinstance(data.get("config"), dict)
        else None
    )
    if isinstance(args, str):
        m = re.search(r"(?:^|,)pretrained=([^,]+)", args)
        if m:
            return m.group(1)
    return None


# -- metadata -------------------------------------------------------------------------------


def model_index(name: str, scores: Scores | None) -> list[dict[str, Any]]:
    """The Hub's ``model-index``: one result per benchmark and condition (empty without scores).

    The condition is named in each metric's ``name`` (``"exact_match (+vector)"``), so the Hub
    lists baseline, +vector and −vector side by side.
    """
    if not scores:
        return []
    results = []
    for bench in scores.benchmarks:
        for condition in CONDITIONS:
            if condition not in bench.values:
                continue
            dataset: dict[str, Any] = {"name": bench.dataset_name, "type": bench.dataset_id}
            for key, value in (
                ("config", bench.dataset_config),
                ("split", bench.dataset_split),
                ("revision", bench.dataset_revision),
                ("args", bench.dataset_args),
            ):
                if value is not None:
                    dataset[key] = value
            result: dict[str, Any] = {
                "task": {"type": bench.task_type},
                "dataset": dataset,
                "metrics": [
                    {
                        "type": bench.metric_type,
                        "value": bench.values[condition],
                        "name": f"{bench.metric_name} ({CONDITION_LABELS[condition]})",
                    }
                ],
            }
            if scores.source_name and scores.source_url:
                result["source"] = {"name": scores.source_name, "url": scores.source_url}
            results.append(result)
    return [{"name": name, "results": results}]


def hub_sources(manifest: Mapping[str, Any]) -> list[str]:
    """The Hub ids of the vector's sources (A, B), for ``base_model``."""
    out = []
    for role in ("a", "b"):
        info = (manifest.get("sources") or {}).get(role) or {}
        repo_id = info.get("repo_id")
        if info.get("kind") == "hub" and isinstance(repo_id, str) and repo_id not in out:
            out.append(repo_id)
    return out


def local_source_license(path: str | os.PathLike[str]) -> str | None:
    """The ``license`` in a local model folder's README front matter, if any."""
    readme = Path(path) / CARD_NAME
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    meta = split_front_matter(text)[0]
    value = meta.get("license") if meta else None
    return value if isinstance(value, str) and value else None


def carried_license(licenses: Mapping[str, str | None]) -> str | None:
    """The sources' license when every known one agrees (the vector derives from all of them)."""
    known = {v for v in licenses.values() if v}
    if len(known) == 1:
        return known.pop()
    if len(known) > 1:
        logger.warning(
            "the sources have different licenses (%s); the card names none: pass --license",
            ", ".join(sorted(known)),
        )
    return None


def card_metadata(
    manifest: Mapping[str, Any],
    *,
    name: str,
    scores: Scores | None = None,
    license: str | None = None,
) -> dict[str, Any]:
    """The card's YAML front matter as a dict (Hub keys, in the Hub's spelling)."""
    meta: dict[str, Any] = {"library_name": "rvhub"}
    if license:
        meta["license"] = license
    tags = [*TAGS, str(manifest.get("encoding", "dense"))]
    meta["tags"] = tags
    bases = hub_sources(manifest)
    if bases:
        meta["base_model"] = bases
        meta["base_model_relation"] = "adapter"
    index = model_index(name, scores)
    if index:
        meta["model-index"] = index
    return meta


def split_front_matter(text: str) -> tuple[dict[str, Any] | None, str]:
    """``(metadata, body)`` of a Markdown card; metadata is None without front matter."""
    m = re.match(r"\A---\s*\n(.*?\n)?---\s*(?:\n|\Z)", text, flags=re.S)
    if not m:
        return None, text
    try:
        meta = yaml.safe_load(m.group(1) or "") or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 2}" if mark is not None else ""
        raise InputError(
            f"the card's YAML front matter{where} is invalid: {getattr(e, 'problem', e)}"
        ) from None
    if not isinstance(meta, dict):
        raise InputError("the card's YAML front matter must be a mapping")
    return meta, text[m.end() :]


def dump_front_matter(meta: Mapping[str, Any]) -> str:
    """``meta`` as a card's ``---``-fenced YAML front matter (keys in the given order)."""
    return "---\n" + yaml.safe_dump(dict(meta), sort_keys=False, allow_unicode=True) + "---\n"


# -- the plot -------------------------------------------------------------------------------


def norms_plot(layer_norms: Mapping[str, float], *, title: str = "‖v‖ per layer") -> bytes | None:
    """A bar chart of per-layer norms as PNG bytes (deterministic); None without matplotlib."""
    if not layer_norms:
        return None
    try:
        # A bare Figure renders with Agg without pyplot: the user's backend is left alone.
        from matplotlib.figure import Figure
    except ImportError:
        logger.info(
            "matplotlib is not installed: the card has no norm plot (pip install 'rvhub[examples]')"
        )
        return None
    labels = list(layer_norms)
    values = [float(v) for v in layer_norms.values()]
    fig = Figure(figsize=(max(4.0, 0.28 * len(labels) + 1.5), 2.8), dpi=100)
    ax = fig.add_subplot()
    colors = ["#4c72b0" if label.isdigit() else "#999999" for label in labels]
    ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90 if len(labels) > 16 else 0, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("Frobenius norm")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# -- rendering ------------------------------------------------------------------------------


@dataclass
class Card:
    """A rendered card: ``README.md`` text, its metadata, and the files to upload with it."""

    text: str
    metadata: dict[str, Any]
    plot_png: bytes | None = None

    @property
    def files(self) -> dict[str, bytes]:
        """``{path in repo: bytes}``: the card and, when drawn, the norm plot."""
        out = {CARD_NAME: self.text.encode("utf-8")}
        if self.plot_png is not None:
            out[PLOT_NAME] = self.plot_png
        return out

    def save(self, path: str | os.PathLike[str]) -> list[Path]:
        """Write the card to ``path`` and the plot next to it; returns the paths written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, self.text.encode("utf-8"))
        written = [path]
        if self.plot_png is not None:
            plot = path.parent / PLOT_NAME
            _write_atomic(plot, self.plot_png)
            written.append(plot)
        return written


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path``, then rename: never a half-written card."""
    tmp = path.with_name(f".{path.name}.rvhub-tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _num(value: Any, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "–"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, int) and not sign:
        return f"{value:,}".replace("-", "−")
    x = float(value)
    if not math.isfinite(x):
        return str(x)
    text = f"{x:+.{digits}g}" if sign else f"{x:.{digits}g}"
    if "e" in text and 1e-3 <= abs(x) < 1e7:
        text = f"{x:+,.2f}" if sign else f"{x:,.2f}"
    return text.replace("-", "−") if sign or x < 0 else text


def _score(value: Any) -> str:
    """A score with 4 significant digits that keeps one decimal (``67.0``, ``0.6209``)."""
    text = _num(value)
    if isinstance(value, float) and text.lstrip("−-").replace(",", "").isdigit():
        text += ".0"
    return text


def _md_cell(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip


def _source_view(
    role: str, info: Mapping[str, Any], license: str | None, endpoint: str
) -> dict[str, Any]:
    kind = info.get("kind")
    view: dict[str, Any] = {"role": role.upper(), "kind": kind, "license": license}
    if kind == "hub":
        view.update(
            repo_id=info.get("repo_id"),
            revision=info.get("revision"),
            label=info.get("repo_id"),
            url=f"{endpoint}/{info.get('repo_id')}",
        )
        if info.get("revision"):
            view["revision_url"] = f"{endpoint}/{info.get('repo_id')}/tree/{info.get('revision')}"
    else:
        view.update(
            path=info.get("path"),
            label=Path(str(info.get("path", "?"))).name or str(info.get("path")),
            content_fingerprint=info.get("content_fingerprint"),
        )
    return view


def card_context(
    folder: Path,
    manifest: Mapping[str, Any],
    *,
    repo_id: str,
    scores: Scores | None = None,
    license: str | None = None,
    source_licenses: Mapping[str, str | None] | None = None,
    target: str | None = None,
    plot: bool = True,
    endpoint: str = "https://huggingface.co",
) -> dict[str, Any]:
    """Every variable a card template sees (documented in ``docs/card.md``)."""
    name = repo_id.rsplit("/", 1)[-1]
    licenses = dict(source_licenses or {})
    for role in ("a", "b"):
        info = (manifest.get("sources") or {}).get(role) or {}
        if role not in licenses and info.get("kind") == "local" and info.get("path"):
            licenses[role] = local_source_license(info["path"])
    license = license or carried_license(licenses)
    metadata = card_metadata(manifest, name=name, scores=scores, license=license)
    stats = manifest.get("stats") or {}
    model = manifest.get("model") or {}
    tensors = manifest.get("tensors") or {}
    files = [
        {
            "name": n,
            "size": f.get("size"),
            "sha256": f.get("sha256"),
            "size_h": human_bytes(f.get("size", 0)),
        }
        for n, f in (manifest.get("files") or {}).items()
    ]
    stored = sum(int(f["size"] or 0) for f in files)
    dense = sum(
        math.prod(t.get("shape") or []) * _ITEMSIZE.get(str(t.get("dtype", "")).upper(), 4)
        for t in tensors.values()
    )
    manifest_path = folder / MANIFEST_NAME
    manifest_sha = sha256_file(manifest_path) if manifest_path.is_file() else None
    sources = [
        _source_view(role, info, licenses.get(role), endpoint)
        for role, info in sorted((manifest.get("sources") or {}).items())
        if isinstance(info, dict)
    ]
    rows = []
    for bench in scores.benchmarks if scores else []:
        rows.append(
            {
                "task": bench.task,
                "metric": bench.metric_name,
                "metric_type": bench.metric_type,
                "dataset": bench.dataset_name,
                "dataset_id": bench.dataset_id,
                "dataset_config": bench.dataset_config,
                "dataset_split": bench.dataset_split,
                "baseline": bench.values.get("baseline"),
                "plus_vector": bench.values.get("plus_vector"),
                "minus_vector": bench.values.get("minus_vector"),
                "stderr": dict(bench.stderr),
                "delta_plus": bench.delta("plus_vector"),
                "delta_minus": bench.delta("minus_vector"),
            }
        )
    layer_norms = stats.get("layer_norms") or {}
    encoding = str(manifest.get("encoding", "dense"))
    return {
        "repo_id": repo_id,
        "name": name,
        "metadata": metadata,
        "metadata_yaml": yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True),
        "license": license,
        "base_models": hub_sources(manifest),
        "encoding": encoding,
        "peft_adapter": encoding == "lora",
        "dtype": list(manifest.get("dtype") or []),
        "model": dict(model),
        "model_type": model.get("model_type"),
        "architecture": ", ".join(model.get("architectures") or []) or None,
        "sources": sources,
        "stats": dict(stats),
        "norm": stats.get("norm"),
        "roundtrip_error": stats.get("roundtrip_error"),
        "layer_norms": [{"layer": k, "norm": v} for k, v in layer_norms.items()],
        "tensors": len(tensors),
        "parameters": sum(math.prod(t.get("shape") or []) for t in tensors.values()),
        "excluded": list(manifest.get("excluded") or []),
        "files": files,
        "stored_bytes": stored,
        "stored_size": human_bytes(stored),
        "dense_bytes": dense,
        "dense_size": human_bytes(dense),
        "compression_ratio": (dense / stored) if stored else None,
        "compression": dict(manifest.get("compression") or {}),
        "manifest_name": MANIFEST_NAME,
        "manifest_sha256": manifest_sha,
        "scores": rows,
        "scores_target": (scores.target if scores else None) or target,
        "scale": (scores.scale if scores and scores.scale is not None else 1.0),
        "target": target or (scores.target if scores else None),
        "plot": PLOT_NAME if plot else None,
        "rvhub_version": manifest.get("rvhub_version") or __version__,
        "created_at": manifest.get("created_at"),
        "endpoint": endpoint,
    }


def _environment(loader: Any) -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(
        loader=loader,
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["human_bytes"] = human_bytes
    env.filters["md"] = _md_cell
    env.filters["score"] = _score
    return env


def _default_template_source(name: str) -> tuple[str, str, Any] | None:
    from importlib import resources

    try:
        root = resources.files("rvhub.templates")
    except ModuleNotFoundError:  # a source checkout that was not installed
        root = Path(__file__).resolve().parent.parent / "templates"
    resource = root.joinpath(name)
    if not resource.is_file():
        return None
    return resource.read_text(encoding="utf-8"), f"rvhub.templates/{name}", lambda: True


def _template_line(exc: BaseException, filename: str) -> int | None:
    line = getattr(exc, "lineno", None)
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == filename:
            line = lineno
    return line


def render_template(
    context: Mapping[str, Any], template: str | os.PathLike[str] | None = None
) -> str:
    """Render ``template`` (a path; default: the packaged card template) in a jinja2 sandbox.

    Any failure (syntax, an undefined variable, a refused attribute) is one :class:`InputError`
    naming the template and line.
    """
    import jinja2
    from jinja2.exceptions import SecurityError

    if template is None:
        env = _environment(jinja2.FunctionLoader(_default_template_source))
        name, label = DEFAULT_TEMPLATE, f"rvhub.templates/{DEFAULT_TEMPLATE}"
    else:
        path = Path(template).expanduser()
        if not path.is_file():
            raise InputError(f"card template {path}: no such file")
        env = _environment(jinja2.FileSystemLoader(str(path.parent.resolve())))
        name = path.name
        label = str(path.parent.resolve() / path.name)
    filename = label
    try:
        tmpl = env.get_template(name)
        filename = tmpl.filename or label
        return tmpl.render(**context)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(
            f"card template {e.filename or label} line {e.lineno}: {e.message}"
        ) from None
    except (jinja2.TemplateError, SecurityError, TypeError, ValueError, AttributeError, KeyError,
            ArithmeticError) as e:  # fmt: skip
        line = _template_line(e, filename)
        where = f" line {line}" if line else ""
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, SecurityError):
            msg = f"refused by the sandbox: {msg}"
        raise InputError(f"card template {filename}{where}: {msg}") from None


def render_card(
    vector: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    scores: Scores | None = None,
    template: str | os.PathLike[str] | None = None,
    license: str | None = None,
    source_licenses: Mapping[str, str | None] | None = None,
    target: str | None = None,
    plot: bool | bytes = True,
    endpoint: str | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> Card:
    """Render the model card of the artifact folder ``vector``.

    ``repo_id`` is where it will live (used in the usage snippets and as the model-index name;
    default ``YOUR-USER/<folder name>``). ``plot``: draw the per-layer norm plot (``True``),
    leave it out (``False``), or use these PNG bytes (from :func:`norms_plot`). A template whose output starts with ``---`` owns its
    front matter; otherwise rvhub's metadata is put in front of the rendered body. The result's
    front matter is checked to be a YAML mapping.

    Example:
        >>> card = render_card("./vec", repo_id="user/vec", scores=load_scores(["s.yaml"]))
        >>> card.save("./vec-card/README.md")
    """
    folder = Path(vector)
    data = dict(manifest) if manifest is not None else load_manifest(folder)
    repo_id = repo_id or f"YOUR-USER/{folder.resolve().name}"
    layer_norms = (data.get("stats") or {}).get("layer_norms") or {}
    png = plot if isinstance(plot, bytes) else norms_plot(layer_norms) if plot else None
    context = card_context(
        folder,
        data,
        repo_id=repo_id,
        scores=scores,
        license=license,
        source_licenses=source_licenses,
        target=target,
        plot=png is not None,
        endpoint=(endpoint or "https://huggingface.co").rstrip("/"),
    )
    body = render_template(context, template)
    if body.lstrip().startswith("---"):
        text = body.lstrip()
        meta, _ = split_front_matter(text)
        if meta is None:
            raise InputError("the card template's front matter is not closed by a '---' line")
    else:
        meta = context["metadata"]
        text = dump_front_matter(meta) + "\n" + body.lstrip("\n")
    return Card(text=text, metadata=meta, plot_png=png)
