// CPU implementation of group_detr::match_cost: DETR's matching cost (focal or softmax class
// cost + L1 + GIoU) of every query against every padded target of its image, in one pass from
// the logits, predicted boxes and padded targets, rows spread over the intra-op thread pool.
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

#include "cost/match_cost_kernel.h"

namespace group_detr {
namespace {

using cost::CostParams;
using cost::TargetsSoA;
using cost::kMaxWidth;

bool use_avx2() {
#ifdef GROUP_DETR_HAVE_AVX2_COST
  // GROUP_DETR_CPU_SCAN=portable forces the portable code here as in the solver (tests).
  const char* cap = std::getenv("GROUP_DETR_CPU_SCAN");
  return !(cap != nullptr && std::string(cap) == "portable") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

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
  for (const at::Tensor* t : {&logits, &pred_boxes, &target_boxes}) {
    const auto dtype = t->scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                         dtype == at::kBFloat16,
                     "match_cost: logits and boxes must be float16, bfloat16, float32 or "
                     "float64, got ", dtype);
  }
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "match_cost: labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(class_cost == "focal" || class_cost == "softmax",
                    "match_cost: class_cost must be 'focal' or 'softmax', got '", class_cost,
                    "'");
  TORCH_CHECK_VALUE(logits.size(2) > 0 || labels.size(1) == 0 || num_queries == 0,
                    "match_cost: logits have no classes but there are targets");
  for (const at::Tensor* t : {&logits, &pred_boxes, &labels, &target_boxes}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "match_cost (CPU): every tensor must be on the CPU");
  }
}

// Targets of every image as float32 structure-of-arrays rows, `padded` entries per image (the
// entries past the image's valid count hold a unit box: finite, ignored). Valid labels are
// checked here: one out of range would make the gather read outside the logits.
struct PackedTargets {
  int64_t batch = 0, padded = 0;
  std::vector<float> data;  // 9 arrays of (B, padded): cx, cy, w, h, x0, y0, x1, y1, area
  std::vector<int64_t> label;

  float* array(int which, int64_t image) { return data.data() + (which * batch + image) * padded; }
  TargetsSoA view(int64_t image) {
    return {array(0, image), array(1, image), array(2, image), array(3, image), array(4, image),
            array(5, image), array(6, image), array(7, image), array(8, image), padded};
  }
};

