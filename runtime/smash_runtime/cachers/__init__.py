"""Cachers: fewer backbone block executions per denoising step, no weight changes.

The manifest's ``[runtime.cacher]`` table names one and sets its parameters (the typed settings
live in ``smash_runtime.settings``, torch-free); the builder checks it against the pipeline
(``check_cacher_compatibility``) and records ``config_to_dict(cfg)`` in ``smash.json``; the
runtime applies it at load, after the compiler:

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

Adding a cacher: its settings class in ``smash_runtime/settings.py`` (fields, bounds, family),
one module here with ``apply(pipe, denoiser, cfg) -> tracker`` and ``remove(denoiser)``, and
one line in ``_TECHNIQUES`` below.
"""

from __future__ import annotations

import inspect
import logging
from types import ModuleType
from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry

from ..anatomy import denoiser_of
from ..errors import SettingsError
from ..settings import (
    CACHER_SETTINGS,
    CacherConfig,
    DeepCacheConfig,
    FasterCacheConfig,
    FirstBlockConfig,
    ForaConfig,
    MagCacheConfig,
    PABConfig,
    TaylorSeerConfig,
    cacher_from_dict,
    check_cacher_compatibility,
    settings_to_dict,
)
from . import deepcache, diffusers_caches, fora
from ._tracker import TRACKER_HOOK, CacherStats, StepTrackerHook
from .diffusers_caches import calibrate_mag_ratios

__all__ = [  # plus every cacher's settings class (ForaConfig, ...), re-exported from smash_runtime.settings
    "CACHERS",
    "CacherConfig",
    "CacherStats",
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

logger = logging.getLogger(__name__)

CACHERS = CACHER_SETTINGS
"""Every cacher's settings class by name."""

# The one registry of hook implementations: each module has apply(pipe, denoiser, cfg) and remove(denoiser).
_TECHNIQUES: dict[str, ModuleType] = {
    "fora": fora,
    "deepcache": deepcache,
    "pab": diffusers_caches,
    "fastercache": diffusers_caches,
    "first_block": diffusers_caches,
    "taylorseer": diffusers_caches,
    "magcache": diffusers_caches,
}
assert set(_TECHNIQUES) == set(CACHERS), "every cacher setting needs its hooks"
__all__ += [cls.__name__ for cls in CACHERS.values()]

_APPLIED_ATTR = "_smash_cacher"
_COMPILED_ATTR = "_smash_compiled"

cacher_config_from_dict = cacher_from_dict
config_to_dict = settings_to_dict


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


def apply_cacher(pipe: Any, cfg: CacherConfig) -> None:
    """Register ``cfg``'s hooks on ``pipe``'s denoiser (replacing any cacher applied before).

    Apply after the compiler: hooks wrap whatever ``forward`` each block has. Cache state resets
    at the start of every pipeline call; each branch of a step (``cond``/``uncond``) caches on
    its own.
    """
    denoiser = denoiser_of(pipe)
    check_cacher_compatibility(cfg, pipeline_family(pipe), _compiler_in_place(denoiser))
    remove_cacher(pipe)
    tracker = _TECHNIQUES[cfg.name].apply(pipe, denoiser, cfg)
    setattr(denoiser, _APPLIED_ATTR, (cfg, tracker))
    logger.debug("cacher %s installed on %s: %s", cfg.name, type(denoiser).__name__, settings_to_dict(cfg))


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
    _TECHNIQUES[applied[0].name].remove(denoiser)
    registry.invalidate_child_registries_cache()
    delattr(denoiser, _APPLIED_ATTR)
    logger.debug("cacher %s removed from %s", applied[0].name, type(denoiser).__name__)


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
