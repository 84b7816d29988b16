// Vectorized CPU kernels for the token statistics of TDPO and their gradient.
//
// Compiled once per CPU capability with -DCPU_CAPABILITY=<name> and the matching -m
// flags (see setup.py and CMakeLists.txt), so at::vec::Vectorized<float> is 8 lanes
// under AVX2, 16 under AVX512, and the scalar fallback only in the DEFAULT copy.
#include "token_stats_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "../checks.h"
#include "../dispatch.h"
#include "../tdpo_math.h"

// Under torch's OpenMP backend at::parallel_for is an inline `#pragma omp parallel`:
// compiled without -fopenmp it runs every token on one thread, silently (as these kernels
// once did). setup.py and CMakeLists.txt pass -fopenmp.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "tdpo_ext: compile with -fopenmp, or at::parallel_for runs on one thread"
#endif

namespace tdpo_ext::cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Vocabulary rows are walked in chunks that stay in L1 (two models x 8 KiB of float32):
// a chunk's maximum is found first so that every element costs one exp, not the two
// of a per-element online rescale; the chunk is then folded into the running state.
constexpr int64_t kChunk = 2048;

template <typename T>
inline Vec load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

template <typename T>
inline void store_from_float(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, kLanes);
  }
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                        v);
}

// A part of a row (a chunk, a tile): its softmax state and, when the policy metrics are
// computed, its PolicyMetricsState (otherwise empty_metrics_state(), never read).
struct PartState {
  SoftmaxPairState softmax;
  PolicyMetricsState metrics;
};

// Folds the maxima of x and r over columns [begin, end) into max_x and max_r, and with
// kSumPolicy the sum of x into sum_x (where the pass waits on its loads more than on its
// arithmetic, so that the sum costs less than in the exp pass).
template <bool kSumPolicy, typename P, typename R>
inline void fold_max(const P* x, const R* r, int64_t begin, int64_t end, float& max_x,
                     float& max_r, float& sum_x) {
  const int64_t vec_end = end - (end - begin) % kLanes;
  Vec vmax_x(max_x), vmax_r(max_r), vsum_x(0.f);
  for (int64_t v = begin; v < vec_end; v += kLanes) {
    const Vec xv = load_as_float(x + v);
    vmax_x = at::vec::maximum(vmax_x, xv);
    vmax_r = at::vec::maximum(vmax_r, load_as_float(r + v));
    if constexpr (kSumPolicy) vsum_x += xv;
  }
  max_x = hmax(vmax_x);
  max_r = hmax(vmax_r);
  if constexpr (kSumPolicy) sum_x += hsum(vsum_x);
  for (int64_t v = vec_end; v < end; ++v) {
    max_x = std::max(max_x, static_cast<float>(x[v]));
    max_r = std::max(max_r, static_cast<float>(r[v]));
    if constexpr (kSumPolicy) sum_x += static_cast<float>(x[v]);
  }
}

