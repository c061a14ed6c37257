"""FORA: Fast-Forward Caching for DiTs (Selvaraju et al., 2024, arXiv:2407.01425).

Every transformer block runs fully at steps ``< start_step`` and at ``start_step + j * interval``;
at the steps in between each block returns its input plus the output residual it cached at the
last full step (for FLUX double-stream blocks both the image and the text stream). Embedders,
norms and the output projection run every step, so the skipped steps cost a few elementwise adds
per block.

    >>> from smash_runtime.cachers import apply_cacher, ForaConfig
    >>> apply_cacher(pipe, ForaConfig(interval=3, start_step=2))
    >>> image = pipe("a cat", num_inference_steps=28).images[0]

Each branch of a step (``cond`` / ``uncond`` under true CFG) caches separately; the schedule
and branches come from the shared step tracker (``_tracker.py``).
"""

from __future__ import annotations

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.hooks import HookRegistry, ModelHook
from diffusers.utils.torch_utils import unwrap_module

from ..anatomy import BLOCK_LISTS, transformer_blocks
from ..errors import SettingsError
from ..settings import ForaConfig
from ._tracker import StepTrackerHook, install_tracker

__all__ = ["FORA_BLOCK_HOOK", "ForaConfig", "apply", "remove", "transformer_blocks"]

FORA_BLOCK_HOOK = "smash_fora_block"


class ForaBlockHook(ModelHook):
    """Runs the block or replays ``input + cached residual``, as the tracker decided for this step."""

    def __init__(self, tracker: StepTrackerHook, index: int, keep_residuals: bool):
        super().__init__()
        self.tracker = tracker
        self.index = index
        self.keep_residuals = keep_residuals
        self.meta: TransformerBlockMetadata | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.meta = TransformerBlockRegistry.get(unwrap_module(module).__class__)
        return module

    def _inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        meta = self.meta
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        encoder = None
        if meta.return_encoder_hidden_states_index is not None:
            encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        return hidden, encoder

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        branch = self.tracker.current
        cached = branch.cache.get(self.index)
        meta = self.meta
        if branch.compute or cached is None:
            output = self.fn_ref.original_forward(*args, **kwargs)
            branch.executions[-1] += 1
            if self.keep_residuals:
                hidden, encoder = self._inputs(args, kwargs)
                if isinstance(output, tuple):
                    hidden_res = output[meta.return_hidden_states_index] - hidden
                    encoder_res = None
                    if encoder is not None:
                        encoder_res = output[meta.return_encoder_hidden_states_index] - encoder
                    branch.cache[self.index] = (len(output), hidden_res, encoder_res)
                else:
                    branch.cache[self.index] = (None, output - hidden, None)
            return output

        hidden, encoder = self._inputs(args, kwargs)
        length, hidden_res, encoder_res = cached
        if length is None:
            return hidden + hidden_res
        out = [None] * length
        out[meta.return_hidden_states_index] = hidden + hidden_res
        if encoder_res is not None:
            out[meta.return_encoder_hidden_states_index] = encoder + encoder_res
        return tuple(out)


def apply(pipe, denoiser: torch.nn.Module, config: ForaConfig) -> StepTrackerHook:
    """Register FORA hooks on every transformer block of ``denoiser``; returns the step tracker."""
    blocks = transformer_blocks(denoiser)
    if not blocks:
        raise SettingsError(
            "name", "fora", f"FORA needs a transformer with block lists ({', '.join(BLOCK_LISTS)}); "
            f"{type(denoiser).__name__} has none"
        )
    for qualified, block in blocks:
        try:
            TransformerBlockRegistry.get(unwrap_module(block).__class__)
        except ValueError:
            raise SettingsError(
                "name", "fora", f"FORA does not know the block type {type(block).__name__} ({qualified}): "
                "diffusers has no input/output layout registered for it"
            ) from None
    tracker = StepTrackerHook(schedule=config.computes_at, modules=len(blocks))
    keep = config.interval > 1
    for index, (_, block) in enumerate(blocks):
        hook = ForaBlockHook(tracker, index, keep)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, FORA_BLOCK_HOOK)
    install_tracker(denoiser, tracker)
    return tracker


def remove(denoiser: torch.nn.Module) -> None:
    """Remove the block hooks ``apply`` registered (the tracker is removed by the caller)."""
    HookRegistry.check_if_exists_or_initialize(denoiser).remove_hook(FORA_BLOCK_HOOK, recurse=True)
