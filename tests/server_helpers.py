"""Helpers for the HTTP server tests: a real uvicorn on loopback, raw HTTP calls, metrics, a stall gate.

Slow-GPU situations (a request still running, a full queue) are produced by :func:`stalled`, a
forward pre-hook on the transformer that waits on an Event: the pipeline stays the real one, it
just cannot take its next step until the test lets it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from smash_runtime.images import encode_png

GEN_ROUTE = "/v1/images/generations"
MANIFEST = {"name": "tiny-flux-test", "runtime": {"warmup": {"shapes": [{"height": 32, "width": 32, "steps": 1}]}}}
LIMITS = dict(max_n=4, max_steps=50, max_prompt_chars=1000, max_body_bytes=16384, min_size=16, max_size=256)


# --------------------------------------------------------------------------------------------
# helpers


class LiveServer:
    """``app`` served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "server did not stop"


def call(port, method, path, body=None, headers=None, timeout=120):
    """One request on a fresh connection: (status, headers with lower-case names, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, (bytes, str, type(None))))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def gen(port, timeout=120, headers=None, **fields):
    return call(port, "POST", GEN_ROUTE, {"prompt": "a red cube", "size": "32x32", "num_inference_steps": 1, **fields},
                headers=headers, timeout=timeout)


def wait_ready(port, timeout=120, headers=None) -> list[str]:
    """Poll /ready until 200; the statuses seen on the way."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        status, _, body = call(port, "GET", "/ready", headers=headers)
        seen.append(json.loads(body)["status"])
        if status == 200:
            return seen
        assert time.monotonic() < deadline, f"not ready after {timeout} s: {seen[-1]}"
        time.sleep(0.1)


def metrics(port, headers=None) -> dict[tuple, float]:
    status, _, body = call(port, "GET", "/metrics", headers=headers)
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(snapshot, name, **labels) -> float:
    return snapshot.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


def requests_total(snapshot, status) -> float:
    return metric(snapshot, "smash_requests_total", method="POST", route=GEN_ROUTE, status=status)


def wait_until(predicate, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def answers_200(proc, log_path, port, path, tail=4000):
    """A predicate for ``wait_until``: ``path`` answers 200; fails at once (with the log) if ``proc`` died."""
    def check():
        assert proc.poll() is None, log_path.read_text()[-tail:]
        try:
            return call(port, "GET", path, timeout=5)[0] == 200
        except OSError:
            return False
    return check


@contextlib.contextmanager
def stalled(pipe):
    """Make the transformer wait before every step until the yielded Event is set."""
    gate = threading.Event()
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: gate.wait(120) and None)
    try:
        yield gate
    finally:
        gate.set()
        handle.remove()


def reference_pngs(pipe, prompt, seed, steps, size, n=1) -> list[bytes]:
    """The in-process reference: the diffusers pipeline called directly with a CPU generator."""
    images = pipe(prompt, num_inference_steps=steps, height=size, width=size, num_images_per_prompt=n,
                  generator=torch.Generator("cpu").manual_seed(seed)).images
    return [encode_png(image) for image in images]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
