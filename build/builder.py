"""The build: source pipeline -> baked transforms -> artifact folder.

    >>> from smash_build.manifest import load_manifest
    >>> from smash_build.builder import build
    >>> result = build(load_manifest("manifests/tiny-flux.toml"))
    >>> result.artifact.path, result.artifact.size

Two paths write the same bytes: the in-memory build holds the whole pipeline (and returns
it, so callers can compare images); the streaming build (``[build] streaming``, or
automatic for components too large for memory) holds one block at a time.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from smash_runtime import anatomy
from smash_runtime.errors import SettingsError
from smash_runtime.fused_layout import fused_parts, unfused_names
from smash_runtime.structure import WEIGHTS_FILE, fuse_qkv, resolve_class

from .exporters.artifact import (
    DEFAULT_MAX_SHARD_BYTES,
    ArtifactInfo,
    ComponentWriter,
    in_memory_writers,
    write_artifact,
    write_component,
)
from .exporters.output_folder import check_output_folder
from .lora import fuse_loras
from .manifest import Manifest
from .model_card import render_model_card
from .sources import DTYPES, SourceRef, denoiser_name, load_pipeline, local_source_folder, materialize_builtin, resolve_source
from .streaming import component_nbytes, should_stream, stream_component
from .transforms import QuantizationReport, diffusers_quantization_config, quantization_record, quantize

_VERSIONED = ("torch", "diffusers", "transformers", "torchao", "safetensors", "smash-build", "smash-runtime")


@dataclass
class ComponentChange:
    name: str
    bytes_before: int
    bytes_after: int = 0
    fused_modules: int = 0
    quantization: QuantizationReport | None = None


@dataclass
class BuildResult:
    """The artifact written, and the in-memory pipeline it was written from (None when streamed)."""

    artifact: ArtifactInfo
    pipeline: Any
    source: SourceRef
    changes: list[ComponentChange] = field(default_factory=list)
    streamed: bool = False
    peak_rss_bytes: int = 0


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the libraries that shape an artifact (and ``extra`` ones)."""
    versions = {}
    for dist in (*_VERSIONED, *extra):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _check_targets(requested: list[str], available: list[str]) -> None:
    for name in requested:
        if name not in available:
            raise SettingsError("model.components", name, f"a model component of this pipeline: {sorted(available)}")


def check_runtime_settings(manifest: Manifest, component_names) -> None:
    """The cacher x pipeline family x compiler table, once the pipeline's family is known."""
    cacher = manifest.runtime.cacher
    if not cacher:
        return
    from smash_runtime.settings import cacher_from_dict, check_cacher_compatibility

    family = anatomy.family_of(component_names) or "unet"
    try:
        check_cacher_compatibility(cacher_from_dict(cacher), family, manifest.runtime.compiler)
    except SettingsError as exc:
        raise exc.with_prefix("runtime.cacher") from None


def _record(manifest: Manifest, source: SourceRef, names: list[str], changes: list[ComponentChange],
            loras: list[dict] | None = None) -> dict:
    # Nothing here may depend on the output folder: the same build into a/ and b/ is byte-identical.
    b = manifest.build
    lora = {"lora": loras} if loras else {}  # recorded only when used: LoRA-free artifacts keep their bytes
    return {
        "name": source.name,  # the card's title and the server's default model id
        "source": source.record(),
        "dtype": manifest.model.dtype,
        "transforms": {
            **lora,
            "order": (["lora"] if loras else []) + ["fuse_qkv", "quantize"],
            "components": names,
            "fuse_qkv": bool(b.fuse_qkv),
            "quantize": (
                {
                    "method": b.quantize.method,
                    "exclude": list(b.quantize.exclude),
                    "modules": {c.name: c.quantization.record() for c in changes if c.quantization},
                }
                if b.quantize
                else None
            ),
        },
        "runtime": {"cacher": manifest.runtime.cacher, "compiler": manifest.runtime.compiler, "warmup": manifest.runtime.warmup,
                    **({"serve": manifest.serve} if manifest.serve is not None else {})},
        "versions": library_versions(),
    }


def build(
    manifest: Manifest,
    out_dir: str | Path | None = None,
    step: Callable[[str], None] = lambda message: None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int, str], None] | None = None,
) -> BuildResult:
    """Load the source, fuse then quantize the chosen components, write the artifact.

    Nothing is written unless every transform succeeded; the folder appears whole or not at all.
    ``step`` receives a line for each phase; ``progress(done, total, unit)`` reports the blocks
    of a streamed component.
    """
    target = Path(out_dir) if out_dir else manifest.output.dir
    spec = manifest.model
    # Refuse an output folder the build must not replace before any work is done.
    base_dir = manifest.path.parent if manifest.path else None
    check_output_folder(target, {"the manifest's folder": base_dir,
                                 "the source folder": local_source_folder(spec.source, base_dir)})
    step(f"resolving {spec.source}")
    source = resolve_source(spec.source, spec.revision, base_dir)
    if source.folder is None:
        source = materialize_builtin(source, spec.dtype)
    if _wants_streaming(source, manifest.build.streaming):
        if manifest.build.lora:
            raise SettingsError("build.lora", manifest.build.lora[0].source,
                                "the source is too large for the in-memory build, and the streaming build does "
                                "not fuse LoRAs", "set build.streaming = false if the machine has the memory")
        return _build_streaming(manifest, source, target, step, max_shard_bytes, progress)
    return _build_in_memory(manifest, source, target, step, max_shard_bytes)


