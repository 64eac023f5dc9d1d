"""NVFP4 / FP8 weights as NVIDIA ModelOpt stores them: formats, config, modules, offline quantizer."""

from nemoh.quant.fp8 import dequantize_fp8, dequantize_kv, quantize_fp8, quantize_kv, to_float8_e4m3
from nemoh.quant.linear import FP8Linear, NVFP4Linear, apply_quantization
from nemoh.quant.modelopt import QuantConfig, validate_quant_config
from nemoh.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from nemoh.quant.quantize import quantize_checkpoint

__all__ = [
    "FP8Linear",
    "NVFP4Linear",
    "QuantConfig",
    "apply_quantization",
    "dequantize_fp8",
    "dequantize_kv",
    "dequantize_nvfp4",
    "quantize_checkpoint",
    "quantize_fp8",
    "quantize_kv",
    "quantize_nvfp4",
    "to_float8_e4m3",
    "validate_quant_config",
]

