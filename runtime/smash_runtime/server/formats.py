"""Image bytes in and out of the API: encoding results as png/jpeg/webp, decoding uploaded images and masks.

    >>> encode(image, "jpeg", compression=80)[:3]
    b'\\xff\\xd8\\xff'
    >>> picture = decode_upload(png_bytes, "image", max_side=8192)
    >>> mask = decode_mask(mask_png_bytes, size=picture.size, max_side=8192)   # white = repaint

Encoding writes no metadata (no time stamps), so the same image gives the same bytes.
"""

from __future__ import annotations

import io

from PIL import Image

from ..images import encode_png
from .errors import ApiError

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_QUALITY = 100  # OpenAI's default output_compression for jpeg and webp


def encode(image: Image.Image, output_format: str = "png", compression: int | None = None) -> bytes:
    """``image`` as ``output_format`` bytes. ``compression`` (0-100) is OpenAI's ``output_compression``:
    the quality for jpeg and webp, the zlib level (scaled to 0-9) for png; None: the defaults."""
    if output_format == "png":
        if compression is None:
            return encode_png(image)  # the bytes in-process generation gives
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False, compress_level=round(compression * 9 / 100))
        return buffer.getvalue()
    if output_format not in ("jpeg", "webp"):
        raise ValueError(f"output_format: {output_format!r} is not one of {', '.join(MEDIA_TYPES)}")
    buffer = io.BytesIO()
    quality = DEFAULT_QUALITY if compression is None else compression
    image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()


def decode_upload(data: bytes, param: str, *, max_side: int) -> Image.Image:
    """An uploaded PNG, JPEG or WebP, fully decoded; anything else is a 400 naming ``param``.

    The header is checked before the pixels are decoded, so a small file claiming a huge
    picture (a decompression bomb) costs nothing.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:
        raise ApiError(400, f"{param}: not a readable image; send a PNG, JPEG or WebP file",
                       param=param, code="invalid_image") from None
    if image.format not in UPLOAD_FORMATS:
        raise ApiError(400, f"{param}: {image.format} images are not accepted; send a PNG, JPEG or WebP file",
                       param=param, code="invalid_image")
    width, height = image.size
    if width > max_side or height > max_side:
        raise ApiError(400, f"{param}: {width}x{height} is too large; each side may be at most {max_side} pixels",
                       param=param, code="invalid_image")
    try:
        image.load()
    except Exception as exc:
        raise ApiError(400, f"{param}: the image data is broken ({type(exc).__name__})",
                       param=param, code="invalid_image") from None
    return image


def decode_mask(data: bytes, *, size: tuple[int, int], max_side: int) -> Image.Image:
    """OpenAI's mask (fully transparent where the image should change) as diffusers' mask
    (an ``L`` image, white where the pipeline repaints)."""
    image = decode_upload(data, "mask", max_side=max_side)
    if image.size != size:
        raise ApiError(400, f"mask: its size {image.size[0]}x{image.size[1]} differs from the image's "
                       f"{size[0]}x{size[1]}; they must be equal", param="mask", code="invalid_image")
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise ApiError(400, f"mask: it has no alpha channel (mode {image.mode}); send a PNG that is fully "
                       "transparent where the image should change", param="mask", code="invalid_image")
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)
