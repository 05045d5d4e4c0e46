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
#include <numeric>
#include <string>
#include <vector>

#include "lsa/cpu_solver.h"
#include "lsa/op_checks.h"
#include "lsa/warp_scan.h"

namespace group_detr {
namespace {

using cpu::DispatchedScan;
using cpu::ThreadWorkspace;
using cpu::solve_one;
using lsa::Status;

std::tuple<at::Tensor, at::Tensor> batched_lsa_cpu(const at::Tensor& cost,
                                                   const at::Tensor& num_targets) {
  check_lsa_inputs("batched_lsa", cost, num_targets);
  TORCH_CHECK_VALUE(cost.device().is_cpu() && num_targets.device().is_cpu(),
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
    const DispatchedScan scan;
    const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_problems);
    at::parallel_for(0, num_workers, 1, [&](int64_t begin, int64_t end) {
      ThreadWorkspace& tw = ThreadWorkspace::local();
      tw.reserve(max_rows, max_cols);
      for (int64_t w = begin; w < end; ++w) {
        for (int64_t k = next.fetch_add(1); k < num_problems; k = next.fetch_add(1)) {
          const int64_t p = order[k];
          problem_status[p] = solve_one(base + p * stride_p, stride_q, stride_t, num_queries,
                                        count[p], num_cols, scan, tw, out + p * num_cols);
          if (problem_status[p] != lsa::kOk) {
            std::fill(out + p * num_cols, out + (p + 1) * num_cols, int64_t(-1));
          }
        }
      }
      tw.shrink_to(int64_t(64) << 20);  // DETR-sized workspaces (< 1 MB) stay for the next call
    });
  });
  return {matched, status};
}

}  // namespace
}  // namespace group_detr

TORCH_LIBRARY_IMPL(group_detr, CPU, m) {
  m.impl("batched_lsa", &group_detr::batched_lsa_cpu);
}

// Which column scan batched_lsa runs on this machine (after GROUP_DETR_CPU_SCAN), for reports.
TORCH_LIBRARY_FRAGMENT(group_detr, m) {
  m.def("cpu_scan_level() -> str", []() -> std::string {
    return group_detr::cpu::DispatchedScan().avx2 ? "avx2" : "portable";
  });
}

// group_detr::batched_lsa_warp_emulated: the CUDA solver's warp-parallel code (warp_scan.h) run
// on the CPU with emulated lanes, one problem per thread. For the tests, so that the machines
// without a GPU check the very template the kernel instantiates. `reverse_lanes` runs the lanes
// of every warp step in the opposite order (a cross-lane race would change the result); `stage`
// reads the cost from a staged copy, as the kernel does when it fits in shared memory.
namespace group_detr {
namespace {

template <bool kReverse>
std::tuple<at::Tensor, at::Tensor> warp_emulated(const at::Tensor& cost,
                                                 const at::Tensor& num_targets, bool stage) {
  check_lsa_inputs("batched_lsa_warp_emulated", cost, num_targets);
  TORCH_CHECK_VALUE(cost.device().is_cpu() && num_targets.device().is_cpu(),
                    "batched_lsa_warp_emulated: tensors must be on the CPU");
  const int64_t num_problems = cost.size(0), num_queries = cost.size(1), num_cols = cost.size(2);
  auto matched = at::empty({num_problems, num_cols}, cost.options().dtype(at::kLong));
  auto status = at::zeros({num_problems}, cost.options().dtype(at::kInt));
  if (num_problems == 0) return {matched, status};
  const at::Tensor counts = num_targets.to(at::kLong).contiguous();
  const int64_t* count = counts.data_ptr<int64_t>();
  // The kernel's sizing: the batch's bounds, whatever num_targets holds.
  const int64_t max_rows = std::min(num_queries, num_cols);
  const int64_t max_cols = std::max(num_queries, num_cols);
  int64_t* out = matched.data_ptr<int64_t>();
  int32_t* problem_status = status.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "batched_lsa_warp_emulated", [&] {
    const scalar_t* base = cost.data_ptr<scalar_t>();
    at::parallel_for(0, num_problems, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> memory(lsa::warp_workspace_bytes(max_rows, max_cols) / 8 + 1);
      std::vector<scalar_t> staged(stage ? max_rows * max_cols : 0);
      const lsa::EmulatedLanes<kReverse> lanes;
      for (int64_t p = begin; p < end; ++p) {
        problem_status[p] = lsa::warp_solve_one(
            lanes, base + p * cost.stride(0), cost.stride(1), cost.stride(2),
            static_cast<int32_t>(num_queries), count[p], static_cast<int32_t>(num_cols),
            reinterpret_cast<unsigned char*>(memory.data()), static_cast<int32_t>(max_rows),
            static_cast<int32_t>(max_cols), stage ? staged.data() : nullptr, out + p * num_cols);
      }
    });
  });
  return {matched, status};
}

std::tuple<at::Tensor, at::Tensor> batched_lsa_warp_emulated(const at::Tensor& cost,
                                                             const at::Tensor& num_targets,
                                                             bool reverse_lanes, bool stage) {
  return reverse_lanes ? warp_emulated<true>(cost, num_targets, stage)
                       : warp_emulated<false>(cost, num_targets, stage);
}

}  // namespace
}  // namespace group_detr

TORCH_LIBRARY_IMPL(group_detr, CPU, m) {
  m.impl("batched_lsa_warp_emulated", &group_detr::batched_lsa_warp_emulated);
}
