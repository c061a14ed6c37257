"""Cachers on real tiny FLUX / SDXL pipelines (CPU): schedules counted, outputs compared.

Block executions are counted by wrappers installed on each block's ``forward`` *before* the
cacher, the way the compiler replaces it, so they see only real executions.
"""

from __future__ import annotations

import json

import pytest
import torch

from smash_build.tiny_models import build_tiny
from smash_runtime.cachers import (
    CACHERS,
    DeepCacheConfig,
    ForaConfig,
    MagCacheConfig,
    apply_cacher,
    cacher_config_from_dict,
    cacher_stats,
    calibrate_mag_ratios,
    check_cacher_compatibility,
    config_to_dict,
    pipeline_family,
    remove_cacher,
)
from smash_runtime.cachers.deepcache import deep_modules
from smash_runtime.cachers.fora import transformer_blocks
from smash_runtime.errors import SettingsError

FLUX_CALL = dict(height=64, width=64, max_sequence_length=16, output_type="latent")
CFG = dict(true_cfg_scale=2.0, negative_prompt="blurry")
STEPS = 8

pytestmark = pytest.mark.usefixtures("one_thread")


class CallCounter:
    """Counts real executions of ``modules`` per denoiser call."""

    def __init__(self, denoiser: torch.nn.Module, modules: list[torch.nn.Module]):
        self.calls: list[int] = []
        denoiser.register_forward_pre_hook(lambda *_: self.calls.append(0))
        for module in modules:
            module.forward = self._wrap(module.forward)

    def _wrap(self, forward):
        def counted(*args, **kwargs):
            self.calls[-1] += 1
            return forward(*args, **kwargs)

        return counted

    def take(self) -> list[int]:
        calls, self.calls = self.calls, []
        return calls


def attention_modules(transformer) -> list[torch.nn.Module]:
    return [m for name, m in transformer.named_modules() if name.endswith(".attn")]


