"""The build manifest (TOML): read it, validate all of it, and hand the builder typed specs.

A manifest is the user's whole interface to smash-build. Everything in it is checked before
any work starts, and every problem is reported at once, each naming the key path, the bad
value (cut short), what is allowed and, where one is close, what was probably meant::

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

Validation has two passes. The first checks every table against its typed model, declared once
with its bounds, defaults and descriptions (``smash_build.settings``; the runtime tables are
``smash_runtime.settings``, ``[evaluate]`` is ``smash_build.evaluate.settings``), and is what
``manifest_json_schema()`` describes. The second checks what a schema cannot say: files on
disk (source folders, prompt files, the output folder), the source's components, and rules
that span tables (cacher x pipeline family x compiler, compile cache without a compiler).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

from smash_runtime import settings as runtime_settings
from smash_runtime.anatomy import family_of
from smash_runtime.errors import KeyProblem, SettingsError, SmashError, did_you_mean, shown

from . import settings as tables
from .settings import (
    BUILTIN_MODELS,
    BUILTIN_PREFIX,
    DTYPES,
    EXCLUDE_PRESETS,
    MANIFEST_VERSION,
    QUANTIZE_METHODS,
    repo_id_problem,
    type_name,
)

__all__ = [
    "BUILTIN_MODELS",
    "DTYPES",
    "EXCLUDE_PRESETS",
    "MANIFEST_VERSION",
    "QUANTIZE_METHODS",
    "BuildSpec",
    "LoraSpec",
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

# Bounds checked before the TOML parser runs: its recursion and memory grow with them.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_NESTING = 32

# Component classes that hold no weights and so cannot be transformed.
_NOT_MODULES = ("Tokenizer", "Scheduler", "FeatureExtractor", "ImageProcessor", "Processor")

# Words people write for a key, where spelling similarity alone finds nothing.
_SYNONYMS = {
    "directory": "dir", "folder": "dir", "path": "dir", "output_dir": "dir", "out": "dir",
    "model_id": "source", "repo_id": "source", "id": "source", "model": "source", "torch_dtype": "dtype",
    "precision": "dtype", "quantization": "quantize", "quant": "quantize", "fuse": "fuse_qkv",
    "cache": "cacher", "caching": "cacher", "compile": "compiler", "warm_up": "warmup",
    "excluded": "exclude", "skip": "exclude", "ignore": "exclude", "type": "method",
    "branch": "revision", "message": "commit_message", "image": "tag", "base_image": "base",
}
_SECRETS = ("token", "hf_token", "api_key")


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
class LoraSpec:
    """One ``[build] lora`` entry: a LoRA fused into the weights before QKV fusion and quantization.

    ``source`` is kept as written (it is what smash.json records); ``file`` is the resolved local
    ``.safetensors`` file, None for a Hub source (downloaded at build time, ``revision`` pinned
    to a commit then). ``weight_name`` is the file's name inside the folder or Hub repo::

        lora = [{ source = "loras/style.safetensors", scale = 0.8 },
                { source = "org/flux-lora", weight_name = "lora.safetensors", revision = "v1" }]
    """

    source: str
    weight_name: str
    scale: float = 1.0
    revision: str | None = None
    file: Path | None = None

    @property
    def kind(self) -> str:
        """``"local"`` or ``"hub"``."""
        return "local" if self.file is not None else "hub"


@dataclass(frozen=True)
class BuildSpec:
    """``[build]``: transforms baked into the weights, in the order LoRA, fuse, then quantize.

    ``streaming`` None means: the builder decides from the component's size.
    """

    fuse_qkv: bool = False
    quantize: QuantizeSpec | None = None
    streaming: bool | None = None
    lora: tuple[LoraSpec, ...] = ()


@dataclass(frozen=True)
class RuntimeSpec:
    """``[runtime]``: settings recorded into smash.json and applied by the runtime.

    Each is the normalized table of the runtime's settings model (``settings_to_dict``, defaults
    filled); ``warmup`` is ``{"shapes": [{"height", "width", "steps", "batch"}, ...]}``.
    ``cacher_config()`` and friends give the typed models back.
    """

    cacher: dict | None
    compiler: dict | None
    warmup: dict

    def cacher_config(self) -> runtime_settings.CacherConfig | None:
        return runtime_settings.cacher_from_dict(self.cacher) if self.cacher else None

    def compiler_config(self) -> runtime_settings.CompilerConfig | None:
        return runtime_settings.compiler_from_dict(self.compiler) if self.compiler else None

    def warmup_config(self) -> runtime_settings.WarmupConfig:
        return runtime_settings.warmup_from_dict(self.warmup)


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
    serve: dict | None = None  # [serve]: scaling on Ray Serve (smash_runtime.server.scaling), recorded as runtime.serve


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
        if path.is_file() and path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError([("", _too_big(path.stat().st_size))], origin)
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
    problem = _shape_problem(text)
    if problem:
        raise ManifestError([("", problem)], origin)
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


def parse_override(text: str) -> tuple[str, Any]:
    """``"runtime.cacher.interval=3"`` -> ``("runtime.cacher.interval", 3)``.

    The value is read as a TOML value (numbers, booleans, quoted strings, arrays, inline
    tables); anything that is not valid TOML is taken as a plain string (``name=fora``).
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingsError(text, text, "an override looks like KEY=VALUE, e.g. runtime.cacher.interval=3")
    return key, toml_value(value.strip())


