// The runtime of cuda_emulation.h: launches, __syncthreads and warp shuffles.
#include "cuda_emulation.h"

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace tdpo_ext::cuda::emulation {
namespace {

constexpr int kWarp = 32;
constexpr unsigned int kFullMask = 0xffffffffu;

// Where a lane of a warp is, as its warp-mates see it.
enum class LaneState { kRunning, kAtShuffle, kAtSyncthreads, kReturned };

// The lanes of one warp: the shuffle exchange and each lane's state. Guarded by mutex.
struct Warp {
  std::mutex mutex;
  std::condition_variable changed;
  LaneState state[kWarp] = {};
  uint64_t sent[kWarp] = {}, received[kWarp] = {};
  int source[kWarp] = {};
  int arrived = 0;
  uint64_t generation = 0;  // shuffles completed
};

// One block's synchronization, rebuilt for every block.
struct Block {
  explicit Block(int threads) : live(threads), warps((threads + kWarp - 1) / kWarp) {}
  std::mutex mutex;
  std::condition_variable released;
  int live;          // threads that have not returned
  int at_barrier = 0;
  uint64_t barriers = 0;  // __syncthreads completed
  std::vector<Warp> warps;
};

// What a launch shares among its threads.
struct Grid {
  const char* op;
  const char* kernel;
  int64_t blocks;
  int threads;
  std::unique_ptr<Block> block;
  // Between blocks: every thread waits here, the last one to arrive builds the next Block.
  std::mutex gate_mutex;
  std::condition_variable gate_open;
  int at_gate = 0;
  uint64_t gate_generation = 0;
};

thread_local Grid* current_grid = nullptr;

int thread_index() { return static_cast<int>(threadIdx.x); }
Warp& my_warp() { return current_grid->block->warps[thread_index() / kWarp]; }
int my_lane() { return thread_index() % kWarp; }

std::string lane_name(int warp, int lane) {
  return "thread " + std::to_string(warp * kWarp + lane) + " (warp " + std::to_string(warp) +
         ", lane " + std::to_string(lane) + ")";
}

// Aborts if a lane of w cannot join a shuffle that the calling lane waits in. Called with
// w.mutex held.
void check_warp_mates(const Warp& w) {
  for (int lane = 0; lane < kWarp; ++lane) {
    if (w.state[lane] == LaneState::kReturned || w.state[lane] == LaneState::kAtSyncthreads) {
      const std::string what =
          "__shfl_xor_sync waits for " + lane_name(thread_index() / kWarp, lane) + ", which " +
          (w.state[lane] == LaneState::kReturned ? "has returned"
                                                 : "waits at __syncthreads") +
          ": every lane of the warp must reach the shuffle";
      fail(what.c_str());
    }
  }
}

void set_lane_state(LaneState state) {
  Warp& w = my_warp();
  {
    const std::lock_guard<std::mutex> lock(w.mutex);
    w.state[my_lane()] = state;
  }
  w.changed.notify_all();
}

// Opens a __syncthreads barrier: called with block.mutex held.
void release_barrier(Block& block) {
  for (Warp& w : block.warps) {
    const std::lock_guard<std::mutex> lock(w.mutex);
    for (LaneState& s : w.state) {
      if (s == LaneState::kAtSyncthreads) s = LaneState::kRunning;
    }
  }
  block.at_barrier = 0;
  ++block.barriers;
  block.released.notify_all();
}

void thread_returned() {
  set_lane_state(LaneState::kReturned);
  Block& block = *current_grid->block;
  const std::lock_guard<std::mutex> lock(block.mutex);
  --block.live;
  if (block.at_barrier > 0 && block.at_barrier == block.live) release_barrier(block);
}

// Waits until every thread of the grid has arrived; the last one to arrive runs
// `last` first.
void grid_gate(Grid& grid, const std::function<void()>& last) {
  std::unique_lock<std::mutex> lock(grid.gate_mutex);
  const uint64_t generation = grid.gate_generation;
  if (++grid.at_gate == grid.threads) {
    last();
    grid.at_gate = 0;
    ++grid.gate_generation;
    grid.gate_open.notify_all();
  } else {
    grid.gate_open.wait(lock, [&] { return grid.gate_generation != generation; });
  }
}

void run_thread(Grid& grid, int thread, const std::function<void()>& body) {
  current_grid = &grid;
  threadIdx = {static_cast<unsigned int>(thread), 0, 0};
  blockDim = {static_cast<unsigned int>(grid.threads), 1, 1};
  gridDim = {static_cast<unsigned int>(grid.blocks), 1, 1};
  for (int64_t b = 0; b < grid.blocks; ++b) {
    grid_gate(grid, [&] { grid.block = std::make_unique<Block>(grid.threads); });
    blockIdx = {static_cast<unsigned int>(b), 0, 0};
    body();
    thread_returned();
  }
  current_grid = nullptr;
}

// The OS threads that run the CUDA threads: created as launches need them and kept for
// the next launches (creating 256 threads per launch would cost more than the kernels).
// A launch runs on threads [0, grid.threads); the others only report back.
class ThreadPool {
 public:
  // Runs the grid; one launch at a time.
  void run(Grid& grid, const std::function<void()>& body) {
    const std::lock_guard<std::mutex> one_launch_at_a_time(launch_mutex_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(threads_.size()) < grid.threads) {
      const int index = static_cast<int>(threads_.size());
      threads_.emplace_back([this, index] { work(index); });
      threads_.back().detach();  // they live as long as the process
    }
    grid_ = &grid;
    body_ = &body;
    reported_ = 0;
    ++launches_;
    posted_.notify_all();
    finished_.wait(lock, [&] { return reported_ == static_cast<int>(threads_.size()); });
    grid_ = nullptr;
  }

 private:
  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      Grid* grid;
      const std::function<void()>* body;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        posted_.wait(lock, [&] { return launches_ != seen; });
        seen = launches_;
        grid = grid_;
        body = body_;
      }
      if (index < grid->threads) run_thread(*grid, index, *body);
      const std::lock_guard<std::mutex> lock(mutex_);
      if (++reported_ == static_cast<int>(threads_.size())) finished_.notify_one();
    }
  }

  std::mutex launch_mutex_;
  std::mutex mutex_;  // guards the fields below
  std::condition_variable posted_, finished_;
  std::vector<std::thread> threads_;
  Grid* grid_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  uint64_t launches_ = 0;
  int reported_ = 0;
};

