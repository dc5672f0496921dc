# CUDA headers and the static runtime (CUDA::cudart_static), from one of:
#   - the CUDA toolkit (find_package(CUDAToolkit)), when one is installed;
#   - NVIDIA's PyPI wheels nvidia-cuda-runtime and nvidia-cuda-crt (pyproject.toml's build
#     requirements), which carry include/ and lib/libcudart_static.a under nvidia/cu13: with them a
#     C++ compiler is all `pip install .` needs.
# MDTRT_CUDA_FROM picks: "auto" (the toolkit, else the wheels), "toolkit" or "wheels".
set(MDTRT_CUDA_FROM "auto" CACHE STRING "Where the CUDA headers and static runtime come from: auto, toolkit, wheels")
set_property(CACHE MDTRT_CUDA_FROM PROPERTY STRINGS auto toolkit wheels)
if(NOT MDTRT_CUDA_FROM MATCHES "^(auto|toolkit|wheels)$")
  message(FATAL_ERROR "mdtrt: MDTRT_CUDA_FROM=${MDTRT_CUDA_FROM} is not one of auto, toolkit, wheels "
    "(-C cmake.define.MDTRT_CUDA_FROM=auto: the toolkit, else NVIDIA's CUDA wheels).")
endif()

if(NOT MDTRT_CUDA_FROM STREQUAL "wheels")
  find_package(CUDAToolkit QUIET)
endif()

if(CUDAToolkit_FOUND)
  set(MDTRT_CUDA_SOURCE "CUDA toolkit ${CUDAToolkit_VERSION} at ${CUDAToolkit_LIBRARY_ROOT}")
elseif(NOT MDTRT_CUDA_FROM STREQUAL "toolkit")
  find_package(Python COMPONENTS Interpreter REQUIRED)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util as u; s = u.find_spec('nvidia.cu13'); print(';'.join(s.submodule_search_locations) if s else '')"
    OUTPUT_VARIABLE _mdtrt_cu13_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  find_path(MDTRT_CUDA_WHEEL_INCLUDE_DIR cuda_runtime_api.h PATHS ${_mdtrt_cu13_dirs} PATH_SUFFIXES include
            NO_DEFAULT_PATH)
  find_path(MDTRT_CUDA_WHEEL_CRT_DIR crt/host_defines.h PATHS ${_mdtrt_cu13_dirs} PATH_SUFFIXES include
            NO_DEFAULT_PATH)
  find_library(MDTRT_CUDA_WHEEL_CUDART_STATIC libcudart_static.a PATHS ${_mdtrt_cu13_dirs} PATH_SUFFIXES lib
               NO_DEFAULT_PATH)
  if(MDTRT_CUDA_WHEEL_INCLUDE_DIR AND MDTRT_CUDA_WHEEL_CRT_DIR AND MDTRT_CUDA_WHEEL_CUDART_STATIC)
    find_package(Threads REQUIRED)
    add_library(CUDA::cudart_static STATIC IMPORTED)
    set_target_properties(CUDA::cudart_static PROPERTIES
      IMPORTED_LOCATION "${MDTRT_CUDA_WHEEL_CUDART_STATIC}"
      INTERFACE_INCLUDE_DIRECTORIES "${MDTRT_CUDA_WHEEL_INCLUDE_DIR};${MDTRT_CUDA_WHEEL_CRT_DIR}"
      # What the static runtime itself needs, as FindCUDAToolkit links it.
      INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};rt")
    set(MDTRT_CUDA_SOURCE "NVIDIA's CUDA wheels at ${MDTRT_CUDA_WHEEL_INCLUDE_DIR}")
  endif()
endif()

if(MDTRT_CUDA_FROM STREQUAL "wheels")
  set(_mdtrt_cuda_from_note " (the toolkit was not looked at; -C cmake.define.MDTRT_CUDA_FROM=auto uses it)")
elseif(MDTRT_CUDA_FROM STREQUAL "toolkit")
  set(_mdtrt_cuda_from_note " (NVIDIA's CUDA wheels were not looked at; -C cmake.define.MDTRT_CUDA_FROM=auto uses them)")
endif()
if(NOT TARGET CUDA::cudart_static)
  message(FATAL_ERROR
    "mdtrt needs the CUDA 13 headers and static runtime to build: `pip install nvidia-cuda-runtime nvidia-cuda-crt` "
    "(what `pip install .` with build isolation does by itself), or install the CUDA 13 toolkit "
    "(set CUDAToolkit_ROOT if it is not found). MDTRT_CUDA_FROM=${MDTRT_CUDA_FROM}"
    "${_mdtrt_cuda_from_note}.")
endif()
message(STATUS "mdtrt: CUDA headers and static runtime from ${MDTRT_CUDA_SOURCE}")
