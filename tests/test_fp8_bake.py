"""fp8dq baked on a CPU builder: the tensors torchao's GPU handler makes, recorded as needing sm >= 8.9."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch
from torch import nn

import smash_runtime
from smash_build.transforms import float8_dynamic_weight, quantization_config, quantize
from smash_runtime.errors import ArtifactError, UnsupportedOnDevice
from smash_runtime.format import RECORD_FILE
from smash_runtime.fused_layout import join_fused
from smash_runtime.structure import build_skeleton
from smash_runtime.tensors import load_component_state_dict

from spine_helpers import build_from_text, manifest_text

pytestmark = pytest.mark.usefixtures("one_thread")

FP8DQ_NEEDS = {"device": "cuda", "compute_capability": "8.9"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 24 is not a multiple of 16: torchao leaves that layer unquantized (_scaled_mm cannot take it)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 24)).to(torch.bfloat16)


def _fields(t: torch.Tensor) -> dict:
    if not hasattr(t, "qdata"):
        return {"plain": t.view(torch.uint8) if t.dtype.itemsize == 1 else t}
    return {"qdata": t.qdata.view(torch.uint8), "scale": t.scale, "block_size": t.block_size,
            "mm_config": t.mm_config, "act_quant_kwargs": t.act_quant_kwargs,
            "kernel_preference": t.kernel_preference, "dtype": t.dtype, "type": type(t)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        fa, fb = _fields(a[name]), _fields(b[name])
        assert fa.keys() == fb.keys(), name
        for key in fa:
            if isinstance(fa[key], torch.Tensor):
                assert torch.equal(fa[key], fb[key]), f"{name}.{key}"
            else:
                assert fa[key] == fb[key], f"{name}.{key}"


def test_cpu_bake_equals_torchao_handler_with_its_device_check_lifted():
    """torchao's own fp8dq handler, run on the CPU with only its hardware assertion disabled."""
    from torchao.quantization import Float8Tensor, quantize_

    model = _model()
    report = quantize(model, "fp8dq")
    reference = _model()
    with mock.patch("torchao.quantization.quant_api._check_hardware_support"):
        quantize_(reference, quantization_config("fp8dq"))
    assert isinstance(model[0].weight, Float8Tensor) and not isinstance(model[4].weight, Float8Tensor)
    _assert_same(model.state_dict(), reference.state_dict())
    assert model[0].weight.act_quant_kwargs.granularity == quantization_config("fp8dq").granularity[0]
    assert (report.quantized, report.skipped) == (["0", "2"], ["4"])


def test_weights_and_scales_equal_fp8wo_and_the_scale_definition():
    """Same float8 bytes and scales as torchao's fp8wo (which bakes on CPU), plus the fp8dq activation settings."""
    from torchao.quantization import Float8WeightOnlyConfig, PerRow, quantize_

    weight = _model()[0].weight.detach()
    baked = float8_dynamic_weight(weight, quantization_config("fp8dq"))
    wo = nn.Linear(64, 32).to(torch.bfloat16)
    wo.weight = nn.Parameter(weight.clone(), requires_grad=False)
    quantize_(wo, Float8WeightOnlyConfig(granularity=PerRow()))
    assert torch.equal(baked.qdata.view(torch.uint8), wo.weight.qdata.view(torch.uint8))
    assert torch.equal(baked.scale, wo.weight.scale)
    assert wo.weight.act_quant_kwargs is None and baked.act_quant_kwargs is not None
    # the definition: per output row, scale = max|w| / 448 (float8 e4m3's largest value)
    scale = (weight.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max).float()
    assert torch.equal(baked.scale, scale)
    expected = (weight.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(baked.qdata.view(torch.uint8), expected.view(torch.uint8))


def test_fp8dq_needs_bfloat16_weights(tmp_path):
    with pytest.raises(UnsupportedOnDevice, match="fp8dq' needs model.dtype = 'bfloat16'.*float32"):
        build_from_text(manifest_text(method="fp8dq"), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_fp8dq_artifact_stores_the_baked_tensors_records_its_need_and_cpu_load_refuses(tmp_path):
    text = manifest_text(fuse=True, method="fp8dq", exclude="norm+embedding").replace('"float32"', '"bfloat16"')
    result = build_from_text(text, tmp_path / "art")
    art = result.artifact.path
    manifest = json.loads((art / RECORD_FILE).read_text())
    assert manifest["components"]["transformer"]["quantization"] == {"method": "fp8dq", "requires": FP8DQ_NEEDS}
    assert manifest["transforms"]["quantize"]["method"] == "fp8dq"
    # what the runtime assigns: the stored tensors (fused q/k/v kept as their parts) joined again
    stored = join_fused(load_component_state_dict(art / "transformer", "diffusion_pytorch_model.safetensors"),
                        build_skeleton(art / "transformer", manifest["components"]["transformer"]))
    built = result.pipeline.transformer.state_dict()
    _assert_same(stored, {k: v.data if isinstance(v, nn.Parameter) else v for k, v in built.items()})
    assert sum(hasattr(t, "act_quant_kwargs") for t in stored.values()) > 10
    with pytest.raises(UnsupportedOnDevice, match=r"fp8dq, which needs a CUDA GPU with compute capability >= 8\.9; "
                                                  r"this load targets 'cpu'"):
        smash_runtime.load(art, device="cpu")


def test_loader_honours_a_recorded_need_and_rejects_a_malformed_one(tmp_path):
    result = build_from_text(manifest_text(method="int8wo"), tmp_path / "art")
    path = result.artifact.path / RECORD_FILE
    manifest = json.loads(path.read_text())
    record = manifest["components"]["transformer"]["quantization"]
    assert record == {"method": "int8wo"}
    record["requires"] = {"device": "cuda", "compute_capability": "9.0"}
    path.write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedOnDevice, match=r"int8wo, which needs a CUDA GPU with compute capability >= 9\.0"):
        smash_runtime.load(result.artifact.path, device="cpu")
    record["requires"] = {"device": "cuda", "compute_capability": "nine"}
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="components.transformer.quantization.requires.*MAJOR.MINOR"):
        smash_runtime.load(result.artifact.path, device="cpu")
