"""Fidelity of optimized images to the base model's images, plus learned quality metrics.

Weight-free metrics always run: PSNR (identical images give +inf and are counted as such),
SSIM and MS-SSIM (torchmetrics). Learned metrics run only when their weights are on disk:

=========== ================================================================ ==============
metric      files under ``WEIGHTS_DIR`` (used as ``TORCH_HOME`` and ``HF_HOME``) also needs
=========== ================================================================ ==============
lpips       ``hub/checkpoints/alexnet-owt-7be5be79.pth``                     torchvision
arniqa      ``hub/checkpoints/ARNIQA.pth``, ``hub/checkpoints/regressor_koniq10k.pth`` torchvision
clip_score  a snapshot of ``openai/clip-vit-large-patch14`` in ``hub/`` (the HF cache layout),
            or ``clip_model`` set to a local CLIP folder
=========== ================================================================ ==============

A preflight checks those exact files before anything is loaded; a metric whose file is missing is
reported ``"skipped: missing <file>"`` instead of being computed with random weights, and nothing
is ever downloaded (``HF_HUB_OFFLINE=1`` while the metrics load).

    >>> from smash_build.evaluate.metrics import compute_metrics, preflight
    >>> preflight(["psnr", "lpips"], weights_dir="/data/metric-weights")
    {'psnr': None, 'lpips': 'skipped: missing hub/checkpoints/alexnet-owt-7be5be79.pth'}
    >>> result = compute_metrics(base_images, optimized_images, prompts, ["psnr", "ssim"])
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# The names live with the [evaluate] settings, which must not import torch.
from .settings import DEFAULT_CLIP_MODEL, LEARNED, WEIGHT_FREE, check_metric_names

# Exact files torchmetrics 1.9 reads through torch.hub (relative to TORCH_HOME).
TORCH_HUB_FILES = {
    # torchvision's AlexNet_Weights.IMAGENET1K_V1; LPIPS's linear heads ship inside torchmetrics.
    "lpips": ("hub/checkpoints/alexnet-owt-7be5be79.pth",),
    # miccunifi/ARNIQA release files (the regressor is a pickled module: trust its source).
    "arniqa": ("hub/checkpoints/ARNIQA.pth", "hub/checkpoints/regressor_koniq10k.pth"),
}
_NEEDS_TORCHVISION = ("lpips", "arniqa")
_CLIP_FILES = ("config.json",)
_CLIP_PROCESSOR = ("preprocessor_config.json", "processor_config.json")  # Hub repos / transformers 5 save_pretrained
_CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_CLIP_TOKENIZER = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _weights_roots(weights_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    """(TORCH_HOME, HF hub cache) that the metrics read from."""
    if weights_dir is not None:
        root = Path(weights_dir).expanduser()
        return root, root / "hub"
    from huggingface_hub import constants

    return Path(torch.hub.get_dir()).parent, Path(constants.HF_HUB_CACHE)


def clip_model_folder(clip_model: str, weights_dir: str | os.PathLike | None) -> tuple[Path | None, list[str]]:
    """The local folder holding ``clip_model`` and the files it lacks (empty list: complete)."""
    local = Path(clip_model).expanduser()
    if local.is_dir():
        folder = local
    else:
        from huggingface_hub import try_to_load_from_cache

        _, hub_cache = _weights_roots(weights_dir)
        found = try_to_load_from_cache(clip_model, "config.json", cache_dir=hub_cache)
        if not isinstance(found, str):
            repo_folder = "models--" + clip_model.replace("/", "--")
            return None, [f"hub/{repo_folder}/snapshots/<revision>/config.json"]
        folder = Path(found).parent
    missing = [f for f in _CLIP_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in _CLIP_PROCESSOR):
        missing.append(" or ".join(_CLIP_PROCESSOR))
    if not any((folder / f).is_file() for f in _CLIP_WEIGHTS):
        missing.append(" or ".join(_CLIP_WEIGHTS))
    if not any(all((folder / f).is_file() for f in group) for group in _CLIP_TOKENIZER):
        missing.append("tokenizer.json or vocab.json + merges.txt")
    prefix = "" if local.is_dir() else f"{folder.relative_to(_weights_roots(weights_dir)[1].parent)}/"
    return folder, [prefix + m for m in missing]


def missing_files(name: str, weights_dir: str | os.PathLike | None = None,
                  clip_model: str = DEFAULT_CLIP_MODEL) -> list[str]:
    """Files metric ``name`` needs that are not on disk (relative to the weights folder)."""
    if name in TORCH_HUB_FILES:
        torch_home, _ = _weights_roots(weights_dir)
        return [rel for rel in TORCH_HUB_FILES[name] if not (torch_home / rel).is_file()]
    if name == "clip_score":
        return clip_model_folder(clip_model, weights_dir)[1]
    return []


def preflight(names: Sequence[str], weights_dir: str | os.PathLike | None = None,
              clip_model: str = DEFAULT_CLIP_MODEL) -> dict[str, str | None]:
    """For each metric: None when it can run, else the reason it is skipped (``"skipped: ..."``)."""
    status: dict[str, str | None] = {}
    for name in check_metric_names(names):
        missing = missing_files(name, weights_dir, clip_model)
        reasons = []
        if name in _NEEDS_TORCHVISION and not torchvision_available():
            # torchmetrics builds AlexNet / ResNet-50 with torchvision; without it nothing can run.
            reasons.append("needs torchvision (pip install torchvision matching your torch)")
        if missing:
            reasons.append("missing " + ", ".join(missing))
        status[name] = "skipped: " + "; ".join(reasons) if reasons else None
    return status


@contextlib.contextmanager
def offline_weights(weights_dir: str | os.PathLike | None) -> Iterator[None]:
    """Point torch.hub (and the HF cache) at ``weights_dir`` and forbid downloads, then restore."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if weights_dir is not None:
        root = str(Path(weights_dir).expanduser())
        env.update(TORCH_HOME=root, HF_HOME=root)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if weights_dir is not None and Path(torch.hub.get_dir()) != Path(env["TORCH_HOME"]) / "hub":
            raise RuntimeError(
                f"torch.hub.set_dir() was called ({torch.hub.get_dir()}); metric weights would not be read from {weights_dir}"
            )
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor [N, 3, H, W] in [0, 1]."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class MetricsResult:
    """Per-image values and aggregates for every metric asked for.

    ``per_image[i]`` maps metric -> value for pair i (PSNR may be ``inf``); no-reference metrics
    (ARNIQA, CLIP score) appear as ``<metric>_base`` / ``<metric>_optimized``. ``status`` maps each
    metric to ``"ok"`` or ``"skipped: <reason>"``.
    """

    per_image: list[dict[str, float]] = field(default_factory=list)
    aggregate: dict[str, dict] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)


