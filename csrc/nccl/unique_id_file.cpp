#include "nccl/unique_id_file.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>

#include "common/error.h"
#include "nccl/communicator.h"

namespace mdtrt {
namespace {
constexpr size_t kHexLength = sizeof(nccl::UniqueId) * 2;
constexpr const char* kSharedBytesMagic = "mdtrt shared bytes v1";

std::string read_first_line(const std::string& path, bool& exists) {
  std::ifstream in(path);
  exists = static_cast<bool>(in);
  std::string line;
  if (exists) std::getline(in, line);
  return line;
}
}  // namespace

std::string unique_id_to_hex(const nccl::UniqueId& id) {
  static const char* digits = "0123456789abcdef";
  std::string hex;
  hex.reserve(kHexLength);
  for (char c : id.internal) {
    auto b = static_cast<unsigned char>(c);
    hex += digits[b >> 4];
    hex += digits[b & 0xF];
  }
  return hex;
}

nccl::UniqueId unique_id_from_hex(const std::string& hex) {
  if (hex.size() != kHexLength)
    throw_invalid_argument("a NCCL id file holds " + std::to_string(kHexLength) + " hex characters, this one has " +
                           std::to_string(hex.size()));
  auto value = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    throw_invalid_argument(std::string("a NCCL id file holds hex characters only, found '") + c + "'");
  };
  nccl::UniqueId id{};
  for (size_t i = 0; i < sizeof(id.internal); ++i)
    id.internal[i] = static_cast<char>((value(hex[2 * i]) << 4) | value(hex[2 * i + 1]));
  return id;
}

nccl::UniqueId exchange_unique_id_via_file(const std::string& path, int rank, const Deadline& deadline) {
  if (path.empty()) throw_invalid_argument("the NCCL id file path is empty (set TRT_NCCL_ID_FILE)");
  bool exists = false;
  if (rank == 0) {
    std::string stale = read_first_line(path, exists);
    if (exists && !stale.empty()) {
      throw_invalid_argument("NCCL id file " + path +
                             " already has content, probably left by an earlier run; delete it before starting "
                             "all ranks: rm -f " + path);
    }
    nccl::UniqueId id = nccl_unique_id();
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << unique_id_to_hex(id);
      if (!out) throw Error(ErrorKind::kGeneric, "cannot write the NCCL id file " + tmp, rank, "write NCCL id");
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      std::remove(tmp.c_str());
      throw Error(ErrorKind::kGeneric, "cannot rename " + tmp + " to " + path, rank, "write NCCL id");
    }
    return id;
  }
  for (;;) {
    std::string line = read_first_line(path, exists);
    if (line.size() == kHexLength) return unique_id_from_hex(line);
    if (deadline.passed()) {
      throw Error(ErrorKind::kTimeout,
                  "rank 0 did not publish the NCCL id in " + path + " before the deadline" +
                      (exists ? " (the file exists but holds no complete id)" : " (the file does not exist)") +
                      ". Start rank 0 with the same TRT_NCCL_ID_FILE, or raise the timeout.",
                  rank, "read NCCL id");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// Layout: magic line, id as hex line, byte count line, the bytes.
void publish_shared_bytes(const std::string& path, const nccl::UniqueId& run, const std::vector<uint8_t>& data) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid()) + ".XXXXXX";
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0) throw Error(ErrorKind::kGeneric, "cannot create a temporary file next to " + path, 0, "share bytes");
  ::close(fd);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << kSharedBytesMagic << "\n" << unique_id_to_hex(run) << "\n" << data.size() << "\n";
    out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
    if (!out) {
      std::remove(tmp.c_str());
      throw Error(ErrorKind::kGeneric, "cannot write " + tmp, 0, "share bytes");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error(ErrorKind::kGeneric, "cannot rename " + tmp + " to " + path, 0, "share bytes");
  }
}

std::optional<std::vector<uint8_t>> try_read_shared_bytes(const std::string& path, const nccl::UniqueId& run) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::string magic, tag, count;
  if (!std::getline(in, magic) || magic != kSharedBytesMagic || !std::getline(in, tag) ||
      tag != unique_id_to_hex(run) || !std::getline(in, count))
    return std::nullopt;  // not (yet) this run's file
  char* end = nullptr;
  const unsigned long long size = std::strtoull(count.c_str(), &end, 10);
  if (end == count.c_str() || *end != '\0') return std::nullopt;
  std::vector<uint8_t> data(std::istreambuf_iterator<char>(in), {});
  if (data.size() != size) return std::nullopt;
  return data;
}

}  // namespace mdtrt
