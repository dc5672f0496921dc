// Host emulation of NCCL for the double's CPU tests: ranks are threads of one process, buffers are
// host memory, every call completes before it returns. Built as libnccl.so.2 and found by the
// double's plain dlopen("libnccl.so.2") through LD_LIBRARY_PATH. Implements what the double calls
// (split, the five collectives, grouped send/recv) for float32, int32, int64, int8 and uint8.
// fakeNcclWorld(nranks, rank) hands each rank thread its world communicator.
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "nccl/nccl_api.h"  // mdtrt's declaration of NCCL's ABI: the same values the double uses

namespace {

namespace nccl = mdtrt::nccl;
using nccl::Result;

struct P2P {
  bool send;
  char* buffer;
  size_t bytes;
  int peer;
};

// What one rank brings to a rendezvous.
struct Post {
  const char* send = nullptr;
  char* recv = nullptr;
  size_t count = 0;
  int type = 0;
  int op = 0;
  int root = 0;
  int color = 0, key = 0;
  std::vector<P2P> p2p;
};

struct Group;

struct Comm {
  std::shared_ptr<Group> group;
  int rank = 0;
};

// The ranks of one communicator meet here: each posts, all read every post, all leave together.
struct Group {
  explicit Group(int n) : size(n), posts(n) {}
  int size;
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<Post> posts;
  int arrived = 0;
  uint64_t generation = 0;
  std::map<int, std::vector<Comm*>> children;  // split results, by color (filled by the last arrival)

  void barrier(std::unique_lock<std::mutex>& lock) {
    uint64_t gen = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen; });
    }
  }

  // Posts, waits for all, runs `work` (reading every post), waits for all again.
  template <typename F>
  void exchange(int rank, Post post, F work) {
    std::unique_lock<std::mutex> lock(mutex);
    posts[rank] = std::move(post);
    barrier(lock);
    lock.unlock();
    work(posts);
    lock.lock();
    barrier(lock);
  }
};

size_t type_size(int type) {
  switch (type) {
    case nccl::kInt8:
    case nccl::kUint8: return 1;
    case nccl::kFloat16:
    case nccl::kBfloat16: return 2;
    case nccl::kInt32:
    case nccl::kUint32:
    case nccl::kFloat32: return 4;
    default: return 8;
  }
}

template <typename T>
void reduce_into(char* out, const std::vector<const char*>& ins, size_t offset, size_t count, int op) {
  for (size_t i = 0; i < count; ++i) {
    T acc = reinterpret_cast<const T*>(ins[0])[offset + i];
    for (size_t r = 1; r < ins.size(); ++r) {
      T v = reinterpret_cast<const T*>(ins[r])[offset + i];
      switch (op) {
        case nccl::kProd: acc = static_cast<T>(acc * v); break;
        case nccl::kMax: acc = std::max(acc, v); break;
        case nccl::kMin: acc = std::min(acc, v); break;
        default: acc = static_cast<T>(acc + v); break;
      }
    }
    if (op == nccl::kAvg) acc = static_cast<T>(acc / static_cast<T>(ins.size()));
    reinterpret_cast<T*>(out)[i] = acc;
  }
}

bool reduce(char* out, const std::vector<const char*>& ins, size_t offset, size_t count, int type, int op) {
  switch (type) {
    case nccl::kFloat32: reduce_into<float>(out, ins, offset, count, op); return true;
    case nccl::kInt32: reduce_into<int32_t>(out, ins, offset, count, op); return true;
    case nccl::kInt64: reduce_into<int64_t>(out, ins, offset, count, op); return true;
    case nccl::kInt8: reduce_into<int8_t>(out, ins, offset, count, op); return true;
    case nccl::kUint8: reduce_into<uint8_t>(out, ins, offset, count, op); return true;
    default: return false;
  }
}

thread_local std::vector<std::pair<Comm*, P2P>> t_pending;
thread_local int t_group_depth = 0;

Comm* as_comm(nccl::Comm c) { return reinterpret_cast<Comm*>(c); }

}  // namespace

