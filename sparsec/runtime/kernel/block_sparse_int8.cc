// INT8 compute for the block-sparse linear layer (see block_sparse.h for the arithmetic).
//
// A call first quantizes X per row into a u8 buffer (rows ldx bytes apart, zero beyond K, so the
// last group of 4 reduction indices of a block may read past K or into the next block: those
// bytes meet zero weights). Then tasks (rows x groups of block rows, as in the fp32 path) walk
// the kept blocks:
//   AVX-512 VNNI  a tile of MR rows x NV zmm (16 outputs each); per group of 4 reduction indices,
//                 NV weight loads and, per row, one 32-bit broadcast of 4 input bytes and NV
//                 vpdpbusd (u8 x s8, 4 products summed into each int32 lane; no saturation, and
//                 no int32 overflow while K <= kMaxInt8K).
//   AVX2          widening, not vpmaddubsw: vpmaddubsw adds two u8 x s8 products into an int16
//                 with saturation (2 * 255 * 127 = 64770 > 32767, so it would clip), while here
//                 4 weights are sign-extended to int16 (vpmovsxbw), 4 input bytes zero-extended
//                 and broadcast, and vpmaddwd adds two int16 products into an int32: exact
//                 (|sum| <= 2 * 255 * 128). A tile is MR = 2 rows x 16 outputs.
//   scalar        the reference: the same sums in int32.
// Each path subtracts zx[m] * colsum[n] in int32, converts to float once, scales by sx[m] * sw[n],
// adds the bias and runs the fp32 epilogue.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include "block_sparse.h"
#include "block_sparse_internal.h"

namespace sparsec {

using namespace detail;  // NOLINT

void ByteDeleter::operator()(int8_t* p) const { std::free(p); }

bool isa_int8_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if SPARSEC_X86
    case Isa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2");
    case Isa::kAvx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni");
    case Isa::kAmx: return isa_int8_supported(Isa::kAvx512) && amx_int8_ready();
#endif
    default: return false;
  }
}

