"""Drop-in OpenAI Images API and the server's limits: the official ``openai`` client against a real
uvicorn on loopback serving a real tiny-flux pipeline.

Covered: explicit nulls, the standard parameters (accepted, mapped or named as ignored in a
header), png/jpeg/webp output, ``/v1/images/edits`` (image-to-image and inpainting through
``from_pipe``), model aliases, defaults held to the limits, warm-up shapes checked at start and
run through ``smash_runtime.compilers.warm_up`` (with their batch), and queue admission at
exactly the capacity.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting
from PIL import Image

from smash_build.tiny_models import build_tiny
from smash_runtime.images import encode_png, generate
from smash_runtime.server import ServerSettings, create_app
from smash_runtime.server.metrics import Metrics
from smash_runtime.server.settings import WarmupConflict
from smash_runtime.server.worker import GenerationParams, GenerationWorker, Job, QueueFull

from server_helpers import GEN_ROUTE, LIMITS, MANIFEST, LiveServer, call, gen, metric, metrics, reference_pngs, stalled
from server_helpers import wait_ready, wait_until

EDIT_ROUTE = "/v1/images/edits"
ALIASES = ("dall-e-3", "gpt-image-1")


@pytest.fixture(scope="module")
def pipe(one_thread):
    p = build_tiny("tiny-flux")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def reference_pipe(one_thread):
    p = build_tiny("tiny-flux")  # same seed, separate object: nothing is shared with the server
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def server(pipe):
    settings = ServerSettings(max_queue=4, model_aliases=ALIASES, **LIMITS)
    with LiveServer(create_app(lambda: (pipe, MANIFEST), settings, manifest=MANIFEST)) as live:
        wait_ready(live.port)
        yield live


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def png_of(color, size=(32, 32), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body written by hand (for the malformed cases a client would not send)."""
    boundary = "smash-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for name, data in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# --------------------------------------------------------------------------------------------
# generations


def test_nulls_and_standard_parameters_through_the_openai_client(client, reference_pipe):
    raw = client.images.with_raw_response.generate(
        prompt="a red cube", model="dall-e-3", n=None, size=None, response_format=None, quality="hd", style="vivid",
        moderation="low", background="opaque", user="user-1234", output_format="png",
        extra_body={"seed": 7, "num_inference_steps": 2},
    )
    assert raw.http_request.content.count(b"null") >= 3  # the client really sent the nulls
    result = raw.parse()
    served = [base64.b64decode(item.b64_json) for item in result.data]
    # Nulls are the defaults: n = 1, the first warm-up shape (32x32), PNG; same bytes as in-process.
    assert served == reference_pngs(reference_pipe, "a red cube", seed=7, steps=2, size=32)
    assert (result.output_format, result.size, result.background) == ("png", "32x32", "opaque")
    assert raw.headers["x-smash-ignored-parameters"] == "quality, style, moderation, user"


def test_explicit_nulls_everywhere_equal_leaving_the_fields_out(server):
    optional = ("model", "n", "size", "response_format", "output_format", "output_compression", "background",
                "stream", "quality", "style", "moderation", "user", "safety_identifier", "guidance_scale",
                "negative_prompt")
    status, headers, with_nulls = gen(server.port, seed=3, **dict.fromkeys(optional))
    assert status == 200, with_nulls
    assert "x-smash-ignored-parameters" not in headers  # null is "not given", so nothing was ignored
    status, _, without = gen(server.port, seed=3)
    assert status == 200
    assert json.loads(with_nulls)["data"] == json.loads(without)["data"]


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_outputs_decode_and_follow_output_compression(client, fmt, pil_format):
    def fetch(compression):
        result = client.images.generate(prompt="a red cube", size="32x32", output_format=fmt,
                                        output_compression=compression,
                                        extra_body={"seed": 5, "num_inference_steps": 2})
        assert result.output_format == fmt
        return base64.b64decode(result.data[0].b64_json)

    reference = Image.open(io.BytesIO(base64.b64decode(client.images.generate(
        prompt="a red cube", size="32x32", extra_body={"seed": 5, "num_inference_steps": 2}).data[0].b64_json)))
    fine, coarse = fetch(95), fetch(5)
    for data in (fine, coarse):
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.size) == (pil_format, (32, 32))
    assert len(coarse) < len(fine)  # more compression, fewer bytes
    # The very image the PNG route gives, encoded by Pillow at that quality (and no metadata).
    expected = io.BytesIO()
    reference.convert("RGB").save(expected, format=pil_format, quality=95)
    assert fine == expected.getvalue()