def summarize_psnr(values: Sequence[float]) -> dict:
    """Mean PSNR over the pairs that differ; identical pairs (inf) are counted, not averaged.

    ``mean_db`` is ``"inf"`` when every pair is identical (JSON has no infinity).
    """
    finite = [v for v in values if math.isfinite(v)]
    identical = len(values) - len(finite)
    return {
        "mean_db": float(np.mean(finite)) if finite else "inf",
        "min_db": float(min(finite)) if finite else "inf",
        "identical": identical,
        "n": len(values),
    }


def compute_metrics(
    base: Sequence[Image.Image],
    optimized: Sequence[Image.Image],
    prompts: Sequence[str],
    names: Sequence[str] = WEIGHT_FREE,
    *,
    weights_dir: str | os.PathLike | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    device: str = "cpu",
) -> MetricsResult:
    """Compare ``optimized[i]`` to ``base[i]`` (same prompt and seed) with each metric in ``names``."""
    if len(base) != len(optimized) or len(base) != len(prompts):
        raise ValueError(f"need as many base images ({len(base)}) as optimized ({len(optimized)}) and prompts ({len(prompts)})")
    names = check_metric_names(names)
    result = MetricsResult(per_image=[{} for _ in base])
    ref, out = to_tensor(base), to_tensor(optimized)
    reasons = preflight(names, weights_dir, clip_model)

    for name in names:
        if reasons[name]:
            result.status[name] = reasons[name]
            continue
        if name in LEARNED:
            with offline_weights(weights_dir):
                values = _LEARNED_FNS[name](ref, out, list(prompts), device=device, weights_dir=weights_dir, clip_model=clip_model)
        else:
            values = _WEIGHT_FREE_FNS[name](ref, out)
        extra = values.pop("_aggregate", {})
        for key, per_image in values.items():
            for row, v in zip(result.per_image, per_image):
                row[key] = float(v)
        result.aggregate[name] = {**_aggregate(name, values), **extra}
        result.status[name] = "ok"
    return result


