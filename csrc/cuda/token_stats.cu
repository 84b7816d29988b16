// CUDA kernels of tdpo_ext::token_stats (whole rows, or tiles of columns with
// token_stats_tile and token_stats_finish) and token_stats_backward and their launchers
// (launch.h), with the semantics of the CPU kernels (csrc/cpu/token_stats_kernel.cpp):
// float32 math whatever the logits dtypes, outputs 0 on masked tokens, the gradient
// contiguous in the policy dtype with zeros on masked tokens. The ops themselves (checks,
// allocation, errors) are in ops_cuda.cpp.
//
// Label validation cost. A label outside [0, V) that is not ignore_index raises the
// CPU op's error (fail_bad_label), not a device-side assert. The forward kernel records
// the first such row (atomicMin on one device int64) and ops_cuda.cpp reads it back once
// per token_stats call: one 8-byte device-to-host copy and a synchronization of the current
// stream. That wait, not the copy, is the cost: the host blocks until every kernel queued
// before it on the stream has run, so Python can no longer queue work ahead of the GPU
// across this op, and the op cannot be captured in a CUDA graph. token_stats_backward
// does not synchronize: it gets the labels that its forward already checked (autograd
// saves them); neither device checks them there, as a tile of columns cannot.
//
// Memory-bound design: each unmasked vocabulary row is read once per direction, in 16-byte
// vector loads coalesced across the threads of a row, with no (N, T, V) temporaries.
//  - A row is processed by a team of threads: a warp for V <= kWarpRowMaxVocab (8 rows
//    per 256-thread block), otherwise the whole 256-thread block.
//  - Forward: every thread folds chunks of its elements into an online SoftmaxPairState
//    of both models (merge_states, tdpo_math.h); the team merges the states by warp
//    shuffles, then across warps through shared memory; lane 0 finishes the token.
//    With the policy metrics (token_stats' policy_metrics), a PolicyMetricsState rides
//    beside the SoftmaxPairState through the same folds and merges (merge_metrics): a
//    separate instantiation of each forward kernel (kMetrics), so that the kernels
//    without them are unchanged.
//  - Backward: p and q are recomputed from the lse saved by the forward; one write per
//    element, the label's label_bonus added before the single rounding to the policy dtype.
//  - Vectors: 16 bytes of the narrower logits dtype per step (8 elements for bf16/fp16,
//    4 for fp32), loaded as whole 16-byte words of each tensor. A row pointer need not be
//    16-byte aligned (logits[:, :-1] with odd V, a storage offset): the row is walked
//    element by element up to the first offset at which every tensor of the row is
//    aligned, in vectors from there, and element by element again for the last < 8
//    elements. Where no offset aligns them all (rows of different alignment), the whole
//    row is walked element by element, still coalesced.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>
#include <type_traits>

#include "../dispatch.h"
#include "../tdpo_math.h"
#include "device.h"
#include "launch.h"

namespace tdpo_ext::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBlockThreads = 256;
// Up to this V a warp owns a row. A block on such a row would give each of its threads
// at most one 16-byte vector of bf16 (256 x 8 = 2048 elements) and still pay a
// barrier-synchronized reduction per row.
constexpr int64_t kWarpRowMaxVocab = 2048;
// Forward: vectors per thread folded as one chunk, so that merge_states' rescaling (four
// exps) is paid once per 2 x 8 bf16 elements (2 x 4 fp32) rather than per vector.
constexpr int kUnroll = 2;

// Elements per vector step: 16 bytes of the narrower dtype, a whole number of 16-byte
// words of each (two for a float32 tensor beside a bf16 one).
template <typename A, typename B>
constexpr int vec_elems() {
  return static_cast<int>(16 / (sizeof(A) < sizeof(B) ? sizeof(A) : sizeof(B)));
}

template <typename T, int kN>
struct alignas(16) Pack {
  static_assert(kN * sizeof(T) % 16 == 0, "a Pack is whole 16-byte words");
  T v[kN];
};