template <typename box_t>
PackedTargets pack_targets(const at::Tensor& labels, const at::Tensor& boxes,
                           const std::vector<int64_t>& valid, int64_t num_classes) {
  PackedTargets packed;
  packed.batch = labels.size(0);
  const int64_t num_targets = labels.size(1);
  packed.padded = round_up(std::max<int64_t>(num_targets, 1), kMaxWidth);
  packed.data.assign(9 * packed.batch * packed.padded, 0.0f);
  packed.label.assign(packed.batch * packed.padded, 0);
  const auto lab = labels.accessor<int64_t, 2>();
  const auto box = boxes.accessor<box_t, 3>();
  for (int64_t b = 0; b < packed.batch; ++b) {
    for (int64_t m = 0; m < packed.padded; ++m) {
      float cx = 0.5f, cy = 0.5f, w = 1.0f, h = 1.0f;
      int64_t label = 0;
      if (m < valid[b]) {
        label = lab[b][m];
        TORCH_CHECK_VALUE(label >= 0 && label < num_classes, "match_cost: target label ", label,
                          " (image ", b, ", target ", m, ") is not a class id in [0, ",
                          num_classes, ")");
        cx = static_cast<float>(box[b][m][0]);
        cy = static_cast<float>(box[b][m][1]);
        w = static_cast<float>(box[b][m][2]);
        h = static_cast<float>(box[b][m][3]);
      }
      const float x0 = cx - 0.5f * w, y0 = cy - 0.5f * h, x1 = cx + 0.5f * w, y1 = cy + 0.5f * h;
      const float values[9] = {cx, cy, w, h, x0, y0, x1, y1, (x1 - x0) * (y1 - y0)};
      for (int k = 0; k < 9; ++k) packed.array(k, b)[m] = values[k];
      packed.label[b * packed.padded + m] = label;
    }
  }
  return packed;
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
  PackedTargets targets;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_boxes.scalar_type(),
                                  "match_cost_targets", [&] {
    targets = pack_targets<scalar_t>(labels, target_boxes, valid, num_classes);
  });

  CostParams params;
  // Weights and focal constants rounded to float32, as torch does with Python scalars.
  params.w_class = static_cast<float>(cost_class);
  params.w_bbox = static_cast<float>(cost_bbox);
  params.w_giou = static_cast<float>(cost_giou);
  params.use_bbox = cost_bbox != 0.0;
  params.use_giou = cost_giou != 0.0;
  params.softmax = class_cost == "softmax";
  params.alpha = static_cast<float>(focal_alpha);
  params.one_minus_alpha = static_cast<float>(1.0 - focal_alpha);
  params.gamma = static_cast<float>(focal_gamma);
  params.gamma_is_two = focal_gamma == 2.0;
  const bool avx2 = use_avx2();
  const int64_t padded = targets.padded;
  const int64_t classes_padded = round_up(std::max<int64_t>(num_classes, 1), kMaxWidth);
  float* out_base = out.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "match_cost_logits", [&] {
    using logit_t = scalar_t;
    const logit_t* logit_base = logits.const_data_ptr<logit_t>();
    const int64_t ls0 = logits.stride(0), ls1 = logits.stride(1), ls2 = logits.stride(2);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred_boxes.scalar_type(),
                                    "match_cost_boxes", [&] {
      const scalar_t* box_base = pred_boxes.const_data_ptr<scalar_t>();
      const int64_t bs0 = pred_boxes.stride(0), bs1 = pred_boxes.stride(1);
      const int64_t bs2 = pred_boxes.stride(2);
      // ~64 KB of cost per task: enough work to hide the scheduling, many tasks to balance.
      int64_t total_width = 0;
      for (int64_t b = 0; b < num_images; ++b) total_width += round_up(valid[b], kMaxWidth);
      const int64_t mean_width = std::max<int64_t>(kMaxWidth, total_width / num_images);
      const int64_t grain = std::max<int64_t>(1, 16384 / mean_width);
      at::parallel_for(0, num_images * num_queries, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> picked(padded), row_out(padded);
        std::vector<float> row(params.softmax ? classes_padded : 0);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / num_queries, q = r % num_queries;
          float* dst = out_base + r * num_targets;
          // Whole vectors up to the image's valid targets: the solver reads no column past them.
          const int64_t width = round_up(valid[b], kMaxWidth);
          if (width == 0) {
            std::fill(dst, dst + num_targets, 0.0f);
            continue;
          }
          const logit_t* logit_row = logit_base + b * ls0 + q * ls1;
          const int64_t* label = targets.label.data() + b * padded;
          float inv_sum = 1.0f;
          if (params.softmax) {
            for (int64_t c = 0; c < num_classes; ++c) {
              row[c] = static_cast<float>(logit_row[c * ls2]);
            }
            // exp_shift_row overwrote the -inf padding of the previous row with zeros.
            std::fill(row.begin() + num_classes, row.end(),
                      -std::numeric_limits<float>::infinity());
            const float sum = avx2 ? cost::avx2::exp_shift_row(row.data(), classes_padded)
                                   : cost::portable::exp_shift_row(row.data(), classes_padded);
            inv_sum = 1.0f / sum;
            for (int64_t m = 0; m < width; ++m) picked[m] = row[label[m]];
          } else {
            for (int64_t m = 0; m < width; ++m) {
              picked[m] = static_cast<float>(logit_row[label[m] * ls2]);
            }
          }
          const scalar_t* box_row = box_base + b * bs0 + q * bs1;
          const float pred[4] = {static_cast<float>(box_row[0]), static_cast<float>(box_row[bs2]),
                                 static_cast<float>(box_row[2 * bs2]),
                                 static_cast<float>(box_row[3 * bs2])};
          TargetsSoA t = targets.view(b);
          t.padded = width;
          // Straight into the output where the vectors fit in the row, else through row_out.
          float* target_row = width <= num_targets ? dst : row_out.data();
          if (avx2) {
            cost::avx2::cost_row(params, t, picked.data(), inv_sum, pred, target_row);
          } else {
            cost::portable::cost_row(params, t, picked.data(), inv_sum, pred, target_row);
          }
          if (target_row != dst) std::copy(row_out.begin(), row_out.begin() + valid[b], dst);
          std::fill(dst + valid[b], dst + num_targets, 0.0f);
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
