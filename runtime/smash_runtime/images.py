"""One generation with explicit, reproducible settings, and deterministic PNG bytes.

The CLI, the HTTP server and the tests all go through these two functions, so the same
seed and settings give the same bytes everywhere.

    >>> from smash_runtime.images import generate, encode_png
    >>> png = encode_png(generate(pipe, "a red cube", seed=0, steps=4, height=64, width=64)[0])
"""

from __future__ import annotations

import inspect
import io

import torch
from PIL import Image


def generate(
    pipe,
    prompt: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    num_images: int = 1,
    image: Image.Image | None = None,
    mask_image: Image.Image | None = None,
    strength: float | None = None,
) -> list[Image.Image]:
    """Run ``pipe`` once; the generator lives on the CPU so images match across devices' runs.

    ``image``, ``mask_image`` and ``strength`` are for image-to-image and inpainting pipelines
    (for example ``AutoPipelineForImage2Image.from_pipe(pipe)``)."""
    kwargs = {
        "prompt": prompt,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "num_images_per_prompt": num_images,
        "output_type": "pil",
    }
    optional = {
        "num_inference_steps": steps,
        "height": height,
        "width": width,
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
        "image": image,
        "mask_image": mask_image,
        "strength": strength,
    }
    accepted = inspect.signature(type(pipe).__call__).parameters
    for key, value in optional.items():
        if value is not None:
            if key not in accepted:
                raise ValueError(f"{type(pipe).__name__} does not take {key}")
            kwargs[key] = value
    with torch.inference_mode():
        return pipe(**kwargs).images


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with no metadata (no time stamps), so equal images give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
