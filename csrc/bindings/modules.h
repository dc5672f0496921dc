#pragma once
#include <pybind11/pybind11.h>

namespace mdtrt::bindings {
void bind_info(pybind11::module_& m);
void bind_nccl(pybind11::module_& m);
void bind_runtime(pybind11::module_& m);
void bind_trt(pybind11::module_& m);
}  // namespace mdtrt::bindings
