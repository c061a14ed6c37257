"""The artifact's README.md: Hub metadata, how to load it, what it holds, and its evaluation.

    >>> from smash_build.model_card import render_model_card
    >>> card = render_model_card(manifest)                    # at build time (no evaluation yet)
    >>> card = render_model_card(manifest, table, evaluation=results)   # after `smash-build evaluate`

The YAML front matter follows the Hub's model card metadata: ``library_name: diffusers``,
``pipeline_tag``, ``license``/``license_name``/``license_link`` (from the base model's card),
``tags``, and ``base_model`` with ``base_model_relation: quantized`` when the source is a Hub model
and the weights were quantized (``finetune`` when a LoRA was fused in). Built-in tiny models and
local folders have no Hub id, so they get no ``base_model``. Nothing in the card depends on the
output folder; ``card_for_repo`` rewrites the load snippet for the repo it is published to.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


STANDARD_TAGS = ("diffusers", "text-to-image")  # what the Hub filters diffusion models on


def front_matter(manifest: dict[str, Any]) -> dict[str, Any]:
    """The card's metadata as a dict (rendered as YAML between ``---`` lines).

    License fields and the pipeline tag are carried over from the base model's card; tags are the
    Hub's standard ones (``diffusers``, ``torchao``, ``text-to-image``, the base's pipeline tag)
    followed by smash-build's own.
    """
    source = manifest.get("source") or {}
    transforms = manifest.get("transforms") or {}
    runtime = manifest.get("runtime") or {}
    base = source.get("id") or ""
    quant = transforms.get("quantize") or {}
    pipeline_tag = source.get("pipeline_tag") or "text-to-image"
    tags = list(STANDARD_TAGS)
    if quant:
        tags.insert(1, "torchao")
    if pipeline_tag not in tags:
        tags.append(pipeline_tag)
    tags.append("smash-build")
    if quant:
        tags.append(f"torchao-{quant.get('method')}")
    if transforms.get("fuse_qkv"):
        tags.append("qkv-fused")
    if transforms.get("lora"):
        tags.append("lora-fused")
    if runtime.get("cacher"):
        tags.append(f"cache-{runtime['cacher'].get('name')}")
    meta: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": pipeline_tag}
    if _is_hub_id(base):
        meta["base_model"] = base
        if transforms.get("lora"):
            meta["base_model_relation"] = "finetune"  # a LoRA fused in: the weights are no longer the base's
        elif quant:
            meta["base_model_relation"] = "quantized"
    for key in ("license", "license_name", "license_link"):
        if source.get(key):
            meta[key] = source[key]
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


def format_cell(value: Any) -> str:
    """How the card and the console show a summary value (floats verbatim, so they parse back equal)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def results_table_markdown(summary: dict[str, Any], format_cell: Callable[[Any], str] = format_cell) -> str:
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


def title(manifest: dict[str, Any]) -> str:
    """The card's title: the name the builder took from the source, never the output folder's."""
    return f"{manifest.get('name') or 'model'} (smash-build)"


def _load_lines(manifest: dict[str, Any], repo_id: str | None, revision: str | None) -> list[str]:
    runtime_version = (manifest.get("versions") or {}).get("smash-runtime")
    where = f"{repo_id}@{revision or 'main'}" if repo_id else "path/to/this/folder"
    note = "" if repo_id else "  # or ORG/NAME@REVISION once published to the Hub"
    return [
        "```bash",
        f'pip install "smash-runtime=={runtime_version}"' if runtime_version else "pip install smash-runtime",
        "```",
        "",
        "```python",
        "import smash_runtime, torch",
        f'pipe = smash_runtime.load("{where}"){note}',
        'image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]',
        "```",
    ]


def _lora_lines(transforms: dict[str, Any]) -> list[str]:
    loras = transforms.get("lora") or []
    if not loras:
        return []
    lines = ["- LoRAs fused before QKV fusion and quantization (in order):"]
    for lora in loras:
        at = f"@{lora['commit']}" if lora.get("commit") else ""
        file = "" if lora["source"].endswith(lora["weight_name"]) else f" / `{lora['weight_name']}`"
        lines.append(f"  - `{lora['source']}{at}`{file}, scale {lora['scale']:g}, sha256 `{lora['sha256']}`")
    return lines


