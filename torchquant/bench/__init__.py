"""Kernel and model benchmarks. Each module has `run(...) -> list of row dicts` and `main(argv)`; the scripts in
benchmarks/ and `torchquant bench` call them."""
