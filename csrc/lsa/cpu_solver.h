// The CPU side of the solver without torch: the column scan of this machine (AVX2 where the
// CPU has it), per-thread memory, and one problem from a strided cost to its assignment.
// lsa_cpu.cpp wraps it as the op; keeping it free of torch headers lets it be compiled and
// profiled on its own.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>

#include "lsa/solver.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace group_detr {
namespace cpu {

using lsa::Status;

#if defined(__x86_64__) && defined(__GNUC__)
#define GROUP_DETR_HAVE_AVX2_SCAN 1

// One step of the scan for four columns: relax them from the row, return the running minimum
// over those not on the tree. (Lambdas do not inherit the target attribute, hence a function.)
__attribute__((target("avx2"))) inline __m256d avx2_relax4(const double* cost, const double* v,
                                                           double* dist, int32_t* path,
                                                           __m256d min4, __m256d u4, __m128i row4,
                                                           __m256d low) {
  const __m256d inf4 = _mm256_set1_pd(std::numeric_limits<double>::infinity());
  const __m256d neg_inf4 = _mm256_set1_pd(-std::numeric_limits<double>::infinity());
  const __m256d r = _mm256_sub_pd(
      _mm256_sub_pd(_mm256_add_pd(min4, _mm256_loadu_pd(cost)), u4), _mm256_loadu_pd(v));
  const __m256d d = _mm256_loadu_pd(dist);
  const __m256d take = _mm256_cmp_pd(r, d, _CMP_LT_OQ);
  const __m256d updated = _mm256_blendv_pd(d, r, take);
  _mm256_storeu_pd(dist, updated);
  // The low 32 bits of each 64-bit compare mask make the 4 x int32 mask of the path update.
  // A blend and a plain store, not a masked store: masked stores are slow on AMD CPUs.
  const __m128i take32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(
      _mm256_castpd_si256(take), _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
  const __m128i old_path = _mm_loadu_si128(reinterpret_cast<const __m128i*>(path));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(path), _mm_blendv_epi8(old_path, row4, take32));
  const __m256d open =
      _mm256_blendv_pd(inf4, updated, _mm256_cmp_pd(updated, neg_inf4, _CMP_GT_OQ));
  return _mm256_min_pd(low, open);
}

// SerialScan with AVX2, four columns per instruction, compiled for AVX2 alone and chosen at run
// time, so one binary is fast on modern CPUs and still correct on any x86-64. The arithmetic
// is SerialScan's, the same IEEE operations in the same order, so results are bit-identical.
__attribute__((target("avx2"))) inline lsa::Candidate<double> avx2_scan(
    const lsa::Workspace<double>& ws, int32_t nc, int32_t i, double min_val, bool first) {
  const double* cost_row = ws.cost + static_cast<int64_t>(i) * nc;
  double* dist = ws.dist;
  int32_t* path = ws.path;
  const double* v = ws.v;
  const double u_i = ws.u[i];
  const double inf = std::numeric_limits<double>::infinity();
  const __m256d u4 = _mm256_set1_pd(u_i);
  const __m256d inf4 = _mm256_set1_pd(inf);
  const __m128i row4 = _mm_set1_epi32(i);
  // Two accumulators hide the latency of the min chain.
  __m256d low_a = inf4, low_b = inf4;
  int32_t j = 0;
  if (first) {
    for (; j + 8 <= nc; j += 8) {
      const __m256d ra = _mm256_sub_pd(_mm256_sub_pd(_mm256_loadu_pd(cost_row + j), u4),
                                       _mm256_loadu_pd(v + j));
      const __m256d rb = _mm256_sub_pd(_mm256_sub_pd(_mm256_loadu_pd(cost_row + j + 4), u4),
                                       _mm256_loadu_pd(v + j + 4));
      _mm256_storeu_pd(dist + j, ra);
      _mm256_storeu_pd(dist + j + 4, rb);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(path + j), row4);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(path + j + 4), row4);
      low_a = _mm256_min_pd(low_a, ra);
      low_b = _mm256_min_pd(low_b, rb);
    }
  } else {
    const __m256d min4 = _mm256_set1_pd(min_val);
    for (; j + 8 <= nc; j += 8) {
      low_a = avx2_relax4(cost_row + j, v + j, dist + j, path + j, min4, u4, row4, low_a);
      low_b = avx2_relax4(cost_row + j + 4, v + j + 4, dist + j + 4, path + j + 4, min4, u4, row4,
                          low_b);
    }
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_min_pd(low_a, low_b));
  double lowest = std::min(std::min(lanes[0], lanes[1]), std::min(lanes[2], lanes[3]));
  for (; j < nc; ++j) {  // the tail, as in SerialScan
    const double r = (first ? 0.0 : min_val) + cost_row[j] - u_i - v[j];
    const bool take = first || r < dist[j];
    dist[j] = take ? r : dist[j];
    path[j] = take ? i : path[j];
    const double open = lsa::on_tree(dist[j]) ? inf : dist[j];
    lowest = open < lowest ? open : lowest;
  }

  lsa::Candidate<double> best{lowest, -1, 0, false};
  if (!(lowest < inf)) return best;
  const __m256d lowest4 = _mm256_set1_pd(lowest);
  int32_t k = 0;
  auto consider = [&](int32_t col) {
    const lsa::Candidate<double> c{lowest, col, ws.position[col], ws.row4col[col] < 0};
    if (lsa::precedes(c, best)) best = c;
  };
  // Continuous costs put one column at `lowest`: test 16 columns per branch, look closer on a hit.
  for (; k + 16 <= nc; k += 16) {
    const __m256d e0 = _mm256_cmp_pd(_mm256_loadu_pd(dist + k), lowest4, _CMP_EQ_OQ);
    const __m256d e1 = _mm256_cmp_pd(_mm256_loadu_pd(dist + k + 4), lowest4, _CMP_EQ_OQ);
    const __m256d e2 = _mm256_cmp_pd(_mm256_loadu_pd(dist + k + 8), lowest4, _CMP_EQ_OQ);
    const __m256d e3 = _mm256_cmp_pd(_mm256_loadu_pd(dist + k + 12), lowest4, _CMP_EQ_OQ);
    if (!_mm256_movemask_pd(_mm256_or_pd(_mm256_or_pd(e0, e1), _mm256_or_pd(e2, e3)))) continue;
    const int hits = _mm256_movemask_pd(e0) | _mm256_movemask_pd(e1) << 4 |
                     _mm256_movemask_pd(e2) << 8 | _mm256_movemask_pd(e3) << 12;
    for (int rest = hits; rest; rest &= rest - 1) consider(k + __builtin_ctz(rest));
  }
  for (; k + 4 <= nc; k += 4) {
    int hits = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(dist + k), lowest4, _CMP_EQ_OQ));
    while (hits) {
      consider(k + __builtin_ctz(hits));
      hits &= hits - 1;
    }
  }
  for (; k < nc; ++k) {
    if (dist[k] == lowest) consider(k);
  }
  return best;
}

