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
// the next column, is a policy (`ColumnScan`): SerialScan below (the portable reference), the
// AVX2 scan in cpu_solver.h (DispatchedScan picks it at run time), the warp-parallel scan for
// CUDA in warp_scan.h. Everything else is the sequential bookkeeping shared by all of them.
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
  acc_t* dist;            // [nc] shortest path cost to each column in this augmentation;
                          //      -inf once the column is on the shortest path tree
  int32_t* path;          // [nc] predecessor row of each column
  int32_t* col4row;       // [nr]
  int32_t* row4col;       // [nc]
  int32_t* remaining;     // [nc] unvisited columns in scipy's scan order
  int32_t* position;      // [nc] inverse of `remaining`, for the tie rule
  int32_t* visited_rows;  // [nr] rows on the tree, in visiting order (the first is the free row)
  int32_t* visited_cols;  // [nr] columns on the tree, in visiting order
  int32_t* visited_pos;   // [nr] scan position each visited column was removed from
  acc_t* visited_dist;    // [nr] distance of each visited column when it joined the tree
};

// Marking tree columns with dist = -inf instead of a separate flag array keeps the scan to one
// array of one type: `r < -inf` never holds, so they are never relaxed, and a `> -inf` test
// drops them from the minimum.
template <typename acc_t>
LSA_HD inline bool on_tree(acc_t dist) {
  return dist == -infinity<acc_t>();
}

// Picks the next column among those at distance `lowest` (tree columns never compare equal).
// Continuous costs have one such column; integer costs can have many, and the tie rule decides.
template <typename acc_t>
LSA_HD inline Candidate<acc_t> pick_serial(const Workspace<acc_t>& ws, int32_t nc, acc_t lowest) {
  Candidate<acc_t> best{lowest, -1, 0, false};
  if (!(lowest < infinity<acc_t>())) return best;
  for (int32_t j = 0; j < nc; ++j) {
    if (ws.dist[j] != lowest) continue;
    const Candidate<acc_t> c{lowest, j, ws.position[j], ws.row4col[j] < 0};
    if (precedes(c, best)) best = c;
  }
  return best;
}

// Relaxes all columns not on the tree from row i and returns the next column, serially.
// `first` is the first step of an augmentation: every distance is stale then (nothing was reset
// after the previous augmentation) and is overwritten; with min_val = 0 the value is scipy's
// `0 + c - u - v`. A column left at +inf keeps a stale path entry, which is never read because
// only columns at finite distance join the tree. The arithmetic per column is scipy's, term for
// term, so distances are bit-identical.
struct SerialScan {
  template <typename acc_t>
  LSA_HD Candidate<acc_t> operator()(const Workspace<acc_t>& ws, int32_t nc, int32_t i,
                                     acc_t min_val, bool first) const {
    const acc_t* cost_row = ws.cost + static_cast<int64_t>(i) * nc;
    const acc_t u_i = ws.u[i];
    const acc_t inf = infinity<acc_t>();
    acc_t* __restrict__ dist = ws.dist;
    int32_t* __restrict__ path = ws.path;
    const acc_t* __restrict__ v = ws.v;
    acc_t lowest = inf;
    if (first) {
      for (int32_t j = 0; j < nc; ++j) {
        const acc_t r = cost_row[j] - u_i - v[j];
        dist[j] = r;
        path[j] = i;
        lowest = r < lowest ? r : lowest;
      }
    } else {
      for (int32_t j = 0; j < nc; ++j) {
        const acc_t r = min_val + cost_row[j] - u_i - v[j];
        const bool take = r < dist[j];
        dist[j] = take ? r : dist[j];
        path[j] = take ? i : path[j];
        const acc_t open = on_tree(dist[j]) ? inf : dist[j];
        lowest = open < lowest ? open : lowest;
      }
    }
    return pick_serial(ws, nc, lowest);
  }
};

// The lanes that run solve(). A CPU scan runs on one thread: SingleLane, and solve() is plain
// sequential code (every hook below compiles away). The warp scan (warp_scan.h) runs on the 32
// lanes of a warp, each executing solve(): the loops that initialise the per-column arrays are
// spread over the lanes, the sequential bookkeeping is computed by every lane (so the control
// flow stays uniform) but written to memory by the leader lane alone, and `sync()` (__syncwarp)
// orders the memory between the phases. A scan declares its lanes as a member type `Lanes`.
struct SingleLane {
  LSA_HD static constexpr int32_t count() { return 1; }
  LSA_HD static constexpr bool leader() { return true; }
  LSA_HD static void sync() {}
  template <typename F>
  LSA_HD void for_each(F&& f) const {
    f(int32_t(0));
  }
};

