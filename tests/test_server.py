"""The HTTP server: real uvicorn on 127.0.0.1, real tiny-flux pipeline, real clients.

Slow-GPU situations (a request still running, a full queue) are produced by
``server_helpers.stalled``: the pipeline stays the real one, it just cannot take its next step
until the test lets it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from diffusers import AutoPipelineForImage2Image
from PIL import Image

from smash_build.tiny_models import build_tiny
from smash_runtime.errors import ArtifactError
from smash_runtime.images import encode_png, generate
from smash_runtime.server import ServerSettings, create_app
from smash_runtime.server.jsonlog import LOGGER, JsonFormatter

from server_helpers import (  # shared with test_openai_compat.py
    GEN_ROUTE, LIMITS, MANIFEST, LiveServer, answers_200, call, free_port, gen, metric, metrics, reference_pngs, requests_total,
    stalled, wait_ready, wait_until,
)


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny("tiny-flux")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def reference_pipe():
    p = build_tiny("tiny-flux")  # same seed, separate object: nothing is shared with the server
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def server(pipe):
    app = create_app(lambda: (pipe, MANIFEST), ServerSettings(max_queue=4, **LIMITS), manifest=MANIFEST)
    with LiveServer(app) as live:
        wait_ready(live.port)
        yield live


# --------------------------------------------------------------------------------------------
# tests


def test_openai_client_gets_the_in_process_images(server, reference_pipe):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.images.generate(
        prompt="a red cube on a table", n=2, size="32x32", response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 2},
    )
    served = [base64.b64decode(item.b64_json) for item in result.data]
    expected = reference_pngs(reference_pipe, "a red cube on a table", seed=7, steps=2, size=32, n=2)
    for png in served:
        image = Image.open(io.BytesIO(png))
        assert (image.format, image.size) == ("PNG", (32, 32))
    assert served == expected
    assert served[0] != reference_pngs(reference_pipe, "a red cube on a table", seed=8, steps=2, size=32)[0]
    assert client.models.list().data[0].id == "tiny-flux-test"


def test_load_every_request_answered_200_or_429_and_counted(server, pipe):
    before = metrics(server.port)
    statuses, retry_after = Counter(), []
    lock = threading.Lock()
    remaining = iter(range(64))

    def client():
        while True:
            with lock:
                i = next(remaining, None)
            if i is None:
                return
            status, headers, body = gen(server.port, seed=i)
            with lock:
                statuses[status] += 1
                if status == 429:
                    retry_after.append(headers.get("retry-after"))
                    assert json.loads(body)["error"]["code"] == "queue_full"
                if status == 200:
                    assert len(json.loads(body)["data"]) == 1
            if status == 429:
                time.sleep(0.05)  # a polite client backs off a little (not the full Retry-After: keep it short)

    # Hold the "GPU" until the queue has overflowed once, so 429s are certain, then let it run.
    with stalled(pipe) as gate:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client) for _ in range(8)]
            wait_until(lambda: statuses[429] > 0, what="a 429 from the full queue")
            assert metric(metrics(server.port), "smash_queue_depth") == 4
            gate.set()
            for f in futures:
                f.result()

    after = metrics(server.port)
    assert sum(statuses.values()) == 64, statuses
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0 and statuses[429] > 0, statuses
    assert all(value is not None and int(value) >= 1 for value in retry_after)
    for status in (200, 429):
        assert requests_total(after, status) - requests_total(before, status) == statuses[status]
    images = metric(after, "smash_images_generated_total") - metric(before, "smash_images_generated_total")
    assert images == statuses[200]
    assert metric(after, "smash_queue_depth") == 0
    assert metric(after, "smash_request_duration_seconds_count", route=GEN_ROUTE) - metric(
        before, "smash_request_duration_seconds_count", route=GEN_ROUTE) == 64
    assert call(server.port, "GET", "/ready")[0] == 200


MB_PROMPT = json.dumps({"prompt": "x" * 1_000_000})

# (id, method, path, body, headers, expected status, expected error code, expected param)
BAD_REQUESTS = [
    ("broken json", "POST", GEN_ROUTE, '{"prompt": ', None, 400, "invalid_json", None),
    ("json array", "POST", GEN_ROUTE, "[1, 2]", None, 400, "invalid_json", None),
    ("json string", "POST", GEN_ROUTE, '"a cat"', None, 400, "invalid_json", None),
    ("empty body", "POST", GEN_ROUTE, "", None, 400, "invalid_json", None),
    ("invalid utf-8", "POST", GEN_ROUTE, b'{"prompt": "\xff\xfe"}', None, 400, "invalid_json", None),
    ("missing prompt", "POST", GEN_ROUTE, {}, None, 400, "missing_required_parameter", "prompt"),
    ("prompt null", "POST", GEN_ROUTE, {"prompt": None}, None, 400, "invalid_type", "prompt"),
    ("prompt number", "POST", GEN_ROUTE, {"prompt": 5}, None, 400, "invalid_type", "prompt"),
    ("prompt object", "POST", GEN_ROUTE, {"prompt": {"text": "a cat"}}, None, 400, "invalid_type", "prompt"),
    ("prompt empty", "POST", GEN_ROUTE, {"prompt": ""}, None, 400, "invalid_value", "prompt"),
    ("prompt too long", "POST", GEN_ROUTE, {"prompt": "x" * 1001}, None, 400, "invalid_value", "prompt"),
    ("1 MB prompt", "POST", GEN_ROUTE, MB_PROMPT, {"Content-Type": "application/json"}, 413, "request_too_large", None),
    ("1 MB chunked", "POST", GEN_ROUTE, iter([MB_PROMPT.encode()[i:i + 65536] for i in range(0, 1_000_020, 65536)]),
     {"Content-Type": "application/json"}, 413, "request_too_large", None),
    ("n = 0", "POST", GEN_ROUTE, {"prompt": "a", "n": 0}, None, 400, "invalid_value", "n"),
    ("n = 1000", "POST", GEN_ROUTE, {"prompt": "a", "n": 1000}, None, 400, "invalid_value", "n"),
    ("n string", "POST", GEN_ROUTE, {"prompt": "a", "n": "2"}, None, 400, "invalid_type", "n"),
    ("n float", "POST", GEN_ROUTE, {"prompt": "a", "n": 1.5}, None, 400, "invalid_type", "n"),
    ("n bool", "POST", GEN_ROUTE, {"prompt": "a", "n": True}, None, 400, "invalid_type", "n"),
    ("size word", "POST", GEN_ROUTE, {"prompt": "a", "size": "big"}, None, 400, "invalid_value", "size"),
    ("size negative", "POST", GEN_ROUTE, {"prompt": "a", "size": "-32x32"}, None, 400, "invalid_value", "size"),
    ("size int", "POST", GEN_ROUTE, {"prompt": "a", "size": 32}, None, 400, "invalid_type", "size"),
    ("size zero", "POST", GEN_ROUTE, {"prompt": "a", "size": "0x0"}, None, 400, "invalid_size", "size"),
    ("size huge", "POST", GEN_ROUTE, {"prompt": "a", "size": "99999x99999"}, None, 400, "invalid_size", "size"),
    ("size over limit", "POST", GEN_ROUTE, {"prompt": "a", "size": "512x512"}, None, 400, "invalid_size", "size"),
    ("size not multiple", "POST", GEN_ROUTE, {"prompt": "a", "size": "34x32"}, None, 400, "invalid_size", "size"),
    ("steps 10^6", "POST", GEN_ROUTE, {"prompt": "a", "num_inference_steps": 10**6}, None, 400, "invalid_value",
     "num_inference_steps"),
    ("steps 0", "POST", GEN_ROUTE, {"prompt": "a", "num_inference_steps": 0}, None, 400, "invalid_value",
     "num_inference_steps"),
    ("steps string", "POST", GEN_ROUTE, {"prompt": "a", "num_inference_steps": "4"}, None, 400, "invalid_type",
     "num_inference_steps"),
    ("seed negative", "POST", GEN_ROUTE, {"prompt": "a", "seed": -1}, None, 400, "invalid_value", "seed"),
    ("seed 2^64", "POST", GEN_ROUTE, {"prompt": "a", "seed": 2**64}, None, 400, "invalid_value", "seed"),
    ("guidance string", "POST", GEN_ROUTE, {"prompt": "a", "guidance_scale": "high"}, None, 400, "invalid_type",
     "guidance_scale"),
    ("guidance infinite", "POST", GEN_ROUTE, '{"prompt": "a", "guidance_scale": 1e400}', None, 400, "invalid_value",
     "guidance_scale"),
    ("negative_prompt list", "POST", GEN_ROUTE, {"prompt": "a", "negative_prompt": ["x"]}, None, 400, "invalid_type",
     "negative_prompt"),
    ("typo field", "POST", GEN_ROUTE, {"prompt": "a", "num_inference_step": 4}, None, 400, "unknown_parameter",
     "num_inference_step"),
    ("unsupported openai field", "POST", GEN_ROUTE, {"prompt": "a", "partial_images": 2}, None, 400,
     "unknown_parameter", "partial_images"),
    ("output_format gif", "POST", GEN_ROUTE, {"prompt": "a", "output_format": "gif"}, None, 400, "invalid_value",
     "output_format"),
    ("output_compression 101", "POST", GEN_ROUTE, {"prompt": "a", "output_compression": 101}, None, 400,
     "invalid_value", "output_compression"),
    ("background transparent", "POST", GEN_ROUTE, {"prompt": "a", "background": "transparent"}, None, 400,
     "unsupported_parameter", "background"),
    ("stream true", "POST", GEN_ROUTE, {"prompt": "a", "stream": True}, None, 400, "unsupported_parameter", "stream"),
    ("quality number", "POST", GEN_ROUTE, {"prompt": "a", "quality": 3}, None, 400, "invalid_type", "quality"),
    ("response_format url", "POST", GEN_ROUTE, {"prompt": "a", "response_format": "url"}, None, 400,
     "unsupported_response_format", "response_format"),
    ("response_format png", "POST", GEN_ROUTE, {"prompt": "a", "response_format": "png"}, None, 400, "invalid_value",
     "response_format"),
    ("other model", "POST", GEN_ROUTE, {"prompt": "a", "model": "dall-e-3"}, None, 400, "model_not_found", "model"),
    ("text/plain", "POST", GEN_ROUTE, '{"prompt": "a"}', {"Content-Type": "text/plain"}, 415,
     "unsupported_media_type", None),
    ("no content type", "POST", GEN_ROUTE, '{"prompt": "a"}', {}, 415, "unsupported_media_type", None),
    ("form encoded", "POST", GEN_ROUTE, "prompt=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type", None),
    ("GET on generations", "GET", GEN_ROUTE, None, None, 405, "method_not_allowed", None),
    ("unknown route", "POST", "/v1/images/variations", {"prompt": "a"}, None, 404, "not_found", None),
    ("edits as json", "POST", "/v1/images/edits", {"prompt": "a"}, None, 415, "unsupported_media_type", None),
    ("unknown model", "GET", "/v1/models/dall-e-3", None, None, 404, "model_not_found", "model"),
]


def test_bad_input_corpus_gets_documented_4xx_and_no_work(server):
    before = metrics(server.port)
    for name, method, path, body, headers, status, code, param in BAD_REQUESTS:
        if isinstance(body, str) or isinstance(body, bytes):
            headers = {"Content-Type": "application/json"} if headers is None else headers
        got, _, raw = call(server.port, method, path, body, headers)
        assert got == status, (name, got, raw[:300])
        error = json.loads(raw)["error"]
        assert (error["code"], error["param"]) == (code, param), (name, error)
        assert error["type"] == "invalid_request_error" and error["message"], (name, error)
        if param:
            assert param in error["message"], (name, error)
    after = metrics(server.port)
    assert len(BAD_REQUESTS) >= 25
    assert metric(after, "smash_images_generated_total") == metric(before, "smash_images_generated_total")
    assert metric(after, "smash_jobs_total", outcome="completed") == metric(before, "smash_jobs_total", outcome="completed")
    assert gen(server.port, seed=1)[0] == 200
    assert call(server.port, "GET", "/ready")[0] == 200


def test_client_disconnect_cancels_its_queued_job(server, pipe):
    before = metrics(server.port)
    with stalled(pipe) as gate, ThreadPoolExecutor(1) as pool:
        running = pool.submit(gen, server.port, seed=3)
        wait_until(lambda: metric(metrics(server.port), "smash_generations_in_progress") == 1, what="a running job")
        raw = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"prompt": "gone", "size": "32x32", "num_inference_steps": 1}).encode()
        raw.sendall(b"POST " + GEN_ROUTE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: metric(metrics(server.port), "smash_queue_depth") == 1, what="the second job queued")
        raw.close()
        wait_until(lambda: metric(metrics(server.port), "smash_jobs_total", outcome="cancelled")
                   == metric(before, "smash_jobs_total", outcome="cancelled") + 1, what="the cancellation")
        assert metric(metrics(server.port), "smash_queue_depth") == 0  # withdrawn, not left to run later
        gate.set()
        assert running.result()[0] == 200
    after = metrics(server.port)
    assert metric(after, "smash_images_generated_total") - metric(before, "smash_images_generated_total") == 1
    assert requests_total(after, 499) - requests_total(before, 499) == 1
    assert gen(server.port, seed=4)[0] == 200


def test_timeouts_cancel_queued_work_and_discard_running_work(pipe):
    settings = ServerSettings(max_queue=2, request_timeout_s=4.0, warmup=False, **LIMITS)
    with LiveServer(create_app(lambda: (pipe, MANIFEST), settings)) as live:
        wait_ready(live.port)
        with stalled(pipe) as gate, ThreadPoolExecutor(2) as pool:
            running = pool.submit(gen, live.port, seed=1)
            wait_until(lambda: metric(metrics(live.port), "smash_generations_in_progress") == 1, what="a running job")
            queued = pool.submit(gen, live.port, seed=2)
            for future in (running, queued):
                status, headers, body = future.result()
                assert status == 503 and json.loads(body)["error"]["code"] == "timeout", body
                assert int(headers["retry-after"]) >= 1
            snapshot = metrics(live.port)
            assert metric(snapshot, "smash_jobs_total", outcome="cancelled") == 1
            assert metric(snapshot, "smash_queue_depth") == 0
            gate.set()
            wait_until(lambda: metric(metrics(live.port), "smash_jobs_total", outcome="discarded") == 1,
                       what="the abandoned job to finish")
        assert gen(live.port, seed=5, size="16x16")[0] == 200  # the worker survived both
        snapshot = metrics(live.port)
        assert metric(snapshot, "smash_jobs_total", outcome="completed") == 1
        assert requests_total(snapshot, 503) == 2


def test_ready_is_503_until_loaded_and_warmed_up(pipe):
    release = threading.Event()

    def load_pipeline():
        release.wait(60)
        return pipe, MANIFEST

    settings = ServerSettings(warmup_delay_s=0.5, **LIMITS)
    with LiveServer(create_app(load_pipeline, settings, manifest=MANIFEST)) as live:
        assert call(live.port, "GET", "/health")[0] == 200
        status, _, body = call(live.port, "GET", "/ready")
        assert (status, json.loads(body)["status"]) == (503, "loading")
        status, headers, body = gen(live.port)
        assert (status, json.loads(body)["error"]["code"]) == (503, "not_ready") and "retry-after" in headers
        models = json.loads(call(live.port, "GET", "/v1/models")[2])["data"][0]
        assert models["id"] == "tiny-flux-test" and models["ready"] is False
        assert metric(metrics(live.port), "smash_ready") == 0
        release.set()
        seen = wait_ready(live.port)
        assert "warming_up" in seen and seen[-1] == "ready", seen
        snapshot = metrics(live.port)
        assert metric(snapshot, "smash_ready") == 1 and metric(snapshot, "smash_warmup_seconds") > 0
        assert gen(live.port)[0] == 200
        schema = json.loads(call(live.port, "GET", "/openapi.json")[2])  # documents the limits it enforces
        body = schema["paths"][GEN_ROUTE]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["n"]["maximum"] == LIMITS["max_n"] and body["additionalProperties"] is False


def test_failed_load_reports_on_ready(pipe):
    errors = []

    def load_pipeline():
        raise ArtifactError("transformer/diffusion_pytorch_model.safetensors: sha256 mismatch", file="x")

    with LiveServer(create_app(load_pipeline, ServerSettings(), on_load_error=errors.append)) as live:
        wait_until(lambda: errors, what="the load error")
        status, _, body = call(live.port, "GET", "/ready")
        assert status == 503 and json.loads(body)["status"] == "failed"
        assert "sha256 mismatch" in json.loads(body)["error"]
        assert call(live.port, "GET", "/health")[0] == 200
        assert isinstance(errors[0], ArtifactError)


def test_bearer_auth_guards_every_route_but_health_and_never_logs_the_token(pipe, caplog):
    token = "tok-3f9a1c-do-not-log"
    settings = ServerSettings(api_key=token, warmup=False, **LIMITS)
    good = {"Authorization": f"Bearer {token}"}
    with caplog.at_level(logging.INFO, logger=LOGGER), LiveServer(create_app(lambda: (pipe, MANIFEST), settings)) as live:
        wait_ready(live.port, headers=good)
        assert call(live.port, "GET", "/health")[0] == 200
        for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                    {"Authorization": f"Basic {token}"}, {"Authorization": f"Bearer {token}x"}):
            for method, path in (("GET", "/ready"), ("GET", "/metrics"), ("GET", "/v1/models"),
                                 ("POST", GEN_ROUTE), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/nope")):
                status, headers, body = call(live.port, method, path, {"prompt": "a"} if method == "POST" else None, bad)
                assert status == 401, (bad, path, status)
                assert json.loads(body)["error"]["code"] == "invalid_api_key"
                assert headers["www-authenticate"] == "Bearer"
        status, _, body = gen(live.port, headers=good, seed=2)
        assert status == 200
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=token, max_retries=0, timeout=120)
        assert client.images.generate(prompt="a", size="32x32", extra_body={"num_inference_steps": 1}).data[0].b64_json
        assert requests_total(metrics(live.port, headers=good), 401) == 5
    lines = [JsonFormatter().format(r) for r in caplog.records]
    request_lines = [json.loads(line) for line in lines if '"event": "request"' in line]
    assert len(request_lines) >= 5 * 7 + 3
    assert all(line["request_id"] for line in request_lines)
    assert not any(token in line for line in lines)


def test_size_multiple_follows_the_pipeline(pipe):
    from smash_runtime.server.app import PipelineInfo

    flux = PipelineInfo.of(pipe, MANIFEST)
    assert flux.size_multiple == pipe.vae_scale_factor * 2  # FLUX packs 2x2 latent patches
    assert (flux.default_width, flux.default_height) == (32, 32)  # the first warm-up shape
    sdxl = build_tiny("tiny-sdxl")
    info = PipelineInfo.of(sdxl, {})
    assert info.size_multiple == sdxl.vae_scale_factor
    assert info.default_width == sdxl.default_sample_size * sdxl.vae_scale_factor
    assert {"negative_prompt", "guidance_scale"} <= info.accepts


def test_settings_are_validated_and_read_from_env():
    assert ServerSettings.from_env({"SMASH_MAX_QUEUE": "3", "SMASH_WARMUP": "0"}).max_queue == 3
    assert ServerSettings.from_env({"SMASH_WARMUP": "off"}).warmup is False
    assert "secret" not in repr(ServerSettings(api_key="secret"))
    with pytest.raises(ValueError, match="SMASH_MAX_N"):
        ServerSettings.from_env({"SMASH_MAX_N": "many"})
    with pytest.raises(ValueError, match="max_queu.*did you mean 'max_queue'"):
        ServerSettings.from_env({}, max_queu=3)
    with pytest.raises(ValueError, match="min_size"):
        ServerSettings(min_size=512, max_size=256)
    with pytest.raises(ValueError, match="api_key"):
        ServerSettings(api_key="")


# --------------------------------------------------------------------------------------------
# the real command: smash-build an artifact, smash-serve it in its own process


def _script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """The builder's own artifact of builtin:tiny-flux (in-process: a second torch import costs ~10 s)."""
    from smash_build.builder import build
    from smash_build.manifest import load_manifest

    root = tmp_path_factory.mktemp("serve-artifact")
    (root / "tiny.toml").write_text(
        '[model]\nsource = "builtin:tiny-flux"\ndtype = "float32"\n\n'
        "[runtime.warmup]\nshapes = [{ height = 32, width = 32, steps = 1 }]\n"
    )
    return build(load_manifest(root / "tiny.toml"), out_dir=root / "tiny-flux").artifact.path


