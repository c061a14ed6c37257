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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator

from .errors import ApiError
from .settings import ServerSettings

SIZE_PATTERN = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
MAX_SEED = 2**63 - 1


OUTPUT_FORMATS = ("png", "jpeg", "webp")

# OpenAI parameters the server accepts so that unmodified clients work, but does not act on.
# Each given one is named in the ``X-Smash-Ignored-Parameters`` response header.
IGNORED_PARAMETERS = {
    "quality": "the image quality comes from num_inference_steps (an extension) and the artifact",
    "style": "no style presets; say it in the prompt",
    "moderation": "the server applies no content moderation",
    "user": "end-user ids are neither stored nor logged",
    "safety_identifier": "end-user ids are neither stored nor logged",
    "input_fidelity": "edits follow strength (an extension) instead",
}
IGNORED_HEADER = "X-Smash-Ignored-Parameters"


class _RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_not_given(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI clients send explicit nulls for unset fields: null means "not given", so the
        # default applies. A required field (prompt) stays required.
        field_info = cls.model_fields[info.field_name]
        return field_info.get_default() if value is None and not field_info.is_required() else value

    @field_validator("guidance_scale", check_fields=False)
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def ignored(self) -> list[str]:
        """The accepted-but-unused OpenAI parameters this request gave (not null)."""
        return [name for name in IGNORED_PARAMETERS if getattr(self, name, None) is not None]


class _FormBase(_RequestBase):
    # Multipart fields are all text: "2" must read as 2 here (JSON bodies stay strict).
    model_config = ConfigDict(extra="forbid", strict=False)


def _fields(settings: ServerSettings) -> dict[str, Any]:
    """The fields both routes take. Every optional field may be null, which means "not given"."""
    prompt_len = dict(min_length=1, max_length=settings.max_prompt_chars)
    short = dict(max_length=64)
    return dict(
        prompt=(str, Field(..., description="What to draw.", **prompt_len)),
        model=(str | None, Field(None, max_length=256, description="The served model's id or one of its aliases.")),
        n=(int, Field(1, ge=1, le=settings.max_n, description="Images to generate (one batch).")),
        size=(str | None, Field(None, pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$",
                                description='"WIDTHxHEIGHT", e.g. "1024x1024"; "auto" or absent: the default size.')),
        response_format=(Literal["b64_json", "url"], Field("b64_json", description='Only "b64_json" is served.')),
        output_format=(Literal[OUTPUT_FORMATS] | None, Field(None, description="png (default), jpeg or webp.")),
        output_compression=(int | None, Field(None, ge=0, le=100, description=(
            "0-100. jpeg/webp: the encoder's quality (100 = least compression, the default); "
            "png: the zlib level, scaled to 0-9 (lossless either way)."))),
        background=(Literal["auto", "opaque", "transparent"] | None, Field(None, description=(
            '"auto" and "opaque" give opaque images (all the pipeline makes); "transparent" is refused.'))),
        stream=(bool | None, Field(None, description="Only false: images are returned whole.")),
        **{name: (str | None, Field(None, description=f"Accepted and ignored: {why}.", **short))
           for name, why in IGNORED_PARAMETERS.items() if name != "input_fidelity"},
        seed=(int | None, Field(None, ge=0, le=MAX_SEED, description="Random seed (default: drawn per request).")),
        num_inference_steps=(int | None, Field(None, ge=1, le=settings.max_steps, description="Denoising steps.")),
        guidance_scale=(float | None, Field(None, ge=0.0, le=100.0, description="Guidance scale.")),
        negative_prompt=(str | None, Field(None, max_length=settings.max_prompt_chars, description="What to avoid.")),
    )


def request_model(settings: ServerSettings) -> type[BaseModel]:
    """The JSON body of ``POST /v1/images/generations`` with ``settings``' limits (see the README)."""
    return create_model("ImageGenerationRequest", __base__=_RequestBase, **_fields(settings))


def edit_model(settings: ServerSettings) -> type[BaseModel]:
    """The non-file fields of the multipart body of ``POST /v1/images/edits``.

        >>> edit_model(ServerSettings()).model_validate({"prompt": "a hat", "n": "2", "strength": "0.5"}).n
        2
    """
    fields = _fields(settings)
    for name in ("style", "moderation"):  # generation-only in OpenAI's API
        fields.pop(name)
    return create_model(
        "ImageEditRequest",
        __base__=_FormBase,
        **fields,
        input_fidelity=(str | None, Field(None, max_length=64,
                                          description=f"Accepted and ignored: {IGNORED_PARAMETERS['input_fidelity']}.")),
        strength=(float | None, Field(None, gt=0.0, le=1.0, description=(
            "How far to move from the image (extension): 0 keeps it, 1 redraws it; default: the pipeline's."))),
    )


_CODES = {
    "extra_forbidden": "unknown_parameter",
    "missing": "missing_required_parameter",
}


def parse_request(model: type[BaseModel], body: bytes | dict[str, Any]) -> BaseModel:
    """Parse and validate a JSON body (or a dict of form fields); the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate(body) if isinstance(body, dict) else model.model_validate_json(body)
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
    problem = settings.size_problem(width, height, multiple=multiple)
    if problem:
        raise ApiError(400, f"size: {problem} (got {text!r})", param="size", code="invalid_size")
    return width, height

