// Sparse y = x W^T + b for pruned weights, vectorised over tokens.
//
// Weight layout ("segments"): the N output rows are cut into blocks of ROWS rows and the K inputs
// into chunks of KC columns. Segment s = (row_block * chunks + chunk) * ROWS + r lists the
// non-zeros of row row_block * ROWS + r inside that chunk: seg_ptr[s] .. seg_ptr[s + 1] index
// col (input index k) and val. Unstructured (group 1): one weight per entry. Block4 (group 4):
// one entry per block of 4 consecutive input weights, col its first k, val[4 e .. 4 e + 3].
//
// x (T x K) is packed into tiles of TILE tokens, transposed: xt[tile][k][TILE]. For a tile and a
// row block, the chunk loop keeps KC x TILE floats of xt (16 KB at KC = 64) in L1 while every
// row of the block consumes its non-zeros there: acc[0..TILE) += w * xt[k][0..TILE), four
// 16-float vector FMAs per weight. Accumulators live in a ROWS x TILE scratch (4 KB, L1) and are
// written to y row-major in runs of ROWS floats, so y needs no transpose pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t TILE = 64;  // tokens per tile: 4 AVX-512 vectors (8 AVX2 vectors) of floats
constexpr int64_t ROWS = 16;  // output rows per work item

// 16 floats: one AVX-512 register or two AVX2 ones (GCC vector extension: the same source
// compiles to what -march=native offers; explicit vectors also stop GCC from vectorising the
// loop over non-zeros with gathers instead of the loop over tokens).
typedef float v16 __attribute__((vector_size(64), aligned(4)));
inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store16(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }
static_assert(TILE == 64, "a segment keeps 4 vectors of 16 tokens");

#if defined(__AVX512F__)
#include <immintrin.h>
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

// y[t0 + i][n0 + r] = acc[r][i] for i < tn, r < rows (acc is ROWS x TILE, y has N columns).
inline void write_block(const float* acc, int64_t tn, int64_t rows, float* y, int64_t N) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if (rows == ROWS)  // whole 16 x 16 blocks: transpose in registers, one 64-byte store per token
    for (; i + 16 <= tn; i += 16) transpose16(acc + i, TILE, y + i * N, N);
#endif
  for (; i < tn; ++i)
    for (int64_t r = 0; r < rows; ++r) y[i * N + r] = acc[r * TILE + i];
}

// xt[tile][k][TILE] from x[T][K]; the last tile is zero-padded.
void pack_tiles(const float* x, int64_t T, int64_t K, float* xt) {
  const int64_t tiles = (T + TILE - 1) / TILE;
  at::parallel_for(0, tiles * K, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t tile = idx / K, k = idx % K;
      float* dst = xt + (tile * K + k) * TILE;
      const int64_t t0 = tile * TILE, n = std::min(TILE, T - t0);
      for (int64_t i = 0; i < n; ++i) dst[i] = x[(t0 + i) * K + k];
      for (int64_t i = n; i < TILE; ++i) dst[i] = 0.f;
    }
  });
}

template <int G>
inline void segment(const float* __restrict xt, const int32_t* __restrict col,
                    const float* __restrict val, int64_t e0, int64_t e1, float* __restrict acc) {
  if (e0 == e1) return;
  v16 a0 = load16(acc), a1 = load16(acc + 16), a2 = load16(acc + 32), a3 = load16(acc + 48);
  for (int64_t e = e0; e < e1; ++e) {
    const float* xk = xt + static_cast<int64_t>(col[e]) * TILE;
    for (int j = 0; j < G; ++j) {
      const float w = val[G * e + j];
      const float* xj = xk + j * TILE;
      a0 += w * load16(xj);
      a1 += w * load16(xj + 16);
      a2 += w * load16(xj + 32);
      a3 += w * load16(xj + 48);
    }
  }
  store16(acc, a0);
  store16(acc + 16, a1);
  store16(acc + 32, a2);
  store16(acc + 48, a3);
}

template <int G>
void sparse_linear_impl(const float* xt, int64_t T, int64_t K, int64_t N, int64_t chunks,
                        const int64_t* seg_ptr, const int32_t* col, const float* val,
                        const float* bias, float* y) {
  const int64_t tiles = (T + TILE - 1) / TILE;
  const int64_t row_blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, tiles * row_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[ROWS][TILE];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / row_blocks, rb = item % row_blocks;
      const int64_t n0 = rb * ROWS, rows = std::min(ROWS, N - n0);
      for (int64_t r = 0; r < ROWS; ++r) {
        const float b = (bias && r < rows) ? bias[n0 + r] : 0.f;
        for (int64_t i = 0; i < TILE; ++i) acc[r][i] = b;
      }
      const float* xtile = xt + tile * K * TILE;
      const int64_t* sp = seg_ptr + rb * chunks * ROWS;
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t r = 0; r < rows; ++r)
          segment<G>(xtile, col, val, sp[c * ROWS + r], sp[c * ROWS + r + 1], acc[r]);
      const int64_t t0 = tile * TILE, tn = std::min(TILE, T - t0);
      write_block(&acc[0][0], tn, rows, y + t0 * N + n0, N);
    }
  });
}

