"""``load()``: artifact folder or Hub repo id in, ready diffusers pipeline out."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactError, SettingsError, UnsupportedOnDevice
from .errors import shorten
from .format import (
    RECORD_FILE,
    ArtifactRecord,
    ComponentRecord,
    ListedFiles,
    VerifyMode,
    check_relative_path,
    read_record,
    verify_files,
)
from .fused_layout import join_fused
from .settings import QUANTIZE_METHODS
from .structure import WEIGHTS_FILE, assign_weights, resolve_class, skeleton_from_config
from .tensors import index_name, load_files_state_dict

logger = logging.getLogger("smash_runtime")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Quantized weights whose kernels exist only on CUDA, with the capability they need.
_CUDA_ONLY = {name: m.cuda_capability for name, m in QUANTIZE_METHODS.items() if m.cuda_capability}


@dataclass
class LoadInfo:
    """What ``load`` read and did; reachable as ``pipe.smash``."""

    root: Path
    record: ArtifactRecord
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    cacher: dict[str, Any] | None = None
    compiler: dict[str, Any] | None = None
    compile_cache: Any = None  # the active CompileCache; ``.report()`` says whether code came from disk
    verification: dict[str, Any] = field(default_factory=dict)  # mode, files/bytes hashed now, hashes reused

    @property
    def artifact_id(self) -> str:
        return self.record.name or self.root.name


class _Phases:
    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    def __call__(self, name: str):
        timings = self.timings

        class _Phase:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.start
                logger.info("phase %s: %.3f s", name, timings[name])

        return _Phase()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_artifact(path_or_repo_id: str | os.PathLike, verify: VerifyMode = "fast") -> Path:
    """A local artifact folder, or the local snapshot of a Hub repo ``ORG/NAME[@REVISION]``."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_repo_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ArtifactError(f"{text}: no such artifact folder (and not a Hub repo id of the form ORG/NAME)")
    from .hub import download_artifact, parse_repo_ref

    repo_id, revision = parse_repo_ref(text)
    return download_artifact(repo_id, revision, verify=verify)


def check_device_support(record: ArtifactRecord, device: str) -> None:
    """Refuse quantized weights whose kernels this device lacks, before reading any weight.

    The need is this runtime's own table for the method, raised to what the artifact records
    in ``requires`` (an artifact can ask for more, never for less).
    """
    for name, component in record.components.items():
        quantization = component.quantization
        method = quantization.method if quantization else None
        recorded = quantization.requires.capability if quantization and quantization.requires else None
        needs = [n for n in (_CUDA_ONLY.get(method), recorded) if n]
        if not needs:
            continue
        need = max(needs)
        if not device.startswith("cuda"):
            raise UnsupportedOnDevice(
                f"component {name!r} is quantized with {method}, which needs a CUDA GPU with compute "
                f"capability >= {need[0]}.{need[1]}; this load targets {device!r}. Load it on such a GPU, "
                "or rebuild with int8wo / int8dq for CPU targets."
            )
        have = torch.cuda.get_device_capability(torch.device(device))
        if have < need:
            raise UnsupportedOnDevice(
                f"component {name!r} is quantized with {method}, which needs compute capability "
                f">= {need[0]}.{need[1]}; {torch.cuda.get_device_name(torch.device(device))} has {have[0]}.{have[1]}"
            )


# Fields with which a config asks a library to import code shipped with the model.
_REMOTE_CODE_FIELDS = ("auto_map", "custom_pipeline", "trust_remote_code")


def refuse_remote_code(config: Any, rel: str) -> None:
    """Refuse a config that asks for code shipped with the artifact: smash-runtime never runs it."""
    if not isinstance(config, dict):
        raise ArtifactError(f"{rel}: expected a JSON object, found {type(config).__name__}", file=rel)
    for key in _REMOTE_CODE_FIELDS:
        if key in config:
            raise ArtifactError(
                f"{rel}: field {key!r} asks for code shipped with the model (remote code), which smash-runtime "
                "never runs; rebuild the artifact from a source that uses diffusers/transformers classes only",
                file=rel, field=key)


def component_class(name: str, component: ComponentRecord) -> type:
    """The library class a component record names, checked against its ``kind``.

    Runs before any artifact file is opened: ``kind`` decides how files are read, so a
    record can never route a component through a loader that would accept a pickle.
    """
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    field = f"components.{name}"
    cls = resolve_class(component.library, component.class_name, field=f"{field}.class")
    expected = {
        ("model", "diffusers"): (ModelMixin,),
        ("model", "transformers"): (PreTrainedModel,),
        ("config", "diffusers"): (ConfigMixin,),
        ("tokenizer", "transformers"): (PreTrainedTokenizerBase,),
    }.get((component.kind, component.library))
    if expected is None or not issubclass(cls, expected) or (component.kind != "model" and issubclass(cls, torch.nn.Module)):
        raise ArtifactError(
            f"{RECORD_FILE}: {field}: {component.library} class {component.class_name} cannot be loaded as kind "
            f"{component.kind!r} (model: a diffusers ModelMixin or transformers PreTrainedModel; config: a diffusers "
            "scheduler; tokenizer: a transformers tokenizer)", file=RECORD_FILE, field=f"{field}.kind")
    return cls


