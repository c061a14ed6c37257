"""CPU benchmark suite: every optimization the product ships vs the plain diffusers pipeline.

Each optimized configuration is built the way a user builds it (a manifest, ``smash_build.builder.build``
into a temporary folder) and loaded the way a user loads it (``smash_runtime.load(..., device="cpu")``);
the baseline is the plain diffusers pipeline (``DiffusionPipeline.from_pretrained`` of the same source
folder), kept in memory for the whole family so that baseline and optimized calls alternate in one
process: per repetition one baseline call, then one optimized call. Speed-up = median of that
configuration's paired baseline calls / median of its optimized calls.

    python bench/run.py                                   # the full CPU suite (~8-9 min on the 2-core machine)
    python bench/run.py --quick --out /tmp/q.json         # tiny shapes, few steps, 1 rep (the test runs this)
    python bench/run.py --configs flux-fora3,sdxl-deepcache3 --reps 3
    python -m bench --list                                # the configurations

Models (random weights, nothing downloaded):
  * flux: ``flux_medium`` of bench/cachers.py, a full FluxPipeline whose transformer has the real
    FLUX structure at 4 double + 8 single blocks, width 640 (111M parameters), with a 4-level (8x)
    VAE as in FLUX: 256x256 is 256 image tokens + 32 text tokens. 20 steps.
  * sdxl: ``tiny-sdxl`` (smash_build.tiny_models), 128x128, 20 steps, CFG 5.

Per row (JSON ``rows`` and the Markdown table): median and p90 latency of a whole pipeline call
(one image: text encoders, denoising loop, VAE decode), speed-up, peak memory, artifact size (bytes
of the ``*.safetensors`` files), load time (``smash_runtime.load`` wall time; the baseline's is
diffusers' ``from_pretrained``), PSNR of the image vs the baseline's image from the same seed.

Peak memory is the process RSS (psutil, sampled every 10 ms by a thread) during the configuration's
own calls, minus the RSS just before its pipeline was loaded: its weights plus its working memory
(freed heap pages are handed back with glibc's ``malloc_trim`` before each measurement point). The
baseline's is taken during its 2-step warm-up, the one call it makes alone in memory.
tracemalloc would miss torch's tensor allocations, and ``ru_maxrss`` never goes down, so neither
could tell configurations apart inside one process.

Budget: ``--budget-s`` (default 570) counts from the start of the process; before each
configuration the suite estimates its cost from the baseline latency measured so far and skips it
(a row with status "skipped") if it would end later, so the suite stays under 10 minutes on a
loaded machine. Configurations run most telling first (``--list``), so the tail is what goes.

Torch runs with one thread by default (``--threads``): on the shared 2-core development machine two
OpenMP threads competing with other jobs were up to 6x slower and erratic.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smash_build.evaluate.measure import PeakRss, p90, psnr_db, rss

T0 = time.perf_counter()
HERE = Path(__file__).resolve().parent
MB = 1024**2


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def _sibling(name: str):
    """Import ``bench/<name>.py`` (bench/ is a folder of scripts, not a package)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


# -- what runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One optimized configuration: what the manifest bakes ([build]) and records ([runtime.cacher])."""

    name: str
    family: str
    fuse_qkv: bool = False
    quantize: str | None = None
    cacher: dict[str, Any] | None = None
    default: bool = True  # in the suite unless --configs names it

    @property
    def settings(self) -> str:
        parts = ["fuse_qkv"] if self.fuse_qkv else []
        if self.quantize:
            parts.append(f"{self.quantize} (norms, embeddings kept)")
        if self.cacher:
            args = ", ".join(f"{k}={'calibrated' if k == 'mag_ratios' else v}"
                             for k, v in self.cacher.items() if k != "name")
            parts.append(f"{self.cacher['name']} {args}".strip())
        return " + ".join(parts)


