"""The artifact format: the contract between smash-build and every runtime that reads it.

An artifact is a folder in the diffusers layout plus ``smash.json``, *the artifact record*::

    model_index.json
    transformer/config.json
    transformer/diffusion_pytorch_model.safetensors
    vae/ text_encoder/ tokenizer/ ...
    smash.json
    README.md

The record (:class:`ArtifactRecord`) holds ``format`` and ``format_version`` (bumped on any
incompatible change), ``pipeline_class``, ``source``, ``dtype``, ``components`` (how to rebuild
each one), ``transforms`` (what was baked), ``runtime`` (cacher, compiler and warm-up settings
the runtime applies), ``versions`` (libraries used to build) and ``files``: the sha256 and size
of every other file in the artifact. It is parsed and validated once, before any other file of
the artifact is opened; every file the runtime reads afterwards is one it lists (see
:class:`ListedFiles` and docs/trust.md).

    >>> from smash_runtime.format import read_record, verify_files
    >>> record = read_record("dist/tiny-flux")
    >>> listed = verify_files("dist/tiny-flux", record, mode="full")
    >>> listed.read_bytes("model_index.json")[:1]
    b'{'
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .checked_hashes import CheckedHashes, bytes_digest, file_digest, hash_in_parallel, sha256_file
from .errors import ArtifactError, SettingsError, shorten

FORMAT_NAME = "smash-artifact"
# 2: fused projections stored as their parts' rows; quantization_config in config.json.
# 3: every file also carries its BLAKE3 hash, which the runtime verifies (sha256 stays for tools).
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
RECORD_FILE = "smash.json"
# smash.json is the one file not covered by its own hash table.
UNHASHED_FILES = frozenset({RECORD_FILE})
# "full": hash every listed file now. "fast": hash a file unless this machine already hashed
# this very file (same device, inode, size, mtime and ctime; see checked_hashes). Both refuse a
# flipped byte before any weight is used; there is no mode that skips the check.
VerifyMode = Literal["full", "fast"]
VERIFY_MODES = ("full", "fast")

# Bounds checked before a JSON parser sees the bytes: a record of a large model is well under
# 1 MB; nesting deeper than a few levels is never written by the builder.
MAX_RECORD_BYTES = 32 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024  # a listed JSON file (configs, shard index, tokenizer vocab)
MAX_JSON_DEPTH = 64
MAX_PATH_CHARS = 1024

LIBRARIES = ("diffusers", "transformers")
QUANT_METHODS = ("int8dq", "int8wo", "int4wo", "fp8wo", "fp8dq")
DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------
# Paths inside the artifact

def check_relative_path(rel: object, what: str = "path") -> str:
    """``rel`` if it is a plain relative POSIX path inside the artifact, else ValueError.

    Refused: non-strings, empty paths, absolute paths (``/x``, ``C:x``), backslashes, NUL and
    other control characters, and ``""``, ``"."`` or ``".."`` parts.

        >>> check_relative_path("transformer/config.json")
        'transformer/config.json'
    """
    if not isinstance(rel, str):
        raise ValueError(f"{what} must be a string")
    if not rel or len(rel) > MAX_PATH_CHARS:
        raise ValueError(f"{what} must be 1 to {MAX_PATH_CHARS} characters")
    if rel.startswith("/") or "\\" in rel or re.match(r"[A-Za-z]:", rel):
        raise ValueError(f"{what} {shorten(rel)} is absolute; expected a relative POSIX path inside the artifact")
    if any(ord(c) < 32 or c == "\x7f" for c in rel):
        raise ValueError(f"{what} {shorten(rel)} holds control characters")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise ValueError(f"{what} {shorten(rel)} has an empty, '.' or '..' part; expected a normalised path inside the artifact")
    return rel


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", name):
        raise ValueError(f"component name {shorten(name)} is not a plain identifier (letters, digits, '_')")
    return name


RelPath = Annotated[str, AfterValidator(check_relative_path)]
ComponentName = Annotated[str, AfterValidator(_check_name)]
ClassName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")]


# ---------------------------------------------------------------------------------------------
# The record

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FileRecord(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex sha256 of the file's bytes")
    blake3: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                               description="lowercase hex BLAKE3 of the file's bytes (format 3); verified when present")
    size: int = Field(ge=0, le=1 << 50, description="size in bytes")

    @property
    def digest(self) -> str:
        """The hash the runtime checks, as ``"ALGORITHM:HEX"``: BLAKE3 when recorded, else sha256."""
        return f"blake3:{self.blake3}" if self.blake3 else f"sha256:{self.sha256}"

    @property
    def algorithm(self) -> str:
        return "blake3" if self.blake3 else "sha256"


def file_entry(data: bytes | None = None, *, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The record's entry for a file's bytes (or the file at ``path``): sha256, BLAKE3 and size."""
    if path is not None:
        digests = {algorithm: file_digest(path, algorithm) for algorithm in ("sha256", "blake3")}
        size = os.stat(path).st_size
    else:
        digests = {algorithm: bytes_digest(data, algorithm) for algorithm in ("sha256", "blake3")}
        size = len(data)
    return {**{algorithm: digest.split(":", 1)[1] for algorithm, digest in digests.items()}, "size": size}


