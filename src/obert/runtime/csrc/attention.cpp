// Attention of encoder inference on CPU: out = softmax(scale q k^T + mask) v for every (batch,
// head), written straight in the [batch, query, head, dim] layout the next Linear reads.
//
// Per head: k is transposed once into kt[d][key] (keys padded to 32 with masked zeros); then 8
// queries at a time: their scores against 32 keys at a time sit in 16 vector accumulators (one
// broadcast of q per 2 FMAs), the softmax runs over the score rows in cache, and p v
// accumulates 8 (D <= 32), 4 (D <= 64) or 2 query rows x D in registers. Work items are
// (batch, head) pairs. Shapes with head dims that are not a multiple of 16 (or above 128) are left
// to PyTorch by the caller.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

constexpr int QB = 8;  // query rows per block
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float hmax(v16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(reinterpret_cast<const __m512&>(v));
#else
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
#endif
}

inline float hsum(v16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<const __m512&>(v));
#else
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

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
  constexpr int RP = NV <= 2 ? 8 : (NV <= 4 ? 4 : 2);  // query rows per p v block
  constexpr float LOG2E = 1.44269504f;
  int64_t j0 = 0;
#if defined(__AVX512F__)
  for (; j0 + 16 <= Sk; j0 += 16)  // 16 keys x 16 dims at a time through registers
    for (int d = 0; d < D; d += 16) transpose16(k + j0 * ks + d, ks, kt + d * Skp + j0, Skp);
#endif
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
    const int64_t rows = std::min<int64_t>(QB, Sq - i0);
    for (int r = 0; r < QB; ++r)
      for (int w = 0; w < NV; ++w)
        store16(qb[r] + 16 * w, r < rows ? load16(q + (i0 + r) * qs + 16 * w) * qscale : v16{});
    if (per_query)
      for (int r = 0; r < QB; ++r) fill_bias(bias + r * Skp, r < rows ? mask + (i0 + r) * mask_qs : nullptr);
    v16 mrow[QB];
    for (int r = 0; r < QB; ++r) mrow[r] = v16{} + NEG_INF;
    for (int64_t j0 = jb0; j0 < jb1; j0 += 32) {
      v16 a[QB][2];
      for (int r = 0; r < QB; ++r) {
        const float* br = bias + (per_query ? r * Skp : 0) + j0;
        a[r][0] = load16(br);
        a[r][1] = load16(br + 16);
      }
      for (int d = 0; d < D; ++d) {
        const v16 k0 = load16(kt + d * Skp + j0), k1 = load16(kt + d * Skp + j0 + 16);
        for (int r = 0; r < QB; ++r) {
          a[r][0] += qb[r][d] * k0;
          a[r][1] += qb[r][d] * k1;
        }
      }
      for (int r = 0; r < QB; ++r) {
        store16(sc + r * Skp + j0, a[r][0]);
        store16(sc + r * Skp + j0 + 16, a[r][1]);
        const v16 m = a[r][0] > a[r][1] ? a[r][0] : a[r][1];
        mrow[r] = m > mrow[r] ? m : mrow[r];
      }
    }
    // p = 2^(s - max s), kept unnormalised; the rows interleaved so that their dependency chains
    // (reductions, polynomials) overlap. A row whose every key is masked gets p = 0 and output 0.
    float mx[QB];
    for (int r = 0; r < QB; ++r) {
      mx[r] = hmax(mrow[r]);
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

}  // namespace

// q [B, H, Sq, D], k and v [B, H, Sk, D] (float32, any strides with a contiguous last dim);
// mask: additive float32 [B or 1, Sq or 1, Sk], contiguous, or none. Returns [B, Sq, H, D].
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                        c10::optional<torch::Tensor> mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [batch, heads, seq, dim]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
              v.scalar_type() == torch::kFloat32, "q, k, v must be float32");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H &&
              v.size(2) == Sk && k.size(3) == D && v.size(3) == D, "q, k, v shapes do not match");
  TORCH_CHECK(D % 16 == 0 && D <= 128, "head dim must be a multiple of 16, at most 128");
  if (q.stride(3) != 1) q = q.contiguous();
  if (k.stride(3) != 1) k = k.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  const float* mp = nullptr;
  int64_t mb = 0, mq = 0;
  torch::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == torch::kFloat32 && m.dim() == 3 && (m.size(0) == 1 || m.size(0) == B) &&
                (m.size(1) == 1 || m.size(1) == Sq) && m.size(2) == Sk, "mask must be float32 [B|1, Sq|1, Sk]");
    mp = m.data_ptr<float>();
    mq = m.size(1) == 1 ? 0 : Sk;
    mb = m.size(0) == 1 ? 0 : m.size(1) * Sk;
  }
  auto out = torch::empty({B, Sq, H, D}, q.options());
  if (B * H * Sq == 0) return out;
  const int64_t Skp = (Sk + 31) / 32 * 32;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(D * Skp + 2 * QB * Skp + 16);
    float* kt = buf.data();
    float* scores = kt + D * Skp;
    float* bias = scores + QB * Skp;
    // The next head's rows are scattered 128-byte pieces of the [batch, seq, heads * dim]
    // projections that the hardware prefetchers do not follow: ask for them into L2 while this
    // head computes (measured: the misses cost as much as the arithmetic).
    auto prefetch = [&](int64_t item) {
      const int64_t b = item / H, h = item % H;
      const float* bases[3] = {qp + b * q.stride(0) + h * q.stride(1), kp + b * k.stride(0) + h * k.stride(1),
                               vp + b * v.stride(0) + h * v.stride(1)};
      const int64_t strides[3] = {q.stride(2), k.stride(2), v.stride(2)}, rows[3] = {Sq, Sk, Sk};
      for (int t = 0; t < 3; ++t)
        for (int64_t j = 0; j < rows[t]; ++j)
          for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(bases[t] + j * strides[t] + d, 0, 2);
    };
    for (int64_t item = begin; item < end; ++item) {
      if (item + 1 < end) prefetch(item + 1);
      const int64_t b = item / H, h = item % H;
      const float* qh = qp + b * q.stride(0) + h * q.stride(1);
      const float* kh = kp + b * k.stride(0) + h * k.stride(1);
      const float* vh = vp + b * v.stride(0) + h * v.stride(1);
      const float* mh = mp ? mp + b * mb : nullptr;
      float* oh = op + b * Sq * H * D + h * D;
      auto run = [&](auto nv) {
        attention_head<decltype(nv)::value>(qh, q.stride(2), kh, k.stride(2), vh, v.stride(2), mh, mq,
                                            Sq, Sk, Skp, sc, oh, H * D, kt, scores, bias);
      };
      switch (D / 16) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        case 4: run(std::integral_constant<int, 4>{}); break;
        case 5: run(std::integral_constant<int, 5>{}); break;
        case 6: run(std::integral_constant<int, 6>{}); break;
        case 7: run(std::integral_constant<int, 7>{}); break;
        default: run(std::integral_constant<int, 8>{}); break;
      }
    }
  });
  return out;
}
