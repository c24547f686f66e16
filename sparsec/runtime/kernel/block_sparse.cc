// Packing and compute for the block-sparse linear layer (see block_sparse.h).
//
// Loop order: a task owns a range of input rows and a group of consecutive block rows. For each
// register tile of MR input rows, for each block row r of the group, for each (up to 64-wide)
// column chunk, it walks the kept blocks of row r; for each reduction index j of a block it loads
// the BR weights W[r*BR + i, c*BC + j] (contiguous after packing) and multiplies them by
// X[m, c*BC + j] broadcast, accumulating MR x BR outputs in registers (AVX-512: starting from the
// bias), then runs the epilogue (activation, residual) on the registers and stores with a mask
// (never beyond N). The input tile (MR rows) stays in L1, the group's weights in L2, and each task
// writes one contiguous run per output row.
//
// AVX-512 with 16-row tiles, narrow blocks, or a tile's input rows more than the L1's ways to one
// set first copies X into a packed panel (XPanel below, panel_pays), so that a tile's rows do not
// share one L1 set and its broadcasts use one base pointer; AVX2 does so for column vectors
// ([BR, 1] blocks); calls below kSerialMacs run on the calling thread.
#include "block_sparse.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include <unistd.h>

#include "block_sparse_internal.h"

namespace sparsec {

using namespace detail;  // NOLINT: the shared helpers of block_sparse_internal.h

void FreeDeleter::operator()(float* p) const { std::free(p); }

FloatBuffer detail::zeroed_floats(size_t n) {
  size_t bytes = (std::max<size_t>(n, 1) * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return FloatBuffer(static_cast<float*>(p));
}

namespace {

// Columns of block row r that exist in Y (the last block row may be cut by N).
int64_t valid_cols(const PackedWeight& w, int64_t r) { return std::min(w.BR, w.N - r * w.BR); }

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa select_isa() {
  Isa best = Isa::kScalar;
#if SPARSEC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    best = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = Isa::kAvx2;
  }
#endif
  const Isa cap = isa_cap();
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

Isa isa_cap() {
  const char* want = std::getenv("SPARSEC_KERNEL_ISA");
  if (want == nullptr) return Isa::kAmx;
  if (std::strcmp(want, "scalar") == 0) return Isa::kScalar;
  if (std::strcmp(want, "avx2") == 0) return Isa::kAvx2;
  if (std::strcmp(want, "avx512") == 0) return Isa::kAvx512;
  return Isa::kAmx;
}

namespace {
std::atomic<int64_t> g_packed_bytes{0};
}  // namespace

int64_t packed_bytes_alive() { return g_packed_bytes.load(std::memory_order_relaxed); }

PackedBytes::PackedBytes(int64_t bytes) : bytes_(bytes) { g_packed_bytes.fetch_add(bytes, std::memory_order_relaxed); }

PackedBytes& PackedBytes::operator=(PackedBytes&& other) noexcept {
  if (this != &other) {
    g_packed_bytes.fetch_sub(bytes_, std::memory_order_relaxed);
    bytes_ = other.bytes_;
    other.bytes_ = 0;
  }
  return *this;
}

PackedBytes::~PackedBytes() { g_packed_bytes.fetch_sub(bytes_, std::memory_order_relaxed); }

LoopOrder select_order() {
  const char* want = std::getenv("SPARSEC_KERNEL_ORDER");
  if (want != nullptr && std::strcmp(want, "resident") == 0) return LoopOrder::kResident;
  if (want != nullptr && std::strcmp(want, "streaming") == 0) return LoopOrder::kStreaming;
  return LoopOrder::kAuto;
}

std::string check_block_inputs(const BlockInputs& in, int64_t N, int64_t K) {
  // Every size below is bounded before it is used to index or allocate: a crafted node (N or K of
  // 2^63 - 1, a block of 2^40 rows) gets an error, not an overflow.
  if (N <= 0 || K <= 0 || N > kMaxDim || K > kMaxDim) {
    return "attributes N and K must be in [1, " + std::to_string(kMaxDim) + "], got N=" + std::to_string(N) +
           ", K=" + std::to_string(K);
  }
  if (in.BR <= 0 || in.BC <= 0 || in.BR > kMaxBlock || in.BC > kMaxBlock) {
    return "values must have a block shape [BR, BC] in [1, " + std::to_string(kMaxBlock) + "], got [" +
           std::to_string(in.BR) + ", " + std::to_string(in.BC) + "]";
  }
  if (in.S < 0 || in.S > ceil_div(K, in.BC) || checked_mul(checked_mul(checked_mul(in.R, in.S), in.BR), in.BC) < 0) {
    return "values has " + std::to_string(in.S) + " slots per block row; at most ceil(K / BC) = " +
           std::to_string(ceil_div(K, in.BC));
  }
  if (in.R != ceil_div(N, in.BR)) {
    return "values has " + std::to_string(in.R) + " block rows, but N=" + std::to_string(N) +
           " with BR=" + std::to_string(in.BR) + " needs " + std::to_string(ceil_div(N, in.BR));
  }
  const int64_t nbc = ceil_div(K, in.BC);
  for (int64_t r = 0; r < in.R; ++r) {
    const int64_t nnz = in.row_nnz[r];
    if (nnz < 0 || nnz > in.S) {
      return "row_nnz[" + std::to_string(r) + "]=" + std::to_string(nnz) + " is outside [0, S=" +
             std::to_string(in.S) + "]";
    }
    for (int64_t s = 0; s < nnz; ++s) {
      const int64_t c = in.block_cols[r * in.S + s];
      if (c < 0 || c >= nbc) {
        return "block_cols[" + std::to_string(r) + ", " + std::to_string(s) + "]=" + std::to_string(c) +
               " is outside [0, " + std::to_string(nbc) + ")";
      }
      if (s > 0 && c <= in.block_cols[r * in.S + s - 1]) {  // the layout's contract: each kept block once
        return "block_cols[" + std::to_string(r) + ", " + std::to_string(s) + "]=" + std::to_string(c) +
               " does not follow block_cols[" + std::to_string(r) + ", " + std::to_string(s - 1) + "]=" +
               std::to_string(in.block_cols[r * in.S + s - 1]) + ": a block row's columns must ascend";
      }
    }
  }
  return {};
}

std::string pack_weight(const BlockInputs& in, int64_t N, int64_t K, PackedWeight& out) {
  std::string error = check_block_inputs(in, N, K);
  if (!error.empty()) return error;
  const int64_t nbc = ceil_div(K, in.BC);
  out.N = N;
  out.K = K;
  out.R = in.R;
  out.BR = in.BR;
  out.BC = in.BC;
  // Rows of a block padded to the 16 lanes of the block path; one-output blocks take the row path
  // (or the scalar one) and need no padding.
  out.BRp = in.BR == 1 ? 1 : ceil_div(in.BR, 16) * 16;
  out.NBc = nbc;
  out.row_start.assign(static_cast<size_t>(in.R + 1), 0);
  for (int64_t r = 0; r < in.R; ++r) out.row_start[r + 1] = out.row_start[r] + in.row_nnz[r];
  const int64_t kept = out.row_start[in.R];
  const int64_t floats = checked_mul(checked_mul(kept, in.BC), out.BRp);
  if (floats < 0 || floats > kMaxPackedFloats) return "the packed weight would be too large";
  out.blocks = zeroed_floats(static_cast<size_t>(floats));
  out.counted = PackedBytes(floats * static_cast<int64_t>(sizeof(float)));
  out.order = select_order();
  out.cols.assign(static_cast<size_t>(kept), 0);
  if (in.BR == 1 && in.BC == 1 && slice_offsets_fit(K)) out.slice_at.assign(static_cast<size_t>(kept), 0);

  const float* vf = static_cast<const float*>(in.values);
  const int8_t* vq = static_cast<const int8_t*>(in.values);
  for (int64_t r = 0; r < in.R; ++r) {
    for (int64_t s = 0; s < in.row_nnz[r]; ++s) {
      const int64_t rs = r * in.S + s;
      const int64_t b = out.row_start[r] + s;
      out.cols[b] = in.block_cols[rs] * in.BC;
      if (!out.slice_at.empty()) out.slice_at[b] = static_cast<int32_t>(16 * out.cols[b]);
      const float scale = in.int8 ? in.scales[rs] : 1.0f;
      float* dst = out.blocks.get() + b * in.BC * out.BRp;
      const int64_t src0 = rs * in.BR * in.BC;
      for (int64_t i = 0; i < in.BR; ++i) {
        for (int64_t j = 0; j < in.BC; ++j) {
          const int64_t src = src0 + i * in.BC + j;
          dst[j * out.BRp + i] = in.int8 ? static_cast<float>(vq[src]) * scale : vf[src];
        }
      }
    }
  }
  return {};
}

// ------------------------------------------------------------------------------------------------
// Epilogue, scalar: the reference the vector versions follow (and what the AVX2 path applies to
// each stored tile).

namespace detail {

float activate_scalar(float v, Activation act) {
  switch (act) {
    case Activation::kGelu: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case Activation::kGeluTanh: {
      const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + std::tanh(u));
    }
    case Activation::kRelu: return v > 0.0f ? v : (v == v ? 0.0f : v);  // NaN stays NaN
    default: return v;
  }
}

namespace {

// The tables of gelu512 and gelu256 (block_sparse_internal.h): h(a) = -a erfc(a / sqrt(2)) / 2 on
// `intervals` intervals of width `width` from 0, a polynomial of degree points - 1 (points <= 10) in
// the offset r in [0, 1) on each, written to c[d * intervals + i] (the coefficient of r^d on
// interval i): interpolation in double precision at the interval's Chebyshev-Lobatto points (so the
// pieces meet, and h(0) = 0 exactly), Newton's divided differences turned into powers of r.
void fill_gelu_pieces(int intervals, int points, double width, float* c) {
  constexpr int kMaxPoints = 10;
  for (int i = 0; i < intervals; ++i) {
    double r[kMaxPoints], coef[kMaxPoints];
    for (int j = 0; j < points; ++j) {
      r[j] = 0.5 - 0.5 * std::cos(j * 3.14159265358979323846 / (points - 1));
      const double a = width * (i + r[j]);
      coef[j] = -a * 0.5 * std::erfc(a * 0.70710678118654752440);
    }
    for (int k = 1; k < points; ++k) {
      for (int j = points - 1; j >= k; --j) coef[j] = (coef[j] - coef[j - 1]) / (r[j] - r[j - k]);
    }
    double power[kMaxPoints] = {coef[points - 1]};  // Horner on the Newton form, from the top
    for (int k = points - 2; k >= 0; --k) {
      for (int d = points - 1; d >= 1; --d) power[d] = power[d - 1] - power[d] * r[k];
      power[0] = coef[k] - power[0] * r[k];
    }
    for (int d = 0; d < points; ++d) c[d * intervals + i] = static_cast<float>(power[d]);
  }
}

GeluTable make_gelu_table() {
  GeluTable table{};
  fill_gelu_pieces(32, 5, 0.25, &table.c[0][0]);
  return table;
}

GeluTable4 make_gelu_table4() {
  float c[10][4];
  fill_gelu_pieces(4, 10, 1.5, &c[0][0]);
  GeluTable4 table{};
  for (int d = 0; d < 10; ++d) {
    for (int i = 0; i < 8; ++i) table.c[d][i] = c[d][i % 4];
  }
  return table;
}

}  // namespace

const GeluTable kGeluTable = make_gelu_table();
const GeluTable4 kGeluTable4 = make_gelu_table4();

// Activation and residual over a stored tile of `rows` x `ncols` at y (row stride ldy).
void finish_tile_scalar(const Epilogue& ep, float* y, int64_t rows, int64_t ncols, int64_t ldy) {
  if (ep.act == Activation::kNone && ep.residual == nullptr) return;
  const float* res = ep.residual ? ep.residual + (y - ep.y) : nullptr;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t i = 0; i < ncols; ++i) {
      float v = activate_scalar(y[m * ldy + i], ep.act);
      if (res != nullptr) v += res[m * ldy + i];
      y[m * ldy + i] = v;
    }
  }
}

#if SPARSEC_X86
SPARSEC_AVX2 void finish_tile_avx2(const Epilogue& ep, float* y, int64_t rows, int64_t ncols, int64_t ldy) {
  if (ep.act == Activation::kNone && ep.residual == nullptr) return;
  const float* res = ep.residual ? ep.residual + (y - ep.y) : nullptr;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t i = 0; i < ncols; i += 8) {
      __m256 v = activate256(load8(y + m * ldy + i, ncols - i), ep.act);
      if (res != nullptr) v = _mm256_add_ps(v, load8(res + m * ldy + i, ncols - i));
      store8(y + m * ldy + i, ncols - i, v);
    }
  }
}
#endif

}  // namespace detail

