"""Precompiled block forwards: a warm restart runs stored compiled code, with no dynamo tracing.

With a plain ``torch.compile`` and a filled inductor cache, every new process still re-traces
each block class with dynamo, rebuilds its guards and looks its graph up in the FX graph cache;
on this project's CPU machine that is most of the first call of a warm start. Here each block
class is compiled once per input signature with dynamo's ahead-of-time entry point
(``torch.compile(...).aot_compile``), which returns the guards and the inductor code as one
serializable function. It is saved in the compile cache's keyed folder; a later process
deserializes it (no tracing, no guard building, no FX graph lookups) and calls it directly::

    <cache entry>/precompiled/
      FluxTransformerBlock/
        5d1c.../                  sha256 of the block's module structure, shortened
          a4b2...-6ae4...-9f0e41d2a7c3.pt2   one AOTInductor package: call layout, thread state, own sha
          a4b2...-9f0e41d2a7c3.bin           or one dynamo variant (guards + code): call layout, own sha

For inference calls (grad off) with a stored cache, a variant is an AOTInductor package
(``aoti.py``): the class's forward exported with the block's weights as inputs and compiled into
one shared library. Loading it opens that library, nothing more; a dynamo variant's Python wrapper
imports inductor's codegen modules and locates its kernels one by one, ~1 s more on the 2-core CPU
for tiny-flux (docs/benchmarks.md). The cold process loads the package it wrote back from disk
and runs it, so a warm process runs the same code; the package's sha256 (in its name) is checked
before its library is opened. A package has no guards: the call layout and block layout below
stand for them, and the thread state it bakes in (grad mode, autocast, torch function/dispatch
modes) is in its name. Calls with grad on, ``dynamic=True``, CUDA-graph modes, an in-memory store,
or a block that cannot be exported get a dynamo variant, the format described next.

The function is compiled from the *class's* ``forward`` with the block passed as ``self``, so
one compiled variant serves every sibling block (the weights are graph inputs). The guards
dynamo cannot serialize (object identities: module, function and class matches) and the tensor
guards (they pin dispatch keys that depend on inference mode) are dropped; what they protected is
checked here instead, before a variant is used: the block's class, its submodule types and
attention processors, their plain attributes (heads, eps, flags), its weights' layout, and the
call's layout (each tensor's shape, strides, dtype, device and requires_grad, and a quantized
weight's type, parts and metadata; ``None`` and constants by value). The grad mode, the
weights' types and torchao's subclass metadata stay in the variant's own guards. Weights that are
torchao tensor subclasses (int8wo, int8dq) are precompiled too: while a variant is made, torchao
gets the one op guard serialization needs (see ``_meta_empty_like``).

A block whose forward dynamo cannot capture whole (a graph break) or whose compiled function
cannot be serialized falls back to a plain ``torch.compile`` of its forward, with a log line:
slower to restart, never wrong. The stored files are pickles that run code when loaded: the
compile cache must be as trusted as the runtime's own installation (it is made by
``smash-run --precompile`` on the serving machine or baked into its image), never taken from an
artifact.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..settings import TorchCompileConfig
from .aoti import PACKAGE_SUFFIX, export_package, global_state, load_package, unsupported_reason

logger = logging.getLogger(__name__)

VARIANT_SUFFIX = ".bin"


def _unserializable_guard_types() -> frozenset[str]:
    from torch._dynamo.guards import CheckFunctionManager

    return frozenset(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)


def _portable_guards(entries) -> list[bool]:
    # Identity guards cannot outlive the process; block_layout/call_layout check what they did.
    # Tensor guards also pin each tensor's dispatch keys as seen under the thread's state when the
    # guards are built: a variant loaded outside inference mode but called inside it (as requests
    # run) would fail them on every weight, and a tensor made before inference mode (a cache hook's
    # stored residual) differs from one made in it. So no tensor guard is kept: call_layout checks
    # the call's tensors and block_layout the block's weights (shape, strides, dtype, device,
    # requires_grad, tensor type and a quantized weight's parts). The grad mode stays guarded
    # (GLOBAL_STATE), and so do the types and subclass metadata of the weights.
    dropped = _unserializable_guard_types()
    return [
        not ({e.guard_type, *(e.derived_guard_types or ())} & dropped) and e.guard_type != "TENSOR_MATCH"
        for e in entries
    ]


def block_layout(block: torch.nn.Module) -> str:
    """What the dropped guards stood for: class, submodule types, attention processors, weights.

        >>> block_layout(pipe.transformer.transformer_blocks[0]) == block_layout(pipe.transformer.transformer_blocks[1])
        True
    """
    parts = [f"{type(block).__module__}.{type(block).__qualname__}"]
    for name, module in block.named_modules():
        processor = getattr(module, "processor", None)
        kind = f"{type(processor).__module__}.{type(processor).__qualname__}" if processor is not None else ""
        # Plain attributes (heads, eps, flags, training) are constants of the compiled code.
        parts.append(f"{name}:{type(module).__qualname__}:{kind}:{_constants(module)}:{_constants(processor)}")
    for name, tensor in (*block.named_parameters(), *block.named_buffers()):
        parts.append(f"{name}={call_layout(tensor)!r}")
    return "\n".join(parts)


_CONSTANT_TYPES = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _constants(obj: Any) -> str:
    # Attributes of constant types (and tuples of them), as dynamo's constant guards would see them.
    if obj is None:
        return ""
    values = {
        key: value for key, value in vars(obj).items()
        if key not in _WRAPPER_ATTRS and (isinstance(value, _CONSTANT_TYPES) or (
            isinstance(value, tuple) and all(isinstance(v, _CONSTANT_TYPES) for v in value)))
    }
    return repr(sorted(values.items()))


def call_layout(value: Any) -> Any:
    """The structure of a call's arguments: tensors by shape, strides, dtype, device; constants by value.

    A tensor subclass (a torchao-quantized weight) adds its type, its inner tensors and its metadata.
    """
    if isinstance(value, torch.Tensor):
        layout = ("T", tuple(value.shape), value.stride(), str(value.dtype), str(value.device), value.requires_grad)
        if type(value) in (torch.Tensor, torch.nn.Parameter):
            return layout
        if not hasattr(value, "__tensor_flatten__"):
            return (*layout, type(value).__qualname__)
        inner, meta = value.__tensor_flatten__()
        parts = tuple((attr, call_layout(getattr(value, attr))) for attr in inner)
        return (*layout, f"{type(value).__module__}.{type(value).__qualname__}", parts, repr(meta))
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(call_layout(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((str(k), call_layout(v)) for k, v in value.items()))
    return f"<{type(value).__qualname__}>"  # other objects: same type only (as dynamo's TYPE_MATCH)


def _short_sha(text: str | bytes, n: int = 16) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:n]


@dataclass
class PrecompiledStore:
    """Compiled block variants in ``folder`` (``None``: compile in memory, keep nothing on disk).

        >>> store = PrecompiledStore(Path("/var/cache/smash/3f9c.../precompiled"), TorchCompileConfig())
        >>> store.wrap(pipe.transformer.transformer_blocks[0])   # usually through apply_compiler
        >>> store.stats
        {'loaded': 2, 'compiled': 0, 'saved': 0, 'fallback': 0, 'ignored': 0}
    """

    folder: Path | None
    cfg: TorchCompileConfig
    stats: dict[str, int] = field(
        default_factory=lambda: {"loaded": 0, "compiled": 0, "saved": 0, "fallback": 0, "ignored": 0}
    )
    # (class, block layout, call layout) -> compiled variants, loaded from disk or compiled here.
    _variants: dict[tuple[type, str, str], list[Any]] = field(default_factory=dict, repr=False)
    _loaded: set[tuple[type, str]] = field(default_factory=set, repr=False)
    _broken: set[type] = field(default_factory=set, repr=False)
    _unpackaged: set[type] = field(default_factory=set, repr=False)  # AOTInductor failed: dynamo variants

    def wrap(self, block: torch.nn.Module) -> PrecompiledForward:
        """Replace ``block.forward`` with a :class:`PrecompiledForward`; loads stored variants now."""
        forward = PrecompiledForward(self, block)
        self._load(type(block), forward.layout)
        block.forward = forward
        return forward

    def _dir(self, cls: type, layout: str) -> Path | None:
        return None if self.folder is None else self.folder / cls.__qualname__ / layout

    def _load(self, cls: type, layout: str) -> None:
        # Siblings share the class and layout: the folder is read once for all of them.
        if (cls, layout) in self._loaded:
            return
        self._loaded.add((cls, layout))
        folder = self._dir(cls, layout)
        if folder is None or not folder.is_dir():
            return
        # Dot-files are another process's package still being written.
        paths = sorted(p for p in folder.iterdir()
                       if p.suffix in (VARIANT_SUFFIX, PACKAGE_SUFFIX) and not p.name.startswith("."))
        for path in paths:
            call = path.name.split("-", 1)[0]
            try:
                with _trusted_cpu_isa():
                    variant = _load_package(path) if path.suffix == PACKAGE_SUFFIX else _load_variant(path, cls)
            except Exception as e:  # another torch's format, a damaged file: compile again instead
                self.stats["ignored"] += 1
                logger.warning("ignoring precompiled %s: %s: %s", path, type(e).__name__, str(e)[:200])
                continue
            self._variants.setdefault((cls, layout, call), []).append(variant)
            self.stats["loaded"] += 1
        logger.info("precompiled %s: %d variant(s) from %s", cls.__qualname__, len(paths), folder)

    def find(self, block: torch.nn.Module, layout: str, call: str, args: tuple, kwargs: dict) -> Callable | None:
        """The stored variant whose guards accept this call, or None."""
        for variant in self._variants.get((type(block), layout, call), ()):
            if variant.guard_check(block, *args, **kwargs):
                return variant.fn
        return None

    def compile(self, block: torch.nn.Module, layout: str, call: str, args: tuple, kwargs: dict) -> Callable | None:
        """Compile a variant for this call (and store it); None when the block cannot be precompiled."""
        cls = type(block)
        if cls in self._broken:
            return None
        variants = self._variants.setdefault((cls, layout, call), [])
        if len(variants) >= torch._dynamo.config.recompile_limit:
            logger.warning("%s: %d precompiled variants already (recompile_limit); this shape runs a plain "
                           "torch.compile", cls.__qualname__, len(variants))
            return None
        package = self._package(block, layout, call, args, kwargs)
        if package is not None:
            variants.append(package)
            self.stats["compiled"] += 1
            self.stats["saved"] += 1
            return package.fn
        options = {**_mode_options(self.cfg), "guard_filter_fn": _portable_guards}
        with _meta_empty_like(block):
            try:
                compiled = torch.compile(cls.forward, fullgraph=True, dynamic=self.cfg.dynamic, options=options)
                with _without_wrappers(block), _trusted_cpu_isa():
                    variant = compiled.aot_compile(((block, *args), kwargs))
            except Exception as e:  # graph breaks, unsupported guards or modes: today's lazy compile still works
                self._broken.add(cls)
                logger.warning("cannot precompile %s (%s: %s); it uses a plain torch.compile, which re-traces at "
                               "every start", cls.__qualname__, type(e).__name__, str(e).splitlines()[0][:200])
                return None
            variants.append(variant)
            self.stats["compiled"] += 1
            self._save(cls, layout, call, variant)
        return variant.fn

    def _package(
        self, block: torch.nn.Module, layout: str, call: str, args: tuple, kwargs: dict
    ) -> PackageVariant | None:
        """An AOTInductor package for this call, stored and loaded back; None: use a dynamo variant."""
        cls, folder = type(block), self._dir(type(block), layout)
        options = _mode_options(self.cfg)
        # Only stored packages (the cold process runs the very file a warm one will load), and only
        # for inference: a package computes no gradients.
        if (folder is None or cls in self._unpackaged or self.cfg.dynamic or torch.is_grad_enabled()
                or unsupported_reason(options)):
            return None
        state = _short_sha(global_state(), 8)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path = folder / f".{call}-{state}.{os.getpid()}{PACKAGE_SUFFIX}"
        try:
            with _trusted_cpu_isa():
                export_package(block, args, kwargs, tmp, options)
                path = folder / f"{call}-{state}-{_short_sha(tmp.read_bytes(), 12)}{PACKAGE_SUFFIX}"
                os.replace(tmp, path)  # replicas filling one volume never see half a file
                return _load_package(path)
        except Exception as e:  # export or AOTInductor cannot take this block: dynamo's aot_compile can
            self._unpackaged.add(cls)
            tmp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)  # a package this process cannot load: no later one should try
            logger.warning("cannot make an AOTInductor package of %s (%s: %s); it is precompiled with dynamo "
                           "instead (its warm start imports more of inductor)", cls.__qualname__,
                           type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return None

    def _save(self, cls: type, layout: str, call: str, variant: Any) -> None:
        folder = self._dir(cls, layout)
        if folder is None:
            return
        try:
            data = type(variant).serialize(variant).serialized_data
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{call}-{_short_sha(data, 12)}{VARIANT_SUFFIX}"
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # replicas filling one volume never see half a file
        except Exception as e:
            logger.warning("precompiled %s not saved to %s (%s: %s): the next start compiles it again",
                           cls.__qualname__, folder, type(e).__name__, str(e)[:200])
            return
        self.stats["saved"] += 1


@dataclass
class PackageVariant:
    """A loaded AOTInductor package, with the interface of a dynamo variant (``guard_check``, ``fn``).

    The package has no guards of its own; the thread state it was made under is part of its file
    name (block and call layout are the folder and the name's first part, checked by the caller).
    """

    fn: Callable[..., Any]
    state: str

    def guard_check(self, block: torch.nn.Module, *args, **kwargs) -> bool:
        return _short_sha(global_state(), 8) == self.state


def _load_package(path: Path) -> PackageVariant:
    # Name: <call layout>-<thread state>-<sha256 of the file, 12 hex>.pt2. A damaged or swapped file
    # is refused here, before its library is opened.
    _call, state, sha = path.stem.split("-")
    if _short_sha(path.read_bytes(), 12) != sha:
        raise ValueError(f"sha256 of {path.name} does not start with {sha}: the file was changed or damaged")
    return PackageVariant(load_package(path), state)


def _load_variant(path: Path, cls: type) -> Any:
    with path.open("rb") as f:
        return torch.compiler.load_compiled_function(f, f_globals=cls.forward.__globals__)


_WRAPPER_ATTRS = ("forward", "_diffusers_hook")


def _trusted_cpu_isa():
    # Before loading C++ kernels, inductor proves each vector ISA the CPU flags list by building
    # a probe and dlopen-ing it in a new Python process: half of a warm start's load on the
    # 2-core machine. The flags are trusted instead; the cache key already pins the ISA, and a
    # compile that fails anyway falls back to a plain torch.compile (which probes).
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"cpp.vec_isa_ok": True})


@contextmanager
def _meta_empty_like(block: torch.nn.Module):
    """Let dynamo store the guards on a block's torchao-quantized weights while a variant is made.

    Dynamo pickles each guarded weight as a meta-device copy (``torch.empty_like(w, device="meta")``),
    which torchao's tensor subclasses (``Int8Tensor`` of int8wo/int8dq, ...) do not implement. For
    as long as a variant is compiled and saved, each such subclass found in ``block`` gets one in
    torchao's own op table: the same subclass around meta copies of its inner tensors. Loading a
    variant does not need it (it rebuilds the weights' metadata with ``__tensor_unflatten__``), and
    the entry is removed afterwards, so torchao behaves as shipped everywhere else.
    """
    empty_like = torch.ops.aten.empty_like.default
    added: list[type] = []
    try:
        for cls in _torchao_subclasses(block):
            if empty_like not in getattr(cls, "_ATEN_OP_TABLE", {}).get(cls, {}):
                cls.implements(empty_like)(_empty_like_on_meta)
                added.append(cls)
        yield
    finally:
        for cls in added:
            cls._ATEN_OP_TABLE[cls].pop(empty_like, None)


def _torchao_subclasses(block: torch.nn.Module) -> set[type]:
    subclasses = {type(t) for t in (*block.parameters(), *block.buffers())} - {torch.Tensor, torch.nn.Parameter}
    if not subclasses:
        return set()
    from torchao.utils import TorchAOBaseTensor

    return {cls for cls in subclasses if issubclass(cls, TorchAOBaseTensor)}


def _empty_like_on_meta(func, types, args, kwargs):
    # Only what guard serialization asks for; anything else fails as torchao's own dispatch would.
    weight = args[0]
    if torch.device(kwargs.get("device") or weight.device).type != "meta":
        raise NotImplementedError(f"{type(weight).__name__}: empty_like is provided for device='meta' only")
    return weight._apply_fn_to_data(lambda inner: func(inner, *args[1:], **kwargs))


@contextmanager
def _without_wrappers(block: torch.nn.Module):
    # Dynamo pickles the block's __dict__ into the guards: leave out our dispatcher and the cache
    # hooks around it (they wrap the block from outside and are not part of what is compiled).
    saved = {name: block.__dict__.pop(name) for name in _WRAPPER_ATTRS if name in block.__dict__}
    try:
        yield
    finally:
        block.__dict__.update(saved)


def hooked_submodules(block: torch.nn.Module) -> list[str]:
    """Submodules whose forward is wrapped (diffusers or torch hooks): their logic would be traced in."""
    return [
        name for name, module in block.named_modules() if name and (
            "forward" in module.__dict__ or "_diffusers_hook" in module.__dict__
            or module._forward_hooks or module._forward_pre_hooks
        )
    ]


def _mode_options(cfg: TorchCompileConfig) -> dict[str, Any]:
    # torch.compile takes either mode or options; guard_filter_fn is an option, so spell the mode out.
    from torch._inductor import list_mode_options

    return dict(list_mode_options(cfg.mode, cfg.dynamic))


class PrecompiledForward:
    """A block's ``forward``: a stored variant if one fits, else compiled now (and stored).

    Cache hooks registered later wrap this object from outside, as they wrap a compiled forward.
    """

    def __init__(self, store: PrecompiledStore, block: torch.nn.Module):
        self.store = store
        self.block = block
        self.original = block.forward  # the bound eager forward, for the fallback
        self.layout = _short_sha(block_layout(block))
        self._fallback: Callable | None = None

    def __call__(self, *args, **kwargs):
        block, store = self.block, self.store
        fn = None
        # A hook inside the block (an attention cache) would be traced into the graph with its state
        # while the guards on that state cannot be stored: such blocks keep a plain torch.compile.
        if not hooked_submodules(block):
            call = _short_sha(repr(call_layout((args, kwargs))), 8)
            fn = store.find(block, self.layout, call, args, kwargs) or store.compile(block, self.layout, call, args, kwargs)
        if fn is not None:
            return fn(block, *args, **kwargs)
        if self._fallback is None:
            store.stats["fallback"] += 1
            cfg = store.cfg
            self._fallback = torch.compile(self.original, mode=cfg.mode, fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)
        return self._fallback(*args, **kwargs)