def toml_value(text: str) -> Any:
    """``"3"`` -> 3, ``"[2, 3]"`` -> [2, 3], ``"fora"`` -> "fora": a TOML value, else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def manifest_json_schema() -> dict:
    """The manifest as JSON Schema (draft 2020-12), for editors (e.g. taplo, Even Better TOML).

    Generated from the typed models; checks that need the file system or span tables (local
    folders, cacher compatibility) happen in ``load_manifest``.
    """
    schema = tables.ManifestDocument.model_json_schema(ref_template="#/$defs/{model}")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/smash-build/smash-build/manifest.schema.json"
    return schema


# --------------------------------------------------------------------------- input bounds

# Strings and comments, whose brackets do not nest anything.
_NOT_STRUCTURE = re.compile(r'''"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|#[^\n]*''')


def _too_big(size: int) -> str:
    return (f"the manifest is {size} bytes long; at most {MAX_MANIFEST_BYTES} are read "
            "(a manifest is a few settings: move data such as prompt lists into files)")


def _shape_problem(text: str) -> str | None:
    """Why ``text`` is too large or too deeply nested to hand to the TOML parser, or None."""
    if len(text) > MAX_MANIFEST_BYTES:
        return _too_big(len(text))
    structure = _NOT_STRUCTURE.sub("", text)
    depth = 0
    for char in structure:
        if char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return (f"the manifest nests arrays or inline tables more than {MAX_NESTING} levels deep; "
                        "no setting needs more than a few")
        elif char in "]}":
            depth -= 1
    if max((len(line.split("=", 1)[0].split(".")) for line in structure.splitlines()), default=0) > MAX_NESTING:
        return f"the manifest has a dotted key of more than {MAX_NESTING} parts; no setting is that deep"
    return None


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
            # Quote at most 120 characters around the column (a line may be megabytes long).
            start = max((col or 1) - 60, 0)
            quoted = lines[line - 1][start:start + 120]
            snippet = f"\n      {quoted}\n      {' ' * max((col or 1) - 1 - start, 0)}^"
    return f"TOML syntax error at {where}: {message}{snippet}"


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
        self.settings(SettingsError(key, value, allowed, hint))

    def settings(self, error: SettingsError, prefix: str = "") -> None:
        """Every problem ``error`` carries (``error.errors``), keys moved under ``prefix``."""
        for e in getattr(error, "errors", None) or [error]:
            e = e.with_prefix(prefix) if prefix else e
            self.add(e.key, e.args[0])


def _section_of(key: str) -> str:
    return f"[{key}]" if key else "the top level"


def _keys_of(section: str) -> tuple[str, ...]:
    model = tables.TABLES[section]
    return tuple(name for name, f in model.model_fields.items() if not f.exclude)


def _known(p: _Problems, section: str, table: dict, at: str | None = None) -> dict:
    """``table`` without the keys ``section`` does not accept; each is reported with the nearest guess.

    ``at`` is the table's key path when it differs from ``section`` (``build.lora[2]``).
    """
    allowed = _keys_of(section)
    where = tables.TABLES[section].where if at else _section_of(section)
    for key in table:
        if key in allowed:
            continue
        path = f"{at or section}.{key}" if at or section else key
        if section == "publish.hub" and key.lower() in _SECRETS:
            # Never echo a secret back, and say where tokens do come from.
            p.add(path, f"{path}: tokens are never read from the manifest; set HF_TOKEN or run "
                        "`hf auth login` (the value was not printed)")
            continue
        hint = did_you_mean(key, allowed)
        if hint is None and _SYNONYMS.get(key.lower()) in allowed:
            hint = f"did you mean {_SYNONYMS[key.lower()]!r}?"
        if hint is None:
            homes = [s for s in tables.TABLES if s != section and key in _keys_of(s)]
            if homes:
                hint = f"'{key}' belongs in {' or '.join(_section_of(s) for s in homes)}"
        p.settings(KeyProblem(path, f": unknown key in {where}; allowed keys: {', '.join(allowed)}", hint))
    return {k: v for k, v in table.items() if k in allowed}


def _table(p: _Problems, section: str, value: object) -> dict | None:
    """The known keys of a table, or None (reported) when ``value`` is not a table."""
    if isinstance(value, dict):
        return _known(p, section, value)
    p.bad(section, value, f"must be a table ([{section}]), got {type_name(value)}")
    return None


def _typed(p: _Problems, section: str, model: type, table: dict) -> Any:
    """``table`` validated into ``model``; every problem reported under ``section``; None on a problem."""
    try:
        return model.parse(table)
    except SettingsError as e:
        p.settings(e, section)
        return None


# --------------------------------------------------------------------------- overrides


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


# --------------------------------------------------------------------------- the two passes


def _validate(raw: dict, base: Path, p: _Problems, path: Path | None, stem: str | None) -> Manifest | None:
    top = _known(p, "", raw)
    if "manifest_version" in top:
        try:
            tables.check_manifest_version(top["manifest_version"])
        except SettingsError as e:
            p.settings(e, "manifest_version")

    model = family = None
    if "model" not in top:
        p.add("model", "model: the [model] table is missing; it needs at least "
                       "source = \"builtin:tiny-flux\", a local diffusers folder or a Hub id \"org/name\"")
    else:
        table = _table(p, "model", top["model"])
        typed = _typed(p, "model", tables.ModelTable, table) if table is not None else None
        if typed is not None:
            model, family = _model(p, typed, base)

    build = _build(p, top.get("build", {}), base)
    runtime = _runtime(p, top.get("runtime", {}), family)
    output_table = _table(p, "output", top.get("output", {}))
    output = None
    if output_table is not None:
        typed = _typed(p, "output", tables.OutputTable, output_table)
        output = _output(p, typed, base, stem, model) if typed is not None else None

    evaluate = None
    if "evaluate" in top:
        table = _table(p, "evaluate", top["evaluate"])
        evaluate = _evaluate(p, table, base) if table is not None else None

    publish_hub = publish_image = None
    if "publish" in top:
        publish = _table(p, "publish", top["publish"])
        for name in ("hub", "image") if publish is not None else ():
            if name not in publish:
                continue
            section = f"publish.{name}"
            table = _table(p, section, publish[name])
            typed = _typed(p, section, tables.TABLES[section], table) if table is not None else None
            if typed is None:
                continue
            if name == "hub":
                publish_hub = typed.model_dump()
            else:
                publish_image = typed.model_dump()
                if typed.include_compile_cache and runtime is not None and runtime.compiler is None:
                    p.bad(section + ".include_compile_cache", True, "needs a compiler to cache",
                          "add a [runtime.compiler] table or set include_compile_cache = false")
                    publish_image = None

    serve = _serve(p, top["serve"]) if "serve" in top else None

    if p or model is None or build is None or runtime is None or output is None:
        return None
    return Manifest(path=path, model=model, build=build, runtime=runtime, output=output,
                    evaluate=evaluate, publish_hub=publish_hub, publish_image=publish_image, raw=raw, serve=serve)


def _serve(p: _Problems, value: object) -> dict | None:
    """[serve] through the Ray deployment's own model (its messages); the normalized dict (defaults filled)."""
    if not isinstance(value, dict):
        p.bad("serve", value, "must be a table [serve] with replicas = N or min_replicas/max_replicas, "
                              f"got {type_name(value)}")
        return None
    from smash_runtime.server.scaling import serve_settings_from_dict

    try:
        return serve_settings_from_dict(value).record()
    except SettingsError as e:
        p.settings(e, "serve")
        return None


