"""Rendering a vector's model card: the template context, the jinja2 sandbox, the card.

The Markdown body is rendered with jinja2 from ``templates/vector_card.md.j2`` (or the
user's own template) in a sandbox; ``docs/card.md`` documents every template variable.

Example:
    >>> card = render_card("./reasoning-vector", repo_id="user/vec", scores=scores)
    >>> card.save("README.md")
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._version import __version__
from ..constants import CARD_NAME, EVAL_RESULTS_DIR, MANIFEST_NAME, PLOT_NAME
from ..errors import InputError
from ..evaluation.sweep import SWEEP_PLOT, as_dict
from ..io.atomic import atomic_write, check_output
from ..io.hashing import hash_file
from ..io.progress import human_bytes
from ..manifest import Manifest
from .metadata import (
    card_metadata,
    carried_license,
    dump_front_matter,
    hub_sources,
    lineage_root,
    local_source_license,
    public_model,
    split_front_matter,
)
from .plot import norms_plot, sweep_plot
from .scores import Scores

DEFAULT_TEMPLATE = "vector_card.md.j2"


@dataclass
class Card:
    """A rendered card: ``README.md`` text, its metadata, and the files to upload with it."""

    text: str
    metadata: dict[str, Any]
    plot_png: bytes | None = None
    # more files beside the card: the sweep plot, `.eval_results/*.yaml` (see eval_results_files)
    extra_files: dict[str, bytes] = field(default_factory=dict)

    @property
    def files(self) -> dict[str, bytes]:
        """``{path in repo: bytes}``: the card, the norm plot when drawn, and the extra files."""
        out = {CARD_NAME: self.text.encode("utf-8")}
        if self.plot_png is not None:
            out[PLOT_NAME] = self.plot_png
        out.update(self.extra_files)
        return out

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        inputs: Iterable[str | os.PathLike[str] | None] = (),
    ) -> list[Path]:
        """Write the card to ``path`` and the plot and ``.eval_results`` next to it (replacing
        files of an earlier card); returns the paths written. A file that would be, or lie
        inside, one of ``inputs`` (the vector folder, a scores file) is refused before any
        is written."""
        path = Path(path)
        files = {path: self.text.encode("utf-8")}
        for name, data in self.files.items():
            if name != CARD_NAME:
                files[path.parent / name] = data
        inputs = list(inputs)
        for target in files:
            check_output(target, overwrite=True, inputs=inputs, folder=False)
        for target, data in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
        return list(files)


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
            label=info.get("name")
            or Path(str(info.get("path", "?"))).name
            or str(info.get("path")),
            content_fingerprint=info.get("content_fingerprint"),
        )
    return view


def card_context(
    folder: Path,
    manifest: Manifest,
    *,
    repo_id: str,
    scores: Scores | None = None,
    license: str | None = None,
    source_licenses: Mapping[str, str | None] | None = None,
    target: str | None = None,
    plot: bool = True,
    endpoint: str = "https://huggingface.co",
    base_model: str | None = None,
) -> dict[str, Any]:
    """Every variable a card template sees (documented in ``docs/card.md``). Models are named
    by Hub id, local ones by folder name only (:func:`.metadata.public_model`)."""
    name = repo_id.rsplit("/", 1)[-1]
    licenses = dict(source_licenses or {})
    for role, record in manifest.sources.items():
        if role in ("a", "b") and role not in licenses and record.kind == "local" and record.path:
            licenses[role] = local_source_license(record.path)
    license = license or carried_license(licenses)
    root = lineage_root(manifest, base_model)
    metadata = card_metadata(manifest, name=name, scores=scores, license=license, base_model=root)
    measured, measured_local = public_model(
        (scores.target if scores is not None else None) or target
    )
    usage, usage_local = public_model(target or (scores.target if scores is not None else None))
    sources = [
        _source_view(role, record.to_json(), licenses.get(role), endpoint)
        for role, record in sorted(manifest.sources.items())
    ]
    return {
        "repo_id": repo_id,
        "name": name,
        "metadata": metadata,
        "metadata_yaml": yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True),
        "license": license,
        "base_models": hub_sources(manifest),
        "base_model": root,
        "sources": sources,
        **_manifest_view(folder, manifest),
        "scores": _score_rows(scores),
        "scores_target": measured,
        "scores_target_local": measured_local,
        "scale": (scores.scale if scores and scores.scale is not None else 1.0),
        "target": None if usage_local else usage,
        "plot": PLOT_NAME if plot else None,
        "sweep": _sweep_view(scores.sweep) if scores is not None and scores.sweep else None,
        "endpoint": endpoint,
    }


def _manifest_view(folder: Path, manifest: Manifest) -> dict[str, Any]:
    """The template variables that describe the artifact itself."""
    stats, model = manifest.stats, manifest.model
    file_hash = manifest.file_hash
    files = [
        {
            "name": n,
            "size": f.size,
            "sha256": f.digest if f.algorithm == "sha256" else None,  # format 1's templates
            "digest": f.digest,
            "size_h": human_bytes(f.size),
        }
        for n, f in manifest.files.items()
    ]
    stored = manifest.nbytes
    dense = sum(
        math.prod(t.shape) * _ITEMSIZE.get(str(t.dtype or "").upper(), 4)
        for t in manifest.tensors.values()
    )
    manifest_path = folder / MANIFEST_NAME
    encoding = manifest.encoding
    return {
        "encoding": encoding,
        "peft_adapter": encoding == "lora",
        "dtype": list(manifest.dtype),
        "model": dict(model),
        "model_type": model.get("model_type"),
        "architecture": ", ".join(model.get("architectures") or []) or None,
        "stats": dict(stats.raw),
        "norm": stats.norm,
        "roundtrip_error": stats.roundtrip_error,
        "layer_norms": [{"layer": k, "norm": v} for k, v in stats.layer_norms.items()],
        "tensors": len(manifest.tensors),
        "parameters": sum(math.prod(t.shape) for t in manifest.tensors.values()),
        "excluded": list(manifest.excluded),
        "files": files,
        "stored_bytes": stored,
        "stored_size": human_bytes(stored),
        "dense_bytes": dense,
        "dense_size": human_bytes(dense),
        "compression_ratio": (dense / stored) if stored else None,
        "compression": dict(manifest.compression.figures) if manifest.compression else {},
        "manifest_name": MANIFEST_NAME,
        "manifest_sha256": hash_file(manifest_path, "sha256") if manifest_path.is_file() else None,
        "file_hash": file_hash,
        "rvhub_version": manifest.rvhub_version or __version__,
        "created_at": manifest.created_at,
    }


def _score_rows(scores: Scores | None) -> list[dict[str, Any]]:
    """One row per benchmark: values with and without the vector, errors and deltas."""
    return [
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
        for bench in (scores.benchmarks if scores else [])
    ]


def _sweep_view(sweep: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep as the template shows it: one row per metric, one column per α."""
    scales = [float(x) for x in sweep.get("scales") or []]
    rows = []
    for m in sweep.get("metrics") or []:
        by = {p["scale"]: p for p in m.get("points") or []}
        rows.append(
            {
                "task": m.get("alias") or m.get("task"),
                "metric": m.get("label") or m.get("metric"),
                "cells": [by.get(a) for a in scales],
                "best": m.get("best"),
                "n": next((p.get("n") for p in m.get("points") or [] if p.get("n")), None),
            }
        )
    target = as_dict(sweep.get("target"))
    settings = as_dict(sweep.get("settings"))
    shown, local = public_model(target.get("name"), local=target.get("local"))
    return {
        "scales": scales,
        "rows": rows,
        "target": shown,
        "target_local": local,
        "lm_eval_version": settings.get("lm_eval_version"),
        "limit": settings.get("limit"),
        "engine": _engine_text(as_dict(settings.get("engine"))),
        "lm_eval_options": [
            _option_text(k, v)
            for k, v in sorted(as_dict(settings.get("lm_eval_options")).items())
            if v is not None and v is not False and k != "log_samples"
        ],
        "plot": SWEEP_PLOT,
    }


