"""A compile cache that survives restarts: inductor's and triton's on-disk caches, in a keyed folder.

Compiled code is only valid for the exact torch/triton/diffusers/torchao build, device, compiler
settings and model it came from, so each such combination gets its own folder under ``root``::

    root/
      3f9c0e1a2b4d5e6f7a8b/       sha256 of the key, shortened
        key.json                  the key in full: what made this code (read back to check it)
        precompiled/              block forwards compiled ahead of time (see precompiled.py): a warm
                                  start loads them and neither traces nor looks up graphs
        inductor/                 TORCHINDUCTOR_CACHE_DIR: FX graph + AOTAutograd caches, C++/Python kernels
        triton/                   TRITON_CACHE_DIR: compiled GPU kernels

Activating a folder points both environment variables at it, so compiling the first time fills
it and every later process with the same key loads from it instead of compiling: precompiled
block forwards for ``scope = "blocks"``, inductor's FX graph cache for the rest. Copying inductor's folder is what pays: on this project's CPU machine it
saved ~90% of a cold compile, against ~20% for ``torch.compiler.save_cache_artifacts``.

``root`` can be a mounted volume or a folder baked into an image: a read-only entry is copied to
a temporary folder first. Entries made for another key (another torch, another GPU, an older
artifact) are ignored with a log line; a damaged or foreign entry under this key's own name is
moved aside (``NAME.ignored-...``) and rebuilt. None of them is ever an error.

    >>> cache = CompileCache("/var/cache/smash", artifact_hash=artifact_sha256("dist/flux"))
    >>> apply_compiler(pipe, cfg, cache=cache)          # activates the keyed folder
    >>> warm_up(pipe, warmup_cfg)                       # compiles (cold) or loads (warm)
    >>> cache.report()["hit"]
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..format import artifact_sha256
from ..settings import TorchCompileConfig
from .precompiled import PrecompiledStore

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
KEY_FILE = "key.json"
_ASIDE = ".ignored-"  # suffix of entries moved out of the way (see _replace_entry)
ENV_ROOT = "SMASH_COMPILE_CACHE"
PRECOMPILED = "precompiled"
_ENV_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# Counters that say compiled code came from disk rather than from a compiler.
_HIT_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("aot_autograd", "autograd_cache_hit"))
_MISS_COUNTERS = (("inductor", "fxgraph_cache_miss"), ("aot_autograd", "autograd_cache_miss"))


def default_cache_root() -> Path:
    """``$SMASH_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/smash/compile`` (``~/.cache/smash/compile``)."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smash" / "compile"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_identity(device: torch.device | str) -> dict[str, Any]:
    """What about ``device`` decides which compiled kernels run on it."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": f"{major}.{minor}",
            "cuda": torch.version.cuda,
        }
    if device.type == "cpu":
        # Inductor's C++ kernels are built for the vector ISA it detects (AVX2, AVX512, ...).
        return {"type": "cpu", "name": _cpu_name(), "isa": torch.backends.cpu.get_cpu_capability()}
    return {"type": device.type}


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {name: counters[group][name] for group, name in _HIT_COUNTERS + _MISS_COUNTERS}


def _has_entries(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


@dataclass
class CompileCache:
    """Keeps compiled code in ``root``, one folder per key (see the module docstring).

    ``artifact_hash`` identifies the model (``artifact_sha256(artifact_dir)``); the rest of the
    key (versions, device, compiler settings) is read when :meth:`activate` is called.
    """

    root: Path | str | None = field(default_factory=default_cache_root)
    artifact_hash: str = ""

    folder: Path | None = field(default=None, init=False)
    state: str = field(default="inactive", init=False)  # inactive | warm | cold | temporary
    _key: dict | None = field(default=None, init=False, repr=False)
    _start: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _saved_env: dict[str, str | None] | None = field(default=None, init=False, repr=False)
    _stores: list[PrecompiledStore] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root if self.root is not None else default_cache_root()).expanduser()

    # -- the key ---------------------------------------------------------------------------

    def key(self, compiler: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
        """Everything that invalidates compiled code, as a JSON-able dict (``compiler`` from ``config_to_dict``)."""
        return {
            "cache_format": CACHE_FORMAT,
            "artifact": self.artifact_hash,
            "compiler": dict(compiler),
            "device": device_identity(device),
            "torch": torch.__version__,
            "triton": _version("triton") or _version("pytorch-triton") or _version("triton-windows"),
            "diffusers": _version("diffusers"),
            # Quantized weights' kernels (torchao's linear dispatch) are traced into compiled code.
            "torchao": _version("torchao"),
            "python": "{}.{}".format(*sys.version_info[:2]),
        }

    @staticmethod
    def digest(key: Mapping[str, Any]) -> str:
        """Folder name of ``key``: the first 20 hex digits of the sha256 of its canonical JSON."""
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    def folder_for(self, key: Mapping[str, Any]) -> Path:
        return self.root / self.digest(key)

    # -- activation ------------------------------------------------------------------------

    def activate(self, compiler: Mapping[str, Any], device: torch.device | str) -> str:
        """Point inductor and triton at the folder for this key; returns the state.

        ``"warm"``: a matching entry with compiled code exists (expect hits). ``"cold"``: it will
        be filled now. ``"temporary"``: the root cannot be written, compiled code is not kept.
        Call before the first compiled call; activation is process-wide (environment variables).
        """
        key = self.key(compiler, device)
        folder = self.folder_for(key)
        state = self._check_entry(folder, key)
        if state == "ignored":
            self._log_other_entries(key)
            folder, state = self._replace_entry(folder, key)
        elif state == "cold":
            self._log_other_entries(key)
        if state == "warm" and not _writable(folder):
            # Inductor writes lock files and new entries next to what it reads.
            copy = Path(tempfile.mkdtemp(prefix="smash-compile-"))
            shutil.copytree(folder, copy, dirs_exist_ok=True)
            logger.info("compile cache %s is read-only: using a copy in %s", folder, copy)
            folder = copy
        if not self._point_at(folder, key):
            folder, state = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent, "temporary"
        self.folder, self.state, self._key = folder, state, key
        self._start = _counters()
        self._stores = []  # report() counts what happened since this activation
        logger.info("compile cache %s: %s", state, folder)
        return state

    def _check_entry(self, folder: Path, key: dict) -> str:
        if not folder.exists():
            return "cold"
        try:
            recorded = json.loads((folder / KEY_FILE).read_text())
        except (OSError, ValueError) as e:
            logger.warning("ignoring compile cache %s: unreadable %s (%s)", folder, KEY_FILE, e)
            return "ignored"
        if recorded != key:
            logger.warning(
                "ignoring compile cache %s: made for another setup (%s)", folder, _differences(recorded, key)
            )
            return "ignored"
        return "warm" if _has_entries(folder / "inductor") or _has_entries(folder / PRECOMPILED) else "cold"

    def _log_other_entries(self, key: dict) -> None:
        # Entries for other keys are normal (another GPU, an older torch): say why they don't apply.
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if entry.name == self.digest(key) or _ASIDE in entry.name or not (entry / KEY_FILE).is_file():
                continue
            try:
                recorded = json.loads((entry / KEY_FILE).read_text())
            except (OSError, ValueError):
                logger.info("ignoring compile cache %s: unreadable %s", entry, KEY_FILE)
                continue
            logger.info("ignoring compile cache %s: made for %s", entry, _differences(recorded, key))

    def _replace_entry(self, folder: Path, key: dict) -> tuple[Path, str]:
        # The keyed name holds something else. Move it aside rather than delete it (it is not
        # ours to judge), so the key gets a clean entry that later processes find warm.
        aside = folder.with_name(f"{folder.name}{_ASIDE}{os.getpid()}-{time.time_ns()}")
        try:
            folder.rename(aside)
        except OSError as e:
            logger.warning("cannot move %s aside (%s): compiling into a temporary folder", folder, e)
            temporary = Path(tempfile.mkdtemp(prefix=self.digest(key) + "."))
            self._write_key(temporary, key)
            return temporary, "temporary"
        logger.info("moved the ignored compile cache %s to %s", folder, aside)
        return folder, "cold"

    def _write_key(self, folder: Path, key: dict) -> None:
        # Atomic: replicas starting together on one volume must never read half a key.
        tmp = folder / f".{KEY_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, folder / KEY_FILE)

    def _point_at(self, folder: Path, key: dict) -> bool:
        ok = True
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / KEY_FILE).exists():
                self._write_key(folder, key)
        except OSError as e:
            logger.warning("compile cache %s cannot be written (%s): compiled code will not be kept", folder, e)
            folder, ok = Path(tempfile.mkdtemp(prefix="smash-compile-")), False
        if self._saved_env is None:
            self._saved_env = {var: os.environ.get(var) for var in _ENV_VARS}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
        _clear_inductor_memory_caches()
        return ok

    def deactivate(self) -> None:
        """Restore the cache environment variables to what they were before :meth:`activate`."""
        if self._saved_env is not None:
            for var, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
            self._saved_env = None
            _clear_inductor_memory_caches()
        self.state = "inactive"

    def precompiled_store(self, cfg: TorchCompileConfig) -> PrecompiledStore:
        """The store of precompiled block forwards in the active folder (call after :meth:`activate`)."""
        if self.folder is None:
            raise RuntimeError("activate the compile cache before asking for its precompiled store")
        store = PrecompiledStore(self.folder / PRECOMPILED, cfg)
        self._stores.append(store)
        return store

    # -- reporting -------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Hits and misses since :meth:`activate`; ``hit`` is true when compiled code came from disk."""
        now = _counters()
        delta = {name: now[name] - self._start.get(name, 0) for name in now}
        precompiled = {name: sum(store.stats[name] for store in self._stores)
                       for name in ("loaded", "compiled", "saved", "fallback", "ignored")}
        hits = sum(delta[name] for _, name in _HIT_COUNTERS) + precompiled["loaded"]
        return {
            "folder": str(self.folder) if self.folder else None,
            "state": self.state,
            "key": self._key,
            "hit": hits > 0,
            **delta,
            **{f"precompiled_{name}": n for name, n in precompiled.items()},
        }

    @property
    def hit(self) -> bool:
        return self.report()["hit"]


def _differences(recorded: Any, key: dict) -> str:
    if not isinstance(recorded, dict):
        return "not a key"
    diffs = [
        f"{name}={recorded.get(name)!r} (here: {key.get(name)!r})"
        for name in sorted(set(recorded) | set(key))
        if recorded.get(name) != key.get(name)
    ]
    return ", ".join(diffs) or "same key"


def _clear_inductor_memory_caches() -> None:
    # Some inductor helpers memoize paths under the cache dir; forget them when it moves.
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:  # older or newer torch without it: nothing memoized to clear
        return
    clear_caches()