template <int kN, typename T>
__device__ __forceinline__ void load_floats(const T* p, float* out) {
  const Pack<T, kN> pack = *vector_at<const Pack<T, kN>>(p);
#pragma unroll
  for (int j = 0; j < kN; ++j) out[j] = static_cast<float>(pack.v[j]);
}

template <int kN, typename T>
__device__ __forceinline__ void store_floats(T* p, const float* in) {
  Pack<T, kN> pack;
#pragma unroll
  for (int j = 0; j < kN; ++j) pack.v[j] = static_cast<T>(in[j]);
  *vector_at<Pack<T, kN>>(p) = pack;
}

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// A row is walked as [0, vec_begin) element by element, [vec_begin, vec_end) in vectors
// of kVec elements and [vec_end, V) element by element. Without an offset at which every
// row pointer is 16-byte aligned (or without room for one vector) both are V.
struct RowSplit {
  int64_t vec_begin;
  int64_t vec_end;
};

// Every pointer advances a whole number of 16-byte words per kVec elements, so the
// offsets [0, kVec) are the only candidates for the start of the vectors.
template <int kVec, typename... Ts>
__device__ __forceinline__ RowSplit split_row(int64_t vocab, const Ts*... rows) {
  for (int64_t head = 0; head < kVec && head + kVec <= vocab; ++head) {
    if ((aligned16(rows + head) && ...)) {
      return {head, head + (vocab - head) / kVec * kVec};
    }
  }
  return {vocab, vocab};
}

// Strides of the (N, T, V) logits and (N, T) labels; row = n * T + t indexes the outputs.
struct RowLayout {
  int64_t rows, seq_len, vocab;
  int64_t pol_stride_n, pol_stride_t;
  int64_t ref_stride_n, ref_stride_t;
  int64_t tgt_stride_n, tgt_stride_t;
};

RowLayout make_layout(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                      const at::Tensor& targets) {
  return {targets.size(0) * targets.size(1), targets.size(1), policy_logits.size(2),
          policy_logits.stride(0), policy_logits.stride(1), ref_logits.stride(0),
          ref_logits.stride(1), targets.stride(0), targets.stride(1)};
}

// The team (a warp or the block) of a row: every thread of a team shares the row, so an
// early return or a branch on the row's label is uniform across the team.
template <int kTeam>
struct TeamPosition {
  static constexpr int kRowsPerBlock = kBlockThreads / kTeam;
  int64_t row;
  int lane;

  __device__ TeamPosition()
      : row(static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kTeam),
        lane(static_cast<int>(threadIdx.x % kTeam)) {}
};

// ---------------------------------------------------------------------------------
// Forward

// What a thread keeps of its columns: the SoftmaxPairState, and with kMetrics the
// PolicyMetricsState beside it (tdpo_math.h). Without kMetrics there is no `metrics` and
// every metrics step below is compiled out: those kernels are the ones without the
// metrics, instruction for instruction (shared memory included).
template <bool kMetrics>
struct RowState {
  SoftmaxPairState softmax;
  PolicyMetricsState metrics;
};

template <>
struct RowState<false> {
  SoftmaxPairState softmax;
};

template <bool kMetrics>
__device__ __forceinline__ RowState<kMetrics> empty_row_state() {
  RowState<kMetrics> s{empty_state()};
  if constexpr (kMetrics) s.metrics = empty_metrics_state();
  return s;
}

// The state of the union of two parts of a row (merge_metrics needs both softmax states
// before their merge).
template <bool kMetrics>
__device__ __forceinline__ RowState<kMetrics> merge_row_states(const RowState<kMetrics>& a,
                                                               const RowState<kMetrics>& b) {
  RowState<kMetrics> out{merge_states(a.softmax, b.softmax)};
  if constexpr (kMetrics) out.metrics = merge_metrics(a.softmax, a.metrics, b.softmax, b.metrics);
  return out;
}

// A chunk element's column counted from the row's (or tile's) first one, or kPadColumn
// for a pad (-inf in both models) that stands in for no column.
constexpr int64_t kPadColumn = -1;

