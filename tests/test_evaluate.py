"""Evaluation: base vs artifact, metrics with an offline preflight, results.json, model card, sweeps."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from smash_runtime.errors import SettingsError
from smash_runtime.format import read_record, verify_files

from smash_build.evaluate import metrics as M
from smash_build.evaluate.prompts import PromptSetError, builtin_prompts, load_prompts
from smash_build.evaluate.settings import settings_from_dict

ROOT = Path(__file__).resolve().parents[1]
FAST = {"threads": 1, "warmup": 1}  # one torch thread: steadier timings on a shared 2-core machine


# --------------------------------------------------------------------------- prompts


def test_builtin_prompts_cover_every_category_early():
    prompts = builtin_prompts()
    categories = {p.category for p in prompts}
    assert len(prompts) == 32 and len({p.text for p in prompts}) == 32
    assert categories == {"counting", "colours", "positions", "text", "rare words", "long descriptions"}
    assert {p.category for p in load_prompts("builtin", num=6)} == categories


@pytest.mark.parametrize("name, body", [
    ("p.txt", "a red cube\n\n# a comment\na blue sphere\n"),
    ("p.json", json.dumps(["a red cube", {"prompt": "a blue sphere", "category": "colours"}])),
    ("p.jsonl", '{"prompt": "a red cube"}\n{"Prompt": "a blue sphere"}\n'),
    ("p.csv", "Prompts,Category\na red cube,Colors\n\"a blue sphere\",Colors\n"),  # DrawBench's columns
    ("p.tsv", "Prompt\tCategory\na red cube\tBasic\na blue sphere\tBasic\n"),     # PartiPrompts' columns
])
def test_prompt_files(tmp_path, name, body):
    (tmp_path / name).write_text(body, encoding="utf-8")
    assert [p.text for p in load_prompts(name, base_dir=tmp_path)] == ["a red cube", "a blue sphere"]


def test_prompt_errors_name_the_key(tmp_path):
    with pytest.raises(SettingsError, match="evaluate.prompts"):
        load_prompts("missing.txt", base_dir=tmp_path)
    with pytest.raises(SettingsError, match="evaluate.num_prompts = 40: at most 32"):
        load_prompts("builtin", num=40)
    (tmp_path / "bad.csv").write_text("id,caption_x\n1,hello\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match="no prompt column"):
        load_prompts(str(tmp_path / "bad.csv"))


def test_hub_dataset_reads_the_cache_offline_and_fails_clearly_when_absent(tmp_path, monkeypatch):
    """Offline, a cached dataset snapshot is read with huggingface_hub alone; an uncached one is a clear error."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    repo = cache / "datasets--someorg--prompts"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "data.csv").write_text("Prompt,Category\na cat on a mat,Animals\ntwo dogs,Counting\n", encoding="utf-8")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    prompts = load_prompts("hf://datasets/someorg/prompts")
    assert [(p.text, p.category) for p in prompts] == [("a cat on a mat", "Animals"), ("two dogs", "Counting")]
    with pytest.raises(PromptSetError, match="cannot fetch the Hub dataset 'someorg/absent'.*offline"):
        load_prompts("someorg/absent")


# --------------------------------------------------------------------------- settings


def test_settings_validation_names_key_value_and_allowed():
    with pytest.raises(SettingsError, match=r"evaluate.num_promts.*did you mean 'num_prompts'"):
        settings_from_dict({"num_promts": 3})
    with pytest.raises(SettingsError, match=r"evaluate.metrics = 'lpip'.*did you mean 'lpips'"):
        settings_from_dict({"metrics": ["psnr", "lpip"]})
    with pytest.raises(SettingsError, match="evaluate.height = 60: a multiple of 8"):
        settings_from_dict({"height": 60})
    with pytest.raises(SettingsError, match="evaluate.seeds"):
        settings_from_dict({"seeds": [0, -1]})
    s = settings_from_dict({"seeds": 3, "metrics": ["psnr"], "device": "cpu"})
    assert s.seeds == (3,) and s.metrics == ("psnr",)