extern "C" {

__attribute__((visibility("default"))) nccl::Comm fakeNcclWorld(int nranks, int rank) {
  static std::mutex mutex;
  static std::map<int, std::shared_ptr<Group>> worlds;  // one world per size, shared by its rank threads
  std::lock_guard<std::mutex> lock(mutex);
  auto& group = worlds[nranks];
  if (!group) group = std::make_shared<Group>(nranks);
  return reinterpret_cast<nccl::Comm>(new Comm{group, rank});
}

Result ncclCommCount(const nccl::Comm comm, int* count) {
  *count = as_comm(comm)->group->size;
  return nccl::kSuccess;
}
Result ncclCommUserRank(const nccl::Comm comm, int* rank) {
  *rank = as_comm(comm)->rank;
  return nccl::kSuccess;
}
const char* ncclGetErrorString(Result) { return "fake NCCL error"; }
Result ncclCommFinalize(nccl::Comm) { return nccl::kSuccess; }
Result ncclCommDestroy(nccl::Comm comm) {
  delete as_comm(comm);
  return nccl::kSuccess;
}
Result ncclCommAbort(nccl::Comm comm) { return ncclCommDestroy(comm); }

Result ncclCommSplit(nccl::Comm parent, int color, int key, nccl::Comm* newcomm, nccl::Config*) {
  Comm* p = as_comm(parent);
  Group& g = *p->group;
  Post post;
  post.color = color;
  post.key = key;
  std::unique_lock<std::mutex> lock(g.mutex);
  g.posts[p->rank] = post;
  // The last to arrive builds every child group; the others wait for it.
  if (g.arrived + 1 == g.size) {
    g.children.clear();
    std::map<int, std::vector<std::pair<int, int>>> by_color;  // color -> (key, parent rank)
    for (int r = 0; r < g.size; ++r)
      if (g.posts[r].color != nccl::kSplitNoColor) by_color[g.posts[r].color].push_back({g.posts[r].key, r});
    std::vector<Comm*> slot(g.size, nullptr);
    for (auto& [c, members] : by_color) {
      std::sort(members.begin(), members.end());
      auto child = std::make_shared<Group>(static_cast<int>(members.size()));
      for (size_t i = 0; i < members.size(); ++i) slot[members[i].second] = new Comm{child, static_cast<int>(i)};
    }
    g.children[0] = slot;
  }
  g.barrier(lock);
  *newcomm = reinterpret_cast<nccl::Comm>(g.children[0][p->rank]);
  g.barrier(lock);  // everyone has taken its communicator before the next split reuses the slot
  return nccl::kSuccess;
}

Result ncclAllReduce(const void* send, void* recv, size_t count, nccl::DataType type, nccl::RedOp op, nccl::Comm comm,
                     cudaStream_t) {
  Comm* c = as_comm(comm);
  bool ok = true;
  Post post{static_cast<const char*>(send), static_cast<char*>(recv), count, type, op};
  std::vector<char> result(count * type_size(type));
  c->group->exchange(c->rank, post, [&](std::vector<Post>& posts) {
    std::vector<const char*> ins;
    for (auto& q : posts) ins.push_back(q.send);
    ok = reduce(result.data(), ins, 0, count, type, op);
  });
  std::memcpy(recv, result.data(), result.size());
  return ok ? nccl::kSuccess : nccl::kInvalidArgument;
}

Result ncclReduce(const void* send, void* recv, size_t count, nccl::DataType type, nccl::RedOp op, int root,
                  nccl::Comm comm, cudaStream_t stream) {
  Comm* c = as_comm(comm);
  std::vector<char> keep;
  if (c->rank != root) {  // recv is not written on the other ranks
    keep.resize(count * type_size(type));
    recv = keep.data();
  }
  return ncclAllReduce(send, recv, count, type, op, comm, stream);
}

Result ncclReduceScatter(const void* send, void* recv, size_t recv_count, nccl::DataType type, nccl::RedOp op,
                         nccl::Comm comm, cudaStream_t) {
  Comm* c = as_comm(comm);
  bool ok = true;
  std::vector<char> result(recv_count * type_size(type));
  c->group->exchange(c->rank, Post{static_cast<const char*>(send), static_cast<char*>(recv), recv_count, type, op},
                     [&](std::vector<Post>& posts) {
                       std::vector<const char*> ins;
                       for (auto& q : posts) ins.push_back(q.send);
                       ok = reduce(result.data(), ins, c->rank * recv_count, recv_count, type, op);
                     });
  std::memcpy(recv, result.data(), result.size());
  return ok ? nccl::kSuccess : nccl::kInvalidArgument;
}

Result ncclAllGather(const void* send, void* recv, size_t count, nccl::DataType type, nccl::Comm comm, cudaStream_t) {
  Comm* c = as_comm(comm);
  const size_t bytes = count * type_size(type);
  std::vector<char> result(bytes * c->group->size);
  c->group->exchange(c->rank, Post{static_cast<const char*>(send), static_cast<char*>(recv), count, type},
                     [&](std::vector<Post>& posts) {
                       for (size_t r = 0; r < posts.size(); ++r) std::memcpy(result.data() + r * bytes, posts[r].send, bytes);
                     });
  std::memcpy(recv, result.data(), result.size());
  return nccl::kSuccess;
}

Result ncclBroadcast(const void* send, void* recv, size_t count, nccl::DataType type, int root, nccl::Comm comm,
                     cudaStream_t) {
  Comm* c = as_comm(comm);
  std::vector<char> result(count * type_size(type));
  c->group->exchange(c->rank, Post{static_cast<const char*>(send), static_cast<char*>(recv), count, type},
                     [&](std::vector<Post>& posts) { std::memcpy(result.data(), posts[root].send, result.size()); });
  std::memcpy(recv, result.data(), result.size());
  return nccl::kSuccess;
}

Result ncclGroupStart() {
  ++t_group_depth;
  return nccl::kSuccess;
}

Result ncclSend(const void* send, size_t count, nccl::DataType type, int peer, nccl::Comm comm, cudaStream_t) {
  if (t_group_depth == 0) return nccl::kInvalidUsage;  // the double always groups point-to-point calls
  t_pending.push_back({as_comm(comm), P2P{true, const_cast<char*>(static_cast<const char*>(send)), count * type_size(type), peer}});
  return nccl::kSuccess;
}

Result ncclRecv(void* recv, size_t count, nccl::DataType type, int peer, nccl::Comm comm, cudaStream_t) {
  if (t_group_depth == 0) return nccl::kInvalidUsage;
  t_pending.push_back({as_comm(comm), P2P{false, static_cast<char*>(recv), count * type_size(type), peer}});
  return nccl::kSuccess;
}

// Every rank of the communicator ends its group together (as the double's layers do): the k-th
// receive from a peer takes the k-th send of that peer to this rank.
Result ncclGroupEnd() {
  if (--t_group_depth > 0 || t_pending.empty()) return nccl::kSuccess;
  Comm* c = t_pending.front().first;
  Post post;
  for (auto& [comm, op] : t_pending) {
    if (comm->group != c->group) return nccl::kInvalidUsage;
    post.p2p.push_back(op);
  }
  t_pending.clear();
  bool ok = true;
  // Receives are staged, so a rank's own send buffer is read before anything is written.
  std::vector<std::pair<char*, std::vector<char>>> staged;
  c->group->exchange(c->rank, post, [&](std::vector<Post>& posts) {
    std::map<int, int> taken;  // peer -> sends of that peer to me already matched
    for (const P2P& mine : posts[c->rank].p2p) {
      if (mine.send) continue;
      const P2P* match = nullptr;
      int seen = 0;
      for (const P2P& theirs : posts[mine.peer].p2p)
        if (theirs.send && theirs.peer == c->rank && seen++ == taken[mine.peer]) {
          match = &theirs;
          break;
        }
      ++taken[mine.peer];
      if (match == nullptr || match->bytes != mine.bytes) {
        ok = false;
        continue;
      }
      staged.push_back({mine.buffer, std::vector<char>(match->buffer, match->buffer + match->bytes)});
    }
  });
  // exchange() returned after every rank staged what it receives: writing now overwrites nothing unread.
  for (auto& [dst, bytes] : staged) std::memcpy(dst, bytes.data(), bytes.size());
  return ok ? nccl::kSuccess : nccl::kInvalidUsage;
}

}  // extern "C"
