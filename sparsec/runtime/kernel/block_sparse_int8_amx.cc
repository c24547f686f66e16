// INT8 compute on Intel AMX (Sapphire Rapids and later): the block path's sums by tile multiplies.
//
// AMX has eight tile registers of up to 16 rows x 64 bytes. TDPBUSD multiplies a tile A of u8
// (16 rows x 4 kq bytes) by a tile B of s8 (kq rows x 64 bytes, each row 16 outputs x 4 bytes: a
// group of 4 reduction indices per 32-bit lane) and adds the products into a tile C of 16 x 16
// int32, exactly (no saturation; K <= kMaxInt8K keeps every sum within int32). That is the VNNI
// arithmetic (u8 x s8, 4 products per lane) on 16 rows at once, and B is the INT8 packing's
// [BCq][BRp][4] layout as it stands: the rows of a block's 16-output slice are BRp * 4 bytes
// apart, and A is 16 rows of the quantized X, ld bytes apart, at the block's first column.
//
// A pass covers 32 rows of X (two A tiles) by one or two 16-output slices of a block row (B tiles),
// four C tiles at most: for each kept block and each chunk of up to 16 groups of its columns, two
// A loads, one or two B loads and up to four TDPBUSD. The sums then go through memory to the same
// epilogue as the VNNI path (zero point, scales, bias, activation, residual). Rows past M read the
// zero rows the caller appends to the quantized X; their sums are not stored.
//
// The OS must grant a process the tile data state (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, once);
// `amx_ready` (amx.h) asks for it and says whether the CPU and the OS allow a kind of AMX.
#include <algorithm>
#include <cstring>
#include <utility>

#include "amx.h"
#include "block_sparse_internal.h"

#if SPARSEC_HAS_AMX
#include <sys/syscall.h>
#include <unistd.h>
#define SPARSEC_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#endif

namespace sparsec {
namespace detail {

#if SPARSEC_HAS_AMX
namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureTileData = 18;

struct CpuAmx {
  bool tile = false, int8 = false, bf16 = false, avx512bw = false, avx512_bf16 = false;
};

CpuAmx cpu_amx() {
  CpuAmx out;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(0));
  if (eax < 7) return out;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  out.tile = (edx >> 24) & 1, out.int8 = (edx >> 25) & 1, out.bf16 = (edx >> 22) & 1;
  out.avx512bw = (ebx >> 30) & 1;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(1));
  out.avx512_bf16 = (eax >> 5) & 1;
  return out;
}

// Tiles: C 0-3 (row tile i, output slice v: 2 i + v), A 4-5 (row tiles), B 6-7 (output slices).
TileConfig config_for(int64_t kq) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  for (int t = 4; t < 6; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = static_cast<uint16_t>(4 * kq);
  }
  for (int t = 6; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(kq);
    c.colsb[t] = 64;
  }
  return c;
}

// Groups of 4 columns per tile multiply: a block's BCq groups in equal chunks of at most 16.
int64_t chunk_groups(int64_t bcq) { return bcq <= 16 ? bcq : 16; }

// The epilogue of a pass over its stored sums, the activation a template argument (one branch per
// pass, not per vector).
template <int VT, Activation A>
SPARSEC_AMX void finish_pass(const int32_t (&sums)[32][32], const PackedInt8& w, int64_t col, int64_t pcol,
                             int64_t ncols, int64_t mr, const QuantizedX& xq, const Epilogue& ep, float* y,
                             int32_t* raw) {
  Epilogue act = ep;
  act.act = A;
  for (int v = 0; v < VT; ++v) {
    const __mmask16 mask = lane_mask16(ncols - 16 * v);
    const __m512i colsum = _mm512_loadu_si512(w.colsum.data() + pcol + 16 * v);
    const __m512 wscale = _mm512_loadu_ps(w.scales.data() + pcol + 16 * v);
    const __m512 bias = ep.bias ? _mm512_maskz_loadu_ps(mask, ep.bias + col + 16 * v) : _mm512_setzero_ps();
    for (int64_t m = 0; m < mr; ++m) {
      const int64_t at = m * w.N + col + 16 * v;
      store_sums16(_mm512_load_si512(&sums[m][16 * v]), mask, colsum, wscale, bias, xq.zero[m], xq.scale[m], act,
                   y + at, raw ? raw + at : nullptr);
    }
  }
}

