// Sparse y = x W^T + b for pruned weights, vectorised over tokens.
//
// Weight layout ("segments"): the N output rows are cut into blocks of ROWS rows and the K inputs
// into chunks of KC columns. Segment s = (row_block * chunks + chunk) * ROWS + r lists the
// non-zeros of row row_block * ROWS + r inside that chunk: seg_ptr[s] .. seg_ptr[s + 1] index
// col (input index k) and val. Unstructured (group 1): one weight per entry. Block4 (group 4):
// one entry per block of 4 consecutive input weights, col its first k, val[4 e .. 4 e + 3].
//
// x (T x K) is packed into tiles of TT tokens, transposed: xt[k][TT], so one non-zero w at
// (n, k) is acc_n[0..TT) += w * xt[k][0..TT): TT / 16 vector FMAs from one broadcast. What limits
// the loop (measured on a Cascade Lake core) is loads and branches, not FMAs: every FMA needs a
// 64-byte load of xt and every non-zero two more (index, value), and every segment ends in a
// mispredicted branch and an accumulator round trip. Measured in one process, interleaved (1
// thread, 90%): wide tiles (32-64 tokens) beat 16 even though 16-token tiles of a 768-wide input
// would fit L1 and wider ones do not, and whole rows beat L1-sized chunks of 96-192 columns; so
// rows are whole up to K = 1024 (384-column chunks above), and the caller picks 64-token tiles
// for short inputs, 32 for long ones. Two accumulator sets per row hide the FMA latency.
// Accumulators of a ROWS-row block live in a ROWS x TT scratch and go to y row-major through a
// 16 x 16 register transpose, so y needs no transpose pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t ROWS = 16;       // output rows per work item
constexpr int64_t TILE = 64;       // tokens per tile of the int8 kernel

// Epilogue of one accumulator row (n a multiple of 16): act 0 none, 1 GELU.
inline void activate(float* row, int64_t n, int64_t act) {
  if (act == 1)
    for (int64_t i = 0; i < n; i += 16) store16(row + i, gelu16(load16(row + i)));
}


// y[t0 + i][n0 + r] = acc[r * stride + i] for i < tn, r < rows (y has N columns).
inline void write_block(const float* acc, int64_t stride, int64_t tn, int64_t rows, float* y,
                        int64_t N) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if (rows == ROWS)  // whole 16 x 16 blocks: transpose in registers, one 64-byte store per token
    for (; i + 16 <= tn; i += 16) transpose16(acc + i, stride, y + i * N, N);
#endif
  for (; i < tn; ++i)
    for (int64_t r = 0; r < rows; ++r) y[i * N + r] = acc[r * stride + i];
}

// dst[k][tt] = x[tile * tt + i][k] for one tile (tokens past T are zero).
void pack_tile(const float* x, int64_t T, int64_t K, int64_t tt, int64_t tile, float* dst) {
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t kn = std::min<int64_t>(16, K - k0);
    for (int64_t i0 = 0; i0 < tt; i0 += 16) {
      const int64_t t0 = tile * tt + i0, n = std::max<int64_t>(0, std::min<int64_t>(16, T - t0));
#if defined(__AVX512F__)
      if (n == 16 && kn == 16) {  // x[t0 .. t0+16][k0 .. k0+16] -> dst[k][i0 .. i0+16]
        transpose16(x + t0 * K + k0, K, dst + k0 * tt + i0, tt);
        continue;
      }
#endif
      for (int64_t k = 0; k < kn; ++k)
        for (int64_t i = 0; i < 16; ++i)
          dst[(k0 + k) * tt + i0 + i] = i < n ? x[(t0 + i) * K + k0 + k] : 0.f;
    }
  }
}

