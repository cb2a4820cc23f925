// Vector helpers shared by the kernels: 16-float vectors (GCC vector extension), exp, GELU.
#pragma once
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// 16 floats: one AVX-512 register or two AVX2 ones (GCC vector extension: the same source
// compiles to what -march=native offers; explicit vectors also stop GCC from vectorising the
// loop over non-zeros with gathers instead of the loop over tokens).
typedef float v16 __attribute__((vector_size(64), aligned(4)));
inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store16(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

// exp(y) for y <= 0: 2^n * p(r), n = round(y / ln 2), r = y - n ln 2 (two-part ln 2), p the
// degree-6 Taylor polynomial (relative error < 2e-7 for |r| <= ln 2 / 2).
inline v16 exp_nonpositive(v16 y) {
  y = y < -87.f ? v16{} - 87.f : y;
  const v16 magic = v16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const v16 n = (y * 1.44269504f + magic) - magic;
  const v16 r = (y - n * 0.693145752f) - n * 1.42860677e-6f;
  v16 p = v16{} + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  return p * reinterpret_cast<const v16&>(bits);
}

// 2^x for x <= 0, exactly 0 below -126 (-inf included): 2^n * p(r), n = round(x), r = x - n in
// [-1/2, 1/2] (exact), p the degree-6 Taylor polynomial of e^(r ln 2) (relative error < 2e-7).
// Cheaper than exp: no split ln 2 reduction, and on AVX-512 one roundscale and one scalef do the
// rounding and 2^n.
inline v16 exp2_nonpositive(v16 x) {
#if defined(__AVX512F__)
  const __m512 xv = reinterpret_cast<const __m512&>(x), y = _mm512_max_ps(xv, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 rv = _mm512_sub_ps(y, n);
  const v16 r = reinterpret_cast<const v16&>(rv);
#else
  const v16 y = x < -126.f ? v16{} - 126.f : x;
  const v16 magic = v16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const v16 n = (y + magic) - magic;
  const v16 r = y - n;
#endif
  v16 p = v16{} + 1.5403530e-4f;
  p = p * r + 1.3333558e-3f;
  p = p * r + 9.6181291e-3f;
  p = p * r + 5.5504109e-2f;
  p = p * r + 0.24022651f;
  p = p * r + 0.69314718f;
  p = p * r + 1.f;
#if defined(__AVX512F__)
  const __mmask16 normal = _mm512_cmp_ps_mask(xv, y, _CMP_GE_OQ);  // x >= -126
  const __m512 e = _mm512_maskz_scalef_ps(normal, reinterpret_cast<const __m512&>(p), n);
  return reinterpret_cast<const v16&>(e);
#else
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  return x < -126.f ? v16{} : p * reinterpret_cast<const v16&>(bits);
#endif
}

// GELU(x) = x / 2 * (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7),
// the same function as torch's exact (erf) GELU to float precision.
inline v16 gelu16(v16 x) {
  const v16 z = x * 0.707106781f;
  const vi16 zbits = reinterpret_cast<const vi16&>(z);
  const vi16 abits = zbits & 0x7fffffff, sign = zbits & static_cast<int32_t>(0x80000000);
  const v16 az = reinterpret_cast<const v16&>(abits);
  const v16 t = 1.f / (1.f + 0.3275911f * az);
  v16 poly = 1.061405429f * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  poly = poly * t;
  const v16 erf_abs = 1.f - poly * exp_nonpositive(-az * az);
  const vi16 ebits = reinterpret_cast<const vi16&>(erf_abs) | sign;
  return 0.5f * x * (1.f + reinterpret_cast<const v16&>(ebits));
}

#if defined(__AVX512F__)
// out[i][r] = in[r][i] for a 16 x 16 block: in rows are 16 floats at in + r * in_stride,
// out rows at out + i * out_stride.
inline void transpose16(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  __m512 r[16], t[16];
  for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(in + k * in_stride);
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 16; k += 4) {
    r[k] = _mm512_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm512_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[k + 4], 0x88);
    t[k + 4] = _mm512_shuffle_f32x4(r[k], r[k + 4], 0xDD);
    t[k + 8] = _mm512_shuffle_f32x4(r[k + 8], r[k + 12], 0x88);
    t[k + 12] = _mm512_shuffle_f32x4(r[k + 8], r[k + 12], 0xDD);
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
  }
  for (int k = 0; k < 16; ++k) _mm512_storeu_ps(out + k * out_stride, r[k]);
}
#endif
