"""The typed settings: one model per table, its JSON Schema, torch-free commands, bounded input.

The manifest, smash.json and the runtime share ``smash_runtime.settings``; these tests pin what
that buys: the generated schema agrees with the validator, validating imports no torch, huge or
deeply nested input gets a short one-line error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest

from smash_build.manifest import MAX_NESTING, ManifestError, load_manifest, manifest_json_schema, parse_manifest
from smash_runtime import settings as S
from smash_runtime.errors import SettingsError, shown

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = Path(__file__).resolve().parent / "bad_manifests"
TINY = '[model]\nsource = "builtin:tiny-flux"\ndtype = "float32"\n'

# Corpus cases whose rule needs the disk, another table or the source's components: a schema
# cannot say them, so the schema accepts these documents and only the validator refuses them.
BEYOND_A_SCHEMA = {
    "bad_component_name": "the source's components",
    "bad_exclude_preset_typo": "a typo that is a valid glob",
    "bad_glob_characters": "glob syntax",
    "bad_glob_stray_bracket": "glob syntax",
    "bad_glob_unbalanced": "glob syntax",
    "bad_repo_id": "repo id shape beyond a pattern",
    "bad_repo_id_url": "repo id shape beyond a pattern",
    "bad_revision": "git ref rules",
    "builtin_without_prefix": "builtin names",
    "cacher_with_model_compile": "cacher x compiler",
    "deepcache_on_flux": "cacher x family",
    "deepcache_on_local_flux": "cacher x family (from the disk)",
    "evaluate_missing_prompt_file": "the disk",
    "evaluate_missing_weights_dir": "the disk",
    "evaluate_too_many_builtin_prompts": "the built-in prompt count",
    "exclude_none_combined": "list contents",
    "fora_on_sdxl": "cacher x family",
    "local_bad_component": "the disk",
    "local_source_broken_index": "the disk",
    "local_source_is_file": "the disk",
    "local_source_not_a_pipeline": "the disk",
    "nonexistent_local_source": "the disk",
    "output_dir_is_file": "the disk",
    "publish_image_cache_without_compiler": "publish.image x runtime.compiler",
    "revision_on_builtin": "model.source x model.revision",
    "revision_twice": "model.source x model.revision",
    "unknown_builtin": "builtin names",
    "empty_source": "non-blank strings",
    "lora_hub_revision_twice": "source@revision x revision, URLs",
    "lora_with_streaming": "build.lora x build.streaming",
}


@pytest.fixture(scope="module")
def validator():
    schema = manifest_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _corpus():
    for path in sorted(CORPUS_DIR.glob("*.toml")):
        try:
            yield path.stem, tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError:
            continue  # syntax errors never reach either


@pytest.mark.parametrize("name, document", list(_corpus()), ids=lambda v: v if isinstance(v, str) else "")
def test_schema_and_validator_agree_on_the_bad_corpus(validator, name, document):
    with pytest.raises(ManifestError):
        load_manifest(CORPUS_DIR / f"{name}.toml")
    errors = list(validator.iter_errors(document))
    if name in BEYOND_A_SCHEMA:
        return  # the validator refuses it; whether the schema can is not a promise
    assert errors, f"{name}: the validator refuses it, the schema accepts it"


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sdxl", "flux-dev"])
def test_schema_and_validator_agree_on_the_examples(validator, name):
    path = ROOT / "manifests" / f"{name}.toml"
    load_manifest(path)
    validator.validate(tomllib.loads(path.read_text()))


def test_schema_runtime_tables_come_from_the_models():
    schema = manifest_json_schema()
    defs = schema["$defs"]
    assert schema["properties"]["runtime"]["$ref"] == "#/$defs/RuntimeTable"
    runtime = defs["RuntimeTable"]["properties"]
    assert defs["ForaConfig"]["properties"]["interval"]["maximum"] == 6
    assert defs["WarmupShape"]["properties"]["height"]["maximum"] == S.MAX_SIDE
    assert defs["WarmupShape"]["properties"]["batch"]["maximum"] == S.MAX_BATCH
    assert runtime["cacher"]["anyOf"][0]["enum"] == [*S.CACHER_SETTINGS, "none"]
    assert {r["$ref"].split("/")[-1] for r in runtime["cacher"]["anyOf"][1]["oneOf"]} == {
        cls.__name__ for cls in S.CACHER_SETTINGS.values()}


@pytest.mark.parametrize("table, ok", [
    ({"name": "fora", "interval": 2}, True),
    ({"name": "fora", "interval": 7}, False),
    ({"name": "fora", "interval": True}, False),
    ({"name": "pab", "timestep_range": [100, 800]}, True),
    ({"name": "taylorseer", "stop_step": 10, "lite": True}, True),
    ({"name": "magcache", "mag_ratios": "flux"}, True),
    ({"name": "first_block", "threshold": 2}, False),
    ({"name": "deepcache", "brnch": 1}, False),
])
def test_cacher_schema_and_model_agree(validator, table, ok):
    document = tomllib.loads(TINY) | {"runtime": {"cacher": table}}
    schema_ok = not list(validator.iter_errors(document))
    try:
        S.cacher_from_dict(table)
        model_ok = True
    except SettingsError:
        model_ok = False
    assert schema_ok == model_ok == ok


def test_warmup_bounds_are_enforced_and_named():
    big = {"shapes": [{"height": 1048576, "width": 64, "steps": 1000000, "batch": 100000}]}
    with pytest.raises(SettingsError) as info:
        S.warmup_from_dict(big)
    assert [e.key for e in info.value.errors] == ["shapes[0].height", "shapes[0].steps", "shapes[0].batch"]
    assert f"from 1 to {S.MAX_STEPS}" in str(info.value.errors[1])
    edge = {"height": S.MAX_SIDE, "width": S.MAX_SIDE, "steps": S.MAX_STEPS, "batch": S.MAX_BATCH}
    assert S.warmup_from_dict({"shapes": [edge]}).shapes[0].batch == S.MAX_BATCH
    with pytest.raises(ManifestError, match=r"runtime\.warmup\.shapes\[0\]\.batch = 100000"):
        parse_manifest(TINY + "[runtime.warmup]\nshapes = [{height = 64, width = 64, steps = 4, batch = 100000}]\n",
                       ROOT)


def test_every_problem_of_a_table_is_listed():
    with pytest.raises(ManifestError) as info:
        parse_manifest(TINY + '[runtime.cacher]\nname = "fora"\ninterval = 0\nstart_step = -1\n', ROOT)
    assert [k for k, _ in info.value.problems] == ["runtime.cacher.interval", "runtime.cacher.start_step"]


def test_schedules_are_shared():
    fora, deepcache = S.ForaConfig(interval=3, start_step=2), S.DeepCacheConfig(interval=3, start_step=2)
    assert [fora.computes_at(i) for i in range(8)] == [deepcache.computes_at(i) for i in range(8)] == [
        True, True, True, False, False, True, False, False]


def test_class_facts():
    assert S.family_cachers("unet") == ("deepcache",)
    assert S.StableFastConfig.devices == ("cuda",)
    assert S.TaylorSeerConfig().hooks_attention() and not S.TaylorSeerConfig(lite=True).hooks_attention()


# --------------------------------------------------------------------------- bounded input


def test_huge_values_are_cut_short_quickly():
    huge = "x" * 2_000_000
    start = time.perf_counter()
    with pytest.raises(ManifestError) as info:
        parse_manifest(TINY + f'[runtime.cacher]\nname = "fora"\ninterval = "{huge}"\n'
                       f'[output]\ndir = "{huge}"\n[publish.hub]\nrepo = "{huge}"\n', ROOT)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert len(message) < 2000, message[:3000]
    assert "2000000 characters" in message
    assert elapsed < 30  # a hang guard only (it takes milliseconds); speed is not asserted here
    assert shown("y" * 500).startswith("'yyyy") and len(shown("y" * 500)) < 120
    assert len(shown([list(range(100000))])) < 120


@pytest.mark.parametrize("text", [
    TINY + "[runtime.warmup]\nshapes = " + "[" * 20000 + "]" * 20000 + "\n",
    TINY + "[evaluate]\nseeds = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n",
    TINY + "[" + ".".join(["a"] * 20000) + "]\n",
])
def test_deep_nesting_is_refused_before_parsing(text):
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, ROOT)
    ((key, message),) = info.value.problems
    assert key == "" and str(MAX_NESTING) in message


def test_brackets_inside_strings_do_not_count():
    m = parse_manifest(TINY + '[output]\ndir = "' + "[" * 100 + '"\n', ROOT)
    assert m.output.dir.name == "[" * 100


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``smash-build ARGS`` in a fresh interpreter, which reports the heavy modules it imported."""
    code = ("import sys, runpy\nsys.argv = ['smash-build', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('smash_build.cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    code = e.code\nelse:\n    code = 0\n"
            "print('MODULES', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules),"
            " file=sys.stderr)\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("args", [("--help",), ("validate", "MANIFEST"), ("schema",), ("validate", "DEEP")])
def test_cli_commands_that_never_import_torch(tmp_path, args):
    deep = tmp_path / "deep.toml"
    deep.write_text(TINY + "[runtime.warmup]\nshapes = " + "[" * 20000 + "]" * 20000 + "\n")
    refused = "DEEP" in args
    args = [{"MANIFEST": str(ROOT / "manifests" / "tiny-flux.toml"), "DEEP": str(deep)}.get(a, a) for a in args]
    result = _cli(*args, cwd=tmp_path)
    assert "MODULES []" in result.stderr, result.stderr[-3000:]
    if refused:
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and "nests" in result.stderr
    else:
        assert result.returncode == 0, result.stderr[-3000:]


def test_server_limits_cannot_exceed_the_shared_ceilings():
    """The server never accepts what the manifest's warm-up bounds would refuse."""
    from smash_runtime.errors import SettingsError
    from smash_runtime.server.settings import ServerSettings
    from smash_runtime.settings import MAX_BATCH, MAX_SIDE, MAX_STEPS

    assert ServerSettings(max_size=MAX_SIDE, max_steps=MAX_STEPS, max_n=MAX_BATCH).max_size == MAX_SIDE
    for name, ceiling in (("max_size", MAX_SIDE), ("max_steps", MAX_STEPS), ("max_n", MAX_BATCH)):
        with pytest.raises(SettingsError, match=name):
            ServerSettings(**{name: ceiling + 1})
