"""``smash-serve ARTIFACT``: serve an artifact over HTTP with uvicorn.

    smash-serve dist/tiny-flux --host 0.0.0.0 --port 8000 --max-queue 16
    SMASH_API_KEY=secret smash-serve org/flux-dev-fast@main

Every server setting is a flag and a ``SMASH_*`` environment variable (flags win), except the
API key, which is read from ``SMASH_API_KEY`` only so it stays out of process listings.
The port is bound before the model is loaded, so a busy port fails at once. Exit statuses are
``EXIT_CODES`` (printed by ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..logs import package_versions
from .jsonlog import LOGGER, configure_json_logging
from .settings import ServerSettings

logger = logging.getLogger(LOGGER)
EXIT_OK = 0
EXIT_LOAD_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PORT_UNAVAILABLE = 3
EXIT_CODES = {
    EXIT_OK: "clean shutdown (SIGTERM or SIGINT included)",
    EXIT_LOAD_FAILED: "the artifact failed to load or warm up (the server does not linger unready)",
    EXIT_BAD_INPUT: "bad arguments or settings, a missing or unreadable artifact, or warm-up shapes beyond the limits",
    EXIT_PORT_UNAVAILABLE: "the address or port cannot be bound (in use, or not allowed); checked before loading",
}


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="smash-serve",
        description="Serve a smash-build ARTIFACT (a folder or ORG/NAME[@REVISION] on the Hub) with an "
        "OpenAI-compatible image API.",
        epilog=f"exit status:\n{codes}\n\nThe API key is read from SMASH_API_KEY only. Routes, limits and errors: "
        "runtime/smash_runtime/server/README.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artifact")
    parser.add_argument("--version", action="version", version=package_versions("smash-serve", "smash-runtime"))
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only (no request lines)")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="log debug lines, each with its source location")
    parser.add_argument("--host", default=os.environ.get("SMASH_HOST", "127.0.0.1"), help="(env SMASH_HOST)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SMASH_PORT", "8000")), help="(env SMASH_PORT)")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: CUDA when available)")
    parser.add_argument("--verify", choices=["fast", "full"], default="fast",
                        help="fast: hash each file unless this machine already hashed that very, unchanged file; "
                             "full: hash every file (default: %(default)s)")
    parser.add_argument("--no-cacher", action="store_true", help="do not apply the recorded cacher")
    parser.add_argument("--no-compile", action="store_true", help="do not apply the recorded compiler")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", default=None, help="compile cache folder (default: $SMASH_COMPILE_CACHE, "
                       "else $XDG_CACHE_HOME/smash/compile, i.e. ~/.cache/smash/compile)")
    cache.add_argument("--no-compile-cache", action="store_true", help="compile without the on-disk cache")
    for f in dataclasses.fields(ServerSettings):
        if f.name == "api_key":
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (env {f.metadata['env']}, default {f.default})"
        if f.type.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.type.startswith("tuple"):
            parser.add_argument(flag, dest=f.name, action="append", default=None, metavar="NAME", help=help_text)
        else:
            kind = int if f.type.startswith("int") else float if f.type.startswith("float") else str
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    from .ray_cli import add_ray_arguments

    add_ray_arguments(parser)
    return parser


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (``OSError`` if it cannot be), to hand to :func:`serve`.

    Binding first, before anything slow, makes a busy port fail in a second instead of after
    the model has loaded, and nothing can take the port in between.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(app, host: str, port: int, grace_s: float, fatal: list[BaseException] | None = None,
          sock: socket.socket | None = None) -> int:
    """Run ``app`` with uvicorn until SIGTERM/SIGINT; in-flight requests get ``grace_s`` to finish.

    ``sock`` (from :func:`bind`) is served instead of binding ``host:port`` now.
    Returns the exit status: 0 after a graceful shutdown, 1 if ``fatal`` collected an error.
    """
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=grace_s, server_header=False,
    )
    server = uvicorn.Server(config)
    app.state.uvicorn_server = server
    # uvicorn re-raises the signal it shut down on once it is done, which would turn a clean
    # drain into death by signal (status 143 / 130). The signal has been handled: exit 0 instead.
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_LOAD_FAILED if fatal else EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    configure_json_logging(level, source=args.verbose)
    from ..errors import SmashError

    overrides: dict[str, Any] = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings) if f.name != "api_key"
    }
    try:  # settings first: a typo should not wait for torch to import
        settings = ServerSettings.from_env(**overrides)
    except SmashError as exc:
        _refuse(str(exc), EXIT_BAD_INPUT)
    if args.ray:  # Ray Serve instead of one uvicorn process (ray_cli.py); Serve's proxy binds the port
        from .ray_cli import serve_on_ray

        sys.exit(serve_on_ray(args, settings))
    try:  # then the port: a busy one should not wait for the model to load
        sock = bind(args.host, args.port)
    except OSError as exc:
        _refuse(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pick another --port, "
                "or stop what holds it", EXIT_PORT_UNAVAILABLE)
    from ..logs import quiet_third_party_logs

    if not args.verbose:
        quiet_third_party_logs()
    from ..format import read_record
    from ..loader import load, resolve_artifact
    from .app import create_app, warmup_shapes

    try:
        root = resolve_artifact(args.artifact)
        manifest = read_record(root).to_dict()
        settings.check_warmup(warmup_shapes(manifest))  # the pipeline's own size multiple is checked after loading
    except SmashError as exc:
        sock.close()
        _refuse(str(exc), EXIT_BAD_INPUT)

    def load_pipeline():
        pipe = load(root, device=args.device, verify=args.verify, cacher=not args.no_cacher,
                    compiler=not args.no_compile,
                    compile_cache=False if args.no_compile_cache else (args.compile_cache or True))
        return pipe, pipe.smash.record.to_dict()

    fatal: list[BaseException] = []

    def on_load_error(exc: BaseException) -> None:
        fatal.append(exc)
        server = getattr(app.state, "uvicorn_server", None)
        if server is not None:
            server.should_exit = True  # a server that cannot generate should not linger

    app = create_app(load_pipeline, settings, manifest=manifest, on_load_error=on_load_error)
    logger.info("starting", extra={"fields": {"artifact": str(root), "host": args.host, "port": args.port,
                                              "settings": repr(settings)}})
    sys.exit(serve(app, args.host, args.port, settings.shutdown_grace_s, fatal, sock=sock))


def _refuse(message: str, status: int) -> NoReturn:
    logger.error("cannot start", extra={"fields": {"error": message, "exit_status": status}})
    sys.exit(status)


if __name__ == "__main__":
    main()
