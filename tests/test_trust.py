"""Artifacts are untrusted input; the user's disk is not ours to lose (docs/trust.md).

A corpus of hostile artifacts (tests/hostile_artifacts.py), each refused by ``load`` with an
ArtifactError naming the file or field, and by ``smash-run`` with one line and exit code 3,
while an audit hook proves no file outside the artifact was opened. Then the output folder:
what the build refuses to replace, and a rebuild killed at every phase.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import smash_runtime
from smash_runtime.cli import main as smash_run
from smash_runtime.errors import ArtifactError, SettingsError
from smash_runtime.format import RECORD_FILE, read_record, verify_files

from hostile_artifacts import CASES, UNLISTED, make_outside
from spine_helpers import build_from_text, image_digest, manifest_text

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# --- every file this process opens while watched (Python's audit hook sees every open()) ----------
_OPENED: list[str] = []
_WATCHING = [False]


def _audit(event: str, args: tuple) -> None:
    if not _WATCHING[0]:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))
    elif event == "pickle.find_class":  # any unpickling at all, torch.load included
        _OPENED.append(f"UNPICKLED {args}")


sys.addaudithook(_audit)


class watch_opens:
    def __enter__(self) -> list[str]:
        _OPENED.clear()
        _WATCHING[0] = True
        return _OPENED

    def __exit__(self, *exc) -> None:
        _WATCHING[0] = False


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "tiny"
    build_from_text(manifest_text(fuse=True, method="int8wo"), out)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The same artifact with the transformer split into shards, so there is an index to attack."""
    from smash_build.builder import build
    from smash_build.manifest import parse_manifest

    out = tmp_path_factory.mktemp("sharded") / "tiny"
    build(parse_manifest(manifest_text(fuse=True, method="int8wo"), base_dir=out.parent), out_dir=out,
          max_shard_bytes=100_000)
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return out


