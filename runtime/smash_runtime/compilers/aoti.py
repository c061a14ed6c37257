"""A block class compiled ahead of time with AOTInductor: one ``.pt2`` package, loaded without inductor's Python.

A stored dynamo variant (``precompiled.py``) still costs a warm process ~1 s on the 2-core CPU:
its Python wrapper imports inductor's lowering and codegen modules (``select_algorithm``,
``memory_planning``), locating each of its C++ kernels imports ``torch.utils.cpp_extension``
(and setuptools), and the 25 kernel libraries are opened one by one. An AOTInductor package is
one shared library with the whole wrapper in C++: loading it is a ``dlopen`` (0.18 s for the 3
packages of tiny-flux, measured in ``docs/benchmarks.md``).

The block is exported as a function of its weights (``torch.export`` of the class's forward with
every parameter and buffer as an input), so one package serves every sibling block, and a
package holds code only, never weights. A torchao-quantized weight (int8wo, int8dq) enters as its
plain inner tensors and is rebuilt inside the graph with the subclass's own ``__tensor_unflatten__``
(torch.export takes no tensor-subclass inputs). A package has no guards: what it was made for is
the caller's to check (``precompiled.block_layout``, ``precompiled.call_layout`` and
:func:`global_state`)::

    >>> export_package(block, args, kwargs, Path("v.pt2"), {})      # the cold process
    >>> run = load_package(Path("v.pt2"))                           # every later process
    >>> run(block, *args, **kwargs)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PACKAGE_SUFFIX = ".pt2"


def global_state() -> str:
    """The thread state a package bakes in (dynamo would guard it): grad mode, autocast, modes.

        >>> with torch.no_grad(): global_state()
        'grad=False autocast=() modes=()'
    """
    autocast = tuple(
        (device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)
    )
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    modes = tuple(type(m).__qualname__ for m in (*torch.overrides._get_current_function_mode_stack(),
                                                  *_get_current_dispatch_mode_stack()))
    return f"grad={torch.is_grad_enabled()} autocast={autocast} modes={modes}"


def unsupported_reason(options: dict[str, Any]) -> str | None:
    """Why this compile mode cannot be an AOTInductor package (None: it can).

        >>> unsupported_reason({"triton.cudagraphs": True})
        'CUDA graphs (mode="reduce-overhead")'
    """
    if options.get("triton.cudagraphs"):
        return 'CUDA graphs (mode="reduce-overhead")'
    return None


def block_weights(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The block's parameters and buffers as plain tensors: a tensor subclass by its inner tensors.

        >>> list(block_weights(int8wo_linear))      # ['weight::qdata', 'weight::scale', 'bias']
    """
    flat: dict[str, torch.Tensor] = {}
    for name, tensor in (*block.named_parameters(), *block.named_buffers()):
        _flatten(name, tensor, flat)
    return flat


def _flatten(name: str, tensor: torch.Tensor, flat: dict[str, torch.Tensor]) -> None:
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        flat[name] = tensor.detach()
        return
    if not hasattr(tensor, "__tensor_flatten__"):
        raise TypeError(f"{name}: a {type(tensor).__qualname__} weight cannot be an input of an exported graph")
    inner, _ = tensor.__tensor_flatten__()
    for attr in inner:
        _flatten(f"{name}::{attr}", getattr(tensor, attr), flat)


def _unflatten(name: str, like: torch.Tensor, flat: dict[str, torch.Tensor]) -> torch.Tensor:
    # `like` is the block's own weight (metadata only: shapes, strides and the subclass's metadata
    # become constants of the graph, as block_layout records them); the data comes from `flat`.
    if type(like) in (torch.Tensor, torch.nn.Parameter):
        return flat[name]
    inner_names, meta = like.__tensor_flatten__()
    inner = {attr: _unflatten(f"{name}::{attr}", getattr(like, attr), flat) for attr in inner_names}
    return type(like).__tensor_unflatten__(inner, meta, like.shape, like.stride())


class _WeightsAsInputs(torch.nn.Module):
    """``forward(weights, *args, **kwargs)`` runs the block with ``weights`` in place of its own."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        # Not registered as a submodule: export would otherwise lift (and AOTI embed) its weights.
        self.__dict__["_block"] = block
        self._weights = dict((*block.named_parameters(), *block.named_buffers()))

    def forward(self, weights: dict[str, torch.Tensor], *args, **kwargs):
        from torch.nn.utils.stateless import _reparametrize_module

        block = self.__dict__["_block"]
        rebuilt = {name: _unflatten(name, like, weights) for name, like in self._weights.items()}
        # The class's forward, as precompiled.py compiles it: block.__call__ would run our own
        # dispatcher (block.forward) and any hook around the block. _reparametrize_module is what
        # torch.func.functional_call swaps the weights with.
        with _reparametrize_module(block, rebuilt, tie_weights=False, strict=True):
            return type(block).forward(block, *args, **kwargs)


def export_package(block: torch.nn.Module, args: tuple, kwargs: dict, path: Path, options: dict[str, Any]) -> None:
    """Export the block's forward for this call and compile it into an AOTInductor package at ``path``."""
    with torch.no_grad():
        program = torch.export.export(_WeightsAsInputs(block), (block_weights(block), *args), kwargs, strict=False)
    if program.state_dict or program.constants:
        # Weights baked into the package would serve only this block (and the wrong weights to its siblings).
        raise RuntimeError(f"the exported graph holds {len(program.state_dict) + len(program.constants)} tensor "
                           "constant(s); a shared package must take every tensor as an input")
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)


def load_package(path: Path) -> Callable[..., Any]:
    """Load a package made by :func:`export_package`; the result is called as ``run(block, *args, **kwargs)``."""
    compiled = torch._inductor.aoti_load_package(str(path))

    def run(block: torch.nn.Module, *args, **kwargs):
        return compiled(block_weights(block), *args, **kwargs)

    return run
