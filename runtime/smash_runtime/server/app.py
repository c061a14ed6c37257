"""The FastAPI app: an OpenAI-compatible image API in front of one generation worker.

``create_app`` returns at once; the pipeline is loaded and warmed up on the worker thread
when the app starts, so ``/health`` answers immediately and ``/ready`` turns 200 only when
the server can generate.

    >>> import smash_runtime, uvicorn
    >>> from smash_runtime.format import read_manifest
    >>> app = create_app(lambda: (smash_runtime.load("dist/tiny-flux"), read_manifest("dist/tiny-flux")),
    ...                  ServerSettings(max_queue=4))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..images import encode_png, generate
from .errors import ApiError
from .jsonlog import LOGGER
from .metrics import Metrics
from .schemas import parse_request, parse_size, request_model
from .settings import ServerSettings
from .worker import GenerationParams, GenerationWorker, Job, QueueFull

logger = logging.getLogger(LOGGER)

LoadPipeline = Callable[[], "tuple[Any, dict[str, Any]]"]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_SEED_RANGE = 2**32  # seeds drawn for requests that give none; any int up to 2**63-1 is accepted


@dataclass(frozen=True)
class PipelineInfo:
    """What validation needs to know about the loaded pipeline."""

    size_multiple: int
    default_width: int
    default_height: int
    accepts: frozenset[str]

    @classmethod
    def of(cls, pipe: Any, manifest: dict[str, Any]) -> PipelineInfo:
        vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        # FLUX packs 2x2 latent patches, so its sides need twice the VAE factor; other
        # transformers patchify by their patch size; UNets need the VAE factor alone.
        if type(pipe).__name__.startswith("Flux"):
            multiple = vae_scale * 2
        else:
            denoiser = getattr(pipe, "transformer", None)
            multiple = vae_scale * int(getattr(getattr(denoiser, "config", None), "patch_size", 1) or 1)
        shapes = _warmup_shapes(manifest)
        if shapes and "height" in shapes[0] and "width" in shapes[0]:
            width, height = int(shapes[0]["width"]), int(shapes[0]["height"])
        else:
            side = int(getattr(pipe, "default_sample_size", 128)) * vae_scale
            width = height = side
        accepts = frozenset(inspect.signature(type(pipe).__call__).parameters)
        return cls(multiple, width, height, accepts)


def _warmup_shapes(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return list((((manifest.get("runtime") or {}).get("warmup") or {}).get("shapes")) or [])


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The parts of ``smash.json`` a client may care about (no file table)."""
    keys = ("format", "format_version", "pipeline_class", "source", "dtype", "transforms", "runtime", "versions")
    summary = {k: manifest[k] for k in keys if k in manifest}
    summary["components"] = sorted(manifest.get("components") or {})
    return summary


@dataclass
class ServerState:
    """Mutable state of one app, reachable as ``app.state.smash``."""

    settings: ServerSettings
    metrics: Metrics
    manifest: dict[str, Any] | None
    status: str = "loading"  # loading -> warming_up -> ready; or failed; draining on shutdown
    error: str | None = None
    pipe: Any = None
    info: PipelineInfo | None = None
    worker: GenerationWorker | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_id(self) -> str:
        manifest = self.manifest or {}
        return self.settings.model_id or manifest.get("name") or (manifest.get("source") or {}).get("id") or "smash-model"


