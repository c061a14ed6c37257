"""GPU benchmark at full model size: FLUX.1-dev and SDXL denoising loops, optimized vs plain diffusers.

Made for a 15-minute lease of one H100/H200 with no network, and runnable by anyone with a GPU.
Nothing is downloaded: the denoisers are the real FLUX.1-dev transformer (11.9B parameters) and
the real SDXL UNet (2.6B) built from their configs (written out below) with random bf16 weights
created directly on the GPU, inside real diffusers pipelines (FluxPipeline,
StableDiffusionXLPipeline) whose text encoders are replaced by random precomputed prompt
embeddings and whose VAE is a tiny stand-in (``output_type="latent"``: nothing is decoded). What
is timed is therefore diffusers' own denoising loop at 1024x1024: FLUX 28 steps guidance-distilled
(one transformer call per step), SDXL 30 steps with classifier-free guidance (one batched UNet
call per step).

    python bench/gpu.py --budget-s 540 --out out/gpu              # everything that fits in 9 minutes
    python bench/gpu.py --only flux-fora3,flux-compile --out out/gpu
    python bench/gpu.py --dry-run --out /tmp/dry                   # every code path on CPU, tiny shapes
    python bench/gpu.py --list                                     # the configurations

Configurations run in this order (most telling first); each family's baseline always runs first,
because speed-up and PSNR are measured against it in the same process:

    flux-baseline                bf16, eager
    flux-fora3                   FORA interval 3 (smash_runtime.cachers)
    flux-fp8dq                   fuse_qkv + float8 dynamic quantization (per row), norms and embedders kept bf16
    flux-compile                 torch.compile, regional (scope = "blocks")
    flux-fora3-fp8dq-compile     FORA 3 + fp8dq + compile: what an H100/H200 user would pick
    flux-int8dq                  fuse_qkv + int8 dynamic quantization, norms and embedders kept bf16
    flux-fora3-int8dq-compile    the published reference recipe (4.2x on an L40S)
    flux-fora2                   FORA interval 2
    sdxl-baseline                bf16, eager, CFG 5.0
    sdxl-deepcache3-compile      DeepCache interval 3 + regional torch.compile
    sdxl-deepcache3-fused-compile  the same + fuse_qkv: the reference recipe without stable-fast

Before the fp8dq configurations, a check (``fp8dq_cpu_bake_check``): tiny-flux baked with fp8dq by
the builder on the CPU into an artifact, loaded on the GPU with ``smash_runtime.load``, against the
same source weights quantized on the GPU by torchao's own handler: stored tensors and the final
latent must be bit-identical (plus one FLUX-sized weight, quantized both ways). Its outcome is
``fp8dq_cpu_bake`` in results.json; on a CPU (``--dry-run``) the bake runs and the GPU half is
skipped. The timed fp8dq configurations quantize on the GPU (a full-size artifact cannot travel
to the device machine; the check shows the two give the same tensors).

Per configuration: median and p90 latency of the whole pipeline call (CUDA-synchronized, after one
untimed first call: a full one for compiled configurations, 3 steps for eager ones), speed-up vs
the family's baseline, peak GPU memory of that configuration (max_memory_allocated minus what was
allocated besides its model when it started, such as other models kept for later), compile time
(first call minus the median), and the PSNR of the final latent vs the baseline's latent from the
same seed, a fidelity hint only: random weights are not a trained model.

Budget: ``--budget-s`` counts from the start of the process. Before each configuration the script
estimates its cost from what it has measured (baseline latency, build and compile times) and skips
what does not fit; a timer stops it at the budget whatever happens. ``results.json`` and
``results.md`` in ``--out`` are rewritten after every configuration, so a kill leaves the results
so far.

``--dry-run`` runs the same code on the CPU with tiny configs, 64x64 and a few steps, and uses
dynamo's ``eager`` backend (the compile path is traced, not code-generated: a CPU inductor compile
of even tiny blocks takes a minute), so a typo never costs GPU time. tests/test_bench_gpu.py runs it.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here: imports are part of it

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

GIB = 1024**3


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# -- the models, written out (nothing is downloaded) ---------------------------------------------

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    center_input_sample=False,
    class_embed_type=None,
    class_embeddings_concat=False,
    conv_in_kernel=3,
    conv_out_kernel=3,
    cross_attention_dim=2048,
    cross_attention_norm=None,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1,
    dual_cross_attention=False,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_only_cross_attention=None,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    num_attention_heads=None,
    num_class_embeds=None,
    only_cross_attention=False,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0,
    resnet_skip_time_act=False,
    resnet_time_scale_shift="default",
    sample_size=128,
    time_cond_proj_dim=None,
    time_embedding_act_fn=None,
    time_embedding_dim=None,
    time_embedding_type="positional",
    timestep_post_act=None,
    transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    upcast_attention=None,
    use_linear_projection=True,
)
# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    timestep_spacing="leading",
    steps_offset=1,
    use_karras_sigmas=False,
)

# --dry-run: the same model classes, scaled down so a CPU runs every path in seconds.
TINY_FLUX_TRANSFORMER = dict(
    FLUX_DEV_TRANSFORMER,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
TINY_SDXL_UNET = dict(
    SDXL_UNET,
    addition_embed_type_num_heads=4,
    addition_time_embed_dim=8,
    attention_head_dim=(2, 4, 4),
    block_out_channels=(16, 32, 32),
    cross_attention_dim=32,
    layers_per_block=1,
    norm_num_groups=8,
    projection_class_embeddings_input_dim=6 * 8 + 16,  # 6 time ids x 8 + pooled text dim
    sample_size=8,
    transformer_layers_per_block=(1, 1, 1),
)


@dataclass(frozen=True)
class Family:
    """One denoiser family at one size: what to build and how to call its pipeline."""

    name: str
    denoiser: dict
    scheduler: dict
    height: int
    width: int
    steps: int
    guidance: float
    text_tokens: int
    text_dim: int
    pooled_dim: int
    latent_channels: int
    runs: int
    # Seconds on an H100, used for budget estimates until the run has measured its own.
    prior_call_s: float
    prior_build_s: float
    prior_compile_s: float


def families(dry_run: bool) -> dict[str, Family]:
    if dry_run:
        return {
            "flux": Family("flux", TINY_FLUX_TRANSFORMER, FLUX_DEV_SCHEDULER, 64, 64, 5, 3.5, 8, 32, 16, 16, 2,
                           1.0, 2.0, 15.0),
            "sdxl": Family("sdxl", TINY_SDXL_UNET, SDXL_SCHEDULER, 64, 64, 4, 5.0, 8, 32, 16, 4, 2,
                           1.0, 2.0, 15.0),
        }
    return {
        # FLUX.1-dev bf16 on an H100: ~0.3-0.45 s per step at 1024x1024.
        "flux": Family("flux", FLUX_DEV_TRANSFORMER, FLUX_DEV_SCHEDULER, 1024, 1024, 28, 3.5, 512, 4096, 768, 16, 3,
                       12.0, 20.0, 90.0),
        "sdxl": Family("sdxl", SDXL_UNET, SDXL_SCHEDULER, 1024, 1024, 30, 5.0, 77, 2048, 1280, 4, 3,
                       4.0, 8.0, 90.0),
    }


# -- the configurations --------------------------------------------------------------------------

FORA3 = {"name": "fora", "interval": 3, "start_step": 2}
FORA2 = {"name": "fora", "interval": 2, "start_step": 2}
DEEPCACHE3 = {"name": "deepcache", "interval": 3, "branch": 0}
QUANT_EXCLUDE = ("*norm*", "*embed*")


@dataclass(frozen=True)
class Config:
    name: str
    family: str
    weights: str  # "bf16", "fused" (fuse_qkv), or "int8dq"/"fp8dq" (fuse_qkv, then that quantization)
    cacher: dict | None
    compile: bool
    description: str
    # Expected call time relative to the family's eager baseline, for budget estimates only.
    cost_factor: float


CONFIGS: tuple[Config, ...] = (
    Config("flux-baseline", "flux", "bf16", None, False, "bf16, eager (plain diffusers)", 1.0),
    Config("flux-fora3", "flux", "bf16", FORA3, False, "FORA interval 3, start step 2", 0.45),
    Config("flux-fp8dq", "flux", "fp8dq", None, False,
           "fuse_qkv + float8 dynamic quant, per row (norms, embedders excluded)", 0.8),
    Config("flux-compile", "flux", "bf16", None, True, "torch.compile, regional (blocks)", 0.9),
    Config("flux-fora3-fp8dq-compile", "flux", "fp8dq", FORA3, True,
           "FORA 3 + fuse_qkv + fp8dq + torch.compile (blocks)", 0.3),
    Config("flux-int8dq", "flux", "int8dq", None, False,
           "fuse_qkv + int8 dynamic quant (norms, embedders excluded)", 1.2),
    Config("flux-fora3-int8dq-compile", "flux", "int8dq", FORA3, True,
           "FORA 3 + fuse_qkv + int8dq + torch.compile (blocks)", 0.35),
    Config("flux-fora2", "flux", "bf16", FORA2, False, "FORA interval 2, start step 2", 0.6),
    Config("sdxl-baseline", "sdxl", "bf16", None, False, "bf16, eager, CFG 5.0 (plain diffusers)", 1.0),
    Config("sdxl-deepcache3-compile", "sdxl", "bf16", DEEPCACHE3, True,
           "DeepCache interval 3 (branch 0) + torch.compile (blocks)", 0.45),
    Config("sdxl-deepcache3-fused-compile", "sdxl", "fused", DEEPCACHE3, True,
           "DeepCache interval 3 (branch 0) + fuse_qkv + torch.compile (blocks)", 0.4),
)
BY_NAME = {c.name: c for c in CONFIGS}


def select(only: str | None) -> list[Config]:
    """The configurations to run, in the canonical order, each family's baseline included."""
    if not only:
        return list(CONFIGS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    wanted = set(names) | {f"{BY_NAME[n].family}-baseline" for n in names}
    return [c for c in CONFIGS if c.name in wanted]


# -- budget --------------------------------------------------------------------------------------


class BudgetExceeded(BaseException):
    """Raised by the budget timer (or SIGTERM) wherever the script is; BaseException so no
    ``except Exception`` inside a library swallows it."""


class Budget:
    def __init__(self, seconds: float, margin: float):
        self.seconds = seconds
        self.margin = margin

    def elapsed(self) -> float:
        return time.perf_counter() - T0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def arm(self) -> None:
        def stop(signum, frame):
            raise BudgetExceeded(f"signal {signum} at {self.elapsed():.0f}s (budget {self.seconds:.0f}s)")

        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, stop)
            # Leave a few seconds to write the results after the stop.
            signal.setitimer(signal.ITIMER_REAL, max(1.0, self.left() - 3.0))
        signal.signal(signal.SIGTERM, stop)

    def disarm(self) -> None:
        if hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)


