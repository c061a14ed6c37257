"""HTTP server for smash-build artifacts (the ``smash-runtime[serve]`` extra).

    $ smash-serve dist/tiny-flux --host 0.0.0.0 --port 8000

    >>> from smash_runtime.server import create_app, ServerSettings
    >>> app = create_app(load_pipeline, ServerSettings(max_queue=4))

See ``README.md`` next to this file for the routes, limits, settings and errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import create_app
    from .settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]


def __getattr__(name: str):
    # FastAPI is an optional extra: importing the package must not require it until the app is built.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
