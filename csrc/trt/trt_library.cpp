#include "trt/trt_library.h"

#include <dlfcn.h>

#include <mutex>
#include <sstream>
#include <utility>

#ifdef MDTRT_HAVE_TENSORRT
#include <NvInferVersion.h>
#include <NvOnnxParser.h>  // NV_ONNX_PARSER_VERSION
#endif

#include "common/error.h"
#include "nccl/nccl_library.h"

namespace mdtrt::trt {
namespace {

constexpr const char* kVersionSymbol = "getInferLibVersion";
constexpr const char* kRuntimeSymbol = "createInferRuntime_INTERNAL";
constexpr const char* kBuilderSymbol = "createInferBuilder_INTERNAL";
constexpr const char* kParserSymbol = "createNvOnnxParser_INTERNAL";
constexpr const char* kParserVersionSymbol = "getNvOnnxParserVersion";

#ifdef MDTRT_HAVE_TENSORRT
constexpr int kHeaderMajor = NV_TENSORRT_MAJOR;
constexpr int kHeaderVersion = NV_TENSORRT_MAJOR * 10000 + NV_TENSORRT_MINOR * 100 + NV_TENSORRT_PATCH;
constexpr int kParserHeaderVersion = NV_ONNX_PARSER_VERSION;
#else
constexpr int kHeaderMajor = 11;
constexpr int kHeaderVersion = 0;
constexpr int kParserHeaderVersion = 0;
#endif

const std::string kFull = "libnvinfer.so." + std::to_string(kHeaderMajor);
const std::string kLean = "libnvinfer_lean.so." + std::to_string(kHeaderMajor);
const std::string kParser = "libnvonnxparser.so." + std::to_string(kHeaderMajor);

using CreateFn = void* (*)(void*, int32_t);
using CreateParserFn = void* (*)(void*, void*, int);
using VersionFn = int32_t (*)();

struct Library {
  std::mutex mutex;
  bool ok = false;
  LibraryInfo info;
  void* handle = nullptr;
  CreateFn create_runtime = nullptr;
  CreateFn create_builder = nullptr;  // nullptr for the lean runtime
  bool nccl_tried = false;
  std::string nccl_warning;
  std::vector<LoadAttempt> failed_attempts;  // of the last search that found no usable library
};

struct Parser {
  std::mutex mutex;
  bool ok = false;
  ParserInfo info;
  void* handle = nullptr;
  CreateParserFn create = nullptr;
};

Library& library() {
  static Library state;
  return state;
}

Parser& parser() {
  static Parser state;
  return state;
}

// RTLD_LOCAL: nothing else should bind to TensorRT's symbols; its own dependents (the ONNX
// parser) find it by soname among the loaded objects.
constexpr int kOpenFlags = RTLD_NOW | RTLD_LOCAL;

void* find_symbol(void* handle, const char* name) {
  dlerror();
  return dlsym(handle, name);
}

// Opens one TensorRT candidate and checks it; on failure fills attempt.message and returns false.
bool try_library(const std::string& candidate, LoadAttempt& attempt, Library& st, LibraryInfo& info) {
  void* handle = open_candidate(candidate, kOpenFlags, attempt);
  if (handle == nullptr) return false;
  auto refuse = [&](std::string why) {
    attempt.message = std::move(why);
    dlclose(handle);
    return false;
  };
  auto version_fn = reinterpret_cast<VersionFn>(find_symbol(handle, kVersionSymbol));
  if (version_fn == nullptr) return refuse(std::string("missing symbol ") + kVersionSymbol + " (not TensorRT?)");
  auto runtime_fn = reinterpret_cast<CreateFn>(find_symbol(handle, kRuntimeSymbol));
  if (runtime_fn == nullptr) return refuse(std::string("missing symbol ") + kRuntimeSymbol + " (not TensorRT?)");
  int code = version_fn();
  if (code / 10000 != kHeaderMajor) {
    return refuse("TensorRT " + version_string(code) + " is not supported: mdtrt was built for TensorRT " +
                  std::to_string(kHeaderMajor) + " and needs a TensorRT " + std::to_string(kHeaderMajor) +
                  ".x library (the engine and plugin interfaces change between major versions)");
  }
  if (kHeaderVersion != 0 && code < kHeaderVersion) {
    // The headers' classes may declare virtual functions an older library does not have: calling
    // one would jump past the end of its table (a crash, not an error).
    return refuse("TensorRT " + version_string(code) + " is older than the TensorRT " + version_string(kHeaderVersion) +
                  " headers mdtrt was built with, whose interfaces it may not implement; install TensorRT >= " +
                  version_string(kHeaderVersion) + " or rebuild mdtrt against this version's headers");
  }
  auto builder_fn = reinterpret_cast<CreateFn>(find_symbol(handle, kBuilderSymbol));
  attempt.loaded = true;
  attempt.message = builder_fn != nullptr ? "ok" : "ok (lean runtime: no builder)";
  st.handle = handle;
  st.create_runtime = runtime_fn;
  st.create_builder = builder_fn;
  info.path = loaded_path(reinterpret_cast<void*>(version_fn), candidate);
  info.version = code;
  info.lean = builder_fn == nullptr;
  return true;
}

bool try_parser(const std::string& candidate, LoadAttempt& attempt, Parser& st, ParserInfo& info) {
  void* handle = open_candidate(candidate, kOpenFlags, attempt);
  if (handle == nullptr) return false;
  auto create_fn = reinterpret_cast<CreateParserFn>(find_symbol(handle, kParserSymbol));
  if (create_fn == nullptr) {
    attempt.message = std::string("missing symbol ") + kParserSymbol + " (not TensorRT's ONNX parser?)";
    dlclose(handle);
    return false;
  }
  auto version_fn = reinterpret_cast<VersionFn>(find_symbol(handle, kParserVersionSymbol));
  const int code = version_fn != nullptr ? version_fn() : 0;
  const bool same_major = code / 10000 == kParserHeaderVersion / 10000;
  if (kParserHeaderVersion != 0 && version_fn != nullptr && same_major && code < kParserHeaderVersion) {
    // As for TensorRT: an older parser may not implement the headers' interface.
    attempt.message = "ONNX parser " + version_string(code) + " is older than the parser headers mdtrt was built with (" +
                      version_string(kParserHeaderVersion) + "); use the parser of the TensorRT that mdtrt loaded";
    dlclose(handle);
    return false;
  }
  attempt.loaded = true;
  attempt.message = version_fn != nullptr ? "ok" : std::string("ok (no ") + kParserVersionSymbol + ": version unchecked)";
  if (kParserHeaderVersion != 0 && version_fn != nullptr && !same_major) {
    // How the parser's version relates to TensorRT's is not documented (TensorRT 11.1's headers say
    // 0.1.0): another major is reported, not refused.
    info.note = "the ONNX parser " + candidate + " reports version " + version_string(code) +
                ", the parser headers mdtrt was built with " + version_string(kParserHeaderVersion) +
                "; if parsing fails, use the parser that ships with the loaded TensorRT";
    attempt.message += " (" + info.note + ")";
  }
  st.handle = handle;
  st.create = create_fn;
  info.version = code;
  info.path = loaded_path(reinterpret_cast<void*>(create_fn), candidate);
  return true;
}

// NCCL goes in before TensorRT's first runtime or builder so that TensorRT's dlopen of
// libnccl.so.2 finds mdtrt's instance (opened RTLD_GLOBAL) instead of another copy.
void ensure_nccl(Library& st) {
  if (st.nccl_tried) return;
  st.nccl_tried = true;
  try {
    nccl::load_library();
  } catch (const Error& e) {
    st.nccl_warning = std::string("NCCL could not be loaded before TensorRT; engines with multi-device layers "
                                  "will fail to run: ") +
                      e.detail();
  }
}

// Some TensorRT builds return the failed inner creation's null pointer adjusted to a base-class
// offset (libnvinfer_lean 11.4 without a usable GPU returns 0x228): anything in the first page is
// not an object, and reads as "no object".
void* object_or_null(void* created) {
  return reinterpret_cast<uintptr_t>(created) < 4096 ? nullptr : created;
}

}  // namespace

int header_major() { return kHeaderMajor; }
int header_version() { return kHeaderVersion; }
int parser_header_version() { return kParserHeaderVersion; }

const char* const kInstallFull = "pip install tensorrt-cu13";
const char* const kInstallLean = "pip install tensorrt-lean-cu13-libs";
const char* const kFullFromNvidiaIndex = "its libraries download only from NVIDIA's index, pypi.nvidia.com";

const std::vector<std::string>& required_symbols() {
  static const std::vector<std::string> names = {kVersionSymbol, kRuntimeSymbol};
  return names;
}

const char* builder_symbol() { return kBuilderSymbol; }

const LibraryInfo& load_library(const std::vector<std::string>& extra_dirs,
                                const std::vector<std::string>& lean_extra_dirs) {
  Library& st = library();
  std::lock_guard<std::mutex> lock(st.mutex);
  if (st.ok) return st.info;

  LibraryInfo info;
  std::vector<SearchStep> steps = {{kFull, kFull}};
  for (const auto& dir : extra_dirs) steps.push_back({"extra directory", dir + "/" + kFull});
  steps.push_back({kLean, kLean});
  for (const auto& dir : lean_extra_dirs) steps.push_back({"lean extra directory", dir + "/" + kLean});
  try {
    info.found_by = search_library(
      "MDTRT_TENSORRT_LIBRARY",
      "Point MDTRT_TENSORRT_LIBRARY at a TensorRT " + std::to_string(kHeaderMajor) + " " + kFull + " (or " + kLean +
          "), or unset it to search the usual places.",
      "load TensorRT", steps, info.attempts,
      [&](const std::string& candidate, LoadAttempt& attempt) { return try_library(candidate, attempt, st, info); });
  } catch (const Error&) {
    st.failed_attempts = info.attempts;
    throw;
  }
  if (!info.found_by.empty()) {
    st.info = std::move(info);
    st.ok = true;
    return st.info;
  }
  st.failed_attempts = info.attempts;
  throw Error(ErrorKind::kLibraryNotFound,
              "could not find a usable TensorRT " + std::to_string(kHeaderMajor) +
                  " library. Tried:" + describe_attempts(info.attempts) +
                  "\nInstall TensorRT with `" + kInstallFull + "` (build and run engines; " + kFullFromNvidiaIndex +
                  ") or `" + kInstallLean +
                  "` (run prebuilt engines only, from PyPI), add its lib folder to LD_LIBRARY_PATH, or set "
                  "MDTRT_TENSORRT_LIBRARY=/path/to/" +
                  kFull + ".",
              -1, "load TensorRT");
}

std::vector<LoadAttempt> failed_attempts() {
  Library& st = library();
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.failed_attempts;
}

bool is_loaded() {
  Library& st = library();
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.ok;
}

void require_builder() {
  const LibraryInfo& info = load_library();
  if (info.lean) {
    throw Error(ErrorKind::kLibraryNotFound,
                "the lean runtime was found (" + info.path +
                    "): it can run engines but not build them; install the full TensorRT (" + kInstallFull + "; " +
                    kFullFromNvidiaIndex + ") to build, or set MDTRT_TENSORRT_LIBRARY to a full " + kFull + ".",
                -1, "create TensorRT builder");
  }
}

namespace {

// Calls the loaded library's create function `which` (TensorRT loaded, NCCL loaded before it).
void* create_object(CreateFn Library::*which, void* logger, int32_t version) {
  Library& st = library();
  CreateFn create = nullptr;
  {
    std::lock_guard<std::mutex> lock(st.mutex);
    ensure_nccl(st);
    create = st.*which;
  }
  return object_or_null(create(logger, version));
}

}  // namespace

void* create_runtime(void* logger, int32_t version) {
  load_library();
  return create_object(&Library::create_runtime, logger, version);
}

void* create_builder(void* logger, int32_t version) {
  require_builder();
  return create_object(&Library::create_builder, logger, version);
}

std::string nccl_warning() {
  Library& st = library();
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.nccl_warning;
}

const ParserInfo& load_onnx_parser(const std::vector<std::string>& extra_dirs) {
  // The parser links libnvinfer.so: the full library must be in first, or the parser's own
  // dependency lookup may pick a different (or no) TensorRT.
  require_builder();
  Parser& st = parser();
  std::lock_guard<std::mutex> lock(st.mutex);
  if (st.ok) return st.info;

  ParserInfo info;
  std::vector<SearchStep> steps = {{kParser, kParser}};
  for (const auto& dir : extra_dirs) steps.push_back({"extra directory", dir + "/" + kParser});
  info.found_by = search_library(
      "MDTRT_ONNXPARSER_LIBRARY",
      std::string("Point it at TensorRT's ") + kParser + ", or unset it to search the usual places.",
      "load the TensorRT ONNX parser", steps, info.attempts,
      [&](const std::string& candidate, LoadAttempt& attempt) { return try_parser(candidate, attempt, st, info); });
  if (!info.found_by.empty()) {
    st.info = std::move(info);
    st.ok = true;
    return st.info;
  }
  throw Error(ErrorKind::kLibraryNotFound,
              "could not find TensorRT's ONNX parser (" + kParser + "). Tried:" + describe_attempts(info.attempts) +
                  "\nIt ships with the full TensorRT: `" + kInstallFull + "` (" + kFullFromNvidiaIndex +
                  "), add its lib folder to LD_LIBRARY_PATH, or set MDTRT_ONNXPARSER_LIBRARY=/path/to/" +
                  kParser + ".",
              -1, "load the TensorRT ONNX parser");
}

void* create_onnx_parser(void* network, void* logger, int32_t version) {
  load_onnx_parser();
  Parser& st = parser();
  CreateParserFn create = nullptr;
  {
    std::lock_guard<std::mutex> lock(st.mutex);
    create = st.create;
  }
  return object_or_null(create(network, logger, version));
}

}  // namespace mdtrt::trt
