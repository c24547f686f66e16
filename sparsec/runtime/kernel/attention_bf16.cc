// Attention with bf16 products, two ways; both round Q, K, V and the softmax weights to bf16 (8
// significant bits, round to nearest even) and keep the sums and the softmax in fp32, so both give
// the same numbers up to the order of the fp32 sums. Padding (D to 32, keys to 16 or 64, Skv to 32,
// Dv to 16) is zeros. K is packed as [Dp / 2][keys] pairs (a pair of reduction indices per 32-bit
// lane, the operand layout of both instructions), V as [Skv32 / 2][Dv16] pairs.
//
// On Intel AMX tiles (Sapphire Rapids and later), per block of 16 query rows: TDPBF16PS multiplies
// a tile A of 16 rows x 32 bf16 by a tile B of 16 rows x 16 pairs and adds into 16 x 16 fp32 sums:
//   scores  = Q (16 x Dp bf16) . K^T, 64 keys (4 C tiles) a pass;
//   weights = the fp32 path's row softmax on the scores (mask, causality, NaN rules: attention.h);
//   Y       = weights (16 x Skv32 bf16) . V, 64 columns a pass, times 1 / sum per row.
// With AVX512-BF16 only (AMD Zen 4 and 5, Intel Cooper Lake), per tile of 6 query rows: VDPBF16PS
// adds the products of 16 lanes of bf16 pairs into 16 fp32 sums, twice the multiplies of an fp32
// FMA; 6 rows x 4 zmm of sums, one broadcast pair of Q (or of the weights) against 4 loads of K
// (or V) pairs per step, as the fp32 path does with single values.
#include <algorithm>

#include "amx.h"
#include "attention_internal.h"
#include "block_sparse_internal.h"

#if SPARSEC_HAS_AMX
#define SPARSEC_AMX_BF16 \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#endif
#if SPARSEC_HAS_BF16
#define SPARSEC_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#endif

