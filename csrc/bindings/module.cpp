// mdtrt._core: thin pybind11 glue over csrc/. Each area registers itself from its own file.
#include <pybind11/pybind11.h>

#include "bindings/errors.h"
#include "bindings/modules.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "mdtrt native core: NCCL loading, communicators, rank runtime, TensorRT backend";
  mdtrt::bindings::register_error_translator(m);
  mdtrt::bindings::install_interrupt_check();
  mdtrt::bindings::bind_info(m);
  mdtrt::bindings::bind_nccl(m);
  mdtrt::bindings::bind_runtime(m);
  mdtrt::bindings::bind_trt(m);
  mdtrt::bindings::bind_testing(m);
}
