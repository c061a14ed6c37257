"""Cacher benchmark: baseline vs every cacher x interval, one process, interleaved runs.

Models (random weights, built offline):
  * flux-medium-cache: a FluxPipeline whose transformer has 4 double + 8 single blocks at width
    640 (~113M parameters), the tiny text encoders, and a 4-level VAE (8x downsampling, as in
    FLUX), so a 128x128 image is 64 image tokens + the text tokens;
  * tiny-sdxl for DeepCache.

For each setting, runs alternate baseline / cached (``--reps`` pairs) after a warm-up, and the
speed-up is the median of the paired baselines over the median of the cached runs. Block and
attention executions are counted by wrappers installed on each module's ``forward`` before the
cacher (so only real executions count). PSNR compares the decoded images with the baseline's
(data range 1).

    python bench/cachers.py --threads 1 --reps 3 --json bench/results/cachers-cpu.json
    python bench/cachers.py --only fora --reps 2        # one cacher
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torchmetrics.functional import peak_signal_noise_ratio

from smash_build.tiny_models import build_tiny, tiny_flux_transformer_config
from smash_runtime.cachers import apply_cacher, cacher_config_from_dict, calibrate_mag_ratios, remove_cacher
from smash_runtime.cachers.fora import transformer_blocks

PROMPT = "a red cat sitting on a wooden chair"


def flux_medium(seed: int = 0) -> FluxPipeline:
    tiny = build_tiny("tiny-flux", seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            **tiny_flux_transformer_config(num_layers=4, num_single_layers=8, heads=10, head_dim=64)
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        text_encoder_2=tiny.text_encoder_2,
        tokenizer_2=tiny.tokenizer_2,
        transformer=transformer,
    )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Counter:
    """Real executions of ``modules``; wraps their ``forward`` the way a compiler would."""

    def __init__(self, modules):
        self.count = 0
        for module in modules:
            module.forward = self._wrap(module.forward)

    def _wrap(self, forward):
        def counted(*args, **kwargs):
            self.count += 1
            return forward(*args, **kwargs)

        return counted

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def settings(only: set[str] | None, mag_ratios: list[float] | None) -> list[tuple[str, str, dict]]:
    """(model, label, cacher table) in run order."""
    rows = []
    for i in (2, 3, 4):
        rows += [
            ("flux", f"fora interval={i}", {"name": "fora", "interval": i, "start_step": 0}),
            ("flux", f"pab interval={i}", {"name": "pab", "interval": i}),
            ("flux", f"fastercache interval={i}", {"name": "fastercache", "interval": i}),
            ("flux", f"taylorseer interval={i}", {"name": "taylorseer", "interval": i}),
            ("flux", f"taylorseer lite interval={i}", {"name": "taylorseer", "interval": i, "lite": True}),
            (
                "flux",
                f"magcache max_skip_steps={i - 1}",
                {"name": "magcache", "max_skip_steps": i - 1, "threshold": 0.24, "mag_ratios": mag_ratios},
            ),
            ("sdxl", f"deepcache interval={i}", {"name": "deepcache", "interval": i, "branch": 0}),
            # Inside the shallowest blocks too (the paper's cache_block_id): layer 1 also skips
            # down_blocks[0]'s downsampler, layer 0 its second layer and the mirroring up layer.
            ("sdxl", f"deepcache interval={i} layer=1", {"name": "deepcache", "interval": i, "branch": 0, "layer": 1}),
            ("sdxl", f"deepcache interval={i} layer=0", {"name": "deepcache", "interval": i, "branch": 0, "layer": 0}),
        ]
    rows.append(("flux", "fora interval=3 start_step=2 (default)", {"name": "fora", "interval": 3, "start_step": 2}))
    # Random weights change block 0's residual a lot between steps: small thresholds never skip.
    for threshold in (0.1, 0.3, 0.5):
        rows.append(("flux", f"first_block threshold={threshold}", {"name": "first_block", "threshold": threshold}))
    if only:
        rows = [r for r in rows if r[2]["name"] in only]
    order = {"fora": 0, "pab": 1, "fastercache": 2, "first_block": 3, "taylorseer": 4, "magcache": 5, "deepcache": 6}
    return sorted(rows, key=lambda r: order[r[2]["name"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="baseline/cached pairs per setting")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128, help="image height and width")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--only", nargs="*", help="cacher names to run")
    p.add_argument("--json", type=Path, default=Path("bench/results/cachers-cpu.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    flux = flux_medium()
    sdxl = build_tiny("tiny-sdxl")
    sdxl.set_progress_bar_config(disable=True)
    n_params = sum(p.numel() for p in flux.transformer.parameters())
    flux_blocks = Counter([b for _, b in transformer_blocks(flux.transformer)])
    flux_attn = Counter([m for n, m in flux.transformer.named_modules() if n.endswith(".attn")])
    unet = sdxl.unet
    sdxl_blocks = Counter([*unet.down_blocks, unet.mid_block, *unet.up_blocks])

    def call(pipe, output_type="pt"):
        kwargs = dict(max_sequence_length=32) if pipe is flux else {}
        return pipe(
            PROMPT,
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
            generator=torch.Generator().manual_seed(0),
            output_type=output_type,
            **kwargs,
        ).images

    def timed(pipe):
        start = time.perf_counter()
        images = call(pipe)
        return time.perf_counter() - start, images

    mag_ratios = None
    if not args.only or "magcache" in args.only:
        mag_ratios = calibrate_mag_ratios(
            flux, PROMPT, num_inference_steps=args.steps, height=args.size, width=args.size, max_sequence_length=32
        )
    models = {"flux": (flux, flux_blocks, flux_attn), "sdxl": (sdxl, sdxl_blocks, None)}
    reference = {}
    base_counts = {}
    for name, (pipe, blocks, attn) in models.items():
        call(pipe)  # warm-up
        blocks.take(), attn and attn.take()
        reference[name] = call(pipe)
        base_counts[name] = (blocks.take(), attn.take() if attn else None)

    results = []
    baseline_times = {"flux": [], "sdxl": []}
    print(
        f"# flux-medium-cache transformer: {n_params / 1e6:.0f}M params; {args.size}x{args.size}, "
        f"{args.steps} steps, threads={torch.get_num_threads()}",
        flush=True,
    )
    for model, label, table in settings(set(args.only) if args.only else None, mag_ratios):
        pipe, blocks, attn = models[model]
        cfg = cacher_config_from_dict(table)
        base_t, cached_t = [], []
        psnr = counts = None
        for _ in range(args.reps):
            t, _images = timed(pipe)
            base_t.append(t)
            apply_cacher(pipe, cfg)
            blocks.take(), attn and attn.take()
            t, images = timed(pipe)
            cached_t.append(t)
            counts = (blocks.take(), attn.take() if attn else None)
            psnr = float(peak_signal_noise_ratio(images, reference[model], data_range=1.0))
            remove_cacher(pipe)
        baseline_times[model] += base_t
        row = {
            "model": model,
            "setting": label,
            "cacher": table | ({"mag_ratios": "calibrated"} if table["name"] == "magcache" else {}),
            "baseline_s": statistics.median(base_t),
            "cached_s": statistics.median(cached_t),
            "speedup": statistics.median(base_t) / statistics.median(cached_t),
            "blocks_run": counts[0],
            "blocks_baseline": base_counts[model][0],
            "attn_run": counts[1],
            "attn_baseline": base_counts[model][1],
            "psnr_db": psnr,
            "runs": {"baseline": base_t, "cached": cached_t},
        }
        results.append(row)
        attn_text = f"{row['attn_run']}/{row['attn_baseline']}" if attn else "-"
        print(
            f"| {model} | {label} | {row['cached_s']:.2f} | {row['baseline_s']:.2f} | {row['speedup']:.2f}x | "
            f"{row['blocks_run']}/{row['blocks_baseline']} | {attn_text} | {psnr:.1f} |",
            flush=True,
        )

    report = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "flux_transformer_params": n_params,
        "size": args.size,
        "steps": args.steps,
        "reps": args.reps,
        "baseline_median_s": {k: statistics.median(v) for k, v in baseline_times.items() if v},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
