"""The follow-up steps of `smash-build MANIFEST` and the commands around it, as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from smash_build.cli import main

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from smash_build.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_build_then_evaluate_writes_results_and_a_card_that_agrees(tmp_path):
    manifest = tmp_path / "tiny-flux.toml"
    text = (REPO / "manifests" / "tiny-flux.toml").read_text().replace("num_prompts = 16", "num_prompts = 2")
    manifest.write_text(text)
    out = tmp_path / "art"
    proc = subprocess.run([*CLI, str(manifest), "-o", str(out), "--evaluate"], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "eval" / "results.json").read_text())
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "diffusers"
    optimized = results["configurations"][0]
    assert optimized["fidelity"]["psnr"]["n"] == 2
    assert any(Path(out / "eval" / "samples").iterdir())
    # The build's own file table still verifies: evaluation output is not part of the artifact's hashes.
    from smash_runtime.format import read_record, verify_files

    verify_files(out, read_record(out), mode="full")


def test_push_without_a_publish_table_is_a_usage_error_and_builds_nothing(tmp_path):
    out = tmp_path / "art"
    run = CliRunner().invoke(main, [str(REPO / "manifests" / "tiny-flux.toml"), "-o", str(out), "--push"])
    assert run.exit_code == 2
    assert "[publish.hub]" in run.output
    assert not out.exists()


def test_image_context_only_writes_a_buildable_context(tmp_path):
    art = tmp_path / "art"
    assert CliRunner().invoke(main, [str(REPO / "manifests" / "tiny-flux.toml"), "-o", str(art)]).exit_code == 0
    ctx = tmp_path / "ctx"
    run = CliRunner().invoke(main, ["image", str(art), "--context-only", str(ctx)])
    assert run.exit_code == 0, run.output
    assert (ctx / "Dockerfile").is_file()
    assert (ctx / "layers" / "artifact" / "opt" / "smash" / "artifact" / "smash.json").read_bytes() == (
        art / "smash.json").read_bytes()
    assert f"docker build {ctx}" in run.output


def test_precompile_without_a_compiler_says_there_is_nothing_to_do(tmp_path):
    art = tmp_path / "art"
    assert CliRunner().invoke(main, [str(REPO / "manifests" / "tiny-flux.toml"), "-o", str(art)]).exit_code == 0
    proc = subprocess.run([sys.executable, "-c", "from smash_runtime.cli import main; main()", str(art),
                           "--precompile", "--no-compile", "--compile-cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to precompile" in proc.stderr
    assert not (tmp_path / "cache").exists()
