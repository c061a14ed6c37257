"""Pipeline anatomy: which component is the denoiser, which family it belongs to, where its blocks are.

Torch-free facts shared by the manifest (family known offline from ``model_index.json``), the
builder, the cachers and the compilers::

    >>> from smash_runtime.anatomy import denoiser_name, family_of
    >>> denoiser_name(["vae", "transformer", "text_encoder"]), family_of(["unet", "vae"])
    ('transformer', 'unet')

The functions taking modules duck-type (``named_children``) so this module never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import SettingsError

__all__ = ["BLOCK_LISTS", "DENOISERS", "FAMILIES", "denoiser_name", "denoiser_of", "family_of", "transformer_blocks"]

DENOISERS = ("transformer", "unet")
"""Component names of a diffusers denoiser, in the order they are looked up."""
FAMILIES = {"transformer": "dit", "unet": "unet"}
"""Denoiser component -> pipeline family (``dit``: transformer blocks; ``unet``)."""
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
"""Block lists of diffusers DiTs, in execution order (FLUX: double-stream, then single-stream)."""


def denoiser_name(components: Iterable[str]) -> str | None:
    """``"transformer"`` or ``"unet"``: the denoiser among ``components`` (names), or None."""
    names = set(components)
    return next((d for d in DENOISERS if d in names), None)


def family_of(components: Iterable[str]) -> str | None:
    """``"dit"`` or ``"unet"`` for a pipeline with these component names, or None."""
    name = denoiser_name(components)
    return FAMILIES[name] if name else None


def _is_module(value: Any) -> bool:
    return callable(getattr(value, "named_children", None)) and callable(getattr(value, "parameters", None))


def denoiser_of(pipe: Any) -> Any:
    """The pipeline's denoiser module (``pipe.transformer`` or ``pipe.unet``).

    Raises SettingsError (key ``pipeline_class``) when it has neither.
    """
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if _is_module(module):
            return module
    raise SettingsError("pipeline_class", type(pipe).__name__, "a pipeline with a transformer or a unet denoiser")


def transformer_blocks(denoiser: Any) -> list[tuple[str, Any]]:
    """The denoiser's transformer blocks in execution order, as ``(qualified name, block)``."""
    blocks = []
    for list_name in BLOCK_LISTS:
        blocks_list = getattr(denoiser, list_name, None)
        if _is_module(blocks_list) and type(blocks_list).__name__ == "ModuleList":
            blocks.extend((f"{list_name}.{i}", b) for i, b in enumerate(blocks_list))
    return blocks
