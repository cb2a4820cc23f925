// Sparse y = x W^T + b for pruned weights, vectorised over tokens.
//
// Layout: W (N x K) is stored by output row. Unstructured: CSR (row_ptr[N+1], col[nnz], val[nnz]).
// Block4: rows hold blocks of 4 consecutive input weights (row_ptr[N+1] counts blocks, col[b] is
// the first input index k of block b, val[4 b .. 4 b + 3] its weights).
//
// x (T x K) is packed into tiles of TILE tokens, transposed: xt[tile][k][TILE]. For one output row
// and one tile, every non-zero w(n, k) does acc[0..TILE) += w * xt[tile][k][0..TILE): TILE
// independent FMAs on contiguous memory, which the compiler turns into vector FMAs (AVX2 /
// AVX-512 with -march=native). Each thread handles a block of ROWS output rows for one tile; its
// accumulators go through a small scratch so that y is written row-major (T x N) in runs of
// ROWS contiguous floats, without a transpose pass over y.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t TILE = 64;  // tokens per tile: 4 AVX-512 vectors or 8 AVX2 vectors of floats
constexpr int64_t ROWS = 16;  // output rows per work item

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

// 16 floats: one AVX-512 register, two AVX2 registers (GCC vector extension, so the same
// source compiles to whatever -march=native offers; explicit vectors stop GCC from
// vectorising the loop over non-zeros with gathers instead of the loop over tokens).
typedef float v16 __attribute__((vector_size(64), aligned(4)));
static_assert(TILE == 64, "row_tile keeps 4 vectors of 16 tokens");

inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store16(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

template <int G>
inline void row_tile(const float* __restrict xt, const int32_t* __restrict col,
                     const float* __restrict val, int64_t b0, int64_t b1, float bias,
                     float* __restrict acc) {
  v16 a0 = v16{} + bias, a1 = a0, a2 = a0, a3 = a0;
  for (int64_t b = b0; b < b1; ++b) {
    const float* xk = xt + static_cast<int64_t>(col[b]) * TILE;
    for (int j = 0; j < G; ++j) {
      const float w = val[G * b + j];
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
void sparse_linear_impl(const float* xt, int64_t T, int64_t K, int64_t N, const int32_t* row_ptr,
                        const int32_t* col, const float* val, const float* bias, float* y) {
  const int64_t tiles = (T + TILE - 1) / TILE;
  const int64_t row_blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, tiles * row_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[ROWS][TILE];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / row_blocks, rb = item % row_blocks;
      const int64_t n0 = rb * ROWS, rows = std::min(ROWS, N - n0);
      const float* xtile = xt + tile * K * TILE;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        row_tile<G>(xtile, col, val, row_ptr[n], row_ptr[n + 1], bias ? bias[n] : 0.f,
                    scratch[r]);
      }
      const int64_t t0 = tile * TILE, tn = std::min(TILE, T - t0);
      for (int64_t i = 0; i < tn; ++i) {
        float* dst = y + (t0 + i) * N + n0;
        for (int64_t r = 0; r < rows; ++r) dst[r] = scratch[r][i];
      }
    }
  });
}

torch::Tensor sparse_linear(torch::Tensor x, torch::Tensor row_ptr, torch::Tensor col,
                            torch::Tensor val, c10::optional<torch::Tensor> bias, int64_t N,
                            int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be a 2-D float32 tensor");
  TORCH_CHECK(row_ptr.scalar_type() == torch::kInt32 && col.scalar_type() == torch::kInt32,
              "indices must be int32");
  TORCH_CHECK(val.scalar_type() == torch::kFloat32, "values must be float32");
  TORCH_CHECK(group == 1 || group == 4, "group must be 1 or 4");
  TORCH_CHECK(row_ptr.numel() == N + 1, "row_ptr must have N + 1 entries");
  x = x.contiguous();
  const int64_t T = x.size(0), K = x.size(1);
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
  auto rp = row_ptr.contiguous(), c = col.contiguous(), v = val.contiguous();
  if (group == 1)
    sparse_linear_impl<1>(xt.data_ptr<float>(), T, K, N, rp.data_ptr<int32_t>(),
                          c.data_ptr<int32_t>(), v.data_ptr<float>(), b, y.data_ptr<float>());
  else
    sparse_linear_impl<4>(xt.data_ptr<float>(), T, K, N, rp.data_ptr<int32_t>(),
                          c.data_ptr<int32_t>(), v.data_ptr<float>(), b, y.data_ptr<float>());
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", &sparse_linear, "y = x W^T + b with W in CSR (group 1) or block4 (group 4) form");
}
