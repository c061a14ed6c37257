"""Bake an artifact into a reproducible container image that serves it with ``smash-serve``.

    >>> from smash_build.exporters.image import build_image, write_build_context
    >>> info = build_image("dist/tiny-flux", "tiny-flux:latest", base_image="python:3.11-slim-bookworm", log=print)
    >>> info.id, info.weights_layer, info.size
    >>> write_build_context("dist/tiny-flux", "ctx/", base_image="python:3.11-slim-bookworm")  # build elsewhere

The build context (the repo's ``Dockerfile`` is its template, see the comments there)::

    Dockerfile                          ARG defaults filled in: `docker build ctx/` needs no --build-arg
    .dockerignore
    wheels/                             hash-locked wheelhouse (exporters/lock.py): no index at build time
    layers/artifact/opt/smash/artifact/ the artifact files smash.json lists, and smash.json
    layers/compile-cache/               an optional torch compile cache

Reproducibility: every file in the context gets a fixed mtime (the artifact's
``SOURCE_DATE_EPOCH`` for the weights, a constant for code) and fixed modes; the Dockerfile
copies the weights and the runtime as whole trees onto ``/`` so the engine creates no folder
with its own clock. Same inputs give the same layer digests; the image ID still differs
between builds because the classic builder stamps the build time into the image config.

The build goes through the Docker engine API (``docker`` SDK, classic builder) with no network
at all (the wheelhouse makes it hermetic, and engines started with ``--bridge=none`` have no
default network); the context is streamed as a tar built on the fly, so multi-GB weights are
never copied to a temporary context folder.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import io
import os
import queue
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name, parse_wheel_filename

from smash_runtime.errors import SettingsError, SmashError
from smash_runtime.format import RECORD_FILE, artifact_sha256, read_record, verify_files

from .lock import LOCK_FILE, RUNTIME_DIST, TOOLS_FILE, VARIANTS, Wheelhouse, lock_text, resolve_wheelhouse, sha256_of

Log = Callable[[str], None]

# The top-level Dockerfile; exporters/Dockerfile links to it, and installed wheels carry a copy there.
TEMPLATE = Path(__file__).resolve().parent / "Dockerfile"
DOCKERIGNORE = "# Only what the Dockerfile copies; anything else stays out of the context.\n*\n!Dockerfile\n!wheelhouse/\n!layers/\n"
ARTIFACT_IN_IMAGE = "opt/smash/artifact"
ARTIFACT_LAYER = "layers/artifact"
COMPILE_CACHE_LAYER = "layers/compile-cache"
WHEELHOUSE_DIR = "wheelhouse"
# 1980-01-01T00:00:00Z: the earliest time a zip (wheel) can hold; used when the artifact records
# no SOURCE_DATE_EPOCH, and for the runtime layer, which must not depend on the artifact.
DEFAULT_EPOCH = 315532800
CODE_EPOCH = DEFAULT_EPOCH
DEFAULT_BASE_IMAGE = f"python:{sys.version_info.major}.{sys.version_info.minor}-slim-bookworm"
# --variant cuda: torch comes from the base, so the default base is the official CUDA PyTorch
# runtime image of the oldest torch the runtime accepts (its python3 sets the wheelhouse's Python).
DEFAULT_CUDA_BASE_IMAGE = "pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime"


def default_base_image(variant: str) -> str:
    """The base ``build_image`` uses for ``variant`` when none is given."""
    return DEFAULT_CUDA_BASE_IMAGE if variant == "cuda" else DEFAULT_BASE_IMAGE
SERVICE_UID = 10001
PORT = 8000
# Layers the final stage adds on top of the base, in Dockerfile order.
LAYER_NAMES = ("dependencies", "weights", "app", "compile_cache")


class EngineUnavailable(SmashError):
    """No Docker engine answered."""


class ImageBuildError(SmashError):
    """The engine refused or failed the build (the message holds its last log lines)."""


@dataclass(frozen=True)
class ContextInfo:
    """What :func:`write_build_context` wrote (or :func:`build_image` streamed)."""

    path: Path | None
    build_args: dict[str, str]
    labels: dict[str, str]
    source_date_epoch: int
    artifact_sha256: str
    wheelhouse: Wheelhouse
    files: int
    size: int


@dataclass(frozen=True)
class ImageInfo:
    """The built image: ID, layer digests (uncompressed diff IDs) and sizes."""

    tag: str
    id: str
    layers: tuple[str, ...]
    base_layers: int
    size: int
    labels: dict[str, str]
    build_seconds: float
    context: ContextInfo
    pushed_digest: str | None = None
    cached_steps: int = 0

    def layer(self, name: str) -> str:
        """Diff ID of ``"dependencies"``, ``"weights"``, ``"app"`` (smash-runtime) or ``"compile_cache"``."""
        return self.layers[self.base_layers + LAYER_NAMES.index(name)]

    @property
    def weights_layer(self) -> str:
        return self.layer("weights")

    @property
    def app_layer(self) -> str:
        return self.layer("app")


# ---------------------------------------------------------------------------------------------
# engine


def docker_client(timeout: int = 3600):
    """A ``docker.DockerClient`` for the engine ``DOCKER_HOST`` names (default: the local socket).

    Raises:
        EngineUnavailable: naming DOCKER_HOST and how to point it at an engine.
    """
    try:
        import docker
    except ImportError as exc:  # the "image" extra
        raise SmashError("building images needs the docker SDK: pip install 'smash-build[image]'") from exc
    host = os.environ.get("DOCKER_HOST")
    where = f"DOCKER_HOST={host}" if host else "the default socket unix:///var/run/docker.sock (DOCKER_HOST is not set)"
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:  # the SDK raises DockerException, requests' or plain OSErrors
        raise EngineUnavailable(
            f"no Docker engine reachable at {where}: {exc}. Start one (dockerd), or set DOCKER_HOST "
            "to a running engine (unix:///path/docker.sock, tcp://HOST:2375, ssh://USER@HOST); or write "
            "the build context with --context-only DIR and build it elsewhere."
        ) from None
    return client


# ---------------------------------------------------------------------------------------------
# what goes into the context


def source_date_epoch(manifest: dict[str, Any]) -> int:
    """The artifact's ``SOURCE_DATE_EPOCH``: ``smash.json``'s ``source_date_epoch`` (or
    ``build.source_date_epoch``), else the environment's, else 1980-01-01 (never the clock)."""
    for value in (manifest.get("source_date_epoch"), (manifest.get("build") or {}).get("source_date_epoch"),
                  os.environ.get("SOURCE_DATE_EPOCH")):
        if value is None or value == "":
            continue
        try:
            epoch = int(value)
        except (TypeError, ValueError):
            raise SettingsError("source_date_epoch", value, "an integer number of seconds since 1970") from None
        if epoch < 0:
            raise SettingsError("source_date_epoch", value, "a non-negative integer")
        return epoch
    return DEFAULT_EPOCH


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def project_source() -> tuple[str, str]:
    """(source URL, revision) of the code in the image, for the OCI labels: the git checkout the
    runtime comes from when there is one (``+dirty`` if it has uncommitted changes), else the
    installed package's project URL and version."""
    from .lock import runtime_source_dir

    root = runtime_source_dir()
    url, revision = "", ""
    if root is not None:
        commit = _git(["rev-parse", "HEAD"], root)
        if commit:
            dirty = _git(["status", "--porcelain", "--untracked-files=no"], root)
            revision = commit + ("+dirty" if dirty else "")
            url = _git(["remote", "get-url", "origin"], root) or ""
    if not url or not revision:
        try:
            meta = importlib.metadata.metadata("smash-build")
        except importlib.metadata.PackageNotFoundError:
            meta = None
        if meta is not None:
            urls = [u.split(",", 1)[-1].strip() for u in (meta.get_all("Project-URL") or [])]
            url = url or next(iter(urls), meta.get("Home-page") or "")
            revision = revision or f"smash-build {meta['Version']}"
    return url, revision


