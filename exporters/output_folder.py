"""Where a build may write, and how it replaces a previous artifact without ever losing it.

The builder only ever replaces a folder that is itself a previous smash-build artifact
(recognised by its ``smash.json``); it refuses a non-empty folder that is not one, the
manifest's own folder, and any output that is, contains or lies inside the source folder.
A new artifact is written beside the target as ``.<name>.partial-<pid>`` and swapped in:

- on Linux with ``renameat2(RENAME_EXCHANGE)`` (macOS: ``renamex_np(RENAME_SWAP)``), which
  exchanges the two names atomically, so the target holds the complete old or the complete
  new artifact at every instant;
- elsewhere (or on a file system without exchange) with two renames; a build killed between
  them leaves the old artifact as ``.<name>.partial-old-<pid>``, which the next build (or
  :func:`recover_leftovers`) moves back before doing anything else.

Leftovers of killed builds are recovered or reported, never deleted silently.

    >>> check_output_folder(Path("dist/tiny-flux"), protected={"the manifest's folder": Path("manifests")})
    >>> partial = new_partial(Path("dist/tiny-flux"))        # write the artifact into it, then
    >>> replace_folder(partial, Path("dist/tiny-flux"))
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from smash_runtime.errors import SettingsError
from smash_runtime.format import FORMAT_NAME, RECORD_FILE

PARTIAL_MARK = ".partial-"
RETIRED_MARK = "old-"
_ALLOWED = "a new path, an empty folder, or a previous smash-build artifact (a folder with smash.json)"


def _checkpoint(phase: str) -> None:
    """Named points of a build's write sequence; crash tests end the process here."""


def looks_like_artifact(folder: Path) -> bool:
    """A previous smash-build artifact: its ``smash.json`` is a JSON object of the artifact format.

    Only the record's identity is checked (not its files): a damaged old artifact may still be replaced.
    """
    path = folder / RECORD_FILE
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 * 1024 * 1024:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(target: Path, protected: dict[str, Path | None] | None = None) -> Path:
    """Refuse an output folder the build must not replace; returns its resolved path.

    ``protected`` names folders the output may not be, contain or lie inside
    (``{"the source folder": src}``), besides the manifest's folder, which it may not be.

    Raises:
        SettingsError (``output.dir``): naming the folder and why; nothing has been touched.
    """
    target = Path(target)
    if target.is_symlink():
        raise SettingsError("output.dir", str(target), _ALLOWED, hint="it is a symlink; name the real folder")
    resolved = target.resolve()
    for what, folder in (protected or {}).items():
        if folder is None:
            continue
        folder = Path(folder).resolve()
        if what.startswith("the manifest"):
            clash = resolved == folder or _inside(folder, resolved)
        else:
            clash = _inside(resolved, folder) or _inside(folder, resolved)
        if clash:
            raise SettingsError("output.dir", str(target), f"a folder apart from {what} ({folder})",
                                hint="building there would overwrite it; choose another output folder")
    if resolved.exists():
        if not resolved.is_dir():
            raise SettingsError("output.dir", str(target), _ALLOWED, hint="it is a file")
        if any(resolved.iterdir()) and not looks_like_artifact(resolved):
            raise SettingsError("output.dir", str(target), _ALLOWED,
                                hint="it holds files and no smash.json, so it is not an artifact; it was left untouched")
    return resolved


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover_pid(path: Path, target: Path) -> int | None:
    tail = path.name[len(f".{target.name}{PARTIAL_MARK}"):].removeprefix(RETIRED_MARK)
    return int(tail) if tail.isdigit() else None


def recover_leftovers(target: Path, log: Callable[[str], None]) -> None:
    """Deal with what killed builds left beside ``target``, saying what was done.

    A retired old artifact (killed between the two renames) is moved back when the target is
    missing; leftovers of finished swaps and incomplete builds are removed and reported.
    Leftovers of a build that is still running are left alone.
    """
    target = Path(target)
    prefix = f".{target.name}{PARTIAL_MARK}"
    leftovers = sorted(p for p in target.parent.glob(f"{prefix}*") if p.is_dir() and not p.is_symlink())
    leftovers = [p for p in leftovers if (pid := _leftover_pid(p, target)) is not None and not _pid_alive(pid)]
    # The retired old artifact first: it is the one the target held before the crash.
    leftovers.sort(key=lambda p: not p.name.startswith(prefix + RETIRED_MARK))
    for path in leftovers:
        if not target.exists() and looks_like_artifact(path):
            path.rename(target)
            log(f"recovered {target} from {path.name}, left by a build that was killed while replacing it")
            continue
        what = "a complete artifact not in use at" if looks_like_artifact(path) else "an incomplete build of"
        shutil.rmtree(path)
        log(f"removed {path.name}: {what} {target.name}, left by a killed build")


def new_partial(target: Path) -> Path:
    """A fresh, empty folder beside ``target`` to write the new artifact into."""
    partial = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)  # our own pid: an earlier attempt of this very process
    partial.mkdir(parents=True)
    return partial


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (both must exist); False where the OS or the
    file system cannot, in which case nothing was changed."""
    try:
        libc = _libc()
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            result = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rename_swap = 2
            result = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap)
        else:
            return False
    except OSError:
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def replace_folder(partial: Path, target: Path, *, use_exchange: bool = True) -> None:
    """Put the finished ``partial`` at ``target``; whatever was there (an artifact, or an empty
    folder, as checked by :func:`check_output_folder`) is removed once the new one is in place."""
    if not target.exists():
        partial.rename(target)
        _checkpoint("renamed")
        return
    if use_exchange and exchange(partial, target):
        _checkpoint("exchanged")
        shutil.rmtree(partial)  # now the old artifact
        return
    retired = target.parent / f".{target.name}{PARTIAL_MARK}{RETIRED_MARK}{os.getpid()}"
    target.rename(retired)
    _checkpoint("retired")  # the one moment the target is missing: recover_leftovers undoes it
    partial.rename(target)
    _checkpoint("renamed")
    shutil.rmtree(retired)
