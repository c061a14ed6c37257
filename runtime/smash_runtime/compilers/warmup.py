"""Warm-up: run each recorded shape once so compilation happens before the first real request."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..settings import WarmupConfig

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "warm up"


def warm_up(pipe, warmup_cfg: WarmupConfig, progress: bool = True) -> dict[str, Any]:
    """Call ``pipe`` once per shape of ``warmup_cfg``; returns the time each took.

    The calls use their own seeded generator (the caller's global RNG stream is untouched) and
    return latents (the VAE is not compiled, decoding it teaches nothing). They run under
    ``torch.inference_mode()``, as ``smash_runtime.images.generate`` runs requests: compiled code
    is specialized to the grad mode, so a warm-up under another one compiles code no request uses.

        >>> warm_up(pipe, warmup_config_from_dict({"shapes": [{"height": 1024, "width": 1024, "steps": 28}]}))
        {'shapes': [{'height': 1024, 'width': 1024, 'steps': 28, 'batch': 1, 'seconds': 41.2}], 'total_s': 41.2}
    """
    shapes = list(warmup_cfg.shapes)
    results = []
    total_start = time.perf_counter()
    bar = None
    if progress and shapes:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shapes), desc="warm-up", unit="shape")
    for i, shape in enumerate(shapes, 1):
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(
                prompt=[WARMUP_PROMPT] * shape.batch,
                height=shape.height,
                width=shape.width,
                num_inference_steps=shape.steps,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
            )
        seconds = time.perf_counter() - start
        results.append({"height": shape.height, "width": shape.width, "steps": shape.steps, "batch": shape.batch,
                        "seconds": seconds})
        logger.info("warm-up %d/%d: %dx%d, %d steps, batch %d: %.2f s", i, len(shapes), shape.height,
                    shape.width, shape.steps, shape.batch, seconds)
        if bar is not None:
            bar.set_postfix_str(f"{shape.height}x{shape.width} {seconds:.1f}s")
            bar.update()
    if bar is not None:
        bar.close()
    return {"shapes": results, "total_s": time.perf_counter() - total_start}