// The state of a chunk of len columns whose label sits at column label_col counted from
// the chunk's first (anywhere, even outside the chunk). With kMetrics the max pass stops
// at the label's column to take max_before_label on the way and sums the logits (no extra
// loads), and the exp pass also sums the centered terms; without, it is the plain two
// passes.
template <bool kMetrics, typename P, typename R>
PartState chunk_state(const P* x, const R* r, int64_t len, int64_t label_col) {
  float max_x = -INFINITY, max_r = -INFINITY;
  PolicyMetricsState m = empty_metrics_state();
  if constexpr (kMetrics) {
    const int64_t before_label = std::clamp<int64_t>(label_col, 0, len);
    fold_max<true>(x, r, 0, before_label, max_x, max_r, m.logit_sum);
    m.max_before_label = max_x;
    fold_max<true>(x, r, before_label, len, max_x, max_r, m.logit_sum);
    m.columns = static_cast<float>(len);
  } else {
    fold_max<false>(x, r, 0, len, max_x, max_r, m.logit_sum);
  }

  const int64_t vec_end = len - len % kLanes;
  const float shift_x = exp_shift(max_x), shift_r = exp_shift(max_r);
  const float gap = frame_gap(max_x, max_r);
  const Vec vshift_x(shift_x), vshift_r(shift_r), vgap(gap), zero(0.f);
  const Vec lowest(std::numeric_limits<float>::lowest());
  Vec sum_x(0.f), sum_r(0.f), diff_sum(0.f), centered_sum(0.f);
  for (int64_t v = 0; v < vec_end; v += kLanes) {
    const Vec xv = load_as_float(x + v);
    const Vec rv = load_as_float(r + v);
    const Vec cx = xv - vshift_x;
    const Vec ex = cx.exp_u20();
    sum_x += ex;
    if constexpr (kMetrics) {
      // centered_term, lane-wise: where x is -inf, ex is 0 and cx -inf, and 0 * lowest
      // is 0 where 0 * -inf would be NaN; a finite cx is unchanged (and a NaN one gives
      // a NaN ex). One fused multiply-add: the loop's cost is in its arithmetic.
      centered_sum = at::vec::fmadd(ex, at::vec::clamp_min(cx, lowest), centered_sum);
    }
    const Vec er = (rv - vshift_r).exp_u20();
    sum_r += er;
    // ref_diff_term, lane-wise: an underflowed reference probability contributes 0.
    diff_sum += Vec::blendv(er * ((rv - xv) - vgap), zero, er == zero);
  }
  PartState s{{max_x, hsum(sum_x), max_r, hsum(sum_r), hsum(diff_sum)}, m};
  if constexpr (kMetrics) s.metrics.centered_sum = hsum(centered_sum);
  for (int64_t v = vec_end; v < len; ++v) {
    const float xv = static_cast<float>(x[v]), rv = static_cast<float>(r[v]);
    const float er = std::exp(rv - shift_r);
    const float ex = std::exp(xv - shift_x);
    s.softmax.sum_pol += ex;
    s.softmax.sum_ref += er;
    s.softmax.ref_diff_sum += ref_diff_term(er, rv, xv, gap);
    if constexpr (kMetrics) s.metrics.centered_sum += centered_term(ex, xv - shift_x);
  }
  return s;
}

// The state of a whole row (or tile) of len columns, walked in L1-sized chunks; label_col
// as for chunk_state.
template <bool kMetrics, typename P, typename R>
PartState row_state(const P* x, const R* r, int64_t len, int64_t label_col) {
  PartState state{empty_state(), empty_metrics_state()};
  for (int64_t c = 0; c < len; c += kChunk) {
    const PartState chunk =
        chunk_state<kMetrics>(x + c, r + c, std::min(kChunk, len - c), label_col - c);
    if constexpr (kMetrics) {
      state.metrics = merge_metrics(state.softmax, state.metrics, chunk.softmax, chunk.metrics);
    }
    state.softmax = merge_states(state.softmax, chunk.softmax);
  }
  return state;
}

// Tokens per parallel task: enough vocabulary work to amortize scheduling.
inline int64_t grain_for(int64_t vocab) { return std::max<int64_t>(1, 32768 / vocab); }

// Calls row_fn(i, y, x, r) for every token i = n * T + t of the batch, in parallel over
// tokens: y is its label (unchecked), x and r its policy and reference rows.
template <typename P, typename R, typename RowFn>
void for_each_row(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                  const at::Tensor& targets, const RowFn& row_fn) {
  const int64_t T = policy_logits.size(1), V = policy_logits.size(2);
  const P* pol = policy_logits.data_ptr<P>();
  const R* ref = ref_logits.data_ptr<R>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  at::parallel_for(0, policy_logits.size(0) * T, grain_for(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / T, t = i % T;
      row_fn(i, tgt[n * targets.stride(0) + t * targets.stride(1)],
             pol + n * policy_logits.stride(0) + t * policy_logits.stride(1),
             ref + n * ref_logits.stride(0) + t * ref_logits.stride(1));
    }
  });
}

// Lowers `target` to `value` if value is smaller (std::atomic has no fetch_min before C++26).
inline void atomic_lower(std::atomic<int64_t>& target, int64_t value) {
  int64_t current = target.load(std::memory_order_relaxed);
  while (value < current &&
         !target.compare_exchange_weak(current, value, std::memory_order_relaxed)) {
  }
}

