"""Cold start: how long a fresh process takes to its first image, with and without a compile cache.

Every measurement is a whole new Python process (imports, model load, compile, first call), as
a server restart or a scaled-out replica sees it. Scenarios, each run ``--runs`` times:

    eager   no compiler
    cold    torch.compile with an empty compile cache (a fresh folder each run)
    warm    torch.compile with the cache the first cold run filled (precompiled blocks: no tracing)

and the table gives medians of each phase (imports, load, first call) and the ratio of each
scenario's start-to-first-image to the eager one's (the warm-start target is <= 1.2x). The model is one of:

    --model tiny-flux     the tiny FluxPipeline (smash_build.tiny_models), full text-to-image calls
    --model flux-medium   a FLUX transformer of 12 blocks at width 1024 alone, one call = --steps
                          forward passes on random latents (no text encoders: runs with diffusers only)
    --artifact DIR        a built artifact through smash_runtime.load (the real loader); its recorded
                          cacher too with --with-cacher (the issue's fused + int8wo + FORA 2 shape)

    python bench/cold_start.py --runs 3 --markdown                           # CPU, tiny-flux
    python bench/cold_start.py --model flux-medium --device cuda --height 512 --width 512

The load alone (``smash_runtime.load`` against ``from_pretrained``) is ``bench/load.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("eager", "cold", "warm")


# -- one measured process ----------------------------------------------------------------------


def _medium_flux(device, dtype):
    from diffusers import FluxTransformer2DModel

    import torch

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
            num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=256, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _medium_flux_call(model, args, device, dtype):
    import torch

    h, w = args.height // 16, args.width // 16  # 8x VAE, 2x2 patches
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, h * w, 64, generator=g).to(device, dtype)
    text = torch.randn(1, 128, 1024, generator=g).to(device, dtype)
    pooled = torch.randn(1, 256, generator=g).to(device, dtype)
    img_ids = torch.zeros(h * w, 3, device=device)
    img_ids[:, 1] = torch.arange(h, device=device).repeat_interleave(w)
    img_ids[:, 2] = torch.arange(w, device=device).repeat(h)
    txt_ids = torch.zeros(128, 3, device=device)
    with torch.inference_mode():
        for i in range(args.steps):
            t = torch.full((1,), 1.0 - i / args.steps, device=device, dtype=dtype)
            noise = model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                          timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                          guidance=torch.full((1,), 3.5, device=device, dtype=dtype), return_dict=False)[0]
            latents = latents - noise / args.steps
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return latents


def child(args) -> dict:
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    from smash_runtime.compilers import CompileCache, TorchCompileConfig, apply_compiler, config_to_dict

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    cfg = TorchCompileConfig(mode=args.mode, scope=args.scope) if args.scenario != "eager" else None
    out = {"scenario": args.scenario, "import_s": time.perf_counter() - t0}

    t = time.perf_counter()
    cache = CompileCache(args.cache_root, artifact_hash=args.model_id) if cfg else None
    if args.artifact:
        import smash_runtime

        pipe = smash_runtime.load(args.artifact, device=args.device, cacher=args.with_cacher,
                                  compiler=config_to_dict(cfg) if cfg else False,
                                  compile_cache=args.cache_root if cfg else None)
        out["load_phases"] = pipe.smash.timings
        cache = pipe.smash.compile_cache
    elif args.model == "tiny-flux":
        from smash_build.tiny_models import build_tiny

        pipe = build_tiny("tiny-flux", dtype=dtype).to(args.device)
        if cfg:
            apply_compiler(pipe, cfg, cache=cache)
    else:
        pipe = _medium_flux(args.device, dtype)
        if cfg:
            apply_compiler(pipe, cfg, cache=cache)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    out["load_s"] = time.perf_counter() - t

    def call():
        if args.model == "flux-medium" and not args.artifact:
            return _medium_flux_call(pipe, args, args.device, dtype)
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():  # as smash_runtime.images.generate runs requests
            images = pipe("a red cube on a table", height=args.height, width=args.width,
                          num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(0),
                          output_type="pt").images
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return images

    t = time.perf_counter()
    first = call()
    out["first_call_s"] = time.perf_counter() - t
    if args.save_output:
        torch.save(first.float().cpu(), args.save_output)
    t = time.perf_counter()
    call()
    out["second_call_s"] = time.perf_counter() - t
    out["fxgraph_cache_hit"] = counters["inductor"]["fxgraph_cache_hit"]
    out["fxgraph_cache_miss"] = counters["inductor"]["fxgraph_cache_miss"]
    out["cache_state"] = cache.state if cache else None
    report = cache.report() if cache else {}
    out["precompiled"] = {k: report.get(f"precompiled_{k}", 0) for k in ("loaded", "compiled", "fallback")}
    out["graphs_traced"] = counters["stats"]["unique_graphs"]
    out["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out["torch"] = torch.__version__
    out["in_process_s"] = time.perf_counter() - t0
    return out


# -- the driver --------------------------------------------------------------------------------


def run_process(args, scenario: str, cache_root: Path) -> dict:
    output = cache_root.parent / f"output-{scenario}-{time.monotonic_ns()}.pt"
    cmd = [sys.executable, __file__, "--child", "--scenario", scenario, "--cache-root", str(cache_root),
           "--save-output", str(output)]
    for name in ("model", "artifact", "device", "dtype", "height", "width", "steps", "mode", "scope", "threads"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    cmd += ["--with-cacher"] if args.with_cacher else []
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.setdefault("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "runtime"), env["PYTHONPATH"]) if p)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{scenario} run failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    result["output"] = str(output)
    print(f"  {scenario:5s} process {wall:7.1f} s  load {result['load_s']:6.2f} s  first call "
          f"{result['first_call_s']:7.2f} s  second {result['second_call_s']:6.2f} s  "
          f"imports {result['import_s']:5.2f} s  graphs traced {result['graphs_traced']}  "
          f"fx cache hit/miss {result['fxgraph_cache_hit']}/{result['fxgraph_cache_miss']}  "
          f"precompiled {result['precompiled']}"
          + (f"  load phases {json.dumps({k: round(v, 2) for k, v in result['load_phases'].items()})}"
             if result.get("load_phases") else ""), file=sys.stderr)
    return result


def summarize(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    keys = ("process_s", "import_s", "load_s", "first_call_s", "second_call_s")
    out = {s: {k: statistics.median(r[k] for r in runs) for k in keys} for s, runs in results.items()}
    for s, runs in results.items():  # start to first image: the whole process minus its second call
        out[s]["to_first_s"] = statistics.median(r["process_s"] - r["second_call_s"] for r in runs)
    return out


def markdown(summary: dict, args, device: str, torch_version: str) -> str:
    what = f"artifact {args.artifact}" if args.artifact else args.model
    lines = [
        f"{what}, {args.height}x{args.width}, {args.steps} steps, {args.dtype}, torch.compile mode={args.mode} "
        f"scope={args.scope}; {device}, torch {torch_version}, {args.threads} thread(s); medians of {args.runs} "
        "whole-process runs.",
        "",
        "| scenario | process to first image (s) | vs eager | imports (s) | load (s) | first call (s) | second call (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"eager": "eager (no compile)", "cold": "compiled, no cache", "warm": "compiled, filled cache"}
    eager = summary.get("eager")
    for s, row in summary.items():
        ratio = f"{row['to_first_s'] / eager['to_first_s']:.2f}x" if eager else "-"
        lines.append(f"| {labels[s]} | {row['to_first_s']:.1f} | {ratio} | {row['import_s']:.2f} | {row['load_s']:.2f} | "
                     f"{row['first_call_s']:.2f} | {row['second_call_s']:.3f} |")
    if "cold" in summary and "warm" in summary:
        ratio = summary["cold"]["first_call_s"] / summary["warm"]["first_call_s"]
        lines += ["", f"First call with a filled cache: {ratio:.1f}x faster than without."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny-flux", "flux-medium"), default="tiny-flux")
    p.add_argument("--artifact", help="an artifact folder, loaded with smash_runtime.load")
    p.add_argument("--with-cacher", action="store_true",
                   help="--artifact: apply its recorded cacher (FORA, ...) in every scenario (default: none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--mode", default="default")
    p.add_argument("--scope", default="blocks", choices=("blocks", "model"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process (default 1)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--json", type=Path, help="write every run and the medians here")
    p.add_argument("--markdown", action="store_true", help="print the docs table")
    p.add_argument("--keep", type=Path, help="folder for the cache roots (default: a temporary one)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--cache-root", help=argparse.SUPPRESS)
    p.add_argument("--save-output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model_id = args.artifact or f"bench:{args.model}"
    if args.child:
        print(json.dumps(child(args)))
        return

    scenarios = [s for s in args.scenarios.split(",") if s]
    work = args.keep or Path(tempfile.mkdtemp(prefix="smash-cold-start-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for i in range(args.runs):
        # Interleaved, so slow drift of a shared machine hits every scenario alike.
        for s in scenarios:
            if s == "warm" and not (work / "cold-0").exists():
                run_process(args, "cold", work / "cold-0")  # fill it once, untimed
            root = work / (f"cold-{i}" if s == "cold" else "cold-0" if s == "warm" else "eager")
            results.setdefault(s, []).append(run_process(args, s, root))
            if args.json:  # after every run: a cut-off benchmark still leaves its numbers
                args.json.write_text(json.dumps({"runs": results}, indent=2))
    summary = summarize(results)
    any_run = next(iter(results.values()))[0]
    table = markdown(summary, args, any_run["device"], any_run["torch"])
    diffs = output_differences(results)
    table += "".join(f"\nmax |{s} - eager| over the first call's output: {d:.2e}" for s, d in diffs.items())
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "medians": summary, "table": table}, indent=2))


def output_differences(results: dict[str, list[dict]]) -> dict[str, float]:
    """Largest difference of each compiled run's first output from the eager one (all runs agree?)."""
    import torch

    if "eager" not in results:
        return {}
    reference = torch.load(results["eager"][0]["output"])
    return {
        s: max((torch.load(r["output"]) - reference).abs().max().item() for r in runs)
        for s, runs in results.items() if s != "eager"
    }


if __name__ == "__main__":
    main()
