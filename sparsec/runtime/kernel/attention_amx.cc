// Attention in bf16 on Intel AMX tiles (Sapphire Rapids and later): TDPBF16PS multiplies a tile A
// of 16 rows x 32 bf16 by a tile B of 16 rows x 16 pairs of bf16 (a pair of reduction indices per
// 32-bit lane) and adds the products into 16 x 16 fp32 sums. Per block of 16 query rows:
//   scores  = Q (16 x Dp bf16) . K^T, K packed as [Dp / 2][Skv16] pairs, 64 keys (4 C tiles) a pass;
//   weights = the fp32 path's row softmax on the scores (mask, causality, NaN rules: attention.h);
//   Y       = weights (16 x Skv32 bf16) . V, V packed as [Skv32 / 2][Dv16] pairs, 64 columns a pass,
//             times 1 / sum per row.
// Q, K, V and the weights are rounded to bf16 (8 significant bits, round to nearest even); the sums
// and the softmax stay fp32. Padding (D to 32, keys to 16 and 32, Dv to 16) is zeros.
#include <algorithm>
#include <cstring>

#include "amx.h"
#include "attention_internal.h"
#include "block_sparse_internal.h"

#if SPARSEC_HAS_AMX
#define SPARSEC_AMX_BF16 \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#endif

namespace sparsec {
namespace detail {

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

constexpr int64_t kBlock = 16;  // query rows per block, keys or columns per C tile

// 32 floats at x (n of them valid, the rest zero) as 32 bf16.
SPARSEC_AMX_BF16 inline __m512i bf16x32(const float* x, int64_t n) {
  const __m512 lo = _mm512_maskz_loadu_ps(lane_mask16(n), x);
  const __m512 hi = _mm512_maskz_loadu_ps(lane_mask16(n - 16), x + 16);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// K's rows as [Dp / 2][Skv16] pairs of bf16 (32-bit units): unit u of key j is (k_j[2u], k_j[2u + 1]).
SPARSEC_AMX_BF16 void pack_keys(const HeadRows& h, int64_t Dp, int64_t skv16, uint32_t* kb) {
  for (int64_t j0 = 0; j0 < skv16; j0 += 16) {
    for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
      __m512 r[16];
      for (int t = 0; t < 16; ++t) {
        r[t] = j0 + t < h.Skv ? _mm512_castsi512_ps(bf16x32(h.k + (j0 + t) * h.ldk + d0, h.D - d0))
                              : _mm512_setzero_ps();
      }
      transpose16(r);  // now r[t] lane l is unit d0 / 2 + t of key j0 + l
      for (int t = 0; t < 16; ++t) _mm512_store_ps(reinterpret_cast<float*>(kb + (d0 / 2 + t) * skv16 + j0), r[t]);
    }
  }
}

// V's rows as [Skv32 / 2][Dv16] pairs of bf16: unit (p, c) is (v_{2p}[c], v_{2p+1}[c]).
SPARSEC_AMX_BF16 void pack_values(const HeadRows& h, int64_t skv32, int64_t dv16, uint32_t* vb) {
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
    for (int64_t r = 0; r < kBlock; ++r) {
      for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
        const __m512i q = r < rows ? bf16x32(h.q + (i0 + r) * h.ldq + d0, h.D - d0) : _mm512_setzero_si512();
        _mm512_store_si512(qb + (r * Dp + d0) / 2, q);
      }
    }
    // scores, 64 keys a pass
    for (int64_t j0 = 0; j0 < skv16; j0 += 64) {
      const int64_t tiles = std::min<int64_t>(4, (skv16 - j0) / 16);
      tile_products(qb, Dp * 2, 32, Dp / 32, kb + j0, skv16 * 4, 16 * skv16, tiles);
      store_sums(s + j0, ldp * 4, tiles);
    }
    // weights, as bf16 rows of skv32 (zero past Skv; rows past the block's end are zero)
    float w[kBlock] = {};
    for (int64_t r = 0; r < kBlock; ++r) {
      float* row = s + r * ldp;
      if (r < rows) w[r] = h.softmax(h.context, i0 + r, row);
      for (int64_t j = 0; j < skv32; j += 32) {
        const __m512i p = r < rows ? bf16x32(row + j, 32) : _mm512_setzero_si512();
        _mm512_store_si512(pb + (r * skv32 + j) / 2, p);
      }
    }
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
