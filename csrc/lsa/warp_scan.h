// The warp-parallel column scan and the per-problem driver of the CUDA solver, written once for
// the GPU and for its CPU emulation.
//
// One warp solves one problem. Column j belongs to lane j % 32; a scan relaxes each lane's
// columns, keeps the lane's best candidate under `precedes` (solver.h) and reduces the 32
// candidates with a butterfly of shuffles. `precedes` is a lexicographic total order on distinct
// columns, so the reduction's result does not depend on its order: the warp picks exactly the
// column scipy's (and the CPU solver's) sequential scan picks, ties included. The rest of the
// algorithm is `lsa::solve()` itself, which runs on every lane (see SingleLane in solver.h for
// the leader-writes / sync contract).
//
// The lanes are a policy:
//   CudaLanes      the 32 threads of a warp (__shfl_xor_sync, __syncwarp); nvcc only.
//   EmulatedLanes  one CPU thread that loops over the 32 lanes between the warp-level steps, so
//                  the CPU tests run this very code (the op batched_lsa_warp_emulated).
// A per-lane value is `Lanes::PerLane<T>`: a register on the GPU, an array of 32 in emulation.
//
// Plain C++17 without the STL or torch: nvcc compiles this header on its own.
#pragma once

#include <cstdint>

#include "lsa/solver.h"

namespace group_detr {
namespace lsa {

constexpr int32_t kWarpSize = 32;

#if defined(__CUDACC__)
// The threads of one warp. The host side of the LSA_HD members is never called; it exists so
// that lsa::solve() (a host-device template) may be instantiated with these lanes.
struct CudaLanes {
  template <typename T>
  struct PerLane {
    T value;
    LSA_HD T& operator[](int32_t) { return value; }
    LSA_HD const T& operator[](int32_t) const { return value; }
  };

  LSA_HD static int32_t lane_id() {
#if defined(__CUDA_ARCH__)
    return static_cast<int32_t>(threadIdx.x) & (kWarpSize - 1);
#else
    return 0;
#endif
  }
  LSA_HD static constexpr int32_t count() { return kWarpSize; }
  LSA_HD static bool leader() { return lane_id() == 0; }
  LSA_HD static void sync() {
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  template <typename F>
  LSA_HD void for_each(F&& f) const {
    f(lane_id());
  }

  LSA_HD static double shfl_xor(double x, int32_t offset) {
#if defined(__CUDA_ARCH__)
    return __shfl_xor_sync(0xffffffffu, x, offset);
#else
    return x;
#endif
  }
  LSA_HD static int32_t shfl_xor(int32_t x, int32_t offset) {
#if defined(__CUDA_ARCH__)
    return __shfl_xor_sync(0xffffffffu, x, offset);
#else
    return x;
#endif
  }
  LSA_HD static bool shfl_xor(bool x, int32_t offset) {
    return shfl_xor(static_cast<int32_t>(x), offset) != 0;
  }
  template <typename acc_t>
  LSA_HD static Candidate<acc_t> shfl_xor(const Candidate<acc_t>& c, int32_t offset) {
    return {shfl_xor(c.dist, offset), shfl_xor(c.col, offset), shfl_xor(c.pos, offset),
            shfl_xor(c.unmatched, offset)};
  }
  // Lane l receives lane (l ^ offset)'s value.
  template <typename T>
  LSA_HD PerLane<T> exchange(const PerLane<T>& x, int32_t offset) const {
    return {shfl_xor(x.value, offset)};
  }
  // A value that every lane holds after a butterfly reduction.
  template <typename T>
  LSA_HD T uniform(const PerLane<T>& x) const {
    return x.value;
  }
};
#endif

// The warp on one CPU thread: each warp-level step loops over the 32 lanes. kReverse visits the
// lanes in the opposite order, which changes the result if some step wrongly lets one lane
// read what another lane writes in the same step (a race on the GPU).
template <bool kReverse = false>
struct EmulatedLanes {
  template <typename T>
  struct PerLane {
    T value[kWarpSize];
    T& operator[](int32_t lane) { return value[lane]; }
    const T& operator[](int32_t lane) const { return value[lane]; }
  };

