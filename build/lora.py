"""LoRAs baked into the weights at build time, with diffusers' own LoRA machinery (peft).

Each LoRA of ``[build] lora`` is loaded, fused at its scale and unloaded, in order, before QKV
fusion and quantization: exactly what ``pipe.load_lora_weights(...)``, ``pipe.fuse_lora(
lora_scale=...)`` and ``pipe.unload_lora_weights()`` do in plain diffusers, so the artifact's
weights equal those of the unoptimized pipeline with the LoRA fused::

    >>> from smash_build.lora import fuse_loras
    >>> records = fuse_loras(pipe, manifest.build.lora)    # one smash.json record per LoRA
    >>> records[0]["sha256"]

The diffusers/peft format (``transformer.…lora_A.weight``, ``unet.…lora_B.weight``) and the
formats diffusers converts itself (kohya ``lora_unet_…``) are accepted. A LoRA that names
modules the pipeline lacks is refused with their names before any weight changes (diffusers
itself would only warn and skip them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from smash_runtime.errors import SettingsError, SmashError
from smash_runtime.format import sha256_file

from .manifest import LoraSpec
from .sources import SourceError, resolve_hub_revision

INSTALL_HINT = "install the LoRA extra: pip install 'smash-build[lora]'"


def fuse_loras(pipe, specs: Sequence[LoraSpec], step: Callable[[str], None] = lambda message: None) -> list[dict]:
    """Fuse each LoRA into ``pipe``'s weights in order; return their smash.json records.

    Raises:
        SettingsError: a LoRA names modules the pipeline lacks (their names are listed), holds
            no LoRA weights, or the pipeline loads no LoRAs; the key is ``build.lora[i]``.
        SmashError: peft is not installed.
    """
    if not specs:
        return []
    try:
        import peft  # noqa: F401 - diffusers' LoRA loading needs it
    except ImportError:
        raise SmashError(f"[build] lora needs peft; {INSTALL_HINT}") from None
    if not hasattr(pipe, "load_lora_weights"):
        raise SettingsError("build.lora", specs[0].source, f"{type(pipe).__name__} does not load LoRAs",
                            "remove [build] lora")
    files = [_fetch(spec, f"build.lora[{i}]") for i, spec in enumerate(specs)]
    for i, (spec, (file, _)) in enumerate(zip(specs, files)):
        check_lora_targets(pipe, file, f"build.lora[{i}]", spec.source)
    records = []
    for spec, (file, commit) in zip(specs, files):
        step(f"fusing LoRA {spec.source} ({spec.weight_name}) at scale {spec.scale:g}")
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        pipe.fuse_lora(lora_scale=spec.scale)
        pipe.unload_lora_weights()
        records.append(lora_record(spec, file, commit))
    return records


def lora_record(spec: LoraSpec, file: Path, commit: str | None) -> dict[str, Any]:
    """What smash.json records of one fused LoRA: where it came from, its scale and its sha256."""
    return {"source": spec.source, "weight_name": spec.weight_name, "scale": spec.scale,
            "revision": spec.revision, "commit": commit, "sha256": sha256_file(file)}


def lora_module_names(pipe, file: Path) -> list[str]:
    """``component.module.path`` of every module the LoRA at ``file`` adapts, as diffusers reads it."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    state = pipe.lora_state_dict(str(file.parent), weight_name=file.name)
    state = state[0] if isinstance(state, tuple) else state  # (state dict, network alphas) for UNet pipelines
    state = convert_unet_state_dict_to_peft(dict(state))  # kohya/old diffusers names -> peft's lora_A/lora_B
    return sorted({key.split(".lora")[0] for key in state if ".lora" in key})


def check_lora_targets(pipe, file: Path, key: str, source: str) -> None:
    """Refuse a LoRA naming modules the pipeline lacks, listing them (diffusers would skip them)."""
    names = lora_module_names(pipe, file)
    if not names:
        raise SettingsError(key, source, f"{file.name} holds no LoRA weights diffusers recognizes "
                                         "(expected keys such as transformer.…lora_A.weight or unet.…lora_B.weight)")
    missing = [name for name in names if not _has_module(pipe, name)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise SettingsError(key, source, f"names {len(missing)} module(s) that {type(pipe).__name__} lacks: {shown}",
                            "is it a LoRA for another model or model size?")


def _has_module(pipe, name: str) -> bool:
    import torch

    component, _, path = name.partition(".")
    module = getattr(pipe, component, None)
    if not isinstance(module, torch.nn.Module):
        return False
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _fetch(spec: LoraSpec, key: str) -> tuple[Path, str | None]:
    """The LoRA's local file, and the commit it was downloaded at (Hub sources only)."""
    if spec.file is not None:
        return spec.file, None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    commit, _ = resolve_hub_revision(spec.source, spec.revision or "main")
    try:
        return Path(hf_hub_download(spec.source, spec.weight_name, revision=commit)), commit
    except EntryNotFoundError:
        raise SettingsError(f"{key}.weight_name", spec.weight_name,
                            f"no such file in {spec.source}@{commit[:12]}",
                            "set weight_name to the LoRA's .safetensors file in that repo") from None
    except Exception as exc:  # network failures: say what to do rather than dump a traceback
        raise SourceError(f"{spec.source}: cannot download {spec.weight_name} ({type(exc).__name__}); check the "
                          "network or HF_ENDPOINT, or give a local file as source") from exc
