// The input contract shared by every implementation of the batched_lsa ops (CPU, CUDA, the
// emulated warp solver); each adds only its device check. Python sees a violation as the
// ValueError / TypeError that linear_sum_assignment raises for the same input.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace group_detr {

inline void check_lsa_inputs(const char* op, const at::Tensor& cost,
                             const at::Tensor& num_targets) {
  TORCH_CHECK_VALUE(cost.dim() == 3, op, ": cost must have shape (P, Q, T), got ", cost.sizes());
  TORCH_CHECK_TYPE(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble, op,
                   ": cost must be float32 or float64, got ", cost.scalar_type());
  TORCH_CHECK_TYPE(num_targets.scalar_type() == at::kLong || num_targets.scalar_type() == at::kInt,
                   op, ": num_targets must be int32 or int64, got ", num_targets.scalar_type());
  TORCH_CHECK_VALUE(num_targets.dim() == 1 && num_targets.size(0) == cost.size(0), op,
                    ": num_targets must have shape (P,) = (", cost.size(0), "), got ",
                    num_targets.sizes());
}

}  // namespace group_detr
