"""The build: source pipeline -> baked transforms -> artifact folder.

    >>> from smash_build.manifest import load_manifest
    >>> from smash_build.builder import build
    >>> result = build(load_manifest("manifests/tiny-flux.toml"))
    >>> result.artifact.path, result.artifact.size
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smash_runtime.errors import SettingsError

from .exporters.artifact import ArtifactInfo, write_artifact
from .manifest import Manifest
from .model_card import render_model_card
from .sources import Source, denoiser_name, load_source
from .transforms import QuantizationReport, quantize
from smash_runtime.structure import fuse_qkv

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
    """The artifact written and the in-memory pipeline it was written from."""

    artifact: ArtifactInfo
    pipeline: Any
    source: Source
    changes: list[ComponentChange] = field(default_factory=list)


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def target_components(pipeline, requested: tuple[str, ...] | None) -> list[str]:
    if not requested:
        return [denoiser_name(pipeline)]
    modules = {n for n, c in pipeline.components.items() if isinstance(c, torch.nn.Module)}
    for name in requested:
        if name not in modules:
            raise SettingsError("model.components", name, f"a model component of this pipeline: {sorted(modules)}")
    return list(requested)


def check_runtime_settings(manifest: Manifest, pipeline) -> None:
    """The cacher x pipeline family x compiler table, once the pipeline's family is known."""
    cacher = manifest.runtime.cacher
    if not cacher:
        return
    from smash_runtime.cachers import cacher_config_from_dict, check_cacher_compatibility, pipeline_family

    try:
        check_cacher_compatibility(cacher_config_from_dict(cacher), pipeline_family(pipeline), manifest.runtime.compiler)
    except SettingsError as exc:
        raise exc.with_prefix("runtime.cacher") from None


def build(
    manifest: Manifest,
    out_dir: str | Path | None = None,
    step: Callable[[str], None] = lambda message: None,
) -> BuildResult:
    """Load the source, fuse then quantize the chosen components, write the artifact.

    Nothing is written unless every transform succeeded; the folder appears whole or not at all.
    ``step`` receives a line for each phase (the CLI turns them into progress output).
    """
    target = Path(out_dir) if out_dir else manifest.output.dir
    spec = manifest.model
    step(f"loading {spec.source}")
    source = load_source(spec.source, spec.revision, spec.dtype, manifest.path.parent if manifest.path else None)
    pipe = source.pipeline
    check_runtime_settings(manifest, pipe)
    names = target_components(pipe, spec.components)

    changes, extras = [], {}
    build_spec = manifest.build
    for name in names:
        module = getattr(pipe, name)
        change = ComponentChange(name, _param_bytes(module))
        extras[name] = {}
        if build_spec.fuse_qkv:
            step(f"fusing QKV projections of {name}")
            if not hasattr(module, "fuse_qkv_projections"):
                raise SettingsError("build.fuse_qkv", True, f"{type(module).__name__} ({name}) has no QKV fusion; set it to false")
            change.fused_modules = fuse_qkv(module)
            extras[name]["fused_qkv"] = True
        if build_spec.quantize:
            q = build_spec.quantize
            step(f"quantizing {name} with {q.method}")
            change.quantization = quantize(module, q.method, q.exclude_globs)
            extras[name]["quantization"] = {"method": q.method}
        changes.append(change)

    record = {
        "name": target.name,
        "source": source.record(),
        "dtype": spec.dtype,
        "transforms": {
            "order": ["fuse_qkv", "quantize"],
            "components": names,
            "fuse_qkv": bool(build_spec.fuse_qkv),
            "quantize": (
                {
                    "method": build_spec.quantize.method,
                    "exclude": list(build_spec.quantize.exclude),
                    "modules": {c.name: c.quantization.record() for c in changes if c.quantization},
                }
                if build_spec.quantize
                else None
            ),
        },
        "runtime": {
            "cacher": manifest.runtime.cacher,
            "compiler": manifest.runtime.compiler,
            "warmup": manifest.runtime.warmup,
        },
        "versions": library_versions(),
    }
    step(f"writing artifact to {target}")
    artifact = write_artifact(
        pipe, target, record, component_extras=extras, model_card=render_model_card,
        on_component=lambda n: step(f"writing {n}"),
    )
    for change in changes:
        change.bytes_after = artifact.component_size(change.name)
    return BuildResult(artifact, pipe, source, changes)
