// Attention (attention.h): one task per (batch, query head, run of query rows). A task transposes its
// head's keys once into 64-key panels, then takes its rows 6 at a time: scores for 64 keys per pass
// (6 x 4 zmm accumulators, one broadcast query value times 4 panel loads per step), the softmax in
// place, and the weighted sum of values (6 x up to 4 zmm per 64 value columns). Scores of a row
// tile live in a per-thread buffer (6 x Skv floats); nothing is written but Y. AVX2 takes the same
// tiles in ymm registers of 8: 16 keys of a panel per pass (6 x 2 accumulators), 16 value columns.
#include "attention.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "amx.h"
#include "attention_internal.h"
#include "block_sparse_internal.h"

namespace sparsec {
namespace {

using detail::AlignedScratch;
using detail::ceil_div;
using detail::checked_mul;
using detail::HeadRows;

constexpr int64_t kMaxSeq = int64_t(1) << 24;
constexpr int64_t kMaxHead = int64_t(1) << 16;
constexpr int64_t kPanel = 64;  // keys per transposed panel (4 zmm)
constexpr int kRows = 6;        // query rows per tile
constexpr int64_t kTasksWanted = 8;  // 4 per core on 2 cores, as the linear kernel

struct Job {
  const AttentionShape* s;
  const float *q, *k, *v;
  const AttentionMask* mask;
  float* y;
  int64_t row_chunks, rows_per_task;
  Isa isa;
};

// Pointers to row i of query head h (q, y) and key/value row j of head kvh (k, v) in batch b.
inline const float* q_row(const Job& job, int64_t b, int64_t i, int64_t h) {
  const AttentionShape& s = *job.s;
  return job.q + (b * s.Sq + i) * s.q_stride() + h * s.D;
}
inline const float* k_row(const Job& job, int64_t b, int64_t j, int64_t kvh) {
  const AttentionShape& s = *job.s;
  return job.k + (b * s.Skv + j) * s.k_stride() + kvh * s.D;
}
inline const float* v_row(const Job& job, int64_t b, int64_t j, int64_t kvh) {
  const AttentionShape& s = *job.s;
  return job.v + (b * s.Skv + j) * s.v_stride() + kvh * s.Dv;
}
inline float* y_row(const Job& job, int64_t b, int64_t i, int64_t h) {
  const AttentionShape& s = *job.s;
  return job.y + ((b * s.Sq + i) * s.Hq + h) * s.Dv;
}

#if SPARSEC_X86
using detail::lane_mask16;

// exp(x) for -inf <= x <= 0 (scores minus their maximum): exactly 0 below -87 (so -inf, a masked
// key, weighs exactly 0), else exp512's argument reduction and polynomial (x needs no upper clamp).
SPARSEC_AVX512 SPARSEC_INLINE __m512 exp_weight512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(live, detail::exp512_in_range(_mm512_max_ps(x, _mm512_set1_ps(-87.0f))));
}

// Keys [0, Skv) of the head transposed into panels: kt[c][d][jj] = k[c * 64 + jj][d], zero past Skv.
SPARSEC_AVX512 void pack_keys_avx512(const Job& job, int64_t b, int64_t kvh, float* kt) {
  const AttentionShape& s = *job.s;
  const int64_t panels = ceil_div(s.Skv, kPanel);
  for (int64_t c = 0; c < panels; ++c) {
    float* panel = kt + c * s.D * kPanel;
    for (int64_t g = 0; g < kPanel / 16; ++g) {
      const int64_t j0 = c * kPanel + g * 16;
      for (int64_t d0 = 0; d0 < s.D; d0 += 16) {
        const __mmask16 dm = lane_mask16(s.D - d0);
        __m512 r[16];
        for (int t = 0; t < 16; ++t) {
          r[t] = j0 + t < s.Skv ? _mm512_maskz_loadu_ps(dm, k_row(job, b, j0 + t, kvh) + d0) : _mm512_setzero_ps();
        }
        detail::transpose16(r);
        const int64_t dn = std::min<int64_t>(16, s.D - d0);
        for (int64_t t = 0; t < dn; ++t) _mm512_store_ps(panel + (d0 + t) * kPanel + g * 16, r[t]);
      }
    }
  }
}

// Scores of a tile of query rows (row pointers qs) against panel c (unscaled), into p (rows ldp apart).
SPARSEC_AVX512 void scores_avx512(const float* const* qs, int64_t D, int64_t c, const float* kt, float* p,
                                  int64_t ldp) {
  const float* panel = kt + c * D * kPanel;
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* kd = panel + d * kPanel;
    const __m512 b0 = _mm512_load_ps(kd), b1 = _mm512_load_ps(kd + 16), b2 = _mm512_load_ps(kd + 32),
                 b3 = _mm512_load_ps(kd + 48);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const __m512 a = _mm512_set1_ps(qs[r][d]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(a, b3, acc[r][3]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < 4; ++v) _mm512_store_ps(p + r * ldp + c * kPanel + 16 * v, acc[r][v]);
}

// Row i's scores p[0, Skv) (unscaled; lanes up to the 64-key panel end) scaled, with the mask and
// causality applied, then turned into weights in place (zero past Skv); returns the row's scale
// (detail::SoftmaxRow says which).
SPARSEC_AVX512 float softmax_avx512(const Job& job, int64_t b, int64_t h, int64_t i, float* p) {
  const AttentionShape& s = *job.s;
  const AttentionMask& m = *job.mask;
  const int64_t n = s.Skv;
  const int64_t limit = s.causal ? std::min(n, i + 1) : n;  // keys at or past `limit` are masked (causal)
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vscale = _mm512_set1_ps(s.scale);
  const int64_t base = b * m.sb + h * m.sh + i * m.si;
  __m512 vmax = neg_inf;
  __mmask16 nan = 0;
  const int64_t padded = ceil_div(n, kPanel) * kPanel;
  for (int64_t j = 0; j < padded; j += 16) {
    __m512 x = _mm512_mul_ps(_mm512_load_ps(p + j), vscale);
    if (j < n && (m.add != nullptr || m.keep != nullptr)) {
      if (m.add != nullptr) {
        const __mmask16 in = lane_mask16(n - j);
        const __m512 a = m.sj == 1 ? _mm512_maskz_loadu_ps(in, m.add + base + j)
                                   : _mm512_set1_ps(m.add[base + j * m.sj]);
        x = _mm512_add_ps(x, a);
      } else {
        __mmask16 keep;
        if (m.sj == 1) {
          __m128i bytes;
          if (n - j >= 16) {
            bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m.keep + base + j));
          } else {  // the row's last bytes: no read past the mask
            alignas(16) uint8_t tail[16] = {};
            std::memcpy(tail, m.keep + base + j, static_cast<size_t>(n - j));
            bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
          }
          const __m512i wide = _mm512_cvtepu8_epi32(bytes);
          keep = _mm512_test_epi32_mask(wide, wide);
        } else {
          keep = m.keep[base + j * m.sj] != 0 ? static_cast<__mmask16>(0xFFFF) : 0;
        }
        x = _mm512_add_ps(x, _mm512_mask_mov_ps(neg_inf, keep, _mm512_setzero_ps()));  // + -inf, as ONNX: inf - inf is NaN
      }
    }
    if (limit < n) {  // causal: -inf added past the diagonal (a +inf score there makes the row NaN)
      x = _mm512_add_ps(x, _mm512_mask_mov_ps(neg_inf, lane_mask16(limit - j), _mm512_setzero_ps()));
    }
    x = _mm512_mask_mov_ps(neg_inf, lane_mask16(n - j), x);  // lanes past Skv weigh nothing
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, x);
    _mm512_store_ps(p + j, x);
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  // s_j - m is NaN only for a NaN score or when m = +inf (inf - inf): either way the row is NaN
  const bool nan_row = nan != 0 || mx == std::numeric_limits<float>::infinity();
  if (nan_row || mx == -std::numeric_limits<float>::infinity()) {  // NaN, or every key masked
    for (int64_t j = 0; j < padded; j += 16) _mm512_store_ps(p + j, _mm512_setzero_ps());
    return nan_row ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
  }
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < padded; j += 16) {
    const __m512 e = exp_weight512(_mm512_sub_ps(_mm512_load_ps(p + j), vm));
    sum = _mm512_add_ps(sum, e);
    _mm512_store_ps(p + j, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// y rows (pointers ys, `rows` of them valid) = weights p (rows ldp apart) times V's columns
// [c0, c0 + 16 NV), row r scaled by inv[r].
// (FULL: all 16 NV columns exist, so the loads need no mask.)
template <int NV, bool FULL>
SPARSEC_AVX512 void weighted_values_avx512(const Job& job, int64_t b, int64_t kvh, const float* p, int64_t ldp,
                                           int64_t c0, const float* inv, float* const* ys, int rows) {
  const AttentionShape& s = *job.s;
  __mmask16 cm[NV];
  for (int v = 0; v < NV; ++v) cm[v] = lane_mask16(s.Dv - c0 - 16 * v);
  __m512 acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t ldv = s.v_stride();
  const float* vj = v_row(job, b, 0, kvh) + c0;
  for (int64_t j = 0; j < s.Skv; ++j, vj += ldv) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = FULL ? _mm512_loadu_ps(vj + 16 * v) : _mm512_maskz_loadu_ps(cm[v], vj + 16 * v);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const __m512 a = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const __m512 scale = _mm512_set1_ps(inv[r]);
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(ys[r] + c0 + 16 * v, cm[v], _mm512_mul_ps(acc[r][v], scale));
  }
}

// Rows [i0, i1) of head h, kRows at a time: scores against every panel of keys, the softmax in
// place, the weighted values. p holds a tile's scores (kRows rows, ldp apart).
SPARSEC_AVX512 void rows_avx512(const Job& job, int64_t b, int64_t h, int64_t i0, int64_t i1, float* kt, float* p) {
  const AttentionShape& s = *job.s;
  const int64_t kvh = h / (s.Hq / s.Hkv);
  const int64_t panels = ceil_div(s.Skv, kPanel);
  const int64_t ldp = panels * kPanel;
  pack_keys_avx512(job, b, kvh, kt);
  for (int64_t t0 = i0; t0 < i1; t0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, i1 - t0));
    const float* qs[kRows];
    float* ys[kRows];
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = t0 + std::min(r, rows - 1);  // a short tile repeats its last row, not stored
      qs[r] = q_row(job, b, i, h);
      ys[r] = y_row(job, b, i, h);
    }
    for (int64_t c = 0; c < panels; ++c) scores_avx512(qs, s.D, c, kt, p, ldp);
    float w[kRows] = {};
    for (int r = 0; r < kRows; ++r) {
      if (r < rows) {
        w[r] = softmax_avx512(job, b, h, t0 + r, p + r * ldp);
      } else {
        for (int64_t j = 0; j < ldp; j += 16) _mm512_store_ps(p + r * ldp + j, _mm512_setzero_ps());
      }
    }
    for (int64_t c0 = 0; c0 < s.Dv; c0 += 64) {
      const int64_t width = std::min<int64_t>(64, s.Dv - c0);
      if (width == 64) {
        weighted_values_avx512<4, true>(job, b, kvh, p, ldp, c0, w, ys, rows);
      } else if (width == 32) {
        weighted_values_avx512<2, true>(job, b, kvh, p, ldp, c0, w, ys, rows);
      } else {
        switch (ceil_div(width, 16)) {
          case 1: weighted_values_avx512<1, false>(job, b, kvh, p, ldp, c0, w, ys, rows); break;
          case 2: weighted_values_avx512<2, false>(job, b, kvh, p, ldp, c0, w, ys, rows); break;
          case 3: weighted_values_avx512<3, false>(job, b, kvh, p, ldp, c0, w, ys, rows); break;
          default: weighted_values_avx512<4, false>(job, b, kvh, p, ldp, c0, w, ys, rows); break;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2 (16 ymm registers): the same tiles of kRows query rows and 64-key panels, in vectors of 8;
// scores 16 keys of a panel at a time (6 x 2 ymm accumulators), the weighted values 16 columns at a
// time.

using detail::lane_mask8;
using detail::reduce_add8;
using detail::reduce_max8;

// lanes [0, n) of 8 as all-ones floats (for blends)
SPARSEC_AVX2 SPARSEC_INLINE __m256 lanes_below(int64_t n) { return _mm256_castsi256_ps(lane_mask8(n)); }

// exp_weight512 on 8 lanes: exactly 0 below -87.
SPARSEC_AVX2 SPARSEC_INLINE __m256 exp_weight256(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  return _mm256_and_ps(live, detail::exp256(x));
}

// pack_keys_avx512 by 8 x 8 transposes.
SPARSEC_AVX2 void pack_keys_avx2(const Job& job, int64_t b, int64_t kvh, float* kt) {
  const AttentionShape& s = *job.s;
  const int64_t panels = ceil_div(s.Skv, kPanel);
  for (int64_t c = 0; c < panels; ++c) {
    float* panel = kt + c * s.D * kPanel;
    for (int64_t g = 0; g < kPanel / 8; ++g) {
      const int64_t j0 = c * kPanel + g * 8;
      for (int64_t d0 = 0; d0 < s.D; d0 += 8) {
        const __m256i dm = lane_mask8(s.D - d0);
        __m256 r[8];
        for (int t = 0; t < 8; ++t) {
          r[t] = j0 + t < s.Skv ? _mm256_maskload_ps(k_row(job, b, j0 + t, kvh) + d0, dm) : _mm256_setzero_ps();
        }
        detail::transpose8(r);
        const int64_t dn = std::min<int64_t>(8, s.D - d0);
        for (int64_t t = 0; t < dn; ++t) _mm256_store_ps(panel + (d0 + t) * kPanel + g * 8, r[t]);
      }
    }
  }
}

// scores_avx512, 16 keys of the panel at a time.
SPARSEC_AVX2 void scores_avx2(const float* const* qs, int64_t D, int64_t c, const float* kt, float* p, int64_t ldp) {
  const float* panel = kt + c * D * kPanel;
  for (int64_t k0 = 0; k0 < kPanel; k0 += 16) {
    __m256 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const float* kd = panel + d * kPanel + k0;
      const __m256 b0 = _mm256_load_ps(kd), b1 = _mm256_load_ps(kd + 8);
#pragma GCC unroll 6
      for (int r = 0; r < kRows; ++r) {
        const __m256 a = _mm256_broadcast_ss(qs[r] + d);
        acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      _mm256_store_ps(p + r * ldp + c * kPanel + k0, acc[r][0]);
      _mm256_store_ps(p + r * ldp + c * kPanel + k0 + 8, acc[r][1]);
    }
  }
}

// softmax_avx512 on 8 lanes (the same rules for masks, causality, NaN and rows with every key masked).
SPARSEC_AVX2 float softmax_avx2(const Job& job, int64_t b, int64_t h, int64_t i, float* p) {
  const AttentionShape& s = *job.s;
  const AttentionMask& m = *job.mask;
  const int64_t n = s.Skv;
  const int64_t limit = s.causal ? std::min(n, i + 1) : n;
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 zero = _mm256_setzero_ps();
  const __m256 vscale = _mm256_set1_ps(s.scale);
  const int64_t base = b * m.sb + h * m.sh + i * m.si;
  __m256 vmax = neg_inf, nan = zero;
  const int64_t padded = ceil_div(n, kPanel) * kPanel;
  for (int64_t j = 0; j < padded; j += 8) {
    __m256 x = _mm256_mul_ps(_mm256_load_ps(p + j), vscale);
    if (j < n && (m.add != nullptr || m.keep != nullptr)) {
      if (m.add != nullptr) {
        const __m256 a = m.sj == 1 ? _mm256_maskload_ps(m.add + base + j, lane_mask8(n - j))
                                   : _mm256_set1_ps(m.add[base + j * m.sj]);
        x = _mm256_add_ps(x, a);
      } else {
        __m256 keep;
        if (m.sj == 1) {
          alignas(8) uint8_t bytes[8] = {};
          std::memcpy(bytes, m.keep + base + j, static_cast<size_t>(std::min<int64_t>(8, n - j)));
          const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
          keep = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(wide, _mm256_setzero_si256()),
                                                      _mm256_set1_epi32(-1)));
        } else {
          keep = m.keep[base + j * m.sj] != 0 ? _mm256_castsi256_ps(_mm256_set1_epi32(-1)) : zero;
        }
        x = _mm256_add_ps(x, _mm256_blendv_ps(neg_inf, zero, keep));  // + -inf, as ONNX: inf - inf is NaN
      }
    }
    if (limit < n) x = _mm256_add_ps(x, _mm256_blendv_ps(neg_inf, zero, lanes_below(limit - j)));
    x = _mm256_blendv_ps(neg_inf, x, lanes_below(n - j));  // lanes past Skv weigh nothing
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(x, vmax);  // vmaxps returns its second operand where x is NaN
    _mm256_store_ps(p + j, x);
  }
  const float mx = reduce_max8(vmax);
  const bool nan_row = _mm256_movemask_ps(nan) != 0 || mx == std::numeric_limits<float>::infinity();
  if (nan_row || mx == -std::numeric_limits<float>::infinity()) {
    for (int64_t j = 0; j < padded; j += 8) _mm256_store_ps(p + j, zero);
    return nan_row ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
  }
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 sum = zero;
  for (int64_t j = 0; j < padded; j += 8) {
    const __m256 e = exp_weight256(_mm256_sub_ps(_mm256_load_ps(p + j), vm));
    sum = _mm256_add_ps(sum, e);
    _mm256_store_ps(p + j, e);
  }
  return 1.0f / reduce_add8(sum);
}

// weighted_values_avx512 for V's columns [c0, c0 + 8 NV), NV <= 2 (FULL: all 8 NV exist, and the
// loop holds no mask: 12 accumulators, 2 values and a broadcast fill the 16 registers).
template <int NV, bool FULL>
SPARSEC_AVX2 void weighted_values_avx2(const Job& job, int64_t b, int64_t kvh, const float* p, int64_t ldp,
                                       int64_t c0, const float* inv, float* const* ys, int rows) {
  const AttentionShape& s = *job.s;
  __m256i cm[NV];
  for (int v = 0; v < NV; ++v) cm[v] = lane_mask8(s.Dv - c0 - 8 * v);
  __m256 acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  const int64_t ldv = s.v_stride();
  const float* vj = v_row(job, b, 0, kvh) + c0;
  for (int64_t j = 0; j < s.Skv; ++j, vj += ldv) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = FULL ? _mm256_loadu_ps(vj + 8 * v) : _mm256_maskload_ps(vj + 8 * v, cm[v]);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const __m256 a = _mm256_broadcast_ss(p + r * ldp + j);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, bv[v], acc[r][v]);
    }
  }
  // (constant indices into acc, so that it lives in registers: a loop to `rows` would spill it)
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) break;
    const __m256 scale = _mm256_set1_ps(inv[r]);
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const __m256 out = _mm256_mul_ps(acc[r][v], scale);
      if (FULL) {
        _mm256_storeu_ps(ys[r] + c0 + 8 * v, out);
      } else {
        _mm256_maskstore_ps(ys[r] + c0 + 8 * v, lane_mask8(s.Dv - c0 - 8 * v), out);
      }
    }
  }
}

