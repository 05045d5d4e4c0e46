// The CUDA batched solver without torch: the kernel and its host launcher, on raw pointers and a
// stream. nvcc compiles this header on its own (tests/test_lsa_cuda.py does, for sm_80 and
// sm_90), so CI proves the kernel compiles on machines whose torch has no CUDA.
//
// One warp per problem, several problems per block. The warp runs warp_scan.h's warp_solve_one:
// lsa::solve() from solver.h with the warp-parallel column scan, i.e. the same template the CPU
// tests run with emulated lanes. Per-warp memory (duals, distances, path, scan order) lives in
// shared memory, and so does a copy of the problem's cost when it fits (it is read once per
// scan otherwise, from the strided tensor through L1/L2); problems too large for shared memory
// use a global scratch buffer the caller provides. Errors are written as a status per problem
// (lsa::Status), never raised on the device; nothing here synchronises with the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lsa/warp_scan.h"

namespace group_detr {
namespace lsa_cuda {

constexpr int64_t kAlign = 16;

inline int64_t round_up(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

template <typename scalar_t>
__global__ void __launch_bounds__(128) batched_lsa_kernel(
    const scalar_t* __restrict__ cost, int64_t stride_p, int64_t stride_q, int64_t stride_t,
    int64_t num_problems, int32_t num_queries, int32_t num_cols,
    const int64_t* __restrict__ num_targets, int64_t* __restrict__ matched,
    int32_t* __restrict__ status, int32_t max_rows, int32_t max_cols, int64_t workspace_bytes,
    int64_t per_warp_bytes, bool stage, unsigned char* __restrict__ scratch) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int32_t warp = static_cast<int32_t>(threadIdx.x) / lsa::kWarpSize;
  const int64_t warps_per_block = blockDim.x / lsa::kWarpSize;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * warps_per_block + warp;
  if (p >= num_problems) return;  // the whole warp leaves together
  unsigned char* memory =
      scratch != nullptr ? scratch + p * per_warp_bytes : shared + warp * per_warp_bytes;
  scalar_t* staged = stage ? reinterpret_cast<scalar_t*>(memory + workspace_bytes) : nullptr;
  const lsa::CudaLanes lanes{};
  const lsa::Status result = lsa::warp_solve_one(
      lanes, cost + p * stride_p, stride_q, stride_t, num_queries, num_targets[p], num_cols,
      memory, max_rows, max_cols, staged, matched + p * num_cols);
  if (lanes.leader()) status[p] = static_cast<int32_t>(result);
}

// How a batch is launched; from plan_launch, which only reads (cached) device attributes.
struct LaunchPlan {
  int32_t warps_per_block = 1;
  int64_t blocks = 0;
  int64_t workspace_bytes = 0;   // lsa workspace per problem
  int64_t per_warp_bytes = 0;    // workspace (+ staged cost) per warp
  int64_t shared_bytes = 0;      // dynamic shared memory per block (0: global scratch)
  bool stage = false;            // cost copied to shared memory
  int64_t scratch_bytes = 0;     // global scratch the caller must provide (0: none)
};

struct DeviceLimits {
  int num_sms = 0;
  int shared_per_block_optin = 0;
  int shared_per_sm = 0;
};

inline cudaError_t device_limits(int device, DeviceLimits* limits) {
  constexpr int kMaxDevices = 64;
  static DeviceLimits cache[kMaxDevices];  // benign race: every writer stores the same values
  if (device >= 0 && device < kMaxDevices && cache[device].num_sms > 0) {
    *limits = cache[device];
    return cudaSuccess;
  }
  DeviceLimits l;
  cudaError_t err = cudaDeviceGetAttribute(&l.num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&l.shared_per_block_optin,
                                 cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&l.shared_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                 device);
  }
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kMaxDevices) cache[device] = l;
  *limits = l;
  return cudaSuccess;
}

