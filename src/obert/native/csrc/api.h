// The interface between the PyTorch glue (binding.cpp) and the kernels (isa.cpp, compiled once
// per instruction set with its own target flags). Plain structs and function pointers only: the
// kernel objects include no PyTorch or C++ library templates, so no inline function compiled for
// one instruction set can be shared (merged by the linker) with the code of another.
#pragma once
#include <cstdint>

namespace obert {

// Work sharing, supplied by the glue (at::parallel_for, so PyTorch's thread pool and settings):
// run(n, grain, ctx, body) calls body(ctx, begin, end) over disjoint ranges covering [0, n).
struct Parallel {
  void (*run)(int64_t n, int64_t grain, void* ctx, void (*body)(void*, int64_t, int64_t));
  int64_t threads;
};

// One float32 sparse layer in segment form (see sparse_linear.h): act 0 none, 1 GELU.
struct Layer {
  const int64_t* seg_ptr;
  const int32_t* col;
  const float* val;
  const float* bias;  // may be null
  int64_t N, chunks, group, act;
};

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

// softmax(scale q k^T + mask) v for every (batch, head); strides in floats.
struct Attention {
  const float *q, *k, *v, *mask;  // mask: additive [B or 1][Sq or 1][Sk] or null
  int64_t B, H, Sq, Sk, D;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, sequence
  int64_t mask_b, mask_q;  // mask strides (0: broadcast)
  float scale;
  float* out;  // [B][Sq][H][D]
};

// The kernels of one instruction set.
struct Table {
  const char* name;
  void (*sparse_linear)(const Parallel&, const float* x, int64_t T, int64_t K, const Layer&,
                        int64_t tile, float* y);
  void (*sparse_ffn)(const Parallel&, const float* x, int64_t T, int64_t K, const Layer&,
                     const Layer&, int64_t tile, float* y);
  void (*sparse_linear_int8)(const Parallel&, const float* x, int64_t T, int64_t K, const Layer8&,
                             float* y);
  void (*sparse_ffn_int8)(const Parallel&, const float* x, int64_t T, int64_t K, const Layer8&,
                          const Layer8&, float* y);
  void (*attention)(const Parallel&, const Attention&);
  void (*add_layer_norm)(const Parallel&, const float* x, const float* r, const float* w,
                         const float* b, int64_t T, int64_t N, float eps, float* out);
  // Batched small matrices (batched.h).
  void (*gram_lower)(const Parallel&, const float* g, int64_t rows, int64_t ld, int64_t nb,
                     int64_t B, float* out);
  void (*spd_inverse)(const Parallel&, float* a, int64_t N, int64_t n, float scale,
                      const float* shift, int32_t* info);
  void (*spd_solve)(const Parallel&, const float* a, const float* mask, const float* rhs, int64_t N,
                    int64_t n, float* x, int32_t* info);
};

#ifndef OBERT_ROWS
#error "build with -DOBERT_ROWS (obert/native: ROWS, the saved layout's rows per block)"
#endif
constexpr int64_t ROWS = OBERT_ROWS;  // output rows per work item of the sparse kernels
static_assert(ROWS == 16, "the register transposes of the output are 16 x 16");
constexpr int64_t INT8_TILE = 64;  // tokens per tile of the int8 kernels (four 512-bit or eight
                                   // 256-bit accumulators per segment)

// One per instruction set compiled in (isa.cpp with OBERT_ISA_NAME and OBERT_TABLE set).
const Table* table_generic();
const Table* table_avx2();
const Table* table_avxvnni();
const Table* table_avx512();
const Table* table_avx512_vnni();

}  // namespace obert