@pytest.fixture(scope="module")
def flux():
    pipe = build_tiny("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    blocks = CallCounter(pipe.transformer, [b for _, b in transformer_blocks(pipe.transformer)])
    attention = CallCounter(pipe.transformer, attention_modules(pipe.transformer))
    return pipe, blocks, attention


def run_flux(pipe, steps=STEPS, seed=0, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red cat", num_inference_steps=steps, generator=generator, **FLUX_CALL, **kwargs).images


@pytest.fixture(scope="module")
def flux_baseline(flux):
    pipe, *_ = flux
    return run_flux(pipe), run_flux(pipe, **CFG)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def cached(flux):
    """The tiny FLUX pipeline; whatever cacher a test applies is removed afterwards."""
    pipe, blocks, attention = flux
    blocks.take(), attention.take()
    yield flux
    remove_cacher(pipe)


# --- FORA -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "interval,start_step,steps,cfg",
    [(2, 0, 6, False), (3, 2, 9, False), (4, 1, 7, True), (2, 3, 6, True), (6, 0, 5, False)],
)
def test_fora_block_executions_follow_schedule(cached, interval, start_step, steps, cfg):
    pipe, blocks, _ = cached
    n_blocks = len(transformer_blocks(pipe.transformer))
    apply_cacher(pipe, ForaConfig(interval=interval, start_step=start_step))
    run_flux(pipe, steps=steps, **(CFG if cfg else {}))

    branches = 2 if cfg else 1
    full = [s < start_step or (s - start_step) % interval == 0 for s in range(steps)]
    expected = [n_blocks if full[s] else 0 for s in range(steps) for _ in range(branches)]
    assert blocks.take() == expected
    stats = cacher_stats(pipe)
    assert sorted(stats.executions) == (["cond", "uncond"] if cfg else ["cond"])
    assert stats.per_step() == [branches * n for n in expected[::branches]]


def test_fora_interval_1_and_removal_reproduce_baseline(cached, flux_baseline):
    pipe, blocks, _ = cached
    base, base_cfg = flux_baseline
    apply_cacher(pipe, ForaConfig(interval=1, start_step=0))
    assert torch.equal(run_flux(pipe), base)
    assert torch.equal(run_flux(pipe, **CFG), base_cfg)
    apply_cacher(pipe, ForaConfig(interval=3, start_step=1))
    assert not torch.equal(run_flux(pipe), base)
    remove_cacher(pipe)
    assert torch.equal(run_flux(pipe), base)


def test_fora_state_resets_after_an_interrupted_call(cached):
    pipe, *_ = cached
    apply_cacher(pipe, ForaConfig(interval=3, start_step=1))
    first = run_flux(pipe)

    def boom(pipe, step, timestep, kwargs):
        if step == 4:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        run_flux(pipe, seed=1, callback_on_step_end=boom)
    # The aborted call never reached diffusers' end-of-call reset: the rising timestep must.
    assert torch.equal(run_flux(pipe), first)


def test_fora_wraps_compiled_blocks_without_recompiles(flux_baseline):
    """Compiler first (block.forward replaced), cacher second: no recompiles across steps and calls."""
    import torch._dynamo

    pipe = build_tiny("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    for _, block in transformer_blocks(pipe.transformer):
        block.forward = torch.compile(block.forward, backend="eager")
    torch._dynamo.reset()
    assert torch.equal(run_flux(pipe, steps=2), run_flux(pipe, steps=2))  # compiles once per block class
    apply_cacher(pipe, ForaConfig(interval=2, start_step=1))
    with torch._dynamo.config.patch(error_on_recompile=True):
        cached = run_flux(pipe)
        run_flux(pipe, steps=5, **CFG)
    assert cacher_stats(pipe).per_step() == [8, 8, 0, 8, 0]
    assert 0 < rel_err(cached, flux_baseline[0]) < 0.2


# --- every cacher: bounded error growing with interval, exact when off, repeatable ----------

# name -> (off, mild, aggressive) tables; "off" must compute everything.
SWEEPS = {
    "fora": ({"interval": 1}, {"interval": 2, "start_step": 1}, {"interval": 4, "start_step": 1}),
    "pab": (
        {"interval": 1},
        {"interval": 2, "timestep_range": [0, 1000]},
        {"interval": 4, "timestep_range": [0, 1000]},
    ),
    "fastercache": (
        {"interval": 1},
        {"interval": 2, "timestep_range": [-1, 999]},
        {"interval": 4, "timestep_range": [-1, 999]},
    ),
    "first_block": ({"threshold": 0.0}, {"threshold": 0.3}, {"threshold": 0.9}),
    "taylorseer": ({"interval": 1}, {"interval": 2, "start_step": 2}, {"interval": 4, "start_step": 2}),
    "magcache": (
        {"max_skip_steps": 0},
        {"max_skip_steps": 1, "threshold": 0.5},
        {"max_skip_steps": 4, "threshold": 0.5},
    ),
}


@pytest.fixture(scope="module")
def mag_ratios(flux):
    pipe, *_ = flux
    call = {k: v for k, v in FLUX_CALL.items() if k != "output_type"}
    ratios = calibrate_mag_ratios(pipe, num_inference_steps=STEPS, **call)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    return ratios


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_cacher_error_bounded_and_growing(cached, flux_baseline, mag_ratios, name):
    pipe, blocks, attention = cached
    base, base_cfg = flux_baseline
    extra = {"mag_ratios": mag_ratios} if name == "magcache" else {}
    errors = []
    for table in SWEEPS[name]:
        apply_cacher(pipe, cacher_config_from_dict({"name": name, **table, **extra}))
        out = run_flux(pipe)
        errors.append(rel_err(out, base))
        assert torch.equal(run_flux(pipe), out), "a second call with the same seed differs"
        run_flux(pipe, steps=5)  # another step count in between
        assert torch.equal(run_flux(pipe), out), "state leaked across calls with different step counts"
        out_cfg = run_flux(pipe, **CFG)
        assert torch.equal(run_flux(pipe, **CFG), out_cfg)
        if table is SWEEPS[name][0]:
            assert torch.equal(out_cfg, base_cfg)
    off, mild, aggressive = errors
    assert off == 0.0
    assert 0 < mild < aggressive < 0.25, errors
    remove_cacher(pipe)
    assert torch.equal(run_flux(pipe), base)


def test_pab_caches_cond_and_uncond_separately(cached):
    """FluxPipeline's true CFG calls the transformer twice a step: each branch keeps its own schedule."""
    pipe, _, attention = cached
    n_attn = len(attention_modules(pipe.transformer))
    apply_cacher(pipe, cacher_config_from_dict({"name": "pab", "interval": 3, "timestep_range": [0, 1000]}))
    run_flux(pipe, steps=7, **CFG)
    # Step 0 (t = 1000) is outside the window; then every third step recomputes.
    expected = [n_attn if s % 3 == 0 else 0 for s in range(7) for _ in ("cond", "uncond")]
    assert attention.take() == expected


# --- DeepCache --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl():
    pipe = build_tiny("tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    deep = CallCounter(unet, [m for _, m in deep_modules(unet, 0)])
    shallow = CallCounter(unet, [unet.down_blocks[0], unet.up_blocks[-1]])
    return pipe, deep, shallow


def run_sdxl(pipe, steps=6, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    call = dict(height=64, width=64, output_type="latent")
    return pipe("a red cat", num_inference_steps=steps, generator=generator, **call).images


def test_deepcache_deep_blocks_run_only_on_scheduled_steps(sdxl):
    pipe, deep, shallow = sdxl
    unet = pipe.unet
    n_deep = len(deep_modules(unet, 0))
    assert n_deep == 3  # down_blocks.1, mid_block, up_blocks.0
    try:
        base = run_sdxl(pipe, steps=7)
        deep.take(), shallow.take()
        errors = []
        for interval in (1, 2, 3):
            apply_cacher(pipe, DeepCacheConfig(interval=interval, branch=0, start_step=1))
            out = run_sdxl(pipe, steps=7)
            expected = [n_deep if s < 1 or (s - 1) % interval == 0 else 0 for s in range(7)]
            assert deep.take() == expected
            assert shallow.take() == [2] * 7  # the shallow branch runs every step
            assert cacher_stats(pipe).per_step() == expected
            if interval == 2:
                assert torch.equal(run_sdxl(pipe, steps=7), out)
                run_sdxl(pipe, steps=4)
                assert torch.equal(run_sdxl(pipe, steps=7), out)
                deep.take(), shallow.take()
            errors.append(rel_err(out, base))
        assert errors[0] == 0.0 and 0 < errors[1] < errors[2] < 0.25, errors

        # branch = 1 (the deepest allowed here) caches only the mid block.
        apply_cacher(pipe, DeepCacheConfig(interval=2, branch=1))
        run_sdxl(pipe, steps=4)
        # Of the counted modules only mid_block is cached now; down_blocks.1 and up_blocks.0 run.
        assert deep.take() == [3, 2, 3, 2]
        remove_cacher(pipe)
        assert torch.equal(run_sdxl(pipe, steps=7), base)
    finally:
        remove_cacher(pipe)


def test_deepcache_layer_caches_inside_the_shallowest_blocks():
    """``layer`` (the paper's cache_block_id): only down_blocks[0].resnets[0] and the up layers fed by it run."""
    pipe = build_tiny("tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    cached = deep_modules(unet, 0, layer=0)
    assert [name for name, _ in cached] == [
        "down_blocks.0.resnets.1", "down_blocks.0.downsamplers.0", "down_blocks.1", "mid_block", "up_blocks.0",
        "up_blocks.1.resnets.0",
    ]
    fresh = [unet.down_blocks[0].resnets[0], unet.up_blocks[1].resnets[1], unet.up_blocks[1].resnets[2]]
    deep, shallow = CallCounter(unet, [m for _, m in cached]), CallCounter(unet, fresh)
    base = run_sdxl(pipe, steps=6)
    apply_cacher(pipe, DeepCacheConfig(interval=1, branch=0, layer=0))
    assert torch.equal(run_sdxl(pipe, steps=6), base)  # every step full: the same image
    deep.take(), shallow.take()
    whole_blocks = DeepCacheConfig(interval=2, branch=0)
    apply_cacher(pipe, whole_blocks)
    block_error = rel_err(run_sdxl(pipe, steps=6), base)
    deep.take(), shallow.take()
    apply_cacher(pipe, DeepCacheConfig(interval=2, branch=0, layer=0))
    out = run_sdxl(pipe, steps=6)
    assert deep.take() == [6, 0] * 3
    assert shallow.take() == [3] * 6
    assert cacher_stats(pipe).per_step() == [6, 0] * 3
    # Skipping more of the UNet costs fidelity, within the same bounds as whole-block caching.
    assert 0 < block_error <= rel_err(out, base) < 0.25, (block_error, rel_err(out, base))
    remove_cacher(pipe)
    assert torch.equal(run_sdxl(pipe, steps=6), base)
    with pytest.raises(SettingsError) as err:
        apply_cacher(pipe, DeepCacheConfig(branch=0, layer=2))
    assert err.value.key == "layer" and "0 to 1" in str(err.value) and "down_blocks.0" in str(err.value)


def test_deepcache_branch_out_of_range(sdxl):
    pipe, *_ = sdxl
    with pytest.raises(SettingsError) as err:
        apply_cacher(pipe, DeepCacheConfig(branch=2))
    assert err.value.key == "branch" and "0 to 1" in str(err.value)


# --- compatibility and validation ---------------------------------------------------------------


def test_pipeline_family():
    assert pipeline_family("FluxPipeline") == "dit"
    assert pipeline_family("StableDiffusion3Pipeline") == "dit"
    assert pipeline_family("StableDiffusionXLPipeline") == "unet"
    assert pipeline_family(build_tiny("tiny-sdxl")) == "unet"
    with pytest.raises(SettingsError) as err:
        pipeline_family("FluxPipelin")
    assert err.value.key == "pipeline_class"


def test_compatibility_table():
    with pytest.raises(SettingsError) as err:
        check_cacher_compatibility(DeepCacheConfig(), "dit")
    assert err.value.key == "name"
    expected = (
        "DeepCache needs a UNet; for DiT pipelines use fora, pab, fastercache, first_block, taylorseer or magcache"
    )
    assert expected in str(err.value)
    with pytest.raises(SettingsError, match="for UNet pipelines use deepcache"):
        check_cacher_compatibility(ForaConfig(), "unet")

    for name in CACHERS:
        table = {"name": name, "mag_ratios": "flux"} if name == "magcache" else {"name": name}
        cfg = cacher_config_from_dict(table)
        family = "unet" if name == "deepcache" else "dit"
        check_cacher_compatibility(cfg, family)
        with pytest.raises(SettingsError, match='scope = "blocks"'):
            check_cacher_compatibility(cfg, family, {"name": "torch_compile", "scope": "model"})
        with pytest.raises(SettingsError, match="stable_fast"):
            check_cacher_compatibility(cfg, family, {"name": "stable_fast"})
        blocks = {"name": "torch_compile", "scope": "blocks"}
        if name in ("pab", "fastercache", "taylorseer"):
            with pytest.raises(SettingsError, match="attention layers inside each compiled block"):
                check_cacher_compatibility(cfg, family, blocks)
        else:
            check_cacher_compatibility(cfg, family, blocks)
    lite = cacher_config_from_dict({"name": "taylorseer", "lite": True})
    check_cacher_compatibility(lite, "dit", {"name": "torch_compile"})


def test_apply_refuses_wrong_family():
    pipe = build_tiny("tiny-sdxl")
    with pytest.raises(SettingsError, match="DiT"):
        apply_cacher(pipe, ForaConfig())


@pytest.mark.parametrize(
    "table,key,fragment",
    [
        ({"name": "foro"}, "name", "did you mean 'fora'"),
        ({}, "name", "required"),
        ({"name": "fora", "intervall": 2}, "intervall", "did you mean 'interval'"),
        ({"name": "fora", "interval": 7}, "interval", "from 1 to 6"),
        ({"name": "fora", "interval": 0}, "interval", "from 1 to 6"),
        ({"name": "fora", "interval": True}, "interval", "integer"),
        ({"name": "fora", "interval": "3"}, "interval", "integer"),
        ({"name": "fora", "start_step": -1}, "start_step", ">= 0"),
        ({"name": "deepcache", "branch": 1.5}, "branch", "integer"),
        ({"name": "deepcache", "layer": -1}, "layer", "integer"),
        ({"name": "pab", "timestep_range": [800, 100]}, "timestep_range", "start < end"),
        ({"name": "fastercache", "timestep_range": [-1, 1000]}, "timestep_range", "999"),
        ({"name": "fastercache", "attention_weight": 2}, "attention_weight", "from 0.0 to 1.0"),
        ({"name": "first_block", "threshold": "high"}, "threshold", "number"),
        ({"name": "taylorseer", "order": 5}, "order", "from 1 to 4"),
        ({"name": "taylorseer", "lite": 1}, "lite", "true or false"),
        ({"name": "magcache", "mag_ratios": [1.0, -1.0]}, "mag_ratios", "positive"),
        ({"name": "magcache", "mag_ratios": "sdxl"}, "mag_ratios", "flux"),
    ],
)
def test_config_validation_errors(table, key, fragment):
    with pytest.raises(SettingsError) as err:
        cacher_config_from_dict(table)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_magcache_needs_ratios():
    with pytest.raises(SettingsError, match="calibrate_mag_ratios") as err:
        cacher_config_from_dict({"name": "magcache", "threshold": 0.1})
    assert err.value.key == "mag_ratios"
    with pytest.raises(SettingsError, match="calibrate_mag_ratios"):
        apply_cacher(build_tiny("tiny-flux"), MagCacheConfig())


def test_config_round_trips_through_json():
    for name in CACHERS:
        extra = {"mag_ratios": [1.0, 1.1, 0.9]} if name == "magcache" else {}
        cfg = cacher_config_from_dict({"name": name, **extra})
        table = json.loads(json.dumps(config_to_dict(cfg)))
        assert table["name"] == name
        assert cacher_config_from_dict(table) == cfg
    cfg = cacher_config_from_dict({"name": "pab", "interval": 3, "timestep_range": [50, 900]})
    assert config_to_dict(cfg) == {"name": "pab", "interval": 3, "timestep_range": [50.0, 900.0]}
    assert config_to_dict(cacher_config_from_dict({"name": "fora"})) == {"name": "fora", "interval": 3, "start_step": 2}


def test_apply_checks_the_compiler_already_in_place():
    """The loader compiles first; a cacher that would recompile inside compiled blocks is refused at apply."""
    compilers = pytest.importorskip("smash_runtime.compilers")
    pipe = build_tiny("tiny-flux")
    compilers.apply_compiler(pipe, compilers.compiler_config_from_dict({"name": "torch_compile", "scope": "blocks"}))
    with pytest.raises(SettingsError, match="attention layers inside each compiled block"):
        apply_cacher(pipe, cacher_config_from_dict({"name": "pab"}))
    apply_cacher(pipe, ForaConfig())  # block-level: wraps the compiled forwards

    pipe = build_tiny("tiny-flux")
    compilers.apply_compiler(pipe, compilers.compiler_config_from_dict({"name": "torch_compile", "scope": "model"}))
    with pytest.raises(SettingsError, match='scope = "blocks"'):
        apply_cacher(pipe, ForaConfig())
