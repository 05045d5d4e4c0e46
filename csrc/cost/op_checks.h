// The input checks both CPU cost ops make alike (match_cost_cpu.cpp, group_match_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace group_detr {
namespace cost {

// The checks both ops make alike, with `op` ("match_cost", "group_match") opening each message:
// float logits and boxes, int64 labels, a known class cost, every tensor on the CPU.
inline void check_dtypes_and_device(const char* op, const at::Tensor& logits,
                                    const at::Tensor& pred_boxes, const at::Tensor& labels,
                                    const at::Tensor& target_boxes, const std::string& class_cost) {
  for (const at::Tensor* t : {&logits, &pred_boxes, &target_boxes}) {
    const auto dtype = t->scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                         dtype == at::kBFloat16,
                     op, ": logits and boxes must be float16, bfloat16, float32 or float64, got ",
                     dtype);
  }
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(class_cost == "focal" || class_cost == "softmax", op,
                    ": class_cost must be 'focal' or 'softmax', got '", class_cost, "'");
  for (const at::Tensor* t : {&logits, &pred_boxes, &labels, &target_boxes}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, " (CPU): every tensor must be on the CPU");
  }
}

}  // namespace cost
}  // namespace group_detr