namespace {

// ------------------------------------------------------------------------------------------------
// Scalar fallback: same packed layout, plain loops (the compiler may auto-vectorise for the base ISA).

void block_rows_scalar(const PackedWeight& w, int64_t r0, int64_t r1, const float* x, int64_t rows,
                       const Epilogue& ep, float* y) {
  float acc[64];
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * w.K;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ncols_row = valid_cols(w, r);
      for (int64_t o0 = 0; o0 < ncols_row; o0 += 64) {
        const int64_t width = std::min<int64_t>(64, ncols_row - o0);
        std::fill(acc, acc + width, 0.0f);
        for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
          const int64_t k0 = w.cols[b];
          const int64_t jn = std::min(w.BC, w.K - k0);
          const float* wb = w.block(b) + o0;
          for (int64_t j = 0; j < jn; ++j) {
            const float xv = xm[k0 + j];
            const float* wr = wb + j * w.BRp;
            for (int64_t i = 0; i < width; ++i) acc[i] += xv * wr[i];
          }
        }
        float* ym = y + m * w.N + r * w.BR + o0;
        const float* bias = ep.bias ? ep.bias + r * w.BR + o0 : nullptr;
        for (int64_t i = 0; i < width; ++i) ym[i] = acc[i] + (bias ? bias[i] : 0.0f);
        finish_tile_scalar(ep, ym, 1, width, w.N);
      }
    }
  }
}

#if SPARSEC_X86


// A tile's activation A (a template argument) and residual (res, at the tile's first row, or null).
// The intrinsic stores may alias anything, so nothing here is read through a reference: an
// activation read from the Epilogue was reloaded and retested for every vector.
template <int NV, int MR, Activation A>
SPARSEC_AVX512 SPARSEC_INLINE void finish_tile_avx512(__m512 (&acc)[MR][NV], const __mmask16 (&mask)[NV], int64_t mr,
                                                     const float* res, float* y, int64_t ldy) {
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    if (m >= mr) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m512 out = activate512(acc[m][v], A);
      if (res != nullptr) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mask[v], res + m * ldy + 16 * v));
      _mm512_mask_storeu_ps(y + m * ldy + 16 * v, mask[v], out);
    }
  }
}