Isa select_isa_int8() {
  Isa best = Isa::kScalar;
  if (isa_int8_supported(Isa::kAmx)) {
    best = Isa::kAmx;
  } else if (isa_int8_supported(Isa::kAvx512)) {
    best = Isa::kAvx512;
  } else if (isa_int8_supported(Isa::kAvx2)) {
    best = Isa::kAvx2;
  }
  const Isa cap = isa_cap();
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

std::string pack_weight_int8(const BlockInputs& in, int64_t N, int64_t K, PackedInt8& out) {
  if (!in.int8 || in.row_scales == nullptr) return "INT8 compute needs int8 values and float scales [N]";
  std::string error = check_block_inputs(in, N, K);
  if (!error.empty()) return error;
  if (K > kMaxInt8K) {
    return "INT8 compute needs K <= " + std::to_string(kMaxInt8K) + " (exact int32 sums), got K=" + std::to_string(K);
  }
  out.N = N;
  out.K = K;
  out.R = in.R;
  out.BR = in.BR;
  out.BC = in.BC;
  out.windows = in.BR == 1;  // the row path (block_sparse_int8_rows.cc)
  out.BRp = out.windows ? 1 : ceil_div(in.BR, 16) * 16;
  out.BCq = ceil_div(in.BC, 4);
  out.NBc = ceil_div(K, in.BC);
  const int64_t padded_rows = checked_mul(in.R, out.BRp);
  if (padded_rows < 0 || padded_rows > kMaxPackedFloats) return "the packed weight would be too large";
  out.scales.assign(static_cast<size_t>(padded_rows + 64), 0.0f);
  out.colsum.assign(static_cast<size_t>(padded_rows + 64), 0);
  for (int64_t r = 0; r < in.R; ++r) {
    for (int64_t i = 0; i < in.BR && r * in.BR + i < N; ++i) out.scales[r * out.BRp + i] = in.row_scales[r * in.BR + i];
  }
  if (out.windows) return pack_windows_int8(in, N, K, out);
  // Blocks narrower than 4 columns ([16, 1], [32, 2], ...): a group of 4 reduction indices would hold
  // BC real ones, so each block row's kept columns are merged into 4-column windows laid greedily from
  // a kept column (as the row path's), each packed as a block of width 4 that starts at its column,
  // [1][BRp][4], zero where a column is not kept (random [16, 1] blocks at density 0.1: about 0.77
  // windows per block).
  const bool merge = in.BC < 4;
  std::vector<int64_t> starts;  // merged: the windows' first columns, block row after block row
  out.row_start.assign(static_cast<size_t>(in.R + 1), 0);
  for (int64_t r = 0; r < in.R; ++r) {
    if (!merge) {
      out.row_start[r + 1] = out.row_start[r] + in.row_nnz[r];
      continue;
    }
    int64_t covered = 0;  // columns below are in a window already (block columns ascend)
    for (int64_t s = 0; s < in.row_nnz[r]; ++s) {
      const int64_t k0 = in.block_cols[r * in.S + s] * in.BC;
      for (int64_t k = k0; k < std::min(k0 + in.BC, K); ++k) {
        if (k < covered) continue;
        starts.push_back(k);
        covered = k + 4;
      }
    }
    out.row_start[r + 1] = static_cast<int64_t>(starts.size());
  }
  if (merge) {
    out.BC = 4;
    out.BCq = 1;
    out.NBc = ceil_div(K, 4);
  }
  const int64_t kept = out.row_start[in.R];
  const int64_t bytes = checked_mul(checked_mul(kept, out.BCq * 4), out.BRp);
  if (bytes < 0 || bytes > 4 * kMaxPackedFloats) return "the packed weight would be too large";
  const size_t alloc = static_cast<size_t>((std::max<int64_t>(bytes, 1) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, alloc);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, alloc);
  out.blocks = ByteBuffer(static_cast<int8_t*>(p));
  out.counted = PackedBytes(static_cast<int64_t>(alloc));
  out.cols.assign(static_cast<size_t>(kept), 0);
  if (merge) std::copy(starts.begin(), starts.end(), out.cols.begin());

  const int8_t* vq = static_cast<const int8_t*>(in.values);
  for (int64_t r = 0; r < in.R; ++r) {
    int64_t window = out.row_start[r];
    for (int64_t s = 0; s < in.row_nnz[r]; ++s) {
      const int64_t rs = r * in.S + s;
      const int64_t k0 = in.block_cols[rs] * in.BC;
      if (merge) {  // each column into the window that holds it, at its offset there
        for (int64_t k = k0; k < std::min(k0 + in.BC, K); ++k) {
          while (out.cols[window] + 4 <= k) ++window;
          int8_t* dst = out.blocks.get() + window * out.BRp * 4 + (k - out.cols[window]);
          for (int64_t i = 0; i < in.BR; ++i) {
            const int8_t v = vq[(rs * in.BR + i) * in.BC + (k - k0)];
            dst[i * 4] = v;
            out.colsum[r * out.BRp + i] += v;
          }
        }
        continue;
      }
      const int64_t b = out.row_start[r] + s;
      out.cols[b] = k0;
      int8_t* dst = out.blocks.get() + b * out.BCq * out.BRp * 4;
      const int64_t src0 = rs * in.BR * in.BC;
      const int64_t jn = std::min(in.BC, K - k0);  // columns beyond K stay zero
      for (int64_t i = 0; i < in.BR; ++i) {
        int32_t sum = 0;
        for (int64_t j = 0; j < jn; ++j) {
          const int8_t v = vq[src0 + i * in.BC + j];
          dst[((j / 4) * out.BRp + i) * 4 + (j % 4)] = v;
          sum += v;
        }
        out.colsum[r * out.BRp + i] += sum;
      }
    }
  }
  return {};
}

namespace {

// ------------------------------------------------------------------------------------------------
// Quantized input: X per row as u8 (see block_sparse.h), with its scales and zero points.

// Row scale and zero point from the row's min and max (both already folded with 0).
void row_params(float lo, float hi, float& scale, int32_t& zero) {
  scale = (hi - lo) / 255.0f;
  if (!(scale > 0.0f) || !std::isfinite(scale)) scale = 1.0f;  // all zeros (or NaN/inf: garbage, but bounded)
  const float z = std::nearbyint(-lo / scale);
  zero = static_cast<int32_t>(std::min(255.0f, std::max(0.0f, std::isnan(z) ? 0.0f : z)));
}

void quantize_row_scalar(const float* x, int64_t K, uint8_t* q, float& scale, int32_t& zero) {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    lo = std::min(lo, x[k]);
    hi = std::max(hi, x[k]);
  }
  row_params(lo, hi, scale, zero);
  for (int64_t k = 0; k < K; ++k) {
    const float v = std::nearbyint(x[k] / scale) + static_cast<float>(zero);
    q[k] = static_cast<uint8_t>(std::isnan(v) ? 0.0f : std::min(255.0f, std::max(0.0f, v)));
  }
}

#if SPARSEC_X86
SPARSEC_VNNI void quantize_row_avx512(const float* x, int64_t K, uint8_t* q, float& scale, int32_t& zero) {
  // The row's bounds: four pairs of running bounds, so that no vminps waits on the previous one.
  __m512 lo4[4], hi4[4];
  for (int u = 0; u < 4; ++u) lo4[u] = hi4[u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512 v = _mm512_loadu_ps(x + k + 16 * u);
      lo4[u] = _mm512_min_ps(lo4[u], v);
      hi4[u] = _mm512_max_ps(hi4[u], v);
    }
  }
  __m512 lo = _mm512_min_ps(_mm512_min_ps(lo4[0], lo4[1]), _mm512_min_ps(lo4[2], lo4[3]));
  __m512 hi = _mm512_max_ps(_mm512_max_ps(hi4[0], hi4[1]), _mm512_max_ps(hi4[2], hi4[3]));
  for (; k < K; k += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lane_mask16(K - k), x + k);  // zeros outside the row: 0 is in [lo, hi]
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
  }
  row_params(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), scale, zero);
  const __m512 s = _mm512_set1_ps(scale);
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), s);
  const __m512i z = _mm512_set1_epi32(zero);
  const __m512 near_edge = _mm512_set1_ps(0.5f - 0x1p-12f);
  // Rows of tiny values (s below 1 / FLT_MAX) have no finite 1 / s: every lane divides.
  const __mmask16 divide_all = std::isfinite(1.0f / scale) ? 0 : 0xFFFF;
  // 64 quantized bytes from four vectors: two saturating packs (int32 -> int16 -> u8, which clamp to
  // [0, 255] as std::min/max would) interleave 128-bit lanes; this puts the 4-byte groups back in order.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (k = 0; k < K; k += 64) {
    const bool whole = K - k >= 64;  // plain loads and store; masked ones only at the row's end
    __m512 xv[4], quot[4];
    __mmask16 near_half[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      xv[u] = whole ? _mm512_loadu_ps(x + k + 16 * u) : _mm512_maskz_loadu_ps(lane_mask16(K - k - 16 * u), x + k + 16 * u);
      // x * (1 / s) instead of a division per element: the two differ by at most |quot| 2^-23 (two
      // roundings), which can change the integer only where quot is that close to a half. |quot| <=
      // 256 here (|x| <= hi - lo = 255 s, or s = 1), so wherever quot is within 2^-12 of a half
      // (vreduceps: quot minus its nearest integer) the exact quotient is taken; the result is
      // always the division's (tests/test_int8_kernel.py, near ties). The four vectors' lanes near
      // a half are gathered in one mask, tested once: one branch per 64 inputs, almost never taken.
      quot[u] = _mm512_mul_ps(xv[u], inv);
      const __m512 off = _mm512_reduce_ps(quot[u], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      near_half[u] = _mm512_cmp_ps_mask(_mm512_abs_ps(off), near_edge, _CMP_GE_OQ) | divide_all;
    }
    if (near_half[0] | near_half[1] | near_half[2] | near_half[3]) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) quot[u] = _mm512_mask_div_ps(quot[u], near_half[u], xv[u], s);
    }
    __m512i v[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      // cvtps rounds with MXCSR's mode: nearest, ties to even (like std::nearbyint in row_params).
      v[u] = _mm512_add_epi32(_mm512_cvtps_epi32(quot[u]), z);
    }
    const __m512i bytes = _mm512_permutexvar_epi32(
        order, _mm512_packus_epi16(_mm512_packs_epi32(v[0], v[1]), _mm512_packs_epi32(v[2], v[3])));
    if (whole) {
      _mm512_storeu_si512(q + k, bytes);
    } else {
      _mm512_mask_storeu_epi8(q + k, (uint64_t{1} << (K - k)) - 1, bytes);
    }
  }
}
#endif