def _check_capability(text: str) -> str:
    if not re.fullmatch(r"[0-9]{1,2}\.[0-9]{1,2}", text):
        raise ValueError("expected a CUDA compute capability 'MAJOR.MINOR', such as '8.9'")
    return text


class RequiresRecord(_Strict):
    """What the stored weights need to run (fp8 baked on a CPU still needs sm >= 8.9 to run)."""

    device: Literal["cuda"]
    compute_capability: Annotated[str, AfterValidator(_check_capability)]

    @property
    def capability(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)


class QuantizationRecord(_Strict):
    method: Literal[QUANT_METHODS]
    requires: RequiresRecord | None = None


class ComponentRecord(_Strict):
    """How the runtime rebuilds one pipeline component from its folder."""

    library: Literal[LIBRARIES]
    class_name: ClassName = Field(alias="class")
    kind: Literal["model", "tokenizer", "config"]
    fused_qkv: bool = False
    quantization: QuantizationRecord | None = None
    plain_diffusers: bool | None = None  # False: plain from_pretrained cannot load this component (informational)


class SourceRecord(_Strict):
    id: str = Field(max_length=4096)
    revision: str | None = Field(default=None, max_length=256)
    commit: str | None = Field(default=None, max_length=256)
    license: str | None = Field(default=None, max_length=256)
    # carried over from the base model's card (informational)
    license_name: str | None = Field(default=None, max_length=256)
    license_link: str | None = Field(default=None, max_length=4096)
    pipeline_tag: str | None = Field(default=None, max_length=256)


class QuantizeReportRecord(_Strict):
    method: Literal[QUANT_METHODS]
    exclude: list[str] = []
    quantized: list[str] = []
    excluded: list[str] = []
    skipped: list[str] = []  # layers torchao left as they were


class QuantizeRecord(_Strict):
    method: Literal[QUANT_METHODS]
    exclude: list[str] = []
    modules: dict[str, QuantizeReportRecord] = {}


class TransformsRecord(BaseModel):
    """What the build baked. Informational for the runtime (the components say what to rebuild)."""

    model_config = ConfigDict(extra="allow")
    lora: list[dict[str, Any]] | None = None  # LoRA adapters fused before everything else, as the builder recorded them
    order: list[Literal["lora", "fuse_qkv", "quantize"]] = []
    components: list[ComponentName] = []
    fuse_qkv: bool = False
    quantize: QuantizeRecord | None = None


class RuntimeRecord(_Strict):
    """The recorded ``[runtime]`` tables, validated by the runtime's settings models when the record is read.

    The tables stay as recorded (so the record round-trips byte for byte); the typed configs
    the hooks take are ``cacher_config``, ``compiler_config``, ``warmup_config`` and ``serve_settings``.
    """

    cacher: dict[str, Any] | None = None
    compiler: dict[str, Any] | None = None
    warmup: dict[str, Any] | None = None
    serve: dict[str, Any] | None = None  # Ray Serve scaling ([serve] in the manifest)

    # The typed configs, made once by the validator below.
    _typed: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _tables_are_valid_settings(self) -> RuntimeRecord:
        # Imported here: the record is read by tools that need no settings (and no torch).
        from .server.scaling import serve_settings_from_dict
        from .settings import cacher_from_dict, compiler_from_dict, warmup_from_dict

        parsers = {"cacher": cacher_from_dict, "compiler": compiler_from_dict, "serve": serve_settings_from_dict}
        for table, parse in parsers.items():
            try:
                self._typed[table] = parse(getattr(self, table)) if getattr(self, table) else None
            except SettingsError as exc:
                raise ValueError(f"[runtime.{table}] {exc}") from None
        try:
            self._typed["warmup"] = warmup_from_dict(self.warmup or {})
        except SettingsError as exc:
            raise ValueError(f"[runtime.warmup] {exc}") from None
        return self

    @property
    def cacher_config(self):
        """The recorded cacher as its typed config (``ForaConfig``, ...), or None."""
        return self._typed["cacher"]

    @property
    def compiler_config(self):
        """The recorded compiler as its typed config (``TorchCompileConfig``, ...), or None."""
        return self._typed["compiler"]

    @property
    def warmup_config(self):
        """The recorded warm-up shapes as a ``WarmupConfig`` (empty when none were recorded)."""
        return self._typed["warmup"]

    @property
    def serve_settings(self):
        """The recorded Ray Serve scaling as ``ServeSettings``, or None."""
        return self._typed["serve"]


