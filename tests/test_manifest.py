"""The manifest: every problem found before any work, each named by key path; good manifests parse.

The bad-manifest corpus lives in tests/bad_manifests/*.toml; each file starts with one or more
``# expect: FRAGMENT`` lines that must all appear in the ManifestError message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from smash_build.manifest import (
    BUILTIN_MODELS,
    BuildSpec,
    LoraSpec,
    Manifest,
    ManifestError,
    ModelSpec,
    OutputSpec,
    QuantizeSpec,
    RuntimeSpec,
    load_manifest,
    manifest_json_schema,
    parse_manifest,
    parse_override,
)
from smash_runtime.errors import SettingsError, SmashError

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
CORPUS_DIR = Path(__file__).resolve().parent / "bad_manifests"
CORPUS = sorted(CORPUS_DIR.glob("*.toml"))
FLUX_INDEX = CORPUS_DIR / "fixtures" / "flux_pipeline" / "model_index.json"


def _expectations(path: Path) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("# expect:")]


def _parse(text: str, base: Path, **kw) -> Manifest:
    return parse_manifest(text, base, **kw)


TINY = '[model]\nsource = "builtin:tiny-flux"\ndtype = "float32"\n'


# --------------------------------------------------------------------------- the bad corpus


def test_corpus_is_large_and_every_case_says_what_it_expects():
    assert len(CORPUS) >= 25
    for path in CORPUS:
        assert _expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_bad_manifest_is_rejected_with_a_message_naming_the_problem(path):
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    error = info.value
    message = str(error)
    for fragment in _expectations(path):
        assert fragment in message, f"expected {fragment!r} in:\n{message}"
    assert message.startswith(str(path))
    assert error.problems
    for key, text in error.problems:
        # Every problem line names its key path (syntax errors name the position instead).
        assert key in text if key else "TOML syntax error" in text or "manifest" in text


def test_all_problems_are_reported_at_once():
    with pytest.raises(ManifestError) as info:
        load_manifest(CORPUS_DIR / "many_problems.toml")
    keys = [key for key, _ in info.value.problems]
    assert keys == ["model.dtype", "build.fuse_qkv", "build.quantize.method", "runtime.cacher.interval"]


def test_syntax_error_gives_line_and_column():
    with pytest.raises(ManifestError) as info:
        _parse('[model]\nsource = "builtin:tiny-flux"\n[build]\nfuse_qkv = tru\n', ROOT)
    ((key, message),) = info.value.problems
    assert key == ""
    assert "TOML syntax error at line 4, column 12" in message
    assert "fuse_qkv = tru" in message  # the offending line is quoted


def test_a_token_in_the_manifest_is_refused_without_echoing_it():
    path = CORPUS_DIR / "publish_hub_token.toml"
    secret = "hf_NeverPrintThisTokenValue123"
    assert secret in path.read_text()
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert secret not in str(info.value)
    assert secret not in repr(info.value.problems)


def test_manifest_error_is_a_smash_error():
    assert issubclass(ManifestError, SmashError)


def test_missing_unreadable_and_binary_manifest_files(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.toml")
    with pytest.raises(ManifestError, match="is a folder"):
        load_manifest(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[model]\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(tmp_path / "bin.toml")


def test_local_source_with_unreadable_model_index(tmp_path):
    # model_index.json exists but cannot be read as a file (root ignores permission bits).
    (tmp_path / "pipe" / "model_index.json").mkdir(parents=True)
    with pytest.raises(ManifestError, match=r"model\.source = 'pipe': cannot read .*model_index\.json"):
        _parse('[model]\nsource = "pipe"\n', tmp_path)


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "blocker").write_text("")
    with pytest.raises(ManifestError, match=r"output\.dir = 'blocker/art'.*is a file, so .* cannot be created"):
        _parse(TINY + '[output]\ndir = "blocker/art"\n', tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_dir_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ManifestError, match="is not writable"):
            _parse(TINY + '[output]\ndir = "locked/art"\n', tmp_path)
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- good manifests


def test_tiny_flux_example():
    m = load_manifest(MANIFESTS / "tiny-flux.toml")
    assert m.path == (MANIFESTS / "tiny-flux.toml").resolve()
    assert m.model == ModelSpec(source="builtin:tiny-flux", revision=None, dtype="float32", components=None)
    assert (m.model.kind, m.model.builtin_name) == ("builtin", "tiny-flux")
    assert m.build == BuildSpec(fuse_qkv=True, quantize=QuantizeSpec("int8wo", ("norm+embedding",)), streaming=None)
    assert m.build.quantize.exclude_globs == ("*norm*", "*embed*")
    assert m.runtime == RuntimeSpec(
        cacher={"name": "fora", "interval": 2, "start_step": 2},
        compiler=None,
        warmup={"shapes": [{"height": 64, "width": 64, "steps": 4, "batch": 1}]},
    )
    assert m.output == OutputSpec(dir=ROOT / "dist" / "tiny-flux")
    assert m.evaluate["num_prompts"] == 16 and m.evaluate["steps"] == 4 and m.evaluate["device"] == "cpu"
    assert m.publish_hub is None and m.publish_image is None
    assert m.raw["model"]["source"] == "builtin:tiny-flux"


def test_tiny_sdxl_example():
    m = load_manifest(MANIFESTS / "tiny-sdxl.toml")
    assert m.model == ModelSpec(source="builtin:tiny-sdxl", revision=None, dtype="float32", components=None)
    assert m.build.quantize == QuantizeSpec("int8wo", ("norm", "embedding"))
    assert m.runtime.cacher == {"name": "deepcache", "interval": 3, "branch": 0, "layer": None, "start_step": 0}
    assert m.output.dir == ROOT / "dist" / "tiny-sdxl"


def test_flux_dev_example():
    m = load_manifest(MANIFESTS / "flux-dev.toml")
    assert m.model == ModelSpec("black-forest-labs/FLUX.1-dev", "main", "bfloat16", ("transformer",))
    assert m.model.kind == "hub"
    assert m.build == BuildSpec(True, QuantizeSpec("int8dq", ("norm", "embedding")), None)
    assert m.runtime.cacher == {"name": "fora", "interval": 3, "start_step": 2}
    assert m.runtime.compiler == {"name": "torch_compile", "mode": "max-autotune-no-cudagraphs", "fullgraph": False,
                                  "dynamic": None, "scope": "blocks"}
    assert m.runtime.warmup == {"shapes": [{"height": 1024, "width": 1024, "steps": 28, "batch": 1}]}


def test_builtin_list_matches_the_tiny_models():
    from smash_build.tiny_models import TINY_MODELS, build_tiny

    assert set(BUILTIN_MODELS) == set(TINY_MODELS)
    import torch

    for name, components in BUILTIN_MODELS.items():
        pipe = build_tiny(name)
        modules = {k for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
        assert set(components) == modules, name


def test_defaults_of_a_minimal_manifest(tmp_path):
    path = tmp_path / "mini.toml"
    path.write_text('[model]\nsource = "builtin:tiny-sdxl"\n')
    m = load_manifest(path)
    assert m.model == ModelSpec("builtin:tiny-sdxl", None, "bfloat16", None)
    assert m.build == BuildSpec(fuse_qkv=False, quantize=None, streaming=None)
    assert m.runtime == RuntimeSpec(cacher=None, compiler=None, warmup={"shapes": []})
    assert m.output.dir == tmp_path / "dist" / "mini"
    assert (m.evaluate, m.publish_hub, m.publish_image) == (None, None, None)


def test_shorthands(tmp_path):
    m = _parse(TINY + '[build]\nquantize = "int8dq"\nstreaming = true\n'
               '[runtime]\ncacher = "fora"\ncompiler = "torch_compile"\n', tmp_path)
    assert m.build == BuildSpec(False, QuantizeSpec("int8dq", ()), True)
    assert m.runtime.cacher == {"name": "fora", "interval": 3, "start_step": 2}
    assert m.runtime.compiler["name"] == "torch_compile" and m.runtime.compiler["scope"] == "blocks"
    m = _parse(TINY + '[build]\nquantize = { method = "int4wo", exclude = "norm" }\nstreaming = "auto"\n'
               '[runtime]\ncacher = "none"\n', tmp_path)
    assert m.build == BuildSpec(False, QuantizeSpec("int4wo", ("norm",)), None)
    assert m.runtime.cacher is None
    m = _parse(TINY + '[build]\nquantize = "none"\n[runtime.compiler]\nname = "none"\n', tmp_path)
    assert m.build.quantize is None and m.runtime.compiler is None


def test_lora_entries_resolve_files_folders_and_hub_ids(tmp_path):
    (tmp_path / "loras" / "style").mkdir(parents=True)
    (tmp_path / "loras" / "a.safetensors").write_bytes(b"")
    (tmp_path / "loras" / "style" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "loras" / "style" / "other.safetensors").write_bytes(b"")
    m = _parse(TINY + '[build]\nfuse_qkv = true\nlora = [\n'
               '  { source = "loras/a.safetensors", scale = 0.8 },\n'
               '  { source = "loras/style" },\n'
               '  { source = "loras/style", weight_name = "other.safetensors", scale = -1 },\n'
               '  { source = "org/flux-lora@v1", weight_name = "sub/lora.safetensors" },\n'
               '  { source = "org/sdxl-lora", revision = "abc123" },\n]\n', tmp_path)
    assert m.build.lora == (
        LoraSpec("loras/a.safetensors", "a.safetensors", 0.8, None, tmp_path / "loras" / "a.safetensors"),
        LoraSpec("loras/style", "pytorch_lora_weights.safetensors", 1.0, None,
                 tmp_path / "loras" / "style" / "pytorch_lora_weights.safetensors"),
        LoraSpec("loras/style", "other.safetensors", -1.0, None, tmp_path / "loras" / "style" / "other.safetensors"),
        LoraSpec("org/flux-lora", "sub/lora.safetensors", 1.0, "v1"),
        LoraSpec("org/sdxl-lora", "pytorch_lora_weights.safetensors", 1.0, "abc123"),
    )
    assert [lora.kind for lora in m.build.lora] == ["local"] * 3 + ["hub"] * 2
    # A single table is a list of one.
    assert len(_parse(TINY + '[build.lora]\nsource = "org/x"\n', tmp_path).build.lora) == 1


def test_lora_problems_name_the_entry_and_the_file(tmp_path):
    (tmp_path / "style").mkdir()
    (tmp_path / "style" / "weights.safetensors").write_bytes(b"")
    (tmp_path / "lora.bin").write_bytes(b"")
    with pytest.raises(ManifestError) as info:
        _parse(TINY + '[build]\nlora = [{ source = "style" }, { source = "lora.bin" }, '
               '{ source = "style/weights.safetensors", weight_name = "x.safetensors", revision = "main" }]\n', tmp_path)
    text = str(info.value)
    assert "build.lora[0].weight_name = 'pytorch_lora_weights.safetensors': no such file in" in text
    assert "it holds weights.safetensors" in text
    assert "build.lora[1].source = 'lora.bin': must be a .safetensors file" in text
    assert "build.lora[2].weight_name = 'x.safetensors': applies to folder and Hub sources" in text
    assert "build.lora[2].revision = 'main': applies to Hub sources only" in text


def test_fp8_methods_are_recorded_not_refused(tmp_path):
    for method in ("fp8wo", "fp8dq"):
        assert _parse(TINY + f'[build]\nquantize = "{method}"\n', tmp_path).build.quantize.method == method


def test_valid_globs_are_accepted(tmp_path):
    globs = ["transformer_blocks.*.attn.to_out.0", "[!s]*", "*.ff.net.[02]", "proj_out", "norm_out.linear"]
    m = _parse(TINY + f"[build]\nquantize = {{ method = 'int8wo', exclude = {json.dumps(globs)} }}\n", tmp_path)
    assert m.build.quantize.exclude == tuple(globs)


def test_exclude_globs_expand_presets_and_match_module_names():
    q = QuantizeSpec("int8wo", ("norm", "embedding", "*proj_out*", "single_transformer_blocks.[01].*"))
    assert q.exclude_globs == ("*norm*", "*embed*", "*proj_out*", "single_transformer_blocks.[01].*")
    assert QuantizeSpec("int8wo", ("none",)).exclude_globs == ()
    assert QuantizeSpec("int8wo", ("norm+embedding", "norm")).exclude_globs == ("*norm*", "*embed*")
    assert q.excludes("transformer_blocks.0.norm1.linear")
    assert q.excludes("x_embedder") and q.excludes("time_text_embed.timestep_embedder.linear_1")
    assert q.excludes("single_transformer_blocks.1.attn.to_q")
    assert not q.excludes("single_transformer_blocks.2.attn.to_q")
    assert not q.excludes("transformer_blocks.0.attn.to_qkv")


def test_dataclasses_are_frozen():
    m = load_manifest(MANIFESTS / "tiny-flux.toml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.model.dtype = "float16"


def test_local_source_resolved_against_the_manifest_folder(tmp_path, monkeypatch):
    (tmp_path / "models" / "flux").mkdir(parents=True)
    shutil.copy(FLUX_INDEX, tmp_path / "models" / "flux" / "model_index.json")
    (tmp_path / "m.toml").write_text('[model]\nsource = "models/flux"\ncomponents = ["transformer", "vae"]\n'
                                     '[runtime.cacher]\nname = "fora"\n[output]\ndir = "out/a"\n')
    monkeypatch.chdir(ROOT)  # a different working directory: paths still follow the manifest
    m = load_manifest(tmp_path / "m.toml")
    assert m.model == ModelSpec(str(tmp_path / "models" / "flux"), None, "bfloat16", ("transformer", "vae"))
    assert m.model.kind == "local"
    assert m.output.dir == tmp_path / "out" / "a"
    # A folder beats a Hub id of the same shape ("models/flux" exists here).
    with pytest.raises(ManifestError, match=r"model\.components\[0\] = 'tokenizer'"):
        _parse('[model]\nsource = "models/flux"\ncomponents = ["tokenizer"]\n', tmp_path)


def test_hub_sources(tmp_path):
    m = _parse('[model]\nsource = "org/name"\n', tmp_path)
    assert (m.model.source, m.model.revision, m.model.kind) == ("org/name", "main", "hub")
    m = _parse('[model]\nsource = "org/name@v1.0"\ncomponents = ["transformer"]\n', tmp_path)
    assert (m.model.source, m.model.revision) == ("org/name", "v1.0")
    m = _parse('[model]\nsource = "org/name"\nrevision = "0123456789abcdef0123456789abcdef01234567"\n', tmp_path)
    assert m.model.revision == "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(ManifestError, match=r"model\.source = 'org--x/name'"):
        _parse('[model]\nsource = "org--x/name"\n', tmp_path)
    # The family of a Hub source is unknown offline: the builder checks the cacher after download.
    m = _parse('[model]\nsource = "org/name"\n[runtime]\ncacher = "deepcache"\n', tmp_path)
    assert m.runtime.cacher["name"] == "deepcache"


def test_runtime_dicts_round_trip_through_the_runtime_parsers(tmp_path):
    from smash_runtime.cachers import cacher_config_from_dict
    from smash_runtime.cachers import config_to_dict as cacher_to_dict
    from smash_runtime.compilers import compiler_config_from_dict, warmup_config_from_dict
    from smash_runtime.compilers import config_to_dict as compiler_to_dict

    m = load_manifest(MANIFESTS / "flux-dev.toml")
    assert cacher_to_dict(cacher_config_from_dict(m.runtime.cacher)) == m.runtime.cacher
    assert compiler_to_dict(compiler_config_from_dict(m.runtime.compiler)) == m.runtime.compiler
    assert compiler_to_dict(warmup_config_from_dict(m.runtime.warmup)) == m.runtime.warmup
    json.dumps(dataclasses.asdict(m.runtime))  # recorded into smash.json as-is


def test_evaluate_table_is_what_the_evaluation_reads(tmp_path):
    from smash_build.evaluate.settings import settings_from_dict

    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    (tmp_path / "weights").mkdir()
    (tmp_path / "m.toml").write_text(TINY + '[evaluate]\nprompts = "prompts.txt"\nnum_prompts = 2\nseeds = 3\n'
                                     'weights_dir = "weights"\nheight = 64\n')
    m = load_manifest(tmp_path / "m.toml")
    assert m.evaluate["prompts"] == str(tmp_path / "prompts.txt")
    assert m.evaluate["weights_dir"] == str(tmp_path / "weights")
    assert m.evaluate["seeds"] == [3]
    assert settings_from_dict(m.evaluate, base_dir=tmp_path).record() == m.evaluate
    m = _parse(TINY + '[evaluate]\nprompts = "hf://datasets/org/prompts"\n', tmp_path)
    assert m.evaluate["prompts"] == "hf://datasets/org/prompts"


def test_publish_tables_are_normalized(tmp_path):
    m = _parse(TINY + '[runtime.compiler]\nname = "torch_compile"\n'
               '[publish.hub]\nrepo = "org/name"\n'
               '[publish.image]\ntag = "localhost:5000/org/name:v1"\nbase = "python:3.12-slim"\n'
               'include_compile_cache = true\n', tmp_path)
    assert m.publish_hub == {"repo": "org/name", "private": False, "revision": "main", "commit_message": None}
    assert m.publish_image == {"tag": "localhost:5000/org/name:v1", "base": "python:3.12-slim", "push": False,
                               "include_compile_cache": True}


# --------------------------------------------------------------------------- overrides


def test_overrides_are_validated_like_the_file():
    path = MANIFESTS / "tiny-flux.toml"
    m = load_manifest(path, {"runtime.cacher.interval": 3, "output.dir": Path("/tmp/smash-out")})
    assert m.runtime.cacher["interval"] == 3 and m.output.dir == Path("/tmp/smash-out")
    assert m.raw["runtime"]["cacher"]["interval"] == 3
    assert load_manifest(path).runtime.cacher["interval"] == 2  # the file itself is untouched
    with pytest.raises(ManifestError, match=r"runtime\.cacher\.interval = 0"):
        load_manifest(path, {"runtime.cacher.interval": 0})
    with pytest.raises(ManifestError, match=r"runtime\.cacher\.intervall"):
        load_manifest(path, {"runtime.cacher.intervall": 3})
    assert load_manifest(path, {"runtime.cacher": None}).runtime.cacher is None
    m = load_manifest(path, {"publish.hub.repo": "org/name"})
    assert m.publish_hub["repo"] == "org/name"
    with pytest.raises(ManifestError, match=r"model\.source = 'builtin:tiny-flux': is not a table"):
        load_manifest(path, {"model.source.x": 1})


def test_override_widens_a_shorthand(tmp_path):
    m = _parse(TINY + '[runtime]\ncacher = "fora"\n', tmp_path, overrides={"runtime.cacher.interval": 4})
    assert m.runtime.cacher == {"name": "fora", "interval": 4, "start_step": 2}


def test_parse_override():
    assert parse_override("runtime.cacher.interval=3") == ("runtime.cacher.interval", 3)
    assert parse_override("runtime.cacher.name=fora") == ("runtime.cacher.name", "fora")
    assert parse_override('output.dir="a b"') == ("output.dir", "a b")
    assert parse_override("build.fuse_qkv=false") == ("build.fuse_qkv", False)
    with pytest.raises(SettingsError, match="KEY=VALUE"):
        parse_override("runtime.cacher.interval")


# --------------------------------------------------------------------------- JSON Schema


@pytest.fixture(scope="module")
def validator():
    schema = manifest_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "(?P<" not in json.dumps(schema)  # patterns must be ECMA-262 for editors
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sdxl", "flux-dev"])
def test_schema_accepts_the_examples(validator, name):
    validator.validate(tomllib.loads((MANIFESTS / f"{name}.toml").read_text()))


def test_schema_knows_lora_entries(validator):
    good = tomllib.loads(TINY + '[build]\nlora = [{ source = "org/x", weight_name = "a.safetensors", scale = 0.5 }]\n')
    validator.validate(good)
    for bad in ('lora = [{ scale = 0.5 }]', 'lora = [{ source = "org/x", weight_name = "a.bin" }]',
                'lora = [{ source = "org/x", strength = 1 }]', 'lora = "org/x"'):
        assert list(validator.iter_errors(tomllib.loads(TINY + "[build]\n" + bad + "\n"))), bad


@pytest.mark.parametrize("case", [
    "unknown_model_key", "unknown_build_key", "unknown_section", "unknown_cacher_param", "unknown_compiler_param",
    "wrong_type_fuse_qkv", "bad_quantize_method", "bad_dtype_alias", "missing_source", "missing_model_table",
    "bad_warmup_height", "warmup_missing_steps", "bad_cacher_name", "bad_compiler_mode", "publish_image_bad_tag",
    "publish_hub_missing_repo", "evaluate_bad_metric", "empty_components", "manifest_version_too_new",
])
def test_schema_rejects_structural_mistakes(validator, case):
    document = tomllib.loads((CORPUS_DIR / f"{case}.toml").read_text())
    assert list(validator.iter_errors(document)), case


# --------------------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "smash_build.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_build_of_a_bad_manifest_exits_2_and_writes_nothing(tmp_path):
    text = (CORPUS_DIR / "many_problems.toml").read_text() + '\n[output]\ndir = "art"\n'
    (tmp_path / "bad.toml").write_text(text)
    result = _cli("bad.toml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    for fragment in _expectations(CORPUS_DIR / "many_problems.toml"):
        assert fragment in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_cli_validate_and_schema(tmp_path):
    result = _cli("validate", str(MANIFESTS / "tiny-flux.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    result = _cli("schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == manifest_json_schema()
    assert list(tmp_path.iterdir()) == []
