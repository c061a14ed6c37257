"""The artifact format: the contract between smash-build and every runtime that reads it.

An artifact is a folder in the diffusers layout plus ``smash.json``::

    model_index.json
    transformer/config.json
    transformer/diffusion_pytorch_model.safetensors
    vae/ text_encoder/ tokenizer/ ...
    smash.json
    README.md

``smash.json`` holds ``format`` and ``format_version`` (bumped on any incompatible change),
``pipeline_class``, ``source``, ``dtype``, ``components`` (how to rebuild each one),
``transforms`` (what was baked), ``runtime`` (cacher, compiler and warm-up settings the
runtime applies), ``versions`` (libraries used to build) and ``files``: the sha256 and size
of every other file in the artifact, which the loader verifies.

    >>> from smash_runtime.format import read_manifest, verify_files
    >>> manifest = read_manifest("dist/tiny-flux")
    >>> verify_files("dist/tiny-flux", manifest, mode="full")
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from .errors import ArtifactError

FORMAT_NAME = "smash-artifact"
FORMAT_VERSION = 2  # 2: fused projections stored as their parts' rows; quantization_config in config.json
MANIFEST_FILE = "smash.json"
# Files that live in the artifact but are not covered by the hash table: smash.json itself,
# and the model card, which can be regenerated after evaluation without touching weights.
UNHASHED_FILES = frozenset({MANIFEST_FILE})
VerifyMode = Literal["full", "fast", "off"]
_CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_sha256(root: str | os.PathLike) -> str:
    """The artifact's identity: sha256 of ``smash.json``, which lists the sha256 of every other file.

    Keys the compile cache and labels container images.
    """
    return sha256_file(Path(root) / MANIFEST_FILE)


def file_table(root: str | os.PathLike, exclude: frozenset[str] = UNHASHED_FILES) -> dict[str, dict[str, Any]]:
    """``{relative/path: {"sha256", "size"}}`` for every file under ``root``, in sorted order."""
    root = Path(root)
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def dumps_manifest(manifest: dict[str, Any]) -> str:
    """Canonical JSON text of ``smash.json``: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``smash.json`` of the artifact at ``root``.

    Raises:
        ArtifactError: the folder is not an artifact, the JSON is broken, or the format
            version is one this runtime does not know.
    """
    root = Path(root)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a folder: expected a smash-build artifact folder", file=None)
    if not path.is_file():
        raise ArtifactError(
            f"{root} is not a smash-build artifact: it has no {MANIFEST_FILE}. "
            "Build one with `smash-build MANIFEST.toml`.",
            file=MANIFEST_FILE,
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); the artifact is corrupted", file=MANIFEST_FILE) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(
            f"{path}: not a smash-build artifact manifest (expected \"format\": \"{FORMAT_NAME}\")",
            file=MANIFEST_FILE,
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is not supported by this smash-runtime "
            f"(it reads version {FORMAT_VERSION}). Install the smash-runtime release that matches the "
            "builder that wrote it, or rebuild the artifact with this release.",
            file=MANIFEST_FILE,
        )
    for key in ("pipeline_class", "components", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path}: required key {key!r} is missing; the artifact is corrupted", file=MANIFEST_FILE)
    return manifest


def verify_files(root: str | os.PathLike, manifest: dict[str, Any], mode: VerifyMode = "full") -> None:
    """Check every file ``smash.json`` lists: present, right size and (``full``) right sha256.

    ``fast`` checks presence and sizes only; ``off`` checks nothing.

    Raises:
        ArtifactError: naming the first file that is missing, truncated or altered.
    """
    if mode not in ("full", "fast", "off"):
        raise ValueError(f"verify={mode!r}: expected 'full', 'fast' or 'off'")
    if mode == "off":
        return
    root = Path(root)
    for rel, expected in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{rel}: listed in {MANIFEST_FILE} but missing from {root}", file=rel)
        size = path.stat().st_size
        if size != expected["size"]:
            raise ArtifactError(
                f"{rel}: size {size} bytes, {MANIFEST_FILE} records {expected['size']}: "
                "the file is truncated or was replaced",
                file=rel,
            )
        if mode == "full" and sha256_file(path) != expected["sha256"]:
            raise ArtifactError(
                f"{rel}: sha256 does not match {MANIFEST_FILE}: the file is corrupted or was modified",
                file=rel,
            )
