# Finds TensorRT >= 11 headers (never the libraries: csrc/trt loads libnvinfer at run time).
# Looks at TensorRT_INCLUDE_DIR, then TensorRT_ROOT (CMake variables or environment), then
# the usual install places. Sets MDTRT_TENSORRT_FOUND, MDTRT_TENSORRT_INCLUDE_DIR and
# MDTRT_TENSORRT_REASON (why the backend is or is not built).
set(_mdtrt_trt_hints)
set(_mdtrt_trt_given)
foreach(_var TensorRT_INCLUDE_DIR TensorRT_ROOT)
  if(DEFINED ${_var} AND NOT "${${_var}}" STREQUAL "")
    list(APPEND _mdtrt_trt_hints "${${_var}}")
    list(APPEND _mdtrt_trt_given "${_var}=${${_var}}")
  elseif(DEFINED ENV{${_var}} AND NOT "$ENV{${_var}}" STREQUAL "")
    list(APPEND _mdtrt_trt_hints "$ENV{${_var}}")
    list(APPEND _mdtrt_trt_given "${_var}=$ENV{${_var}} (environment)")
  endif()
endforeach()

if(_mdtrt_trt_hints)
  # A place the user named is the one to use: headers found elsewhere instead would hide the mistake.
  find_path(MDTRT_TENSORRT_INCLUDE_DIR NvInferVersion.h HINTS ${_mdtrt_trt_hints} PATH_SUFFIXES include
            NO_DEFAULT_PATH NO_CACHE)
  if(NOT MDTRT_TENSORRT_INCLUDE_DIR)
    list(JOIN _mdtrt_trt_given ", " _mdtrt_trt_given)
    message(FATAL_ERROR "mdtrt: no TensorRT header NvInferVersion.h in ${_mdtrt_trt_given} (nor in its include/). "
      "Point it at TensorRT 11's include directory (e.g. ../shared/tensorrt/include in this project's checkout), "
      "or unset TensorRT_INCLUDE_DIR and TensorRT_ROOT to build without the TensorRT backend.")
  endif()
else()
  find_path(MDTRT_TENSORRT_INCLUDE_DIR NvInferVersion.h
    PATH_SUFFIXES include
    PATHS /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/local/tensorrt /opt/tensorrt
          /usr/local/TensorRT /usr/src/tensorrt
    NO_CACHE)
endif()

set(MDTRT_TENSORRT_FOUND OFF)
if(NOT MDTRT_TENSORRT_INCLUDE_DIR)
  set(MDTRT_TENSORRT_REASON "TensorRT headers not found (set TensorRT_ROOT or TensorRT_INCLUDE_DIR and rebuild)")
else()
  file(STRINGS "${MDTRT_TENSORRT_INCLUDE_DIR}/NvInferVersion.h" _major REGEX "^#define TRT_MAJOR_ENTERPRISE [0-9]+")
  file(STRINGS "${MDTRT_TENSORRT_INCLUDE_DIR}/NvInferVersion.h" _minor REGEX "^#define TRT_MINOR_ENTERPRISE [0-9]+")
  string(REGEX MATCH "[0-9]+$" _major "${_major}")
  string(REGEX MATCH "[0-9]+$" _minor "${_minor}")
  if(NOT _major)
    set(MDTRT_TENSORRT_REASON "could not read the TensorRT version from ${MDTRT_TENSORRT_INCLUDE_DIR}/NvInferVersion.h")
  elseif(_major LESS 11)
    set(MDTRT_TENSORRT_REASON "TensorRT headers at ${MDTRT_TENSORRT_INCLUDE_DIR} are version ${_major}.${_minor}; mdtrt needs TensorRT >= 11")
  else()
    set(MDTRT_TENSORRT_FOUND ON)
    set(MDTRT_TENSORRT_REASON "built against TensorRT ${_major}.${_minor} headers at ${MDTRT_TENSORRT_INCLUDE_DIR}")
  endif()
endif()
message(STATUS "mdtrt TensorRT backend: ${MDTRT_TENSORRT_FOUND} (${MDTRT_TENSORRT_REASON})")
