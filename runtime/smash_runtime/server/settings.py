"""Server settings: one frozen dataclass, filled from ``SMASH_*`` environment variables and CLI flags.

Every field carries its environment variable and help text in its metadata, so the CLI and
the README stay in step with the code.

    >>> from smash_runtime.server.settings import ServerSettings
    >>> ServerSettings.from_env({"SMASH_MAX_QUEUE": "4"}).max_queue
    4
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import SettingsError, SmashError, did_you_mean
from ..settings import MAX_BATCH, MAX_SIDE, MAX_STEPS


class WarmupConflict(SmashError):
    """The artifact's recorded warm-up shapes ask for more than the server's limits allow."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "the artifact's warm-up shapes are beyond this server's limits: " + "; ".join(problems)
            + ". Raise the limits (--max-size, --max-steps, --max-n) or start with --no-warmup."
        )


def _setting(default: Any, env: str, help: str, *, flag: str | None = None, **extra: Any) -> Any:
    metadata = {"env": env, "help": help, **({"flag": flag} if flag else {})}
    return field(default=default, metadata=metadata, **extra)


@dataclass(frozen=True)
class ServerSettings:
    """Limits and behaviour of the HTTP server. All sizes are pixels, all times seconds."""

    api_key: str | None = _setting(
        None, "SMASH_API_KEY", "Bearer token every route but /health requires (unset: no auth).", repr=False
    )
    max_queue: int = _setting(8, "SMASH_MAX_QUEUE", "Requests that may wait behind the running one; more get 429.")
    request_timeout_s: float = _setting(
        300.0, "SMASH_REQUEST_TIMEOUT_S", "Seconds a request may wait and run before it gets 503."
    )
    max_n: int = _setting(4, "SMASH_MAX_N", "Largest n (images per request).")
    max_steps: int = _setting(100, "SMASH_MAX_STEPS", "Largest num_inference_steps.")
    min_size: int = _setting(16, "SMASH_MIN_SIZE", "Smallest width and height.")
    max_size: int = _setting(2048, "SMASH_MAX_SIZE", "Largest width and height.")
    max_prompt_chars: int = _setting(4000, "SMASH_MAX_PROMPT_CHARS", "Longest prompt and negative_prompt, in characters.")
    max_body_bytes: int = _setting(65536, "SMASH_MAX_BODY_BYTES", "Largest request body; larger ones get 413 unread.")
    max_upload_bytes: int = _setting(
        16 * 1024 * 1024, "SMASH_MAX_UPLOAD_BYTES", "Largest /v1/images/edits body (image + mask + fields)."
    )
    shutdown_grace_s: float = _setting(
        30.0, "SMASH_SHUTDOWN_GRACE_S", "On SIGTERM, seconds in-flight requests get to finish."
    )
    warmup: bool = _setting(True, "SMASH_WARMUP", "Run the artifact's warm-up shapes before /ready turns 200.")
    warmup_delay_s: float = _setting(
        0.0, "SMASH_WARMUP_DELAY_S", "Extra seconds /ready stays 503 after warm-up (readiness drills, tests)."
    )
    model_id: str | None = _setting(None, "SMASH_MODEL_ID", "Model id in /v1/models (default: the artifact's name).")
    model_aliases: tuple[str, ...] = _setting(
        (), "SMASH_MODEL_ALIASES", "Other names accepted as `model` (e.g. dall-e-3); flag repeatable, env comma-separated.",
        flag="--model-alias",
    )

    def __post_init__(self) -> None:
        positive_ints = ("max_queue", "max_n", "max_steps", "min_size", "max_size", "max_prompt_chars", "max_body_bytes",
                         "max_upload_bytes")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(name, value, "a whole number >= 1")
        # The same ceilings bound recorded warm-up shapes (smash_runtime.settings), so nothing the
        # server may be configured to accept is refused by the manifest, and no artifact can ask for more.
        for name, ceiling in (("max_size", MAX_SIDE), ("max_steps", MAX_STEPS), ("max_n", MAX_BATCH)):
            if getattr(self, name) > ceiling:
                raise SettingsError(name, getattr(self, name), f"a whole number from 1 to {ceiling}")
        if self.min_size > self.max_size:
            raise SettingsError("min_size", self.min_size, f"at most max_size ({self.max_size})")
        for name in ("request_timeout_s", "shutdown_grace_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise SettingsError(name, value, "a number of seconds > 0")
        if not isinstance(self.warmup_delay_s, (int, float)) or not 0 <= self.warmup_delay_s < math.inf:
            raise SettingsError("warmup_delay_s", self.warmup_delay_s, "a number of seconds >= 0")
        if isinstance(self.model_aliases, (list, str)):  # a CLI list or one name: store the tuple the type says
            aliases = (self.model_aliases,) if isinstance(self.model_aliases, str) else self.model_aliases
            object.__setattr__(self, "model_aliases", tuple(aliases))
        for alias in self.model_aliases:
            if not isinstance(alias, str) or not 1 <= len(alias) <= 256 or alias != alias.strip():
                raise SettingsError("model_aliases", alias, "names of 1 to 256 characters without surrounding spaces")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            # An empty key would let every request in while looking configured.
            raise SettingsError("api_key", "<hidden>", "a non-empty string, or unset to disable auth")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Settings from ``SMASH_*`` variables of ``environ`` (default ``os.environ``), then ``overrides``.

        ``None`` overrides are ignored, so CLI flags left unset keep the environment's value.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        for name in sorted(unknown):
            raise SettingsError(name, overrides[name], "not a server setting", did_you_mean(name, cls.field_names()))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def size_problem(self, width: int, height: int, *, multiple: int = 1) -> str | None:
        """Why ``width`` x ``height`` is not served, or None if it is.

            >>> ServerSettings(max_size=2048).size_problem(4096, 64, multiple=16)
            'width 4096 is not allowed; width and height must be between 16 and 2048 and multiples of 16'
        """
        lo, hi = self.min_size, self.max_size
        for side, value in (("width", width), ("height", height)):
            if not lo <= value <= hi or value % multiple:
                return (f"{side} {value} is not allowed; width and height must be between {lo} and {hi} "
                        f"and multiples of {multiple}")
        return None

    def warmup_problems(self, shapes: Iterable[Any], *, multiple: int = 1) -> list[str]:
        """What in the recorded warm-up shapes (``height``, ``width``, ``steps``, ``batch``) these limits refuse.

        Warm-up runs only what a client could ask for, so a shape beyond the limits is a
        conflict to settle before serving, never something to run anyway.

            >>> ServerSettings(max_steps=20).warmup_problems([WarmupShape(height=64, width=64, steps=28)])
            ['runtime.warmup.shapes[0]: steps 28 is above max_steps 20']
        """
        problems = []
        for i, shape in enumerate(shapes):
            where = f"runtime.warmup.shapes[{i}]"
            size = self.size_problem(shape.width, shape.height, multiple=multiple)
            if size:
                problems.append(f"{where}: {size}")
            if shape.steps > self.max_steps:
                problems.append(f"{where}: steps {shape.steps} is above max_steps {self.max_steps}")
            if shape.batch > self.max_n:
                problems.append(f"{where}: batch {shape.batch} is above max_n {self.max_n}")
        return problems

    def check_warmup(self, shapes: Iterable[Any], *, multiple: int = 1) -> None:
        """Raise :class:`WarmupConflict` if warm-up is on and a shape is beyond the limits."""
        problems = self.warmup_problems(shapes, multiple=multiple) if self.warmup else []
        if problems:
            raise WarmupConflict(problems)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    env = f.metadata["env"]
    try:
        if kind.startswith("bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        expected = {"bool": "1/0, true/false, yes/no or on/off", "int": "a whole number", "float": "a number"}
        raise SettingsError(env, raw, f"{expected[kind.split(' ')[0]]} ({f.metadata['help']})") from None
    return raw
