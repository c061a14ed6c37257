"""A hash-locked wheelhouse for the runtime: every wheel a container image installs, resolved on
the host, so the image build needs no package index (and no CA bundle, token or compiler).

    >>> from smash_build.exporters.lock import resolve_wheelhouse
    >>> wh = resolve_wheelhouse("ctx/wheels", variant="cpu")
    >>> wh.lock.read_text().splitlines()[0]
    '# smash-build wheelhouse lock: install with pip install --no-index --require-hashes ...'

The folder holds the smash-runtime wheel (built from the installed runtime's source tree in an
editable install, else re-packed from the installed files: smash-runtime is not on any package
index), the wheels of its dependencies and of the ``serve`` extra,
``requirements.lock`` (``name==version --hash=sha256:...`` for each), and the pip wheel the
image runs the install with (``tools.lock`` records its hash; the Dockerfile checks it).

Torch follows the base image: ``variant="cpu"`` pins the host's torch build (on this project's
machines the CPU wheel from the local find-links folder; an unpinned ``torch`` would pull a
multi-GB CUDA build); ``variant="cuda"`` leaves torch out of the lock, for a base that ships its
own CUDA torch (``pytorch/pytorch:*-runtime``, NGC): the image's venv then sees the base's
site-packages.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packaging.utils import canonicalize_name, parse_wheel_filename

from smash_runtime.errors import SettingsError, SmashError
from smash_runtime.format import sha256_file

Variant = Literal["cpu", "cuda"]
VARIANTS = ("cpu", "cuda")
LOCK_FILE = "requirements.lock"
TOOLS_FILE = "tools.lock"
RUNTIME_DIST = "smash-runtime"
# Not in the lock: pip is the installer (tools.lock), torch comes from the base for "cuda".
_NOT_LOCKED = {"pip"}


@dataclass(frozen=True)
class Wheelhouse:
    """A folder of wheels plus the lock that installs exactly them."""

    path: Path
    lock: Path
    pip_wheel: Path
    runtime_wheel: Path
    variant: str
    python_version: str

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*.whl"))


sha256_of = sha256_file  # one file hasher: smash_runtime.format.sha256_file


def _host_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def runtime_source_dir() -> Path | None:
    """The source tree of the installed smash-runtime (editable/dev installs), else None."""
    import smash_runtime

    root = Path(smash_runtime.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


# dist-info files that belong to one installation, not to the wheel it came from
_INSTALL_ONLY = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


def _zip_date(epoch: int) -> tuple[int, int, int, int, int, int]:
    import time

    return time.gmtime(max(epoch, 315532800))[:6]  # zip dates start in 1980


def runtime_wheel_from_installed(dest: str | os.PathLike, *, source_date_epoch: int = 315532800) -> Path:
    """Re-pack the installed smash-runtime (a regular, non-editable install) into a wheel in ``dest``.

    The files are those the installation's ``RECORD`` lists inside site-packages (byte code and
    the per-install ``INSTALLER``/``REQUESTED``/``direct_url.json`` left out; console scripts are
    recreated from ``entry_points.txt`` when the wheel is installed). Entries are sorted and dated
    ``source_date_epoch``, so the same installation gives the same wheel bytes.

        >>> runtime_wheel_from_installed("wheels/").name
        'smash_runtime-0.1.0-py3-none-any.whl'
    """
    import base64
    import zipfile

    dist = importlib.metadata.distribution(RUNTIME_DIST)
    listed = [f for f in dist.files or [] if ".." not in f.parts and "__pycache__" not in f.parts
              and f.suffix != ".pyc"]
    info_dir = next((f.parts[0] for f in listed if f.parts[0].endswith(".dist-info")), None)
    if info_dir is None or not any(f.parts[0] == "smash_runtime" for f in listed):
        raise SmashError(f"the installed {RUNTIME_DIST} ({dist.locate_file('')}) lists no package files in its RECORD "
                         "(an editable install without its source tree?); reinstall it or pass runtime_source")
    files = sorted((f for f in listed if not (f.parts[0] == info_dir and f.name in _INSTALL_ONLY)),
                   key=lambda f: (f.parts[0] == info_dir, f.as_posix()))  # dist-info last, as wheels have it
    wheel_meta = (dist.read_text("WHEEL") or "")
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    if len(tags) != 1:
        raise SmashError(f"the installed {RUNTIME_DIST} has no single wheel tag in its WHEEL file: {tags}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = canonicalize_name(RUNTIME_DIST).replace("-", "_")
    wheel = dest / f"{name}-{dist.version}-{tags[0]}.whl"
    date = _zip_date(source_date_epoch)
    record = []
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in files:
            data = Path(dist.locate_file(f)).read_bytes()
            entry = zipfile.ZipInfo(f.as_posix(), date_time=date)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f.as_posix()},sha256={digest},{len(data)}")
        entry = zipfile.ZipInfo(f"{info_dir}/RECORD", date_time=date)
        entry.external_attr = 0o644 << 16
        entry.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(entry, "\n".join([*record, f"{info_dir}/RECORD,,"]) + "\n")
    return wheel


def _pip(args: list[str], log: Callable[[str], None] | None, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        if log and line:
            log(line)
    if proc.wait() != 0:
        raise SmashError(f"pip {args[0]} failed (exit {proc.returncode}) while resolving the wheelhouse:\n" + "\n".join(tail))


def build_runtime_wheel(dest: str | os.PathLike, *, source: str | os.PathLike | None = None,
                        source_date_epoch: int = 315532800, log: Callable[[str], None] | None = None) -> Path:
    """Build the smash-runtime wheel into ``dest`` from ``source`` (default: the installed runtime's
    source tree); with no source tree (a regular install), re-pack the installed files
    (:func:`runtime_wheel_from_installed`).

    The build runs on a copy (no build folders appear in the source tree) with ``SOURCE_DATE_EPOCH``
    set, so the same source gives the same wheel bytes.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = Path(source) if source is not None else runtime_source_dir()
    if source is None:
        return runtime_wheel_from_installed(dest, source_date_epoch=source_date_epoch)
    else:
        if not (source / "pyproject.toml").is_file():
            raise SettingsError("runtime_source", str(source), "a folder holding smash-runtime's pyproject.toml")
        with tempfile.TemporaryDirectory(prefix="smash-runtime-src.") as tmp:
            copy = Path(tmp) / "src"
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns(
                "*.egg-info", "__pycache__", "*.pyc", ".setuptools-build", "build", "dist"))
            # setuptools (>= 70.1) ships bdist_wheel; without build isolation no index is needed.
            isolation = ["--no-build-isolation"] if _has_setuptools_wheel() else []
            _pip(["wheel", "--no-deps", *isolation, "-w", str(dest), str(copy)], log,
                 env={"SOURCE_DATE_EPOCH": str(source_date_epoch)})
    wheels = sorted(p for p in dest.glob("*.whl") if canonicalize_name(parse_wheel_filename(p.name)[0]) == RUNTIME_DIST)
    if len(wheels) != 1:
        raise SmashError(f"expected one {RUNTIME_DIST} wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def _has_setuptools_wheel() -> bool:
    try:
        import setuptools.command.bdist_wheel  # noqa: F401
    except ImportError:
        return False
    return True


def host_constraints() -> str:
    """``name==version`` for each distribution installed in this interpreter (not the smash ones)."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in {RUNTIME_DIST, "smash-build", "pip"}:
            pins[name] = dist.version
    return "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))


def lock_text(wheels: list[Path], *, exclude: set[str] = frozenset(), only: set[str] | None = None,
              header: str = "") -> str:
    """Lock lines ``name==version --hash=sha256:...`` for ``wheels`` (sorted by name; pip and
    ``exclude`` left out, or just ``only``). Raises if two wheels claim the same distribution."""
    seen: dict[str, str] = {}
    lines = [
        "# smash-build wheelhouse lock: install with pip install --no-index --require-hashes "
        "--find-links WHEELS -r THIS_FILE",
    ]
    if header:
        lines += [f"# {h}" for h in header.splitlines()]
    entries = []
    for wheel in sorted(wheels, key=lambda p: p.name):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        name = canonicalize_name(name)
        if name in _NOT_LOCKED or name in exclude or (only is not None and name not in only):
            continue
        if name in seen:
            raise SmashError(f"wheelhouse {wheel.parent} holds two wheels of {name}: {seen[name]} and {wheel.name}")
        seen[name] = wheel.name
        entries.append(f"{name}=={version} \\\n    --hash=sha256:{sha256_of(wheel)}")
    return "\n".join(lines + entries) + "\n"


def write_lock(wheel_dir: str | os.PathLike, *, exclude: set[str] = frozenset(), header: str = "") -> Path:
    """Write ``requirements.lock`` for every wheel in ``wheel_dir`` (see :func:`lock_text`)."""
    wheel_dir = Path(wheel_dir)
    path = wheel_dir / LOCK_FILE
    path.write_text(lock_text(list(wheel_dir.glob("*.whl")), exclude=exclude, header=header), encoding="utf-8")
    return path


def _pip_wheel_into(dest: Path, cache: Path, log) -> Path:
    """The installer: the host's pip version, as a wheel, hash recorded in tools.lock."""
    version = importlib.metadata.version("pip")
    for p in cache.glob("pip-*.whl"):
        if parse_wheel_filename(p.name)[1].public == version:
            shutil.copy2(p, dest / p.name)
    existing = [p for p in dest.glob("pip-*.whl") if parse_wheel_filename(p.name)[1].public == version]
    if not existing:
        _pip(["download", "--no-deps", "--only-binary=:all:", "-d", str(dest), f"pip=={version}"], log)
        existing = [p for p in dest.glob("pip-*.whl") if parse_wheel_filename(p.name)[1].public == version]
    wheel = existing[0]
    (dest / TOOLS_FILE).write_text(f"{sha256_of(wheel)}  {wheel.name}\n", encoding="utf-8")
    return wheel


def resolve_wheelhouse(
    dest: str | os.PathLike,
    *,
    variant: Variant = "cpu",
    extras: tuple[str, ...] = ("serve",),
    python_version: str | None = None,
    platform: str = "manylinux_2_36_x86_64",
    runtime_source: str | os.PathLike | None = None,
    runtime_wheel: str | os.PathLike | None = None,
    source_date_epoch: int = 315532800,
    match_host: bool = True,
    find_links: tuple[str | os.PathLike, ...] = (),
    log: Callable[[str], None] | None = None,
) -> Wheelhouse:
    """Resolve smash-runtime (+ ``extras``) and all its dependencies into wheels in ``dest`` and
    write the hash lock.

    ``python_version`` is the base image's Python (``"3.11"``); the default is the host's, and then
    pip resolves for this very interpreter (sdists get built into wheels here, where compilers may
    exist). For another version, pip downloads binary wheels for ``platform`` (a glibc manylinux
    tag no newer than the base's glibc; Debian bookworm has 2.36).

    ``runtime_wheel`` reuses a prebuilt smash-runtime wheel; otherwise one is built from
    ``runtime_source`` (default: the installed runtime's source tree).

    ``match_host`` pins every dependency that is installed here to the installed version, so the
    image runs the library versions the artifact was built and checked with (the resolve is
    otherwise free to pick newer releases).

    Wheels already in ``dest`` or in ``find_links`` folders are reused rather than fetched (pass the
    same folder, or an earlier wheelhouse, to re-resolve cheaply).
    """
    if variant not in VARIANTS:
        raise SettingsError("variant", variant, "one of: " + ", ".join(VARIANTS),
                            hint="cpu: CPU torch in the image; cuda: torch from a CUDA base image")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    python_version = python_version or _host_python()
    with tempfile.TemporaryDirectory(prefix="smash-lock.") as tmp:
        # Wheels from an earlier resolve become a local cache (pip copies, not fetches, them);
        # dest then holds exactly what this resolve picks, so the lock lists nothing stale.
        cache = Path(tmp) / "cache"
        cache.mkdir()
        for old in [*dest.glob("*.whl"), dest / LOCK_FILE, dest / TOOLS_FILE]:
            if old.exists() and not old.name.startswith("smash_runtime-"):
                old.rename(cache / old.name)
            elif old.exists() and (runtime_wheel is None or old.resolve() != Path(runtime_wheel).resolve()):
                old.unlink()
        if runtime_wheel is not None:
            wheel = dest / Path(runtime_wheel).name
            if wheel.resolve() != Path(runtime_wheel).resolve():
                shutil.copy2(runtime_wheel, wheel)
        else:
            wheel = build_runtime_wheel(dest, source=runtime_source, source_date_epoch=source_date_epoch, log=log)
        return _resolve(dest, wheel, cache, Path(tmp), variant=variant, extras=extras, python_version=python_version,
                        platform=platform, match_host=match_host, find_links=find_links, log=log)


def _resolve(dest: Path, wheel: Path, cache: Path, tmp: Path, *, variant, extras, python_version, platform,
             match_host, find_links, log) -> Wheelhouse:
    requirement = f"{wheel}[{','.join(extras)}]" if extras else str(wheel)

    # Pinned to the host's build even for "cuda": an unpinned torch resolves to a multi-GB CUDA
    # wheel. For "cuda" it only steers the resolve and is dropped below (the base brings torch).
    reqs = [requirement, f"torch=={importlib.metadata.version('torch')}"]
    exclude: set[str] = {"torch"} if variant == "cuda" else set()
    common = ["-w" if python_version == _host_python() else "-d", str(dest), "--find-links", str(cache)]
    for extra in find_links:
        common += ["--find-links", str(extra)]
    if python_version == _host_python():
        args = ["wheel", *common, *reqs]
    else:
        args = ["download", *common, "--only-binary=:all:", "--implementation", "cp",
                "--python-version", python_version, "--platform", platform, *reqs]
    if match_host:
        constraints = tmp / "host-constraints.txt"
        constraints.write_text(host_constraints(), encoding="utf-8")
        args += ["-c", str(constraints)]
    _pip(args, log)
    if variant == "cuda":
        for p in dest.glob("torch-*.whl"):
            p.unlink()
    _pip_wheel_into(dest, cache, log)
    lock = write_lock(dest, exclude=exclude, header=f"variant={variant} python={python_version}")
    return Wheelhouse(path=dest, lock=lock, pip_wheel=next(dest.glob("pip-*.whl")), runtime_wheel=wheel,
                      variant=variant, python_version=python_version)


def _requires_dist(wheel: Path) -> list[str]:
    import zipfile
    from email.parser import Parser

    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode("utf-8"))
    return sorted(meta.get_all("Requires-Dist") or [])


