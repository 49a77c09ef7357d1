"""Human and JSON summaries of a vector artifact (what ``rvhub inspect`` prints)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..constants import ADAPTER_CONFIG_NAME
from ..encodings.lora import engine_reports
from ..engines import ENGINE_NAMES
from ..errors import InputError
from ..manifest import Manifest, TensorRecord
from ..options import one_of

BAR_WIDTH = 30


def engine_report(
    manifest: Manifest | Mapping[str, Any], folder: Path | None, engine: str
) -> dict[str, Any]:
    """What ``engine`` applies of a LoRA artifact: the writer's record, or for an adapter written
    before rvhub recorded one, judged now from its ``adapter_config.json`` and tensor table."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_json(dict(manifest))
    one_of("engine", engine, ENGINE_NAMES)
    if manifest.encoding != "lora":
        raise InputError(
            f"this vector is {manifest.encoding}, not a LoRA adapter; serve it after "
            f"`rvhub compress VECTOR -o OUT --encoding lora --rank 64 --for {engine}`, or "
            "apply it whole with rvhub apply"
        )
    recorded = manifest.compression.engines.get(engine) if manifest.compression else None
    if recorded is not None:
        return dict(recorded)
    if folder is None:
        raise InputError("this LoRA vector has no folder to read its adapter_config.json from")
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    tensors, model = manifest.tensors, manifest.model
    reports = engine_reports(
        config,
        {n: t.rank for n, t in tensors.items() if t.stored == "lora"},
        {n: t.norm**2 for n, t in tensors.items()},
        architecture=(model.get("architectures") or [None])[0],
        tied=bool(model.get("tie_word_embeddings")),
        peft_applies=None,
    )
    return reports[engine]


def engine_line(engine: str, report: Mapping[str, Any]) -> str:
    """One line: what ``engine`` applies of the whole vector, and what only rvhub applies."""
    head = f"{engine:<10} {report['version']}: "
    if not report["loads"]:
        return head + "refuses this adapter (" + "; ".join(report["problems"]) + ")"
    text = (
        f"applies {report['lora_tensors']} LoRA modules = {report['share']:.1%} of ‖v‖²; the other "
        f"{report['not_applied_tensors']} tensors ({1 - report['share']:.1%}: biases, norms, "
        "experts, ...) only rvhub apply adds"
    )
    if report.get("server"):
        text += f"; start the server with {report['server']}"
    if report.get("excluded_tensors"):
        text += (
            f"; {report['excluded_tensors']} excluded tensors are not in this vector"
            " (their share is not measured)"
        )
    return head + text


def _source_line(info: dict[str, Any]) -> str:
    if info.get("kind") == "hub":
        return f"{info.get('repo_id')} @ {info.get('revision')}"
    text = str(info.get("path") or (f"{info['name']} (local)" if info.get("name") else "?"))
    if info.get("content_fingerprint"):
        text += f" (content fingerprint {str(info['content_fingerprint'])[:12]}…)"
    return text


def summary(manifest: Manifest, *, path: str | None = None, origin: Any = None) -> dict[str, Any]:
    """The facts ``inspect`` shows about a (verified) manifest, as a JSON-ready dict."""
    return {
        "path": path,
        "origin": origin,
        "encoding": manifest.encoding,
        "format_version": manifest.format_version,
        "rvhub_version": manifest.rvhub_version,
        "created_at": manifest.created_at,
        "sources": {r: s.to_json() for r, s in manifest.sources.items()},
        "model": dict(manifest.model),
        "dtype": list(manifest.dtype),
        "tensors": len(manifest.tensors),
        "parameters": sum(math.prod(t.shape) for t in manifest.tensors.values()),
        "bytes": manifest.nbytes,
        "files": {name: manifest.digest(name) for name in manifest.files},
        "excluded": list(manifest.excluded),
        "stats": dict(manifest.stats.raw),
        "compression": dict(manifest.compression.figures) if manifest.compression else None,
        "lineage": dict(manifest.lineage) if manifest.lineage else None,
    }