def pipeline_class(record: ArtifactRecord, index: Any) -> type:
    """The pipeline class, after checking ``model_index.json`` agrees with the record and names no custom code."""
    from diffusers import DiffusionPipeline

    rel = "model_index.json"
    refuse_remote_code(index, rel)
    if index.get("_class_name") != record.pipeline_class:
        raise ArtifactError(f"{rel}: _class_name {shorten(index.get('_class_name'))} differs from {RECORD_FILE} "
                            f"pipeline_class {record.pipeline_class!r}", file=rel, field="_class_name")
    for key, entry in index.items():
        if key.startswith("_") or not isinstance(entry, list):
            continue
        library = entry[0] if entry else None
        if library is None and key not in record.components:
            continue
        component = record.components.get(key)
        if component is None or entry != [component.library, component.class_name]:
            raise ArtifactError(
                f"{rel}: component {shorten(key)} = {shorten(entry)} is not the {RECORD_FILE} component of that name "
                "(custom pipeline parts are remote code, which smash-runtime never runs)", file=rel, field=key)
    cls = resolve_class("diffusers", record.pipeline_class, field="pipeline_class")
    if not issubclass(cls, DiffusionPipeline):
        raise ArtifactError(f"{RECORD_FILE}: pipeline_class {record.pipeline_class!r} is not a diffusers pipeline",
                            file=RECORD_FILE, field="pipeline_class")
    return cls


def weight_files(listed: ListedFiles, name: str, library: str) -> list[tuple[str, Path]]:
    """The listed safetensors files of a model component: one file, or the shards its listed index names."""
    weights = WEIGHTS_FILE[library]
    index_rel = f"{name}/{index_name(weights)}"
    if index_rel not in listed:
        rel = f"{name}/{weights}"
        return [(rel, listed.path(rel, field=f"components.{name}"))]
    index = listed.read_json(index_rel)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ArtifactError(f"{index_rel}: 'weight_map' must map tensor names to shard file names", file=index_rel,
                            field="weight_map")
    shards = []
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or not shard.endswith(".safetensors"):
            raise ArtifactError(f"{index_rel}: weight_map names {shorten(shard)}; a shard must be a .safetensors file "
                                "in the component's own folder", file=index_rel, field="weight_map")
        check_relative_path(shard, "shard")
        shards.append((f"{name}/{shard}", listed.path(f"{name}/{shard}", field=index_rel)))
    return shards


def _verified_copies(listed: ListedFiles, name: str, into: Path) -> Path:
    """A private folder holding verified copies of the listed files of component ``name``:
    a tokenizer reads whatever its folder holds, so it gets nothing else."""
    folder = into / name
    for rel in listed.under(name):
        dest = into / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = listed.read_bytes(rel)
        if rel.endswith("_config.json") or rel.endswith("/config.json"):
            refuse_remote_code(listed.read_json(rel), rel)
        dest.write_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _load_component(listed: ListedFiles, name: str, component: ComponentRecord, cls: type,
                    dtype: torch.dtype | None, phase, scratch: Path):
    if component.kind == "config":  # schedulers
        rel = f"{name}/{cls.config_name}"
        config = listed.read_json(rel, field=f"components.{name}")
        refuse_remote_code(config, rel)
        return cls.from_config(config)
    if component.kind == "tokenizer":
        return cls.from_pretrained(_verified_copies(listed, name, scratch), local_files_only=True)
    with phase("rebuild"):
        rel = f"{name}/config.json"
        config = listed.read_json(rel, field=f"components.{name}")
        refuse_remote_code(config, rel)
        try:
            model = skeleton_from_config(cls, component.library, config, component.fused_qkv)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ArtifactError(f"{rel}: {cls.__name__} cannot be built from this config "
                                f"({type(exc).__name__}: {shorten(str(exc), 160)})", file=rel) from None
    with phase("read_weights"):
        files = weight_files(listed, name, component.library)
        state_dict = load_files_state_dict(files)
        if component.fused_qkv:
            state_dict = join_fused(state_dict, model)
    model = assign_weights(model, state_dict, files[0][0])
    del state_dict
    if dtype is not None and not component.quantization:
        model.to(dtype)
    return model


