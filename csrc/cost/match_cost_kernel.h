// The fused matching cost without torch: per-image targets in structure-of-arrays form and the
// block kernel (cost_row.inc) instantiated for plain floats and, on x86-64, for AVX2 + FMA and
// for AVX-512 (chosen at run time, so one binary runs on any x86-64). match_cost_cpu.cpp wraps
// it as the op; keeping it free of torch headers lets it be compiled and profiled on its own.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GROUP_DETR_HAVE_AVX2_COST 1
#include <immintrin.h>
#endif

namespace group_detr {
namespace cost {

struct CostParams {
  float w_class, w_bbox, w_giou;
  bool use_bbox, use_giou;  // a zero weight skips its term, as the reference does
  bool softmax;             // else focal
  bool logsigmoid;          // focal with log p, log(1 - p) as logsigmoid(x), logsigmoid(-x)
  float alpha, one_minus_alpha, gamma;
  bool gamma_is_two;
};

// Queries per block: one AVX-512 vector, two AVX2 vectors, 16 scalar lanes. Every build works
// on blocks of this width (and sums softmax rows in this many partial sums), which is what keeps
// their results equal bit for bit.
constexpr int64_t kMaxWidth = 16;

// The targets of one image, `count` of each: cxcywh for the L1 term, xyxy corners and area for
// GIoU, computed as box_ops computes them. Read one target at a time (broadcast to the lanes).
struct TargetsSoA {
  const float *cx, *cy, *w, *h, *x0, *y0, *x1, *y1, *area;
  int64_t count;
};

// The predicted cxcywh boxes of one block of kMaxWidth queries, one array per coordinate.
struct QueryBlock {
  float cx[kMaxWidth], cy[kMaxWidth], w[kMaxWidth], h[kMaxWidth];
};

// The kernel's small functions must be inlined into the block loop: a call would pass its
// vectors (and the four of a Quad) through memory.
#if defined(__GNUC__)
#define GROUP_DETR_INLINE inline __attribute__((always_inline))
#define GROUP_DETR_NOINLINE inline __attribute__((noinline))
#else
#define GROUP_DETR_INLINE inline
#define GROUP_DETR_NOINLINE inline
#endif

// No contraction of a * b + c into a fused multiply-add except where fmadd asks for one: both
// builds then round every operation alike, and the cost keeps the reference's operation order.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// Scalar build: V is float, masks are bools.
namespace portable {
using V = float;
using Mask = bool;
constexpr int kWidth = 1;
inline V set1(float x) { return x; }
inline V load(const float* p) { return *p; }
inline void store(float* p, V x) { *p = x; }
// The semantics of x86's minps/maxps: the second operand when the comparison is false (NaN).
inline V min_(V a, V b) { return a < b ? a : b; }
inline V max_(V a, V b) { return a > b ? a : b; }
inline V fmadd(V a, V b, V c) { return std::fma(a, b, c); }  // a * b + c, rounded once
inline V abs_(V a) { return std::fabs(a); }
inline V floor_(V a) { return std::floor(a); }
inline V round_(V a) { return std::nearbyint(a); }  // to nearest, ties to even
inline V select(Mask m, V a, V b) { return m ? a : b; }
inline Mask lt(V a, V b) { return a < b; }
inline Mask gt(V a, V b) { return a > b; }
inline Mask eq(V a, V b) { return a == b; }
inline Mask is_nan(V a) { return a != a; }
// 2^n for an integer-valued n in [-126, 127]. Another n (the vector builds read any float) gives
// 2^0 here rather than an undefined conversion; callers select such lanes away.
inline V pow2n(V n) {
  const int32_t bits = ((n >= -126.0f && n <= 127.0f) ? static_cast<int32_t>(n) + 127 : 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
// x = m * 2^e with m in [0.5, 1), for a positive normal x.
inline void split_exponent(V x, V* e, V* m) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  *e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  bits = (bits & ~(0xff << 23)) | (126 << 23);
  std::memcpy(m, &bits, sizeof bits);
}
#include "cost/cost_row.inc"
}  // namespace portable

#ifdef GROUP_DETR_HAVE_AVX2_COST
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// AVX2 build: 8 floats per V; every function here is compiled for AVX2 and FMA alone.
namespace avx2 {
struct V {
  __m256 v;
};
using Mask = V;
constexpr int kWidth = 8;
inline V set1(float x) { return {_mm256_set1_ps(x)}; }
inline V load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void store(float* p, V x) { _mm256_storeu_ps(p, x.v); }
inline V operator+(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V operator/(V a, V b) { return {_mm256_div_ps(a.v, b.v)}; }
inline V fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline V min_(V a, V b) { return {_mm256_min_ps(a.v, b.v)}; }
inline V max_(V a, V b) { return {_mm256_max_ps(a.v, b.v)}; }
inline V abs_(V a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
inline V floor_(V a) { return {_mm256_floor_ps(a.v)}; }
inline V round_(V a) {
  return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline V select(Mask m, V a, V b) { return {_mm256_blendv_ps(b.v, a.v, m.v)}; }
inline Mask lt(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask gt(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask eq(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
inline Mask is_nan(V a) { return {_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)}; }
inline V pow2n(V n) {
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_castsi256_ps(bits)};
}
inline void split_exponent(V x, V* e, V* m) {
  const __m256i bits = _mm256_castps_si256(x.v);
  const __m256i exponent = _mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xff));
  e->v = _mm256_cvtepi32_ps(_mm256_sub_epi32(exponent, _mm256_set1_epi32(126)));
  m->v = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(~(0xff << 23))),
                                             _mm256_set1_epi32(126 << 23)));
}
#include "cost/cost_row.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
// AVX-512 build: 16 floats per V, masks in mask registers; the same IEEE operations as above
// (vminps/vmaxps keep minps' NaN rule), so the same bits.
namespace avx512 {
struct V {
  __m512 v;
};
struct Mask {
  __mmask16 m;
};
constexpr int kWidth = 16;
inline V set1(float x) { return {_mm512_set1_ps(x)}; }
inline V load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, V x) { _mm512_storeu_ps(p, x.v); }
inline V operator+(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V operator/(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V fmadd(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V min_(V a, V b) { return {_mm512_min_ps(a.v, b.v)}; }
inline V max_(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V abs_(V a) { return {_mm512_abs_ps(a.v)}; }
inline V floor_(V a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)};
}
inline V round_(V a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline V select(Mask m, V a, V b) { return {_mm512_mask_blend_ps(m.m, b.v, a.v)}; }
inline Mask lt(V a, V b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask gt(V a, V b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask eq(V a, V b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
inline Mask is_nan(V a) { return {_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q)}; }
inline V pow2n(V n) {
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvttps_epi32(n.v), _mm512_set1_epi32(127)), 23);
  return {_mm512_castsi512_ps(bits)};
}
inline void split_exponent(V x, V* e, V* m) {
  const __m512i bits = _mm512_castps_si512(x.v);
  const __m512i exponent = _mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xff));
  e->v = _mm512_cvtepi32_ps(_mm512_sub_epi32(exponent, _mm512_set1_epi32(126)));
  const __m512i mantissa = _mm512_and_si512(bits, _mm512_set1_epi32(~(0xff << 23)));
  m->v = _mm512_castsi512_ps(_mm512_or_si512(mantissa, _mm512_set1_epi32(126 << 23)));
}
#include "cost/cost_row.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace cost
}  // namespace group_detr
