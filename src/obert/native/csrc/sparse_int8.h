// int8 block4 sparse layers: per-output-channel weight scales, dynamic per-token activation
// scales (included by isa.cpp inside the namespace of one instruction set).
//
// x[t, :] is quantised asymmetrically to u8 = clamp(round(x / s_t) + z_t, 0, 255) with
// s_t = (hi_t - lo_t) / 255 and z_t = round(-lo_t / s_t), lo_t = min(0, min_k x[t, k]) and
// hi_t = max(0, max_k x[t, k]): the whole byte range covers the token's values (a GELU output,
// which is >= -0.17, gets twice the resolution of a symmetric scale) and 0 stays exact. Packed as
// xq[tile][k / 4][TILE][4]: the 4 inputs of one block for one token form a 32-bit lane, so one
// 32-bit lane of a dot-product instruction does 1 token x 4 weights.
// y[t, n] = s_t * s_n * (sum_k qw[n, k] u8[t, k] - z_t * sum_k qw[n, k]) + b[n].
//
// The dot products, per instruction set (all exact integer arithmetic, so every path gives the
// same bits):
// - AVX-512 VNNI / AVX-VNNI: vpdpbusd multiplies the unsigned bytes by the signed weights and
//   adds 4 products per lane into int32.
// - AVX2 (and AVX-512 without VNNI): vpmaddubsw saturates at int16 when two u8 x s8 products of
//   a pair are large (255 * 127 * 2 > 32767), so the inputs are stored shifted to signed,
//   x' = u8 - 128, and each product is taken as |x'| (u8, <= 128) times sign(x') w (s8,
//   |w| <= 127): pairs stay within 2 * 128 * 127 = 32512. vpmaddwd by ones widens the pairs to
//   int32. The shift comes back exactly: sum w u8 = sum w x' + 128 sum w.
// - Others: scalar.
#if (defined(__AVX512VNNI__) && defined(__AVX512F__)) || defined(__AVXVNNI__) || !defined(__AVX2__)
constexpr bool kShifted = false;  // packed inputs are u8
#else
constexpr bool kShifted = true;   // packed inputs are u8 - 128 (s8)
#endif
constexpr int64_t TILE = INT8_TILE;

// A token's scale s_t and zero point z_t from its smallest and largest value (0 included), and
// 1 / s_t: the one place they are computed, so every packing path rounds alike. A range too small
// for a normal scale (below 255 x FLT_MIN: 1 / s would overflow) gets s = 1, so its values
// quantise to the zero point.
struct TokenQuant {
  float scale, inv;
  int32_t zero;
};
inline TokenQuant token_quant(float lo, float hi) {
  lo = fmin1(lo, 0.f), hi = fmax1(hi, 0.f);
  const float s = hi - lo >= 255.f * __FLT_MIN__ ? (hi - lo) / 255.f : 1.f, inv = 1.f / s;
  return {s, inv, static_cast<int32_t>(round_even(-lo * inv))};
}

// u8 of one value: clamp(round(x * inv) + z, 0, 255), rounding to nearest even.
inline uint8_t quantize_value(float x, const TokenQuant& tq) {
  const int32_t q = static_cast<int32_t>(round_even(x * tq.inv)) + tq.zero;
  return static_cast<uint8_t>(q < 0 ? 0 : (q > 255 ? 255 : q));
}

// Quantise token row xr[0..K) to u8 in q; returns its scale and zero point. mul (or null): a
// per-channel factor applied first (x_k mul_k, the smoothing of the layer's input; the weights
// carry its inverse), so outlier channels do not set every token's range.
inline TokenQuant quantize_row(const float* xr, int64_t K, uint8_t* q, const float* mul) {
  auto value = [&](int64_t i) { return mul ? xr[i] * mul[i] : xr[i]; };
  auto value16 = [&](int64_t i) { return mul ? load16(xr + i) * load16(mul + i) : load16(xr + i); };
  v16 mn{}, mx{};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const v16 v = value16(k);
    mn = vmin(v, mn);
    mx = vmax(v, mx);
  }
  float lo = hmin(mn), hi = hmax(mx);
  for (; k < K; ++k) lo = fmin1(lo, value(k)), hi = fmax1(hi, value(k));
  const TokenQuant tq = token_quant(lo, hi);
  k = 0;
  for (; k + 16 <= K; k += 16) {  // rounds to nearest even, as round_even does
    const vi16 v = vmin(vmax(round16(value16(k) * tq.inv) + tq.zero, vi16{}), vi16{} + 255);
    store_u8_16(q + k, v);
  }
  for (; k < K; ++k) q[k] = quantize_value(value(k), tq);
  return tq;
}

