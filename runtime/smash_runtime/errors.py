"""Errors the runtime raises. Each says what went wrong and what to do next."""

from __future__ import annotations

import copy
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
        text = f"{self.key} = {shown(self.value)}: {self.allowed}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    def __reduce__(self):
        # Copies and pickles keep every attribute (the default would call __init__ with args only).
        return _restore, (type(self), self.args, dict(self.__dict__))

    def with_prefix(self, prefix: str) -> SettingsError:
        """The same error with its key moved under ``prefix`` (``runtime.cacher`` + ``interval``)."""
        if not self.key:
            key = prefix
        elif self.key.startswith("["):
            key = prefix + self.key
        else:
            key = f"{prefix}.{self.key}"
        moved = copy.copy(self)
        moved.key = key
        moved.args = (moved._render(),)
        return moved


def _restore(cls: type, args: tuple, state: dict) -> SettingsError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class KeyProblem(SettingsError):
    """A problem with a key itself (unknown, missing): the message follows the key, no value is shown.

        >>> str(KeyProblem("model.source", " is missing: give a Hub id"))
        'model.source is missing: give a Hub id'
    """

    def __init__(self, key: str, text: str, hint: str | None = None):
        super().__init__(key, None, text, hint)

    def _render(self) -> str:
        text = f"{self.key}{self.allowed}"
        return f"{text} ({self.hint})" if self.hint else text


class UnsupportedOnDevice(SmashError):
    """A recorded setting cannot be applied on this device (fp8 on a CPU, stable-fast without CUDA)."""


SHOWN_CHARS = 80
"""Values echoed in messages are cut to this many characters (a 2 MB string is never printed back)."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: ``'aaaa…' (2000000 characters)``.

    Builds the repr of strings and containers only as far as needed, so a huge value costs
    no more than a short one.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}… ({len(value)} characters)"
    if isinstance(value, (list, tuple, dict)):
        text = _short_repr(value, limit + 1)
        return text if len(text) <= limit else text[:limit] + "…"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _short_repr(value: object, budget: int, depth: int = 0) -> str:
    # repr of nested lists/dicts that stops once ``budget`` characters are produced.
    if depth > 20:
        return "…"
    if isinstance(value, dict):
        parts, opening, closing = [], "{", "}"
        items = ((f"{shown(k, budget)}: ", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        parts, opening, closing = [], "[" if isinstance(value, list) else "(", "]" if isinstance(value, list) else ")"
        items = (("", v) for v in value)
    else:
        return shown(value, budget)
    used = 1
    for prefix, item in items:
        part = prefix + _short_repr(item, budget - used, depth + 1)
        parts.append(part)
        used += len(part) + 2
        if used > budget:
            break
    trailing = "," if isinstance(value, tuple) and len(parts) == 1 else ""
    return opening + ", ".join(parts) + trailing + closing


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """``"did you mean 'interval'?"`` for the closest of ``choices``, or None."""
    word = str(word)
    if len(word) > 100:  # no key or choice is this long; difflib on megabytes takes seconds
        return None
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}?" if match else None
