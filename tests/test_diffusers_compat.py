"""Every artifact is a real diffusers folder: plain ``DiffusionPipeline.from_pretrained`` gives the
image ``smash_runtime.load`` gives, or refuses the artifact loudly - never a random-weight image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smash_runtime.format import RECORD_FILE
from spine_helpers import GEN, build_from_text, digests_in_fresh_process, image_digest, manifest_text

pytestmark = pytest.mark.usefixtures("one_thread")

COMBINATIONS = {"none": (False, None), "fuse_qkv": (True, None), "int8wo": (False, "int8wo"),
                "int8dq": (False, "int8dq"), "fuse_qkv+int8wo": (True, "int8wo")}

# Plain diffusers in a new interpreter: nothing of smash_runtime or smash_build is imported.
DIFFUSERS_LOADER = """
import hashlib, io, json, sys
import torch
from diffusers import DiffusionPipeline
torch.set_num_threads(int(sys.argv[3]))
out = {}
for path in json.loads(sys.argv[1]):
    kw = dict(json.loads(sys.argv[2]))
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        out[path] = "raised: " + str(exc)
        continue
    pipe.set_progress_bar_config(disable=True)
    image = pipe(kw["prompt"], num_inference_steps=kw["steps"], height=kw["height"], width=kw["width"],
                 generator=torch.Generator("cpu").manual_seed(kw["seed"])).images[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    out[path] = hashlib.sha256(buf.getvalue()).hexdigest()
    assert "smash_runtime" not in sys.modules and "smash_build" not in sys.modules
print(json.dumps(out))
"""


def diffusers_digests(paths: list[Path]) -> dict[str, str]:
    """Load each folder with plain diffusers in ONE new interpreter; image digest (or the error) by path."""
    args = [sys.executable, "-c", DIFFUSERS_LOADER, json.dumps([str(p) for p in paths]), json.dumps(GEN),
            str(torch.get_num_threads())]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sdxl"])
def test_plain_diffusers_gives_the_runtime_image(model, tmp_path):
    """none / fuse_qkv / int8wo / int8dq / fuse_qkv+int8wo: bit-identical images in three places."""
    built = {}
    for name, (fuse, method) in COMBINATIONS.items():
        out = tmp_path / name
        result = build_from_text(manifest_text(f"builtin:{model}", fuse=fuse, method=method, exclude="norm+embedding"), out)
        built[str(out)] = image_digest(result.pipeline)
    assert len(set(built.values())) > 1, "the transforms changed nothing: the test would prove nothing"
    paths = [Path(p) for p in built]
    assert digests_in_fresh_process(paths) == built
    assert diffusers_digests(paths) == built


def test_quantized_component_carries_a_torchao_config(tmp_path):
    build_from_text(manifest_text(fuse=True, method="int8dq", exclude="norm+embedding"), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "transformer" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "torchao"
    assert quant["quant_type"]["default"]["_type"] == "Int8DynamicActivationInt8WeightConfig"
    # excluded linears are named as diffusers names them, and only linears that exist unquantized
    assert "norm_out.linear" in quant["modules_to_not_convert"]
    assert not any("to_qkv" in m or m.endswith(".to_q") for m in quant["modules_to_not_convert"])


def test_a_component_diffusers_cannot_load_is_refused_loudly(tmp_path):
    """A quantized transformers component (the CLIP text encoder) has no loader outside smash_runtime:
    plain from_pretrained must raise (transformers: on the quantization_config it cannot read), and the
    card must say so; smash_runtime still loads it bit-identically."""
    text = manifest_text(method="int8wo", exclude="norm+embedding").replace(
        'dtype = "float32"', 'dtype = "float32"\ncomponents = ["transformer", "text_encoder"]')
    result = build_from_text(text, tmp_path / "a")
    record = json.loads((tmp_path / "a" / RECORD_FILE).read_text())["components"]
    assert record["text_encoder"]["plain_diffusers"] is False and "plain_diffusers" not in record["transformer"]
    assert digests_in_fresh_process([tmp_path / "a"]) == {str(tmp_path / "a"): image_digest(result.pipeline)}
    [outcome] = diffusers_digests([tmp_path / "a"]).values()
    assert outcome.startswith("raised: ") and "quantization config" in outcome, outcome
    card = (tmp_path / "a" / "README.md").read_text()
    assert "text_encoder" in card and "cannot" in card


@pytest.mark.parametrize("granularity", ["PerRow", "PerTensor"])
def test_fused_rows_split_exactly_or_stay_whole(granularity):
    """Per-row int8 splits into q/k/v rows that join back bit for bit; a per-tensor scale is not
    row-separable, so that weight stays fused (and the builder marks the component runtime-only)."""
    import torchao.quantization as tq
    from diffusers.models.attention_processor import Attention

    from smash_runtime.fused_layout import join_fused, split_fused
    from smash_runtime.structure import fuse_qkv_within

    torch.manual_seed(0)
    block = torch.nn.Module()
    block.attn = Attention(query_dim=64, heads=2, dim_head=32, bias=True).eval()
    assert fuse_qkv_within(block) == 1
    tq.quantize_(block, tq.Int8WeightOnlyConfig(granularity=getattr(tq, granularity)()))
    fused = block.state_dict()
    stored, kept = split_fused(fused, block, prefix="")
    if granularity == "PerTensor":
        assert kept == ["attn.to_qkv"] and "attn.to_qkv.weight" in stored
        return
    assert kept == [] and "attn.to_qkv.weight" not in stored
    assert [tuple(stored[f"attn.to_{p}.weight"].shape) for p in "qkv"] == [(64, 64)] * 3
    joined = join_fused(dict(stored), block)
    assert set(joined) == set(fused)
    weight, original = joined["attn.to_qkv.weight"], fused["attn.to_qkv.weight"]
    assert type(weight) is type(original)
    assert torch.equal(weight.qdata, original.qdata) and torch.equal(weight.scale, original.scale)
    assert torch.equal(joined["attn.to_qkv.bias"], fused["attn.to_qkv.bias"])