def _rfc3339(epoch: int) -> str:
    return _dt.datetime.fromtimestamp(epoch, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _build_args(manifest: dict[str, Any], artifact_dir: Path, base_image: str, variant: str,
                wheelhouse: Wheelhouse, epoch: int, precompile: bool = True) -> dict[str, str]:
    source = manifest.get("source") or {}
    url, revision = project_source()
    try:
        version = importlib.metadata.version("smash-runtime")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    return {
        "BASE_IMAGE": base_image,
        "WHEELHOUSE": WHEELHOUSE_DIR,
        "ARTIFACT": ARTIFACT_LAYER,
        "COMPILE_CACHE": COMPILE_CACHE_LAYER,
        "VENV_OPTIONS": "--system-site-packages" if variant == "cuda" else "",
        "CODE_EPOCH": str(CODE_EPOCH),
        "SERVICE_UID": str(SERVICE_UID),
        "PRECOMPILE": "1" if precompile else "0",
        "SOURCE_URL": url,
        "REVISION": revision,
        "CREATED": _rfc3339(epoch),
        "VERSION": version,
        "ARTIFACT_SHA256": artifact_sha256(artifact_dir),
        "ARTIFACT_SOURCE": str(source.get("id") or source.get("repo") or ""),
        "ARTIFACT_SOURCE_REVISION": str(source.get("commit") or source.get("revision") or ""),
        "LOCK_SHA256": sha256_of(wheelhouse.lock),
    }


_LABEL_ARGS = {
    "org.opencontainers.image.source": "SOURCE_URL",
    "org.opencontainers.image.revision": "REVISION",
    "org.opencontainers.image.created": "CREATED",
    "org.opencontainers.image.version": "VERSION",
    "org.opencontainers.image.base.name": "BASE_IMAGE",
    "io.smash.artifact.sha256": "ARTIFACT_SHA256",
    "io.smash.artifact.source": "ARTIFACT_SOURCE",
    "io.smash.artifact.source.revision": "ARTIFACT_SOURCE_REVISION",
    "io.smash.lock.sha256": "LOCK_SHA256",
}


def render_dockerfile(build_args: dict[str, str], template: str | None = None) -> str:
    """The template with each ``ARG NAME[=default]`` line's default set to ``build_args[NAME]``."""
    text = template if template is not None else TEMPLATE.read_text(encoding="utf-8")

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in build_args:
            return match.group(0)
        value = build_args[name]
        if re.search(r'["\\$\n]', value):
            raise SettingsError(name, value, "a build argument without quotes, backslashes, '$' or newlines")
        return f'ARG {name}="{value}"' if value else f"ARG {name}="

    return re.sub(r"^ARG ([A-Z_][A-Z0-9_]*)(?:=.*)?$", fill, text, flags=re.M)


@dataclass(frozen=True)
class _Entry:
    """One file or folder of the context: its bytes come from ``source`` or ``data``."""

    name: str
    mtime: int
    source: Path | None = None
    data: bytes | None = None

    @property
    def is_dir(self) -> bool:
        return self.source is None and self.data is None

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        return self.source.stat().st_size if self.source is not None else 0


def _dirs_of(rel: str, epoch: int, seen: set[str]) -> list[_Entry]:
    out = []
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d not in seen:
            seen.add(d)
            out.append(_Entry(d, epoch))
    return out


def _tree(prefix: str, files: list[tuple[str, Path]], epoch: int, seen: set[str]) -> list[_Entry]:
    """Entries for the folder ``prefix`` (and its parents) and ``files`` (relative path, source) in it."""
    out = _dirs_of(prefix + "/.", epoch, seen)
    for rel, src in sorted(files):
        name = f"{prefix}/{rel}"
        out += _dirs_of(name, epoch, seen)
        out.append(_Entry(name, epoch, source=src))
    return out


def _plan(artifact_dir: Path, manifest: dict[str, Any], wheelhouse: Wheelhouse, dockerfile: str,
          epoch: int, compile_cache: Path | None) -> list[_Entry]:
    seen: set[str] = set()
    entries = [_Entry("Dockerfile", CODE_EPOCH, data=dockerfile.encode()),
               _Entry(".dockerignore", CODE_EPOCH, data=DOCKERIGNORE.encode())]
    # Two folders, two locks: the dependencies (rarely change; their install step stays cached)
    # and smash-runtime alone (changes with every code change).
    wheels = sorted(wheelhouse.path.glob("*.whl"))
    is_app = {w: canonicalize_name(parse_wheel_filename(w.name)[0]) == RUNTIME_DIST for w in wheels}
    header = f"variant={wheelhouse.variant} python={wheelhouse.python_version}"
    deps_lock = lock_text([w for w in wheels if not is_app[w]], header=header)
    app_lock = lock_text([w for w in wheels if is_app[w]], only={RUNTIME_DIST}, header=header)
    if RUNTIME_DIST not in app_lock:
        raise SettingsError("wheelhouse", str(wheelhouse.path), f"a wheelhouse holding the {RUNTIME_DIST} wheel")
    entries += _tree(f"{WHEELHOUSE_DIR}/deps", [(w.name, w) for w in wheels if not is_app[w]]
                     + [(TOOLS_FILE, wheelhouse.path / TOOLS_FILE)], CODE_EPOCH, seen)
    entries.append(_Entry(f"{WHEELHOUSE_DIR}/deps/{LOCK_FILE}", CODE_EPOCH, data=deps_lock.encode()))
    entries += _tree(f"{WHEELHOUSE_DIR}/app", [(w.name, w) for w in wheels if is_app[w]], CODE_EPOCH, seen)
    entries.append(_Entry(f"{WHEELHOUSE_DIR}/app/{LOCK_FILE}", CODE_EPOCH, data=app_lock.encode()))
    # Only the files smash.json vouches for (and smash.json): a stray file in the artifact folder
    # (a token, a notebook) never gets baked into an image.
    artifact_files = [(rel, artifact_dir / rel) for rel in manifest["files"]] + [(RECORD_FILE, artifact_dir / RECORD_FILE)]
    entries += _tree(f"{ARTIFACT_LAYER}/{ARTIFACT_IN_IMAGE}", artifact_files, epoch, seen)
    cache_files = []
    if compile_cache is not None:
        cache_files = [(p.relative_to(compile_cache).as_posix(), p) for p in compile_cache.rglob("*")
                       if p.is_file() and not p.is_symlink()]
    entries += _tree(COMPILE_CACHE_LAYER, cache_files, CODE_EPOCH, seen)
    return sorted(entries, key=lambda e: e.name)


def _tarinfo(entry: _Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.mtime = entry.mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.is_dir:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = entry.size, 0o644
    return info


class _QueueWriter(io.RawIOBase):
    def __init__(self, q: queue.Queue):
        self.q = q

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.q.put(bytes(b))
        return len(b)


def _stream_tar(entries: list[_Entry], chunk: int = 1 << 20) -> Iterator[bytes]:
    """The context as an uncompressed tar, produced on a thread while the engine reads it;
    memory stays bounded (a few MB) whatever the weights' size."""
    q: queue.Queue = queue.Queue(maxsize=16)
    failure: list[BaseException] = []
    done = object()

    def produce() -> None:
        try:
            raw = _QueueWriter(q)
            with io.BufferedWriter(raw, buffer_size=chunk) as buf, tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for entry in entries:
                    if entry.is_dir:
                        tar.addfile(_tarinfo(entry))
                    elif entry.data is not None:
                        tar.addfile(_tarinfo(entry), io.BytesIO(entry.data))
                    else:
                        with open(entry.source, "rb") as f:
                            tar.addfile(_tarinfo(entry), f)
        except BaseException as exc:
            failure.append(exc)
        finally:
            q.put(done)

    threading.Thread(target=produce, name="smash-context-tar", daemon=True).start()
    while (item := q.get()) is not done:
        yield item
    if failure:
        raise failure[0]


def _write_tree(entries: list[_Entry], root: Path) -> None:
    for entry in entries:
        path = root / entry.name
        if entry.is_dir:
            path.mkdir(parents=True, exist_ok=True)
        elif entry.data is not None:
            path.write_bytes(entry.data)
        else:
            shutil.copyfile(entry.source, path)
        if not entry.is_dir:
            path.chmod(0o644)
    # Times last, deepest first: writing a file bumps its folder's mtime.
    for entry in sorted(entries, key=lambda e: e.name.count("/"), reverse=True):
        path = root / entry.name
        if entry.is_dir:
            path.chmod(0o755)
        os.utime(path, (entry.mtime, entry.mtime))


def _prepare(artifact_dir, *, base_image: str, variant: str, include_compile_cache, wheelhouse,
             runtime_source, precompile: bool, log: Log | None, scratch: Path,
             with_ray: bool = False,
             python_version: str | None = None) -> tuple[list[_Entry], ContextInfo, dict[str, Any]]:
    if variant not in VARIANTS:
        raise SettingsError("variant", variant, "one of: " + ", ".join(VARIANTS),
                            hint="cpu: CPU torch in the image; cuda: torch from a CUDA PyTorch base image")
    if not base_image or not isinstance(base_image, str):
        raise SettingsError("base_image", base_image, "an image reference such as python:3.11-slim-bookworm")
    artifact_dir = Path(artifact_dir)
    record = read_record(artifact_dir)
    if log:
        log(f"verifying {len(record.files)} artifact files")
    verify_files(artifact_dir, record, mode="full")
    manifest = record.to_dict()
    cache = None
    if include_compile_cache is not None:
        cache = Path(include_compile_cache)
        if not cache.is_dir():
            raise SettingsError("include_compile_cache", str(cache), "an existing compile cache folder")
    epoch = source_date_epoch(manifest)
    if wheelhouse is None:
        if log:
            log("resolving the runtime's wheels into a hash-locked wheelhouse")
        wheelhouse = resolve_wheelhouse(scratch / "wheelhouse", variant=variant, extras=image_extras(with_ray),
                                        python_version=python_version,
                                        runtime_source=runtime_source, log=log)
    elif not isinstance(wheelhouse, Wheelhouse):
        raise SettingsError("wheelhouse", wheelhouse, "a Wheelhouse from smash_build.exporters.lock.resolve_wheelhouse")
    elif with_ray and not _locks(wheelhouse, "ray"):
        raise SettingsError("wheelhouse", str(wheelhouse.path), "a wheelhouse that locks ray (with_ray=True)",
                            hint=f"resolve it with extras={image_extras(True)}")
    if wheelhouse.variant != variant:
        raise SettingsError("variant", variant, f"{wheelhouse.variant!r}, the variant of the wheelhouse given",
                            hint="the wheelhouse given was resolved for another variant")
    args = _build_args(manifest, artifact_dir, base_image, variant, wheelhouse, epoch, precompile)
    entries = _plan(artifact_dir, manifest, wheelhouse, render_dockerfile(args), epoch, cache)
    labels = {label: args[arg] for label, arg in _LABEL_ARGS.items()}
    info = ContextInfo(
        path=None, build_args=args, labels=labels, source_date_epoch=epoch,
        artifact_sha256=args["ARTIFACT_SHA256"], wheelhouse=wheelhouse,
        files=sum(not e.is_dir for e in entries), size=sum(e.size for e in entries),
    )
    return entries, info, manifest


def image_extras(with_ray: bool) -> tuple[str, ...]:
    """smash-runtime extras an image installs: the server, and Ray to run as a Ray node (``--with-ray``)."""
    return ("serve", "ray") if with_ray else ("serve",)


def _locks(wheelhouse: Wheelhouse, name: str) -> bool:
    return any(line.startswith(f"{name}==") for line in wheelhouse.lock.read_text(encoding="utf-8").splitlines())


def write_build_context(
    artifact_dir: str | os.PathLike,
    context_dir: str | os.PathLike,
    *,
    base_image: str | None = None,
    variant: str = "cpu",
    include_compile_cache: str | os.PathLike | None = None,
    wheelhouse: Wheelhouse | None = None,
    runtime_source: str | os.PathLike | None = None,
    precompile: bool = True,
    log: Log | None = None,
    with_ray: bool = False,
) -> ContextInfo:
    """Write a self-contained build context for ``artifact_dir`` to ``context_dir`` (created; must
    be empty if it exists): ``docker build --network none CONTEXT`` anywhere then gives the same
    layers as :func:`build_image`. Resolves a wheelhouse unless one is given.

    Raises:
        SettingsError: bad variant, base image, compile-cache folder, or a non-empty context_dir.
        ArtifactError: the artifact is not one, or a file does not match ``smash.json``.
    """
    context = Path(context_dir)
    if context.exists() and (not context.is_dir() or any(context.iterdir())):
        raise SettingsError("context_dir", str(context), "a new or empty folder")
    with tempfile.TemporaryDirectory(prefix="smash-image.") as scratch:
        entries, info, _ = _prepare(artifact_dir, base_image=base_image or default_base_image(variant), variant=variant,
                                    include_compile_cache=include_compile_cache, wheelhouse=wheelhouse,
                                    runtime_source=runtime_source, precompile=precompile, log=log,
                                    scratch=Path(scratch), with_ray=with_ray)
        context.mkdir(parents=True, exist_ok=True)
        _write_tree(entries, context)
    return ContextInfo(**{**info.__dict__, "path": context})


@dataclass(frozen=True)
class BaseImage:
    """What a throw-away container of the base image reported: its ``python3`` and torch."""

    python: str  # "3.11"
    torch: str | None  # torch.__version__, None when torch does not import
    cuda: str | None  # torch.version.cuda: None for a CPU build
    torch_error: str | None = None


_PROBE = """
import json, sys
info = {"python": "%d.%d" % sys.version_info[:2], "torch": None, "cuda": None, "torch_error": None}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda)
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
print(json.dumps(info))
"""


def probe_base(client, base_image: str) -> BaseImage:
    """Run ``python3`` in ``base_image`` (no network, removed after) and report its version and torch."""
    import json

    import docker

    try:
        client.images.get(base_image)
    except docker.errors.ImageNotFound:
        raise SettingsError("base_image", base_image, "an image present in the engine or pullable from a registry",
                            hint=f"`docker pull {base_image}`, or make a local one (.ci/base-image.sh)") from None
    try:
        out = client.containers.run(base_image, ["python3", "-c", _PROBE], entrypoint=[], network_mode="none",
                                    remove=True, stdout=True, stderr=False, user="0")
    except docker.errors.ContainerError as exc:
        raise SettingsError("base_image", base_image, "an image with python3 on its PATH",
                            hint=f"python3 failed in it: {exc.stderr.decode(errors='replace')[-300:] if exc.stderr else exc}") from None
    return BaseImage(**json.loads(out.decode().strip().splitlines()[-1]))


def base_python(client, base_image: str) -> str:
    """``"3.11"``: the Python version of ``base_image``'s ``python3`` (a throw-away container)."""
    return probe_base(client, base_image).python


def check_cuda_base(base: BaseImage, base_image: str) -> None:
    """Refuse a ``--variant cuda`` base whose torch is missing, has no CUDA build, or is older
    than smash-runtime accepts (the image's venv sees the base's torch and installs none)."""
    from packaging.requirements import Requirement

    want = "a CUDA-enabled PyTorch image (torch with a CUDA build importable by its python3)"
    hint = f"for example --base {DEFAULT_CUDA_BASE_IMAGE}, or --variant cpu"
    if base.torch is None:
        raise SettingsError("base_image", base_image, want, hint=f"torch does not import there ({base.torch_error}); {hint}")
    if not base.cuda:
        raise SettingsError("base_image", base_image, want, hint=f"its torch {base.torch} is a CPU build; {hint}")
    needs = [Requirement(r) for r in importlib.metadata.requires(RUNTIME_DIST) or []]
    spec = next((r.specifier for r in needs if r.name == "torch" and not r.marker), None)
    if spec is not None and not spec.contains(base.torch.split("+")[0], prereleases=True):
        raise SettingsError("base_image", base_image, f"a CUDA PyTorch image with torch{spec} (what smash-runtime needs)",
                            hint=f"its torch is {base.torch}; {hint}")


def build_image(
    artifact_dir: str | os.PathLike,
    tag: str,
    *,
    base_image: str | None = None,
    push: bool = False,
    log: Log | None = print,
    variant: str = "cpu",
    include_compile_cache: str | os.PathLike | None = None,
    wheelhouse: Wheelhouse | None = None,
    runtime_source: str | os.PathLike | None = None,
    precompile: bool = True,
    nocache: bool = False,
    client=None,
    with_ray: bool = False,
) -> ImageInfo:
    """Build (and with ``push`` push) the image serving ``artifact_dir``, tagged ``tag``.

    The engine's build log streams line by line into ``log``. The base must have ``python3`` of
    the version the wheelhouse was resolved for (checked before building).

    Raises:
        EngineUnavailable: no engine at DOCKER_HOST.
        SettingsError: bad tag, variant, base image, or Python version mismatch.
        ArtifactError: the artifact is broken.
        ImageBuildError: the build or the push failed (with the engine's last log lines).
    """
    if not tag or not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9._/:@-]*", tag) or tag != tag.strip():
        raise SettingsError("tag", tag, "an image reference such as registry.example.com/team/model:v1")
    client = client or docker_client()
    with tempfile.TemporaryDirectory(prefix="smash-image.") as scratch:
        return _build(client, artifact_dir, tag, base_image=base_image, push=push, log=log, variant=variant,
                      include_compile_cache=include_compile_cache, wheelhouse=wheelhouse,
                      runtime_source=runtime_source, precompile=precompile, nocache=nocache, scratch=Path(scratch),
                      with_ray=with_ray)


def _build(client, artifact_dir, tag, *, base_image, push, log, variant, include_compile_cache, wheelhouse,
           runtime_source, precompile, nocache, scratch, with_ray=False) -> ImageInfo:
    emit = log or (lambda _line: None)
    base_image = base_image or default_base_image(variant)
    base = probe_base(client, base_image)
    emit(f"base {base_image}: Python {base.python}, torch {base.torch or 'none'}"
         + (f" (CUDA {base.cuda})" if base.cuda else " (no CUDA build)" if base.torch else ""))
    if variant == "cuda":
        check_cuda_base(base, base_image)
    entries, info, _ = _prepare(artifact_dir, base_image=base_image, variant=variant,
                                include_compile_cache=include_compile_cache, wheelhouse=wheelhouse,
                                runtime_source=runtime_source, precompile=precompile, log=log, scratch=scratch,
                                with_ray=with_ray, python_version=base.python)
    py = base.python
    if py != info.wheelhouse.python_version:
        raise SettingsError("base_image", base_image, f"an image whose python3 is {info.wheelhouse.python_version}",
                            hint=f"it has Python {py}; resolve the wheelhouse with python_version={py!r} or pick another base")
    base_layers = len(client.images.get(base_image).attrs["RootFS"].get("Layers") or [])

    emit(f"building {tag} from {base_image} (context {info.size / 1e6:.1f} MB, SOURCE_DATE_EPOCH={info.source_date_epoch})")
    start = time.perf_counter()
    image_id, tail, cached = None, [], 0
    # network "none": nothing in the build may reach an index or registry; the lock is the only source.
    stream = client.api.build(
        fileobj=_stream_tar(entries), custom_context=True, tag=tag, network_mode="none", rm=True,
        forcerm=True, pull=False, nocache=nocache, decode=True, labels=None,
    )
    for chunk in stream:
        if "error" in chunk:
            raise ImageBuildError(f"building {tag} failed: {chunk['error'].strip()}\n" + "\n".join(tail[-30:]))
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        for line in (chunk.get("stream") or chunk.get("status") or "").splitlines():
            if line.strip():
                tail.append(line)
                cached += line.strip() == "---> Using cache"
                emit(line)
    if image_id is None:
        raise ImageBuildError(f"building {tag}: the engine reported no image ID\n" + "\n".join(tail[-30:]))
    seconds = time.perf_counter() - start
    image = client.images.get(image_id)
    attrs = image.attrs
    pushed = push_image(tag, client=client, log=emit) if push else None
    return ImageInfo(
        tag=tag, id=image_id, layers=tuple(attrs["RootFS"]["Layers"]), base_layers=base_layers,
        size=int(attrs["Size"]), labels=dict(attrs["Config"].get("Labels") or {}), build_seconds=seconds,
        context=info, pushed_digest=pushed, cached_steps=cached,
    )


def push_image(tag: str, *, client=None, log: Log | None = print) -> str:
    """Push ``tag`` with the engine's registry credentials (``docker login``); returns the
    pushed manifest digest (``sha256:...``).

    Raises:
        EngineUnavailable: no engine at DOCKER_HOST.
        ImageBuildError: the registry refused or could not be reached (its message included).
    """
    client = client or docker_client()
    emit = log or (lambda _line: None)
    repo, _, name_tag = tag.rpartition(":")
    if not repo or "/" in name_tag:
        repo, name_tag = tag, "latest"
    if "/" not in repo or "." not in repo.split("/")[0] and ":" not in repo.split("/")[0] and repo.split("/")[0] != "localhost":
        emit(f"note: {repo} names no registry host; the engine pushes it to Docker Hub")
    digest, last = None, ""
    for chunk in client.api.push(repo, tag=name_tag, stream=True, decode=True):
        if "error" in chunk:
            raise ImageBuildError(f"pushing {repo}:{name_tag} failed: {chunk['error'].strip()}")
        if (aux := chunk.get("aux")) and "Digest" in aux:
            digest = aux["Digest"]
        status = chunk.get("status", "")
        if status and status != last and "progress" not in chunk:
            emit(f"push: {chunk.get('id', '')} {status}".replace("  ", " "))
            last = status
    if digest is None:
        raise ImageBuildError(f"pushing {repo}:{name_tag}: the engine reported no digest")
    return digest