#endif

// The column scan of this machine, chosen once per call: AVX2 where the CPU has it, the portable
// SerialScan otherwise. GROUP_DETR_CPU_SCAN=portable forces the latter (the tests run both on one
// machine; a user can rule out a suspected SIMD problem). An AVX-512 scan was measured and left
// out: on the 2-core AMD EPYC (Zen 4) it ran no faster, the scans being bound by memory, not by
// instructions.
struct DispatchedScan {
  bool avx2 = false;

  DispatchedScan() {
#ifdef GROUP_DETR_HAVE_AVX2_SCAN
    const char* cap = std::getenv("GROUP_DETR_CPU_SCAN");
    avx2 = !(cap != nullptr && std::string(cap) == "portable") && __builtin_cpu_supports("avx2");
#endif
  }

  lsa::Candidate<double> operator()(const lsa::Workspace<double>& ws, int32_t nc, int32_t i,
                                    double min_val, bool first) const {
#ifdef GROUP_DETR_HAVE_AVX2_SCAN
    if (avx2) return avx2_scan(ws, nc, i, min_val, first);
#endif
    return lsa::SerialScan{}(ws, nc, i, min_val, first);
  }
};

// Per-thread memory for problems up to max_rows x max_cols. One block, grow-only and never
// initialised (solve() writes every entry before reading it): a thread that solves many batches
// keeps its block, so a call neither zero-fills nor page-faults a fresh allocation, which for a
// 26 x 900 problem cost as much as the solve itself.
class ThreadWorkspace {
 public:
  void reserve(int64_t max_rows, int64_t max_cols) {
    // cost, then the double arrays (u, visited_dist, v, dist), then the int32 ones.
    const int64_t doubles = max_rows * max_cols + 2 * max_rows + 2 * max_cols;
    const int64_t ints = 4 * max_rows + 5 * max_cols;
    const int64_t bytes = doubles * int64_t(sizeof(double)) + ints * int64_t(sizeof(int32_t));
    if (bytes > capacity_) {
      memory_.reset(new double[(bytes + sizeof(double) - 1) / sizeof(double)]);
      capacity_ = bytes;
    }
    max_rows_ = max_rows;
    max_cols_ = max_cols;
  }