struct QuantizeJob {
  const float* x;
  int64_t M, K, ld, rows_per_task;
  uint8_t* q;
  float* scale;
  int32_t* zero;
  bool vector;
};

void quantize_task(void* data, size_t t) {
  const QuantizeJob& job = *static_cast<const QuantizeJob*>(data);
  const int64_t m0 = static_cast<int64_t>(t) * job.rows_per_task;
  const int64_t m1 = std::min(job.M, m0 + job.rows_per_task);
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* q = job.q + m * job.ld;
#if SPARSEC_X86
    if (job.vector) {
      quantize_row_avx512(job.x + m * job.K, job.K, q, job.scale[m], job.zero[m]);
    } else {
      quantize_row_scalar(job.x + m * job.K, job.K, q, job.scale[m], job.zero[m]);
    }
#else
    quantize_row_scalar(job.x + m * job.K, job.K, q, job.scale[m], job.zero[m]);
#endif
    std::memset(q + job.K, 0, static_cast<size_t>(job.ld - job.K));
  }
}

}  // namespace

// Rows quantized on demand (the VNNI and AMX block paths with threads): tile t, rows [t h, t h + h)
// with h the quantize job's rows_per_task (the path's tile height, or an AMX pass), is quantized by the
// first task that reaches it, while the others go on with other tiles (each task starts at its own
// tile: block_rows_vnni's and block_rows_amx's `start`). No separate pass, no barrier between
// quantizing and multiplying, and a thread's first reads of the rows it quantized hit its own cache.
struct detail::LazyRows {
  QuantizeJob* job;
  std::atomic<int>* state;  // per tile: 0 not quantized, 1 being quantized, 2 ready

  void ensure(int64_t t) const {
    do_once(state[t], [&] { quantize_task(job, static_cast<size_t>(t)); });
  }
};

void detail::ensure_tile(const LazyRows& lazy, int64_t t) { lazy.ensure(t); }

