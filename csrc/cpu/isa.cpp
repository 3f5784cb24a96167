// cpu_kernel_path: the name of the instruction-set path cpu_isa() picks (the detected one, or the one
// TORCHQUANT_CPU_ISA forces), so users and benchmarks can see which kernels run.
#include "isa.h"

#include <string>

#include <torch/library.h>

namespace torchquant {

static std::string cpu_kernel_path() {
  switch (cpu_isa()) {
    case CpuIsa::Avx512Vnni: return "avx512_vnni";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Scalar: break;
  }
  return "scalar";
}

}  // namespace torchquant

// No tensor arguments, so no device to dispatch on: one kernel for every dispatch key.
TORCH_LIBRARY_IMPL(torchquant, CompositeExplicitAutograd, m) {
  m.impl("cpu_kernel_path", &torchquant::cpu_kernel_path);
}