# --------------------------------------------------------------------------- metrics


def _noise_images(n: int, seed: int, size: int = 64) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def test_psnr_identical_is_infinite_and_counted():
    base = _noise_images(3, 0)
    same = M.compute_metrics(base, [img.copy() for img in base], ["p"] * 3, ["psnr", "ssim", "ms_ssim"])
    assert all(math.isinf(row["psnr"]) for row in same.per_image)
    assert same.aggregate["psnr"] == {"mean_db": "inf", "min_db": "inf", "identical": 3, "n": 3}
    assert same.aggregate["ssim"]["mean"] == pytest.approx(1.0)
    assert same.aggregate["ms_ssim"]["scales"] == 3  # 64x64 holds 3 of MS-SSIM's 5 scales
    near = [Image.fromarray(np.asarray(img) ^ np.uint8(1)) for img in base]  # every value off by one
    diff = M.compute_metrics(base, near, ["p"] * 3, ["psnr", "ssim"])
    assert diff.aggregate["psnr"]["identical"] == 0 and 40 < diff.aggregate["psnr"]["mean_db"] < 60
    assert diff.aggregate["ssim"]["mean"] < 1.0


def _fake_torch_hub_weights(root: Path) -> None:
    """The files LPIPS and ARNIQA read, under their documented names, with the right structure when
    torchvision can build it (random values: the test checks the metric ran, not its value)."""
    ckpt = root / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    if not M.torchvision_available():
        for rel in M.TORCH_HUB_FILES["lpips"] + M.TORCH_HUB_FILES["arniqa"]:
            (root / rel).write_bytes(b"fake")
        return
    from torchvision.models import alexnet, resnet50

    torch.save(alexnet().state_dict(), ckpt / "alexnet-owt-7be5be79.pth")
    encoder = torch.nn.Sequential(*list(resnet50().children())[:-1])
    torch.save({f"model.{k}": v for k, v in encoder.state_dict().items()}, ckpt / "ARNIQA.pth")
    regressor = torch.nn.ParameterDict({"weights": torch.nn.Parameter(torch.randn(1, 4096)),
                                        "biases": torch.nn.Parameter(torch.randn(()))})  # torchmetrics unsqueezes it
    torch.save(regressor, ckpt / "regressor_koniq10k.pth")


def test_learned_metrics_preflight_with_fake_weights_and_with_an_empty_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    status = M.preflight(["psnr", "lpips", "arniqa", "clip_score"], empty)
    assert status["psnr"] is None
    assert "missing hub/checkpoints/alexnet-owt-7be5be79.pth" in status["lpips"]
    assert "missing hub/checkpoints/ARNIQA.pth, hub/checkpoints/regressor_koniq10k.pth" in status["arniqa"]
    assert "missing hub/models--openai--clip-vit-large-patch14" in status["clip_score"]
    skipped = M.compute_metrics(_noise_images(2, 0), _noise_images(2, 1), ["a", "b"], ["lpips", "arniqa"], weights_dir=empty)
    assert all(s.startswith("skipped: ") for s in skipped.status.values()) and skipped.aggregate == {}

    weights = tmp_path / "weights"
    _fake_torch_hub_weights(weights)
    assert M.missing_files("lpips", weights) == [] and M.missing_files("arniqa", weights) == []
    result = M.compute_metrics(_noise_images(2, 0), _noise_images(2, 1), ["a", "b"], ["lpips", "arniqa"], weights_dir=weights)
    if not M.torchvision_available():
        # torchmetrics builds LPIPS's AlexNet and ARNIQA's ResNet-50 with torchvision: with the files
        # present, the only reason left is the missing library, and it is said.
        assert result.status == {n: "skipped: needs torchvision (pip install torchvision matching your torch)"
                                 for n in ("lpips", "arniqa")}
        return
    assert result.status == {"lpips": "ok", "arniqa": "ok"}
    assert all(math.isfinite(row["lpips"]) and math.isfinite(row["arniqa_optimized"]) for row in result.per_image)


