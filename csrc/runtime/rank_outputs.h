// A rank's outputs for one call: where each one is written (chosen during the checks, with every
// buffer allocated) and what happens after the program ran (copies to buffers the program could
// not take, copies to host memory).
#pragma once

#include <memory>
#include <vector>

#include "runtime/call_plan.h"
#include "runtime/cuda_handles.h"
#include "runtime/memory_pool.h"

namespace mdtrt {

struct RankOutputs {
  std::vector<TensorSpec> specs;                       // as the program resolved them
  std::vector<TensorView> views;                       // where the program writes
  std::vector<std::shared_ptr<PooledBuffer>> device;   // per output, when handed to the caller
  // Outputs written to an aligned stand-in first, then copied to the caller's buffer.
  struct CopyOut {
    size_t index;
    void* destination;
  };
  std::vector<CopyOut> copy_out;
};

// Check step: resolves the outputs for `inputs` and places each: the caller's buffer (`given`,
// checked for name, GPU and size), a pooled allocation handed to the caller (`device_outputs`),
// or the rank's own reusable buffer; an address the program cannot take gets an aligned stand-in.
RankOutputs place_outputs(RankContext& ctx, RankProgram& program, const std::vector<TensorView>& inputs,
                          const std::vector<OutputArg>& given, bool device_outputs,
                          std::vector<DeviceBuffer>& own);

// For a call that failed before it handed its outputs over: the pooled buffers allocated (in
// order on `stream`) are freed once `stream` reached their allocation, or given up when it does
// not within `deadline` (a free on another stream must not overtake the allocation).
void drop_unused_outputs(RankOutputs& outputs, cudaStream_t stream, const Deadline& deadline);

// Launch steps around the program: poison before (0xFF bytes), copy to the caller's buffers and
// to host memory after (host[o], sized here), all on ctx.stream.
void poison_outputs(const RankContext& ctx, const RankOutputs& outputs);
void finish_outputs(const RankContext& ctx, const RankOutputs& outputs, bool fetch,
                    std::vector<std::vector<uint8_t>>& host);

}  // namespace mdtrt
