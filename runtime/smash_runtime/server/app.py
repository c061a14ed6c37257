"""The FastAPI app: an OpenAI-compatible image API in front of one generation worker.

``create_app`` returns at once; the pipeline is loaded and warmed up on the worker thread
when the app starts, so ``/health`` answers immediately and ``/ready`` turns 200 only when
the server can generate.

    >>> import smash_runtime, uvicorn
    >>> from smash_runtime.format import read_record
    >>> app = create_app(lambda: (smash_runtime.load("dist/tiny-flux"), read_record("dist/tiny-flux").to_dict()),
    ...                  ServerSettings(max_queue=4))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
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
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..compilers import WarmupConfig, WarmupShape, warm_up, warmup_config_from_dict
from ..errors import SettingsError, SmashError
from ..images import generate
from .errors import ApiError
from .formats import decode_mask, decode_upload, encode
from .jsonlog import LOGGER
from .metrics import Metrics
from .schemas import IGNORED_HEADER, edit_model, parse_request, parse_size, request_model
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
    default_steps: int | None = None
    default_from: str = "the pipeline's default"

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
        shapes = warmup_shapes(manifest)
        if shapes:
            width, height, default_from = shapes[0].width, shapes[0].height, "the first warm-up shape"
        else:
            side = int(getattr(pipe, "default_sample_size", 128)) * vae_scale
            width = height = side
            default_from = "the pipeline's default"
        accepts, default_steps = _call_signature(pipe)
        return cls(multiple, width, height, accepts, default_steps, default_from)


def _call_signature(pipe: Any) -> tuple[frozenset[str], int | None]:
    """The parameters ``pipe`` takes and its default ``num_inference_steps``."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    steps = parameters.get("num_inference_steps")
    default = steps.default if steps is not None and isinstance(steps.default, int) else None
    return frozenset(parameters), default


def warmup_shapes(manifest: dict[str, Any]) -> tuple[WarmupShape, ...]:
    """The warm-up shapes recorded in ``smash.json``, validated (``batch`` defaults to 1)."""
    try:
        return warmup_config_from_dict((manifest.get("runtime") or {}).get("warmup")).shapes
    except SettingsError as exc:
        raise exc.with_prefix("runtime.warmup") from None


def _warmup_config(settings: ServerSettings, info: PipelineInfo, manifest: dict[str, Any]) -> WarmupConfig:
    """What warm-up runs: the recorded shapes, which must be within the limits (else
    :class:`WarmupConflict`); without any, one 2-step image at the default size if it is served."""
    shapes = warmup_shapes(manifest)
    settings.check_warmup(shapes, multiple=info.size_multiple)
    if shapes:
        return WarmupConfig(shapes)
    if settings.size_problem(info.default_width, info.default_height, multiple=info.size_multiple):
        logger.info("no warm-up: no shape is recorded and the default size is beyond the limits",
                    extra={"fields": {"default_size": f"{info.default_width}x{info.default_height}"}})
        return WarmupConfig()
    try:
        return WarmupConfig((WarmupShape(height=info.default_height, width=info.default_width,
                                         steps=min(2, settings.max_steps)),))
    except SettingsError as exc:  # a default size warm-up cannot take (not a multiple of 16)
        logger.info("no warm-up: no shape is recorded", extra={"fields": {"reason": str(exc)}})
        return WarmupConfig()