// A bad label is not raised from inside the parallel loop, where whichever chunk throws
// first would be named: as on CUDA, every chunk records its bad tokens and the smallest
// one is raised after the loop.
template <bool kMetrics, typename P, typename R>
void forward_impl(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                  const at::Tensor& targets, int64_t ignore_index, const TokenStatsOut& out) {
  const int64_t V = policy_logits.size(2);
  constexpr int64_t kNoBadRow = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> first_bad_row{kNoBadRow};
  for_each_row<P, R>(policy_logits, ref_logits, targets,
                     [&](int64_t i, int64_t y, const P* x, const R* r) {
    const bool masked = y == ignore_index;
    if (masked || y < 0 || y >= V) {
      if (!masked) atomic_lower(first_bad_row, i);
      out.write_masked(i);
      return;
    }
    const PartState row = row_state<kMetrics>(x, r, V, y);
    const float pol_label_logit = static_cast<float>(x[y]);
    out.write(i, finish_token_stats(row.softmax, pol_label_logit, static_cast<float>(r[y])));
    if constexpr (kMetrics) {
      out.write_metrics(i, finish_policy_metrics(row.softmax, row.metrics, pol_label_logit));
    }
  });
  const int64_t bad_row = first_bad_row.load();
  if (bad_row != kNoBadRow) fail_bad_label_at(targets, bad_row, V, ignore_index);
}

// Folds the tile of columns [vocab_start, vocab_start + V) into each unmasked token's
// state (state_in, or an empty state where it is null), writing state_out; with kMetrics
// each token's state is followed by its PolicyMetricsState. Labels are not checked: a
// tile cannot tell a label beyond it from one beyond the vocabulary.
template <bool kMetrics, typename P, typename R>
void tile_impl(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
               const at::Tensor& targets, int64_t ignore_index, int64_t vocab_start,
               const float* state_in, float* state_out) {
  constexpr int kFloats = kMetrics ? kTileStateWithMetricsFloats : kTileStateFloats;
  const int64_t V = policy_logits.size(2);
  for_each_row<P, R>(policy_logits, ref_logits, targets,
                     [&](int64_t i, int64_t y, const P* x, const R* r) {
    float* out = state_out + i * kFloats;
    if (y == ignore_index) {
      store_tile_state(out, masked_tile_state());
      if constexpr (kMetrics) store_metrics_state(out, masked_metrics_state());
      return;
    }
    const float* in = state_in ? state_in + i * kFloats : nullptr;
    const TokenTileState before = in ? load_tile_state(in) : empty_tile_state();
    const int64_t label_col = y - vocab_start;
    const PartState tile = row_state<kMetrics>(x, r, V, label_col);
    if constexpr (kMetrics) {
      const PolicyMetricsState metrics_before =
          in ? load_metrics_state(in) : empty_metrics_state();
      store_metrics_state(out, merge_metrics(before.softmax, metrics_before, tile.softmax,
                                             tile.metrics));
    }
    store_tile_state(out, fold_tile(before, tile.softmax, x, r, label_col, V));
  });
}

// grad = coef_pol * p + coef_ref * q over the row, plus label_bonus at the label.
// Rows whose KL gradient is zero (TDPO2's chosen rows, DPO) never read the reference.
template <typename P, typename R, bool kReadRef>
void write_grad_row(P* out, const P* x, const R* r, int64_t V, float lse_x, float lse_r,
                    const TokenGradCoefs& c) {
  const int64_t vec_end = V - V % kLanes;
  const Vec vlse_x(lse_x), vlse_r(lse_r), vcoef_pol(c.coef_pol), vcoef_ref(c.coef_ref);
  for (int64_t v = 0; v < vec_end; v += kLanes) {
    Vec g = (load_as_float(x + v) - vlse_x).exp_u20() * vcoef_pol;
    if constexpr (kReadRef) g += (load_as_float(r + v) - vlse_r).exp_u20() * vcoef_ref;
    store_from_float(out + v, g);
  }
  for (int64_t v = vec_end; v < V; ++v) {
    const float p = std::exp(static_cast<float>(x[v]) - lse_x);
    const float q = kReadRef ? std::exp(static_cast<float>(r[v]) - lse_r) : 0.f;
    out[v] = static_cast<P>(token_grad_element(c, p, q));
  }
}