// Folds kN elements of each model into `state` (a pair of -inf pads adds nothing to the
// softmax sums): the chunk's own state in the frame of its maximum, then merged. With
// kMetrics, column(j) is element j's column (kPadColumn for a pad, which the metrics'
// sums and count leave out) and label_col the label's: the elements before it feed
// max_before_label.
template <int kN, bool kMetrics, typename Column>
__device__ __forceinline__ void fold_chunk(RowState<kMetrics>& state, const float* x,
                                           const float* r, const Column& column,
                                           int64_t label_col) {
  float max_x = -INFINITY, max_r = -INFINITY;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    max_x = fmaxf(max_x, x[j]);
    max_r = fmaxf(max_r, r[j]);
  }
  const float shift_x = exp_shift(max_x), shift_r = exp_shift(max_r);
  const float gap = frame_gap(max_x, max_r);
  RowState<kMetrics> chunk{{max_x, 0.f, max_r, 0.f, 0.f}};
  if constexpr (kMetrics) chunk.metrics = empty_metrics_state();
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const float er = expf(r[j] - shift_r);
    const float ex = expf(x[j] - shift_x);
    chunk.softmax.sum_pol += ex;
    chunk.softmax.sum_ref += er;
    chunk.softmax.ref_diff_sum += ref_diff_term(er, r[j], x[j], gap);
    if constexpr (kMetrics) {
      const int64_t col = column(j);
      if (col != kPadColumn) {
        chunk.metrics.centered_sum += centered_term(ex, x[j] - shift_x);
        chunk.metrics.logit_sum += x[j];
        chunk.metrics.columns += 1.f;
        if (col < label_col) {
          chunk.metrics.max_before_label = fmaxf(chunk.metrics.max_before_label, x[j]);
        }
      }
    }
  }
  state = merge_row_states(state, chunk);
}

// Elements [begin, end) one per lane per load, kN loads folded as a chunk. kN = 1 for
// the few elements around the vectors, wider when a whole row is unaligned.
template <int kN, int kTeam, bool kMetrics, typename P, typename R>
__device__ __forceinline__ void fold_strided(RowState<kMetrics>& state, const P* x, const R* r,
                                             int64_t begin, int64_t end, int64_t label_col,
                                             int lane) {
  for (int64_t v = begin + lane; v < end; v += static_cast<int64_t>(kN) * kTeam) {
    float xs[kN], rs[kN];
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      const int64_t e = v + static_cast<int64_t>(j) * kTeam;
      xs[j] = e < end ? static_cast<float>(x[e]) : -INFINITY;
      rs[j] = e < end ? static_cast<float>(r[e]) : -INFINITY;
    }
    const auto column = [&](int j) {
      const int64_t e = v + static_cast<int64_t>(j) * kTeam;
      return e < end ? e : kPadColumn;
    };
    fold_chunk<kN>(state, xs, rs, column, label_col);
  }
}

// n_vec vectors of kVec elements from 16-byte aligned x and r, the row's columns from
// first_col on; lane l takes vectors l, l + kTeam, ... so that a warp's loads of one step
// are contiguous.
template <int kVec, int kTeam, bool kMetrics, typename P, typename R>
__device__ __forceinline__ void fold_vectors(RowState<kMetrics>& state, const P* x, const R* r,
                                             int64_t n_vec, int64_t first_col,
                                             int64_t label_col, int lane) {
  constexpr int kN = kVec * kUnroll;
  for (int64_t k = lane; k < n_vec; k += static_cast<int64_t>(kUnroll) * kTeam) {
    float xs[kN], rs[kN];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t vk = k + static_cast<int64_t>(u) * kTeam;
      if (vk < n_vec) {
        load_floats<kVec>(x + vk * kVec, xs + u * kVec);
        load_floats<kVec>(r + vk * kVec, rs + u * kVec);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) xs[u * kVec + j] = rs[u * kVec + j] = -INFINITY;
      }
    }
    const auto column = [&](int j) {
      const int64_t vk = k + static_cast<int64_t>(j / kVec) * kTeam;
      return vk < n_vec ? first_col + vk * kVec + j % kVec : kPadColumn;
    };
    fold_chunk<kN>(state, xs, rs, column, label_col);
  }
}

