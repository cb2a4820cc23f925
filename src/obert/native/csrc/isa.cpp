// The kernels for one instruction set: compiled once per set with its target flags and
// -DOBERT_ISA=<name> (avx2: -mavx2 -mfma, ...), each into its own namespace, so one extension
// carries every x86 path and binding.cpp picks one at run time from the CPU's features.
// Nothing from PyTorch or the C++ library's templates is used here (see api.h).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "api.h"

#ifndef OBERT_ISA
#error "compile with -DOBERT_ISA=<name> (generic, avx2, avxvnni, avx512, avx512_vnni)"
#endif
#define OBERT_CAT2(a, b) a##b
#define OBERT_CAT(a, b) OBERT_CAT2(a, b)
#define OBERT_STR2(a) #a
#define OBERT_STR(a) OBERT_STR2(a)

namespace obert {
namespace OBERT_CAT(isa_, OBERT_ISA) {
namespace {
#include "vec.h"
#include "sparse_linear.h"
#include "sparse_int8.h"
#include "attention.h"
#include "layer_norm.h"
#include "batched.h"
}  // namespace
}  // namespace OBERT_CAT(isa_, OBERT_ISA)

const Table* OBERT_CAT(table_, OBERT_ISA)() {
  namespace k = OBERT_CAT(isa_, OBERT_ISA);
  // constexpr: taking the table runs no code of this instruction set (the glue takes every table
  // before it knows which ones the CPU runs).
  static constexpr Table table{OBERT_STR(OBERT_ISA), k::sparse_linear, k::sparse_ffn,
                               k::sparse_linear_int8, k::sparse_ffn_int8, k::attention,
                               k::add_layer_norm, k::gram_lower, k::spd_inverse,
                               k::spd_solve};
  return &table;
}

}  // namespace obert