namespace {

int64_t valid_cols(const PackedInt8& w, int64_t r) { return std::min(w.BR, w.N - r * w.BR); }

// Row m's exact int32 sums for the output columns [col, col + width) (packed index pcol): copied
// into `raw` when the caller asked for the integers (tests), else dequantized with the bias added
// into Y. Returns whether Y was written (the fp32 epilogue follows).
bool store_sums(const int32_t* sums, int64_t width, int64_t m, int64_t col, int64_t pcol, const QuantizedX& xq,
                const PackedInt8& w, const Epilogue& ep, float* y, int32_t* raw) {
  if (raw != nullptr) {
    std::copy(sums, sums + width, raw + m * w.N + col);
    return false;
  }
  float* ym = y + m * w.N + col;
  for (int64_t i = 0; i < width; ++i) {
    ym[i] = static_cast<float>(sums[i]) * (xq.scale[m] * w.scales[pcol + i]) + (ep.bias ? ep.bias[col + i] : 0.0f);
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// Scalar reference.

void block_rows_scalar(const PackedInt8& w, int64_t r0, int64_t r1, const QuantizedX& xq, int64_t rows,
                       const Epilogue& ep, float* y, int32_t* raw) {
  int32_t acc[64];
  for (int64_t m = 0; m < rows; ++m) {
    const uint8_t* xm = xq.data + m * xq.ld;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ncols_row = valid_cols(w, r);
      for (int64_t o0 = 0; o0 < ncols_row; o0 += 64) {
        const int64_t width = std::min<int64_t>(64, ncols_row - o0);
        std::fill(acc, acc + width, 0);
        for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
          const int8_t* wb = w.block(b);
          const uint8_t* xb = xm + w.cols[b];
          for (int64_t q = 0; q < w.BCq; ++q) {
            for (int64_t i = 0; i < width; ++i) {
              const int8_t* wi = wb + ((q * w.BRp) + o0 + i) * 4;
              for (int t = 0; t < 4; ++t) acc[i] += static_cast<int32_t>(xb[4 * q + t]) * wi[t];
            }
          }
        }
        const int64_t col = r * w.BR + o0, pcol = r * w.BRp + o0;
        for (int64_t i = 0; i < width; ++i) acc[i] -= xq.zero[m] * w.colsum[pcol + i];
        if (store_sums(acc, width, m, col, pcol, xq, w, ep, y, raw)) finish_tile_scalar(ep, y + m * w.N + col, 1, width, w.N);
      }
    }
  }
}

#if SPARSEC_X86

// ------------------------------------------------------------------------------------------------
// AVX-512 VNNI.

template <int NV> struct Tiles8;
template <> struct Tiles8<1> { static constexpr int kSmall = 4, kBig = 16; };
// NV = 2 (32-wide blocks): 8 rows, not 12. With 16 accumulators instead of 24 neither the row
// pointers nor the epilogue's constants spill: 32x32 layers at K = 768 take 0.92-0.98x the time on
// Zen 4, equal at K = 3072 (16 rows for NV = 1 and 6 for NV = 4 stay: 12 and 4 measured 1.03x, 1.15x).
template <> struct Tiles8<2> { static constexpr int kSmall = 4, kBig = 8; };
template <> struct Tiles8<3> { static constexpr int kSmall = 2, kBig = 8; };
template <> struct Tiles8<4> { static constexpr int kSmall = 2, kBig = 6; };

inline int32_t load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Where a tile's sums go: its outputs' column sums, weight scales and bias (or null), its rows'
// zero points and scales, the residual (or null) and Y at the tile's first row and column, rows ld
// apart; `ncols` outputs of `mr` rows.
struct TileOut {
  const int32_t* colsum;
  const float* wscale;
  const float* bias;
  const int32_t* zero;
  const float* xscale;
  const float* residual;
  float* y;
  int64_t ld, ncols, mr;
};

// A tile's epilogue: exact = sums - zero * colsum, Y = exact * (xscale * wscale) + bias, the activation
// A (a template argument: no branch per vector), the residual. Everything it reads is in locals
// first: the intrinsic stores may alias anything, and parameters read through a reference were
// otherwise reloaded and retested for every vector (a third of the epilogue's time in BERT-base).
template <int NV, int MR, Activation A>
SPARSEC_VNNI SPARSEC_INLINE void finish_tile_vnni(const __m512i (&acc)[MR][NV], const TileOut& out) {
  __mmask16 mask[NV];
  __m512i colsum[NV];
  __m512 wscale[NV], bias[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    mask[v] = lane_mask16(out.ncols - 16 * v);
    colsum[v] = _mm512_loadu_si512(out.colsum + 16 * v);
    wscale[v] = _mm512_loadu_ps(out.wscale + 16 * v);
    bias[v] = out.bias ? _mm512_maskz_loadu_ps(mask[v], out.bias + 16 * v) : _mm512_setzero_ps();
  }
  const int64_t mr = out.mr, ld = out.ld;
  const float* residual = out.residual;
  float* y = out.y;
  int32_t zero[MR];
  float xscale[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    const int64_t row = m < mr ? m : 0;
    zero[m] = out.zero[row];
    xscale[m] = out.xscale[row];
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    if (m >= mr) break;
    const __m512i zm = _mm512_set1_epi32(zero[m]);
    const __m512 sm = _mm512_set1_ps(xscale[m]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512i exact = _mm512_sub_epi32(acc[m][v], _mm512_mullo_epi32(zm, colsum[v]));
      __m512 o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(sm, wscale[v]), bias[v]);
      o = activate512(o, A);
      if (residual != nullptr) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(mask[v], residual + m * ld + 16 * v));
      _mm512_mask_storeu_ps(y + m * ld + 16 * v, mask[v], o);
    }
  }
}

