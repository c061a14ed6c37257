"""``smash-serve ARTIFACT --ray``: the command-line side of the Ray Serve deployment.

    smash-serve dist/tiny-flux --ray --replicas 2                    # start (or join) a local cluster
    smash-serve dist/tiny-flux --ray --ray-address 10.0.0.5:6379 --min-replicas 1 --max-replicas 8

Ray is imported only once ``--ray`` is given (and a missing Ray names the extra to install), so
plain ``smash-serve`` never needs it. Scaling flags override the artifact's recorded
``runtime.serve`` (the manifest's ``[serve]`` table).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any

from ..errors import SmashError
from .jsonlog import LOGGER
from .scaling import ServeSettings, require_ray, serve_settings_from_dict
from .settings import ServerSettings

logger = logging.getLogger(LOGGER)
EXIT_LOAD_FAILED = 1
EXIT_BAD_INPUT = 2
_FLAG_TYPES = {"int": int, "float": float}


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray``, ``--ray-address``, ``--proxy-location`` and one flag per :class:`ServeSettings` field."""
    group = parser.add_argument_group("Ray Serve (pip install 'smash-runtime[ray]')")
    group.add_argument("--ray", action="store_true",
                       help="serve with Ray Serve: replicas across the cluster's CPUs/GPUs, autoscaling, restarts")
    group.add_argument("--ray-address", default=None,
                       help="cluster to join (host:port, auto, ray://...); default: join the local one or start it")
    group.add_argument("--proxy-location", choices=["HeadOnly", "EveryNode"], default="HeadOnly",
                       help="where Serve runs HTTP proxies (default HeadOnly)")
    for name, info in ServeSettings.model_fields.items():
        kind = _FLAG_TYPES["float" if info.annotation in (float, float | None) else "int"]
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                           help=f"{info.description} (default: the artifact's [serve] value)")


def scaling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The scaling flags given on the command line."""
    return {name: getattr(args, name) for name in ServeSettings.model_fields if getattr(args, name, None) is not None}


def serve_on_ray(args: argparse.Namespace, settings: ServerSettings) -> int:
    """Deploy ``args.artifact`` on Ray Serve and serve until SIGTERM/SIGINT; the exit status.

    0 after a clean drain, 1 if the deployment failed, 2 for bad input (Ray missing included).
    """
    started = time.perf_counter()
    try:
        require_ray()
        from ..format import read_record
        from ..loader import resolve_artifact

        from .app import warmup_shapes

        root = resolve_artifact(args.artifact)
        record = read_record(root)
        settings.check_warmup(warmup_shapes(record.to_dict()))  # as plain smash-serve does, before any replica starts
        recorded = record.runtime_settings.serve or {}
        scaling = serve_settings_from_dict(scaling_overrides(args), base=serve_settings_from_dict(recorded))
    except SmashError as exc:
        logger.error("cannot start", extra={"fields": {"error": str(exc)}})
        return EXIT_BAD_INPUT

    import ray

    from .ray_serve import build_app, proxy_environment, run_until_signal

    # Nodes that ray.init starts here inherit this environment: their proxies then answer in the
    # app's error shape. Nodes started elsewhere need it in their own environment (docs/ray.md).
    for name, value in proxy_environment().items():
        os.environ.setdefault(name, value)
    stop = threading.Event()
    previous: dict[int, Any] = {}
    try:
        # Replica logs stay in Ray's session logs: this process's output remains one JSON line per event.
        ray.init(address=args.ray_address, log_to_driver=False, logging_level=logging.WARNING)
        # After ray.init, which installs a handler that kills the driver on SIGTERM: ours drains first.
        previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        app = build_app({
            "artifact": str(root), "serve": scaling, "device": args.device, "verify": args.verify,
            "cacher": not args.no_cacher, "compiler": not args.no_compile, "compile_cache": False if args.no_compile_cache else args.compile_cache,
            "server": dataclasses.asdict(settings),
        })
        logger.info("starting", extra={"fields": {"artifact": str(root), "ray": ray.get_runtime_context().gcs_address,
                                                  "serve": scaling.record(), "settings": repr(settings)}})
        return run_until_signal(app, host=args.host, port=args.port, proxy_location=args.proxy_location,
                                stop=stop, started=started)
    except Exception as exc:  # a deployment that cannot come up: say why, exit 1
        logger.error("deployment failed", extra={"fields": {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}})
        return EXIT_LOAD_FAILED
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