def test_png_output_compression_is_lossless(server):
    plain = json.loads(gen(server.port, seed=9)[2])["data"][0]["b64_json"]
    packed = json.loads(gen(server.port, seed=9, output_format="png", output_compression=100)[2])["data"][0]["b64_json"]
    stored = json.loads(gen(server.port, seed=9, output_format="png", output_compression=0)[2])["data"][0]["b64_json"]
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in (plain, packed, stored)]
    assert images[0].tobytes() == images[1].tobytes() == images[2].tobytes()
    assert len(base64.b64decode(stored)) > len(base64.b64decode(packed))


def test_model_aliases(client, server):
    for name in ("tiny-flux-test", *ALIASES):
        assert client.images.generate(prompt="a", model=name, size="16x16",
                                      extra_body={"num_inference_steps": 1}).data[0].b64_json
    assert client.models.retrieve("gpt-image-1").id == "tiny-flux-test"
    assert client.models.list().data[0].model_extra["aliases"] == list(ALIASES)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a", model="dall-e-2", size="16x16")
    error = caught.value.body
    assert error["code"] == "model_not_found" and "'dall-e-3'" in error["message"]
    assert ServerSettings.from_env({"SMASH_MODEL_ALIASES": "a, b"}).model_aliases == ("a", "b")


# --------------------------------------------------------------------------------------------
# edits


def test_edit_from_a_png_is_image_to_image_sharing_the_weights(client, server, reference_pipe):
    source = png_of((200, 30, 30))
    result = client.images.edit(image=("cube.png", source, "image/png"), prompt="a blue cube", size="32x32",
                                model="dall-e-3", extra_body={"seed": 4, "num_inference_steps": 4, "strength": 0.5})
    served = base64.b64decode(result.data[0].b64_json)
    img2img = AutoPipelineForImage2Image.from_pipe(reference_pipe)
    expected = generate(img2img, "a blue cube", seed=4, steps=4, height=32, width=32, strength=0.5,
                        image=Image.open(io.BytesIO(source)).convert("RGB"))[0]
    assert served == encode_png(expected)
    assert served != encode_png(generate(img2img, "a blue cube", seed=4, steps=4, height=32, width=32, strength=0.9,
                                         image=Image.open(io.BytesIO(source)).convert("RGB"))[0])
    state = server.app.state.smash
    assert type(state.edit_pipes["edit"]).__name__ == "FluxImg2ImgPipeline"
    assert state.edit_pipes["edit"].transformer is state.pipe.transformer  # from_pipe: no second copy


def test_edit_with_a_mask_inpaints(client, server, reference_pipe):
    source = png_of((30, 200, 30))
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))  # transparent left half: repaint it
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    result = client.images.edit(image=("leaf.png", source, "image/png"), mask=("mask.png", buffer.getvalue(), "image/png"),
                                prompt="a flower", n=2, extra_body={"seed": 6, "num_inference_steps": 4})
    served = [base64.b64decode(item.b64_json) for item in result.data]
    assert result.size == "32x32"  # no size: the image's own
    white_left = Image.new("L", (32, 32), 0)
    white_left.paste(255, (0, 0, 16, 32))
    inpaint = AutoPipelineForInpainting.from_pipe(reference_pipe)
    expected = generate(inpaint, "a flower", seed=6, steps=4, height=32, width=32, num_images=2,
                        image=Image.open(io.BytesIO(source)).convert("RGB"), mask_image=white_left)
    assert served == [encode_png(image) for image in expected]
    assert type(server.app.state.smash.edit_pipes["inpaint"]).__name__ == "FluxInpaintPipeline"