inline uint8_t* align64(uint8_t* p) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// Runs compute(tile, row_block, packed) over every (tile, row block) pair. With enough tiles,
// each thread packs one tile at a time into its own buffer and runs every row block on it while
// it sits in L2, so the packed copy of x never travels through memory (at 2,048 tokens packing
// everything first cost as much as the non-zeros). With few tiles (short inputs), everything is
// packed first and the pairs are shared out, so both threads get work.
template <class Pack, class Compute>
void for_tiles(int64_t tiles, int64_t row_blocks, int64_t tile_bytes, const Pack& pack,
               const Compute& compute) {
  if (tiles >= 2 * at::get_num_threads()) {
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> buf(tile_bytes + 64);
      uint8_t* p = align64(buf.data());
      for (int64_t tile = begin; tile < end; ++tile) {
        pack(tile, p);
        for (int64_t rb = 0; rb < row_blocks; ++rb) compute(tile, rb, p);
      }
    });
    return;
  }
  std::vector<uint8_t> all(tiles * tile_bytes + 64);
  uint8_t* base = align64(all.data());
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) pack(tile, base + tile * tile_bytes);
  });
  at::parallel_for(0, tiles * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / row_blocks;
      compute(tile, item % row_blocks, base + tile * tile_bytes);
    }
  });
}

// acc[0..TT) (+)= sum over entries e0..e1 of val * xt[col] (G weights per entry).
// Always inlined: as a call per segment (GCC's choice once row_block grew) it ran 8-13% slower.
template <int G, int TT>
__attribute__((always_inline)) inline void segment(const float* __restrict xt,
                                                   const int32_t* __restrict col,
                                                   const float* __restrict val, int64_t e0,
                                                   int64_t e1, float* __restrict acc,
                                                   bool add) {
  constexpr int NV = TT / 16;
  v16 a[NV], b[NV];
  for (int v = 0; v < NV; ++v) {
    a[v] = add ? load16(acc + 16 * v) : v16{};
    b[v] = v16{};
  }
  int64_t e = e0;
  if (G == 1) {  // two entries per iteration into two accumulator sets
    for (; e + 2 <= e1; e += 2) {
      const float* xa = xt + static_cast<int64_t>(col[e]) * TT;
      const float* xb = xt + static_cast<int64_t>(col[e + 1]) * TT;
      const float wa = val[e], wb = val[e + 1];
      for (int v = 0; v < NV; ++v) {
        a[v] += wa * load16(xa + 16 * v);
        b[v] += wb * load16(xb + 16 * v);
      }
    }
  }
  for (; e < e1; ++e) {
    const float* xk = xt + static_cast<int64_t>(col[e]) * TT;
    for (int j = 0; j < G; ++j) {
      const float w = val[G * e + j];
      for (int v = 0; v < NV; ++v) {
        if (j % 2) b[v] += w * load16(xk + j * TT + 16 * v);
        else a[v] += w * load16(xk + j * TT + 16 * v);
      }
    }
  }
  for (int v = 0; v < NV; ++v) store16(acc + 16 * v, a[v] + b[v]);
}

// One float32 layer in segment form (see the top of this file).
struct Layer {
  const int64_t* seg_ptr;
  const int32_t* col;
  const float* val;
  const float* bias;  // may be null
  int64_t N, chunks, group, act;
};

// acc[r][0..TT) = act(sum_k W[n0 + r, k] xt[k][0..TT) + b[n0 + r]) for the rows of block rb
// (G the layer's group: a template argument, not a branch per segment, which cost 8-13%).
template <int G, int TT>
int64_t row_block(const float* xt, const Layer& L, int64_t rb, float (*acc)[TT]) {
  const int64_t n0 = rb * ROWS, rows = std::min(ROWS, L.N - n0);
  const int64_t* sp = L.seg_ptr + rb * L.chunks * ROWS;
  for (int64_t c = 0; c < L.chunks; ++c)
    for (int64_t r = 0; r < rows; ++r)
      segment<G, TT>(xt, L.col, L.val, sp[c * ROWS + r], sp[c * ROWS + r + 1], acc[r], c > 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float b = L.bias ? L.bias[n0 + r] : 0.f;
    for (int64_t i = 0; i < TT; i += 16) store16(acc[r] + i, load16(acc[r] + i) + b);
    activate(acc[r], TT, L.act);
  }
  return rows;
}

template <int G, int TT>
void sparse_linear_impl(const float* x, int64_t T, int64_t K, const Layer& L, float* y) {
  const int64_t tiles = (T + TT - 1) / TT, row_blocks = (L.N + ROWS - 1) / ROWS;
  auto pack = [&](int64_t tile, uint8_t* dst) {
    pack_tile(x, T, K, TT, tile, reinterpret_cast<float*>(dst));
  };
  auto compute = [&](int64_t tile, int64_t rb, const uint8_t* packed) {
    alignas(64) float acc[ROWS][TT];
    const int64_t rows = row_block<G, TT>(reinterpret_cast<const float*>(packed), L, rb, acc);
    const int64_t t0 = tile * TT, tn = std::min<int64_t>(TT, T - t0);
    write_block(&acc[0][0], TT, tn, rows, y + t0 * L.N + rb * ROWS, L.N);
  };
  for_tiles(tiles, row_blocks, K * TT * 4, pack, compute);
}

