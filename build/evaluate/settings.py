"""``[evaluate]``: what an evaluation runs, validated like the rest of the manifest.

    >>> from smash_build.evaluate.settings import EvalSettings, settings_from_dict
    >>> settings_from_dict({"num_prompts": 16, "steps": 4, "height": 64, "width": 64})
    EvalSettings(prompts='builtin', num_prompts=16, ...)

A typed model on ``smash_runtime.settings.Settings``: bounds, defaults and descriptions are
declared once here; the manifest's JSON Schema is generated from it and its errors name
``evaluate.<key>``. Checks that need the disk (prompt files, the weights folder) are the
manifest's second pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, MultipleOf
from pydantic import BeforeValidator, Field, StrictBool, StrictInt

from smash_runtime.errors import SettingsError, did_you_mean
from smash_runtime.settings import Allowed, Settings, finite_number

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


def _metrics(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise SettingsError("", value, f"a list of metric names from {', '.join(METRICS)}")
    return check_metric_names(value, key="")


def _seeds(value: Any) -> tuple[int, ...]:
    seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise SettingsError("", value, "a non-empty list of integers >= 0 (or one integer)")
    return tuple(seeds)


def _side(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 16 and value % 8:
        raise SettingsError("", value, "a multiple of 8 (diffusion VAEs downsample by 8)")
    return value


def _device(value: Any) -> str:
    if value not in DEVICES and not (isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit()):
        raise SettingsError("", value, f"one of {', '.join(DEVICES)} (or cuda:N)",
                            did_you_mean(str(value), DEVICES) if isinstance(value, str) else None)
    return value


def _path(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


Side = Annotated[StrictInt, Ge(16), MultipleOf(8), BeforeValidator(_side)]
PathText = Annotated[str, BeforeValidator(_path), Allowed("a path")]


class EvalSettings(Settings):
    """One evaluation: every image is (prompt, seed) for each prompt and each seed.

    ``steps``/``height``/``width``/``guidance_scale`` left at None use the pipeline's defaults.
    ``warmup`` generations per side are run first and excluded from the timings.
    ``isolate`` runs each side in its own process, so peak memory belongs to that side alone.
    ``threads`` sets torch's CPU threads for both sides (default: torch's own choice).
    """

    where: ClassVar[str] = "[evaluate]"

    prompts: Annotated[str, Allowed("'builtin', a prompt file path or a Hub dataset id")] = Field(
        "builtin", min_length=1, description="builtin, a prompt file (.txt .json .jsonl .csv .tsv) or a Hub dataset "
                                             "hf://datasets/ORG/NAME")
    num_prompts: StrictInt | None = Field(16, ge=1, description="prompts used from the set")
    seeds: Annotated[tuple[int, ...], BeforeValidator(_seeds)] = Field(
        (0,), min_length=1, description="one image per prompt and seed")
    steps: StrictInt | None = Field(None, ge=1, description="denoising steps (default: the pipeline's)")
    height: Side | None = Field(None, description="image height (default: the pipeline's)")
    width: Side | None = Field(None, description="image width (default: the pipeline's)")
    guidance_scale: Annotated[float, Ge(0), BeforeValidator(finite_number)] | None = Field(
        None, description="guidance scale (default: the pipeline's)")
    metrics: Annotated[tuple[Literal[METRICS], ...], BeforeValidator(_metrics)] = Field(
        METRICS, description="fidelity metrics: " + ", ".join(METRICS))
    device: Annotated[str, BeforeValidator(_device)] = Field(
        "auto", pattern="^(" + "|".join(DEVICES) + r"|cuda:\d+)$", description="where both sides run")
    warmup: StrictInt = Field(1, ge=0, description="generations per side run first, excluded from timings")
    weights_dir: PathText | None = Field(None, description="folder holding metric weights (LPIPS, ARNIQA, CLIP)")
    clip_model: PathText = Field(DEFAULT_CLIP_MODEL, description="CLIP model for clip_score")
    num_samples: StrictInt = Field(4, ge=0, description="sample images kept in the report")
    isolate: StrictBool = Field(True, description="run each side in its own process")
    threads: StrictInt | None = Field(None, ge=1, description="torch CPU threads for both sides")
    base_dir: PathText | None = Field(None, exclude=True, repr=False,
                                      description="the manifest's folder, for relative paths (not a key)")

    def __eq__(self, other: object) -> bool:  # base_dir is where it came from, not what it is
        return isinstance(other, EvalSettings) and self.record() == other.record()

    __hash__ = None  # type: ignore[assignment]

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def generation(self) -> dict[str, Any]:
        """Keyword arguments of ``smash_runtime.images.generate`` (seed and prompt excepted)."""
        return {"steps": self.steps, "height": self.height, "width": self.width, "guidance_scale": self.guidance_scale}

    def record(self) -> dict[str, Any]:
        """The normalized table (every default filled), as recorded in results and read back by ``settings_from_dict``."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> EvalSettings:
        return settings_from_dict({**self.record(), "base_dir": self.base_dir, **changes})


EVALUATE_KEYS = tuple(k for k in EvalSettings.model_fields if k != "base_dir")
"""The keys of the manifest's ``[evaluate]`` table (``base_dir`` is the manifest's folder, not a key)."""


def settings_from_dict(values: dict[str, Any] | None, base_dir: str | Path | None = None) -> EvalSettings:
    """Validate an ``[evaluate]`` table (errors name ``evaluate.<key>``, the value and what is allowed)."""
    values = dict(values or {})
    if base_dir is not None:
        values.setdefault("base_dir", str(base_dir))
    try:
        settings = EvalSettings.parse(values)
    except SettingsError as e:
        problems = [p.with_prefix("evaluate") for p in getattr(e, "errors", [e])]
        problems[0].errors = problems
        raise problems[0] from None
    weights, base = settings.weights_dir, settings.base_dir
    if weights and base and not Path(weights).expanduser().is_absolute():
        settings = settings.model_copy(update={"weights_dir": str(Path(base) / weights)})
    return settings