template <int NV, int MR>
SPARSEC_AVX512 SPARSEC_INLINE void store_tile_avx512(__m512 (&acc)[MR][NV], int64_t mr, int64_t ncols,
                                                    const Epilogue& ep, float* y, int64_t ldy) {
  __mmask16 mask[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) mask[v] = lane_mask16(ncols - 16 * v);
  const float* res = ep.residual ? ep.residual + (y - ep.y) : nullptr;
  switch (ep.act) {
    case Activation::kGelu: finish_tile_avx512<NV, MR, Activation::kGelu>(acc, mask, mr, res, y, ldy); break;
    case Activation::kGeluTanh: finish_tile_avx512<NV, MR, Activation::kGeluTanh>(acc, mask, mr, res, y, ldy); break;
    case Activation::kRelu: finish_tile_avx512<NV, MR, Activation::kRelu>(acc, mask, mr, res, y, ldy); break;
    default: finish_tile_avx512<NV, MR, Activation::kNone>(acc, mask, mr, res, y, ldy); break;
  }
}

// The accumulators of a tile start at the bias of their columns (or zero): the store then needs no
// add. `rows` of them; the columns from `col`, `ncols` valid.
template <int NV, int ROWS>
SPARSEC_AVX512 SPARSEC_INLINE void init_tile_avx512(__m512 (&acc)[ROWS][NV], const Epilogue& ep, int64_t col,
                                                   int64_t ncols) {
  __m512 b[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    b[v] = ep.bias ? _mm512_maskz_loadu_ps(lane_mask16(ncols - 16 * v), ep.bias + col + 16 * v) : _mm512_setzero_ps();
  }
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = b[v];
  }
}

// Rows of the tile at or beyond `mr` re-read row mr-1 (always valid memory) and are not stored.
// kStream (the streaming order, block_rows_avx512): X comes from L2, so the inputs of the next
// block are prefetched while this one computes (with X in L1, the resident order, that costs 2-4%).
template <int NV, int MR, bool kStream>
SPARSEC_AVX512 void tile_avx512(const PackedWeight& w, int64_t r, int64_t o0, int64_t ncols, const float* x,
                                int64_t mr, const Epilogue& ep, float* y) {
  const int64_t K = w.K;
  const int64_t BRp = w.BRp;
  int64_t row_off[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) row_off[m] = (m < mr ? m : mr - 1) * K;

  __m512 acc[MR][NV];
  init_tile_avx512<NV, MR>(acc, ep, r * w.BR + o0, ncols);

  for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
    const int64_t k0 = w.cols[b];
    const int64_t jn = std::min(w.BC, K - k0);
    const float* wb = w.block(b) + o0;
    const float* xb = x + k0;
    if (kStream) {  // the inputs of the next block (after the last one: of the next row tile's first)
      const float* xn = b + 1 < w.row_start[r + 1] ? x + w.cols[b + 1] : x + MR * K + w.cols[w.row_start[r]];
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        for (int64_t j = 0; j < w.BC; j += 16) _mm_prefetch(reinterpret_cast<const char*>(xn + m * K + j), _MM_HINT_T0);
      }
    }
    for (int64_t j = 0; j < jn; ++j) {
      __m512 wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_ps(wb + j * BRp + 16 * v);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_set1_ps(xb[row_off[m] + j]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(xv, wv[v], acc[m][v]);
      }
    }
  }
  store_tile_avx512<NV, MR>(acc, mr, ncols, ep, y + r * w.BR + o0, w.N);
}

// One input row (decoding): U independent accumulator sets over j hide the FMA latency.
template <int NV>
SPARSEC_AVX512 void row1_avx512(const PackedWeight& w, int64_t r, int64_t o0, int64_t ncols, const float* x,
                                const Epilogue& ep, float* y) {
  constexpr int U = NV <= 2 ? 4 : 2;
  const int64_t BRp = w.BRp;
  __m512 acc[U][NV];
  init_tile_avx512<NV, U>(acc, ep, r * w.BR + o0, ncols);
#pragma GCC unroll 4
  for (int u = 1; u < U; ++u) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[u][v] = _mm512_setzero_ps();  // the bias in the first set only
  }
  for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
    const int64_t k0 = w.cols[b];
    const int64_t jn = std::min(w.BC, w.K - k0);
    const float* wb = w.block(b) + o0;
    const float* xb = x + k0;
    int64_t j = 0;
    for (; j + U <= jn; j += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m512 xv = _mm512_set1_ps(xb[j + u]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          acc[u][v] = _mm512_fmadd_ps(xv, _mm512_load_ps(wb + (j + u) * BRp + 16 * v), acc[u][v]);
        }
      }
    }
    for (; j < jn; ++j) {
      const __m512 xv = _mm512_set1_ps(xb[j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][v] = _mm512_fmadd_ps(xv, _mm512_load_ps(wb + j * BRp + 16 * v), acc[0][v]);
    }
  }
  __m512 sum[1][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    sum[0][v] = acc[0][v];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) sum[0][v] = _mm512_add_ps(sum[0][v], acc[u][v]);
  }
  store_tile_avx512<NV, 1>(sum, 1, ncols, ep, y + r * w.BR + o0, w.N);
}

// Register budget (32 zmm): MR * NV accumulators + NV weight vectors + one broadcast.
template <int NV> struct Tiles512;
template <> struct Tiles512<1> { static constexpr int kSmall = 4, kMid = 8, kBig = 16; };
template <> struct Tiles512<2> { static constexpr int kSmall = 4, kMid = 8, kBig = 12; };
template <> struct Tiles512<3> { static constexpr int kSmall = 2, kMid = 4, kBig = 8; };
template <> struct Tiles512<4> { static constexpr int kSmall = 2, kMid = 4, kBig = 6; };

// On the first pass over a group the weights may come from L3 or memory: ask for the next block
// row's blocks (into L2) while this one computes.
inline void prefetch_block_row(const PackedWeight& w, int64_t r) {
  if (r >= w.R) return;
  const char* begin = reinterpret_cast<const char*>(w.block(w.row_start[r]));
  const char* end = reinterpret_cast<const char*>(w.block(w.row_start[r + 1]));
  for (const char* p = begin; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T1);
}

// The blocks of block row r requested in `steps` equal slices, one per step() (a row tile), so that
// the stream from memory overlaps the whole of the current row's compute.
class WeightPrefetch {
 public:
  WeightPrefetch(const PackedWeight& w, int64_t r, int64_t steps) {
    if (r >= w.R) return;
    p_ = reinterpret_cast<const char*>(w.block(w.row_start[r]));
    end_ = reinterpret_cast<const char*>(w.block(w.row_start[r + 1]));
    slice_ = ceil_div((end_ - p_ + 63) / 64, std::max<int64_t>(1, steps)) * 64;
  }
  void step() {
    const char* stop = std::min(end_, p_ + slice_);
    for (; p_ < stop; p_ += 64) _mm_prefetch(p_, _MM_HINT_T0);
  }

 private:
  const char* p_ = nullptr;
  const char* end_ = nullptr;
  int64_t slice_ = 0;
};

