"""Write a pipeline as an artifact folder, atomically and byte-deterministically.

Everything is written into ``.<name>.partial-<pid>`` beside the target; ``smash.json`` is
written last (an artifact without it is not an artifact), then the folder is renamed into
place. A killed build leaves only a ``.partial`` folder, which the next build removes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smash_runtime.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, dumps_manifest, file_table
from smash_runtime.structure import WEIGHTS_FILE
from smash_runtime.tensors import save_state_dict

PARTIAL_MARK = ".partial-"


@dataclass
class ArtifactInfo:
    path: Path
    manifest: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest["files"].values())

    def component_size(self, name: str) -> int:
        return sum(f["size"] for rel, f in self.manifest["files"].items() if rel.startswith(name + "/"))


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


def write_component(obj: object, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, torch.nn.Module):
        library = library_of(obj)
        if library == "diffusers":
            obj.save_config(folder)
        else:
            obj.config.save_pretrained(folder)
        save_state_dict(obj.state_dict(), folder / WEIGHTS_FILE[library])
    else:
        obj.save_pretrained(folder)


def _remove_stale_partials(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}{PARTIAL_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_artifact(
    pipeline,
    target: str | os.PathLike,
    manifest: dict[str, Any],
    component_extras: dict[str, dict[str, Any]] | None = None,
    model_card: Callable[[dict[str, Any]], str] | None = None,
    on_component: Callable[[str], None] | None = None,
) -> ArtifactInfo:
    """Write ``pipeline`` to ``target`` with ``smash.json`` built from ``manifest``.

    ``manifest`` holds the build's own keys (source, transforms, runtime, versions, ...);
    format, pipeline class, components and the file table are filled in here.
    ``component_extras`` adds per-component keys (``fused_qkv``, ``quantization``).
    ``model_card`` renders README.md from the finished manifest (files excepted).
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    partial = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}"
    partial.mkdir()
    try:
        components = {}
        for name, obj in sorted(pipeline.components.items()):
            if obj is None:
                continue
            if on_component:
                on_component(name)
            write_component(obj, partial / name)
            components[name] = {**component_record(obj), **(component_extras or {}).get(name, {})}
        pipeline.save_config(partial)  # model_index.json, read by DiffusionPipeline.from_pretrained too
        full = {
            **manifest,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pipeline_class": type(pipeline).__name__,
            "components": components,
        }
        if model_card is not None:
            (partial / "README.md").write_text(model_card(full), encoding="utf-8")
        _normalize_permissions(partial)
        full["files"] = file_table(partial)
        (partial / MANIFEST_FILE).write_text(dumps_manifest(full), encoding="utf-8")
        _swap_into_place(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ArtifactInfo(target, full)


def _normalize_permissions(root: Path) -> None:
    # safetensors writes 0600 files; artifacts are read by other users (a container's
    # non-root user, a shared cache), and identical inputs must give identical trees.
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _swap_into_place(partial: Path, target: Path) -> None:
    if target.exists():
        retired = target.parent / f".{target.name}{PARTIAL_MARK}old-{os.getpid()}"
        target.rename(retired)
        partial.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        partial.rename(target)


def refresh_file_table(root: str | os.PathLike) -> dict[str, Any]:
    """Re-hash every file after adding some (evaluation results, a new model card)."""
    from smash_runtime.format import read_manifest

    root = Path(root)
    manifest = read_manifest(root)
    manifest["files"] = file_table(root)
    tmp = root / (MANIFEST_FILE + ".tmp")
    tmp.write_text(dumps_manifest(manifest), encoding="utf-8")
    tmp.replace(root / MANIFEST_FILE)
    return manifest
