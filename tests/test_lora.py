"""LoRAs baked at build time: the artifact's image equals plain diffusers with the same LoRA fused.

The LoRA files are written by code for the tiny pipelines (spine_helpers, and here for kohya), in the formats real LoRAs use: the
diffusers/peft format (``transformer.…lora_A.weight``, ``unet.…lora_B.weight``, plus a text
encoder part for SDXL) and kohya's (``lora_unet_…lora_down.weight`` with ``.alpha``), which
diffusers converts itself. The reference is diffusers' own ``load_lora_weights`` +
``fuse_lora`` + ``unload_lora_weights`` on the unoptimized source pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import smash_runtime
from smash_runtime.errors import SettingsError
from smash_runtime.format import RECORD_FILE

from spine_helpers import (GEN, build_from_text, digests_in_fresh_process, image_digest, lora_pairs, manifest_text,
                           tree_hashes, write_peft_lora)

pytest.importorskip("peft", reason="the LoRA extra: pip install 'smash-build[lora]'")

SCALE = 0.8
DENOISER = {"tiny-flux": "transformer", "tiny-sdxl": "unet"}


def write_kohya_lora(unet: torch.nn.Module, path: Path, seed: int = 2, rank: int = 4) -> Path:
    """An SDXL LoRA in kohya's format (``lora_unet_<path with underscores>``, alpha per module)."""
    state = {}
    for name, down, up in lora_pairs(unet, seed, rank):
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, one_thread):
    """Each tiny pipeline saved as a local diffusers folder, with LoRA files beside it."""
    from smash_build.tiny_models import build_tiny

    root = tmp_path_factory.mktemp("lora-sources")
    out = {}
    for model in DENOISER:
        pipe = build_tiny(model)
        folder = root / model
        pipe.save_pretrained(folder)
        loras = {"peft": write_peft_lora(pipe, root / f"{model}-loras" / "peft.safetensors")}
        if model == "tiny-sdxl":
            loras["kohya"] = write_kohya_lora(pipe.unet, root / f"{model}-loras" / "kohya.safetensors")
        out[model] = {"folder": folder, "loras": loras}
    return out


def diffusers_with_lora(folder: Path, loras: list[tuple[Path, float]]):
    """Plain diffusers: the unoptimized source pipeline with each LoRA loaded, fused and unloaded."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    for file, scale in loras:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    return pipe


def lora_manifest(folder: Path, loras: list[tuple[Path, float]], **kw) -> str:
    entries = ", ".join(f'{{ source = "{file}", scale = {scale} }}' for file, scale in loras)
    return manifest_text(str(folder), **kw).replace("[build]\n", f"[build]\nlora = [{entries}]\n")


@pytest.mark.parametrize("model,kind", [("tiny-flux", "peft"), ("tiny-sdxl", "peft"), ("tiny-sdxl", "kohya")])
def test_artifact_equals_diffusers_fused_lora_bit_for_bit(model, kind, sources, tmp_path):
    """Fusion and quantization off: the reloaded artifact's image is diffusers' own fused-LoRA image."""
    src = sources[model]
    loras = [(src["loras"][kind], SCALE)]
    result = build_from_text(lora_manifest(src["folder"], loras), tmp_path / "art")
    expected = image_digest(diffusers_with_lora(src["folder"], loras))
    without = image_digest(diffusers_with_lora(src["folder"], []))
    assert expected != without, "the LoRA changed nothing: the test would prove nothing"
    assert image_digest(result.pipeline) == expected
    assert digests_in_fresh_process([tmp_path / "art"]) == {str(tmp_path / "art"): expected}


def test_two_loras_fuse_in_order_and_are_recorded(sources, tmp_path):
    from smash_build.tiny_models import build_tiny

    src = sources["tiny-flux"]
    second = write_peft_lora(build_tiny("tiny-flux"), tmp_path / "second.safetensors", seed=7)
    loras = [(src["loras"]["peft"], SCALE), (second, -0.5)]
    result = build_from_text(lora_manifest(src["folder"], loras), tmp_path / "art")
    assert image_digest(result.pipeline) == image_digest(diffusers_with_lora(src["folder"], loras))

    record = json.loads((tmp_path / "art" / RECORD_FILE).read_text())["transforms"]
    assert record["order"] == ["lora", "fuse_qkv", "quantize"]
    assert [(r["source"], r["weight_name"], r["scale"], r["sha256"]) for r in record["lora"]] == [
        (str(file), file.name, scale, hashlib.sha256(file.read_bytes()).hexdigest()) for file, scale in loras]
    card = (tmp_path / "art" / "README.md").read_text()
    assert all(r["sha256"] in card for r in record["lora"]) and "lora-fused" in card


def _psnr(a, b) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    def tensor(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]

    return float(peak_signal_noise_ratio(tensor(a), tensor(b), data_range=1.0))


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sdxl"])
def test_fused_int8wo_lora_artifact_is_close_to_diffusers(model, sources, tmp_path, capsys):
    """With QKV fusion and int8 weights the artifact is near diffusers' fused-LoRA image (PSNR reported)."""
    from smash_runtime.images import generate

    src = sources[model]
    loras = [(src["loras"]["peft"], SCALE)]
    build_from_text(lora_manifest(src["folder"], loras, fuse=True, method="int8wo"), tmp_path / "art")
    kw = {**GEN}
    prompt = kw.pop("prompt")
    artifact_image = generate(smash_runtime.load(tmp_path / "art", device="cpu"), prompt, **kw)[0]
    with_lora = _psnr(artifact_image, generate(diffusers_with_lora(src["folder"], loras), prompt, **kw)[0])
    without = _psnr(artifact_image, generate(diffusers_with_lora(src["folder"], []), prompt, **kw)[0])
    with capsys.disabled():
        print(f"\n{model} LoRA x{SCALE} + fuse_qkv + int8wo: PSNR to diffusers' fused-LoRA image {with_lora:.1f} dB "
              f"(to the image without the LoRA: {without:.1f} dB)")
    assert with_lora > without + 3, "the artifact is no closer to the LoRA image than to the base image"