# Cacher settings: the best speed/quality point of the CPU cacher sweep (docs/benchmarks.md,
# "Cachers (CPU)"), start steps at their defaults. PAB and FasterCache only skip attention, a
# small share of a FLUX block at 288 tokens (1.0-1.3x in the sweep, within noise): they cost two
# full-length calls per repetition for nothing to see, so they run only when named.
# Listed (and run) most telling first: when --budget-s runs short, the tail is what gets skipped.
CONFIGS: tuple[Config, ...] = (
    Config("sdxl-deepcache3", "sdxl", cacher={"name": "deepcache", "interval": 3, "branch": 0}),
    Config("flux-fora3", "flux", cacher={"name": "fora", "interval": 3, "start_step": 2}),
    # The CPU combination: fused QKV and int8 weights (half the artifact, same speed on CPU), FORA
    # for the speed: what manifests/tiny-flux.toml bakes, at FORA's best interval.
    Config("flux-fuse-int8wo-fora3", "flux", fuse_qkv=True, quantize="int8wo",
           cacher={"name": "fora", "interval": 3, "start_step": 2}),
    Config("flux-int8wo", "flux", quantize="int8wo"),
    Config("flux-fuse-qkv", "flux", fuse_qkv=True),
    Config("flux-magcache", "flux", cacher={"name": "magcache", "max_skip_steps": 3, "threshold": 0.24,
                                            "mag_ratios": "calibrated"}),
    Config("flux-first-block", "flux", cacher={"name": "first_block", "threshold": 0.5}),
    Config("flux-taylorseer-lite3", "flux", cacher={"name": "taylorseer", "interval": 3, "lite": True}),
    Config("flux-pab4", "flux", cacher={"name": "pab", "interval": 4}, default=False),
    Config("flux-fastercache4", "flux", cacher={"name": "fastercache", "interval": 4}, default=False),
    Config("flux-fuse-fora3", "flux", fuse_qkv=True, cacher={"name": "fora", "interval": 3, "start_step": 2},
           default=False),
)


@dataclass
class Family:
    """A source pipeline and the call every configuration of it is timed on."""

    name: str
    model: str
    make: Callable[[], Any]
    size: int
    steps: int
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    denoiser_params: int | None = None  # measured once the source pipeline exists


def families(quick: bool) -> dict[str, Family]:
    from smash_build.tiny_models import build_tiny

    # In run order: tiny-sdxl first, it is short and must not be what a tight budget drops.
    if quick:
        return {
            "sdxl": Family("sdxl", "tiny-sdxl", lambda: build_tiny("tiny-sdxl", seed=0), 64, 6),
            "flux": Family("flux", "tiny-flux", lambda: build_tiny("tiny-flux", seed=0), 64, 6,
                           {"max_sequence_length": 32}),
        }
    flux_medium = _sibling("cachers").flux_medium
    return {
        "sdxl": Family("sdxl", "tiny-sdxl", lambda: build_tiny("tiny-sdxl", seed=0), 128, 20),
        "flux": Family("flux", "flux-medium: FLUX transformer, 4 double + 8 single blocks, width 640; 8x VAE",
                       lambda: flux_medium(seed=0), 256, 20, {"max_sequence_length": 32}),
    }


def select(names: str | None) -> list[Config]:
    if not names:
        return [c for c in CONFIGS if c.default]
    if names == "all":
        return list(CONFIGS)
    known = {c.name: c for c in CONFIGS}
    wanted = [n.strip() for n in names.split(",") if n.strip() and not n.strip().endswith("-baseline")]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; see --list")
    return [known[n] for n in wanted]


# -- measuring ----------------------------------------------------------------------------------


def settled_rss() -> int:
    """RSS once freed memory is handed back: without the trim, glibc keeps the previous
    configuration's freed pages, the next pipeline reuses them, and its footprint reads ~0."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the footprint may read low
        pass
    return rss()


class Budget:
    """Seconds left before ``--budget-s`` (counted from the start of the process, imports included)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - T0)

    @staticmethod
    def estimate(cfg: Config, baseline_s: float, reps: int) -> float:
        """A configuration's cost: its paired calls (a cacher ran at ~0.4-0.5 of the baseline in the
        cacher sweep, a weight transform at ~1.0) plus build, load and warm-up (~10 s here)."""
        ratio = 0.5 if cfg.cacher else 1.1
        return reps * baseline_s * (1 + ratio) + 10


def generate(pipe, fam: Family, steps: int | None = None):
    """One image (a [1, 3, H, W] tensor in [0, 1]) from the fixed prompt and seed."""
    import torch

    prompt = _sibling("cachers").PROMPT
    return pipe(
        prompt, num_inference_steps=steps or fam.steps, height=fam.size, width=fam.size,
        generator=torch.Generator().manual_seed(0), output_type="pt", **fam.call_kwargs,
    ).images