class ArtifactRecord(_Strict):
    """``smash.json``: the artifact record. ``files`` lists every file the runtime may open."""

    format: Literal[FORMAT_NAME]
    format_version: Literal[READABLE_VERSIONS]
    name: str | None = Field(default=None, max_length=256)
    pipeline_class: ClassName
    source: SourceRecord | None = None
    dtype: Literal[DTYPES] | None = None
    components: dict[ComponentName, ComponentRecord]
    transforms: TransformsRecord | None = None
    runtime: RuntimeRecord | None = None
    versions: dict[str, str] = {}
    source_date_epoch: int | None = Field(default=None, ge=0, description="fixed time stamp for container images")
    files: dict[RelPath, FileRecord]

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON data, with exactly the keys it was made with."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def dumps(self) -> str:
        """Canonical JSON text of ``smash.json``: sorted keys, fixed indentation, trailing newline."""
        return dumps_record(self.to_dict())

    @property
    def runtime_settings(self) -> RuntimeRecord:
        return self.runtime or RuntimeRecord()


def dumps_record(data: dict[str, Any]) -> str:
    """Canonical JSON text of a record given as data (sorted keys, indent 2, trailing newline)."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _field_path(loc: tuple) -> str:
    """``("files", "a/b.json", "size")`` -> ``files['a/b.json'].size``; keys are quoted and cut short."""
    text = ""
    for part in loc:
        if part == "[key]":
            text += " (the key)"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{shorten(part, 80)}]"
    return text or "(top level)"


def record_from_data(data: object, where: str = RECORD_FILE) -> ArtifactRecord:
    """Validate parsed JSON as an :class:`ArtifactRecord`; the first problems become one ArtifactError."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected a JSON object, found {type(data).__name__}",
                            file=RECORD_FILE, field="(top level)")
    if data.get("format") != FORMAT_NAME:
        raise ArtifactError(
            f"{where}: not a smash-build artifact record (expected \"format\": \"{FORMAT_NAME}\", "
            f"found {shorten(data.get('format'))})", file=RECORD_FILE, field="format")
    if data.get("format_version") not in READABLE_VERSIONS or isinstance(data.get("format_version"), bool):
        raise ArtifactError(
            f"{where}: artifact format version {shorten(data.get('format_version'))} is not supported by this "
            f"smash-runtime (it reads versions {', '.join(map(str, READABLE_VERSIONS))}). Install the smash-runtime "
            "release that matches the builder that wrote it, or rebuild the artifact with this release.",
            file=RECORD_FILE, field="format_version")
    try:
        return ArtifactRecord.model_validate(data)
    except ValidationError as exc:
        problems = exc.errors(include_url=False)
        first = problems[0]
        field = _field_path(first["loc"])
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ArtifactError(
            f"{where}: field {field} = {shorten(first.get('input'))}: {first['msg'].removeprefix('Value error, ')}{more}; "
            "the artifact is corrupted or was not written by smash-build",
            file=RECORD_FILE, field=field) from None


# ---------------------------------------------------------------------------------------------
# Bounded JSON