template <typename...>
struct make_void {
  using type = void;
};
template <typename Scan, typename = void>
struct ScanLanes {
  using type = SingleLane;
};
template <typename Scan>
struct ScanLanes<Scan, typename make_void<typename Scan::Lanes>::type> {
  using type = typename Scan::Lanes;
};

// Solves one problem whose shifted cost is in ws.cost (or wherever the scan reads it). On kOk, ws.col4row[r] is the column
// assigned to row r (every row is assigned since nr <= nc).
//
// Per augmentation only the columns that joined the tree are touched outside the scans: the
// scan order is restored by undoing its removals and the distances are overwritten by the next
// first scan, so an augmentation costs (number of scans) x nc, not an extra reset of nc.
template <typename acc_t, typename ColumnScan>
LSA_HD Status solve(int32_t nr, int32_t nc, const Workspace<acc_t>& ws, const ColumnScan& scan) {
  const typename ScanLanes<ColumnScan>::type lanes{};
  const int32_t stride = lanes.count();
  lanes.for_each([&](int32_t lane) {
    for (int32_t r = lane; r < nr; r += stride) {
      ws.u[r] = 0;
      ws.col4row[r] = -1;
    }
    // scipy fills its scan order in reverse so that a constant matrix yields the identity.
    for (int32_t j = lane; j < nc; j += stride) {
      ws.v[j] = 0;
      ws.row4col[j] = -1;
      ws.remaining[j] = nc - 1 - j;
      ws.position[nc - 1 - j] = j;
    }
  });
  for (int32_t cur_row = 0; cur_row < nr; ++cur_row) {
    int32_t num_remaining = nc;
    int32_t num_visited = 0;
    acc_t min_val = 0;
    int32_t i = cur_row;
    int32_t sink = -1;
    while (sink < 0) {
      if (lanes.leader()) ws.visited_rows[num_visited] = i;
      lanes.sync();  // the leader's writes (and the initialisation) before the lanes scan
      const Candidate<acc_t> next = scan(ws, nc, i, min_val, num_visited == 0);
      // Every lane reads the row matched to the chosen column before the sync below: past it,
      // the leader may already be rewriting row4col in the augmentation.
      const int32_t matched_row = next.col < 0 ? -1 : ws.row4col[next.col];
      lanes.sync();  // every lane's dist/path writes before the leader reads or overwrites them
      if (next.col < 0) return kInfeasible;
      min_val = next.dist;
      const int32_t j = next.col;
      if (lanes.leader()) {
        ws.visited_cols[num_visited] = j;
        ws.visited_pos[num_visited] = next.pos;
        ws.visited_dist[num_visited] = next.dist;
        ws.dist[j] = -infinity<acc_t>();
        // scipy removes the column by moving the last one into its slot; mirror it exactly.
        const int32_t last = ws.remaining[num_remaining - 1];
        ws.remaining[next.pos] = last;
        ws.position[last] = next.pos;
      }
      ++num_visited;
      --num_remaining;
      if (matched_row < 0) {
        sink = j;
      } else {
        i = matched_row;
      }
    }
    if (lanes.leader()) {
      // Dual updates, scipy's: visited row k > 0 was reached through visited column k - 1.
      ws.u[cur_row] += min_val;
      for (int32_t k = 1; k < num_visited; ++k) {
        ws.u[ws.visited_rows[k]] += min_val - ws.visited_dist[k - 1];
      }
      for (int32_t k = 0; k < num_visited; ++k) {
        ws.v[ws.visited_cols[k]] -= min_val - ws.visited_dist[k];
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
      // Undo the removals newest first; slot `num_remaining` still holds the column that was
      // moved out of it, since later removals only write below their own count.
      for (int32_t k = num_visited - 1; k >= 0; --k) {
        const int32_t slot = num_remaining++;
        const int32_t moved = ws.remaining[slot];
        const int32_t col = ws.visited_cols[k];
        const int32_t pos = ws.visited_pos[k];
        ws.position[moved] = slot;
        ws.remaining[pos] = col;
        ws.position[col] = pos;
      }
    }
  }
  lanes.sync();  // col4row for every lane
  return kOk;
}

}  // namespace lsa
}  // namespace group_detr
