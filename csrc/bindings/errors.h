#pragma once
#include <pybind11/pybind11.h>

namespace mdtrt::bindings {
// Turns mdtrt::Error into the matching mdtrt.errors exception, with .rank, .call and .detail set.
void register_error_translator(pybind11::module_& m);
}  // namespace mdtrt::bindings