// rows_avx512 on AVX2.
SPARSEC_AVX2 void rows_avx2(const Job& job, int64_t b, int64_t h, int64_t i0, int64_t i1, float* kt, float* p) {
  const AttentionShape& s = *job.s;
  const int64_t kvh = h / (s.Hq / s.Hkv);
  const int64_t panels = ceil_div(s.Skv, kPanel);
  const int64_t ldp = panels * kPanel;
  pack_keys_avx2(job, b, kvh, kt);
  for (int64_t t0 = i0; t0 < i1; t0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, i1 - t0));
    const float* qs[kRows];
    float* ys[kRows];
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = t0 + std::min(r, rows - 1);
      qs[r] = q_row(job, b, i, h);
      ys[r] = y_row(job, b, i, h);
    }
    for (int64_t c = 0; c < panels; ++c) scores_avx2(qs, s.D, c, kt, p, ldp);
    float w[kRows] = {};
    for (int r = 0; r < kRows; ++r) {
      if (r < rows) {
        w[r] = softmax_avx2(job, b, h, t0 + r, p + r * ldp);
      } else {
        for (int64_t j = 0; j < ldp; j += 8) _mm256_store_ps(p + r * ldp + j, _mm256_setzero_ps());
      }
    }
    for (int64_t c0 = 0; c0 < s.Dv; c0 += 16) {
      const int64_t width = std::min<int64_t>(16, s.Dv - c0);
      if (width == 16) {
        weighted_values_avx2<2, true>(job, b, kvh, p, ldp, c0, w, ys, rows);
      } else if (width > 8) {
        weighted_values_avx2<2, false>(job, b, kvh, p, ldp, c0, w, ys, rows);
      } else if (width == 8) {
        weighted_values_avx2<1, true>(job, b, kvh, p, ldp, c0, w, ys, rows);
      } else {
        weighted_values_avx2<1, false>(job, b, kvh, p, ldp, c0, w, ys, rows);
      }
    }
  }
}

