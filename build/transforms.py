"""Baked transforms: QKV fusion, then torchao quantization, applied to a component in place.

Order matters: torchao's quantized tensors do not implement ``aten.cat``, so fusion
must run on float weights first.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from smash_runtime.errors import UnsupportedOnDevice

QUANT_METHODS = ("int8dq", "int8wo", "int4wo", "fp8wo", "fp8dq")


def quantization_config(method: str):
    """The torchao config for ``method`` (plain data; ``quantize_`` applies it)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    configs = {
        "int8dq": lambda: Int8DynamicActivationInt8WeightConfig(),
        "int8wo": lambda: Int8WeightOnlyConfig(),
        "int4wo": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
        "fp8wo": lambda: Float8WeightOnlyConfig(),
        "fp8dq": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }
    return configs[method]()


def _require_device(method: str, model: nn.Module) -> None:
    on_cuda = next(model.parameters()).is_cuda
    if method == "fp8dq" and not (on_cuda and torch.cuda.get_device_capability() >= (8, 9)):
        raise UnsupportedOnDevice(
            "build.quantize.method = 'fp8dq': torchao's float8 dynamic quantization needs a CUDA GPU with "
            "compute capability >= 8.9 (Ada, Hopper) to quantize; this build runs on the CPU. Build on such "
            "a GPU, or use 'fp8wo' (float8 weights, works on CPU) or 'int8dq'."
        )
    if method == "int4wo" and not on_cuda:
        raise UnsupportedOnDevice(
            "build.quantize.method = 'int4wo': torchao 0.18 has no CPU int4 weight-only kernel (its CPU "
            "packing needs the 'mslk' package, which does not exist for CPUs); build on a CUDA GPU, or use "
            "'int8wo' for CPU targets."
        )
    if method == "int4wo" and next(model.parameters()).dtype != torch.bfloat16:
        raise UnsupportedOnDevice("build.quantize.method = 'int4wo' needs model.dtype = 'bfloat16'")


@dataclass
class QuantizationReport:
    method: str
    exclude: tuple[str, ...]
    quantized: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"method": self.method, "exclude": list(self.exclude),
                "quantized": sorted(self.quantized), "excluded": sorted(self.excluded)}


def quantize(model: nn.Module, method: str, exclude_globs: tuple[str, ...] = (), prefix: str = "",
             report: QuantizationReport | None = None) -> QuantizationReport:
    """Quantize every ``nn.Linear`` of ``model`` whose name matches none of ``exclude_globs``.

    ``prefix`` is ``model``'s name inside its component when ``model`` is one block of it
    (the streaming build), so globs match full names; ``report`` accumulates across blocks.
    """
    from torchao.quantization import quantize_

    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {QUANT_METHODS}")
    _require_device(method, model)
    report = report or QuantizationReport(method, tuple(exclude_globs))
    chosen = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            full = prefix + name if name else prefix.rstrip(".")
            excluded = any(fnmatch.fnmatchcase(full, glob) for glob in exclude_globs)
            (report.excluded if excluded else report.quantized).append(full)
            if not excluded:
                chosen.add(name)
    if chosen:
        quantize_(model, quantization_config(method), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in chosen)
    return report


def diffusers_quantization_config(method: str, not_converted: list[str]) -> dict:
    """The ``quantization_config`` entry of a quantized diffusers component's config.json.

    With it, ``DiffusionPipeline.from_pretrained`` loads the stored torchao tensors instead of
    initialising the layers randomly. ``not_converted`` names the linears left unquantized
    (in diffusers' unfused naming), which diffusers then loads as plain weights.

        >>> diffusers_quantization_config("int8wo", ["norm_out.linear"])["quant_method"]
        'torchao'
    """
    from diffusers import TorchAoConfig

    return TorchAoConfig(quantization_config(method), modules_to_not_convert=sorted(not_converted)).to_dict()

