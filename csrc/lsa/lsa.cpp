// The op schemas shared by the CPU and CUDA implementations, and the module that loads them.
#include <Python.h>
#include <torch/library.h>

// Returns (matched_query (P, T) int64, status (P,) int32): for each valid target column the query
// assigned to it, -1 for padding and unmatched targets; status per problem (solver.h: Status).
TORCH_LIBRARY(group_detr, m) {
  m.def("batched_lsa(Tensor cost, Tensor num_targets) -> (Tensor, Tensor)");
  // The CUDA solver's warp-parallel code with emulated lanes, on the CPU (tests only).
  m.def(
      "batched_lsa_warp_emulated(Tensor cost, Tensor num_targets, bool reverse_lanes=False, "
      "bool stage=False) -> (Tensor, Tensor)");
  // DETR's matching cost (B, Q, M) from logits (B, Q, C), boxes (B, Q, 4) cxcywh and padded
  // targets: labels (B, M) int64, boxes (B, M, 4) cxcywh; with num_targets (B ints) only the
  // first num_targets[b] columns of image b are computed, the rest are 0
  // (csrc/cost/match_cost_cpu.cpp).
  m.def(
      "match_cost(Tensor logits, Tensor pred_boxes, Tensor labels, Tensor target_boxes, "
      "float cost_class, float cost_bbox, float cost_giou, str class_cost, float focal_alpha, "
      "float focal_gamma, int[]? num_targets=None) -> Tensor");
  // GroupMatcher's CPU path in one op (csrc/cost/group_match_cpu.cpp): the cost of every
  // (image, group) problem and its assignment, from logits (B, K*N, C), boxes (B, K*N, 4) and
  // each image's targets, labels (M_b,) int64 and boxes (M_b, 4), as DETR's target dicts hold
  // them. Returns DETR's pairs per image (K * min(N, M_b) in ascending query order): query_idx
  // and target_idx, B int64 tensors each, and the status (B*K,) int32 of each problem b*K + g
  // (solver.h: Status).
  m.def(
      "group_match(Tensor logits, Tensor pred_boxes, Tensor[] labels, Tensor[] target_boxes, "
      "int num_groups, float cost_class, float cost_bbox, float cost_giou, str class_cost, "
      "float focal_alpha, float focal_gamma, bool validate) -> (Tensor[], Tensor[], Tensor)");
}

// Importing group_detr._C runs the static registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