# -- results -------------------------------------------------------------------------------------


@dataclass
class Row:
    config: str
    family: str
    description: str
    status: str = "ok"
    height: int = 0
    width: int = 0
    steps: int = 0
    runs: int = 0
    latencies_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    p90_s: float | None = None
    s_per_step: float | None = None
    speedup: float | None = None
    first_call_s: float | None = None
    compile_s: float | None = None
    peak_mem_gib: float | None = None
    weights_gib: float | None = None
    build_s: float | None = None
    full_steps: str | None = None
    psnr_db: float | None = None
    identical_to_baseline: bool | None = None
    nan: bool | None = None
    error: str | None = None


class Results:
    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.meta = meta
        self.rows: list[Row] = []
        self.skipped: list[dict] = []
        self.phases: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)

    def phase(self, name: str, seconds: float) -> None:
        self.phases.append({"phase": name, "seconds": round(seconds, 3)})

    def write(self) -> None:
        self.meta["elapsed_s"] = round(time.perf_counter() - T0, 1)
        doc = {**self.meta, "rows": [dataclasses.asdict(r) for r in self.rows], "skipped": self.skipped,
               "phases": self.phases}
        _atomic_write(self.out / "results.json", json.dumps(doc, indent=2, default=str) + "\n")
        _atomic_write(self.out / "results.md", self.markdown())

    def markdown(self) -> str:
        m = self.meta
        m = {k: ("?" if v is None else v) for k, v in m.items()}
        lines = [
            f"GPU benchmark ({'DRY RUN, CPU, tiny shapes' if m['dry_run'] is True else m['device']}), {m['date']}",
            "",
            f"torch {m.get('torch', '?')}, diffusers {m.get('diffusers', '?')}, torchao {m.get('torchao', '?')}, "
            f"compile mode {m['compile_mode']!r}, backend {m.get('compile_backend', '?')!r}; "
            f"budget {m['budget_s']:.0f} s, used {m['elapsed_s']:.0f} s",
            "",
            "| configuration | size, steps | median s | p90 s | s/step | speed-up | peak GiB | compile s "
            "| PSNR dB vs baseline | full steps | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            psnr = "identical" if r.identical_to_baseline else _fmt(r.psnr_db, 1)
            status = r.status if not r.nan else r.status + " (NaN in latent)"
            lines.append(
                f"| {r.config} | {r.height}x{r.width}, {r.steps} | {_fmt(r.median_s, 2)} | {_fmt(r.p90_s, 2)} "
                f"| {_fmt(r.s_per_step, 3)} | {_fmt(r.speedup, 2, 'x')} | {_fmt(r.peak_mem_gib, 1)} "
                f"| {_fmt(r.compile_s, 0)} | {psnr} | {r.full_steps or '-'} | {status} |"
            )
        for s in self.skipped:
            lines.append(f"| {s['config']} | | | | | | | | | | skipped: {s['reason']} |")
        check = self.meta.get("fp8dq_cpu_bake")
        if check:
            lines += ["", f"fp8dq baked on the CPU vs quantized on the device: {check.get('status')} "
                          f"({', '.join(f'{k} {v}' for k, v in check.items() if k != 'status')})"]
        lines.append("")
        return "\n".join(lines)


def _fmt(value: float | None, digits: int, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- building models on the device, fast -----------------------------------------------------------


def init_random_(model, seed: int, std: float = 0.02) -> None:
    """Fill every parameter in place, deterministically: norm weights 1, biases 0, the rest N(0, std).

    One generator on the parameters' device, walked in module order: the same ``seed`` gives the
    same weights on every rebuild (the int8dq variant starts from the baseline's weights).
    """
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__
            for name, param in module.named_parameters(recurse=False):
                if name == "bias":
                    param.zero_()
                elif is_norm and param.ndim == 1:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=gen)


def build_denoiser(family: Family, device, dtype, seed: int):
    """The family's denoiser with random weights created on ``device``, skipping default init.

    The module tree is built on the meta device (no memory, no init kernels), cast to ``dtype``
    there, then given uninitialised storage on the device and filled by :func:`init_random_`.
    """
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = FluxTransformer2DModel if family.name == "flux" else UNet2DConditionModel
    with torch.device("meta"):
        model = cls(**family.denoiser)
    model = model.to(dtype).to_empty(device=device)
    if any(True for _ in model.buffers()):
        raise RuntimeError(f"{cls.__name__} has buffers, which to_empty leaves uninitialised")
    init_random_(model, seed)
    return model.eval().requires_grad_(False)


def tiny_vae(latent_channels: int, device, dtype):
    """A 4-level AutoencoderKL: the pipelines derive vae_scale_factor = 2 ** (levels - 1) = 8 from it.

    Never run (``output_type="latent"``); it sits on the device because diffusers picks the
    pipeline's execution device from its first module.
    """
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
        )
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_pipeline(family: Family, denoiser, device, dtype):
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusionXLPipeline,
    )

    vae = tiny_vae(family.latent_channels, device, dtype)
    if family.name == "flux":
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**family.scheduler),
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=denoiser,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=denoiser,
            scheduler=EulerDiscreteScheduler(**family.scheduler),
            add_watermarker=False,
        )
    assert pipe.vae_scale_factor == 8, pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_inputs(family: Family, device, dtype) -> dict:
    """Random precomputed prompt embeddings in place of the text encoders (fixed seed)."""
    import torch

    gen = torch.Generator("cpu").manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    inputs = {
        "prompt_embeds": randn(1, family.text_tokens, family.text_dim),
        "pooled_prompt_embeds": randn(1, family.pooled_dim),
    }
    if family.name == "sdxl":
        inputs["negative_prompt_embeds"] = randn(1, family.text_tokens, family.text_dim)
        inputs["negative_pooled_prompt_embeds"] = randn(1, family.pooled_dim)
    return inputs


