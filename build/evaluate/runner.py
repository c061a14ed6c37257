"""Evaluate an artifact against its base: same prompts, seeds, settings and device, one after the other.

The **base** is the source pipeline untransformed (no cacher, no compiler); each
**configuration** is the artifact loaded through ``smash_runtime.load`` with a runtime setting
(by default the one recorded in smash.json). Every side runs in its own process unless
``settings.isolate`` is false, so peak memory is that side's alone.

    >>> from smash_build.evaluate.runner import RuntimeConfig, evaluate
    >>> from smash_build.evaluate.settings import settings_from_dict
    >>> ev = evaluate("dist/tiny-flux", settings_from_dict({"num_prompts": 16, "steps": 4, "height": 64, "width": 64}))
    >>> ev.results["configurations"][0]["fidelity"]["psnr"]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smash_runtime.errors import ArtifactError, SmashError
from smash_runtime.format import RECORD_FILE, ArtifactRecord, read_record

from .metrics import MetricsResult, compute_metrics, preflight
from .phase import PROGRESS_MARK, PhaseSpec, run_phase
from .prompts import Prompt, load_prompts
from .settings import EVAL_DIR, EvalSettings

RESULTS_FORMAT = "smash-eval"
RESULTS_VERSION = 1


class EvaluationError(SmashError):
    """A side of the evaluation failed (its process's error output is included)."""


@dataclass(frozen=True)
class RuntimeConfig:
    """How the artifact is loaded for one configuration: ``True`` = as recorded, ``None``/``False`` = off, or a table."""

    label: str = "optimized"
    cacher: bool | dict[str, Any] | None = True
    compiler: bool | dict[str, Any] | None = True


@dataclass(frozen=True)
class BaseSpec:
    """The untransformed source: what ``smash_build.sources.load_source`` takes."""

    id: str
    revision: str | None = None
    dtype: str = "float32"
    base_dir: str | None = None

    @classmethod
    def from_record(cls, record: ArtifactRecord) -> BaseSpec:
        src = record.source
        if src is None or not src.id:
            raise ArtifactError("smash.json has no source id; pass the base model explicitly (--base)", file=RECORD_FILE,
                                field="source.id")
        # The resolved commit, not the branch name: the base must be the weights the artifact was built from.
        return cls(src.id, src.commit or src.revision, record.dtype or "float32")


@dataclass
class Evaluation:
    results: dict[str, Any]
    base_images: list[Image.Image]
    images: dict[str, list[Image.Image]]  # label -> optimized images
    prompts: list[Prompt]
    root: Path
    written: list[Path] = field(default_factory=list)


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:  # psutil is a dependency; the record is still useful without it
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        info.update(gpu=torch.cuda.get_device_name(dev), gpu_capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
                    cuda=torch.version.cuda, gpu_memory_bytes=torch.cuda.get_device_properties(dev).total_memory)
    return info


def latency_stats(latencies_s: Sequence[float], steps: int | None) -> dict[str, Any]:
    """Median / p90 / mean per image (ms), per denoising step (end-to-end / steps), throughput."""
    arr = np.asarray(latencies_s, dtype=float) * 1000.0
    median = float(np.median(arr))
    return {
        "n": len(arr),
        "median_ms": median,
        "p90_ms": float(np.percentile(arr, 90)),
        "mean_ms": float(arr.mean()),
        "min_ms": float(arr.min()),
        "max_ms": float(arr.max()),
        "per_step_ms": median / steps if steps else None,
        "throughput_images_per_s": float(len(arr) / (arr.sum() / 1000.0)),
    }


def artifact_weight_bytes(record: ArtifactRecord) -> int:
    """Bytes of the artifact's weight files (evaluation outputs and the model card excluded)."""
    return sum(f.size for rel, f in record.files.items() if rel.endswith(".safetensors"))


def artifact_total_bytes(record: ArtifactRecord) -> int:
    return sum(f.size for rel, f in record.files.items() if not rel.startswith(EVAL_DIR + "/") and rel != "README.md")


class _Reporter:
    """rich progress bars for each phase (silent when ``enabled`` is false)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def task(self, description: str, total: int | None = None):
        if self.progress is None:
            return lambda event: None
        task_id = self.progress.add_task(f"{description}: loading", total=total)

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "loaded":
                self.progress.update(task_id, description=f"{description}: generating (loaded in {event['load_s']:.1f} s)",
                                     total=event["total"])
            elif event["event"] == "image":
                self.progress.update(task_id, completed=event["done"])
            elif event["event"] == "done":
                self.progress.update(task_id, description=f"{description}: {event['text']}", completed=event.get("completed", 1),
                                     total=event.get("total", 1))

        return on_event


def _run_isolated(spec: PhaseSpec, workdir: Path, on_event) -> dict[str, Any]:
    name = spec["label"].replace("/", "_")
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    stderr_path = workdir / f"{name}.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "smash_build.evaluate.phase", str(spec_path), str(result_path)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            if line.startswith(PROGRESS_MARK):
                on_event(json.loads(line[len(PROGRESS_MARK):]))
        code = proc.wait()
    if code != 0 or not result_path.exists():
        tail = stderr_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise EvaluationError(f"the {spec['label']} side failed (exit {code}):\n{tail}")
    return json.loads(result_path.read_text(encoding="utf-8"))


def _run(spec: PhaseSpec, settings: EvalSettings, workdir: Path, on_event) -> dict[str, Any]:
    if settings.isolate:
        return _run_isolated(spec, workdir, on_event)
    return run_phase(spec, on_event)


def _load_images(result: dict[str, Any]) -> list[Image.Image]:
    folder = Path(result["image_dir"])
    out = []
    for name in result["images"]:
        with Image.open(folder / name) as img:
            out.append(img.convert("RGB"))
    return out


def _config_record(cfg: RuntimeConfig, phase: dict[str, Any]) -> dict[str, Any]:
    # what the loader actually applied (LoadInfo), not what was asked for
    return {"label": cfg.label, "cacher": phase.get("cacher"), "compiler": phase.get("compiler")}


def evaluate(
    artifact: str | os.PathLike,
    settings: EvalSettings,
    *,
    base: BaseSpec | None = None,
    configurations: Sequence[RuntimeConfig] = (RuntimeConfig(),),
    write: bool = True,
    progress: bool = True,
) -> Evaluation:
    """Run the base and each configuration of ``artifact``; compute metrics; write ``eval/`` and README.md.

    Args:
        artifact: the artifact folder.
        settings: prompts, seeds, generation settings, metrics, device.
        base: the untransformed source (default: the source recorded in smash.json).
        configurations: runtime settings to evaluate the artifact with (a sweep passes several).
        write: write ``eval/``, the model card and the refreshed file table into the artifact.
        progress: show progress bars.
    """
    root = Path(artifact)
    record = read_record(root)
    base = base or BaseSpec.from_record(record)
    settings = fill_from_warmup(settings, record)
    labels = [c.label for c in configurations]
    if not configurations or len(set(labels)) != len(labels) or "base" in labels:
        raise ValueError(f"configuration labels must be unique, non-empty and not 'base': {labels}")
    prompts = load_prompts(settings.prompts, settings.num_prompts, settings.base_dir)
    jobs = [{"prompt": p.text, "seed": s, "prompt_index": i} for i, p in enumerate(prompts) for s in settings.seeds]
    device = settings.resolved_device()
    skipped = {k: v for k, v in preflight(settings.metrics, settings.weights_dir, settings.clip_model).items() if v}

    common = {"jobs": jobs, "generation": settings.generation(), "device": device, "warmup": settings.warmup,
              "threads": settings.threads}
    with tempfile.TemporaryDirectory(prefix="smash-eval-") as tmp, _Reporter(progress) as reporter:
        workdir = Path(tmp)
        for name, reason in skipped.items():
            reporter.task(f"metric {name}")({"event": "done", "text": reason})
        base_spec = {**common, "side": "base", "label": "base", "image_dir": str(workdir / "base"),
                     "source": {"id": base.id, "revision": base.revision, "dtype": base.dtype, "base_dir": base.base_dir}}
        base_phase = _run(base_spec, settings, workdir, reporter.task(f"base ({base.id})"))
        base_images = _load_images(base_phase)
        phases, images, fidelity = [], {}, {}
        for cfg in configurations:
            spec = {**common, "side": "artifact", "label": cfg.label, "image_dir": str(workdir / f"cfg-{len(phases)}"),
                    "artifact": str(root.resolve()), "cacher": cfg.cacher, "compiler": cfg.compiler}
            phase = _run(spec, settings, workdir, reporter.task(cfg.label))
            phases.append(phase)
            images[cfg.label] = _load_images(phase)
            on_metrics = reporter.task(f"metrics {cfg.label}")
            fidelity[cfg.label] = compute_metrics(base_images, images[cfg.label], [j["prompt"] for j in jobs], settings.metrics,
                                                  weights_dir=settings.weights_dir, clip_model=settings.clip_model,
                                                  device=device)
            on_metrics({"event": "done", "text": "done"})
        results = build_results(record, root, settings, base, prompts, jobs, base_phase, configurations, phases, fidelity, device)
    evaluation = Evaluation(results, base_images, images, prompts, root)
    if write:
        from .report import write_report

        evaluation.written = write_report(evaluation, settings.num_samples)
    return evaluation


def fill_from_warmup(settings: EvalSettings, record: ArtifactRecord) -> EvalSettings:
    """Unset steps/height/width default to the artifact's first warm-up shape: the shape it is built to serve."""
    shapes = (record.runtime_settings.warmup or {}).get("shapes") or []
    if not shapes:
        return settings
    shape = shapes[0]
    changes = {k: shape[k] for k in ("steps", "height", "width") if getattr(settings, k) is None and shape.get(k)}
    return settings.replace(**changes) if changes else settings


def _side_record(phase: dict[str, Any]) -> dict[str, Any]:
    return {
        "latency": latency_stats(phase["latencies_s"], phase["steps"]),
        "latencies_s": phase["latencies_s"],
        "warmup_s": phase["warmup_s"],
        "load_s": phase["load_s"],
        "import_s": phase["import_s"],
        "load_phases_s": phase["load_phases"],
        "memory": phase["memory"],
        "weights_in_memory_bytes": phase["weights_bytes"],
    }


def build_results(record: ArtifactRecord, root, settings, base, prompts, jobs, base_phase, configurations, phases,
                  fidelity: dict[str, MetricsResult], device) -> dict[str, Any]:
    """results.json: every number, the machine, library versions and the settings."""
    base_side = _side_record(base_phase)
    base_side["size_bytes"] = base_phase["weights_bytes"]
    base_median = base_side["latency"]["median_ms"]
    weights = artifact_weight_bytes(record)
    configs = []
    for cfg, phase in zip(configurations, phases):
        side = _side_record(phase)
        metrics = fidelity[cfg.label]
        configs.append({
            **_config_record(cfg, phase),
            **side,
            "size_bytes": weights,
            "speedup": base_median / side["latency"]["median_ms"],
            "size_ratio": weights / base_side["size_bytes"] if base_side["size_bytes"] else None,
            "fidelity": metrics.aggregate,
            "metric_status": metrics.status,
            "per_image": [{"prompt_index": j["prompt_index"], "seed": j["seed"], **row} for j, row in zip(jobs, metrics.per_image)],
        })
    return {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_VERSION,
        "artifact": {"name": record.name or root.name, "total_bytes": artifact_total_bytes(record),
                     "weights_bytes": weights, **{k: record.to_dict().get(k) for k in ("transforms", "runtime")}},
        "base": {"source": base.id, "revision": base.revision, "dtype": base.dtype, **base_side},
        "configurations": configs,
        "settings": {**settings.record(), "device": device, "steps_used": base_phase["steps"], "images": len(jobs),
                     "torch_threads": base_phase["threads"],
                     "load_verify": "full"},
        "prompts": [{"text": p.text, "category": p.category} for p in prompts],
        "machine": machine_info(device),
        "versions": library_versions(),
    }


def library_versions() -> dict[str, str]:
    from ..builder import library_versions as build_versions

    return {"python": platform.python_version(), **build_versions(extra=("torchmetrics", "numpy"))}
