// The PyTorch side of the kernels: tensor checks, outputs, the thread pool, and the choice of
// instruction set. Compiled with the baseline flags of the platform (no -march): it runs on any
// CPU of the architecture and calls into the kernel table of the instruction set asked for,
// which the caller picks from available_isas() (the ones compiled in that this CPU runs).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "api.h"

namespace {

using obert::Table;

// The kernel tables compiled into this build, lowest first (OBERT_HAVE_* set by the build).
std::vector<const Table*> compiled_tables() {
  std::vector<const Table*> t{obert::table_generic()};
#ifdef OBERT_HAVE_avx2
  t.push_back(obert::table_avx2());
#endif
#ifdef OBERT_HAVE_avxvnni
  t.push_back(obert::table_avxvnni());
#endif
#ifdef OBERT_HAVE_avx512
  t.push_back(obert::table_avx512());
#endif
#ifdef OBERT_HAVE_avx512_vnni
  t.push_back(obert::table_avx512_vnni());
#endif
  return t;
}

// Whether this CPU (and its operating system, which must save the wider registers) runs the
// instruction set: cpuid feature bits and xgetbv's enabled register state.
bool cpu_runs(const std::string& isa) {
  if (isa == "generic") return true;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!(osxsave && avx && fma)) return false;
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const bool ymm_state = (lo & 0x6) == 0x6, zmm_state = (lo & 0xe6) == 0xe6;
  if (!ymm_state || __get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17);
  const bool avx512bw = b & (1u << 30), avx512vl = b & (1u << 31), avx512vnni = c & (1u << 11);
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool avxvnni = a1 & (1u << 4);
  const bool avx512 = avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
  if (isa == "avx2") return avx2;
  if (isa == "avxvnni") return avx2 && avxvnni;
  if (isa == "avx512") return avx512;
  if (isa == "avx512_vnni") return avx512 && avx512vnni;
#endif
  return false;
}

// The compiled-in tables this CPU runs, lowest first.
const std::vector<const Table*>& usable_tables() {
  static const std::vector<const Table*> usable = [] {
    std::vector<const Table*> t;
    for (const Table* k : compiled_tables())
      if (cpu_runs(k->name)) t.push_back(k);
    return t;
  }();
  return usable;
}

// The kernel table with index `isa` into available_isas(), checked.
const Table& table(int64_t isa) {
  const auto& usable = usable_tables();
  TORCH_CHECK(isa >= 0 && isa < static_cast<int64_t>(usable.size()), "no kernel set ", isa,
              " on this CPU");
  return *usable[isa];
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const Table* k : usable_tables()) names.push_back(k->name);
  return names;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const Table* k : compiled_tables()) names.push_back(k->name);
  return names;
}

void run_parallel(int64_t n, int64_t grain, void* ctx, void (*body)(void*, int64_t, int64_t)) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { body(ctx, begin, end); });
}

obert::Parallel pool() { return {run_parallel, at::get_num_threads()}; }

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
  obert::Layer layer;
  LayerTensors(torch::Tensor sp, torch::Tensor c, torch::Tensor v, c10::optional<torch::Tensor> b,
               int64_t K, int64_t N, int64_t group, int64_t chunk, int64_t act) {
    TORCH_CHECK(sp.scalar_type() == torch::kInt64, "seg_ptr must be int64");
    TORCH_CHECK(c.scalar_type() == torch::kInt32, "col must be int32");
    TORCH_CHECK(v.scalar_type() == torch::kFloat32, "values must be float32");
    TORCH_CHECK(group == 1 || group == 4, "group must be 1 or 4");
    TORCH_CHECK(act == 0 || act == 1, "act must be 0 (none) or 1 (GELU)");
    TORCH_CHECK(chunk > 0 && chunk % group == 0, "chunk must be a positive multiple of the group");
    const int64_t chunks = (K + chunk - 1) / chunk, row_blocks = (N + obert::ROWS - 1) / obert::ROWS;
    TORCH_CHECK(sp.numel() == row_blocks * chunks * obert::ROWS + 1, "seg_ptr does not match the shape");
    seg_ptr = sp.contiguous(), col = c.contiguous(), val = v.contiguous();
    const float* bp = checked_vector(b, N, bias, "bias");
    layer = obert::Layer{seg_ptr.data_ptr<int64_t>(), col.data_ptr<int32_t>(), val.data_ptr<float>(),
                         bp, N, chunks, group, act};
  }
};