// Rows of the tile at or beyond `mr` re-read row mr-1 and are not stored.
template <int NV, int MR>
SPARSEC_VNNI void tile_vnni(const PackedInt8& w, int64_t r, int64_t o0, int64_t ncols, const QuantizedX& xq,
                            int64_t mr, const Epilogue& ep, float* y, int32_t* raw) {
  const uint8_t* rows[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) rows[m] = xq.data + (m < mr ? m : mr - 1) * xq.ld;
  __m512i acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_si512();
  }
  const int64_t step = w.BRp * 4;
  for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
    const int8_t* wb = w.block(b) + o0 * 4;
    const int64_t k0 = w.cols[b];
    const int64_t qn = std::min(w.BCq, ceil_div(w.K - k0, 4));  // groups wholly beyond K add nothing
    for (int64_t q = 0; q < qn; ++q) {
      __m512i wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_si512(wb + q * step + 64 * v);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512i xv = _mm512_set1_epi32(load4(rows[m] + k0 + 4 * q));
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], xv, wv[v]);
      }
    }
  }

  const int64_t col = r * w.BR + o0, pcol = r * w.BRp + o0;
  if (raw != nullptr) {  // the exact sums (tests); every index constant, so acc stays in registers
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      if (m >= mr) break;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512i colsum = _mm512_loadu_si512(w.colsum.data() + pcol + 16 * v);
        const __m512i exact = _mm512_sub_epi32(acc[m][v], _mm512_mullo_epi32(_mm512_set1_epi32(xq.zero[m]), colsum));
        _mm512_mask_storeu_epi32(raw + m * w.N + col + 16 * v, lane_mask16(ncols - 16 * v), exact);
      }
    }
    return;
  }
  const TileOut out{w.colsum.data() + pcol, w.scales.data() + pcol, ep.bias ? ep.bias + col : nullptr, xq.zero,
                    xq.scale, ep.residual ? ep.residual + (y - ep.y) + col : nullptr, y + col, w.N, ncols, mr};
  switch (ep.act) {
    case Activation::kGelu: finish_tile_vnni<NV, MR, Activation::kGelu>(acc, out); break;
    case Activation::kGeluTanh: finish_tile_vnni<NV, MR, Activation::kGeluTanh>(acc, out); break;
    case Activation::kRelu: finish_tile_vnni<NV, MR, Activation::kRelu>(acc, out); break;
    default: finish_tile_vnni<NV, MR, Activation::kNone>(acc, out); break;
  }
}

template <int NV>
void tile_fit_vnni(const PackedInt8& w, int64_t r, int64_t o0, int64_t ncols, const QuantizedX& xq, int64_t mr,
                   const Epilogue& ep, float* y, int32_t* raw) {
  if (mr == 1) {
    tile_vnni<NV, 1>(w, r, o0, ncols, xq, mr, ep, y, raw);
  } else if (mr <= Tiles8<NV>::kSmall) {
    tile_vnni<NV, Tiles8<NV>::kSmall>(w, r, o0, ncols, xq, mr, ep, y, raw);
  } else {
    tile_vnni<NV, Tiles8<NV>::kBig>(w, r, o0, ncols, xq, mr, ep, y, raw);
  }
}

int64_t tile_height_vnni(int64_t nv) {
  switch (nv) {
    case 1: return Tiles8<1>::kBig;
    case 2: return Tiles8<2>::kBig;
    case 3: return Tiles8<3>::kBig;
    default: return Tiles8<4>::kBig;
  }
}