// Both layers of a feed-forward block, y = W2 act(W1 x + b1) + b2, one token tile at a time:
// layer 1's accumulator rows (one per hidden unit, TT tokens) are layer 2's packed input rows
// as they stand, so the hidden activations never leave the thread's L2 and are never
// transposed, written to memory or packed again. Each thread runs whole tiles.
template <int G1, int G2, int TT>
void sparse_ffn_impl(const float* x, int64_t T, int64_t K, const Layer& L1, const Layer& L2,
                     float* y) {
  const int64_t tiles = (T + TT - 1) / TT, H = L1.N;
  const int64_t rb1 = (H + ROWS - 1) / ROWS, rb2 = (L2.N + ROWS - 1) / ROWS;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buf((K + H) * TT * 4 + 64);
    float* xt = reinterpret_cast<float*>(align64(buf.data()));
    float* ht = xt + K * TT;
    alignas(64) float acc[ROWS][TT];
    for (int64_t tile = begin; tile < end; ++tile) {
      pack_tile(x, T, K, TT, tile, xt);
      for (int64_t rb = 0; rb < rb1; ++rb) {
        const int64_t rows = row_block<G1, TT>(xt, L1, rb, acc);
        std::memcpy(ht + rb * ROWS * TT, acc, sizeof(float) * rows * TT);
      }
      const int64_t t0 = tile * TT, tn = std::min<int64_t>(TT, T - t0);
      for (int64_t rb = 0; rb < rb2; ++rb) {
        const int64_t rows = row_block<G2, TT>(ht, L2, rb, acc);
        write_block(&acc[0][0], TT, tn, rows, y + t0 * L2.N + rb * ROWS, L2.N);
      }
    }
  });
}

// f(std::integral_constant<int, TT>) for tt in {16, 32, 64}; with_group likewise for 1 or 4.
template <class F>
void with_tile(int64_t tt, const F& f) {
  if (tt == 16) f(std::integral_constant<int, 16>{});
  else if (tt == 32) f(std::integral_constant<int, 32>{});
  else f(std::integral_constant<int, 64>{});
}

template <class F>
void with_group(int64_t group, const F& f) {
  if (group == 1) f(std::integral_constant<int, 1>{});
  else f(std::integral_constant<int, 4>{});
}

// An optional per-row or per-column vector (bias, in_mul) of N float32 entries, checked and kept
// contiguous in keep; null when there is none.
const float* checked_vector(const c10::optional<torch::Tensor>& b, int64_t N, torch::Tensor& keep,
                            const char* what) {
  if (!b.has_value() || !b->defined()) return nullptr;
  keep = b->contiguous();
  TORCH_CHECK(keep.numel() == N && keep.scalar_type() == torch::kFloat32,
              what, " must have ", N, " float32 entries");
  return keep.data_ptr<float>();
}

// A layer's tensors, checked and made contiguous (kept alive here while the kernel runs).
struct LayerTensors {
  torch::Tensor seg_ptr, col, val, bias;
  Layer layer;
  LayerTensors(torch::Tensor sp, torch::Tensor c, torch::Tensor v, c10::optional<torch::Tensor> b,
               int64_t K, int64_t N, int64_t group, int64_t chunk, int64_t act) {
    TORCH_CHECK(sp.scalar_type() == torch::kInt64, "seg_ptr must be int64");
    TORCH_CHECK(c.scalar_type() == torch::kInt32, "col must be int32");
    TORCH_CHECK(v.scalar_type() == torch::kFloat32, "values must be float32");
    TORCH_CHECK(group == 1 || group == 4, "group must be 1 or 4");
    TORCH_CHECK(act == 0 || act == 1, "act must be 0 (none) or 1 (GELU)");
    TORCH_CHECK(chunk > 0 && chunk % group == 0, "chunk must be a positive multiple of the group");
    const int64_t chunks = (K + chunk - 1) / chunk, row_blocks = (N + ROWS - 1) / ROWS;
    TORCH_CHECK(sp.numel() == row_blocks * chunks * ROWS + 1, "seg_ptr does not match the shape");
    seg_ptr = sp.contiguous(), col = c.contiguous(), val = v.contiguous();
    const float* bp = checked_vector(b, N, bias, "bias");
    layer = Layer{seg_ptr.data_ptr<int64_t>(), col.data_ptr<int32_t>(), val.data_ptr<float>(), bp,
                  N, chunks, group, act};
  }
};

