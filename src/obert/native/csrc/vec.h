// Vector helpers shared by the kernels: 16-float vectors (GCC vector extension), exp, GELU,
// register transposes, horizontal reductions, work sharing and scratch buffers. Included by
// isa.cpp inside the namespace of one instruction set, after the system headers: each
// instruction set gets its own copy, compiled with its own target flags.

// 16 floats (v16) and 16 int32 (vi16): one AVX-512 register; on AVX2 a pair of native 8-lane
// vectors, elsewhere two pairs of 4-lane ones (GCC vector extension). A 64-byte GCC vector
// without AVX-512 is lowered through the stack on every operation (measured: the AVX2 sparse
// kernel ran at a tenth of the AVX-512 one, its accumulators in memory), so narrower targets get
// a struct of native halves that stays in registers. Explicit vectors also stop GCC from
// vectorising the loop over non-zeros with gathers instead of the loop over tokens.
template <class H>
struct Pair {
  H lo, hi;
};
#pragma GCC diagnostic ignored "-Wignored-attributes"  // a half's aligned(4): see load16
#define OBERT_PAIR_OP(op)                                                                     \
  template <class H>                                                                          \
  inline Pair<H> operator op(Pair<H> a, Pair<H> b) { return {a.lo op b.lo, a.hi op b.hi}; }   \
  template <class H, class S>                                                                 \
  inline Pair<H> operator op(Pair<H> a, S b) { return {a.lo op b, a.hi op b}; }               \
  template <class H, class S>                                                                 \
  inline Pair<H> operator op(S a, Pair<H> b) { return {a op b.lo, a op b.hi}; }               \
  template <class H, class S>                                                                 \
  inline Pair<H>& operator op##=(Pair<H>& a, S b) { return a = a op b; }
OBERT_PAIR_OP(+)
OBERT_PAIR_OP(-)
OBERT_PAIR_OP(*)
OBERT_PAIR_OP(/)
OBERT_PAIR_OP(&)
OBERT_PAIR_OP(|)
OBERT_PAIR_OP(^)
#undef OBERT_PAIR_OP
template <class H>
inline Pair<H> operator-(Pair<H> a) { return {-a.lo, -a.hi}; }
template <class H>
inline Pair<H> operator<<(Pair<H> a, int n) { return {a.lo << n, a.hi << n}; }

#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));
#elif defined(__AVX2__)
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t vi8 __attribute__((vector_size(32), aligned(4)));
typedef Pair<v8> v16;
typedef Pair<vi8> vi16;
#else
typedef float v4 __attribute__((vector_size(16), aligned(4)));
typedef int32_t vi4 __attribute__((vector_size(16), aligned(4)));
typedef Pair<Pair<v4>> v16;
typedef Pair<Pair<vi4>> vi16;
#endif

// Lane-wise min, max, "value where x >= limit, else 0", conversions and bit casts, for native
// vectors and (recursively) pairs of them.
template <class V>
inline V vmin(V a, V b) { return a < b ? a : b; }
template <class V>
inline V vmax(V a, V b) { return a > b ? a : b; }
template <class V, class S>
inline V zero_below(V x, S limit, V value) { return x < limit ? V{} : value; }
template <class H>
inline Pair<H> vmin(Pair<H> a, Pair<H> b) { return {vmin(a.lo, b.lo), vmin(a.hi, b.hi)}; }
template <class H>
inline Pair<H> vmax(Pair<H> a, Pair<H> b) { return {vmax(a.lo, b.lo), vmax(a.hi, b.hi)}; }
template <class H, class S>
inline Pair<H> zero_below(Pair<H> x, S limit, Pair<H> v) {
  return {zero_below(x.lo, limit, v.lo), zero_below(x.hi, limit, v.hi)};
}

// float lanes to int32 truncating (as a cast does), int32 to float, and bit casts.
template <class I, class F>
inline I to_int(F v) { return __builtin_convertvector(v, I); }
template <class F, class I>
inline F to_float(I v) { return __builtin_convertvector(v, F); }
template <class I, class F>
inline I as_int(F v) { return __builtin_bit_cast(I, v); }
template <class F, class I>
inline F as_float(I v) { return __builtin_bit_cast(F, v); }
#if !defined(__AVX512F__)
template <class I, class H>
inline I to_int(Pair<H> v) {
  I out;
  out.lo = to_int<decltype(out.lo)>(v.lo), out.hi = to_int<decltype(out.hi)>(v.hi);
  return out;
}
template <class F, class H>
inline F to_float(Pair<H> v) {
  F out;
  out.lo = to_float<decltype(out.lo)>(v.lo), out.hi = to_float<decltype(out.hi)>(v.hi);
  return out;
}
#endif
inline vi16 to_int16(v16 v) { return to_int<vi16>(v); }
inline v16 to_float16(vi16 v) { return to_float<v16>(v); }
inline vi16 bits16(v16 v) { return as_int<vi16>(v); }
inline v16 from_bits16(vi16 v) { return as_float<v16>(v); }