  double* cost() const { return memory_.get(); }

  // Gives the block back when it is larger than `max_bytes`, so that one huge problem does not
  // leave every thread holding its memory for the rest of the process.
  void shrink_to(int64_t max_bytes) {
    if (capacity_ > max_bytes) {
      memory_.reset();
      capacity_ = 0;
    }
  }

  lsa::Workspace<double> view() const {
    double* d = memory_.get() + max_rows_ * max_cols_;
    double* u = d;
    double* visited_dist = u + max_rows_;
    double* v = visited_dist + max_rows_;
    double* dist = v + max_cols_;
    int32_t* k = reinterpret_cast<int32_t*>(dist + max_cols_);
    int32_t* col4row = k;
    int32_t* visited_rows = col4row + max_rows_;
    int32_t* visited_cols = visited_rows + max_rows_;
    int32_t* visited_pos = visited_cols + max_rows_;
    int32_t* path = visited_pos + max_rows_;
    int32_t* row4col = path + max_cols_;
    int32_t* remaining = row4col + max_cols_;
    int32_t* position = remaining + max_cols_;
    return {cost(),  u,         v,        dist,         path,         col4row,     row4col,
            remaining, position, visited_rows, visited_cols, visited_pos, visited_dist};
  }

  // The calling thread's workspace, kept between calls.
  static ThreadWorkspace& local() {
    thread_local ThreadWorkspace workspace;
    return workspace;
  }

 private:
  std::unique_ptr<double[]> memory_;
  int64_t capacity_ = 0;
  int64_t max_rows_ = 0, max_cols_ = 0;
};

// Copies the cost to the solver's row-major double layout, checks it and shifts it by its
// minimum, as scipy does (in double), so that our arithmetic stays identical to scipy's.
// Three simple passes that vectorise; the portable version.
template <typename scalar_t>
inline Status prepare_cost_body(const scalar_t* cost, int64_t row_stride, int64_t col_stride,
                                int64_t nr, int64_t nc, double* shifted) {
  for (int64_t r = 0; r < nr; ++r) {
    const scalar_t* src = cost + r * row_stride;
    double* dst = shifted + r * nc;
    for (int64_t c = 0; c < nc; ++c) dst[c] = static_cast<double>(src[c * col_stride]);
  }
  const int64_t size = nr * nc;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  double min_entry = std::numeric_limits<double>::infinity();
  double invalid = 0;  // a double flag keeps the loop to one element width, so it vectorises
#pragma omp simd reduction(min : min_entry) reduction(max : invalid)
  for (int64_t k = 0; k < size; ++k) {
    const double x = shifted[k];
    const double bad = (x != x || x == neg_inf) ? 1.0 : 0.0;
    invalid = bad > invalid ? bad : invalid;
    min_entry = x < min_entry ? x : min_entry;
  }
  if (invalid != 0) return lsa::kInvalidEntry;
  if (std::isinf(min_entry)) return lsa::kInfeasible;  // every pair forbidden
  for (int64_t k = 0; k < size; ++k) shifted[k] -= min_entry;
  return lsa::kOk;
}

#ifdef GROUP_DETR_HAVE_AVX2_SCAN
// 4 queries x `rows` <= 4 targets of the DETR layout: load (masked past the last target when
// `mask` is given), transpose in registers, widen, shift, and store 4 entries of each target's row.
__attribute__((target("avx2"))) inline void avx2_transpose_block(const float* src,
                                                                 int64_t col_stride, double* dst,
                                                                 int64_t nc, int64_t rows,
                                                                 const __m128i* mask,
                                                                 __m256d min4) {
  __m128 a, b, d, e;
  if (mask != nullptr) {
    a = _mm_maskload_ps(src, *mask);
    b = _mm_maskload_ps(src + col_stride, *mask);
    d = _mm_maskload_ps(src + 2 * col_stride, *mask);
    e = _mm_maskload_ps(src + 3 * col_stride, *mask);
  } else {
    a = _mm_loadu_ps(src);
    b = _mm_loadu_ps(src + col_stride);
    d = _mm_loadu_ps(src + 2 * col_stride);
    e = _mm_loadu_ps(src + 3 * col_stride);
  }
  _MM_TRANSPOSE4_PS(a, b, d, e);  // now a..e are targets (rows), each for the 4 queries
  const __m128 block[4] = {a, b, d, e};
  for (int64_t k = 0; k < rows; ++k) {
    _mm256_storeu_pd(dst + k * nc, _mm256_sub_pd(_mm256_cvtps_pd(block[k]), min4));
  }
}

