"""The artifact's README.md: Hub metadata, how to load it, what it holds, and its evaluation.

    >>> from smash_build.model_card import render_model_card
    >>> card = render_model_card(manifest)                    # at build time (no evaluation yet)
    >>> card = render_model_card(manifest, table, evaluation=results)   # after `smash-build evaluate`

The YAML front matter follows the Hub's model card metadata: ``library_name: diffusers``,
``pipeline_tag``, ``license`` (from the source), ``tags``, and ``base_model`` with
``base_model_relation: quantized`` when the source is a Hub model and the weights were quantized.
Built-in tiny models and local folders have no Hub id, so they get no ``base_model``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def front_matter(manifest: dict[str, Any]) -> dict[str, Any]:
    """The card's metadata as a dict (rendered as YAML between ``---`` lines)."""
    source = manifest.get("source") or {}
    transforms = manifest.get("transforms") or {}
    runtime = manifest.get("runtime") or {}
    base = source.get("id") or ""
    quant = transforms.get("quantize") or {}
    tags = ["smash-build", "diffusers", "text-to-image"]
    if quant:
        tags.append(f"torchao-{quant.get('method')}")
    if transforms.get("fuse_qkv"):
        tags.append("qkv-fused")
    if runtime.get("cacher"):
        tags.append(f"cache-{runtime['cacher'].get('name')}")
    meta: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": "text-to-image"}
    if _is_hub_id(base):
        meta["base_model"] = base
        if quant:
            meta["base_model_relation"] = "quantized"
    if source.get("license"):
        meta["license"] = source["license"]
    meta["tags"] = tags
    return meta


def _yaml(meta: dict[str, Any]) -> str:
    # JSON strings are valid YAML scalars: no YAML library needed to write safe front matter.
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _is_hub_id(source_id: str) -> bool:
    return bool(source_id) and not source_id.startswith(("builtin:", "/", ".", "~")) and source_id.count("/") == 1


def results_table_markdown(summary: dict[str, Any], format_cell: Callable[[Any], str]) -> str:
    """A markdown table of the evaluation summary (one column per side)."""
    cols = summary["columns"]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row in summary["rows"]:
        cells = [format_cell(row["values"].get(c)).replace("|", "\\|") for c in cols]
        lines.append(f"| {row['metric']} | " + " | ".join(cells) + " |")
    notes = summary.get("notes") or {}
    if notes:
        lines += [""] + [f"- `{name}` {text}" for name, text in notes.items()]
    return "\n".join(lines)


def _evaluation_section(results_table: str, evaluation: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if evaluation:
        s = evaluation["settings"]
        m = evaluation["machine"]
        threads = s.get("torch_threads") or m.get("torch_threads")  # what the sides ran with, not this process
        where = m.get("gpu") or f"{m.get('processor')} ({m.get('cpu_count')} cores, {threads} torch threads)"
        size = f"{s.get('height') or 'default'}x{s.get('width') or 'default'}"
        lines += [
            f"The base model (`{evaluation['base']['source']}`, untransformed, no cacher, no compiler) and this "
            f"artifact loaded with `smash_runtime.load`, on the same device, one after the other: "
            f"{s['images']} images ({s['num_prompts'] or len(evaluation['prompts'])} prompts from `{s['prompts']}` x "
            f"seeds {s['seeds']}), {s['steps_used']} steps, {size}, on `{s['device']}` ({where}). "
            f"Latency excludes {s['warmup']} warm-up generation(s) per side; fidelity compares each image with the "
            "base image of the same prompt and seed.",
            "",
        ]
    lines += [results_table, ""]
    if evaluation:
        files = set(evaluation.get("files", []))
        for rel, alt in (("eval/samples_grid.png", "base vs optimized samples"),
                         ("eval/latency_vs_fidelity.png", "latency vs fidelity"), ("eval/latency.png", "latency")):
            if rel in files:
                lines += [f"![{alt}]({rel})", ""]
        lines += ["Every number, the machine and the library versions: [`eval/results.json`](eval/results.json).", ""]
    return lines


def render_model_card(manifest: dict[str, Any], results_table: str | None = None,
                      evaluation: dict[str, Any] | None = None) -> str:
    """Markdown with YAML front matter for the artifact ``manifest`` (smash.json's content).

    ``results_table`` (markdown) and ``evaluation`` (results.json's content) add the evaluation section.
    """
    source = manifest.get("source") or {}
    transforms = manifest.get("transforms") or {}
    runtime = manifest.get("runtime") or {}
    base = source.get("id", "")
    quant = transforms.get("quantize") or {}
    front = "---\n" + _yaml(front_matter(manifest)) + "---\n"

    name = manifest.get("name", "artifact")
    revision = f" at commit `{source['commit']}`" if source.get("commit") else ""
    lines = [
        f"# {name}",
        "",
        f"An optimized build of `{base}`{revision} made with smash-build. What changes weights "
        "is baked into this artifact; caching and compilation are applied by the runtime at load.",
        "",
        "## Load",
        "",
        "```python",
        "import smash_runtime, torch",
        f'pipe = smash_runtime.load("{name}")  # a local folder or ORG/NAME on the Hub',
        'image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]',
        "```",
        "",
        "Plain `DiffusionPipeline.from_pretrained` cannot read fused or quantized components "
        "(it would silently re-initialise them); use `smash_runtime.load`.",
        "",
        "## Baked into the weights",
        "",
        f"- Components transformed: {', '.join(transforms.get('components') or []) or 'none'}",
        f"- QKV fusion: {'yes' if transforms.get('fuse_qkv') else 'no'}",
        f"- Quantization: {quant.get('method', 'none')}"
        + (f" (excluded: {', '.join(quant.get('exclude', [])) or 'nothing'})" if quant else ""),
        "",
        "## Applied by the runtime",
        "",
        f"- Cacher: `{json.dumps(runtime.get('cacher'), sort_keys=True)}`",
        f"- Compiler: `{json.dumps(runtime.get('compiler'), sort_keys=True)}`",
        "",
        "`smash_runtime.load(..., cacher=False, compiler=False)` turns either off; a dict overrides it.",
        "",
    ]
    if results_table:
        lines += _evaluation_section(results_table, evaluation)
    return front + "\n" + "\n".join(lines)