// One tile of xq[k / 4][TILE][4] and its per-token scales and zero points from x[T][K] (u8, or
// u8 - 128 where kShifted); padding tokens are u8 0 with zero point 0. 16 tokens at a time:
// quantised row by row, then interleaved 4 bytes apiece.
void pack_int8_tile(const float* x, int64_t T, int64_t K, int64_t tile, uint8_t* dst, float* scale,
                    int32_t* zero, const float* mul, uint8_t* q) {
  const int64_t groups = K / 4;
  for (int64_t i0 = 0; i0 < TILE; i0 += 16) {
    const int64_t t0 = tile * TILE + i0;
    for (int64_t i = 0; i < 16; ++i) {
      if (t0 + i < T) {
        const TokenQuant tq = quantize_row(x + (t0 + i) * K, K, q + i * K, mul);
        scale[i0 + i] = tq.scale, zero[i0 + i] = tq.zero;
      } else {
        scale[i0 + i] = 1.f, zero[i0 + i] = 0;
        std::memset(q + i * K, 0, K);
      }
    }
    // xq[g][i0 + i] = the 4 bytes of group g of token i: a 16 x (K / 4) transpose of 32-bit words
    int64_t g = 0;
    for (; g + 16 <= groups; g += 16)
      transpose16(reinterpret_cast<const float*>(q) + g, K / 4,
                  reinterpret_cast<float*>(dst + (g * TILE + i0) * 4), TILE);
    for (; g < groups; ++g) {
      uint32_t* out = reinterpret_cast<uint32_t*>(dst + (g * TILE + i0) * 4);
      for (int64_t i = 0; i < 16; ++i) std::memcpy(out + i, q + i * K + 4 * g, 4);
    }
  }
  if (kShifted) {
    uint32_t* w = reinterpret_cast<uint32_t*>(dst);
    for (int64_t i = 0; i < groups * TILE; ++i) w[i] ^= 0x80808080u;
  }
}

// acc[0..TILE) (+)= the segment's dot products (add: accumulate onto acc, else start from 0).
__attribute__((always_inline)) inline void segment_int8(const uint8_t* __restrict xq,
                                                        const int32_t* __restrict col,
                                                        const int8_t* __restrict qval, int64_t e0,
                                                        int64_t e1, int32_t* __restrict acc,
                                                        bool add) {
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
#elif defined(__AVX2__)
  __m256i a[8];
  for (int v = 0; v < 8; ++v)
    a[v] = add ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 8 * v)) : _mm256_setzero_si256();
#if !defined(__AVXVNNI__)
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  for (int64_t e = e0; e < e1; ++e) {
    int32_t w4;
    std::memcpy(&w4, qval + 4 * e, 4);
    const __m256i w = _mm256_set1_epi32(w4);
    const __m256i* xk = reinterpret_cast<const __m256i*>(xq + static_cast<int64_t>(col[e]) * TILE);
    for (int v = 0; v < 8; ++v) {
      const __m256i xv = _mm256_loadu_si256(xk + v);
#if defined(__AVXVNNI__)
      a[v] = _mm256_dpbusd_avx_epi32(a[v], xv, w);
#else
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(w, xv));
      a[v] = _mm256_add_epi32(a[v], _mm256_madd_epi16(pairs, ones));
#endif
    }
  }
  for (int v = 0; v < 8; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 8 * v), a[v]);
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

// out[r][0..TILE) = act(s_t s_n (acc - z_t row_sum_n) + b_n) for the rows of block rb, from one
// packed tile xq and its token scales st and zero points zt (acc of shifted inputs is short of
// 128 row_sum_n).
int64_t row_block_int8(const uint8_t* xq, const float* st, const int32_t* zt, const Layer8& L,
                       int64_t rb, float (*out)[TILE]) {
  alignas(64) int32_t acc[ROWS][TILE];
  const int64_t n0 = rb * ROWS, rows = imin(ROWS, L.N - n0);
  const int64_t* s = L.seg_ptr + rb * L.chunks * ROWS;
  for (int64_t c = 0; c < L.chunks; ++c)
    for (int64_t r = 0; r < rows; ++r)
      segment_int8(xq, L.col, L.qval, s[c * ROWS + r], s[c * ROWS + r + 1], acc[r], c > 0);
  for (int64_t r = 0; r < rows; ++r) {  // dequantise row-wise (vectorises over tokens)
    const int64_t n = n0 + r;
    const int32_t rs = L.row_sum[n];
    const float w = L.w_scale[n], bn = L.bias ? L.bias[n] : 0.f;
    for (int64_t i = 0; i < TILE; i += 16) {
      const vi16 z = load16i(zt + i) - (kShifted ? 128 : 0);
      store16(&out[r][i], to_float16(load16i(&acc[r][i]) - z * rs) * (load16(st + i) * w) + bn);
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
      mn = vmin(v, mn);
      mx = vmax(v, mx);
    }
    for (int64_t j = 0; j < 16; ++j) {
      const TokenQuant tq = token_quant(lane(mn, j), lane(mx, j));
      scale[i + j] = tq.scale, zero[i + j] = tq.zero, inv[i + j] = tq.inv;
    }
  }
  const int32_t flip = kShifted ? static_cast<int32_t>(0x80808080u) : 0;
  for (int64_t g = 0; g < K / 4; ++g)
    for (int64_t i = 0; i < TILE; i += 16) {
      const vi16 z = load16i(zero + i);
      vi16 bytes{};
      for (int j = 0; j < 4; ++j) {
        const vi16 q = vmin(vmax(round16(value(4 * g + j, i) * load16(inv + i)) + z, vi16{}), vi16{} + 255);
        bytes = bytes | (q << (8 * j));
      }
      store16i(reinterpret_cast<int32_t*>(xq + (g * TILE + i) * 4), bytes ^ flip);
    }
}