@dataclass
class Held:
    model: Any
    weights_bytes: int
    build_s: float
    compiled: bool = False
    hooked: bool = False


class ModelPool:
    """The denoisers kept on the device between configurations, keyed by (family, weights).

    A configuration that wants eager code gets a fresh model if the held one was compiled (the
    compiler replaces block ``forward``s in place). Models of another family are freed before a
    build, and so are other variants when the device lacks room for one more bf16 copy.
    """

    def __init__(self, fams: dict[str, Family], device, dtype, seed: int):
        self.fams = fams
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self.held: dict[tuple[str, str], Held] = {}
        self.build_s: dict[tuple[str, str], float] = {}
        self.bf16_bytes: dict[str, int] = {}

    def has(self, family: str, weights: str, compiled: bool) -> bool:
        """Whether ``get`` would return a held model without building one."""
        held = self.held.get((family, weights))
        return held is not None and not (held.compiled and not compiled)

    def drop(self, key) -> None:
        if key in self.held:
            log(f"  freeing {key[0]} {key[1]} model")
            del self.held[key]
            _free_memory(self.device)

    def get(self, family: str, weights: str, compiled: bool) -> Held:
        key = (family, weights)
        held = self.held.get(key)
        if held is not None and held.compiled and not compiled:
            self.drop(key)  # compiled in place: an eager configuration needs a fresh one
            held = None
        if held is not None:
            return held
        for other in [k for k in self.held if k[0] != family]:
            self.drop(other)
        fam = self.fams[family]
        if self.device.type == "cuda":
            import torch

            if family not in self.bf16_bytes:
                self.bf16_bytes[family] = _param_bytes(fam)
            free = torch.cuda.mem_get_info(self.device)[0]
            need = self.bf16_bytes[family] * 1.15 + 8 * GIB  # one bf16 copy + 1024x1024 activations
            if free < need:
                for other in [k for k in self.held if k != key]:
                    self.drop(other)
        held = self._build(fam, weights)
        self.held[key] = held
        return held

    def _build(self, fam: Family, weights: str) -> Held:
        start = time.perf_counter()
        before = _allocated(self.device)
        log(f"  building {fam.name} denoiser ({weights}) on {self.device}...")
        model = build_denoiser(fam, self.device, self.dtype, self.seed)
        _sync(self.device)
        n = sum(p.numel() for p in model.parameters())
        size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
        log(f"  built {type(model).__name__}: {size} parameters in {time.perf_counter() - start:.1f}s")
        if weights in ("fused", "int8dq", "fp8dq"):
            from smash_build.transforms import quantize
            from smash_runtime.structure import fuse_qkv

            t = time.perf_counter()
            fused = fuse_qkv(model)  # fusion before quantization: torchao tensors cannot be concatenated
            done = f"fuse_qkv ({fused} attention modules)"
            if weights != "fused":
                report = quantize(model, weights, QUANT_EXCLUDE)
                done += (f" + {weights} ({len(report.quantized)} linears quantized, "
                         f"{len(report.excluded) + len(report.skipped)} kept)")
            _free_memory(self.device)
            _sync(self.device)
            log(f"  {done} in {time.perf_counter() - t:.1f}s")
        elif weights != "bf16":
            raise ValueError(weights)
        seconds = time.perf_counter() - start
        weights_bytes = _allocated(self.device) - before if self.device.type == "cuda" else _module_bytes(model)
        log(f"  {fam.name} {weights} weights: {weights_bytes / GIB:.2f} GiB, ready in {seconds:.1f}s")
        self.build_s[(fam.name, weights)] = seconds
        return Held(model, weights_bytes, seconds)