ThreadPool& thread_pool() {
  static ThreadPool* pool = new ThreadPool;  // never destroyed: its threads never end
  return *pool;
}

}  // namespace

void fail(const char* what) {
  if (current_grid == nullptr) {
    std::fprintf(stderr, "CUDA emulation: %s\n", what);
  } else {
    const int t = thread_index();
    std::fprintf(stderr, "CUDA emulation: %s, kernel %s, block %u, %s: %s\n", current_grid->op,
                 current_grid->kernel, blockIdx.x, lane_name(t / kWarp, t % kWarp).c_str(),
                 what);
  }
  std::fflush(stderr);
  std::abort();
}

void run_grid(const char* op, const char* kernel, int64_t blocks, int threads,
              const std::function<void()>& body) {
  if (threads <= 0 || threads > 1024 || blocks <= 0) {
    const std::string what = std::string(op) + ", kernel " + kernel + ": launch of " +
                             std::to_string(blocks) + " blocks of " + std::to_string(threads) +
                             " threads";
    fail(what.c_str());
  }
  Grid grid{op, kernel, blocks, threads};
  thread_pool().run(grid, body);
}

void sync_threads() {
  set_lane_state(LaneState::kAtSyncthreads);
  Block& block = *current_grid->block;
  std::unique_lock<std::mutex> lock(block.mutex);
  const uint64_t barrier = block.barriers;
  if (++block.at_barrier == block.live) {
    release_barrier(block);
  } else {
    block.released.wait(lock, [&] { return block.barriers != barrier; });
  }
}

uint64_t shuffle_xor(unsigned int mask, uint64_t bits, int lane_mask, int width) {
  if (mask != kFullMask) {
    char what[120];
    std::snprintf(what, sizeof what,
                  "__shfl_xor_sync with mask 0x%08x: the kernels shuffle whole warps (mask "
                  "0xffffffff)",
                  mask);
    fail(what);
  }
  if (width != kWarp || lane_mask < 0 || lane_mask >= kWarp || blockDim.x % kWarp != 0) {
    fail("__shfl_xor_sync: only whole warps with width 32 and a lane mask in [0, 32)");
  }
  Warp& w = my_warp();
  const int lane = my_lane();
  std::unique_lock<std::mutex> lock(w.mutex);
  check_warp_mates(w);
  w.sent[lane] = bits;
  w.source[lane] = lane ^ lane_mask;
  w.state[lane] = LaneState::kAtShuffle;
  const uint64_t generation = w.generation;
  if (++w.arrived == kWarp) {
    for (int l = 0; l < kWarp; ++l) {
      w.received[l] = w.sent[w.source[l]];
      w.state[l] = LaneState::kRunning;
    }
    w.arrived = 0;
    ++w.generation;
    w.changed.notify_all();
  } else {
    w.changed.wait(lock, [&] {
      if (w.generation != generation) return true;
      check_warp_mates(w);
      return false;
    });
  }
  return w.received[lane];
}

void check_vector_alignment(const void* p, std::size_t alignment) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) {
    char what[160];
    std::snprintf(what, sizeof what,
                  "a %zu-byte vector access at %p, which is not %zu-byte aligned (a GPU "
                  "faults: misaligned address)",
                  alignment, p, alignment);
    fail(what);
  }
}

}  // namespace tdpo_ext::cuda::emulation
