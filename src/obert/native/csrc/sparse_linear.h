// Sparse y = x W^T + b for pruned weights, vectorised over tokens (included by isa.cpp inside
// the namespace of one instruction set).
//
// Weight layout ("segments"): the N output rows are cut into blocks of ROWS rows and the K inputs
// into chunks of KC columns. Segment s = (row_block * chunks + chunk) * ROWS + r lists the
// non-zeros of row row_block * ROWS + r inside that chunk: seg_ptr[s] .. seg_ptr[s + 1] index
// col (input index k) and val. Unstructured (group 1): one weight per entry. Block4 (group 4):
// one entry per block of 4 consecutive input weights, col its first k, val[4 e .. 4 e + 3].
//
// x (T x K) is packed into tiles of TT tokens, transposed: xt[k][TT], so one non-zero w at
// (n, k) is acc_n[0..TT) += w * xt[k][0..TT): TT / 16 16-float FMAs from one broadcast. What
// limits the loop is loads and branches, not FMAs: every FMA needs a 64-byte load of xt and
// every non-zero two more (index, value), and every segment ends in a mispredicted branch and an
// accumulator round trip. Measured in one process, interleaved (1 thread, 90%): wide tiles
// (32-64 tokens) beat 16 even though 16-token tiles of a 768-wide input would fit L1 and wider
// ones do not, and whole rows beat L1-sized chunks of 96-192 columns; so rows are whole up to
// K = 1024 (384-column chunks above), and the caller picks 64-token tiles for short inputs, 32
// for long ones. The accumulators must stay in registers: with AVX-512's 32 registers two
// accumulator sets per row hide the FMA latency; with AVX2's 16 one set of TT / 8 registers
// (8 for 64 tokens: as many chains as two FMA pipes of latency 4 need) leaves room for the
// operands, where two sets spilled to the stack on every FMA. Accumulators of a ROWS-row block
// live in a ROWS x TT scratch and go to y row-major through a 16 x 16 register transpose, so y
// needs no transpose pass.

#if defined(__AVX512F__)
constexpr bool kTwoAccumulatorSets = true;
#else
constexpr bool kTwoAccumulatorSets = false;
#endif

// Epilogue of one accumulator row (n a multiple of 16): act 0 none, 1 GELU.
inline void activate(float* row, int64_t n, int64_t act) {
  if (act == 1)
    for (int64_t i = 0; i < n; i += 16) store16(row + i, gelu16(load16(row + i)));
}

// y[t0 + i][n0 + r] = acc[r * stride + i] for i < tn, r < rows (y has N columns).
inline void write_block(const float* acc, int64_t stride, int64_t tn, int64_t rows, float* y,
                        int64_t N) {
  int64_t i = 0;
  if (rows == ROWS)  // whole 16 x 16 blocks: transpose in registers, whole-vector stores per token
    for (; i + 16 <= tn; i += 16) transpose16(acc + i, stride, y + i * N, N);
  for (; i < tn; ++i)
    for (int64_t r = 0; r < rows; ++r) y[i * N + r] = acc[r * stride + i];
}

// dst[k][tt] = x[tile * tt + i][k] for one tile (tokens past T are zero).
inline void pack_tile(const float* x, int64_t T, int64_t K, int64_t tt, int64_t tile, float* dst) {
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t kn = imin(16, K - k0);
    for (int64_t i0 = 0; i0 < tt; i0 += 16) {
      const int64_t t0 = tile * tt + i0, n = imax(0, imin(16, T - t0));
      if (n == 16 && kn == 16) {  // x[t0 .. t0+16][k0 .. k0+16] -> dst[k][i0 .. i0+16]
        transpose16(x + t0 * K + k0, K, dst + k0 * tt + i0, tt);
        continue;
      }
      for (int64_t k = 0; k < kn; ++k)
        for (int64_t i = 0; i < 16; ++i)
          dst[(k0 + k) * tt + i0 + i] = i < n ? x[(t0 + i) * K + k0 + k] : 0.f;
    }
  }
}

