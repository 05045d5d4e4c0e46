// CPU implementation of group_detr::batched_lsa: every problem of a (P, Q, T) cost tensor,
// dynamically scheduled over the intra-op thread pool, largest problems first.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "lsa/solver.h"

namespace group_detr {
namespace {

using lsa::Status;

// The hot scan, compiled for AVX2 and for the baseline ISA with a run-time choice, so one
// binary is fast on modern CPUs and still correct everywhere else.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
lsa::Candidate<double> serial_scan(const lsa::Workspace<double>& ws, int32_t nc, int32_t i,
                                   double min_val) {
  return lsa::SerialScan{}(ws, nc, i, min_val);
}

struct DispatchedScan {
  lsa::Candidate<double> operator()(const lsa::Workspace<double>& ws, int32_t nc, int32_t i,
                                    double min_val) const {
    return serial_scan(ws, nc, i, min_val);
  }
};

// Per-thread memory, sized once for the largest problem.
struct ThreadWorkspace {
  std::vector<double> cost, u, v, dist;
  std::vector<int32_t> path, col4row, row4col, remaining, position, visited_rows, visited_cols;
  std::vector<uint8_t> col_done;

  ThreadWorkspace(int64_t max_rows, int64_t max_cols)
      : cost(max_rows * max_cols), u(max_rows), v(max_cols), dist(max_cols), path(max_cols),
        col4row(max_rows), row4col(max_cols), remaining(max_cols), position(max_cols),
        visited_rows(max_rows), visited_cols(max_cols), col_done(max_cols) {}

  lsa::Workspace<double> view() {
    return {cost.data(), u.data(), v.data(), dist.data(), path.data(), col4row.data(),
            row4col.data(), remaining.data(), position.data(), visited_rows.data(),
            visited_cols.data(), col_done.data()};
  }
};

// Solves problem `cost` (Q x T strided, first `num_cols` target columns valid) into `out` (T).
template <typename scalar_t>
Status solve_one(const scalar_t* cost, int64_t stride_q, int64_t stride_t, int64_t num_queries,
                 int64_t num_targets, int64_t num_cols, ThreadWorkspace& tw, int64_t* out) {
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

  // scipy shifts the matrix by its minimum, in double; the same shift keeps our arithmetic
  // identical to scipy's.
  double min_entry = std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < nr; ++r) {
    const scalar_t* row = cost + r * row_stride;
    for (int64_t c = 0; c < nc; ++c) {
      const double x = static_cast<double>(row[c * col_stride]);
      if (std::isnan(x) || x == -std::numeric_limits<double>::infinity()) {
        return lsa::kInvalidEntry;
      }
      min_entry = x < min_entry ? x : min_entry;
    }
  }
  if (std::isinf(min_entry)) return lsa::kInfeasible;  // every pair forbidden
  double* shifted = tw.cost.data();
  for (int64_t r = 0; r < nr; ++r) {
    const scalar_t* row = cost + r * row_stride;
    for (int64_t c = 0; c < nc; ++c) {
      shifted[r * nc + c] = static_cast<double>(row[c * col_stride]) - min_entry;
    }
  }

  const lsa::Workspace<double> ws = tw.view();
  const Status status = lsa::solve(static_cast<int32_t>(nr), static_cast<int32_t>(nc), ws,
                                   DispatchedScan{});
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

std::tuple<at::Tensor, at::Tensor> batched_lsa_cpu(const at::Tensor& cost,
                                                   const at::Tensor& num_targets) {
  TORCH_CHECK(cost.dim() == 3, "batched_lsa: cost must have shape (P, Q, T), got ",
              cost.sizes());
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "batched_lsa: cost must be float32 or float64, got ", cost.scalar_type());
  TORCH_CHECK(num_targets.dim() == 1 && num_targets.size(0) == cost.size(0),
              "batched_lsa: num_targets must have shape (P,)");
  TORCH_CHECK(cost.device().is_cpu() && num_targets.device().is_cpu(),
              "batched_lsa (CPU): tensors must be on the CPU");

  const int64_t num_problems = cost.size(0);
  const int64_t num_queries = cost.size(1);
  const int64_t num_cols = cost.size(2);
  auto matched = at::empty({num_problems, num_cols}, cost.options().dtype(at::kLong));
  auto status = at::zeros({num_problems}, cost.options().dtype(at::kInt));
  if (num_problems == 0) return {matched, status};

  const at::Tensor counts = num_targets.to(at::kLong).contiguous();
  const int64_t* count = counts.data_ptr<int64_t>();
  int64_t max_targets = 0;
  for (int64_t p = 0; p < num_problems; ++p) {
    max_targets = std::max(max_targets, std::min(std::max(count[p], int64_t(0)), num_cols));
  }
  const int64_t max_rows = std::min(num_queries, max_targets);
  const int64_t max_cols = std::max(num_queries, max_targets);

  // Largest problems first, handed out one at a time, so two threads finish together.
  std::vector<int64_t> order(num_problems);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return count[a] > count[b]; });
  std::atomic<int64_t> next{0};

  int64_t* out = matched.data_ptr<int64_t>();
  int32_t* problem_status = status.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "batched_lsa_cpu", [&] {
    const scalar_t* base = cost.data_ptr<scalar_t>();
    const int64_t stride_p = cost.stride(0), stride_q = cost.stride(1), stride_t = cost.stride(2);
    const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_problems);
    at::parallel_for(0, num_workers, 1, [&](int64_t begin, int64_t end) {
      ThreadWorkspace tw(max_rows, max_cols);
      for (int64_t w = begin; w < end; ++w) {
        for (int64_t k = next.fetch_add(1); k < num_problems; k = next.fetch_add(1)) {
          const int64_t p = order[k];
          problem_status[p] = solve_one(base + p * stride_p, stride_q, stride_t, num_queries,
                                        count[p], num_cols, tw, out + p * num_cols);
          if (problem_status[p] != lsa::kOk) {
            std::fill(out + p * num_cols, out + (p + 1) * num_cols, int64_t(-1));
          }
        }
      }
    });
  });
  return {matched, status};
}

}  // namespace
}  // namespace group_detr

TORCH_LIBRARY_IMPL(group_detr, CPU, m) {
  m.impl("batched_lsa", &group_detr::batched_lsa_cpu);
}
