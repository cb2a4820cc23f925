// Attention of encoder inference on CPU: out = softmax(scale q k^T + mask) v for every (batch,
// head), written straight in the [batch, query, head, dim] layout the next Linear reads.
//
// Per head: k is transposed once into kt[d][key] (keys padded to 32 with masked zeros); then 8
// queries at a time: their scores against 16-32 keys at a time sit in vector accumulators (one
// broadcast of q per 1-2 16-float FMAs), the softmax runs over the score rows in cache, and p v
// accumulates a few query rows x D in registers. Work items are
// (batch, head) pairs. Shapes with head dims that are not a multiple of 16 (or above 128) are left
// to PyTorch by the caller.
// (Included by isa.cpp inside the namespace of one instruction set.)

constexpr int QB = 8;  // query rows per block
// Score blocks: SQ query rows x SKV 16-key vectors of accumulators, which must fit the
// registers (AVX-512: 16 of 32; AVX2: 8 of 16, where 8 x 32 spilled on every FMA), and the query
// rows per p v block likewise.
#if defined(__AVX512F__)
constexpr int SQ = 8, SKV = 2;
template <int NV>
constexpr int pv_rows() { return NV <= 2 ? 8 : (NV <= 4 ? 4 : 2); }
#else
constexpr int SQ = 4, SKV = 1;
template <int NV>
constexpr int pv_rows() { return NV == 1 ? 4 : (NV == 2 ? 2 : 1); }
#endif
constexpr int KB = 16 * SKV;  // keys per score block
constexpr float NEG_INF = -__builtin_inff();

// One head: q [Sq][D] (row stride qs), k and v [Sk][D] (strides ks, vs), mask rows of Sk
// additive values (mask_qs 0: one row for every query; null: none), out rows at stride os.
// kt (D x Skp), sc (QB x Skp) and bias (QB x Skp) are scratch.
//
// The softmax runs in base 2: scores are (scale log2 e) q.k + (log2 e) mask, so
// softmax = 2^(s - max s) / sum, with exp2 cheaper than exp. The mask is the score accumulators'
// starting value and each row's maximum is kept in registers as the scores are made, so the
// scores are read once more only, by the exponentials.
template <int NV>
void attention_head(const float* q, int64_t qs, const float* k, int64_t ks, const float* v,
                    int64_t vs, const float* mask, int64_t mask_qs, int64_t Sq, int64_t Sk,
                    int64_t Skp, float scale, float* out, int64_t os, float* kt, float* sc,
                    float* bias) {
  constexpr int D = 16 * NV;
  constexpr int RP = pv_rows<NV>();  // query rows per p v block
  constexpr float LOG2E = 1.44269504f;
  int64_t j0 = 0;
  for (; j0 + 16 <= Sk; j0 += 16)  // 16 keys x 16 dims at a time through registers
    for (int d = 0; d < D; d += 16) transpose16(k + j0 * ks + d, ks, kt + d * Skp + j0, Skp);
  for (int64_t j = j0; j < Skp; ++j)
    for (int d = 0; d < D; ++d) kt[d * Skp + j] = j < Sk ? k[j * ks + d] : 0.f;
  // Starting scores: (log2 e) mask, -inf on the padding keys; one row shared by every query
  // unless the mask has a row per query.
  const bool per_query = mask && mask_qs;
  auto fill_bias = [&](float* row, const float* mr) {
    for (int64_t j = 0; j < Skp; ++j) row[j] = j >= Sk ? NEG_INF : (mr ? mr[j] * LOG2E : 0.f);
  };
  // Keys outside [jlo, jhi) are masked for every query (padding): they are skipped altogether.
  int64_t jlo = 0, jhi = Sk;
  if (!per_query) {
    fill_bias(bias, mask);
    while (jlo < Sk && bias[jlo] == NEG_INF) ++jlo;
    while (jhi > jlo && bias[jhi - 1] == NEG_INF) --jhi;
  }
  const int64_t jb0 = jlo / 32 * 32, jb1 = jhi <= jlo ? jb0 : (jhi + 31) / 32 * 32;  // score blocks
  alignas(64) float qb[QB][D];
  alignas(64) float inv_l[QB];
  const float qscale = scale * LOG2E;
  for (int64_t i0 = 0; i0 < Sq; i0 += QB) {
    const int64_t rows = imin(QB, Sq - i0);
    for (int r = 0; r < QB; ++r)
      for (int w = 0; w < NV; ++w)
        store16(qb[r] + 16 * w, r < rows ? load16(q + (i0 + r) * qs + 16 * w) * qscale : v16{});
    if (per_query)
      for (int r = 0; r < QB; ++r) fill_bias(bias + r * Skp, r < rows ? mask + (i0 + r) * mask_qs : nullptr);
    alignas(64) float mrow[QB][16];
    for (int r = 0; r < QB; ++r) store16(mrow[r], v16{} + NEG_INF);
    for (int r0 = 0; r0 < QB; r0 += SQ)
      for (int64_t j0 = jb0; j0 < jb1; j0 += KB) {
        v16 a[SQ][SKV];
        for (int r = 0; r < SQ; ++r) {
          const float* br = bias + (per_query ? (r0 + r) * Skp : 0) + j0;
          for (int s = 0; s < SKV; ++s) a[r][s] = load16(br + 16 * s);
        }
        for (int d = 0; d < D; ++d) {
          v16 kv[SKV];
          for (int s = 0; s < SKV; ++s) kv[s] = load16(kt + d * Skp + j0 + 16 * s);
          for (int r = 0; r < SQ; ++r)
            for (int s = 0; s < SKV; ++s) a[r][s] += qb[r0 + r][d] * kv[s];
        }
        for (int r = 0; r < SQ; ++r) {
          v16 m = load16(mrow[r0 + r]);
          for (int s = 0; s < SKV; ++s) {
            store16(sc + (r0 + r) * Skp + j0 + 16 * s, a[r][s]);
            m = vmax(a[r][s], m);
          }
          store16(mrow[r0 + r], m);
        }
      }
    // p = 2^(s - max s), kept unnormalised; the rows interleaved so that their dependency chains
    // (reductions, polynomials) overlap. A row whose every key is masked gets p = 0 and output 0.
    float mx[QB];
    for (int r = 0; r < QB; ++r) {
      mx[r] = hmax(load16(mrow[r]));
      if (mx[r] == NEG_INF) mx[r] = 0.f;
    }
    v16 l[QB];
    for (int r = 0; r < QB; ++r) l[r] = v16{};
    for (int64_t j = jb0; j < jb1; j += 16)
      for (int r = 0; r < QB; ++r) {
        const v16 p = exp2_nonpositive(load16(sc + r * Skp + j) - mx[r]);
        store16(sc + r * Skp + j, p);
        l[r] += p;
      }
    for (int r = 0; r < QB; ++r) {
      const float sum = hsum(l[r]);
      inv_l[r] = sum > 0.f ? 1.f / sum : 0.f;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += RP) {
      v16 o[RP][NV];
      for (int r = 0; r < RP; ++r)
        for (int w = 0; w < NV; ++w) o[r][w] = v16{};
      for (int64_t j = jlo; j < jhi; ++j) {
        v16 vv[NV];
        for (int w = 0; w < NV; ++w) vv[w] = load16(v + j * vs + 16 * w);
        for (int r = 0; r < RP; ++r) {
          const float p = sc[(r0 + r) * Skp + j];
          for (int w = 0; w < NV; ++w) o[r][w] += p * vv[w];
        }
      }
      for (int r = 0; r < RP && r0 + r < rows; ++r)
        for (int w = 0; w < NV; ++w) store16(out + (i0 + r0 + r) * os + 16 * w, o[r][w] * inv_l[r0 + r]);
    }
  }
}