torch::Tensor check_input(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be a 2-D float32 tensor");
  return x.contiguous();
}

void check_tile(int64_t tt) {
  TORCH_CHECK(tt == 16 || tt == 32 || tt == 64, "tile must be 16, 32 or 64 tokens");
}

torch::Tensor sparse_linear(torch::Tensor x, torch::Tensor seg_ptr, torch::Tensor col,
                            torch::Tensor val, c10::optional<torch::Tensor> bias, int64_t N,
                            int64_t group, int64_t chunk, int64_t tt, int64_t act) {
  x = check_input(x);
  check_tile(tt);
  const int64_t T = x.size(0), K = x.size(1);
  const LayerTensors L(seg_ptr, col, val, bias, K, N, group, chunk, act);
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  with_tile(tt, [&](auto tv) {
    with_group(group, [&](auto gv) {
      sparse_linear_impl<decltype(gv)::value, decltype(tv)::value>(x.data_ptr<float>(), T, K, L.layer,
                                                                   y.data_ptr<float>());
    });
  });
  return y;
}

// y = W2 act1(W1 x + b1) + b2 (layer 2's input size is layer 1's output size).
torch::Tensor sparse_ffn(torch::Tensor x, torch::Tensor seg1, torch::Tensor col1, torch::Tensor val1,
                         c10::optional<torch::Tensor> bias1, int64_t H, int64_t group1, int64_t chunk1,
                         int64_t act1, torch::Tensor seg2, torch::Tensor col2, torch::Tensor val2,
                         c10::optional<torch::Tensor> bias2, int64_t N, int64_t group2, int64_t chunk2,
                         int64_t tt) {
  x = check_input(x);
  check_tile(tt);
  const int64_t T = x.size(0), K = x.size(1);
  const LayerTensors L1(seg1, col1, val1, bias1, K, H, group1, chunk1, act1);
  const LayerTensors L2(seg2, col2, val2, bias2, H, N, group2, chunk2, 0);
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  with_tile(tt, [&](auto tv) {
    with_group(group1, [&](auto g1) {
      with_group(group2, [&](auto g2) {
        sparse_ffn_impl<decltype(g1)::value, decltype(g2)::value, decltype(tv)::value>(
            x.data_ptr<float>(), T, K, L1.layer, L2.layer, y.data_ptr<float>());
      });
    });
  });
  return y;
}


// ---- int8 block4: per-output-channel weight scales, dynamic per-token activation scales ----
//
// x[t, :] is quantised asymmetrically to u8 = clamp(round(x / s_t) + z_t, 0, 255) with
// s_t = (hi_t - lo_t) / 255 and z_t = round(-lo_t / s_t), lo_t = min(0, min_k x[t, k]) and
// hi_t = max(0, max_k x[t, k]): the whole byte range covers the token's values (a GELU output,
// which is >= -0.17, gets twice the resolution of a symmetric scale) and 0 stays exact. VNNI
// multiplies unsigned by signed bytes, which is what u8 needs. Packed as xq[tile][k / 4][TILE][4]:
// the 4 inputs of one block for one token form a 32-bit lane, so one vpdpbusd does 16 tokens x 4
// weights. y[t, n] = s_t * s_n * (sum_k qw[n, k] u8[t, k] - z_t * sum_k qw[n, k]) + b[n].
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// A token's scale s_t and zero point z_t from its smallest and largest value (0 included), and
// 1 / s_t: the one place they are computed, so every packing path rounds alike.
struct TokenQuant {
  float scale, inv;
  int32_t zero;
};
inline TokenQuant token_quant(float lo, float hi) {
  lo = std::min(lo, 0.f), hi = std::max(hi, 0.f);
  const float s = hi > lo ? (hi - lo) / 255.f : 1.f, inv = 1.f / s;
  return {s, inv, static_cast<int32_t>(std::nearbyint(-lo * inv))};
}

