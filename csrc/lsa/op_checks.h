// The input contract shared by every implementation of the batched_lsa ops (CPU, CUDA, the
// emulated warp solver); each adds only its device check.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace group_detr {

inline void check_lsa_inputs(const char* op, const at::Tensor& cost,
                             const at::Tensor& num_targets) {
  TORCH_CHECK(cost.dim() == 3, op, ": cost must have shape (P, Q, T), got ", cost.sizes());
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble, op,
              ": cost must be float32 or float64, got ", cost.scalar_type());
  TORCH_CHECK(num_targets.dim() == 1 && num_targets.size(0) == cost.size(0), op,
              ": num_targets must have shape (P,)");
}

}  // namespace group_detr