__device__ __forceinline__ float shfl_xor(float value, int mask) {
  return __shfl_xor_sync(0xffffffffu, value, mask);
}

// Lane (lane ^ mask)'s state: every field, the metrics' too.
template <bool kMetrics>
__device__ __forceinline__ RowState<kMetrics> shfl_xor_state(const RowState<kMetrics>& s,
                                                             int mask) {
  const SoftmaxPairState& a = s.softmax;
  RowState<kMetrics> out{{shfl_xor(a.max_pol, mask), shfl_xor(a.sum_pol, mask),
                          shfl_xor(a.max_ref, mask), shfl_xor(a.sum_ref, mask),
                          shfl_xor(a.ref_diff_sum, mask)}};
  if constexpr (kMetrics) {
    const PolicyMetricsState& m = s.metrics;
    out.metrics = {shfl_xor(m.centered_sum, mask), shfl_xor(m.logit_sum, mask),
                   shfl_xor(m.columns, mask), shfl_xor(m.max_before_label, mask)};
  }
  return out;
}

template <bool kMetrics>
__device__ __forceinline__ RowState<kMetrics> warp_merge(RowState<kMetrics> s) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask /= 2) {
    s = merge_row_states(s, shfl_xor_state(s, mask));
  }
  return s;
}

// The state of the team's whole row, complete in lane 0.
template <int kTeam, bool kMetrics>
__device__ __forceinline__ RowState<kMetrics> team_merge(RowState<kMetrics> s) {
  // A team of several warps but not the whole block would call __syncthreads from part of
  // the block (a hang, or undefined behaviour) and share warp_states with the block's
  // other teams (a race): supporting one needs a per-team barrier and slots.
  static_assert(kTeam == kWarp || kTeam == kBlockThreads,
                "team_merge merges a warp or the whole block");
  s = warp_merge(s);
  if constexpr (kTeam > kWarp) {
    // The team is the block (one row per block): each shared slot is written once.
    constexpr int kWarps = kTeam / kWarp;
    __shared__ RowState<kMetrics> warp_states[kWarps];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (lane == 0) warp_states[warp] = s;
    __syncthreads();
    if (warp == 0) s = warp_merge(lane < kWarps ? warp_states[lane] : empty_row_state<kMetrics>());
  }
  return s;
}

// The state of the team's row of `vocab` columns, complete in lane 0; label_col is the
// label's column counted from the row's first (kMetrics only reads it).
template <int kTeam, bool kMetrics, typename P, typename R>
__device__ __forceinline__ RowState<kMetrics> row_state(const P* x, const R* r, int64_t vocab,
                                                        int64_t label_col, int lane) {
  constexpr int kVec = vec_elems<P, R>();
  RowState<kMetrics> state = empty_row_state<kMetrics>();
  const RowSplit split = split_row<kVec>(vocab, x, r);
  if (split.vec_begin == split.vec_end) {
    fold_strided<kVec * kUnroll, kTeam>(state, x, r, 0, vocab, label_col, lane);
  } else {
    fold_strided<1, kTeam>(state, x, r, 0, split.vec_begin, label_col, lane);
    fold_vectors<kVec, kTeam>(state, x + split.vec_begin, r + split.vec_begin,
                              (split.vec_end - split.vec_begin) / kVec, split.vec_begin,
                              label_col, lane);
    fold_strided<1, kTeam>(state, x, r, split.vec_end, vocab, label_col, lane);
  }
  return team_merge<kTeam>(state);
}