// u8 of one value: clamp(round(x * inv) + z, 0, 255), rounding to nearest even.
inline uint8_t quantize_value(float x, const TokenQuant& tq) {
  const int32_t q = static_cast<int32_t>(std::nearbyint(x * tq.inv)) + tq.zero;
  return static_cast<uint8_t>(std::min(255, std::max(0, q)));
}

// Quantise token row xr[0..K) to u8 in q; returns its scale and zero point. mul (or null): a
// per-channel factor applied first (x_k mul_k, the smoothing of the layer's input; the weights
// carry its inverse), so outlier channels do not set every token's range.
inline TokenQuant quantize_row(const float* xr, int64_t K, uint8_t* q, const float* mul) {
  float lo = 0.f, hi = 0.f;
  int64_t k = 0;
  auto value = [&](int64_t i) { return mul ? xr[i] * mul[i] : xr[i]; };
#if defined(__AVX512F__)
  auto load = [&](int64_t i) {
    const __m512 v = _mm512_loadu_ps(xr + i);
    return mul ? _mm512_mul_ps(v, _mm512_loadu_ps(mul + i)) : v;
  };
  __m512 mn = _mm512_setzero_ps(), mx = mn;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = load(k);
    mn = _mm512_min_ps(mn, v), mx = _mm512_max_ps(mx, v);
  }
  lo = _mm512_reduce_min_ps(mn), hi = _mm512_reduce_max_ps(mx);
#endif
  for (; k < K; ++k) lo = std::min(lo, value(k)), hi = std::max(hi, value(k));
  const TokenQuant tq = token_quant(lo, hi);
  k = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(tq.inv);
  const __m512i z = _mm512_set1_epi32(tq.zero), q0 = _mm512_setzero_si512(), q255 = _mm512_set1_epi32(255);
  for (; k + 16 <= K; k += 16) {  // cvtps rounds to nearest even, as nearbyint does
    const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(load(k), vinv)), z);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtepi32_epi8(_mm512_min_epi32(q255, _mm512_max_epi32(q0, v))));
  }
#endif
  for (; k < K; ++k) q[k] = quantize_value(value(k), tq);
  return tq;
}

// One tile of xq[k / 4][TILE][4] (u8) and its per-token scales and zero points from x[T][K];
// padding tokens are u8 0 with zero point 0. 16 tokens at a time: quantised row by row, then
// interleaved 4 bytes apiece.
void pack_int8_tile(const float* x, int64_t T, int64_t K, int64_t tile, uint8_t* dst, float* scale,
                    int32_t* zero, const float* mul) {
  const int64_t groups = K / 4;
  thread_local std::vector<uint8_t> q;  // scratch reused across tiles and calls
  q.resize(16 * K);
  for (int64_t i0 = 0; i0 < TILE; i0 += 16) {
    const int64_t t0 = tile * TILE + i0;
    for (int64_t i = 0; i < 16; ++i) {
      if (t0 + i < T) {
        const TokenQuant tq = quantize_row(x + (t0 + i) * K, K, q.data() + i * K, mul);
        scale[i0 + i] = tq.scale, zero[i0 + i] = tq.zero;
      } else {
        scale[i0 + i] = 1.f, zero[i0 + i] = 0;
        std::memset(q.data() + i * K, 0, K);
      }
    }
    // xq[g][i0 + i] = the 4 bytes of group g of token i: a 16 x (K / 4) transpose of 32-bit words
    int64_t g = 0;
#if defined(__AVX512F__)
    for (; g + 16 <= groups; g += 16)
      transpose16(reinterpret_cast<const float*>(q.data()) + g, K / 4,
                  reinterpret_cast<float*>(dst + (g * TILE + i0) * 4), TILE);
#endif
    for (; g < groups; ++g) {
      uint32_t* out = reinterpret_cast<uint32_t*>(dst + (g * TILE + i0) * 4);
      for (int64_t i = 0; i < 16; ++i) std::memcpy(out + i, q.data() + i * K + 4 * g, 4);
    }
  }
}