// The bf16 paths' row softmax: the fp32 path's, for one (batch, head).
struct SoftmaxContext {
  const Job* job;
  int64_t b, h;
};
SPARSEC_AVX512 float softmax_row(const void* context, int64_t i, float* p) {
  const auto* c = static_cast<const SoftmaxContext*>(context);
  return softmax_avx512(*c->job, c->b, c->h, i, p);
}

// Rows [i0, i1) of head h on a bf16 path (detail::head_rows_amx_bf16 or head_rows_avx512_bf16).
void rows_bf16(const Job& job, int64_t b, int64_t h, int64_t i0, int64_t i1, void (*path)(const HeadRows&)) {
  const AttentionShape& s = *job.s;
  const int64_t kvh = h / (s.Hq / s.Hkv);
  const SoftmaxContext context{&job, b, h};
  HeadRows rows;
  rows.q = q_row(job, b, 0, h);
  rows.k = k_row(job, b, 0, kvh);
  rows.v = v_row(job, b, 0, kvh);
  rows.y = y_row(job, b, 0, h);
  rows.ldq = s.q_stride(), rows.ldk = s.k_stride(), rows.ldv = s.v_stride(), rows.ldy = s.Hq * s.Dv;
  rows.Skv = s.Skv, rows.D = s.D, rows.Dv = s.Dv, rows.i0 = i0, rows.i1 = i1;
  rows.softmax = softmax_row;
  rows.context = &context;
  path(rows);
}
#endif