template <typename P, typename R, int kTeam, bool kMetrics>
__global__ void __launch_bounds__(kBlockThreads)
    token_stats_kernel(const P* __restrict__ policy_logits, const R* __restrict__ ref_logits,
                       const int64_t* __restrict__ targets, RowLayout layout,
                       int64_t ignore_index, TokenStatsOut out,
                       unsigned long long* __restrict__ first_bad_row) {
  const TeamPosition<kTeam> pos;
  if (pos.row >= layout.rows) return;
  const int64_t n = pos.row / layout.seq_len, t = pos.row % layout.seq_len;
  const int64_t y = targets[n * layout.tgt_stride_n + t * layout.tgt_stride_t];
  const bool masked = y == ignore_index;
  if (masked || y < 0 || y >= layout.vocab) {
    if (pos.lane == 0) {
      // As unsigned, the host's -1 fill is the largest value: the minimum bad row wins.
      if (!masked) atomicMin(first_bad_row, static_cast<unsigned long long>(pos.row));
      out.write_masked(pos.row);
    }
    return;
  }
  const P* x = policy_logits + n * layout.pol_stride_n + t * layout.pol_stride_t;
  const R* r = ref_logits + n * layout.ref_stride_n + t * layout.ref_stride_t;
  const RowState<kMetrics> state = row_state<kTeam, kMetrics>(x, r, layout.vocab, y, pos.lane);
  if (pos.lane == 0) {
    const float pol_label_logit = static_cast<float>(x[y]);
    out.write(pos.row,
              finish_token_stats(state.softmax, pol_label_logit, static_cast<float>(r[y])));
    if constexpr (kMetrics) {
      out.write_metrics(pos.row,
                        finish_policy_metrics(state.softmax, state.metrics, pol_label_logit));
    }
  }
}

// Floats per token of a tile state (tdpo_math.h).
template <bool kMetrics>
constexpr int64_t tile_state_floats() {
  return kMetrics ? kTileStateWithMetricsFloats : kTileStateFloats;
}

// The tile of columns [vocab_start, vocab_start + vocab) folded into each token's state
// (token_stats_tile). Labels are not checked: a tile cannot tell a label beyond it from
// one beyond the vocabulary.
template <typename P, typename R, int kTeam, bool kMetrics>
__global__ void __launch_bounds__(kBlockThreads)
    token_stats_tile_kernel(const P* __restrict__ policy_logits,
                            const R* __restrict__ ref_logits,
                            const int64_t* __restrict__ targets, RowLayout layout,
                            int64_t ignore_index, int64_t vocab_start, const float* state_in,
                            float* state_out) {
  const TeamPosition<kTeam> pos;
  if (pos.row >= layout.rows) return;
  const int64_t n = pos.row / layout.seq_len, t = pos.row % layout.seq_len;
  const int64_t y = targets[n * layout.tgt_stride_n + t * layout.tgt_stride_t];
  float* out = state_out + pos.row * tile_state_floats<kMetrics>();
  if (y == ignore_index) {
    if (pos.lane == 0) {
      store_tile_state(out, masked_tile_state());
      if constexpr (kMetrics) store_metrics_state(out, masked_metrics_state());
    }
    return;
  }
  const P* x = policy_logits + n * layout.pol_stride_n + t * layout.pol_stride_t;
  const R* r = ref_logits + n * layout.ref_stride_n + t * layout.ref_stride_t;
  // y - vocab_start: the label's column in this tile; outside [0, vocab) when another tile
  // holds it.
  const RowState<kMetrics> tile =
      row_state<kTeam, kMetrics>(x, r, layout.vocab, y - vocab_start, pos.lane);
  if (pos.lane == 0) {
    const int64_t at = pos.row * tile_state_floats<kMetrics>();
    const TokenTileState before =
        state_in != nullptr ? load_tile_state(state_in + at) : empty_tile_state();
    if constexpr (kMetrics) {
      const PolicyMetricsState before_metrics =
          state_in != nullptr ? load_metrics_state(state_in + at) : empty_metrics_state();
      store_metrics_state(
          out, merge_metrics(before.softmax, before_metrics, tile.softmax, tile.metrics));
    }
    store_tile_state(out, fold_tile(before, tile.softmax, x, r, y - vocab_start, layout.vocab));
  }
}

