"""How fused QKV projections are stored: as the unfused q/k/v rows that diffusers knows.

The builder fuses ``to_q/to_k/to_v`` into one ``to_qkv`` linear (then quantizes it per output
row). A fused weight is the row-wise concatenation ``[q; k; v]``, and per-row quantization keeps
rows independent, so the artifact stores each part's rows under its unfused name
(``attn.to_q.weight``, ...). Plain ``DiffusionPipeline.from_pretrained`` loads them into its
unfused modules; no row is stored twice; the runtime concatenates the parts back into the fused
module it rebuilt, which gives exactly the tensor the builder had.

    >>> stored = split_fused(model.state_dict(), model)      # builder: to_qkv -> to_q, to_k, to_v
    >>> state_dict = join_fused(stored, skeleton)            # runtime: to_q, to_k, to_v -> to_qkv

A quantized tensor whose rows cannot be split and re-joined exactly (a packed layout) is stored
fused under its fused name; :func:`split_fused` reports it, so the builder can mark the
component as one that only ``smash_runtime.load`` reads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# Set by ``structure.drop_unfused_projections`` on every fused attention module:
# ``{fused linear name: [(part linear name, output rows), ...]}``, in concatenation order.
PARTS_ATTR = "_smash_fused_parts"
_SUFFIXES = ("weight", "bias")


def record_parts(attention: nn.Module, fused_name: str, parts: list[tuple[str, int]]) -> None:
    """Remember which unfused linears (and how many rows each) ``fused_name`` concatenates."""
    table = attention.__dict__.setdefault(PARTS_ATTR, {})
    table[fused_name] = parts


def fused_parts(model: nn.Module, prefix: str = "") -> dict[str, list[tuple[str, int]]]:
    """``{"blocks.0.attn.to_qkv": [("blocks.0.attn.to_q", 3072), ...]}`` for every fused linear.

    ``prefix`` is ``model``'s own name inside its component when ``model`` is one block of it.
    """
    layout = {}
    for path, sub in model.named_modules():
        base = f"{prefix}{path}." if path else prefix
        for fused_name, parts in sub.__dict__.get(PARTS_ATTR, {}).items():
            layout[base + fused_name] = [(base + part, rows) for part, rows in parts]
    return layout


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0: plain tensors with ``torch.cat``, torchao tensors through their parts.

    torchao's quantized tensors do not implement ``aten.cat``; their row-indexed inner tensors
    (int8/float8 data, per-row scales) are concatenated and the rest must be equal.

    Raises:
        ValueError: the parts differ in a way that rows cannot express (another type, other settings).
    """
    first = parts[0]
    if type(first) in (torch.Tensor, nn.Parameter):
        return torch.cat([p.detach() for p in parts])
    names, context = first.__tensor_flatten__()
    for part in parts[1:]:
        other_names, other_context = part.__tensor_flatten__()
        if type(part) is not type(first) or other_names != names or repr(other_context) != repr(context):
            raise ValueError(f"cannot join {type(first).__name__} parts with different layouts")
    inner = {}
    for name in names:
        values = [getattr(p, name) for p in parts]
        if all(v.dim() >= 1 and v.shape[0] == p.shape[0] for v, p in zip(values, parts)):
            inner[name] = torch.cat(values)
        elif all(torch.equal(v, values[0]) for v in values[1:]):
            inner[name] = values[0]
        else:
            raise ValueError(f"cannot join {type(first).__name__} parts: {name!r} is neither per row nor shared")
    size = torch.Size([sum(p.shape[0] for p in parts), *first.shape[1:]])
    return type(first).__tensor_unflatten__(inner, context, size, None)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if type(a) is not type(b) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if type(a) in (torch.Tensor, nn.Parameter):
        return torch.equal(a, b)
    names, context = a.__tensor_flatten__()
    other_names, other_context = b.__tensor_flatten__()
    return (names == other_names and repr(context) == repr(other_context)
            and all(_same(getattr(a, n), getattr(b, n)) for n in names))


def _split_rows(tensor: torch.Tensor, rows: list[int]) -> list[torch.Tensor] | None:
    """The row blocks of ``tensor``, or None when they would not join back into it exactly."""
    if sum(rows) != tensor.shape[0]:
        return None
    starts = [sum(rows[:i]) for i in range(len(rows))]
    try:
        pieces = [tensor[start:start + n] for start, n in zip(starts, rows)]
        if type(tensor) in (torch.Tensor, nn.Parameter):
            return pieces  # slicing a plain tensor is exact by construction
        return pieces if _same(cat_rows(pieces), tensor) else None
    except (NotImplementedError, ValueError, RuntimeError):  # a packed layout without row slicing
        return None


def split_fused(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The stored form of ``state_dict``: fused weights and biases as their unfused parts' rows.

    Returns the new state dict and the fused linears kept whole (rows not separable).
    """
    out = dict(state_dict)
    kept = []
    for fused, parts in fused_parts(model, prefix).items():
        rows = [n for _, n in parts]
        pieces = {suffix: _split_rows(out[f"{fused}.{suffix}"], rows) for suffix in _SUFFIXES if f"{fused}.{suffix}" in out}
        if any(p is None for p in pieces.values()):
            kept.append(fused)
            continue
        for suffix, blocks in pieces.items():
            del out[f"{fused}.{suffix}"]
            out.update({f"{part}.{suffix}": block for (part, _), block in zip(parts, blocks)})
    return out, kept


def join_fused(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Concatenate stored parts into the fused linears of ``model`` (a rebuilt skeleton), in place.

    Fused weights stored whole are left as they are.
    """
    for fused, parts in fused_parts(model).items():
        for suffix in _SUFFIXES:
            keys = [f"{part}.{suffix}" for part, _ in parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{fused}.{suffix}"] = cat_rows([state_dict.pop(k) for k in keys])
    return state_dict


def unfused_names(names: list[str], layout: Mapping[str, list[tuple[str, int]]]) -> list[str]:
    """Module names as diffusers knows them: a fused linear becomes its parts, others stay."""
    out = []
    for name in names:
        out += [part for part, _ in layout[name]] if name in layout else [name]
    return sorted(out)
