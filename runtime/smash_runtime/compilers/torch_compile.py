"""torch.compile for diffusion denoisers, in two scopes.

``scope = "blocks"`` (regional compilation) replaces each repeated block's ``forward`` with
``torch.compile(block.forward)``. Blocks of one class share a code object, so dynamo compiles
one graph per class and every instance reuses it. Because the compiled function *is* the
block's ``forward`` attribute, a cache hook registered afterwards (diffusers' ``HookRegistry``
wraps ``module.forward``) sits outside the compiled region: its step counters and Python
branches never reach dynamo's guards, so caching composes with compilation without recompiles.

``scope = "model"`` compiles the denoiser's whole ``forward`` as one graph: the fastest code
when nothing wraps the blocks, but hooks on inner blocks end up inside the graph.
"""

from __future__ import annotations

import logging

import torch

from smash_runtime import anatomy
from smash_runtime.errors import SettingsError, SmashError

from ..settings import TorchCompileConfig
from .precompiled import PrecompiledStore

logger = logging.getLogger(__name__)

# Set on every module whose forward we replaced, to make apply idempotent and detectable.
COMPILED_ATTR = "_smash_compiled"


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoiser (``transformer`` or ``unet``); a bare module is its own denoiser."""
    return pipe if isinstance(pipe, torch.nn.Module) else anatomy.denoiser_of(pipe)


def repeated_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's repeated blocks, as declared by diffusers' ``_repeated_blocks``.

    Models that do not declare them fall back to the items of their ``nn.ModuleList`` children
    that hold several modules of one class (``transformer_blocks`` and the like).
    """
    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if names:
        return [m for m in denoiser.modules() if type(m).__name__ in names]
    blocks = []
    for child in denoiser.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
            blocks.extend(child)
    return blocks


def _compile(fn, cfg: TorchCompileConfig):
    return torch.compile(fn, mode=cfg.mode, fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)


def _replace_forward(module: torch.nn.Module, cfg: TorchCompileConfig, store: PrecompiledStore | None) -> None:
    if getattr(module, "_diffusers_hook", None) is not None:
        # The hook-wrapped forward would be compiled, hook state and all: every step counter
        # change would then trigger a recompile.
        logger.warning(
            "%s already has diffusers hooks: apply the compiler before the cacher, or hooks recompile",
            type(module).__name__,
        )
    if store is not None:
        store.wrap(module)
    else:
        module.forward = _compile(module.forward, cfg)
    setattr(module, COMPILED_ATTR, cfg)


def apply_torch_compile(pipe, cfg: TorchCompileConfig, store: PrecompiledStore | None = None) -> list[torch.nn.Module]:
    """Compile ``pipe``'s denoiser in ``cfg.scope``; returns the modules whose forward was replaced.

    Compilation itself is lazy: it happens on the first call of each shape (see ``warm_up``).
    With ``store`` (scope ``"blocks"`` only), each block class is precompiled once per input
    signature and kept in the store, so a later process loads it instead of tracing again
    (see ``precompiled.py``).

        >>> apply_torch_compile(pipe, TorchCompileConfig(scope="blocks"))  # doctest: +SKIP
    """
    denoiser = denoiser_of(pipe)
    if cfg.scope == "model":
        targets = [denoiser]
    else:
        targets = repeated_blocks(denoiser)
        if not targets:
            raise SettingsError(
                "scope",
                cfg.scope,
                f"{type(denoiser).__name__} declares no repeated blocks; use scope = \"model\"",
            )
    done = [m for m in [denoiser, *targets] if getattr(m, COMPILED_ATTR, None) is not None]
    if done:
        previous = getattr(done[0], COMPILED_ATTR)
        if previous == cfg and all(getattr(m, COMPILED_ATTR, None) == cfg for m in targets):
            return targets
        raise SmashError(f"{type(denoiser).__name__} is already compiled with {previous}; build a fresh pipeline")
    for module in targets:
        _replace_forward(module, cfg, store if cfg.scope == "blocks" else None)
    logger.info(
        "torch.compile (mode=%s, scope=%s): %d module(s) of %s",
        cfg.mode,
        cfg.scope,
        len(targets),
        ", ".join(sorted({type(m).__name__ for m in targets})),
    )
    return targets