namespace sparsec {
namespace detail {

#if SPARSEC_HAS_BF16
namespace {

constexpr int64_t kBlock = 16;   // AMX: query rows per block, keys or columns per C tile
constexpr int kDotRows = 6;      // AVX512-BF16: query rows per tile

// 32 floats at x (n of them valid, the rest zero) as 32 bf16.
SPARSEC_BF16 inline __m512i bf16x32(const float* x, int64_t n) {
  const __m512 lo = _mm512_maskz_loadu_ps(lane_mask16(n), x);
  const __m512 hi = _mm512_maskz_loadu_ps(lane_mask16(n - 16), x + 16);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// Keys [0, keys) (keys a multiple of 16; zero past Skv) as [Dp / 2][keys] pairs of bf16 (32-bit
// units): unit u of key j, (k_j[2u], k_j[2u + 1]), is kb[u * keys + j].
SPARSEC_BF16 void pack_keys(const HeadRows& h, int64_t Dp, int64_t keys, uint32_t* kb) {
  for (int64_t j0 = 0; j0 < keys; j0 += 16) {
    for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
      __m512 r[16];
      for (int t = 0; t < 16; ++t) {
        r[t] = j0 + t < h.Skv ? _mm512_castsi512_ps(bf16x32(h.k + (j0 + t) * h.ldk + d0, h.D - d0))
                              : _mm512_setzero_ps();
      }
      transpose16(r);  // now r[t] lane l is unit d0 / 2 + t of key j0 + l
      for (int t = 0; t < 16; ++t) _mm512_store_ps(reinterpret_cast<float*>(kb + (d0 / 2 + t) * keys + j0), r[t]);
    }
  }
}

// V's rows as [Skv32 / 2][Dv16] pairs of bf16: unit (p, c) is (v_{2p}[c], v_{2p+1}[c]).
SPARSEC_BF16 void pack_values(const HeadRows& h, int64_t skv32, int64_t dv16, uint32_t* vb) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t p = 0; p < skv32 / 2; ++p) {
    const int64_t j = 2 * p;
    for (int64_t c0 = 0; c0 < dv16; c0 += 16) {
      const __mmask16 cm = lane_mask16(h.Dv - c0);
      const __m512 a = j < h.Skv ? _mm512_maskz_loadu_ps(cm, h.v + j * h.ldv + c0) : _mm512_setzero_ps();
      const __m512 b = j + 1 < h.Skv ? _mm512_maskz_loadu_ps(cm, h.v + (j + 1) * h.ldv + c0) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a in the low half
      _mm512_store_si512(vb + p * dv16 + c0, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

// `rows` rows of bf16 (rows ld units apart, from `row(r)`; rows past `valid` zero), `width` floats
// each (a multiple of 32), into out.
template <typename Row>
SPARSEC_BF16 void bf16_rows(Row row, int64_t rows, int64_t valid, int64_t width, int64_t n, uint32_t* out, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d0 = 0; d0 < width; d0 += 32) {
      const __m512i x = r < valid ? bf16x32(row(r) + d0, n - d0) : _mm512_setzero_si512();
      _mm512_store_si512(out + r * ld + d0 / 2, x);
    }
  }
}

// ---- AVX512-BF16 ----

// One head's operands for the AVX512-BF16 path: K and V packed, the buffers of a tile of rows.
struct DotHead {
  const uint32_t *kb, *vb;  // K pairs [units][ldp], V pairs [pairs][dv16]
  uint32_t *qb, *pb;        // a tile's Q rows (units pairs each), its weights (pairs pairs each)
  float* s;                 // a tile's scores, then weights, rows ldp apart
  int64_t Dp, units, ldp, skv32, pairs, dv16;
};

// Scores of the tile's R rows (qb) against keys [j0, j0 + 64), unscaled, into s.
template <int R>
SPARSEC_BF16 void dot_scores(const DotHead& d, int64_t j0) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  const uint32_t* kj = d.kb + j0;
  for (int64_t u = 0; u < d.units; ++u, kj += d.ldp) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(kj), b1 = (__m512bh)_mm512_load_si512(kj + 16),
                   b2 = (__m512bh)_mm512_load_si512(kj + 32), b3 = (__m512bh)_mm512_load_si512(kj + 48);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(d.qb[r * d.units + u]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_store_ps(d.s + r * d.ldp + j0 + 16 * v, acc[r][v]);
}

// y rows [0, R) (row r at y + r * ldy) columns [c0, c0 + 16 NV) = the tile's weights (pb) times V's
// pairs, row r scaled by w[r].
template <int R, int NV>
SPARSEC_BF16 void dot_values(const DotHead& d, int64_t c0, const float* w, float* y, int64_t ldy, int64_t Dv) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const uint32_t* vp = d.vb + c0;
  for (int64_t p = 0; p < d.pairs; ++p, vp += d.dv16) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_load_si512(vp + 16 * v);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(d.pb[r * d.pairs + p]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(w[r]);
    for (int v = 0; v < NV; ++v) {
      _mm512_mask_storeu_ps(y + r * ldy + c0 + 16 * v, lane_mask16(Dv - c0 - 16 * v), _mm512_mul_ps(acc[r][v], inv));
    }
  }
}

// Query rows [i0, i0 + R) of the head: scores, softmax, weights rounded to bf16, weighted values. A
// tile is exactly as tall as the rows it has (a sequence's last rows run a shorter tile, not a padded one).
template <int R>
SPARSEC_BF16 void dot_tile(const HeadRows& h, const DotHead& d, int64_t i0) {
  bf16_rows([&](int64_t r) { return h.q + (i0 + r) * h.ldq; }, R, R, d.Dp, h.D, d.qb, d.units);
  for (int64_t j0 = 0; j0 < d.ldp; j0 += 64) dot_scores<R>(d, j0);
  float w[R];
  for (int r = 0; r < R; ++r) w[r] = h.softmax(h.context, i0 + r, d.s + r * d.ldp);
  bf16_rows([&](int64_t r) { return d.s + r * d.ldp; }, R, R, d.skv32, d.skv32, d.pb, d.pairs);
  float* y = h.y + i0 * h.ldy;
  for (int64_t c0 = 0; c0 < d.dv16; c0 += 64) {
    switch (std::min<int64_t>(4, (d.dv16 - c0) / 16)) {
      case 1: dot_values<R, 1>(d, c0, w, y, h.ldy, h.Dv); break;
      case 2: dot_values<R, 2>(d, c0, w, y, h.ldy, h.Dv); break;
      case 3: dot_values<R, 3>(d, c0, w, y, h.ldy, h.Dv); break;
      default: dot_values<R, 4>(d, c0, w, y, h.ldy, h.Dv); break;
    }
  }
}

}  // namespace

SPARSEC_BF16 void head_rows_avx512_bf16(const HeadRows& h) {
  DotHead d;
  d.Dp = ceil_div(h.D, 32) * 32, d.units = d.Dp / 2;
  d.ldp = ceil_div(h.Skv, 64) * 64;  // the softmax's padded row, and the packed keys'
  d.skv32 = ceil_div(h.Skv, 32) * 32, d.pairs = d.skv32 / 2;
  d.dv16 = ceil_div(h.Dv, 16) * 16;
  thread_local AlignedScratch<uint32_t> kb_buffer, vb_buffer, qb_buffer, pb_buffer;
  thread_local AlignedScratch<float> s_buffer;
  uint32_t* kb = kb_buffer.reserve(static_cast<size_t>(d.units * d.ldp));
  uint32_t* vb = vb_buffer.reserve(static_cast<size_t>(d.pairs * d.dv16));
  d.qb = qb_buffer.reserve(static_cast<size_t>(kDotRows * d.units));
  d.pb = pb_buffer.reserve(static_cast<size_t>(kDotRows * d.pairs));
  d.s = s_buffer.reserve(static_cast<size_t>(kDotRows * d.ldp));
  pack_keys(h, d.Dp, d.ldp, kb);
  pack_values(h, d.skv32, d.dv16, vb);
  d.kb = kb, d.vb = vb;
  for (int64_t i0 = h.i0; i0 < h.i1; i0 += kDotRows) {
    switch (std::min<int64_t>(kDotRows, h.i1 - i0)) {
      case 1: dot_tile<1>(h, d, i0); break;
      case 2: dot_tile<2>(h, d, i0); break;
      case 3: dot_tile<3>(h, d, i0); break;
      case 4: dot_tile<4>(h, d, i0); break;
      case 5: dot_tile<5>(h, d, i0); break;
      default: dot_tile<kDotRows>(h, d, i0); break;
    }
  }
}

bool avx512_bf16_ready() {
  static const bool ready = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ready;
}

#else

void head_rows_avx512_bf16(const HeadRows&) {}
bool avx512_bf16_ready() { return false; }

#endif

// ---- AMX ----

#if SPARSEC_HAS_AMX
namespace {

// Every tile 16 rows x 64 bytes: C 0-3, A 4, B 5-7.
TileConfig full_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  return c;
}

// C tiles 0 .. tiles-1 (zeroed first) += sum over `steps` reduction chunks of A . B: chunk c's A tile is
// 16 rows (lda bytes apart) at a + c * a_step bf16, its B tiles 16 pair rows (ldb bytes apart) at
// b + c * b_step units, one tile per 16 output columns.
SPARSEC_AMX_BF16 void tile_products(const uint32_t* a, int64_t lda, int64_t a_step, int64_t steps, const uint32_t* b,
                                    int64_t ldb, int64_t b_step, int64_t tiles) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < steps; ++c) {
    const uint32_t* bc = b + c * b_step;
    _tile_loadd(4, a + c * a_step / 2, lda);
    _tile_loadd(5, bc, ldb);
    if (tiles > 1) _tile_loadd(6, bc + 16, ldb);
    if (tiles > 2) _tile_loadd(7, bc + 32, ldb);
    _tile_dpbf16ps(0, 4, 5);
    if (tiles > 1) _tile_dpbf16ps(1, 4, 6);
    if (tiles > 2) _tile_dpbf16ps(2, 4, 7);
    if (tiles > 3) {
      _tile_loadd(5, bc + 48, ldb);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
}

// C tiles 0 .. tiles-1 to fp32 rows ld bytes apart, 16 columns each, side by side from `out`.
SPARSEC_AMX_BF16 void store_sums(float* out, int64_t ld, int64_t tiles) {
  _tile_stored(0, out, ld);
  if (tiles > 1) _tile_stored(1, out + 16, ld);
  if (tiles > 2) _tile_stored(2, out + 32, ld);
  if (tiles > 3) _tile_stored(3, out + 48, ld);
}

}  // namespace

