"""The image server as a Ray Serve application: the same FastAPI app, many replicas, any cluster.

``smash-serve ART --ray`` (and KubeRay's ``serveConfigV2``, through :func:`build_app`) deploys
:class:`SmashReplica` behind Serve's HTTP proxy. Each replica builds the app of
:mod:`smash_runtime.server.app` with ``create_app`` (every route, limit, error and metric of the
single-process server), loads the artifact once, applies the recorded cacher and compiler with
the compile cache, runs the warm-up, and only then reports ready to Serve: a replica that is
still loading never receives traffic.

Back-pressure and recovery are Serve's: a replica holds at most ``max_ongoing_requests``;
requests beyond that wait at the router, at most ``max_queued_requests`` of them, and more get
429 with ``Retry-After``. Serve restarts a replica whose process dies or whose
``check_health`` fails. :class:`OpenAIErrors` runs in Serve's proxy and gives the proxy's own
plain-text errors the app's OpenAI shape; a request whose replica died under it gets a 503
(the proxy would answer 500).

This module imports Ray; plain ``smash-serve`` never imports it.

    >>> from smash_runtime.server.ray_serve import build_app, start_serve
    >>> start_serve(host="127.0.0.1", port=8000)          # after ray.init(...)
    >>> serve.run(build_app({"artifact": "dist/tiny-flux", "serve": {"replicas": 2}}), name="smash")
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from starlette.middleware import Middleware

from .jsonlog import LOGGER
from .scaling import ServeSettings, serve_settings_from_dict
from .settings import ServerSettings

logger = logging.getLogger(LOGGER)

APP_NAME = "smash"
DEPLOYMENT_NAME = "SmashImages"
REPLICA_HEADER = "x-smash-replica"
# Import path of proxy_middlewares, for RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (KubeRay pods).
PROXY_CALLBACK = "smash_runtime.server.ray_serve.proxy_middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


@dataclass(frozen=True)
class ReplicaOptions:
    """What each replica needs to load and serve the artifact (sent to every node, so plain data).

    ``artifact`` is a folder every node can read (the image's ``/opt/smash/artifact``, a shared
    volume) or ``ORG/NAME[@REVISION]`` on the Hub.
    """

    artifact: str
    device: str | None = None
    verify: str = "fast"
    cacher: bool = True
    compiler: bool = True
    compile_cache: str | bool = True  # True: the default root (load's compile_cache); False: none
    threads: int = 1
    server: dict[str, Any] = field(default_factory=dict)  # ServerSettings fields (the API key included)

    def server_settings(self) -> ServerSettings:
        return ServerSettings(**self.server)


class SmashReplica:
    """One Serve replica: the artifact loaded once, served by the app ``create_app`` builds."""

    def __init__(self, options: ReplicaOptions):
        import torch

        self.options = options
        torch.set_num_threads(options.threads)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.state = None

    def __serve_build_asgi_app__(self):
        from ..format import read_record
        from ..loader import load, resolve_artifact
        from .app import create_app

        options = self.options
        root = resolve_artifact(options.artifact)

        def load_pipeline():
            pipe = load(root, device=options.device, verify=options.verify, cacher=options.cacher,
                        compiler=options.compiler, compile_cache=options.compile_cache)
            return pipe, pipe.smash.record.to_dict()

        app = create_app(load_pipeline, options.server_settings(), manifest=read_record(root).to_dict())
        self.state = app.state.smash
        app.add_middleware(_ReadyBeforeTraffic, state=self.state, replica_id=self.replica_id)
        return app

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        state = self.state
        if state is None:
            return
        if state.status == "failed":
            raise RuntimeError(f"the artifact failed to load: {state.error}")
        thread = getattr(state.worker, "_thread", None)
        if state.status == "ready" and thread is not None and not thread.is_alive():
            raise RuntimeError("the generation worker thread is gone")


class _ReadyBeforeTraffic:
    """ASGI middleware of each replica.

    Holds the app's lifespan startup until loading and warm-up are done (Serve routes to a
    replica once its startup completes; a failed load fails the startup and Serve retries the
    replica), and tags every response with the replica that answered it.
    """

    def __init__(self, app, state, replica_id: str):
        self.app = app
        self.state = state
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self._hold_startup(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                # The proxy adds X-Request-ID itself (the same id: the app reuses the one it forwards).
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*kept, self.header]
            await send(message)

        await self.app(scope, receive, tagged)

    def _hold_startup(self, send):
        async def held(message):
            if message["type"] == "lifespan.startup.complete":
                while self.state.status not in ("ready", "failed"):
                    await asyncio.sleep(0.05)
                if self.state.status == "failed":
                    message = {"type": "lifespan.startup.failed", "message": self.state.error or "load failed"}
            await send(message)

        return held


class OpenAIErrors:
    """ASGI middleware for Serve's HTTP proxy: its own errors in the app's OpenAI error shape.

    The proxy answers some requests itself, in plain text: 429 when the deployment's queue is
    full (Serve's back-pressure, with ``Retry-After``), 503 when no replica is available, and 500
    when the replica serving a request died under it. The app's own responses are JSON and pass
    untouched; the proxy's become ``{"error": {...}}`` bodies, and the 500 of a lost replica
    becomes a 503 with ``Retry-After``: the request may be sent again.
    """

    _REWRITES = {
        429: (429, "queue_full", "rate_limit_error", "every replica is busy and the queue is full; retry later"),
        500: (503, "replica_unavailable", "server_error",
              "the replica serving this request stopped; send it again"),
        503: (503, "unavailable", "server_error", "no replica is ready (starting, scaling or recovering); retry later"),
    }

    def __init__(self, app, retry_after_s: int = 2):
        self.app = app
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}

        async def rewrite(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                plain = not headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] in self._REWRITES and plain:
                    held["start"], held["body"] = message, b""
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                held["sent"] = True
                return await self._send_rewritten(send, held["start"], held["body"])
            held["sent"] = True
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception as exc:
            if held.get("sent"):
                raise
            await self._send_rewritten(send, {"status": 500, "headers": []}, type(exc).__name__.encode())
            return
        if not held.get("sent"):
            # When the replica died under the request, the proxy returns without answering (uvicorn
            # would then send a bare 500): answer a clean 503 instead.
            await self._send_rewritten(send, {"status": 500, "headers": []}, b"")

    async def _send_rewritten(self, send, start, detail: bytes) -> None:
        status, code, kind, message = self._REWRITES[start["status"]]
        text = detail.decode("utf-8", "replace").strip()[:300]
        body = json.dumps({"error": {"message": f"{message} ({text})" if text else message, "type": kind,
                                     "param": None, "code": code}}).encode()
        keep = [(k, v) for k, v in start.get("headers") or [] if k.lower() in (b"retry-after", b"x-request-id")]
        if not any(k.lower() == b"retry-after" for k, _ in keep):
            keep.append((b"retry-after", self.retry_after))
        headers = [*keep, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """The proxy's middlewares. Serve reads them from the callback that the environment variable
    ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names (see :data:`PROXY_CALLBACK_ENV`), in the
    environment of the processes that run the proxies: set it before ``ray start`` / ``ray.init``
    starts the nodes (the KubeRay manifest sets it on every container)."""
    return [Middleware(OpenAIErrors)]


def proxy_environment() -> dict[str, str]:
    """Environment variables the cluster's nodes need for :func:`proxy_middlewares`."""
    return {PROXY_CALLBACK_ENV: PROXY_CALLBACK}


def start_serve(host: str = "127.0.0.1", port: int = 8000, proxy_location: str = "HeadOnly") -> None:
    """Start Serve's controller and HTTP proxy on the connected cluster (a no-op if already running,
    in which case the running proxy keeps its settings)."""
    serve.start(http_options={"host": host, "port": port, "location": proxy_location})


def _compile_cache_choice(value: str | bool | None) -> str | bool:
    """A folder, or False; the default (True or None) is the driver's $SMASH_COMPILE_CACHE when set,
    since replicas on other nodes do not see the driver's environment, else each replica's default root."""
    if value is None or value is True:
        return os.environ.get("SMASH_COMPILE_CACHE") or True
    return value


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``args``: ``artifact`` (required), ``serve`` (a ``[serve]`` dict;
    default: the artifact's recorded ``runtime.serve``), and optional ``device``, ``verify``,
    ``cacher``, ``compiler``, ``compile_cache``, ``server`` (ServerSettings fields).

    Also the application builder KubeRay's ``serveConfigV2`` names
    (``import_path: smash_runtime.server.ray_serve:build_app``).
    """
    args = dict(args)
    unknown = set(args) - {"artifact", "serve", "device", "verify", "cacher", "compiler", "compile_cache", "server"}
    if unknown or "artifact" not in args:
        from ..errors import SettingsError

        raise SettingsError(", ".join(sorted(unknown)) or "artifact", None,
                            "build_app takes artifact (required), serve, device, verify, cacher, compiler, "
                            "compile_cache, server")
    scaling = args.get("serve")
    if not isinstance(scaling, ServeSettings):
        scaling = serve_settings_from_dict(scaling if scaling is not None else recorded_scaling(args["artifact"]))
    server = dict(args.get("server") or {})
    # Serve admits at most max_ongoing_requests to a replica: its own queue must hold them all,
    # so the app's 429 never fires behind Serve's back-pressure.
    server["max_queue"] = max(int(server.get("max_queue", 0)), scaling.max_ongoing_requests)
    options = ReplicaOptions(
        artifact=str(args["artifact"]), device=args.get("device"), verify=args.get("verify", "fast"),
        cacher=bool(args.get("cacher", True)), compiler=bool(args.get("compiler", True)),
        compile_cache=_compile_cache_choice(args.get("compile_cache", True)),
        threads=scaling.torch_threads, server=server,
    )
    ServerSettings(**server)  # fail here, in the driver, rather than in every replica
    grace = float(server.get("shutdown_grace_s", ServerSettings.shutdown_grace_s))
    deployment = serve.deployment(
        serve.ingress()(SmashReplica), name=DEPLOYMENT_NAME, graceful_shutdown_timeout_s=grace,
        **scaling.deployment_options(),
    )
    return deployment.bind(options)


def recorded_scaling(artifact: str) -> dict[str, Any]:
    """``runtime.serve`` of the artifact's smash.json ({} when none is recorded)."""
    from ..format import read_record
    from ..loader import resolve_artifact

    return dict(read_record(resolve_artifact(artifact)).runtime_settings.serve or {})


def deployment_state(app_name: str = APP_NAME) -> dict[str, Any]:
    """``{"status": ..., "replicas": {"RUNNING": n, ...}}`` of the app's deployment, from Serve."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return {"status": "NOT_DEPLOYED", "replicas": {}}
    deployment = status.deployments.get(DEPLOYMENT_NAME)
    return {"status": str(getattr(deployment, "status", status.status)).split(".")[-1],
            "replicas": dict(getattr(deployment, "replica_states", {}) or {})}


def run_until_signal(app: serve.Application, *, host: str, port: int, proxy_location: str,
                     stop, started: float | None = None) -> int:
    """Deploy ``app`` as ``APP_NAME``, log where it answers, wait for ``stop`` (an Event set by
    SIGTERM/SIGINT), then delete the application: Serve lets each replica finish its requests
    (``graceful_shutdown_timeout_s``) before stopping it. Returns the exit status."""
    start_serve(host, port, proxy_location)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    logger.info("ready", extra={"fields": {
        "url": f"http://{host}:{port}", "deployment": deployment_state(),
        "seconds": round(time.perf_counter() - started, 1) if started else None}})
    while not stop.wait(1.0):
        pass
    logger.info("draining", extra={"fields": {"deployment": deployment_state()}})
    serve.delete(APP_NAME)
    logger.info("stopped", extra={"fields": {"application": APP_NAME}})
    return 0