def describe(s: Mapping[str, Any], manifest: Manifest) -> str:
    """A readable report of :func:`summary`'s facts: sources, encoding, size, norms per layer,
    round-trip error."""
    model = s["model"] or {}
    stats = s["stats"] or {}
    lines = [
        f"vector     {s['path']}",
        f"encoding   {s['encoding']} ({', '.join(s['dtype'] or [])}), format v{s['format_version']}, "
        f"made by rvhub {s['rvhub_version']} at {s['created_at']}",
        f"model      {model.get('model_type')} {', '.join(model.get('architectures') or [])}"
        f" (tied embeddings: {model.get('tie_word_embeddings')})",
    ]
    for key, label in (("a", "source A"), ("b", "source B")):
        if key in s["sources"]:
            lines.append(f"{label:<11}{_source_line(s['sources'][key])}")
    lines.append(
        f"size       {s['tensors']} tensors, {s['parameters']:,} parameters, {s['bytes']:,} bytes"
    )
    if s["excluded"]:
        shown = ", ".join(s["excluded"][:4]) + (" …" if len(s["excluded"]) > 4 else "")
        lines.append(f"excluded   {len(s['excluded'])}: {shown}")
    if "norm" in stats:
        lines.append(f"norm       ‖v‖ = {stats['norm']:.6g}")
    rt = stats.get("roundtrip_error")
    if rt:
        lines.append(f"round trip ‖B + v − A‖ = {rt['abs']:.3e} ({rt['rel']:.3e} of ‖A − B‖)")
    lineage = s.get("lineage")
    lines.append(
        f"lineage    fingerprint of the sources ({lineage['algorithm']}): apply and check "
        "refuse targets of another lineage"
        if lineage
        else "lineage    none recorded (made before rvhub kept one): targets' lineage cannot be checked"
    )
    comp = s.get("compression")
    if comp:
        lines.extend(_compression_lines(comp, manifest.tensors))
    layer_norms: dict[str, float] = stats.get("layer_norms") or {}
    if layer_norms:
        top = max(layer_norms.values()) or 1.0
        lines.append("layer norms")
        for layer, value in layer_norms.items():
            n = round(BAR_WIDTH * value / top)
            lines.append(f"  {layer:>6} {value:11.4g} {'█' * n}")
    return "\n".join(lines)


def _compression_lines(comp: dict[str, Any], tensors: Mapping[str, TensorRecord]) -> list[str]:
    size = f"{comp['bytes']:,} bytes = {comp['ratio']:.1%} of dense ({comp['dense_bytes']:,})"
    if comp.get("encoding") == "sparse":
        return [
            f"sparse     {comp['sparse_tensors']} tensors sparse, {comp['dense_tensors']} dense; "
            f"{comp['nonzero_fraction']:.1%} of entries non-zero; lossless",
            f"           {size}",
        ]
    ranks = comp["ranks"]
    rule = ", ".join(f"{k} {v}" for k, v in comp["rank_rule"].items() if v is not None)
    lines = [
        f"lora       {comp['lora_tensors']} modules as a PEFT adapter ({rule}; {comp['svd']} SVD), "
        f"ranks {ranks['min']}–{ranks['max']} (median {ranks['median']})",
        f"           overall relative error {comp['overall_rel_error']:.4f}; {size}",
    ]
    engines = comp.get("engines")
    if engines:
        lines.append(
            f"engines    (written for {comp.get('profile', 'peft')}; share of the whole ‖v‖²)"
        )
        lines.extend("  " + engine_line(name, report) for name, report in engines.items())
    else:
        lines.append(
            f"peft       stock PEFT (PeftModel.from_pretrained + merge_and_unload) applies "
            f"{comp['lora_tensors']} tensors = {comp['peft_norm_share']:.1%} of ‖v‖²; the "
            f"{comp['dense_tensors']} dense tensors (biases, norms, ...) = "
            f"{comp['rvhub_norm_share']:.1%} need rvhub apply / load_vector"
        )
    lora = [(n, t) for n, t in tensors.items() if t.stored == "lora"]
    worst = sorted(lora, key=lambda nt: -nt[1].rel_error)[:5]
    if worst:
        lines.append("worst modules (rank, relative error)")
        lines.extend(f"  {n}: {t.rank}, {t.rel_error:.4f}" for n, t in worst)
    return lines
