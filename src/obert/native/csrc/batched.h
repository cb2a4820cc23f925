// Batched small dense matrices for the block Fisher inverses of OBS pruning: Gram blocks of the
// gradients, and inverses and solves of many symmetric positive definite n x n matrices (n is the
// Fisher block size, 4-100 or so). LAPACK takes one call per matrix (~20 us at n = 50, a few
// GFLOP/s); here 16 matrices travel together, one per vector lane ("structure of arrays"), so
// every operation of the factorisation is a full-width vector operation.
// (Included by isa.cpp inside the namespace of one instruction set.)

// Register tile of the Gram kernel: GR rows of the output x GV vectors of 16 columns, within the
// register file (AVX-512: 12 of 32 registers; AVX2: 8 of 16 256-bit halves; else 8 of 16).
#if defined(__AVX512F__)
constexpr int64_t GR = 6, GV = 2;
#elif defined(__AVX2__)
constexpr int64_t GR = 4, GV = 1;
#else
constexpr int64_t GR = 2, GV = 1;
#endif

// out[b] += lower triangle of G_b^T G_b for the blocks b of B columns of g ([rows, ld] row-major,
// block b at columns b*B); the strict upper triangle of out is left as it is.
void gram_lower(const Parallel& par, const float* g, int64_t rows, int64_t ld, int64_t nb, int64_t B,
                float* out) {
  constexpr int64_t W = 16 * GV;  // columns per register tile
  const int64_t Bp = (B + W - 1) / W * W, Rp = (B + GR - 1) / GR * GR;
  parallel_for(par, nb, 8, [&](int64_t b0, int64_t b1) {
    // The block's rows packed and zero-padded to Bp columns (and GR-row tiles): the panel stays in
    // L1/L2 while every tile of the output runs over it.
    Buffer panel_buf(rows * imax(Bp, Rp) * 4 + 64);
    float* panel = reinterpret_cast<float*>(panel_buf.get());
    const int64_t stride = imax(Bp, Rp);
    for (int64_t p = 0; p < rows; ++p)
      for (int64_t c = B; c < stride; ++c) panel[p * stride + c] = 0.f;
    alignas(64) float tile[GR][W];
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t p = 0; p < rows; ++p) std::memcpy(panel + p * stride, g + p * ld + b * B, B * 4);
      float* o = out + b * B * B;
      for (int64_t r0 = 0; r0 < B; r0 += GR) {
        for (int64_t c0 = 0; c0 <= imin(r0 + GR - 1, B - 1); c0 += W) {
          v16 acc[GR][GV];
          for (int64_t r = 0; r < GR; ++r)
            for (int64_t v = 0; v < GV; ++v) acc[r][v] = v16{};
          const float* pp = panel;
          for (int64_t p = 0; p < rows; ++p, pp += stride) {
            v16 x[GV];
            for (int64_t v = 0; v < GV; ++v) x[v] = load16(pp + c0 + 16 * v);
            for (int64_t r = 0; r < GR; ++r) {
              const float s = pp[r0 + r];
              for (int64_t v = 0; v < GV; ++v) acc[r][v] += s * x[v];
            }
          }
          for (int64_t r = 0; r < GR; ++r)
            for (int64_t v = 0; v < GV; ++v) store16(&tile[r][16 * v], acc[r][v]);
          for (int64_t r = 0; r < GR && r0 + r < B; ++r) {
            const int64_t row = r0 + r, end = imin(imin(c0 + W, B), row + 1);
            for (int64_t c = c0; c < end; ++c) o[row * B + c] += tile[r][c - c0];
          }
        }
      }
    }
  });
}

// Packed lower triangle of n x n matrices with 16 lanes per entry: entry (i, k), k <= i, at
// tri(i) + k, tri(i) = i (i + 1) / 2.
inline int64_t tri(int64_t i) { return i * (i + 1) / 2; }