SPARSEC_AMX_BF16 void head_rows_amx_bf16(const HeadRows& h) {
  const int64_t Dp = ceil_div(h.D, 32) * 32;
  const int64_t skv16 = ceil_div(h.Skv, 16) * 16, skv32 = ceil_div(h.Skv, 32) * 32;
  const int64_t ldp = ceil_div(h.Skv, 64) * 64;  // the softmax's padded row
  const int64_t dv16 = ceil_div(h.Dv, 16) * 16;
  thread_local AlignedScratch<uint32_t> kb_buffer, vb_buffer, qb_buffer, pb_buffer;
  thread_local AlignedScratch<float> s_buffer;
  uint32_t* kb = kb_buffer.reserve(static_cast<size_t>(Dp / 2 * skv16));
  uint32_t* vb = vb_buffer.reserve(static_cast<size_t>(skv32 / 2 * dv16));
  uint32_t* qb = qb_buffer.reserve(static_cast<size_t>(kBlock * Dp / 2));   // 16 rows x Dp bf16
  uint32_t* pb = pb_buffer.reserve(static_cast<size_t>(kBlock * skv32 / 2));  // 16 rows x Skv32 bf16
  float* s = s_buffer.reserve(static_cast<size_t>(kBlock * ldp + kBlock * 64));
  float* out = s + kBlock * ldp;  // 16 x 64 sums of a pass
  pack_keys(h, Dp, skv16, kb);
  pack_values(h, skv32, dv16, vb);
  const TileConfig config = full_tiles();
  _tile_loadconfig(&config);
  for (int64_t i0 = h.i0; i0 < h.i1; i0 += kBlock) {
    const int64_t rows = std::min<int64_t>(kBlock, h.i1 - i0);
    bf16_rows([&](int64_t r) { return h.q + (i0 + r) * h.ldq; }, kBlock, rows, Dp, h.D, qb, Dp / 2);
    // scores, 64 keys a pass
    for (int64_t j0 = 0; j0 < skv16; j0 += 64) {
      const int64_t tiles = std::min<int64_t>(4, (skv16 - j0) / 16);
      tile_products(qb, Dp * 2, 32, Dp / 32, kb + j0, skv16 * 4, 16 * skv16, tiles);
      store_sums(s + j0, ldp * 4, tiles);
    }
    // weights, as bf16 rows of skv32 (zero past Skv; rows past the block's end are zero)
    float w[kBlock] = {};
    for (int64_t r = 0; r < rows; ++r) w[r] = h.softmax(h.context, i0 + r, s + r * ldp);
    bf16_rows([&](int64_t r) { return s + r * ldp; }, kBlock, rows, skv32, skv32, pb, skv32 / 2);
    // values, 64 columns a pass
    for (int64_t c0 = 0; c0 < dv16; c0 += 64) {
      const int64_t tiles = std::min<int64_t>(4, (dv16 - c0) / 16);
      tile_products(pb, skv32 * 2, 32, skv32 / 32, vb + c0, dv16 * 4, 16 * dv16, tiles);
      store_sums(out, 256, tiles);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 inv = _mm512_set1_ps(w[r]);
        float* yr = h.y + (i0 + r) * h.ldy + c0;
        for (int64_t t = 0; t < tiles; ++t) {
          _mm512_mask_storeu_ps(yr + 16 * t, lane_mask16(h.Dv - c0 - 16 * t),
                                _mm512_mul_ps(_mm512_load_ps(out + r * 64 + 16 * t), inv));
        }
      }
    }
  }
  _tile_release();
}

#else

void head_rows_amx_bf16(const HeadRows&) {}

#endif

}  // namespace detail
}  // namespace sparsec
