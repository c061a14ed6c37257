"""The compile cache is on by default for artifacts that record a compiler, at the documented root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import smash_runtime
from spine_helpers import build_from_text, manifest_text

pytestmark = pytest.mark.usefixtures("one_thread")
COMPILER = '\n[runtime.compiler]\nname = "torch_compile"\nscope = "blocks"\n'


@pytest.fixture(scope="module")
def compiled_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled") / "art"
    build_from_text(manifest_text(extra=COMPILER), out)
    return out


def _load_and_release(artifact: Path, **kwargs):
    # torch.compile is lazy: load only wraps the blocks and activates the cache folder, compiling nothing.
    pipe = smash_runtime.load(artifact, device="cpu", cacher=False, **kwargs)
    cache = pipe.smash.compile_cache
    if cache is not None:
        cache.deactivate()  # restore TORCHINDUCTOR_CACHE_DIR for the rest of the test session
    return cache


def test_load_uses_the_xdg_cache_root_by_default(compiled_artifact, tmp_path, monkeypatch):
    monkeypatch.delenv("SMASH_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = _load_and_release(compiled_artifact)
    assert cache is not None
    assert Path(cache.report()["folder"]).parent == tmp_path / "xdg" / "smash" / "compile"


def test_smash_compile_cache_wins_over_xdg(compiled_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("SMASH_COMPILE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = _load_and_release(compiled_artifact)
    assert Path(cache.report()["folder"]).parent == tmp_path / "explicit"
    assert not (tmp_path / "xdg").exists()


def test_compile_cache_false_opts_out(compiled_artifact, tmp_path, monkeypatch):
    monkeypatch.delenv("SMASH_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _load_and_release(compiled_artifact, compile_cache=False) is None
    assert not (tmp_path / "xdg").exists()


def test_no_compile_cache_flag_is_refused_with_an_explicit_cache(compiled_artifact, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "smash_runtime.cli", str(compiled_artifact), "--no-compile-cache",
                           "--compile-cache", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--no-compile-cache cannot be combined" in proc.stderr


@pytest.mark.parametrize("command", ["smash_runtime.cli", "smash_runtime.server.cli"])
def test_cli_help_documents_the_default_root_and_the_opt_out(command):
    proc = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--no-compile-cache" in text and "~/.cache/smash/compile" in text