// token_stats_finish: one thread per token.
template <bool kMetrics>
__global__ void __launch_bounds__(kBlockThreads)
    token_stats_finish_kernel(const float* __restrict__ state,
                              const int64_t* __restrict__ targets, int64_t rows,
                              int64_t seq_len, int64_t tgt_stride_n, int64_t tgt_stride_t,
                              int64_t ignore_index, TokenStatsOut out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
  if (row >= rows) return;
  const int64_t y = targets[row / seq_len * tgt_stride_n + row % seq_len * tgt_stride_t];
  if (y == ignore_index) {
    out.write_masked(row);
    return;
  }
  const float* p = state + row * tile_state_floats<kMetrics>();
  const TokenTileState s = load_tile_state(p);
  out.write(row, finish_tile_state(s));
  if constexpr (kMetrics) {
    out.write_metrics(row,
                      finish_policy_metrics(s.softmax, load_metrics_state(p), s.pol_label_logit));
  }
}

// ---------------------------------------------------------------------------------
// Backward

template <int kTeam, typename P>
__device__ __forceinline__ void zero_row(P* out, int64_t vocab, int lane) {
  constexpr int kVec = vec_elems<P, P>();
  const RowSplit split = split_row<kVec>(vocab, out);
  for (int64_t v = lane; v < split.vec_begin; v += kTeam) out[v] = P(0.f);
  float zeros[kVec] = {};
  for (int64_t v = split.vec_begin + static_cast<int64_t>(lane) * kVec; v < split.vec_end;
       v += static_cast<int64_t>(kTeam) * kVec) {
    store_floats<kVec>(out + v, zeros);
  }
  for (int64_t v = split.vec_end + lane; v < vocab; v += kTeam) out[v] = P(0.f);
}

// grad_v = coef_pol * p_v + coef_ref * q_v, plus label_bonus at the label, in float
// until its one rounding to the policy dtype. kReadRef = false for rows whose KL
// gradient is zero (TDPO2's chosen rows, DPO): q is never read.
template <bool kReadRef, int kTeam, typename P, typename R>
__device__ __forceinline__ void write_grad_row(P* out, const P* x, const R* r, int64_t vocab,
                                               int64_t label, float lse_pol, float lse_ref,
                                               const TokenGradCoefs& c, int lane) {
  auto grad_at = [&](int64_t v, float x_v, float r_v) {
    const float q = kReadRef ? expf(r_v - lse_ref) : 0.f;
    const float g = token_grad_element(c, expf(x_v - lse_pol), q);
    return v == label ? g + c.label_bonus : g;
  };
  auto grad_strided = [&](int64_t begin, int64_t end) {
    for (int64_t v = begin + lane; v < end; v += kTeam) {
      const float r_v = kReadRef ? static_cast<float>(r[v]) : 0.f;
      out[v] = static_cast<P>(grad_at(v, static_cast<float>(x[v]), r_v));
    }
  };

  constexpr int kVec = kReadRef ? vec_elems<P, R>() : vec_elems<P, P>();
  RowSplit split;
  if constexpr (kReadRef) {
    split = split_row<kVec>(vocab, out, x, r);
  } else {
    split = split_row<kVec>(vocab, out, x);
  }
  grad_strided(0, split.vec_begin);
  for (int64_t v = split.vec_begin + static_cast<int64_t>(lane) * kVec; v < split.vec_end;
       v += static_cast<int64_t>(kTeam) * kVec) {
    float xs[kVec], rs[kVec] = {}, gs[kVec];
    load_floats<kVec>(x + v, xs);
    if constexpr (kReadRef) load_floats<kVec>(r + v, rs);
#pragma unroll
    for (int j = 0; j < kVec; ++j) gs[j] = grad_at(v + j, xs[j], rs[j]);
    store_floats<kVec>(out + v, gs);
  }
  grad_strided(split.vec_end, vocab);
}

