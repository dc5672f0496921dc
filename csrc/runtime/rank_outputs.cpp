#include "runtime/rank_outputs.h"

#include "common/error.h"

namespace mdtrt {

namespace {

void place_outputs_into(RankOutputs& out, RankContext& ctx, RankProgram& program, const std::vector<TensorView>& inputs,
                        const std::vector<OutputArg>& given, bool device_outputs, std::vector<DeviceBuffer>& own) {
  out.specs = program.resolve_outputs(ctx, inputs);
  const size_t num_outputs = out.specs.size();
  for (const OutputArg& g : given) {
    bool known = false;
    for (const auto& spec : out.specs) known = known || spec.name == g.name;
    if (!known) {
      std::string names;
      for (const auto& spec : out.specs) names += (names.empty() ? "" : ", ") + spec.name;
      throw_invalid_argument("a buffer was given for output '" + g.name + "', which the program does not have (" +
                             "its outputs: " + names + ")");
    }
  }
  const size_t alignment = program.required_alignment();
  out.views.resize(num_outputs);
  if (own.size() < num_outputs) own.resize(num_outputs);
  if (device_outputs) out.device.resize(num_outputs);
  for (size_t o = 0; o < num_outputs; ++o) {
    const TensorSpec& spec = out.specs[o];
    TensorView& v = out.views[o];
    v.dtype = spec.dtype;
    v.shape = spec.shape;
    for (int64_t d : v.shape)
      if (d < 0)
        throw Error(ErrorKind::kGeneric, "output '" + spec.name + "' has an unresolved shape " + shape_string(v.shape),
                    ctx.rank, "infer");
    const OutputArg* mine = nullptr;
    for (const OutputArg& g : given)
      if (g.name == spec.name) mine = &g;
    void* destination = nullptr;
    if (mine != nullptr) {
      if (mine->device != ctx.device || mine->nbytes != v.nbytes())
        throw_invalid_argument("the buffer given for output '" + spec.name + "' of rank " + std::to_string(ctx.rank) +
                               " holds " + std::to_string(mine->nbytes) + " bytes on GPU " +
                               std::to_string(mine->device) + "; this rank needs " + std::to_string(v.nbytes()) +
                               " bytes " + shape_string(v.shape) + " " + dtype_name(v.dtype) + " on GPU " +
                               std::to_string(ctx.device));
      if (mine->data == nullptr && v.nbytes() > 0)
        throw_invalid_argument("the buffer given for output '" + spec.name + "' of rank " + std::to_string(ctx.rank) +
                               " is a null pointer");
      destination = mine->data;
    } else if (device_outputs) {
      out.device[o] = std::make_shared<PooledBuffer>(ctx.device, v.nbytes(), ctx.stream);
      destination = out.device[o]->get();
    } else {
      own[o].set_device(ctx.device);
      own[o].reserve(v.nbytes());
      destination = own[o].get();
    }
    if (is_aligned(destination, alignment)) {
      v.data = destination;
      continue;
    }
    own[o].set_device(ctx.device);  // the program writes an aligned stand-in, copied over after
    own[o].reserve(v.nbytes());
    v.data = own[o].get();
    out.copy_out.push_back({o, destination});
  }
}

}  // namespace

void drop_unused_outputs(RankOutputs& outputs, cudaStream_t stream, const Deadline& deadline) {
  bool any = false;
  for (const auto& b : outputs.device) any = any || b != nullptr;
  if (!any) return;
  bool reached = false;
  try {
    reached = wait_stream(stream, deadline);
  } catch (const Error&) {
    reached = false;  // the stream is broken: give the memory up rather than race it
  }
  if (!reached)
    for (auto& b : outputs.device)
      if (b) b->leak();
  outputs.device.clear();
}

RankOutputs place_outputs(RankContext& ctx, RankProgram& program, const std::vector<TensorView>& inputs,
                          const std::vector<OutputArg>& given, bool device_outputs,
                          std::vector<DeviceBuffer>& own) {
  RankOutputs out;
  try {
    place_outputs_into(out, ctx, program, inputs, given, device_outputs, own);
  } catch (...) {
    drop_unused_outputs(out, ctx.stream, ctx.deadline);
    throw;
  }
  return out;
}

void poison_outputs(const RankContext& ctx, const RankOutputs& outputs) {
  for (const TensorView& v : outputs.views) MDTRT_CUDA_CHECK(cudaMemsetAsync(v.data, 0xFF, v.nbytes(), ctx.stream));
}

void finish_outputs(const RankContext& ctx, const RankOutputs& outputs, bool fetch,
                    std::vector<std::vector<uint8_t>>& host) {
  for (const auto& c : outputs.copy_out) {
    const TensorView& v = outputs.views[c.index];
    MDTRT_CUDA_CHECK(cudaMemcpyAsync(c.destination, v.data, v.nbytes(), cudaMemcpyDeviceToDevice, ctx.stream));
  }
  if (!fetch) return;
  host.resize(outputs.views.size());
  for (size_t o = 0; o < outputs.views.size(); ++o) {
    const TensorView& v = outputs.views[o];
    host[o].resize(v.nbytes());
    MDTRT_CUDA_CHECK(cudaMemcpyAsync(host[o].data(), v.data, v.nbytes(), cudaMemcpyDeviceToHost, ctx.stream));
  }
}

}  // namespace mdtrt
