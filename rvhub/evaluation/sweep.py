"""The α sweep: one loaded target, lm-evaluation-harness at each ``θ + α·v``, one summary.

lm-eval (``pip install "rvhub[eval]"``) is imported only here and only when a sweep runs. The
model is loaded once; :class:`~rvhub.ops.live.ScaleSwitch` sets it to exactly
``round(θ + α·v)`` from the pristine θ before each evaluation. Each point's results are what
``simple_evaluate`` returns, written as lm-eval's CLI writes them (``indent=2``, its own
``handle_non_serializable``); ``sweep.json`` sums them up (``docs/eval.md``).

Example:
    >>> sweep = run_sweep(switch, model, tokenizer, tasks=["gsm8k"], scales=[-1, 0, 1])
    >>> write_sweep(sweep, "eval-out/")
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .._version import __version__
from ..errors import InputError
from ..io.atomic import atomic_write
from ..io.progress import logger

SWEEP_FORMAT = "rvhub.eval-sweep"
SWEEP_VERSION = 1
SWEEP_NAME = "sweep.json"
SWEEP_PLOT = "eval_sweep.png"
INSTALL_HINT = 'pip install "rvhub[eval]"'
# Keys lm-eval 0.4.13 writes into each task's results that are not metrics.
NOT_METRICS = frozenset({"alias", "name", "sample_len", "samples"})
# `datasets` loaders: a task's dataset_path that names one says how data was read, not which.
DATASET_LOADERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset"})
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or one InputError line naming the extra to install."""
    try:
        import lm_eval
        import lm_eval.models.huggingface
    except ImportError as e:
        raise InputError(
            f"rvhub eval needs lm-evaluation-harness ({e.name or 'lm_eval'} is not installed): "
            f"{INSTALL_HINT}"
        ) from None
    return lm_eval


