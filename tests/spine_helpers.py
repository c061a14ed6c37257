"""Shared helpers for tests: build artifacts from inline manifests, run code in fresh processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

from smash_build.builder import BuildResult, build
from smash_build.manifest import parse_manifest

GEN = dict(prompt="a red cube on a table", steps=2, height=64, width=64, seed=0)


def manifest_text(source: str = "builtin:tiny-flux", *, fuse: bool = False, method: str | None = None,
                  exclude: str = "none", extra: str = "") -> str:
    quant = f'quantize = {{ method = "{method}", exclude = ["{exclude}"] }}' if method else ""
    return textwrap.dedent(
        f"""
        [model]
        source = "{source}"
        dtype = "float32"

        [build]
        fuse_qkv = {str(fuse).lower()}
        {quant}

        [output]
        dir = "artifact"
        """
    ) + extra


def build_from_text(text: str, out_dir: Path, base_dir: Path | None = None) -> BuildResult:
    manifest = parse_manifest(text, base_dir=base_dir or out_dir.parent)
    return build(manifest, out_dir=out_dir)


def image_digest(pipe, **overrides) -> str:
    from smash_runtime.images import encode_png, generate

    kw = {**GEN, **overrides}
    prompt = kw.pop("prompt")
    return hashlib.sha256(encode_png(generate(pipe, prompt, **kw)[0])).hexdigest()


FRESH_LOADER = """
import hashlib, json, sys
from smash_runtime.logs import quiet_third_party_logs
quiet_third_party_logs()
import torch
import smash_runtime
from smash_runtime.images import encode_png, generate
torch.set_num_threads(int(sys.argv[3]))  # CPU kernels round differently per thread count
out = {}
for path in json.loads(sys.argv[1]):
    pipe = smash_runtime.load(path, device="cpu")
    kw = dict(json.loads(sys.argv[2]))
    prompt = kw.pop("prompt")
    out[path] = hashlib.sha256(encode_png(generate(pipe, prompt, **kw)[0])).hexdigest()
print(json.dumps(out))
"""


def digests_in_fresh_process(paths: list[Path], **overrides) -> dict[str, str]:
    """Load each artifact with smash_runtime.load in ONE new interpreter; image digests by path."""
    args = [sys.executable, "-c", FRESH_LOADER, json.dumps([str(p) for p in paths]), json.dumps({**GEN, **overrides}),
            str(torch.get_num_threads())]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# Modules the LoRAs adapt: attention projections (which QKV fusion later merges) and a few others.
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn1.to_q", "attn2.to_v", "ff.net.2",
           "proj_out", "self_attn.q_proj")


def lora_pairs(module: torch.nn.Module, seed: int, rank: int = 4):
    """(module name, lora_A/down, lora_B/up) for every targeted Linear of ``module``, seeded."""
    g = torch.Generator().manual_seed(seed)
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(TARGETS):
            down = torch.randn(rank, layer.in_features, generator=g) * 0.2
            up = torch.randn(layer.out_features, rank, generator=g) * 0.2
            yield name, down, up


def write_peft_lora(pipe, path: Path, seed: int = 1, extra: dict | None = None) -> Path:
    """A LoRA in the diffusers/peft format for ``pipe``'s denoiser (and SDXL's first text encoder)."""
    prefixes = ["transformer"] if getattr(pipe, "transformer", None) is not None else ["unet", "text_encoder"]
    state = {}
    for prefix in prefixes:
        for name, down, up in lora_pairs(getattr(pipe, prefix), seed):
            state[f"{prefix}.{name}.lora_A.weight"] = down
            state[f"{prefix}.{name}.lora_B.weight"] = up
    state.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return path
