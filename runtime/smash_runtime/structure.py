"""Rebuild a component's module tree without its weights, then give it the stored ones.

The structure comes from the component's config (diffusers or transformers), is created
with every parameter on the meta device, gets the same QKV fusion the builder applied,
and receives the stored tensors by assignment, so torchao tensor types arrive as stored.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ArtifactError

# Only these libraries may be named in an artifact: a record never makes us import arbitrary code.
LIBRARIES = ("diffusers", "transformers")
WEIGHTS_FILE = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Create parameters on the meta device; buffers (position ids, ...) stay real.

    Buffers are kept because non-persistent ones are not in any state dict and could not
    be restored afterwards.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            meta = nn.Parameter(module._parameters[name].to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


_UNFUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def fuse_qkv(model: nn.Module) -> int:
    """Fuse QKV projections with diffusers' own fusion and drop the unfused copies.

    diffusers keeps ``to_q/to_k/to_v`` after fusing (16% more weights); nothing reads them
    once ``fused_projections`` is set, so they are deleted. Returns the number of attention
    modules fused.
    """
    if not hasattr(model, "fuse_qkv_projections"):
        raise ValueError(f"{type(model).__name__} has no QKV fusion in diffusers")
    model.fuse_qkv_projections()
    fused = 0
    for module in model.modules():
        if not getattr(module, "fused_projections", False):
            continue
        fused += 1
        for fused_name, parts in _UNFUSED.items():
            if hasattr(module, fused_name):
                for part in parts:
                    if part in module._modules:
                        del module._modules[part]
    return fused


def resolve_class(library: str, class_name: str) -> type:
    if library not in LIBRARIES:
        raise ArtifactError(f"component library {library!r} is not one of {LIBRARIES}", file="smash.json")
    module = importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ArtifactError(
            f"{library} {getattr(module, '__version__', '?')} has no class {class_name!r}; "
            "install the library version recorded in smash.json 'versions'",
            file="smash.json",
        )
    return cls


def build_skeleton(folder: Path, record: dict[str, Any]) -> nn.Module:
    """The component's module tree with meta parameters, fused like the stored weights."""
    cls = resolve_class(record["library"], record["class"])
    with empty_weights():
        if record["library"] == "diffusers":
            model = cls.from_config(cls.load_config(folder))
        else:
            config = cls.config_class.from_pretrained(folder)
            model = cls(config)
    if record.get("fused_qkv"):
        fuse_qkv(model)
    return model


def assign_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], rel: str) -> nn.Module:
    """Assign ``state_dict`` into the skeleton; every meta parameter must be replaced."""
    expected = set(model.state_dict().keys())
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ArtifactError(
            f"{rel}: weights do not match the component's structure "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})",
            file=rel,
        )
    model.load_state_dict(state_dict, assign=True, strict=True)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ArtifactError(f"{rel}: no stored weights for {still_meta[:3]}", file=rel)
    return model.eval().requires_grad_(False)
