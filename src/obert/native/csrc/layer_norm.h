// LayerNorm(x + residual) in one pass over the rows (BERT's output blocks): torch runs the add
// and the norm as two passes over the activations, each reading and writing them in memory.
// (Included by isa.cpp inside the namespace of one instruction set.)

// out[t] = (s - mean s) / sqrt(var s + eps) * w + b with s = x[t] + r[t] (biased variance,
// two passes over the row while it sits in L1).
void add_layer_norm(const Parallel& par, const float* xp, const float* rp, const float* wp,
                    const float* bp, int64_t T, int64_t N, float eps, float* op) {
  const int64_t NV = N / 16 * 16;
  parallel_for(par, T, 16, [&](int64_t begin, int64_t end) {
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
      float sum = hsum(acc);
      for (; i < N; ++i) sum += (o[i] = xr[i] + rr[i]);
      const float mean = sum / N;
      v16 sq{};
      for (i = 0; i < NV; i += 16) {
        const v16 d = load16(o + i) - mean;
        sq += d * d;
      }
      float var = hsum(sq);
      for (; i < N; ++i) var += (o[i] - mean) * (o[i] - mean);
      const float rstd = 1.f / __builtin_sqrtf(var / N + eps);
      for (i = 0; i < NV; i += 16)
        store16(o + i, (load16(o + i) - mean) * rstd * load16(wp + i) + load16(bp + i));
      for (; i < N; ++i) o[i] = (o[i] - mean) * rstd * wp[i] + bp[i];
    }
  });
}