// acc[0..TILE) (+)= the segment's dot products (add: accumulate onto acc, else start from 0).
__attribute__((always_inline)) inline void segment_int8(const uint8_t* __restrict xq, const int32_t* __restrict col,
                         const int8_t* __restrict qval, int64_t e0, int64_t e1,
                         int32_t* __restrict acc, bool add) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  if (add) {
    a0 = _mm512_loadu_si512(acc), a1 = _mm512_loadu_si512(acc + 16);
    a2 = _mm512_loadu_si512(acc + 32), a3 = _mm512_loadu_si512(acc + 48);
  }
  for (int64_t e = e0; e < e1; ++e) {
    int32_t w4;
    std::memcpy(&w4, qval + 4 * e, 4);
    const __m512i w = _mm512_set1_epi32(w4);
    const uint8_t* xk = xq + static_cast<int64_t>(col[e]) * TILE;  // (col / 4) * TILE * 4 bytes
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
  if (!add) std::memset(acc, 0, sizeof(int32_t) * TILE);
  for (int64_t e = e0; e < e1; ++e) {  // portable path: correct, not tuned
    const int8_t* w = qval + 4 * e;
    const uint8_t* xk = xq + static_cast<int64_t>(col[e]) * TILE;  // (col / 4) * TILE * 4 bytes
    for (int64_t i = 0; i < TILE; ++i)
      acc[i] += w[0] * xk[4 * i] + w[1] * xk[4 * i + 1] + w[2] * xk[4 * i + 2] + w[3] * xk[4 * i + 3];
  }
#endif
}

// One int8 block4 layer: segment form with int8 values, per-row scales and sums.
struct Layer8 {
  const int64_t* seg_ptr;
  const int32_t* col;
  const int8_t* qval;
  const float* w_scale;
  const int32_t* row_sum;
  const float* bias;  // may be null
  int64_t N, chunks, act;
  const float* in_mul;  // per input channel factor applied before quantising (may be null)
};

// out[r][0..TILE) = act(s_t s_n (acc - z_t row_sum_n) + b_n) for the rows of block rb, from one
// packed tile xq and its token scales st and zero points zt.
int64_t row_block_int8(const uint8_t* xq, const float* st, const int32_t* zt, const Layer8& L,
                       int64_t rb, float (*out)[TILE]) {
  alignas(64) int32_t acc[ROWS][TILE];
  const int64_t n0 = rb * ROWS, rows = std::min(ROWS, L.N - n0);
  const int64_t* s = L.seg_ptr + rb * L.chunks * ROWS;
  for (int64_t c = 0; c < L.chunks; ++c)
    for (int64_t r = 0; r < rows; ++r)
      segment_int8(xq, L.col, L.qval, s[c * ROWS + r], s[c * ROWS + r + 1], acc[r], c > 0);
  for (int64_t r = 0; r < rows; ++r) {  // dequantise row-wise (vectorises over tokens)
    const int64_t n = n0 + r;
    const int32_t rs = L.row_sum[n];
    const float w = L.w_scale[n], bn = L.bias ? L.bias[n] : 0.f;
    for (int64_t i = 0; i < TILE; i += 16) {
      const vi16 a = *reinterpret_cast<const vi16*>(&acc[r][i]) - *reinterpret_cast<const vi16*>(zt + i) * rs;
      store16(&out[r][i], __builtin_convertvector(a, v16) * (load16(st + i) * w) + bn);
    }
    activate(out[r], TILE, L.act);
  }
  return rows;
}

// The hidden activations h[k][TILE] (k < K, token-minor as a layer's output rows come) quantised
// per token exactly as quantize_row does it (channel k times mul[k] first, when mul is not
// null), into the packed layout xq[k / 4][TILE][4].
void quantize_hidden(const float* h, int64_t K, uint8_t* xq, float* scale, int32_t* zero,
                     const float* mul) {
  alignas(64) float inv[TILE];
  auto value = [&](int64_t k, int64_t i) { return mul ? load16(h + k * TILE + i) * mul[k] : load16(h + k * TILE + i); };
  for (int64_t i = 0; i < TILE; i += 16) {
    v16 mn{}, mx{};
    for (int64_t k = 0; k < K; ++k) {
      const v16 v = value(k, i);
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
    }
    for (int64_t j = 0; j < 16; ++j) {
      const TokenQuant tq = token_quant(mn[j], mx[j]);
      scale[i + j] = tq.scale, zero[i + j] = tq.zero, inv[i + j] = tq.inv;
    }
  }
  for (int64_t g = 0; g < K / 4; ++g)
    for (int64_t i = 0; i < TILE; i += 16) {
      const vi16 z = *reinterpret_cast<const vi16*>(zero + i);
      vi16 lane{};
      for (int j = 0; j < 4; ++j) {
        const v16 v = value(4 * g + j, i) * load16(inv + i);
        vi16 q;
#if defined(__AVX512F__)
        const __m512i r = _mm512_cvtps_epi32(reinterpret_cast<const __m512&>(v));  // nearest even
        q = reinterpret_cast<const vi16&>(r);
#else
        for (int l = 0; l < 16; ++l) q[l] = static_cast<int32_t>(std::nearbyint(v[l]));
#endif
        q += z;
        q = q < 0 ? vi16{} : q;
        q = q > 255 ? vi16{} + 255 : q;
        lane |= q << (8 * j);
      }
      *reinterpret_cast<vi16*>(xq + (g * TILE + i) * 4) = lane;
    }
}