#if SPARSEC_X86
void run_task(void* data, size_t t) {
  const Job& job = *static_cast<const Job*>(data);
  const AttentionShape& s = *job.s;
  const int64_t unit = static_cast<int64_t>(t) / job.row_chunks;
  const int64_t chunk = static_cast<int64_t>(t) % job.row_chunks;
  const int64_t b = unit / s.Hq, h = unit % s.Hq;
  const int64_t i0 = chunk * job.rows_per_task;
  const int64_t i1 = std::min(s.Sq, i0 + job.rows_per_task);
  if (i0 >= i1) return;
  if (s.bf16 && job.isa == Isa::kAmx) {
    rows_bf16(job, b, h, i0, i1, detail::head_rows_amx_bf16);
    return;
  }
  if (s.bf16 && job.isa != Isa::kAvx2 && detail::avx512_bf16_ready()) {
    rows_bf16(job, b, h, i0, i1, detail::head_rows_avx512_bf16);
    return;
  }
  thread_local AlignedScratch<float> kt_buffer;
  thread_local AlignedScratch<float> p_buffer;
  const int64_t ldp = ceil_div(s.Skv, kPanel) * kPanel;
  float* kt = kt_buffer.reserve(static_cast<size_t>(ldp * s.D));
  float* p = p_buffer.reserve(static_cast<size_t>(kRows * ldp));
  if (job.isa == Isa::kAvx2) {
    rows_avx2(job, b, h, i0, i1, kt, p);
  } else {
    rows_avx512(job, b, h, i0, i1, kt, p);
  }
}
#endif

}  // namespace

