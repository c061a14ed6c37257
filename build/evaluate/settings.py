"""``[evaluate]``: what an evaluation runs, validated like the rest of the manifest.

    >>> from smash_build.evaluate.settings import EvalSettings, settings_from_dict
    >>> settings_from_dict({"num_prompts": 16, "steps": 4, "height": 64, "width": 64})
    EvalSettings(prompts='builtin', num_prompts=16, ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smash_runtime.errors import SettingsError, did_you_mean

DEVICES = ("auto", "cpu", "cuda", "mps")
EVAL_DIR = "eval"
"""The artifact's folder holding evaluation results, samples and plots."""
WEIGHT_FREE = ("psnr", "ssim", "ms_ssim")
LEARNED = ("lpips", "arniqa", "clip_score")
METRICS = WEIGHT_FREE + LEARNED
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIPScore model


def check_metric_names(names: Sequence[str], key: str = "evaluate.metrics") -> tuple[str, ...]:
    """Validate metric names (SettingsError naming the bad one), keeping their order."""
    for name in names:
        if name not in METRICS:
            raise SettingsError(key, name, f"one of {', '.join(METRICS)}", did_you_mean(name, METRICS))
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation: every image is (prompt, seed) for each prompt and each seed.

    ``steps``/``height``/``width``/``guidance_scale`` left at None use the pipeline's defaults.
    ``warmup`` generations per side are run first and excluded from the timings.
    ``isolate`` runs each side in its own process, so peak memory belongs to that side alone.
    ``threads`` sets torch's CPU threads for both sides (default: torch's own choice).
    """

    prompts: str = "builtin"
    num_prompts: int | None = 16
    seeds: tuple[int, ...] = (0,)
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    metrics: tuple[str, ...] = METRICS
    device: str = "auto"
    warmup: int = 1
    weights_dir: str | None = None
    clip_model: str = DEFAULT_CLIP_MODEL
    num_samples: int = 4
    isolate: bool = True
    threads: int | None = None
    base_dir: str | None = field(default=None, compare=False)  # the manifest's folder, for relative paths

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def generation(self) -> dict[str, Any]:
        """Keyword arguments of ``smash_runtime.images.generate`` (seed and prompt excepted)."""
        return {"steps": self.steps, "height": self.height, "width": self.width, "guidance_scale": self.guidance_scale}

    def record(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("base_dir")
        out["seeds"] = list(self.seeds)
        out["metrics"] = list(self.metrics)
        return out

    def replace(self, **changes: Any) -> EvalSettings:
        return settings_from_dict({**self.record(), "base_dir": self.base_dir, **changes})


_FIELDS = [f.name for f in dataclasses.fields(EvalSettings)]
EVALUATE_KEYS = tuple(k for k in _FIELDS if k != "base_dir")
"""The keys of the manifest's ``[evaluate]`` table (``base_dir`` is the manifest's folder, not a key)."""


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"evaluate.{key}", value, f"an integer >= {minimum}")
    return value


def settings_from_dict(values: dict[str, Any] | None, base_dir: str | Path | None = None) -> EvalSettings:
    """Validate an ``[evaluate]`` table (errors name ``evaluate.<key>``, the value and what is allowed)."""
    values = dict(values or {})
    if base_dir is not None:
        values.setdefault("base_dir", str(base_dir))
    for key in values:
        if key not in _FIELDS:
            raise SettingsError(f"evaluate.{key}", values[key], f"not a key of [evaluate]; keys are {', '.join(_FIELDS[:-1])}",
                                did_you_mean(key, _FIELDS))
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None and key in ("num_prompts", "steps", "height", "width", "guidance_scale", "weights_dir", "base_dir",
                                     "threads"):
            out[key] = None
        elif key == "prompts":
            if not isinstance(value, str) or not value:
                raise SettingsError("evaluate.prompts", value, "'builtin', a prompt file path or a Hub dataset id")
            out[key] = value
        elif key in ("num_prompts", "steps", "num_samples"):
            out[key] = _positive_int(key, value, 0 if key == "num_samples" else 1)
        elif key == "threads":
            out[key] = _positive_int(key, value, 1)
        elif key == "warmup":
            out[key] = _positive_int(key, value, 0)
        elif key in ("height", "width"):
            out[key] = _positive_int(key, value, 16)
            if value % 8:
                raise SettingsError(f"evaluate.{key}", value, "a multiple of 8 (diffusion VAEs downsample by 8)")
        elif key == "seeds":
            seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(seeds, (list, tuple)) or not seeds or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
                raise SettingsError("evaluate.seeds", value, "a non-empty list of integers >= 0 (or one integer)")
            out[key] = tuple(seeds)
        elif key == "guidance_scale":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise SettingsError("evaluate.guidance_scale", value, "a number >= 0")
            out[key] = float(value)
        elif key == "metrics":
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise SettingsError("evaluate.metrics", value, f"a list of metric names from {', '.join(METRICS)}")
            out[key] = check_metric_names(value)
        elif key == "device":
            if value not in DEVICES and not (isinstance(value, str) and value.startswith("cuda:")):
                raise SettingsError("evaluate.device", value, f"one of {', '.join(DEVICES)} (or cuda:N)", did_you_mean(str(value), DEVICES))
            out[key] = value
        elif key in ("weights_dir", "clip_model", "base_dir"):
            if not isinstance(value, (str, Path)):
                raise SettingsError(f"evaluate.{key}", value, "a path")
            out[key] = str(value)
        elif key == "isolate":
            if not isinstance(value, bool):
                raise SettingsError("evaluate.isolate", value, "true or false")
            out[key] = value
    if out.get("weights_dir") and out.get("base_dir") and not Path(out["weights_dir"]).expanduser().is_absolute():
        out["weights_dir"] = str(Path(out["base_dir"]) / out["weights_dir"])
    return EvalSettings(**out)
