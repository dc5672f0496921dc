#pragma once
#include <pybind11/pybind11.h>

namespace mdtrt::bindings {
void bind_info(pybind11::module_& m);
void bind_nccl(pybind11::module_& m);
void bind_runtime(pybind11::module_& m);
void bind_trt(pybind11::module_& m);
// _core.testing (bindings/bind_testing.cpp), and the TensorRT layer's hooks in it (bind_trt.cpp).
void bind_testing(pybind11::module_& m);
void bind_trt_testing(pybind11::module_& testing);
// Lets the native waits answer Ctrl-C (bindings/interrupt.cpp).
void install_interrupt_check();
// Sets the Python error of an interrupted wait: the signal handler's exception, else KeyboardInterrupt.
void raise_interrupt();
}  // namespace mdtrt::bindings
