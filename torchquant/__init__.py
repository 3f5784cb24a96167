"""torchquant: integer quantization for PyTorch with exact C++ and CUDA kernels."""
from torchquant import functional  # noqa: F401
from torchquant import nn  # noqa: F401
from torchquant._ops import cpu_kernel_path, cpu_output_cache_info, has_cuda_kernels, set_cpu_output_cache  # noqa: F401
from torchquant.config import QuantConfig, QuantSpec  # noqa: F401
from torchquant.convert import calibrate, convert, freeze_bn_stats, prepare, quantize_model  # noqa: F401
from torchquant.export import export_aoti, export_onnx  # noqa: F401  (onnx itself is imported only when it runs)
from torchquant.io import load, save  # noqa: F401

__version__ = "0.1.0"