// Loads and stores at any alignment: through the aligned(4) typedefs of the native vectors (a
// pair's halves lose that attribute as template arguments, so a cast to the pair would assume
// 32-byte alignment, and a memcpy goes through the stack).
#if defined(__AVX512F__)
inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store16(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }
inline vi16 load16i(const int32_t* p) { return *reinterpret_cast<const vi16*>(p); }
inline void store16i(int32_t* p, vi16 v) { *reinterpret_cast<vi16*>(p) = v; }
#elif defined(__AVX2__)
inline v16 load16(const float* p) {
  return {*reinterpret_cast<const v8*>(p), *reinterpret_cast<const v8*>(p + 8)};
}
inline void store16(float* p, v16 v) {
  *reinterpret_cast<v8*>(p) = v.lo, *reinterpret_cast<v8*>(p + 8) = v.hi;
}
inline vi16 load16i(const int32_t* p) {
  return {*reinterpret_cast<const vi8*>(p), *reinterpret_cast<const vi8*>(p + 8)};
}
inline void store16i(int32_t* p, vi16 v) {
  *reinterpret_cast<vi8*>(p) = v.lo, *reinterpret_cast<vi8*>(p + 8) = v.hi;
}
#else
inline v16 load16(const float* p) {
  auto q = [p](int i) { return *reinterpret_cast<const v4*>(p + 4 * i); };
  return {{q(0), q(1)}, {q(2), q(3)}};
}
inline void store16(float* p, v16 v) {
  auto q = [p](int i) -> v4& { return *reinterpret_cast<v4*>(p + 4 * i); };
  q(0) = v.lo.lo, q(1) = v.lo.hi, q(2) = v.hi.lo, q(3) = v.hi.hi;
}
inline vi16 load16i(const int32_t* p) {
  auto q = [p](int i) { return *reinterpret_cast<const vi4*>(p + 4 * i); };
  return {{q(0), q(1)}, {q(2), q(3)}};
}
inline void store16i(int32_t* p, vi16 v) {
  auto q = [p](int i) -> vi4& { return *reinterpret_cast<vi4*>(p + 4 * i); };
  q(0) = v.lo.lo, q(1) = v.lo.hi, q(2) = v.hi.lo, q(3) = v.hi.hi;
}
#endif
// Lane i of a vector (through memory: for the few scalar reads, not inner loops).
inline float lane(v16 v, int i) {
  float f[16];
  std::memcpy(f, &v, 64);
  return f[i];
}

// Own min/max rather than std::min/max: a library template instantiated here would be merged by
// the linker with the copy compiled for another instruction set.
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline float fmin1(float a, float b) { return b < a ? b : a; }
inline float fmax1(float a, float b) { return b > a ? b : a; }

// Round to nearest, ties to even (the current rounding mode), as float and as int32 lanes.
inline float round_even(float x) { return __builtin_nearbyintf(x); }
inline vi16 round16(v16 v) {
#if defined(__AVX512F__)
  const __m512i r = _mm512_cvtps_epi32((__m512)v);
  return (vi16)r;
#elif defined(__AVX2__)
  return {(vi8)_mm256_cvtps_epi32((__m256)v.lo), (vi8)_mm256_cvtps_epi32((__m256)v.hi)};
#else
  float f[16];
  int32_t q[16];
  std::memcpy(f, &v, 64);
  for (int i = 0; i < 16; ++i) q[i] = static_cast<int32_t>(round_even(f[i]));
  vi16 out;
  std::memcpy(&out, q, 64);
  return out;
#endif
}

// q[0..16) = the 16 lanes of v, each already in [0, 255], as bytes.
inline void store_u8_16(uint8_t* q, vi16 v) {
#if defined(__AVX512F__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(reinterpret_cast<const __m512i&>(v)));
#elif defined(__AVX2__)
  // packus works within 128-bit lanes: [a0-3 b0-3 | a4-7 b4-7] -> reorder the 64-bit quarters
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32((__m256i)v.lo, (__m256i)v.hi), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
#else
  int32_t w[16];
  std::memcpy(w, &v, 64);
  for (int i = 0; i < 16; ++i) q[i] = static_cast<uint8_t>(w[i]);
#endif
}