def _param_bytes(fam: Family) -> int:
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = FluxTransformer2DModel if fam.name == "flux" else UNet2DConditionModel
    with torch.device("meta"):
        model = cls(**fam.denoiser)
    return sum(p.numel() for p in model.parameters()) * 2


def _module_bytes(model) -> int:
    """Bytes held by ``model``'s tensors, looking inside torchao's tensor subclasses."""

    def nbytes(t) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(nbytes(t) for t in [*model.parameters(), *model.buffers()])


def _allocated(device) -> int:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- one configuration ---------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    fams: dict[str, Family]
    device: Any
    dtype: Any
    pool: ModelPool
    budget: Budget
    results: Results
    baseline_s: dict[str, float] = field(default_factory=dict)
    baseline_latent: dict[str, Any] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)


def warmup_steps(cfg: Config, fam: Family) -> int:
    """Steps of the untimed first call.

    A compiled configuration's first call is a full one: compile time is reported as that call
    minus the steady median. Eager ones only need every kernel and the allocator's pool warmed
    once, which a few steps do (each step has the same shapes; FORA's start step 2 is included, so
    its residual cache is allocated too), saving most of a 10-second FLUX call per configuration.
    """
    return fam.steps if cfg.compile else min(fam.steps, 3)


def estimate(cfg: Config, ctx: Context, runs: int) -> float:
    """Seconds this configuration should take, from what this run has measured so far."""
    fam = ctx.fams[cfg.family]
    call = ctx.baseline_s.get(cfg.family, fam.prior_call_s) * cfg.cost_factor
    total = (warmup_steps(cfg, fam) / fam.steps + runs) * call
    if not ctx.pool.has(cfg.family, cfg.weights, cfg.compile):
        prior = fam.prior_build_s * (1 if cfg.weights == "bf16" else 2)  # + fuse and quantize
        total += ctx.pool.build_s.get((cfg.family, cfg.weights), prior)
    held = ctx.pool.held.get((cfg.family, cfg.weights))
    if cfg.compile and not (held and held.compiled):
        measured = ctx.compile_s.get(cfg.family)
        total += measured * 1.3 if measured is not None else fam.prior_compile_s
    return total