def _aggregate(name: str, values: dict[str, list[float]]) -> dict:
    if name == "psnr":
        return summarize_psnr(values["psnr"])
    out = {}
    for key, series in values.items():
        suffix = key.removeprefix(name).lstrip("_")
        out[f"mean_{suffix}" if suffix else "mean"] = float(np.mean(series))
    if name in ("arniqa", "clip_score"):
        out["mean_delta"] = out["mean_optimized"] - out["mean_base"]
    return out


def _psnr(ref: torch.Tensor, out: torch.Tensor) -> dict:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    values = peak_signal_noise_ratio(out, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return {"psnr": values.tolist()}


def _ssim(ref: torch.Tensor, out: torch.Tensor) -> dict:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return {"ssim": structural_similarity_index_measure(out, ref, data_range=1.0, reduction="none").tolist()}


def ms_ssim_scales(height: int, width: int, kernel_size: int = 11) -> int:
    """How many of MS-SSIM's 5 scales fit an image, by torchmetrics' own size rule."""
    side = min(height, width)
    fits = [s for s in range(1, 6) if side // max(1, s - 1) ** 2 > kernel_size - 1 and side >= 2**s]
    return max(fits, default=1)


def _ms_ssim(ref: torch.Tensor, out: torch.Tensor) -> dict:
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    # Small images (e.g. 64x64 test renders) cannot hold all 5 scales: use the coarsest that fit,
    # with the standard weights renormalised, and record the count so numbers are not mixed up.
    scales = ms_ssim_scales(*ref.shape[-2:])
    betas = _MS_SSIM_BETAS[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    values = multiscale_structural_similarity_index_measure(out, ref, data_range=1.0, betas=betas, reduction="none")
    return {"ms_ssim": values.tolist(), "_aggregate": {"scales": scales}}


def _lpips(ref, out, prompts, *, device, **_) -> dict:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device).eval()
    with torch.inference_mode():
        values = metric.net(out.to(device), ref.to(device), normalize=True).flatten()
    return {"lpips": values.cpu().tolist()}


def _arniqa(ref, out, prompts, *, device, **_) -> dict:
    from torchmetrics.image.arniqa import ARNIQA

    # The Metric object only accumulates a sum; its .model scores each image.
    model = ARNIQA(regressor_dataset="koniq10k", normalize=True).model.to(device).eval()
    with torch.inference_mode():
        base = model(ref.to(device), normalize=True).flatten().cpu().tolist()
        optimized = model(out.to(device), normalize=True).flatten().cpu().tolist()
    return {"arniqa_base": base, "arniqa_optimized": optimized}


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding;
    # transformers 4 returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _clip_score(ref, out, prompts, *, device, weights_dir, clip_model, **_) -> dict:
    """CLIPScore (Hessel et al. 2021): max(100 * cos(image, text), 0), per image.

    Computed with transformers' CLIPModel directly: torchmetrics 1.9's CLIPScore expects
    transformers 4's tensor outputs and fails on transformers 5.
    """
    from transformers import CLIPModel, CLIPProcessor

    folder, _ = clip_model_folder(clip_model, weights_dir)
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    with torch.inference_mode():
        text = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        text_emb = _features(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                     attention_mask=text["attention_mask"].to(device)))
        text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
        scores = {}
        for side, images in (("base", ref), ("optimized", out)):
            pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
            pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(device)
            image_emb = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
            scores[f"clip_score_{side}"] = (100 * (image_emb * text_emb).sum(-1)).clamp(min=0).cpu().tolist()
    return scores


_WEIGHT_FREE_FNS = {"psnr": _psnr, "ssim": _ssim, "ms_ssim": _ms_ssim}
_LEARNED_FNS = {"lpips": _lpips, "arniqa": _arniqa, "clip_score": _clip_score}
