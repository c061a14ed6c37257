"""Precompiled blocks with torchao-quantized weights (issue 18): the issue's own configuration.

A tiny FLUX artifact built with ``fuse_qkv`` + int8 quantization, FORA interval 2 and
``torch_compile`` scope "blocks" is loaded twice, each time in a fresh process through
``smash_runtime.load`` with one compile cache: the first process compiles and stores the block
variants, the second loads them, traces nothing and makes the same image bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from smash_runtime.compilers.precompiled import _meta_empty_like, block_layout
from spine_helpers import build_from_text, manifest_text

RUNTIME = textwrap.dedent(
    """
    [runtime.cacher]
    name = "fora"
    interval = 2
    start_step = 0

    [runtime.compiler]
    name = "torch_compile"
    scope = "blocks"
    """
)

PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(int(sys.argv[3]))  # inductor's CPU code depends on the thread count
    import smash_runtime
    from smash_runtime.cachers import cacher_stats
    from torch._dynamo.utils import counters
    pipe = smash_runtime.load(sys.argv[1], device="cpu", compile_cache=sys.argv[2])
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe("a red cube", num_inference_steps=4, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    torch.save(image, sys.argv[4])
    weight = pipe.transformer.transformer_blocks[0].attn.to_qkv.weight
    print(json.dumps({**pipe.smash.compile_cache.report(), "stats": dict(counters["stats"]),
                      "weight": type(weight).__name__, "per_step": cacher_stats(pipe).per_step()}))
    """
)


@pytest.fixture(scope="module", params=["int8wo", "int8dq"])
def artifact(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    text = manifest_text(fuse=True, method=request.param, exclude="norm+embedding", extra=RUNTIME)
    build_from_text(text, tmp / "artifact")
    return tmp / "artifact"


def run_process(artifact, cache, output) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    proc = subprocess.run(
        [sys.executable, "-c", PROCESS, str(artifact), str(cache), str(torch.get_num_threads()), str(output)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_runs_the_precompiled_quantized_blocks_without_compiling(artifact, tmp_path):
    cold = run_process(artifact, tmp_path / "cache", tmp_path / "cold.pt")
    assert cold["weight"] == "Int8Tensor", "the artifact's weights must be torchao's quantized tensors"
    assert 0 in cold["per_step"], f"FORA skipped no step: {cold['per_step']}"
    assert cold["state"] == "cold"
    # Every block class was precompiled and stored as an AOTInductor package (dynamo traced
    # nothing); none fell back to dynamo's variants or to a plain torch.compile.
    packages = list((Path(cold["folder"]) / "precompiled").rglob("*.pt2"))
    assert cold["precompiled_compiled"] == cold["precompiled_saved"] == len(packages) > 0
    assert cold["stats"].get("unique_graphs", 0) == 0
    assert cold["precompiled_fallback"] == 0

    warm = run_process(artifact, tmp_path / "cache", tmp_path / "warm.pt")
    assert warm["state"] == "warm" and warm["folder"] == cold["folder"]
    assert warm["precompiled_loaded"] == cold["precompiled_compiled"]
    # Nothing compiled, traced or looked up: the stored code ran as it was.
    assert warm["precompiled_compiled"] == warm["precompiled_fallback"] == warm["precompiled_ignored"] == 0
    assert warm["stats"].get("unique_graphs", 0) == 0 and warm["stats"].get("calls_captured", 0) == 0
    assert warm["fxgraph_cache_miss"] == warm["fxgraph_cache_hit"] == warm["autograd_cache_miss"] == 0
    assert warm["per_step"] == cold["per_step"]
    # The same image, bit for bit, as the process that compiled it.
    assert torch.equal(torch.load(tmp_path / "warm.pt"), torch.load(tmp_path / "cold.pt"))


@pytest.fixture(scope="module")
def quantized_blocks(artifact):
    import smash_runtime

    pipe = smash_runtime.load(artifact, device="cpu", cacher=False, compiler=False)
    return pipe.transformer.transformer_blocks


def test_torchao_gets_meta_empty_like_only_while_a_variant_is_made(quantized_blocks):
    weight = quantized_blocks[0].attn.to_qkv.weight
    with pytest.raises(NotImplementedError, match="empty_like"):  # torchao as shipped
        torch.empty_like(weight, device="meta")
    with _meta_empty_like(quantized_blocks[0]):
        meta = torch.empty_like(weight, device="meta")
        with pytest.raises(NotImplementedError, match="device='meta' only"):
            torch.empty_like(weight)
    assert type(meta) is type(weight) and meta.device.type == "meta" and meta.shape == weight.shape
    assert meta.qdata.device.type == "meta" and meta.qdata.dtype == weight.qdata.dtype
    with pytest.raises(NotImplementedError, match="empty_like"):  # and as shipped again
        torch.empty_like(weight, device="meta")


def test_block_layout_tells_apart_siblings_whose_quantized_weights_differ(quantized_blocks):
    first, second = quantized_blocks
    assert block_layout(first) == block_layout(second)  # siblings share the stored variants
    weight = second.attn.to_qkv.weight
    # Same type and shape, other quantization metadata: compiled code for one is wrong for the other.
    weight.block_size = [1, weight.shape[1] // 2]
    try:
        assert block_layout(first) != block_layout(second)
    finally:
        weight.block_size = list(first.attn.to_qkv.weight.block_size)
    assert block_layout(first) == block_layout(second)


def test_cache_made_with_another_torchao_is_ignored_with_a_log_line(tmp_path, monkeypatch, caplog):
    # torchao's kernels are traced into the stored code: another torchao must not load it.
    from importlib.metadata import version

    from smash_runtime.compilers import CompileCache, TorchCompileConfig, config_to_dict

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    compiler = config_to_dict(TorchCompileConfig(scope="blocks"))
    cache = CompileCache(tmp_path / "root", artifact_hash="0" * 64)
    key = cache.key(compiler, "cpu")
    assert key["torchao"] == version("torchao")
    stale = {**key, "torchao": "0.17.0"}
    folder = cache.folder_for(stale)
    (folder / "precompiled").mkdir(parents=True)
    (folder / "key.json").write_text(json.dumps(stale))
    with caplog.at_level(logging.INFO, logger="smash_runtime.compilers.compile_cache"):
        assert cache.activate(compiler, "cpu") == "cold"
    assert cache.folder == cache.folder_for(key) != folder
    assert any("torchao='0.17.0'" in r.message for r in caplog.records), caplog.text
    cache.deactivate()