// Tiles of `rows` rows from the task's first row m0, taken from tile `start` on (wrapping), each
// quantized first when `lazy` (its tiles are this path's tile height, and m0 a multiple of it).
void block_rows_vnni(const PackedInt8& w, int64_t r0, int64_t r1, const QuantizedX& xq, int64_t rows,
                     const Epilogue& ep, float* y, int32_t* raw, const LazyRows* lazy = nullptr, int64_t m0 = 0,
                     int64_t start = 0) {
  const int64_t height = tile_height_vnni(std::min<int64_t>(4, w.BRp / 16));
  const int64_t tiles = ceil_div(rows, height);
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t m = (i + start) % tiles * height;
    if (lazy != nullptr) lazy->ensure((m0 + m) / height);
    const int64_t mr = std::min(height, rows - m);
    QuantizedX xt{xq.data + m * xq.ld, xq.ld, xq.scale + m, xq.zero + m};
    float* ym = y + m * w.N;
    int32_t* rm = raw ? raw + m * w.N : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ncols_row = valid_cols(w, r);
      for (int64_t o0 = 0; o0 < ncols_row; o0 += 64) {
        const int64_t ncols = std::min<int64_t>(64, ncols_row - o0);
        switch ((ncols + 15) / 16) {
          case 1: tile_fit_vnni<1>(w, r, o0, ncols, xt, mr, ep, ym, rm); break;
          case 2: tile_fit_vnni<2>(w, r, o0, ncols, xt, mr, ep, ym, rm); break;
          case 3: tile_fit_vnni<3>(w, r, o0, ncols, xt, mr, ep, ym, rm); break;
          default: tile_fit_vnni<4>(w, r, o0, ncols, xt, mr, ep, ym, rm); break;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2: MR rows x 16 outputs. acc[m][u] holds outputs 4u..4u+3 as two int32 partial sums each
// (reduction indices 0-1 and 2-3 of each group of 4); they are added pairwise at the store.

template <int MR>
SPARSEC_AVX2 void tile_avx2(const PackedInt8& w, int64_t r, int64_t o0, int64_t ncols, const QuantizedX& xq,
                            int64_t mr, const Epilogue& ep, float* y, int32_t* raw) {
  const uint8_t* rows[MR];
  for (int m = 0; m < MR; ++m) rows[m] = xq.data + (m < mr ? m : mr - 1) * xq.ld;
  __m256i acc[MR][4];
  for (int m = 0; m < MR; ++m) {
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_si256();
  }
  const int64_t step = w.BRp * 4;
  for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
    const int8_t* wb = w.block(b) + o0 * 4;
    const int64_t k0 = w.cols[b];
    const int64_t qn = std::min(w.BCq, ceil_div(w.K - k0, 4));
    for (int64_t q = 0; q < qn; ++q) {
      __m256i wv[4];
      for (int u = 0; u < 4; ++u) {
        wv[u] = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(wb + q * step + 16 * u)));
      }
      for (int m = 0; m < MR; ++m) {
        // 4 input bytes -> 4 int16, repeated in each 64-bit lane (the 4 weights of one output).
        const __m128i x16 = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(load4(rows[m] + k0 + 4 * q)));
        const __m256i xv = _mm256_broadcastq_epi64(x16);
        for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_add_epi32(acc[m][u], _mm256_madd_epi16(xv, wv[u]));
      }
    }
  }

  const int64_t col = r * w.BR + o0, pcol = r * w.BRp + o0;
  const int64_t width = std::min<int64_t>(16, ncols);
  for (int m = 0; m < MR; ++m) {
    if (m >= mr) break;
    alignas(32) int32_t exact[16];
    for (int h = 0; h < 2; ++h) {
      // hadd: [o0 o1 o4 o5 | o2 o3 o6 o7] of this half; the permute restores o0..o7.
      const __m256i pairs = _mm256_hadd_epi32(acc[m][2 * h], acc[m][2 * h + 1]);
      const __m256i sums = _mm256_permute4x64_epi64(pairs, 0xD8);
      const __m256i cs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.colsum.data() + pcol + 8 * h));
      _mm256_store_si256(reinterpret_cast<__m256i*>(exact + 8 * h),
                         _mm256_sub_epi32(sums, _mm256_mullo_epi32(_mm256_set1_epi32(xq.zero[m]), cs)));
    }
    store_sums(exact, width, m, col, pcol, xq, w, ep, y, raw);
  }
  if (raw == nullptr) finish_tile_avx2(ep, y + col, std::min<int64_t>(mr, MR), width, w.N);
}

void block_rows_avx2(const PackedInt8& w, int64_t r0, int64_t r1, const QuantizedX& xq, int64_t rows,
                     const Epilogue& ep, float* y, int32_t* raw) {
  for (int64_t m = 0; m < rows; m += 2) {
    const int64_t mr = std::min<int64_t>(2, rows - m);
    QuantizedX xt{xq.data + m * xq.ld, xq.ld, xq.scale + m, xq.zero + m};
    float* ym = y + m * w.N;
    int32_t* rm = raw ? raw + m * w.N : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ncols_row = valid_cols(w, r);
      for (int64_t o0 = 0; o0 < ncols_row; o0 += 16) {
        const int64_t ncols = std::min<int64_t>(16, ncols_row - o0);
        if (mr == 1) {
          tile_avx2<1>(w, r, o0, ncols, xt, mr, ep, ym, rm);
        } else {
          tile_avx2<2>(w, r, o0, ncols, xt, mr, ep, ym, rm);
        }
      }
    }
  }
}