def _model(p: _Problems, t: tables.ModelTable, base: Path) -> tuple[ModelSpec | None, str | None]:
    """[model] against the disk -> (spec, pipeline family "dit"/"unet").

    The family is known offline for built-in and local sources only (else None).
    """
    kind, source, transformable, at_revision = _source(p, t.source, base)
    ok = kind is not None
    revision = t.revision
    if at_revision is not None:
        if revision is not None:
            p.bad("model.revision", revision, f"conflicts with the revision {shown(at_revision)} given in "
                                              "model.source; give it in one place")
            ok = False
        revision = at_revision
    if revision is not None and kind in ("builtin", "local"):
        p.bad("model.revision", revision, f"applies to Hub sources only; a {kind} source has no revisions",
              "remove model.revision")
        ok = False
    elif revision is None and kind == "hub":
        revision = "main"

    components = t.components
    if components is not None and transformable is not None:
        for i, name in enumerate(components):
            if name not in transformable:
                p.bad(f"model.components[{i}]", name, "is not a component with weights of this source; it has "
                      + ", ".join(transformable), did_you_mean(name, transformable))
                ok = False
    elif components is not None:
        for i, name in enumerate(components):
            if not name.isidentifier():
                p.bad(f"model.components[{i}]", name, "must be a component folder name such as transformer, "
                                                      "unet, vae or text_encoder")
                ok = False

    family = family_of(transformable or ())
    if not ok:
        return None, family
    return ModelSpec(source=source, revision=revision, dtype=t.dtype, components=components), family


