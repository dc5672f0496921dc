// What runs on the ranks: the interface between the rank runtime and anything that executes on
// every GPU at once (a TensorRT engine in csrc/trt, the native collectives, test programs).
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

#include "common/deadline.h"
#include "runtime/dtype.h"

namespace mdtrt {

class Communicator;

// One rank as a program sees it, on that rank's own thread.
struct RankContext {
  int local_index = 0;   // position among this process's ranks
  int rank = 0;          // rank in the world communicator
  int world_size = 1;
  int device = -1;       // CUDA device, -1 in CPU-only test runtimes
  cudaStream_t stream = nullptr;
  // The world communicator, blocking: for enqueued collectives and for TensorRT's setCommunicator
  // (nullptr in CPU-only test runtimes). Shared: a program whose state must not outlive it (a
  // TensorRT context) keeps a reference.
  std::shared_ptr<Communicator> world;
  // The same world, non-blocking: for collective set-up steps (splits) that must give up at the
  // deadline instead of hanging when a rank is missing. Shared for the same reason as `world`, and
  // so that a rank given up on inside a split keeps it (see RankRuntime::run_on_all).
  std::shared_ptr<Communicator> world_nonblocking;
  Deadline deadline = Deadline::never();
};

struct TensorSpec {
  std::string name;
  DType dtype = DType::kFloat32;
  Shape shape;  // -1 for a dimension only known once inputs are given
};

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Shape shape;
  size_t nbytes() const { return static_cast<size_t>(element_count(shape)) * dtype_size(dtype); }
};

class RankProgram {
 public:
  virtual ~RankProgram() = default;
  // What the program is, for errors ("all_reduce reduce=sum float16"); the same for its whole life
  // (a runner reads it once).
  virtual std::string describe() const = 0;

  // Set-up that is collective across ranks (TensorRT's setCommunicator, communicator splits).
  // The runtime calls it on every rank's thread at the same time.
  virtual void bind(RankContext& ctx) = 0;

  virtual std::vector<TensorSpec> input_specs(const RankContext& ctx) const = 0;

  // Output names, dtypes and shapes for these input shapes (may configure the rank's state,
  // e.g. TensorRT input shapes). Called on the rank's thread before enqueue.
  virtual std::vector<TensorSpec> resolve_outputs(RankContext& ctx, const std::vector<TensorView>& inputs) = 0;

  // Enqueue the work on ctx.stream; must not wait for it.
  virtual void enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
                       const std::vector<TensorView>& outputs) = 0;

  // Called from another thread when a deadline passed, to unblock a stuck bind or enqueue.
  virtual void abort() {}

  // Bytes every input and output address given to enqueue() must be a multiple of (TensorRT's
  // setTensorAddress wants 256). The runner stages misaligned arrays through aligned buffers.
  virtual size_t required_alignment() const { return 1; }
};

}  // namespace mdtrt
