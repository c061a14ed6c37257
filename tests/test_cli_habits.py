"""CLI habits of smash-build, smash-run and smash-serve: --version, --json, -q/-v, exit codes, 80 columns."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hub_double import HubDouble
from smash_build.cli import EXIT_CODES, main

REPO = Path(__file__).resolve().parent.parent
TINY_FLUX = str(REPO / "manifests" / "tiny-flux.toml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
SMASH_BUILD = [sys.executable, "-c", "from smash_build.cli import main; main()"]
SMASH_RUN = [sys.executable, "-c", "from smash_runtime.cli import main; main()"]
SMASH_SERVE = [sys.executable, "-c", "from smash_runtime.server.cli import main; main()"]


def _run(command: list[str], *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env or ENV, timeout=600)


@pytest.mark.parametrize("command, first", [(SMASH_BUILD, "smash-build 0."), (SMASH_RUN, "smash-run (smash-runtime) 0."),
                                            (SMASH_SERVE, "smash-serve (smash-runtime) 0.")])
def test_version_names_the_packages_and_the_libraries(command, first):
    proc = _run(command, "--version")
    assert proc.returncode == 0, proc.stderr[-2000:]
    own, libraries = proc.stdout.strip().splitlines()
    assert own.startswith(first)
    for name in ("python 3.", "torch 2.", "diffusers 0.", "torchao 0."):
        assert name in libraries


def test_every_exit_code_is_in_help():
    build_help = _run(SMASH_BUILD, "--help").stdout
    for code, meaning in EXIT_CODES.items():
        assert f"{code}  {meaning}" in build_help
    run_help = " ".join(_run(SMASH_RUN, "--help").stdout.split())
    assert re.search(r"Exit codes: .*\b1 [a-z].*\b2 [a-z]", run_help), run_help  # 2: bad option (click's own too)


def test_validate_json_is_one_object_and_quiet_is_silent():
    run = CliRunner().invoke(main, ["validate", TINY_FLUX, "--json"])
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert result["valid"] is True and result["source"] == "builtin:tiny-flux"
    assert result["quantize"] == "int8wo" and result["fuse_qkv"] is True
    quiet = CliRunner().invoke(main, ["-q", "validate", TINY_FLUX])
    assert quiet.exit_code == 0 and quiet.output == ""
    both = CliRunner().invoke(main, ["validate", TINY_FLUX, "-q", "-v"])
    assert both.exit_code == 2 and "-q and -v exclude each other" in both.output


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`smash-build M.toml --json` at 80 columns: (the artifact folder, the process)."""
    art = tmp_path_factory.mktemp("habits") / "art"
    proc = _run(SMASH_BUILD, TINY_FLUX, "-o", str(art), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return art, proc


def test_build_json_names_the_artifact_and_the_table_fits_80_columns(built):
    art, proc = built
    result = json.loads(proc.stdout)
    assert result["artifact"]["path"] == str(art.resolve())
    assert result["artifact"]["smash_json_sha256"] == hashlib.sha256((art / "smash.json").read_bytes()).hexdigest()
    files = [p for p in art.rglob("*") if p.is_file()]
    assert result["artifact"]["size_bytes"] == sum(p.stat().st_size for p in files)
    assert result["artifact"]["files"] == len(files)
    [transformer] = result["components"]
    assert transformer["name"] == "transformer" and 0 < transformer["bytes_after"] < transformer["bytes_before"]
    [row] = [line for line in proc.stderr.splitlines() if "0.65x" in line or "KB" in line and "x " in line]
    assert row.split()[0] == "transformer" and len(row) <= 80
    assert "quantizing transformer" in proc.stderr
    assert "cli.py:" not in proc.stderr and "builder.py:" not in proc.stderr  # no source locations without -v


def test_build_quiet_prints_nothing_and_verbose_adds_source_locations(built, tmp_path):
    quiet = _run(SMASH_BUILD, "-q", TINY_FLUX, "-o", str(tmp_path / "quiet"))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "quiet" / "smash.json").read_bytes() == (built[0] / "smash.json").read_bytes()
    loud = _run(SMASH_BUILD, TINY_FLUX, "-o", str(tmp_path / "loud"), "-v")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "builder.py:" in loud.stderr


def test_smash_run_quiet_and_verbose(built):
    art, _ = built
    args = (str(art), "--precompile", "--no-compile")  # loads, generates nothing: the cheapest full run
    normal = _run(SMASH_RUN, *args)
    assert normal.returncode == 0, normal.stderr[-3000:]
    assert "nothing to precompile" in normal.stderr and "loader.py:" not in normal.stderr
    quiet = _run(SMASH_RUN, *args, "-q")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    verbose = _run(SMASH_RUN, *args, "-v")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "(loader.py:" in verbose.stderr and f"loaded {art}" in verbose.stderr


def test_publish_json_gives_the_commit_sha(built, tmp_path):
    art, _ = built
    token = "hf_" + secrets.token_hex(16)
    with HubDouble(tmp_path / "hub") as hub:
        hub.add_token(token, user="alice", orgs=["smash"])
        env = {**hub.client_env(tmp_path / "hf_home", token=token), "COLUMNS": "80"}
        dry = _run(SMASH_BUILD, "publish", str(art), "--repo", "smash/habits", "--dry-run", "--json", env=env)
        assert dry.returncode == 0, dry.stderr[-3000:]
        planned = json.loads(dry.stdout)
        assert planned["dry_run"] is True and planned["commit_sha"] is None
        assert "would upload" in dry.stderr  # the human lines moved to stderr
        pub = _run(SMASH_BUILD, "publish", str(art), "--repo", "smash/habits", "--json", env=env)
        assert pub.returncode == 0, pub.stderr[-3000:]
        result = json.loads(pub.stdout)
        assert result["commit_sha"] == hub.head("smash/habits")
        assert result["repo"] == "smash/habits" and result["files"] == planned["files"] > 0
        assert result["size_bytes"] == planned["size_bytes"]


def test_image_context_json(built, tmp_path):
    art, _ = built
    proc = _run(SMASH_BUILD, "image", str(art), "--context-only", str(tmp_path / "ctx"), "--json", "-t", "smash/h:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["context"] == str((tmp_path / "ctx").resolve()) and result["tag"] == "smash/h:1"
    assert result["smash_json_sha256"] == hashlib.sha256((art / "smash.json").read_bytes()).hexdigest()
    assert result["files"] == sum(1 for p in (tmp_path / "ctx").rglob("*") if p.is_file())
