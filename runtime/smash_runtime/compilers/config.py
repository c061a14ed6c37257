"""Compiler and warm-up settings: the ``[runtime.compiler]`` and ``[runtime.warmup]`` tables.

    >>> cfg = compiler_config_from_dict({"name": "torch_compile", "mode": "max-autotune-no-cudagraphs"})
    >>> cfg
    TorchCompileConfig(mode='max-autotune-no-cudagraphs', fullgraph=False, dynamic=None, scope='blocks')
    >>> config_to_dict(cfg)["name"]
    'torch_compile'

Errors are :class:`~smash_runtime.errors.SettingsError` with keys relative to the table
(``mode``, ``shapes[0].height``); the manifest layer prefixes them with ``runtime.compiler``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from smash_runtime.errors import SettingsError, did_you_mean

TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SCOPES = ("blocks", "model")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise SettingsError(
            key,
            value,
            "one of " + ", ".join(repr(c) for c in choices),
            hint=did_you_mean(value, choices) if isinstance(value, str) else None,
        )


def _bool(key: str, value: Any, *, optional: bool = False) -> None:
    # TOML has real booleans; 0/1 or "true" are more likely typos than intent.
    if isinstance(value, bool) or (optional and value is None):
        return
    raise SettingsError(key, value, "true or false" + (" (or absent: let torch decide)" if optional else ""))


@dataclass(frozen=True)
class TorchCompileConfig:
    """``torch.compile`` with inductor.

    ``scope = "blocks"`` compiles each repeated transformer/UNet block on its own (regional
    compilation: one graph per block class, compiled once and reused by every instance), which
    compiles many times faster than ``"model"`` (the whole denoiser as one graph) and lets cache
    hooks wrap the compiled blocks without recompiling.
    """

    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool | None = None
    scope: str = "blocks"

    name: ClassVar[str] = "torch_compile"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, TORCH_COMPILE_MODES)
        _bool("fullgraph", self.fullgraph)
        _bool("dynamic", self.dynamic, optional=True)
        _choice("scope", self.scope, SCOPES)


@dataclass(frozen=True)
class StableFastConfig:
    """stable-fast (``sfast``): traces the UNet with TorchScript and fuses it; CUDA only.

    ``triton`` and ``xformers`` enable stable-fast's kernels from those packages; ``cuda_graph``
    captures each shape in a CUDA graph (fastest, but one graph per warm-up shape).
    """

    cuda_graph: bool = False
    triton: bool = True
    xformers: bool = False

    name: ClassVar[str] = "stable_fast"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _bool(f.name, getattr(self, f.name))


CompilerConfig = Union[TorchCompileConfig, StableFastConfig]
COMPILERS: dict[str, type] = {c.name: c for c in (TorchCompileConfig, StableFastConfig)}


def _check_keys(d: Mapping, allowed: list[str], where: str, prefix: str = "") -> None:
    for key in d:
        if key not in allowed:
            raise SettingsError(
                f"{prefix}{key}",
                d[key],
                f"not a setting of {where}; allowed: " + ", ".join(allowed),
                hint=did_you_mean(key, allowed),
            )


def compiler_config_from_dict(d: Mapping[str, Any]) -> CompilerConfig:
    """Validate a ``[runtime.compiler]`` table (``name`` plus that compiler's settings).

        >>> compiler_config_from_dict({"name": "torch_compile", "scope": "model"}).scope
        'model'
        >>> compiler_config_from_dict({"name": "torch_compile", "mdoe": "default"})
        Traceback (most recent call last):
        smash_runtime.errors.SettingsError: mdoe = 'default': not a setting of torch_compile; ...
    """
    if not isinstance(d, Mapping):
        raise SettingsError("", d, "a table such as {name = \"torch_compile\"}")
    name = d.get("name")
    if name is None:
        raise SettingsError("name", None, "required: one of " + ", ".join(repr(n) for n in COMPILERS))
    _choice("name", name, tuple(COMPILERS))
    cls = COMPILERS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    _check_keys(d, ["name", *fields], name)
    return cls(**{k: v for k, v in d.items() if k != "name"})


def config_to_dict(cfg: CompilerConfig | WarmupConfig) -> dict:
    """The normalized, JSON-serializable form (every setting spelled out), as recorded in smash.json.

    ``compiler_config_from_dict(config_to_dict(cfg)) == cfg`` (likewise for warm-up configs).
    """
    if isinstance(cfg, WarmupConfig):
        return {"shapes": [dataclasses.asdict(s) for s in cfg.shapes]}
    if not isinstance(cfg, tuple(COMPILERS.values())):
        raise TypeError(f"not a compiler or warm-up config: {cfg!r}")
    return {"name": cfg.name, **dataclasses.asdict(cfg)}


@dataclass(frozen=True)
class WarmupShape:
    """One request shape to compile ahead of serving."""

    height: int
    width: int
    steps: int
    batch: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f.name, value, "a positive integer")
        for side in ("height", "width"):
            value = getattr(self, side)
            # Latents are 1/8 of the image and FLUX packs 2x2 latent patches: 16 keeps every model happy.
            if value % 16:
                low = value // 16 * 16
                hint = f"try {low + 16}" if low == 0 else f"try {low} or {low + 16}"
                raise SettingsError(side, value, "a multiple of 16", hint=hint)


@dataclass(frozen=True)
class WarmupConfig:
    """``[runtime.warmup]``: the shapes :func:`~smash_runtime.compilers.warm_up` runs once each."""

    shapes: tuple[WarmupShape, ...] = ()


def warmup_config_from_dict(d: Mapping[str, Any] | None) -> WarmupConfig:
    """Validate a ``[runtime.warmup]`` table.

        >>> warmup_config_from_dict({"shapes": [{"height": 1024, "width": 1024, "steps": 28}]}).shapes[0].batch
        1
    """
    if d is None:
        return WarmupConfig()
    if not isinstance(d, Mapping):
        raise SettingsError("", d, "a table such as {shapes = [{height = 1024, width = 1024, steps = 28}]}")
    _check_keys(d, ["shapes"], "runtime.warmup")
    shapes = d.get("shapes", [])
    if not isinstance(shapes, (list, tuple)):
        raise SettingsError("shapes", shapes, "a list of {height, width, steps, batch = 1} tables")
    allowed = [f.name for f in dataclasses.fields(WarmupShape)]
    out = []
    for i, shape in enumerate(shapes):
        where = f"shapes[{i}]"
        if not isinstance(shape, Mapping):
            raise SettingsError(where, shape, "a table {height, width, steps, batch = 1}")
        _check_keys(shape, allowed, "a warm-up shape", prefix=f"{where}.")
        missing = [k for k in ("height", "width", "steps") if k not in shape]
        if missing:
            raise SettingsError(f"{where}.{missing[0]}", None, "required: a positive integer")
        try:
            out.append(WarmupShape(**shape))
        except SettingsError as e:
            raise e.with_prefix(where) from None
    return WarmupConfig(tuple(out))
