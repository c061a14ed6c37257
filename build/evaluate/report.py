"""Write an evaluation into the artifact: eval/results.json, sample pairs, plots, the model card.

The summary table (console, model card) is computed once from results.json's numbers, rounded,
and stored in results.json under ``summary``; the card renders exactly those values, so a number
in the card is always the number in results.json.

    eval/results.json             every number, the machine, library versions, the settings
    eval/samples/NN-base.png      base image of pair NN
    eval/samples/NN-<label>.png   the same prompt and seed through the artifact
    eval/samples_grid.png         base vs optimized, side by side
    eval/latency.png              median latency per configuration
    eval/latency_vs_fidelity.png  the chart to choose a runtime setting from (several configurations)
    README.md                     model card with the results table
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smash_runtime.format import read_record

from ..exporters.artifact import refresh_file_table
from ..model_card import format_cell, render_model_card, results_table_markdown
from .settings import EVAL_DIR

if TYPE_CHECKING:  # the runner calls write_report; importing it back would make a cycle
    from .runner import Evaluation

MIB = 1024 * 1024


def _r(value: float | None, digits: int) -> float | None:
    if value is None:
        return None
    return round(float(value), digits)


def _psnr_value(agg: dict | None, status: str | None) -> Any:
    if status != "ok" or not agg:
        return "skipped"
    return "identical" if agg["mean_db"] == "inf" else _r(agg["mean_db"], 2)


def summary_table(results: dict[str, Any]) -> dict[str, Any]:
    """Columns (``base`` then each configuration) and rows of rounded values (str for skipped/identical)."""
    base = results["base"]
    configs = results["configurations"]
    columns = ["base"] + [c["label"] for c in configs]
    memory_kind = base["memory"]["kind"]
    memory_label = "peak CUDA memory allocated (MiB)" if memory_kind == "cuda_max_allocated" else "peak RSS (MiB)"
    rows: list[dict[str, Any]] = []

    def row(name: str, base_value: Any, values: list[Any]) -> None:
        rows.append({"metric": name, "values": dict(zip(columns, [base_value, *values]))})

    sides = [base, *configs]
    row("latency per image, median (ms)", *_split([_r(s["latency"]["median_ms"], 2) for s in sides]))
    row("latency per image, p90 (ms)", *_split([_r(s["latency"]["p90_ms"], 2) for s in sides]))
    row("latency per denoising step (ms)", *_split([_r(s["latency"]["per_step_ms"], 3) for s in sides]))
    row("throughput (images/s)", *_split([_r(s["latency"]["throughput_images_per_s"], 3) for s in sides]))
    row("speed-up vs base (x)", 1.0, [_r(c["speedup"], 2) for c in configs])
    row(memory_label, *_split([_r(s["memory"]["peak_bytes"] / MIB, 1) for s in sides]))
    row("load time (s)", *_split([_r(s["load_s"], 2) for s in sides]))
    row("weights size (MiB)", *_split([_r(s["size_bytes"] / MIB, 2) for s in sides]))
    row("size vs base (x)", 1.0, [_r(c["size_ratio"], 3) for c in configs])

    def status(c, name):
        return c["metric_status"].get(name)

    def cell(c, name, value):
        # A skipped metric shows "skipped" here; its reason is listed under the table (and in results.json).
        return value(c["fidelity"]) if status(c, name) == "ok" else "skipped"

    if any(status(c, "psnr") for c in configs):
        row("PSNR vs base (dB)", None, [_psnr_value(c["fidelity"].get("psnr"), status(c, "psnr")) for c in configs])
        row("images identical to base", None,
            [cell(c, "psnr", lambda f: f"{f['psnr']['identical']}/{f['psnr']['n']}") for c in configs])
    if any(status(c, "ssim") for c in configs):
        row("SSIM vs base", None, [cell(c, "ssim", lambda f: _r(f["ssim"]["mean"], 4)) for c in configs])
    if any(status(c, "ms_ssim") for c in configs):
        scales = {c["fidelity"]["ms_ssim"]["scales"] for c in configs if status(c, "ms_ssim") == "ok"}
        label = "MS-SSIM vs base" + (f" ({min(scales)} scales: small images)" if scales and min(scales) < 5 else "")
        row(label, None, [cell(c, "ms_ssim", lambda f: _r(f["ms_ssim"]["mean"], 4)) for c in configs])
    if any(status(c, "lpips") for c in configs):
        row("LPIPS vs base (lower is closer)", None, [cell(c, "lpips", lambda f: _r(f["lpips"]["mean"], 4)) for c in configs])
    for name, label in (("arniqa", "ARNIQA quality (higher is better)"), ("clip_score", "CLIP score (prompt adherence)")):
        if any(status(c, name) for c in configs):
            ok = [c for c in configs if status(c, name) == "ok"]
            base_value = _r(ok[0]["fidelity"][name]["mean_base"], 3) if ok else None
            row(label, base_value, [cell(c, name, lambda f, n=name: _r(f[n]["mean_optimized"], 3)) for c in configs])
    notes = {}
    for c in configs:
        for name, text in c["metric_status"].items():
            if text != "ok":
                notes[name] = text
    return {"columns": columns, "rows": rows, "notes": notes}


def _split(values: list[Any]) -> tuple[Any, list[Any]]:
    return values[0], values[1:]


def _json_default(obj: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """JSON has no infinity: +inf PSNR (identical images) is written as the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "config"