// stage_mode: -1 auto (stage the cost when that still leaves enough warps per SM), 0 never,
// 1 whenever it fits.
template <typename scalar_t>
cudaError_t plan_launch(int device, int64_t num_problems, int32_t num_queries, int32_t num_cols,
                        int stage_mode, LaunchPlan* plan) {
  DeviceLimits limits;
  const cudaError_t err = device_limits(device, &limits);
  if (err != cudaSuccess) return err;
  const int64_t max_rows = num_queries < num_cols ? num_queries : num_cols;
  const int64_t max_cols = num_queries < num_cols ? num_cols : num_queries;
  LaunchPlan out;
  out.workspace_bytes = round_up(lsa::warp_workspace_bytes(max_rows, max_cols));
  if (out.workspace_bytes < kAlign) out.workspace_bytes = kAlign;  // an empty problem
  const int64_t staged_bytes =
      out.workspace_bytes + round_up(max_rows * max_cols * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t optin = limits.shared_per_block_optin;
  if (stage_mode != 0 && staged_bytes <= optin) {
    const int64_t warps_per_sm = limits.shared_per_sm / staged_bytes;
    out.stage = stage_mode == 1 || warps_per_sm >= 4 ||
                warps_per_sm * limits.num_sms >= num_problems;
  }
  out.per_warp_bytes = out.stage ? staged_bytes : out.workspace_bytes;
  if (out.per_warp_bytes > optin) {  // too large for shared memory: global scratch
    out.warps_per_block = 4;
    out.shared_bytes = 0;
    out.scratch_bytes = num_problems * out.per_warp_bytes;
  } else {
    int64_t warps = optin / out.per_warp_bytes;
    warps = warps < 4 ? warps : 4;
    // Few problems: fewer warps per block, so that the blocks spread over the SMs.
    while (warps > 1 && (num_problems + warps - 1) / warps < limits.num_sms) warps /= 2;
    out.warps_per_block = static_cast<int32_t>(warps);
    out.shared_bytes = warps * out.per_warp_bytes;
  }
  out.blocks = (num_problems + out.warps_per_block - 1) / out.warps_per_block;
  *plan = out;
  return cudaSuccess;
}

// Launches the kernel for all problems of a (P, Q, T) strided cost. num_targets: (P,) int64 on
// the device; matched: (P, T) int64 contiguous; status: (P,) int32. scratch: plan.scratch_bytes
// of device memory when that is not 0. Returns the launch error, if any (no synchronisation).
template <typename scalar_t>
cudaError_t launch_batched_lsa(const LaunchPlan& plan, const scalar_t* cost, int64_t stride_p,
                               int64_t stride_q, int64_t stride_t, int64_t num_problems,
                               int32_t num_queries, int32_t num_cols, const int64_t* num_targets,
                               int64_t* matched, int32_t* status, unsigned char* scratch,
                               cudaStream_t stream) {
  if (num_problems == 0) return cudaSuccess;
  if (plan.shared_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(batched_lsa_kernel<scalar_t>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(plan.shared_bytes));
    if (err != cudaSuccess) return err;
  }
  const int32_t max_rows = num_queries < num_cols ? num_queries : num_cols;
  const int32_t max_cols = num_queries < num_cols ? num_cols : num_queries;
  batched_lsa_kernel<scalar_t>
      <<<static_cast<unsigned int>(plan.blocks), plan.warps_per_block * lsa::kWarpSize,
         static_cast<size_t>(plan.shared_bytes), stream>>>(
          cost, stride_p, stride_q, stride_t, num_problems, num_queries, num_cols, num_targets,
          matched, status, max_rows, max_cols, plan.workspace_bytes, plan.per_warp_bytes,
          plan.stage, plan.shared_bytes == 0 ? scratch : nullptr);
  return cudaGetLastError();
}

// Explicit instantiations, so that a standalone `nvcc -c` of this header (via a .cu that only
// includes it) compiles the device code for float and double.
#if defined(GROUP_DETR_INSTANTIATE_LSA_KERNEL)
template cudaError_t launch_batched_lsa<float>(const LaunchPlan&, const float*, int64_t, int64_t,
                                               int64_t, int64_t, int32_t, int32_t,
                                               const int64_t*, int64_t*, int32_t*,
                                               unsigned char*, cudaStream_t);
template cudaError_t launch_batched_lsa<double>(const LaunchPlan&, const double*, int64_t,
                                                int64_t, int64_t, int64_t, int32_t, int32_t,
                                                const int64_t*, int64_t*, int32_t*,
                                                unsigned char*, cudaStream_t);
template cudaError_t plan_launch<float>(int, int64_t, int32_t, int32_t, int, LaunchPlan*);
template cudaError_t plan_launch<double>(int, int64_t, int32_t, int32_t, int, LaunchPlan*);
#endif

}  // namespace lsa_cuda
}  // namespace group_detr