Isa select_isa_attention(bool bf16) {
  const Isa isa = select_isa();
  if (bf16 && isa == Isa::kAvx512 && isa_cap() == Isa::kAmx && detail::amx_ready(detail::AmxKind::kBf16)) {
    return Isa::kAmx;
  }
  return isa;
}

const char* attention_bf16_path() {
  const Isa isa = select_isa_attention(true);
  if (isa == Isa::kAvx512 && detail::avx512_bf16_ready()) return "avx512_bf16";
  return isa_name(isa);
}

std::string check_attention(const AttentionShape& s) {
  if (s.B < 0 || s.Sq < 0 || s.Skv < 0) return "batch and sequence lengths must not be negative";
  if (s.Sq > kMaxSeq || s.Skv > kMaxSeq) return "sequence lengths above 2^24 are not supported";
  if (s.Hq < 1 || s.Hkv < 1 || s.Hq % s.Hkv != 0) {
    return "q_num_heads (" + std::to_string(s.Hq) + ") must be a positive multiple of kv_num_heads (" +
           std::to_string(s.Hkv) + ")";
  }
  if (s.D < 1 || s.Dv < 1 || s.D > kMaxHead || s.Dv > kMaxHead) return "head sizes must be in [1, 65536]";
  if (!std::isfinite(s.scale)) return "scale must be finite";
  // the buffers of one task (panels of keys, a tile's scores) and every tensor's size fit an int64
  const int64_t ldp = ceil_div(s.Skv, kPanel) * kPanel;
  if (checked_mul(ldp, s.D) < 0 || checked_mul(checked_mul(s.B, s.Sq), checked_mul(s.Hq, std::max(s.D, s.Dv))) < 0 ||
      checked_mul(checked_mul(s.B, s.Skv), checked_mul(s.Hkv, std::max(s.D, s.Dv))) < 0) {
    return "tensor sizes overflow";
  }
  // a row stride covers its heads, and the strided tensors' sizes fit an int64
  if (s.ldq < 0 || s.ldk < 0 || s.ldv < 0 || s.q_stride() < s.Hq * s.D || s.k_stride() < s.Hkv * s.D ||
      s.v_stride() < s.Hkv * s.Dv) {
    return "row strides must cover the heads (ldq >= Hq * D, ldk >= Hkv * D, ldv >= Hkv * Dv)";
  }
  if (checked_mul(checked_mul(s.B, s.Sq), s.q_stride()) < 0 ||
      checked_mul(checked_mul(s.B, s.Skv), std::max(s.k_stride(), s.v_stride())) < 0) {
    return "tensor sizes overflow";
  }
  return "";
}

