"""Safetensors files that hash the same every time, and torchao tensors inside them.

Writing: torchao tensor subclasses are flattened with torchao's own
``flatten_tensor_state_dict``; tensors that share storage (tied embeddings) are stored once
and recorded as aliases; files are written a unit (block) at a time with sorted headers
(safetensors' own writer needs every tensor in memory at once and emits its metadata in
hash-map order, so two saves of one model would differ).

Reading: no pickle anywhere; every tensor is copied into fresh, aligned storage (tensors
left in the memory map can give last-bit differences on CPU) one at a time, so the
process never holds two copies of the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

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


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


def _flatten(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors for safetensors, plus torchao's metadata when there are quantized ones."""
    metadata: dict[str, str] = {}
    if any(not _is_plain(t) for t in state_dict.values()):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        plain = {k: (t.data if isinstance(t, torch.nn.Parameter) else t) for k, t in state_dict.items()}
        tensors, metadata = flatten_tensor_state_dict(plain)
    else:
        tensors = dict(state_dict)
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata


class _ShardFile:
    """One safetensors file written tensor by tensor, never held in memory whole.

    safetensors' own writer needs every tensor at once. This one appends each tensor's bytes
    to a scratch file per element size and assembles header + data at the end, largest
    elements first, so every tensor is aligned to its element size as safetensors does it.
    The header has sorted keys and no time stamps: equal inputs give equal bytes.
    """

    def __init__(self, path: Path):
        self.path = path
        self.nbytes = 0
        self._groups: dict[int, tuple[Path, Any, list]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.element_size()
        if size not in self._groups:
            scratch = self.path.with_name(f"{self.path.name}.{size}.tmp")
            self._groups[size] = (scratch, open(scratch, "wb"), [])
        _, handle, entries = self._groups[size]
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        handle.write(memoryview(data))
        entries.append((name, _SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), data.nbytes))
        self.nbytes += data.nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {}
        offset = 0
        order = sorted(self._groups, reverse=True)
        for size in order:
            for name, dtype, shape, nbytes in self._groups[size][2]:
                header[name] = {"data_offsets": [offset, offset + nbytes], "dtype": dtype, "shape": shape}
                offset += nbytes
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        # Data starts 64-byte aligned: loaders that keep tensors in the memory map (diffusers does
        # for pre-quantized models) then compute on aligned weights, as our fresh copies do; on CPU
        # misaligned weights change the last bits of results.
        text += b" " * (-(8 + len(text)) % 64)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for size in order:
                scratch, handle, _ = self._groups[size]
                handle.close()
                with open(scratch, "rb") as part:
                    shutil.copyfileobj(part, out, 16 * 1024 * 1024)
                scratch.unlink()


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

    Units are appended in module order and go to disk at once, so memory holds one unit.
    A shard is closed when the next unit would push it past ``max_shard_bytes``; the
    partition depends only on the units and the limit, so the streaming build and the
    in-memory build write the same bytes. One shard is written as ``weights_name`` itself;
    several get diffusers' ``-0000i-of-0000n`` names and an index. Aliases (tied weights)
    are recorded in the first shard's metadata.
    """

    def __init__(self, folder: str | os.PathLike, weights_name: str, max_shard_bytes: int,
                 aliases: Mapping[str, str] | None = None, on_shard: Callable[[int, int], None] | None = None):
        self.on_shard = on_shard  # called with (shard number, bytes) as each shard is finished
        self.folder = Path(folder)
        self.weights_name = weights_name
        self.max_shard_bytes = max_shard_bytes
        self.aliases = dict(sorted((aliases or {}).items()))
        self.total_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._current: _ShardFile | None = None
        self._names: list[str] = []
        self._metadata: dict[str, str] = {}
        self._torchao_names: list[str] = []
        self._has_torchao = False
        self.folder.mkdir(parents=True, exist_ok=True)

    def add_unit(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        unit = {k: v for k, v in sorted(state_dict.items()) if k not in self.aliases}
        tensors, ao_meta = _flatten(unit)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._current is not None and self._current.nbytes and self._current.nbytes + size > self.max_shard_bytes:
            self._close_shard()
        if self._current is None:
            self._current = _ShardFile(self.folder / f".shard-{len(self._shards):05d}.tmp")
        for name, tensor in tensors.items():
            self._current.add(name, tensor)
            self._names.append(name)
        if ao_meta:
            self._torchao_names += json.loads(ao_meta.pop("tensor_names"))
            self._metadata.update(ao_meta)
            self._has_torchao = True
        else:  # described as plain tensors in case another unit of this shard is quantized
            self._torchao_names += list(unit)
            self._metadata.update({name: json.dumps({"_type": "Tensor"}) for name in unit})
        self.total_bytes += size

    def _close_shard(self) -> None:
        metadata = {"format": "pt"}
        if self._has_torchao:
            metadata.update(self._metadata)
            metadata["tensor_names"] = json.dumps(sorted(self._torchao_names))
            metadata[TORCHAO_KEY] = "1"
        if not self._shards and self.aliases:
            metadata[ALIASES_KEY] = json.dumps(self.aliases, sort_keys=True)
        self._current.finish(metadata)
        self._shards.append((self._current.path, sorted(self._names)))
        if self.on_shard:
            self.on_shard(len(self._shards), self._current.nbytes)
        self._current, self._names, self._metadata, self._torchao_names = None, [], {}, []
        self._has_torchao = False

    def close(self) -> list[str]:
        """Finish the last shard, name the files, write the index; returns the file names."""
        if self._current is None and not self._shards:
            self._current = _ShardFile(self.folder / ".shard-00000.tmp")
        if self._current is not None:
            self._close_shard()
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


def stored_weight_files(folder: str | os.PathLike, weights_name: str) -> list[Path]:
    """The shard files of a component (one file, or the files its index names)."""
    folder = Path(folder)
    index = folder / index_name(weights_name)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / weights_name]


def _read_file(path: Path, rel: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    name = rel or str(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            # Tensors map the file's pages (copy-on-write) instead of copying them: the file was
            # verified just before, and a copy would cost as much as reading the weights again.
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ArtifactError(f"{name}: cannot read safetensors file ({exc})", file=rel) from exc
    if metadata.get(TORCHAO_KEY):
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        ao_meta = {k: v for k, v in metadata.items() if k not in ("format", TORCHAO_KEY, ALIASES_KEY)}
        tensors, leftover = unflatten_tensor_state_dict(tensors, ao_meta)
        if leftover:
            raise ArtifactError(f"{name}: tensors {sorted(leftover)[:5]} belong to no recorded weight", file=rel)
    aliases = metadata.get(ALIASES_KEY, "{}")
    try:
        aliases = json.loads(aliases) if len(aliases) < (1 << 24) else None
    except (json.JSONDecodeError, RecursionError):
        aliases = None
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ArtifactError(f"{name}: metadata {ALIASES_KEY} is not a table of stored tensor names", file=rel)
    return tensors, aliases


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
    return load_files_state_dict(
        [(f"{rel_folder}/{path.name}" if rel_folder else None, path) for path in stored_weight_files(folder, weights_name)])


def load_files_state_dict(files: list[tuple[str | None, Path]]) -> dict[str, torch.Tensor]:
    """Read the given shard files ``(name in the artifact, path)`` of one component, rebuilding
    torchao tensors and aliases; the loader passes only files it has checked."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for rel, path in files:
        part, part_aliases = _read_file(path, rel)
        tensors.update(part)
        aliases.update(part_aliases)
    for alias, target in aliases.items():
        if target not in tensors:
            raise ArtifactError(f"{files[0][0]}: alias {alias!r} points at {target!r}, which no shard stores", file=files[0][0])
        tensors[alias] = tensors[target]
    return tensors


def iter_tensor_names(path: str | os.PathLike) -> Iterator[str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        yield from f.keys()