def _plain_diffusers_section(manifest: dict[str, Any], repo_id: str | None, revision: str | None) -> list[str]:
    """How to load the folder with diffusers alone, or which components make that impossible."""
    components = manifest.get("components") or {}
    runtime_only = sorted(n for n, record in components.items() if record.get("plain_diffusers") is False)
    if runtime_only:
        return [
            f"Plain diffusers cannot load this artifact: {', '.join(runtime_only)} stores weights only "
            "`smash_runtime.load` reads, and its config.json makes `from_pretrained` raise rather than "
            "initialise them randomly.",
            "",
        ]
    dtype = manifest.get("dtype") or "float32"
    where = f'"{repo_id}", revision="{revision or "main"}"' if repo_id else '"path/to/this/folder"'
    needs = "diffusers torchao accelerate" if (manifest.get("transforms") or {}).get("quantize") else "diffusers"
    return [
        f"It is also a plain diffusers folder (`pip install {needs}`); fused projections are stored as "
        "the unfused q/k/v rows, quantized layers as torchao tensors. Cacher and compiler are not applied; "
        "the image is the one `smash_runtime.load(..., cacher=False, compiler=False)` gives:",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        f'pipe = DiffusionPipeline.from_pretrained({where}, dtype=torch.{dtype})',
        "```",
        "",
    ]


def render_model_card(manifest: dict[str, Any], results_table: str | None = None,
                      evaluation: dict[str, Any] | None = None, *, repo_id: str | None = None,
                      revision: str | None = None) -> str:
    """Markdown with YAML front matter for the artifact ``manifest`` (smash.json's content).

    ``results_table`` (markdown) and ``evaluation`` (results.json's content) add the evaluation section.
    ``repo_id`` and ``revision`` (the Hub repo and branch it is published to) go into the load snippet.
    """
    source = manifest.get("source") or {}
    transforms = manifest.get("transforms") or {}
    runtime = manifest.get("runtime") or {}
    base = source.get("id", "")
    quant = transforms.get("quantize") or {}
    front = "---\n" + _yaml(front_matter(manifest)) + "---\n"

    at_commit = f" at commit `{source['commit']}`" if source.get("commit") else ""
    lines = [
        f"# {title(manifest)}",
        "",
        f"An optimized build of `{base}`{at_commit} made with smash-build. What changes weights "
        "is baked into this artifact; caching and compilation are applied by the runtime at load.",
        "",
        "## Load",
        "",
        *_load_lines(manifest, repo_id, revision),
        "",
        *_plain_diffusers_section(manifest, repo_id, revision),
        "## Baked into the weights",
        "",
        *_lora_lines(transforms),
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


def card_for_repo(root: Path, manifest: dict[str, Any], repo_id: str, revision: str) -> str | None:
    """The card of the artifact at ``root`` rewritten for Hub repo ``repo_id`` at branch ``revision``.

    None when README.md is not the card smash-build wrote (edited by hand): a person's edits are
    published as they are. What ``smash-build publish`` passes to the Hub publisher::

        >>> publish_artifact("dist/tiny-flux", "org/tiny-flux", card=card_for_repo)
    """
    body = {k: v for k, v in manifest.items() if k != "files"}
    table = evaluation = None
    if "eval/results.json" in manifest.get("files", {}):
        from .evaluate.settings import EVAL_DIR  # torch-free; the report module imports this one

        evaluation = json.loads((Path(root) / EVAL_DIR / "results.json").read_text(encoding="utf-8"))
        table = results_table_markdown(evaluation["summary"])
    readme = Path(root) / "README.md"
    if not readme.is_file() or readme.read_text(encoding="utf-8") != render_model_card(body, table, evaluation):
        return None
    return render_model_card(body, table, evaluation, repo_id=repo_id, revision=revision)