def test_smash_serve_process_end_to_end_then_sigterm_mid_request(artifact, tmp_path):
    """Auth, readiness, byte-identity with in-process generation, and a graceful SIGTERM."""
    import smash_runtime

    token = "e2e-9d2f-never-in-logs"
    auth = {"Authorization": f"Bearer {token}"}
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [_script("smash-serve"), str(artifact), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
             "--max-queue", "4", "--max-steps", "200", "--warmup-delay-s", "1", "--shutdown-grace-s", "120"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SMASH_API_KEY": token},
        )
    try:
        wait_until(answers_200(proc, log_path, port, "/health", tail=3000), timeout=120, what="smash-serve to listen")
        assert call(port, "GET", "/ready", headers=auth)[0] == 503  # loading or warming up: the delay holds it
        assert call(port, "GET", "/ready")[0] == 401
        assert wait_ready(port, headers=auth)[-1] == "ready"

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=120)
        result = client.images.generate(prompt="a red cube", size="32x32", extra_body={"seed": 11, "num_inference_steps": 2})
        reference = smash_runtime.load(artifact, device="cpu")
        assert [base64.b64decode(d.b64_json) for d in result.data] == reference_pngs(reference, "a red cube", 11, 2, 32)
        assert client.models.list().data[0].id == "tiny-flux"

        # An edit runs the loaded artifact's modules through diffusers' from_pipe image-to-image pipeline.
        source = base64.b64decode(result.data[0].b64_json)
        edited = client.images.edit(image=("in.png", source, "image/png"), prompt="a blue cube",
                                    extra_body={"seed": 2, "num_inference_steps": 4, "strength": 0.75})
        img2img = AutoPipelineForImage2Image.from_pipe(reference)
        expected = generate(img2img, "a blue cube", seed=2, steps=4, height=32, width=32, strength=0.75,
                            image=Image.open(io.BytesIO(source)).convert("RGB"))[0]
        assert base64.b64decode(edited.data[0].b64_json) == encode_png(expected)

        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(gen, port, headers=auth, size="32x32", num_inference_steps=25, seed=1)
            wait_until(lambda: metric(metrics(port, headers=auth), "smash_generations_in_progress") == 1,
                       what="the slow request to start")
            proc.send_signal(signal.SIGTERM)
            status, _, body = slow.result(timeout=300)
        assert status == 200, body[:300]
        image = Image.open(io.BytesIO(base64.b64decode(json.loads(body)["data"][0]["b64_json"])))
        assert image.size == (32, 32)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert token not in text
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    served = [r for r in records if r.get("event") == "request" and r["path"] == GEN_ROUTE]
    assert [r["status"] for r in served] == [200, 200] and all(r["request_id"] for r in served)
    assert served[-1]["steps"] == 25 and served[-1]["generate_ms"] > 0


