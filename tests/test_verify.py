"""Verification modes: every mode refuses a changed byte before any weight is used; "fast" reuses
a hash only for the very file it was computed from (device, inode, size, mtime, ctime)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import smash_runtime
from smash_runtime.checked_hashes import RACY_NS
from smash_runtime.cli import main as smash_run
from smash_runtime.errors import ArtifactError
from smash_runtime.format import RECORD_FILE, read_record

from spine_helpers import build_from_text, manifest_text

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
MODES = ("fast", "full")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "tiny"
    build_from_text(manifest_text(fuse=True, method="int8wo"), out)
    return out


@pytest.fixture()
def art(built, tmp_path, monkeypatch) -> Path:
    """A private copy, old enough (past the racy window) for its hashes to be remembered."""
    monkeypatch.setenv("SMASH_HASH_CACHE", str(tmp_path / "hashes"))
    root = tmp_path / "art"
    shutil.copytree(built, root)
    time.sleep(RACY_NS / 1e9 + 0.2)
    return root


def _load(root: Path, mode: str):
    return smash_runtime.load(root, device="cpu", verify=mode, cacher=False, compiler=False)


def _flip_keeping_size_and_mtime(path: Path) -> None:
    """Flip one byte in place, then put size, atime and mtime back as they were (ctime moves: the kernel's)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_fast_hashes_once_then_reuses_only_for_the_same_file(art):
    files = len(read_record(art).files)
    first = _load(art, "fast").smash.verification
    assert first["hashed_files"] == files and first["hashed_bytes"] > 0
    again = _load(art, "fast").smash.verification
    assert again["hashed_files"] == 0, again
    assert _load(art, "full").smash.verification["hashed_files"] == files  # "full" never reuses
    # The same bytes under a new inode are a different file: hashed again, then accepted.
    path = art / WEIGHTS
    copy = path.with_suffix(".new")
    shutil.copy2(path, copy)
    os.replace(copy, path)
    assert _load(art, "fast").smash.verification["hashed_files"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_refuses_one_flipped_byte_before_any_image(art, tmp_path, mode):
    _load(art, "fast")  # its hash is remembered: "fast" must still notice the change
    assert _load(art, "fast").smash.verification["hashed_files"] == 0
    _flip_keeping_size_and_mtime(art / WEIGHTS)
    with pytest.raises(ArtifactError, match=f"{WEIGHTS}: blake3 does not match") as info:
        _load(art, mode)
    assert info.value.file == WEIGHTS
    out = tmp_path / "x.png"
    run = CliRunner().invoke(smash_run, [str(art), "--device", "cpu", "--verify", mode, "-o", str(out)])
    assert run.exit_code == 3 and WEIGHTS in run.stderr, run.stderr
    assert not out.exists()
    # And it stays refused: a failed check is not remembered as a pass.
    with pytest.raises(ArtifactError, match="blake3 does not match"):
        _load(art, "fast")


def test_a_file_changed_within_the_racy_window_is_not_remembered(built, tmp_path, monkeypatch):
    monkeypatch.setenv("SMASH_HASH_CACHE", str(tmp_path / "hashes"))
    root = tmp_path / "fresh"
    shutil.copytree(built, root)  # every file's ctime is now: a same-tick write could follow unseen
    files = len(read_record(root).files)
    assert _load(root, "fast").smash.verification["hashed_files"] == files
    assert _load(root, "fast").smash.verification["hashed_files"] == files


def test_a_damaged_or_foreign_record_is_ignored(art, tmp_path):
    files = len(read_record(art).files)
    _load(art, "fast")
    [record] = (tmp_path / "hashes").glob("*.json")
    record.write_text("{not json")
    assert _load(art, "fast").smash.verification["hashed_files"] == files
    # A record written for another folder is not this folder's, even with matching names.
    data = json.loads(record.read_text())
    data["root"] = "/elsewhere"
    record.write_text(json.dumps(data))
    assert _load(art, "fast").smash.verification["hashed_files"] == files


def test_a_record_for_other_bytes_is_not_taken(art, tmp_path):
    """An entry whose sha256 differs from smash.json (the artifact was rebuilt in place) is hashed again."""
    _load(art, "fast")
    [record] = (tmp_path / "hashes").glob("*.json")
    data = json.loads(record.read_text())
    assert data["files"][WEIGHTS]["identity"][1] == os.stat(art / WEIGHTS).st_ino
    data["files"][WEIGHTS]["digest"] = "blake3:" + "0" * 64
    record.write_text(json.dumps(data))
    assert _load(art, "fast").smash.verification["hashed_files"] == 1


def test_empty_hash_cache_setting_remembers_nothing(art, monkeypatch):
    monkeypatch.setenv("SMASH_HASH_CACHE", "")
    files = len(read_record(art).files)
    _load(art, "fast")
    assert _load(art, "fast").smash.verification["hashed_files"] == files


def test_there_is_no_mode_without_a_check(art):
    with pytest.raises(ValueError, match="no mode without a check"):
        _load(art, "off")
    run = CliRunner().invoke(smash_run, [str(art), "--device", "cpu", "--verify", "off"])
    assert run.exit_code == 2 and "'off' is not one of" in run.stderr
    assert (art / RECORD_FILE).is_file()


def test_a_format_2_record_is_checked_with_its_sha256(art):
    """Artifacts written before format 3 list sha256 only: still read, still checked, byte for byte."""
    path = art / RECORD_FILE
    data = json.loads(path.read_text())
    assert data["format_version"] == 3 and all(len(e["blake3"]) == 64 for e in data["files"].values())
    data["format_version"] = 2
    for entry in data["files"].values():
        del entry["blake3"]
    path.write_text(json.dumps(data))
    pipe = _load(art, "full")
    assert pipe.smash.verification["hashed_files"] == len(data["files"])
    _flip_keeping_size_and_mtime(art / WEIGHTS)
    for mode in MODES:
        with pytest.raises(ArtifactError, match=f"{WEIGHTS}: sha256 does not match"):
            _load(art, mode)


@pytest.mark.parametrize("size", [0, 1, (16 << 20) + 7])
def test_file_hashes_equal_the_hashes_of_its_bytes(tmp_path, size):
    """Chunked BLAKE3 reads (16 MiB) give the one-shot digest, across a chunk boundary and for an empty file."""
    import hashlib

    from blake3 import blake3

    from smash_runtime.format import file_entry

    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = {"sha256": hashlib.sha256(data).hexdigest(), "blake3": blake3(data).hexdigest(), "size": size}
    assert file_entry(path=path) == file_entry(data) == expected


def test_a_record_others_can_write_is_not_trusted(art, tmp_path, caplog):
    files = len(read_record(art).files)
    _load(art, "fast")
    [record] = (tmp_path / "hashes").glob("*.json")
    assert record.stat().st_mode & 0o077 == 0  # written private
    record.chmod(0o666)
    with caplog.at_level("WARNING", logger="smash_runtime"):
        assert _load(art, "fast").smash.verification["hashed_files"] == files
    assert "others can write it" in caplog.text