def _fake_clip_snapshot(root: Path) -> None:
    """A tiny random CLIP saved in the HF cache layout under the default model's name."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from smash_build.tiny_models import _clip_tokenizer

    repo = root / "hub" / "models--openai--clip-vit-large-patch14"
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=8)
    CLIPModel(config).eval().save_pretrained(snapshot)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(snapshot)


def test_clip_score_runs_offline_from_the_weights_dir(tmp_path):
    _fake_clip_snapshot(tmp_path)
    assert M.preflight(["clip_score"], tmp_path) == {"clip_score": None}
    result = M.compute_metrics(_noise_images(2, 0), _noise_images(2, 1), ["a red cube", "a cat"], ["clip_score"],
                               weights_dir=tmp_path)
    assert result.status == {"clip_score": "ok"}
    assert [sorted(row) for row in result.per_image] == [["clip_score_base", "clip_score_optimized"]] * 2
    assert all(0.0 <= v <= 100.0 for row in result.per_image for v in row.values())


# --------------------------------------------------------------------------- model card


def test_model_card_metadata_for_a_hub_source():
    from smash_build.model_card import render_model_card

    card = render_model_card({
        "name": "flux-fast",
        "source": {"id": "black-forest-labs/FLUX.1-schnell", "commit": "b" * 40, "license": "apache-2.0"},
        "transforms": {"fuse_qkv": True, "quantize": {"method": "int8dq", "exclude": ["norm"]}, "components": ["transformer"]},
        "runtime": {"cacher": {"name": "fora", "interval": 2}, "compiler": None},
    })
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "diffusers" and meta["base_model"] == "black-forest-labs/FLUX.1-schnell"
    assert meta["base_model_relation"] == "quantized" and meta["license"] == "apache-2.0"
    assert {"torchao-int8dq", "qkv-fused", "cache-fora"} <= set(meta["tags"])
    assert "smash_runtime.load" in card


# --------------------------------------------------------------------------- end to end


def _card_table(card: str) -> dict[str, list[str]]:
    rows = [line for line in card.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split(" | ")] for r in rows)}


def _assert_card_equals_results(card: str, results: dict) -> None:
    table = _card_table(card)
    summary = results["summary"]
    assert len(table) == len(summary["rows"])
    for row in summary["rows"]:
        cells = table[row["metric"]]
        for cell, col in zip(cells, summary["columns"]):
            value = row["values"][col]
            if isinstance(value, float):
                assert float(cell) == value, (row["metric"], col)
            else:
                assert cell == ("-" if value is None else str(value)), (row["metric"], col)


@pytest.fixture(scope="module")
def tiny_flux_evaluation(tmp_path_factory):
    """`smash-build manifests/tiny-flux.toml --evaluate` in Python: build, then evaluate_after_build."""
    from smash_build.builder import build
    from smash_build.evaluate.cli import evaluate_after_build
    from smash_build.manifest import load_manifest

    out = tmp_path_factory.mktemp("evaluate") / "tiny-flux"
    manifest = load_manifest(ROOT / "manifests" / "tiny-flux.toml",
                             overrides={"output.dir": str(out), "evaluate.num_prompts": 4})
    result = build(manifest)
    evaluation = evaluate_after_build(result, manifest, progress=False, overrides=FAST)
    return out, evaluation


def test_evaluate_after_build_writes_results_samples_plots_and_card(tiny_flux_evaluation):
    out, evaluation = tiny_flux_evaluation
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["settings"]["isolate"] is True and results["settings"]["images"] == 4
    assert results["settings"]["steps_used"] == 4 and results["machine"]["device"] == "cpu"
    assert {"torch", "diffusers", "torchmetrics"} <= set(results["versions"])
    (cfg,) = results["configurations"]
    assert cfg["cacher"] == {"name": "fora", "interval": 2, "start_step": 2}
    assert cfg["metric_status"] == {"psnr": "ok", "ssim": "ok", "ms_ssim": "ok"}
    assert len(cfg["per_image"]) == 4 and len(cfg["latencies_s"]) == 4 and len(cfg["warmup_s"]) == 1
    for side in (results["base"], cfg):
        assert side["latency"]["median_ms"] > 0 and side["latency"]["p90_ms"] >= side["latency"]["median_ms"]
        assert side["memory"]["kind"] == "peak_rss" and side["memory"]["method"].startswith("getrusage")
        assert side["memory"]["peak_bytes"] >= side["memory"]["load_peak_bytes"] > side["memory"]["baseline_bytes"] > 0
        assert side["load_s"] > 0
    assert cfg["size_bytes"] < results["base"]["size_bytes"]  # int8 weights
    assert "read_weights" in cfg["load_phases_s"]

    for rel in results["files"]:
        assert (out / rel).is_file(), rel
    assert {"eval/samples_grid.png", "eval/latency.png", "eval/samples/00-base.png", "eval/samples/00-optimized.png"} <= set(results["files"])
    with Image.open(out / "eval" / "samples_grid.png") as grid:
        assert grid.size[0] > 200
    # smash.json lists (and verifies) the evaluation files and the new card
    record = read_record(out)
    assert {"eval/results.json", "README.md", "eval/samples/03-optimized.png"} <= set(record.files)
    verify_files(out, record, mode="full")

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "diffusers" and meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-to-image"
    assert {"torchao-int8wo", "qkv-fused", "cache-fora"} <= set(meta["tags"])
    assert "base_model" not in meta  # builtin:tiny-flux is not a Hub model
    _assert_card_equals_results(card, results)
    median = results["summary"]["rows"][0]
    assert median["values"]["optimized"] == round(cfg["latency"]["median_ms"], 2)
    assert "![base vs optimized samples](eval/samples_grid.png)" in card


def test_evaluated_card_is_rewritten_for_the_repo_with_its_results(tiny_flux_evaluation):
    """The card publish uploads keeps the evaluation section and loads the repo instead of a folder."""
    from smash_build.model_card import card_for_repo

    out, _ = tiny_flux_evaluation
    card = card_for_repo(out, read_record(out).to_dict(), "org/tiny-fast", "exp")
    assert card is not None, "the card evaluate wrote was taken for a hand-edited one"
    local = (out / "README.md").read_text()
    assert 'smash_runtime.load("org/tiny-fast@exp")' in card and "org/tiny-fast" not in local
    assert card.split("## Evaluation", 1)[1] == local.split("## Evaluation", 1)[1]


def test_evaluate_command_no_transforms_no_cacher_is_identical(tmp_path):
    """`smash-build evaluate ARTIFACT`: an artifact with nothing baked and no cacher reproduces its base exactly."""
    from smash_build.builder import build
    from smash_build.evaluate.cli import evaluate_cmd
    from smash_build.manifest import parse_manifest

    text = textwrap.dedent("""
        [model]
        source = "builtin:tiny-flux"
        dtype = "float32"
        [build]
        fuse_qkv = false
        [output]
        dir = "plain"
    """)
    build(parse_manifest(text, base_dir=tmp_path))
    args = [str(tmp_path / "plain"), "--num-prompts", "2", "--seeds", "0,1", "--steps", "2", "--height", "64", "--width", "64",
            "--metrics", "psnr,ssim,lpips", "--weights-dir", str(tmp_path / "no-weights"), "--no-isolate", "--threads", "1"]
    run = CliRunner().invoke(evaluate_cmd, args)
    assert run.exit_code == 0, run.output
    results = json.loads((tmp_path / "plain" / "eval" / "results.json").read_text())
    (cfg,) = results["configurations"]
    assert cfg["cacher"] is None and cfg["compiler"] is None
    assert cfg["fidelity"]["psnr"] == {"mean_db": "inf", "min_db": "inf", "identical": 4, "n": 4}
    assert all(row["psnr"] == "inf" for row in cfg["per_image"])
    assert cfg["fidelity"]["ssim"]["mean"] == 1.0
    assert cfg["metric_status"]["lpips"].startswith("skipped: ")
    assert cfg["memory"]["method"] == "sampled every 5 ms"
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "| PSNR vs base (dB) | - | identical |" in card and "| images identical to base | - | 4/4 |" in card
    assert "- `lpips` skipped: " in card


def test_sweep_fora_intervals_lower_psnr_as_interval_grows(tmp_path):
    """`smash-build sweep M --vary runtime.cacher=none,fora --vary runtime.cacher.interval=2,3`."""
    from smash_build.evaluate.cli import sweep_cmd

    manifest = tmp_path / "m.toml"
    manifest.write_text(textwrap.dedent("""
        [model]
        source = "builtin:tiny-flux"
        dtype = "float32"
        [build]
        fuse_qkv = true
        [runtime.cacher]
        name = "fora"
        interval = 2
        start_step = 0
        [output]
        dir = "swept"
        [evaluate]
        num_prompts = 2
        steps = 5
        height = 64
        width = 64
        metrics = ["psnr", "ssim"]
        device = "cpu"
    """))
    run = CliRunner().invoke(sweep_cmd, [str(manifest), "--vary", "runtime.cacher=none,fora",
                                         "--vary", "runtime.cacher.interval=2,3", "--no-isolate", "--threads", "1"])
    assert run.exit_code == 0, run.output
    results = json.loads((tmp_path / "swept" / "eval" / "results.json").read_text())
    by_label = {c["label"]: c for c in results["configurations"]}
    assert list(by_label) == ["cacher=none", "cacher=fora, interval=2", "cacher=fora, interval=3"]
    assert by_label["cacher=none"]["fidelity"]["psnr"]["mean_db"] == "inf"  # fusion alone changes nothing
    p2 = by_label["cacher=fora, interval=2"]["fidelity"]["psnr"]
    p3 = by_label["cacher=fora, interval=3"]["fidelity"]["psnr"]
    assert p2["identical"] == 0 and p3["identical"] == 0
    assert p3["mean_db"] < p2["mean_db"]
    assert by_label["cacher=fora, interval=3"]["cacher"] == {"name": "fora", "interval": 3, "start_step": 0}
    assert (tmp_path / "swept" / "eval" / "latency_vs_fidelity.png").is_file()
    card = (tmp_path / "swept" / "README.md").read_text()
    assert "| metric | base | cacher=none | cacher=fora, interval=2 | cacher=fora, interval=3 |" in card
    assert "![latency vs fidelity](eval/latency_vs_fidelity.png)" in card
    _assert_card_equals_results(card, results)


def test_vary_is_validated_before_building():
    from smash_build.evaluate.sweep import expand_configurations, parse_vary

    runtime = {"cacher": {"name": "fora", "interval": 2, "start_step": 0}, "compiler": None}
    with pytest.raises(SettingsError, match=r"runtime.cacher.interval = 9"):
        expand_configurations(runtime, parse_vary(["runtime.cacher.interval=2,9"]))
    with pytest.raises(SettingsError, match=r"--vary = 'model.dtype'"):
        parse_vary(["model.dtype=float32,bfloat16"])
    with pytest.raises(SettingsError, match=r"runtime.compiler.mode.*records none"):
        expand_configurations(runtime, parse_vary(["runtime.compiler.mode=default"]))
    configs = expand_configurations(runtime, parse_vary(["runtime.cacher.interval=2,3", "runtime.cacher.start_step=0,1"]))
    assert [c.label for c in configs] == ["interval=2, start_step=0", "interval=2, start_step=1",
                                          "interval=3, start_step=0", "interval=3, start_step=1"]
    assert configs[3].cacher == {"name": "fora", "interval": 3, "start_step": 1} and configs[3].compiler is False
