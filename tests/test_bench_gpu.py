"""bench/gpu.py's --dry-run: every configuration's code path on the CPU, so a GPU lease is not
spent on a typo. The dry run uses the real model classes (FluxTransformer2DModel, the SDXL
UNet2DConditionModel) scaled down, real diffusers pipelines, the project's cachers, compiler
(dynamo with the eager backend) and int8dq quantization; about 40-100 s depending on CPU load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


def _load_gpu_module():
    # bench/ is not a package; the module imports nothing heavy at import time.
    if "bench_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["bench_gpu"]


def _run(tmp_path: Path, *args: str, timeout: int = 400) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    table = (out / "results.md").read_text() if (out / "results.md").exists() else ""
    return proc, results, table


@pytest.mark.timeout(420)
def test_dry_run_produces_a_measured_row_for_every_configuration(tmp_path):
    gpu = _load_gpu_module()
    proc, results, table = _run(tmp_path, "--budget-s", "600")
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    assert results["dry_run"] is True and results["skipped"] == [], log

    rows = {r["config"]: r for r in results["rows"]}
    assert list(rows) == [c.name for c in gpu.CONFIGS], log
    for cfg in gpu.CONFIGS:
        row = rows[cfg.name]
        assert row["status"] == "ok" and row["error"] is None, (cfg.name, row)
        assert row["runs"] == len(row["latencies_s"]) >= 1 and row["median_s"] > 0, row
        assert row["speedup"] is not None and row["nan"] is False, row
        assert f"| {cfg.name} |" in table
        if cfg.name.endswith("-baseline"):
            continue
        # Compared with the family's baseline latent from the same seed.
        assert row["identical_to_baseline"] is not None, row
        assert row["identical_to_baseline"] or row["psnr_db"] is not None, row
        if cfg.compile:
            assert row["compile_s"] is not None, row
        if cfg.cacher:
            # The project's cacher really skipped steps: fewer full steps than steps.
            full, steps = map(int, row["full_steps"].split("/"))
            assert steps == row["steps"] and 0 < full < steps, row

    # int8dq and fp8dq really quantized: their latents differ from the bf16 baseline's.
    assert rows["flux-int8dq"]["identical_to_baseline"] is False
    assert rows["flux-fp8dq"]["identical_to_baseline"] is False
    assert rows["flux-fora3-fp8dq-compile"]["psnr_db"] is not None
    # The CPU half of the fp8dq check ran (the builder baked an artifact); the GPU half is skipped.
    check = results["fp8dq_cpu_bake"]
    assert check["status"].startswith("skipped: cpu cannot run fp8dq") and check["float8_tensors"] > 0, check
    assert "fp8dq baked on the CPU vs quantized on the device: skipped" in table
    assert results["compile_backend"] == "eager"
    assert {p["phase"] for p in results["phases"]} >= {"imports", "flux-baseline", "sdxl-deepcache3-compile"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_device_script_rehearsal_installs_the_carried_wheels_and_runs_from_them(tmp_path):
    """bench/gpu_device.sh --dry-run: the wheels bench/prepare_device_wheels.sh makes are installed
    with --no-index into a site folder and bench/gpu.py imports every package from there."""
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    prep = subprocess.run(["bash", "bench/prepare_device_wheels.sh", str(wheels)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    names = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert sorted(set(names)) == ["blake3", "diffusers", "smash_build", "smash_runtime", "torchao"], names
    env.update(SMASH_WHEELS=str(wheels), SMASH_SITE=str(site), OUT=str(out))
    proc = subprocess.run(["bash", "bench/gpu_device.sh", "300", "--dry-run", "--only", "flux-fp8dq"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["imported_from"] == {name: str(site / name) for name in
                                        ("smash_runtime", "smash_build", "diffusers", "torchao")}
    assert [r["config"] for r in results["rows"]] == ["flux-baseline", "flux-fp8dq"]
    assert all(r["status"] == "ok" for r in results["rows"]) and (out / "log.txt").is_file()


def _can_run_fp8dq() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _can_run_fp8dq(), reason="needs a CUDA GPU with compute capability >= 8.9")
def test_fp8dq_baked_on_cpu_gives_the_gpu_quantized_latent_bit_for_bit(tmp_path):
    import torch

    check = _load_gpu_module().fp8dq_cpu_bake_check(torch.device("cuda"), tmp_path)
    assert check["status"] == "identical", check


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_budget_stops_the_run_and_keeps_what_it_measured(tmp_path):
    # 20 s covers the imports and maybe a configuration or two, depending on the CPU: whatever
    # ran is a row, the rest is listed as skipped, and the process ends near the budget.
    proc, results, table = _run(tmp_path, "--budget-s", "20", "--only", "flux-fora3,sdxl-deepcache3-compile")
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    done = [r["config"] for r in results["rows"]]
    skipped = [s["config"] for s in results["skipped"]]
    assert sorted(done + skipped) == sorted(
        ["flux-baseline", "flux-fora3", "sdxl-baseline", "sdxl-deepcache3-compile"]), log
    assert skipped, log
    assert results["elapsed_s"] < 20 + 15, log
    assert "skipped" in table


def test_only_adds_the_family_baseline_and_keeps_the_canonical_order():
    gpu = _load_gpu_module()
    assert [c.name for c in gpu.select("sdxl-deepcache3-compile,flux-fora2")] == [
        "flux-baseline", "flux-fora2", "sdxl-baseline", "sdxl-deepcache3-compile"]
    assert [c.name for c in gpu.select(None)] == [c.name for c in gpu.CONFIGS]
    with pytest.raises(SystemExit, match="flux-fora4.*choose from"):
        gpu.select("flux-fora4")


def test_real_configs_are_flux_dev_and_sdxl_base():
    gpu = _load_gpu_module()
    flux, sdxl = gpu.families(dry_run=False)["flux"], gpu.families(dry_run=False)["sdxl"]
    assert (flux.height, flux.width, flux.steps, flux.guidance) == (1024, 1024, 28, 3.5)
    assert (sdxl.height, sdxl.width, sdxl.steps, sdxl.guidance) == (1024, 1024, 30, 5.0)
    assert flux.denoiser["num_layers"] == 19 and flux.denoiser["num_single_layers"] == 38
    assert flux.scheduler["max_shift"] == 1.15 and flux.scheduler["use_dynamic_shifting"] is True
    assert sdxl.denoiser["transformer_layers_per_block"] == (1, 2, 10)


def test_real_denoisers_have_the_published_sizes():
    # Built on the meta device: no memory, no init; the parameter counts pin the configs.
    torch = pytest.importorskip("torch")
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    gpu = _load_gpu_module()
    fams = gpu.families(dry_run=False)
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**fams["flux"].denoiser)
        unet = UNet2DConditionModel(**fams["sdxl"].denoiser)
    assert round(sum(p.numel() for p in flux.parameters()) / 1e9, 1) == 11.9
    assert round(sum(p.numel() for p in unet.parameters()) / 1e9, 2) == 2.57
