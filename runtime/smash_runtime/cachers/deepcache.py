"""DeepCache for UNets (Ma et al., 2023, arXiv:2312.00858), written as diffusers hooks.

A UNet's high-level features (the deep down blocks, the mid block and the deep up blocks) change
slowly across denoising steps; its shallow branch (the first down blocks and the last up blocks,
joined by skip connections) carries the detail. Every ``interval`` steps the whole UNet runs; in
between, the deep modules return the outputs they cached at the last full step, so only the
shallow branch runs, fed by the cached high-level feature and fresh skip connections.

``branch`` is the skip depth: down blocks ``0..branch`` and the matching up blocks run every
step; everything deeper is cached. ``branch = 0`` skips the most (DeepCache's default);
``branch = len(down_blocks) - 1`` caches only the mid block.

    >>> from smash_runtime.cachers import apply_cacher, DeepCacheConfig
    >>> apply_cacher(sdxl_pipe, DeepCacheConfig(interval=3, branch=0))

Granularity is whole blocks (the original also splits inside a block); no dependency on the
``DeepCache`` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

from ..errors import SettingsError
from ._fields import int_field
from ._tracker import StepTrackerHook, install_tracker

DEEPCACHE_HOOK = "smash_deepcache"


@dataclass(frozen=True)
class DeepCacheConfig:
    """``[runtime.cacher] name = "deepcache"``."""

    name: ClassVar[str] = "deepcache"
    interval: int = int_field(3, 1, 10, "full UNet every `interval` steps; 1 = no caching")
    branch: int = int_field(0, 0, None, "skip depth: down blocks 0..branch (and their up blocks) run every step")
    start_step: int = int_field(0, 0, None, "steps before this one always run the full UNet")

    def computes_at(self, step: int) -> bool:
        return step < self.start_step or (step - self.start_step) % self.interval == 0


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


def deep_modules(unet: torch.nn.Module, branch: int) -> list[tuple[str, torch.nn.Module]]:
    """The modules DeepCache skips at depth ``branch``, in execution order."""
    down, up = unet.down_blocks, unet.up_blocks
    if not 0 <= branch < len(down):
        allowed = f"an integer from 0 to {len(down) - 1} for this UNet ({len(down)} down blocks)"
        raise SettingsError("branch", branch, allowed)
    modules = [(f"down_blocks.{i}", down[i]) for i in range(branch + 1, len(down))]
    if getattr(unet, "mid_block", None) is not None:
        modules.append(("mid_block", unet.mid_block))
    # up_blocks[j] mirrors down_blocks[len(down) - 1 - j].
    modules += [(f"up_blocks.{j}", up[j]) for j in range(len(up) - 1 - branch)]
    return modules


def apply_deepcache(unet: torch.nn.Module, config: DeepCacheConfig) -> StepTrackerHook:
    """Register DeepCache hooks on ``unet``'s deep modules; returns the step tracker."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "up_blocks")):
        allowed = f"DeepCache needs a UNet with down/up blocks; got {type(unet).__name__}"
        raise SettingsError("name", "deepcache", allowed)
    modules = deep_modules(unet, config.branch)
    tracker = StepTrackerHook(schedule=config.computes_at, modules=len(modules))
    keep = config.interval > 1
    for index, (_, module) in enumerate(modules):
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            DeepModuleHook(tracker, index, keep), DEEPCACHE_HOOK
        )
    install_tracker(unet, tracker)
    return tracker
