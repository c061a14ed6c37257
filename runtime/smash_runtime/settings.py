"""The runtime settings, typed once: ``[runtime.cacher]``, ``[runtime.compiler]``, ``[runtime.warmup]``.

These pydantic models are the one definition of every runtime setting: its type, bounds, default
and description. The manifest validates against them, ``smash.json`` records their normalized
form, the runtime rebuilds them at load, and ``smash-build schema`` prints the JSON Schema they
generate. The module is torch-free (validating a manifest never imports torch or diffusers)::

    >>> from smash_runtime.settings import cacher_from_dict, settings_to_dict
    >>> cfg = cacher_from_dict({"name": "fora", "interval": 2})
    >>> cfg.interval, cfg.family, settings_to_dict(cfg)
    (2, 'dit', {'name': 'fora', 'interval': 2, 'start_step': 2})
    >>> cacher_from_dict({"name": "fora", "intervall": 2})
    Traceback (most recent call last):
    smash_runtime.errors.SettingsError: intervall = 2: not a setting of cacher 'fora'; ... (did you mean 'interval'?)

Errors are :class:`~smash_runtime.errors.SettingsError` with keys relative to the table
(``interval``, ``shapes[0].height``); ``error.errors`` holds every problem found, for the
manifest layer to prefix with ``runtime.cacher`` and list.

Adding a cacher: subclass :class:`CacherSettings` here (its fields and class facts), add it to
``CACHER_SETTINGS``, and write its hooks in ``smash_runtime/cachers/<name>.py``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Union

from annotated_types import Ge, Le, MultipleOf
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from pydantic.fields import FieldInfo

from .errors import KeyProblem, SettingsError, did_you_mean

__all__ = [
    "CACHER_SETTINGS",
    "COMPILER_SETTINGS",
    "MAX_BATCH",
    "MAX_SIDE",
    "MAX_STEPS",
    "QUANTIZE_METHODS",
    "QuantizeMethod",
    "SCOPES",
    "SIDE_MULTIPLE",
    "TORCH_COMPILE_MODES",
    "CacherSettings",
    "CompilerSettings",
    "DeepCacheConfig",
    "FasterCacheConfig",
    "FirstBlockConfig",
    "ForaConfig",
    "MagCacheConfig",
    "PABConfig",
    "Settings",
    "StableFastConfig",
    "TaylorSeerConfig",
    "TorchCompileConfig",
    "WarmupConfig",
    "WarmupShape",
    "cacher_from_dict",
    "check_cacher_compatibility",
    "compiler_from_dict",
    "family_cachers",
    "runtime_json_schemas",
    "settings_to_dict",
    "warmup_from_dict",
]

# Ceilings of a generated image, shared by the manifest, smash.json and the server (which may be
# configured lower, never higher): a warm-up shape or request beyond them is refused everywhere.
MAX_SIDE = 4096
"""Largest image height or width, in pixels."""
MAX_STEPS = 500
"""Largest number of denoising steps."""
MAX_BATCH = 16
"""Largest number of images generated in one call."""
SIDE_MULTIPLE = 16
"""Heights and widths are multiples of this: latents are 1/8 of the image and FLUX packs 2x2 patches."""

TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class QuantizeMethod:
    """A torchao quantization method the build can bake, and what its kernels need at load.

    ``cuda_capability``: the method's kernels exist only on CUDA GPUs of at least this compute
    capability (None: any device).
    """

    name: str
    description: str
    cuda_capability: tuple[int, int] | None = None

    def device_problem(self, device: str, capability: tuple[int, int] | None) -> str | None:
        """Why the stored weights cannot run on ``device`` (capability of a CUDA device), or None."""
        need = self.cuda_capability
        if need is None:
            return None
        if not device.startswith("cuda"):
            return f"needs a CUDA GPU with compute capability >= {need[0]}.{need[1]}; this load targets {device!r}"
        if capability is not None and tuple(capability) < need:
            return f"needs compute capability >= {need[0]}.{need[1]}; this GPU has {capability[0]}.{capability[1]}"
        return None


QUANTIZE_METHODS: dict[str, QuantizeMethod] = {
    m.name: m
    for m in (
        QuantizeMethod("int8dq", "int8 weights and dynamically quantized int8 activations"),
        QuantizeMethod("int8wo", "int8 weights, activations in the model dtype"),
        QuantizeMethod("int4wo", "int4 weights (tile-packed), CUDA kernels only", (8, 0)),
        QuantizeMethod("fp8wo", "float8 weights, activations in the model dtype"),
        QuantizeMethod("fp8dq", "float8 weights and activations (row-wise), needs Ada/Hopper kernels", (8, 9)),
    )
}
"""Every quantization method by name: the one table the manifest, the build and the loader read."""
SCOPES = ("blocks", "model")


class Allowed:
    """Field metadata: what a value must be, in words, where the type alone does not say it."""

    def __init__(self, text: str):
        self.text = text


class Missing:
    """Field metadata: what to say when a required key is absent (``"<key> is missing: <text>"``)."""

    def __init__(self, text: str):
        self.text = text


def finite_number(value: Any) -> float:
    # TOML integers are fine where a number is wanted; booleans and strings are typos.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("not a finite number")
    return float(value)


Number = Annotated[float, BeforeValidator(finite_number)]


def _window(lo: float, hi: float):
    def check(value: Any) -> tuple[float, float]:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError("not a pair")
        start, end = (finite_number(v) for v in value)
        if not lo <= start < end <= hi:
            raise ValueError("out of order or range")
        return (start, end)

    return Annotated[
        tuple[float, float],
        BeforeValidator(check),
        Allowed(f"a pair [start, end] of numbers with {lo} <= start < end <= {hi}"),
    ]


def _ratios(value: Any) -> Any:
    if value is None or value == "flux":
        return value
    if isinstance(value, (list, tuple)) and len(value) >= 2 and all(_positive(v) for v in value):
        return tuple(float(v) for v in value)
    raise ValueError("not flux or positive ratios")


def _positive(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


MAG_RATIOS_REQUIRED = (
    'required: "flux" for FLUX.1 checkpoints, or the per-step list measured by '
    "smash_runtime.cachers.calibrate_mag_ratios(pipe) on this checkpoint"
)


# --------------------------------------------------------------------------- base


class Settings(BaseModel):
    """A frozen, fully checked settings table: unknown keys, wrong types and out-of-range values
    raise :class:`SettingsError` (key relative to the table) at construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    where: ClassVar[str] = "this table"
    """How messages name the table (``cacher 'fora'``)."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise settings_error(e, type(self)) from None

    @classmethod
    def parse(cls, data: Any):
        """``data`` (a TOML/JSON table) validated into this model; raises SettingsError."""
        if not isinstance(data, Mapping):
            raise SettingsError("", data, f"a table for {cls.where}")
        return cls(**{str(k): v for k, v in data.items()})


def settings_to_dict(cfg: Settings) -> dict[str, Any]:
    """The normalized JSON-ready table recorded in ``smash.json`` (every default filled in, ``name`` first).

    ``type(cfg).parse(settings_to_dict(cfg)) == cfg``.
    """
    return cfg.model_dump(mode="json")


# --------------------------------------------------------------------------- error formatter


def settings_error(error: ValidationError, model: type[BaseModel]) -> SettingsError:
    """One SettingsError for a pydantic ValidationError (the first problem), carrying all in ``errors``."""
    problems: list[SettingsError] = []
    for item in error.errors(include_url=False):
        inner = (item.get("ctx") or {}).get("error")
        if isinstance(inner, SettingsError):
            # A nested model's own __init__ already described its problems: move them under loc.
            prefix = _key(tuple(item["loc"]))
            problems += [e.with_prefix(prefix) if prefix else e for e in getattr(inner, "errors", [inner])]
        else:
            problems.append(_problem(model, item))
    first = problems[0]
    first.errors = problems
    return first


def _problem(model: type[BaseModel], item: dict) -> SettingsError:
    loc = tuple(item["loc"])
    key = _key(loc)
    if item["type"] == "extra_forbidden":
        owner = _resolve(model, loc[:-1])
        owner = owner if isinstance(owner, type) and issubclass(owner, BaseModel) else model
        names = [name for name, f in owner.model_fields.items() if not f.exclude]
        return SettingsError(
            key, item["input"], f"not a setting of {owner.where}; allowed: " + ", ".join(names),
            hint=did_you_mean(str(loc[-1]), names),
        )
    target = _resolve(model, loc)
    if item["type"] == "missing":
        missing = next((m for m in _metadata(target) if isinstance(m, Missing)), None)
        if missing is not None:
            return KeyProblem(key, f" is missing: {missing.text}" if missing.text else " is missing")
        return SettingsError(key, None, "required: " + _allowed(target))
    value = item["input"]
    if item["type"] == "multiple_of":
        step = item["ctx"]["multiple_of"]
        low = value // step * step
        hint = f"try {low + step}" if low == 0 else f"try {low} or {low + step}"
        return SettingsError(key, value, f"a multiple of {step}", hint=hint)
    hint = None
    choices = _choices(target)
    if choices and isinstance(value, str):
        hint = did_you_mean(value, choices)
    return SettingsError(key, value, _allowed(target), hint=hint)


def _key(loc: tuple) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _resolve(model: type[BaseModel], loc: tuple) -> Any:
    """The FieldInfo (or item type) a pydantic error location points at."""
    current: Any = model
    for part in loc:
        annotation = current.annotation if isinstance(current, FieldInfo) else current
        annotation = _unwrap(annotation)
        if isinstance(part, int):
            args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
            current = args[0] if args else Any
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
            current = annotation.model_fields[part]
        else:
            return current
    return current


def _unwrap(annotation: Any) -> Any:
    # X | None -> X, Annotated[X, ...] -> X
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1:
                annotation = rest[0]
                continue
        return annotation


def _metadata(target: Any) -> list:
    if isinstance(target, FieldInfo):
        meta = list(target.metadata)
        annotation = target.annotation
    else:
        meta, annotation = [], target
    while True:
        if typing.get_origin(annotation) is Annotated:
            meta += list(annotation.__metadata__)
            annotation = typing.get_args(annotation)[0]
            continue
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (Union, types.UnionType) and len(rest) == 1:
            annotation = rest[0]
            continue
        break
    # Field(...) inside Annotated carries its bounds in its own metadata.
    for m in list(meta):
        if isinstance(m, FieldInfo):
            meta += list(m.metadata)
    return meta


def _choices(target: Any) -> tuple[str, ...]:
    annotation = _unwrap(target.annotation if isinstance(target, FieldInfo) else target)
    if typing.get_origin(annotation) is Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    return ()


def _allowed(target: Any) -> str:
    """What a field accepts, in words, from its type and bounds (the text every message uses)."""
    meta = _metadata(target)
    for m in meta:
        if isinstance(m, Allowed):
            return m.text
    optional = isinstance(target, FieldInfo) and target.default is None and not target.is_required()
    tail = ", or leave it out" if optional else ""
    annotation = _unwrap(target.annotation if isinstance(target, FieldInfo) else target)
    lo = next((m.ge for m in meta if isinstance(m, Ge)), None)
    hi = next((m.le for m in meta if isinstance(m, Le)), None)
    step = next((m.multiple_of for m in meta if isinstance(m, MultipleOf)), None)
    if annotation is bool:
        return "true or false" + tail
    if annotation is int:
        what = "an integer" if step is None else f"a multiple of {step}"
        if hi is None:
            return f"{what} >= {lo}{tail}" if lo is not None else what + tail
        return f"{what} from {lo} to {hi}{tail}"
    if annotation is float:
        if hi is None:
            return (f"a number >= {lo}" if lo is not None else "a number") + tail
        return f"a number from {lo} to {hi}{tail}"
    if _choices(target):
        return "one of " + ", ".join(_choices(target)) + tail
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        item = _unwrap(typing.get_args(annotation)[0])
        if isinstance(item, type) and issubclass(item, BaseModel):
            return f"a list of {_table_words(item)} tables"
        return "a list" + tail
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a table {_table_words(annotation)}"
    description = getattr(target, "description", None)
    return description or "a valid value"


def _table_words(model: type[BaseModel]) -> str:
    keys = [k if f.is_required() else f"{k} = {f.default!r}" for k, f in model.model_fields.items()]
    return "{" + ", ".join(keys) + "}"


# --------------------------------------------------------------------------- cachers


def _require_name(schema: dict[str, Any]) -> None:
    schema.setdefault("required", [])
    if "name" not in schema["required"]:
        schema["required"].insert(0, "name")


class CacherSettings(Settings):
    """A ``[runtime.cacher]`` table. Class facts say where a cacher applies.

    ``family`` is the pipeline family it hooks (``"dit"``: transformer blocks, ``"unet"``);
    ``attention_level`` says it hooks attention layers inside each block (so it cannot wrap
    blocks compiled with ``torch_compile``).
    """

    model_config = ConfigDict(json_schema_extra=_require_name)

    family: ClassVar[str] = "dit"
    attention_level: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "name" in cls.model_fields:
            cls.where = f"cacher {cls.model_fields['name'].default!r}"

    def hooks_attention(self) -> bool:
        """Whether this configuration hooks attention layers inside each block."""
        return self.attention_level


class _StepSchedule:
    """Full computation at steps ``< start_step`` and every ``interval`` steps after it (FORA, DeepCache)."""

    def computes_at(self, step: int) -> bool:
        """Whether denoising step ``step`` (0-based) runs the cached modules fully."""
        return step < self.start_step or (step - self.start_step) % self.interval == 0


class ForaConfig(_StepSchedule, CacherSettings):
    """``name = "fora"``: FORA, block output residuals reused between full steps (DiT)."""

    name: Literal["fora"] = Field("fora", repr=False)
    interval: StrictInt = Field(3, ge=1, le=6, description="full block computation every `interval` steps; 1 = no caching")
    start_step: StrictInt = Field(2, ge=0, description="steps before this one always run fully")


class DeepCacheConfig(_StepSchedule, CacherSettings):
    """``name = "deepcache"``: DeepCache, deep UNet features reused while the shallow branch runs."""

    family: ClassVar[str] = "unet"
    name: Literal["deepcache"] = Field("deepcache", repr=False)
    interval: StrictInt = Field(3, ge=1, le=10, description="full UNet every `interval` steps; 1 = no caching")
    branch: StrictInt = Field(
        0, ge=0, description="skip depth: down blocks 0..branch (and their up blocks) run every step"
    )
    start_step: StrictInt = Field(0, ge=0, description="steps before this one always run the full UNet")
    layer: StrictInt | None = Field(
        None, ge=0,
        description="cache inside down_blocks[branch] after this layer (and the mirroring up layers); absent: whole blocks",
    )


AttentionInterval = Annotated[
    StrictInt, Field(ge=1, le=6, description="attention recomputed every `interval` steps inside the window; 1 = no caching")
]


class PABConfig(CacherSettings):
    """``name = "pab"``: Pyramid Attention Broadcast (arXiv:2408.12588), attention outputs reused."""

    attention_level: ClassVar[bool] = True
    name: Literal["pab"] = Field("pab", repr=False)
    interval: AttentionInterval = 2
    timestep_range: _window(-1, 1000) = Field((100.0, 800.0), description="timesteps (0-1000) where reuse is allowed")


class FasterCacheConfig(CacherSettings):
    """``name = "fastercache"``: FasterCache (arXiv:2410.19355) attention extrapolation, per branch."""

    attention_level: ClassVar[bool] = True
    name: Literal["fastercache"] = Field("fastercache", repr=False)
    interval: AttentionInterval = 2
    # diffusers' hook approximates from a cache it only fills on a computed step: the first step
    # (t = 1000) must lie outside the window, hence end <= 999.
    timestep_range: _window(-1, 999) = Field(
        (-1.0, 681.0), description="timesteps (0-999) where the approximation is allowed"
    )
    attention_weight: Number = Field(
        0.5, ge=0.0, le=1.0, description="extrapolation weight: out_t + w * (out_t - out_t-2)"
    )


class FirstBlockConfig(CacherSettings):
    """``name = "first_block"``: First Block Cache (ParaAttention): skip the rest when block 0 barely changed."""

    name: Literal["first_block"] = Field("first_block", repr=False)
    # ParaAttention's FLUX examples use 0.08-0.12; 0 never skips.
    threshold: Number = Field(
        0.08, ge=0.0, le=1.0, description="relative change of block 0's residual below which the rest is reused"
    )


class TaylorSeerConfig(CacherSettings):
    """``name = "taylorseer"``: TaylorSeer (arXiv:2503.06923), Taylor-extrapolated features."""

    attention_level: ClassVar[bool] = True
    name: Literal["taylorseer"] = Field("taylorseer", repr=False)
    interval: StrictInt = Field(
        5, ge=1, le=10, description="full computation every `interval` steps after warm-up; 1 = no caching"
    )
    start_step: StrictInt = Field(
        3, ge=0, description="warm-up steps that always compute (they seed the Taylor factors)"
    )
    stop_step: StrictInt | None = Field(None, ge=0, description="steps from this one on always compute (absent: none)")
    order: StrictInt = Field(1, ge=1, le=4, description="highest Taylor order")
    lite: StrictBool = Field(
        False,
        description="false: predict each attention output; true: skip whole blocks and predict proj_out "
        "(faster, coarser)",
    )

    def hooks_attention(self) -> bool:
        return not self.lite  # lite mode skips whole blocks instead


class MagCacheConfig(CacherSettings):
    """``name = "magcache"``: MagCache (arXiv:2506.14707), skips steps while residual magnitudes barely change.

    ``mag_ratios`` is checkpoint-dependent and has no honest default: ``"flux"`` for FLUX.1
    checkpoints, or the list ``calibrate_mag_ratios(pipe)`` measures (the builder can record it).
    """

    name: Literal["magcache"] = Field("magcache", repr=False)
    mag_ratios: Annotated[
        Literal["flux"] | tuple[float, ...] | None,
        BeforeValidator(_ratios),
        Allowed(
            '"flux" (diffusers\' FLUX.1 ratios) or a list of >= 2 positive per-step ratios '
            "(measure them with smash_runtime.cachers.calibrate_mag_ratios(pipe))"
        ),
    ] = Field(None, description="per-step residual magnitude ratios")
    threshold: Number = Field(0.06, ge=0.0, le=1.0, description="accumulated error allowed before a full step")
    max_skip_steps: StrictInt = Field(3, ge=0, le=20, description="most consecutive skipped steps; 0 = never skip")
    retention_ratio: Number = Field(0.2, ge=0.0, le=1.0, description="fraction of first steps never skipped")


CacherConfig = Union[
    ForaConfig, DeepCacheConfig, PABConfig, FasterCacheConfig, FirstBlockConfig, TaylorSeerConfig, MagCacheConfig
]
CACHER_SETTINGS: dict[str, type[CacherSettings]] = {
    cls.model_fields["name"].default: cls for cls in typing.get_args(CacherConfig)
}
"""Every cacher by name, in the order docs and messages list them."""


def family_cachers(family: str) -> tuple[str, ...]:
    """Names of the cachers that apply to a pipeline family (``"dit"`` or ``"unet"``)."""
    return tuple(name for name, cls in CACHER_SETTINGS.items() if cls.family == family)


# --------------------------------------------------------------------------- compilers


class CompilerSettings(Settings):
    """A ``[runtime.compiler]`` table. ``devices`` lists the device types it runs on."""

    model_config = ConfigDict(json_schema_extra=_require_name)

    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "name" in cls.model_fields:
            cls.where = cls.model_fields["name"].default


class TorchCompileConfig(CompilerSettings):
    """``torch.compile`` with inductor.

    ``scope = "blocks"`` compiles each repeated transformer/UNet block on its own (regional
    compilation: one graph per block class, compiled once and reused by every instance), which
    compiles many times faster than ``"model"`` (the whole denoiser as one graph) and lets cache
    hooks wrap the compiled blocks without recompiling.
    """

    name: Literal["torch_compile"] = Field("torch_compile", repr=False)
    mode: Literal[TORCH_COMPILE_MODES] = Field("default", description="torch.compile mode")
    fullgraph: StrictBool = Field(False, description="fail instead of splitting the graph at unsupported code")
    dynamic: StrictBool | None = Field(None, description="dynamic shapes; absent: let torch decide")
    scope: Literal[SCOPES] = Field(
        "blocks", description="blocks: compile each repeated block (regional); model: the whole denoiser"
    )


class StableFastConfig(CompilerSettings):
    """stable-fast (``sfast``): traces the UNet with TorchScript and fuses it; CUDA only.

    ``triton`` and ``xformers`` enable stable-fast's kernels from those packages; ``cuda_graph``
    captures each shape in a CUDA graph (fastest, but one graph per warm-up shape).
    """

    devices: ClassVar[tuple[str, ...]] = ("cuda",)
    name: Literal["stable_fast"] = Field("stable_fast", repr=False)
    cuda_graph: StrictBool = Field(False, description="capture each warm-up shape in a CUDA graph")
    triton: StrictBool = Field(True, description="use stable-fast's Triton kernels")
    xformers: StrictBool = Field(False, description="use xformers attention")


CompilerConfig = Union[TorchCompileConfig, StableFastConfig]
COMPILER_SETTINGS: dict[str, type[CompilerSettings]] = {
    cls.model_fields["name"].default: cls for cls in typing.get_args(CompilerConfig)
}


# --------------------------------------------------------------------------- warm-up


class WarmupShape(Settings):
    """One request shape to compile ahead of serving (bounded by MAX_SIDE, MAX_STEPS, MAX_BATCH)."""

    where: ClassVar[str] = "a warm-up shape"
    height: StrictInt = Field(ge=SIDE_MULTIPLE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE, description="image height")
    width: StrictInt = Field(ge=SIDE_MULTIPLE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE, description="image width")
    steps: StrictInt = Field(ge=1, le=MAX_STEPS, description="denoising steps")
    batch: StrictInt = Field(1, ge=1, le=MAX_BATCH, description="images per call")


class WarmupConfig(Settings):
    """``[runtime.warmup]``: the shapes :func:`~smash_runtime.compilers.warm_up` runs once each."""

    where: ClassVar[str] = "runtime.warmup"
    shapes: tuple[WarmupShape, ...] = Field((), description="shapes compiled ahead when the runtime warms up")

    def __init__(self, *args: Any, **data: Any) -> None:
        if args:  # WarmupConfig(shapes), as callers write it
            (data["shapes"],) = args
        super().__init__(**data)


# --------------------------------------------------------------------------- parsing


def _by_name(kind: str, registry: Mapping[str, type[Settings]], data: Any, example: str) -> Settings:
    if not isinstance(data, Mapping):
        raise SettingsError("", data, f"a table such as {example}")
    name = data.get("name")
    names = ", ".join(registry)
    if name is None:
        raise SettingsError("name", None, f"required: one of {names}")
    if not isinstance(name, str) or name not in registry:
        hint = did_you_mean(name, registry) if isinstance(name, str) else None
        raise SettingsError("name", name, f"one of {names}", hint=hint)
    return registry[name].parse(data)


def cacher_from_dict(data: Any) -> CacherConfig:
    """Validate a ``[runtime.cacher]`` table (``name`` plus that cacher's settings), filling defaults.

        >>> cacher_from_dict({"name": "fora", "interval": 2})
        ForaConfig(interval=2, start_step=2)
    """
    cfg = _by_name("cacher", CACHER_SETTINGS, data, '{name = "fora", interval = 3}')
    if isinstance(cfg, MagCacheConfig) and cfg.mag_ratios is None:
        raise SettingsError("mag_ratios", None, MAG_RATIOS_REQUIRED)
    return cfg


def compiler_from_dict(data: Any) -> CompilerConfig:
    """Validate a ``[runtime.compiler]`` table.

        >>> compiler_from_dict({"name": "torch_compile", "scope": "model"}).scope
        'model'
    """
    return _by_name("compiler", COMPILER_SETTINGS, data, '{name = "torch_compile"}')


def warmup_from_dict(data: Any) -> WarmupConfig:
    """Validate a ``[runtime.warmup]`` table (None: no shapes).

        >>> warmup_from_dict({"shapes": [{"height": 1024, "width": 1024, "steps": 28}]}).shapes[0].batch
        1
    """
    if data is None:
        return WarmupConfig()
    if not isinstance(data, Mapping):
        raise SettingsError("", data, "a table such as {shapes = [{height = 1024, width = 1024, steps = 28}]}")
    return WarmupConfig.parse(data)


# --------------------------------------------------------------------------- cross-table rules


def _or_list(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def check_cacher_compatibility(
    cfg: CacherSettings, family: str, compiler: Mapping[str, Any] | CompilerSettings | None = None
) -> None:
    """The cacher x pipeline family x compiler table; raises ``SettingsError`` (key ``name``) saying what to use.

        >>> check_cacher_compatibility(DeepCacheConfig(), "dit")
        Traceback (most recent call last):
        smash_runtime.errors.SettingsError: name = 'deepcache': DeepCache needs a UNet; for DiT pipelines use fora, ...

    ``compiler`` is the ``[runtime.compiler]`` table or config (or None). Block-level cachers
    wrap each block's compiled ``forward`` and compose with ``torch_compile`` at
    ``scope = "blocks"``; whole-model compilation and stable-fast's tracing would freeze or
    recompile their schedule.
    """
    if family not in ("dit", "unet"):
        raise SettingsError("family", family, "'dit' or 'unet'")
    if cfg.family != family:
        if cfg.name == "deepcache":
            allowed = "DeepCache needs a UNet; for DiT pipelines use " + _or_list(family_cachers("dit"))
        else:
            allowed = f"{cfg.name} needs a transformer (DiT) pipeline; for UNet pipelines use " + _or_list(
                family_cachers("unet")
            )
        raise SettingsError("name", cfg.name, allowed)
    if not compiler:
        return
    if isinstance(compiler, Settings):
        compiler = settings_to_dict(compiler)
    compiler_name = compiler.get("name")
    if compiler_name == "stable_fast":
        raise SettingsError(
            "name",
            cfg.name,
            "stable_fast traces the whole denoiser once, which freezes the cacher's per-step choices; "
            'use [runtime.compiler] name = "torch_compile" with scope = "blocks", or no cacher',
        )
    if compiler_name == "torch_compile":
        if compiler.get("scope", "blocks") == "model":
            raise SettingsError(
                "name",
                cfg.name,
                "a whole-model torch.compile puts the cache hooks inside the graph (a recompile every step); "
                'use [runtime.compiler] scope = "blocks"',
            )
        if cfg.hooks_attention():
            raise SettingsError(
                "name",
                cfg.name,
                f"{cfg.name} hooks the attention layers inside each compiled block (a recompile every step); "
                "with torch_compile use fora, first_block, magcache or taylorseer with lite = true",
            )


# --------------------------------------------------------------------------- JSON Schema


def runtime_json_schemas(defs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """JSON Schemas of ``cacher``, ``compiler`` and ``warmup`` (as the manifest accepts them), from the models.

    Shared definitions go into ``defs`` (the caller's root ``$defs``).
    """
    from pydantic import TypeAdapter

    def generated(annotation: Any) -> dict[str, Any]:
        schema = TypeAdapter(annotation).json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        return schema

    def technique(registry: Mapping[str, type], union: Any) -> dict[str, Any]:
        # A table keyed on name, the name alone ("fora"), or "none".
        return {"anyOf": [{"enum": [*registry, "none"]}, generated(union)]}

    warmup = generated(WarmupConfig)
    warmup["description"] = WarmupConfig.model_fields["shapes"].description
    return {
        "cacher": technique(CACHER_SETTINGS, Annotated[CacherConfig, Field(discriminator="name")]),
        "compiler": technique(COMPILER_SETTINGS, Annotated[CompilerConfig, Field(discriminator="name")]),
        "warmup": warmup,
    }