def timed_call(pipe, fam: Family) -> tuple[float, Any, int]:
    """Latency (s), image and peak RSS of one whole pipeline call."""
    with PeakRss() as memory:
        start = time.perf_counter()
        image = generate(pipe, fam)
        elapsed = time.perf_counter() - start
    return elapsed, image, memory.peak


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


@dataclass
class Row:
    config: str
    family: str
    settings: str
    device: str = "cpu"
    status: str = "ok"
    error: str | None = None
    latencies_s: list[float] = field(default_factory=list)
    baseline_latencies_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    p90_s: float | None = None
    baseline_median_s: float | None = None
    speedup: float | None = None
    peak_rss_mb: float | None = None
    process_peak_rss_mb: float | None = None
    artifact_bytes: int | None = None
    build_s: float | None = None
    load_s: float | None = None
    psnr_db: float | None = None
    identical: bool = False

    def summarize(self, peak_rss: int, rss_before: int) -> None:
        self.median_s = statistics.median(self.latencies_s)
        self.p90_s = p90(self.latencies_s)
        self.baseline_median_s = statistics.median(self.baseline_latencies_s)
        self.speedup = self.baseline_median_s / self.median_s
        self.peak_rss_mb = (peak_rss - rss_before) / MB
        self.process_peak_rss_mb = peak_rss / MB


# -- one family: baseline + its configurations, alternating -------------------------------------


def manifest_text(source: Path, cfg: Config, mag_ratios: list[float] | None) -> str:
    """The manifest a user would write for ``cfg`` (values as JSON, which TOML reads the same)."""
    lines = ["manifest_version = 1", "", "[model]", f"source = {json.dumps(str(source))}", 'dtype = "float32"',
             "", "[build]", f"fuse_qkv = {json.dumps(cfg.fuse_qkv)}"]
    if cfg.quantize:
        lines.append(f'quantize = {{ method = "{cfg.quantize}", exclude = ["norm+embedding"] }}')
    if cfg.cacher:
        lines += ["", "[runtime.cacher]"]
        for key, value in cfg.cacher.items():
            lines.append(f"{key} = {json.dumps(mag_ratios if value == 'calibrated' else value)}")
    lines += ["", "[output]", 'dir = "artifact"', ""]
    return "\n".join(lines)


@dataclass
class Baseline:
    pipe: Any
    row: Row
    rss_before: int
    peak_rss: int = 0  # during the warm-up
    reference: Any = None
    warmup_s: float = 0.0  # a 2-step call: the cost estimate before any full call was timed

    def call(self, fam: Family) -> float:
        # Its peak RSS here would include the optimized pipeline loaded beside it: the baseline's
        # footprint comes from its warm-up, when it is alone.
        latency, image, _peak = timed_call(self.pipe, fam)
        self.row.latencies_s.append(latency)
        if self.reference is None:
            self.reference = image  # same seed every call: every baseline image is this one
        return latency


def load_baseline(fam: Family, source: Path) -> Baseline:
    """The plain diffusers pipeline from the source folder: what users run without smash."""
    from diffusers import DiffusionPipeline

    rss_before = settled_rss()
    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(source)
    load_s = time.perf_counter() - start
    for component in pipe.components.values():
        if hasattr(component, "eval"):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    settled_rss()  # drop what loading freed (diffusers' random init before the weights arrive)
    row = Row(f"{fam.name}-baseline", fam.name, "plain diffusers", artifact_bytes=weight_bytes(source), load_s=load_s)
    return Baseline(pipe, row, rss_before)