struct Layer8Tensors {
  torch::Tensor seg_ptr, col, qval, w_scale, row_sum, bias, in_mul;
  obert::Layer8 layer;
  Layer8Tensors(torch::Tensor sp, torch::Tensor c, torch::Tensor q, torch::Tensor ws,
                torch::Tensor rs, c10::optional<torch::Tensor> b, int64_t K, int64_t N,
                int64_t chunk, int64_t act, c10::optional<torch::Tensor> mul) {
    TORCH_CHECK(q.scalar_type() == torch::kInt8 && rs.scalar_type() == torch::kInt32 &&
                ws.scalar_type() == torch::kFloat32 && sp.scalar_type() == torch::kInt64 &&
                c.scalar_type() == torch::kInt32, "bad int8 weight tensors");
    TORCH_CHECK(K % 4 == 0 && chunk % 4 == 0, "int8 block4 needs K and chunk multiples of 4");
    TORCH_CHECK(act == 0 || act == 1, "act must be 0 (none) or 1 (GELU)");
    const int64_t chunks = (K + chunk - 1) / chunk, row_blocks = (N + obert::ROWS - 1) / obert::ROWS;
    TORCH_CHECK(sp.numel() == row_blocks * chunks * obert::ROWS + 1, "seg_ptr does not match the shape");
    TORCH_CHECK(ws.numel() == N && rs.numel() == N, "w_scale and row_sum must have N entries");
    seg_ptr = sp.contiguous(), col = c.contiguous(), qval = q.contiguous();
    w_scale = ws.contiguous(), row_sum = rs.contiguous();
    const float* bp = checked_vector(b, N, bias, "bias");
    const float* mp = checked_vector(mul, K, in_mul, "in_mul");
    layer = obert::Layer8{seg_ptr.data_ptr<int64_t>(), col.data_ptr<int32_t>(), qval.data_ptr<int8_t>(),
                          w_scale.data_ptr<float>(), row_sum.data_ptr<int32_t>(), bp, N, chunks, act, mp};
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
                            int64_t group, int64_t chunk, int64_t tt, int64_t act, int64_t isa) {
  const Table& k = table(isa);
  x = check_input(x);
  check_tile(tt);
  const int64_t T = x.size(0), K = x.size(1);
  const LayerTensors L(seg_ptr, col, val, bias, K, N, group, chunk, act);
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  k.sparse_linear(pool(), x.data_ptr<float>(), T, K, L.layer, tt, y.data_ptr<float>());
  return y;
}

// y = W2 act1(W1 x + b1) + b2 (layer 2's input size is layer 1's output size).
torch::Tensor sparse_ffn(torch::Tensor x, torch::Tensor seg1, torch::Tensor col1, torch::Tensor val1,
                         c10::optional<torch::Tensor> bias1, int64_t H, int64_t group1, int64_t chunk1,
                         int64_t act1, torch::Tensor seg2, torch::Tensor col2, torch::Tensor val2,
                         c10::optional<torch::Tensor> bias2, int64_t N, int64_t group2, int64_t chunk2,
                         int64_t tt, int64_t isa) {
  const Table& k = table(isa);
  x = check_input(x);
  check_tile(tt);
  const int64_t T = x.size(0), K = x.size(1);
  const LayerTensors L1(seg1, col1, val1, bias1, K, H, group1, chunk1, act1);
  const LayerTensors L2(seg2, col2, val2, bias2, H, N, group2, chunk2, 0);
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  k.sparse_ffn(pool(), x.data_ptr<float>(), T, K, L1.layer, L2.layer, tt, y.data_ptr<float>());
  return y;
}

torch::Tensor sparse_linear_int8(torch::Tensor x, torch::Tensor seg_ptr, torch::Tensor col,
                                 torch::Tensor qval, torch::Tensor w_scale, torch::Tensor row_sum,
                                 c10::optional<torch::Tensor> bias, int64_t N, int64_t chunk,
                                 int64_t act, c10::optional<torch::Tensor> in_mul, int64_t isa) {
  const Table& k = table(isa);
  x = check_input(x);
  const int64_t T = x.size(0), K = x.size(1);
  const Layer8Tensors L(seg_ptr, col, qval, w_scale, row_sum, bias, K, N, chunk, act, in_mul);
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  k.sparse_linear_int8(pool(), x.data_ptr<float>(), T, K, L.layer, y.data_ptr<float>());
  return y;
}

torch::Tensor sparse_ffn_int8(torch::Tensor x, torch::Tensor seg1, torch::Tensor col1,
                              torch::Tensor q1, torch::Tensor ws1, torch::Tensor rs1,
                              c10::optional<torch::Tensor> bias1, int64_t H, int64_t chunk1,
                              int64_t act1, torch::Tensor seg2, torch::Tensor col2,
                              torch::Tensor q2, torch::Tensor ws2, torch::Tensor rs2,
                              c10::optional<torch::Tensor> bias2, int64_t N, int64_t chunk2,
                              c10::optional<torch::Tensor> mul1, c10::optional<torch::Tensor> mul2,
                              int64_t isa) {
  const Table& k = table(isa);
  x = check_input(x);
  const int64_t T = x.size(0), K = x.size(1);
  const Layer8Tensors L1(seg1, col1, q1, ws1, rs1, bias1, K, H, chunk1, act1, mul1);
  const Layer8Tensors L2(seg2, col2, q2, ws2, rs2, bias2, H, N, chunk2, 0, mul2);
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  k.sparse_ffn_int8(pool(), x.data_ptr<float>(), T, K, L1.layer, L2.layer, y.data_ptr<float>());
  return y;
}

// q [B, H, Sq, D], k and v [B, H, Sk, D] (float32, any strides with a contiguous last dim);
// mask: additive float32 [B or 1, Sq or 1, Sk], contiguous, or none. Returns [B, Sq, H, D].
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                        c10::optional<torch::Tensor> mask, double scale, int64_t isa) {
  const Table& kt = table(isa);
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
  obert::Attention a{};
  torch::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == torch::kFloat32 && m.dim() == 3 && (m.size(0) == 1 || m.size(0) == B) &&
                (m.size(1) == 1 || m.size(1) == Sq) && m.size(2) == Sk, "mask must be float32 [B|1, Sq|1, Sk]");
    a.mask = m.data_ptr<float>();
    a.mask_q = m.size(1) == 1 ? 0 : Sk;
    a.mask_b = m.size(0) == 1 ? 0 : m.size(1) * Sk;
  }
  auto out = torch::empty({B, Sq, H, D}, q.options());
  if (B * H * Sq == 0) return out;
  a.q = q.data_ptr<float>(), a.k = k.data_ptr<float>(), a.v = v.data_ptr<float>();
  a.B = B, a.H = H, a.Sq = Sq, a.Sk = Sk, a.D = D;
  for (int i = 0; i < 3; ++i) a.q_stride[i] = q.stride(i), a.k_stride[i] = k.stride(i), a.v_stride[i] = v.stride(i);
  a.scale = static_cast<float>(scale);
  a.out = out.data_ptr<float>();
  kt.attention(pool(), a);
  return out;
}