void sparse_linear_int8(const Parallel& par, const float* x, int64_t T, int64_t K, const Layer8& L,
                        float* y) {
  const int64_t tiles = (T + TILE - 1) / TILE, N = L.N;
  Buffer scales(tiles * TILE * 4), zeros(tiles * TILE * 4);
  float* sx = reinterpret_cast<float*>(scales.get());
  int32_t* zx = reinterpret_cast<int32_t*>(zeros.get());
  auto pack = [&](int64_t tile, uint8_t* dst) {  // the tile's 16 quantised rows after it
    pack_int8_tile(x, T, K, tile, dst, sx + tile * TILE, zx + tile * TILE, L.in_mul, dst + K * TILE);
  };
  auto compute = [&](int64_t tile, int64_t rb, const uint8_t* xtile) {
    alignas(64) float out[ROWS][TILE];
    const int64_t t0 = tile * TILE, tn = imin(TILE, T - t0);
    const int64_t rows = row_block_int8(xtile, sx + t0, zx + t0, L, rb, out);
    write_block(&out[0][0], TILE, tn, rows, y + t0 * N + rb * ROWS, N);
  };
  for_tiles(par, tiles, (N + ROWS - 1) / ROWS, K * TILE + 16 * K, pack, compute);
}

// The int8 feed-forward block, y = W2 act1(W1 x + b1) + b2, one 64-token tile per thread at a
// time: layer 1's dequantised output rows are quantised per token straight into layer 2's packed
// input (bit-for-bit what running the two layers one after the other computes).
void sparse_ffn_int8(const Parallel& par, const float* x, int64_t T, int64_t K, const Layer8& L1,
                     const Layer8& L2, float* y) {
  const int64_t H = L1.N, N = L2.N;
  const int64_t tiles = (T + TILE - 1) / TILE, rb1 = (H + ROWS - 1) / ROWS, rb2 = (N + ROWS - 1) / ROWS;
  parallel_for(par, tiles, 1, [&](int64_t begin, int64_t end) {
    // xq (K x TILE bytes), h (row blocks x ROWS x TILE floats), hq (H x TILE bytes), 16 rows of
    // K quantised bytes: every part starts 64-byte aligned (TILE is 64)
    const int64_t hrows = rb1 * ROWS;
    Buffer buf(K * TILE + hrows * TILE * 4 + H * TILE + 16 * K);
    uint8_t* xq = buf.get();
    float* h = reinterpret_cast<float*>(xq + K * TILE);
    uint8_t* hq = reinterpret_cast<uint8_t*>(h + hrows * TILE);
    uint8_t* q = hq + H * TILE;
    alignas(64) float sx[TILE], sh[TILE], out[ROWS][TILE];
    alignas(64) int32_t zx[TILE], zh[TILE];
    for (int64_t tile = begin; tile < end; ++tile) {
      pack_int8_tile(x, T, K, tile, xq, sx, zx, L1.in_mul, q);
      for (int64_t rb = 0; rb < rb1; ++rb) {
        const int64_t rows = row_block_int8(xq, sx, zx, L1, rb, out);
        std::memcpy(h + rb * ROWS * TILE, out, sizeof(float) * rows * TILE);
      }
      quantize_hidden(h, H, hq, sh, zh, L2.in_mul);
      const int64_t t0 = tile * TILE, tn = imin(TILE, T - t0);
      for (int64_t rb = 0; rb < rb2; ++rb) {
        const int64_t rows = row_block_int8(hq, sh, zh, L2, rb, out);
        write_block(&out[0][0], TILE, tn, rows, y + t0 * N + rb * ROWS, N);
      }
    }
  });
}