def _option_text(key: str, value: Any) -> str:
    """One lm-eval option for a code span: ``key`` for a flag, else ``key=value`` (no
    backticks, at most 80 characters)."""
    text = key if value is True else f"{key}={value}"
    text = " ".join(text.replace("`", "'").split())
    return text if len(text) <= 80 else text[:79] + "…"


def _engine_text(engine: Mapping[str, Any]) -> str | None:
    """``vLLM 0.32.0 (tensor parallel 2, α set in-place)`` or ``transformers 5.19.0``, from
    ``sweep.json``'s engine record (absent in sweeps older than the record: None)."""
    name = engine.get("name")
    if name == "vllm":
        details = []
        if (engine.get("tensor_parallel_size") or 1) > 1:
            details.append(f"tensor parallel {engine['tensor_parallel_size']}")
        if engine.get("switch"):
            details.append(f"α set {engine['switch']}")
        more = f" ({', '.join(details)})" if details else ""
        return f"vLLM {engine.get('version') or ''}".rstrip() + more
    if name == "hf":
        return f"transformers {engine.get('transformers') or ''}".rstrip()
    return None


def _signed_scale(scale: float) -> str:
    return f"+ {scale:g}·v" if scale >= 0 else f"− {-scale:g}·v"


def eval_result_entries(scores: Scores, *, target: str | None = None) -> list[Any]:
    """The Hub's ``.eval_results`` entries (huggingface_hub's ``EvalResultEntry``): one per
    metric and α of a sweep, or per metric and condition of other scores; the condition,
    metric and target go in ``notes``."""
    from huggingface_hub import EvalResultEntry

    named, local = public_model(target or scores.target)
    on = f"{named} (local)" if named and local else named or "the target"
    out = []
    if scores.sweep:
        for m in scores.sweep.get("metrics") or []:
            for p in m.get("points") or []:
                out.append(
                    EvalResultEntry(
                        dataset_id=str(m["dataset_id"]),
                        task_id=str(m["task"]),
                        value=p["value"],
                        notes=f"{m.get('label')}: {on} {_signed_scale(p['scale'])} (rvhub eval)",
                    )
                )
        return out
    labels = {"baseline": "alone", "plus_vector": "+ {s:g}·v", "minus_vector": "− {s:g}·v"}
    scale = scores.scale if scores.scale is not None else 1.0
    for bench in scores.benchmarks:
        for cond, value in bench.values.items():
            out.append(
                EvalResultEntry(
                    dataset_id=bench.dataset_id,
                    task_id=bench.task,
                    value=value,
                    dataset_revision=bench.dataset_revision,
                    notes=f"{bench.metric_name}: {on} {labels[cond].format(s=scale)}",
                )
            )
    return out


