"""The artifact's README.md: Hub metadata plus how to load it and what it holds."""

from __future__ import annotations

import json
from typing import Any


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in values]


def render_model_card(manifest: dict[str, Any], results_table: str | None = None) -> str:
    """Markdown with YAML front matter (``library_name``, ``base_model``, ...) for ``manifest``."""
    source = manifest.get("source") or {}
    transforms = manifest.get("transforms") or {}
    runtime = manifest.get("runtime") or {}
    base = source.get("id", "")
    quant = transforms.get("quantize") or {}
    tags = ["smash-build", "diffusers"]
    if quant:
        tags.append(f"torchao-{quant.get('method')}")
    if transforms.get("fuse_qkv"):
        tags.append("qkv-fused")
    front = ["---", "library_name: diffusers"]
    if base and not base.startswith("builtin:"):
        front += [f"base_model: {json.dumps(base)}", "base_model_relation: quantized" if quant else "base_model_relation: finetune"]
    if source.get("license"):
        front.append(f"license: {json.dumps(source['license'])}")
    front += _yaml_list("tags", tags) + ["---", ""]

    name = manifest.get("name", "artifact")
    lines = [
        f"# {name}",
        "",
        f"An optimized build of `{base}` made with smash-build. Weights are baked "
        "(QKV fusion, quantization); caching and compilation are applied by the runtime at load.",
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
        f"- QKV fusion: {'yes' if transforms.get('fuse_qkv') else 'no'}",
        f"- Quantization: {quant.get('method', 'none')}"
        + (f" (excluded: {', '.join(quant.get('exclude', [])) or 'nothing'})" if quant else ""),
        "",
        "## Applied by the runtime",
        "",
        f"- Cacher: `{json.dumps(runtime.get('cacher'), sort_keys=True)}`",
        f"- Compiler: `{json.dumps(runtime.get('compiler'), sort_keys=True)}`",
        "",
    ]
    if results_table:
        lines += ["## Evaluation", "", results_table, ""]
    return "\n".join(front + lines)
