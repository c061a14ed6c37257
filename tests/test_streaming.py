"""The streaming build (one block in memory at a time) writes exactly what the in-memory build writes."""

from __future__ import annotations

import json

import pytest
from spine_helpers import digests_in_fresh_process, manifest_text, tree_hashes

from smash_build.builder import build
from smash_build.manifest import parse_manifest
from smash_build.streaming import AUTO_THRESHOLD_BYTES, should_stream

BAKED_ON_CPU = [None, "int8dq", "int8wo", "fp8wo"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(tmp_path, name, *, streaming, method=None, fuse=True, source="builtin:tiny-flux", dtype="float32", **kw):
    text = manifest_text(source, fuse=fuse, method=method, exclude="norm+embedding").replace('"float32"', f'"{dtype}"')
    text = text.replace("[build]\n", f"[build]\nstreaming = {str(streaming).lower()}\n")
    # Same folder name: the artifact records its name.
    return build(parse_manifest(text, base_dir=tmp_path), out_dir=tmp_path / name / "artifact", **kw)


@pytest.mark.parametrize("method", BAKED_ON_CPU, ids=lambda m: m or "none")
def test_streaming_and_in_memory_artifacts_are_identical(method, tmp_path):
    memory = _build(tmp_path, "memory", streaming=False, method=method)
    streamed = _build(tmp_path, "streamed", streaming=True, method=method)
    assert not memory.streamed and streamed.streamed
    assert tree_hashes(streamed.artifact.path) == tree_hashes(memory.artifact.path)
    [before] = [c for c in memory.changes if c.name == "transformer"]
    [after] = [c for c in streamed.changes if c.name == "transformer"]
    assert (after.fused_modules, after.bytes_before, after.bytes_after) == (
        before.fused_modules, before.bytes_before, before.bytes_after)


def test_fp8dq_baked_on_cpu_streams_identically(tmp_path):
    memory = _build(tmp_path, "memory", streaming=False, method="fp8dq", dtype="bfloat16")
    streamed = _build(tmp_path, "streamed", streaming=True, method="fp8dq", dtype="bfloat16")
    assert tree_hashes(streamed.artifact.path) == tree_hashes(memory.artifact.path)
    record = json.loads((streamed.artifact.path / "smash.json").read_text())["components"]["transformer"]
    assert record["quantization"]["requires"] == {"device": "cuda", "compute_capability": "8.9"}


@pytest.mark.parametrize("method", ["fp8dq", "int4wo"])  # float32 fp8dq: torchao's per-row float8 takes bfloat16
def test_methods_refused_on_cpu_fail_the_same_clear_way_when_streaming(method, tmp_path):
    from smash_runtime.errors import SmashError

    errors = []
    for streaming in (False, True):
        with pytest.raises(SmashError) as info:
            _build(tmp_path, f"out-{streaming}", streaming=streaming, method=method)
        errors.append(str(info.value))
        assert not (tmp_path / f"out-{streaming}" / "artifact").exists()
    assert errors[0] == errors[1]
    assert method in errors[0] and ("CUDA" in errors[0] or "bfloat16" in errors[0])


def test_streaming_sdxl_unet_is_identical(tmp_path):
    memory = _build(tmp_path, "memory", streaming=False, method="int8wo", source="builtin:tiny-sdxl")
    streamed = _build(tmp_path, "streamed", streaming=True, method="int8wo", source="builtin:tiny-sdxl")
    assert tree_hashes(streamed.artifact.path) == tree_hashes(memory.artifact.path)


def test_sharded_streaming_artifact_loads_bit_identically(tmp_path):
    shard = 256 * 1024
    memory = _build(tmp_path, "memory", streaming=False, method="int8wo", max_shard_bytes=shard)
    streamed = _build(tmp_path, "streamed", streaming=True, method="int8wo", max_shard_bytes=shard)
    folder = streamed.artifact.path / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    assert tree_hashes(streamed.artifact.path) == tree_hashes(memory.artifact.path)
    digests = digests_in_fresh_process([memory.artifact.path, streamed.artifact.path])
    assert digests[str(memory.artifact.path)] == digests[str(streamed.artifact.path)]


def test_automatic_choice_follows_size_and_available_memory():
    import psutil

    assert should_stream(10, True) and not should_stream(AUTO_THRESHOLD_BYTES * 2, False)
    assert should_stream(AUTO_THRESHOLD_BYTES + 1, None)
    available = psutil.virtual_memory().available
    assert should_stream(int(available * 0.6), None)
    assert not should_stream(1024, None)
