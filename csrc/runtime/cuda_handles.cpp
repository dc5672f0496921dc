#include "runtime/cuda_handles.h"

#include <thread>

namespace mdtrt {

bool wait_stream(cudaStream_t stream, const Deadline& deadline) {
  // Spin first (most engines and collectives finish within milliseconds, and a sleep would add its
  // own length to every call), then sleep in short steps so a long engine does not burn a core.
  auto spin_until = Deadline::Clock::now() + std::chrono::milliseconds(5);
  int sleep_us = 10;
  for (;;) {
    cudaError_t status = cudaStreamQuery(stream);
    if (status == cudaSuccess) return true;
    if (status != cudaErrorNotReady) throw_cuda_error(status, "cudaStreamQuery");
    if (deadline.passed()) return false;
    if (Deadline::Clock::now() < spin_until) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      if (sleep_us < 100) sleep_us *= 2;
    }
  }
}

}  // namespace mdtrt