def _edit_pipelines(pipe: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``{"edit": image-to-image, "inpaint": inpainting}`` pipelines sharing ``pipe``'s modules
    (diffusers' ``from_pipe``), and for each one the pipeline lacks, the reason."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    made, unavailable = {}, {}
    for task, auto in (("edit", AutoPipelineForImage2Image), ("inpaint", AutoPipelineForInpainting)):
        try:
            variant = auto.from_pipe(pipe)
        except Exception as exc:  # diffusers has no such pipeline for this class
            unavailable[task] = f"{type(pipe).__name__} has no {auto.__name__} counterpart ({type(exc).__name__})"
            continue
        variant.set_progress_bar_config(disable=True)
        made[task] = variant
    return made, unavailable


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
    # Edits: image-to-image / inpainting pipelines made from ``pipe`` with ``from_pipe`` (the same
    # modules, no second copy of the weights); None with the reason when the pipeline has none.
    edit_pipes: dict[str, Any] = field(default_factory=dict)
    edit_unavailable: dict[str, str] = field(default_factory=dict)
    worker: GenerationWorker | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_id(self) -> str:
        manifest = self.manifest or {}
        return self.settings.model_id or manifest.get("name") or (manifest.get("source") or {}).get("id") or "smash-model"

    def check_model(self, requested: str | None) -> None:
        """A ``model`` field must name the served model or one of its aliases."""
        if requested is not None and requested != self.model_id and requested not in self.settings.model_aliases:
            names = ", ".join(repr(n) for n in (self.model_id, *self.settings.model_aliases))
            raise ApiError(400, f"model: {requested!r} is not served here; use one of {names} or omit model",
                           param="model", code="model_not_found")


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
    EditModel = edit_model(settings)

    def run(params: GenerationParams) -> list[bytes]:
        pipe = state.pipe if params.task == "generate" else state.edit_pipes[params.task]
        accepts = _call_signature(pipe)[0]
        images = generate(
            pipe, params.prompt, seed=params.seed, steps=params.steps,
            # image-to-image pipelines without height/width take the size of the (resized) image
            height=params.height if "height" in accepts else None,
            width=params.width if "width" in accepts else None,
            guidance_scale=params.guidance_scale, negative_prompt=params.negative_prompt, num_images=params.n,
            image=params.image, mask_image=params.mask, strength=params.strength,
        )
        return [encode(image, params.output_format, params.output_compression) for image in images]

    def prepare() -> None:
        try:
            start = time.perf_counter()
            pipe, loaded_manifest = load_pipeline()
            pipe.set_progress_bar_config(disable=True)  # progress bars would break the JSON log stream
            state.pipe, state.manifest = pipe, loaded_manifest
            state.info = PipelineInfo.of(pipe, loaded_manifest)
            state.edit_pipes, state.edit_unavailable = _edit_pipelines(pipe)
            metrics.load_seconds.set(time.perf_counter() - start)
            state.status = "warming_up"
            start = time.perf_counter()
            if settings.warmup:
                warm_up(pipe, _warmup_config(settings, state.info, loaded_manifest), progress=False)
            metrics.warmup_seconds.set(time.perf_counter() - start)
            if settings.warmup_delay_s:
                time.sleep(settings.warmup_delay_s)
            state.status = "ready"
            metrics.ready.set(1)
            logger.info("ready", extra={"fields": {"model": state.model_id, "size_multiple": state.info.size_multiple,
                                                   "edits": sorted(state.edit_pipes)}})
        except BaseException as exc:
            state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.error("load failed", exc_info=not isinstance(exc, SmashError),
                         extra={"fields": {"error": state.error}})
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

    @app.get("/v1/models/{model}", summary="One model by id (or alias).")
    async def get_model(model: str):
        if model != state.model_id and model not in settings.model_aliases:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {state.model_id!r}",
                           param="model", code="model_not_found")
        return _model_card(state)

    @app.post(
        "/v1/images/generations",
        summary="Generate images (OpenAI Images API).",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": Model.model_json_schema()}}}},
    )
    async def images_generations(request: Request):
        body = await _read_body(request, settings.max_body_bytes, "application/json")
        req = parse_request(Model, body)
        info = _admit(state, req)
        params = _params(req, state, info, info.accepts, info.default_steps)
        return await _answer(request, state, req, params)

    @app.post(
        "/v1/images/edits",
        summary="Edit an image (OpenAI Images API): image-to-image, or inpainting with a mask.",
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _edit_schema(EditModel)}}}},
    )
    async def images_edits(request: Request):
        body = await _read_body(request, settings.max_upload_bytes, "multipart/form-data")
        fields, files = await _read_form(request, body, settings.max_upload_bytes)
        req = parse_request(EditModel, fields)
        if "image" not in files:
            raise ApiError(400, "image: required; send the picture to edit as a multipart file",
                           param="image", code="missing_required_parameter")
        info = _admit(state, req)
        # Decoding and resizing an upload takes a while for large pictures: keep it off the event loop.
        params = await asyncio.to_thread(_edit_params, req, files, state, info)
        return await _answer(request, state, req, params)

    return app


