"""Safetensors files that hash the same every time, and torchao tensors inside them.

Writing: torchao tensor subclasses are flattened with torchao's own
``flatten_tensor_state_dict``; tensors that share storage (tied embeddings) are stored once
and recorded as aliases; the header is rewritten with sorted keys because safetensors
emits its metadata in hash-map order.

Reading: no pickle anywhere; every tensor is copied into fresh, aligned storage (tensors
left in the memory map can give last-bit differences on CPU) one at a time, so the
process never holds two copies of the weights.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ArtifactError

ALIASES_KEY = "smash.aliases"
TORCHAO_KEY = "smash.torchao"


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def split_aliases(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared tensor (the first in sorted order); map the others to it."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if _is_plain(tensor) and tensor.device.type != "meta":
            key = _storage_key(tensor)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        unique[name] = tensor
    return unique, aliases


def _sort_header(path: Path) -> None:
    """Rewrite the JSON header in place with sorted keys (same length, so offsets hold)."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:
            raise RuntimeError(f"{path}: sorted safetensors header grew ({len(text)} > {length} bytes)")
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``state_dict`` (plain or torchao tensors) to ``path`` deterministically."""
    path = Path(path)
    unique, aliases = split_aliases(state_dict)
    metadata = {"format": "pt"}
    if any(not _is_plain(t) for t in unique.values()):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        plain = {k: (t.data if isinstance(t, torch.nn.Parameter) else t) for k, t in unique.items()}
        tensors, ao_meta = flatten_tensor_state_dict(plain)
        metadata.update(ao_meta)
        metadata[TORCHAO_KEY] = "1"
    else:
        tensors = dict(unique)
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    _sort_header(path)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    out.copy_(t)
    return out


def load_state_dict(path: str | os.PathLike, *, rel: str | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_state_dict`, rebuilding torchao tensors and aliases.

    ``rel`` is the file's name inside the artifact, used in error messages.
    """
    path = Path(path)
    name = rel or str(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: _fresh(f.get_tensor(key)) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ArtifactError(f"{name}: cannot read safetensors file ({exc})", file=rel) from exc
    if metadata.get(TORCHAO_KEY):
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        ao_meta = {k: v for k, v in metadata.items() if k not in ("format", TORCHAO_KEY, ALIASES_KEY)}
        tensors, leftover = unflatten_tensor_state_dict(tensors, ao_meta)
        if leftover:
            raise ArtifactError(f"{name}: tensors {sorted(leftover)[:5]} belong to no recorded weight", file=rel)
    for alias, target in json.loads(metadata.get(ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[target]
    return tensors


def iter_tensor_names(path: str | os.PathLike) -> Iterator[str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        yield from f.keys()