def timed_call(pipe, kwargs: dict, device, progress: bool = False) -> tuple[float, Any]:
    import torch

    if progress:
        steps = kwargs["num_inference_steps"]
        start = time.perf_counter()

        def on_step(pipe_, i, t, callback_kwargs):
            if i < 2 or (i + 1) % 7 == 0 or i + 1 == steps:
                log(f"    step {i + 1}/{steps} at {time.perf_counter() - start:.1f}s")
            return callback_kwargs

        kwargs = {**kwargs, "callback_on_step_end": on_step}
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = pipe(**kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, out.images


def psnr_db(latent, reference) -> float:
    """PSNR of latents, over the reference's own value range."""
    from smash_build.evaluate.measure import psnr_db as psnr

    return psnr(latent, reference, data_range=float(reference.max() - reference.min()) or 1.0)


def run_config(cfg: Config, ctx: Context, runs: int, row: Row) -> None:
    import torch
    from smash_runtime.cachers import apply_cacher, cacher_config_from_dict, cacher_stats, remove_cacher
    from smash_runtime.compilers import apply_compiler, compiler_config_from_dict

    fam = ctx.fams[cfg.family]
    device = ctx.device
    row.height, row.width, row.steps = fam.height, fam.width, fam.steps
    t = time.perf_counter()
    existed = ctx.pool.has(cfg.family, cfg.weights, cfg.compile)
    held = ctx.pool.get(cfg.family, cfg.weights, cfg.compile)
    row.weights_gib = round(held.weights_bytes / GIB, 2)
    if not existed:
        row.build_s = round(held.build_s, 1)
    ctx.results.phase(f"{cfg.name}: model", time.perf_counter() - t)

    pipe = make_pipeline(fam, held.model, device, ctx.dtype)
    compiling = cfg.compile and not held.compiled
    if compiling and held.hooked:
        log("  (the compiler's 'already has diffusers hooks' warning below is about the empty hook registries "
            "remove_cacher leaves; no hook is active)")
    if cfg.compile:
        apply_compiler(pipe, compiler_config_from_dict(
            {"name": "torch_compile", "mode": ctx.args.compile_mode, "scope": "blocks"}))
        held.compiled = True
    if cfg.cacher:
        apply_cacher(pipe, cacher_config_from_dict(cfg.cacher))
        held.hooked = True
    try:
        kwargs = dict(
            prompt_inputs(fam, device, ctx.dtype),
            height=fam.height,
            width=fam.width,
            num_inference_steps=fam.steps,
            guidance_scale=fam.guidance,
            output_type="latent",
        )
        if device.type == "cuda":
            _free_memory(device)
            torch.cuda.reset_peak_memory_stats(device)
        # Whatever is allocated besides this model's weights (other models kept for later
        # configurations, anything not yet freed) is not this configuration's memory.
        others = _allocated(device) - held.weights_bytes

        def call(progress: bool, steps: int = fam.steps) -> tuple[float, Any]:
            generator = torch.Generator("cpu").manual_seed(0)
            return timed_call(pipe, {**kwargs, "num_inference_steps": steps, "generator": generator}, device, progress)

        first_steps = warmup_steps(cfg, fam)
        what = "compiles" if compiling else "warm-up"
        log(f"  first call ({what}), {first_steps} steps at {fam.height}x{fam.width}...")
        first, latent = call(progress=True, steps=first_steps)
        row.first_call_s = round(first, 3)
        ctx.results.phase(f"{cfg.name}: first call", first)
        log(f"  first call: {first:.2f}s")
        for i in range(runs):
            seconds, latent = call(progress=False)
            row.latencies_s.append(round(seconds, 4))
            row.runs = len(row.latencies_s)
            log(f"  run {i + 1}/{runs}: {seconds:.3f}s ({seconds / fam.steps:.3f} s/step)")
        ctx.results.phase(f"{cfg.name}: timed runs", sum(row.latencies_s))
        if device.type == "cuda":
            row.peak_mem_gib = round((torch.cuda.max_memory_allocated(device) - others) / GIB, 2)
        if cfg.cacher:
            per_step = cacher_stats(pipe).per_step()
            row.full_steps = f"{sum(1 for n in per_step if n)}/{len(per_step)}"
        latent = latent.float().cpu()
        row.nan = bool(torch.isnan(latent).any())
        if cfg.name.endswith("-baseline"):
            ctx.baseline_latent[cfg.family] = latent
        elif cfg.family in ctx.baseline_latent:
            reference = ctx.baseline_latent[cfg.family]
            row.identical_to_baseline = bool(torch.equal(latent, reference))
            if not row.identical_to_baseline and not row.nan:
                row.psnr_db = round(psnr_db(latent, reference), 2)
    finally:
        if cfg.cacher:
            remove_cacher(pipe)
    _summarize(cfg, ctx, row, compiling)


def _summarize(cfg: Config, ctx: Context, row: Row, compiling: bool) -> None:
    lat = sorted(row.latencies_s)
    if not lat:
        return
    row.median_s = round(statistics.median(lat), 4)
    row.p90_s = round(lat[min(len(lat) - 1, math.ceil(0.9 * len(lat)) - 1)], 4)
    row.s_per_step = round(row.median_s / row.steps, 4)
    if cfg.name.endswith("-baseline"):
        ctx.baseline_s[cfg.family] = row.median_s
    base = ctx.baseline_s.get(cfg.family)
    if base:
        row.speedup = round(base / row.median_s, 3)
    if compiling and row.first_call_s is not None and row.median_s is not None:
        row.compile_s = round(row.first_call_s - row.median_s, 1)
        ctx.compile_s[cfg.family] = max(ctx.compile_s.get(cfg.family, 0.0), row.compile_s)


# -- fp8dq baked on a CPU == fp8dq quantized on the GPU --------------------------------------------

FP8_CHECK_MANIFEST = """
[model]
source = "builtin:tiny-flux"
dtype = "bfloat16"

[build]
fuse_qkv = true
quantize = { method = "fp8dq", exclude = ["norm+embedding"] }
"""


def _float8_fields(state: dict) -> dict:
    """``{name: (qdata bytes, scale, settings)}`` of a state dict's Float8Tensors, on the CPU."""
    import torch

    out = {}
    for name, t in state.items():
        if hasattr(t, "act_quant_kwargs"):
            settings = (t.block_size, t.mm_config, t.act_quant_kwargs, t.kernel_preference, t.dtype)
            out[name] = (t.qdata.cpu().view(torch.uint8), t.scale.cpu(), settings)
    return out


def _same_float8(a: dict, b: dict) -> list[str]:
    """Names whose stored float8 bytes, scales or settings differ (or exist on one side only)."""
    import torch

    differ = sorted(a.keys() ^ b.keys())
    for name in sorted(a.keys() & b.keys()):
        (qa, sa, xa), (qb, sb, xb) = a[name], b[name]
        if not (torch.equal(qa, qb) and torch.equal(sa, sb) and xa == xb):
            differ.append(name)
    return differ


def fp8dq_cpu_bake_check(device, work: Path, seed: int = 0) -> dict:
    """Bake tiny-flux with fp8dq on the CPU (the builder's path), load the artifact on ``device``;
    quantize the same source weights there with torchao's own handler; compare tensors and latents.

    On a device that cannot run fp8dq (a CPU, a GPU below sm 8.9) the bake runs and the
    comparison is skipped, with the reason in ``status``.
    """
    import torch

    from smash_build.builder import build
    from smash_build.manifest import parse_manifest
    from smash_build.sources import load_pipeline, resolve_source
    from smash_build.transforms import float8_dynamic_weight, quantization_config, quantize
    from smash_runtime.structure import fuse_qkv
    from torchao.utils import _is_mslk_available

    t = time.perf_counter()
    manifest = parse_manifest(FP8_CHECK_MANIFEST, base_dir=work)
    result = build(manifest, out_dir=work / "tiny-flux-fp8dq")
    baked = _float8_fields(result.pipeline.transformer.state_dict())
    check: dict[str, Any] = {"artifact": "builtin:tiny-flux, bfloat16, fuse_qkv, fp8dq (norm+embedding kept)",
                             "baked_on": "cpu", "float8_tensors": len(baked),
                             "mslk_available": _is_mslk_available()}
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        check["status"] = f"skipped: {device} cannot run fp8dq (needs CUDA compute capability >= 8.9)"
        check["seconds"] = round(time.perf_counter() - t, 1)
        return check
    import smash_runtime

    loaded = smash_runtime.load(result.artifact.path, device=str(device), cacher=False, compiler=False)
    source = load_pipeline(resolve_source("builtin:tiny-flux", None), "bfloat16")
    reference = source.transformer
    fuse_qkv(reference)
    reference.to(device)
    quantize(reference, "fp8dq", manifest.build.quantize.exclude_globs)  # on CUDA: torchao's own handler
    differ = _same_float8(_float8_fields(loaded.transformer.state_dict()), _float8_fields(reference.state_dict()))
    check["tensors_differing"] = differ[:10]

    def latent(transformer):
        pipe = type(loaded).from_pipe(loaded, transformer=transformer)
        with torch.inference_mode():
            return pipe("a red cube", num_inference_steps=4, height=64, width=64, output_type="latent",
                        generator=torch.Generator("cpu").manual_seed(seed)).images.float().cpu()

    a, b = latent(loaded.transformer), latent(reference)
    check["latent_identical"] = bool(torch.equal(a, b))
    check["latent_max_abs_diff"] = float((a - b).abs().max())
    # One FLUX.1-dev-sized weight (a single block's MLP input, 12288 x 3072): CPU bake vs GPU handler.
    gen = torch.Generator("cpu").manual_seed(seed)
    weight = (torch.randn(12288, 3072, generator=gen) * 0.02).to(torch.bfloat16)
    on_cpu = float8_dynamic_weight(weight, quantization_config("fp8dq"))
    layer = torch.nn.Linear(3072, 12288, bias=False, dtype=torch.bfloat16, device=device)
    layer.weight.data.copy_(weight)
    quantize(layer, "fp8dq")
    check["flux_sized_weight_identical"] = not _same_float8(_float8_fields({"w": on_cpu}),
                                                            _float8_fields({"w": layer.weight}))
    ok = not differ and check["latent_identical"] and check["flux_sized_weight_identical"]
    check["status"] = "identical" if ok else "DIFFERENT"
    check["seconds"] = round(time.perf_counter() - t, 1)
    return check


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop before this many seconds from the process start (default 540)")
    p.add_argument("--out", type=Path, default=Path("out/gpu"), help="folder for results.json and results.md")
    p.add_argument("--only", help="comma-separated configuration names (their family's baseline is added)")
    p.add_argument("--runs", type=int, help="timed runs per configuration (default: 3; 2 in --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, 64x64, a few steps: every code path")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default 'default': compiles fastest)")
    p.add_argument("--compile-backend", default=None,
                   help="dynamo backend (default: inductor; 'eager' in --dry-run, which traces without codegen)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu in --dry-run")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--margin-s", type=float, default=10.0, help="safety margin kept from the budget")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    return p.parse_args(argv)


