// A command-line driver of the double's execution context for CPU tests (no GPU needed): every
// refusal of setInputShape, setCommunicator and enqueueV3 happens before any CUDA call.
//   double_context_check LIB PLAN COMMAND...
// Commands: shape:NAME:D0,D1  get:NAME  address:NAME:OFFSET  comm-null  enqueue  io
//           inspector (a method the double leaves to its generated stub)
// Prints one line per command: "<command> -> <result> | <messages the double logged>".
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace {

class Collect : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) text += (text.empty() ? "" : " ; ") + std::string(msg);
  }
  std::string take() {
    std::string out;
    out.swap(text);
    return out;
  }
  std::string text;
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, sep)) out.push_back(item);
  return out;
}

std::string dims_string(const nvinfer1::Dims& d) {
  if (d.nbDims < 0) return "invalid";
  std::string out;
  for (int32_t i = 0; i < d.nbDims; ++i) out += (i ? "," : "") + std::to_string(d.d[i]);
  return "[" + out + "]";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: double_context_check LIB PLAN COMMAND...\n";
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    std::cerr << dlerror() << "\n";
    return 2;
  }
  auto create = reinterpret_cast<void* (*)(void*, int32_t)>(dlsym(lib, "createInferRuntime_INTERNAL"));
  Collect logger;
  auto* runtime = static_cast<nvinfer1::IRuntime*>(create(&logger, NV_TENSORRT_VERSION));
  std::ifstream in(argv[2], std::ios::binary);
  std::string plan((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  nvinfer1::ICudaEngine* engine = runtime->deserializeCudaEngine(plan.data(), plan.size());
  if (engine == nullptr) {
    std::cout << "deserialize -> null | " << logger.take() << "\n";
    return 1;
  }
  nvinfer1::IExecutionContext* context = engine->createExecutionContext();
  for (int i = 3; i < argc; ++i) {
    const std::string command = argv[i];
    const auto parts = split(command, ':');
    std::string result;
    if (parts[0] == "shape") {
      nvinfer1::Dims d{};
      for (const auto& v : split(parts[2], ',')) d.d[d.nbDims++] = std::stoll(v);
      result = context->setInputShape(parts[1].c_str(), d) ? "true" : "false";
    } else if (parts[0] == "get") {
      result = dims_string(context->getTensorShape(parts[1].c_str()));
    } else if (parts[0] == "address") {
      // A made-up address: enqueueV3 checks addresses before touching them.
      auto address = reinterpret_cast<void*>(static_cast<uintptr_t>(0x7f0000000000ULL + std::stoull(parts[2])));
      result = context->setTensorAddress(parts[1].c_str(), address) ? "true" : "false";
    } else if (parts[0] == "comm-null") {
      result = context->setCommunicator(nullptr) ? "true" : "false";
    } else if (parts[0] == "enqueue") {
      result = context->enqueueV3(nullptr) ? "true" : "false";
    } else if (parts[0] == "io") {
      for (int32_t t = 0; t < engine->getNbIOTensors(); ++t) {
        const char* name = engine->getIOTensorName(t);
        result += std::string(t ? " " : "") + name + "=" +
                  (engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? "in" : "out") +
                  dims_string(engine->getTensorShape(name));
      }
    } else if (parts[0] == "inspector") {
      nvinfer1::IEngineInspector* inspector = engine->createEngineInspector();
      result = inspector == nullptr ? "null" : "object";
      delete inspector;
    } else {
      result = "unknown command";
    }
    std::cout << command << " -> " << result << " | " << logger.take() << "\n";
  }
  delete context;
  delete engine;
  delete runtime;
  return 0;
}
