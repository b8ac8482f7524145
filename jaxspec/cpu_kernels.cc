// The decode step's few-row float32 work for XLA:CPU, on every core (see cpu_kernels.py for why and when).
//
//   jaxspec_matmul_nn: y[r, n] = sum_k x[r, k] * w[k, n]   (w is (K, N): the model's (in, out) weights)
//   jaxspec_matmul_nt: y[r, n] = sum_k x[r, k] * w[n, k]   (w is (N, K): the tied embedding as the head)
//   jaxspec_matmul_packed: y = x @ w for w packed in tiles of kTile columns (see pack below): the fast one, with
//                          float32 tiles or block-quantized ones that hold the same float32 values in 5-9 bits
//   jaxspec_attend:    causal attention of a few query tokens over the live part of a layer's K/V cache
//
// Work is split between the caller and a persistent pool of spinning workers, each weight byte read once, by one
// core. Every output element is computed in the same order whatever the number of rows: a 9-row verify gives
// bit-identical results to nine 1-row steps.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <initializer_list>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include <pthread.h>
#include <sched.h>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() asm volatile("yield")
#else
#define CPU_RELAX()
#endif

namespace ffi = xla::ffi;

// One vector register of floats, and how many of them may hold accumulators (the rest: weights, a broadcast).
#ifdef __AVX512F__
constexpr int kLanes = 16, kAcc = 28;
#else
constexpr int kLanes = 8, kAcc = 12;  // AVX2 (or anything else: the compiler splits or scalarizes)
#endif
typedef float v16 __attribute__((vector_size(4 * kLanes)));