// One pass: rows [0, 32) of xq (all readable; those >= rows are not stored) by the outputs
// [o0, o0 + 16 VT) of block row r.
template <int VT>
SPARSEC_AMX void pass_amx(const PackedInt8& w, int64_t r, int64_t o0, int64_t ncols, const QuantizedX& xq,
                          int64_t rows, const Epilogue& ep, float* y, int32_t* raw) {
  const int64_t kq = chunk_groups(w.BCq);
  const int64_t stride_b = w.BRp * 4;
  const int64_t ld = xq.ld;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t b = w.row_start[r]; b < w.row_start[r + 1]; ++b) {
    const int8_t* wb = w.block(b) + o0 * 4;
    const uint8_t* xb = xq.data + w.cols[b];
    for (int64_t q = 0; q < w.BCq; q += kq) {
      _tile_loadd(4, xb + 4 * q, ld);
      _tile_loadd(5, xb + 16 * ld + 4 * q, ld);
      _tile_loadd(6, wb + q * stride_b, stride_b);
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(2, 5, 6);
      if (VT == 2) {
        _tile_loadd(7, wb + q * stride_b + 64, stride_b);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(3, 5, 7);
      }
    }
  }
  alignas(64) int32_t sums[32][32];  // [row][output], C tiles stored 128 bytes a row
  _tile_stored(0, &sums[0][0], 128);
  _tile_stored(2, &sums[16][0], 128);
  if (VT == 2) {
    _tile_stored(1, &sums[0][16], 128);
    _tile_stored(3, &sums[16][16], 128);
  }
  const int64_t col = r * w.BR + o0, pcol = r * w.BRp + o0;
  const int64_t mr = std::min<int64_t>(32, rows);
  switch (ep.act) {
    case Activation::kGelu: finish_pass<VT, Activation::kGelu>(sums, w, col, pcol, ncols, mr, xq, ep, y, raw); break;
    case Activation::kGeluTanh:
      finish_pass<VT, Activation::kGeluTanh>(sums, w, col, pcol, ncols, mr, xq, ep, y, raw);
      break;
    case Activation::kRelu: finish_pass<VT, Activation::kRelu>(sums, w, col, pcol, ncols, mr, xq, ep, y, raw); break;
    default: finish_pass<VT, Activation::kNone>(sums, w, col, pcol, ncols, mr, xq, ep, y, raw); break;
  }
}

}  // namespace

bool amx_ready(AmxKind kind) {
  static const CpuAmx cpu = cpu_amx();
  static const bool permitted = cpu.tile && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureTileData) == 0;
  if (!permitted) return false;
  return kind == AmxKind::kInt8 ? cpu.int8 : cpu.bf16 && cpu.avx512bw && cpu.avx512_bf16;
}

bool amx_int8_ready() { return amx_ready(AmxKind::kInt8); }

bool amx_takes(const PackedInt8& w) {
  // Blocks at least 16 columns wide (4 groups a multiply; narrower ones waste most of each tile),
  // in chunks of equal size.
  return !w.windows && w.BCq >= 4 && (w.BCq <= 16 || w.BCq % 16 == 0);
}

SPARSEC_AMX void block_rows_amx(const PackedInt8& w, int64_t r0, int64_t r1, const QuantizedX& xq, int64_t rows,
                                const Epilogue& ep, float* y, int32_t* raw, const LazyRows* lazy, int64_t m0,
                                int64_t start) {
  const TileConfig config = config_for(chunk_groups(w.BCq));
  _tile_loadconfig(&config);
  const int64_t passes = (rows + kAmxPassRows - 1) / kAmxPassRows;
  for (int64_t i = 0; i < passes; ++i) {
    const int64_t m = (i + start) % passes * kAmxPassRows;
    if (lazy != nullptr) ensure_tile(*lazy, (m0 + m) / kAmxPassRows);
    const QuantizedX xt{xq.data + m * xq.ld, xq.ld, xq.scale + m, xq.zero + m};
    float* ym = y + m * w.N;
    int32_t* rm = raw ? raw + m * w.N : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ncols_row = std::min(w.BR, w.N - r * w.BR);
      for (int64_t o0 = 0; o0 < ncols_row; o0 += 32) {
        const int64_t ncols = std::min<int64_t>(32, ncols_row - o0);
        if (ncols > 16) {
          pass_amx<2>(w, r, o0, ncols, xt, rows - m, ep, ym, rm);
        } else {
          pass_amx<1>(w, r, o0, ncols, xt, rows - m, ep, ym, rm);
        }
      }
    }
  }
  _tile_release();
}

#else

bool amx_ready(AmxKind) { return false; }
bool amx_int8_ready() { return false; }
bool amx_takes(const PackedInt8&) { return false; }
void block_rows_amx(const PackedInt8&, int64_t, int64_t, const QuantizedX&, int64_t, const Epilogue&, float*,
                    int32_t*, const LazyRows*, int64_t, int64_t) {}

#endif

}  // namespace detail
}  // namespace sparsec