// The DETR layout: the targets are the rows of a (Q, T) cost, so row r of the solver's matrix is
// column r of the source, and each source row (one query) holds up to `nr` contiguous floats.
// Two passes over the source instead of three over the copy (measured: better than one pass
// that checks while it transposes plus a shift pass over the copy): the first checks and finds the
// minimum with one masked load per 8 targets of a query (the padding past `nr` is never read
// into a result), the second transposes 4 x 4 blocks in registers, widens and shifts them, and
// stores each row contiguously. Every entry takes the path double(x) - double(min), as before.
__attribute__((target("avx2"))) inline Status avx2_prepare_float_transposed(const float* cost,
                                                                            int64_t col_stride,
                                                                            int64_t nr, int64_t nc,
                                                                            double* shifted) {
  const float inf = std::numeric_limits<float>::infinity();
  const __m256 inf8 = _mm256_set1_ps(inf);
  // Queries in the outer loops, so that each source row is read once, whatever nr is; the
  // targets of a query come in full blocks (plain loads) and one masked block at the end.
  const int64_t full8 = nr / 8 * 8, full4 = nr / 4 * 4;
  const __m256i tail8 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(nr - full8)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m128i tail4 = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int32_t>(nr - full4)),
                                        _mm_setr_epi32(0, 1, 2, 3));
  __m256 low8 = inf8;
  // A sum turns NaN as soon as a NaN enters (or +inf meets -inf, invalid anyway), and never
  // otherwise (overflow gives inf), so one add per vector checks for NaN; -inf shows in the min.
  __m256 sum8 = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    const float* src = cost + c * col_stride;
    for (int64_t r0 = 0; r0 < full8; r0 += 8) {
      const __m256 x = _mm256_loadu_ps(src + r0);
      sum8 = _mm256_add_ps(sum8, x);
      low8 = _mm256_min_ps(x, low8);
    }
    if (full8 < nr) {
      const __m256 x = _mm256_maskload_ps(src + full8, tail8);  // 0 when masked
      sum8 = _mm256_add_ps(sum8, x);
      low8 = _mm256_min_ps(_mm256_blendv_ps(inf8, x, _mm256_castsi256_ps(tail8)), low8);
    }
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, low8);
  float low = inf;
  for (float x : lanes) low = x < low ? x : low;
  if (_mm256_movemask_ps(_mm256_cmp_ps(sum8, sum8, _CMP_UNORD_Q)) || low == -inf) {
    return lsa::kInvalidEntry;
  }
  if (low == inf) return lsa::kInfeasible;  // every pair forbidden
  const __m256d min4 = _mm256_set1_pd(static_cast<double>(low));
  int64_t c = 0;
  for (; c + 4 <= nc; c += 4) {
    const float* src = cost + c * col_stride;
    for (int64_t r0 = 0; r0 < full4; r0 += 4) {
      avx2_transpose_block(src + r0, col_stride, shifted + r0 * nc + c, nc, 4, nullptr, min4);
    }
    if (full4 < nr) {
      avx2_transpose_block(src + full4, col_stride, shifted + full4 * nc + c, nc, nr - full4,
                           &tail4, min4);
    }
  }
  for (; c < nc; ++c) {
    for (int64_t r = 0; r < nr; ++r) {
      shifted[r * nc + c] = static_cast<double>(cost[c * col_stride + r]) - static_cast<double>(low);
    }
  }
  return lsa::kOk;
}

