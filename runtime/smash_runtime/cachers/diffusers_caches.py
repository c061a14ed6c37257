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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import hooks as dh
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
from diffusers.hooks.hooks import ModelHook
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp
from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
from diffusers.utils.torch_utils import unwrap_module

from ..errors import SettingsError
from ._fields import bool_field, custom_field, float_field, int_field, optional_int_field, range_field
from ._tracker import StepTrackerHook, install_tracker
from .fora import transformer_blocks


def _timestep_callback(pipe: Any):
    def current_timestep() -> float:
        t = getattr(pipe, "_current_timestep", None)
        # Outside a pipeline's loop (a bare denoiser call) no window applies: compute fully.
        return -math.inf if t is None else float(t.reshape(-1)[0] if torch.is_tensor(t) else t)

    return current_timestep


@dataclass(frozen=True)
class PABConfig:
    """``name = "pab"``: Pyramid Attention Broadcast (arXiv:2408.12588), attention outputs reused."""

    name: ClassVar[str] = "pab"
    interval: int = int_field(2, 1, 6, "attention recomputed every `interval` steps inside the window; 1 = no caching")
    timestep_range: tuple[float, float] = range_field(
        (100.0, 800.0), -1, 1000, "timesteps (0-1000) where reuse is allowed"
    )

    def to_diffusers(self, pipe: Any) -> dh.PyramidAttentionBroadcastConfig:
        return dh.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.interval,
            spatial_attention_timestep_skip_range=self.timestep_range,
            current_timestep_callback=_timestep_callback(pipe),
        )


def _faster_cache_range(key: str, value: Any) -> tuple[float, float]:
    start, end = range_field((0, 0), -1, 999).metadata["check"](key, value)
    return (start, end)


@dataclass(frozen=True)
class FasterCacheConfig:
    """``name = "fastercache"``: FasterCache (arXiv:2410.19355) attention extrapolation, per branch."""

    name: ClassVar[str] = "fastercache"
    interval: int = int_field(2, 1, 6, "attention recomputed every `interval` steps inside the window; 1 = no caching")
    # diffusers' hook approximates from a cache it only fills on a computed step: the first step
    # (t = 1000) must lie outside the window, hence end <= 999.
    timestep_range: tuple[float, float] = custom_field(
        (-1.0, 681.0), _faster_cache_range, "timesteps (0-999) where the approximation is allowed"
    )
    attention_weight: float = float_field(0.5, 0.0, 1.0, "extrapolation weight: out_t + w * (out_t - out_t-2)")

    def to_diffusers(self, pipe: Any) -> dh.FasterCacheConfig:
        weight = self.attention_weight
        return dh.FasterCacheConfig(
            spatial_attention_block_skip_range=self.interval,
            spatial_attention_timestep_skip_range=self.timestep_range,
            attention_weight_callback=lambda _module: weight,
            tensor_format="BCHW",
            is_guidance_distilled=True,
            current_timestep_callback=_timestep_callback(pipe),
        )


@dataclass(frozen=True)
class FirstBlockConfig:
    """``name = "first_block"``: First Block Cache (ParaAttention): skip the rest when block 0 barely changed."""

    name: ClassVar[str] = "first_block"
    # ParaAttention's FLUX examples use 0.08-0.12; 0 never skips.
    threshold: float = float_field(
        0.08, 0.0, 1.0, "relative change of block 0's residual below which the rest is reused"
    )

    def to_diffusers(self, pipe: Any) -> dh.FirstBlockCacheConfig:
        return dh.FirstBlockCacheConfig(threshold=self.threshold)


@dataclass(frozen=True)
class TaylorSeerConfig:
    """``name = "taylorseer"``: TaylorSeer (arXiv:2503.06923), Taylor-extrapolated features."""

    name: ClassVar[str] = "taylorseer"
    interval: int = int_field(5, 1, 10, "full computation every `interval` steps after warm-up; 1 = no caching")
    start_step: int = int_field(3, 0, None, "warm-up steps that always compute (they seed the Taylor factors)")
    stop_step: int | None = optional_int_field(0, "steps from this one on always compute (absent: none)")
    order: int = int_field(1, 1, 4, "highest Taylor order")
    lite: bool = bool_field(
        False, "false: predict each attention output; true: skip whole blocks and predict proj_out (faster, coarser)"
    )

    def to_diffusers(self, pipe: Any, dtype: torch.dtype) -> dh.TaylorSeerCacheConfig:
        return dh.TaylorSeerCacheConfig(
            cache_interval=self.interval,
            disable_cache_before_step=self.start_step,
            disable_cache_after_step=self.stop_step,
            max_order=self.order,
            # Keep the factors in the model's dtype: diffusers' bf16 default would round fp32 models.
            taylor_factors_dtype=dtype,
            use_lite_mode=self.lite,
        )


