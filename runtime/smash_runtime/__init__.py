"""smash-runtime: load smash-build artifacts and run them fast.

    >>> import smash_runtime
    >>> pipe = smash_runtime.load("dist/tiny-flux")          # or "org/name@revision" on the Hub
    >>> pipe.smash.timings                                     # seconds spent in each load phase
"""

from .errors import ArtifactError, SettingsError, SmashError, UnsupportedOnDevice
from .loader import LoadInfo, load

__version__ = "0.1.0"
__all__ = ["load", "LoadInfo", "ArtifactError", "SettingsError", "SmashError", "UnsupportedOnDevice", "__version__"]
