// LayerNorm(x + residual) in one pass over the rows (BERT's output blocks): torch runs the add
// and the norm as two passes over the activations, each reading and writing them in memory.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "vec.h"

// out[t] = (s - mean s) / sqrt(var s + eps) * w + b with s = x[t] + r[t] (biased variance,
// two passes over the row while it sits in L1).
torch::Tensor add_layer_norm(torch::Tensor x, torch::Tensor r, torch::Tensor w, torch::Tensor b,
                             double eps) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == r.sizes(), "x and residual must be the same 2-D shape");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && r.scalar_type() == torch::kFloat32 &&
              w.scalar_type() == torch::kFloat32 && b.scalar_type() == torch::kFloat32,
              "add_layer_norm takes float32 tensors");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(w.numel() == N && b.numel() == N, "weight and bias must have one entry per column");
  x = x.contiguous(), r = r.contiguous(), w = w.contiguous(), b = b.contiguous();
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = r.data_ptr<float>();
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t NV = N / 16 * 16;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *xr = xp + t * N, *rr = rp + t * N;
      float* o = op + t * N;
      v16 acc{};
      int64_t i = 0;
      for (; i < NV; i += 16) {
        const v16 s = load16(xr + i) + load16(rr + i);
        store16(o + i, s);
        acc += s;
      }
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += acc[j];
      for (; i < N; ++i) sum += (o[i] = xr[i] + rr[i]);
      const float mean = sum / N;
      v16 sq{};
      for (i = 0; i < NV; i += 16) {
        const v16 d = load16(o + i) - mean;
        sq += d * d;
      }
      float var = 0.f;
      for (int j = 0; j < 16; ++j) var += sq[j];
      for (; i < N; ++i) var += (o[i] - mean) * (o[i] - mean);
      const float rstd = 1.f / std::sqrt(var / N + static_cast<float>(eps));
      for (i = 0; i < NV; i += 16)
        store16(o + i, (load16(o + i) - mean) * rstd * load16(wp + i) + load16(bp + i));
      for (; i < N; ++i) o[i] = (o[i] - mean) * rstd * wp[i] + bp[i];
    }
  });
  return out;
}
