// The shortest augmenting path solver for one rectangular assignment problem, written once for
// the CPU and CUDA builds.
//
// This is the algorithm scipy's linear_sum_assignment uses (Crouse 2016, Jonker-Volgenant
// style), reproduced operation for operation in the accumulation type: same cost shift, same
// scan order over unvisited columns, same tie rule, same dual updates. With acc_t = double the
// assignments are therefore identical to scipy's, ties included, not merely of equal cost.
//
// The problem is nr rows x nc columns with nr <= nc. The caller decides the orientation (scipy
// transposes when there are more rows than columns, so do we) and provides all memory: nothing
// here allocates or uses the STL, so the same code compiles under nvcc as __host__ __device__.
//
// The only data-parallel step, relaxing every unvisited column from the current row and picking
// the next column, is a policy (`ColumnScan`): SerialScan below for the CPU; a warp-parallel
// scan for CUDA. Everything else is the sequential bookkeeping shared by both.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LSA_HD __host__ __device__
#else
#define LSA_HD
#endif

namespace group_detr {
namespace lsa {

enum Status : int32_t {
  kOk = 0,
  kInvalidEntry = 1,   // NaN or -inf in the cost
  kInfeasible = 2,     // no complete assignment with finite cost
  kBadNumTargets = 3,  // num_targets outside [0, T]
};

template <typename acc_t>
LSA_HD inline acc_t infinity() {
  return acc_t(1) / acc_t(0);  // constexpr-free +inf that nvcc and gcc both accept
}

// The next column of a Dijkstra step, ordered exactly as scipy's sequential scan picks it:
// smallest distance first; among equal distances an unmatched column (it ends the augmenting
// path), the last such one in scan order; among matched ones the first in scan order.
template <typename acc_t>
struct Candidate {
  acc_t dist;
  int32_t col;        // -1: none
  int32_t pos;        // position in the scan order (scipy's `remaining` array)
  bool unmatched;
};

template <typename acc_t>
LSA_HD inline bool precedes(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  if (a.col < 0 || b.col < 0) return b.col < 0 && a.col >= 0;
  if (a.dist != b.dist) return a.dist < b.dist;
  if (a.unmatched != b.unmatched) return a.unmatched;
  return a.unmatched ? a.pos > b.pos : a.pos < b.pos;
}

// Caller-provided memory for one problem (sizes in brackets).
template <typename acc_t>
struct Workspace {
  const acc_t* cost;      // [nr * nc] row-major, shifted so that its minimum is 0
  acc_t* u;               // [nr] row duals
  acc_t* v;               // [nc] column duals
  acc_t* dist;            // [nc] shortest path cost to each column in this augmentation
  int32_t* path;          // [nc] predecessor row of each column
  int32_t* col4row;       // [nr]
  int32_t* row4col;       // [nc]
  int32_t* remaining;     // [nc] unvisited columns in scipy's scan order
  int32_t* position;      // [nc] inverse of `remaining`, for the tie rule
  int32_t* visited_rows;  // [nr]
  int32_t* visited_cols;  // [nc]
  uint8_t* col_done;      // [nc] column already on the shortest path tree
};

// Relaxes all unvisited columns from row i and returns the next column, serially.
// Two passes so that the first (the hot one) is branch-free and vectorises; the second only
// compares. The arithmetic per column is scipy's, term for term.
struct SerialScan {
  template <typename acc_t>
  LSA_HD Candidate<acc_t> operator()(const Workspace<acc_t>& ws, int32_t nc, int32_t i,
                                     acc_t min_val) const {
    const acc_t* cost_row = ws.cost + static_cast<int64_t>(i) * nc;
    const acc_t u_i = ws.u[i];
    const acc_t inf = infinity<acc_t>();
    acc_t* __restrict__ dist = ws.dist;
    int32_t* __restrict__ path = ws.path;
    const acc_t* __restrict__ v = ws.v;
    const uint8_t* __restrict__ done = ws.col_done;
    acc_t lowest = inf;
#if defined(_OPENMP)
#pragma omp simd reduction(min : lowest)
#endif
    for (int32_t j = 0; j < nc; ++j) {
      const acc_t r = min_val + cost_row[j] - u_i - v[j];
      const bool take = !done[j] && r < dist[j];
      dist[j] = take ? r : dist[j];
      path[j] = take ? i : path[j];
      const acc_t d = done[j] ? inf : dist[j];
      lowest = d < lowest ? d : lowest;
    }
    Candidate<acc_t> best{inf, -1, 0, false};
    if (!(lowest < inf)) return best;
    for (int32_t j = 0; j < nc; ++j) {
      if (done[j] || dist[j] != lowest) continue;
      Candidate<acc_t> c{lowest, j, ws.position[j], ws.row4col[j] < 0};
      if (precedes(c, best)) best = c;
    }
    return best;
  }
};

// Solves one problem whose shifted cost is in ws.cost. On kOk, ws.col4row[r] is the column
// assigned to row r (every row is assigned since nr <= nc).
template <typename acc_t, typename ColumnScan>
LSA_HD Status solve(int32_t nr, int32_t nc, const Workspace<acc_t>& ws, const ColumnScan& scan) {
  const acc_t inf = infinity<acc_t>();
  for (int32_t r = 0; r < nr; ++r) {
    ws.u[r] = 0;
    ws.col4row[r] = -1;
  }
  for (int32_t j = 0; j < nc; ++j) {
    ws.v[j] = 0;
    ws.row4col[j] = -1;
    ws.path[j] = -1;
  }
  for (int32_t cur_row = 0; cur_row < nr; ++cur_row) {
    // scipy fills its scan order in reverse so that a constant matrix yields the identity.
    for (int32_t j = 0; j < nc; ++j) {
      ws.dist[j] = inf;
      ws.col_done[j] = 0;
      ws.remaining[j] = nc - 1 - j;
      ws.position[nc - 1 - j] = j;
    }
    int32_t num_remaining = nc;
    int32_t num_visited_rows = 0;
    int32_t num_visited_cols = 0;
    acc_t min_val = 0;
    int32_t i = cur_row;
    int32_t sink = -1;
    while (sink < 0) {
      ws.visited_rows[num_visited_rows++] = i;
      const Candidate<acc_t> next = scan(ws, nc, i, min_val);
      if (next.col < 0) return kInfeasible;
      min_val = next.dist;
      const int32_t j = next.col;
      if (ws.row4col[j] < 0) {
        sink = j;
      } else {
        i = ws.row4col[j];
      }
      ws.col_done[j] = 1;
      ws.visited_cols[num_visited_cols++] = j;
      // scipy removes the column by moving the last one into its slot; mirror it exactly.
      const int32_t last = ws.remaining[--num_remaining];
      ws.remaining[next.pos] = last;
      ws.position[last] = next.pos;
    }
    ws.u[cur_row] += min_val;
    for (int32_t k = 1; k < num_visited_rows; ++k) {
      const int32_t r = ws.visited_rows[k];
      ws.u[r] += min_val - ws.dist[ws.col4row[r]];
    }
    for (int32_t k = 0; k < num_visited_cols; ++k) {
      const int32_t j = ws.visited_cols[k];
      ws.v[j] -= min_val - ws.dist[j];
    }
    int32_t j = sink;
    while (true) {
      const int32_t r = ws.path[j];
      ws.row4col[j] = r;
      const int32_t previous = ws.col4row[r];
      ws.col4row[r] = j;
      j = previous;
      if (r == cur_row) break;
    }
  }
  return kOk;
}

}  // namespace lsa
}  // namespace group_detr