// A tile of `mr` rows (mr <= Tiles512<NV>::kBig) with the smallest register tile that holds it.
template <int NV, bool kStream>
void tile_fit_avx512(const PackedWeight& w, int64_t r, int64_t o0, int64_t ncols, const float* x, int64_t mr,
                     const Epilogue& ep, float* y) {
  using T = Tiles512<NV>;
  if (mr == 1) {
    row1_avx512<NV>(w, r, o0, ncols, x, ep, y);
  } else if (mr <= T::kSmall) {
    tile_avx512<NV, T::kSmall, kStream>(w, r, o0, ncols, x, mr, ep, y);
  } else if (mr <= T::kMid) {
    tile_avx512<NV, T::kMid, kStream>(w, r, o0, ncols, x, mr, ep, y);
  } else {
    tile_avx512<NV, T::kBig, kStream>(w, r, o0, ncols, x, mr, ep, y);
  }
}

// Every column chunk (up to 64 outputs) of block row r for one row tile.
template <bool kStream>
void block_row_tile_avx512(const PackedWeight& w, int64_t r, const float* x, int64_t mr, const Epilogue& ep,
                           float* y) {
  const int64_t ncols_row = valid_cols(w, r);
  for (int64_t o0 = 0; o0 < ncols_row; o0 += 64) {
    const int64_t ncols = std::min<int64_t>(64, ncols_row - o0);
    switch ((ncols + 15) / 16) {
      case 1: tile_fit_avx512<1, kStream>(w, r, o0, ncols, x, mr, ep, y); break;
      case 2: tile_fit_avx512<2, kStream>(w, r, o0, ncols, x, mr, ep, y); break;
      case 3: tile_fit_avx512<3, kStream>(w, r, o0, ncols, x, mr, ep, y); break;
      default: tile_fit_avx512<4, kStream>(w, r, o0, ncols, x, mr, ep, y); break;
    }
  }
}

int64_t tile_height_avx512(int64_t nv) {
  switch (nv) {
    case 1: return Tiles512<1>::kBig;
    case 2: return Tiles512<2>::kBig;
    case 3: return Tiles512<3>::kBig;
    default: return Tiles512<4>::kBig;
  }
}