torch::Tensor sparse_linear(torch::Tensor x, torch::Tensor seg_ptr, torch::Tensor col,
                            torch::Tensor val, c10::optional<torch::Tensor> bias, int64_t N,
                            int64_t group, int64_t chunk) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be a 2-D float32 tensor");
  TORCH_CHECK(seg_ptr.scalar_type() == torch::kInt64, "seg_ptr must be int64");
  TORCH_CHECK(col.scalar_type() == torch::kInt32, "col must be int32");
  TORCH_CHECK(val.scalar_type() == torch::kFloat32, "values must be float32");
  TORCH_CHECK(group == 1 || group == 4, "group must be 1 or 4");
  x = x.contiguous();
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(chunk > 0 && chunk % group == 0, "chunk must be a positive multiple of the group");
  const int64_t chunks = (K + chunk - 1) / chunk, row_blocks = (N + ROWS - 1) / ROWS;
  TORCH_CHECK(seg_ptr.numel() == row_blocks * chunks * ROWS + 1, "seg_ptr does not match the shape");
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  const int64_t tiles = (T + TILE - 1) / TILE;
  auto xt = torch::empty({tiles * K * TILE}, x.options());
  pack_tiles(x.data_ptr<float>(), T, K, xt.data_ptr<float>());
  const float* b = nullptr;
  torch::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    TORCH_CHECK(bias_c.numel() == N, "bias must have N entries");
    b = bias_c.data_ptr<float>();
  }
  auto sp = seg_ptr.contiguous(), c = col.contiguous(), v = val.contiguous();
  auto run = group == 1 ? sparse_linear_impl<1> : sparse_linear_impl<4>;
  run(xt.data_ptr<float>(), T, K, N, chunks, sp.data_ptr<int64_t>(), c.data_ptr<int32_t>(),
      v.data_ptr<float>(), b, y.data_ptr<float>());
  return y;
}


// ---- int8 block4: per-output-channel weight scales, dynamic per-token activation scales ----
//
// x[t, :] is quantised to q = round(x / s_t), s_t = max_k |x[t, k]| / 127, stored as u8 = q + 128
// (VNNI multiplies unsigned by signed bytes). Packed as xq[tile][k / 4][TILE][4]: the 4 inputs of
// one block for one token form a 32-bit lane, so one vpdpbusd does 16 tokens x 4 weights.
// y[t, n] = s_t * s_n * (sum_k qw[n, k] u8[t, k] - 128 * sum_k qw[n, k]) + b[n].
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

void pack_int8(const float* x, int64_t T, int64_t K, uint8_t* xq, float* scale) {
  const int64_t tiles = (T + TILE - 1) / TILE, groups = K / 4;
  at::parallel_for(0, tiles * TILE, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t tile = t / TILE, i = t % TILE;
      uint8_t* base = xq + (tile * groups * TILE + i) * 4;
      if (t >= T) {  // padding tokens: zero (u8 128) so they add nothing
        for (int64_t g = 0; g < groups; ++g) std::memset(base + g * TILE * 4, 128, 4);
        scale[t] = 1.f;
        continue;
      }
      const float* xr = x + t * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(xr[k]));
      const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
      scale[t] = s;
      for (int64_t g = 0; g < groups; ++g) {
        uint32_t packed = 0;
        for (int j = 0; j < 4; ++j) {
          const float v = std::min(127.f, std::max(-127.f, xr[4 * g + j] * inv));
          packed |= static_cast<uint32_t>(static_cast<int>(std::nearbyint(v)) + 128) << (8 * j);
        }
        std::memcpy(base + g * TILE * 4, &packed, 4);
      }
    }
  });
}

inline void segment_int8(const uint8_t* __restrict xq, const int32_t* __restrict col,
                         const int8_t* __restrict qval, int64_t e0, int64_t e1,
                         int32_t* __restrict acc) {
  if (e0 == e1) return;
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  __m512i a0 = _mm512_loadu_si512(acc), a1 = _mm512_loadu_si512(acc + 16);
  __m512i a2 = _mm512_loadu_si512(acc + 32), a3 = _mm512_loadu_si512(acc + 48);
  for (int64_t e = e0; e < e1; ++e) {
    int32_t w4;
    std::memcpy(&w4, qval + 4 * e, 4);
    const __m512i w = _mm512_set1_epi32(w4);
    const uint8_t* xk = xq + static_cast<int64_t>(col[e] / 4) * TILE * 4;
    a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(xk), w);
    a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(xk + 64), w);
    a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(xk + 128), w);
    a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(xk + 192), w);
  }
  _mm512_storeu_si512(acc, a0);
  _mm512_storeu_si512(acc + 16, a1);
  _mm512_storeu_si512(acc + 32, a2);
  _mm512_storeu_si512(acc + 48, a3);