static inline v16 load(const float* p) { v16 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store(float* p, v16 v) { __builtin_memcpy(p, &v, sizeof v); }
// a * b + c rounded once where the CPU has FMA, else twice; explicit, because the library is compiled with
// -ffp-contract=off: a compiler free to fuse some products and not others (it was, per template instance) would
// break the same-bits-at-any-row-count promise.
#if defined(__AVX512F__)
static inline v16 fma(v16 a, v16 b, v16 c) { return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#elif defined(__FMA__)
static inline v16 fma(v16 a, v16 b, v16 c) { return (v16)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static inline v16 fma(v16 a, v16 b, v16 c) { return a * b + c; }
#endif

static inline v16 splat(float f) {
  const v16 v = {f};
#ifdef __AVX512F__
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
#else
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// NN: y = x @ w over w's rows in panels of kPanel contiguous rows (a few sequential streams, which the
// prefetchers follow); within a panel, tiles of 2 vectors of columns are updated for kRows x rows at a time, the
// running sums in registers (between panels, in y, which stays in L1/L2). A panel's tile comes from memory for the
// first block of x rows and from L1 for the others. Each output element is summed in order k = 0, ..., K - 1
// whatever R is.
constexpr int64_t kPanel = 8;
constexpr int64_t kAhead = 2 * kPanel;  // software prefetch distance in weight rows (+15-50% at 2-9 rows)
constexpr int kRows = kAcc / 2;  // rows per register block: kRows x 2 accumulators

template <int RB, int V>
static void nn_micro(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t b0,
                     int64_t b1, int64_t k0, int64_t k1) {
  for (int64_t c = b0; c + kLanes * V <= b1; c += kLanes * V) {
    v16 acc[RB][V];
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = k0 == 0 ? v16{} : load(y + r * ldy + c + kLanes * v);
    const float* wp = w + k0 * ldw + c;
    const float* xp = x + k0;
    for (int64_t k = k0; k < k1; ++k, wp += ldw, ++xp) {
      __builtin_prefetch(wp + kAhead * ldw);
      v16 wv[V];
      for (int v = 0; v < V; ++v) wv[v] = load(wp + kLanes * v);
      for (int r = 0; r < RB; ++r) {
        const v16 xs = splat(xp[r * ldx]);
        for (int v = 0; v < V; ++v) acc[r][v] = fma(xs, wv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < V; ++v) store(y + r * ldy + c + kLanes * v, acc[r][v]);
  }
}

template <int RB>
static void nn_rows(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t b0,
                    int64_t b1, int64_t k0, int64_t k1) {
  const int64_t bt = b0 + (b1 - b0) / (2 * kLanes) * (2 * kLanes);
  nn_micro<RB, 2>(x, ldx, w, ldw, y, ldy, b0, bt, k0, k1);
  nn_micro<RB, 1>(x, ldx, w, ldw, y, ldy, bt, b1, k0, k1);
}

typedef void (*NNRows)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t,
                       int64_t);
template <int... RB>
struct NNTable {
  static constexpr NNRows fns[] = {nullptr, nn_rows<RB>...};
};
#ifdef __AVX512F__
static constexpr auto& kNNRows = NNTable<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14>::fns;
#else
static constexpr auto& kNNRows = NNTable<1, 2, 3, 4, 5, 6>::fns;
#endif

// y (R, N) = x (R, K) @ w (K, N), each with its own row stride.
static void nn(const float* x, int64_t R, int64_t K, int64_t ldx, const float* w, int64_t ldw, int64_t N, float* y,
               int64_t ldy) {
  const int64_t nl = N / kLanes * kLanes;
  if (K == 0)
    for (int64_t r = 0; r < R; ++r) std::fill(y + r * ldy, y + r * ldy + N, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kPanel) {
    const int64_t k1 = std::min(K, k0 + kPanel);
    for (int64_t r = 0; r < R; r += kRows) {
      const int64_t rb = std::min<int64_t>(kRows, R - r);
      kNNRows[rb](x + r * ldx, ldx, w, ldw, y + r * ldy, ldy, 0, nl, k0, k1);
    }
  }
  for (int64_t c = nl; c < N; ++c)  // ragged last columns (N not a multiple of kLanes): plain, same order
    for (int64_t r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[r * ldx + k] * w[k * ldw + c];
      y[r * ldy + c] = s;
    }
}

// NT: y[r, n] = dot(x[r, :], w[n, :]) for n in [c0, c1): kGroup weight rows at a time, each read from memory once
// and from L1 for every further x row; per (r, n), lane-wise partial sums, then a fixed pairwise tree.
constexpr int kGroup = 4;  // weight rows per block (twice as many for a single x row)

static inline float hsum(v16 v) {
  float s[kLanes];
  store(s, v);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  return s[0];
}

template <int RB, int G>
static void nt_block(const float* x, int64_t ldx, int64_t K, const float* w, int64_t ldw, float* y, int64_t ldy,
                     int64_t n) {
  const int64_t KL = K / kLanes * kLanes;
  v16 acc[RB][G];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < G; ++j) acc[r][j] = v16{};
  for (int64_t k = 0; k < KL; k += kLanes) {
    v16 wv[G];
    for (int j = 0; j < G; ++j) wv[j] = load(w + (n + j) * ldw + k);
    for (int r = 0; r < RB; ++r) {
      const v16 xv = load(x + r * ldx + k);
      for (int j = 0; j < G; ++j) acc[r][j] = fma(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < G; ++j) {
      float s = hsum(acc[r][j]);
      for (int64_t k = KL; k < K; ++k) s += x[r * ldx + k] * w[(n + j) * ldw + k];
      y[r * ldy + n + j] = s;
    }
}

static void nt_cols(const float* x, int64_t R, int64_t K, int64_t ldx, const float* w, int64_t ldw, float* y,
                    int64_t ldy, int64_t c0, int64_t c1) {
  int64_t n = c0;
  if (R == 1) {  // one x row: more weight rows in flight
    for (; n + 2 * kGroup <= c1; n += 2 * kGroup) nt_block<1, 2 * kGroup>(x, ldx, K, w, ldw, y, ldy, n);
  } else {
    for (; n + kGroup <= c1; n += kGroup) {
      int64_t r = 0;
      constexpr int RB = kAcc / kGroup;
      for (; r + RB <= R; r += RB) nt_block<RB, kGroup>(x + r * ldx, ldx, K, w, ldw, y + r * ldy, ldy, n);
      for (; r + 2 <= R; r += 2) nt_block<2, kGroup>(x + r * ldx, ldx, K, w, ldw, y + r * ldy, ldy, n);
      for (; r < R; ++r) nt_block<1, kGroup>(x + r * ldx, ldx, K, w, ldw, y + r * ldy, ldy, n);
    }
  }
  for (; n < c1; ++n)
    for (int64_t r = 0; r < R; ++r) nt_block<1, 1>(x + r * ldx, ldx, K, w, ldw, y + r * ldy, ldy, n);
}

// PACKED: w (K, N) stored as ceil(N / kTile) tiles, tile j holding w[k, j*kTile : (j+1)*kTile] for k = 0..K-1
// back to back (zero columns past N): one sequential stream per tile, which the prefetchers follow, and a tile's
// whole sum over K in registers (the NN kernel's panels reload and store them every kPanel rows of w, and stream
// kPanel rows at once). A tile is read from memory for its first block of x rows and from L2 for the others.
// Each output element is summed in order k = 0, ..., K - 1 whatever R is.
constexpr int kTile = kLanes;  // one vector: 16 floats with AVX-512, 8 with AVX2 (jaxspec_packed_tile)
constexpr int kTileV = kTile / kLanes;  // vectors per tile row
constexpr int kPackRows = 10;  // rows per block (AVX2: 10 accumulators of 16 registers; measured best of 8-14)

template <int RB>
static void pk_micro(const float* x, int64_t ldx, const float* tile, int64_t K, float* y, int64_t ldy) {
  v16 acc[RB][kTileV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < kTileV; ++v) acc[r][v] = v16{};
  const float* wp = tile;
  for (int64_t k = 0; k < K; ++k, wp += kTile) {
    __builtin_prefetch(wp + 64 * kTile);
    v16 wv[kTileV];
    for (int v = 0; v < kTileV; ++v) wv[v] = load(wp + kLanes * v);
    for (int r = 0; r < RB; ++r) {
      const v16 xs = splat(x[r * ldx + k]);
      for (int v = 0; v < kTileV; ++v) acc[r][v] = fma(xs, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < kTileV; ++v) store(y + r * ldy + kLanes * v, acc[r][v]);
}

typedef void (*PKRows)(const float*, int64_t, const float*, int64_t, float*, int64_t);
template <int... RB>
struct PKTable {
  static constexpr PKRows fns[] = {nullptr, pk_micro<RB>...};
};
static constexpr auto& kPKRows = PKTable<1, 2, 3, 4, 5, 6, 7, 8, 9, 10>::fns;
static_assert(kPackRows <= 10 && kPackRows + 2 <= kAcc + 4);

// Rows [0, R) of x times tile j of a packed (K, N) weight into y's columns [j*kTile, ...) (those < N), in
// equal blocks of at most kPackRows rows.
static void pk_tile(const float* x, int64_t R, int64_t K, const float* tile, float* y, int64_t N, int64_t j) {
  const int64_t blocks = (R + kPackRows - 1) / kPackRows, c = j * kTile;
  float tmp[kPackRows * kTile];
  for (int64_t b = 0, r = 0; b < blocks; ++b) {
    const int64_t r1 = R * (b + 1) / blocks;
    if (c + kTile <= N) {
      kPKRows[r1 - r](x + r * K, K, tile, K, y + r * N + c, N);
    } else {  // the last, partial tile
      kPKRows[r1 - r](x + r * K, K, tile, K, tmp, kTile);
      for (int64_t i = r; i < r1; ++i) std::copy(tmp + (i - r) * kTile, tmp + (i - r) * kTile + (N - c), y + i * N + c);
    }
    r = r1;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// PACKED, block-quantized: the same tiles, each tile's K rows in blocks of kQBlock rows, every weight stored as the
// few bits that reproduce its float32 value exactly (cpu_kernels.py finds them, or keeps float32). Per block and
// tile column c, a float32 scale d[c] (and for Q4 an offset m[c]) and per row k a code q[k][c]:
//   Q4 (uint8 storage):  w = d * q + m, q in 0..15   (GGUF's Q4_1: SmolLM2's layers)
//   Q8 (int8 storage):   w = d * q,     q in -128..127 (GGUF's Q8_0: its embedding, the tied head)
// The scales are float16 values and the codes at most 8 bits, so d * q is exact in float32 and d * q + m is rounded
// once however it is computed (here one FMA): the kernel multiplies the same float32 weights as the float32 copy,
// in the same order as pk_micro, so its results are pk_micro's bit for bit, from 5-6x fewer bytes. A Q4 block of a
// tile: d[kTile], m[kTile], then kQBlock / 2 rows of kTile bytes, byte (p, c) holding q[2p][c] in its low nibble
// and q[2p + 1][c] in its high one. A Q8 block: d[kTile], then kQBlock rows of kTile codes. Work is compute more
// than memory now: one x row takes kGroupTiles tiles at once, for enough independent sums.
constexpr int64_t kQBlock = 32;
constexpr int64_t kQ4Bytes = (8 + kQBlock / 2) * kTile, kQ8Bytes = (4 + kQBlock) * kTile;
enum Fmt { kF32 = 0, kQ4 = 1, kQ8 = 2, kF16 = 3, kBF16 = 4 };
constexpr int kGroupTiles = 4;  // tiles in flight for one x row: one accumulator chain each (the FMA's latency)
constexpr int64_t kQAhead = 1024;  // software prefetch distance in each tile's stream, bytes

typedef uint8_t u8v __attribute__((vector_size(kLanes)));
typedef int8_t s8v __attribute__((vector_size(kLanes)));
typedef int32_t i32v __attribute__((vector_size(4 * kLanes)));

// kLanes bytes from p, each widened to an int32 lane (sign-extended if Signed): one instruction with AVX2/AVX-512
// (the compiler's generic byte-vector conversion went through general registers, byte by byte).
template <bool Signed>
static inline i32v widen(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (i32v)(Signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (i32v)(Signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#else
  typedef std::conditional_t<Signed, s8v, u8v> bytes;
  bytes raw;
  __builtin_memcpy(&raw, p, sizeof raw);
  return __builtin_convertvector(raw, i32v);
#endif
}

// Tiles [0, TT) of a group (tile_bytes apart) times rows [0, RB) of x into y's columns [0, TT * kTile).
template <int RB, int TT, int FMT>
static void pq_micro(const float* x, int64_t ldx, const uint8_t* tile, int64_t tile_bytes, int64_t K, float* y,
                     int64_t ldy) {
  constexpr int64_t BB = FMT == kQ4 ? kQ4Bytes : kQ8Bytes;
  v16 acc[RB][TT];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = v16{};
  for (int64_t b = 0; b < K / kQBlock; ++b) {
    const float* xb = x + b * kQBlock;
    const uint8_t* blk[TT];
    v16 d[TT], m[TT];
    for (int t = 0; t < TT; ++t) {
      blk[t] = tile + t * tile_bytes + b * BB;
      for (int64_t i = 0; i < BB; i += 64) __builtin_prefetch(blk[t] + kQAhead + i);
      d[t] = load(reinterpret_cast<const float*>(blk[t]));
      m[t] = FMT == kQ4 ? load(reinterpret_cast<const float*>(blk[t] + 4 * kTile)) : v16{};
    }
    if constexpr (FMT == kQ4) {
      for (int64_t p = 0; p < kQBlock / 2; ++p) {
        v16 w0[TT], w1[TT];
        for (int t = 0; t < TT; ++t) {
          const i32v q = widen<false>(blk[t] + 8 * kTile + p * kTile);
          w0[t] = fma(d[t], __builtin_convertvector(q & 15, v16), m[t]);
          w1[t] = fma(d[t], __builtin_convertvector(q >> 4, v16), m[t]);
        }
        for (int r = 0; r < RB; ++r) {
          const v16 xs = splat(xb[r * ldx + 2 * p]);
          for (int t = 0; t < TT; ++t) acc[r][t] = fma(xs, w0[t], acc[r][t]);
        }
        for (int r = 0; r < RB; ++r) {
          const v16 xs = splat(xb[r * ldx + 2 * p + 1]);
          for (int t = 0; t < TT; ++t) acc[r][t] = fma(xs, w1[t], acc[r][t]);
        }
      }
    } else {
      for (int64_t k = 0; k < kQBlock; ++k) {
        v16 w[TT];
        for (int t = 0; t < TT; ++t) {
          w[t] = d[t] * __builtin_convertvector(widen<true>(blk[t] + 4 * kTile + k * kTile), v16);
        }
        for (int r = 0; r < RB; ++r) {
          const v16 xs = splat(xb[r * ldx + k]);
          for (int t = 0; t < TT; ++t) acc[r][t] = fma(xs, w[t], acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TT; ++t) store(y + r * ldy + t * kTile, acc[r][t]);
}

// ---------------------------------------------------------------------------------------------------------------
// PACKED, 2-byte: float32 weights whose values are exactly float16 (an HF checkpoint's, widened at conversion) or
// bfloat16 ones, stored as those 2 bytes in the float32 tiles' layout (tiles, K, kTile) and widened in registers
// (exactly: every float16 and bfloat16 value is a float32 one). Same products in the same order as pk_micro, so
// the same bits, from half the bytes; one x row takes kGroupTiles tiles at once, as the block formats do.
static inline uint32_t f16_bits_to_f32_bits(uint16_t h) {  // portable widening (no F16C)
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3FF;
  if (e == 31) return sign | 0x7F800000 | (m << 13);
  if (e) return sign | ((e + 112) << 23) | (m << 13);
  if (!m) return sign;
  int shift = 0;  // subnormal: normalize
  uint32_t mm = m;
  while (!(mm & 0x400)) { mm <<= 1; ++shift; }
  return sign | ((113 - shift) << 23) | ((mm & 0x3FF) << 13);
}

template <int FMT>
static inline v16 load_half(const uint8_t* p) {
  static_assert(FMT == kF16 || FMT == kBF16);
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (FMT == kF16) return (v16)_mm512_cvtph_ps(h);
  else return (v16)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif defined(__AVX2__) && defined(__F16C__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (FMT == kF16) return (v16)_mm256_cvtph_ps(h);
  else return (v16)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  uint16_t h[kLanes];
  uint32_t bits[kLanes];
  __builtin_memcpy(h, p, sizeof h);
  for (int i = 0; i < kLanes; ++i) bits[i] = FMT == kF16 ? f16_bits_to_f32_bits(h[i]) : uint32_t{h[i]} << 16;
  v16 v;
  __builtin_memcpy(&v, bits, sizeof v);
  return v;
#endif
}

// Tiles [0, TT) of a group (tile_bytes apart) of 2-byte weights times rows [0, RB) of x into y's columns.
template <int RB, int TT, int FMT>
static void ph_micro(const float* x, int64_t ldx, const uint8_t* tile, int64_t tile_bytes, int64_t K, float* y,
                     int64_t ldy) {
  v16 acc[RB][TT];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    v16 w[TT];
    for (int t = 0; t < TT; ++t) {
      const uint8_t* wp = tile + t * tile_bytes + k * 2 * kTile;
      if (k % (64 / (2 * kTile)) == 0) __builtin_prefetch(wp + kQAhead);
      w[t] = load_half<FMT>(wp);
    }
    for (int r = 0; r < RB; ++r) {
      const v16 xs = splat(x[r * ldx + k]);
      for (int t = 0; t < TT; ++t) acc[r][t] = fma(xs, w[t], acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TT; ++t) store(y + r * ldy + t * kTile, acc[r][t]);
}

// Tiles per call for RB rows: enough independent accumulator chains (RB x TT) to hide the FMA's latency.
constexpr int tiles_for(int rows) { return rows == 1 ? kGroupTiles : rows <= 3 ? 2 : 1; }

typedef void (*PQRows)(const float*, int64_t, const uint8_t*, int64_t, int64_t, float*, int64_t);
template <int RB, int TT, int FMT>
constexpr PQRows micro() {
  if constexpr (FMT == kF16 || FMT == kBF16) return ph_micro<RB, TT, FMT>;
  else return pq_micro<RB, TT, FMT>;
}
template <int FMT, int... RB>
struct PQTable {
  static constexpr PQRows grouped[] = {nullptr, micro<RB, tiles_for(RB), FMT>()...};
  static constexpr PQRows single[] = {nullptr, micro<RB, 1, FMT>()...};
};
template <int FMT>
using PQ = PQTable<FMT, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10>;

constexpr int64_t kQRows = kPackRows;  // x rows per block (blocks of at most 4, 5 or 6: no faster at 5-13 rows)

// Rows [0, R) of x times tiles [t0, t1) of a block-quantized (K, N) weight w into y (R, N): groups of
// kGroupTiles whole tiles, each group's tiles read from memory for the first block of x rows (equal blocks of at
// most kQRows) and from L1/L2 for the others, dequantized in registers as they are used; a last partial group tile
// by tile.
template <int FMT>
static void pq_tiles(const float* x, int64_t R, int64_t K, const uint8_t* w, int64_t N, float* y, int64_t t0,
                     int64_t t1) {
  const int64_t tile_bytes = FMT == kF16 || FMT == kBF16 ? K * 2 * kTile
                             : K / kQBlock * (FMT == kQ4 ? kQ4Bytes : kQ8Bytes);
  const int64_t blocks = (R + kQRows - 1) / kQRows;
  float tmp[kQRows * kTile];
  for (int64_t t = t0; t < t1;) {
    // 2-byte tiles are read again for each block of rows: one tile at a time then, so that it stays in L1.
    const bool half = FMT == kF16 || FMT == kBF16;
    const bool whole = t + kGroupTiles <= t1 && (t + kGroupTiles) * kTile <= N && !(half && blocks > 1);
    const int64_t n = whole ? kGroupTiles : 1;
    for (int64_t b = 0, r = 0; b < blocks; ++b) {
      const int64_t r1 = R * (b + 1) / blocks, rb = r1 - r, c = t * kTile;
      if (whole) {
        const int64_t tt = tiles_for(static_cast<int>(rb));
        for (int64_t j = 0; j < n; j += tt)
          PQ<FMT>::grouped[rb](x + r * K, K, w + (t + j) * tile_bytes, tile_bytes, K, y + r * N + c + j * kTile, N);
      } else if (c + kTile <= N) {
        PQ<FMT>::single[rb](x + r * K, K, w + t * tile_bytes, tile_bytes, K, y + r * N + c, N);
      } else {  // the last, partial tile
        PQ<FMT>::single[rb](x + r * K, K, w + t * tile_bytes, tile_bytes, K, tmp, kTile);
        for (int64_t i = r; i < r1; ++i)
          std::copy(tmp + (i - r) * kTile, tmp + (i - r) * kTile + (N - c), y + i * N + c);
      }
      r = r1;
    }
    t += n;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// A pool of workers that spin for a while after each job (decode issues one every few microseconds), then sleep.
constexpr int kMaxThreads = 64;

class Pool {
 public:
  typedef void (*Job)(void* ctx, int part, int parts);

  Pool() {
    int n = 1;
    if (const char* env = std::getenv("JAXSPEC_CPU_THREADS")) {
      n = std::atoi(env);
    } else {
      cpu_set_t set;
      if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
    }
    threads_ = std::clamp(n, 1, kMaxThreads);
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { Work(i); });
  }
  int threads() const { return threads_; }

  // Runs job(ctx, part, parts) for every part of `parts` (at most threads()); the caller does part 0. A caller that
  // finds the pool busy (XLA running two products at once) does every part itself: the parts, and so the result,
  // do not depend on who runs them.
  void Run(Job job, void* ctx, int parts) {
    std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
    if (!lock.owns_lock() || parts == 1) {
      for (int i = 0; i < parts; ++i) job(ctx, i, parts);
      return;
    }
    job_ = job;
    ctx_ = ctx;
    parts_ = parts;
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    // Sequentially consistent, as is the worker's sleepers_ increment before it waits: either it sees the new
    // generation, or this sees it sleeping and wakes it.
    gen_.fetch_add(1);
    if (sleepers_.load() > 0) gen_.notify_all();
    job(ctx, 0, parts);
    while (pending_.load(std::memory_order_acquire) > 0) CPU_RELAX();
  }

 private:
  void Work(int part) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = gen_.load(std::memory_order_acquire);
      for (int spin = 0; g == seen && spin < kSpins; ++spin) {
        CPU_RELAX();
        g = gen_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        sleepers_.fetch_add(1);
        gen_.wait(seen);
        sleepers_.fetch_sub(1);
        continue;
      }
      seen = g;
      if (part < parts_) job_(ctx_, part, parts_);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  static constexpr int kSpins = 20000;  // some 0.1-0.5 ms of pause instructions
  int threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  Job job_ = nullptr;
  void* ctx_ = nullptr;
  int parts_ = 1;
};

// Never destroyed: its workers outlive static destruction at exit. A forked child has none of the parent's
// threads, so it starts a pool of its own.
static Pool* the_pool = nullptr;
static std::once_flag atfork_once;

static Pool& pool() {
  std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { the_pool = nullptr; }); });
  if (the_pool == nullptr) the_pool = new Pool();
  return *the_pool;
}

constexpr int kMaxMats = 4;

// Products of one x with up to kMaxMats weight matrices (Q, K, V of a layer, or gate and up): one job, so XLA
// does not run them concurrently on threads that the pool's workers then compete with.
struct Problem {
  const float* x;
  int64_t R, K;
  bool nt, packed;
  int fmt;  // packed weights: kF32, kQ4, kQ8, kF16 or kBF16 (the storage dtype: float32, uint8, int8, 2-byte)
  int mats;
  const void* w[kMaxMats];
  float* y[kMaxMats];
  int64_t N[kMaxMats];
  float* partial[kMaxThreads];  // NN: part i's sums over its rows of every w (part 0's are the ys themselves)
};

// NT: part i takes an equal share of the output columns (whole vectors). NN: part i takes an equal share of each
// w's rows (a contiguous stretch of memory: two threads streaming halves of every row read ~25% slower) into its
// own buffer, summed into y afterwards in part order. The split depends only on the shapes and the thread count.
static void solve(void* ctx, int part, int parts) {
  Problem& p = *static_cast<Problem*>(ctx);
  if (p.packed) {  // part i takes an equal share of all the ws' tiles (a contiguous stretch of memory)
    int64_t tiles = 0, base = 0;
    for (int m = 0; m < p.mats; ++m) tiles += (p.N[m] + kTile - 1) / kTile;
    const int64_t t0 = tiles * part / parts, t1 = tiles * (part + 1) / parts;
    for (int m = 0; m < p.mats; ++m) {
      const int64_t n = (p.N[m] + kTile - 1) / kTile;
      const int64_t lo = std::max(t0, base) - base, hi = std::min(t1, base + n) - base;
      const auto* w = static_cast<const uint8_t*>(p.w[m]);
      if (p.fmt == kQ4) {
        if (lo < hi) pq_tiles<kQ4>(p.x, p.R, p.K, w, p.N[m], p.y[m], lo, hi);
      } else if (p.fmt == kQ8) {
        if (lo < hi) pq_tiles<kQ8>(p.x, p.R, p.K, w, p.N[m], p.y[m], lo, hi);
      } else if (p.fmt == kF16) {
        if (lo < hi) pq_tiles<kF16>(p.x, p.R, p.K, w, p.N[m], p.y[m], lo, hi);
      } else if (p.fmt == kBF16) {
        if (lo < hi) pq_tiles<kBF16>(p.x, p.R, p.K, w, p.N[m], p.y[m], lo, hi);
      } else {
        for (int64_t t = lo; t < hi; ++t)
          pk_tile(p.x, p.R, p.K, static_cast<const float*>(p.w[m]) + t * p.K * kTile, p.y[m], p.N[m], t);
      }
      base += n;
    }
    return;
  }
  if (p.nt) {
    for (int m = 0; m < p.mats; ++m) {
      const int64_t N = p.N[m], vecs = (N + kLanes - 1) / kLanes;
      const int64_t c0 = std::min(N, vecs * part / parts * kLanes);
      const int64_t c1 = std::min(N, vecs * (part + 1) / parts * kLanes);
      if (c0 < c1) nt_cols(p.x, p.R, p.K, p.K, static_cast<const float*>(p.w[m]), p.K, p.y[m], N, c0, c1);
    }
    return;
  }
  static thread_local std::vector<float> buffers[kMaxThreads];
  float* out = nullptr;
  if (part > 0) {
    int64_t total = 0;
    for (int m = 0; m < p.mats; ++m) total += p.R * p.N[m];
    std::vector<float>& buf = buffers[part];
    if (static_cast<int64_t>(buf.size()) < total) buf.resize(total);
    out = p.partial[part] = buf.data();
  }
  const int64_t k0 = p.K * part / parts, k1 = p.K * (part + 1) / parts;
  for (int m = 0; m < p.mats; ++m) {
    float* y = part == 0 ? p.y[m] : out;
    nn(p.x + k0, p.R, k1 - k0, p.K, static_cast<const float*>(p.w[m]) + k0 * p.N[m], p.N[m], p.N[m], y, p.N[m]);
    if (part > 0) out += p.R * p.N[m];
  }
}

// layer >= 0: each weight has a leading layer axis (a scan over stacked layers) and layer `layer` is read in place.
// Packed weights: float32 tiles (tiles, K, kTile), 2-byte ones in the same layout (float16, bfloat16), or
// block-quantized ones (tiles, K / kQBlock, block bytes); the storage dtype names the format (uint8: Q4, int8: Q8);
// all the weights of one call in one format.
static ffi::Error Matmul(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws, ffi::RemainingRets ys, bool nt,
                         bool packed = false, int64_t layer = -1) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || ws.size() != ys.size() || ws.size() < 1 || ws.size() > kMaxMats)
    return ffi::Error::InvalidArgument("jaxspec_matmul: x (R, K) and 1-4 weights, one output each");
  Problem p{x.typed_data(), xd[0], xd[1], nt, packed, kF32, static_cast<int>(ws.size()), {}, {}, {}, {}};
  int64_t size = 0;
  for (int m = 0; m < p.mats; ++m) {
    auto w = ws.get<ffi::AnyBuffer>(m);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(m);
    if (w.has_error() || y.has_error()) return ffi::Error::InvalidArgument("jaxspec_matmul: bad buffers");
    const ffi::DataType type = w->element_type();
    const int fmt = !packed || type == ffi::DataType::F32 ? kF32 : type == ffi::DataType::U8 ? kQ4
                    : type == ffi::DataType::S8 ? kQ8 : type == ffi::DataType::F16 ? kF16
                    : type == ffi::DataType::BF16 ? kBF16 : -1;
    if (fmt < 0 || (!packed && type != ffi::DataType::F32) || (m > 0 && fmt != p.fmt))
      return ffi::Error::InvalidArgument("jaxspec_matmul: float32 weights, or packed ones all of one format");
    p.fmt = fmt;
    auto wd = w->dimensions();
    auto yd = (*y)->dimensions();
    const int64_t bytes = ffi::ByteWidth(type);
    int64_t offset = 0;  // bytes
    if (layer >= 0) {
      if (wd.size() < 1 || layer >= wd[0]) return ffi::Error::InvalidArgument("jaxspec_matmul: layer out of range");
      offset = layer * (w->element_count() / wd[0]) * bytes;
      wd = wd.last(wd.size() - 1);
    }
    if (packed && (fmt == kF32 || fmt == kF16 || fmt == kBF16)) {
      if (wd.size() != 3 || wd[1] != p.K || wd[2] != kTile || yd.size() != 2 || yd[0] != p.R ||
          (yd[1] + kTile - 1) / kTile != wd[0])
        return ffi::Error::InvalidArgument("jaxspec_matmul_packed: weights (tiles, K, tile) covering y (R, N)");
    } else if (packed) {
      if (wd.size() != 3 || p.K % kQBlock != 0 || wd[1] != p.K / kQBlock ||
          wd[2] != (fmt == kQ4 ? kQ4Bytes : kQ8Bytes) || yd.size() != 2 || yd[0] != p.R ||
          (yd[1] + kTile - 1) / kTile != wd[0])
        return ffi::Error::InvalidArgument(
            "jaxspec_matmul_packed: quantized weights (tiles, K / 32, block bytes) covering y (R, N)");
    } else if (wd.size() != 2 || (nt ? wd[1] : wd[0]) != p.K) {
      return ffi::Error::InvalidArgument("jaxspec_matmul: weights must be 2-D with x's contracting size");
    }
    p.w[m] = static_cast<const uint8_t*>(w->untyped_data()) + offset;
    p.y[m] = (*y)->typed_data();
    p.N[m] = packed ? yd[1] : nt ? wd[0] : wd[1];
    size += p.K * p.N[m];
  }
  if (p.R == 0) return ffi::Error::Success();
  // Small weights (a test model's) are not worth waking a thread for; the choice depends on the shapes only.
  const int parts = size < (1 << 16) ? 1 : pool().threads();
  pool().Run(solve, &p, parts);
  if (!nt && !packed)
    for (int i = 1; i < parts; ++i) {
      const float* part = p.partial[i];
      for (int m = 0; m < p.mats; ++m) {
        const int64_t n = p.R * p.N[m];
        for (int64_t j = 0; j < n; ++j) p.y[m][j] += part[j];
        part += n;
      }
    }
  return ffi::Error::Success();
}

static ffi::Error MatmulNN(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws, ffi::RemainingRets ys) {
  return Matmul(x, ws, ys, false);
}
static ffi::Error MatmulNT(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws, ffi::RemainingRets ys) {
  return Matmul(x, ws, ys, true);
}

static ffi::Error MatmulPacked(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws, ffi::RemainingRets ys) {
  return Matmul(x, ws, ys, false, true);
}

static ffi::Error MatmulPackedAt(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs ws,
                                 ffi::RemainingRets ys) {
  if (layer.element_count() != 1) return ffi::Error::InvalidArgument("jaxspec_matmul_packed_at: scalar layer");
  const int32_t i = *layer.typed_data();
  if (i < 0) return ffi::Error::InvalidArgument("jaxspec_matmul_packed_at: layer out of range");
  return Matmul(x, ws, ys, false, true, i);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxspecMatmulPackedAt, MatmulPackedAt,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxspecMatmulPacked, MatmulPacked,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxspecMatmulNN, MatmulNN,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxspecMatmulNT, MatmulNT,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets());

// ---------------------------------------------------------------------------------------------------------------
// Attention of a few query tokens over one layer of the cache (decode steps, verifies): q (B, T, KV, G, D),
// k and v (B, S, KV, D) (the layer's slice of the stacked cache, read in place), positions (B, T); query (b, t)
// sees keys [0, positions[b, t]]. The cache is cut into chunks of kKeyChunk keys at fixed positions, and a work item
// is one chunk of one batch row for all its queries and KV heads (one contiguous stretch of the cache, read from
// memory once): per (query, head), the scores of the G query heads, their softmax within the chunk (its maximum m
// and sum l kept) and o = probabilities @ V. Whoever finishes a (query, head)'s last chunk combines its chunks in
// chunk order: out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c. A query's arithmetic thus depends on its own
// position only: it gets the same bits in any chunk of queries and on any number of threads. A decode step at a 2k
// context is 32 items that both cores share; one item per (query, head), as before, gave the 2 cores 3 items (one
// idle half the time), each a strided walk through the cache.

// exp for x <= 0 (x - max in a softmax), to ~2 ulp: Cody-Waite reduction by ln 2, Cephes' degree-6 polynomial.
static inline v16 exp_neg(v16 x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const v16 big = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const v16 n = (x * splat(1.44269504f) + big) - big;
  v16 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v16 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  typedef int32_t i16 __attribute__((vector_size(4 * kLanes)));
  const i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#ifdef __AVX512F__
// (x0 + x1, x2 + x3, ..., y0 + y1, y2 + y3, ...): the pairwise sums of x's lanes, then of y's.
static inline v16 pair_sums(v16 x, v16 y) {
  return __builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#endif

// Lane j of the result: the sum of a[j]'s lanes, for kLanes vectors a (overwritten); each the same pairwise tree,
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) with 8 lanes.
static inline v16 lane_sums(v16* a) {
#if !defined(__AVX512F__)
  // 8 lanes: pair sums within each 128-bit half (one-instruction shuffles), then the halves added across.
  auto hadd = [](v16 x, v16 y) {
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const v16 lo = hadd(hadd(a[0], a[1]), hadd(a[2], a[3])), hi = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
#else
  for (int w = kLanes; w > 1; w /= 2)
    for (int i = 0; i < w / 2; ++i) a[i] = pair_sums(a[2 * i], a[2 * i + 1]);
  return a[0];
#endif
}

constexpr int64_t kKeyChunk = 8 * kLanes;  // keys per work item (64 with AVX2): a multiple of kLanes

struct Attention {
  const float *q, *k, *v;
  const int32_t* pos;
  float* out;
  int64_t B, T, KV, G, D, S;
  const int64_t* items;  // per item: its batch row and chunk
  int64_t items_n;
  const int64_t* first;  // per query row: its first chunk's slot in part
  int32_t* left;         // per query row: chunks not yet done
  float* part;           // per slot: o (G, D), then m (G), then l (G)
  int64_t P;             // floats per slot
};

// Query row qi's chunks combined, in chunk order, into its output.
static void attend_combine(const Attention& a, int64_t qi, int64_t n) {
  const int64_t G = a.G, D = a.D, chunks = (n + kKeyChunk - 1) / kKeyChunk;
  const float* part = a.part + a.first[qi] * a.P;
  float* out = a.out + qi * G * D;
  for (int64_t g = 0; g < G; ++g) {
    float M = -3.0e38f;
    for (int64_t c = 0; c < chunks; ++c) M = std::max(M, part[c * a.P + G * D + g]);
    float L = 0.f;
    float* o = out + g * D;
    std::fill(o, o + D, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* pc = part + c * a.P;
      const float w = std::exp(pc[G * D + g] - M);
      L += w * pc[G * D + G + g];
      for (int64_t d = 0; d < D; ++d) o[d] += w * pc[g * D + d];
    }
    const float inv = 1.0f / L;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

// Scores of one query (D floats, pre-scaled) against kLanes keys whose rows start at kp[i]: lane i, the dot with
// key i, lane-wise partial sums over D then a pairwise tree (whatever the other keys are).
static inline v16 key_dots(const float* q, const float* const* kp, int64_t D) {
  const int64_t DL = D / kLanes * kLanes;
  v16 acc[kLanes];
  for (int i = 0; i < kLanes; ++i) acc[i] = v16{};
  for (int64_t d = 0; d < DL; d += kLanes) {
    const v16 qv = load(q + d);
    for (int i = 0; i < kLanes; ++i) acc[i] = fma(qv, load(kp[i] + d), acc[i]);
  }
  v16 x = lane_sums(acc);
  if (DL < D)
    for (int i = 0; i < kLanes; ++i)
      for (int64_t d = DL; d < D; ++d) x[i] += q[d] * kp[i][d];
  return x;
}

// Item (b, c): chunk c (keys j0 .. j0 + kKeyChunk - 1) for every query of batch row b that sees it and every KV
// head: per query row, the scores of its G query heads, their softmax within the chunk (maximum m, sum l) and
// o = probabilities @ values, into the row's slot; a row's last chunk to finish combines them. Scores go key block by
// key block over all heads (each block's keys are one contiguous stretch of the cache).
static void attend_item(const Attention& a, int64_t item, std::vector<float>& buf) {
  const int64_t b = a.items[2 * item], c = a.items[2 * item + 1], j0 = c * kKeyChunk;
  const int64_t KV = a.KV, G = a.G, D = a.D, ld = KV * D, H = KV * G;
  const float* k = a.k + (b * a.S + j0) * ld;
  const float* v = a.v + (b * a.S + j0) * ld;
  if (static_cast<int64_t>(buf.size()) < H * (kKeyChunk + D)) buf.resize(H * (kKeyChunk + D));
  float *s = buf.data(), *qs = s + H * kKeyChunk;  // scores (H, kKeyChunk); queries / sqrt(D) (H, D)
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  typedef int32_t i16 __attribute__((vector_size(4 * kLanes)));
  i16 iota;
  for (int i = 0; i < kLanes; ++i) iota[i] = i;
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t bt = b * a.T + t, n = std::clamp<int64_t>(a.pos[bt] + 1, 0, a.S);
    if (n <= j0) continue;
    const int64_t m = std::min(kKeyChunk, n - j0), mp = (m + kLanes - 1) / kLanes * kLanes;
    const float* q = a.q + bt * H * D;
    for (int64_t i = 0; i < H * D; ++i) qs[i] = q[i] * scale;
    for (int64_t j = 0; j < mp; j += kLanes) {
      const float* kp[kLanes];
      for (int i = 0; i < kLanes; ++i) kp[i] = k + std::min(j + i, m - 1) * ld;  // past m: a live key, masked
      if (t == 0) {  // this block's values, and the next chunk's block of keys (a thread's next item, mostly)
        const bool next = j0 + kKeyChunk + j + kLanes <= a.S;
        for (int64_t off = 0; off < kLanes * ld; off += 64 / sizeof(float)) {
          __builtin_prefetch(v + j * ld + off);
          if (next) __builtin_prefetch(k + (kKeyChunk + j) * ld + off);
        }
      }
      for (int64_t h = 0; h < KV; ++h) {
        const float* kh[kLanes];
        for (int i = 0; i < kLanes; ++i) kh[i] = kp[i] + h * D;
        for (int64_t g = 0; g < G; ++g) {
          v16 x = key_dots(qs + (h * G + g) * D, kh, D);
          if (j + kLanes > m) {
            const i16 live = iota + static_cast<int32_t>(j) < static_cast<int32_t>(m);
            x = live ? x : splat(-3.0e38f);
          }
          store(s + (h * G + g) * kKeyChunk + j, x);
        }
      }
    }
    for (int64_t h = 0; h < KV; ++h) {
      const int64_t qi = bt * KV + h;
      float* part = a.part + (a.first[qi] + c) * a.P;
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s + (h * G + g) * kKeyChunk;
        v16 mv = splat(-3.0e38f);
        for (int64_t j = 0; j < mp; j += kLanes) mv = load(sg + j) > mv ? load(sg + j) : mv;
        float mx = -3.0e38f;
        for (int i = 0; i < kLanes; ++i) mx = std::max(mx, mv[i]);
        v16 sum = v16{};
        for (int64_t j = 0; j < mp; j += kLanes) {
          v16 e = exp_neg(load(sg + j) - splat(mx));
          if (j + kLanes > m) {
            const i16 live = iota + static_cast<int32_t>(j) < static_cast<int32_t>(m);
            e = live ? e : v16{};
          }
          store(sg + j, e);
          sum += e;
        }
        part[G * D + g] = mx;
        part[G * D + G + g] = hsum(sum);
      }
      nn(s + h * G * kKeyChunk, G, m, kKeyChunk, v + h * D, ld, D, part, D);  // o (G, D) = e (G, m) @ V (m, D)
      if (std::atomic_ref<int32_t>(a.left[qi]).fetch_sub(1, std::memory_order_acq_rel) == 1) attend_combine(a, qi, n);
    }
  }
}

static void attend_part(void* ctx, int part, int parts) {
  const Attention& a = *static_cast<const Attention*>(ctx);
  static thread_local std::vector<float> buf;
  const int64_t items = a.items_n;
  for (int64_t i = items * part / parts; i < items * (part + 1) / parts; ++i) attend_item(a, i, buf);
}

// k and v are the stacked cache (layers, B, S, KV, D); layer `layer` (a scalar) is read in place.
static ffi::Error Attend(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_all, ffi::Buffer<ffi::F32> v_all,
                         ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> layer_, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k_all.dimensions(), pd = pos.dimensions();
  const int64_t layer = layer_.element_count() == 1 ? *layer_.typed_data() : -1;
  if (kd.size() != 5 || v_all.dimensions() != kd || layer < 0 || layer >= kd[0] || qd.size() != 5 ||
      pd.size() != 2 || kd[1] != qd[0] || kd[3] != qd[2] || kd[4] != qd[4] || pd[0] != qd[0] || pd[1] != qd[1])
    return ffi::Error::InvalidArgument(
        "jaxspec_attend: q (B, T, KV, G, D), k/v (layers, B, S, KV, D), positions (B, T), a layer in range");
  const int64_t offset = layer * (k_all.element_count() / kd[0]);
  const float *k = k_all.typed_data() + offset, *v = v_all.typed_data() + offset;
  kd = kd.last(4);
  const int64_t B = qd[0], T = qd[1], KV = qd[2], G = qd[3], D = qd[4], S = kd[1], rows = B * T * KV;
  static thread_local std::vector<int64_t> items, first;
  static thread_local std::vector<int32_t> left;
  static thread_local std::vector<float> part;
  first.assign(rows + 1, 0);
  left.assign(rows, 0);
  items.clear();
  const int32_t* p = pos.typed_data();
  auto chunks = [&](int64_t bt) { return (std::clamp<int64_t>(p[bt] + 1, 0, S) + kKeyChunk - 1) / kKeyChunk; };
  for (int64_t qi = 0; qi < rows; ++qi) {
    left[qi] = static_cast<int32_t>(chunks(qi / KV));
    first[qi + 1] = first[qi] + left[qi];
  }
  for (int64_t b = 0; b < B; ++b) {
    int64_t most = 0;
    for (int64_t t = 0; t < T; ++t) most = std::max(most, chunks(b * T + t));
    for (int64_t c = 0; c < most; ++c) items.insert(items.end(), {b, c});
  }
  const int64_t P = G * D + 2 * G;
  if (static_cast<int64_t>(part.size()) < first[rows] * P) part.resize(first[rows] * P);
  Attention a{q.typed_data(), k, v, p, out->typed_data(), B, T, KV, G, D, S,
              items.data(), static_cast<int64_t>(items.size() / 2), first.data(), left.data(), part.data(), P};
  for (int64_t qi = 0; qi < rows; ++qi)  // no live key (a position below 0): zeros
    if (left[qi] == 0) std::fill(a.out + qi * G * D, a.out + (qi + 1) * G * D, 0.f);
  if (first[rows] == 0) return ffi::Error::Success();
  pool().Run(attend_part, &a, static_cast<int>(std::min<int64_t>(a.items_n, pool().threads())));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxspecAttend, Attend,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// ---------------------------------------------------------------------------------------------------------------
// A plain read of n floats on every core (each part sums a contiguous share): roofline.py's measure of what the
// cores can stream through the same pool, with no product around it.
struct Stream {
  const float* a;
  int64_t n;
  float sums[kMaxThreads];
};

static void stream_part(void* ctx, int part, int parts) {
  Stream& s = *static_cast<Stream*>(ctx);
  const int64_t i1 = s.n * (part + 1) / parts;
  int64_t i = s.n * part / parts;
  v16 acc[4] = {};
  for (; i + 4 * kLanes <= i1; i += 4 * kLanes)
    for (int j = 0; j < 4; ++j) acc[j] += load(s.a + i + j * kLanes);
  float t = 0;
  for (; i < i1; ++i) t += s.a[i];
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < kLanes; ++l) t += acc[j][l];
  s.sums[part] = t;
}

extern "C" float jaxspec_stream_sum(const float* a, int64_t n) {
  Stream s{a, n, {}};
  const int parts = pool().threads();
  pool().Run(stream_part, &s, parts);
  float t = 0;
  for (int i = 0; i < parts; ++i) t += s.sums[i];
  return t;
}

extern "C" int jaxspec_matmul_threads() { return pool().threads(); }
extern "C" int jaxspec_packed_tile() { return kTile; }