// Two loop orders over a task's row tiles and block rows (see `streams`).
//
// Resident (row tile outer, block rows inner): the input tile stays in L1 while the block rows'
// weights come from L2, and each output row is written as one contiguous run per task. Fastest when
// the weights are still in L2 from the last call; otherwise the first row tile reads the whole
// group's weights from L3 or memory at once, in a burst the prefetcher cannot cover.
//
// Streaming (block rows outer, row tiles inner): a block row's kept blocks (a few 4 KB blocks) stay
// in L1 while every row tile reads them, and the next block row's blocks are prefetched a slice per
// row tile, so the weights' stream from memory overlaps the whole computation; the inputs come from
// L2 instead (prefetched a block ahead).
void block_rows_avx512(const PackedWeight& w, int64_t r0, int64_t r1, const float* x, int64_t rows,
                       const Epilogue& ep, float* y, bool stream) {
  // Narrower column chunks (the last block row, the tail of BR > 64) have taller register tiles.
  const int64_t height = tile_height_avx512(std::min<int64_t>(4, w.BRp / 16));
  if (!stream) {
    for (int64_t m = 0; m < rows; m += height) {
      for (int64_t r = r0; r < r1; ++r) {
        if (m == 0) prefetch_block_row(w, r + 1);
        block_row_tile_avx512<false>(w, r, x + m * w.K, std::min(height, rows - m), ep, y + m * w.N);
      }
    }
    return;
  }
  const int64_t tiles = ceil_div(rows, height);
  for (int64_t r = r0; r < r1; ++r) {
    WeightPrefetch next(w, r + 1, tiles);
    for (int64_t m = 0; m < rows; m += height) {
      next.step();
      block_row_tile_avx512<true>(w, r, x + m * w.K, std::min(height, rows - m), ep, y + m * w.N);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AVX-512 with a packed input panel (BR and BC in {16, 32}, M > 1). X is copied once per call into
// tiles of H rows (H = the register tile height): tile t, block column c, row m holds the BC inputs
// X[t*H + m, c*BC .. c*BC + BC) contiguously, zero padded beyond M and K. A register tile then reads
// all its broadcasts from one base pointer with constant offsets (m * BC + j), instead of one pointer
// per input row (16 row pointers did not fit the general registers and spilled in the inner loop).
// Tiles are packed on first use by whichever task needs them (an atomic state per tile), so the copy
// is spread over the pool threads and needs no separate pass.

// One tile of narrow blocks (BC in {1, 2, 4, 8}): the H rows from `row0` (zeros past M), 16 inputs of
// each row at a time, so that every cache line of X is read whole. Reading the panel's order
// directly (one input per row per block column) walked 16 rows at once; with K = 3072 their lines
// (12 KiB apart) all fall into one L1 set, and the copy took 60% of a [16, 1] layer's time.
// BC = 1: a 16 x 16 transpose puts each input column's H rows side by side. BC = 2, 4, 8: each
// row's BC inputs of a block column are one masked store, shifted so that its lanes land at the
// destination (masked-off lanes are neither written nor touched).
SPARSEC_AVX512 void pack_narrow_tile(const float* x, int64_t M, int64_t K, int64_t NBc, int64_t BC, int64_t H,
                                     int64_t row0, float* dst) {
  const __mmask16 rows_mask = lane_mask16(H);
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const __mmask16 cols = lane_mask16(K - k0);
    __m512 r[16];
#pragma GCC unroll 16
    for (int m = 0; m < 16; ++m) {
      r[m] = m < H && row0 + m < M ? _mm512_maskz_loadu_ps(cols, x + (row0 + m) * K + k0) : _mm512_setzero_ps();
    }
    if (BC == 1) {
      transpose16(r);  // r[j]: input k0 + j of the H rows
      const int64_t kn = std::min<int64_t>(16, K - k0);
      for (int64_t j = 0; j < kn; ++j) _mm512_mask_storeu_ps(dst + (k0 + j) * H, rows_mask, r[j]);
      continue;
    }
    const int64_t groups = std::min<int64_t>(16 / BC, NBc - k0 / BC);
    for (int64_t g = 0; g < groups; ++g) {
      const __mmask16 lanes = static_cast<__mmask16>(((1u << BC) - 1u) << (g * BC));
      float* at = dst + (k0 / BC + g) * H * BC - g * BC;  // lane g * BC lands on the block column's start
      for (int64_t m = 0; m < H; ++m) _mm512_mask_storeu_ps(at + m * BC, lanes, r[m]);
    }
  }
}

// AVX2's panel for [BR, 1] column vectors: tiles of 6 rows (the AVX2 register tile), each input's 6
// rows side by side in 8 floats (the last 2 zero), by 8 x 8 transposes of rows read whole.
SPARSEC_AVX2 void pack_columns_tile_avx2(const float* x, int64_t M, int64_t K, int64_t row0, float* dst) {
  for (int64_t k0 = 0; k0 < K; k0 += 8) {
    __m256 r[8];
#pragma GCC unroll 8
    for (int m = 0; m < 8; ++m) {
      r[m] = m < 6 && row0 + m < M ? load8(x + (row0 + m) * K + k0, K - k0) : _mm256_setzero_ps();
    }
    transpose8(r);  // r[j]: input k0 + j of the rows
    const int64_t kn = std::min<int64_t>(8, K - k0);
    for (int64_t j = 0; j < kn; ++j) _mm256_store_ps(dst + (k0 + j) * 8, r[j]);
  }
}

struct XPanel {
  const float* x = nullptr;
  float* data = nullptr;
  std::atomic<int>* state = nullptr;  // per tile: 0 not packed, 1 being packed, 2 ready
  int64_t M = 0, K = 0, NBc = 0, BC = 0, H = 0;
  int64_t ldc = 0;     // floats per block column of a tile: H * BC, or 8 for AVX2's 6 rows
  bool avx2 = false;   // AVX2 (BC = 1, H = 6): pack_columns_tile_avx2

  const float* tile(int64_t t) const { return data + t * NBc * ldc; }

  void pack(int64_t t) const {
    float* dst = data + t * NBc * ldc;
    if (avx2) {
      pack_columns_tile_avx2(x, M, K, t * H, dst);
      return;
    }
    if (BC < 16) {  // narrow blocks ([16, 1] column vectors ...)
      pack_narrow_tile(x, M, K, NBc, BC, H, t * H, dst);
      return;
    }
    for (int64_t c = 0; c < NBc; ++c) {
      const int64_t k0 = c * BC;
      const int64_t n = std::min(BC, K - k0);
      for (int64_t m = 0; m < H; ++m, dst += BC) {
        const int64_t row = t * H + m;
        if (row < M) {
          std::memcpy(dst, x + row * K + k0, static_cast<size_t>(n) * sizeof(float));
          if (n < BC) std::memset(dst + n, 0, static_cast<size_t>(BC - n) * sizeof(float));
        } else {
          std::memset(dst, 0, static_cast<size_t>(BC) * sizeof(float));
        }
      }
    }
  }

  void ensure(int64_t t) const { do_once(state[t], [&] { pack(t); }); }
};

// Register tile of MR rows x NV zmm from a packed tile `xt`. Rows at or beyond `mr` read the zero
// padding (MR never exceeds the panel's tile height) and are not stored.
template <int NV, int MR, int BC>
SPARSEC_AVX512 void tile_packed_avx512(const PackedWeight& w, int64_t r, int64_t o0, int64_t ncols,
                                       const float* xt, int64_t col_stride, int64_t mr, const Epilogue& ep,
                                       float* y) {
  const int64_t BRp = w.BRp;
  __m512 acc[MR][NV];
  init_tile_avx512<NV, MR>(acc, ep, r * w.BR + o0, ncols);
  for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
    const float* wb = w.block(b) + o0;
    const float* xc = xt + (w.cols[b] / BC) * col_stride;
#pragma GCC unroll 2
    for (int j = 0; j < BC; ++j) {
      __m512 wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_ps(wb + j * BRp + 16 * v);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_set1_ps(xc[m * BC + j]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(xv, wv[v], acc[m][v]);
      }
    }
  }
  store_tile_avx512<NV, MR>(acc, mr, ncols, ep, y + r * w.BR + o0, w.N);
}

// The smallest register tile (4, 8, 12 or 16 rows, at most H and within the register budget) that
// holds `mr` rows.
template <int NV, int BC>
void tile_fit_packed_avx512(const PackedWeight& w, int64_t r, int64_t ncols, const float* xt, int64_t col_stride,
                            int64_t mr, const Epilogue& ep, float* y) {
  if (mr <= 4) {
    tile_packed_avx512<NV, 4, BC>(w, r, 0, ncols, xt, col_stride, mr, ep, y);
  } else if (mr <= 8) {
    tile_packed_avx512<NV, 8, BC>(w, r, 0, ncols, xt, col_stride, mr, ep, y);
  } else if (NV == 2 || mr <= 12) {
    tile_packed_avx512<NV, 12, BC>(w, r, 0, ncols, xt, col_stride, mr, ep, y);
  } else {
    tile_packed_avx512<1, 16, BC>(w, r, 0, ncols, xt, col_stride, mr, ep, y);
  }
}

template <int BC>
void block_rows_packed_avx512(const PackedWeight& w, int64_t r0, int64_t r1, const XPanel& xp, int64_t m0,
                              int64_t rows, const Epilogue& ep, float* y) {
  // Always the resident order (block_rows_avx512): the streaming one measured no faster here on
  // BERT-base with 16x16 or [16, 1] blocks on one thread, and 2-7% slower on two.
  const int64_t H = xp.H;
  const int64_t col_stride = H * BC;
  for (int64_t m = 0; m < rows; m += H) {
    const int64_t t = (m0 + m) / H;
    xp.ensure(t);
    const int64_t mr = std::min(H, rows - m);
    const float* xt = xp.tile(t);
    float* ym = y + m * w.N;
    for (int64_t r = r0; r < r1; ++r) {
      if (m == 0) prefetch_block_row(w, r + 1);
      const int64_t ncols = valid_cols(w, r);
      if (ncols > 16) {
        tile_fit_packed_avx512<2, BC>(w, r, ncols, xt, col_stride, mr, ep, ym);
      } else {
        tile_fit_packed_avx512<1, BC>(w, r, ncols, xt, col_stride, mr, ep, ym);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2: a tile is MR rows x 16 columns (two ymm); 16 ymm registers hold 12 accumulators + 2 weights.

template <int MR>
SPARSEC_AVX2 SPARSEC_INLINE void store_tile_avx2(__m256 (&acc)[MR][2], int64_t mr, int64_t ncols,
                                                 const Epilogue& ep, int64_t col, float* y, int64_t ldy) {
  __m256 b[2];
  for (int v = 0; v < 2; ++v) b[v] = ep.bias ? load8(ep.bias + col + 8 * v, ncols - 8 * v) : _mm256_setzero_ps();
  // Locals: the stores below may alias the Epilogue, whose fields would be reloaded for every vector.
  const float* res = ep.residual ? ep.residual + (y - ep.y) : nullptr;
  const Activation act = ep.act;
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    if (m >= mr) break;
    for (int v = 0; v < 2; ++v) {
      __m256 out = activate256(_mm256_add_ps(acc[m][v], b[v]), act);
      if (res != nullptr) out = _mm256_add_ps(out, load8(res + m * ldy + 8 * v, ncols - 8 * v));
      store8(y + m * ldy + 8 * v, ncols - 8 * v, out);
    }
  }
}

template <int MR>
SPARSEC_AVX2 SPARSEC_INLINE void tile_step_avx2(__m256 (&acc)[MR][2], const float* wb, const float* xb,
                                                const int64_t (&row_off)[MR], int64_t j, int64_t BRp) {
  const __m256 w0 = _mm256_load_ps(wb + j * BRp);
  const __m256 w1 = _mm256_load_ps(wb + j * BRp + 8);
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const __m256 xv = _mm256_broadcast_ss(xb + row_off[m] + j);
    acc[m][0] = _mm256_fmadd_ps(xv, w0, acc[m][0]);
    acc[m][1] = _mm256_fmadd_ps(xv, w1, acc[m][1]);
  }
}

template <int MR>
SPARSEC_AVX2 void tile_avx2(const PackedWeight& w, int64_t r, int64_t o0, int64_t ncols, const float* x,
                            int64_t mr, const Epilogue& ep, float* y) {
  const int64_t K = w.K;
  const int64_t BRp = w.BRp;
  int64_t row_off[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) row_off[m] = (m < mr ? m : mr - 1) * K;
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();

  for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
    const int64_t k0 = w.cols[b];
    const int64_t jn = std::min(w.BC, K - k0);
    const float* wb = w.block(b) + o0;
    const float* xb = x + k0;
    // Whole 32- and 16-wide blocks with a constant trip count (unrolled without a remainder test):
    // 3072 x 768 at density 0.1 0.97-0.98x the time, 768 x 3072 0.93x, BERT-base 0.91-0.94x.
    if (jn == 32) {
#pragma GCC unroll 4
      for (int j = 0; j < 32; ++j) tile_step_avx2<MR>(acc, wb, xb, row_off, j, BRp);
    } else if (jn == 16) {
#pragma GCC unroll 4
      for (int j = 0; j < 16; ++j) tile_step_avx2<MR>(acc, wb, xb, row_off, j, BRp);
    } else {
      for (int64_t j = 0; j < jn; ++j) tile_step_avx2<MR>(acc, wb, xb, row_off, j, BRp);
    }
  }
  store_tile_avx2<MR>(acc, mr, ncols, ep, r * w.BR + o0, y + r * w.BR + o0, w.N);
}

SPARSEC_AVX2 void row1_avx2(const PackedWeight& w, int64_t r, int64_t o0, int64_t ncols, const float* x,
                            const Epilogue& ep, float* y) {
  constexpr int U = 4;
  const int64_t BRp = w.BRp;
  __m256 acc[U][2];
  for (int u = 0; u < U; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
  for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
    const int64_t k0 = w.cols[b];
    const int64_t jn = std::min(w.BC, w.K - k0);
    const float* wb = w.block(b) + o0;
    const float* xb = x + k0;
    int64_t j = 0;
    for (; j + U <= jn; j += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m256 xv = _mm256_broadcast_ss(xb + j + u);
        acc[u][0] = _mm256_fmadd_ps(xv, _mm256_load_ps(wb + (j + u) * BRp), acc[u][0]);
        acc[u][1] = _mm256_fmadd_ps(xv, _mm256_load_ps(wb + (j + u) * BRp + 8), acc[u][1]);
      }
    }
    for (; j < jn; ++j) {
      const __m256 xv = _mm256_broadcast_ss(xb + j);
      acc[0][0] = _mm256_fmadd_ps(xv, _mm256_load_ps(wb + j * BRp), acc[0][0]);
      acc[0][1] = _mm256_fmadd_ps(xv, _mm256_load_ps(wb + j * BRp + 8), acc[0][1]);
    }
  }
  __m256 sum[1][2];
  for (int v = 0; v < 2; ++v) {
    sum[0][v] = _mm256_add_ps(_mm256_add_ps(acc[0][v], acc[1][v]), _mm256_add_ps(acc[2][v], acc[3][v]));
  }
  store_tile_avx2<1>(sum, 1, ncols, ep, r * w.BR + o0, y + r * w.BR + o0, w.N);
}

// Column vectors [BR, 1] from AVX2's panel: each kept block is one input, whose 6 rows are one
// 32-byte load apart instead of 6 rows of X apart (in place, each block read 6 cache lines of X for
// its 12 multiply-adds). AMD Zen 3, density 0.1, 2 threads, against X in place (bench/kernel_ab.py):
// 3072 x 768 0.77-0.84x the time, 768 x 3072 0.88-0.91x, BERT-base with [16, 1] vectors 0.90-0.93x.
// The panel's line for the block 16 ahead is prefetched into L1 (at K = 3072 a tile's panel, 96 KiB,
// lives in L2): BERT-base [16, 1] 0.90-0.92x again; 16 ahead against 8 0.97-1.00x, 4 ahead 3-12% slower than 8.
constexpr int64_t kColumnsPrefetch = 16;
template <int MR>
SPARSEC_AVX2 void tile_columns_avx2(const PackedWeight& w, int64_t r, int64_t o0, int64_t ncols, const float* xt,
                                    int64_t mr, const Epilogue& ep, float* y) {
  const int64_t BRp = w.BRp;
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t row_off[MR];  // a panel column's rows are consecutive floats
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) row_off[m] = m;
  const int64_t* cols = w.cols.data();
  const int64_t last = w.row_start[w.R] - 1;  // the prefetch's index stays inside cols
  const float* wb = w.block(w.row_start[r]) + o0;
  for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b, wb += BRp) {
    _mm_prefetch(reinterpret_cast<const char*>(xt + cols[std::min(b + kColumnsPrefetch, last)] * 8), _MM_HINT_T0);
    tile_step_avx2<MR>(acc, wb, xt + cols[b] * 8, row_off, 0, BRp);
  }
  store_tile_avx2<MR>(acc, mr, ncols, ep, r * w.BR + o0, y + r * w.BR + o0, w.N);
}

