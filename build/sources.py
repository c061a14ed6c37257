"""The source pipeline a manifest names: a built-in tiny model, a local folder or a Hub id.

    >>> ref = resolve_source("black-forest-labs/FLUX.1-dev", "main")   # downloads the snapshot
    >>> pipe = load_pipeline(ref, "bfloat16")
"""

from __future__ import annotations

import atexit
import itertools
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smash_runtime import anatomy
from smash_runtime.errors import SmashError

from .tiny_models import TINY_MODELS, build_tiny

logger = logging.getLogger("smash_build.sources")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILTIN_PREFIX = "builtin:"
# What a diffusers pipeline folder needs; never the .bin/.ckpt duplicates some repos carry.
SNAPSHOT_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model", "README.md"]


class SourceError(SmashError):
    """The source pipeline cannot be found or loaded."""


@dataclass
class SourceRef:
    """Where the source is (recorded in smash.json) and, once on disk, its folder."""

    id: str
    revision: str | None = None
    commit: str | None = None
    license: str | None = None
    folder: Path | None = None
    card: dict = field(default_factory=dict)  # the base model card's license_name, license_link, pipeline_tag

    @property
    def builtin(self) -> str | None:
        return self.id[len(BUILTIN_PREFIX):] if self.id.startswith(BUILTIN_PREFIX) else None

    @property
    def name(self) -> str:
        """A short name from the source alone: ``tiny-flux``, ``FLUX.1-dev``, a local folder's name."""
        return self.builtin or self.id.rstrip("/").split("/")[-1]

    def record(self) -> dict:
        return {"id": self.id, "revision": self.revision, "commit": self.commit, "license": self.license,
                **{k: v for k, v in sorted(self.card.items()) if v is not None}}


# Model card fields carried over from the base model's card into the artifact's card.
CARD_FIELDS = ("license_name", "license_link", "pipeline_tag")


def card_fields(metadata: dict) -> tuple[str | None, dict]:
    """``(license, {license_name, license_link, pipeline_tag})`` from a model card's metadata."""
    license_ = metadata.get("license")
    return (license_ if isinstance(license_, str) else None,
            {k: metadata[k] for k in CARD_FIELDS if isinstance(metadata.get(k), str)})


def _local_card(folder: Path) -> tuple[str | None, dict]:
    readme = folder / "README.md"
    if not readme.is_file():
        return None, {}
    from huggingface_hub import metadata_load

    try:
        return card_fields(metadata_load(readme) or {})
    except Exception as exc:  # noqa: BLE001 - a broken card is the base model's problem, not a reason to stop
        logger.warning("%s: cannot read its metadata (%s); the artifact's card gets no license", readme, exc)
        return None, {}


def denoiser_name(pipeline) -> str:
    """``transformer`` for DiT pipelines, ``unet`` for UNet pipelines."""
    name = anatomy.denoiser_name(k for k in anatomy.DENOISERS if getattr(pipeline, k, None) is not None)
    if name is not None:
        return name
    raise SourceError(f"{type(pipeline).__name__} has neither a transformer nor a unet to transform")


def local_source_folder(source: str, base_dir: Path | None = None) -> Path | None:
    """The folder a local-path source names (relative to ``base_dir``), or None for built-ins and Hub ids."""
    if source.startswith(BUILTIN_PREFIX):
        return None
    folder = Path(source).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = base_dir / folder
    return folder if folder.is_dir() else None


def resolve_source(source: str, revision: str | None, base_dir: Path | None = None) -> SourceRef:
    """Find the source: built-ins need nothing, folders must hold model_index.json, Hub ids
    are resolved to a commit sha and downloaded (only the files a diffusers pipeline needs)."""
    if source.startswith(BUILTIN_PREFIX):
        if source[len(BUILTIN_PREFIX):] not in TINY_MODELS:
            raise SourceError(f"model.source = {source!r}: unknown built-in; choose one of {sorted(TINY_MODELS)}")
        return SourceRef(source, license="apache-2.0", card={"pipeline_tag": "text-to-image"})
    folder = local_source_folder(source, base_dir)
    if folder is not None:
        if not (folder / "model_index.json").is_file():
            raise SourceError(f"model.source = {source!r}: {folder} has no model_index.json (not a diffusers pipeline folder)")
        license_, card = _local_card(folder)
        return SourceRef(str(folder), license=license_, folder=folder, card=card)
    commit, (license_, card) = resolve_hub_revision(source, revision or "main")
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(source, revision=commit, allow_patterns=SNAPSHOT_PATTERNS))
    return SourceRef(source, revision or "main", commit, license_, snapshot, card)


_MATERIALIZED: dict[tuple[str, str], Path] = {}


def materialize_builtin(ref: SourceRef, dtype: str) -> SourceRef:
    """Write a built-in model to a folder (once per process, removed at exit) and read it from there.

    Built-ins then go through ``from_pretrained`` like any source folder: loading adds metadata
    to configs (``architectures``, tokenizer loader flags), and the in-memory and streaming
    builds must see the same configs to write the same bytes.
    """
    key = (ref.builtin, dtype)
    folder = _MATERIALIZED.get(key)
    if folder is None or not (folder / "model_index.json").is_file():
        folder = Path(tempfile.mkdtemp(prefix=f"smash-{ref.builtin}-"))
        atexit.register(shutil.rmtree, folder, True)
        build_tiny(ref.builtin, seed=0, dtype=DTYPES[dtype]).save_pretrained(folder)
        _MATERIALIZED[key] = folder
    return SourceRef(ref.id, ref.revision, ref.commit, ref.license, folder, ref.card)


def load_pipeline(ref: SourceRef, dtype: str):
    """The whole source pipeline in memory on the CPU, every module in eval mode."""
    torch_dtype = DTYPES[dtype]
    if ref.folder is None:
        ref = materialize_builtin(ref, dtype)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(ref.folder, torch_dtype=torch_dtype, use_safetensors=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            _own_aligned_storage(component)
            component.eval().requires_grad_(False)
    return pipe


def _own_aligned_storage(module: torch.nn.Module) -> None:
    """Give every tensor still pointing into a file mapping its own allocation.

    ``from_pretrained`` can leave tensors at unaligned offsets of the mapped safetensors file;
    CPU kernels then take other vector paths and round differently from the same weights
    loaded by the runtime, which allocates aligned.
    """
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()


def resolve_hub_revision(repo_id: str, revision: str) -> tuple[str, tuple[str | None, dict]]:
    """``(commit sha, (license, card fields))`` of a Hub repo at ``revision``, with clear errors."""
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
        raise SourceError(
            f"{repo_id}: cannot reach the Hub ({type(exc).__name__}); check the network, HF_ENDPOINT, "
            "or use a local folder as model.source"
        ) from exc
    card = info.card_data.to_dict() if getattr(info, "card_data", None) else {}
    if getattr(info, "pipeline_tag", None):
        card.setdefault("pipeline_tag", info.pipeline_tag)
    return info.sha, card_fields(card)