// Loads 16 matrices (fewer in the last group: the missing lanes get the identity) into the packed
// buffer as scale * A + diag(shift) (shift may be null) or, with a mask p, as the masked system
// p_i p_k (scale A_ik) + [i = k] (1 - p_i): A_PP on P and the identity elsewhere. Only the lower
// triangle of A is read.
void gather_lower(const float* a, int64_t n, int64_t lanes, float scale, const float* shift,
                  const float* mask, float* L) {
  for (int64_t l = 0; l < 16; ++l) {
    const float* m = l < lanes ? a + l * n * n : nullptr;
    const float* p = mask && m ? mask + l * n : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      float* row = L + tri(i) * 16 + l;
      for (int64_t k = 0; k <= i; ++k) {
        float v = m ? scale * m[i * n + k] : 0.f;
        if (p) v *= p[i] * p[k];
        if (k == i) v += m ? (p ? 1.f - p[i] : (shift ? shift[l] : 0.f)) : 1.f;
        row[k * 16] = v;
      }
    }
  }
}

// In-place Cholesky A = L L^T of 16 packed matrices (right-looking); rd[j] = 1 / L_jj. A lane
// whose pivot is not positive and finite records its column (+1) in fail (if it has none yet) and
// continues with pivot 1, so the other lanes are unaffected and nothing traps.
void cholesky16(float* L, int64_t n, float* rd, int32_t* fail) {
  alignas(64) float d[16];
  for (int64_t j = 0; j < n; ++j) {
    float* ljj = L + (tri(j) + j) * 16;
    std::memcpy(d, ljj, 64);
    for (int l = 0; l < 16; ++l) {
      if (!(d[l] > 0.f && d[l] <= 3.4e38f)) {
        if (!fail[l]) fail[l] = static_cast<int32_t>(j + 1);
        d[l] = 1.f;
      }
      d[l] = __builtin_sqrtf(d[l]);
    }
    const v16 s = load16(d), r = 1.f / s;
    store16(ljj, s);
    store16(rd + j * 16, r);
    for (int64_t i = j + 1; i < n; ++i) {
      float* lij = L + (tri(i) + j) * 16;
      store16(lij, load16(lij) * r);
    }
    for (int64_t k = j + 1; k < n; ++k) {
      const v16 lkj = load16(L + (tri(k) + j) * 16);
      for (int64_t i = k; i < n; ++i) {
        float* lik = L + (tri(i) + k) * 16;
        store16(lik, load16(lik) - load16(L + (tri(i) + j) * 16) * lkj);
      }
    }
  }
}

