"""smash-runtime: load smash-build artifacts and run them fast.

    >>> import smash_runtime
    >>> pipe = smash_runtime.load("dist/tiny-flux")          # or "org/name@revision" on the Hub
    >>> pipe.smash.timings                                     # seconds spent in each load phase

Importing the package is cheap: ``load`` and ``LoadInfo`` (which need torch) are resolved on
first use (PEP 562), so ``smash_runtime.errors`` and ``smash_runtime.settings`` stay torch-free.
"""

from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, SettingsError, SmashError, UnsupportedOnDevice

if TYPE_CHECKING:
    from .loader import LoadInfo, load

__version__ = "0.1.0"
__all__ = ["load", "LoadInfo", "ArtifactError", "SettingsError", "SmashError", "UnsupportedOnDevice", "__version__"]

_LAZY = {"load": "loader", "LoadInfo": "loader"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