def _mag_ratios(key: str, value: Any) -> str | tuple[float, ...]:
    allowed = (
        '"flux" (diffusers\' FLUX.1 ratios) or a list of >= 2 positive per-step ratios '
        "(measure them with smash_runtime.cachers.calibrate_mag_ratios(pipe))"
    )
    if value == "flux":
        return "flux"
    if value is None:  # absent: cacher_config_from_dict and apply report it as required
        return None
    if isinstance(value, (list, tuple)) and len(value) >= 2:
        if all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in value):
            return tuple(float(v) for v in value)
    raise SettingsError(key, value, allowed)


@dataclass(frozen=True)
class MagCacheConfig:
    """``name = "magcache"``: MagCache (arXiv:2506.14707), skips steps while residual magnitudes barely change.

    ``mag_ratios`` is checkpoint-dependent and has no honest default: ``"flux"`` for FLUX.1
    checkpoints, or the list ``calibrate_mag_ratios(pipe)`` measures (the builder can record it).
    """

    name: ClassVar[str] = "magcache"
    mag_ratios: str | tuple[float, ...] | None = custom_field(None, _mag_ratios, "per-step residual magnitude ratios")
    threshold: float = float_field(0.06, 0.0, 1.0, "accumulated error allowed before a full step")
    max_skip_steps: int = int_field(3, 0, 20, "most consecutive skipped steps; 0 = never skip")
    retention_ratio: float = float_field(0.2, 0.0, 1.0, "fraction of first steps never skipped")

    def base_ratios(self) -> torch.Tensor:
        if self.mag_ratios == "flux":
            return FLUX_MAG_RATIOS.clone()
        return torch.tensor(self.mag_ratios, dtype=torch.float32)

    def to_diffusers(self, pipe: Any) -> dh.MagCacheConfig:
        ratios = self.base_ratios()
        return dh.MagCacheConfig(
            threshold=self.threshold,
            max_skip_steps=self.max_skip_steps,
            retention_ratio=self.retention_ratio,
            num_inference_steps=len(ratios),
            mag_ratios=ratios,
        )


BuiltinConfig = PABConfig | FasterCacheConfig | FirstBlockConfig | TaylorSeerConfig | MagCacheConfig


def _hooks_named(denoiser: torch.nn.Module, names: Sequence[str]) -> list[ModelHook]:
    found = []
    for _, module in denoiser.named_modules():
        registry = getattr(unwrap_module(module), "_diffusers_hook", None)
        if registry is not None:
            found += [registry.hooks[n] for n in names if n in registry.hooks]
    return found


def apply_builtin(pipe: Any, denoiser: torch.nn.Module, config: BuiltinConfig) -> StepTrackerHook:
    """Enable the diffusers cache ``config`` describes on ``denoiser`` and put the tracker around it."""
    if config.name == "magcache" and config.mag_ratios is None:
        raise SettingsError("mag_ratios", None, mag_ratios_required())
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

    if isinstance(config, TaylorSeerConfig):
        dconfig = config.to_diffusers(pipe, dtype=denoiser.dtype)
    else:
        dconfig = config.to_diffusers(pipe)
    denoiser.enable_cache(dconfig)

    swap: list[ModelHook] = []
    on_new_run = None
    if isinstance(config, PABConfig):
        swap = _hooks_named(denoiser, [_PYRAMID_ATTENTION_BROADCAST_HOOK])
    elif isinstance(config, FasterCacheConfig):
        swap = _hooks_named(denoiser, [_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK])
    elif isinstance(config, MagCacheConfig):
        base = config.base_ratios()

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


def mag_ratios_required() -> str:
    return (
        'required: "flux" for FLUX.1 checkpoints, or the per-step list measured by '
        "smash_runtime.cachers.calibrate_mag_ratios(pipe) on this checkpoint"
    )


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
