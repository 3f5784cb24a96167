"""Benchmark of quantize / dequantize / fake_quantize on the CPU: see torchquant/bench/quantize.py."""
from torchquant.bench.quantize import main

main()
