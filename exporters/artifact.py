"""Write a pipeline as an artifact folder, atomically and byte-deterministically.

Everything is written into ``.<name>.partial-<pid>`` beside the target; ``smash.json`` (the
artifact record) is validated and written last (an artifact without it is not an artifact),
then the folder is swapped into place by :mod:`.output_folder`, which never replaces anything
but a previous artifact and never leaves the target without a complete one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smash_runtime.format import FORMAT_NAME, FORMAT_VERSION, RECORD_FILE, ArtifactRecord, file_table, record_from_data
from smash_runtime.fused_layout import split_fused
from smash_runtime.structure import WEIGHTS_FILE, module_units, split_into_units
from smash_runtime.tensors import ShardWriter, split_aliases

from .output_folder import _checkpoint, check_output_folder, new_partial, recover_leftovers, replace_folder

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class ArtifactInfo:
    path: Path
    record: ArtifactRecord

    @property
    def size(self) -> int:
        return sum(f.size for f in self.record.files.values())

    def component_size(self, name: str) -> int:
        return sum(f.size for rel, f in self.record.files.items() if rel.startswith(name + "/"))


def library_of(obj: object) -> str:
    root = type(obj).__module__.split(".")[0]
    if root not in WEIGHTS_FILE:
        raise TypeError(f"{type(obj).__name__} comes from {root!r}; artifacts hold diffusers and transformers components only")
    return root


def component_record(obj: object) -> dict[str, Any]:
    """How the runtime rebuilds ``obj``: library, class and kind (model, tokenizer or config)."""
    library = library_of(obj)
    if isinstance(obj, torch.nn.Module):
        kind = "model"
    elif library == "transformers":
        kind = "tokenizer"
    else:
        kind = "config"
    return {"library": library, "class": type(obj).__name__, "kind": kind}


def write_config(obj: object, folder: Path) -> None:
    """config.json of a model component (diffusers or transformers)."""
    folder.mkdir(parents=True, exist_ok=True)
    if library_of(obj) == "diffusers":
        obj.save_config(folder)
        # diffusers records the folder the model was loaded from: an artifact must not
        # depend on where its source happened to sit.
        path = folder / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config.pop("_name_or_path", None)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    else:
        obj.config.save_pretrained(folder)


def write_component(obj: object, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    quantization_config: dict[str, Any] | None = None) -> bool:
    """Write a component's folder; returns whether plain diffusers/transformers can load it.

    ``quantization_config`` (see :func:`write_loading_config`) goes into config.json.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(obj, torch.nn.Module):
        obj.save_pretrained(folder)  # tokenizers and schedulers: small text files
        return True
    write_config(obj, folder)
    unique, aliases = split_aliases(obj.state_dict())
    unique, kept_fused = split_fused(unique, obj)
    writer = ShardWriter(folder, WEIGHTS_FILE[library_of(obj)], max_shard_bytes, aliases)
    for unit in split_into_units(unique, module_units(obj)):
        writer.add_unit(unit)
    writer.close()
    return write_loading_config(folder, library_of(obj), quantization_config, kept_fused)


# What config.json says when the stored weights have a layout only smash_runtime reads, so that
# plain from_pretrained raises instead of initialising the layers randomly. diffusers raises
# "Unknown quantization type, got <quant_method>"; transformers only warns about an unknown
# method and loads random weights, but raises on a quantization_config without quant_method.
RUNTIME_ONLY_NOTE = "load this artifact with smash_runtime.load; see its README.md"
RUNTIME_ONLY_CONFIG = {
    "diffusers": {"quant_method": f"smash-runtime-only ({RUNTIME_ONLY_NOTE})"},
    "transformers": {"smash_runtime_only": RUNTIME_ONLY_NOTE},
}


def write_loading_config(folder: Path, library: str, quantization_config: dict[str, Any] | None,
                         kept_fused: list[str]) -> bool:
    """Put in config.json what lets the library load the stored weights, or makes it refuse them.

    A quantized diffusers component gets ``quantization_config`` (diffusers' ``TorchAoConfig``).
    Fused projections that could not be stored as their parts' rows (``kept_fused``), and
    quantized transformers components, get a ``quant_method`` that no library knows, so that
    plain ``from_pretrained`` fails loudly. Returns whether plain loading works.
    """
    loadable = not kept_fused and (quantization_config is None or library == "diffusers")
    entry = quantization_config if loadable else RUNTIME_ONLY_CONFIG[library]
    if entry is not None:
        path = folder / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["quantization_config"] = entry
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return loadable


