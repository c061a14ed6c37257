"""Compilers, warm-up and the compile cache: what makes the first image after a restart fast.

The loader applies them in this order, after the weights are on the device::

    >>> from smash_runtime.compilers import (CompileCache, apply_compiler, compiler_config_from_dict,
    ...                                      warm_up, warmup_config_from_dict)
    >>> cfg = compiler_config_from_dict({"name": "torch_compile", "scope": "blocks"})
    >>> cache = CompileCache("/var/cache/smash", artifact_hash=manifest_sha256)
    >>> apply_compiler(pipe, cfg, cache=cache)      # 1. compile the blocks' own forwards (lazily)
    >>> apply_cacher(pipe, cacher_cfg)              # 2. cache hooks wrap the compiled blocks
    >>> warm_up(pipe, warmup_config_from_dict({"shapes": [{"height": 1024, "width": 1024, "steps": 28}]}))
    >>> cache.report()                              # 3. {"hit": True, "precompiled_loaded": 3, ...}

| name          | what                                                    | where            |
|---------------|---------------------------------------------------------|------------------|
| torch_compile | torch.compile (inductor), whole denoiser or its blocks   | torch_compile.py |
| stable_fast   | stable-fast (``sfast``), CUDA + UNet only, optional dep  | stable_fast.py   |
"""

from __future__ import annotations

import logging

import torch

from ..settings import COMPILER_SETTINGS, CompilerConfig, StableFastConfig, TorchCompileConfig, WarmupConfig
from ..settings import WarmupShape, compiler_from_dict, settings_to_dict, warmup_from_dict
from .compile_cache import CompileCache, artifact_sha256, default_cache_root, device_identity
from .stable_fast import apply_stable_fast
from .torch_compile import apply_torch_compile, denoiser_of, repeated_blocks
from .warmup import warm_up

__all__ = [
    "COMPILERS",
    "CompileCache",
    "CompilerConfig",
    "StableFastConfig",
    "TorchCompileConfig",
    "WarmupConfig",
    "WarmupShape",
    "apply_compiler",
    "artifact_sha256",
    "compiler_config_from_dict",
    "config_to_dict",
    "default_cache_root",
    "denoiser_of",
    "device_identity",
    "repeated_blocks",
    "warm_up",
    "warmup_config_from_dict",
]

logger = logging.getLogger(__name__)

# The compilers' names for the settings models (smash_runtime.settings holds the definitions).
COMPILERS = COMPILER_SETTINGS
compiler_config_from_dict = compiler_from_dict
warmup_config_from_dict = warmup_from_dict
config_to_dict = settings_to_dict


def apply_compiler(pipe, cfg: CompilerConfig, *, cache: CompileCache | None = None) -> None:
    """Compile ``pipe``'s denoiser as ``cfg`` says, in place; with ``cache``, keep/load compiled code there.

    Call after the pipeline is on its device and before the cacher. torch.compile is lazy: the
    actual compilation happens at the first call of each shape, i.e. in :func:`warm_up`.

    Raises:
        UnsupportedOnDevice: stable_fast without the ``sfast`` package or without CUDA.
        SettingsError: ``scope = "blocks"`` on a denoiser without repeated blocks.
    """
    if isinstance(cfg, StableFastConfig):
        # stable-fast traces with TorchScript and keeps nothing on disk: no compile cache to activate.
        apply_stable_fast(pipe, cfg)
        return
    if not isinstance(cfg, TorchCompileConfig):
        raise TypeError(f"not a compiler config: {cfg!r}; build one with compiler_config_from_dict")
    store = None
    if cache is not None:
        device = next(denoiser_of(pipe).parameters(), torch.empty(0)).device
        cache.activate(config_to_dict(cfg), device)
        if cfg.scope == "blocks":
            store = cache.precompiled_store(cfg)
    apply_torch_compile(pipe, cfg, store=store)