#else
  for (int64_t e = e0; e < e1; ++e) {  // portable path: correct, not tuned
    const int8_t* w = qval + 4 * e;
    const uint8_t* xk = xq + static_cast<int64_t>(col[e] / 4) * TILE * 4;
    for (int64_t i = 0; i < TILE; ++i)
      acc[i] += w[0] * xk[4 * i] + w[1] * xk[4 * i + 1] + w[2] * xk[4 * i + 2] + w[3] * xk[4 * i + 3];
  }
#endif
}

torch::Tensor sparse_linear_int8(torch::Tensor x, torch::Tensor seg_ptr, torch::Tensor col,
                                 torch::Tensor qval, torch::Tensor w_scale, torch::Tensor row_sum,
                                 c10::optional<torch::Tensor> bias, int64_t N, int64_t chunk) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be a 2-D float32 tensor");
  TORCH_CHECK(qval.scalar_type() == torch::kInt8 && row_sum.scalar_type() == torch::kInt32 &&
              w_scale.scalar_type() == torch::kFloat32 && seg_ptr.scalar_type() == torch::kInt64 &&
              col.scalar_type() == torch::kInt32, "bad int8 weight tensors");
  x = x.contiguous();
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 4 == 0 && chunk % 4 == 0, "int8 block4 needs K and chunk multiples of 4");
  const int64_t chunks = (K + chunk - 1) / chunk, row_blocks = (N + ROWS - 1) / ROWS;
  TORCH_CHECK(seg_ptr.numel() == row_blocks * chunks * ROWS + 1, "seg_ptr does not match the shape");
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  const int64_t tiles = (T + TILE - 1) / TILE;
  auto xq = torch::empty({tiles * K * TILE}, x.options().dtype(torch::kUInt8));
  auto sx = torch::empty({tiles * TILE}, x.options());
  pack_int8(x.data_ptr<float>(), T, K, xq.data_ptr<uint8_t>(), sx.data_ptr<float>());
  torch::Tensor bias_c;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<float>();
  }
  auto sp_t = seg_ptr.contiguous(), c_t = col.contiguous(), q_t = qval.contiguous();
  auto ws_t = w_scale.contiguous(), rs_t = row_sum.contiguous();
  const int64_t* sp = sp_t.data_ptr<int64_t>();
  const int32_t* cp = c_t.data_ptr<int32_t>();
  const int8_t* qp = q_t.data_ptr<int8_t>();
  const float* ws = ws_t.data_ptr<float>();
  const int32_t* rs = rs_t.data_ptr<int32_t>();
  const uint8_t* xqp = xq.data_ptr<uint8_t>();
  const float* sxp = sx.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, tiles * row_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[ROWS][TILE];
    alignas(64) float out[ROWS][TILE];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / row_blocks, rb = item % row_blocks;
      const int64_t n0 = rb * ROWS, rows = std::min(ROWS, N - n0);
      std::memset(acc, 0, sizeof(acc));
      const uint8_t* xtile = xqp + tile * K * TILE;
      const int64_t* s = sp + rb * chunks * ROWS;
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t r = 0; r < rows; ++r)
          segment_int8(xtile, cp, qp, s[c * ROWS + r], s[c * ROWS + r + 1], acc[r]);
      const int64_t t0 = tile * TILE, tn = std::min(TILE, T - t0);
      const float* st = sxp + t0;
      for (int64_t r = 0; r < rows; ++r) {  // dequantise row-wise (vectorises over tokens)
        const int64_t n = n0 + r;
        const int32_t zero = 128 * rs[n];
        const float w = ws[n], bn = b ? b[n] : 0.f;
        for (int64_t i = 0; i < TILE; ++i) out[r][i] = static_cast<float>(acc[r][i] - zero) * (st[i] * w) + bn;
      }
      write_block(&out[0][0], tn, rows, yp + t0 * N + n0, N);
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", &sparse_linear,
        "y = x W^T + b with W in segment form (group 1: single weights, group 4: blocks of 4)");
  m.def("sparse_linear_int8", &sparse_linear_int8,
        "int8 block4 y = x W^T + b (per-channel weight scales, dynamic per-token input scales)");
  m.attr("ROWS") = ROWS;
  m.attr("VNNI") = kVnni;
}
