"""stable-fast (the ``sfast`` package): an optional, CUDA-only compiler for UNet pipelines.

Nothing here imports ``sfast`` at module import: a runtime without it (or without CUDA) loads
every artifact that does not ask for it, and one that does gets an
:class:`~smash_runtime.errors.UnsupportedOnDevice` saying how to fix it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

import torch

from smash_runtime.errors import UnsupportedOnDevice

from ..settings import StableFastConfig
from .torch_compile import denoiser_of

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with `pip install stable-fast` (wheels matching your torch and CUDA versions: "
    "https://github.com/chengzeyi/stable-fast/releases), or record [runtime.compiler] "
    'name = "torch_compile" instead'
)


def stable_fast_problems(device: torch.device) -> list[str]:
    """Why stable-fast cannot run on ``device`` here (empty when it can)."""
    problems = []
    if importlib.util.find_spec("sfast") is None:
        problems.append("the stable-fast package (module 'sfast') is not installed")
    if device.type != "cuda":
        problems.append(f"it needs a CUDA device and the pipeline is on {device.type!r}")
    elif not torch.cuda.is_available():
        problems.append("CUDA is not available in this process")
    return problems


def apply_stable_fast(pipe, cfg: StableFastConfig) -> None:
    """Trace and fuse ``pipe``'s UNet with stable-fast (in place)."""
    denoiser = denoiser_of(pipe)
    device = next(denoiser.parameters()).device
    problems = stable_fast_problems(device)
    if problems:
        raise UnsupportedOnDevice(f"stable_fast cannot run here: {'; '.join(problems)}. To use it, {INSTALL_HINT}.")
    if getattr(pipe, "unet", None) is None:
        raise UnsupportedOnDevice(
            f"stable_fast compiles UNet pipelines (SD, SDXL); {type(pipe).__name__} has none: "
            'record [runtime.compiler] name = "torch_compile" for transformer models'
        )
    sfast = importlib.import_module("sfast.compilers.diffusion_pipeline_compiler")
    config = sfast.CompilationConfig.Default()
    config.enable_cuda_graph = cfg.cuda_graph
    # Optional accelerators: asking for one that is missing would fail deep inside sfast.
    config.enable_triton = cfg.triton and importlib.util.find_spec("triton") is not None
    config.enable_xformers = cfg.xformers and importlib.util.find_spec("xformers") is not None
    for wanted, got, pkg in ((cfg.triton, config.enable_triton, "triton"), (cfg.xformers, config.enable_xformers, "xformers")):
        if wanted and not got:
            logger.warning("stable_fast: %s is not installed; running without its kernels", pkg)
    sfast.compile(pipe, config)
    logger.info("stable_fast: compiled %s (cuda_graph=%s)", type(pipe).__name__, cfg.cuda_graph)