// Rows [0, rows) of the task from row m0 of X: X in place, or (panel, column vectors) from its
// tile of 6 rows.
void block_rows_avx2(const PackedWeight& w, int64_t r0, int64_t r1, const float* x, const XPanel* panel, int64_t m0,
                     int64_t rows, const Epilogue& ep, float* y) {
  for (int64_t m = 0; m < rows; m += 6) {
    const int64_t mr = std::min<int64_t>(6, rows - m);
    const float* xm = x + m * w.K;
    float* ym = y + m * w.N;
    const float* xt = nullptr;
    if (panel != nullptr) {
      const int64_t t = (m0 + m) / 6;
      panel->ensure(t);
      xt = panel->tile(t);
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ncols_row = valid_cols(w, r);
      for (int64_t o0 = 0; o0 < ncols_row; o0 += 16) {
        const int64_t ncols = std::min<int64_t>(16, ncols_row - o0);
        if (xt != nullptr) {
          if (mr <= 2) {
            tile_columns_avx2<2>(w, r, o0, ncols, xt, mr, ep, ym);
          } else if (mr <= 4) {
            tile_columns_avx2<4>(w, r, o0, ncols, xt, mr, ep, ym);
          } else {
            tile_columns_avx2<6>(w, r, o0, ncols, xt, mr, ep, ym);
          }
        } else if (mr == 1) {
          row1_avx2(w, r, o0, ncols, xm, ep, ym);
        } else if (mr <= 2) {
          tile_avx2<2>(w, r, o0, ncols, xm, mr, ep, ym);
        } else if (mr <= 4) {
          tile_avx2<4>(w, r, o0, ncols, xm, mr, ep, ym);
        } else {
          tile_avx2<6>(w, r, o0, ncols, xm, mr, ep, ym);
        }
      }
    }
  }
}

#endif  // SPARSEC_X86

// ------------------------------------------------------------------------------------------------
// Work split: a task is (range of input rows, group of consecutive block rows). Groups hold about
// equal numbers of kept blocks, so uneven rows still balance; block rows with no kept block cost
// one unit (they still write the bias or zeros).

struct Job {
  const PackedWeight* w;
  const float* x;
  Epilogue ep;
  float* y;
  int64_t M;
  int64_t rows_per_task;
  std::vector<int64_t> group_start;  // [groups + 1] block-row boundaries
  Isa isa;
  bool stream = false;               // the streaming loop order (streams(w)), X read in place
#if SPARSEC_X86
  const XPanel* panel = nullptr;     // packed input (AVX-512, 16/32 blocks, M > 1), else null
#endif
};