// LayerNorm(x + residual) over the last dim.
torch::Tensor add_layer_norm(torch::Tensor x, torch::Tensor r, torch::Tensor w, torch::Tensor b,
                             double eps, int64_t isa) {
  const Table& k = table(isa);
  TORCH_CHECK(x.dim() == 2 && x.sizes() == r.sizes(), "x and residual must be the same 2-D shape");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && r.scalar_type() == torch::kFloat32 &&
              w.scalar_type() == torch::kFloat32 && b.scalar_type() == torch::kFloat32,
              "add_layer_norm takes float32 tensors");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(w.numel() == N && b.numel() == N, "weight and bias must have one entry per column");
  x = x.contiguous(), r = r.contiguous(), w = w.contiguous(), b = b.contiguous();
  auto out = torch::empty_like(x);
  k.add_layer_norm(pool(), x.data_ptr<float>(), r.data_ptr<float>(), w.data_ptr<float>(),
                   b.data_ptr<float>(), T, N, static_cast<float>(eps), out.data_ptr<float>());
  return out;
}

// Float32 contiguous CPU tensor check for the batched kernels.
void check_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              what, " must be a contiguous float32 CPU tensor");
}

// out [nb, B, B] += lower triangle of G_b^T G_b for the blocks of B columns of g [rows, nb * B]
// (rows may have a stride; columns contiguous). The strict upper triangle is not touched.
void gram_lower(torch::Tensor g, torch::Tensor out, int64_t isa) {
  const Table& k = table(isa);
  check_f32(out, "out");
  TORCH_CHECK(g.dim() == 2 && g.scalar_type() == torch::kFloat32 && g.device().is_cpu(),
              "g must be a 2-D float32 CPU tensor");
  if (g.stride(1) != 1) g = g.contiguous();
  TORCH_CHECK(out.dim() == 3 && out.size(1) == out.size(2) && out.size(1) > 0 &&
              out.size(0) * out.size(1) == g.size(1), "out must be [nb, B, B] with nb * B = g's columns");
  if (g.size(0) == 0 || out.size(0) == 0) return;
  k.gram_lower(pool(), g.data_ptr<float>(), g.size(0), g.stride(0), out.size(0), out.size(1),
               out.data_ptr<float>());
}

