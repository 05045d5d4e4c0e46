// The input checks both CPU cost ops make alike (match_cost_cpu.cpp, group_match_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace group_detr {
namespace cost {

// The checks both ops make alike, with `op` ("match_cost", "group_match") opening each message:
// float logits and boxes and a known class cost (check_predictions), int64 labels and float
// boxes (check_targets, once per target tensor), every tensor on the CPU.
inline void check_float_on_cpu(const char* op, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": logits and boxes must be float16, bfloat16, float32 or float64, got ",
                   dtype);
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, " (CPU): every tensor must be on the CPU");
}

inline void check_predictions(const char* op, const at::Tensor& logits,
                              const at::Tensor& pred_boxes, const std::string& class_cost) {
  check_float_on_cpu(op, logits);
  check_float_on_cpu(op, pred_boxes);
  TORCH_CHECK_VALUE(class_cost == "focal" || class_cost == "focal_logsigmoid" ||
                        class_cost == "softmax",
                    op, ": class_cost must be 'focal', 'focal_logsigmoid' or 'softmax', got '",
                    class_cost, "'");
}

inline void check_targets(const char* op, const at::Tensor& labels,
                          const at::Tensor& target_boxes) {
  check_float_on_cpu(op, target_boxes);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device().is_cpu(), op, " (CPU): every tensor must be on the CPU");
}

}  // namespace cost
}  // namespace group_detr