bool attention(const AttentionShape& s, const float* q, const float* k, const float* v, const AttentionMask& mask,
               float* y, Isa isa, ParallelFor parallel_for, void* runner_state) {
#if SPARSEC_X86
  if (isa != Isa::kAvx512 && isa != Isa::kAmx && isa != Isa::kAvx2) return false;
  const int64_t units = s.B * s.Hq;
  if (units == 0 || s.Sq == 0) return true;
  if (s.Skv == 0) {  // no key: every row is fully masked, weights of nothing
    std::fill(y, y + units * s.Sq * s.Dv, 0.0f);
    return true;
  }
  // enough tasks to balance the pool: split the rows of each head when there are few heads
  const int64_t chunks = std::max<int64_t>(1, std::min(ceil_div(kTasksWanted, units), ceil_div(s.Sq, 4 * kRows)));
  const int64_t tile = s.bf16 ? 16 : kRows;
  const int64_t rows = ceil_div(ceil_div(s.Sq, chunks), tile) * tile;
  Job job{&s, q, k, v, &mask, y, ceil_div(s.Sq, rows), rows, isa};
  const size_t total = static_cast<size_t>(units * job.row_chunks);
  if (parallel_for != nullptr && total > 1) {
    parallel_for(runner_state, run_task, total, &job);
  } else {
    for (size_t t = 0; t < total; ++t) run_task(&job, t);
  }
  return true;
#else
  (void)s, (void)q, (void)k, (void)v, (void)mask, (void)y, (void)isa, (void)parallel_for, (void)runner_state;
  return false;
#endif
}

}  // namespace sparsec