void run_task(void* data, size_t t) {
  const Job& job = *static_cast<const Job*>(data);
  const TaskSpan span(job.group_start, job.rows_per_task, job.M, t);
  if (span.empty()) return;
  const int64_t m0 = span.m0, rows = span.rows, r0 = span.r0, r1 = span.r1;
  const PackedWeight& w = *job.w;
  const float* x = job.x + m0 * w.K;
  float* y = job.y + m0 * w.N;
  switch (job.isa) {
#if SPARSEC_X86
    case Isa::kAvx512:
      if (job.panel == nullptr) {
        block_rows_avx512(w, r0, r1, x, rows, job.ep, y, job.stream);
        break;
      }
      switch (w.BC) {
        case 32: block_rows_packed_avx512<32>(w, r0, r1, *job.panel, m0, rows, job.ep, y); break;
        case 16: block_rows_packed_avx512<16>(w, r0, r1, *job.panel, m0, rows, job.ep, y); break;
        case 8: block_rows_packed_avx512<8>(w, r0, r1, *job.panel, m0, rows, job.ep, y); break;
        case 4: block_rows_packed_avx512<4>(w, r0, r1, *job.panel, m0, rows, job.ep, y); break;
        case 2: block_rows_packed_avx512<2>(w, r0, r1, *job.panel, m0, rows, job.ep, y); break;
        default: block_rows_packed_avx512<1>(w, r0, r1, *job.panel, m0, rows, job.ep, y); break;
      }
      break;
    case Isa::kAvx2: block_rows_avx2(w, r0, r1, x, job.panel, m0, rows, job.ep, y); break;
#endif
    default: block_rows_scalar(w, r0, r1, x, rows, job.ep, y); break;
  }
}

constexpr int64_t kRowQuantum = 48;          // a multiple of every tile height: only the last task has a tail
static_assert(kRowQuantum % 6 == 0, "AVX2's 6-row panel tiles must not span two tasks");
constexpr int64_t kPanelBytes = 512 * 1024;  // input rows of one task stay within a quarter of L2
constexpr int64_t kMaxPanelFloats = 4 << 20;  // 16 MB: larger inputs read X in place

// ------------------------------------------------------------------------------------------------
// LayerNorm epilogue: each row of Y normalised in place, once every task has written it (a task
// owns a group of block rows, not whole rows). Two passes over the row (mean, then the centred
// sum of squares: no cancellation), in float32 like onnxruntime's and PyTorch's kernels.

void layer_norm_row_scalar(float* row, int64_t n, const Epilogue& ep) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += row[i];
  const float mean = sum / static_cast<float>(n);
  float sq = 0.0f;
  for (int64_t i = 0; i < n; ++i) sq += (row[i] - mean) * (row[i] - mean);
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(n) + ep.ln_epsilon);
  for (int64_t i = 0; i < n; ++i) {
    row[i] = (row[i] - mean) * rstd * ep.ln_scale[i] + (ep.ln_bias ? ep.ln_bias[i] : 0.0f);
  }
}

#if SPARSEC_X86
SPARSEC_AVX512 void layer_norm_row_avx512(float* row, int64_t n, const Epilogue& ep) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(row + i));
  const __mmask16 tail = lane_mask16(n - i);
  acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(tail, row + i));
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / static_cast<float>(n));
  acc = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(row + i), mean);
    acc = _mm512_fmadd_ps(d, d, acc);
  }
  const __m512 d_tail = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, row + i), mean);
  acc = _mm512_fmadd_ps(d_tail, d_tail, acc);
  const float var = _mm512_reduce_add_ps(acc) / static_cast<float>(n);
  const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(var + ep.ln_epsilon));
  for (i = 0; i < n; i += 16) {
    const __mmask16 m = lane_mask16(n - i);
    const __m512 scale = _mm512_mul_ps(rstd, _mm512_maskz_loadu_ps(m, ep.ln_scale + i));
    const __m512 shift = ep.ln_bias ? _mm512_maskz_loadu_ps(m, ep.ln_bias + i) : _mm512_setzero_ps();
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + i), mean);
    _mm512_mask_storeu_ps(row + i, m, _mm512_fmadd_ps(d, scale, shift));
  }
}

SPARSEC_AVX2 void layer_norm_row_avx2(float* row, int64_t n, const Epilogue& ep) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) acc = _mm256_add_ps(acc, load8(row + i, n - i));
  const __m256 mean = _mm256_set1_ps(reduce_add8(acc) / static_cast<float>(n));
  acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 keep = _mm256_castsi256_ps(lane_mask8(n - i));
    const __m256 d = _mm256_and_ps(keep, _mm256_sub_ps(load8(row + i, n - i), mean));
    acc = _mm256_fmadd_ps(d, d, acc);
  }
  const float var = reduce_add8(acc) / static_cast<float>(n);
  const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(var + ep.ln_epsilon));
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 scale = _mm256_mul_ps(rstd, load8(ep.ln_scale + i, n - i));
    const __m256 shift = ep.ln_bias ? load8(ep.ln_bias + i, n - i) : _mm256_setzero_ps();
    const __m256 d = _mm256_sub_ps(load8(row + i, n - i), mean);
    store8(row + i, n - i, _mm256_fmadd_ps(d, scale, shift));
  }
}
#endif

struct LayerNormJob {
  const Epilogue* ep;
  float* y;
  int64_t M, N, rows_per_task;
  Isa isa;
};

void layer_norm_task(void* data, size_t t) {
  const LayerNormJob& job = *static_cast<const LayerNormJob*>(data);
  const int64_t m0 = static_cast<int64_t>(t) * job.rows_per_task;
  const int64_t m1 = std::min(job.M, m0 + job.rows_per_task);
  for (int64_t m = m0; m < m1; ++m) {
#if SPARSEC_X86
    if (job.isa == Isa::kAvx512) {
      layer_norm_row_avx512(job.y + m * job.N, job.N, *job.ep);
      continue;
    }
    if (job.isa == Isa::kAvx2) {
      layer_norm_row_avx2(job.y + m * job.N, job.N, *job.ep);
      continue;
    }
#endif
    layer_norm_row_scalar(job.y + m * job.N, job.N, *job.ep);
  }
}


// The most rows of a register tile, `rows` input rows `stride` bytes apart, that fall into one set
// of this CPU's L1 data cache; and its ways (glibc's sysconf; 32 KiB, 8 ways, 64-byte lines where
// unknown).
struct L1Geometry {
  int64_t line = 64, sets = 64, ways = 8;
  L1Geometry() {
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL1_DCACHE_ASSOC) && defined(_SC_LEVEL1_DCACHE_LINESIZE)
    const long size = sysconf(_SC_LEVEL1_DCACHE_SIZE), assoc = sysconf(_SC_LEVEL1_DCACHE_ASSOC),
               bytes = sysconf(_SC_LEVEL1_DCACHE_LINESIZE);
    if (size > 0 && assoc > 0 && bytes > 0 && size % (assoc * bytes) == 0) {
      line = bytes, ways = assoc, sets = size / (assoc * bytes);
    }
#endif
  }
  int64_t set(int64_t offset) const { return offset / line % sets; }
  // (rows is a tile height, at most 16: no table, and nothing allocated on a call's path)
  int64_t rows_per_set(int64_t rows, int64_t stride) const {
    int64_t most = 0;
    for (int64_t a = 0; a < rows; ++a) {
      int64_t same = 0;
      for (int64_t b = 0; b < rows; ++b) same += set(a * stride) == set(b * stride);
      most = std::max(most, same);
    }
    return most;
  }
};