def _source(p: _Problems, text: str, base: Path):
    """Classify and check ``model.source``.

    Returns (kind, normalized source, components with weights, revision given as
    ``org/name@revision``), all None on a problem.
    """
    key = "model.source"
    nothing = None, None, None, None
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            p.bad(key, text, "built-in models are " + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS),
                  did_you_mean(name, BUILTIN_MODELS) and did_you_mean(
                      BUILTIN_PREFIX + name, [BUILTIN_PREFIX + n for n in BUILTIN_MODELS]))
            return nothing
        return "builtin", text, BUILTIN_MODELS[name], None
    if text in BUILTIN_MODELS:
        p.bad(key, text, "is neither a local folder nor a Hub id", f"did you mean '{BUILTIN_PREFIX}{text}'?")
        return nothing
    url = re.match(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/(.*)$", text)
    if url or "://" in text:
        parts = url.group(1).strip("/").split("/") if url else []
        hint = f"give the id only, e.g. {parts[0]}/{parts[1]}" if len(parts) >= 2 else None
        p.bad(key, text, "must be a Hub repo id \"org/name\", not a URL", hint)
        return nothing

    folder = Path(os.path.expanduser(text))
    folder = folder if folder.is_absolute() else base / folder
    if folder.exists() or _looks_local(text):
        return _local_source(p, text, folder)

    repo, _, at_revision = text.partition("@")
    if "@" in text and not at_revision:
        p.bad(key, text, "a Hub source with a revision looks like org/name@revision")
        return nothing
    problem = repo_id_problem(repo, "a Hub repo id \"org/name\" (or an existing local folder)")
    if problem is not None:
        p.settings(problem, key)
        return nothing
    if at_revision:
        try:
            tables.check_ref(at_revision)
        except SettingsError as e:
            p.settings(e, key)
            return nothing
    return "hub", repo, None, at_revision or None


def _looks_local(text: str) -> bool:
    """Whether a source that does not exist was meant as a path rather than a Hub id ``org/name``."""
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
            or (text.count("/") == 0 and "@" not in text))