def test_lora_naming_missing_modules_is_refused_with_their_names(sources, tmp_path):
    src = sources["tiny-flux"]
    missing = {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    from smash_build.tiny_models import build_tiny

    bad = write_peft_lora(build_tiny("tiny-flux"), tmp_path / "bad.safetensors", extra=missing)
    with pytest.raises(SettingsError, match=r"build.lora\[0\].*lacks: transformer.transformer_blocks.7.attn.to_q"):
        build_from_text(lora_manifest(src["folder"], [(bad, 1.0)]), tmp_path / "art")
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art*"))


def test_lora_for_another_model_is_refused(sources, tmp_path):
    sdxl_lora = sources["tiny-sdxl"]["loras"]["peft"]
    with pytest.raises(SettingsError, match=r"build.lora\[0\]"):
        build_from_text(lora_manifest(sources["tiny-flux"]["folder"], [(sdxl_lora, 1.0)]), tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_cli_refuses_a_bad_lora_with_exit_2_and_writes_nothing(sources, tmp_path):
    from smash_build.tiny_models import build_tiny

    bad = write_peft_lora(build_tiny("tiny-flux"), tmp_path / "bad.safetensors", extra={
        "transformer.no_such_block.lora_A.weight": torch.zeros(4, 32),
        "transformer.no_such_block.lora_B.weight": torch.zeros(32, 4)})
    manifest = tmp_path / "m.toml"
    manifest.write_text(lora_manifest(sources["tiny-flux"]["folder"], [(bad, 1.0)]))
    proc = subprocess.run([sys.executable, "-m", "smash_build.cli", str(manifest)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "transformer.no_such_block" in proc.stderr and "build.lora[0]" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "m.toml"]


def test_lora_builds_are_byte_identical_whatever_the_output_folder(sources, tmp_path):
    src = sources["tiny-flux"]
    text = lora_manifest(src["folder"], [(src["loras"]["peft"], SCALE)], fuse=True, method="int8wo")
    build_from_text(text, tmp_path / "a")
    build_from_text(text, tmp_path / "elsewhere" / "other-name")
    first = tree_hashes(tmp_path / "a")
    assert len(first) > 10 and first == tree_hashes(tmp_path / "elsewhere" / "other-name")