// Every (batch, head) of a: see attention_head.
void attention(const Parallel& par, const Attention& a) {
  const int64_t B = a.B, H = a.H, Sq = a.Sq, Sk = a.Sk, D = a.D;
  const int64_t Skp = (Sk + 31) / 32 * 32;
  parallel_for(par, B * H, 1, [&](int64_t begin, int64_t end) {
    Buffer buf((D * Skp + 2 * QB * Skp) * 4);
    float* kt = reinterpret_cast<float*>(buf.get());
    float* scores = kt + D * Skp;
    float* bias = scores + QB * Skp;
    // The next head's rows are scattered 128-byte pieces of the [batch, seq, heads * dim]
    // projections that the hardware prefetchers do not follow: ask for them into L2 while this
    // head computes (measured: the misses cost as much as the arithmetic).
    auto prefetch = [&](int64_t item) {
      const int64_t b = item / H, h = item % H;
      const float* bases[3] = {a.q + b * a.q_stride[0] + h * a.q_stride[1],
                               a.k + b * a.k_stride[0] + h * a.k_stride[1],
                               a.v + b * a.v_stride[0] + h * a.v_stride[1]};
      const int64_t strides[3] = {a.q_stride[2], a.k_stride[2], a.v_stride[2]}, rows[3] = {Sq, Sk, Sk};
      for (int t = 0; t < 3; ++t)
        for (int64_t j = 0; j < rows[t]; ++j)
          for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(bases[t] + j * strides[t] + d, 0, 2);
    };
    for (int64_t item = begin; item < end; ++item) {
      if (item + 1 < end) prefetch(item + 1);
      const int64_t b = item / H, h = item % H;
      const float* qh = a.q + b * a.q_stride[0] + h * a.q_stride[1];
      const float* kh = a.k + b * a.k_stride[0] + h * a.k_stride[1];
      const float* vh = a.v + b * a.v_stride[0] + h * a.v_stride[1];
      const float* mh = a.mask ? a.mask + b * a.mask_b : nullptr;
      float* oh = a.out + b * Sq * H * D + h * D;
      auto run = [&](auto nv) {
        attention_head<decltype(nv)::value>(qh, a.q_stride[2], kh, a.k_stride[2], vh, a.v_stride[2], mh,
                                            a.mask_q, Sq, Sk, Skp, a.scale, oh, H * D, kt, scores, bias);
      };
      switch (D / 16) {
        case 1: run(Const<1>{}); break;
        case 2: run(Const<2>{}); break;
        case 3: run(Const<3>{}); break;
        case 4: run(Const<4>{}); break;
        case 5: run(Const<5>{}); break;
        case 6: run(Const<6>{}); break;
        case 7: run(Const<7>{}); break;
        default: run(Const<8>{}); break;
      }
    }
  });
}
