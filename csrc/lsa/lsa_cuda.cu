// CUDA implementation of group_detr::batched_lsa: all problems of a (P, Q, T) cost tensor in one
// launch, one warp per problem (lsa_cuda_kernel.cuh). num_targets stays on the device, the
// result is written on the device and nothing here waits for the GPU: a failed problem comes
// back as its status (lsa::Status) and a row of -1, and the caller decides whether to look
// (group_detr/assignment.py: validate=True) or not (validate=False, CUDA-graph capture).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

#include "lsa/lsa_cuda_kernel.cuh"
#include "lsa/op_checks.h"

namespace group_detr {
namespace {

// GROUP_DETR_LSA_STAGE=0/1 forces the cost staging off/on (benchmarking); default automatic.
int stage_mode() {
  static const int mode = [] {
    const char* value = std::getenv("GROUP_DETR_LSA_STAGE");
    if (value == nullptr || *value == '\0') return -1;
    return std::atoi(value) != 0 ? 1 : 0;
  }();
  return mode;
}

std::tuple<at::Tensor, at::Tensor> batched_lsa_cuda(const at::Tensor& cost,
                                                    const at::Tensor& num_targets) {
  check_lsa_inputs("batched_lsa", cost, num_targets);
  TORCH_CHECK_VALUE(cost.is_cuda() && num_targets.device() == cost.device(),
                    "batched_lsa (CUDA): cost and num_targets must be on the same CUDA device");
  const int64_t num_problems = cost.size(0);
  const int64_t num_queries = cost.size(1);
  const int64_t num_cols = cost.size(2);
  TORCH_CHECK_VALUE(num_queries < (int64_t(1) << 30) && num_cols < (int64_t(1) << 30),
                    "batched_lsa (CUDA): Q and T must be below 2**30");

  const c10::cuda::CUDAGuard guard(cost.device());
  auto matched = at::empty({num_problems, num_cols}, cost.options().dtype(at::kLong));
  auto status = at::empty({num_problems}, cost.options().dtype(at::kInt));
  if (num_problems == 0) return {matched, status};
  const at::Tensor counts = num_targets.to(at::kLong).contiguous();  // on the device
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "batched_lsa_cuda", [&] {
    lsa_cuda::LaunchPlan plan;
    C10_CUDA_CHECK(lsa_cuda::plan_launch<scalar_t>(
        cost.get_device(), num_problems, static_cast<int32_t>(num_queries),
        static_cast<int32_t>(num_cols), stage_mode(), &plan));
    at::Tensor scratch;
    if (plan.scratch_bytes > 0) {
      scratch = at::empty({plan.scratch_bytes}, cost.options().dtype(at::kByte));
    }
    C10_CUDA_CHECK(lsa_cuda::launch_batched_lsa<scalar_t>(
        plan, cost.data_ptr<scalar_t>(), cost.stride(0), cost.stride(1), cost.stride(2),
        num_problems, static_cast<int32_t>(num_queries), static_cast<int32_t>(num_cols),
        counts.data_ptr<int64_t>(), matched.data_ptr<int64_t>(), status.data_ptr<int32_t>(),
        scratch.defined() ? scratch.data_ptr<uint8_t>() : nullptr, stream));
  });
  return {matched, status};
}

}  // namespace
}  // namespace group_detr

TORCH_LIBRARY_IMPL(group_detr, CUDA, m) {
  m.impl("batched_lsa", &group_detr::batched_lsa_cuda);
}