def plain_loading_record(loadable: bool) -> dict[str, Any]:
    """The component record's note for components that plain diffusers cannot load."""
    return {} if loadable else {"plain_diffusers": False}


def model_index_json(pipeline_class: str, config: dict[str, Any]) -> str:
    """model_index.json as DiffusionPipeline.from_pretrained reads it, in one canonical form."""
    import diffusers

    body = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
    body.update({"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__})
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


# Writes one component's folder and returns how the runtime rebuilds it (library, class, kind, ...).
ComponentWriter = Callable[[Path], dict[str, Any]]


def in_memory_writers(pipeline, component_extras: dict[str, dict[str, Any]] | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      quantization_configs: dict[str, dict[str, Any]] | None = None) -> dict[str, ComponentWriter]:
    """Writers for every component of a pipeline held in memory.

    ``quantization_configs`` holds the config.json ``quantization_config`` of quantized components.
    """
    extras = component_extras or {}
    quant = quantization_configs or {}

    def writer(name: str, obj: object) -> ComponentWriter:
        def write(folder: Path) -> dict[str, Any]:
            loadable = write_component(obj, folder, max_shard_bytes, quant.get(name))
            return {**component_record(obj), **extras.get(name, {}), **plain_loading_record(loadable)}

        return write

    return {name: writer(name, obj) for name, obj in sorted(pipeline.components.items()) if obj is not None}


def write_artifact(
    target: str | os.PathLike,
    manifest: dict[str, Any],
    pipeline_class: str,
    pipeline_config: dict[str, Any],
    writers: dict[str, ComponentWriter],
    model_card: Callable[[dict[str, Any]], str] | None = None,
    on_component: Callable[[str], None] | None = None,
    finalize: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> ArtifactInfo:
    """Write an artifact to ``target`` with ``smash.json`` built from ``manifest``.

    ``manifest`` holds the build's own keys (source, transforms, runtime, versions, ...);
    format, pipeline class, components and the file table are filled in here.
    ``writers`` write each component's folder (see :func:`in_memory_writers`);
    ``pipeline_config`` is the pipeline's config (component entries and options).
    ``model_card`` renders README.md from the finished manifest (files excepted).
    ``finalize`` may complete the manifest once every component is written (the streaming
    build learns what it quantized only then). ``log`` reports leftovers of killed builds.

    Raises:
        SettingsError: ``target`` exists and is neither empty nor a previous artifact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(target, log or logging.getLogger("smash_build").warning)
    target = check_output_folder(target)
    partial = new_partial(target)
    _checkpoint("started")
    try:
        components = {}
        for name, write in sorted(writers.items()):
            if on_component:
                on_component(name)
            components[name] = write(partial / name)
            _checkpoint(f"component {name}")
        (partial / "model_index.json").write_text(model_index_json(pipeline_class, pipeline_config), encoding="utf-8")
        full = {
            **manifest,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pipeline_class": pipeline_class,
            "components": components,
        }
        if finalize is not None:
            finalize(full)
        if model_card is not None:
            (partial / "README.md").write_text(model_card(full), encoding="utf-8")
        _normalize_permissions(partial)
        full["files"] = file_table(partial)
        record = record_from_data(full, f"{target.name}/{RECORD_FILE} (being written)")
        (partial / RECORD_FILE).write_text(record.dumps(), encoding="utf-8")
        _checkpoint("record written")
        check_output_folder(target)  # once more: something may have appeared there meanwhile
        replace_folder(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ArtifactInfo(target, record)


def _normalize_permissions(root: Path) -> None:
    # safetensors writes 0600 files; artifacts are read by other users (a container's
    # non-root user, a shared cache), and identical inputs must give identical trees.
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def refresh_file_table(root: str | os.PathLike) -> ArtifactRecord:
    """Re-hash every file after adding some (evaluation results, a new model card)."""
    from smash_runtime.format import read_record

    root = Path(root)
    data = read_record(root).to_dict()
    data["files"] = file_table(root)
    record = record_from_data(data)
    tmp = root / (RECORD_FILE + ".tmp")
    tmp.write_text(record.dumps(), encoding="utf-8")
    tmp.replace(root / RECORD_FILE)
    return record
