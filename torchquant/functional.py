"""Tensor-level quantization API: thin, validated wrappers around the compiled torchquant ops."""
from torchquant._ops.elementwise import (quantized_adaptive_avg_pool1d, quantized_adaptive_avg_pool2d, quantized_add,
                                         quantized_avg_pool1d, quantized_avg_pool2d, quantized_lookup,
                                         quantized_max_pool1d, quantized_max_pool2d, quantized_mul, quantized_sum)
from torchquant._ops.gemm import (dynamic_int8_linear, int8_conv2d, int8_linear, int8_mm, pack_conv_weight,
                                  pack_int8_weight)
from torchquant._ops.quantize import (choose_qparams, dequantize, fake_quantize, quantization_error, quantize,
                                      quantize_per_token)

__all__ = ["quantize", "dequantize", "fake_quantize", "choose_qparams", "quantize_per_token", "quantization_error",
           "int8_mm", "pack_int8_weight", "int8_linear", "dynamic_int8_linear", "pack_conv_weight", "int8_conv2d",
           "quantized_add", "quantized_mul", "quantized_lookup", "quantized_max_pool1d", "quantized_max_pool2d",
           "quantized_sum", "quantized_avg_pool1d", "quantized_avg_pool2d", "quantized_adaptive_avg_pool1d",
           "quantized_adaptive_avg_pool2d"]