// exp(y) for y <= 0: 2^n * p(r), n = round(y / ln 2), r = y - n ln 2 (two-part ln 2), p the
// degree-6 Taylor polynomial (relative error < 2e-7 for |r| <= ln 2 / 2).
inline v16 exp_nonpositive(v16 y) {
  y = vmax(y, v16{} - 87.f);
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
  return p * from_bits16((to_int16(n) + 127) << 23);
}

// 2^x for x <= 0, exactly 0 below -126 (-inf included): 2^n * p(r), n = round(x), r = x - n in
// [-1/2, 1/2] (exact), p the degree-6 Taylor polynomial of e^(r ln 2) (relative error < 2e-7).
// Cheaper than exp: no split ln 2 reduction, and on AVX-512 one roundscale and one scalef do the
// rounding and 2^n.
inline v16 exp2_nonpositive(v16 x) {
#if defined(__AVX512F__)
  const __m512 xv = (__m512)x, y = _mm512_max_ps(xv, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 rv = _mm512_sub_ps(y, n);
  const v16 r = (v16)rv;
#else
  const v16 y = vmax(x, v16{} - 126.f);
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
  const __m512 e = _mm512_maskz_scalef_ps(normal, (__m512)p, n);
  return (v16)e;
#else
  return zero_below(x, -126.f, p * from_bits16((to_int16(n) + 127) << 23));
#endif
}

// GELU(x) = x / 2 * (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7),
// the same function as torch's exact (erf) GELU to float precision.
inline v16 gelu16(v16 x) {
  const v16 z = x * 0.707106781f;
  const vi16 zbits = bits16(z);
  const vi16 sign = zbits & static_cast<int32_t>(0x80000000);
  const v16 az = from_bits16(zbits & 0x7fffffff);
  const v16 t = 1.f / (1.f + 0.3275911f * az);
  v16 poly = 1.061405429f * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  poly = poly * t;
  const v16 erf_abs = 1.f - poly * exp_nonpositive(-az * az);
  return 0.5f * x * (1.f + from_bits16(bits16(erf_abs) | sign));
}

inline float hmax(v16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)v);
#elif defined(__AVX2__)
  __m256 m = _mm256_max_ps((__m256)v.lo, (__m256)v.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
#else
  float m = lane(v, 0);
  for (int i = 1; i < 16; ++i) m = fmax1(m, lane(v, i));
  return m;
#endif
}

inline float hmin(v16 v) { return -hmax(-v); }

inline float hsum(v16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
  __m256 m = _mm256_add_ps((__m256)v.lo, (__m256)v.hi);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += lane(v, i);
  return s;
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// out[i][r] = in[r][i] for an 8 x 8 block (rows of 8 floats at the given strides).
inline void transpose8(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(in + k * in_stride);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    r[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(out + k * out_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
    _mm256_storeu_ps(out + (k + 4) * out_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
  }
}
#endif

// out[i][r] = in[r][i] for a 16 x 16 block: in rows are 16 floats at in + r * in_stride,
// out rows at out + i * out_stride.
inline void transpose16(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
#if defined(__AVX512F__)
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
#elif defined(__AVX2__)
  for (int a = 0; a < 16; a += 8)
    for (int b = 0; b < 16; b += 8) transpose8(in + a * in_stride + b, in_stride, out + b * out_stride + a, out_stride);
#else
  for (int r = 0; r < 16; ++r)
    for (int i = 0; i < 16; ++i) out[i * out_stride + r] = in[r * in_stride + i];
#endif
}

// Scratch memory for one thread: 64-byte aligned, freed on scope exit.
class Buffer {
 public:
  explicit Buffer(int64_t bytes) : raw_(static_cast<uint8_t*>(std::malloc(bytes + 64))) {
    if (!raw_) throw std::bad_alloc();
  }
  ~Buffer() { std::free(raw_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  uint8_t* get() const {
    return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw_) + 63) & ~uintptr_t(63));
  }

 private:
  uint8_t* raw_;
};

// f(begin, end) over [0, n) through the glue's thread pool.
template <class F>
void parallel_for(const Parallel& par, int64_t n, int64_t grain, const F& f) {
  par.run(n, grain, const_cast<void*>(static_cast<const void*>(&f)),
          [](void* ctx, int64_t begin, int64_t end) { (*static_cast<const F*>(ctx))(begin, end); });
}
