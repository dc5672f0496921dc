#include "runtime/cuda_handles.h"

#include <thread>

namespace mdtrt {

bool wait_stream(cudaStream_t stream, const Deadline& deadline) {
  // Spin briefly (latency-bound engines finish in microseconds), then back off to sleeping so a
  // long engine does not burn a core per rank.
  auto spin_until = Deadline::Clock::now() + std::chrono::microseconds(200);
  int sleep_us = 20;
  for (;;) {
    cudaError_t status = cudaStreamQuery(stream);
    if (status == cudaSuccess) return true;
    if (status != cudaErrorNotReady) throw_cuda_error(status, "cudaStreamQuery");
    if (deadline.passed()) return false;
    if (Deadline::Clock::now() < spin_until) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      if (sleep_us < 1000) sleep_us *= 2;
    }
  }
}

}  // namespace mdtrt