// The gradient of columns [vocab_start, vocab_start + V) of each row, whose logsumexps
// lse_pol and lse_ref are those of the whole rows; the label's onehot term goes to the
// tile holding it. Labels are not checked here: the forward has (autograd saved them).
template <typename P, typename R>
void backward_impl(const at::Tensor& grad_logp_pol, const at::Tensor& grad_token_kl,
                   const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                   const at::Tensor& targets, const at::Tensor& lse_pol,
                   const at::Tensor& lse_ref, int64_t ignore_index, int64_t vocab_start,
                   at::Tensor& grad_policy_logits) {
  const int64_t V = policy_logits.size(2);
  const float* g_logp = grad_logp_pol.data_ptr<float>();
  const float* g_kl = grad_token_kl.data_ptr<float>();
  const float* lse_x = lse_pol.data_ptr<float>();
  const float* lse_r = lse_ref.data_ptr<float>();
  P* grad = grad_policy_logits.data_ptr<P>();

  for_each_row<P, R>(policy_logits, ref_logits, targets,
                     [&](int64_t i, int64_t y, const P* x, const R* r) {
    P* out = grad + i * V;
    if (y == ignore_index) {
      std::fill(out, out + V, P(0));
      return;
    }
    const TokenGradCoefs c = token_grad_coefs(g_logp[i], g_kl[i]);
    const bool read_ref = c.coef_ref != 0.f;
    if (read_ref) {
      write_grad_row<P, R, true>(out, x, r, V, lse_x[i], lse_r[i], c);
    } else {
      write_grad_row<P, R, false>(out, x, r, V, lse_x[i], lse_r[i], c);
    }
    const int64_t label_col = y - vocab_start;
    if (label_col < 0 || label_col >= V) return;
    // The label element, recomputed in float so that it is rounded once.
    const float p_y = std::exp(static_cast<float>(x[label_col]) - lse_x[i]);
    const float q_y = read_ref ? std::exp(static_cast<float>(r[label_col]) - lse_r[i]) : 0.f;
    out[label_col] = static_cast<P>(token_grad_element(c, p_y, q_y) + c.label_bonus);
  });
}

}  // namespace

void token_stats_kernel(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                        const at::Tensor& targets, int64_t ignore_index,
                        const TokenStatsOut& out) {
  TDPO_DISPATCH_LOGITS_PAIR(policy_logits.scalar_type(), ref_logits.scalar_type(),
                            "tdpo_ext::token_stats", [&] {
                              if (out.has_metrics()) {
                                forward_impl<true, policy_t, ref_t>(policy_logits, ref_logits,
                                                                    targets, ignore_index, out);
                              } else {
                                forward_impl<false, policy_t, ref_t>(policy_logits, ref_logits,
                                                                     targets, ignore_index, out);
                              }
                            });
}

void token_stats_tile_kernel(const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                             const at::Tensor& targets, int64_t ignore_index,
                             int64_t vocab_start, bool policy_metrics, const float* state_in,
                             float* state_out) {
  TDPO_DISPATCH_LOGITS_PAIR(policy_logits.scalar_type(), ref_logits.scalar_type(),
                            "tdpo_ext::token_stats_tile", [&] {
                              if (policy_metrics) {
                                tile_impl<true, policy_t, ref_t>(policy_logits, ref_logits,
                                                                 targets, ignore_index,
                                                                 vocab_start, state_in,
                                                                 state_out);
                              } else {
                                tile_impl<false, policy_t, ref_t>(policy_logits, ref_logits,
                                                                  targets, ignore_index,
                                                                  vocab_start, state_in,
                                                                  state_out);
                              }
                            });
}

void token_stats_backward_kernel(const at::Tensor& grad_logp_pol,
                                 const at::Tensor& grad_token_kl,
                                 const at::Tensor& policy_logits, const at::Tensor& ref_logits,
                                 const at::Tensor& targets, const at::Tensor& lse_pol,
                                 const at::Tensor& lse_ref, int64_t ignore_index,
                                 int64_t vocab_start, at::Tensor& grad_policy_logits) {
  TDPO_DISPATCH_LOGITS_PAIR(policy_logits.scalar_type(), ref_logits.scalar_type(),
                            "tdpo_ext::token_stats_backward", [&] {
                              backward_impl<policy_t, ref_t>(
                                  grad_logp_pol, grad_token_kl, policy_logits, ref_logits,
                                  targets, lse_pol, lse_ref, ignore_index, vocab_start,
                                  grad_policy_logits);
                            });
}

}  // namespace CPU_CAPABILITY
}  // namespace tdpo_ext::cpu