def setup(args: argparse.Namespace, results: Results, budget: Budget) -> Context:
    """Imports, device and dtype; fills the results' header."""
    log("importing torch, diffusers, torchao, smash_runtime...")
    t = time.perf_counter()
    import diffusers
    import torch
    import torchao

    from smash_runtime import cachers, compilers  # noqa: F401  (fail now, not after the baseline)

    results.phase("imports", time.perf_counter() - t)
    # Keep diffusers' warnings about casting the stand-in VAE and the random models out of the log.
    diffusers.utils.logging.set_verbosity_error()
    if args.dry_run:
        # Tiny ops on a shared CPU: extra threads only wait for each other (30x slower on 2 busy cores).
        torch.set_num_threads(1)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on the CPU")
    backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    if backend != "inductor":
        # The project's compiler calls torch.compile(fn, mode=...); point its default backend elsewhere.
        torch.compile = functools.partial(torch.compile, backend=backend)
    dtype = torch.bfloat16
    fams = families(args.dry_run)
    if args.runs is not None:
        fams = {k: dataclasses.replace(f, runs=max(1, args.runs)) for k, f in fams.items()}

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        results.meta["gpu_mem_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()})"
    import smash_build
    import smash_runtime

    results.meta.update(
        # where the code came from: the carried wheels ($SMASH_SITE) or a checkout
        imported_from={m.__name__: str(Path(m.__file__).parent)
                       for m in (smash_runtime, smash_build, diffusers, torchao)},
        device=device_name,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        diffusers=diffusers.__version__,
        torchao=torchao.__version__,
        compile_backend=backend,
    )
    log(f"device: {device_name}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"torchao {torchao.__version__}; budget {args.budget_s:.0f}s, {budget.left():.0f}s left")
    results.write()
    return Context(args, fams, device, dtype, ModelPool(fams, device, dtype, args.seed), budget, results)


def run_all(ctx: Context, pending: list[Config]) -> None:
    """Run (or skip) each configuration of ``pending``, taking it off the list when it starts."""
    import torch

    budget, results, device = ctx.budget, ctx.results, ctx.device
    while pending:
        cfg = pending.pop(0)
        fam = ctx.fams[cfg.family]
        runs = fam.runs
        left = budget.left() - budget.margin
        while runs > 1 and estimate(cfg, ctx, runs) > left:
            runs -= 1
        need = estimate(cfg, ctx, runs)
        if need > left:
            reason = f"needs ~{need:.0f}s, {max(0.0, left):.0f}s left"
            log(f"skip {cfg.name}: {reason}")
            results.skipped.append({"config": cfg.name, "reason": reason})
            results.write()
            continue
        if cfg.family not in ctx.baseline_s and not cfg.name.endswith("-baseline"):
            log(f"note: {cfg.name} runs without its baseline (it was skipped or failed): no speed-up or PSNR")
        log(f"== {cfg.name}: {cfg.description} ({runs} timed runs, estimate ~{need:.0f}s, {left:.0f}s left)")
        row = Row(cfg.name, cfg.family, cfg.description)
        results.rows.append(row)
        start = time.perf_counter()
        try:
            run_config(cfg, ctx, runs, row)
        except BudgetExceeded:
            row.status = "stopped at the budget"
            _summarize(cfg, ctx, row, False)
            raise
        except Exception as exc:  # one broken configuration must not cost the rest of the lease
            traceback.print_exc()
            row.status = "error"
            row.error = f"{type(exc).__name__}: {exc}"[:500]
            _summarize(cfg, ctx, row, False)
            log(f"!! {cfg.name} failed: {row.error}")
            # Its model's state (hooks, half-compiled forwards) is unknown now: build afresh if needed.
            ctx.pool.drop((cfg.family, cfg.weights))
            _free_memory(device)
        finally:
            results.phase(cfg.name, time.perf_counter() - start)
            results.write()
        if device.type == "cuda":
            log(f"  GPU memory allocated {torch.cuda.memory_allocated(device) / GIB:.1f} GiB "
                f"(models held: {', '.join(f'{k[0]} {k[1]}' for k in ctx.pool.held) or 'none'})")
        log(f"== {cfg.name}: median {_fmt(row.median_s, 3)}s, speed-up {_fmt(row.speedup, 2, 'x')}, "
            f"peak {_fmt(row.peak_mem_gib, 1)} GiB, compile {_fmt(row.compile_s, 0)}s, "
            f"PSNR {_fmt(row.psnr_db, 1)} dB [{time.perf_counter() - start:.0f}s]")
        if cfg.family != (pending[0].family if pending else None):
            for key in [k for k in ctx.pool.held if k[0] == cfg.family]:
                ctx.pool.drop(key)
            # Compiled code of this family is not needed again; its guards may keep old weights alive.
            torch._dynamo.reset()
            _free_memory(device)


def run_fp8_check(ctx: Context) -> dict:
    """:func:`fp8dq_cpu_bake_check` in a scratch folder; a failure is recorded, never fatal."""
    import tempfile

    log("fp8dq check: bake tiny-flux on the CPU, load on the device, compare with quantizing on the device...")
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="smash-fp8-check-") as work:
            check = fp8dq_cpu_bake_check(ctx.device, Path(work), ctx.args.seed)
    except Exception as exc:  # the timed configurations still run
        traceback.print_exc()
        check = {"status": f"error: {type(exc).__name__}: {exc}"[:500]}
    ctx.results.phase("fp8dq cpu-bake check", time.perf_counter() - start)
    log(f"fp8dq check: {json.dumps(check, default=str)}")
    return check


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for c in CONFIGS:
            print(f"{c.name:28s} {c.description}")
        return 0
    configs = select(args.only)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = Results(args.out, {
        "tool": "bench/gpu.py",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dry_run": args.dry_run,
        "device": None,
        "python": platform.python_version(),
        "compile_mode": args.compile_mode,
        "budget_s": args.budget_s,
        "configs": [c.name for c in configs],
        "command": " ".join(["bench/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
    })
    budget = Budget(args.budget_s, args.margin_s)
    pending = list(configs)
    stopped = None
    budget.arm()
    try:
        ctx = setup(args, results, budget)
        if any(c.weights == "fp8dq" for c in configs):
            results.meta["fp8dq_cpu_bake"] = run_fp8_check(ctx)
            results.write()
        run_all(ctx, pending)
    except BudgetExceeded as exc:
        stopped = str(exc)
        log(f"stopped: {stopped}")
        results.skipped.extend({"config": c.name, "reason": "budget reached"} for c in pending)
    finally:
        budget.disarm()
        results.meta["stopped"] = stopped
        results.write()
    print(results.markdown(), flush=True)
    log(f"results in {args.out}/results.json and results.md")
    return 1 if any(r.status == "error" for r in results.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