def with_runtime_wheel(wheelhouse: Wheelhouse, wheel: str | os.PathLike, dest: str | os.PathLike) -> Wheelhouse:
    """A copy of ``wheelhouse`` in ``dest`` (hard links where possible) with smash-runtime replaced by
    ``wheel``: new runtime code without resolving the dependencies again.

    Raises:
        SettingsError: ``wheel`` declares other dependencies than the locked one (resolve anew).
    """
    wheel, dest = Path(wheel), Path(dest)
    if _requires_dist(wheel) != _requires_dist(wheelhouse.runtime_wheel):
        raise SettingsError("runtime_wheel", wheel.name, f"a {RUNTIME_DIST} wheel with the dependencies of "
                            f"{wheelhouse.runtime_wheel.name}", hint="its dependencies changed: use resolve_wheelhouse")
    dest.mkdir(parents=True, exist_ok=True)
    for src in [*wheelhouse.path.glob("*.whl"), wheelhouse.path / TOOLS_FILE]:
        if src.resolve() == wheelhouse.runtime_wheel.resolve():
            continue
        target = dest / src.name
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)
    shutil.copy2(wheel, dest / wheel.name)
    lock = write_lock(dest, exclude={"torch"} if wheelhouse.variant == "cuda" else set(),
                      header=f"variant={wheelhouse.variant} python={wheelhouse.python_version}")
    return Wheelhouse(path=dest, lock=lock, pip_wheel=dest / wheelhouse.pip_wheel.name, runtime_wheel=dest / wheel.name,
                      variant=wheelhouse.variant, python_version=wheelhouse.python_version)