  static constexpr int32_t count() { return kWarpSize; }
  // solve() runs once, on behalf of all lanes: its sequential part is the leader's.
  static constexpr bool leader() { return true; }
  static void sync() {}
  template <typename F>
  void for_each(F&& f) const {
    for (int32_t k = 0; k < kWarpSize; ++k) f(kReverse ? kWarpSize - 1 - k : k);
  }
  template <typename T>
  PerLane<T> exchange(const PerLane<T>& x, int32_t offset) const {
    PerLane<T> out;
    for (int32_t lane = 0; lane < kWarpSize; ++lane) out[lane] = x[lane ^ offset];
    return out;
  }
  template <typename T>
  T uniform(const PerLane<T>& x) const {
    return x[0];
  }
};

// Butterfly reduction: afterwards every lane holds the combination of all 32 values.
template <typename Lanes, typename T, typename Better>
LSA_HD void warp_reduce(const Lanes& lanes, typename Lanes::template PerLane<T>& value,
                        Better better) {
  for (int32_t offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const typename Lanes::template PerLane<T> other = lanes.exchange(value, offset);
    lanes.for_each([&](int32_t lane) {
      if (better(other[lane], value[lane])) value[lane] = other[lane];
    });
  }
}

// Entry (i, j) of a problem's cost, shifted by the problem's minimum like cpu_solver.h's
// prepare_cost: static_cast<double>(x) - shift, the same two IEEE operations, so the values are
// bit-identical to the CPU solver's. `base` is the strided tensor in global memory or the copy
// staged in shared memory.
template <typename scalar_t>
struct StridedCost {
  const scalar_t* base;
  int64_t row_stride;
  int64_t col_stride;
  double shift;

  LSA_HD double operator()(int32_t i, int32_t j) const {
    return static_cast<double>(base[i * row_stride + j * col_stride]) - shift;
  }
};

// The column scan of lsa::solve() on a warp: SerialScan's arithmetic per column, term for term,
// each lane over its own columns, then the warp argmin under `precedes`.
template <typename LanesT, typename CostView>
struct WarpScan {
  using Lanes = LanesT;
  CostView cost;

