// Where GroupMatcher's CPU op spends its time: the op's own per-problem work (cost_blocks.h's
// problem_cost, then lsa::cpu solve_one), run on one thread without torch and timed in parts.
// Built and driven by bench_cost_breakdown.py (ctypes); the op itself adds the packing's
// checks, the thread pool and the output tensors around exactly this.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "cost/cost_blocks.h"
#include "lsa/cpu_solver.h"

namespace {

using namespace group_detr;

// The parts, in the order of the output rows.
enum Part { kWhole, kCost, kClassTerm, kGather, kSolve, kNumParts };

struct Inputs {
  const float* logits;       // (B, Q, C), contiguous
  const float* pred_boxes;   // (B, Q, 4)
  const int64_t* labels;     // (S,), image after image
  const float* target_boxes; // (S, 4)
  const int64_t* num_targets;
  int64_t batch, num_queries, num_classes, num_groups;
  const char* class_cost;    // "focal" or "focal_logsigmoid"
};

class Problems {
 public:
  explicit Problems(const Inputs& in)
      : in_(in), per_group_(in.num_queries / in.num_groups),
        row_stride_(cost::round_up(per_group_, cost::kMaxWidth)),
        classes_padded_(cost::round_up(std::max<int64_t>(in.num_classes, 1), cost::kMaxWidth)),
        valid_(in.num_targets, in.num_targets + in.batch), first_(in.batch + 1, 0) {
    for (int64_t b = 0; b < in.batch; ++b) {
      first_[b + 1] = first_[b] + valid_[b];
      max_targets_ = std::max(max_targets_, valid_[b]);
    }
  }

  // All tiles, for timing the solve alone.
  std::vector<float> all_tiles() {
    std::vector<float> tiles(in_.batch * in_.num_groups * tile_size());
    run(kCost, tiles.data(), /*one_tile=*/false, nullptr);
    return tiles;
  }

  // One pass of `part` over every problem; `tiles` is one tile (reused) or, for kSolve, all
  // of them. Returns the sum of the matched queries (a checksum the caller compares).
  int64_t run(Part part, float* tiles, bool one_tile, const std::vector<float>* solved_tiles) {
    cost::BadLabel bad;
    cost::PackedTargets targets = cost::pack_targets(
        in_.batch, std::max<int64_t>(max_targets_, 1), valid_, in_.num_classes, true,
        [&](int64_t b, int64_t m) { return in_.labels[first_[b] + m]; },
        [&](int64_t b, int64_t m, float* out4) {
          for (int k = 0; k < 4; ++k) out4[k] = in_.target_boxes[4 * (first_[b] + m) + k];
        },
        &bad);
    // GroupMatcher's defaults: class cost 2, L1 5, GIoU 2; the class term alone drops the two
    // box terms (a zero weight skips its term).
    const bool boxes = part != kClassTerm;
    const cost::CostParams params = cost::make_params(2.0, boxes ? 5.0 : 0.0, boxes ? 2.0 : 0.0,
                                                      in_.class_cost, 0.25, 2.0);
    const cost::Isa isa = cost::cost_isa();
    const cost::Predictions<float, float> pred{
        in_.logits, in_.num_queries * in_.num_classes, in_.num_classes, 1, in_.pred_boxes,
        in_.num_queries * 4, 4, 1, in_.num_queries, in_.num_classes, classes_padded_};
    const cpu::DispatchedScan scan;
    cpu::ThreadWorkspace& workspace = cpu::ThreadWorkspace::local();
    workspace.reserve(std::min(per_group_, max_targets_), std::max(per_group_, max_targets_));
    cost::BlockScratch scratch(targets.max_unique, classes_padded_, false);
    std::vector<int64_t> matched(std::max<int64_t>(max_targets_, 1));
    int64_t checksum = 0;
    for (int64_t b = 0; b < in_.batch; ++b) {
      const int64_t count = valid_[b];
      if (count == 0) continue;
      for (int64_t g = 0; g < in_.num_groups; ++g) {
        float* tile = tiles + (one_tile ? 0 : (b * in_.num_groups + g) * tile_size());
        if (part == kGather) {
          for (int64_t q0 = 0; q0 < per_group_; q0 += cost::kMaxWidth) {
            cost::gather_block(params, isa, pred, targets, b, g * per_group_ + q0,
                               std::min<int64_t>(cost::kMaxWidth, per_group_ - q0), scratch);
          }
          checksum += static_cast<int64_t>(scratch.picked[0] != 0.0f);  // keep the loads
        } else if (part != kSolve) {
          cost::problem_cost(params, isa, pred, targets, b, g * per_group_, per_group_, count,
                             scratch, tile, row_stride_);
        }
        if (part == kWhole || part == kSolve) {
          const float* cost = part == kSolve
              ? solved_tiles->data() + (b * in_.num_groups + g) * tile_size() : tile;
          cpu::solve_one(cost, 1, row_stride_, per_group_, count, count, scan, workspace,
                         matched.data());
          for (int64_t m = 0; m < count; ++m) checksum += matched[m];
        }
      }
    }
    return checksum;
  }

  int64_t tile_size() const { return std::max<int64_t>(max_targets_, 1) * row_stride_; }

 private:
  Inputs in_;
  int64_t per_group_, row_stride_, classes_padded_, max_targets_ = 0;
  std::vector<int64_t> valid_, first_;
};

}  // namespace

// Times every part `repeats` times, the parts interleaved (so a change of the machine's load
// reaches them alike), into out_ms[part * repeats + r]. Returns 0, or 1 when the whole pass and
// the solve of the stored tiles disagree (they run the same solver on the same numbers).
extern "C" int cost_breakdown(const float* logits, const float* pred_boxes, const int64_t* labels,
                              const float* target_boxes, const int64_t* num_targets,
                              int64_t batch, int64_t num_queries, int64_t num_classes,
                              int64_t num_groups, const char* class_cost, int64_t repeats,
                              double* out_ms) {
  const Inputs in{logits, pred_boxes, labels, target_boxes, num_targets,
                  batch, num_queries, num_classes, num_groups, class_cost};
  Problems problems(in);
  const std::vector<float> solved_tiles = problems.all_tiles();
  std::vector<float> tile(problems.tile_size());
  int64_t checksum[kNumParts] = {};
  for (int64_t r = -1; r < repeats; ++r) {  // r = -1: warm-up
    for (int part = 0; part < kNumParts; ++part) {
      const auto start = std::chrono::steady_clock::now();
      checksum[part] = problems.run(static_cast<Part>(part), tile.data(), true, &solved_tiles);
      const std::chrono::duration<double, std::milli> took =
          std::chrono::steady_clock::now() - start;
      if (r >= 0) out_ms[part * repeats + r] = took.count();
    }
  }
  return checksum[kWhole] == checksum[kSolve] ? 0 : 1;
}
