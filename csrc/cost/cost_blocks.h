// What both CPU ops built on the fused cost share (match_cost_cpu.cpp: the padded cost tensor;
// group_match_cpu.cpp: cost and assignment in one pass): the SIMD choice, the targets packed as
// structure-of-arrays rows with each image's distinct classes, and the cost of one block of
// kMaxWidth queries from the logits and boxes (gather, class term, L1, GIoU) into a caller's
// tile. Free of torch headers, like the kernel: benchmarks/bench_cost_breakdown.py times it on
// its own (the ops' input checks are in op_checks.h).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "cost/match_cost_kernel.h"

namespace group_detr {
namespace cost {

// The instruction sets the cost kernel has a build for, best last.
enum class Isa { kPortable, kAvx2, kAvx512 };

// The best build this CPU runs. GROUP_DETR_CPU_SCAN=portable or =avx2 caps it (tests compare the
// builds; the solver reads the same variable).
inline Isa cost_isa() {
#ifdef GROUP_DETR_HAVE_AVX2_COST
  const char* cap_env = std::getenv("GROUP_DETR_CPU_SCAN");
  const std::string cap = cap_env != nullptr ? cap_env : "";
  if (cap == "portable" || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    return Isa::kPortable;
  }
  if (cap == "avx2" || !__builtin_cpu_supports("avx512f")) return Isa::kAvx2;
  return Isa::kAvx512;
#else
  return Isa::kPortable;
#endif
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "portable";
}

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Weights and focal constants rounded to float32, as torch does with Python scalars.
inline CostParams make_params(double cost_class, double cost_bbox, double cost_giou,
                              const std::string& class_cost, double focal_alpha,
                              double focal_gamma) {
  CostParams params;
  params.w_class = static_cast<float>(cost_class);
  params.w_bbox = static_cast<float>(cost_bbox);
  params.w_giou = static_cast<float>(cost_giou);
  params.use_bbox = cost_bbox != 0.0;
  params.use_giou = cost_giou != 0.0;
  params.softmax = class_cost == "softmax";
  params.logsigmoid = class_cost == "focal_logsigmoid";
  params.alpha = static_cast<float>(focal_alpha);
  params.one_minus_alpha = static_cast<float>(1.0 - focal_alpha);
  params.gamma = static_cast<float>(focal_gamma);
  params.gamma_is_two = focal_gamma == 2.0;
  return params;
}

// Targets of every image as float32 structure-of-arrays rows (`stride` entries per image, the
// first valid[b] used), and each image's distinct target classes: `unique_label[b]` in
// ascending order, `unique_of` the index of target m's class in that list.
struct PackedTargets {
  int64_t batch = 0, stride = 0, max_unique = 1;
  std::vector<float> data;  // 9 arrays of (B, stride): cx, cy, w, h, x0, y0, x1, y1, area
  std::vector<int32_t> unique_of;  // (B, stride)
  std::vector<std::vector<int64_t>> unique_label;

