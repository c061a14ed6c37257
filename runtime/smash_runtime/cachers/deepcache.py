"""DeepCache for UNets (Ma et al., 2023, arXiv:2312.00858), written as diffusers hooks.

A UNet's high-level features (the deep down blocks, the mid block and the deep up blocks) change
slowly across denoising steps; its shallow branch (the first down blocks and the last up blocks,
joined by skip connections) carries the detail. Every ``interval`` steps the whole UNet runs; in
between, the deep modules return the outputs they cached at the last full step, so only the
shallow branch runs, fed by the cached high-level feature and fresh skip connections.

``branch`` is the skip depth: down blocks ``0..branch`` and the matching up blocks run every
step; everything deeper is cached. ``branch = 0`` skips the most at block granularity;
``branch = len(down_blocks) - 1`` caches only the mid block.

``layer`` goes inside ``down_blocks[branch]``, as the paper's ``cache_block_id`` does: only its
layers ``0..layer`` (resnet + attention) run every step, and of the mirroring up block only the
layers whose skip connection comes from them (its last ``layer + 2``); the rest of both blocks
(and the down block's downsampler, whose output only deeper modules read) is cached::

    down_blocks[0]: resnets[0] | resnets[1] downsample   ...deep...   up_blocks[-1]: resnets[0] | resnets[1] resnets[2]
                    fresh        cached (layer = 0)                                   cached       fresh (skips r0, conv_in)

    >>> from smash_runtime.cachers import apply_cacher, DeepCacheConfig
    >>> apply_cacher(sdxl_pipe, DeepCacheConfig(interval=3, branch=0))            # whole blocks
    >>> apply_cacher(sdxl_pipe, DeepCacheConfig(interval=3, branch=0, layer=0))   # the paper's default

No dependency on the ``DeepCache`` package.
"""

from __future__ import annotations

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

from ..errors import SettingsError
from ..settings import DeepCacheConfig
from ._tracker import StepTrackerHook, install_tracker

__all__ = ["DEEPCACHE_HOOK", "DeepCacheConfig", "apply", "deep_modules", "remove"]

DEEPCACHE_HOOK = "smash_deepcache"


class DeepModuleHook(ModelHook):
    """Runs a deep UNet module on full steps and replays its cached output otherwise."""

    def __init__(self, tracker: StepTrackerHook, index: int, keep_outputs: bool):
        super().__init__()
        self.tracker = tracker
        self.index = index
        self.keep_outputs = keep_outputs

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        branch = self.tracker.current
        cached = branch.cache.get(self.index)
        if branch.compute or cached is None:
            output = self.fn_ref.original_forward(*args, **kwargs)
            branch.executions[-1] += 1
            if self.keep_outputs:
                branch.cache[self.index] = output
            return output
        return cached


def deep_modules(unet: torch.nn.Module, branch: int, layer: int | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The modules DeepCache skips at depth ``branch`` (and ``layer`` inside it), in execution order."""
    down, up = unet.down_blocks, unet.up_blocks
    if not 0 <= branch < len(down):
        allowed = f"an integer from 0 to {len(down) - 1} for this UNet ({len(down)} down blocks)"
        raise SettingsError("branch", branch, allowed)
    modules = [] if layer is None else _layers_after(down[branch], f"down_blocks.{branch}", layer)
    modules += [(f"down_blocks.{i}", down[i]) for i in range(branch + 1, len(down))]
    if getattr(unet, "mid_block", None) is not None:
        modules.append(("mid_block", unet.mid_block))
    # up_blocks[j] mirrors down_blocks[len(down) - 1 - j].
    modules += [(f"up_blocks.{j}", up[j]) for j in range(len(up) - 1 - branch)]
    if layer is not None:
        mirror = len(up) - 1 - branch
        modules += _up_layers_before(up[mirror], f"up_blocks.{mirror}", len(down[branch].resnets) - 1 - layer)
    return modules


def _layers_after(block: torch.nn.Module, name: str, layer: int) -> list[tuple[str, torch.nn.Module]]:
    # Down layer i's output is the skip that up layer (n - 1 - i) of the mirror reads; past `layer`,
    # both are cached. The downsampler feeds only deeper modules and the deeper up block's skip.
    n = len(block.resnets)
    if not 0 <= layer < n:
        raise SettingsError("layer", layer, f"an integer from 0 to {n - 1}: {name} has {n} layers")
    out = []
    for i in range(layer + 1, n):
        out.append((f"{name}.resnets.{i}", block.resnets[i]))
        if getattr(block, "attentions", None) is not None:
            out.append((f"{name}.attentions.{i}", block.attentions[i]))
    for i, sampler in enumerate(getattr(block, "downsamplers", None) or ()):
        out.append((f"{name}.downsamplers.{i}", sampler))
    return out


def _up_layers_before(block: torch.nn.Module, name: str, count: int) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for i in range(count):
        out.append((f"{name}.resnets.{i}", block.resnets[i]))
        if getattr(block, "attentions", None) is not None:
            out.append((f"{name}.attentions.{i}", block.attentions[i]))
    return out


def apply(pipe, unet: torch.nn.Module, config: DeepCacheConfig) -> StepTrackerHook:
    """Register DeepCache hooks on ``unet``'s deep modules; returns the step tracker."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "up_blocks")):
        allowed = f"DeepCache needs a UNet with down/up blocks; got {type(unet).__name__}"
        raise SettingsError("name", "deepcache", allowed)
    modules = deep_modules(unet, config.branch, config.layer)
    tracker = StepTrackerHook(schedule=config.computes_at, modules=len(modules))
    keep = config.interval > 1
    for index, (_, module) in enumerate(modules):
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            DeepModuleHook(tracker, index, keep), DEEPCACHE_HOOK
        )
    install_tracker(unet, tracker)
    return tracker


def remove(unet: torch.nn.Module) -> None:
    """Remove the deep-module hooks ``apply`` registered (the tracker is removed by the caller)."""
    HookRegistry.check_if_exists_or_initialize(unet).remove_hook(DEEPCACHE_HOOK, recurse=True)
