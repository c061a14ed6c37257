"""The build manifest (TOML): read it, validate all of it, and hand the builder typed specs.

A manifest is the user's whole interface to smash-build. Everything in it is checked before
any work starts, and every problem is reported at once, each naming the key path, the bad
value, what is allowed and, where one is close, what was probably meant::

    >>> from smash_build.manifest import load_manifest, ManifestError
    >>> m = load_manifest("manifests/tiny-flux.toml")
    >>> m.model.source, m.build.quantize.method, m.runtime.cacher["name"]
    ('builtin:tiny-flux', 'int8wo', 'fora')
    >>> m.build.quantize.exclude_globs
    ('*norm*', '*embed*')

Overrides (dotted keys, e.g. from ``--set runtime.cacher.interval=3`` via ``parse_override``)
are applied to the parsed TOML before validation, so an override is checked exactly like a
value written in the file::

    >>> m = load_manifest("manifests/tiny-flux.toml", {"runtime.cacher.interval": 3})

Sections (see ``manifest_json_schema()`` for every key and default):

``[model]`` what to build from; ``[build]`` what is baked into the weights; ``[runtime]``
what the runtime applies at load (cacher, compiler, warm-up: validated here by the
runtime's own config parsers, recorded as plain dicts); ``[output]`` where the artifact
goes; ``[evaluate]``, ``[publish.hub]``, ``[publish.image]`` optional follow-up steps.

One rule set per table: the cacher and compiler parameter rules live in
``smash_runtime.cachers`` and ``smash_runtime.compilers`` (the runtime must enforce them on any
artifact, not only on fresh builds), the ``[evaluate]`` rules in
``smash_build.evaluate.settings``; this module calls them, re-raises their errors under
``runtime.cacher.`` / ``runtime.compiler.`` / ``runtime.warmup.``, and adds the checks that
need the disk (source folders, prompt files, the output folder) or span tables (cacher x
pipeline family x compiler, compile cache without a compiler).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

from smash_runtime.errors import SettingsError, SmashError, did_you_mean, shown
from smash_runtime import settings as runtime_settings
from smash_runtime.anatomy import family_of

__all__ = [
    "BUILTIN_MODELS",
    "DTYPES",
    "EXCLUDE_PRESETS",
    "MANIFEST_VERSION",
    "QUANTIZE_METHODS",
    "BuildSpec",
    "Manifest",
    "ManifestError",
    "ModelSpec",
    "OutputSpec",
    "QuantizeSpec",
    "RuntimeSpec",
    "load_manifest",
    "manifest_json_schema",
    "parse_manifest",
    "parse_override",
]

MANIFEST_VERSION = 1

# Bounds checked before the TOML parser runs: its recursion and memory grow with them.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_NESTING = 32
MAX_STRING_CHARS = 4096

# Kept here rather than imported from tiny_models so validating a manifest never imports
# torch/diffusers; a test checks that both lists agree.
BUILTIN_MODELS: dict[str, tuple[str, ...]] = {
    "tiny-flux": ("transformer", "vae", "text_encoder", "text_encoder_2"),
    "tiny-sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
}
BUILTIN_PREFIX = "builtin:"

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16", "half": "float16", "f16": "float16",
}
DEFAULT_DTYPE = "bfloat16"

QUANTIZE_METHODS = ("int8dq", "int8wo", "int4wo", "fp8wo", "fp8dq")
EXCLUDE_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "norm": ("*norm*",),
    "embedding": ("*embed*",),
    "norm+embedding": ("*norm*", "*embed*"),
}


# Component classes that hold no weights and so cannot be transformed.
_NOT_MODULES = ("Tokenizer", "Scheduler", "FeatureExtractor", "ImageProcessor", "Processor")

# Every key each table accepts, in the order the docs list them. Also used for "this key
# belongs in [other section]" hints.
_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "": ("manifest_version", "model", "build", "runtime", "output", "evaluate", "publish"),
    "model": ("source", "revision", "dtype", "components"),
    "build": ("fuse_qkv", "quantize", "streaming"),
    "build.quantize": ("method", "exclude"),
    "runtime": ("cacher", "compiler", "warmup"),
    "output": ("dir",),
    "evaluate": (),  # the evaluation's own settings fields, see _section_keys
    "publish": ("hub", "image"),
    "publish.hub": ("repo", "private", "revision", "commit_message"),
    "publish.image": ("tag", "base", "push", "include_compile_cache"),
}

# Words people write for a key, where spelling similarity alone finds nothing.
_SYNONYMS = {
    "directory": "dir", "folder": "dir", "path": "dir", "output_dir": "dir", "out": "dir",
    "model_id": "source", "repo_id": "source", "id": "source", "model": "source", "torch_dtype": "dtype",
    "precision": "dtype", "quantization": "quantize", "quant": "quantize", "fuse": "fuse_qkv",
    "cache": "cacher", "caching": "cacher", "compile": "compiler", "warm_up": "warmup",
    "excluded": "exclude", "skip": "exclude", "ignore": "exclude", "type": "method",
    "branch": "revision", "message": "commit_message", "image": "tag", "base_image": "base",
}

# Hub repo ids, the shape huggingface_hub accepts for "org/name" (validate_repo_id adds the
# "--"/".." rules, checked below through it).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

# Container image references, after github.com/distribution/reference (regexp.go).
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_IMAGE_REF = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$"
)

# Git refs, the subset of `git check-ref-format` rules that catch real typos.
_BAD_REF = re.compile(r"[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|@\{|//|^[-/.]|[/.]$|\.lock$")
_GLOB_CHARS = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+$")


class ManifestError(SmashError):
    """The manifest has one or more problems; nothing was built.

    ``problems`` lists ``(key_path, message)`` pairs; each message names the key path, the bad
    value and what is allowed. ``origin`` is the manifest's file path (or ``"<string>"``).
    """

    def __init__(self, problems: list[tuple[str, str]], origin: str = "<string>"):
        self.problems = list(problems)
        self.origin = origin
        super().__init__(self._render())

    def _render(self) -> str:
        n = len(self.problems)
        head = f"{self.origin}: {n} problem{'s' if n != 1 else ''} in the manifest"
        return "\n".join([head] + [f"  - {message}" for _, message in self.problems])


@dataclass(frozen=True)
class ModelSpec:
    """``[model]``: the source pipeline.

    ``source`` is ``"builtin:<name>"``, an absolute local folder path, or a Hub repo id.
    ``revision`` is set (default ``"main"``) for Hub sources only. ``components`` lists what
    the build transforms; None means the denoiser (transformer or unet).
    """

    source: str
    revision: str | None
    dtype: str
    components: tuple[str, ...] | None

    @property
    def kind(self) -> str:
        """``"builtin"``, ``"local"`` or ``"hub"``."""
        if self.source.startswith(BUILTIN_PREFIX):
            return "builtin"
        return "hub" if self.revision is not None else "local"

    @property
    def builtin_name(self) -> str | None:
        """``"tiny-flux"`` for ``builtin:tiny-flux``, else None."""
        return self.source[len(BUILTIN_PREFIX):] if self.kind == "builtin" else None


@dataclass(frozen=True)
class QuantizeSpec:
    """``[build.quantize]``: torchao method and the modules to leave alone.

    ``exclude`` holds the entries as written (presets and globs); ``exclude_globs`` expands
    the presets into fnmatch globs over fully qualified module names.
    """

    method: str
    exclude: tuple[str, ...] = ()

    @property
    def exclude_globs(self) -> tuple[str, ...]:
        globs: list[str] = []
        for entry in self.exclude:
            for glob in EXCLUDE_PRESETS.get(entry, (entry,)):
                if glob not in globs:
                    globs.append(glob)
        return tuple(globs)

    def excludes(self, module_name: str) -> bool:
        """Whether ``module_name`` (e.g. ``"transformer_blocks.0.norm1.linear"``) is excluded."""
        return any(fnmatch.fnmatchcase(module_name, glob) for glob in self.exclude_globs)


@dataclass(frozen=True)
class BuildSpec:
    """``[build]``: transforms baked into the weights, in the order fuse, then quantize.

    ``streaming`` None means: the builder decides from the component's size.
    """

    fuse_qkv: bool = False
    quantize: QuantizeSpec | None = None
    streaming: bool | None = None


@dataclass(frozen=True)
class RuntimeSpec:
    """``[runtime]``: settings recorded into smash.json as-is and applied by the runtime.

    Each is the normalized dict of the runtime's own config (defaults filled); ``warmup`` is
    ``{"shapes": [{"height", "width", "steps", "batch"}, ...]}``.
    """

    cacher: dict | None
    compiler: dict | None
    warmup: dict


@dataclass(frozen=True)
class OutputSpec:
    """``[output]``: the artifact folder, resolved against the manifest's folder."""

    dir: Path


