// Runs a plan of the double on N ranks (threads) with host memory: libnvinfer_double_host.so
// (the double on fake_cudart.cpp) and the fake libnccl.so.2 (fake_nccl.cpp). For CPU tests of
// enqueueV3's data movement against mdtrt.reference.
//   double_host_run LIB PLAN NRANKS INPUTS OUTPUTS
//   double_host_run LIB PLAN NRANKS --bind-alone   (only rank 0 calls setCommunicator: prints
//                                                    "returned" or, after 2 s, "blocked")
// INPUTS: the ranks' input bytes, concatenated (the plan's one input, static shape). Every rank
// binds (setCommunicator) and enqueues; OUTPUTS gets, per rank, the output (poisoned with 0xA5
// before the run). stdout: one line per rank, "rank R shape D0,D1,... ok|failed | log".
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

class Collect : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    std::lock_guard<std::mutex> lock(mutex);
    if (severity <= Severity::kWARNING) text += (text.empty() ? "" : " ; ") + std::string(msg);
  }
  std::mutex mutex;
  std::string text;
};

size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT:
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    default: return 1;
  }
}

size_t volume(const nvinfer1::Dims& d) {
  size_t v = 1;
  for (int32_t i = 0; i < d.nbDims; ++i) v *= static_cast<size_t>(d.d[i]);
  return v;
}

std::string read(const char* path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[4]) == "--bind-alone") {
    // setCommunicator is collective: rank 0 alone must not return while the other ranks are away.
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    void* nccl = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr || nccl == nullptr) return 2;
    auto create = reinterpret_cast<void* (*)(void*, int32_t)>(dlsym(lib, "createInferRuntime_INTERNAL"));
    auto world = reinterpret_cast<void* (*)(int, int)>(dlsym(nccl, "fakeNcclWorld"));
    const std::string plan = read(argv[2]);
    static Collect logger;
    auto* runtime = static_cast<nvinfer1::IRuntime*>(create(&logger, NV_TENSORRT_VERSION));
    nvinfer1::ICudaEngine* engine = runtime->deserializeCudaEngine(plan.data(), plan.size());
    nvinfer1::IExecutionContext* context = engine->createExecutionContext();
    static std::atomic<int> state{0};  // 0 running, 1 returned true, 2 returned false
    void* comm = world(std::atoi(argv[3]), 0);
    std::thread([context, comm] { state = context->setCommunicator(comm) ? 1 : 2; }).detach();
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (state == 0 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::cout << (state == 0 ? "blocked" : state == 1 ? "returned" : "refused") << " | " << logger.text << std::endl;
    std::_Exit(0);  // the blocked thread stays in the split
  }
  if (argc != 6) {
    std::cerr << "usage: double_host_run LIB PLAN NRANKS INPUTS OUTPUTS\n";
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  void* nccl = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL);
  if (lib == nullptr || nccl == nullptr) {
    std::cerr << "cannot load the double or the fake NCCL: " << dlerror() << "\n";
    return 2;
  }
  auto create = reinterpret_cast<void* (*)(void*, int32_t)>(dlsym(lib, "createInferRuntime_INTERNAL"));
  auto world = reinterpret_cast<void* (*)(int, int)>(dlsym(nccl, "fakeNcclWorld"));
  const std::string plan = read(argv[2]);
  const int n = std::atoi(argv[3]);
  const std::string inputs = read(argv[4]);
  const size_t in_bytes = inputs.size() / static_cast<size_t>(n);
  std::vector<std::string> outputs(n), lines(n);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < n; ++rank) {
    threads.emplace_back([&, rank] {
      Collect logger;
      auto* runtime = static_cast<nvinfer1::IRuntime*>(create(&logger, NV_TENSORRT_VERSION));
      nvinfer1::ICudaEngine* engine = runtime->deserializeCudaEngine(plan.data(), plan.size());
      nvinfer1::IExecutionContext* context = engine ? engine->createExecutionContext() : nullptr;
      bool ok = context != nullptr;
      std::string shape = "-";
      if (ok && engine->getNbIOTensors() == 2) {
        const char* in_name = engine->getIOTensorName(0);
        const char* out_name = engine->getIOTensorName(1);
        ok = context->setCommunicator(world(n, rank));
        nvinfer1::Dims out_dims = context->getTensorShape(out_name);
        shape.clear();
        for (int32_t i = 0; i < out_dims.nbDims; ++i) shape += (i ? "," : "") + std::to_string(out_dims.d[i]);
        const size_t out_bytes = volume(out_dims) * element_size(engine->getTensorDataType(out_name));
        void* in = std::aligned_alloc(256, (in_bytes + 255) / 256 * 256 + 256);
        void* out = std::aligned_alloc(256, (out_bytes + 255) / 256 * 256 + 256);
        std::memcpy(in, inputs.data() + rank * in_bytes, in_bytes);
        std::memset(out, 0xA5, out_bytes);
        ok = ok && context->setTensorAddress(in_name, in) && context->setTensorAddress(out_name, out);
        // Every rank enqueues even after a failure elsewhere would deadlock the others: a failed
        // setCommunicator skips the enqueue on all ranks alike (its causes are the same on every rank).
        ok = ok && context->enqueueV3(nullptr);
        outputs[rank].assign(static_cast<char*>(out), out_bytes);
        std::free(in);
        std::free(out);
      } else {
        ok = false;
      }
      delete context;
      delete engine;
      delete runtime;
      lines[rank] = "rank " + std::to_string(rank) + " shape " + shape + " " + (ok ? "ok" : "failed") + " | " + logger.text;
    });
  }
  for (auto& t : threads) t.join();
  std::ofstream out(argv[5], std::ios::binary);
  for (int rank = 0; rank < n; ++rank) {
    out << outputs[rank];
    std::cout << lines[rank] << "\n";
  }
  return 0;
}
