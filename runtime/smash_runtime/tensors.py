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
    if t.device.type == "meta":  # a skeleton: tied parameters are the same object
        return ("meta", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def split_aliases(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared tensor (the first in sorted order); map the others to it."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if _is_plain(tensor):
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


def _flatten(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors for safetensors, plus torchao's metadata when there are quantized ones."""
    metadata = {"format": "pt"}
    if any(not _is_plain(t) for t in state_dict.values()):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        plain = {k: (t.data if isinstance(t, torch.nn.Parameter) else t) for k, t in state_dict.items()}
        tensors, ao_meta = flatten_tensor_state_dict(plain)
        metadata.update(ao_meta)
        metadata[TORCHAO_KEY] = "1"
    else:
        tensors = dict(state_dict)
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata


def _write(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    save_file(tensors, str(path), metadata=metadata)
    _sort_header(path)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``state_dict`` (plain or torchao tensors) to one file, deterministically."""
    path = Path(path)
    unique, aliases = split_aliases(state_dict)
    writer = ShardWriter(path.parent, path.name, max_shard_bytes=1 << 62, aliases=aliases)
    writer.add_unit(unique)
    writer.close()


def shard_name(weights_name: str, index: int, total: int) -> str:
    stem, ext = weights_name.rsplit(".", 1)
    return f"{stem}-{index:05d}-of-{total:05d}.{ext}"


def index_name(weights_name: str) -> str:
    return weights_name + ".index.json"


class ShardWriter:
    """Write a component's weights unit by unit (a transformer block at a time) into shards.

    Units are appended in module order; a shard is closed when the next unit would push it
    past ``max_shard_bytes``. The partition depends only on the units and the limit, so the
    streaming build and the in-memory build write the same bytes. One shard is written as
    ``weights_name`` itself; several get diffusers' ``-0000i-of-0000n`` names and an index.
    Aliases (tied weights) are recorded in the first shard's metadata.
    """

    def __init__(self, folder: str | os.PathLike, weights_name: str, max_shard_bytes: int,
                 aliases: Mapping[str, str] | None = None):
        self.folder = Path(folder)
        self.weights_name = weights_name
        self.max_shard_bytes = max_shard_bytes
        self.aliases = dict(sorted((aliases or {}).items()))
        self.total_bytes = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.folder.mkdir(parents=True, exist_ok=True)

    def add_unit(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        unit = {k: v for k, v in state_dict.items() if k not in self.aliases}
        size = sum(_nbytes(t) for t in unit.values())
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending.update(unit)
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        # Sorted names: the file does not depend on the order units listed their tensors in.
        tensors, metadata = _flatten(dict(sorted(self._pending.items())))
        if not self._shards and self.aliases:
            metadata[ALIASES_KEY] = json.dumps(self.aliases, sort_keys=True)
        path = self.folder / f".shard-{len(self._shards):05d}.tmp"
        _write(tensors, metadata, path)
        self._shards.append((path, sorted(tensors)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish the last shard, name the files, write the index; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        total = len(self._shards)
        if total == 1:
            self._shards[0][0].rename(self.folder / self.weights_name)
            return [self.weights_name]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._shards, start=1):
            name = shard_name(self.weights_name, i, total)
            path.rename(self.folder / name)
            files.append(name)
            weight_map.update({n: name for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / index_name(self.weights_name)).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [index_name(self.weights_name), *files]


def _nbytes(t: torch.Tensor) -> int:
    if _is_plain(t):
        return t.numel() * t.element_size()
    # torchao tensors: count the stored inner tensors (int8 data + scales), not the logical size.
    names = list(getattr(t, "tensor_data_names", [])) + list(getattr(t, "optional_tensor_data_names", []))
    inner = [getattr(t, n) for n in names if isinstance(getattr(t, n, None), torch.Tensor)]
    return sum(x.numel() * x.element_size() for x in inner)


def stored_weight_files(folder: str | os.PathLike, weights_name: str) -> list[Path]:
    """The shard files of a component (one file, or the files its index names)."""
    folder = Path(folder)
    index = folder / index_name(weights_name)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / weights_name]


def _fresh(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    out.copy_(t)
    return out


def _read_file(path: Path, rel: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    return tensors, json.loads(metadata.get(ALIASES_KEY, "{}"))


def load_state_dict(path: str | os.PathLike, *, rel: str | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_state_dict`, rebuilding torchao tensors and aliases.

    ``rel`` is the file's name inside the artifact, used in error messages.
    """
    tensors, aliases = _read_file(Path(path), rel)
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    return tensors


def load_component_state_dict(folder: str | os.PathLike, weights_name: str, *, rel_folder: str | None = None) -> dict[str, torch.Tensor]:
    """Read a component's weights, one file or all its shards, one tensor at a time."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for path in stored_weight_files(folder, weights_name):
        rel = f"{rel_folder}/{path.name}" if rel_folder else None
        part, part_aliases = _read_file(path, rel)
        tensors.update(part)
        aliases.update(part_aliases)
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    return tensors


def iter_tensor_names(path: str | os.PathLike) -> Iterator[str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        yield from f.keys()
