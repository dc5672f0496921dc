#include "nccl/unique_id_file.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <iterator>
#include <sstream>
#include <thread>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/interrupt.h"
#include "nccl/communicator.h"

namespace mdtrt {
namespace {
constexpr size_t kHexLength = sizeof(nccl::UniqueId) * 2;
constexpr const char* kSharedBytesMagic = "mdtrt shared bytes v1";

// Who published an id file: "run=<token> host=<host> pid=<pid> start=<ticks>".
struct Publisher {
  std::string run, host;
  long pid = -1;
  unsigned long long start = 0;  // process start time, clock ticks since boot (/proc/<pid>/stat)
  bool known = false;            // the file had the record (NVIDIA's sample writes none)
};

struct IdFile {
  bool exists = false;
  std::string hex;
  Publisher by;
};

std::string this_host() {
  char name[256] = {0};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown";
  return name;
}

// Field 22 of /proc/<pid>/stat; 0 when the process does not exist.
unsigned long long process_start_ticks(long pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!in || !std::getline(in, stat)) return 0;
  const size_t paren = stat.rfind(')');  // the command name may hold spaces and parentheses
  if (paren == std::string::npos) return 0;
  std::istringstream fields(stat.substr(paren + 2));
  std::string field;
  for (int i = 3; i <= 22 && fields >> field; ++i)
    if (i == 22) return std::stoull(field);
  return 0;
}

std::string without_spaces(std::string s) {
  for (char& c : s)
    if (c == ' ' || c == '\n' || c == '\t' || c == '=') c = '_';
  return s;
}

std::string record_of_this_process(const std::string& run_token) {
  return "run=" + without_spaces(run_token) + " host=" + without_spaces(this_host()) +
         " pid=" + std::to_string(::getpid()) + " start=" + std::to_string(process_start_ticks(::getpid()));
}

IdFile read_id_file(const std::string& path) {
  IdFile f;
  std::ifstream in(path);
  f.exists = static_cast<bool>(in);
  if (!f.exists) return f;
  std::getline(in, f.hex);
  std::string record;
  if (!std::getline(in, record)) return f;
  std::istringstream words(record);
  std::string word;
  std::map<std::string, std::string> kv;
  while (words >> word) {
    const size_t eq = word.find('=');
    if (eq != std::string::npos) kv[word.substr(0, eq)] = word.substr(eq + 1);
  }
  if (!kv.count("host") || !kv.count("pid")) return f;
  f.by.known = true;
  f.by.run = kv["run"];
  f.by.host = kv["host"];
  try {
    f.by.pid = std::stol(kv["pid"]);
    f.by.start = kv.count("start") ? std::stoull(kv["start"]) : 0;
  } catch (const std::exception&) {
    f.by.known = false;
  }
  return f;
}

bool publisher_alive_here(const Publisher& by) {
  if (by.host != without_spaces(this_host()) || by.pid <= 0) return false;
  if (::kill(static_cast<pid_t>(by.pid), 0) != 0 && errno == ESRCH) return false;
  return by.start == 0 || process_start_ticks(by.pid) == by.start;  // pid reused by another process: not it
}

// Why the id in `f` is not this run's, or "" when it is.
std::string stale_reason(const IdFile& f, const std::string& run_token) {
  if (!f.by.known)
    return "it names no run (written by an older mdtrt or NVIDIA's sample, so possibly by an earlier run)";
  // Launchers reuse run ids (torchrun's default is "none"), so an equal id alone proves nothing;
  // a different one proves the file is another run's.
  if (!run_token.empty() && !f.by.run.empty() && f.by.run != without_spaces(run_token))
    return "it was written for launcher run '" + f.by.run + "', this is run '" + without_spaces(run_token) + "'";
  if (f.by.host != without_spaces(this_host())) return {};  // another host: nothing more to judge by
  if (publisher_alive_here(f.by)) return {};
  return "it was written by process " + std::to_string(f.by.pid) + ", which has exited (an earlier run)";
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

void check_unique_id_file_path(const std::string& path, int rank) {
  if (path.empty()) throw_invalid_argument("the NCCL id file path is empty (set TRT_NCCL_ID_FILE)");
  const std::string what = "the NCCL id file " + path + " (TRT_NCCL_ID_FILE)";
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    throw Error(ErrorKind::kInvalidArgument,
                what + " is a directory: name a file in it instead, e.g. " +
                    (path.back() == '/' ? path : path + "/") + "nccl_id, the same on every rank",
                rank, "NCCL id exchange");
  const size_t slash = path.find_last_of('/');
  const std::string folder = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  const bool found = ::stat(folder.c_str(), &st) == 0;
  if (!found || !S_ISDIR(st.st_mode)) {
    const std::string why = found ? "not a directory" : std::strerror(errno);
    throw Error(ErrorKind::kInvalidArgument,
                what + " cannot be written: its folder " + folder + " is unusable (" + why +
                    "); create that folder on a file system every rank can read, or name a file in an existing one",
                rank, "NCCL id exchange");
  }
}

nccl::UniqueId exchange_unique_id_via_file(const std::string& path, int rank, const Deadline& deadline,
                                           const std::string& run_token) {
  check_unique_id_file_path(path, rank);
  if (rank == 0) {
    const IdFile existing = read_id_file(path);
    if (existing.by.known && existing.by.pid != ::getpid() && publisher_alive_here(existing.by)) {
      throw_invalid_argument("NCCL id file " + path + " was just published by process " +
                             std::to_string(existing.by.pid) +
                             ", which is still running: two runs share one TRT_NCCL_ID_FILE (or two processes "
                             "are rank 0). Give each run its own file.");
    }
    // Anything else there is from an earlier run: the rename below replaces it in one step.
    nccl::UniqueId id = nccl_unique_id();
    const std::string content = unique_id_to_hex(id) + "\n" + record_of_this_process(run_token) + "\n";
    const std::string failed = write_file_atomically(path, content.data(), content.size());
    if (!failed.empty()) throw Error(ErrorKind::kGeneric, "NCCL id file: " + failed, rank, "write NCCL id");
    return id;
  }
  std::string stale;
  auto next_interrupt_check = Deadline::Clock::now() + kInterruptPollInterval;
  for (;;) {
    const IdFile f = read_id_file(path);
    if (f.hex.size() == kHexLength) {
      stale = stale_reason(f, run_token);
      if (stale.empty()) return unique_id_from_hex(f.hex);
    }
    if (deadline.passed()) {
      std::string state = !f.exists ? " (the file does not exist)"
                          : !stale.empty() ? " (the file there is from an earlier run: " + stale + ")"
                                           : " (the file exists but holds no complete id)";
      // A relative path is taken from each process's own working directory: ranks started in
      // different folders look at different files.
      char cwd[4096] = {0};
      const std::string where = path.front() == '/' || ::getcwd(cwd, sizeof(cwd) - 1) == nullptr
                                    ? path
                                    : path + " (a relative path: " + cwd + "/" + path + " for this rank)";
      throw Error(ErrorKind::kTimeout,
                  "rank 0 did not publish the NCCL id in " + where + " before the deadline" + state +
                      ". Start rank 0 with the same TRT_NCCL_ID_FILE" +
                      (where == path ? "" : ", as an absolute path or from the same folder") +
                      ", or raise the timeout.",
                  rank, "read NCCL id");
    }
    if (Deadline::Clock::now() >= next_interrupt_check) {
      if (interrupt_requested()) throw_interrupted("read NCCL id", rank);
      next_interrupt_check = Deadline::Clock::now() + kInterruptPollInterval;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

void remove_unique_id_file(const std::string& path, const nccl::UniqueId& id) {
  const IdFile f = read_id_file(path);
  if (f.hex == unique_id_to_hex(id)) std::remove(path.c_str());
}

// Layout: magic line, id as hex line, byte count line, the bytes.
void publish_shared_bytes(const std::string& path, const nccl::UniqueId& run, const std::vector<uint8_t>& data) {
  std::string content = std::string(kSharedBytesMagic) + "\n" + unique_id_to_hex(run) + "\n" +
                        std::to_string(data.size()) + "\n";
  content.append(reinterpret_cast<const char*>(data.data()), data.size());
  const std::string failed = write_file_atomically(path, content.data(), content.size());
  if (!failed.empty()) throw Error(ErrorKind::kGeneric, failed, 0, "share bytes");
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