def test_bad_edits_get_4xx_and_no_work(server):
    image = png_of((1, 2, 3))
    rgb_mask = png_of((0, 0, 0))
    small_mask = png_of((0, 0, 0, 0), size=(16, 16), mode="RGBA")
    cases = [
        ("no image", {"prompt": "a"}, {}, 400, "missing_required_parameter", "image"),
        ("no prompt", {}, {"image": image}, 400, "missing_required_parameter", "prompt"),
        ("not an image", {"prompt": "a"}, {"image": b"GIF89a not really"}, 400, "invalid_image", "image"),
        ("two images", {"prompt": "a"}, {"image[]": image, "image": image}, 400, "invalid_value", "image"),
        ("mask without alpha", {"prompt": "a"}, {"image": image, "mask": rgb_mask}, 400, "invalid_image", "mask"),
        ("mask of another size", {"prompt": "a"}, {"image": image, "mask": small_mask}, 400, "invalid_image", "mask"),
        ("strength 0", {"prompt": "a", "strength": "0"}, {"image": image}, 400, "invalid_value", "strength"),
        ("strength word", {"prompt": "a", "strength": "much"}, {"image": image}, 400, "invalid_type", "strength"),
        ("no step left", {"prompt": "a", "strength": "0.2", "num_inference_steps": "2"}, {"image": image}, 400,
         "invalid_value", "strength"),
        ("unknown field", {"prompt": "a", "style": "vivid"}, {"image": image}, 400, "unknown_parameter", "style"),
        ("n too big", {"prompt": "a", "n": "9"}, {"image": image}, 400, "invalid_value", "n"),
        ("size too big", {"prompt": "a", "size": "512x512"}, {"image": image}, 400, "invalid_size", "size"),
        ("image as text", {"prompt": "a", "image": "x.png"}, {}, 400, "invalid_type", "image"),
        ("other model", {"prompt": "a", "model": "dall-e-2"}, {"image": image}, 400, "model_not_found", "model"),
    ]
    before = metrics(server.port)
    for name, fields, files, status, code, param in cases:
        body, headers = multipart(fields, files)
        got, _, raw = call(server.port, "POST", EDIT_ROUTE, body, headers)
        error = json.loads(raw)["error"]
        assert (got, error["code"], error["param"]) == (status, code, param), (name, error)
        assert param in error["message"], (name, error)
    got, _, raw = call(server.port, "POST", EDIT_ROUTE, b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=y"})
    assert got == 400 and json.loads(raw)["error"]["code"] in ("invalid_multipart", "missing_required_parameter")
    after = metrics(server.port)
    assert metric(after, "smash_jobs_total", outcome="completed") == metric(before, "smash_jobs_total", outcome="completed")


def test_edit_upload_over_the_limit_is_413(pipe):
    settings = ServerSettings(max_upload_bytes=20_000, warmup=False, **LIMITS)
    with LiveServer(create_app(lambda: (pipe, MANIFEST), settings)) as live:
        wait_ready(live.port)
        body, headers = multipart({"prompt": "a"}, {"image": b"x" * 30_000})
        got, _, raw = call(live.port, "POST", EDIT_ROUTE, body, headers)
        assert (got, json.loads(raw)["error"]["code"]) == (413, "request_too_large")
        chunks = iter([body[i:i + 4096] for i in range(0, len(body), 4096)])  # no Content-Length: counted as read
        got, _, raw = call(live.port, "POST", EDIT_ROUTE, chunks, headers)
        assert (got, json.loads(raw)["error"]["code"]) == (413, "request_too_large")


# --------------------------------------------------------------------------------------------
# limits: defaults, warm-up, admission


def test_a_default_the_limits_refuse_is_refused(pipe):
    manifest = {"name": "no-shapes"}  # default size: the pipeline's own, 256x256 for tiny-flux
    settings = ServerSettings(**{**LIMITS, "max_size": 128, "max_steps": 10})  # tiny-flux's default steps: 28
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with LiveServer(create_app(lambda: (pipe, manifest), settings)) as live:
            wait_ready(live.port)
            assert not calls  # no shape recorded and the default size is beyond the limits: warm-up ran nothing
            port = live.port
            status, _, body = call(port, "POST", GEN_ROUTE, {"prompt": "a", "num_inference_steps": 1})
            error = json.loads(body)["error"]
            assert (status, error["code"], error["param"]) == (400, "invalid_size", "size")
            assert "not given" in error["message"] and "256x256" in error["message"] and "128" in error["message"]
            status, _, body = call(port, "POST", GEN_ROUTE, {"prompt": "a", "size": "32x32"})
            error = json.loads(body)["error"]
            assert (status, error["param"]) == (400, "num_inference_steps") and "28" in error["message"]
            status, _, body = call(port, "POST", GEN_ROUTE, {"prompt": "a", "size": "32x32", "num_inference_steps": 1})
            assert status == 200
    finally:
        handle.remove()


@pytest.mark.parametrize(("shape", "limit", "words"), [
    ({"height": 64, "width": 32, "steps": 1}, {"max_size": 48}, ["height 64", "48"]),
    ({"height": 32, "width": 32, "steps": 60}, {"max_steps": 50}, ["steps 60", "max_steps 50"]),
    ({"height": 32, "width": 32, "steps": 1, "batch": 3}, {"max_n": 2}, ["batch 3", "max_n 2"]),
])
def test_warmup_shapes_beyond_the_limits_stop_the_start(pipe, shape, limit, words):
    manifest = {"name": "too-big", "runtime": {"warmup": {"shapes": [shape]}}}
    errors = []
    warmed = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: warmed.append(1))
    try:
        app = create_app(lambda: (pipe, manifest), ServerSettings(**{**LIMITS, **limit}), on_load_error=errors.append)
        with LiveServer(app) as live:
            wait_until(lambda: errors, what="the start to fail")
            status, _, body = call(live.port, "GET", "/ready")
    finally:
        handle.remove()
    assert isinstance(errors[0], WarmupConflict) and not warmed  # refused before anything ran
    message = json.loads(body)["error"]
    assert status == 503 and "runtime.warmup.shapes[0]" in message and all(w in message for w in words), message
    # Without warm-up nothing conflicts at start; a request without size still cannot get the refused default.
    if "max_size" in limit:
        settings = ServerSettings(**{**LIMITS, **limit, "warmup": False})
        with LiveServer(create_app(lambda: (pipe, manifest), settings)) as live:
            wait_ready(live.port)
            status, _, body = call(live.port, "POST", GEN_ROUTE, {"prompt": "a", "num_inference_steps": 1})
            assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_size")


