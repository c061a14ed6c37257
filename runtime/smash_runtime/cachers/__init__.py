"""Cachers: fewer backbone block executions per denoising step, no weight changes.

The manifest's ``[runtime.cacher]`` table names one and sets its parameters; the builder checks
it against the pipeline (``check_cacher_compatibility``) and records ``config_to_dict(cfg)`` in
``smash.json``; the runtime applies it at load, after the compiler:

    >>> from smash_runtime.cachers import apply_cacher, cacher_config_from_dict, cacher_stats
    >>> cfg = cacher_config_from_dict({"name": "fora", "interval": 3, "start_step": 2})
    >>> apply_cacher(pipe, cfg)             # hooks on pipe.transformer's blocks
    >>> image = pipe("a cat", num_inference_steps=28).images[0]
    >>> cacher_stats(pipe).per_step()       # real block executions per step
    >>> remove_cacher(pipe)                 # back to the uncached pipeline

| name          | family | technique                                              | module              |
|---------------|--------|--------------------------------------------------------|---------------------|
| fora          | dit    | block output residuals reused between full steps       | fora.py             |
| deepcache     | unet   | deep UNet features reused, shallow branch runs         | deepcache.py        |
| pab           | dit    | attention outputs broadcast across steps (diffusers)   | diffusers_caches.py |
| fastercache   | dit    | attention outputs extrapolated (diffusers)             | diffusers_caches.py |
| first_block   | dit    | rest of the blocks skipped when block 0 barely changes | diffusers_caches.py |
| taylorseer    | dit    | features predicted by Taylor series (diffusers)        | diffusers_caches.py |
| magcache      | dit    | steps skipped by residual magnitude ratio (diffusers)  | diffusers_caches.py |
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry

from ..errors import SettingsError, did_you_mean
from ._fields import parse_config, to_plain
from ._tracker import TRACKER_HOOK, CacherStats, StepTrackerHook
from .deepcache import DEEPCACHE_HOOK, DeepCacheConfig, apply_deepcache
from .diffusers_caches import (
    FasterCacheConfig,
    FirstBlockConfig,
    MagCacheConfig,
    PABConfig,
    TaylorSeerConfig,
    apply_builtin,
    calibrate_mag_ratios,
    mag_ratios_required,
)
from .fora import FORA_BLOCK_HOOK, ForaConfig, apply_fora

__all__ = [
    "CACHERS",
    "CacherConfig",
    "CacherStats",
    "DeepCacheConfig",
    "FasterCacheConfig",
    "FirstBlockConfig",
    "ForaConfig",
    "MagCacheConfig",
    "PABConfig",
    "TaylorSeerConfig",
    "apply_cacher",
    "cacher_config_from_dict",
    "cacher_stats",
    "calibrate_mag_ratios",
    "check_cacher_compatibility",
    "config_to_dict",
    "denoiser_of",
    "pipeline_family",
    "remove_cacher",
]

CacherConfig = (
    ForaConfig | DeepCacheConfig | PABConfig | FasterCacheConfig | FirstBlockConfig | TaylorSeerConfig | MagCacheConfig
)

CACHERS: dict[str, type] = {
    c.name: c
    for c in (
        ForaConfig, DeepCacheConfig, PABConfig, FasterCacheConfig, FirstBlockConfig, TaylorSeerConfig, MagCacheConfig
    )
}

FAMILY_CACHERS = {
    "dit": ("fora", "pab", "fastercache", "first_block", "taylorseer", "magcache"),
    "unet": ("deepcache",),
}
_APPLIED_ATTR = "_smash_cacher"
_COMPILED_ATTR = "_smash_compiled"


def cacher_config_from_dict(d: dict[str, Any]) -> CacherConfig:
    """Validate a ``[runtime.cacher]`` table (``name`` plus that cacher's settings), filling defaults.

        >>> cacher_config_from_dict({"name": "fora", "interval": 2})
        ForaConfig(interval=2, start_step=2)
        >>> cacher_config_from_dict({"name": "fora", "intervall": 2})
        Traceback (most recent call last):
        smash_runtime.errors.SettingsError: intervall = 2: unknown setting ... (did you mean 'interval'?)

    Raises ``SettingsError`` whose key is relative to the table (``interval``), for the manifest
    layer to prefix.
    """
    if not isinstance(d, dict):
        raise SettingsError("", d, 'a table such as {name = "fora", interval = 3}')
    name = d.get("name")
    if name is None:
        raise SettingsError("name", None, "required: one of " + ", ".join(CACHERS))
    if name not in CACHERS:
        raise SettingsError("name", name, "one of " + ", ".join(CACHERS), hint=did_you_mean(name, CACHERS))
    cfg = parse_config(CACHERS[name], {k: v for k, v in d.items() if k != "name"})
    if isinstance(cfg, MagCacheConfig) and cfg.mag_ratios is None:
        raise SettingsError("mag_ratios", None, mag_ratios_required())
    return cfg


def config_to_dict(cfg: CacherConfig) -> dict[str, Any]:
    """The normalized table recorded in ``smash.json`` (JSON-serializable, every default filled in).

    ``cacher_config_from_dict(config_to_dict(cfg)) == cfg``.
    """
    table: dict[str, Any] = {"name": cfg.name}
    for f in dataclasses.fields(cfg):
        table[f.name] = to_plain(getattr(cfg, f.name))
    return table


def _family_of_class(cls: type) -> str | None:
    params = inspect.signature(cls.__init__).parameters
    if "transformer" in params:
        return "dit"
    if "unet" in params:
        return "unet"
    return None


def pipeline_family(pipe_or_class_name: Any) -> str:
    """``"dit"`` for transformer pipelines (FLUX, SD3, ...), ``"unet"`` for UNet ones (SD, SDXL).

    Accepts a pipeline, a pipeline class, or a diffusers pipeline class name
    (``"FluxPipeline"``, as recorded in ``smash.json``).
    """
    target = pipe_or_class_name
    if isinstance(target, str):
        import diffusers

        cls = getattr(diffusers, target, None)
        if not isinstance(cls, type):
            raise SettingsError("pipeline_class", target, "a diffusers pipeline class name such as 'FluxPipeline'")
        family = _family_of_class(cls)
    elif isinstance(target, type):
        family = _family_of_class(target)
    elif isinstance(getattr(target, "transformer", None), torch.nn.Module):
        family = "dit"
    elif isinstance(getattr(target, "unet", None), torch.nn.Module):
        family = "unet"
    else:
        family = None
    if family is None:
        name = target if isinstance(target, str) else getattr(target, "__name__", type(target).__name__)
        raise SettingsError("pipeline_class", name, "a pipeline with a transformer or a unet denoiser")
    return family


def _is_attention_level(cfg: CacherConfig) -> bool:
    # These hook attention layers, which live inside each compiled block.
    return cfg.name in ("pab", "fastercache") or (cfg.name == "taylorseer" and not cfg.lite)


def check_cacher_compatibility(cfg: CacherConfig, family: str, compiler: dict[str, Any] | None = None) -> None:
    """The cacher x pipeline family x compiler table; raises ``SettingsError`` (key ``name``) saying what to use.

        >>> check_cacher_compatibility(DeepCacheConfig(), "dit")
        Traceback (most recent call last):
        smash_runtime.errors.SettingsError: name = 'deepcache': DeepCache needs a UNet; for DiT pipelines use fora, ...

    ``compiler`` is the ``[runtime.compiler]`` table (or None). Block-level cachers wrap each
    block's compiled ``forward`` and compose with ``torch_compile`` at ``scope = "blocks"``;
    whole-model compilation and stable-fast's tracing would freeze or recompile their schedule.
    """
    if family not in FAMILY_CACHERS:
        raise SettingsError("family", family, "'dit' or 'unet'")
    if cfg.name not in FAMILY_CACHERS[family]:
        if cfg.name == "deepcache":
            allowed = "DeepCache needs a UNet; for DiT pipelines use " + _or_list(FAMILY_CACHERS["dit"])
        else:
            allowed = f"{cfg.name} needs a transformer (DiT) pipeline; for UNet pipelines use " + _or_list(
                FAMILY_CACHERS["unet"]
            )
        raise SettingsError("name", cfg.name, allowed)
    if not compiler:
        return
    compiler_name = compiler.get("name")
    if compiler_name == "stable_fast":
        raise SettingsError(
            "name",
            cfg.name,
            "stable_fast traces the whole denoiser once, which freezes the cacher's per-step choices; "
            'use [runtime.compiler] name = "torch_compile" with scope = "blocks", or no cacher',
        )
    if compiler_name == "torch_compile":
        scope = compiler.get("scope", "blocks")
        if scope == "model":
            raise SettingsError(
                "name",
                cfg.name,
                "a whole-model torch.compile puts the cache hooks inside the graph (a recompile every step); "
                'use [runtime.compiler] scope = "blocks"',
            )
        if _is_attention_level(cfg):
            raise SettingsError(
                "name",
                cfg.name,
                f"{cfg.name} hooks the attention layers inside each compiled block (a recompile every step); "
                "with torch_compile use fora, first_block, magcache or taylorseer with lite = true",
            )


def _or_list(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser (``transformer`` or ``unet``)."""
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise SettingsError("pipeline_class", type(pipe).__name__, "a pipeline with a transformer or a unet denoiser")


def apply_cacher(pipe: Any, cfg: CacherConfig) -> None:
    """Register ``cfg``'s hooks on ``pipe``'s denoiser (replacing any cacher applied before).

    Apply after the compiler: hooks wrap whatever ``forward`` each block has. Cache state resets
    at the start of every pipeline call; each branch of a step (``cond``/``uncond``) caches on
    its own.
    """
    denoiser = denoiser_of(pipe)
    check_cacher_compatibility(cfg, pipeline_family(pipe), _compiler_in_place(denoiser))
    remove_cacher(pipe)
    if isinstance(cfg, ForaConfig):
        tracker = apply_fora(denoiser, cfg)
    elif isinstance(cfg, DeepCacheConfig):
        tracker = apply_deepcache(denoiser, cfg)
    else:
        tracker = apply_builtin(pipe, denoiser, cfg)
    setattr(denoiser, _APPLIED_ATTR, (cfg, tracker))


def _compiler_in_place(denoiser: torch.nn.Module) -> dict[str, Any] | None:
    # The compilers mark what they compiled (smash_runtime.compilers.torch_compile.COMPILED_ATTR);
    # re-checking here catches a compiler chosen at load time that the build never saw.
    if getattr(denoiser, _COMPILED_ATTR, None) is not None:
        return {"name": "torch_compile", "scope": "model"}
    if any(getattr(m, _COMPILED_ATTR, None) is not None for m in denoiser.modules()):
        return {"name": "torch_compile", "scope": "blocks"}
    return None


def remove_cacher(pipe: Any) -> None:
    """Remove the cacher ``apply_cacher`` registered; the pipeline computes exactly as before."""
    denoiser = denoiser_of(pipe)
    applied = getattr(denoiser, _APPLIED_ATTR, None)
    if applied is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.remove_hook(TRACKER_HOOK, recurse=False)
    cfg = applied[0]
    if isinstance(cfg, ForaConfig):
        registry.remove_hook(FORA_BLOCK_HOOK, recurse=True)
    elif isinstance(cfg, DeepCacheConfig):
        registry.remove_hook(DEEPCACHE_HOOK, recurse=True)
    else:
        denoiser.disable_cache()
    registry.invalidate_child_registries_cache()
    delattr(denoiser, _APPLIED_ATTR)


def applied_cacher(pipe: Any) -> CacherConfig | None:
    """The config ``apply_cacher`` applied to ``pipe``, or None."""
    applied = getattr(denoiser_of(pipe), _APPLIED_ATTR, None)
    return applied[0] if applied else None


def cacher_stats(pipe: Any) -> CacherStats:
    """Counts of real executions of the cached modules in the latest call (FORA blocks, DeepCache deep blocks).

    For the diffusers built-ins the tracker sees steps but not their internal skips, so
    ``executions`` stays empty; count with forward wrappers instead (see tests/test_cachers.py).
    """
    applied = getattr(denoiser_of(pipe), _APPLIED_ATTR, None)
    if applied is None:
        raise SettingsError("cacher", None, "no cacher applied to this pipeline: call apply_cacher first")
    tracker: StepTrackerHook = applied[1]
    return tracker.stats
