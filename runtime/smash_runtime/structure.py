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

from .errors import ArtifactError, shorten
from .fused_layout import record_parts

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
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)  # a parameter already on meta keeps its identity (tied weights)

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
    model.fuse_qkv_projections()  # model-level: also installs the fused attention processors
    return drop_unfused_projections(model)


def fuse_qkv_within(module: nn.Module) -> int:
    """Fuse the attention modules inside ``module`` (one block of a model) the way
    ``fuse_qkv`` fuses them in the whole model: same weights, same parameter order."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    for sub in module.modules():
        if isinstance(sub, AttentionModuleMixin) and sub._supports_qkv_fusion:
            sub.fuse_projections()
        elif isinstance(sub, Attention):
            sub.fuse_projections(fuse=True)
    return drop_unfused_projections(module)


def drop_unfused_projections(module: nn.Module) -> int:
    fused = 0
    for sub in module.modules():
        if not getattr(sub, "fused_projections", False):
            continue
        fused += 1
        for fused_name, parts in _UNFUSED.items():
            if hasattr(sub, fused_name):
                present = [p for p in parts if p in sub._modules]
                if present:  # the artifact stores the fused rows under these names (see fused_layout)
                    record_parts(sub, fused_name, [(p, sub._modules[p].out_features) for p in present])
                for part in present:
                    del sub._modules[part]
    return fused


def resolve_class(library: str, class_name: str, field: str | None = None) -> type:
    """The class ``class_name`` exported by ``library`` (diffusers or transformers only)."""
    if library not in LIBRARIES:
        raise ArtifactError(f"component library {shorten(library)} is not one of {LIBRARIES}", file="smash.json", field=field)
    module = importlib.import_module(library)
    cls = getattr(module, class_name, None) if isinstance(class_name, str) else None
    if not isinstance(cls, type):
        raise ArtifactError(
            f"smash.json: {field or 'class'}: {library} {getattr(module, '__version__', '?')} has no class "
            f"{shorten(class_name)}; install the library version recorded in smash.json 'versions'",
            file="smash.json", field=field,
        )
    return cls


def build_skeleton(folder: Path, record: dict[str, Any]) -> nn.Module:
    """The component's module tree with meta parameters, fused like the stored weights."""
    cls = resolve_class(record["library"], record["class"])
    if record["library"] == "diffusers":
        config = cls.load_config(folder)
    else:
        config = cls.config_class.from_pretrained(folder)
    return skeleton_from_config(cls, record["library"], config, bool(record.get("fused_qkv")))


def skeleton_from_config(cls: type, library: str, config: Any, fused_qkv: bool) -> nn.Module:
    """``build_skeleton`` from a config already read (the loader reads only verified files):
    a dict, or for transformers also a config object."""
    from transformers.initialization import no_init_weights

    # Every parameter is replaced by a stored weight, so initialising them (on meta, through
    # torch's Python reference ops) is pure cost: most of the rebuild time before this.
    with empty_weights(), no_init_weights():
        if library == "diffusers":
            model = cls.from_config(config)
        else:
            model = cls(cls.config_class.from_dict(config) if isinstance(config, dict) else config)
    if hasattr(model, "tie_weights"):
        # transformers ties embeddings when loading weights, not in __init__; tie now so
        # that tied parameters are one object, as in a model loaded the usual way.
        model.tie_weights()
    if fused_qkv:
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
            f"(missing {shorten(missing[:3])}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {shorten(unexpected[:3])}{'...' if len(unexpected) > 3 else ''})",
            file=rel,
        )
    _check_shapes(model, state_dict, rel)
    model.load_state_dict(state_dict, assign=True, strict=True)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ArtifactError(f"{rel}: no stored weights for {still_meta[:3]}", file=rel)
    return model.eval().requires_grad_(False)


def _dtype_family(dtype: torch.dtype) -> str:
    return "float" if dtype.is_floating_point else "bool" if dtype == torch.bool else "complex" if dtype.is_complex else "int"


def _check_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor], rel: str) -> None:
    """Every stored tensor has the skeleton's shape and a dtype of the same family.

    Checked before assignment, so a tampered header is the project's error, not a torch
    ``size mismatch`` deep inside ``load_state_dict``.
    """
    for name, expected in model.state_dict().items():
        stored = state_dict[name]
        if tuple(stored.shape) != tuple(expected.shape):
            raise ArtifactError(f"{rel}: tensor {shorten(name)} has shape {list(stored.shape)}, the component's "
                                f"structure needs {list(expected.shape)}", file=rel, field=name)
        if _dtype_family(stored.dtype) != _dtype_family(expected.dtype):
            raise ArtifactError(f"{rel}: tensor {shorten(name)} is stored as {stored.dtype}, the component's "
                                f"structure needs a {expected.dtype}-like tensor", file=rel, field=name)


def _has_module_list(module: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) for m in module.modules())


def module_units(model: nn.Module) -> list[str]:
    """The pieces a component is written and streamed in: each repeated block, and the rest.

    Elements of ``nn.ModuleList`` (transformer blocks, UNet down/up blocks) are units; other
    children are units unless they hold such lists deeper down, in which case they are split.
    ``""`` stands for the root's own parameters and buffers.
    """
    units: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.ModuleList):
                units.extend(f"{path}.{i}" for i in range(len(child)))
            elif _has_module_list(child):
                visit(path + ".", child)
            else:
                units.append(path)

    visit("", model)
    return units + [""]


def unit_of(name: str, units: list[str]) -> str:
    """The unit a state-dict key belongs to (the longest unit that prefixes it)."""
    best = ""
    for unit in units:
        if unit and name.startswith(unit + ".") and len(unit) > len(best):
            best = unit
    return best


def split_into_units(state_dict: dict[str, torch.Tensor], units: list[str]) -> list[dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {u: {} for u in units}
    for name, tensor in state_dict.items():
        groups[unit_of(name, units)][name] = tensor
    return [groups[u] for u in units if groups[u]]
