// Writing a file so that readers see either the old content or the whole new one, never a part:
// the bytes go to a temporary file beside it (a unique name, so concurrent writers never share
// one), which is then renamed over it. Used for the NCCL id file, plans shared between ranks and
// TensorRT's timing cache, all read by other processes while they may be written.
#pragma once

#include <cstddef>
#include <string>

namespace mdtrt {

// Writes `size` bytes to `path` atomically. Returns "" on success, else what failed ("cannot
// create a temporary file next to <path>", "cannot write <tmp>", "cannot rename <tmp> to <path>");
// the temporary file is removed then. The caller decides whether that is an error or a warning.
std::string write_file_atomically(const std::string& path, const void* data, size_t size);

}  // namespace mdtrt
