"""Load the source pipeline a manifest names: a built-in tiny model, a local folder or a Hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from smash_runtime.errors import SmashError

from .tiny_models import TINY_MODELS, build_tiny

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILTIN_PREFIX = "builtin:"


class SourceError(SmashError):
    """The source pipeline cannot be found or loaded."""


@dataclass
class Source:
    """A loaded source pipeline and where it came from (recorded in smash.json)."""

    pipeline: object
    id: str
    revision: str | None
    commit: str | None
    license: str | None

    def record(self) -> dict:
        return {"id": self.id, "revision": self.revision, "commit": self.commit, "license": self.license}


def denoiser_name(pipeline) -> str:
    """``transformer`` for DiT pipelines, ``unet`` for UNet pipelines."""
    for name in ("transformer", "unet"):
        if getattr(pipeline, name, None) is not None:
            return name
    raise SourceError(f"{type(pipeline).__name__} has neither a transformer nor a unet to transform")


def load_source(source: str, revision: str | None, dtype: str, base_dir: Path | None = None) -> Source:
    """Load ``source`` in ``dtype`` on the CPU, every module in eval mode.

    ``source`` is ``builtin:tiny-flux`` / ``builtin:tiny-sdxl``, a diffusers pipeline folder
    (relative to ``base_dir``), or a Hub repo id whose ``revision`` is resolved to a commit sha.
    """
    torch_dtype = DTYPES[dtype]
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in TINY_MODELS:
            raise SourceError(f"model.source = {source!r}: unknown built-in; choose one of {sorted(TINY_MODELS)}")
        return Source(build_tiny(name, seed=0, dtype=torch_dtype), source, None, None, "apache-2.0")

    from diffusers import DiffusionPipeline

    folder = Path(source).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = base_dir / folder
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise SourceError(f"model.source = {source!r}: {folder} has no model_index.json (not a diffusers pipeline folder)")
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True)
        return Source(_eval(pipe), str(folder), None, None, None)

    commit, license_ = _resolve_hub_revision(source, revision or "main")
    pipe = DiffusionPipeline.from_pretrained(source, revision=commit, torch_dtype=torch_dtype, use_safetensors=True)
    return Source(_eval(pipe), source, revision or "main", commit, license_)


def _resolve_hub_revision(repo_id: str, revision: str) -> tuple[str, str | None]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except GatedRepoError as exc:
        raise SourceError(
            f"{repo_id} is gated: accept its licence on the Hub, then `hf auth login` or set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise SourceError(f"{repo_id}: no such Hub repo (or it is private: log in or set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise SourceError(f"{repo_id}: revision {revision!r} does not exist") from exc
    except Exception as exc:  # network failures: say what to do rather than dump a traceback
        raise SourceError(f"{repo_id}: cannot reach the Hub ({type(exc).__name__}: {exc}); check the network or HF_ENDPOINT") from exc
    card = info.card_data.to_dict() if getattr(info, "card_data", None) else {}
    return info.sha, card.get("license")


def _eval(pipe):
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return pipe
