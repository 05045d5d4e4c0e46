// CPU implementation of group_detr::match_cost: DETR's matching cost (focal or softmax class
// cost + L1 + GIoU) of every query against every valid target of its image, in one pass from
// the logits, predicted boxes and padded targets. Queries go 8 to a vector (a block); blocks
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

constexpr int64_t kPrefetchBlocks = 4;

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

// Targets of every image as float32 structure-of-arrays rows (`stride` = M_max entries per
// image, the first valid[b] used), and each image's distinct target classes: `unique_label[b]`
// in ascending order, `unique_of` the index of target m's class in that list. Valid
// labels are checked here: one out of range would make the gather read outside the logits.
struct PackedTargets {
  int64_t batch = 0, stride = 0;
  std::vector<float> data;  // 9 arrays of (B, stride): cx, cy, w, h, x0, y0, x1, y1, area
  std::vector<int32_t> unique_of;  // (B, stride)
  std::vector<std::vector<int64_t>> unique_label;

  float* array(int which, int64_t image) { return data.data() + (which * batch + image) * stride; }
  TargetsSoA view(int64_t image, int64_t count) {
    return {array(0, image), array(1, image), array(2, image), array(3, image), array(4, image),
            array(5, image), array(6, image), array(7, image), array(8, image), count};
  }
};