def _admit(state: ServerState, req: Any) -> PipelineInfo:
    """Checks that need no pipeline work, shared by both routes; the pipeline's facts when ready."""
    if req.response_format == "url":
        raise ApiError(400, 'response_format: "url" is not supported; this server returns images inline, '
                       'use "b64_json"', param="response_format", code="unsupported_response_format")
    if req.stream:
        raise ApiError(400, "stream: streaming is not supported; omit it or send false", param="stream",
                       code="unsupported_parameter")
    if req.background == "transparent":
        raise ApiError(400, 'background: "transparent" is not supported; the pipeline makes opaque images '
                       '(send "opaque", "auto" or omit it)', param="background", code="unsupported_parameter")
    state.check_model(req.model)
    if state.status != "ready":
        raise ApiError(503, f"the model is not ready (status: {state.status}); poll /ready",
                       code="not_ready", headers={"Retry-After": "5"})
    return state.info


def _edit_params(req: Any, files: dict[str, bytes], state: ServerState, info: PipelineInfo) -> GenerationParams:
    """An edit request as generation settings: image-to-image, or inpainting when a mask came."""
    settings = state.settings
    task = "inpaint" if "mask" in files else "edit"
    if task not in state.edit_pipes:
        param = "mask" if task == "inpaint" else "image"
        raise ApiError(400, f"{param}: {state.edit_unavailable.get(task, 'not supported')}; "
                       + ("send the image without a mask for image-to-image" if task == "inpaint" else
                          "this model serves only /v1/images/generations"),
                       param=param, code="unsupported_parameter")
    max_side = 4 * settings.max_size
    image = decode_upload(files["image"], "image", max_side=max_side)
    mask = decode_mask(files["mask"], size=image.size, max_side=max_side) if task == "inpaint" else None
    pipe = state.edit_pipes[task]
    accepts, default_steps = _call_signature(pipe)
    if req.size in (None, "auto"):  # the image's own size, rounded down to what the pipeline takes
        m = info.size_multiple
        size = f"{image.width // m * m}x{image.height // m * m}"
        width, height = _default_size(size, info, settings, "the uploaded image's size, rounded down")
    else:
        width, height = parse_size(req.size, multiple=info.size_multiple, settings=settings)
    params = _params(req, state, info, accepts, default_steps, width=width, height=height)
    strength = req.strength if req.strength is not None else _default_of(pipe, "strength")
    steps = params.steps if params.steps is not None else default_steps
    if strength is not None and steps is not None and int(steps * strength) < 1:
        raise ApiError(400, f"strength: {strength} x {steps} steps leaves no denoising step; raise strength "
                       "or num_inference_steps so that their product is at least 1", param="strength",
                       code="invalid_value")
    resample = Image.Resampling.LANCZOS
    return dataclasses.replace(
        params, task=task, strength=req.strength, image=image.convert("RGB").resize((width, height), resample),
        mask=None if mask is None else mask.resize((width, height), resample),
    )


def _default_size(size: str, info: PipelineInfo, settings: ServerSettings, origin: str) -> tuple[int, int]:
    """A default size, held to the same limits as an explicit one (a request may not get by
    omission what it would be refused if it asked for it)."""
    try:
        return parse_size(size, multiple=info.size_multiple, settings=settings)
    except ApiError as exc:
        raise ApiError(400, f"size: not given, and the default {size} ({origin}) is not served: "
                       f"{exc.message.removeprefix('size: ')}; send size", param="size", code="invalid_size") from None