def run_config(cfg: Config, fam: Family, base: Baseline, work: Path, reps: int, mag_ratios) -> Row:
    """Build, load, warm up, then ``reps`` x (baseline call, optimized call)."""
    import smash_runtime
    from smash_build.builder import build
    from smash_build.manifest import parse_manifest

    row = Row(cfg.name, fam.name, cfg.settings)
    folder = work / cfg.name
    start = time.perf_counter()
    result = build(parse_manifest(manifest_text(work / "source", cfg, mag_ratios), base_dir=work), out_dir=folder)
    row.build_s = time.perf_counter() - start
    row.artifact_bytes = weight_bytes(folder)
    del result  # the builder's in-memory pipeline: not part of this configuration's footprint
    rss_before = settled_rss()
    start = time.perf_counter()
    pipe = smash_runtime.load(folder, device="cpu")
    row.load_s = time.perf_counter() - start
    generate(pipe, fam, steps=2)  # warm-up: first-call allocations and lazy initialisation
    settled_rss()  # as for the baseline: what loading and warming up freed is not the footprint
    peak = 0
    for _ in range(reps):
        row.baseline_latencies_s.append(base.call(fam))
        latency, image, call_peak = timed_call(pipe, fam)
        row.latencies_s.append(latency)
        peak = max(peak, call_peak)
    psnr = psnr_db(image, base.reference)
    row.identical = math.isinf(psnr)
    row.psnr_db = None if row.identical else psnr
    row.summarize(peak, rss_before)
    del pipe
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)
    return row


def calibrate(base: Baseline, fam: Family) -> list[float]:
    """MagCache's per-step ratios measured on this very model (the published ones are for FLUX.1-dev)."""
    import torch

    from smash_runtime.cachers import calibrate_mag_ratios

    return calibrate_mag_ratios(base.pipe, _sibling("cachers").PROMPT, num_inference_steps=fam.steps,
                                height=fam.size, width=fam.size, generator=torch.Generator().manual_seed(0),
                                **fam.call_kwargs)


def run_family(fam: Family, configs: list[Config], work: Path, reps: int, budget: Budget,
               on_row: Callable[[list[Row]], None]) -> list[Row]:
    """The family's baseline row first (filled in as its calls accumulate), then one row per configuration;
    a configuration predicted to overrun the budget is skipped (a row with status "skipped")."""
    work.mkdir(parents=True)
    log(f"{fam.name}: building the source pipeline ({fam.model}), {fam.size}x{fam.size}, {fam.steps} steps")
    from smash_runtime.cachers import denoiser_of

    source = fam.make()
    fam.denoiser_params = sum(p.numel() for p in denoiser_of(source).parameters())
    # Process warm-up: lazy imports and one-time library set-up land here, not in the baseline's footprint.
    source.set_progress_bar_config(disable=True)
    generate(source, fam, steps=1)
    source.save_pretrained(work / "source")
    del source
    gc.collect()
    base = load_baseline(fam, work / "source")
    start = time.perf_counter()
    with PeakRss() as memory:  # warm-up, alone in memory: the baseline's footprint (a step's working
        generate(base.pipe, fam, steps=2)  # memory and the VAE decode are the same in a 20-step call)
    base.warmup_s = time.perf_counter() - start
    base.peak_rss = memory.peak
    settled_rss()
    mag_ratios = calibrate(base, fam) if any(c.cacher and c.cacher["name"] == "magcache" for c in configs) else None
    rows = [base.row]
    for cfg in configs:
        log(f"{cfg.name}: {cfg.settings}")
        baseline_s = statistics.median(base.row.latencies_s) if base.row.latencies_s else base.warmup_s * fam.steps / 2
        need = budget.estimate(cfg, baseline_s, reps)
        if need > budget.left():
            row = Row(cfg.name, fam.name, cfg.settings, status="skipped",
                      error=f"budget: needs ~{need:.0f} s, {budget.left():.0f} s left")
        else:
            try:
                row = run_config(cfg, fam, base, work, reps, mag_ratios)
            except Exception as exc:  # one broken configuration must not cost the rest of a 10-minute run
                row = Row(cfg.name, fam.name, cfg.settings, status="error", error=f"{type(exc).__name__}: {exc}")
        log(f"{cfg.name}: {_row_summary(row)}")
        rows.append(row)
        if base.row.latencies_s:
            base.row.baseline_latencies_s = list(base.row.latencies_s)
            base.row.summarize(base.peak_rss, base.rss_before)  # speed-up 1 by construction
        on_row(rows)
    return rows


def _row_summary(row: Row) -> str:
    if row.status != "ok":
        return f"{row.status.upper()}: {row.error}"
    psnr = "identical" if row.identical else f"{row.psnr_db:.1f} dB"
    return (f"median {row.median_s:.2f} s vs baseline {row.baseline_median_s:.2f} s: {row.speedup:.2f}x, "
            f"peak {row.peak_rss_mb:.0f} MB, PSNR {psnr}")