@dataclass(frozen=True)
class Manifest:
    """A fully validated manifest. ``raw`` is the TOML document after overrides."""

    path: Path | None
    model: ModelSpec
    build: BuildSpec
    runtime: RuntimeSpec
    output: OutputSpec
    evaluate: dict | None
    publish_hub: dict | None
    publish_image: dict | None
    raw: dict


# --------------------------------------------------------------------------- public API


def load_manifest(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Manifest:
    """Read and fully validate the manifest at ``path``; raise ManifestError listing every problem.

    ``overrides`` maps dotted keys to values (``{"output.dir": "/abs/out",
    "runtime.cacher.interval": 3}``) applied before validation; a None value removes the key.
    Relative paths in overrides are resolved against the manifest's folder like any other
    value, so pass absolute paths for values given relative to the working directory.
    """
    path = Path(path)
    origin = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ManifestError([("", f"manifest file not found: {origin}")], origin) from None
    except IsADirectoryError:
        raise ManifestError([("", f"{origin} is a folder; give the path of a .toml manifest")], origin) from None
    except UnicodeDecodeError as e:
        raise ManifestError([("", f"the manifest is not UTF-8 text ({e.reason} at byte {e.start})")], origin) from None
    except OSError as e:
        raise ManifestError([("", f"cannot read the manifest: {e.strerror or e}")], origin) from None
    return parse_manifest(text, path.resolve().parent, origin=origin, overrides=overrides, path=path.resolve())


def parse_manifest(
    text: str,
    base_dir: str | os.PathLike,
    origin: str = "<string>",
    overrides: Mapping[str, Any] | None = None,
    path: Path | None = None,
) -> Manifest:
    """Validate the manifest ``text``; relative paths in it are resolved against ``base_dir``."""
    too_big = _shape_problem(text)
    if too_big:
        raise ManifestError([("", too_big)], origin)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError([("", _syntax_message(e, text))], origin) from None
    problems = _Problems()
    if overrides:
        raw = _apply_overrides(raw, overrides, problems)
    manifest = _validate(raw, Path(base_dir), problems, path, stem=path.stem if path else None)
    if problems or manifest is None:
        raise ManifestError(problems.items, origin)
    return manifest


# Strings and comments, whose brackets do not nest anything.
_NOT_STRUCTURE = re.compile(r'''"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|#[^\n]*''')


def _shape_problem(text: str) -> str | None:
    """Why ``text`` is too large or too deeply nested to hand to the TOML parser, or None."""
    if len(text) > MAX_MANIFEST_BYTES:
        return (f"the manifest is {len(text)} characters long; at most {MAX_MANIFEST_BYTES} are read "
                "(a manifest is a few settings: move data such as prompt lists into files)")
    depth = deepest = 0
    structure = _NOT_STRUCTURE.sub("", text)
    for char in structure:
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_NESTING:
                    return (f"the manifest nests arrays or inline tables more than {MAX_NESTING} levels deep; "
                            "no setting needs more than a few")
        elif char in "]}":
            depth -= 1
    if max((len(line.split("=", 1)[0].split(".")) for line in structure.splitlines()), default=0) > MAX_NESTING:
        return f"the manifest has a dotted key of more than {MAX_NESTING} parts; no setting is that deep"
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """``"runtime.cacher.interval=3"`` -> ``("runtime.cacher.interval", 3)``.

    The value is read as a TOML value (numbers, booleans, quoted strings, arrays, inline
    tables); anything that is not valid TOML is taken as a plain string (``name=fora``).
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingsError(text, text, "an override looks like KEY=VALUE, e.g. runtime.cacher.interval=3")
    return key, _toml_value(value.strip())


# --------------------------------------------------------------------------- problems


class _Problems:
    """Collects ``(key_path, message)`` pairs; truthy once one was added."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))

    def bad(self, key: str, value: object, allowed: str, hint: str | None = None) -> None:
        self.add(key, SettingsError(key, value, allowed, hint).args[0])

    def settings(self, error: SettingsError) -> None:
        self.add(error.key, error.args[0])


def _syntax_message(error: Exception, text: str) -> str:
    # tomllib puts the position in the message ("... (at line 3, column 9)"); 3.14 adds attributes.
    message = str(error)
    line = getattr(error, "lineno", None)
    col = getattr(error, "colno", None)
    found = re.search(r"\(at line (\d+), column (\d+)\)", message)
    if found:
        line, col = int(found.group(1)), int(found.group(2))
        message = message[: found.start()].rstrip()
    elif "end of document" in message:
        lines = text.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
        message = re.sub(r"\s*\(at end of document\)", "", message)
    message = getattr(error, "msg", None) or message
    where = f"line {line}, column {col}" if line is not None else "unknown position"
    snippet = ""
    if line is not None:
        lines = text.splitlines()
        if 0 < line <= len(lines):
            snippet = f"\n      {lines[line - 1]}\n      {' ' * max((col or 1) - 1, 0)}^"
    return f"TOML syntax error at {where}: {message}{snippet}"


def _type_name(value: object) -> str:
    """``"an integer"``, ``"a string"``, ... as TOML calls the value's type."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML dates and times


def _join(key: str, sub: str) -> str:
    return f"{key}.{sub}" if key else sub


def _section_of(key: str) -> str:
    return f"[{key}]" if key else "the top level"


def _check_keys(p: _Problems, section: str, table: dict) -> None:
    """Report keys of ``table`` that ``section`` does not accept, with the nearest guess."""
    allowed = _section_keys(section)
    for key in table:
        if key in allowed:
            continue
        path = _join(section, key)
        if section == "publish.hub" and key.lower() in ("token", "hf_token", "api_key"):
            # Never echo a secret back, and say where tokens do come from.
            p.add(path, f"{path}: tokens are never read from the manifest; set HF_TOKEN or run "
                        "`hf auth login` (the value was not printed)")
            continue
        hint = did_you_mean(key, allowed)
        if hint is None and _SYNONYMS.get(key.lower()) in allowed:
            hint = f"did you mean {_SYNONYMS[key.lower()]!r}?"
        if hint is None:
            homes = [s for s in _SECTION_KEYS if s != section and key in _section_keys(s)]
            if homes:
                hint = f"'{key}' belongs in {' or '.join(_section_of(s) for s in homes)}"
        text = f"{path}: unknown key in {_section_of(section)}; allowed keys: {', '.join(allowed)}"
        p.add(path, f"{text} ({hint})" if hint else text)


def _section_keys(section: str) -> tuple[str, ...]:
    return _evaluate_keys() if section == "evaluate" else _SECTION_KEYS[section]


def _table(p: _Problems, key: str, value: object) -> dict | None:
    if isinstance(value, dict):
        _check_keys(p, key, value)
        return value
    p.bad(key, value, f"must be a table ([{key}]), got {_type_name(value)}")
    return None


def _bool(p: _Problems, key: str, value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    hint = None
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        hint = f"write {str(value.lower() in ('true', 'yes', 'on')).lower()} without quotes"
    p.bad(key, value, f"must be a boolean (true or false), got {_type_name(value)}", hint)
    return None


def _str(p: _Problems, key: str, value: object, what: str = "a string") -> str | None:
    if not isinstance(value, str):
        p.bad(key, value, f"must be {what}, got {_type_name(value)}")
        return None
    if not value.strip():
        p.bad(key, value, f"must be {what}, not empty")
        return None
    if len(value) > MAX_STRING_CHARS:
        p.bad(key, value, f"must be {what} of at most {MAX_STRING_CHARS} characters")
        return None
    return value


def _enum(p: _Problems, key: str, value: object, choices: Iterable[str],
          aliases: Mapping[str, str] | None = None) -> str | None:
    choices = tuple(choices)
    allowed = f"must be one of {', '.join(choices)}"
    if not isinstance(value, str):
        p.bad(key, value, f"{allowed}, got {_type_name(value)}")
        return None
    if value in choices:
        return value
    alias = (aliases or {}).get(value.lower())
    hint = f"did you mean {alias!r}?" if alias else did_you_mean(value.lower(), choices)
    p.bad(key, value, allowed, hint)
    return None


def _str_list(p: _Problems, key: str, value: object, what: str = "a list of strings") -> list[str] | None:
    if not isinstance(value, list):
        p.bad(key, value, f"must be {what}, got {_type_name(value)}")
        return None
    out: list[str] = []
    ok = True
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            p.bad(f"{key}[{i}]", item, "must be a non-empty string"
                  + ("" if isinstance(item, str) else f", got {_type_name(item)}"))
            ok = False
        elif item in out:
            p.bad(f"{key}[{i}]", item, "is listed twice")
            ok = False
        else:
            out.append(item)
    return out if ok else None


def _revision(p: _Problems, key: str, value: object) -> str | None:
    text = _str(p, key, value, "a branch, tag or commit sha")
    if text is None:
        return None
    if _BAD_REF.search(text):
        p.bad(key, value, "must be a branch, tag or commit sha (no spaces, '..', '~^:?*[\\', "
                          "and no leading or trailing '/', '.' or '-')")
        return None
    return text


def _repo_id(p: _Problems, key: str, value: object, what: str = "a Hub repo id 'org/name'") -> str | None:
    text = _str(p, key, value, what)
    if text is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = None
    if not _REPO_ID.match(text):
        problem = True
    else:
        try:
            validate_repo_id(text)
        except HFValidationError:
            problem = True
    if problem:
        hint = None
        if text.startswith(("https://", "http://", "hf.co/", "huggingface.co/")):
            hint = "give the id only, e.g. " + "/".join(text.rstrip("/").split("/")[-2:])
        p.bad(key, value, f"must be {what}: letters, digits, '-', '_' and '.', one '/', "
                          "no '--' or '..', at most 96 characters per part", hint)
        return None
    return text


# --------------------------------------------------------------------------- overrides


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_overrides(raw: dict, overrides: Mapping[str, Any], p: _Problems) -> dict:
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        parts = str(dotted).split(".")
        if not all(parts):
            p.bad(str(dotted), value, "an override key is a dotted path such as runtime.cacher.interval")
            continue
        table = raw
        for i, part in enumerate(parts[:-1]):
            nxt = table.get(part)
            if nxt is None:
                if value is None:
                    break
                nxt = table[part] = {}
            elif isinstance(nxt, str) and ".".join(parts[: i + 1]) in ("runtime.cacher", "runtime.compiler"):
                nxt = table[part] = {"name": nxt}  # the string shorthand, widened to a table
            elif not isinstance(nxt, dict):
                p.bad(".".join(parts[: i + 1]), nxt,
                      f"is not a table, so the override {dotted} cannot be applied")
                break
            table = nxt
        else:
            if value is None:
                table.pop(parts[-1], None)
            else:
                table[parts[-1]] = copy.deepcopy(value)
    return raw


# --------------------------------------------------------------------------- sections


def _validate(raw: dict, base: Path, p: _Problems, path: Path | None, stem: str | None) -> Manifest | None:
    _check_keys(p, "", raw)
    if "manifest_version" in raw:
        version = raw["manifest_version"]
        if isinstance(version, bool) or version != MANIFEST_VERSION:
            p.bad("manifest_version", version, f"this smash-build reads manifest_version = {MANIFEST_VERSION}",
                  "upgrade smash-build" if isinstance(version, int) and not isinstance(version, bool)
                  and version > MANIFEST_VERSION else None)

    model = family = None
    if "model" not in raw:
        p.add("model", "model: the [model] table is missing; it needs at least "
                       "source = \"builtin:tiny-flux\", a local diffusers folder or a Hub id \"org/name\"")
    else:
        model_table = _table(p, "model", raw["model"])
        if model_table is not None:
            model, family = _model(p, model_table, base)
    build = _build(p, _table(p, "build", raw.get("build", {})) or {})
    runtime = _runtime(p, raw.get("runtime", {}), family)
    output = _output(p, _table(p, "output", raw.get("output", {})) or {}, base, stem, model)

    evaluate = None
    if "evaluate" in raw:
        table = _table(p, "evaluate", raw["evaluate"])
        evaluate = _evaluate(p, table, base) if table is not None else None

    publish_hub = publish_image = None
    if "publish" in raw:
        publish = _table(p, "publish", raw["publish"])
        if publish is not None:
            if "hub" in publish:
                table = _table(p, "publish.hub", publish["hub"])
                publish_hub = _publish_hub(p, table) if table is not None else None
            if "image" in publish:
                table = _table(p, "publish.image", publish["image"])
                publish_image = _publish_image(p, table, runtime) if table is not None else None

    if p or model is None or build is None or runtime is None or output is None:
        return None
    return Manifest(path=path, model=model, build=build, runtime=runtime, output=output,
                    evaluate=evaluate, publish_hub=publish_hub, publish_image=publish_image, raw=raw)


def _model(p: _Problems, t: dict, base: Path):
    """Validate [model] -> (spec, pipeline family "dit"/"unet").

    The family is known offline for built-in and local sources only (else None).
    """
    ok = True
    kind = source = None
    transformable: tuple[str, ...] | None = None
    revision = t.get("revision")
    if "source" not in t:
        p.add("model.source", "model.source is missing: give \"builtin:tiny-flux\" or \"builtin:tiny-sdxl\", "
                              "a local diffusers folder, or a Hub repo id \"org/name\"")
        ok = False
    else:
        value = t["source"]
        text = _str(p, "model.source", value,
                    "\"builtin:<name>\", a local diffusers folder or a Hub repo id \"org/name\"")
        if text is None:
            ok = False
        else:
            kind, source, transformable, at_revision = _source(p, text, base)
            ok = kind is not None
            if at_revision is not None:
                if revision is not None:
                    p.bad("model.revision", revision, f"conflicts with the revision {shown(at_revision)} given in "
                                                      f"model.source; give it in one place")
                    ok = False
                revision = at_revision

    if revision is not None:
        if kind in ("builtin", "local"):
            p.bad("model.revision", revision, f"applies to Hub sources only; a {kind} source has no revisions",
                  "remove model.revision")
            ok = False
            revision = None
        elif _revision(p, "model.revision", revision) is None:
            ok = False
    elif kind == "hub":
        revision = "main"

    dtype = DEFAULT_DTYPE
    if "dtype" in t:
        dtype = _enum(p, "model.dtype", t["dtype"], DTYPES, _DTYPE_ALIASES)
        ok &= dtype is not None

    components = None
    if "components" in t:
        items = _str_list(p, "model.components", t["components"], "a list of component names")
        if items is not None and not items:
            p.bad("model.components", [], "must name at least one component",
                  "leave the key out to transform the denoiser (transformer or unet)")
            items = None
        if items is not None and transformable is not None:
            for i, name in enumerate(items):
                if name not in transformable:
                    hint = did_you_mean(name, transformable)
                    p.bad(f"model.components[{i}]", name,
                          f"is not a component with weights of this source; it has {', '.join(transformable)}", hint)
                    items = None
        elif items is not None:
            for i, name in enumerate(items):
                if not name.isidentifier():
                    p.bad(f"model.components[{i}]", name, "must be a component folder name such as transformer, "
                                                          "unet, vae or text_encoder")
                    items = None
        ok &= items is not None
        components = tuple(items) if items is not None else None

    family = family_of(transformable or ())
    if not ok or source is None or dtype is None:
        return None, family
    return ModelSpec(source=source, revision=revision, dtype=dtype, components=components), family


def _source(p: _Problems, text: str, base: Path):
    """Classify and check ``model.source``.

    Returns (kind, normalized source, components with weights, revision given as
    ``org/name@revision``), all None on a problem.
    """
    key = "model.source"
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            p.bad(key, text, "built-in models are " + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS),
                  did_you_mean(name, BUILTIN_MODELS) and did_you_mean(
                      BUILTIN_PREFIX + name, [BUILTIN_PREFIX + n for n in BUILTIN_MODELS]))
            return None, None, None, None
        return "builtin", text, BUILTIN_MODELS[name], None
    if text in BUILTIN_MODELS:
        p.bad(key, text, "is neither a local folder nor a Hub id", f"did you mean '{BUILTIN_PREFIX}{text}'?")
        return None, None, None, None
    url = re.match(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/(.*)$", text)
    if url or "://" in text:
        parts = url.group(1).strip("/").split("/") if url else []
        hint = f"give the id only, e.g. {parts[0]}/{parts[1]}" if len(parts) >= 2 else None
        p.bad(key, text, "must be a Hub repo id \"org/name\", not a URL", hint)
        return None, None, None, None

    folder = Path(os.path.expanduser(text))
    folder = folder if folder.is_absolute() else base / folder
    looks_local = (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
                   or (text.count("/") == 0 and "@" not in text))
    if folder.exists() or looks_local:
        return _local_source(p, text, folder)

    repo, _, at_revision = text.partition("@")
    if "@" in text and not at_revision:
        p.bad(key, text, "a Hub source with a revision looks like org/name@revision")
        return None, None, None, None
    if _repo_id(p, key, repo, "a Hub repo id \"org/name\" (or an existing local folder)") is None:
        return None, None, None, None
    if at_revision and _revision(p, key, at_revision) is None:
        return None, None, None, None
    return "hub", repo, None, at_revision or None


def _local_source(p: _Problems, text: str, folder: Path):
    key = "model.source"
    where = f"{text} (resolved to {folder})" if str(folder) != text else text
    if not folder.exists():
        p.add(key, f"{key} = {shown(text)}: no such local folder ({folder}); a local source is a diffusers "
                   "pipeline folder (relative paths are relative to the manifest's folder)")
        return None, None, None, None
    if not folder.is_dir():
        p.add(key, f"{key} = {shown(text)}: {where} is a file; a local source is a diffusers pipeline folder")
        return None, None, None, None
    if not os.access(folder, os.R_OK | os.X_OK):
        p.add(key, f"{key} = {shown(text)}: the folder {folder} is not readable")
        return None, None, None, None
    index = folder / "model_index.json"
    if not index.exists():
        p.add(key, f"{key} = {shown(text)}: {folder} has no model_index.json, so it is not a diffusers pipeline "
                   "folder (save one with pipe.save_pretrained(folder))")
        return None, None, None, None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        p.add(key, f"{key} = {shown(text)}: cannot read {index}: {getattr(e, 'strerror', None) or e}")
        return None, None, None, None
    except json.JSONDecodeError as e:
        p.add(key, f"{key} = {shown(text)}: {index} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})")
        return None, None, None, None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        p.add(key, f"{key} = {shown(text)}: {index} has no \"_class_name\"; it is not a diffusers model_index.json")
        return None, None, None, None
    transformable = tuple(
        name for name, entry in data.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2
        and all(isinstance(x, str) for x in entry) and not any(s in entry[1] for s in _NOT_MODULES)
    )
    return "local", str(folder.resolve()), transformable, None


def _build(p: _Problems, t: dict) -> BuildSpec | None:
    ok = True
    fuse = False
    if "fuse_qkv" in t:
        fuse = _bool(p, "build.fuse_qkv", t["fuse_qkv"])
        ok &= fuse is not None

    streaming = None
    if "streaming" in t:
        value = t["streaming"]
        if value != "auto":
            if isinstance(value, str):
                p.bad("build.streaming", value, "must be true, false or \"auto\"",
                      did_you_mean(value, ["auto"]))
                streaming, ok = None, False
            else:
                streaming = _bool(p, "build.streaming", value)
                ok &= streaming is not None

    quantize = None
    if "quantize" in t:
        value = t["quantize"]
        if isinstance(value, str) and value != "none":
            value = {"method": value}  # quantize = "int8wo" shorthand
        if value == "none":
            pass
        elif isinstance(value, dict):
            quantize = _quantize(p, value)
            ok &= quantize is not None
        else:
            p.bad("build.quantize", value, "must be a method name (\"int8wo\"), \"none\" or a table "
                                           "{ method = ..., exclude = [...] }, got " + _type_name(value))
            ok = False
    return BuildSpec(fuse_qkv=fuse, quantize=quantize, streaming=streaming) if ok else None


def _quantize(p: _Problems, t: dict) -> QuantizeSpec | None:
    _check_keys(p, "build.quantize", t)
    if "method" not in t:
        p.add("build.quantize.method", "build.quantize.method is missing: one of " + ", ".join(QUANTIZE_METHODS))
        return None
    method = _enum(p, "build.quantize.method", t["method"], QUANTIZE_METHODS)
    exclude: tuple[str, ...] | None = ()
    if "exclude" in t:
        exclude = _exclude(p, t["exclude"])
    if method is None or exclude is None:
        return None
    return QuantizeSpec(method=method, exclude=exclude)


def _exclude(p: _Problems, value: object) -> tuple[str, ...] | None:
    key = "build.quantize.exclude"
    if isinstance(value, str):
        value = [value]
    items = _str_list(p, key, value, "a list of presets (" + ", ".join(EXCLUDE_PRESETS) + ") and module-name globs")
    if items is None:
        return None
    ok = True
    for i, entry in enumerate(items):
        if entry in EXCLUDE_PRESETS:
            if entry == "none" and len(items) > 1:
                p.bad(f"{key}[{i}]", entry, "'none' cannot be combined with other exclusions")
                ok = False
            continue
        problem = _glob_problem(entry)
        if problem is None and not any(c in entry for c in "*?[") and "." not in entry:
            # A bare word close to a preset is almost surely a typo: as a glob it would only
            # match a top-level module of exactly that name.
            hint = did_you_mean(entry, EXCLUDE_PRESETS)
            if hint:
                p.bad(f"{key}[{i}]", entry, "is not a preset (" + ", ".join(EXCLUDE_PRESETS) + ")",
                      f"{hint} To match module names containing it, write '*{entry}*'")
                ok = False
            continue
        if problem:
            p.bad(f"{key}[{i}]", entry, f"is not a valid module-name glob: {problem}",
                  "globs use fnmatch syntax (*, ?, [abc], [!abc]) over names such as "
                  "'transformer_blocks.0.attn.to_out.0'")
            ok = False
    return tuple(items) if ok else None


def _glob_problem(glob: str) -> str | None:
    """Why ``glob`` is not a usable fnmatch pattern over module names, or None."""
    if not _GLOB_CHARS.match(glob):
        bad = sorted({c for c in glob if not re.match(r"[A-Za-z0-9_.*?\[\]!-]", c)})
        return f"module names hold only letters, digits, '_' and '.', not {' '.join(map(repr, bad))}"
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "[":
            j = i + 1
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":  # fnmatch: a leading ']' is literal
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                return f"'[' at position {i} opens a character class that is not closed"
            i = j + 1
            continue
        if c == "]":
            return f"']' at position {i} closes no character class"
        if c == "!":
            return f"'!' at position {i} is only meaningful right after '['"
        i += 1
    if ".." in glob or glob.startswith(".") or glob.endswith("."):
        return "module names have no empty parts (no leading, trailing or doubled '.')"
    return None


def _runtime(p: _Problems, value: object, family: str | None) -> RuntimeSpec | None:
    t = _table(p, "runtime", value)
    if t is None:
        return None
    ok = True
    cacher = compiler = None
    if "cacher" in t:
        cacher = _runtime_part(p, "runtime.cacher", t["cacher"], "cachers")
        ok &= cacher is not False
    if "compiler" in t:
        compiler = _runtime_part(p, "runtime.compiler", t["compiler"], "compilers")
        ok &= compiler is not False
    warmup = _warmup(p, t.get("warmup", {}))
    ok &= warmup is not None
    if not ok:
        return None
    if cacher and family:
        ok = _check_cacher_fits(p, cacher, compiler or None, family)
    return RuntimeSpec(cacher=cacher or None, compiler=compiler or None, warmup=warmup) if ok else None


def _check_cacher_fits(p: _Problems, cacher: dict, compiler: dict | None, family: str) -> bool:
    """The runtime's cacher x pipeline family x compiler table, where the family is known offline.

    Hub sources are checked by the builder once their model_index.json is downloaded.
    """
    try:
        runtime_settings.check_cacher_compatibility(runtime_settings.cacher_from_dict(cacher), family, compiler)
    except SettingsError as e:
        _settings_problems(p, e, "runtime.cacher")
        return False
    return True


def _runtime_part(p: _Problems, key: str, value: object, module: str) -> dict | None | bool:
    """Normalize [runtime.cacher] / [runtime.compiler] through the runtime's settings models.

    Returns the normalized dict, None when disabled, False on a problem.
    """
    if isinstance(value, str):
        if value == "none":
            return None
        value = {"name": value}  # cacher = "fora" shorthand
    if not isinstance(value, dict):
        p.bad(key, value, f"must be a table [{key}] with a name, a name string, or \"none\"; "
                          f"got {_type_name(value)}")
        return False
    if value.get("name") == "none":
        if len(value) > 1:
            p.bad(f"{key}.name", "none", "takes no other keys")
            return False
        return None
    parse = runtime_settings.cacher_from_dict if module == "cachers" else runtime_settings.compiler_from_dict
    try:
        return runtime_settings.settings_to_dict(parse(value))
    except SettingsError as e:
        _settings_problems(p, e, key)
        return False


def _warmup(p: _Problems, value: object) -> dict | None:
    if not isinstance(value, dict):
        p.bad("runtime.warmup", value, "must be a table [runtime.warmup] with shapes = [{ height, width, "
                                       f"steps, batch }}, ...], got {_type_name(value)}")
        return None
    try:
        return runtime_settings.settings_to_dict(runtime_settings.warmup_from_dict(value))
    except SettingsError as e:
        _settings_problems(p, e, "runtime.warmup")
        return None


def _settings_problems(p: _Problems, error: SettingsError, prefix: str) -> None:
    # The settings models report every problem of a table (``errors``); list them all.
    for e in getattr(error, "errors", None) or [error]:
        p.settings(e.with_prefix(prefix))


def _output(p: _Problems, t: dict, base: Path, stem: str | None, model: ModelSpec | None) -> OutputSpec | None:
    if "dir" in t:
        text = _str(p, "output.dir", t["dir"], "a folder path")
        if text is None:
            return None
        folder = Path(os.path.expanduser(text))
    else:
        name = stem or (model.builtin_name if model and model.builtin_name else None) or (
            model.source.rstrip("/").split("/")[-1] if model else "artifact")
        folder = Path("dist") / name
    folder = folder if folder.is_absolute() else base / folder
    folder = Path(os.path.normpath(folder))
    if folder.exists() and not folder.is_dir():
        p.add("output.dir", f"output.dir = {shown(str(t.get('dir', folder)))}: {folder} exists and is a file; "
                            "the artifact is a folder")
        return None
    # The build writes a temporary folder beside the target and renames it: the nearest
    # existing ancestor must be a writable folder.
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        p.add("output.dir", f"output.dir = {shown(str(t.get('dir', folder)))}: {ancestor} is a file, so {folder} "
                            "cannot be created")
        return None
    if not os.access(ancestor, os.W_OK | os.X_OK):
        p.add("output.dir", f"output.dir = {shown(str(t.get('dir', folder)))}: {ancestor} is not writable")
        return None
    return OutputSpec(dir=folder)


def _evaluate(p: _Problems, t: dict, base: Path) -> dict | None:
    """[evaluate] through the evaluation's own parser, plus the checks that need the disk.

    Returns the normalized table (every default filled, as ``EvalSettings.record()``), which
    ``smash_build.evaluate.settings.settings_from_dict`` reads back unchanged.
    """
    from .evaluate.prompts import BUILTIN, builtin_prompts
    from .evaluate.settings import settings_from_dict

    start = len(p.items)
    known = {k: v for k, v in t.items() if k in _evaluate_keys()}
    if "prompts" in known:
        prompts = _prompts(p, known["prompts"], base)
        if prompts is None:
            known.pop("prompts")
        else:
            known["prompts"] = prompts
    if "weights_dir" in known:
        text = _str(p, "evaluate.weights_dir", known["weights_dir"], "a folder path")
        if text is not None:
            folder = _resolve(base, text)
            if not folder.is_dir():
                p.bad("evaluate.weights_dir", text, "must be an existing folder holding the metric weights; "
                      f"{folder} " + ("is a file" if folder.exists() else "does not exist"))
            elif not os.access(folder, os.R_OK | os.X_OK):
                p.bad("evaluate.weights_dir", text, f"the folder {folder} is not readable")
            else:
                known["weights_dir"] = str(folder)
        if len(p.items) > start:
            known.pop("weights_dir")
    try:
        settings = settings_from_dict(known, base_dir=base)
    except SettingsError as e:
        p.settings(e)
        return None
    if settings.prompts == BUILTIN and settings.num_prompts is not None:
        available = len(builtin_prompts())
        if settings.num_prompts > available:
            p.bad("evaluate.num_prompts", settings.num_prompts,
                  f"must be at most {available}: the built-in prompt set has {available} prompts")
    return settings.record() if len(p.items) == start else None


def _evaluate_keys() -> tuple[str, ...]:
    from .evaluate.settings import EVALUATE_KEYS

    return EVALUATE_KEYS


def _resolve(base: Path, text: str) -> Path:
    path = Path(os.path.expanduser(text))
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _prompts(p: _Problems, value: object, base: Path) -> str | None:
    """A prompt set: "builtin", a prompt file, or a Hub dataset (hf://datasets/ORG/NAME or ORG/NAME)."""
    from .evaluate.prompts import BUILTIN, FILE_SUFFIXES, HF_DATASET_PREFIX

    key = "evaluate.prompts"
    text = _str(p, key, value, f"\"{BUILTIN}\", a prompt file or a Hub dataset id")
    if text is None or text == BUILTIN:
        return text
    file = _resolve(base, text)
    if text.startswith(HF_DATASET_PREFIX):
        repo = _repo_id(p, key, text[len(HF_DATASET_PREFIX):], "hf://datasets/ORG/NAME")
        return text if repo else None
    if file.exists() or file.suffix.lower() in FILE_SUFFIXES or text.startswith((".", "/", "~")):
        if not file.is_file():
            p.bad(key, text, f"the prompt file {file} " + ("is a folder" if file.exists() else "does not exist"))
            return None
        if not os.access(file, os.R_OK):
            p.bad(key, text, f"the prompt file {file} is not readable")
            return None
        return str(file)
    if text.count("/") == 1:
        return text if _repo_id(p, key, text, "a Hub dataset id \"org/name\"") else None
    p.bad(key, text, f"must be \"{BUILTIN}\", a prompt file (" + ", ".join(FILE_SUFFIXES)
          + ") or a Hub dataset hf://datasets/ORG/NAME", did_you_mean(text, [BUILTIN]))
    return None


def _publish_hub(p: _Problems, t: dict) -> dict | None:
    k = "publish.hub."
    start = len(p.items)
    out: dict[str, Any] = {"repo": None, "private": False, "revision": "main", "commit_message": None}
    if "repo" not in t:
        p.add(k + "repo", f"{k}repo is missing: the Hub repo to publish to, \"org/name\"")
    else:
        out["repo"] = _repo_id(p, k + "repo", t["repo"])
    if "private" in t:
        out["private"] = _bool(p, k + "private", t["private"])
    if "revision" in t:
        out["revision"] = _revision(p, k + "revision", t["revision"])
    if "commit_message" in t:
        message = _str(p, k + "commit_message", t["commit_message"], "a one-line commit message")
        if message is not None and "\n" in message.strip():
            p.bad(k + "commit_message", message, "must be one line (the Hub shows it as the commit title)")
        out["commit_message"] = message
    return out if len(p.items) == start else None


def _publish_image(p: _Problems, t: dict, runtime: RuntimeSpec | None) -> dict | None:
    k = "publish.image."
    start = len(p.items)
    out: dict[str, Any] = {"tag": None, "base": None, "push": False, "include_compile_cache": False}
    for name, required in (("tag", True), ("base", False)):
        if name not in t:
            if required:
                p.add(k + name, f"{k}{name} is missing: the image reference to build, e.g. \"registry/name:tag\"")
            continue
        ref = _str(p, k + name, t[name], "an image reference such as \"registry.example.com/org/name:tag\"")
        if ref is not None and not _IMAGE_REF.match(ref):
            hint = "repository names are lowercase" if _IMAGE_REF.match(ref.lower()) else None
            p.bad(k + name, ref, "must be an image reference [registry[:port]/]name[:tag][@sha256:digest] "
                                 "(lowercase name parts, tag of at most 128 of [A-Za-z0-9_.-])", hint)
            ref = None
        out[name] = ref
    for name in ("push", "include_compile_cache"):
        if name in t:
            out[name] = _bool(p, k + name, t[name])
    if out["include_compile_cache"] and runtime is not None and runtime.compiler is None:
        p.bad(k + "include_compile_cache", True, "needs a compiler to cache",
              "add a [runtime.compiler] table or set include_compile_cache = false")
    return out if len(p.items) == start else None


# --------------------------------------------------------------------------- JSON Schema


def manifest_json_schema() -> dict:
    """The manifest as JSON Schema (draft 2020-12), for editors (e.g. taplo, Even Better TOML).

    Structural rules only; checks that need the file system or the runtime (local folders,
    cacher compatibility) happen in ``load_manifest``.
    """
    string = {"type": "string", "minLength": 1}
    boolean = {"type": "boolean"}
    defs: dict[str, Any] = {}

    def table(props: dict, required: tuple[str, ...] = (), description: str | None = None) -> dict:
        schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            schema["required"] = list(required)
        if description:
            schema["description"] = description
        return schema

    quantize_table = table({
        "method": {"enum": list(QUANTIZE_METHODS), "description": "torchao quantization method"},
        "exclude": {
            "description": "presets (none, norm, embedding, norm+embedding) and fnmatch globs over module names",
            "anyOf": [string, {"type": "array", "items": string, "uniqueItems": True}],
            "examples": [["norm", "embedding"], ["*proj_out*"]],
        },
    }, ("method",))

    schema = table({
        "manifest_version": {"const": MANIFEST_VERSION},
        "model": table({
            "source": {**string, "description": "builtin:tiny-flux, builtin:tiny-sdxl, a local diffusers folder "
                                                "(relative to this file) or a Hub repo id org/name[@revision]",
                       "examples": [BUILTIN_PREFIX + n for n in BUILTIN_MODELS] + ["black-forest-labs/FLUX.1-dev"]},
            "revision": {**string, "default": "main", "description": "Hub branch, tag or commit sha"},
            "dtype": {"enum": list(DTYPES), "default": DEFAULT_DTYPE},
            "components": {"type": "array", "items": string, "minItems": 1, "uniqueItems": True,
                           "description": "components to transform; default: the denoiser (transformer or unet)"},
        }, ("source",), "the source pipeline"),
        "build": table({
            "fuse_qkv": {**boolean, "default": False},
            "quantize": {"anyOf": [{"enum": [*QUANTIZE_METHODS, "none"]}, quantize_table]},
            "streaming": {"anyOf": [boolean, {"const": "auto"}], "default": "auto",
                          "description": "build one block at a time with bounded memory; auto = by size"},
        }, description="transforms baked into the weights (fuse, then quantize)"),
        "runtime": table(runtime_settings.runtime_json_schemas(defs),
                         description="recorded in smash.json and applied by the runtime at load"),
        "output": table({
            "dir": {**string, "description": "artifact folder, relative to this file; default dist/<manifest name>"},
        }),
        "evaluate": _evaluate_schema(string, boolean),
        "publish": table({
            "hub": table({
                "repo": {"type": "string", "pattern": _REPO_ID.pattern},
                "private": {**boolean, "default": False},
                "revision": {**string, "default": "main"},
                "commit_message": string,
            }, ("repo",), "publish the artifact to the Hugging Face Hub (token from HF_TOKEN or the login cache)"),
            "image": table({
                "tag": {"type": "string", "pattern": _portable_pattern(_IMAGE_REF)},
                "base": {"type": "string", "pattern": _portable_pattern(_IMAGE_REF)},
                "push": {**boolean, "default": False},
                "include_compile_cache": {**boolean, "default": False},
            }, ("tag",), "bake the artifact into a container image"),
        }),
    }, ("model",))
    schema["$defs"] = defs
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/smash-build/smash-build/manifest.schema.json"
    schema["title"] = "smash-build manifest"
    return schema


def _portable_pattern(regex: re.Pattern) -> str:
    # JSON Schema patterns are ECMA-262: Python's named groups (?P<name>...) are not.
    return re.sub(r"\(\?P<\w+>", "(?:", regex.pattern)


def _evaluate_schema(string: dict, boolean: dict) -> dict:
    from .evaluate.settings import METRICS
    from .evaluate.prompts import BUILTIN, FILE_SUFFIXES
    from .evaluate.settings import DEVICES, EvalSettings

    defaults = EvalSettings()
    size = {"type": "integer", "minimum": 16, "multipleOf": 8}
    props: dict[str, Any] = {
        "prompts": {**string, "default": BUILTIN,
                    "description": f"{BUILTIN}, a prompt file ({', '.join(FILE_SUFFIXES)}) or a Hub dataset "
                                   "hf://datasets/ORG/NAME"},
        "num_prompts": {"type": "integer", "minimum": 1, "default": defaults.num_prompts},
        "seeds": {"anyOf": [{"type": "integer", "minimum": 0},
                            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}],
                  "default": list(defaults.seeds)},
        "steps": {"type": "integer", "minimum": 1},
        "height": size,
        "width": size,
        "guidance_scale": {"type": "number", "minimum": 0},
        "metrics": {"type": "array", "items": {"enum": list(METRICS)}, "default": list(defaults.metrics)},
        "device": {"type": "string", "pattern": "^(" + "|".join(DEVICES) + r"|cuda:\d+)$", "default": defaults.device},
        "warmup": {"type": "integer", "minimum": 0, "default": defaults.warmup},
        "weights_dir": {**string, "description": "folder holding metric weights (LPIPS, ARNIQA, CLIP)"},
        "clip_model": {**string, "default": defaults.clip_model},
        "num_samples": {"type": "integer", "minimum": 0, "default": defaults.num_samples},
        "isolate": {**boolean, "default": defaults.isolate},
        "threads": {"type": "integer", "minimum": 1},
    }
    unknown = set(_evaluate_keys()) - set(props)
    for key in sorted(unknown):  # a setting added to EvalSettings later: allowed, untyped
        props[key] = {}
    return {"type": "object", "properties": {k: props[k] for k in _evaluate_keys()}, "additionalProperties": False,
            "description": "compare the artifact with its base: speed, memory, fidelity"}
