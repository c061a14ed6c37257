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
from smash_runtime.settings import QUANTIZE_METHODS

QUANT_METHODS = tuple(QUANTIZE_METHODS)  # the one table: smash_runtime.settings.QUANTIZE_METHODS


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


# What the stored weights of a method need to run, recorded in the component's record of
# smash.json; the runtime's loader refuses them elsewhere (smash_runtime.loader._CUDA_ONLY).
DEVICE_NEEDS = {"fp8dq": {"device": "cuda", "compute_capability": "8.9"},
                "int4wo": {"device": "cuda", "compute_capability": "8.0"}}


def quantization_record(method: str) -> dict:
    """A component's ``quantization`` entry in smash.json: the method and what its weights need.

        >>> quantization_record("fp8dq")
        {'method': 'fp8dq', 'requires': {'device': 'cuda', 'compute_capability': '8.9'}}
    """
    return {"method": method, **({"requires": dict(DEVICE_NEEDS[method])} if method in DEVICE_NEEDS else {})}


def _require_device(method: str, model: nn.Module) -> None:
    param = next(model.parameters())
    if method == "fp8dq" and param.dtype != torch.bfloat16:
        raise UnsupportedOnDevice(
            f"build.quantize.method = 'fp8dq' needs model.dtype = 'bfloat16' (torchao's per-row float8 "
            f"quantization takes bfloat16 weights), got {str(param.dtype).removeprefix('torch.')}; "
            "set [model] dtype = \"bfloat16\"."
        )
    if method == "int4wo" and not param.is_cuda:
        raise UnsupportedOnDevice(
            "build.quantize.method = 'int4wo': torchao 0.18 packs int4 weights into the tensor-core tile "
            "layout with a CUDA-only kernel (aten._convert_weight_to_int4pack) and has no CPU int4 "
            "weight-only kernel (its CPU packing needs the 'mslk' package, which does not exist for CPUs); "
            "build on a CUDA GPU, or use 'int8wo' for CPU targets."
        )
    if method == "int4wo" and param.dtype != torch.bfloat16:
        raise UnsupportedOnDevice("build.quantize.method = 'int4wo' needs model.dtype = 'bfloat16'")


def _torchao_can_run_fp8dq(model: nn.Module) -> bool:
    """Whether torchao's own fp8dq handler accepts this model's device (CUDA sm >= 8.9)."""
    param = next(model.parameters())
    return param.is_cuda and torch.cuda.get_device_capability(param.device) >= (8, 9)


def float8_dynamic_weight(weight: torch.Tensor, config) -> torch.Tensor:
    """The ``Float8Tensor`` torchao's fp8dq handler makes from ``weight``, made on any device.

    torchao 0.18's handler for ``Float8DynamicActivationFloat8WeightConfig`` first asserts a
    CUDA GPU of compute capability >= 8.9, although what it stores is plain data: float8
    rows, float32 scales and the activation-quantization settings its matmul will use. This
    repeats the handler's ``PLAIN`` branch (``_float8_dynamic_activation_float8_weight_quantize_tensor``)
    without that assertion: same skip rule for shapes ``_scaled_mm`` cannot take, same
    ``Float8Tensor.from_hp`` call and arguments. On a CPU, ``from_hp`` takes torchao's
    torch-ops quantization path, the one a GPU without the ``mslk`` package takes too.

        >>> w = torch.randn(32, 64, dtype=torch.bfloat16)
        >>> q = float8_dynamic_weight(w, quantization_config("fp8dq"))
        >>> q.qdata.dtype, q.scale.shape, q.act_quant_kwargs.granularity
        (torch.float8_e4m3fn, torch.Size([32, 1]), PerRow(dim=-1))
    """
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_packing_format import Float8PackingFormat
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
        Float8Tensor,
        QuantizeTensorToFloat8Kwargs,
    )
    from torchao.quantization.utils import _fp8_mm_compat

    activation_granularity, weight_granularity = config.granularity
    if config.packing_format != Float8PackingFormat.PLAIN or weight.dim() != 2 or config.version != 2:
        raise ValueError(f"fp8dq bake: only version-2 PLAIN packing of 2-D weights is supported, got {config}")
    if not _fp8_mm_compat(weight):  # torchao leaves such weights unquantized, so do we
        return weight
    if isinstance(weight_granularity, PerRow) and weight.dtype != torch.bfloat16:
        raise ValueError("fp8dq bake: PerRow quantization only works for bfloat16 weights")
    act_quant_kwargs = QuantizeTensorToFloat8Kwargs(
        config.activation_dtype,
        activation_granularity,
        hp_value_lb=config.activation_value_lb,
        hp_value_ub=config.activation_value_ub,
        kernel_preference=config.kernel_preference,
    )
    return Float8Tensor.from_hp(
        weight,
        float8_dtype=config.weight_dtype,
        granularity=weight_granularity,
        mm_config=config.mm_config,
        kernel_preference=config.kernel_preference,
        act_quant_kwargs=act_quant_kwargs,
    )


def _bake_float8_dynamic(model: nn.Module, names) -> None:
    config = quantization_config("fp8dq")
    for name in sorted(names):
        module = model.get_submodule(name) if name else model
        baked = float8_dynamic_weight(module.weight.detach(), config)
        if baked is not module.weight:
            module.weight = nn.Parameter(baked, requires_grad=False)


@dataclass
class QuantizationReport:
    method: str
    exclude: tuple[str, ...]
    quantized: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    # chosen, but left in high precision by torchao (float8 needs both dims multiples of 16)
    skipped: list[str] = field(default_factory=list)

    def record(self) -> dict:
        skipped = {"skipped": sorted(self.skipped)} if self.skipped else {}
        return {"method": self.method, "exclude": list(self.exclude),
                "quantized": sorted(self.quantized), "excluded": sorted(self.excluded), **skipped}


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
    chosen: dict[str, str] = {}  # name in model -> full name in the component
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            full = prefix + name if name else prefix.rstrip(".")
            if any(fnmatch.fnmatchcase(full, glob) for glob in exclude_globs):
                report.excluded.append(full)
            else:
                chosen[name] = full
    if chosen and method == "fp8dq" and not _torchao_can_run_fp8dq(model):
        _bake_float8_dynamic(model, chosen)  # a CPU builder: same tensors, without torchao's device check
    elif chosen:
        quantize_(model, quantization_config(method), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in chosen)
    for name, full in chosen.items():
        weight = model.get_submodule(name).weight
        plain = type(weight) in (torch.Tensor, nn.Parameter)  # torchao swaps in its tensor subclass
        (report.skipped if plain else report.quantized).append(full)
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