template <typename P, typename R, int kTeam>
__global__ void __launch_bounds__(kBlockThreads)
    token_stats_backward_kernel(const float* __restrict__ grad_logp_pol,
                                const float* __restrict__ grad_token_kl,
                                const P* __restrict__ policy_logits,
                                const R* __restrict__ ref_logits,
                                const int64_t* __restrict__ targets,
                                const float* __restrict__ lse_pol,
                                const float* __restrict__ lse_ref, RowLayout layout,
                                int64_t ignore_index, int64_t vocab_start,
                                P* __restrict__ grad_policy_logits) {
  const TeamPosition<kTeam> pos;
  if (pos.row >= layout.rows) return;
  const int64_t n = pos.row / layout.seq_len, t = pos.row % layout.seq_len;
  const int64_t y = targets[n * layout.tgt_stride_n + t * layout.tgt_stride_t];
  P* out = grad_policy_logits + pos.row * layout.vocab;
  if (y == ignore_index) {
    zero_row<kTeam>(out, layout.vocab, pos.lane);
    return;
  }
  const P* x = policy_logits + n * layout.pol_stride_n + t * layout.pol_stride_t;
  const R* r = ref_logits + n * layout.ref_stride_n + t * layout.ref_stride_t;
  const TokenGradCoefs c = token_grad_coefs(grad_logp_pol[pos.row], grad_token_kl[pos.row]);
  // The label's column in this tile; outside [0, vocab) when another tile holds it.
  const int64_t label_col = y - vocab_start;
  if (c.coef_ref != 0.f) {
    write_grad_row<true, kTeam>(out, x, r, layout.vocab, label_col, lse_pol[pos.row],
                                lse_ref[pos.row], c, pos.lane);
  } else {
    write_grad_row<false, kTeam>(out, x, r, layout.vocab, label_col, lse_pol[pos.row],
                                 lse_ref[pos.row], c, pos.lane);
  }
}

// ---------------------------------------------------------------------------------
// Launchers (launch.h): the op implementations in ops_cuda.cpp check, allocate and raise.

// Queues one row kernel of the launchers below: returns launch(team, blocks, stream),
// team a std::integral_constant holding the threads per row (a warp up to
// kWarpRowMaxVocab columns, else the whole block), blocks enough to cover the layout's
// rows; launch instantiates the kernel for that team and queues it with launch_kernel.
template <typename Launch>
cudaError_t launch_rows(const RowLayout& layout, const Launch& launch) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool warp_per_row = layout.vocab <= kWarpRowMaxVocab;
  const int64_t rows_per_block = warp_per_row ? kBlockThreads / kWarp : 1;
  const int64_t blocks = (layout.rows + rows_per_block - 1) / rows_per_block;
  if (warp_per_row) return launch(std::integral_constant<int, kWarp>{}, blocks, stream);
  return launch(std::integral_constant<int, kBlockThreads>{}, blocks, stream);
}

// launch_rows for a forward kernel: launch(team, metrics, blocks, stream), metrics a
// std::bool_constant holding policy_metrics (the kernels with the policy metrics and those
// without are separate instantiations).
template <typename Launch>
cudaError_t launch_forward_rows(const RowLayout& layout, bool policy_metrics,
                                const Launch& launch) {
  return launch_rows(layout, [&](auto team, int64_t blocks, cudaStream_t stream) {
    if (policy_metrics) return launch(team, std::true_type{}, blocks, stream);
    return launch(team, std::false_type{}, blocks, stream);
  });
}

}  // namespace

cudaError_t launch_token_stats(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                               const at::Tensor& targets, int64_t ignore_index,
                               const TokenStatsOut& out, const at::Tensor& first_bad_row) {
  const RowLayout layout = make_layout(policy_logits, ref_logits, targets);
  auto* first_bad = reinterpret_cast<unsigned long long*>(first_bad_row.data_ptr<int64_t>());
  cudaError_t status = cudaSuccess;
  TDPO_DISPATCH_LOGITS_PAIR(policy_logits.scalar_type(), ref_logits.scalar_type(),
                            "tdpo_ext::token_stats", [&] {
    status = launch_forward_rows(layout, out.has_metrics(), [&](auto team, auto metrics,
                                                                int64_t blocks,
                                                                cudaStream_t stream) {
      return launch_kernel("tdpo_ext::token_stats",
                           TDPO_KERNEL(token_stats_kernel<policy_t, ref_t, decltype(team)::value,
                                                          decltype(metrics)::value>),
                           blocks, kBlockThreads, stream, policy_logits.data_ptr<policy_t>(),
                           ref_logits.data_ptr<ref_t>(), targets.data_ptr<int64_t>(), layout,
                           ignore_index, out, first_bad);
    });
  });
  return status;
}

