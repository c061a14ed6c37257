"""The denoiser-level hook every cacher shares: which pipeline call, which step, which branch.

Cache hooks on blocks need three facts the block itself cannot see: the denoising step, the
branch of the step (a pipeline may call the denoiser more than once per step: conditional and
unconditional under classifier-free guidance), and when a new pipeline call starts. This hook
sits outermost on the denoiser (``transformer`` / ``unet``) and works them out once per call:

* the branch ("key") is the cache context the pipeline names (FluxPipeline wraps its calls in
  ``transformer.cache_context("cond"/"uncond")``); pipelines that name none get ``call0``,
  ``call1``, ... by order among the calls that share a timestep;
* each call under a key is one step of that key, and timesteps strictly decrease along a run,
  so a timestep that does not is the start of a new pipeline call;
* ``maybe_free_model_hooks`` (end of every diffusers pipeline call) resets stateful hooks, which
  marks the run over; an interrupted call is caught by the timestep rule instead.

All decisions are plain Python made here, outside any compiled block, so block hooks only read
a bool and a dict and never put Python state inside a compiled region.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager, _set_cache_context

TRACKER_HOOK = "smash_cache_tracker"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


@dataclass
class BranchState:
    """What one branch (cache context) of the current pipeline call carries between steps."""

    step: int = -1
    last_timestep: float | None = None
    compute: bool = True
    # Cached tensors, keyed by the hooked module's index (FORA residuals, DeepCache outputs).
    cache: dict[int, Any] = field(default_factory=dict)
    # Per-step count of real executions of the hooked modules.
    executions: list[int] = field(default_factory=list)
    # States swapped into stateless-per-branch diffusers hooks (PAB, FasterCache).
    hook_states: list[Any] | None = None


@dataclass
class CacherStats:
    """Real executions of the cached modules in the latest pipeline call.

    ``executions[key][step]`` counts the hooked modules (FORA: transformer blocks; DeepCache:
    the deep UNet blocks) that really ran at ``step`` under branch ``key`` ("cond", "uncond",
    "call0", ...). Kept after the call ends; cleared when the next call starts.

        >>> stats = cacher_stats(pipe)
        >>> stats.per_step()        # summed over branches: [12, 0, 12, 0, ...]
    """

    modules: int = 0
    executions: dict[str, list[int]] = field(default_factory=dict)

    def per_step(self) -> list[int]:
        steps = max((len(v) for v in self.executions.values()), default=0)
        return [sum(v[i] for v in self.executions.values() if i < len(v)) for i in range(steps)]

    def total(self) -> int:
        return sum(sum(v) for v in self.executions.values())


class StepTrackerHook(ModelHook):
    """Outermost hook on the denoiser; see the module docstring."""

    _is_stateful = True

    def __init__(
        self,
        schedule: Callable[[int], bool] | None = None,
        on_new_run: Callable[[], None] | None = None,
        swap_hooks: list[ModelHook] | None = None,
        modules: int = 0,
    ):
        super().__init__()
        # Receives the pipeline's cache context through diffusers' ``_set_cache_context``.
        self.state_manager = StateManager(_NoState)
        self.schedule = schedule
        self.on_new_run = on_new_run
        self.swap_hooks = swap_hooks or []
        self.branches: dict[str, BranchState] = {}
        self.current = BranchState()
        self.stats = CacherStats(modules=modules)
        self.finished = True
        self._prev_timestep: float | None = None
        self._calls_at_timestep = 0
        self._timestep_index: int | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        params = list(inspect.signature(type(module).forward).parameters)[1:]
        self._timestep_index = params.index("timestep") if "timestep" in params else None
        return module

    def _timestep(self, args: tuple, kwargs: dict) -> float | None:
        t = kwargs.get("timestep")
        if t is None and self._timestep_index is not None and self._timestep_index < len(args):
            t = args[self._timestep_index]
        if t is None:
            return None
        if torch.is_tensor(t):
            return float(t.reshape(-1)[0])
        return float(t)

    def _start_run(self, module: torch.nn.Module, context: CacheContext | None) -> None:
        if not self.finished:
            # An interrupted call left state behind: reset every cache hook under the denoiser,
            # which clears their contexts too, so put the pipeline's context back.
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()
            if context is not None:
                _set_cache_context(module, context)
        self.branches = {}
        self.stats = CacherStats(modules=self.stats.modules)
        self.finished = False
        self._prev_timestep = None
        self._calls_at_timestep = 0
        if self.on_new_run is not None:
            self.on_new_run()

    def _branch_key(self, context: CacheContext | None, t: float | None) -> str:
        if context is not None:
            return context.name
        if t is not None and t == self._prev_timestep:
            self._calls_at_timestep += 1
        else:
            self._calls_at_timestep = 0
        return f"call{self._calls_at_timestep}"

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        context = self.state_manager._context
        t = self._timestep(args, kwargs)
        if self.finished:
            self._start_run(module, context)
        key = self._branch_key(context, t)
        branch = self.branches.get(key)
        if branch is not None and t is not None and branch.last_timestep is not None and t >= branch.last_timestep:
            self._start_run(module, context)
            key = self._branch_key(context, t)
            branch = None
        if branch is None:
            branch = self.branches[key] = BranchState()
            self.stats.executions[key] = branch.executions
        self._prev_timestep = t
        branch.step += 1
        branch.last_timestep = t
        branch.compute = self.schedule(branch.step) if self.schedule is not None else True
        if self.schedule is not None:
            branch.executions.append(0)
        self.current = branch
        if self.swap_hooks:
            if branch.hook_states is None:
                branch.hook_states = [type(h.state)() for h in self.swap_hooks]
            for hook, state in zip(self.swap_hooks, branch.hook_states):
                hook.state = state

        if context is None:
            # diffusers' context-keyed hooks (FirstBlockCache, TaylorSeer) need a context even
            # when the pipeline names none.
            _set_cache_context(module, CacheContext(key))
            try:
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:
                _set_cache_context(module, None)
        return self.fn_ref.original_forward(*args, **kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # End of a pipeline call: drop cached tensors (memory), keep the counts for inspection.
        for branch in self.branches.values():
            branch.cache.clear()
            branch.hook_states = None
        self.finished = True
        self.state_manager.reset()
        return module


def install_tracker(denoiser: torch.nn.Module, tracker: StepTrackerHook) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(tracker, TRACKER_HOOK)
    # Block hooks were added under the denoiser: rebuild diffusers' cached list of registries so
    # cache contexts reach them.
    registry.invalidate_child_registries_cache()
