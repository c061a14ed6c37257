"""Streaming build: a component never has to fit in memory, only its largest block.

The component's skeleton is created on the meta device; its stored weights are read from
the source safetensors (memory-mapped) one unit at a time (a transformer block, an
embedder); each unit is materialised, fused, quantized, appended to the output shards and
dropped before the next one is read. The units, their order and the shard partition are
those of the in-memory build, so both write the same bytes.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors import safe_open
from torch import nn

from smash_runtime.errors import ArtifactError
from smash_runtime.fused_layout import fused_parts, split_fused, unfused_names
from smash_runtime.structure import (
    WEIGHTS_FILE,
    build_skeleton,
    fuse_qkv_within,
    module_units,
    unit_of,
)
from smash_runtime.tensors import ShardWriter, index_name, split_aliases

from .exporters.artifact import component_record, plain_loading_record, write_config, write_loading_config
from .transforms import QuantizationReport, diffusers_quantization_config, quantization_record, quantize

# Above this a component is built by streaming even when not asked to.
AUTO_THRESHOLD_BYTES = 8 * 1024**3


class SourceTensors:
    """Read named tensors from a component folder's safetensors files (one, or sharded)."""

    def __init__(self, folder: Path, weights_name: str):
        index = folder / index_name(weights_name)
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        elif (folder / weights_name).is_file():
            with safe_open(str(folder / weights_name), "pt") as f:
                self.files = {name: folder / weights_name for name in f.keys()}
        else:
            raise ArtifactError(f"{folder}: no {weights_name} or {index.name}; streaming needs safetensors weights")

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))

    def read(self, wanted: dict[str, list[str]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for ``wanted = {key: [name, *tied aliases]}``, as ``dtype``.

        Each call maps the files it needs and unmaps them before returning: pages of a
        memory map that stays open count as resident memory once read, so keeping the
        maps open would let the whole source pile up in RSS.
        """
        located: dict[Path, list[tuple[str, str]]] = {}
        for key, names in wanted.items():
            name = next((n for n in names if n in self.files), None)
            if name is None:
                raise ArtifactError(f"source weights have none of {names}")
            located.setdefault(self.files[name], []).append((key, name))
        out = {}
        for path, pairs in located.items():
            with safe_open(str(path), "pt", device="cpu") as f:
                for key, name in pairs:
                    tensor = f.get_tensor(name)
                    fresh = torch.empty(tensor.shape, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
                    fresh.copy_(tensor)
                    out[key] = fresh
                    del tensor
        return out


def component_nbytes(folder: Path, library: str) -> int:
    """Size of a component's stored weights in a source folder (0 when it has none)."""
    try:
        return SourceTensors(folder, WEIGHTS_FILE[library]).nbytes()
    except ArtifactError:
        return 0


def should_stream(nbytes: int, forced: bool | None) -> bool:
    if forced is not None:
        return forced
    return nbytes > AUTO_THRESHOLD_BYTES or nbytes > 0.5 * psutil.virtual_memory().available


def _replace(parent_tree: nn.Module, unit: str) -> None:
    """Drop a written unit from the skeleton so its memory is freed."""
    parent_name, _, child = unit.rpartition(".")
    parent = parent_tree.get_submodule(parent_name) if parent_name else parent_tree
    parent._modules[child] = nn.Module()


def stream_component(
    source_folder: Path,
    out_folder: Path,
    record: dict[str, Any],
    dtype: torch.dtype,
    max_shard_bytes: int,
    fuse: bool = False,
    quantize_method: str | None = None,
    exclude_globs: tuple[str, ...] = (),
    progress: Callable[[int, int, str], None] = lambda done, total, unit: None,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[dict[str, Any], QuantizationReport | None, int, int]:
    """Build one model component unit by unit.

    Returns its record, the quantization report, the attention modules fused and the bytes
    of its weights before the transforms.
    """
    skeleton = build_skeleton(source_folder, {**record, "fused_qkv": False})
    if hasattr(skeleton.config, "dtype") and record["library"] == "transformers":
        skeleton.config.dtype = dtype  # as from_pretrained(torch_dtype=...) records it
    write_config(skeleton, out_folder)
    source = SourceTensors(source_folder, WEIGHTS_FILE[record["library"]])
    state = skeleton.state_dict(keep_vars=True)
    unique, aliases = split_aliases(state)
    groups: dict[str, list[str]] = {}
    for alias, target in aliases.items():
        groups.setdefault(target, [target]).append(alias)
    units = module_units(skeleton)
    by_unit: dict[str, list[str]] = {u: [] for u in units}
    for name in unique:
        by_unit[unit_of(name, units)].append(name)

    def shard_done(number: int, nbytes: int) -> None:
        log(f"{out_folder.name}: shard {number} written ({nbytes / 1024**2:.0f} MiB), "
            f"RSS {psutil.Process().memory_info().rss / 1024**3:.2f} GiB")

    writer = ShardWriter(out_folder, WEIGHTS_FILE[record["library"]], max_shard_bytes, aliases, on_shard=shard_done)
    report = QuantizationReport(quantize_method, tuple(exclude_globs)) if quantize_method else None
    fused = bytes_before = 0
    layout: dict[str, list[tuple[str, int]]] = {}  # fused linears, for diffusers' names of excluded modules
    kept_fused: list[str] = []
    for i, unit in enumerate(units):
        names = by_unit[unit]
        if not names:
            continue
        progress(i, len(units), unit or "(root)")
        module = skeleton.get_submodule(unit) if unit else skeleton
        prefix = f"{unit}." if unit else ""
        local = source.read({n[len(prefix):]: groups.get(n, [n]) for n in names}, dtype)
        bytes_before += sum(t.numel() * t.element_size() for t in local.values())
        module.load_state_dict(local, strict=False, assign=True)
        if fuse:
            fused += fuse_qkv_within(module)
        if report is not None:
            quantize(module, quantize_method, exclude_globs, prefix=prefix, report=report)
        done = {prefix + k: v for k, v in module.state_dict().items()}
        stored, kept = split_fused(done, module, prefix)
        layout.update(fused_parts(module, prefix))
        kept_fused += kept
        writer.add_unit({k: v for k, v in stored.items() if unit_of(k, units) == unit and k not in aliases})
        if unit:
            _replace(skeleton, unit)
        del local, done, module
        # Quantized blocks sit in reference cycles (module <-> attention processor, tensor
        # subclasses); without a collection here each block's weights outlive it until the end.
        gc.collect()
    writer.close()
    quant_config = None
    if report is not None:
        quant_config = diffusers_quantization_config(quantize_method, unfused_names(report.excluded + report.skipped, layout))
    loadable = write_loading_config(out_folder, record["library"], quant_config, kept_fused)
    progress(len(units), len(units), "done")
    extras = {}
    if fuse:
        extras["fused_qkv"] = True
    if quantize_method:
        extras["quantization"] = quantization_record(quantize_method)
    return {**component_record(skeleton), **extras, **plain_loading_record(loadable)}, report, fused, bytes_before