def eval_results_files(scores: Scores | None, *, target: str | None = None) -> dict[str, bytes]:
    """``{".eval_results/<task>.yaml": bytes}`` for :func:`eval_result_entries`, one file per
    task, written with ``eval_result_entries_to_yaml``."""
    if scores is None or not (scores or scores.sweep):  # a sweep without α = 0, ±1 has no rows
        return {}
    from huggingface_hub import eval_result_entries_to_yaml

    by_task: dict[str, list[Any]] = {}
    for entry in eval_result_entries(scores, target=target):
        by_task.setdefault(entry.task_id, []).append(entry)
    out = {}
    for task, entries in by_task.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task).strip(".") or "task"
        text = yaml.safe_dump(
            eval_result_entries_to_yaml(entries), sort_keys=False, allow_unicode=True
        )
        out[f"{EVAL_RESULTS_DIR}/{safe}.yaml"] = text.encode("utf-8")
    return out


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
        root = Path(__file__).resolve().parents[2] / "templates"
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
    manifest: Manifest | Mapping[str, Any] | None = None,
    base_model: str | None = None,
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
    data = _typed(manifest) if manifest is not None else Manifest.read(folder)
    repo_id = repo_id or f"YOUR-USER/{folder.resolve().name}"
    layer_norms = data.stats.layer_norms
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
        base_model=base_model,
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
    extra = card_extra_files(scores, target=target)
    return Card(text=text, metadata=meta, plot_png=png, extra_files=extra)


def card_extra_files(scores: Scores | None, *, target: str | None = None) -> dict[str, bytes]:
    """What goes beside a card for these scores: ``.eval_results/*.yaml`` and, for a sweep,
    its plot (the card links it as ``eval_sweep.png``)."""
    extra = eval_results_files(scores, target=target)
    if scores is not None and scores.sweep:
        sweep_png = sweep_plot(scores.sweep)
        if sweep_png is not None:
            extra[SWEEP_PLOT] = sweep_png
    return extra


def _typed(manifest: Manifest | Mapping[str, Any]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.from_json(dict(manifest))
