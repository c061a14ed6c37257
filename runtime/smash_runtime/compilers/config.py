"""Compiler and warm-up settings: the ``[runtime.compiler]`` and ``[runtime.warmup]`` tables.

The models live in :mod:`smash_runtime.settings` (torch-free, shared with the manifest); this
module keeps the compilers' names for them::

    >>> cfg = compiler_config_from_dict({"name": "torch_compile", "mode": "max-autotune-no-cudagraphs"})
    >>> cfg
    TorchCompileConfig(mode='max-autotune-no-cudagraphs', fullgraph=False, dynamic=None, scope='blocks')
    >>> config_to_dict(cfg)["name"]
    'torch_compile'

Errors are :class:`~smash_runtime.errors.SettingsError` with keys relative to the table
(``mode``, ``shapes[0].height``); the manifest layer prefixes them with ``runtime.compiler``.
"""

from __future__ import annotations

from smash_runtime.settings import (
    COMPILER_SETTINGS,
    SCOPES,
    TORCH_COMPILE_MODES,
    CompilerConfig,
    StableFastConfig,
    TorchCompileConfig,
    WarmupConfig,
    WarmupShape,
    compiler_from_dict,
    settings_to_dict,
    warmup_from_dict,
)

__all__ = [
    "COMPILERS",
    "SCOPES",
    "TORCH_COMPILE_MODES",
    "CompilerConfig",
    "StableFastConfig",
    "TorchCompileConfig",
    "WarmupConfig",
    "WarmupShape",
    "compiler_config_from_dict",
    "config_to_dict",
    "warmup_config_from_dict",
]

COMPILERS = COMPILER_SETTINGS
compiler_config_from_dict = compiler_from_dict
warmup_config_from_dict = warmup_from_dict
config_to_dict = settings_to_dict