// Runs compute(tile, row_block, packed) over every (tile, row block) pair. With enough tiles,
// each thread packs one tile at a time into its own buffer and runs every row block on it while
// it sits in L2, so the packed copy of x never travels through memory (at 2,048 tokens packing
// everything first cost as much as the non-zeros). With few tiles (short inputs), everything is
// packed first and the pairs are shared out, so both threads get work.
template <class Pack, class Compute>
void for_tiles(const Parallel& par, int64_t tiles, int64_t row_blocks, int64_t tile_bytes,
               const Pack& pack, const Compute& compute) {
  if (tiles >= 2 * par.threads) {
    parallel_for(par, tiles, 1, [&](int64_t begin, int64_t end) {
      Buffer buf(tile_bytes);
      for (int64_t tile = begin; tile < end; ++tile) {
        pack(tile, buf.get());
        for (int64_t rb = 0; rb < row_blocks; ++rb) compute(tile, rb, buf.get());
      }
    });
    return;
  }
  Buffer all(tiles * tile_bytes);
  uint8_t* base = all.get();
  parallel_for(par, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) pack(tile, base + tile * tile_bytes);
  });
  parallel_for(par, tiles * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / row_blocks;
      compute(tile, item % row_blocks, base + tile * tile_bytes);
    }
  });
}

// acc[0..TT) (+)= sum over entries e0..e1 of val * xt[col] (G weights per entry).
// Always inlined: as a call per segment (GCC's choice once row_block grew) it ran 8-13% slower.
template <int G, int TT>
__attribute__((always_inline)) inline void segment(const float* __restrict xt,
                                                   const int32_t* __restrict col,
                                                   const float* __restrict val, int64_t e0,
                                                   int64_t e1, float* __restrict acc,
                                                   bool add) {
  constexpr int NV = TT / 16;
  v16 a[NV], b[NV];
  for (int v = 0; v < NV; ++v) {
    a[v] = add ? load16(acc + 16 * v) : v16{};
    b[v] = v16{};
  }
  int64_t e = e0;
  if (G == 1) {  // two entries per iteration
    for (; e + 2 <= e1; e += 2) {
      const float* xa = xt + static_cast<int64_t>(col[e]) * TT;
      const float* xb = xt + static_cast<int64_t>(col[e + 1]) * TT;
      const float wa = val[e], wb = val[e + 1];
      for (int v = 0; v < NV; ++v) {
        a[v] += wa * load16(xa + 16 * v);
        if (kTwoAccumulatorSets) b[v] += wb * load16(xb + 16 * v);
        else a[v] += wb * load16(xb + 16 * v);
      }
    }
  }
  for (; e < e1; ++e) {
    const float* xk = xt + static_cast<int64_t>(col[e]) * TT;
    for (int j = 0; j < G; ++j) {
      const float w = val[G * e + j];
      for (int v = 0; v < NV; ++v) {
        if (kTwoAccumulatorSets && j % 2) b[v] += w * load16(xk + j * TT + 16 * v);
        else a[v] += w * load16(xk + j * TT + 16 * v);
      }
    }
  }
  for (int v = 0; v < NV; ++v) store16(acc + 16 * v, kTwoAccumulatorSets ? a[v] + b[v] : a[v]);
}

// acc[r][0..TT) = act(sum_k W[n0 + r, k] xt[k][0..TT) + b[n0 + r]) for the rows of block rb
// (G the layer's group: a template argument, not a branch per segment, which cost 8-13%).
template <int G, int TT>
int64_t row_block(const float* xt, const Layer& L, int64_t rb, float (*acc)[TT]) {
  const int64_t n0 = rb * ROWS, rows = imin(ROWS, L.N - n0);
  const int64_t* sp = L.seg_ptr + rb * L.chunks * ROWS;
  for (int64_t c = 0; c < L.chunks; ++c)
    for (int64_t r = 0; r < rows; ++r)
      segment<G, TT>(xt, L.col, L.val, sp[c * ROWS + r], sp[c * ROWS + r + 1], acc[r], c > 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float b = L.bias ? L.bias[n0 + r] : 0.f;
    for (int64_t i = 0; i < TT; i += 16) store16(acc[r] + i, load16(acc[r] + i) + b);
    activate(acc[r], TT, L.act);
  }
  return rows;
}