template <typename box_t>
PackedTargets pack_targets(const at::Tensor& labels, const at::Tensor& boxes,
                           const std::vector<int64_t>& valid, int64_t num_classes) {
  PackedTargets packed;
  packed.batch = labels.size(0);
  packed.stride = labels.size(1);
  packed.data.assign(9 * packed.batch * packed.stride, 0.0f);
  packed.unique_of.assign(packed.batch * packed.stride, 0);
  packed.unique_label.resize(packed.batch);
  const auto lab = labels.accessor<int64_t, 2>();
  const auto box = boxes.accessor<box_t, 3>();
  // class -> its index in unique_label[b]; -1: not a class of image b (0 while collecting them)
  std::vector<int32_t> slot(num_classes, -1);
  for (int64_t b = 0; b < packed.batch; ++b) {
    std::vector<int64_t>& unique = packed.unique_label[b];
    for (int64_t m = 0; m < valid[b]; ++m) {
      const int64_t label = lab[b][m];
      TORCH_CHECK_VALUE(label >= 0 && label < num_classes, "match_cost: target label ", label,
                        " (image ", b, ", target ", m, ") is not a class id in [0, ",
                        num_classes, ")");
      if (slot[label] < 0) {
        slot[label] = 0;
        unique.push_back(label);
      }
      const float cx = static_cast<float>(box[b][m][0]), cy = static_cast<float>(box[b][m][1]);
      const float w = static_cast<float>(box[b][m][2]), h = static_cast<float>(box[b][m][3]);
      const float x0 = cx - 0.5f * w, y0 = cy - 0.5f * h, x1 = cx + 0.5f * w, y1 = cy + 0.5f * h;
      const float values[9] = {cx, cy, w, h, x0, y0, x1, y1, (x1 - x0) * (y1 - y0)};
      for (int k = 0; k < 9; ++k) packed.array(k, b)[m] = values[k];
    }
    // Ascending classes: the gather then walks every row of logits forwards.
    std::sort(unique.begin(), unique.end());
    for (size_t u = 0; u < unique.size(); ++u) slot[unique[u]] = static_cast<int32_t>(u);
    for (int64_t m = 0; m < valid[b]; ++m) packed.unique_of[b * packed.stride + m] = slot[lab[b][m]];
    for (const int64_t label : unique) slot[label] = -1;
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
  const int64_t classes_padded = round_up(std::max<int64_t>(num_classes, 1), kMaxWidth);
  const int64_t blocks_per_image = (num_queries + kMaxWidth - 1) / kMaxWidth;
  int64_t max_unique = 1, total_valid = 0;
  for (int64_t b = 0; b < num_images; ++b) {
    max_unique = std::max<int64_t>(max_unique, targets.unique_label[b].size());
    total_valid += valid[b];
  }
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
      // A task is blocks of 8 queries of one or more images: ~16K cost entries per task hide
      // the scheduling and leave many tasks to balance.
      const int64_t mean_valid = std::max<int64_t>(1, total_valid / num_images);
      const int64_t grain = std::max<int64_t>(1, 16384 / (kMaxWidth * mean_valid));
      at::parallel_for(0, num_images * blocks_per_image, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> picked(max_unique * kMaxWidth), class_buf(max_unique * kMaxWidth);
        std::vector<float> tile(std::max<int64_t>(num_targets, 1) * kMaxWidth);
        std::vector<float> row(params.softmax ? classes_padded : 0);
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
          // Lanes past the last query hold a unit box and logit 0: finite, never written out.
          cost::QueryBlock queries;
          for (int64_t i = 0; i < kMaxWidth; ++i) {
            if (i >= lanes) {
              queries.cx[i] = queries.cy[i] = 0.5f;
              queries.w[i] = queries.h[i] = 1.0f;
              continue;
            }
            const scalar_t* box_row = box_base + b * bs0 + (q0 + i) * bs1;
            queries.cx[i] = static_cast<float>(box_row[0]);
            queries.cy[i] = static_cast<float>(box_row[bs2]);
            queries.w[i] = static_cast<float>(box_row[2 * bs2]);
            queries.h[i] = static_cast<float>(box_row[3 * bs2]);
          }
          const std::vector<int64_t>& unique = targets.unique_label[b];
          const int64_t num_unique = static_cast<int64_t>(unique.size());
          // The gather below is bound by memory (a few scattered logits per row of a tensor
          // larger than the cache): ask now for the ones of the block kPrefetchBlocks ahead.
          if (q0 + (kPrefetchBlocks + 1) * kMaxWidth <= num_queries) {
            const logit_t* next = logit_base + b * ls0 + (q0 + kPrefetchBlocks * kMaxWidth) * ls1;
            for (int64_t i = 0; i < kMaxWidth; ++i) {
              for (int64_t u = 0; u < num_unique; ++u) __builtin_prefetch(next + i * ls1 + unique[u] * ls2);
            }
          }
          float inv_sum[kMaxWidth];
          for (int64_t i = 0; i < kMaxWidth; ++i) {
            inv_sum[i] = 1.0f;
            if (i >= lanes) {
              for (int64_t u = 0; u < num_unique; ++u) picked[u * kMaxWidth + i] = 0.0f;
              continue;
            }
            const logit_t* logit_row = logit_base + b * ls0 + (q0 + i) * ls1;
            if (params.softmax) {
              for (int64_t c = 0; c < num_classes; ++c) {
                row[c] = static_cast<float>(logit_row[c * ls2]);
              }
              // exp_shift_row overwrote the -inf padding of the previous row with zeros.
              std::fill(row.begin() + num_classes, row.end(),
                        -std::numeric_limits<float>::infinity());
              const float sum = avx2 ? cost::avx2::exp_shift_row(row.data(), classes_padded)
                                     : cost::portable::exp_shift_row(row.data(), classes_padded);
              inv_sum[i] = 1.0f / sum;
              for (int64_t u = 0; u < num_unique; ++u) picked[u * kMaxWidth + i] = row[unique[u]];
            } else {
              for (int64_t u = 0; u < num_unique; ++u) {
                picked[u * kMaxWidth + i] = static_cast<float>(logit_row[unique[u] * ls2]);
              }
            }
          }
          const TargetsSoA t = targets.view(b, count);
          const int32_t* unique_of = targets.unique_of.data() + b * targets.stride;
          if (avx2) {
            cost::avx2::cost_block(params, t, unique_of, num_unique, picked.data(), inv_sum,
                                   queries, class_buf.data(), tile.data());
          } else {
            cost::portable::cost_block(params, t, unique_of, num_unique, picked.data(), inv_sum,
                                       queries, class_buf.data(), tile.data());
          }
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
