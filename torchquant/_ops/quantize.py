"""Quantize / dequantize / fake-quantize ops: wrappers, fake kernels and autograd."""

__all__ = []
