"""The spine: manifest -> baked artifact -> runtime reload, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import smash_runtime
from smash_runtime.errors import ArtifactError, UnsupportedOnDevice
from smash_runtime.format import RECORD_FILE

from spine_helpers import build_from_text, digests_in_fresh_process, image_digest, manifest_text, tree_hashes

CPU_METHODS = [None, "int8dq", "int8wo", "fp8wo"]


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sdxl"])
def test_reload_in_fresh_process_is_bit_identical(model, tmp_path):
    """Every CPU quantization method, with and without fusion: the reloaded pipeline's image equals the builder's."""
    expected = {}
    for method in CPU_METHODS:
        for fuse in (False, True):
            out = tmp_path / f"{method}-{int(fuse)}"
            result = build_from_text(manifest_text(f"builtin:{model}", fuse=fuse, method=method), out)
            expected[str(out)] = image_digest(result.pipeline)
    assert len(set(expected.values())) > 1, "transforms changed nothing: the test would prove nothing"
    assert digests_in_fresh_process([Path(p) for p in expected]) == expected


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sdxl"])
def test_fused_weights_are_stored_once_under_the_unfused_names(model, tmp_path):
    """Fusion stores each q/k/v row once, under diffusers' unfused names: with per-row int8 the
    fused artifact's weight file is byte for byte the unfused artifact's (no duplicates, no to_qkv)."""
    denoiser = "transformer" if model == "tiny-flux" else "unet"
    files = {}
    for fuse in (False, True):
        result = build_from_text(manifest_text(f"builtin:{model}", fuse=fuse, method="int8wo"), tmp_path / str(fuse))
        files[fuse] = (tmp_path / str(fuse) / denoiser / "diffusion_pytorch_model.safetensors").read_bytes()
    from smash_runtime.tensors import iter_tensor_names

    names = list(iter_tensor_names(tmp_path / "True" / denoiser / "diffusion_pytorch_model.safetensors"))
    assert any(".to_q." in n for n in names)
    assert not any(f".{fused}." in n for n in names for fused in ("to_qkv", "to_kv", "to_added_qkv"))
    assert files[True] == files[False]
    assert result.changes[0].fused_modules > 0


def test_fused_int8_denoiser_is_at_most_055_of_bf16(tmp_path):
    """Measured on a FLUX transformer large enough that scales and headers do not dominate."""
    from smash_build.tiny_models import build_tiny, tiny_flux_transformer_config

    source = tmp_path / "source"
    pipe = build_tiny("tiny-flux", dtype=torch.bfloat16,
                      transformer_config=tiny_flux_transformer_config(num_layers=2, num_single_layers=2, heads=4, head_dim=64))
    pipe.save_pretrained(source)
    text = manifest_text(str(source), fuse=True, method="int8wo", exclude="embedding").replace("float32", "bfloat16")
    result = build_from_text(text, tmp_path / "a")
    bf16_bytes = sum(p.numel() * 2 for p in pipe.transformer.parameters())
    stored = result.artifact.component_size("transformer")
    assert stored <= 0.55 * bf16_bytes, (stored, bf16_bytes)


def test_two_builds_in_separate_processes_are_byte_identical(tmp_path):
    (tmp_path / "m.toml").write_text(manifest_text(fuse=True, method="int8dq", exclude="norm+embedding"))
    for run in ("first", "second"):
        subprocess.run([sys.executable, "-m", "smash_build.cli", str(tmp_path / "m.toml"), "-o", str(tmp_path / run / "art")],
                       check=True, capture_output=True)
    first, second = tree_hashes(tmp_path / "first" / "art"), tree_hashes(tmp_path / "second" / "art")
    assert len(first) > 10
    assert first == second


def test_same_output_dir_twice_gives_identical_tree(tmp_path):
    text = manifest_text(fuse=True, method="int8wo")
    build_from_text(text, tmp_path / "a")
    first = tree_hashes(tmp_path / "a")
    build_from_text(text, tmp_path / "a")
    assert tree_hashes(tmp_path / "a") == first


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny"
    build_from_text(manifest_text(fuse=True, method="int8wo"), out)
    return out


def _copy(artifact: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def test_flipped_byte_is_refused_naming_the_file(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    path = art / WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="transformer/diffusion_pytorch_model.safetensors: blake3 does not match") as info:
        smash_runtime.load(art, device="cpu")
    assert info.value.file == WEIGHTS


def test_truncated_file_is_refused(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    path = art / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="vae/diffusion_pytorch_model.safetensors.*truncated"):
        smash_runtime.load(art, device="cpu", verify="fast")


def test_missing_file_is_refused(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    (art / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="text_encoder/model.safetensors.*missing"):
        smash_runtime.load(art, device="cpu")


def test_unknown_format_version_is_refused(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    manifest = json.loads((art / RECORD_FILE).read_text())
    manifest["format_version"] = 99
    (art / RECORD_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="smash.json.*version 99 is not supported"):
        smash_runtime.load(art, device="cpu")


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no smash.json"):
        smash_runtime.load(tmp_path, device="cpu")
    with pytest.raises(ArtifactError, match="no such artifact folder"):
        smash_runtime.load(tmp_path / "nope" / "deeper", device="cpu")


def test_a_mode_without_a_check_is_refused(artifact):
    with pytest.raises(ValueError, match="verify='off': expected 'full' or 'fast'.*no mode without a check"):
        smash_runtime.load(artifact, device="cpu", verify="off")


def test_int4wo_and_float32_fp8dq_on_cpu_give_clear_errors(tmp_path):
    """fp8dq bakes on a CPU (tests/test_fp8_bake.py) from bfloat16 weights; int4wo needs a CUDA kernel to pack."""
    for method, needle in (("fp8dq", "needs model.dtype = 'bfloat16'"), ("int4wo", "no CPU int4")):
        with pytest.raises(UnsupportedOnDevice, match=needle):
            build_from_text(manifest_text(method=method), tmp_path / method)
        assert not (tmp_path / method).exists()


def test_fp8_recorded_artifact_refused_on_cpu_at_load(artifact, tmp_path):
    """An artifact quantized with fp8dq on a GPU is refused on a CPU with the reason, before reading weights."""
    art = _copy(artifact, tmp_path)
    manifest = json.loads((art / RECORD_FILE).read_text())
    manifest["components"]["transformer"]["quantization"] = {"method": "fp8dq"}
    (art / RECORD_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedOnDevice, match="fp8dq.*CUDA"):
        smash_runtime.load(art, device="cpu")


def test_killed_build_leaves_no_complete_looking_artifact(tmp_path):
    """SIGKILL while the artifact is being written; then the next build succeeds."""
    from smash_build.tiny_models import build_tiny, tiny_flux_transformer_config

    source = tmp_path / "source"  # big enough that writing takes a noticeable moment
    build_tiny("tiny-flux", transformer_config=tiny_flux_transformer_config(4, 8, heads=8, head_dim=64)).save_pretrained(source)
    (tmp_path / "m.toml").write_text(manifest_text(str(source), fuse=True))
    target = tmp_path / "artifact"
    proc = subprocess.Popen([sys.executable, "-m", "smash_build.cli", str(tmp_path / "m.toml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".artifact.partial-*")):
        assert proc.poll() is None, "build finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (target / RECORD_FILE).exists()
    with pytest.raises(ArtifactError):
        smash_runtime.load(target, device="cpu")
    subprocess.run([sys.executable, "-m", "smash_build.cli", str(tmp_path / "m.toml")], check=True, capture_output=True)
    assert not list(tmp_path.glob(".artifact.partial-*"))
    smash_runtime.format.verify_files(target, smash_runtime.format.read_record(target))