struct Layer8Tensors {
  torch::Tensor seg_ptr, col, qval, w_scale, row_sum, bias, in_mul;
  Layer8 layer;
  Layer8Tensors(torch::Tensor sp, torch::Tensor c, torch::Tensor q, torch::Tensor ws,
                torch::Tensor rs, c10::optional<torch::Tensor> b, int64_t K, int64_t N,
                int64_t chunk, int64_t act, c10::optional<torch::Tensor> mul) {
    TORCH_CHECK(q.scalar_type() == torch::kInt8 && rs.scalar_type() == torch::kInt32 &&
                ws.scalar_type() == torch::kFloat32 && sp.scalar_type() == torch::kInt64 &&
                c.scalar_type() == torch::kInt32, "bad int8 weight tensors");
    TORCH_CHECK(K % 4 == 0 && chunk % 4 == 0, "int8 block4 needs K and chunk multiples of 4");
    TORCH_CHECK(act == 0 || act == 1, "act must be 0 (none) or 1 (GELU)");
    const int64_t chunks = (K + chunk - 1) / chunk, row_blocks = (N + ROWS - 1) / ROWS;
    TORCH_CHECK(sp.numel() == row_blocks * chunks * ROWS + 1, "seg_ptr does not match the shape");
    TORCH_CHECK(ws.numel() == N && rs.numel() == N, "w_scale and row_sum must have N entries");
    seg_ptr = sp.contiguous(), col = c.contiguous(), qval = q.contiguous();
    w_scale = ws.contiguous(), row_sum = rs.contiguous();
    const float* bp = checked_vector(b, N, bias, "bias");
    const float* mp = checked_vector(mul, K, in_mul, "in_mul");
    layer = Layer8{seg_ptr.data_ptr<int64_t>(), col.data_ptr<int32_t>(), qval.data_ptr<int8_t>(),
                   w_scale.data_ptr<float>(), row_sum.data_ptr<int32_t>(), bp, N, chunks, act, mp};
  }
};

torch::Tensor sparse_linear_int8(torch::Tensor x, torch::Tensor seg_ptr, torch::Tensor col,
                                 torch::Tensor qval, torch::Tensor w_scale, torch::Tensor row_sum,
                                 c10::optional<torch::Tensor> bias, int64_t N, int64_t chunk,
                                 int64_t act, c10::optional<torch::Tensor> in_mul) {
  x = check_input(x);
  const int64_t T = x.size(0), K = x.size(1);
  const Layer8Tensors L(seg_ptr, col, qval, w_scale, row_sum, bias, K, N, chunk, act, in_mul);
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  const int64_t tiles = (T + TILE - 1) / TILE;
  std::vector<float> sx(tiles * TILE);
  std::vector<int32_t> zx(tiles * TILE);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto pack = [&](int64_t tile, uint8_t* dst) {
    pack_int8_tile(xp, T, K, tile, dst, sx.data() + tile * TILE, zx.data() + tile * TILE, L.layer.in_mul);
  };
  auto compute = [&](int64_t tile, int64_t rb, const uint8_t* xtile) {
    alignas(64) float out[ROWS][TILE];
    const int64_t t0 = tile * TILE, tn = std::min(TILE, T - t0);
    const int64_t rows = row_block_int8(xtile, sx.data() + t0, zx.data() + t0, L.layer, rb, out);
    write_block(&out[0][0], TILE, tn, rows, yp + t0 * N + rb * ROWS, N);
  };
  for_tiles(tiles, (N + ROWS - 1) / ROWS, K * TILE, pack, compute);
  return y;
}

