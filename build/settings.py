"""The manifest's tables as typed models: ``[model]``, ``[build]``, ``[runtime]``, ``[output]``, ``[publish]``.

Each key's type, default, description and the rule its value must follow are declared once,
here; the manifest layer (``smash_build.manifest``) validates a TOML document against
:class:`ManifestDocument`, and ``smash-build schema`` prints the JSON Schema generated from it.
The runtime tables are the runtime's own models (``smash_runtime.settings``) and ``[evaluate]``
is ``smash_build.evaluate.settings.EvalSettings``; ``[serve]`` is the Ray deployment's
``smash_runtime.server.scaling.ServeSettings``. Torch-free.

Rules a schema cannot state (files on disk, the source's components, cacher x pipeline family
x compiler) are the manifest's second pass.

A validator here raises :class:`SettingsError` with an empty key (``"", value, "must be ..."``):
the manifest layer puts the key path in front.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field

from smash_runtime import settings as runtime
from smash_runtime.errors import SettingsError, did_you_mean
from smash_runtime.server.scaling import ServeSettings
from smash_runtime.settings import Missing, Settings

from .evaluate.settings import EvalSettings

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "DEFAULT_DTYPE",
    "DTYPES",
    "EXCLUDE_PRESETS",
    "MANIFEST_VERSION",
    "MAX_STRING_CHARS",
    "QUANTIZE_METHODS",
    "LORA_WEIGHT_NAME",
    "BuildTable",
    "LoraTable",
    "ManifestDocument",
    "ModelTable",
    "OutputTable",
    "PublishHubTable",
    "PublishImageTable",
    "PublishTable",
    "QuantizeTable",
    "RuntimeTable",
    "type_name",
]

MANIFEST_VERSION = 1
MAX_STRING_CHARS = 4096
"""Longest string value a manifest may hold (paths, ids, messages)."""

# Kept here rather than imported from tiny_models so validating a manifest never imports
# torch/diffusers; a test checks that both lists agree.
BUILTIN_MODELS: dict[str, tuple[str, ...]] = {
    "tiny-flux": ("transformer", "vae", "text_encoder", "text_encoder_2"),
    "tiny-sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
}
BUILTIN_PREFIX = "builtin:"

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16", "half": "float16", "f16": "float16",
}
DEFAULT_DTYPE = "bfloat16"

QUANTIZE_METHODS = tuple(runtime.QUANTIZE_METHODS)
EXCLUDE_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "norm": ("*norm*",),
    "embedding": ("*embed*",),
    "norm+embedding": ("*norm*", "*embed*"),
}

# Hub repo ids, the shape huggingface_hub accepts for "org/name" (validate_repo_id adds the
# "--"/".." rules, checked below through it).
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

# Container image references, after github.com/distribution/reference (regexp.go).
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
IMAGE_REF = re.compile(
    rf"^(?:(?:{_DOMAIN})/)?(?:{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)

# Git refs, the subset of `git check-ref-format` rules that catch real typos.
_BAD_REF = re.compile(r"[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|@\{|//|^[-/.]|[/.]$|\.lock$")
_GLOB_CHARS = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+$")


def type_name(value: object) -> str:
    """``"an integer"``, ``"a string"``, ... as TOML calls the value's type."""
    if isinstance(value, bool):
        return "a boolean"
    names = {int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"  # TOML dates and times


# --------------------------------------------------------------------------- value rules


def text_rule(what: str):
    """A non-blank string of at most MAX_STRING_CHARS characters."""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise SettingsError("", value, f"must be {what}, got {type_name(value)}")
        if not value.strip():
            raise SettingsError("", value, f"must be {what}, not empty")
        if len(value) > MAX_STRING_CHARS:
            raise SettingsError("", value, f"must be {what} of at most {MAX_STRING_CHARS} characters")
        return value

    return check


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    hint = None
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        hint = f"write {str(value.lower() in ('true', 'yes', 'on')).lower()} without quotes"
    raise SettingsError("", value, f"must be a boolean (true or false), got {type_name(value)}", hint)


def _one_of(choices: tuple[str, ...], aliases: dict[str, str] | None = None):
    def check(value: Any) -> str:
        allowed = f"must be one of {', '.join(choices)}"
        if not isinstance(value, str):
            raise SettingsError("", value, f"{allowed}, got {type_name(value)}")
        if value in choices:
            return value
        alias = (aliases or {}).get(value.lower())
        raise SettingsError("", value, allowed, f"did you mean {alias!r}?" if alias else did_you_mean(value.lower(),
                                                                                                       choices))

    return check


def check_ref(value: Any) -> str:
    text = text_rule("a branch, tag or commit sha")(value)
    if _BAD_REF.search(text):
        raise SettingsError("", value, "must be a branch, tag or commit sha (no spaces, '..', '~^:?*[\\', "
                                       "and no leading or trailing '/', '.' or '-')")
    return text


def repo_id_problem(text: str, what: str = "a Hub repo id 'org/name'") -> SettingsError | None:
    """Why ``text`` is not a Hub repo id (huggingface_hub's own rules), or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    ok = bool(REPO_ID.match(text))
    if ok:
        try:
            validate_repo_id(text)
        except HFValidationError:
            ok = False
    if ok:
        return None
    hint = None
    if text.startswith(("https://", "http://", "hf.co/", "huggingface.co/")):
        hint = "give the id only, e.g. " + "/".join(text.rstrip("/").split("/")[-2:])
    return SettingsError("", text, f"must be {what}: letters, digits, '-', '_' and '.', one '/', "
                                   "no '--' or '..', at most 96 characters per part", hint)


def _repo_id(value: Any) -> str:
    text = text_rule("a Hub repo id 'org/name'")(value)
    problem = repo_id_problem(text)
    if problem:
        raise problem
    return text


def _image_ref(value: Any) -> str:
    ref = text_rule("an image reference such as \"registry.example.com/org/name:tag\"")(value)
    if not IMAGE_REF.match(ref):
        hint = "repository names are lowercase" if IMAGE_REF.match(ref.lower()) else None
        raise SettingsError("", ref, "must be an image reference [registry[:port]/]name[:tag][@sha256:digest] "
                                     "(lowercase name parts, tag of at most 128 of [A-Za-z0-9_.-])", hint)
    return ref


def _one_line(value: Any) -> str:
    message = text_rule("a one-line commit message")(value)
    if "\n" in message.strip():
        raise SettingsError("", message, "must be one line (the Hub shows it as the commit title)")
    return message


def _names(what: str):
    """A list of distinct non-blank strings; every bad item is reported (key ``[i]``)."""

    def check(value: Any) -> list[str]:
        if not isinstance(value, list):
            raise SettingsError("", value, f"must be {what}, got {type_name(value)}")
        problems, seen = [], []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                problems.append(SettingsError(f"[{i}]", item, "must be a non-empty string"
                                              + ("" if isinstance(item, str) else f", got {type_name(item)}")))
            elif item in seen:
                problems.append(SettingsError(f"[{i}]", item, "is listed twice"))
            else:
                seen.append(item)
        _raise_all(problems)
        return seen

    return check


def _raise_all(problems: list[SettingsError]) -> None:
    if problems:
        problems[0].errors = problems
        raise problems[0]


def _components(value: Any) -> tuple[str, ...]:
    items = _names("a list of component names")(value)
    if not items:
        raise SettingsError("", [], "must name at least one component",
                            "leave the key out to transform the denoiser (transformer or unet)")
    return tuple(items)


def check_manifest_version(value: Any) -> int:
    if isinstance(value, bool) or value != MANIFEST_VERSION:
        newer = isinstance(value, int) and not isinstance(value, bool) and value > MANIFEST_VERSION
        raise SettingsError("", value, f"this smash-build reads manifest_version = {MANIFEST_VERSION}",
                            "upgrade smash-build" if newer else None)
    return value


def glob_problem(glob: str) -> str | None:
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


def _exclude(value: Any) -> tuple[str, ...]:
    items = _names("a list of presets (" + ", ".join(EXCLUDE_PRESETS) + ") and module-name globs")(
        [value] if isinstance(value, str) else value)
    problems = []
    for i, entry in enumerate(items):
        if entry in EXCLUDE_PRESETS:
            if entry == "none" and len(items) > 1:
                problems.append(SettingsError(f"[{i}]", entry, "'none' cannot be combined with other exclusions"))
            continue
        problem = glob_problem(entry)
        if problem is None and not any(c in entry for c in "*?[") and "." not in entry:
            # A bare word close to a preset is almost surely a typo: as a glob it would only
            # match a top-level module of exactly that name.
            hint = did_you_mean(entry, EXCLUDE_PRESETS)
            if hint:
                problems.append(SettingsError(f"[{i}]", entry, "is not a preset (" + ", ".join(EXCLUDE_PRESETS) + ")",
                                              f"{hint} To match module names containing it, write '*{entry}*'"))
        elif problem:
            problems.append(SettingsError(f"[{i}]", entry, f"is not a valid module-name glob: {problem}",
                                          "globs use fnmatch syntax (*, ?, [abc], [!abc]) over names such as "
                                          "'transformer_blocks.0.attn.to_out.0'"))
    _raise_all(problems)
    return tuple(items)


def _quantize(value: Any) -> Any:
    if value == "none":
        return None
    if isinstance(value, str):
        return {"method": value}  # quantize = "int8wo" shorthand
    if isinstance(value, dict):
        return value
    raise SettingsError("", value, "must be a method name (\"int8wo\"), \"none\" or a table "
                                   "{ method = ..., exclude = [...] }, got " + type_name(value))


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' own default file name for a LoRA in a folder or Hub repo (``load_lora_weights``)."""
LORA_FORM = "{ source = \"file, folder or org/name\", weight_name = \"...\", scale = 1.0 }"


def _lora_scale(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingsError("", value, "must be a finite number: the LoRA's strength (1.0 = as trained)")
    return float(value)


def _weight_name(value: Any) -> str:
    name = text_rule("a .safetensors file name")(value)
    if not name.endswith(".safetensors") or name.startswith("/") or ".." in name.split("/"):
        raise SettingsError("", name, "must be a relative .safetensors file name inside the folder or Hub repo "
                                      "(LoRAs load from safetensors only)")
    return name


def _loras(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value  # a single table is a list of one


def _streaming(value: Any) -> bool | None:
    if value == "auto":
        return None
    if isinstance(value, str):
        raise SettingsError("", value, "must be true, false or \"auto\"", did_you_mean(value, ["auto"]))
    return _boolean(value)


def _technique(parse):
    """[runtime.cacher] / [runtime.compiler]: a table, the name alone, or "none"."""

    def check(value: Any) -> Any:
        if value is None or isinstance(value, runtime.Settings):
            return value
        key = "runtime.cacher" if parse is runtime.cacher_from_dict else "runtime.compiler"
        if isinstance(value, str):
            if value == "none":
                return None
            value = {"name": value}
        if not isinstance(value, dict):
            raise SettingsError("", value, f"must be a table [{key}] with a name, a name string, or \"none\"; "
                                           f"got {type_name(value)}")
        if value.get("name") == "none":
            if len(value) > 1:
                raise SettingsError("name", "none", "takes no other keys")
            return None
        return parse(value)

    return check


def _warmup(value: Any) -> Any:
    if isinstance(value, runtime.WarmupConfig):
        return value
    if not isinstance(value, dict):
        raise SettingsError("", value, "must be a table [runtime.warmup] with shapes = [{ height, width, "
                                       f"steps, batch }}, ...], got {type_name(value)}")
    return runtime.warmup_from_dict(value)


def _portable(regex: re.Pattern) -> str:
    # JSON Schema patterns are ECMA-262: Python's named groups (?P<name>...) are not.
    return re.sub(r"\(\?P<\w+>", "(?:", regex.pattern)


def _text_type(what: str, **schema: Any):
    return Annotated[str, BeforeValidator(text_rule(what)), Field(min_length=1, json_schema_extra=schema or None)]


Bool = Annotated[bool, BeforeValidator(_boolean)]


# --------------------------------------------------------------------------- tables


class Table(Settings):
    """A manifest table: unknown keys are refused, every key is described."""

    section: ClassVar[str] = ""


class ModelTable(Table):
    """``[model]``: the source pipeline."""

    section: ClassVar[str] = "model"
    source: Annotated[
        str, BeforeValidator(text_rule("\"builtin:<name>\", a local diffusers folder or a Hub repo id \"org/name\"")),
        Missing("give \"builtin:tiny-flux\" or \"builtin:tiny-sdxl\", a local diffusers folder, "
                "or a Hub repo id \"org/name\""),
    ] = Field(min_length=1, description="builtin:tiny-flux, builtin:tiny-sdxl, a local diffusers folder (relative "
                                        "to this file) or a Hub repo id org/name[@revision]",
              examples=[BUILTIN_PREFIX + n for n in BUILTIN_MODELS] + ["black-forest-labs/FLUX.1-dev"])
    revision: Annotated[str, BeforeValidator(check_ref)] | None = Field(
        None, min_length=1, json_schema_extra={"default": "main"}, description="Hub branch, tag or commit sha")
    dtype: Annotated[Literal[DTYPES], BeforeValidator(_one_of(DTYPES, DTYPE_ALIASES))] = Field(
        DEFAULT_DTYPE, description="weights' dtype")
    components: Annotated[
        tuple[Annotated[str, Field(min_length=1)], ...], Field(min_length=1), BeforeValidator(_components)
    ] | None = Field(
        None, json_schema_extra={"uniqueItems": True},
        description="components to transform; default: the denoiser (transformer or unet)")


class QuantizeTable(Table):
    """``[build.quantize]``: torchao method and the modules to leave alone."""

    section: ClassVar[str] = "build.quantize"
    method: Annotated[Literal[QUANTIZE_METHODS], BeforeValidator(_one_of(QUANTIZE_METHODS)),
                      Missing("one of " + ", ".join(QUANTIZE_METHODS))] = Field(
        description="torchao quantization method")
    exclude: Annotated[
        tuple[str, ...], BeforeValidator(_exclude, json_schema_input_type=str | list[Annotated[str, Field(min_length=1)]])
    ] = Field((), description="presets (none, norm, embedding, norm+embedding) and fnmatch globs over module names",
              examples=[["norm", "embedding"], ["*proj_out*"]])


class LoraTable(Table):
    """One ``[build] lora`` entry: a LoRA fused into the weights before QKV fusion and quantization."""

    section: ClassVar[str] = "build.lora"
    where: ClassVar[str] = "a LoRA table"
    source: Annotated[
        str, BeforeValidator(text_rule("a .safetensors file, a folder or a Hub repo id \"org/name\"")),
        Missing("a .safetensors file, a folder holding one, or a Hub repo id \"org/name\""),
    ] = Field(min_length=1, description="a .safetensors file, a folder (relative to this file) or a Hub repo id "
                                        "org/name[@revision]")
    weight_name: Annotated[str, BeforeValidator(_weight_name)] | None = Field(
        None, json_schema_extra={"pattern": r"\.safetensors$", "default": LORA_WEIGHT_NAME},
        description="the file's name inside the folder or Hub repo")
    scale: Annotated[float, BeforeValidator(_lora_scale)] = Field(1.0, description="strength (1.0 = as trained)")
    revision: Annotated[str, BeforeValidator(check_ref)] | None = Field(
        None, json_schema_extra={"default": "main"}, description="Hub sources only")


class BuildTable(Table):
    """``[build]``: transforms baked into the weights, in the order LoRA, fuse, then quantize."""

    section: ClassVar[str] = "build"
    fuse_qkv: Bool = Field(False, description="fuse attention q/k/v projections into one matmul")
    quantize: Annotated[
        QuantizeTable | None,
        BeforeValidator(_quantize, json_schema_input_type=Literal[(*QUANTIZE_METHODS, "none")] | QuantizeTable),
    ] = Field(None, description="a method name, \"none\" or a table { method, exclude }")
    streaming: Annotated[bool | None, BeforeValidator(_streaming, json_schema_input_type=bool | Literal["auto"])] = Field(
        None, json_schema_extra={"default": "auto"},
        description="build one block at a time with bounded memory; auto = by size")
    lora: Annotated[tuple[LoraTable, ...], BeforeValidator(_loras, json_schema_input_type=list[LoraTable] | LoraTable)] = (
        Field((), description="LoRAs fused into the weights, in order, before QKV fusion"))


class RuntimeTable(Table):
    """``[runtime]``: recorded in smash.json and applied by the runtime at load."""

    section: ClassVar[str] = "runtime"
    cacher: Annotated[
        runtime.CacherConfig | None,
        BeforeValidator(_technique(runtime.cacher_from_dict), json_schema_input_type=Literal[
            (*runtime.CACHER_SETTINGS, "none")] | Annotated[runtime.CacherConfig, Field(discriminator="name")]),
    ] = Field(None, description="the cacher: a table keyed on name, a name, or \"none\"")
    compiler: Annotated[
        runtime.CompilerConfig | None,
        BeforeValidator(_technique(runtime.compiler_from_dict), json_schema_input_type=Literal[
            (*runtime.COMPILER_SETTINGS, "none")] | Annotated[runtime.CompilerConfig, Field(discriminator="name")]),
    ] = Field(None, description="the compiler: a table keyed on name, a name, or \"none\"")
    warmup: Annotated[runtime.WarmupConfig, BeforeValidator(_warmup)] = Field(
        runtime.WarmupConfig(), description="shapes compiled ahead when the runtime warms up")


class OutputTable(Table):
    """``[output]``: where the artifact goes."""

    section: ClassVar[str] = "output"
    dir: _text_type("a folder path") | None = Field(
        None, description="artifact folder, relative to this file; default dist/<manifest name>")


class PublishHubTable(Table):
    """``[publish.hub]``: publish the artifact to the Hugging Face Hub (token from HF_TOKEN or the login cache)."""

    section: ClassVar[str] = "publish.hub"
    repo: Annotated[str, BeforeValidator(_repo_id), Missing("the Hub repo to publish to, \"org/name\"")] = Field(
        json_schema_extra={"pattern": REPO_ID.pattern}, description="the Hub repo, org/name")
    private: Bool = Field(False, description="create the repo private")
    revision: Annotated[str, BeforeValidator(check_ref)] = Field("main", min_length=1, description="branch to commit to")
    commit_message: Annotated[str, BeforeValidator(_one_line)] | None = Field(
        None, min_length=1, description="one-line commit title")


class PublishImageTable(Table):
    """``[publish.image]``: bake the artifact into a container image."""

    section: ClassVar[str] = "publish.image"
    tag: Annotated[str, BeforeValidator(_image_ref),
                   Missing("the image reference to build, e.g. \"registry/name:tag\"")] = Field(
        json_schema_extra={"pattern": _portable(IMAGE_REF)}, description="image reference to build")
    base: Annotated[str, BeforeValidator(_image_ref)] | None = Field(
        None, json_schema_extra={"pattern": _portable(IMAGE_REF)}, description="base image (default: python slim)")
    push: Bool = Field(False, description="push the image after building it")
    include_compile_cache: Bool = Field(False, description="compile on this machine and bake the compile cache in")


class PublishTable(Table):
    """``[publish]``: optional follow-up steps."""

    section: ClassVar[str] = "publish"
    hub: PublishHubTable | None = None
    image: PublishImageTable | None = None


class ManifestDocument(Table):
    """A whole manifest. ``model`` is required; every other table has defaults."""

    section: ClassVar[str] = ""
    model_config = {"title": "smash-build manifest"}
    manifest_version: Annotated[Literal[MANIFEST_VERSION], BeforeValidator(check_manifest_version)] = MANIFEST_VERSION
    model: ModelTable = Field(description="the source pipeline")
    build: BuildTable = Field(BuildTable(), description="transforms baked into the weights (fuse, then quantize)")
    runtime: RuntimeTable = Field(RuntimeTable(), description="recorded in smash.json and applied by the runtime at load")
    serve: ServeSettings | None = Field(
        None, description="scaling of `smash-serve --ray` and the KubeRay RayService; recorded in smash.json")
    output: OutputTable = OutputTable()
    evaluate: EvalSettings | None = Field(None, description="compare the artifact with its base: speed, memory, fidelity")
    publish: PublishTable | None = None


TABLES: dict[str, type[Settings]] = {
    "": ManifestDocument, "model": ModelTable, "build": BuildTable, "build.quantize": QuantizeTable,
    "build.lora": LoraTable, "runtime": RuntimeTable, "serve": ServeSettings, "output": OutputTable, "evaluate": EvalSettings, "publish": PublishTable,
    "publish.hub": PublishHubTable, "publish.image": PublishImageTable,
}
"""Every table by its section path, for unknown-key messages."""