def _default_of(pipe: Any, name: str) -> Any:
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _params(req: Any, state: ServerState, info: PipelineInfo, accepts: frozenset[str], default_steps: int | None,
            *, width: int | None = None, height: int | None = None) -> GenerationParams:
    """The request's generation settings, defaults filled in and checked against the limits."""
    settings = state.settings
    if width is None or height is None:
        if req.size in (None, "auto"):
            width, height = _default_size(f"{info.default_width}x{info.default_height}", info, settings,
                                          info.default_from)
        else:
            width, height = parse_size(req.size, multiple=info.size_multiple, settings=settings)
    if req.num_inference_steps is None and default_steps is not None and default_steps > settings.max_steps:
        raise ApiError(400, f"num_inference_steps: not given, and the pipeline's default ({default_steps}) is above "
                       f"max_steps ({settings.max_steps}); send num_inference_steps", param="num_inference_steps",
                       code="invalid_value")
    for name in ("negative_prompt", "guidance_scale"):
        if getattr(req, name) is not None and name not in accepts:
            raise ApiError(400, f"{name}: {type(state.pipe).__name__} does not take this parameter",
                           param=name, code="unsupported_parameter")
    return GenerationParams(
        prompt=req.prompt, n=req.n, width=width, height=height,
        seed=req.seed if req.seed is not None else secrets.randbelow(_SEED_RANGE), steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt,
        output_format=req.output_format or "png", output_compression=req.output_compression,
    )


async def _answer(request: Request, state: ServerState, req: Any, params: GenerationParams) -> JSONResponse:
    """Run ``params`` on the worker and answer in OpenAI's shape."""
    size = f"{params.width}x{params.height}"
    _note(request, task=params.task, n=params.n, size=size, steps=params.steps, seed=params.seed,
          output_format=params.output_format)
    images = await _run_job(request, state, params)
    headers = {IGNORED_HEADER: ", ".join(ignored)} if (ignored := req.ignored()) else None
    return JSONResponse(
        {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(data).decode("ascii")} for data in images],
         "seed": params.seed, "output_format": params.output_format, "size": size, "background": "opaque"},
        headers=headers,
    )


def _edit_schema(model: type) -> dict[str, Any]:
    schema = model.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {"image": {**binary, "description": "The PNG, JPEG or WebP picture to edit."},
                            "mask": {**binary, "description": "PNG, transparent where the image should change "
                                     "(inpainting pipelines only)."}, **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    return schema


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.started,
        "owned_by": "smash-build",
        "ready": state.status == "ready",
        "aliases": list(state.settings.model_aliases),
        "smash": manifest_summary(state.manifest) if state.manifest else None,
    }


async def _read_body(request: Request, limit: int, media_type: str) -> bytes:
    """The whole body, refused with 413 past ``limit`` bytes and 415 unless it is ``media_type``."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"the body is {declared} bytes; at most {limit} are accepted",
                       code="request_too_large")
    sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if sent != media_type:
        raise ApiError(415, f"Content-Type must be {media_type} (got {sent or 'none'!r})",
                       code="unsupported_media_type")
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies carry no length: count as they arrive
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body exceeds {limit} bytes", code="request_too_large")
    return bytes(body)


_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask"}


async def _read_form(request: Request, body: bytes, limit: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """Split a multipart body (already read within ``limit``) into text fields and files.

    Empty text fields count as not given, like JSON nulls; one image and at most one mask.
    """
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=64, max_part_size=limit)
    except Exception as exc:  # starlette's MultiPartException and the parser's own errors
        raise ApiError(400, f"the body is not valid multipart/form-data: {exc}", code="invalid_multipart") from None
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        for key, value in form.multi_items():
            name = _FILE_FIELDS.get(key)
            if isinstance(value, str):
                if name:
                    raise ApiError(400, f"{name}: must be a file part, not a text field", param=name,
                                   code="invalid_type")
                if key in fields:
                    raise ApiError(400, f"{key}: given more than once", param=key, code="invalid_value")
                if value != "":
                    fields[key] = value
                continue
            if name is None:
                raise ApiError(400, f"{key}: unexpected file; only image and mask are files", param=key,
                               code="unknown_parameter")
            if name in files:
                raise ApiError(400, f"{name}: one file only (this server edits one image at a time)", param=name,
                               code="invalid_value")
            files[name] = await value.read()
    finally:
        await form.close()
    return fields, files


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
