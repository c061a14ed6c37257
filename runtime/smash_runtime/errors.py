"""Errors the runtime raises. Each says what went wrong and what to do next."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SmashError(Exception):
    """Base class of every error smash-build and smash-runtime raise on purpose."""


def shorten(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages never echo a huge value whole.

        >>> shorten("x" * 1000, 10)
        "'xxxxxxxx... (1002 chars)"
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 1]}... ({len(text)} chars)"


class ArtifactError(SmashError):
    """The artifact is missing, corrupted, tampered with or of an unknown format.

    ``file`` names the offending file (relative to the artifact root) when there is one,
    ``field`` the offending field of that file (dotted, e.g. ``components.vae.kind``).
    ``smash-run`` exits with :data:`ArtifactError.exit_code` on it.
    """

    exit_code = 3

    def __init__(self, message: str, file: str | None = None, field: str | None = None):
        super().__init__(message)
        self.file = file
        self.field = field


class SettingsError(SmashError, ValueError):
    """A setting (manifest key, load option, request field) has a value that is not allowed.

    ``key`` is the dotted path of the setting, ``value`` the bad value and ``allowed`` a
    human description of what would be accepted. The manifest layer prefixes ``key`` with
    the section it came from.
    """

    def __init__(self, key: str, value: object, allowed: str, hint: str | None = None):
        self.key = key
        self.value = value
        self.allowed = allowed
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.key} = {self.value!r}: {self.allowed}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    def with_prefix(self, prefix: str) -> SettingsError:
        """The same error with its key moved under ``prefix`` (``runtime.cacher`` + ``interval``)."""
        key = f"{prefix}.{self.key}" if self.key else prefix
        return SettingsError(key, self.value, self.allowed, self.hint)


class UnsupportedOnDevice(SmashError):
    """A recorded setting cannot be applied on this device (fp8 on a CPU, stable-fast without CUDA)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """``"did you mean 'interval'?"`` for the closest of ``choices``, or None."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}?" if match else None