def parse_scales(scales: str | Iterable[float | str]) -> list[float]:
    """α values from ``"-1,0,0.5"`` or a list: finite numbers, at least one, none twice."""
    items = [s for s in scales.split(",")] if isinstance(scales, str) else list(scales)
    if not items or all(isinstance(s, str) and not s.strip() for s in items):
        raise InputError("`scales` is empty; give α values like -1,0,1")
    out: list[float] = []
    for item in items:
        if isinstance(item, str):
            if not _NUMBER.fullmatch(item.strip()):
                raise InputError(f"`scales`: {item.strip()!r} is not a number (write -1,0,0.5,1)")
            value = float(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            value = float(item)
        else:
            raise InputError(f"`scales`: {item!r} is not a number")
        if not math.isfinite(value):
            raise InputError(f"`scales`: {item!r} is not a finite number")
        if value in out:
            raise InputError(f"`scales`: α = {value:g} is given twice")
        out.append(value)
    return out


def parse_limit(limit: int | float | None) -> int | float | None:
    """lm-eval's ``limit``: a count of examples (≥ 1, whole) or a fraction in (0, 1)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise InputError(f"`limit` must be positive, not {limit!r}")
    return int(limit) if limit >= 1 and float(limit).is_integer() else limit


def parse_batch_size(batch_size: int | str) -> int | str:
    """lm-eval's ``batch_size``: a positive integer, ``auto`` or ``auto:N``."""
    if isinstance(batch_size, str):
        if batch_size == "auto" or batch_size.startswith("auto:"):
            return batch_size
        if batch_size.isdigit() and int(batch_size) >= 1:
            return int(batch_size)
    elif isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
        return batch_size
    raise InputError(f"`batch_size` must be a positive integer or auto, not {batch_size!r}")


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """Task names from ``"gsm8k,bbh"`` or a list; at least one."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in items if t.strip()]
    if not names:
        raise InputError("`tasks` is empty; name at least one lm-eval task (e.g. gsm8k)")
    return names


@dataclass
class MetricValue:
    """One ``results[task]["metric,filter"]`` number of an lm-eval results dict."""

    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None
    alias: str
    dataset_id: str
    dataset_config: str | None
    dataset_split: str | None
    num_fewshot: int | None
    n: int | None
    higher_is_better: bool | None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.metric, self.filter)

    @property
    def label(self) -> str:
        return self.metric if self.filter in ("", "none") else f"{self.metric} ({self.filter})"


def _grouped_subtasks(data: Mapping[str, Any]) -> set[str]:
    """Tasks lm-eval reports inside a group (the 57 MMLU subjects): the group's row stays."""
    out: set[str] = set()
    groups = data.get("group_subtasks")
    if isinstance(groups, dict):
        for members in groups.values():
            if isinstance(members, list):
                out.update(str(m) for m in members)
    return out


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` when it is a dict, else an empty one (results files are read defensively)."""
    return value if isinstance(value, dict) else {}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _opt_str(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int)) and str(value) else None


def metric_values(data: Mapping[str, Any], where: str = "lm-eval results") -> list[MetricValue]:
    """Every metric of an lm-evaluation-harness results dict (file or ``simple_evaluate``).

    Only ``metric,filter`` numbers are metrics: ``alias``, ``name`` and ``sample_len`` (which
    lm-eval 0.4.13 also writes there) are not; ``metric_stderr,filter`` is the standard error.
    The dataset is the task config's ``dataset_path``, unless that names a ``datasets`` loader
    (``json``, ``csv``, ...) or is absent (a ``custom_dataset``): then the task names it.
    """
    results = data.get("results")
    if not isinstance(results, dict):
        raise InputError(f"{where}: not an lm-evaluation-harness results file (no 'results')")
    configs = data["configs"] if isinstance(data.get("configs"), dict) else {}
    nshot = data["n-shot"] if isinstance(data.get("n-shot"), dict) else {}
    nsamples = data["n-samples"] if isinstance(data.get("n-samples"), dict) else {}
    better = data["higher_is_better"] if isinstance(data.get("higher_is_better"), dict) else {}
    skip = _grouped_subtasks(data)
    out: list[MetricValue] = []
    for task, metrics in results.items():
        if task in skip:
            continue
        if not isinstance(metrics, dict):
            raise InputError(f"{where}: results[{task!r}] is not an object")
        cfg = configs[task] if isinstance(configs.get(task), dict) else {}
        path = cfg.get("dataset_path")
        dataset = str(path) if isinstance(path, str) and path not in DATASET_LOADERS else task
        count = as_dict(nsamples.get(task))
        n = count.get("effective")
        hib = as_dict(better.get(task))
        for key, raw in metrics.items():
            metric, _, filt = str(key).partition(",")
            if metric in NOT_METRICS or metric.endswith("_stderr"):
                continue
            value = _finite(raw)
            if value is None:
                continue
            stderr_key = f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr"
            out.append(
                MetricValue(
                    task=str(task),
                    metric=metric,
                    filter=filt,
                    value=value,
                    stderr=_finite(metrics.get(stderr_key)),
                    alias=str(metrics.get("alias") or task).strip(" -"),
                    dataset_id=dataset,
                    dataset_config=_opt_str(cfg.get("dataset_name")),
                    dataset_split=_opt_str(cfg.get("test_split") or cfg.get("validation_split")),
                    num_fewshot=nshot.get(task) if isinstance(nshot.get(task), int) else None,
                    n=n if isinstance(n, int) and not isinstance(n, bool) else None,
                    higher_is_better=hib.get(metric) if isinstance(hib.get(metric), bool) else None,
                )
            )
    return out


def results_model_name(data: Mapping[str, Any]) -> str | None:
    """The evaluated model's name in a results file: ``model_name``, else ``config.model_args``'
    ``pretrained=``, else ``config.model`` (an in-memory ``HFLM`` leaves ``model_name`` None)."""
    name = data.get("model_name")
    if isinstance(name, str) and name:
        return name
    config = as_dict(data.get("config"))
    args = config.get("model_args")
    if isinstance(args, str):
        m = re.search(r"(?:^|,)pretrained=([^,]+)", args)
        if m:
            return m.group(1)
    if isinstance(args, dict) and isinstance(args.get("pretrained"), str):
        return args["pretrained"]
    model = config.get("model")
    return model if isinstance(model, str) and model and model != "CUSTOM" else None


@dataclass
class SweepPoint:
    """One α of a sweep: lm-eval's results dict and how long the switch and the run took."""

    scale: float
    results: dict[str, Any]
    switch_seconds: float
    eval_seconds: float

    @property
    def dirname(self) -> str:
        return f"alpha_{self.scale:+g}"


@dataclass
class Sweep:
    """An α sweep: its points and what was evaluated (see :func:`sweep_summary`)."""

    points: list[SweepPoint]
    tasks: list[str]
    vector: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The ``sweep.json`` content."""
        return sweep_summary(self)


def sweep_summary(sweep: Sweep) -> dict[str, Any]:
    """Per metric: the value and stderr at each α, the baseline (α = 0) and the best α.

    The best α is the highest (or lowest, when lm-eval says lower is better) value; it is
    reported, never applied.
    """
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for point in sweep.points:
        for m in metric_values(point.results, f"α = {point.scale:g}"):
            row = rows.setdefault(
                m.key,
                {
                    "task": m.task,
                    "metric": m.metric,
                    "filter": m.filter,
                    "label": m.label,
                    "alias": m.alias,
                    "dataset_id": m.dataset_id,
                    "dataset_config": m.dataset_config,
                    "dataset_split": m.dataset_split,
                    "num_fewshot": m.num_fewshot,
                    "higher_is_better": m.higher_is_better,
                    "points": [],
                },
            )
            row["points"].append(
                {"scale": point.scale, "value": m.value, "stderr": m.stderr, "n": m.n}
            )
    metrics = []
    for row in rows.values():
        pts = sorted(row["points"], key=lambda p: p["scale"])
        row["points"] = pts
        base = next((p for p in pts if p["scale"] == 0.0), None)
        row["baseline"] = base["value"] if base else None
        sign = -1.0 if row["higher_is_better"] is False else 1.0
        best = max(pts, key=lambda p: (sign * p["value"], -abs(p["scale"])))
        row["best"] = {"scale": best["scale"], "value": best["value"]}
        metrics.append(row)
    return {
        "format": SWEEP_FORMAT,
        "version": SWEEP_VERSION,
        "rvhub_version": __version__,
        "vector": sweep.vector,
        "target": sweep.target,
        "tasks": sweep.tasks,
        "scales": [p.scale for p in sweep.points],
        "settings": sweep.settings,
        "points": [
            {
                "scale": p.scale,
                "results": f"{p.dirname}/results.json",
                "switch_seconds": round(p.switch_seconds, 3),
                "eval_seconds": round(p.eval_seconds, 3),
            }
            for p in sweep.points
        ],
        "metrics": metrics,
    }


def _task_manager(tasks: Sequence[str], include_path: str | None) -> Any:
    """A TaskManager that knows every task asked for; one line naming an unknown one.

    Indexing lm-eval's ~15 000 built-in task configs takes seconds, so a sweep over tasks of
    ``include_path`` alone indexes only that folder.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise InputError(f"`include_path` {folder}: no such folder")
        local = TaskManager(include_path=str(folder), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f" or in {include_path}" if include_path else " (`include_path` adds a folder)"
            raise InputError(
                f"unknown lm-eval task {task!r}{hint}: not among lm-eval's tasks{where}"
            )
    return manager


class Switch(Protocol):
    """What a sweep switches α with: :class:`~rvhub.ops.live.ScaleSwitch` (transformers) or
    :class:`~rvhub.evaluation.vllm_engine.VllmSwitch` (a vLLM engine)."""

    def set_scale(self, scale: float) -> Any: ...

    def restore(self) -> None: ...

    # optional: ``check_scale(scale)`` refuses an α before any point is evaluated


def run_sweep(
    switch: Switch,
    model: Any,
    tokenizer: Any,
    *,
    tasks: Sequence[str],
    scales: Sequence[float],
    include_path: str | os.PathLike[str] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    num_fewshot: int | None = None,
    seed: int = 0,
    lm_eval_options: Mapping[str, Any] | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
    done: Mapping[float, SweepPoint] | None = None,
    log_path: Path | None = None,
    lm: Any = None,
    engine: Mapping[str, Any] | None = None,
) -> Sweep:
    """Evaluate ``model`` at ``round(θ + α·v)`` for each α of ``scales`` (restored after).

    ``tasks`` are lm-eval task names (``include_path`` adds a folder of task YAMLs);
    ``limit``, ``batch_size``, ``num_fewshot``, the seeds and ``lm_eval_options``
    (``apply_chat_template``, ``fewshot_as_multiturn``, ``system_instruction``,
    ``gen_kwargs``, ``log_samples``: :data:`LM_EVAL_OPTIONS`) go to ``simple_evaluate``.
    ``lm`` is lm-eval's model object when the caller made it (a vLLM engine,
    :mod:`.vllm_engine`); by default an ``HFLM`` around ``model`` is made at the first point.
    ``engine`` is recorded in the settings. ``on_point`` sees each point as it is done; the α of
    ``done`` (finished by an earlier run) are taken as they are. With ``log_path``, lm-eval's
    log lines and the warnings raised while it runs go to that file (its progress bars stay).
    """
    lm_eval = require_lm_eval()

    tasks, scales = parse_tasks(tasks), parse_scales(scales)
    limit, batch_size = parse_limit(limit), parse_batch_size(batch_size)
    manager = _task_manager(tasks, str(include_path) if include_path else None)
    options = check_lm_eval_options(lm_eval_options)
    evaluate = _evaluator(
        lm_eval, lm, model, tokenizer, engine, log_path,
        dict(tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
             random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
             fewshot_random_seed=seed, **{"log_samples": False, **options}),
        batch_size,
    )  # fmt: skip
    points: list[SweepPoint] = []
    done = done or {}
    _check_scales(switch, scales)
    try:
        for i, scale in enumerate(scales):
            if scale in done:
                points.append(done[scale])
                continue
            logger.info("α = %+g (%d/%d): setting θ + α·v", scale, i + 1, len(scales))
            started = time.perf_counter()
            switch.set_scale(scale)
            switched = time.perf_counter()
            results = evaluate()
            point = SweepPoint(scale, results, switched - started, time.perf_counter() - switched)
            points.append(point)
            if on_point is not None:
                on_point(point)
    finally:
        switch.restore()
    settings: dict[str, Any] = dict(
        limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, seed=seed,
        include_path=str(include_path) if include_path else None,
        lm_eval_version=getattr(lm_eval, "__version__", None),
        lm_eval_options=options, engine=dict(engine or {"name": "hf"}),
    )  # fmt: skip
    return Sweep(points=points, tasks=list(tasks), settings=settings)


def _evaluator(
    lm_eval: Any,
    lm: Any,
    model: Any,
    tokenizer: Any,
    engine: Mapping[str, Any] | None,
    log_path: Path | None,
    kwargs: dict[str, Any],
    batch_size: int | str,
) -> Callable[[], dict[str, Any]]:
    """``simple_evaluate`` on ``lm``, or on an ``HFLM`` around ``model`` made at the first call
    (none when every α was kept by an earlier run), its log lines into ``log_path``."""
    made: list[Any] = [] if lm is None else [lm]

    def evaluate() -> dict[str, Any]:
        with lm_eval_logged(log_path):
            if not made:
                from lm_eval.models.huggingface import HFLM

                hf_args = dict((engine or {}).get("model_args") or {})
                made.append(
                    HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **hf_args)
                )
            results = lm_eval.simple_evaluate(model=made[0], **kwargs)
        if results is None:  # not rank 0 of a distributed run
            raise InputError("lm-eval returned no results (a distributed run's other rank?)")
        return dict(results)

    return evaluate


def _check_scales(switch: Switch, scales: Sequence[float]) -> None:
    """Every α's refusal before the first point is evaluated (switches that can tell)."""
    check = getattr(switch, "check_scale", None)
    if check is not None:
        for scale in scales:
            check(scale)


# simple_evaluate's options an instruct target needs, as lm-eval's CLI spells them
# (--apply_chat_template [TEMPLATE], --fewshot_as_multiturn, --system_instruction,
# --gen_kwargs, --log_samples); read from lm_eval 0.4.13's evaluator.simple_evaluate.
LM_EVAL_OPTIONS = {
    "apply_chat_template": (bool, str),
    "fewshot_as_multiturn": (bool,),
    "system_instruction": (str,),
    "gen_kwargs": (str, dict),
    "log_samples": (bool,),
}


def check_lm_eval_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The lm-eval options given (None values dropped), each of a type lm-eval takes; one
    line naming an unknown one."""
    out = {}
    for name, value in (options or {}).items():
        if value is None:
            continue
        kinds = LM_EVAL_OPTIONS.get(name)
        if kinds is None:
            known = ", ".join(LM_EVAL_OPTIONS)
            hint = difflib.get_close_matches(name, list(LM_EVAL_OPTIONS), n=1)
            raise InputError(
                f"unknown lm-eval option {name!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f": rvhub passes {known}"
            )
        if not isinstance(value, kinds):
            raise InputError(f"lm-eval option `{name}`: {value!r} is not a {kinds[0].__name__}")
        out[name] = value
    if out.get("fewshot_as_multiturn") and not out.get("apply_chat_template"):
        raise InputError("`fewshot_as_multiturn` needs `apply_chat_template` (as in lm-eval)")
    return out


def _quiet_git_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` without git's ``fatal: not a git repository`` on the
    terminal (lm-eval 0.4.13 runs ``git describe --always`` with the caller's stderr)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def lm_eval_logged(log_path: Path | None) -> Iterator[None]:
    """While lm-eval runs: its log lines (logger ``lm_eval``) and Python warnings go to
    ``log_path`` instead of the terminal, and its git probe stays silent. Progress bars (tqdm,
    on stderr) are left alone."""
    import lm_eval.evaluator as evaluator

    probe = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _quiet_git_hash
    if log_path is None:
        try:
            yield
        finally:
            evaluator.get_git_commit_hash = probe
        return
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "py.warnings")]
    saved = [(lg, lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for lg, propagate, level in saved:
            lg.removeHandler(handler)
            lg.propagate, lg.level = propagate, level
        handler.close()
        evaluator.get_git_commit_hash = probe


def results_json(results: Mapping[str, Any]) -> str:
    """A results dict as lm-eval's CLI writes it (its ``handle_non_serializable``)."""
    try:
        from lm_eval.utils import handle_non_serializable
    except ImportError:  # reading a sweep back needs no lm_eval
        handle_non_serializable = str
    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def _sample_line(sample: Mapping[str, Any]) -> str:
    """One logged sample as lm-eval's CLI writes it (``EvaluationTracker.save_results_samples``
    of lm_eval 0.4.13: arguments by position, responses and target as strings)."""
    from lm_eval.utils import handle_non_serializable, sanitize_list

    row = dict(sample)
    row["arguments"] = {
        f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
        for i, arg in enumerate(row.get("arguments") or [])
    }
    row["resps"] = sanitize_list(row.get("resps", []))
    row["filtered_resps"] = sanitize_list(row.get("filtered_resps", []))
    row["target"] = str(row.get("target"))
    return json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n"


def write_point(folder: Path, point: SweepPoint) -> None:
    """``alpha_<α>/results.json`` and, when lm-eval logged them, one
    ``samples_<task>.jsonl`` per task beside it, each line as lm-eval's CLI writes it."""
    where = folder / point.dirname
    where.mkdir(exist_ok=True)
    results = dict(point.results)
    samples = results.pop("samples", None)
    if isinstance(samples, Mapping):
        for task, rows in samples.items():
            lines = "".join(_sample_line(row) for row in rows)
            name = re.sub(r"[^\w.-]", "_", str(task))
            atomic_write(where / f"samples_{name}.jsonl", lines.encode())
    atomic_write(where / "results.json", results_json(results).encode())


def write_sweep(sweep: Sweep, out: str | os.PathLike[str], *, plot: bytes | None = None) -> Path:
    """Write each point's ``alpha_<α>/results.json`` (and logged samples), ``sweep.json`` and
    the plot into ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for point in sweep.points:
        write_point(folder, point)
    if plot is not None:
        atomic_write(folder / SWEEP_PLOT, plot)
    summary = sweep.summary()
    atomic_write(folder / SWEEP_NAME, (json.dumps(summary, indent=2) + "\n").encode())
    return folder


def read_sweep(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``sweep.json`` of an ``rvhub eval`` output folder, checked; each point's results
    file must lie inside the folder."""
    root = Path(folder).expanduser()
    path = root / SWEEP_NAME
    if not path.is_file():
        raise InputError(
            f"`eval_dir` {root}: no {SWEEP_NAME} there (write one with `rvhub eval ... -o {root}`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable sweep summary ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
        raise InputError(f"{path}: not an rvhub eval sweep (format {SWEEP_FORMAT!r})")
    if data.get("version") != SWEEP_VERSION:
        raise InputError(
            f"{path}: sweep version {data.get('version')!r}; this rvhub reads {SWEEP_VERSION}"
        )
    if not isinstance(data.get("metrics"), list) or not isinstance(data.get("points"), list):
        raise InputError(f"{path}: a sweep needs 'points' and 'metrics' lists")
    base = root.resolve()
    for point in data["points"]:
        rel = point.get("results") if isinstance(point, dict) else None
        if not isinstance(rel, str) or not (root / rel).resolve().is_relative_to(base):
            raise InputError(f"{path}: a point's results path {rel!r} leaves the folder")
        point["results_path"] = str((root / rel).resolve())
    return data
