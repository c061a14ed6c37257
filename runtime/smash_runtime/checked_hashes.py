"""Hashes this machine already checked, trusted again only while the file is provably unchanged.

``verify="fast"`` (the default) hashes a listed file once; the sha256 it matched is kept with
the file's identity: device, inode, size, mtime and ctime (nanoseconds). A later load reuses
the hash only while all five are unchanged. Writing to a file moves its ctime, and no user
call sets a ctime back (``utime`` sets mtime and atime only), so a flipped byte, a truncation
or a replaced file is hashed again, and refused, before any weight is used. A file that
changed within ``RACY_NS`` of its check is never remembered: a second write inside the same
timestamp tick would leave its identity unchanged (git calls such entries "racily clean").

One small JSON file per artifact folder, under ``$SMASH_HASH_CACHE``, else
``$XDG_CACHE_HOME/smash/hashes`` (``~/.cache/smash/hashes``); set ``SMASH_HASH_CACHE=""`` to
keep nothing. It lives with the user's other caches and is trusted like them; it never lives
inside an artifact. A damaged or unreadable one is ignored (every file is hashed again).

    >>> hashes = CheckedHashes.for_root(Path("dist/tiny-flux").resolve())
    >>> hashes.lookup("vae/config.json", os.stat("dist/tiny-flux/vae/config.json"))  # None: not checked yet
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger("smash_runtime")

ENV_ROOT = "SMASH_HASH_CACHE"
RACY_NS = 2_000_000_000  # FAT keeps mtime in 2 s steps; every other local file system is finer
_FORMAT = 1
_MAX_BYTES = 4 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024


def default_root() -> Path | None:
    """``$SMASH_HASH_CACHE`` (empty: remember nothing), else ``$XDG_CACHE_HOME/smash/hashes``."""
    if ENV_ROOT in os.environ:
        return Path(os.environ[ENV_ROOT]) if os.environ[ENV_ROOT] else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smash" / "hashes"


def identity(st: os.stat_result) -> list[int]:
    """What must stay equal for a remembered hash to hold."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 8 MiB chunks (hashlib releases the GIL, so threads hash in parallel)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class CheckedHashes:
    """The remembered hashes of one artifact folder (``root_real``: its resolved path)."""

    def __init__(self, file: Path | None, root_real: Path):
        self.file = file
        self.root = str(root_real)
        self.entries: dict[str, dict] = {}
        self._changed = False
        if file is not None:
            self.entries = self._read(file)

    @classmethod
    def for_root(cls, root_real: Path, folder: Path | None | bool = True) -> CheckedHashes:
        """The record for ``root_real`` in ``folder`` (``True``: :func:`default_root`; ``None``/``False``: none)."""
        folder = default_root() if folder is True else (folder or None)
        if folder is None:
            return cls(None, root_real)
        name = hashlib.sha256(str(root_real).encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return cls(Path(folder) / f"{name}.json", root_real)

    def _read(self, file: Path) -> dict[str, dict]:
        try:
            with open(file, "rb") as f:
                raw = f.read(_MAX_BYTES + 1)
            if len(raw) > _MAX_BYTES:
                raise ValueError("too large")
            data = json.loads(raw)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            logger.info("ignoring the checked-hash record %s (%s); files are hashed again", file, type(exc).__name__)
            return {}
        if not (isinstance(data, dict) and data.get("format") == _FORMAT and data.get("root") == self.root
                and isinstance(data.get("files"), dict)):
            logger.info("ignoring the checked-hash record %s (another format or folder); files are hashed again", file)
            return {}
        return {rel: e for rel, e in data["files"].items()
                if isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("identity"), list)}

    def lookup(self, rel: str, st: os.stat_result) -> str | None:
        """The sha256 remembered for ``rel`` if the file at hand is the very file that was hashed."""
        entry = self.entries.get(rel)
        if entry is None or entry["identity"] != identity(st):
            return None
        return entry["sha256"]

    def remember(self, rel: str, before: os.stat_result, after: os.stat_result, sha256: str, started_ns: int) -> None:
        """Keep ``sha256`` for ``rel`` if the file did not change while, or just before, it was hashed."""
        if identity(before) != identity(after):
            self.forget(rel)
            return
        if max(after.st_mtime_ns, after.st_ctime_ns) > started_ns - RACY_NS:
            self.forget(rel)  # changed too recently to tell a later same-tick write apart
            return
        entry = {"sha256": sha256, "identity": identity(after)}
        if self.entries.get(rel) != entry:
            self.entries[rel] = entry
            self._changed = True

    def forget(self, rel: str) -> None:
        if self.entries.pop(rel, None) is not None:
            self._changed = True

    def save(self) -> None:
        """Write the record atomically; a folder that cannot be written only costs a re-hash next time."""
        if self.file is None or not self._changed:
            return
        data = {"format": _FORMAT, "root": self.root, "files": dict(sorted(self.entries.items()))}
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(tmp, self.file)
            self._changed = False
        except OSError as exc:
            logger.info("could not keep checked hashes in %s (%s); the next load hashes again", self.file, exc)


def hash_in_parallel(paths: dict[str, Path]) -> dict[str, tuple[str, os.stat_result, os.stat_result, int]]:
    """``{rel: (sha256, stat before, stat after, start ns)}`` for every path, several files at once."""

    def one(path: Path):
        started = time.time_ns()
        before = os.stat(path)
        digest = sha256_file(path)
        return digest, before, os.stat(path), started

    if len(paths) <= 1:
        return {rel: one(path) for rel, path in paths.items()}
    workers = min(len(paths), os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="smash-hash") as pool:
        futures = {rel: pool.submit(one, path) for rel, path in paths.items()}
        return {rel: future.result() for rel, future in futures.items()}
