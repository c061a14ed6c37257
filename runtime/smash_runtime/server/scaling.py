"""Scaling settings of ``smash-serve --ray``: replicas, autoscaling, queue bounds, resources, threads.

Torch-free and Ray-free, so the manifest layer, the CLI and the KubeRay exporter can validate
and record them without either. The ``[serve]`` table of a manifest is parsed into
:class:`ServeSettings`, recorded in ``smash.json`` under ``runtime.serve``, and CLI flags
override the recorded values.

    >>> from smash_runtime.server.scaling import ServeSettings, serve_settings_from_dict
    >>> serve_settings_from_dict({"min_replicas": 1, "max_replicas": 4}).autoscaling_config()
    {'min_replicas': 1, 'max_replicas': 4, 'target_ongoing_requests': 2.0}
    >>> serve_settings_from_dict({"replicas": 0})
    Traceback (most recent call last):
    SettingsError: replicas = 0: Input should be greater than or equal to 1 ...
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from ..errors import SettingsError, SmashError, did_you_mean

RAY_EXTRA = "smash-runtime[ray]"


class ServeSettings(BaseModel):
    """How a Ray Serve deployment of the artifact scales. Either a fixed ``replicas`` count, or
    ``min_replicas``/``max_replicas`` with ``target_ongoing_requests`` for Serve's autoscaler."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    replicas: int | None = Field(
        None, ge=1, le=1024, description="Fixed number of replicas (not with min_replicas/max_replicas). Default 1.")
    min_replicas: int | None = Field(
        None, ge=0, le=1024, description="Autoscaling: fewest replicas (0 scales to zero when idle).")
    max_replicas: int | None = Field(None, ge=1, le=1024, description="Autoscaling: most replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, le=1000, description="Autoscaling: requests per replica (running + queued) Serve aims for.")
    max_ongoing_requests: int = Field(
        4, ge=1, le=1000, description="Requests one replica holds at once (running + queued in it).")
    max_queued_requests: int = Field(
        8, ge=0, le=100000, description="Requests waiting for a free replica; more get 429 with Retry-After.")
    retry_after_s: int = Field(2, ge=0, le=3600, description="Retry-After seconds sent with a 429.")
    num_cpus: float = Field(1.0, ge=0, le=1024, description="CPUs Ray reserves per replica.")
    num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs Ray reserves per replica (fractions share a GPU).")
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads per replica on CPU (default: num_cpus, at least 1).")

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> ServeSettings:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        # The error type names the key the message is about (see _settings_error).
        if autoscaling and self.replicas is not None:
            raise PydanticCustomError("replicas", "give replicas, or min_replicas/max_replicas for autoscaling, not both")
        if autoscaling and self.max_replicas is None:
            raise PydanticCustomError("max_replicas", "autoscaling needs max_replicas (min_replicas defaults to 1)")
        if autoscaling and (self.min_replicas or 1) > self.max_replicas:
            raise PydanticCustomError("min_replicas", f"at most max_replicas ({self.max_replicas})")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Serve's ``autoscaling_config`` (None for a fixed replica count)."""
        if not self.autoscaling:
            return None
        return {"min_replicas": 1 if self.min_replicas is None else self.min_replicas,
                "max_replicas": self.max_replicas, "target_ongoing_requests": self.target_ongoing_requests}

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment`` / one entry of a Serve config's ``deployments``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 429, "retry_after_s": self.retry_after_s},
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling:
            options["autoscaling_config"] = self.autoscaling_config()
        else:
            options["num_replicas"] = self.replicas or 1
        return options

    def record(self) -> dict[str, Any]:
        """The plain dict recorded in ``smash.json`` (``runtime.serve``): the fields given, and defaults."""
        return self.model_dump()


def serve_settings_from_dict(values: Mapping[str, Any], *, base: ServeSettings | None = None) -> ServeSettings:
    """Validate ``values`` (a ``[serve]`` table, or CLI overrides on top of ``base``).

    Raises:
        SettingsError: naming each bad key, its value (cut short) and what is allowed; several
            problems come together in ``.errors``.
    """
    merged = {**(base.model_dump(exclude_defaults=True) if base else {}), **dict(values)}
    if base is not None and ("min_replicas" in values or "max_replicas" in values):
        merged.pop("replicas", None)  # a flag switching to autoscaling replaces a recorded fixed count
    if base is not None and "replicas" in values:
        merged.pop("min_replicas", None)
        merged.pop("max_replicas", None)
    try:
        return ServeSettings.model_validate(merged)
    except ValidationError as exc:
        errors = [_settings_error(e, merged) for e in exc.errors()]
        first = errors[0]
        combined = SettingsError(first.key, first.value, first.allowed, first.hint)
        combined.errors = errors
        raise combined from None


def _settings_error(error: dict[str, Any], values: Mapping[str, Any]) -> SettingsError:
    key = ".".join(str(part) for part in error["loc"])
    fields = list(ServeSettings.model_fields)
    if error["type"] == "extra_forbidden":
        return SettingsError(key, _short(error["input"]), "not a [serve] setting; allowed: " + ", ".join(fields),
                             did_you_mean(key, fields))
    if not key:  # a rule across fields: the error type is the key
        key = error["type"]
        return SettingsError(key, values.get(key), error["msg"])
    description = ServeSettings.model_fields[key].description if key in ServeSettings.model_fields else None
    return SettingsError(key, _short(error["input"]), error["msg"], description)


def _short(value: Any, limit: int = 60) -> Any:
    text = repr(value)
    return value if len(text) <= limit else text[: limit - 3] + "..."


def serve_json_schema() -> dict[str, Any]:
    """JSON Schema of the ``[serve]`` table (for ``smash-build schema``)."""
    schema = ServeSettings.model_json_schema()
    schema.pop("title", None)
    schema["description"] = "scaling of `smash-serve --ray` and the KubeRay RayService; recorded in smash.json"
    return schema


def require_ray() -> None:
    """Import Ray Serve or raise SmashError naming the extra to install."""
    try:
        importlib.import_module("ray.serve")
    except ImportError as exc:
        raise SmashError(f"--ray needs Ray Serve, which is not installed ({exc}); "
                         f"install it with: pip install '{RAY_EXTRA}'") from None