def _wants_streaming(source: SourceRef, forced: bool | None) -> bool:
    index = json.loads((source.folder / "model_index.json").read_text())
    sizes = [component_nbytes(source.folder / name, entry[0]) for name, entry in index.items()
             if isinstance(entry, list) and entry[0] in WEIGHTS_FILE]
    return should_stream(max(sizes, default=0), forced)


def _build_in_memory(manifest, source, target, step, max_shard_bytes) -> BuildResult:
    spec, b = manifest.model, manifest.build
    step(f"loading {spec.source}")
    pipe = load_pipeline(source, spec.dtype)
    names = list(spec.components or [denoiser_name(pipe)])
    _check_targets(names, [n for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)])
    check_runtime_settings(manifest, pipe.components)
    loras = fuse_loras(pipe, b.lora, step)

    changes, extras, quant_configs = [], {}, {}
    for name in names:
        module = getattr(pipe, name)
        change = ComponentChange(name, _param_bytes(module))
        extras[name] = {}
        if b.fuse_qkv:
            step(f"fusing QKV projections of {name}")
            if not hasattr(module, "fuse_qkv_projections"):
                raise SettingsError("build.fuse_qkv", True, f"{type(module).__name__} ({name}) has no QKV fusion; set it to false")
            change.fused_modules = fuse_qkv(module)
            extras[name]["fused_qkv"] = True
        if b.quantize:
            step(f"quantizing {name} with {b.quantize.method}")
            change.quantization = quantize(module, b.quantize.method, b.quantize.exclude_globs)
            extras[name]["quantization"] = quantization_record(b.quantize.method)
            quant_configs[name] = diffusers_quantization_config(
                b.quantize.method, unfused_names(change.quantization.excluded + change.quantization.skipped, fused_parts(module)))
        changes.append(change)

    step(f"writing artifact to {target}")
    artifact = write_artifact(
        target, _record(manifest, source, names, changes, loras), type(pipe).__name__, dict(pipe.config),
        in_memory_writers(pipe, extras, max_shard_bytes, quant_configs),
        model_card=render_model_card, on_component=lambda n: step(f"writing {n}"), log=step,
    )
    for change in changes:
        change.bytes_after = artifact.component_size(change.name)
    return BuildResult(artifact, pipe, source, changes, peak_rss_bytes=_peak_rss())


def _build_streaming(manifest, source, target, step, max_shard_bytes, progress) -> BuildResult:
    spec, b = manifest.model, manifest.build
    index = json.loads((source.folder / "model_index.json").read_text())
    entries = {n: e for n, e in index.items() if isinstance(e, list) and e[0] is not None}
    models = [n for n, (lib, cls) in entries.items() if lib in WEIGHTS_FILE and issubclass(resolve_class(lib, cls), torch.nn.Module)]
    names = list(spec.components or [anatomy.denoiser_name(models) or "unet"])
    _check_targets(names, models)
    check_runtime_settings(manifest, entries)
    if b.fuse_qkv:
        for name in names:
            if not hasattr(resolve_class(*entries[name]), "fuse_qkv_projections"):
                raise SettingsError("build.fuse_qkv", True, f"{entries[name][1]} ({name}) has no QKV fusion; set it to false")
    dtype = DTYPES[spec.dtype]
    changes: dict[str, ComponentChange] = {}

    def model_writer(name: str) -> ComponentWriter:
        transformed = name in names

        def write(folder: Path) -> dict[str, Any]:
            lib, cls = entries[name]
            step(f"streaming {name}" + (" (fuse + quantize)" if transformed else " (copy)"))
            record, report, fused, before = stream_component(
                source.folder / name, folder, {"library": lib, "class": cls}, dtype, max_shard_bytes,
                fuse=transformed and b.fuse_qkv,
                quantize_method=b.quantize.method if (transformed and b.quantize) else None,
                exclude_globs=b.quantize.exclude_globs if b.quantize else (),
                progress=progress or (lambda done, total, unit: None), log=step,
            )
            if transformed:
                changes[name] = ComponentChange(name, before, fused_modules=fused, quantization=report)
            return record

        return write

    def plain_writer(name: str) -> ComponentWriter:
        def write(folder: Path) -> dict[str, Any]:
            from .exporters.artifact import component_record

            obj = resolve_class(*entries[name]).from_pretrained(source.folder / name)
            write_component(obj, folder)
            return component_record(obj)

        return write

    writers = {n: (model_writer(n) if n in models else plain_writer(n)) for n in sorted(entries)}
    artifact = write_artifact(
        target, _record(manifest, source, names, []), index["_class_name"], index, writers,
        model_card=render_model_card, finalize=lambda full: _add_reports(full, changes, b), log=step,
    )
    for change in changes.values():
        change.bytes_after = artifact.component_size(change.name)
    return BuildResult(artifact, None, source, list(changes.values()), streamed=True, peak_rss_bytes=_peak_rss())


def _add_reports(full: dict, changes: dict[str, ComponentChange], b) -> None:
    if b.quantize:
        full["transforms"]["quantize"]["modules"] = {
            name: c.quantization.record() for name, c in sorted(changes.items()) if c.quantization
        }


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