def create_app(
    load_pipeline: LoadPipeline,
    settings: ServerSettings | None = None,
    *,
    manifest: dict[str, Any] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app. ``load_pipeline()`` runs on the worker thread at startup and returns
    ``(pipeline, smash.json dict)``; ``manifest`` lets /v1/models answer before it finishes.
    ``on_load_error`` is called (on the worker thread) if loading or warm-up fails."""
    settings = settings or ServerSettings()
    metrics = Metrics()
    state = ServerState(settings=settings, metrics=metrics, manifest=manifest)
    Model = request_model(settings)

    def run(params: GenerationParams) -> list[bytes]:
        images = generate(
            state.pipe, params.prompt, seed=params.seed, steps=params.steps, height=params.height,
            width=params.width, guidance_scale=params.guidance_scale, negative_prompt=params.negative_prompt,
            num_images=params.n,
        )
        return [encode_png(image) for image in images]

    def prepare() -> None:
        try:
            start = time.perf_counter()
            pipe, loaded_manifest = load_pipeline()
            pipe.set_progress_bar_config(disable=True)  # progress bars would break the JSON log stream
            state.pipe, state.manifest = pipe, loaded_manifest
            state.info = PipelineInfo.of(pipe, loaded_manifest)
            metrics.load_seconds.set(time.perf_counter() - start)
            state.status = "warming_up"
            start = time.perf_counter()
            if settings.warmup:
                for shape in _warmup_shapes(loaded_manifest) or [{}]:
                    run(GenerationParams(
                        prompt="warm-up", n=int(shape.get("batch_size", 1)), seed=0,
                        width=int(shape.get("width", state.info.default_width)),
                        height=int(shape.get("height", state.info.default_height)),
                        steps=int(shape.get("steps", 2)),
                    ))
            metrics.warmup_seconds.set(time.perf_counter() - start)
            if settings.warmup_delay_s:
                time.sleep(settings.warmup_delay_s)
            state.status = "ready"
            metrics.ready.set(1)
            logger.info("ready", extra={"fields": {"model": state.model_id, "size_multiple": state.info.size_multiple}})
        except BaseException as exc:
            state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.error("load failed", exc_info=True, extra={"fields": {"error": state.error}})
            if on_load_error is not None:
                on_load_error(exc)
            raise

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker = GenerationWorker(run, settings.max_queue, metrics)
        state.worker.start(prepare)
        yield
        # uvicorn has already let in-flight requests finish (or cancelled them after the grace
        # period); the worker ends once its queue is empty.
        state.status = "draining" if state.status == "ready" else state.status
        metrics.ready.set(0)
        await asyncio.to_thread(state.worker.stop, 5.0)

    app = FastAPI(
        title="smash-runtime image server",
        summary="OpenAI-compatible image generation for a smash-build artifact.",
        lifespan=lifespan,
    )
    app.state.smash = state
    app.add_middleware(_Gateway, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        _note(request, error=exc.code)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return ApiError(exc.status_code, message, code=code, headers=exc.headers).response()

    @app.get("/health", summary="Liveness: the process answers.")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once loaded, cached and warmed up; 503 before.")
    async def ready():
        body = {"status": state.status, "model": state.model_id}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics", summary="Prometheus metrics.")
    async def metrics_route():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", summary="The served model (OpenAI list shape) with its smash.json summary.")
    async def list_models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model}", summary="One model by id.")
    async def get_model(model: str):
        if model != state.model_id:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {state.model_id!r}",
                           param="model", code="model_not_found")
        return _model_card(state)

    @app.post(
        "/v1/images/generations",
        summary="Generate images (OpenAI Images API).",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": Model.model_json_schema()}}}},
    )
    async def images_generations(request: Request):
        body = await _read_json_body(request, settings.max_body_bytes)
        req = parse_request(Model, body)
        if req.response_format == "url":
            raise ApiError(400, 'response_format: "url" is not supported; this server returns images inline, '
                           'use "b64_json"', param="response_format", code="unsupported_response_format")
        if req.model is not None and req.model != state.model_id:
            raise ApiError(400, f"model: {req.model!r} is not served here; use {state.model_id!r} or omit model",
                           param="model", code="model_not_found")
        if state.status != "ready":
            raise ApiError(503, f"the model is not ready (status: {state.status}); poll /ready",
                           code="not_ready", headers={"Retry-After": "5"})
        info = state.info
        if req.size in (None, "auto"):
            width, height = info.default_width, info.default_height
        else:
            width, height = parse_size(req.size, multiple=info.size_multiple, settings=settings)
        for name in ("negative_prompt", "guidance_scale"):
            if getattr(req, name) is not None and name not in info.accepts:
                raise ApiError(400, f"{name}: {type(state.pipe).__name__} does not take this parameter",
                               param=name, code="unsupported_parameter")
        seed = req.seed if req.seed is not None else secrets.randbelow(_SEED_RANGE)
        params = GenerationParams(
            prompt=req.prompt, n=req.n, width=width, height=height, seed=seed, steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt,
        )
        _note(request, n=req.n, size=f"{width}x{height}", steps=req.num_inference_steps, seed=seed)
        images = await _run_job(request, state, params)
        return JSONResponse(
            {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in images],
             "seed": seed},
        )

    return app


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.started,
        "owned_by": "smash-build",
        "ready": state.status == "ready",
        "smash": manifest_summary(state.manifest) if state.manifest else None,
    }


async def _read_json_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"the body is {declared} bytes; at most {limit} are accepted",
                       code="request_too_large")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json (got {media_type or 'none'!r})",
                       code="unsupported_media_type")
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies carry no length: count as they arrive
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body exceeds {limit} bytes", code="request_too_large")
    return bytes(body)


async def _run_job(request: Request, state: ServerState, params: GenerationParams) -> list[bytes]:
    worker = state.worker
    job = Job(params, asyncio.get_running_loop())
    try:
        worker.submit(job)
    except QueueFull as exc:
        raise ApiError(429, f"the queue is full ({worker.max_queue} waiting); retry after {exc.retry_after} s",
                       code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
    except RuntimeError:
        raise ApiError(503, "the server is shutting down", code="shutting_down") from None
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {job.future, disconnected}, timeout=state.settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:  # uvicorn's grace period ran out
        worker.cancel(job)
        raise
    finally:
        disconnected.cancel()
    if job.future not in done:
        outcome = worker.cancel(job)
        if outcome == "done":  # finished in the same instant: deliver it
            await job.future
        else:
            _note(request, outcome=outcome, queue_ms=_ms(job.queue_seconds))
            if disconnected in done:
                # Nobody is listening; the status is for the log line and the metrics only.
                raise ApiError(499, "the client closed the connection", code="client_closed_request")
            raise ApiError(503, f"the request timed out after {state.settings.request_timeout_s} s "
                           f"({'waiting in the queue' if outcome == 'cancelled' else 'while generating'})",
                           code="timeout", headers={"Retry-After": str(worker.retry_after())})
    _note(request, queue_ms=_ms(job.queue_seconds), generate_ms=_ms(job.run_seconds))
    try:
        return job.future.result()
    except Exception as exc:
        raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", code="generation_failed") from None


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _note(request: Request, **fields: Any) -> None:
    """Add fields to this request's log line."""
    request.scope.setdefault("state", {}).setdefault("smash_log", {}).update(fields)


class _Gateway:
    """ASGI middleware around every route: request id, bearer auth, metrics, one JSON log line."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state
        key = state.settings.api_key
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        fields = scope.setdefault("state", {}).setdefault("smash_log", {})
        status: list[int] = []

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                timings = [f"{k.split('_')[0]};dur={fields[k]}" for k in ("queue_ms", "generate_ms") if fields.get(k) is not None]
                if timings:
                    message["headers"].append((b"server-timing", ", ".join(timings).encode()))
            await send(message)

        path = scope.get("path", "")
        try:
            if self._expected and path != "/health" and not hmac.compare_digest(
                headers.get(b"authorization", b""), self._expected
            ):
                fields["error"] = "invalid_api_key"
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            code = status[0] if status else 500
            seconds = time.perf_counter() - start
            route = Metrics.route_label(path)
            metrics = self.state.metrics
            metrics.requests.labels(route, scope.get("method", ""), str(code)).inc()
            metrics.latency.labels(route).observe(seconds)
            client = scope.get("client")
            logger.info("request", extra={"fields": {
                "request_id": request_id, "method": scope.get("method"), "path": path[:200], "status": code,
                "duration_ms": round(seconds * 1000, 2), "client": client[0] if client else None, **fields,
            }})