// prepare_cost_body for float32 costs with AVX2: eight entries per gather (a plain load when
// the row is contiguous), checked and reduced in float, since widening to double is exact and
// monotonic, then the shift in double, four at a time.
__attribute__((target("avx2"))) inline Status avx2_prepare_float(const float* cost,
                                                                 int64_t row_stride,
                                                                 int64_t col_stride, int64_t nr,
                                                                 int64_t nc, double* shifted) {
  if (std::abs(col_stride) > (int64_t(1) << 27)) {  // gather offsets are int32
    return prepare_cost_body(cost, row_stride, col_stride, nr, nc, shifted);
  }
  const float inf = std::numeric_limits<float>::infinity();
  const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32(static_cast<int32_t>(col_stride)));
  const __m256 neg_inf8 = _mm256_set1_ps(-inf);
  __m256 low8 = _mm256_set1_ps(inf);
  __m256 bad8 = _mm256_setzero_ps();
  float low = inf;
  bool bad = false;
  for (int64_t r = 0; r < nr; ++r) {
    const float* src = cost + r * row_stride;
    double* dst = shifted + r * nc;
    int64_t c = 0;
    for (; c + 8 <= nc; c += 8) {
      const __m256 x = col_stride == 1 ? _mm256_loadu_ps(src + c)
                                       : _mm256_i32gather_ps(src + c * col_stride, offsets, 4);
      bad8 = _mm256_or_ps(bad8, _mm256_or_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q),
                                             _mm256_cmp_ps(x, neg_inf8, _CMP_EQ_OQ)));
      low8 = _mm256_min_ps(x, low8);  // a NaN x returns low8: the minimum stays clean
      _mm256_storeu_pd(dst + c, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
      _mm256_storeu_pd(dst + c + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    }
    for (; c < nc; ++c) {
      const float x = src[c * col_stride];
      bad |= (x != x) || x == -inf;
      low = x < low ? x : low;
      dst[c] = x;
    }
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, low8);
  for (float x : lanes) low = x < low ? x : low;
  if (bad || _mm256_movemask_ps(bad8)) return lsa::kInvalidEntry;
  if (std::isinf(low)) return lsa::kInfeasible;  // every pair forbidden
  const double min_entry = low;
  const __m256d min4 = _mm256_set1_pd(min_entry);
  const int64_t size = nr * nc;
  int64_t k = 0;
  for (; k + 4 <= size; k += 4) {
    _mm256_storeu_pd(shifted + k, _mm256_sub_pd(_mm256_loadu_pd(shifted + k), min4));
  }
  for (; k < size; ++k) shifted[k] -= min_entry;
  return lsa::kOk;
}
#endif

template <typename scalar_t>
Status prepare_cost(const scalar_t* cost, int64_t row_stride, int64_t col_stride, int64_t nr,
                    int64_t nc, double* shifted, bool use_avx2) {
#ifdef GROUP_DETR_HAVE_AVX2_SCAN
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (use_avx2) {
      if (col_stride != 1 && row_stride == 1) {  // DETR's layout, targets as rows
        return avx2_prepare_float_transposed(cost, col_stride, nr, nc, shifted);
      }
      return avx2_prepare_float(cost, row_stride, col_stride, nr, nc, shifted);
    }
  }
#endif
  return prepare_cost_body(cost, row_stride, col_stride, nr, nc, shifted);
}

// Solves problem `cost` (num_queries x num_cols, strided; its first `num_targets` columns are
// the valid targets) into `out` (num_cols): the query of each valid target, -1 elsewhere.
template <typename scalar_t>
Status solve_one(const scalar_t* cost, int64_t stride_q, int64_t stride_t, int64_t num_queries,
                 int64_t num_targets, int64_t num_cols, const DispatchedScan& scan,
                 ThreadWorkspace& tw, int64_t* out) {
  std::fill(out, out + num_cols, int64_t(-1));
  if (num_targets < 0 || num_targets > num_cols) return lsa::kBadNumTargets;
  if (num_targets == 0 || num_queries == 0) return lsa::kOk;

  // Like scipy: rows are the smaller side, so with more queries than targets (DETR) the
  // targets are the rows and each target gets a query.
  const bool targets_are_rows = num_queries > num_targets;
  const int64_t nr = targets_are_rows ? num_targets : num_queries;
  const int64_t nc = targets_are_rows ? num_queries : num_targets;
  const int64_t row_stride = targets_are_rows ? stride_t : stride_q;
  const int64_t col_stride = targets_are_rows ? stride_q : stride_t;

  const Status prepared = prepare_cost(cost, row_stride, col_stride, nr, nc, tw.cost(),
                                       scan.avx2);
  if (prepared != lsa::kOk) return prepared;
  const lsa::Workspace<double> ws = tw.view();
  const Status status = lsa::solve(static_cast<int32_t>(nr), static_cast<int32_t>(nc), ws, scan);
  if (status != lsa::kOk) return status;
  for (int64_t r = 0; r < nr; ++r) {
    if (targets_are_rows) {
      out[r] = ws.col4row[r];
    } else {
      out[ws.col4row[r]] = r;
    }
  }
  return lsa::kOk;
}

}  // namespace cpu
}  // namespace group_detr
