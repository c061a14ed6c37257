"""The Docker engine for the container tests: find it (or skip with the reason), make sure the
local base image exists, run containers and read images' file systems.

CI starts a private engine first (`eval "$(.ci/docker-up.sh)"`, see docs/container.md); the
tests use whatever engine DOCKER_HOST names, and skip with the reason when none answers.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("SMASH_TEST_BASE_IMAGE", "smash-base:bookworm-py311")


def engine_or_skip():
    """A docker client for DOCKER_HOST's engine, or ``pytest.skip`` saying why there is none."""
    from smash_build.exporters.image import EngineUnavailable, docker_client

    try:
        return docker_client()
    except EngineUnavailable as exc:
        pytest.skip(f"no Docker engine: {exc}")


def ensure_base_image(client, tag: str = BASE_IMAGE) -> str:
    """``tag``, made with .ci/base-image.sh when the engine lacks it (a `docker load` from the
    cache folder when one was saved, else debootstrap: ~2 min, root, Debian mirror)."""
    import docker

    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    env = {**os.environ, "SMASH_BASE_TAG": tag}
    proc = subprocess.run([str(REPO / ".ci" / "base-image.sh")], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"base image {tag} is missing and .ci/base-image.sh failed: {proc.stderr[-800:]}")
    return tag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, container, timeout: float = 300.0) -> None:
    """Poll ``url`` (``/ready``) until 200; fail early with the logs if the container exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        if container.status in ("exited", "dead"):
            raise AssertionError(f"container exited ({container.attrs['State']}):\n{container.logs().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} not ready after {timeout:.0f} s:\n{container.logs().decode()[-3000:]}")


class _ChunkReader(io.RawIOBase):
    """A file over an iterator of byte chunks (the engine's export stream)."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            try:
                self.buf = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n


def exported_files(client, image: str) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Every entry of ``image``'s merged file system (``docker export`` of a created, never
    started container), streamed: yields (member, tar) so callers can read chosen files."""
    container = client.containers.create(image, entrypoint=["true"], network_mode="none")
    try:
        stream = io.BufferedReader(_ChunkReader(client.api.export(container.id, chunk_size=1 << 20)), 1 << 20)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                yield member, tar
    finally:
        container.remove(force=True)