  template <typename acc_t>
  LSA_HD Candidate<acc_t> operator()(const Workspace<acc_t>& ws, int32_t nc, int32_t i,
                                     acc_t min_val, bool first) const {
    const Lanes lanes{};
    const acc_t inf = infinity<acc_t>();
    const acc_t u_i = ws.u[i];
    typename Lanes::template PerLane<Candidate<acc_t>> best;
    lanes.for_each([&](int32_t lane) {
      Candidate<acc_t> mine{inf, -1, 0, false};
      for (int32_t j = lane; j < nc; j += kWarpSize) {
        acc_t d;
        if (first) {  // every distance is stale: overwrite (scipy's 0 + c - u - v)
          d = cost(i, j) - u_i - ws.v[j];
          ws.dist[j] = d;
          ws.path[j] = i;
        } else {
          const acc_t r = min_val + cost(i, j) - u_i - ws.v[j];
          d = ws.dist[j];
          if (r < d) {  // never true for tree columns (-inf)
            d = r;
            ws.dist[j] = r;
            ws.path[j] = i;
          }
          if (on_tree(d)) continue;
        }
        // The tie rule needs the scan position and the match only when d can win.
        if (d <= mine.dist && d < inf) {
          const Candidate<acc_t> c{d, j, ws.position[j], ws.row4col[j] < 0};
          if (precedes(c, mine)) mine = c;
        }
      }
      best[lane] = mine;
    });
    warp_reduce<Lanes, Candidate<acc_t>>(
        lanes, best,
        [](const Candidate<acc_t>& a, const Candidate<acc_t>& b) { return precedes(a, b); });
    return lanes.uniform(best);
  }
};

// Per-problem memory of the warp solver, carved from one buffer (shared memory on the GPU).
// Sized for the largest problem of a batch: rows <= max_rows, columns <= max_cols.
LSA_HD inline int64_t warp_workspace_bytes(int64_t max_rows, int64_t max_cols) {
  const int64_t doubles = 2 * max_rows + 2 * max_cols;  // u, visited_dist; v, dist
  const int64_t ints = 4 * max_rows + 4 * max_cols;     // col4row, visited x3; path, row4col,
                                                        // remaining, position
  return (doubles * 8 + ints * 4 + 15) / 16 * 16;
}

LSA_HD inline Workspace<double> carve_workspace(unsigned char* memory, int64_t max_rows,
                                                int64_t max_cols) {
  double* d = reinterpret_cast<double*>(memory);
  Workspace<double> ws;
  ws.cost = nullptr;  // the warp scan reads the cost through its CostView
  ws.u = d;
  ws.visited_dist = d + max_rows;
  ws.v = d + 2 * max_rows;
  ws.dist = d + 2 * max_rows + max_cols;
  int32_t* n = reinterpret_cast<int32_t*>(d + 2 * max_rows + 2 * max_cols);
  ws.col4row = n;
  ws.visited_rows = n + max_rows;
  ws.visited_cols = n + 2 * max_rows;
  ws.visited_pos = n + 3 * max_rows;
  ws.path = n + 4 * max_rows;
  ws.row4col = n + 4 * max_rows + max_cols;
  ws.remaining = n + 4 * max_rows + 2 * max_cols;
  ws.position = n + 4 * max_rows + 3 * max_cols;
  return ws;
}

// The checks and the shift of cpu_solver.h's prepare_cost, lane-parallel: NaN or -inf ->
// kInvalidEntry, every entry +inf -> kInfeasible, else the minimum entry (in double) in *shift.
// With `stage` given, the nr x nc entries are also copied there row-major (the caller then reads
// the cost from the copy). Ends with a sync.
template <typename Lanes, typename scalar_t>
LSA_HD Status warp_prepare(const Lanes& lanes, const scalar_t* cost, int64_t row_stride,
                           int64_t col_stride, int32_t nr, int32_t nc, scalar_t* stage,
                           double* shift) {
  const double inf = infinity<double>();
  typename Lanes::template PerLane<double> low;
  typename Lanes::template PerLane<int32_t> invalid;
  lanes.for_each([&](int32_t lane) {
    double mine = inf;
    int32_t bad = 0;
    for (int32_t i = 0; i < nr; ++i) {
      for (int32_t j = lane; j < nc; j += kWarpSize) {
        const scalar_t raw = cost[i * row_stride + j * col_stride];
        if (stage != nullptr) stage[static_cast<int64_t>(i) * nc + j] = raw;
        const double x = static_cast<double>(raw);
        bad |= (x != x || x == -inf) ? 1 : 0;
        mine = x < mine ? x : mine;
      }
    }
    low[lane] = mine;
    invalid[lane] = bad;
  });
  warp_reduce<Lanes, double>(lanes, low, [](double a, double b) { return a < b; });
  warp_reduce<Lanes, int32_t>(lanes, invalid, [](int32_t a, int32_t b) { return a > b; });
  lanes.sync();  // the staged copy for every lane
  if (lanes.uniform(invalid) != 0) return kInvalidEntry;
  const double min_entry = lanes.uniform(low);
  if (!(min_entry < inf)) return kInfeasible;  // every pair forbidden
  *shift = min_entry;
  return kOk;
}

// One problem, from its strided (Q x T) cost to out[T] (the query of each target column, -1 for
// padding and unmatched targets): cpu_solver.h's solve_one on a warp. `memory` holds
// warp_workspace_bytes(max_rows, max_cols); `stage`, if not null, room for the problem's
// entries (max_rows * max_cols scalars). Every lane returns the same status.
template <typename Lanes, typename scalar_t>
LSA_HD Status warp_solve_one(const Lanes& lanes, const scalar_t* cost, int64_t stride_q,
                             int64_t stride_t, int32_t num_queries, int64_t num_targets,
                             int32_t num_cols, unsigned char* memory, int32_t max_rows,
                             int32_t max_cols, scalar_t* stage, int64_t* out) {
  lanes.for_each([&](int32_t lane) {
    for (int32_t k = lane; k < num_cols; k += kWarpSize) out[k] = -1;
  });
  lanes.sync();  // the -1s before any lane writes an assignment
  if (num_targets < 0 || num_targets > num_cols) return kBadNumTargets;
  if (num_targets == 0 || num_queries == 0) return kOk;

  // Like scipy: rows are the smaller side (targets when there are more queries).
  const bool targets_are_rows = num_queries > num_targets;
  const int32_t nr = targets_are_rows ? static_cast<int32_t>(num_targets) : num_queries;
  const int32_t nc = targets_are_rows ? num_queries : static_cast<int32_t>(num_targets);
  const int64_t row_stride = targets_are_rows ? stride_t : stride_q;
  const int64_t col_stride = targets_are_rows ? stride_q : stride_t;

  StridedCost<scalar_t> view{cost, row_stride, col_stride, 0.0};
  const Status prepared =
      warp_prepare(lanes, cost, row_stride, col_stride, nr, nc, stage, &view.shift);
  if (prepared != kOk) return prepared;
  if (stage != nullptr) view = {stage, nc, 1, view.shift};

  const Workspace<double> ws = carve_workspace(memory, max_rows, max_cols);
  const WarpScan<Lanes, StridedCost<scalar_t>> scan{view};
  const Status status = solve(nr, nc, ws, scan);  // ends with a sync
  if (status != kOk) return status;
  lanes.for_each([&](int32_t lane) {
    for (int32_t r = lane; r < nr; r += kWarpSize) {
      if (targets_are_rows) {
        out[r] = ws.col4row[r];
      } else {
        out[ws.col4row[r]] = r;
      }
    }
  });
  return kOk;
}

}  // namespace lsa
}  // namespace group_detr