def test_recorded_warmup_batch_reaches_the_servers_warmup(pipe):
    manifest = {"name": "batched", "runtime": {"warmup": {"shapes": [{"height": 32, "width": 48, "steps": 2, "batch": 3}]}}}
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True)
    try:
        with LiveServer(create_app(lambda: (pipe, manifest), ServerSettings(**LIMITS))) as live:
            wait_ready(live.port)
            warmup_calls = list(seen)
            images = metric(metrics(live.port), "smash_images_generated_total")
    finally:
        handle.remove()
    # FLUX packs 2x2 latent patches: one token per (2 x VAE factor)^2 pixels.
    patch = 2 * pipe.vae_scale_factor
    assert warmup_calls == [(3, (32 // patch) * (48 // patch), warmup_calls[0][2])] * 2  # batch 3, two steps
    assert images == 0  # warm-up is not counted as served images


def test_clients_exactly_at_capacity_never_see_429(server, pipe):
    max_queue = 4
    clients = max_queue + 1  # one running, max_queue waiting
    statuses = Counter()
    lock = threading.Lock()
    started = threading.Barrier(clients + 1)

    def client(i):
        started.wait()
        for k in range(6):
            status = gen(server.port, seed=100 * i + k, size="16x16")[0]
            with lock:
                statuses[status] += 1

    with stalled(pipe) as gate, ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        started.wait()
        wait_until(lambda: metric(metrics(server.port), "smash_queue_depth") == max_queue, what="a full queue")
        gate.set()
        for f in futures:
            f.result()
    assert statuses == {200: clients * 6}, statuses


def test_admission_counts_the_job_being_handed_to_the_worker():
    async def scenario():
        loop = asyncio.get_running_loop()
        release = threading.Event()
        worker = GenerationWorker(run=lambda params: [b"png"], max_queue=2, metrics=Metrics())
        worker.start(prepare=lambda: release.wait(30))  # the worker is not running a job yet
        params = GenerationParams(prompt="a", n=1, width=16, height=16, seed=0)
        jobs = [Job(params, loop) for _ in range(3)]
        for job in jobs:  # two waiting + the one the free worker takes next
            worker.submit(job)
        with pytest.raises(QueueFull):
            worker.submit(Job(params, loop))
        release.set()
        results = await asyncio.gather(*(job.future for job in jobs))
        worker.stop(5)
        return results

    assert asyncio.run(scenario()) == [[b"png"]] * 3


def test_sdxl_edits_image_to_image_and_inpainting(one_thread):
    """SDXL's image-to-image pipeline takes no height/width: the server resizes the image instead."""
    sdxl, reference = build_tiny("tiny-sdxl"), build_tiny("tiny-sdxl")
    for p in (sdxl, reference):
        p.set_progress_bar_config(disable=True)
    settings = ServerSettings(warmup=False, **LIMITS)
    source = png_of((120, 40, 200), size=(40, 40))
    mask = Image.new("RGBA", (40, 40), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 24, 24))
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")
    with LiveServer(create_app(lambda: (sdxl, {"name": "tiny-sdxl"}), settings)) as live:
        wait_ready(live.port)
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=300)
        extra = {"seed": 1, "num_inference_steps": 4, "strength": 0.5}
        edited = client.images.edit(image=("a.png", source, "image/png"), prompt="a hat", size="32x32", extra_body=extra)
        inpainted = client.images.edit(image=("a.png", source, "image/png"), mask=("m.png", mask_png.getvalue(), "image/png"),
                                       prompt="a hat", size="32x32", extra_body=extra)
        pipes = live.app.state.smash.edit_pipes
        assert {k: type(v).__name__ for k, v in pipes.items()} == {
            "edit": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"}
        assert all(v.unet is sdxl.unet for v in pipes.values())
    resized = Image.open(io.BytesIO(source)).convert("RGB").resize((32, 32), Image.Resampling.LANCZOS)
    repaint = Image.new("L", (40, 40), 0)
    repaint.paste(255, (8, 8, 24, 24))
    repaint = repaint.resize((32, 32), Image.Resampling.LANCZOS)
    expected_edit = generate(AutoPipelineForImage2Image.from_pipe(reference), "a hat", seed=1, steps=4, strength=0.5,
                             image=resized)[0]
    expected_inpaint = generate(AutoPipelineForInpainting.from_pipe(reference), "a hat", seed=1, steps=4, strength=0.5,
                                height=32, width=32, image=resized, mask_image=repaint)[0]
    assert base64.b64decode(edited.data[0].b64_json) == encode_png(expected_edit)
    assert base64.b64decode(inpainted.data[0].b64_json) == encode_png(expected_inpaint)
    assert expected_edit.size == (32, 32)