template <int G, int TT>
void sparse_linear_impl(const Parallel& par, const float* x, int64_t T, int64_t K, const Layer& L,
                        float* y) {
  const int64_t tiles = (T + TT - 1) / TT, row_blocks = (L.N + ROWS - 1) / ROWS;
  auto pack = [&](int64_t tile, uint8_t* dst) {
    pack_tile(x, T, K, TT, tile, reinterpret_cast<float*>(dst));
  };
  auto compute = [&](int64_t tile, int64_t rb, const uint8_t* packed) {
    alignas(64) float acc[ROWS][TT];
    const int64_t rows = row_block<G, TT>(reinterpret_cast<const float*>(packed), L, rb, acc);
    const int64_t t0 = tile * TT, tn = imin(TT, T - t0);
    write_block(&acc[0][0], TT, tn, rows, y + t0 * L.N + rb * ROWS, L.N);
  };
  for_tiles(par, tiles, row_blocks, K * TT * 4, pack, compute);
}

// Both layers of a feed-forward block, y = W2 act(W1 x + b1) + b2, one token tile at a time:
// layer 1's accumulator rows (one per hidden unit, TT tokens) are layer 2's packed input rows
// as they stand, so the hidden activations never leave the thread's L2 and are never
// transposed, written to memory or packed again. Each thread runs whole tiles.
template <int G1, int G2, int TT>
void sparse_ffn_impl(const Parallel& par, const float* x, int64_t T, int64_t K, const Layer& L1,
                     const Layer& L2, float* y) {
  const int64_t tiles = (T + TT - 1) / TT, H = L1.N;
  const int64_t rb1 = (H + ROWS - 1) / ROWS, rb2 = (L2.N + ROWS - 1) / ROWS;
  parallel_for(par, tiles, 1, [&](int64_t begin, int64_t end) {
    Buffer buf((K + rb1 * ROWS) * TT * 4);
    float* xt = reinterpret_cast<float*>(buf.get());
    float* ht = xt + K * TT;
    alignas(64) float acc[ROWS][TT];
    for (int64_t tile = begin; tile < end; ++tile) {
      pack_tile(x, T, K, TT, tile, xt);
      for (int64_t rb = 0; rb < rb1; ++rb) {
        const int64_t rows = row_block<G1, TT>(xt, L1, rb, acc);
        std::memcpy(ht + rb * ROWS * TT, acc, sizeof(float) * rows * TT);
      }
      const int64_t t0 = tile * TT, tn = imin(TT, T - t0);
      for (int64_t rb = 0; rb < rb2; ++rb) {
        const int64_t rows = row_block<G2, TT>(ht, L2, rb, acc);
        write_block(&acc[0][0], TT, tn, rows, y + t0 * L2.N + rb * ROWS, L2.N);
      }
    }
  });
}

// f(tile constant) for tt in {16, 32, 64}; with_group likewise for 1 or 4.
template <int V>
struct Const {
  static constexpr int value = V;
};

template <class F>
void with_tile(int64_t tt, const F& f) {
  if (tt == 16) f(Const<16>{});
  else if (tt == 32) f(Const<32>{});
  else f(Const<64>{});
}

template <class F>
void with_group(int64_t group, const F& f) {
  if (group == 1) f(Const<1>{});
  else f(Const<4>{});
}

void sparse_linear(const Parallel& par, const float* x, int64_t T, int64_t K, const Layer& L,
                   int64_t tt, float* y) {
  with_tile(tt, [&](auto tv) {
    with_group(L.group, [&](auto gv) {
      sparse_linear_impl<decltype(gv)::value, decltype(tv)::value>(par, x, T, K, L, y);
    });
  });
}

void sparse_ffn(const Parallel& par, const float* x, int64_t T, int64_t K, const Layer& L1,
                const Layer& L2, int64_t tt, float* y) {
  with_tile(tt, [&](auto tv) {
    with_group(L1.group, [&](auto g1) {
      with_group(L2.group, [&](auto g2) {
        sparse_ffn_impl<decltype(g1)::value, decltype(g2)::value, decltype(tv)::value>(par, x, T, K, L1, L2, y);
      });
    });
  });
}