// Whether copying X into the packed panel pays for itself (measured in one process, old and new
// library alternating, 128 rows, density 0.1): for 16-row register tiles (BR = 16) always (16x16,
// 3072 x 768: 0.87 vs 1.15 ms on 2 threads; 768 x 768: 0.29 vs 0.34; with K = 3072 the 16 rows a
// tile reads in place even fall into one L1 set: 191 vs 268 us), and for narrow blocks (BC < 16:
// [16, 1] column vectors and the like), which in place read one input per row per block from its
// own cache line. For 32-row blocks (12-row tiles) reading X in place is as fast or faster while
// the tile's rows fit the L1 sets they map to (Xeon Emerald Rapids, 12 ways: 32x32, 768 x 3072,
// one thread, 0.56 vs 0.67 ms), and slower where they do not (AMD Zen 4, 8 ways, K = 3072: all 12
// rows in one set; that layer 0.88-0.94x the time with the panel, BERT-base 0.95-0.98x).
bool panel_pays(const PackedWeight& w) {
  static const L1Geometry l1;
  if (w.BC < 16 || w.BRp == 16) return true;
  const int64_t H = tile_height_avx512(std::min<int64_t>(4, w.BRp / 16));
  return l1.rows_per_set(H, w.K * static_cast<int64_t>(sizeof(float))) > l1.ways;
}

// The loop order of a call: kAuto streams when the process's packed weights outgrow one core's L2,
// where they cannot still be cached from this node's last call. Measured on BERT-base (35 MB packed,
// one process, the two orders alternating per call, Xeon Emerald Rapids): streaming 28.2 vs 30.2 ms
// on one thread, 16.1 vs 16.9 ms on two, every linear shape faster; on one layer whose 0.94 MB stay
// cached (3072 x 768, one thread) resident is faster, 0.48 vs 0.50-0.52 ms.
bool streams(const PackedWeight& w) {
  if (w.order != LoopOrder::kAuto) return w.order == LoopOrder::kStreaming;
  static const int64_t l2 = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);  // glibc; 0 or -1 where unknown
    if (bytes > 0) return static_cast<int64_t>(bytes);
#endif
    return int64_t(1) << 20;
  }();
  return packed_bytes_alive() > l2;
}

}  // namespace

namespace detail {

std::vector<int64_t> balanced_groups(const std::vector<int64_t>& row_start, int64_t groups) {
  const int64_t rows = static_cast<int64_t>(row_start.size()) - 1;
  auto cost = [&](int64_t r) { return row_start[r + 1] - row_start[r] + 1; };
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) total += cost(r);
  std::vector<int64_t> start{0};
  int64_t acc = 0;
  for (int64_t r = 0; r < rows; ++r) {
    acc += cost(r);
    const int64_t g = static_cast<int64_t>(start.size());
    if (g < groups && acc * groups >= total * g && r + 1 < rows) start.push_back(r + 1);
  }
  start.push_back(rows);
  return start;
}

void layer_norm_rows(const Epilogue& ep, float* y, int64_t M, int64_t N, Isa isa, ParallelFor parallel_for,
                     void* runner_state) {
  // Up to 8 tasks, each at most ~256 KB of Y.
  const int64_t rows_per_task = std::max<int64_t>(1, std::min<int64_t>((64 * 1024) / N, ceil_div(M, 8)));
  LayerNormJob job{&ep, y, M, N, rows_per_task, isa};
  const size_t tasks = static_cast<size_t>(ceil_div(M, rows_per_task));
  if (tasks == 1 || parallel_for == nullptr) {
    for (size_t t = 0; t < tasks; ++t) layer_norm_task(&job, t);
    return;
  }
  parallel_for(runner_state, layer_norm_task, tasks, &job);
}

}  // namespace detail

void block_sparse_linear(const PackedWeight& w, const float* x, const Epilogue& epilogue, float* y, int64_t M,
                         Isa isa, ParallelFor parallel_for, void* runner_state) {
  if (M <= 0 || w.R == 0) return;
  if (row_path(w, isa)) {
    block_sparse_rows(w, x, epilogue, y, M, isa, parallel_for, runner_state);
    if (epilogue.ln_scale != nullptr) layer_norm_rows(epilogue, y, M, w.N, isa, parallel_for, runner_state);
    return;
  }
  const int64_t panel_rows = std::max<int64_t>(1, kPanelBytes / (w.K * static_cast<int64_t>(sizeof(float))));
  const int64_t rows_per_task = std::min(M, ceil_div(std::min(M, panel_rows), kRowQuantum) * kRowQuantum);
  const int64_t row_tasks = ceil_div(M, rows_per_task);
  static const int64_t target_tasks = kTasksPerCore * std::max<int64_t>(2, std::thread::hardware_concurrency());
  const int64_t groups = std::min(w.R, std::max<int64_t>(1, ceil_div(target_tasks, row_tasks)));
  Epilogue ep = epilogue;
  ep.y = y;
  Job job{&w, x, ep, y, M, rows_per_task, balanced_groups(w.row_start, groups), isa, streams(w)};
#if SPARSEC_X86
  // The packed panel lives in buffers of the calling thread, reused across calls (no per-call
  // allocation once they have grown); pool threads only read and fill them during this call.
  thread_local AlignedScratch<float> panel_data;
  thread_local std::unique_ptr<std::atomic<int>[]> panel_state;
  thread_local int64_t panel_state_size = 0;
  XPanel panel;
  const bool packed_shape = (w.BR == 16 || w.BR == 32) &&
                            (w.BC == 1 || w.BC == 2 || w.BC == 4 || w.BC == 8 || w.BC == 16 || w.BC == 32);
  const bool avx512_panel =
      isa == Isa::kAvx512 && packed_shape && M * w.NBc * w.BC <= kMaxPanelFloats && panel_pays(w);
  const bool avx2_panel = isa == Isa::kAvx2 && w.BC == 1 && w.BR > 1 && ceil_div(M, 6) * w.K * 8 <= kMaxPanelFloats;
  if (M > 1 && (avx512_panel || avx2_panel)) {
    panel.x = x;
    panel.M = M;
    panel.K = w.K;
    panel.NBc = w.NBc;
    panel.BC = w.BC;
    panel.avx2 = avx2_panel;
    panel.H = avx2_panel ? 6 : tile_height_avx512(w.BRp / 16);  // kRowQuantum: a multiple of both
    panel.ldc = avx2_panel ? 8 : panel.H * w.BC;
    const int64_t tiles = ceil_div(M, panel.H);
    const size_t floats = static_cast<size_t>(tiles * w.NBc * panel.ldc);
    if (panel_state_size < tiles) {
      panel_state.reset(new std::atomic<int>[static_cast<size_t>(tiles)]);
      panel_state_size = tiles;
    }
    for (int64_t t = 0; t < tiles; ++t) panel_state[t].store(0, std::memory_order_relaxed);
    panel.data = panel_data.reserve(floats);
    panel.state = panel_state.get();
    job.panel = &panel;
  }
#endif
  const size_t total = static_cast<size_t>(row_tasks * (static_cast<int64_t>(job.group_start.size()) - 1));
  // Small calls (decoding rows, tiny layers) run on the calling thread: waking a pool thread costs
  // more than the few microseconds of work it would take over.
  const int64_t macs = M * w.row_start[w.R] * w.BR * w.BC;
  if (total == 1 || parallel_for == nullptr || macs < kSerialMacs) {
    for (size_t t = 0; t < total; ++t) run_task(&job, t);
    if (ep.ln_scale != nullptr) layer_norm_rows(ep, y, M, w.N, isa, nullptr, nullptr);
    return;
  }
  parallel_for(runner_state, run_task, total, &job);
  if (ep.ln_scale != nullptr) layer_norm_rows(ep, y, M, w.N, isa, parallel_for, runner_state);
}

}  // namespace sparsec