def _json_depth(text: str) -> int:
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    depth = deepest = 0
    for match in re.finditer(r"[\[\]{}]", stripped):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(data: bytes, rel: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of the artifact with its size and nesting depth bounded first.

    Raises:
        ArtifactError: naming ``rel``, when the file is too big, too deep or not JSON.
    """
    if len(data) > max_bytes:
        raise ArtifactError(f"{rel}: {len(data)} bytes, more than the {max_bytes} allowed for a JSON file of an artifact",
                            file=rel)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{rel}: not UTF-8 text ({exc.reason} at byte {exc.start})", file=rel) from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ArtifactError(f"{rel}: JSON nested {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed", file=rel)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ArtifactError(f"{rel}: not valid JSON ({shorten(str(exc), 120)}); the artifact is corrupted", file=rel) from None


def read_record(root: str | os.PathLike) -> ArtifactRecord:
    """Read, bound, parse and validate ``smash.json`` of the artifact folder ``root``.

    Raises:
        ArtifactError: the folder is not an artifact, ``smash.json`` is too big, too deep, not
            JSON, of an unknown format version, or has a field of the wrong type or value.

    Example:
        >>> record = read_record("dist/tiny-flux")
        >>> record.components["transformer"].kind
        'model'
    """
    root = Path(root)
    path = root / RECORD_FILE
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a folder: expected a smash-build artifact folder", file=None)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(
            f"{root} is not a smash-build artifact: it has no {RECORD_FILE}. Build one with `smash-build MANIFEST.toml`.",
            file=RECORD_FILE) from None
    if stat.S_ISLNK(st.st_mode) and not _is_hub_blob(root.resolve(), path):
        raise ArtifactError(f"{path}: is a symlink; an artifact's {RECORD_FILE} must be a regular file", file=RECORD_FILE)
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ArtifactError(f"{path}: larger than {MAX_RECORD_BYTES} bytes; not an artifact record", file=RECORD_FILE)
    data = parse_json(path.read_bytes(), RECORD_FILE, MAX_RECORD_BYTES)
    return record_from_data(data, str(path))


# ---------------------------------------------------------------------------------------------
# Files: hashing, listing, verification

def artifact_sha256(root: str | os.PathLike) -> str:
    """The artifact's identity: sha256 of ``smash.json``, which lists the sha256 of every other file.

    Keys the compile cache and labels container images.
    """
    return sha256_file(Path(root) / RECORD_FILE)


def file_table(root: str | os.PathLike, exclude: frozenset[str] = UNHASHED_FILES) -> dict[str, dict[str, Any]]:
    """``{relative/path: {"sha256", "blake3", "size"}}`` for every file under ``root``, in sorted order."""
    root = Path(root)
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        table[rel] = file_entry(path=path)
    return table


def _is_hub_snapshot(root_real: Path) -> bool:
    repo = root_real.parent.parent
    return root_real.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--"))


def refuse_unlisted_files(root_real: Path, record: ArtifactRecord) -> None:
    """Refuse an artifact folder holding a file its record does not list (``smash.json`` aside).

    Libraries pick up optional files by name (a tokenizer's ``added_tokens.json``, a
    ``*.bin`` weight file); the loader never hands them one, and a folder that holds one was
    changed after the build. Hub cache snapshots are exempt: other downloads of the same
    repo may add files there, and the loader ignores them.
    """
    for folder, dirs, names in os.walk(root_real):
        dirs.sort()
        for name in sorted(names):
            rel = Path(folder, name).relative_to(root_real).as_posix()
            if rel != RECORD_FILE and rel not in record.files:
                raise ArtifactError(
                    f"{rel[:200]}: not listed in {RECORD_FILE} 'files'; an artifact holds only the files its "
                    "record lists (this one was added after the build: remove it, or rebuild)", file=rel)


def _is_hub_blob(root_real: Path, path: Path) -> bool:
    """The Hub cache exception: ``path`` is a symlink into the same repo's blob store.

    huggingface_hub keeps ``<cache>/models--ORG--NAME/snapshots/<commit>/<file>`` as symlinks
    to ``<cache>/models--ORG--NAME/blobs/<hash>``. Accepted only when the artifact root is such
    a ``snapshots/<commit>`` folder, and the link resolves to a regular file directly inside
    that repo's own ``blobs`` folder.
    """
    repo = root_real.parent.parent
    if not _is_hub_snapshot(root_real):
        return False
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return target.parent == repo / "blobs" and stat.S_ISREG(os.lstat(target).st_mode)


def resolve_listed(root_real: Path, rel: str) -> Path:
    """The real path of listed file ``rel`` under the (resolved) root, refusing every way out.

    Each folder on the way must be a real folder inside the root (no symlinks); the file itself
    must be a regular file, or a Hub cache symlink (see :func:`_is_hub_blob`).
    """
    check_relative_path(rel)
    current = root_real
    parts = rel.split("/")
    for part in parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            raise ArtifactError(f"{rel}: listed in {RECORD_FILE} but missing from {root_real}", file=rel) from None
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"{rel}: its folder {current.relative_to(root_real).as_posix()} is a symlink; "
                                "an artifact may not link outside itself", file=rel)
        if not stat.S_ISDIR(st.st_mode):
            raise ArtifactError(f"{rel}: {current.relative_to(root_real).as_posix()} is not a folder", file=rel)
    path = current / parts[-1]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{rel}: listed in {RECORD_FILE} but missing from {root_real}", file=rel) from None
    if stat.S_ISREG(st.st_mode):
        return path
    if stat.S_ISLNK(st.st_mode) and _is_hub_blob(root_real, path):
        return path.resolve(strict=True)
    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
    raise ArtifactError(f"{rel}: is {kind}; an artifact's files must be regular files inside it", file=rel)


class ListedFiles:
    """The files of one artifact that ``smash.json`` lists, already checked; nothing else is reachable.

        >>> listed = verify_files(root, record)
        >>> config = listed.read_json("transformer/config.json", field="components.transformer")
    """

    def __init__(self, root: Path, record: ArtifactRecord, paths: dict[str, Path], mode: VerifyMode):
        self.root = root
        self.record = record
        self.mode = mode
        self._paths = paths
        self.hashed: dict[str, int] = {}  # files hashed by this check (name: bytes); the others' hashes were reused

    def __contains__(self, rel: str) -> bool:
        return rel in self._paths

    def under(self, folder: str) -> list[str]:
        """Listed files inside ``folder`` (a component name), sorted."""
        return sorted(rel for rel in self._paths if rel.startswith(folder + "/"))

    def path(self, rel: str, field: str | None = None) -> Path:
        """The checked real path of ``rel``; ArtifactError when it is not listed."""
        if rel not in self._paths:
            raise ArtifactError(
                f"{rel}: needed{f' by {field}' if field else ''} but not listed in {RECORD_FILE} 'files'; "
                "the runtime reads only listed, hashed files", file=rel, field=field)
        return self._paths[rel]

    def read_bytes(self, rel: str, field: str | None = None) -> bytes:
        """The bytes of ``rel``, checked against the record's size and hash."""
        data = self.path(rel, field).read_bytes()
        expected = self.record.files[rel]
        if len(data) != expected.size:
            raise ArtifactError(f"{rel}: size {len(data)} bytes, {RECORD_FILE} records {expected.size}: "
                                "the file is truncated or was replaced", file=rel)
        # The bytes handed on are the bytes hashed, in every mode: configs and vocabularies are small.
        if bytes_digest(data, expected.algorithm) != expected.digest:
            raise _mismatch(rel, expected)
        return data

    def read_json(self, rel: str, field: str | None = None) -> Any:
        return parse_json(self.read_bytes(rel, field), rel)


def _mismatch(rel: str, expected: FileRecord) -> ArtifactError:
    return ArtifactError(f"{rel}: {expected.algorithm} does not match {RECORD_FILE}: the file is corrupted or was "
                         "modified", file=rel)


def verify_files(root: str | os.PathLike, record: ArtifactRecord, mode: VerifyMode = "full",
                 *, refuse_unlisted: bool = False, checked_hashes: Path | None | bool = True) -> ListedFiles:
    """Check every file the record lists: a regular file inside the root, its size and its hash
    (BLAKE3 when the record has it, format 3; else sha256).

    ``mode="full"`` hashes every file; ``"fast"`` reuses a hash this machine already checked
    for the very same file (see :mod:`smash_runtime.checked_hashes`). Files are hashed several
    at a time. Either way the hashes that matched are remembered in ``checked_hashes`` (a
    folder; ``True``: the default one; ``None``: nowhere).

    ``refuse_unlisted`` (the loader's choice) also refuses a local folder holding a file the
    record does not list; publishing and image baking carry only listed files and ignore others.

    Raises:
        ArtifactError: naming the first file that is outside the root, missing, truncated or altered.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify={shorten(mode)}: expected 'full' or 'fast' (both hash every file once per change; "
                         "'fast' reuses hashes of unchanged files, and there is no mode without a check)")
    root_real = Path(root).resolve(strict=True)
    if refuse_unlisted and not _is_hub_snapshot(root_real):
        refuse_unlisted_files(root_real, record)
    hashes = CheckedHashes.for_root(root_real, checked_hashes)
    paths: dict[str, Path] = {}
    to_hash: dict[str, tuple[Path, str]] = {}
    for rel, expected in sorted(record.files.items()):
        path = resolve_listed(root_real, rel)
        paths[rel] = path
        st = path.stat()
        if st.st_size != expected.size:
            raise ArtifactError(
                f"{rel}: size {st.st_size} bytes, {RECORD_FILE} records {expected.size}: the file is truncated or was replaced",
                file=rel)
        if mode == "full" or hashes.lookup(rel, st) != expected.digest:
            to_hash[rel] = (path, expected.algorithm)
    hashed = hash_in_parallel(to_hash)
    for rel in sorted(hashed):
        digest, before, after, started = hashed[rel]
        if digest != record.files[rel].digest:
            hashes.forget(rel)
            hashes.save()
            raise _mismatch(rel, record.files[rel])
        hashes.remember(rel, before, after, digest, started)
    hashes.save()
    listed = ListedFiles(root_real, record, paths, mode)
    listed.hashed = {rel: record.files[rel].size for rel in hashed}
    return listed
