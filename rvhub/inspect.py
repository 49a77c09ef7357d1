"""Human and JSON summaries of a vector (what ``rvhub inspect`` prints)."""

from __future__ import annotations

from typing import Any

from .vector import ReasoningVector

BAR_WIDTH = 30


def _source_line(info: dict[str, Any]) -> str:
    if info.get("kind") == "hub":
        return f"{info.get('repo_id')} @ {info.get('revision')}"
    text = str(info.get("path", "?"))
    if info.get("content_sha256"):
        text += f" (sha256 {str(info['content_sha256'])[:12]}…)"
    return text


def summary(vec: ReasoningVector) -> dict[str, Any]:
    """The facts ``inspect`` shows, as a JSON-ready dict."""
    manifest: dict[str, Any] = vec.meta.get("manifest") or {}
    files = manifest.get("files", {})
    return {
        "path": str(vec.path) if vec.path else None,
        "origin": vec.meta.get("origin"),
        "encoding": manifest.get("encoding", "dense"),
        "format_version": manifest.get("format_version"),
        "rvhub_version": manifest.get("rvhub_version"),
        "created_at": manifest.get("created_at"),
        "sources": manifest.get("sources", {}),
        "model": manifest.get("model", {}),
        "dtype": manifest.get("dtype"),
        "tensors": len(vec),
        "parameters": vec.numel,
        "bytes": sum(int(f.get("size", 0)) for f in files.values()),
        "files": {k: v.get("sha256") for k, v in files.items()},
        "excluded": manifest.get("excluded", []),
        "stats": manifest.get("stats", {}),
        "compression": manifest.get("compression"),
    }


def describe(vec: ReasoningVector) -> str:
    """A readable report: sources, encoding, size, norms per layer, round-trip error."""
    s = summary(vec)
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
    comp = s.get("compression")
    if comp:
        lines.extend(_compression_lines(comp))
    layer_norms: dict[str, float] = stats.get("layer_norms") or {}
    if layer_norms:
        top = max(layer_norms.values()) or 1.0
        lines.append("layer norms")
        for layer, value in layer_norms.items():
            n = round(BAR_WIDTH * value / top)
            lines.append(f"  {layer:>6} {value:11.4g} {'█' * n}")
    return "\n".join(lines)


def _compression_lines(comp: dict[str, Any]) -> list[str]:
    out = []
    for key, value in comp.items():
        if isinstance(value, (dict, list)):
            continue
        out.append(f"{key:<11}{value}")
    return out