cudaError_t launch_token_stats_tile(const at::Tensor& policy_logits,
                                    const at::Tensor& ref_logits, const at::Tensor& targets,
                                    int64_t ignore_index, int64_t vocab_start,
                                    bool policy_metrics, const float* state_in,
                                    float* state_out) {
  const RowLayout layout = make_layout(policy_logits, ref_logits, targets);
  cudaError_t status = cudaSuccess;
  TDPO_DISPATCH_LOGITS_PAIR(policy_logits.scalar_type(), ref_logits.scalar_type(),
                            "tdpo_ext::token_stats_tile", [&] {
    status = launch_forward_rows(layout, policy_metrics, [&](auto team, auto metrics,
                                                             int64_t blocks,
                                                             cudaStream_t stream) {
      return launch_kernel(
          "tdpo_ext::token_stats_tile",
          TDPO_KERNEL(token_stats_tile_kernel<policy_t, ref_t, decltype(team)::value,
                                              decltype(metrics)::value>),
          blocks, kBlockThreads, stream, policy_logits.data_ptr<policy_t>(),
          ref_logits.data_ptr<ref_t>(), targets.data_ptr<int64_t>(), layout, ignore_index,
          vocab_start, state_in, state_out);
    });
  });
  return status;
}

cudaError_t launch_token_stats_finish(const at::Tensor& state, const at::Tensor& targets,
                                      int64_t ignore_index, const TokenStatsOut& out) {
  const int64_t rows = targets.numel();
  const auto launch = [&](auto kernel) {
    return launch_kernel("tdpo_ext::token_stats_finish", kernel,
                         (rows + kBlockThreads - 1) / kBlockThreads, kBlockThreads,
                         at::cuda::getCurrentCUDAStream(), state.data_ptr<float>(),
                         targets.data_ptr<int64_t>(), rows, targets.size(1), targets.stride(0),
                         targets.stride(1), ignore_index, out);
  };
  if (out.has_metrics()) return launch(TDPO_KERNEL(token_stats_finish_kernel<true>));
  return launch(TDPO_KERNEL(token_stats_finish_kernel<false>));
}

cudaError_t launch_token_stats_backward(const at::Tensor& grad_logp_pol,
                                        const at::Tensor& grad_token_kl,
                                        const at::Tensor& policy_logits,
                                        const at::Tensor& ref_logits, const at::Tensor& targets,
                                        const at::Tensor& lse_pol, const at::Tensor& lse_ref,
                                        int64_t ignore_index, int64_t vocab_start,
                                        const at::Tensor& grad) {
  const RowLayout layout = make_layout(policy_logits, ref_logits, targets);
  cudaError_t status = cudaSuccess;
  TDPO_DISPATCH_LOGITS_PAIR(policy_logits.scalar_type(), ref_logits.scalar_type(),
                            "tdpo_ext::token_stats_backward", [&] {
    status = launch_rows(layout, [&](auto team, int64_t blocks, cudaStream_t stream) {
      return launch_kernel(
          "tdpo_ext::token_stats_backward",
          TDPO_KERNEL(token_stats_backward_kernel<policy_t, ref_t, decltype(team)::value>),
          blocks, kBlockThreads, stream, grad_logp_pol.data_ptr<float>(),
          grad_token_kl.data_ptr<float>(), policy_logits.data_ptr<policy_t>(),
          ref_logits.data_ptr<ref_t>(), targets.data_ptr<int64_t>(),
          lse_pol.data_ptr<float>(), lse_ref.data_ptr<float>(), layout, ignore_index,
          vocab_start, grad.data_ptr<policy_t>());
    });
  });
  return status;
}

}  // namespace tdpo_ext::cuda
