"""PNG plots of an evaluation (matplotlib, headless Agg backend)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on build machines; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

_SAVE = {"dpi": 100, "metadata": {"Software": None}}  # no version/time stamps in the PNGs


def plot_samples_grid(evaluation, path: Path, num_samples: int) -> Path:
    """Rows: the first ``num_samples`` (prompt, seed) pairs; columns: base, then each configuration."""
    labels = ["base", *evaluation.images]
    n = min(num_samples, len(evaluation.base_images))
    fig, axes = plt.subplots(n, len(labels), figsize=(2.6 * len(labels), 2.9 * n), squeeze=False)
    per_image = {c["label"]: c["per_image"] for c in evaluation.results["configurations"]}
    jobs = evaluation.results["configurations"][0]["per_image"]
    prompts = evaluation.results["prompts"]
    for i in range(n):
        for j, label in enumerate(labels):
            ax = axes[i][j]
            image = evaluation.base_images[i] if label == "base" else evaluation.images[label][i]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=10)
            if label != "base":
                psnr = per_image[label][i].get("psnr")
                if psnr is not None:
                    ax.set_xlabel("identical" if math.isinf(psnr) else f"PSNR {psnr:.1f} dB", fontsize=8)
        text = prompts[jobs[i]["prompt_index"]]["text"]
        axes[i][0].set_ylabel("\n".join(textwrap.wrap(text, 28)[:3]) + f"\nseed {jobs[i]['seed']}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, **_SAVE)
    plt.close(fig)
    return path


def plot_latency(results: dict[str, Any], path: Path) -> Path:
    """Median latency per image (p90 as the error bar) for the base and each configuration."""
    sides = [("base", results["base"])] + [(c["label"], c) for c in results["configurations"]]
    labels = [label for label, _ in sides]
    medians = [s["latency"]["median_ms"] for _, s in sides]
    p90 = [s["latency"]["p90_ms"] - s["latency"]["median_ms"] for _, s in sides]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(sides) + 2), 3.2))
    bars = ax.bar(labels, medians, yerr=[[0] * len(p90), p90], capsize=4,
                  color=["#888888"] + ["#2a7ab9"] * (len(sides) - 1))
    for bar, value in zip(bars, medians):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("latency per image (ms, median; bar to p90)")
    ax.set_title(f"on {results['settings']['device']}, {results['settings']['steps_used']} steps")
    fig.tight_layout()
    fig.savefig(path, **_SAVE)
    plt.close(fig)
    return path


def plot_latency_vs_fidelity(results: dict[str, Any], path: Path) -> Path:
    """Latency against SSIM and PSNR to the base, one point per configuration; the base latency as a line."""
    configs = results["configurations"]
    base_ms = results["base"]["latency"]["median_ms"]
    panels = [("ssim", "SSIM vs base (1 = identical)"), ("psnr", "PSNR vs base (dB)")]
    panels = [(k, t) for k, t in panels if any(c["metric_status"].get(k) == "ok" for c in configs)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        finite = [c["fidelity"]["psnr"]["mean_db"] for c in configs
                  if key == "psnr" and c["metric_status"].get("psnr") == "ok" and c["fidelity"]["psnr"]["mean_db"] != "inf"]
        top = (max(finite) + 5.0) if finite else 50.0  # where "identical" (infinite PSNR) is drawn
        for c in configs:
            if c["metric_status"].get(key) != "ok":
                continue
            x = c["latency"]["median_ms"]
            if key == "psnr":
                value = c["fidelity"]["psnr"]["mean_db"]
                y, note = (top, " (identical)") if value == "inf" else (value, "")
            else:
                y, note = c["fidelity"]["ssim"]["mean"], ""
            ax.scatter([x], [y], color="#2a7ab9")
            ax.annotate(c["label"] + note, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.axvline(base_ms, color="#888888", linestyle="--", label=f"base {base_ms:.1f} ms")
        ax.set_xlabel("latency per image, median (ms)")
        ax.set_ylabel(title)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("latency vs fidelity: further left is faster, higher is closer to the base", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, **_SAVE)
    plt.close(fig)
    return path
