"""Request schema of ``POST /v1/images/generations`` and the translation of its errors.

The model is built per app from the settings, so the limits in the OpenAPI schema are the
limits the server enforces. Validation is strict (no ``"4"`` for 4, no ``true`` for 1) and
unknown fields are refused, so a typo such as ``num_inference_step`` is an error rather
than a silently ignored default.

    >>> Model = request_model(ServerSettings(max_n=2))
    >>> Model.model_validate_json('{"prompt": "a cat", "n": 2}').n
    2
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .errors import ApiError
from .settings import ServerSettings

SIZE_PATTERN = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
MAX_SEED = 2**63 - 1


class _RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("guidance_scale", check_fields=False)
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


def request_model(settings: ServerSettings) -> type[BaseModel]:
    """The request model with ``settings``' limits; see the README for every field."""
    prompt_len = dict(min_length=1, max_length=settings.max_prompt_chars)
    return create_model(
        "ImageGenerationRequest",
        __base__=_RequestBase,
        prompt=(str, Field(..., description="What to draw.", **prompt_len)),
        model=(str | None, Field(None, description="Must be the served model's id when given.")),
        n=(int, Field(1, ge=1, le=settings.max_n, description="Images to generate (one batch).")),
        size=(str | None, Field(None, pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$",
                                description='"WIDTHxHEIGHT", e.g. "1024x1024"; "auto" or absent: the default size.')),
        response_format=(Literal["b64_json", "url"], Field("b64_json", description='Only "b64_json" is served.')),
        user=(str | None, Field(None, max_length=256, description="Accepted for OpenAI compatibility; unused.")),
        seed=(int | None, Field(None, ge=0, le=MAX_SEED, description="Random seed (default: drawn per request).")),
        num_inference_steps=(int | None, Field(None, ge=1, le=settings.max_steps, description="Denoising steps.")),
        guidance_scale=(float | None, Field(None, ge=0.0, le=100.0, description="Guidance scale.")),
        negative_prompt=(str | None, Field(None, max_length=settings.max_prompt_chars, description="What to avoid.")),
    )


_CODES = {
    "extra_forbidden": "unknown_parameter",
    "missing": "missing_required_parameter",
}


def parse_request(model: type[BaseModel], body: bytes) -> BaseModel:
    """Parse and validate a JSON body; the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(model, exc) from None


def validation_error(model: type[BaseModel], exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid" or (first["type"] == "model_type" and not first["loc"]):
        return ApiError(400, f"the body is not a JSON object: {first['msg']}", code="invalid_json")
    param = ".".join(str(part) for part in first["loc"]) or None
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(model.model_fields))
        message = f"{param}: unknown parameter; allowed parameters: {allowed}"
    else:
        message = f"{param}: {first['msg']}"
        if kind != "missing":
            message += f" (got {_short(first.get('input'))})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more problem(s)"
    code = _CODES.get(kind) or ("invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")
    return ApiError(400, message, param=param, code=code)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_size(text: str, *, multiple: int, settings: ServerSettings) -> tuple[int, int]:
    """``"WxH"`` -> ``(width, height)`` within the settings' limits and a multiple of ``multiple``."""
    match = SIZE_PATTERN.match(text)
    if not match:  # the schema's pattern already refused it; kept for direct callers
        raise ApiError(400, f'size: expected "WIDTHxHEIGHT" (got {_short(text)})', param="size", code="invalid_size")
    width, height = int(match.group(1)), int(match.group(2))
    lo, hi = settings.min_size, settings.max_size
    for side, value in (("width", width), ("height", height)):
        if not lo <= value <= hi or value % multiple:
            raise ApiError(
                400,
                f"size: {side} {value} is not allowed; width and height must be between {lo} and {hi} "
                f"and multiples of {multiple} (got {text!r})",
                param="size",
                code="invalid_size",
            )
    return width, height
