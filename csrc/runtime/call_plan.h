// What one ProgramRunner call does, decided on the caller's thread before any rank starts: the
// arguments checked against the program, how each input reaches every GPU, which ranks' outputs
// are fetched to host memory. The rank threads then run the steps in runtime/replication.h and
// runtime/rank_outputs.h with it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/rank_program.h"

namespace mdtrt {

// How an input that every rank needs gets from one place to every GPU.
enum class Replication {
  kAuto,       // the fastest measured on the machines we have (see choose_replication)
  kHost,       // every rank copies from host memory itself
  kPeer,       // one host copy to the first rank, then peer copies over NVLink/PCIe, pipelined in chunks
  kBroadcast,  // one host copy to the first rank, then ncclBroadcast
};
Replication replication_from_name(const std::string& name);
const char* replication_name(Replication r);
std::vector<std::string> replication_names();  // every mode, in the enum's order (exported by _core)
// The mode for one replicated host input of `bytes`: `requested` unless it is kAuto. Auto takes
// kPeer for pageable (not pinned) inputs of kAutoPeerFromPageableBytes or more when every pair of
// the group's GPUs is joined by NVLink (`all_nvlink`, runtime/gpu_links.h), else kHost; it calls
// `is_pageable` (a CUDA query) only where the answer can change the choice.
Replication choose_replication(Replication requested, size_t bytes, bool all_nvlink,
                               const std::function<bool()>& is_pageable);
constexpr size_t kAutoPeerFromPageableBytes = 16 << 20;  // auto: pageable inputs this large go through peer copies

// Chunk of the pipelined host -> first GPU -> peers copy.
constexpr size_t kPeerReplicationChunkBytes = 4 << 20;

struct InputArg {
  const void* data = nullptr;
  int device = -1;  // CUDA device holding `data`; -1 for host memory
  DType dtype = DType::kFloat32;
  Shape shape;
  // The producer's stream on `device` (0: none to order with): the rank reads `data` only after
  // the work already queued there. A blocking call needs nothing after (it returns once every
  // rank has finished); after a stream-ordered one this stream waits for every rank's work.
  uintptr_t stream = 0;
  size_t nbytes() const { return static_cast<size_t>(element_count(shape)) * dtype_size(dtype); }
};

// Where one input of a call is this time: its data and its producer's stream (see InputArg).
struct InputAddress {
  const void* data = nullptr;
  uintptr_t stream = 0;
};

// A caller-provided output buffer on the rank's GPU (outputs without an allocation per call).
struct OutputArg {
  std::string name;
  void* data = nullptr;
  size_t nbytes = 0;
  int device = -1;
  uintptr_t stream = 0;  // the caller's stream on `device`: earlier work there is done before the rank writes
};

struct InferOptions {
  Replication replication = Replication::kAuto;
  bool poison_outputs = false;     // fill outputs with 0xFF bytes first (NaN for floats, -1 for ints)
  std::vector<int> fetch_ranks;    // local ranks whose outputs are copied to host memory
  bool device_outputs = false;     // hand every rank's output device buffers to the caller
  double timeout_seconds = 0;      // 0: the group's timeout
  // Return once the work is queued on every rank instead of when it finished: every caller stream
  // of the call (inputs' producers, outputs') then waits for it on the GPU, as torch.distributed's
  // collectives do. Needs device inputs and outputs, each with its stream, and every output given.
  bool stream_ordered = false;
  // outputs[i]: where local rank i writes the outputs named there; others are allocated by the runner.
  std::vector<std::vector<OutputArg>> outputs;
};

struct CallPlan {
  int num_ranks = 0;
  size_t num_inputs = 0;
  std::vector<Replication> modes;   // per input: kHost unless one host array is replicated to every rank
  std::vector<bool> fetch;          // per local rank: outputs copied to host memory
  int max_chunks = 0;               // chunks of the largest input replicated through the first rank
  int replicated_inputs = 0;        // host inputs given to every rank as one array
  Replication replication = Replication::kHost;  // how they travel
};

// Checks `inputs` (inputs[i]: local rank i's, in the program's input order) against the programs'
// input specs and `options`, and decides replication. Throws InvalidArgument naming what is wrong.
// `all_peer_access` and `whole_world_here` say whether peer and broadcast replication can work;
// `all_nvlink` whether auto may choose peer copies (see choose_replication).
CallPlan plan_call(const std::vector<std::vector<InputArg>>& inputs, const InferOptions& options,
                   const std::vector<std::vector<TensorSpec>>& input_specs, const std::vector<int>& ranks,
                   bool all_peer_access, bool all_nvlink, bool whole_world_here);

inline bool is_aligned(const void* p, size_t alignment) {
  return alignment <= 1 || reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

}  // namespace mdtrt
