"""``load()``: artifact folder or Hub repo id in, ready diffusers pipeline out."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactError, SettingsError, UnsupportedOnDevice
from .format import MANIFEST_FILE, VerifyMode, read_manifest, verify_files
from .fused_layout import join_fused
from .settings import QUANTIZE_METHODS
from .structure import WEIGHTS_FILE, assign_weights, build_skeleton, resolve_class
from .tensors import load_component_state_dict

logger = logging.getLogger("smash_runtime")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Quantized weights whose kernels exist only on CUDA, with the capability they need.
_CUDA_ONLY = {name: m.cuda_capability for name, m in QUANTIZE_METHODS.items() if m.cuda_capability}


@dataclass
class LoadInfo:
    """What ``load`` read and did; reachable as ``pipe.smash``."""

    root: Path
    manifest: dict[str, Any]
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    cacher: dict[str, Any] | None = None
    compiler: dict[str, Any] | None = None
    compile_cache: Any = None  # the active CompileCache; ``.report()`` says whether code came from disk

    @property
    def artifact_id(self) -> str:
        return self.manifest.get("name") or self.root.name


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


def resolve_artifact(path_or_repo_id: str | os.PathLike) -> Path:
    """A local artifact folder, or the local snapshot of a Hub repo ``ORG/NAME[@REVISION]``."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_repo_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ArtifactError(f"{text}: no such artifact folder (and not a Hub repo id of the form ORG/NAME)")
    from .hub import download_artifact, parse_repo_ref

    repo_id, revision = parse_repo_ref(text)
    return download_artifact(repo_id, revision)


def _recorded_need(name: str, quantization: dict[str, Any]) -> tuple[int, int] | None:
    """The compute capability the artifact says its weights need (``requires`` in the record)."""
    requires = quantization.get("requires")
    if requires is None:
        return None
    text = requires.get("compute_capability") if isinstance(requires, dict) else None
    major, dot, minor = str(text).partition(".")
    if not (isinstance(requires, dict) and requires.get("device") == "cuda" and major.isdigit() and minor.isdigit() and dot):
        raise ArtifactError(
            f"components.{name}.quantization.requires = {str(requires)[:80]!r}: expected "
            '{"device": "cuda", "compute_capability": "MAJOR.MINOR"}', file=MANIFEST_FILE)
    return int(major), int(minor)


def check_device_support(manifest: dict[str, Any], device: str) -> None:
    """Refuse quantized weights whose kernels this device lacks, before reading any weight.

    The need is this runtime's own table for the method, raised to what the artifact records
    in ``requires`` (an artifact can ask for more, never for less).
    """
    for name, record in manifest["components"].items():
        quantization = record.get("quantization") or {}
        method = quantization.get("method")
        needs = [n for n in (_CUDA_ONLY.get(method), _recorded_need(name, quantization)) if n]
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


def _load_component(root: Path, name: str, record: dict[str, Any], dtype: torch.dtype | None, phase):
    folder = root / name
    kind = record["kind"]
    cls = resolve_class(record["library"], record["class"])
    if kind == "config":  # schedulers
        return cls.from_pretrained(folder)
    if kind == "tokenizer":
        return cls.from_pretrained(folder)
    with phase("rebuild"):
        model = build_skeleton(folder, record)
    with phase("read_weights"):
        state_dict = load_component_state_dict(folder, WEIGHTS_FILE[record["library"]], rel_folder=name)
        if record.get("fused_qkv"):
            state_dict = join_fused(state_dict, model)
    model = assign_weights(model, state_dict, f"{name}/{WEIGHTS_FILE[record['library']]}")
    del state_dict
    if dtype is not None and not record.get("quantization"):
        model.to(dtype)
    return model


def load(
    path_or_repo_id: str | os.PathLike,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    verify: VerifyMode = "full",
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
        verify: ``"full"`` checks every file's sha256, ``"fast"`` only sizes, ``"off"`` nothing.
        cacher: apply the recorded cacher (``True``), none (``False``), or this ``[runtime.cacher]`` table.
        compiler: apply the recorded compiler (``True``), none (``False``), or this table.
        warmup: run the recorded warm-up shapes before returning.
        compile_cache: folder of the compile cache for an applied compiler; ``True`` (default) is
            ``$SMASH_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/smash/compile`` (``~/.cache/smash/compile``);
            ``False`` or ``None`` compiles without a cache.
        progress: show progress bars during warm-up and generation.

    Returns:
        The pipeline; ``pipe.smash`` is a :class:`LoadInfo` with the manifest and phase timings.

    Example:
        >>> import smash_runtime, torch
        >>> pipe = smash_runtime.load("dist/tiny-flux", device="cpu")
        >>> image = pipe("a red cube", num_inference_steps=4, height=64, width=64,
        ...              generator=torch.Generator().manual_seed(0)).images[0]
    """
    timings: dict[str, float] = {}
    phase = _Phases(timings)
    with phase("resolve"):
        root = resolve_artifact(path_or_repo_id)
    manifest = read_manifest(root)
    with phase("verify"):
        verify_files(root, manifest, mode=verify)
    device = device or default_device()
    check_device_support(manifest, device)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise SettingsError("dtype", dtype, f"one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]

    pipeline_cls = resolve_class("diffusers", manifest["pipeline_class"])
    components = {
        name: _load_component(root, name, record, dtype, phase)
        for name, record in sorted(manifest["components"].items())
    }
    with phase("assemble"):
        pipe = pipeline_cls(**components, **_pipeline_options(root, pipeline_cls, components))
    with phase("to_device"):
        pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)

    runtime = manifest.get("runtime") or {}
    compiler_settings = runtime.get("compiler") if compiler is True else (compiler or None)
    cacher_settings = runtime.get("cacher") if cacher is True else (cacher or None)
    info = LoadInfo(root=root, manifest=manifest, device=device, timings=timings)
    pipe.smash = info
    if compiler_settings:
        from .compilers import (
            CompileCache,
            apply_compiler,
            artifact_sha256,
            compiler_config_from_dict,
            default_cache_root,
        )

        cfg = compiler_config_from_dict(compiler_settings)
        cache_dir = default_cache_root() if compile_cache is True else (compile_cache or None)
        cache = CompileCache(cache_dir, artifact_hash=artifact_sha256(root)) if cache_dir else None
        # torch.compile is lazy: this only wraps; the compile time lands in the warm-up phase.
        with phase("compile"):
            apply_compiler(pipe, cfg, cache=cache)
        info.compiler = compiler_settings
        info.compile_cache = cache
    if cacher_settings:
        from .cachers import apply_cacher, cacher_config_from_dict

        apply_cacher(pipe, cacher_config_from_dict(cacher_settings))
        info.cacher = cacher_settings
    if warmup:
        from .compilers import warm_up, warmup_config_from_dict

        with phase("warmup"):
            warm_up(pipe, warmup_config_from_dict(runtime.get("warmup") or {}), progress=progress)
    logger.info("loaded %s on %s: %s", root, device, json.dumps({k: round(v, 3) for k, v in timings.items()}))
    return pipe


def _pipeline_options(root: Path, pipeline_cls: type, components: dict[str, Any]) -> dict[str, Any]:
    """Non-component settings of the pipeline (e.g. SDXL's force_zeros_for_empty_prompt)."""
    import inspect

    config = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    accepted = inspect.signature(pipeline_cls.__init__).parameters
    return {
        key: value for key, value in config.items()
        if key in accepted and key not in components and not isinstance(value, list)
    }