#endif  // SPARSEC_X86

// ------------------------------------------------------------------------------------------------
// Work split, as in the fp32 path.

struct Job {
  const PackedInt8* w;
  QuantizedX xq;
  Epilogue ep;
  float* y;
  int32_t* raw;
  int64_t M, rows_per_task;
  std::vector<int64_t> group_start;
  Isa isa;
  const LazyRows* lazy;  // or null: X was quantized before the tasks
  bool layer_norm;       // each task normalizes its rows: it computed all their outputs (one group)
};

void run_task(void* data, size_t t) {
  const Job& job = *static_cast<const Job*>(data);
  const TaskSpan span(job.group_start, job.rows_per_task, job.M, t);
  if (span.empty()) return;
  const int64_t m0 = span.m0, rows = span.rows, r0 = span.r0, r1 = span.r1;
  const PackedInt8& w = *job.w;
  const QuantizedX xq{job.xq.data + m0 * job.xq.ld, job.xq.ld, job.xq.scale + m0, job.xq.zero + m0};
  float* y = job.y + m0 * w.N;
  int32_t* raw = job.raw ? job.raw + m0 * w.N : nullptr;
  // With X quantized on demand, the tasks of one row range start at different tiles, spread by group.
  const int64_t groups = static_cast<int64_t>(job.group_start.size()) - 1;
  const auto start = [&](int64_t height) {
    return static_cast<int64_t>(t) % groups * ceil_div(rows, height) / groups;
  };
  switch (job.isa) {
#if SPARSEC_X86
    case Isa::kAmx:
      if (amx_takes(w)) {
        block_rows_amx(w, r0, r1, xq, rows, job.ep, y, raw, job.lazy, m0, start(kAmxPassRows));
      } else {
        block_rows_vnni(w, r0, r1, xq, rows, job.ep, y, raw);
      }
      break;
    case Isa::kAvx512:
      block_rows_vnni(w, r0, r1, xq, rows, job.ep, y, raw, job.lazy, m0,
                      start(tile_height_vnni(std::min<int64_t>(4, w.BRp / 16))));
      break;
    case Isa::kAvx2: block_rows_avx2(w, r0, r1, xq, rows, job.ep, y, raw); break;
#endif
    default: block_rows_scalar(w, r0, r1, xq, rows, job.ep, y, raw); break;
  }
  if (job.layer_norm) {
    layer_norm_rows(job.ep, y, rows, w.N, job.isa == Isa::kAmx ? Isa::kAvx512 : job.isa, nullptr, nullptr);
  }
}

constexpr int64_t kRowQuantum = 48;          // a multiple of every tile height
constexpr int64_t kTaskInputBytes = 256 * 1024;
constexpr int64_t kSerialMacsInt8 = 1 << 21;     // int8 work is ~2-4x cheaper per MAC than fp32

}  // namespace

