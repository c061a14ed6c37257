"""diffusers' built-in caches (PAB, FasterCache, FirstBlockCache, TaylorSeer, MagCache) as manifest cachers.

Each config here maps the manifest's few parameters onto diffusers' own config class and applies
it with ``denoiser.enable_cache(...)``; the shared step tracker (``_tracker.py``) sits outermost
on the denoiser and adds what diffusers leaves to the caller:

* a reset at the start of every pipeline call (diffusers resets only at the end of a call that
  finishes);
* per-branch state for PAB and FasterCache, whose hooks keep one state per module: under true
  CFG (FluxPipeline calls the transformer for ``cond`` then ``uncond``) the two branches would
  otherwise read each other's caches;
* MagCache's step count follows ``num_inference_steps`` of each call (diffusers fixes it in the
  config).

Defaults are chosen for guidance-distilled FLUX: FasterCache's CFG-Cache (which approximates a
*batched* unconditional half) stays off, since FLUX has no CFG batch; its attention reuse stays on.

    >>> from smash_runtime.cachers import apply_cacher, cacher_config_from_dict
    >>> apply_cacher(pipe, cacher_config_from_dict({"name": "first_block", "threshold": 0.08}))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import hooks as dh
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
from diffusers.hooks.hooks import ModelHook
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp
from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
from diffusers.utils.torch_utils import unwrap_module

from ..anatomy import transformer_blocks
from ..errors import SettingsError
from ..settings import (
    MAG_RATIOS_REQUIRED,
    FasterCacheConfig,
    FirstBlockConfig,
    MagCacheConfig,
    PABConfig,
    TaylorSeerConfig,
)
from ._tracker import StepTrackerHook, install_tracker

__all__ = ["apply", "calibrate_mag_ratios", "remove"]

BuiltinConfig = PABConfig | FasterCacheConfig | FirstBlockConfig | TaylorSeerConfig | MagCacheConfig


def _timestep_callback(pipe: Any):
    def current_timestep() -> float:
        t = getattr(pipe, "_current_timestep", None)
        # Outside a pipeline's loop (a bare denoiser call) no window applies: compute fully.
        return -math.inf if t is None else float(t.reshape(-1)[0] if torch.is_tensor(t) else t)

    return current_timestep


def _to_diffusers(pipe: Any, config: BuiltinConfig, dtype: torch.dtype) -> Any:
    """diffusers' own config class for ``config`` (the manifest's few parameters mapped onto it)."""
    if isinstance(config, PABConfig):
        return dh.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=config.interval,
            spatial_attention_timestep_skip_range=config.timestep_range,
            current_timestep_callback=_timestep_callback(pipe),
        )
    if isinstance(config, FasterCacheConfig):
        weight = config.attention_weight
        return dh.FasterCacheConfig(
            spatial_attention_block_skip_range=config.interval,
            spatial_attention_timestep_skip_range=config.timestep_range,
            attention_weight_callback=lambda _module: weight,
            tensor_format="BCHW",
            is_guidance_distilled=True,
            current_timestep_callback=_timestep_callback(pipe),
        )
    if isinstance(config, FirstBlockConfig):
        return dh.FirstBlockCacheConfig(threshold=config.threshold)
    if isinstance(config, TaylorSeerConfig):
        return dh.TaylorSeerCacheConfig(
            cache_interval=config.interval,
            disable_cache_before_step=config.start_step,
            disable_cache_after_step=config.stop_step,
            max_order=config.order,
            # Keep the factors in the model's dtype: diffusers' bf16 default would round fp32 models.
            taylor_factors_dtype=dtype,
            use_lite_mode=config.lite,
        )
    ratios = base_ratios(config)
    return dh.MagCacheConfig(
        threshold=config.threshold,
        max_skip_steps=config.max_skip_steps,
        retention_ratio=config.retention_ratio,
        num_inference_steps=len(ratios),
        mag_ratios=ratios,
    )


def base_ratios(config: MagCacheConfig) -> torch.Tensor:
    """MagCache's recorded per-step ratios as a tensor (``"flux"``: diffusers' FLUX.1 ratios)."""
    if config.mag_ratios == "flux":
        return FLUX_MAG_RATIOS.clone()
    return torch.tensor(config.mag_ratios, dtype=torch.float32)


def _hooks_named(denoiser: torch.nn.Module, names: Sequence[str]) -> list[ModelHook]:
    found = []
    for _, module in denoiser.named_modules():
        registry = getattr(unwrap_module(module), "_diffusers_hook", None)
        if registry is not None:
            found += [registry.hooks[n] for n in names if n in registry.hooks]
    return found


def apply(pipe: Any, denoiser: torch.nn.Module, config: BuiltinConfig) -> StepTrackerHook:
    """Enable the diffusers cache ``config`` describes on ``denoiser`` and put the tracker around it."""
    if config.name == "magcache" and config.mag_ratios is None:
        raise SettingsError("mag_ratios", None, MAG_RATIOS_REQUIRED)
    if config.name in ("first_block", "magcache"):
        blocks = transformer_blocks(denoiser)
        if len(blocks) < 2:
            raise SettingsError("name", config.name, f"{config.name} needs a transformer with at least 2 blocks")
        for qualified, block in blocks:
            try:
                TransformerBlockRegistry.get(unwrap_module(block).__class__)
            except ValueError:
                raise SettingsError(
                    "name", config.name, f"diffusers' {config.name} does not know the block type {type(block).__name__}"
                ) from None

    dconfig = _to_diffusers(pipe, config, denoiser.dtype)
    denoiser.enable_cache(dconfig)

    swap: list[ModelHook] = []
    on_new_run = None
    if isinstance(config, PABConfig):
        swap = _hooks_named(denoiser, [_PYRAMID_ATTENTION_BROADCAST_HOOK])
    elif isinstance(config, FasterCacheConfig):
        swap = _hooks_named(denoiser, [_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK])
    elif isinstance(config, MagCacheConfig):
        base = base_ratios(config)

        def on_new_run() -> None:
            # diffusers fixes the step count in its config: follow each call's own count.
            timesteps = getattr(pipe.scheduler, "timesteps", None)
            steps = len(timesteps) if timesteps is not None and len(timesteps) else len(base)
            if steps != dconfig.num_inference_steps:
                dconfig.num_inference_steps = steps
                dconfig.mag_ratios = nearest_interp(base, steps)

    tracker = StepTrackerHook(on_new_run=on_new_run, swap_hooks=swap)
    install_tracker(denoiser, tracker)
    return tracker


def remove(denoiser: torch.nn.Module) -> None:
    """Disable the diffusers cache ``apply`` enabled (the tracker is removed by the caller)."""
    denoiser.disable_cache()


def calibrate_mag_ratios(
    pipe: Any, prompt: str = "a photo of a cat", num_inference_steps: int = 28, **call_kwargs
) -> list[float]:
    """Measure MagCache's per-step magnitude ratios for ``pipe``'s transformer (one uncached run).

    The ratio at step ``i`` is the mean over tokens of ``|r_i| / |r_i-1|``, where ``r`` is the
    residual from the first block's input to the last block's output (diffusers' definition).
    Call it without true CFG so each step calls the transformer once, and pass a seeded
    ``generator`` (in ``call_kwargs``): without one the noise, hence the ratios, change per run.

        >>> ratios = calibrate_mag_ratios(pipe, num_inference_steps=28, generator=torch.Generator().manual_seed(0))
        >>> cfg = cacher_config_from_dict({"name": "magcache", "mag_ratios": ratios})
    """
    denoiser = pipe.transformer
    blocks = transformer_blocks(denoiser)
    head, tail = blocks[0][1], blocks[-1][1]
    head_meta = TransformerBlockRegistry.get(unwrap_module(head).__class__)
    tail_meta = TransformerBlockRegistry.get(unwrap_module(tail).__class__)
    seen: dict[str, Any] = {"input": None, "previous": None}
    ratios: list[float] = []

    def before_head(module, args, kwargs):
        seen["input"] = head_meta._get_parameter_from_args_kwargs(head_meta.hidden_states_argument_name, args, kwargs)

    def after_tail(module, args, kwargs, output):
        out = output[tail_meta.return_hidden_states_index] if isinstance(output, tuple) else output
        residual = (out - seen["input"]).float()
        previous = seen["previous"]
        if previous is None:
            ratios.append(1.0)
        else:
            ratio = torch.linalg.norm(residual, dim=-1) / (torch.linalg.norm(previous, dim=-1) + 1e-8)
            ratios.append(float(ratio.mean()))
        seen["previous"] = residual

    handles = [
        head.register_forward_pre_hook(before_head, with_kwargs=True),
        tail.register_forward_hook(after_tail, with_kwargs=True),
    ]
    try:
        pipe(prompt, num_inference_steps=num_inference_steps, output_type="latent", **call_kwargs)
    finally:
        for h in handles:
            h.remove()
    if len(ratios) != num_inference_steps:
        raise RuntimeError(
            f"calibration saw {len(ratios)} transformer calls for {num_inference_steps} steps; run it without true CFG"
        )
    return ratios