// a[b] <- (scale a[b] + diag(shift[b]))^-1 in place for N symmetric positive definite n x n
// matrices (only their lower triangles are read; the full inverse is written); info[b] = 0, or
// the first column (+1) whose pivot failed, as LAPACK's potrf reports it (that matrix is then left
// as it was, so the caller can redo it another way). Inverse = L^-T L^-1 from the Cholesky factor.
void spd_inverse(const Parallel& par, float* a, int64_t N, int64_t n, float scale, const float* shift,
                 int32_t* info) {
  const int64_t groups = (N + 15) / 16, T = tri(n);
  parallel_for(par, groups, 1, [&](int64_t g0, int64_t g1) {
    Buffer buf((T + n) * 64);
    float* L = reinterpret_cast<float*>(buf.get());
    float* rd = L + T * 16;
    alignas(64) float y[16];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * 16, lanes = imin(16, N - b0);
      float* ag = a + b0 * n * n;
      gather_lower(ag, n, lanes, scale, shift ? shift + b0 : nullptr, nullptr, L);
      int32_t fail[16] = {0};
      cholesky16(L, n, rd, fail);
      // X = L^-1 in place, column by column: X_jj = 1 / L_jj,
      // X_ij = -(L_ij X_jj + sum_{j<k<i} L_ik X_kj) / L_ii (reads columns > j of L, still intact).
      for (int64_t j = 0; j < n; ++j) {
        const v16 xjj = load16(rd + j * 16);
        store16(L + (tri(j) + j) * 16, xjj);
        for (int64_t i = j + 1; i < n; ++i) {
          const float* li = L + tri(i) * 16;
          v16 s0 = load16(li + j * 16) * xjj, s1{};
          int64_t k = j + 1;
          for (; k + 1 < i; k += 2) {
            s0 += load16(li + k * 16) * load16(L + (tri(k) + j) * 16);
            s1 += load16(li + (k + 1) * 16) * load16(L + (tri(k + 1) + j) * 16);
          }
          if (k < i) s0 += load16(li + k * 16) * load16(L + (tri(k) + j) * 16);
          store16(L + (tri(i) + j) * 16, -(s0 + s1) * load16(rd + i * 16));
        }
      }
      // A^-1 = X^T X: (A^-1)_ik = sum_{l >= i} X_li X_lk for k <= i; both triangles written.
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k <= i; ++k) {
          v16 s0{}, s1{};
          int64_t l = i;
          for (; l + 1 < n; l += 2) {
            const float* xl = L + tri(l) * 16;
            const float* xl1 = L + tri(l + 1) * 16;
            s0 += load16(xl + i * 16) * load16(xl + k * 16);
            s1 += load16(xl1 + i * 16) * load16(xl1 + k * 16);
          }
          if (l < n) s0 += load16(L + (tri(l) + i) * 16) * load16(L + (tri(l) + k) * 16);
          store16(y, s0 + s1);
          for (int64_t q = 0; q < lanes; ++q)
            if (!fail[q]) ag[q * n * n + i * n + k] = ag[q * n * n + k * n + i] = y[q];
        }
      for (int64_t q = 0; q < lanes; ++q) info[b0 + q] = fail[q];
    }
  });
}

// x[b] = S_b^-1 rhs[b] for N symmetric positive definite systems, S_b = a[b] or, with mask, the
// masked system p_i p_k a_ik + [i = k] (1 - p_i) (A_PP on P, the identity elsewhere; lower
// triangles read). Cholesky, then forward and back substitution; info as spd_inverse.
void spd_solve(const Parallel& par, const float* a, const float* mask, const float* rhs, int64_t N,
               int64_t n, float* x, int32_t* info) {
  const int64_t groups = (N + 15) / 16, T = tri(n);
  parallel_for(par, groups, 1, [&](int64_t g0, int64_t g1) {
    Buffer buf((T + 2 * n) * 64);
    float* L = reinterpret_cast<float*>(buf.get());
    float* rd = L + T * 16;
    float* z = rd + n * 16;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * 16, lanes = imin(16, N - b0);
      gather_lower(a + b0 * n * n, n, lanes, 1.f, nullptr, mask ? mask + b0 * n : nullptr, L);
      int32_t fail[16] = {0};
      cholesky16(L, n, rd, fail);
      for (int64_t i = 0; i < n; ++i)
        for (int l = 0; l < 16; ++l) z[i * 16 + l] = l < lanes ? rhs[(b0 + l) * n + i] : 0.f;
      // L y = rhs (forward), then L^T x = y (backward), in z.
      for (int64_t i = 0; i < n; ++i) {
        const float* li = L + tri(i) * 16;
        v16 s = load16(z + i * 16);
        for (int64_t k = 0; k < i; ++k) s -= load16(li + k * 16) * load16(z + k * 16);
        store16(z + i * 16, s * load16(rd + i * 16));
      }
      for (int64_t i = n - 1; i >= 0; --i) {
        v16 s = load16(z + i * 16);
        for (int64_t k = i + 1; k < n; ++k) s -= load16(L + (tri(k) + i) * 16) * load16(z + k * 16);
        store16(z + i * 16, s * load16(rd + i * 16));
      }
      for (int l = 0; l < lanes; ++l) {
        for (int64_t i = 0; i < n; ++i) x[(b0 + l) * n + i] = z[i * 16 + l];
        info[b0 + l] = fail[l];
      }
    }
  });
}