void block_sparse_linear_int8(const PackedInt8& w, const float* x, const Epilogue& epilogue, float* y, int64_t M,
                              Isa isa, ParallelFor parallel_for, void* runner_state, int32_t* raw) {
  if (M <= 0 || w.R == 0) return;
  // Quantized rows: room for the 4-byte groups that run past the last block, rounded to 64 bytes,
  // and never a multiple of 4 KB apart (tile rows would share L1 sets).
  int64_t ld = (w.NBc * w.BC + 4 + 63) / 64 * 64;
  if (ld % 4096 == 0) ld += 64;
  thread_local AlignedScratch<uint8_t> q_buffer;
  thread_local AlignedScratch<float> q_scale_buffer;
  thread_local AlignedScratch<int32_t> q_zero_buffer;
  // + the row path's 64-byte loads, and 32 zero rows that AMX's last tiles read (not stored).
  uint8_t* q_data = q_buffer.reserve(static_cast<size_t>((M + 32) * ld + 64));
  if (isa == Isa::kAmx) std::memset(q_data + M * ld, 0, static_cast<size_t>(32 * ld + 64));
  float* q_scale = q_scale_buffer.reserve(static_cast<size_t>(M));
  int32_t* q_zero = q_zero_buffer.reserve(static_cast<size_t>(M));
  const int64_t macs = M * w.row_start[w.R] * w.BR * w.BC;
  const bool threads = parallel_for != nullptr && macs >= kSerialMacsInt8;
#if SPARSEC_X86
  const bool vector = isa == Isa::kAvx512 || isa == Isa::kAmx;
#else
  const bool vector = false;
#endif
  static const int64_t cores = std::max<int64_t>(2, std::thread::hardware_concurrency());
  static const int64_t target_tasks = kTasksPerCore * cores;
#if SPARSEC_X86
  // The VNNI and AMX block paths quantize X tile by tile inside their tasks (LazyRows); the others first.
  const bool amx_blocks = isa == Isa::kAmx && amx_takes(w);
  const bool lazy = threads && !w.windows && (isa == Isa::kAvx512 || amx_blocks);
  const int64_t height =
      !lazy ? 1 : amx_blocks ? kAmxPassRows : tile_height_vnni(std::min<int64_t>(4, w.BRp / 16));
#else
  const bool lazy = false;
  const int64_t height = 1;
#endif
  // Otherwise: tasks of at most 64 KB of input, a multiple of the cores when threaded, and rows spread
  // evenly: 128 rows of K = 768 once made tasks of 85 and 43 rows, one thread quantizing twice the other's.
  int64_t q_tasks = ceil_div(M, std::max<int64_t>(1, (64 * 1024) / w.K));
  if (threads) q_tasks = std::min(M, ceil_div(q_tasks, cores) * cores);
  const int64_t q_rows = lazy ? height : ceil_div(M, q_tasks);
  q_tasks = ceil_div(M, q_rows);
  QuantizeJob qjob{x, M, w.K, ld, q_rows, q_data, q_scale, q_zero, vector};
  thread_local std::unique_ptr<std::atomic<int>[]> lazy_state;
  thread_local int64_t lazy_state_size = 0;
  LazyRows lazy_rows{&qjob, nullptr};
  if (lazy) {
    if (lazy_state_size < q_tasks) {
      lazy_state.reset(new std::atomic<int>[static_cast<size_t>(q_tasks)]);
      lazy_state_size = q_tasks;
    }
    for (int64_t t = 0; t < q_tasks; ++t) lazy_state[t].store(0, std::memory_order_relaxed);
    lazy_rows.state = lazy_state.get();
  } else if (threads && q_tasks > 1) {
    parallel_for(runner_state, quantize_task, static_cast<size_t>(q_tasks), &qjob);
  } else {
    for (size_t t = 0; t < static_cast<size_t>(q_tasks); ++t) quantize_task(&qjob, t);
  }

  Epilogue ep = epilogue;
  ep.y = y;
  const Isa fp32_isa = isa == Isa::kAmx ? Isa::kAvx512 : isa;  // the epilogue's and the row path's
  if (w.windows) {
    const QuantizedX xq{q_data, ld, q_scale, q_zero};
#if SPARSEC_X86
    if (w.columns.active()) {  // packed for VNNI (columns_pay_int8), the call's isa too
      windows_columns(w, xq, M, ep, y, raw, threads, parallel_for, runner_state);
    } else if (fp32_isa == Isa::kAvx512 || fp32_isa == Isa::kAvx2) {
      windows_simd(w, xq, M, ep, y, raw, fp32_isa, threads, parallel_for, runner_state);
    } else {
      windows_scalar(w, xq, M, ep, y, raw);
    }
#else
    windows_scalar(w, xq, M, ep, y, raw);
#endif
    if (raw == nullptr && epilogue.ln_scale != nullptr) {
      layer_norm_rows(epilogue, y, M, w.N, fp32_isa, threads ? parallel_for : nullptr, runner_state);
    }
    return;
  }
  const int64_t input_rows = std::max<int64_t>(1, kTaskInputBytes / ld);
  int64_t rows_per_task = std::min(M, ceil_div(std::min(M, input_rows), kRowQuantum) * kRowQuantum);
  // Tasks of whole tiles (only the last has a tail). From kSplitRows rows per core, one range of rows
  // per core; where a LayerNorm follows, with all the outputs of its rows (the threads' work is equal
  // without finer tasks), so that each task normalizes its own rows, with no LayerNorm pass after a
  // barrier. (All outputs per task without a LayerNorm measured 1% slower on VNNI.)
  bool split = false;
  if (lazy) {
    rows_per_task = std::min(M, ceil_div(rows_per_task, height) * height);
    split = M >= cores * kSplitRows;
    if (split) rows_per_task = std::min(rows_per_task, ceil_div(ceil_div(M, cores), height) * height);
  }
  const int64_t row_tasks = ceil_div(M, rows_per_task);
  const bool normalize = raw == nullptr && ep.ln_scale != nullptr;
  const int64_t groups =
      split && normalize ? 1 : std::min(w.R, std::max<int64_t>(1, ceil_div(target_tasks, row_tasks)));
  Job job{&w, QuantizedX{q_data, ld, q_scale, q_zero}, ep, y, raw, M,
          rows_per_task, balanced_groups(w.row_start, groups), isa, lazy ? &lazy_rows : nullptr,
          normalize && groups == 1};
  const size_t total = static_cast<size_t>(row_tasks * (static_cast<int64_t>(job.group_start.size()) - 1));
  if (total == 1 || !threads) {
    for (size_t t = 0; t < total; ++t) run_task(&job, t);
  } else {
    parallel_for(runner_state, run_task, total, &job);
  }
  if (normalize && !job.layer_norm) {
    layer_norm_rows(ep, y, M, w.N, fp32_isa, threads ? parallel_for : nullptr, runner_state);
  }
}

}  // namespace sparsec