def load(
    path_or_repo_id: str | os.PathLike,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    verify: VerifyMode = "fast",
    cacher: bool | dict[str, Any] = True,
    compiler: bool | dict[str, Any] = True,
    warmup: bool = False,
    compile_cache: str | os.PathLike | bool = True,
    progress: bool = False,
):
    """Load a smash-build artifact as a ready ``DiffusionPipeline``.

    Args:
        path_or_repo_id: an artifact folder, or a Hub repo id ``ORG/NAME`` / ``ORG/NAME@REVISION``.
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available.
        dtype: cast components that are not quantized (default: as stored).
        verify: ``"fast"`` (default) hashes every file whose sha256 this machine has not already
            checked for that very file (same device, inode, size, mtime and ctime);
            ``"full"`` hashes every file now. Both refuse a changed byte before any weight is used.
        cacher: apply the recorded cacher (``True``), none (``False``), or this ``[runtime.cacher]`` table.
        compiler: apply the recorded compiler (``True``), none (``False``), or this table.
        warmup: run the recorded warm-up shapes before returning.
        compile_cache: folder of the compile cache for an applied compiler; ``True`` (default) is
            ``$SMASH_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/smash/compile`` (``~/.cache/smash/compile``);
            ``False`` or ``None`` compiles without a cache.
        progress: show progress bars during warm-up and generation.

    Returns:
        The pipeline; ``pipe.smash`` is a :class:`LoadInfo` with the artifact record and phase timings.

    Raises:
        ArtifactError: the artifact is malformed, tampered with, or reaches outside itself
            (see docs/trust.md for what is checked); nothing of it has been run.

    Example:
        >>> import smash_runtime, torch
        >>> pipe = smash_runtime.load("dist/tiny-flux", device="cpu")
        >>> image = pipe("a red cube", num_inference_steps=4, height=64, width=64,
        ...              generator=torch.Generator().manual_seed(0)).images[0]
    """
    timings: dict[str, float] = {}
    phase = _Phases(timings)
    with phase("resolve"):
        root = resolve_artifact(path_or_repo_id, verify)
    # Everything about the record is checked before any other file of the artifact is opened.
    record = read_record(root)
    classes = {name: component_class(name, component) for name, component in sorted(record.components.items())}
    device = device or default_device()
    check_device_support(record, device)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise SettingsError("dtype", dtype, f"one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    with phase("verify"):
        listed = verify_files(root, record, mode=verify, refuse_unlisted=True)
    verification = {"mode": verify, "files": len(record.files), "hashed_files": len(listed.hashed),
                    "hashed_bytes": sum(listed.hashed.values())}
    index = listed.read_json("model_index.json", field="pipeline_class")
    pipeline_cls = pipeline_class(record, index)
    with tempfile.TemporaryDirectory(prefix="smash-verified-") as scratch:
        components = {
            name: _load_component(listed, name, component, classes[name], dtype, phase, Path(scratch))
            for name, component in sorted(record.components.items())
        }
    with phase("assemble"):
        pipe = pipeline_cls(**components, **_pipeline_options(index, pipeline_cls, components))
    with phase("to_device"):
        if torch.device(device).type != "cpu":  # weights are read onto the CPU; walking every module costs
            pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)

    # Typed once when the record was read; a table given to ``load`` is parsed by the same models.
    from .settings import cacher_from_dict, compiler_from_dict

    runtime = record.runtime_settings
    compiler_cfg = runtime.compiler_config if compiler is True else (compiler_from_dict(compiler) if compiler else None)
    cacher_cfg = runtime.cacher_config if cacher is True else (cacher_from_dict(cacher) if cacher else None)
    info = LoadInfo(root=root, record=record, device=device, timings=timings, verification=verification)
    pipe.smash = info
    if compiler_cfg is not None:
        from .compilers import CompileCache, apply_compiler, artifact_sha256, default_cache_root
        from .settings import settings_to_dict

        cache_dir = default_cache_root() if compile_cache is True else (compile_cache or None)
        cache = CompileCache(cache_dir, artifact_hash=artifact_sha256(root)) if cache_dir else None
        # torch.compile is lazy: this only wraps; the compile time lands in the warm-up phase.
        with phase("compile"):
            apply_compiler(pipe, compiler_cfg, cache=cache)
        info.compiler = settings_to_dict(compiler_cfg)
        info.compile_cache = cache
    if cacher_cfg is not None:
        from .cachers import apply_cacher
        from .settings import settings_to_dict

        apply_cacher(pipe, cacher_cfg)
        info.cacher = settings_to_dict(cacher_cfg)
    if warmup:
        from .compilers import warm_up

        with phase("warmup"):
            warm_up(pipe, runtime.warmup_config, progress=progress)
    logger.info("loaded %s on %s: %s; verify=%s hashed %d of %d files (%d bytes)", root, device,
                json.dumps({k: round(v, 3) for k, v in timings.items()}), verify, verification["hashed_files"],
                verification["files"], verification["hashed_bytes"])
    return pipe


def _pipeline_options(index: dict[str, Any], pipeline_cls: type, components: dict[str, Any]) -> dict[str, Any]:
    """Non-component settings of the pipeline (e.g. SDXL's force_zeros_for_empty_prompt)."""
    import inspect

    accepted = inspect.signature(pipeline_cls.__init__).parameters
    return {
        key: value for key, value in index.items()
        if key in accepted and key not in components and not isinstance(value, list)
    }
