"""Compilers, warm-up and the compile cache (issue 4), on tiny FLUX pipelines on the CPU.

A cold inductor compile of the tiny FLUX blocks takes ~30-60 s on the 2-core CI machine, so
one module fixture compiles once (scope="blocks", filling a compile cache) and the tests reuse
it: eager tolerance, a second process hitting that cache, FORA without recompiles.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from smash_build.tiny_models import build_tiny, tiny_flux_transformer_config
from smash_runtime.compilers import (
    CompileCache,
    StableFastConfig,
    TorchCompileConfig,
    WarmupShape,
    apply_compiler,
    compiler_config_from_dict,
    config_to_dict,
    repeated_blocks,
    warm_up,
    warmup_config_from_dict,
)
from smash_runtime.compilers.aoti import global_state
from smash_runtime.compilers.precompiled import (
    PrecompiledForward,
    PrecompiledStore,
    block_layout,
    hooked_submodules,
)
from smash_runtime.errors import SettingsError, UnsupportedOnDevice
from smash_runtime.timing import PhaseTimer

ARTIFACT = "0" * 64  # stands in for the sha256 of an artifact's smash.json
BLOCKS = TorchCompileConfig(scope="blocks")
WARMUP = warmup_config_from_dict({"shapes": [{"height": 64, "width": 64, "steps": 4}]})
# Tolerance of inductor's fused float32 kernels against eager on the same weights.
ATOL = 1e-4


def generate(pipe, seed: int = 0, steps: int = 4, prompt: str = "a red cube") -> torch.Tensor:
    # Under inference mode, as smash_runtime.images.generate and warm_up run the pipeline.
    with torch.inference_mode():
        return pipe(
            prompt, num_inference_steps=steps, height=64, width=64, output_type="pt",
            generator=torch.Generator().manual_seed(seed),
        ).images


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A tiny FLUX pipeline compiled in scope="blocks" and warmed up, with its compile cache."""
    tmp = tmp_path_factory.mktemp("compile")
    with pytest.MonkeyPatch.context() as mp:
        # Whatever activate() sets is put back when the module is done.
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp / "outside-inductor"))
        mp.setenv("TRITON_CACHE_DIR", str(tmp / "outside-triton"))
        torch._dynamo.reset()
        pipe = build_tiny("tiny-flux")
        pipe.set_progress_bar_config(disable=True)
        eager = {seed: generate(pipe, seed) for seed in (0, 1)}
        cache = CompileCache(tmp / "cache", artifact_hash=ARTIFACT)
        apply_compiler(pipe, BLOCKS, cache=cache)
        state = cache.state
        graphs = unique_graphs()
        timings = warm_up(pipe, WARMUP, progress=False)
        yield SimpleNamespace(
            pipe=pipe, eager=eager, cache=cache, state=state, report=cache.report(),
            graphs=unique_graphs() - graphs, timings=timings, root=tmp / "cache",
        )
        cache.deactivate()
        torch._dynamo.reset()


# -- torch.compile ----------------------------------------------------------------------------


def test_blocks_scope_matches_eager_and_compiles_each_block_class_once(compiled):
    pipe = compiled.pipe
    blocks = repeated_blocks(pipe.transformer)
    assert {type(b).__name__ for b in blocks} == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    # The blocks' own forward is the precompiled dispatcher (hooks added later wrap it from outside).
    assert all(isinstance(b.__dict__["forward"], PrecompiledForward) for b in blocks)
    assert "forward" not in pipe.transformer.__dict__
    # One variant per block class (+1: FLUX's first single block sees differently strided input),
    # not one per block: the 4 blocks share compiled code. AOTInductor packages: dynamo traced nothing.
    assert 2 <= compiled.report["precompiled_compiled"] <= 3 and compiled.graphs == 0
    for seed, expected in compiled.eager.items():
        torch.testing.assert_close(generate(pipe, seed), expected, atol=ATOL, rtol=0)
    after = compiled.cache.report()
    assert after["precompiled_compiled"] == compiled.report["precompiled_compiled"], "same shape must not recompile"
    assert unique_graphs() == 0 and after["precompiled_fallback"] == 0