// a [N, n, n] <- (scale a + diag(shift))^-1 in place (lower triangles read); returns info [N] int32.
torch::Tensor spd_inverse(torch::Tensor a, double scale, c10::optional<torch::Tensor> shift, int64_t isa) {
  const Table& k = table(isa);
  check_f32(a, "a");
  TORCH_CHECK(a.dim() == 3 && a.size(1) == a.size(2), "a must be [N, n, n]");
  const int64_t N = a.size(0), n = a.size(1);
  torch::Tensor sh;
  const float* sp = checked_vector(shift, N, sh, "shift");
  auto info = torch::zeros({N}, a.options().dtype(torch::kInt32));
  if (N == 0 || n == 0) return info;
  k.spd_inverse(pool(), a.data_ptr<float>(), N, n, static_cast<float>(scale), sp,
                info.data_ptr<int32_t>());
  return info;
}

// x [N, n] = S^-1 rhs for S = a [N, n, n] or its masked system (mask [N, n] of 0/1: A_PP on P, the
// identity elsewhere); returns (x, info).
std::vector<torch::Tensor> spd_solve(torch::Tensor a, torch::Tensor rhs, c10::optional<torch::Tensor> mask,
                                     int64_t isa) {
  const Table& k = table(isa);
  check_f32(a, "a");
  TORCH_CHECK(a.dim() == 3 && a.size(1) == a.size(2), "a must be [N, n, n]");
  const int64_t N = a.size(0), n = a.size(1);
  rhs = rhs.contiguous();
  check_f32(rhs, "rhs");
  TORCH_CHECK(rhs.numel() == N * n, "rhs must be [N, n]");
  torch::Tensor m;
  const float* mp = checked_vector(mask, N * n, m, "mask");
  auto x = torch::empty({N, n}, a.options());
  auto info = torch::zeros({N}, a.options().dtype(torch::kInt32));
  if (N == 0 || n == 0) return {x, info};
  k.spd_solve(pool(), a.data_ptr<float>(), mp, rhs.data_ptr<float>(), N, n, x.data_ptr<float>(),
              info.data_ptr<int32_t>());
  return {x, info};
}

}  // namespace

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
  m.def("gram_lower", &gram_lower, "out[b] += lower triangle of G_b^T G_b (blocks of B columns of g)");
  m.def("spd_inverse", &spd_inverse, "in-place (scale a + diag(shift))^-1 of a batch of SPD matrices; info");
  m.def("spd_solve", &spd_solve, "solve a batch of SPD (or masked SPD) systems; (x, info)");
  m.def("available_isas", &available_isas,
        "the instruction sets compiled in that this CPU runs, lowest first (the index is the isa argument)");
  m.def("compiled_isas", &compiled_isas, "the instruction sets compiled into this build");
  m.attr("ROWS") = obert::ROWS;
  m.attr("INT8_TILE") = obert::INT8_TILE;
}
