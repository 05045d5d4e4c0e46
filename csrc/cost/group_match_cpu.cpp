// CPU implementation of group_detr::group_match: GroupMatcher's whole CPU path in one pass, from
// the logits, predicted boxes and each image's targets to DETR's sorted index pairs per image.
//
// Each problem (image b, group g) is one task: its cost (the fused cost's block kernel, kMaxWidth
// queries per block) goes into a per-thread tile laid out with the targets as rows, which is the
// solver's own layout for N > M, and is solved there while it is still in the cache; no
// (B, Q, M_max) tensor, its zero padding or a second pass over it. The numbers are those of the
// two-step path (match_cost, then batched_lsa): the same operations per cost entry, the same
// solver, so the same assignments, bit for bit (tests/test_group_match.py).
// The reference is GroupMatcher with cost_backend="torch" (group_detr/matcher.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "cost/cost_blocks.h"
#include "cost/op_checks.h"
#include "lsa/cpu_solver.h"

namespace group_detr {
namespace {

using cost::kMaxWidth;
using lsa::Status;

void check_inputs(const at::Tensor& logits, const at::Tensor& pred_boxes, at::TensorList labels,
                  at::TensorList target_boxes, int64_t num_groups, const std::string& class_cost) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "group_match: logits must be (B, Q, C), got ",
                    logits.sizes());
  const int64_t num_images = logits.size(0), num_queries = logits.size(1);
  TORCH_CHECK_VALUE(pred_boxes.dim() == 3 && pred_boxes.size(0) == num_images &&
                        pred_boxes.size(1) == num_queries && pred_boxes.size(2) == 4,
                    "group_match: pred_boxes must be (B, Q, 4) = (", num_images, ", ",
                    num_queries, ", 4), got ", pred_boxes.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(labels.size()) == num_images &&
                        static_cast<int64_t>(target_boxes.size()) == num_images,
                    "group_match: labels and target_boxes must hold B = ", num_images,
                    " tensors each (one per image), got ", labels.size(), " and ",
                    target_boxes.size());
  int64_t total = 0;
  for (int64_t b = 0; b < num_images; ++b) {
    TORCH_CHECK_VALUE(labels[b].dim() == 1, "group_match: labels[", b, "] must be (M,), got ",
                      labels[b].sizes());
    const int64_t m = labels[b].size(0);
    TORCH_CHECK_VALUE(target_boxes[b].dim() == 2 && target_boxes[b].size(0) == m &&
                          target_boxes[b].size(1) == 4,
                      "group_match: target_boxes[", b, "] must be (M, 4) = (", m,
                      ", 4) for its ", m, " labels, got ", target_boxes[b].sizes());
    total += m;
  }
  cost::check_predictions("group_match", logits, pred_boxes, class_cost);
  for (int64_t b = 0; b < num_images; ++b) {
    cost::check_targets("group_match", labels[b], target_boxes[b]);
  }
  TORCH_CHECK_VALUE(num_groups >= 1 && num_queries % num_groups == 0,
                    "group_match: the number of queries K*N = ", num_queries,
                    " is not divisible by num_groups ", num_groups);
  TORCH_CHECK_VALUE(logits.size(2) > 0 || total == 0 || num_queries == 0,
                    "group_match: logits have no classes but there are targets");
}

// check_boxes' rule and messages (group_detr/box_ops.py) on the float32 target boxes of every
// image, in its order: every box finite, then no negative width or height.
void check_target_boxes(const std::vector<at::Tensor>& boxes) {
  for (const at::Tensor& image : boxes) {
    const float* box = image.const_data_ptr<float>();
    for (int64_t i = 0; i < image.numel(); ++i) {
      TORCH_CHECK_VALUE(std::isfinite(box[i]), "target boxes contain NaN or infinite values");
    }
  }
  for (const at::Tensor& image : boxes) {
    const float* box = image.const_data_ptr<float>();
    for (int64_t i = 0; i < image.size(0); ++i) {
      TORCH_CHECK_VALUE(!(box[4 * i + 2] < 0 || box[4 * i + 3] < 0),
                        "target boxes contain a box with negative width or height "
                        "(degenerate box)");
    }
  }
}

