// Finding and opening TensorRT (libnvinfer) and its ONNX parser at run time.
//
// mdtrt never links TensorRT: it dlopens it and enters through the exported creation functions,
// so that importing mdtrt works without TensorRT and the same build runs with the full library
// or the lean runtime. This file needs no TensorRT header, so discovery is compiled (and tested)
// also in builds without the backend.
//
// TensorRT, first success wins:
//   1. MDTRT_TENSORRT_LIBRARY (a path); if set and it does not load, that is an error, not a fall-through
//   2. libnvinfer.so.11 through the dynamic loader
//   3. libnvinfer.so.11 in each extra directory (the Python layer passes the tensorrt_libs wheel's folder)
//   4. libnvinfer_lean.so.11 through the dynamic loader
//   5. libnvinfer_lean.so.11 in each lean extra directory (the tensorrt_lean_libs wheel's folder)
// A library without createInferBuilder_INTERNAL is a lean runtime: it runs engines, it cannot build.
//
// ONNX parser: MDTRT_ONNXPARSER_LIBRARY, then libnvonnxparser.so.11 through the loader, then the
// extra directories.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/library_search.h"

namespace mdtrt::trt {

struct LibraryInfo {
  std::string path;      // the file that was loaded
  int version = 0;       // getInferLibVersion(): major * 10000 + minor * 100 + patch
  std::string found_by;  // the rule that found it
  bool lean = false;     // no builder entry point: engines can be run, not built
  std::vector<LoadAttempt> attempts;
};

struct ParserInfo {
  std::string path;
  int version = 0;  // getNvOnnxParserVersion() when exported, else 0
  std::string found_by;
  std::string note;  // a version mismatch worth a warning ("" when none)
  std::vector<LoadAttempt> attempts;
};

// The TensorRT major version the headers of this build are (11 when built without them: the
// loader still refuses libraries of another major, since mdtrt only speaks TensorRT 11).
int header_major();
// NV_TENSORRT_VERSION of the headers (0 in a build without them). Libraries older than this are
// refused, as are ONNX parsers of another major or older than parser_header_version().
int header_version();
int parser_header_version();  // NV_ONNX_PARSER_VERSION of the headers (0 without them)

// Names of the symbols mdtrt resolves (tests build fake libraries exporting them).
const std::vector<std::string>& required_symbols();  // getInferLibVersion, createInferRuntime_INTERNAL
const char* builder_symbol();                         // createInferBuilder_INTERNAL (absent from the lean runtime)

// Loads TensorRT once per process (thread-safe). Later calls return the cached library and ignore
// the directories. A failed load is not cached; it throws Error(kLibraryNotFound) listing every
// attempt and what to do.
const LibraryInfo& load_library(const std::vector<std::string>& extra_dirs = {},
                                const std::vector<std::string>& lean_extra_dirs = {});
bool is_loaded();
// Every attempt of the last search that found no usable library (empty when none failed): what
// the error listed, as records.
std::vector<LoadAttempt> failed_attempts();

// The pip commands that install TensorRT's libraries, for messages. They name NVIDIA's packages
// themselves: mdtrt is installed from its source folder, not from a package index, so asking pip
// for mdtrt's extras by the package's name cannot work for a user (".[tensorrt]" does, from that
// folder).
// The full TensorRT builds and runs engines (its libraries download from NVIDIA's index); the
// lean runtime only runs version-compatible plans.
extern const char* const kInstallFull;  // "pip install tensorrt-cu13"
extern const char* const kInstallLean;  // "pip install tensorrt-lean-cu13-libs"
// What a user of kInstallFull must know: tensorrt-cu13's libraries package on PyPI is a stub that
// downloads them from NVIDIA's own index, so the command fails where pip cannot reach it.
extern const char* const kFullFromNvidiaIndex;

// Throws the "lean runtime cannot build" error when the loaded library has no builder.
void require_builder();

// Entry points. Both load the library with no extra directories if nothing is loaded yet, and load
// NCCL first (RTLD_GLOBAL) so that TensorRT's own dlopen("libnccl.so.2") binds to mdtrt's NCCL:
// the communicators handed to setCommunicator come from it. A missing NCCL is not fatal here
// (single-device engines do not need it); it is reported by nccl_warning().
// `logger` is an nvinfer1::ILogger*, `version` the headers' NV_TENSORRT_VERSION. They return what
// TensorRT returned (nullptr on failure: the caller has the logger's text).
void* create_runtime(void* logger, int32_t version);
void* create_builder(void* logger, int32_t version);
// Why NCCL could not be loaded before TensorRT ("" when it was).
std::string nccl_warning();

const ParserInfo& load_onnx_parser(const std::vector<std::string>& extra_dirs = {});
// `network` is an nvinfer1::INetworkDefinition*, `version` NV_ONNX_PARSER_VERSION.
void* create_onnx_parser(void* network, void* logger, int32_t version);

}  // namespace mdtrt::trt
