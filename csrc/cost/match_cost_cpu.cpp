// CPU implementation of group_detr::match_cost: DETR's matching cost (focal or softmax class
// cost + L1 + GIoU) of every query against every valid target of its image, in one pass from
// the logits, predicted boxes and padded targets. Queries go kMaxWidth to a block; blocks
// are spread over the intra-op thread pool.
// The torch reference is group_detr/match_cost.py:match_cost_torch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "cost/cost_blocks.h"
#include "cost/op_checks.h"

namespace group_detr {
namespace {

using cost::kMaxWidth;

void check_inputs(const at::Tensor& logits, const at::Tensor& pred_boxes,
                  const at::Tensor& labels, const at::Tensor& target_boxes,
                  const std::string& class_cost) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "match_cost: logits must be (B, Q, C), got ",
                    logits.sizes());
  const int64_t num_images = logits.size(0), num_queries = logits.size(1);
  TORCH_CHECK_VALUE(pred_boxes.dim() == 3 && pred_boxes.size(0) == num_images &&
                        pred_boxes.size(1) == num_queries && pred_boxes.size(2) == 4,
                    "match_cost: pred_boxes must be (B, Q, 4) = (", num_images, ", ",
                    num_queries, ", 4), got ", pred_boxes.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == num_images,
                    "match_cost: labels must be (B, M) with B = ", num_images, ", got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(target_boxes.dim() == 3 && target_boxes.size(0) == num_images &&
                        target_boxes.size(1) == labels.size(1) && target_boxes.size(2) == 4,
                    "match_cost: target_boxes must be (B, M, 4) = (", num_images, ", ",
                    labels.size(1), ", 4), got ", target_boxes.sizes());
  cost::check_predictions("match_cost", logits, pred_boxes, class_cost);
  cost::check_targets("match_cost", labels, target_boxes);
  TORCH_CHECK_VALUE(logits.size(2) > 0 || labels.size(1) == 0 || num_queries == 0,
                    "match_cost: logits have no classes but there are targets");
}

at::Tensor match_cost_cpu(const at::Tensor& logits, const at::Tensor& pred_boxes,
                          const at::Tensor& labels, const at::Tensor& target_boxes,
                          double cost_class, double cost_bbox, double cost_giou,
                          c10::string_view class_cost_view, double focal_alpha,
                          double focal_gamma, at::OptionalIntArrayRef num_targets_per_image) {
  const std::string class_cost(class_cost_view.data(), class_cost_view.size());
  check_inputs(logits, pred_boxes, labels, target_boxes, class_cost);
  const int64_t num_images = logits.size(0), num_queries = logits.size(1);
  const int64_t num_classes = logits.size(2), num_targets = labels.size(1);
  // Valid targets per image: the first num_targets[b] columns; the rest are left at 0.
  std::vector<int64_t> valid(num_images, num_targets);
  if (num_targets_per_image.has_value()) {
    const auto given = *num_targets_per_image;
    TORCH_CHECK_VALUE(static_cast<int64_t>(given.size()) == num_images,
                      "match_cost: num_targets must have B = ", num_images, " entries, got ",
                      given.size());
    for (int64_t b = 0; b < num_images; ++b) {
      TORCH_CHECK_VALUE(given[b] >= 0 && given[b] <= num_targets, "match_cost: num_targets[",
                        b, "] = ", given[b], " is outside [0, M = ", num_targets, "]");
      valid[b] = given[b];
    }
  }
  at::Tensor out = at::empty({num_images, num_queries, num_targets},
                             logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;

  // The targets in float32 as the reference's `tgt_boxes.to(pred_boxes.float().dtype)`.
  cost::PackedTargets targets;
  cost::BadLabel bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_boxes.scalar_type(),
                                  "match_cost_targets", [&] {
    const auto lab = labels.accessor<int64_t, 2>();
    const auto box = target_boxes.accessor<scalar_t, 3>();
    targets = cost::pack_targets(
        num_images, num_targets, valid, num_classes, /*clamp_labels=*/false,
        [&](int64_t b, int64_t m) { return lab[b][m]; },
        [&](int64_t b, int64_t m, float* out4) {
          for (int k = 0; k < 4; ++k) out4[k] = static_cast<float>(box[b][m][k]);
        },
        &bad);
  });
  TORCH_CHECK_VALUE(!bad.found, "match_cost: target label ", bad.label, " (image ", bad.image,
                    ", target ", bad.target, ") is not a class id in [0, ", num_classes, ")");

  const cost::CostParams params = cost::make_params(cost_class, cost_bbox, cost_giou, class_cost,
                                                    focal_alpha, focal_gamma);
  const cost::Isa isa = cost::cost_isa();
  const int64_t classes_padded = cost::round_up(std::max<int64_t>(num_classes, 1), kMaxWidth);
  const int64_t blocks_per_image = (num_queries + kMaxWidth - 1) / kMaxWidth;
  int64_t total_valid = 0;
  for (int64_t b = 0; b < num_images; ++b) total_valid += valid[b];
  float* out_base = out.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "match_cost_logits", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred_boxes.scalar_type(),
                                    "match_cost_boxes", [&] {
      const cost::Predictions<logit_t, scalar_t> pred{
          logits.const_data_ptr<logit_t>(), logits.stride(0), logits.stride(1), logits.stride(2),
          pred_boxes.const_data_ptr<scalar_t>(), pred_boxes.stride(0), pred_boxes.stride(1),
          pred_boxes.stride(2), num_queries, num_classes, classes_padded};
      // A task is blocks of kMaxWidth queries of one or more images: ~16K cost entries per task
      // hide the scheduling and leave many tasks to balance.
      const int64_t mean_valid = std::max<int64_t>(1, total_valid / num_images);
      const int64_t grain = std::max<int64_t>(1, 16384 / (kMaxWidth * mean_valid));
      at::parallel_for(0, num_images * blocks_per_image, grain, [&](int64_t begin, int64_t end) {
        cost::BlockScratch scratch(targets.max_unique, classes_padded, params.softmax);
        std::vector<float> tile(std::max<int64_t>(num_targets, 1) * kMaxWidth);
        for (int64_t unit = begin; unit < end; ++unit) {
          const int64_t b = unit / blocks_per_image;
          const int64_t q0 = (unit % blocks_per_image) * kMaxWidth;
          const int64_t lanes = std::min<int64_t>(kMaxWidth, num_queries - q0);
          const int64_t count = valid[b];
          float* dst = out_base + (b * num_queries + q0) * num_targets;
          if (count == 0) {  // the solver reads no column of an image without targets
            std::fill(dst, dst + lanes * num_targets, 0.0f);
            continue;
          }
          cost::block_cost(params, isa, pred, targets, b, q0, lanes, count, scratch,
                           tile.data(), kMaxWidth);
          for (int64_t i = 0; i < lanes; ++i) {
            float* out_row = dst + i * num_targets;
            for (int64_t m = 0; m < count; ++m) out_row[m] = tile[m * kMaxWidth + i];
            std::fill(out_row + count, out_row + num_targets, 0.0f);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace group_detr

TORCH_LIBRARY_IMPL(group_detr, CPU, m) {
  m.impl("match_cost", &group_detr::match_cost_cpu);
}

// Which build of the cost kernel match_cost and group_match run here (after
// GROUP_DETR_CPU_SCAN), for reports and tests.
TORCH_LIBRARY_FRAGMENT(group_detr, m) {
  m.def("cost_isa_level() -> str",
        []() -> std::string { return group_detr::cost::isa_name(group_detr::cost::cost_isa()); });
}
