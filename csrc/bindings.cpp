// The only file with PYBIND11_MODULE. Kernels are added by the native backend
// (csrc/cpu, csrc/cuda); this file exposes them and the build description.
#include <torch/extension.h>

#include "drlora_build_config.h"

namespace drlora {

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef DRLORA_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
  d["cuda_archs"] = DRLORA_CUDA_ARCHS;
  d["cxx_compiler"] = DRLORA_CXX_COMPILER;
  d["cuda_compiler"] = DRLORA_CUDA_COMPILER;
  return d;
}

}  // namespace drlora

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "drlora_kernels native extension";
  m.def("build_info", &drlora::build_info, "what this extension was compiled with");
}