def test_the_corpus_is_large_and_the_good_artifacts_load(good, sharded):
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    assert image_digest(smash_runtime.load(sharded, device="cpu")) == image_digest(smash_runtime.load(good, device="cpu"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_artifact_is_refused_by_load_and_smash_run(case, good, sharded, tmp_path):
    base = sharded if case.needs_shards else good
    outside = make_outside(tmp_path / "outside", base)
    root = case.make(base, tmp_path / "art", outside)
    with watch_opens() as opened, pytest.raises(ArtifactError, match=case.match) as info:
        smash_runtime.load(root, device="cpu")
    message = str(info.value)
    assert info.value.file, f"the error must name the file: {message}"
    assert len(message) < 700, "messages cut echoed values short"
    assert not [p for p in opened if Path(p).resolve().is_relative_to(outside.resolve())], "opened a file outside the artifact"
    assert not [p for p in opened if p.startswith("UNPICKLED")], "something was unpickled"
    if info.value.file == RECORD_FILE:  # a bad record is refused before any other file of the artifact is opened
        inside = {Path(p).resolve() for p in opened if Path(p).resolve().is_relative_to(root.resolve())}
        assert inside <= {(root / RECORD_FILE).resolve()}, inside
    assert not [p for p in opened if p.endswith(".bin") and "bin" not in case.name], "an unlisted pickle file was opened"

    run = CliRunner().invoke(smash_run, [str(root), "--device", "cpu", "-o", str(tmp_path / "x.png")])
    assert run.exit_code == ArtifactError.exit_code == 3, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert not (tmp_path / "x.png").exists()


def test_smash_run_prints_one_line_and_a_traceback_only_when_asked(good, tmp_path):
    root = tmp_path / "art"
    shutil.copytree(good, root)
    data = json.loads((root / RECORD_FILE).read_text())
    data["components"]["vae"]["kind"] = "x" * 100_000
    (root / RECORD_FILE).write_text(json.dumps(data))
    cmd = [sys.executable, "-c", "from smash_runtime.cli import main; main()", str(root), "--device", "cpu"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert plain.returncode == 3
    assert plain.stderr.strip().count("\n") == 0 and "components.vae.kind" in plain.stderr
    assert len(plain.stderr) < 500, "the 100 KB value is cut short"
    debug = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "SMASH_DEBUG": "1"}, timeout=300)
    assert debug.returncode == 3 and "Traceback" in debug.stderr


def _listed_or_record(root: Path) -> set[str]:
    return {str((root / rel).resolve()) for rel in [*read_record(root).files, RECORD_FILE]}


def test_a_good_load_opens_only_listed_files(good):
    with watch_opens() as opened:
        pipe = smash_runtime.load(good, device="cpu")
    root = good.resolve()
    inside = {str(Path(p).resolve()) for p in opened if Path(p).resolve().is_relative_to(root)}
    assert inside, "the watch saw nothing: the test would prove nothing"
    assert inside <= _listed_or_record(good)
    assert pipe.smash.timings["verify"] > 0


@pytest.mark.parametrize("rel", sorted(UNLISTED))
def test_unlisted_file_beside_listed_ones_is_refused(good, tmp_path, rel):
    root = tmp_path / "art"
    shutil.copytree(good, root)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(UNLISTED[rel])
    for mode in ("full", "fast"):
        with watch_opens() as opened, pytest.raises(ArtifactError, match=f"{re.escape(rel)}: not listed"):
            smash_runtime.load(root, device="cpu", verify=mode)
        assert not [p for p in opened if p.endswith(rel)]
    result = CliRunner().invoke(smash_run, [str(root), "--device", "cpu", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 3 and rel in result.stderr


def test_unlisted_files_in_a_hub_snapshot_are_never_read(good, tmp_path):
    # Other downloads of the same repo may add files to a cache snapshot: ignored, never opened.
    root = tmp_path / "hub" / "models--org--name" / "snapshots" / ("0" * 40)
    shutil.copytree(good, root)
    for rel, data in UNLISTED.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    clean = smash_runtime.load(good, device="cpu")
    with watch_opens() as opened:
        tainted = smash_runtime.load(root, device="cpu", verify="full")
    assert not [p for p in opened if any(p.endswith(rel) for rel in UNLISTED)]
    text = "a <evil> cube"
    assert tainted.tokenizer(text).input_ids == clean.tokenizer(text).input_ids
    assert tainted.tokenizer.pad_token == clean.tokenizer.pad_token
    assert image_digest(tainted) == image_digest(clean)


def test_flipped_byte_in_a_tokenizer_file_is_caught(good, tmp_path):
    root = tmp_path / "art"
    shutil.copytree(good, root)
    path = root / "tokenizer" / "tokenizer.json"
    path.write_bytes(path.read_bytes().replace(b"<|endoftext|>", b"<|endoftexT|>", 1))
    with pytest.raises(ArtifactError, match="tokenizer/tokenizer.json: blake3 does not match"):
        smash_runtime.load(root, device="cpu")


# --- the output folder ----------------------------------------------------------------------------

def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _build_cli(args: list[str]):
    from smash_build.cli import main

    return CliRunner().invoke(main, args)


def _write_manifest(folder: Path, source: str, out: str, interval: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.toml"
    path.write_text(manifest_text(source, fuse=True).replace('dir = "artifact"', f'dir = "{out}"')
                    + f'\n[runtime.cacher]\nname = "fora"\ninterval = {interval}\n')
    return path


@pytest.mark.parametrize("setup", ["non-artifact", "manifest-folder", "source-folder", "inside-source", "contains-source"])
def test_build_refuses_folders_it_must_not_replace_and_leaves_them_untouched(setup, tmp_path):
    from smash_build.tiny_models import build_tiny

    project = tmp_path / "project"
    build_tiny("tiny-flux").save_pretrained(project / "models" / "src")
    (project / "notes").mkdir()
    (project / "notes" / "thesis.txt").write_text("years of work")
    source, out, reason = {
        "non-artifact": ("builtin:tiny-flux", "notes", "not an artifact"),
        "manifest-folder": ("builtin:tiny-flux", "sub/..", "manifest's folder"),
        "source-folder": ("./models/src", "models/src", "source folder"),
        "inside-source": ("./models/src", "models/src/dist", "source folder"),
        "contains-source": ("./models/src", "models", "source folder"),
    }[setup]
    manifest = _write_manifest(project, source, out)
    before = _tree(tmp_path)
    run = _build_cli([str(manifest)])
    assert run.exit_code == 2, run.output
    assert "output.dir" in run.stderr and reason in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert _tree(tmp_path) == before


def test_empty_folder_and_previous_artifact_are_replaced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    build_from_text(manifest_text(), target)
    first = (target / RECORD_FILE).read_bytes()
    build_from_text(manifest_text(fuse=True), target)
    assert (target / RECORD_FILE).read_bytes() != first
    verify_files(target, read_record(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILLED_BUILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from smash_build.exporters import artifact, output_folder
    from smash_build.builder import build
    from smash_build.manifest import load_manifest

    manifest, target, phase, exchange = sys.argv[1:5]
    def crash(name):
        if name == phase:
            os._exit(9)  # as abrupt as SIGKILL: no cleanup runs
    artifact._checkpoint = output_folder._checkpoint = crash
    if exchange == "no":  # a platform or file system without an atomic exchange
        output_folder.exchange = lambda a, b: False
    build(load_manifest(manifest), out_dir=Path(target))
    sys.exit(3)  # the phase was never reached
""")

PHASES = [("started", "yes"), ("component transformer", "yes"), ("record written", "yes"), ("exchanged", "yes"),
          ("record written", "no"), ("retired", "no"), ("renamed", "no")]


@pytest.mark.parametrize("phase,exchange", PHASES, ids=[f"{p}-{'exchange' if e == 'yes' else 'renames'}" for p, e in PHASES])
def test_rebuild_killed_at_every_phase_keeps_a_complete_artifact(phase, exchange, tmp_path):
    from smash_build.exporters.output_folder import recover_leftovers

    target = tmp_path / "art"
    build_from_text(manifest_text(), target)
    old = (target / RECORD_FILE).read_bytes()
    new_manifest = _write_manifest(tmp_path, "builtin:tiny-flux", "art", interval=3)
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(new_manifest), str(target), phase, exchange],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    if phase == "retired":
        # two renames cannot be atomic: for this instant the target is missing, and the old artifact
        # waits beside it under a name the next build recognises and moves back
        assert not target.exists()
    else:  # complete: the old artifact until the new one took its name
        verify_files(target, read_record(target))
        assert ((target / RECORD_FILE).read_bytes() == old) == (phase not in ("exchanged", "renamed"))
    log: list[str] = []
    recover_leftovers(target, log.append)
    verify_files(target, read_record(target))
    assert ((target / RECORD_FILE).read_bytes() == old) == (phase not in ("exchanged", "renamed"))
    assert not list(tmp_path.glob(".art.partial-*")), "every leftover is recovered or removed"
    assert log, "what was done with the leftovers is reported"


def test_the_record_model_writes_back_the_bytes_it_read(good):
    """smash.json goes through one typed model both ways without changing a byte."""
    record = read_record(good)
    assert record.dumps() == (good / RECORD_FILE).read_text(encoding="utf-8")
    assert record.components["transformer"].quantization.method == "int8wo"
    assert record.components["transformer"].fused_qkv and not record.components["vae"].fused_qkv