def _local_source(p: _Problems, text: str, folder: Path):
    key = "model.source"
    nothing = None, None, None, None
    where = f"{text} (resolved to {folder})" if str(folder) != text else text

    def bad(message: str):
        p.add(key, f"{key} = {shown(text)}: {message}")
        return nothing

    if not folder.exists():
        return bad(f"no such local folder ({folder}); a local source is a diffusers pipeline folder (relative "
                   "paths are relative to the manifest's folder)")
    if not folder.is_dir():
        return bad(f"{where} is a file; a local source is a diffusers pipeline folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        return bad(f"the folder {folder} is not readable")
    index = folder / "model_index.json"
    if not index.exists():
        return bad(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder (save one with "
                   "pipe.save_pretrained(folder))")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return bad(f"cannot read {index}: {getattr(e, 'strerror', None) or e}")
    except json.JSONDecodeError as e:
        return bad(f"{index} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})")
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        return bad(f"{index} has no \"_class_name\"; it is not a diffusers model_index.json")
    transformable = tuple(
        name for name, entry in data.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2
        and all(isinstance(x, str) for x in entry) and not any(s in entry[1] for s in _NOT_MODULES)
    )
    return "local", str(folder.resolve()), transformable, None


def _build(p: _Problems, value: object, base: Path) -> BuildSpec | None:
    table = _table(p, "build", value)
    if table is None:
        return None
    if isinstance(table.get("quantize"), dict):
        table = {**table, "quantize": _known(p, "build.quantize", table["quantize"])}
    loras = _loras(p, table.pop("lora", []), base)
    typed = _typed(p, "build", tables.BuildTable, table)
    if typed is None or loras is None:
        return None
    if loras and typed.streaming:
        p.bad("build.streaming", True, "cannot be combined with build.lora: the streaming build does not fuse LoRAs",
              "set build.streaming = false or leave it out")
        return None
    quantize = typed.quantize and QuantizeSpec(method=typed.quantize.method, exclude=typed.quantize.exclude)
    return BuildSpec(fuse_qkv=typed.fuse_qkv, quantize=quantize, streaming=typed.streaming, lora=loras)


def _loras(p: _Problems, value: object, base: Path) -> tuple[LoraSpec, ...] | None:
    """``[build] lora``: a list of LoRA tables (a single table is taken as a list of one)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        p.bad("build.lora", value, f"must be a list of tables [{tables.LORA_FORM}, ...], got {type_name(value)}")
        return None
    start = len(p.items)
    specs = []
    for i, entry in enumerate(value):
        key = f"build.lora[{i}]"
        if not isinstance(entry, dict):
            p.bad(key, entry, f"must be a table {tables.LORA_FORM}, got {type_name(entry)}")
            continue
        typed = _typed(p, key, tables.LoraTable, _known(p, "build.lora", entry, at=key))
        if typed is not None:
            specs.append(_lora(p, key, typed, base))
    return tuple(specs) if len(p.items) == start else None


def _lora(p: _Problems, key: str, t: tables.LoraTable, base: Path) -> LoraSpec | None:
    """A LoRA entry against the disk: a .safetensors file, a folder holding one, or a Hub repo id."""
    start = len(p.items)
    source, weight_name, revision, file = t.source, t.weight_name, None, None
    path = _resolve(base, source)
    if path.is_file():
        if weight_name is not None and weight_name != path.name:
            p.bad(f"{key}.weight_name", weight_name, f"applies to folder and Hub sources; {shown(source)} is a file",
                  "remove weight_name")
        if path.suffix != ".safetensors":
            p.bad(f"{key}.source", source, "must be a .safetensors file (LoRAs load from safetensors only, "
                                           "never from pickled .bin/.pt files)")
        file, weight_name = path, path.name
    elif path.is_dir():
        weight_name = weight_name or tables.LORA_WEIGHT_NAME
        file = path / weight_name
        if not file.is_file():
            found = sorted(f.relative_to(path).as_posix() for f in path.rglob("*.safetensors"))[:10]
            p.bad(f"{key}.weight_name", weight_name, f"no such file in {path}; it holds "
                  + (", ".join(found) if found else "no .safetensors files"),
                  "set weight_name to the LoRA's file name" if found else None)
    elif "://" in source or source.startswith(("huggingface.co/", "hf.co/")):
        parts = source.split("://")[-1].strip("/").split("/")
        p.bad(f"{key}.source", source, "must be a Hub repo id \"org/name\", not a URL",
              f"give the id only, e.g. {parts[-2]}/{parts[-1]}" if len(parts) >= 3 else None)
    elif _looks_local(source) or source.endswith(".safetensors"):
        p.add(f"{key}.source", f"{key}.source = {shown(source)}: no such file or folder ({path}); a local LoRA is a "
                               ".safetensors file or a folder holding one (relative to the manifest's folder)")
    else:
        repo, _, at = source.partition("@")
        problem = repo_id_problem(repo, "a Hub repo id \"org/name\" (or an existing local file)")
        if problem is not None:
            p.settings(problem, f"{key}.source")
            return None
        if at and t.revision is not None:
            p.bad(f"{key}.revision", t.revision, f"conflicts with the revision {shown(at)} given in the source; "
                                                 "give it in one place")
            return None
        try:
            revision = tables.check_ref(at) if at else (t.revision or "main")
        except SettingsError as e:
            p.settings(e, f"{key}.source")
            return None
        source, weight_name = repo, weight_name or tables.LORA_WEIGHT_NAME
    if t.revision is not None and file is not None:
        p.bad(f"{key}.revision", t.revision, "applies to Hub sources only", "remove it")
    if len(p.items) > start or weight_name is None:
        return None
    return LoraSpec(source=source if file is None else t.source, weight_name=weight_name, scale=t.scale,
                    revision=revision, file=file)


def _runtime(p: _Problems, value: object, family: str | None) -> RuntimeSpec | None:
    table = _table(p, "runtime", value)
    typed = _typed(p, "runtime", tables.RuntimeTable, table) if table is not None else None
    if typed is None:
        return None
    if typed.cacher is not None and family:
        try:
            runtime_settings.check_cacher_compatibility(typed.cacher, family, typed.compiler)
        except SettingsError as e:
            p.settings(e, "runtime.cacher")
            return None
    as_dict = runtime_settings.settings_to_dict
    return RuntimeSpec(cacher=typed.cacher and as_dict(typed.cacher), compiler=typed.compiler and as_dict(typed.compiler),
                       warmup=as_dict(typed.warmup))


def _resolve(base: Path, text: str) -> Path:
    path = Path(os.path.expanduser(text))
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _output(p: _Problems, t: tables.OutputTable, base: Path, stem: str | None,
            model: ModelSpec | None) -> OutputSpec | None:
    if t.dir is not None:
        folder = Path(os.path.expanduser(t.dir))
    else:
        name = stem or (model.builtin_name if model and model.builtin_name else None) or (
            model.source.rstrip("/").split("/")[-1] if model else "artifact")
        folder = Path("dist") / name
    folder = Path(os.path.normpath(folder if folder.is_absolute() else base / folder))
    written = shown(t.dir if t.dir is not None else str(folder))

    def bad(message: str) -> None:
        p.add("output.dir", f"output.dir = {written}: {message}")

    if folder.exists() and not folder.is_dir():
        return bad(f"{folder} exists and is a file; the artifact is a folder")
    # The build writes a temporary folder beside the target and renames it: the nearest
    # existing ancestor must be a writable folder.
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return bad(f"{ancestor} is a file, so {folder} cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return bad(f"{ancestor} is not writable")
    return OutputSpec(dir=folder)


def _evaluate(p: _Problems, table: dict, base: Path) -> dict | None:
    """[evaluate] through the evaluation's settings model, plus the checks that need the disk.

    Returns the normalized table (every default filled, as ``EvalSettings.record()``), which
    ``smash_build.evaluate.settings.settings_from_dict`` reads back unchanged.
    """
    from .evaluate.prompts import BUILTIN, builtin_prompts
    from .evaluate.settings import settings_from_dict

    start = len(p.items)
    known = dict(table)
    if "prompts" in known:
        prompts = _prompts(p, known["prompts"], base)
        if prompts is None:
            known.pop("prompts")
        else:
            known["prompts"] = prompts
    if "weights_dir" in known:
        try:
            text = tables.text_rule("a folder path")(known["weights_dir"])
        except SettingsError as e:
            p.settings(e, "evaluate.weights_dir")
            text = None
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


def _prompts(p: _Problems, value: object, base: Path) -> str | None:
    """A prompt set: "builtin", a prompt file, or a Hub dataset (hf://datasets/ORG/NAME or ORG/NAME)."""
    from .evaluate.prompts import BUILTIN, FILE_SUFFIXES, HF_DATASET_PREFIX

    key = "evaluate.prompts"
    try:
        text = tables.text_rule(f"\"{BUILTIN}\", a prompt file or a Hub dataset id")(value)
    except SettingsError as e:
        p.settings(e, key)
        return None
    if text == BUILTIN:
        return text
    file = _resolve(base, text)
    if text.startswith(HF_DATASET_PREFIX) or (not file.exists() and file.suffix.lower() not in FILE_SUFFIXES
                                                and not text.startswith((".", "/", "~")) and text.count("/") == 1):
        repo = text[len(HF_DATASET_PREFIX):] if text.startswith(HF_DATASET_PREFIX) else text
        problem = repo_id_problem(repo, "hf://datasets/ORG/NAME" if repo != text else "a Hub dataset id \"org/name\"")
        if problem is not None:
            p.settings(problem, key)
            return None
        return text
    if file.exists() or file.suffix.lower() in FILE_SUFFIXES or text.startswith((".", "/", "~")):
        if not file.is_file():
            p.bad(key, text, f"the prompt file {file} " + ("is a folder" if file.exists() else "does not exist"))
            return None
        if not os.access(file, os.R_OK):
            p.bad(key, text, f"the prompt file {file} is not readable")
            return None
        return str(file)
    p.bad(key, text, f"must be \"{BUILTIN}\", a prompt file (" + ", ".join(FILE_SUFFIXES)
          + ") or a Hub dataset hf://datasets/ORG/NAME", did_you_mean(text, [BUILTIN]))
    return None