  float* array(int which, int64_t image) { return data.data() + (which * batch + image) * stride; }
  const float* array(int which, int64_t image) const {
    return data.data() + (which * batch + image) * stride;
  }
  TargetsSoA view(int64_t image, int64_t count) const {
    return {array(0, image), array(1, image), array(2, image), array(3, image), array(4, image),
            array(5, image), array(6, image), array(7, image), array(8, image), count};
  }
};

// A target label outside [0, num_classes) found by pack_targets (image, target index, label).
struct BadLabel {
  bool found = false;
  int64_t image = 0, target = 0, label = 0;
};

// Packs image b's targets m < valid[b] read through `label_of(b, m)` and `box_of(b, m, out4)`
// (float32 cxcywh). A label outside [0, num_classes) is clamped into range with
// `clamp_labels` (GroupMatcher's validate=False), else reported in `bad` (packing stops; the
// caller raises with its own message): one out of range would make the gather read outside the
// logits.
template <typename LabelOf, typename BoxOf>
PackedTargets pack_targets(int64_t batch, int64_t stride, const std::vector<int64_t>& valid,
                           int64_t num_classes, bool clamp_labels, LabelOf label_of, BoxOf box_of,
                           BadLabel* bad) {
  PackedTargets packed;
  packed.batch = batch;
  packed.stride = stride;
  packed.data.assign(9 * batch * stride, 0.0f);
  packed.unique_of.assign(batch * stride, 0);
  packed.unique_label.resize(batch);
  std::vector<int32_t> label(stride);
  // class -> its index in unique_label[b]; -1: not a class of image b (0 while collecting them)
  std::vector<int32_t> slot(num_classes, -1);
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t>& unique = packed.unique_label[b];
    for (int64_t m = 0; m < valid[b]; ++m) {
      int64_t id = label_of(b, m);
      if (id < 0 || id >= num_classes) {
        if (!clamp_labels) {
          *bad = {true, b, m, id};
          return packed;
        }
        id = std::min(std::max<int64_t>(id, 0), num_classes - 1);
      }
      label[m] = static_cast<int32_t>(id);
      if (slot[id] < 0) {
        slot[id] = 0;
        unique.push_back(id);
      }
      float box[4];
      box_of(b, m, box);
      const float cx = box[0], cy = box[1], w = box[2], h = box[3];
      const float x0 = cx - 0.5f * w, y0 = cy - 0.5f * h, x1 = cx + 0.5f * w, y1 = cy + 0.5f * h;
      const float values[9] = {cx, cy, w, h, x0, y0, x1, y1, (x1 - x0) * (y1 - y0)};
      for (int k = 0; k < 9; ++k) packed.array(k, b)[m] = values[k];
    }
    // Ascending classes: the gather then walks every row of logits forwards.
    std::sort(unique.begin(), unique.end());
    for (size_t u = 0; u < unique.size(); ++u) slot[unique[u]] = static_cast<int32_t>(u);
    for (int64_t m = 0; m < valid[b]; ++m) packed.unique_of[b * stride + m] = slot[label[m]];
    for (const int64_t id : unique) slot[id] = -1;
    packed.max_unique = std::max<int64_t>(packed.max_unique, unique.size());
  }
  return packed;
}

constexpr int64_t kPrefetchBlocks = 4;

// Per-thread scratch of block_cost: one block's gathered inputs (queries, picked, inv_sum), its
// class costs (class_buf) and, for softmax, a row of logits.
struct BlockScratch {
  QueryBlock queries;
  float inv_sum[kMaxWidth];
  std::vector<float> picked, class_buf, row;
  // picked and class_buf hold max_unique rows of kMaxWidth lanes, rounded up to four vectors
  // of the widest build (cost_row.inc: class_costs works on four at a time).
  BlockScratch(int64_t max_unique, int64_t classes_padded, bool softmax)
      : picked(round_up(max_unique * kMaxWidth, 4 * kMaxWidth)), class_buf(picked.size()),
        row(softmax ? classes_padded : 0) {}
};

// The logits `(B, Q, C)` and predicted boxes `(B, Q, 4)` of the batch, strided, in their dtypes.
template <typename logit_t, typename box_t>
struct Predictions {
  const logit_t* logits;
  int64_t ls0, ls1, ls2;
  const box_t* boxes;
  int64_t bs0, bs1, bs2;
  int64_t num_queries, num_classes, classes_padded;
};

// What the cost of queries [q0, q0 + lanes) (lanes <= kMaxWidth) of image b needs from the
// predictions: their boxes into scratch.queries, and per distinct target class u and lane the
// logit at that class (focal) or its softmax numerator (softmax; the lane's 1 / sum into
// scratch.inv_sum) into scratch.picked[u * kMaxWidth + lane]. Lanes past `lanes` get a unit
// box and logit 0: finite, for the caller to ignore.
template <typename logit_t, typename box_t>
void gather_block(const CostParams& params, Isa isa, const Predictions<logit_t, box_t>& pred,
                  const PackedTargets& targets, int64_t b, int64_t q0, int64_t lanes,
                  BlockScratch& scratch) {
  QueryBlock& queries = scratch.queries;
  for (int64_t i = 0; i < kMaxWidth; ++i) {
    if (i >= lanes) {
      queries.cx[i] = queries.cy[i] = 0.5f;
      queries.w[i] = queries.h[i] = 1.0f;
      continue;
    }
    const box_t* box_row = pred.boxes + b * pred.bs0 + (q0 + i) * pred.bs1;
    queries.cx[i] = static_cast<float>(box_row[0]);
    queries.cy[i] = static_cast<float>(box_row[pred.bs2]);
    queries.w[i] = static_cast<float>(box_row[2 * pred.bs2]);
    queries.h[i] = static_cast<float>(box_row[3 * pred.bs2]);
  }
  const std::vector<int64_t>& unique = targets.unique_label[b];
  const int64_t num_unique = static_cast<int64_t>(unique.size());
  float* picked = scratch.picked.data();
  // The gather below is bound by memory (a few scattered logits per row of a tensor larger
  // than the cache): ask now for the ones of the block kPrefetchBlocks ahead.
  if (q0 + (kPrefetchBlocks + 1) * kMaxWidth <= pred.num_queries) {
    const logit_t* next = pred.logits + b * pred.ls0 + (q0 + kPrefetchBlocks * kMaxWidth) * pred.ls1;
    for (int64_t i = 0; i < kMaxWidth; ++i) {
      for (int64_t u = 0; u < num_unique; ++u) {
        __builtin_prefetch(next + i * pred.ls1 + unique[u] * pred.ls2);
      }
    }
  }
  float* inv_sum = scratch.inv_sum;
  for (int64_t i = 0; i < kMaxWidth; ++i) {
    inv_sum[i] = 1.0f;
    if (i >= lanes) {
      for (int64_t u = 0; u < num_unique; ++u) picked[u * kMaxWidth + i] = 0.0f;
      continue;
    }
    const logit_t* logit_row = pred.logits + b * pred.ls0 + (q0 + i) * pred.ls1;
    if (params.softmax) {
      float* row = scratch.row.data();
      for (int64_t c = 0; c < pred.num_classes; ++c) row[c] = static_cast<float>(logit_row[c * pred.ls2]);
      // exp_shift_row overwrote the -inf padding of the previous row with zeros.
      std::fill(row + pred.num_classes, row + pred.classes_padded,
                -std::numeric_limits<float>::infinity());
      float sum;
      switch (isa) {
#ifdef GROUP_DETR_HAVE_AVX2_COST
        case Isa::kAvx512: sum = avx512::exp_shift_row(row, pred.classes_padded); break;
        case Isa::kAvx2: sum = avx2::exp_shift_row(row, pred.classes_padded); break;
#endif
        default: sum = portable::exp_shift_row(row, pred.classes_padded);
      }
      inv_sum[i] = 1.0f / sum;
      for (int64_t u = 0; u < num_unique; ++u) picked[u * kMaxWidth + i] = row[unique[u]];
    } else {
      for (int64_t u = 0; u < num_unique; ++u) {
        picked[u * kMaxWidth + i] = static_cast<float>(logit_row[unique[u] * pred.ls2]);
      }
    }
  }
}

// The cost of the block gather_block left in `scratch` against image b's first `count`
// targets into tile[m * tile_stride + lane] for every lane of the block.
inline void compute_block(const CostParams& params, Isa isa, const PackedTargets& targets,
                          int64_t b, int64_t count, BlockScratch& scratch, float* tile,
                          int64_t tile_stride) {
  const int64_t num_unique = static_cast<int64_t>(targets.unique_label[b].size());
  const float* picked = scratch.picked.data();
  const float* inv_sum = scratch.inv_sum;
  const QueryBlock& queries = scratch.queries;
  const TargetsSoA t = targets.view(b, count);
  const int32_t* unique_of = targets.unique_of.data() + b * targets.stride;
  float* class_buf = scratch.class_buf.data();
  switch (isa) {
#ifdef GROUP_DETR_HAVE_AVX2_COST
    case Isa::kAvx512:
      avx512::cost_block(params, t, unique_of, num_unique, picked, inv_sum, queries, class_buf,
                         tile, tile_stride);
      return;
    case Isa::kAvx2:
      avx2::cost_block(params, t, unique_of, num_unique, picked, inv_sum, queries, class_buf, tile,
                       tile_stride);
      return;
#endif
    default:
      portable::cost_block(params, t, unique_of, num_unique, picked, inv_sum, queries, class_buf,
                           tile, tile_stride);
  }
}

// The cost of queries [q0, q0 + lanes) of image b against its first `count` targets into
// tile[m * tile_stride + lane] for every lane of the block: gather_block, then compute_block.
template <typename logit_t, typename box_t>
void block_cost(const CostParams& params, Isa isa, const Predictions<logit_t, box_t>& pred,
                const PackedTargets& targets, int64_t b, int64_t q0, int64_t lanes,
                int64_t count, BlockScratch& scratch, float* tile, int64_t tile_stride) {
  gather_block(params, isa, pred, targets, b, q0, lanes, scratch);
  compute_block(params, isa, targets, b, count, scratch, tile, tile_stride);
}

// The cost of one (image, group) problem: queries [q_begin, q_begin + per_group) of image b
// against its first `count` targets, block after block, into tile[m * tile_stride + q]
// (tile_stride >= per_group rounded up to kMaxWidth): targets as rows, the solver's layout.
template <typename logit_t, typename box_t>
void problem_cost(const CostParams& params, Isa isa, const Predictions<logit_t, box_t>& pred,
                  const PackedTargets& targets, int64_t b, int64_t q_begin, int64_t per_group,
                  int64_t count, BlockScratch& scratch, float* tile, int64_t tile_stride) {
  for (int64_t q0 = 0; q0 < per_group; q0 += kMaxWidth) {
    block_cost(params, isa, pred, targets, b, q_begin + q0,
               std::min<int64_t>(kMaxWidth, per_group - q0), count, scratch, tile + q0,
               tile_stride);
  }
}

}  // namespace cost
}  // namespace group_detr