def write_samples(evaluation: Evaluation, num_samples: int) -> list[Path]:
    folder = evaluation.root / EVAL_DIR / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    from smash_runtime.images import encode_png

    written = []
    for i in range(min(num_samples, len(evaluation.base_images))):
        pairs = [("base", evaluation.base_images[i])] + [(label, imgs[i]) for label, imgs in evaluation.images.items()]
        for label, image in pairs:
            path = folder / f"{i:02d}-{_slug(label)}.png"
            path.write_bytes(encode_png(image))
            written.append(path)
    return written


def write_report(evaluation: Evaluation, num_samples: int = 4) -> list[Path]:
    """Write results.json, samples, plots and README.md into the artifact; refresh smash.json's file table."""
    from .plots import plot_latency, plot_latency_vs_fidelity, plot_samples_grid

    root = evaluation.root
    out = root / EVAL_DIR
    try:
        if out.exists():
            import shutil

            shutil.rmtree(out)  # a stale sample or plot of an earlier run must not survive next to new numbers
        out.mkdir(parents=True)
        results = evaluation.results
        results["summary"] = summary_table(results)
        written = write_samples(evaluation, num_samples)
        if num_samples:
            written.append(plot_samples_grid(evaluation, out / "samples_grid.png", num_samples))
        written.append(plot_latency(results, out / "latency.png"))
        if len(results["configurations"]) > 1:
            written.append(plot_latency_vs_fidelity(results, out / "latency_vs_fidelity.png"))
        results["files"] = sorted(p.relative_to(root).as_posix() for p in written)
        path = out / "results.json"
        path.write_text(json.dumps(_finite(results), indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
        written.append(path)

        record = read_record(root).to_dict()
        record.pop("files", None)
        card = render_model_card(record, results_table_markdown(results["summary"], format_cell), evaluation=results)
        (root / "README.md").write_text(card, encoding="utf-8")
        written.append(root / "README.md")
    finally:
        # whatever happened, smash.json must list exactly the files on disk, or loading would refuse the artifact
        refresh_file_table(root)
    return written


def print_summary(results: dict[str, Any], console=None) -> None:
    """The summary table on the terminal (the same values as the model card)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    summary = results.get("summary") or summary_table(results)
    s = results["settings"]
    table = Table(title=f"evaluation: {s['images']} images, {s['steps_used']} steps, "
                        f"{s.get('height') or 'default'}x{s.get('width') or 'default'}, on {s['device']}")
    table.add_column("metric")
    for col in summary["columns"]:
        table.add_column(col, justify="right")
    for row in summary["rows"]:
        table.add_row(row["metric"], *(format_cell(row["values"].get(c)) for c in summary["columns"]))
    console.print(table)
    for name, text in summary.get("notes", {}).items():
        console.print(f"[yellow]{name}[/]: {text}")