@pytest.mark.slow
def test_model_scope_matches_eager(tmp_path, monkeypatch):
    # A smaller denoiser: the whole model is one graph, whose C++ kernels take ~60 s to build here.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    pipe = build_tiny("tiny-flux", transformer_config=tiny_flux_transformer_config(num_layers=1, num_single_layers=1))
    pipe.set_progress_bar_config(disable=True)
    expected = generate(pipe, steps=2)
    apply_compiler(pipe, compiler_config_from_dict({"name": "torch_compile", "scope": "model"}))
    assert hasattr(pipe.transformer.__dict__["forward"], "_torchdynamo_orig_callable")
    torch.testing.assert_close(generate(pipe, steps=2), expected, atol=ATOL, rtol=0)


def test_compiling_twice_is_a_no_op_with_the_same_settings(compiled):
    blocks = repeated_blocks(compiled.pipe.transformer)
    forwards = [b.forward for b in blocks]
    apply_compiler(compiled.pipe, BLOCKS)
    assert [b.forward for b in blocks] == forwards
    with pytest.raises(Exception, match="already compiled"):
        apply_compiler(compiled.pipe, TorchCompileConfig(scope="blocks", mode="max-autotune"))


# -- FORA composes with compiled blocks ------------------------------------------------------


def test_fora_after_compile_adds_no_graphs_and_no_recompiles(compiled):
    cachers = pytest.importorskip("smash_runtime.cachers")
    fora = cachers.cacher_config_from_dict({"name": "fora", "interval": 2, "start_step": 1})

    eager = build_tiny("tiny-flux")
    eager.set_progress_bar_config(disable=True)
    cachers.apply_cacher(eager, fora)
    expected = generate(eager, seed=3, steps=6)

    # The loader's order on a fresh pipeline: compile -> cacher -> warm-up -> requests.
    torch._dynamo.reset()  # forget compiled code; the warm compile cache makes this quick
    pipe = build_tiny("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    apply_compiler(pipe, BLOCKS, cache=compiled.cache)
    cachers.apply_cacher(pipe, fora)
    start = unique_graphs()
    warm_up(pipe, WARMUP, progress=False)
    # The hooks stay outside the compiled blocks: the precompiled blocks serve, nothing is traced.
    assert unique_graphs() - start == 0
    assert compiled.cache.report()["precompiled_compiled"] == 0

    after_warmup = unique_graphs()
    out = generate(pipe, seed=3, steps=6)  # other seed, prompt length and step count than warm-up
    generate(pipe, seed=4, steps=4, prompt="two blue spheres")
    assert unique_graphs() - after_warmup == 0
    per_step = cachers.cacher_stats(pipe).per_step()
    assert 0 in per_step, f"FORA skipped no step: {per_step}"
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


# -- compile cache -----------------------------------------------------------------------------

SECOND_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    from smash_build.tiny_models import build_tiny
    torch.set_num_threads(int(sys.argv[4]))  # inductor's CPU code depends on the thread count
    from smash_runtime.compilers import CompileCache, TorchCompileConfig, apply_compiler, warm_up, warmup_config_from_dict
    pipe = build_tiny("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    cache = CompileCache(sys.argv[1], artifact_hash=sys.argv[2])
    apply_compiler(pipe, TorchCompileConfig(scope="blocks"), cache=cache)
    warm_up(pipe, warmup_config_from_dict(json.loads(sys.argv[3])), progress=False)
    with torch.inference_mode():
        image = pipe("a red cube", num_inference_steps=4, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    torch.save(image, sys.argv[5])
    from torch._dynamo.utils import counters
    print(json.dumps({**cache.report(), "stats": dict(counters["stats"])}))
    """
)


def test_second_process_runs_the_precompiled_blocks_without_compiling(compiled, tmp_path):
    assert compiled.state == "cold"
    assert not compiled.report["hit"] and compiled.report["precompiled_loaded"] == 0
    # One variant per block class and input layout (the first single block's input is strided
    # differently), each an AOTInductor package in the keyed folder.
    packages = list(compiled.root.rglob("precompiled/*/*/*.pt2"))
    assert compiled.report["precompiled_compiled"] == compiled.report["precompiled_saved"] == len(packages) > 0
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS, str(compiled.root), ARTIFACT, json.dumps(config_to_dict(WARMUP)),
         str(torch.get_num_threads()), str(tmp_path / "warm.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["state"] == "warm"
    assert report["folder"] == compiled.report["folder"]
    assert report["hit"] and report["precompiled_loaded"] == len(packages)
    # Nothing compiled, traced or even looked up: the stored code ran as it was.
    assert report["precompiled_compiled"] == report["precompiled_fallback"] == 0
    assert report["stats"].get("unique_graphs", 0) == 0 and report["stats"].get("calls_captured", 0) == 0
    assert report["fxgraph_cache_miss"] == report["fxgraph_cache_hit"] == report["autograd_cache_miss"] == 0
    # The same image, bit for bit, as the process that compiled it.
    assert torch.equal(torch.load(tmp_path / "warm.pt"), generate(compiled.pipe, 0))


def test_damaged_precompiled_variant_is_ignored_with_a_log_line(compiled, tmp_path, caplog):
    (variant,) = list(compiled.root.rglob("precompiled/FluxTransformerBlock/*/*.pt2"))
    store = PrecompiledStore(tmp_path / "precompiled", BLOCKS)
    copy = store.folder / variant.relative_to(variant.parents[2])
    copy.parent.mkdir(parents=True)
    copy.write_bytes(variant.read_bytes()[: variant.stat().st_size // 2])  # truncated on a volume
    pipe = build_tiny("tiny-flux")
    with caplog.at_level(logging.INFO, logger="smash_runtime.compilers.precompiled"):
        store.wrap(pipe.transformer.transformer_blocks[0])
    assert store.stats["ignored"] == 1 and store.stats["loaded"] == 0
    assert any("ignoring precompiled" in r.message and copy.name in r.message for r in caplog.records), caplog.text


def test_changed_package_is_refused_before_its_library_is_opened(compiled, tmp_path, caplog):
    # Same size, one byte flipped inside the package: only its sha256 (in its name) tells.
    (package,) = list(compiled.root.rglob("precompiled/FluxTransformerBlock/*/*.pt2"))
    store = PrecompiledStore(tmp_path / "precompiled", BLOCKS)
    copy = store.folder / package.relative_to(package.parents[2])
    copy.parent.mkdir(parents=True)
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="smash_runtime.compilers.precompiled"):
        store.wrap(build_tiny("tiny-flux").transformer.transformer_blocks[0])
    assert store.stats["ignored"] == 1 and store.stats["loaded"] == 0
    assert any("ignoring precompiled" in r.message and "was changed or damaged" in r.message
               for r in caplog.records), caplog.text


def test_cuda_graph_mode_keeps_dynamo_variants_and_a_new_process_loads_them(tmp_path, monkeypatch):
    # AOTInductor packages cannot hold CUDA graphs: mode="reduce-overhead" keeps dynamo's
    # aot_compile variants (.bin), which a later store loads and runs without tracing.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    config = tiny_flux_transformer_config(num_layers=1, num_single_layers=1)
    cfg = TorchCompileConfig(scope="blocks", mode="reduce-overhead")
    pipes = [build_tiny("tiny-flux", transformer_config=config) for _ in range(2)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    expected = generate(pipes[0], steps=2)
    stores = [PrecompiledStore(tmp_path / "precompiled", cfg) for _ in pipes]
    images = []
    for pipe, store in zip(pipes, stores):
        for block in repeated_blocks(pipe.transformer):
            store.wrap(block)
        images.append(generate(pipe, steps=2))
    assert stores[0].stats["compiled"] == stores[0].stats["saved"] > 0 and stores[0].stats["fallback"] == 0
    assert list((tmp_path / "precompiled").rglob("*.pt2")) == []
    assert len(list((tmp_path / "precompiled").rglob("*.bin"))) == stores[0].stats["saved"]
    assert stores[1].stats["loaded"] == stores[0].stats["saved"] and stores[1].stats["compiled"] == 0
    torch.testing.assert_close(images[0], expected, atol=ATOL, rtol=0)
    assert torch.equal(images[1], images[0])


def test_package_layout_and_state_cover_what_a_package_bakes_in():
    # A package has no guards: a plain attribute (heads) and the thread state (grad, autocast)
    # it was made under must reach the block layout and the package's name.
    first, second = build_tiny("tiny-flux").transformer.transformer_blocks
    assert block_layout(first) == block_layout(second)
    second.attn.heads = 4  # same weight shapes, other code
    assert block_layout(first) != block_layout(second)
    with torch.inference_mode():
        inference = global_state()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = global_state()
    assert len({inference, autocast, global_state()}) == 3


def test_blocks_with_hooks_inside_are_not_precompiled():
    # An attention cache inside a block would be traced in with its state; its guards cannot be stored.
    block = build_tiny("tiny-flux").transformer.transformer_blocks[0]
    assert hooked_submodules(block) == []
    block.attn.register_forward_hook(lambda *a: None)
    assert hooked_submodules(block) == ["attn"]


def test_cache_key_separates_what_invalidates_compiled_code(tmp_path):
    cache = CompileCache(tmp_path, artifact_hash=ARTIFACT)
    key = cache.key(config_to_dict(BLOCKS), "cpu")
    assert key["torch"] == torch.__version__ and key["device"]["type"] == "cpu" and key["artifact"] == ARTIFACT
    assert key["device"]["isa"] == torch.backends.cpu.get_cpu_capability()
    other_settings = cache.key(config_to_dict(TorchCompileConfig(mode="max-autotune")), "cpu")
    other_artifact = CompileCache(tmp_path, artifact_hash="1" * 64).key(config_to_dict(BLOCKS), "cpu")
    digests = {CompileCache.digest(k) for k in (key, other_settings, other_artifact)}
    assert len(digests) == 3
    assert CompileCache.digest(dict(reversed(list(key.items())))) == CompileCache.digest(key)


def _entry(cache: CompileCache, key: dict, recorded) -> None:
    folder = cache.folder_for(key)
    (folder / "inductor").mkdir(parents=True)
    (folder / "inductor" / "entry").write_text("compiled code from elsewhere")
    (folder / "key.json").write_text(recorded if isinstance(recorded, str) else json.dumps(recorded))


@pytest.mark.parametrize("kind", ["foreign", "damaged"])
def test_foreign_or_damaged_entry_is_ignored_with_a_log_line(tmp_path, monkeypatch, caplog, kind):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    cache = CompileCache(tmp_path / "root", artifact_hash=ARTIFACT)
    key = cache.key(config_to_dict(BLOCKS), "cpu")
    # Same folder name, other contents: copied from another machine, or truncated on a volume.
    recorded = {**key, "torch": "2.0.0", "device": {"type": "cuda", "name": "NVIDIA H100"}} if kind == "foreign" else "{trunc"
    _entry(cache, key, recorded)
    with caplog.at_level(logging.INFO, logger="smash_runtime.compilers.compile_cache"):
        state = cache.activate(config_to_dict(BLOCKS), "cpu")
    assert state == "cold"
    assert cache.folder == cache.folder_for(key)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.folder / "inductor")
    assert json.loads((cache.folder / "key.json").read_text()) == key
    assert not (cache.folder / "inductor" / "entry").exists()
    message = "torch='2.0.0' (here: " if kind == "foreign" else "unreadable key.json"
    assert any("ignoring compile cache" in r.message and message in r.message for r in caplog.records), caplog.text
    # The other entry is moved aside, not deleted: it may be someone's volume.
    (aside,) = [p for p in cache.root.iterdir() if ".ignored-" in p.name]
    assert (aside / "inductor" / "entry").read_text() == "compiled code from elsewhere"
    cache.deactivate()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "before")
    # The next process finds a clean entry under its key (cold here: nothing was compiled).
    again = CompileCache(tmp_path / "root", artifact_hash=ARTIFACT)
    assert again.activate(config_to_dict(BLOCKS), "cpu") == "cold" and again.folder == cache.folder
    again.deactivate()
    assert len([p for p in cache.root.iterdir() if ".ignored-" in p.name]) == 1


def test_entries_for_other_keys_are_logged_and_left_alone(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    cache = CompileCache(tmp_path / "root", artifact_hash=ARTIFACT)
    stale = {**cache.key(config_to_dict(BLOCKS), "cpu"), "torch": "2.11.0+cu130"}
    _entry(cache, stale, stale)
    with caplog.at_level(logging.INFO, logger="smash_runtime.compilers.compile_cache"):
        assert cache.activate(config_to_dict(BLOCKS), "cpu") == "cold"
    assert any("torch='2.11.0+cu130'" in r.message for r in caplog.records), caplog.text
    assert cache.folder == cache.folder_for(cache.key(config_to_dict(BLOCKS), "cpu"))
    cache.deactivate()


def test_read_only_root_is_used_through_a_copy(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    cache = CompileCache(tmp_path / "baked", artifact_hash=ARTIFACT)
    key = cache.key(config_to_dict(BLOCKS), "cpu")
    _entry(cache, key, key)
    for path in [cache.folder_for(key), *cache.folder_for(key).rglob("*"), cache.root]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        assert cache.activate(config_to_dict(BLOCKS), "cpu") == "warm"
        assert cache.folder != cache.folder_for(key)
        assert (cache.folder / "inductor" / "entry").read_text() == "compiled code from elsewhere"
    finally:
        for path in [cache.root, cache.folder_for(key), *cache.folder_for(key).rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
        cache.deactivate()


# -- stable-fast -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl():
    return build_tiny("tiny-sdxl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_stable_fast_without_package_or_cuda_says_how_to_install(tiny_sdxl):
    if __import__("importlib").util.find_spec("sfast") is not None:
        pytest.skip("stable-fast is installed here")
    cfg = compiler_config_from_dict({"name": "stable_fast"})
    with pytest.raises(UnsupportedOnDevice) as info:
        apply_compiler(tiny_sdxl, cfg)
    message = str(info.value)
    assert "pip install stable-fast" in message
    assert "not installed" in message and "needs a CUDA device" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_stable_fast_installed_but_no_cuda_names_the_device(tiny_sdxl, tmp_path, monkeypatch):
    # An importable `sfast` (empty stand-in for the real wheel, which needs CUDA to install).
    (tmp_path / "sfast").mkdir()
    (tmp_path / "sfast" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnsupportedOnDevice, match="needs a CUDA device and the pipeline is on 'cpu'") as info:
        apply_compiler(tiny_sdxl, StableFastConfig())
    assert "not installed" not in str(info.value)
    assert "forward" not in tiny_sdxl.unet.__dict__


def test_stable_fast_import_is_lazy():
    code = "import sys, smash_runtime.compilers; assert 'sfast' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# -- settings ----------------------------------------------------------------------------------


def test_configs_round_trip_through_json():
    for d in (
        {"name": "torch_compile"},
        {"name": "torch_compile", "mode": "max-autotune-no-cudagraphs", "fullgraph": True, "dynamic": False, "scope": "model"},
        {"name": "stable_fast", "cuda_graph": True},
    ):
        cfg = compiler_config_from_dict(d)
        recorded = json.loads(json.dumps(config_to_dict(cfg)))
        assert compiler_config_from_dict(recorded) == cfg
        assert {k: v for k, v in recorded.items() if k in d} == d
    assert config_to_dict(compiler_config_from_dict({"name": "torch_compile"})) == {
        "name": "torch_compile", "mode": "default", "fullgraph": False, "dynamic": None, "scope": "blocks",
    }
    assert config_to_dict(WARMUP) == {"shapes": [{"height": 64, "width": 64, "steps": 4, "batch": 1}]}
    assert warmup_config_from_dict(config_to_dict(WARMUP)) == WARMUP
    assert warmup_config_from_dict({}).shapes == ()


@pytest.mark.parametrize(
    "table, key, hint",
    [
        ({"mode": "default"}, "name", None),
        ({"name": "torch_compil"}, "name", "did you mean 'torch_compile'?"),
        ({"name": "inductor"}, "name", None),
        ({"name": "torch_compile", "mode": "max_autotune"}, "mode", "did you mean 'max-autotune'?"),
        ({"name": "torch_compile", "scope": "block"}, "scope", "did you mean 'blocks'?"),
        ({"name": "torch_compile", "fullgraph": "yes"}, "fullgraph", None),
        ({"name": "torch_compile", "dynamic": 1}, "dynamic", None),
        ({"name": "torch_compile", "scoep": "blocks"}, "scoep", "did you mean 'scope'?"),
        ({"name": "stable_fast", "mode": "default"}, "mode", None),
        ({"name": "stable_fast", "cuda_graph": "true"}, "cuda_graph", None),
    ],
)
def test_bad_compiler_settings_name_the_key(table, key, hint):
    with pytest.raises(SettingsError) as info:
        compiler_config_from_dict(table)
    assert info.value.key == key and info.value.hint == hint
    assert info.value.allowed


@pytest.mark.parametrize(
    "table, key",
    [
        ({"shapes": [{"height": 1000, "width": 1024, "steps": 28}]}, "shapes[0].height"),
        ({"shapes": [{"height": 1024, "width": 1024, "steps": 0}]}, "shapes[0].steps"),
        ({"shapes": [{"height": 64, "width": 64, "steps": 2}, {"height": 64, "width": 64.0, "steps": 2}]},
         "shapes[1].width"),
        ({"shapes": [{"height": 64, "width": 64, "steps": 2, "batch": True}]}, "shapes[0].batch"),
        ({"shapes": [{"height": 64, "width": 64}]}, "shapes[0].steps"),
        ({"shapes": [{"height": 64, "width": 64, "steps": 2, "bach": 2}]}, "shapes[0].bach"),
        ({"shapes": {"height": 64}}, "shapes"),
        ({"shapes": [[64, 64, 2]]}, "shapes[0]"),
        ({"shape": []}, "shape"),
    ],
)
def test_bad_warmup_settings_name_the_key(table, key):
    with pytest.raises(SettingsError) as info:
        warmup_config_from_dict(table)
    assert info.value.key == key


def test_warmup_shape_hint_rounds_to_a_multiple_of_16():
    with pytest.raises(SettingsError, match=r"multiple of 16 \(try 992 or 1008\)"):
        WarmupShape(height=1000, width=1024, steps=1)


def test_blocks_scope_on_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(SettingsError, match='use scope = "model"') as info:
        apply_compiler(torch.nn.Sequential(torch.nn.Linear(2, 2)), BLOCKS)
    assert info.value.key == "scope"


def test_warm_up_runs_each_shape_and_leaves_the_global_rng_alone():
    pipe = build_tiny("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    cfg = warmup_config_from_dict({"shapes": [{"height": 32, "width": 32, "steps": 1},
                                              {"height": 64, "width": 32, "steps": 2, "batch": 2}]})
    torch.manual_seed(123)
    state = torch.get_rng_state()
    result = warm_up(pipe, cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert [(s["height"], s["width"], s["steps"], s["batch"]) for s in result["shapes"]] == [(32, 32, 1, 1), (64, 32, 2, 2)]
    assert all(s["seconds"] > 0 for s in result["shapes"]) and result["total_s"] >= sum(s["seconds"] for s in result["shapes"])


def test_phase_timer_accumulates_and_reports():
    timer = PhaseTimer()
    with timer.phase("read_weights"):
        torch.ones(10).sum()
    with timer.phase("compile"):
        pass
    with timer.phase("read_weights"):
        pass
    assert list(timer.phases) == ["read_weights", "compile"]
    assert timer.total == pytest.approx(sum(timer.phases.values()))
    assert set(timer.as_dict()) == {"read_weights", "compile"} and "read_weights" in str(timer)