def _smash_serve(artifact, *args, env=None, timeout=120) -> tuple[int, list[dict]]:
    """Run ``smash-serve ARTIFACT ARGS`` to its exit: (status, its JSON log lines)."""
    done = subprocess.run([_script("smash-serve"), str(artifact), "--device", "cpu", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return done.returncode, [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]


def test_smash_serve_on_a_busy_port_exits_3_before_loading(artifact):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, lines = _smash_serve(artifact, "--port", str(port))
        assert status == 3, lines
        # The same with an artifact that does not exist: the port is checked first, before any loading.
        assert _smash_serve(artifact.parent / "missing", "--port", str(port))[0] == 3
    [refusal] = [line for line in lines if line.get("event") == "cannot start"]
    assert f"127.0.0.1:{port}" in refusal["error"] and refusal["exit_status"] == 3
    assert not [line for line in lines if line.get("event") in ("starting", "ready")]
    assert all("source" not in line for line in lines)  # source locations only with -v


def test_smash_serve_refuses_warmup_shapes_beyond_its_limits(artifact):
    status, lines = _smash_serve(artifact, "--port", str(free_port()), "--max-size", "16", "-v")
    assert status == 2, lines
    [refusal] = [line for line in lines if line.get("event") == "cannot start"]
    assert "runtime.warmup.shapes[0]" in refusal["error"] and "16" in refusal["error"]
    assert "--no-warmup" in refusal["error"]
    assert refusal["source"].startswith("cli.py:")  # -v: each line says where it was logged


def test_smash_serve_version_help_and_loudness(capsys):
    from smash_runtime.server.cli import EXIT_CODES, build_parser, main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("smash-serve (smash-runtime) 0.")
    text = build_parser().format_help()
    for code, meaning in EXIT_CODES.items():
        assert f"{code}  {meaning}" in text
    assert {0, 1, 2, 3} <= set(EXIT_CODES)
    with pytest.raises(SystemExit) as exited:
        main(["art", "-q", "-v"])
    assert exited.value.code == 2  # -q and -v exclude each other (argparse's usage error)
    assert build_parser().parse_args(["art", "--model-alias", "a", "--model-alias", "b"]).model_aliases == ["a", "b"]