// validate=False's rule (group_detr/assignment.py:sanitize_cost) on one problem's float32 tile
// of `rows` targets x `cols` queries (row stride `stride`), with the same float32 operations in
// the same order: every non-finite entry becomes R = hi + (pairs + 1) * (hi - lo) + magnitude.
void sanitize_tile(float* tile, int64_t rows, int64_t cols, int64_t stride, int64_t pairs) {
  const float inf = std::numeric_limits<float>::infinity();
  float hi = -inf, lo = inf;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float x = tile[r * stride + c];
      if (std::isfinite(x)) {
        hi = std::max(hi, x);
        lo = std::min(lo, x);
      }
    }
  }
  if (!std::isfinite(hi)) hi = lo = 0.0f;
  const float magnitude = std::max(std::max(std::fabs(hi), std::fabs(lo)), 1.0f);
  float replacement = hi + (static_cast<float>(pairs) + 1.0f) * (hi - lo);
  replacement = replacement + magnitude;
  replacement = std::min(replacement, std::numeric_limits<float>::max());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float& x = tile[r * stride + c];
      if (!std::isfinite(x)) x = replacement;
    }
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> group_match_cpu(
    const at::Tensor& logits, const at::Tensor& pred_boxes, at::TensorList labels,
    at::TensorList target_boxes, int64_t num_groups, double cost_class, double cost_bbox,
    double cost_giou, c10::string_view class_cost_view, double focal_alpha, double focal_gamma,
    bool validate) {
  const std::string class_cost(class_cost_view.data(), class_cost_view.size());
  check_inputs(logits, pred_boxes, labels, target_boxes, num_groups, class_cost);
  const int64_t num_images = logits.size(0), num_queries = logits.size(1);
  const int64_t num_classes = logits.size(2);
  const int64_t per_group = num_queries / num_groups;  // N
  const int64_t num_problems = num_images * num_groups;

  // Image b's pairs: K * min(N, M_b), group after group, into its own index tensors.
  std::vector<int64_t> valid(num_images);
  int64_t max_targets = 0, total_pairs = 0;
  const auto long_options = logits.options().dtype(at::kLong);
  std::vector<at::Tensor> query_idx(num_images), target_idx(num_images);
  std::vector<int64_t*> query_out(num_images), target_out(num_images);
  for (int64_t b = 0; b < num_images; ++b) {
    valid[b] = labels[b].size(0);
    max_targets = std::max(max_targets, valid[b]);
    const int64_t pairs = num_groups * std::min(per_group, valid[b]);
    total_pairs += pairs;
    query_idx[b] = at::empty({pairs}, long_options);
    target_idx[b] = at::empty({pairs}, long_options);
    query_out[b] = query_idx[b].data_ptr<int64_t>();
    target_out[b] = target_idx[b].data_ptr<int64_t>();
  }
  at::Tensor status = at::zeros({num_problems}, logits.options().dtype(at::kInt));
  if (total_pairs == 0) return {query_idx, target_idx, status};

  // The targets in float32 as the reference's `tgt_boxes.to(pred_boxes.float().dtype)`;
  // labels first, then boxes, in check_targets' order.
  std::vector<at::Tensor> image_labels(num_images), image_boxes(num_images);
  for (int64_t b = 0; b < num_images; ++b) {
    image_labels[b] = labels[b].contiguous();
    image_boxes[b] = target_boxes[b].to(at::kFloat).contiguous();
  }
  cost::BadLabel bad;
  cost::PackedTargets targets = cost::pack_targets(
      num_images, std::max<int64_t>(max_targets, 1), valid, num_classes,
      /*clamp_labels=*/!validate,
      [&](int64_t b, int64_t m) { return image_labels[b].const_data_ptr<int64_t>()[m]; },
      [&](int64_t b, int64_t m, float* out4) {
        const float* box = image_boxes[b].const_data_ptr<float>() + 4 * m;
        for (int k = 0; k < 4; ++k) out4[k] = box[k];
      },
      &bad);
  TORCH_CHECK_VALUE(!bad.found, "target ", bad.image, " has class id ", bad.label,
                    " outside [0, ", num_classes, "): the data has more classes than the "
                    "model was built for (num_classes=", num_classes, ")");
  if (validate) check_target_boxes(image_boxes);

  const cost::CostParams params = cost::make_params(cost_class, cost_bbox, cost_giou, class_cost,
                                                    focal_alpha, focal_gamma);
  const cost::Isa isa = cost::cost_isa();
  const int64_t classes_padded = cost::round_up(std::max<int64_t>(num_classes, 1), kMaxWidth);
  const int64_t row_stride = cost::round_up(per_group, kMaxWidth);  // the tile's, per target
  const int64_t max_rows = std::min(per_group, max_targets);
  const int64_t max_cols = std::max(per_group, max_targets);

  // Largest problems first, handed out one at a time, so the threads finish together.
  std::vector<int64_t> order(num_problems);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return valid[a / num_groups] > valid[b / num_groups];
  });
  std::atomic<int64_t> next{0};
  int32_t* problem_status = status.data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "group_match_logits", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred_boxes.scalar_type(),
                                    "group_match_boxes", [&] {
      const cost::Predictions<logit_t, scalar_t> pred{
          logits.const_data_ptr<logit_t>(), logits.stride(0), logits.stride(1), logits.stride(2),
          pred_boxes.const_data_ptr<scalar_t>(), pred_boxes.stride(0), pred_boxes.stride(1),
          pred_boxes.stride(2), num_queries, num_classes, classes_padded};
      const cpu::DispatchedScan scan;
      const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_problems);
      at::parallel_for(0, num_workers, 1, [&](int64_t begin, int64_t end) {
        cpu::ThreadWorkspace& workspace = cpu::ThreadWorkspace::local();
        workspace.reserve(max_rows, max_cols);
        cost::BlockScratch scratch(targets.max_unique, classes_padded, params.softmax);
        std::vector<float> tile(max_targets * row_stride);
        std::vector<int64_t> matched(max_targets);
        std::vector<int32_t> target_of_query(per_group, -1);
        for (int64_t w = begin; w < end; ++w) {
          for (int64_t k = next.fetch_add(1); k < num_problems; k = next.fetch_add(1)) {
            const int64_t p = order[k], b = p / num_groups, g = p % num_groups;
            const int64_t count = valid[b];
            if (count == 0 || per_group == 0) continue;
            const int64_t q_begin = g * per_group;
            cost::problem_cost(params, isa, pred, targets, b, q_begin, per_group, count, scratch,
                               tile.data(), row_stride);
            // The tile as the solver's (queries x targets) cost: query q, target m at
            // tile[m * row_stride + q].
            Status solved = cpu::solve_one(tile.data(), 1, row_stride, per_group, count, count,
                                           scan, workspace, matched.data());
            if (!validate && (solved == lsa::kInvalidEntry || solved == lsa::kInfeasible)) {
              sanitize_tile(tile.data(), count, per_group, row_stride,
                            std::min(per_group, count));
              solved = cpu::solve_one(tile.data(), 1, row_stride, per_group, count, count, scan,
                                      workspace, matched.data());
            }
            problem_status[p] = solved;
            // DETR's order: ascending query, so group g's pairs follow group g - 1's.
            int64_t* query_at = query_out[b] + g * std::min(per_group, count);
            int64_t* target_at = target_out[b] + g * std::min(per_group, count);
            if (solved != lsa::kOk) {  // the caller raises; keep the indices in range anyway
              const int64_t pairs = std::min(per_group, count);
              std::fill(query_at, query_at + pairs, q_begin);
              std::fill(target_at, target_at + pairs, int64_t(0));
              continue;
            }
            for (int64_t m = 0; m < count; ++m) {
              if (matched[m] >= 0) target_of_query[matched[m]] = static_cast<int32_t>(m);
            }
            for (int64_t q = 0; q < per_group; ++q) {
              if (target_of_query[q] < 0) continue;
              *query_at++ = q_begin + q;
              *target_at++ = target_of_query[q];
              target_of_query[q] = -1;
            }
          }
        }
        workspace.shrink_to(int64_t(64) << 20);
      });
    });
  });
  return {query_idx, target_idx, status};
}

}  // namespace
}  // namespace group_detr

TORCH_LIBRARY_IMPL(group_detr, CPU, m) {
  m.impl("group_match", &group_detr::group_match_cpu);
}