# -- the report ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import diffusers
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_average_start": list(os.getloadavg())}


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    head = [
        f"CPU suite{' (--quick)' if report['quick'] else ''}, {report['date']}: {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']} with {m['threads']} thread(s); {s['reps']} alternating baseline/optimized pairs per "
        f"configuration after a 2-step warm-up; suite wall time {report['wall_s']:.0f} s.",
        "",
        "| configuration | settings | device | median (s) | p90 (s) | speed-up | peak mem (MB) | artifact (MB) "
        "| load (s) | PSNR (dB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = []
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['settings']} | {r['device']} | {r['status']}: {r['error']} |||||||")
            continue
        baseline = r["config"].endswith("-baseline")
        psnr = "reference" if baseline else ("identical" if r["identical"] else _fmt(r["psnr_db"], 1))
        speedup = "1.00x" if baseline else f"**{r['speedup']:.2f}x**"
        size = None if r["artifact_bytes"] is None else r["artifact_bytes"] / 1e6
        lines.append(
            f"| {r['config']} | {r['settings']} | {r['device']} | {_fmt(r['median_s'], 2)} | {_fmt(r['p90_s'], 2)} "
            f"| {speedup} | {_fmt(r['peak_rss_mb'], 0)} | {_fmt(size, 1)} | {_fmt(r['load_s'], 2)} | {psnr} |"
        )
    return "\n".join(head + lines) + "\n"


def write_report(report: dict[str, Any], out: Path, md: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    md.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    md.write_text(markdown(report))


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, 64x64, 6 steps, 1 rep (for the tests)")
    p.add_argument("--out", type=Path, default=Path("bench/results/cpu_suite.json"), help="the JSON results")
    p.add_argument("--markdown", type=Path, default=None, help="the Markdown table (default: --out with .md)")
    p.add_argument("--reps", type=int, default=None,
                   help="baseline/optimized pairs per configuration (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    p.add_argument("--configs", default=None,
                   help="comma-separated configuration names, or 'all' (baselines always run)")
    p.add_argument("--budget-s", type=float, default=570,
                   help="skip configurations predicted to end after this many seconds (default 570)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for cfg in CONFIGS:
            print(f"{cfg.name:26} {'' if cfg.default else '(only when named) '}{cfg.settings}")
        return 0
    configs = select(args.configs)
    reps = args.reps or (1 if args.quick else 2)
    md_path = args.markdown or args.out.with_suffix(".md")

    import torch

    from smash_runtime.logs import quiet_third_party_logs

    quiet_third_party_logs()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # from_pretrained's and save_pretrained's bars
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    fams = families(args.quick)
    report: dict[str, Any] = {
        "suite": "cpu",
        "quick": args.quick,
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "settings": {
            "reps": reps,
            "warmup_steps": 2,
            "families": {},
            "memory": ("process RSS (psutil, 10 ms samples) during the configuration's calls minus RSS before its load "
                       "(baseline: during its 2-step warm-up, alone in memory)"),
            "load": "baseline: diffusers from_pretrained; others: smash_runtime.load(verify='full')",
            "artifact": "bytes of *.safetensors files",
        },
        "rows": [],
        "wall_s": 0.0,
    }
    done: list[Row] = []

    def save(rows: list[Row]) -> None:  # after every configuration: a killed run keeps what it measured
        ordered = sorted(done + rows, key=lambda r: r.family != "flux")  # the flux table first
        report["rows"] = [dataclasses.asdict(r) for r in ordered]
        report["settings"]["families"] = {
            f.name: {"model": f.model, "denoiser_params": f.denoiser_params, "size": f.size, "steps": f.steps}
            for f in fams.values()
        }
        report["wall_s"] = time.perf_counter() - T0
        report["machine"]["load_average_end"] = list(os.getloadavg())
        write_report(report, args.out, md_path)

    with tempfile.TemporaryDirectory(prefix="smash-bench-") as tmp:
        for fam in fams.values():
            members = [c for c in configs if c.family == fam.name]
            if members:
                done += run_family(fam, members, Path(tmp) / fam.name, reps, Budget(args.budget_s), save)
                save([])
    log(f"wrote {args.out} and {md_path}")
    print(markdown(report), flush=True)
    return 0 if all(r.status != "error" for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