// The int8 feed-forward block, y = W2 act1(W1 x + b1) + b2, one 64-token tile per thread at a
// time: layer 1's dequantised output rows are quantised per token straight into layer 2's packed
// input (bit-for-bit what running the two layers one after the other computes).
torch::Tensor sparse_ffn_int8(torch::Tensor x, torch::Tensor seg1, torch::Tensor col1,
                              torch::Tensor q1, torch::Tensor ws1, torch::Tensor rs1,
                              c10::optional<torch::Tensor> bias1, int64_t H, int64_t chunk1,
                              int64_t act1, torch::Tensor seg2, torch::Tensor col2,
                              torch::Tensor q2, torch::Tensor ws2, torch::Tensor rs2,
                              c10::optional<torch::Tensor> bias2, int64_t N, int64_t chunk2,
                              c10::optional<torch::Tensor> mul1, c10::optional<torch::Tensor> mul2) {
  x = check_input(x);
  const int64_t T = x.size(0), K = x.size(1);
  const Layer8Tensors L1(seg1, col1, q1, ws1, rs1, bias1, K, H, chunk1, act1, mul1);
  const Layer8Tensors L2(seg2, col2, q2, ws2, rs2, bias2, H, N, chunk2, 0, mul2);
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  const int64_t tiles = (T + TILE - 1) / TILE, rb1 = (H + ROWS - 1) / ROWS, rb2 = (N + ROWS - 1) / ROWS;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buf(K * TILE + H * TILE * 4 + H * TILE + 3 * 64);
    uint8_t* xq = align64(buf.data());
    float* h = reinterpret_cast<float*>(align64(xq + K * TILE));
    uint8_t* hq = align64(reinterpret_cast<uint8_t*>(h + H * TILE));
    alignas(64) float sx[TILE], sh[TILE], out[ROWS][TILE];
    alignas(64) int32_t zx[TILE], zh[TILE];
    for (int64_t tile = begin; tile < end; ++tile) {
      pack_int8_tile(xp, T, K, tile, xq, sx, zx, L1.layer.in_mul);
      for (int64_t rb = 0; rb < rb1; ++rb) {
        const int64_t rows = row_block_int8(xq, sx, zx, L1.layer, rb, out);
        std::memcpy(h + rb * ROWS * TILE, out, sizeof(float) * rows * TILE);
      }
      quantize_hidden(h, H, hq, sh, zh, L2.layer.in_mul);
      const int64_t t0 = tile * TILE, tn = std::min(TILE, T - t0);
      for (int64_t rb = 0; rb < rb2; ++rb) {
        const int64_t rows = row_block_int8(hq, sh, zh, L2.layer, rb, out);
        write_block(&out[0][0], TILE, tn, rows, yp + t0 * N + rb * ROWS, N);
      }
    }
  });
  return y;
}

}  // namespace

torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                        c10::optional<torch::Tensor> mask, double scale);  // attention.cpp
torch::Tensor add_layer_norm(torch::Tensor x, torch::Tensor r, torch::Tensor w, torch::Tensor b,
                             double eps);  // layer_norm.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", &sparse_linear,
        "act(x W^T + b) with W in segment form (group 1: single weights, group 4: blocks of 4)");
  m.def("sparse_ffn", &sparse_ffn,
        "W2 act(W1 x + b1) + b2 for two sparse layers, one token tile at a time (hidden stays in cache)");
  m.def("sparse_linear_int8", &sparse_linear_int8,
        "int8 block4 y = x W^T + b (per-channel weight scales, dynamic per-token input scales)");
  m.def("sparse_ffn_int8", &sparse_ffn_int8,
        "int8 block4 W2 act(W1 x + b1) + b2, one token tile at a time (hidden stays in cache)");
  m.def("attention", &attention,
        "softmax(scale q k^T + mask) v for [batch, heads, seq, dim] inputs, out [batch, seq, heads, dim]");
  m.def("add_layer_norm", &add_layer_norm, "LayerNorm(x + residual) over the last dim, one pass");
  m.attr("ROWS") = ROWS;
  m.attr("INT8_TILE") = TILE;
  m.attr("VNNI") = kVnni;
}
