// Block-sparse 2-D convolution, computed directly on the image (no im2col matrix).
//
// The weight [N, C, kh, kw] is packed as the matrix [N, K = C*kh*kw] (block_sparse.h). Once per
// call the input is copied into `planes`: per image, per channel, per stride phase (a, b) that
// some tap reads, the padded input's pixels (sh*i + a, sw*j + b) as a plane [Hq][Wq]. Then every
// tap (c, ky, kx) of the output grid [Ho][Wq] (Wq >= Wo columns, the extra ones discarded) is a
// contiguous run starting at
//
//     offset(c, ky, kx) = plane(c, (ky*dh) % sh, (kx*dw) % sw) + (ky*dh / sh) * Wq + (kx*dw / sw)
//
// so one output channel o over a tile of grid pixels q is
//
//     Y[o, q] = bias[o] + sum over the kept columns k of row o of  W[o, k] * planes[offset(k) + q]
//
// a CSR-like product whose dense operand is the image itself: each kept weight costs one broadcast
// and one multiply-add per vector of pixels, and a tile of MR output channels of a block row shares
// the loads of X. A 1x1 convolution with stride 1 and no padding reads X directly (Wq = Wo, no copy).
// The tile's pixels are lanes (16 on AVX-512, 8 on AVX2); NCHW outputs are stored as they are
// computed, or through a tile buffer that drops the grid's extra columns.
#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "block_sparse_internal.h"

namespace sparsec {

using detail::ceil_div;
using detail::checked_mul;

std::string check_conv_geometry(const ConvGeometry& g, int64_t K) {
  const auto in = [](int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi; };
  if (!in(g.kh, 1, kMaxKernel) || !in(g.kw, 1, kMaxKernel)) {
    return "kernel_shape must be in [1, " + std::to_string(kMaxKernel) + "], got [" + std::to_string(g.kh) + ", " +
           std::to_string(g.kw) + "]";
  }
  if (!in(g.sh, 1, kMaxKernel) || !in(g.sw, 1, kMaxKernel)) return "strides must be in [1, 1024]";
  if (!in(g.dh, 1, kMaxKernel) || !in(g.dw, 1, kMaxKernel)) return "dilations must be in [1, 1024]";
  for (int64_t p : {g.pt, g.pl, g.pb, g.pr}) {
    if (!in(p, 0, kMaxPad)) return "pads must be in [0, 2^20]";
  }
  if (K % (g.kh * g.kw) != 0) {
    return "K=" + std::to_string(K) + " is not a multiple of kh*kw=" + std::to_string(g.kh * g.kw);
  }
  return {};
}

std::string conv_output_size(const ConvGeometry& g, int64_t K, int64_t B, int64_t C, int64_t H, int64_t W,
                             int64_t& Ho, int64_t& Wo) {
  if (C * g.kh * g.kw != K) {
    return "X has " + std::to_string(C) + " channels; the weight has K=" + std::to_string(K) + " = C*" +
           std::to_string(g.kh) + "*" + std::to_string(g.kw) + ", so C must be " + std::to_string(K / (g.kh * g.kw));
  }
  if (B < 0 || H < 1 || W < 1 || H > kMaxDim || W > kMaxDim) return "X's spatial sizes must be in [1, 2^40]";
  const int64_t span_h = g.dh * (g.kh - 1) + 1, span_w = g.dw * (g.kw - 1) + 1;
  const int64_t hp = H + g.pt + g.pb, wp = W + g.pl + g.pr;
  if (hp < span_h || wp < span_w) {
    return "the padded input " + std::to_string(hp) + "x" + std::to_string(wp) + " is smaller than the dilated kernel " +
           std::to_string(span_h) + "x" + std::to_string(span_w);
  }
  Ho = (hp - span_h) / g.sh + 1;
  Wo = (wp - span_w) / g.sw + 1;
  // the planes of one image (every phase, with a row of slack) must stay well inside int64
  const int64_t plane = checked_mul(ceil_div(hp, g.sh) + 1, ceil_div(wp, g.sw) + 1);
  const int64_t image = checked_mul(checked_mul(plane, C), g.sh * g.sw);
  if (plane < 0 || image < 0 || checked_mul(image, std::max<int64_t>(B, 1)) < 0 ||
      checked_mul(image, std::max<int64_t>(B, 1)) > kMaxPackedFloats) {
    return "the input is too large";
  }
  return {};
}

namespace {

constexpr int64_t kTile = 64;        // grid pixels per tile (4 zmm, 8 ymm)
constexpr int kMaxMR = 6;            // output channels per tile (AVX-512: 6 x 4 accumulators)

struct ConvJob {
  const PackedWeight* w;
  const float* planes;        // image b starts at planes + b * image_stride
  int64_t image_stride;
  std::vector<int64_t> off;   // [kept * BC] offset of each kept column's tap
  int64_t G;                  // grid pixels per image: Ho * Wq
  int64_t Wq, Wo, HoWo;
  bool direct;                // Wq == Wo: the grid is Y's plane
  const float* bias;
  Activation act;
  const float* residual;      // [B][N][Ho * Wo], added before the activation, or null
  float* y;                   // [B][N][Ho * Wo]
  int64_t tiles;              // per image
  int64_t tiles_per_task, chunks;
  std::vector<int64_t> group_start;  // block-row groups
};

// Copies the rows of a tile buffer (MR x kTile, grid pixels q0..q0+npx; bias added) into Y, dropping
// the grid's columns >= Wo, and finishes them there: + residual, then the activation.
void scatter_tile(const ConvJob& job, const float* buf, int64_t mr, float* y0, const float* res0, int64_t q0,
                  int64_t npx) {
  for (int64_t q = q0; q < q0 + npx;) {
    const int64_t oy = q / job.Wq, ox = q % job.Wq;
    const int64_t run = std::min(job.Wq - ox, q0 + npx - q);
    const int64_t valid = std::min(run, job.Wo - ox);
    if (valid > 0) {
      for (int64_t i = 0; i < mr; ++i) {
        float* dst = y0 + i * job.HoWo + oy * job.Wo + ox;
        std::memcpy(dst, buf + i * kTile + (q - q0), sizeof(float) * valid);
        if (res0 != nullptr || job.act != Activation::kNone) {
          const float* res = res0 != nullptr ? res0 + (dst - y0) : nullptr;
          for (int64_t p = 0; p < valid; ++p) {
            dst[p] = detail::activate_scalar(res != nullptr ? dst[p] + res[p] : dst[p], job.act);
          }
        }
      }
    }
    q += run;
  }
}

// Where the lanes of one vector of a tile are stored: up to two runs (the valid columns of a grid row),
// lane l of run s at out + off[s] + l (out: the channel's plane of Y, or a tile buffer).
struct Seg {
  int64_t off[2];
  uint32_t bits[2];
  int n;
};

// Stores of the tile [q0, q0 + npx) in vectors of L lanes. Straight into Y's channel plane when
// `to_y` (needs Wq >= L, so that a vector spans at most two grid rows; the grid's columns >= Wo are
// dropped), else into a tile buffer [kTile] as they are.
void plan_stores(const ConvJob& job, int64_t q0, int64_t npx, int64_t L, bool to_y, Seg* seg) {
  for (int64_t v = 0; v < kTile / L; ++v) {
    Seg& s = seg[v];
    s.n = 0;
    const int64_t q = q0 + v * L, nl = std::min(L, npx - v * L);
    if (nl <= 0) continue;
    if (!to_y || job.direct) {
      s.off[0] = to_y ? q : v * L;
      s.bits[0] = static_cast<uint32_t>((uint64_t(1) << nl) - 1);
      s.n = 1;
      continue;
    }
    for (int64_t l = 0; l < nl;) {
      const int64_t row = (q + l) / job.Wq, col = (q + l) % job.Wq;
      const int64_t run = std::min(nl - l, job.Wq - col);
      const int64_t valid = std::min(run, job.Wo - col);
      if (valid > 0 && s.n < 2) {
        s.off[s.n] = row * job.Wo + col - l;
        s.bits[s.n] = static_cast<uint32_t>(((uint64_t(1) << valid) - 1) << l);
        ++s.n;
      }
      l += run;
    }
  }
}

// Scalar: the reference the vector tiles follow; bias only (scatter_tile adds the residual and
// applies the activation).
void tile_scalar(const ConvJob& job, int64_t r, int64_t i0, int64_t mr, const float* xb, int64_t npx, float* out,
                 int64_t ldo) {
  const PackedWeight& w = *job.w;
  for (int64_t i = 0; i < mr; ++i) {
    const float b = job.bias ? job.bias[r * w.BR + i0 + i] : 0.0f;
    for (int64_t p = 0; p < npx; ++p) out[i * ldo + p] = b;
  }
  for (int64_t blk = w.row_start[r]; blk < w.row_start[r + 1]; ++blk) {
    const float* wb = w.block(blk) + i0;
    const int64_t* ob = job.off.data() + blk * w.BC;
    const int64_t jn = std::min(w.BC, w.K - w.cols[blk]);
    for (int64_t j = 0; j < jn; ++j) {
      const float* xp = xb + ob[j];
      for (int64_t i = 0; i < mr; ++i) {
        const float wv = wb[j * w.BRp + i];
        for (int64_t p = 0; p < npx; ++p) out[i * ldo + p] += wv * xp[p];
      }
    }
  }
}

#if SPARSEC_X86
template <int MR>
SPARSEC_AVX512 void tile_avx512(const ConvJob& job, int64_t r, int64_t i0, const float* xb, int64_t npx,
                                const Seg* seg, float* out, const float* res, bool finish, int64_t ldo) {
  constexpr int NV = kTile / 16;
  const PackedWeight& w = *job.w;
  __mmask16 mask[NV];
  __m512 acc[MR][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) mask[v] = detail::lane_mask16(npx - 16 * v);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    const __m512 b = _mm512_set1_ps(job.bias ? job.bias[r * w.BR + i0 + i] : 0.0f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = b;
  }
  const int64_t BRp = w.BRp;
  for (int64_t blk = w.row_start[r]; blk < w.row_start[r + 1]; ++blk) {
    const float* wb = w.block(blk) + i0;
    const int64_t* ob = job.off.data() + blk * w.BC;
    const int64_t jn = std::min(w.BC, w.K - w.cols[blk]);
    for (int64_t j = 0; j < jn; ++j) {
      const float* xp = xb + ob[j];
      __m512 xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) xv[v] = _mm512_maskz_loadu_ps(mask[v], xp + 16 * v);
      const float* wj = wb + j * BRp;
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        const __m512 wv = _mm512_set1_ps(wj[i]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(wv, xv[v], acc[i][v]);
      }
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      for (int t = 0; t < seg[v].n; ++t) {
        const __mmask16 bits = static_cast<__mmask16>(seg[v].bits[t]);
        const int64_t at = i * ldo + seg[v].off[t];
        __m512 o = acc[i][v];
        if (res != nullptr) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(bits, res + at));
        if (finish) o = detail::activate512(o, job.act);
        _mm512_mask_storeu_ps(out + at, bits, o);
      }
    }
  }
}

// AVX2 (16 ymm registers): MR <= 2 output channels x 4 vectors of 8 pixels, the tile in two halves;
// FULL: all 32 pixels of the half exist (plain loads of X).
template <int MR, bool FULL>
SPARSEC_AVX2 void half_tile_avx2(const ConvJob& job, int64_t r, int64_t i0, const float* xb, int64_t npx,
                                 const Seg* seg, float* out, const float* res, bool finish, int64_t ldo) {
  constexpr int NV = 4;
  const PackedWeight& w = *job.w;
  __m256i mask[NV];
  __m256 acc[MR][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) mask[v] = detail::lane_mask8(npx - 8 * v);
#pragma GCC unroll 2
  for (int i = 0; i < MR; ++i) {
    const __m256 b = _mm256_set1_ps(job.bias ? job.bias[r * w.BR + i0 + i] : 0.0f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = b;
  }
  const int64_t BRp = w.BRp;
  for (int64_t blk = w.row_start[r]; blk < w.row_start[r + 1]; ++blk) {
    const float* wb = w.block(blk) + i0;
    const int64_t* ob = job.off.data() + blk * w.BC;
    const int64_t jn = std::min(w.BC, w.K - w.cols[blk]);
    for (int64_t j = 0; j < jn; ++j) {
      const float* xp = xb + ob[j];
      __m256 xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) xv[v] = FULL ? _mm256_loadu_ps(xp + 8 * v) : _mm256_maskload_ps(xp + 8 * v, mask[v]);
#pragma GCC unroll 2
      for (int i = 0; i < MR; ++i) {
        const __m256 wv = _mm256_broadcast_ss(wb + j * BRp + i);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(wv, xv[v], acc[i][v]);
      }
    }
  }
  const bool relu = finish && job.act == Activation::kRelu;
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
#pragma GCC unroll 2
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      for (int t = 0; t < seg[v].n; ++t) {
        const int64_t at = i * ldo + seg[v].off[t];
        __m256 o = acc[i][v];
        if (seg[v].bits[t] == 0xFFu) {  // all 8 lanes: plain loads and stores (masked ones cost more)
          if (res != nullptr) o = _mm256_add_ps(o, _mm256_loadu_ps(res + at));
          if (relu) o = _mm256_max_ps(_mm256_setzero_ps(), o);  // NaN stays NaN
          _mm256_storeu_ps(out + at, o);
          continue;
        }
        const __m256i bits = _mm256_set1_epi32(static_cast<int32_t>(seg[v].bits[t]));
        const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(bits, lane_bits), lane_bits);
        if (res != nullptr) o = _mm256_add_ps(o, _mm256_maskload_ps(res + at, m));
        if (relu) o = _mm256_max_ps(_mm256_setzero_ps(), o);  // NaN stays NaN
        _mm256_maskstore_ps(out + at, m, o);
      }
    }
  }
}

void tile_avx2(const ConvJob& job, int64_t r, int64_t i0, int64_t mr, const float* xb, int64_t npx, const Seg* seg,
               float* out, const float* res, bool finish, int64_t ldo) {
  for (int64_t h = 0; h < kTile && h < npx; h += 32) {
    for (int64_t i = 0; i < mr; i += 2) {
      const float* res_i = res != nullptr ? res + i * ldo : nullptr;
      const bool full = npx - h >= 32;
      const auto half = mr - i >= 2 ? (full ? half_tile_avx2<2, true> : half_tile_avx2<2, false>)
                                    : (full ? half_tile_avx2<1, true> : half_tile_avx2<1, false>);
      half(job, r, i0 + i, xb + h, npx - h, seg + h / 8, out + i * ldo, res_i, finish, ldo);
    }
  }
}

void tile_avx512_any(const ConvJob& job, int64_t r, int64_t i0, int64_t mr, const float* xb, int64_t npx,
                     const Seg* seg, float* out, const float* res, bool finish, int64_t ldo) {
  switch (mr) {
    case 1: tile_avx512<1>(job, r, i0, xb, npx, seg, out, res, finish, ldo); break;
    case 2: tile_avx512<2>(job, r, i0, xb, npx, seg, out, res, finish, ldo); break;
    case 3: tile_avx512<3>(job, r, i0, xb, npx, seg, out, res, finish, ldo); break;
    case 4: tile_avx512<4>(job, r, i0, xb, npx, seg, out, res, finish, ldo); break;
    case 5: tile_avx512<5>(job, r, i0, xb, npx, seg, out, res, finish, ldo); break;
    default: tile_avx512<6>(job, r, i0, xb, npx, seg, out, res, finish, ldo); break;
  }
}
#endif  // SPARSEC_X86

// One tile: `out` and `res` are Y's and the residual's planes of the tile's first channel when
// `finish` (the tile adds the residual and applies the activation as it stores), else `out` is the
// tile buffer (bias only; scatter_tile finishes).
using TileFn = void (*)(const ConvJob&, int64_t, int64_t, int64_t, const float*, int64_t, const Seg*, float*,
                        const float*, bool, int64_t);

void tile_scalar_any(const ConvJob& job, int64_t r, int64_t i0, int64_t mr, const float* xb, int64_t npx, const Seg*,
                     float* out, const float*, bool, int64_t ldo) {
  tile_scalar(job, r, i0, mr, xb, npx, out, ldo);
}

// Lanes: 16 (AVX-512) or 8 (AVX2) stores straight into Y when the grid is Y's or at least a vector
// wide; the scalar path (0) and narrower grids go through the tile buffer.
template <TileFn Tile, int64_t Lanes>
void conv_task(void* data, size_t t) {
  const ConvJob& job = *static_cast<const ConvJob*>(data);
  const PackedWeight& w = *job.w;
  const int64_t groups = static_cast<int64_t>(job.group_start.size()) - 1;
  const int64_t g = static_cast<int64_t>(t) % groups;
  const int64_t chunk = (static_cast<int64_t>(t) / groups) % job.chunks;
  const int64_t image = static_cast<int64_t>(t) / (groups * job.chunks);
  const float* x = job.planes + image * job.image_stride;
  float* y = job.y + image * w.N * job.HoWo;
  const float* res = job.residual != nullptr ? job.residual + image * w.N * job.HoWo : nullptr;
  alignas(64) float buf[kMaxMR * kTile];
  const bool to_y = Lanes > 0 && (job.direct || job.Wq >= Lanes);
  Seg seg[kTile / 8];
  const int64_t t1 = std::min(job.tiles, (chunk + 1) * job.tiles_per_task);
  for (int64_t tile = chunk * job.tiles_per_task; tile < t1; ++tile) {
    const int64_t q0 = tile * kTile;
    const int64_t npx = std::min(kTile, job.G - q0);
    if (Lanes > 0) plan_stores(job, q0, npx, Lanes, to_y, seg);
    for (int64_t r = job.group_start[g]; r < job.group_start[g + 1]; ++r) {
      const int64_t rows = std::min(w.BR, w.N - r * w.BR);
      // the block row's channels in near-equal tiles of at most kMaxMR (32 = 6+6+5+5+5+5, not 6*5+2)
      const int64_t parts = ceil_div(rows, kMaxMR);
      for (int64_t part = 0, i0 = 0; part < parts; ++part) {
        const int64_t mr = rows / parts + (part < rows % parts);
        float* y0 = y + (r * w.BR + i0) * job.HoWo;
        const float* res0 = res != nullptr ? res + (r * w.BR + i0) * job.HoWo : nullptr;
        if (to_y) {
          Tile(job, r, i0, mr, x + q0, npx, seg, y0, res0, true, job.HoWo);
        } else {
          Tile(job, r, i0, mr, x + q0, npx, seg, buf, nullptr, false, kTile);
          scatter_tile(job, buf, mr, y0, res0, q0, npx);
        }
        i0 += mr;
      }
    }
  }
}

// Stride phases that some tap reads, along one axis: index[a] is phase a's slot, or -1.
std::vector<int64_t> used_phases(int64_t k, int64_t d, int64_t s, int64_t& count) {
  std::vector<int64_t> index(static_cast<size_t>(s), -1);
  count = 0;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t a = (t * d) % s;
    if (index[a] < 0) index[a] = count++;
  }
  return index;
}

struct PlaneJob {
  const float* x;
  float* planes;
  int64_t C, H, W, Hq, Wq;
  const ConvGeometry* g;
  const std::vector<int64_t>* pa;
  const std::vector<int64_t>* pb;
  int64_t na, nb;
  int64_t image_stride;
};

// Task (image, channel): that channel's used phases of the padded input, zeros outside X. Each row
// of X is read once: padded into a row buffer when the stride is > 1, then every sw-th column of it
// goes to each used column phase (plain loops the compiler vectorises).
void plane_task(void* data, size_t t) {
  const PlaneJob& job = *static_cast<const PlaneJob*>(data);
  const ConvGeometry& g = *job.g;
  const int64_t image = static_cast<int64_t>(t) / job.C, c = static_cast<int64_t>(t) % job.C;
  const float* xc = job.x + (image * job.C + c) * job.H * job.W;
  const int64_t plane = job.Hq * job.Wq;
  thread_local detail::AlignedScratch<float> row_buffer;
  float* padded = g.sw > 1 ? row_buffer.reserve(static_cast<size_t>(job.Wq * g.sw)) : nullptr;
  for (int64_t a = 0; a < g.sh; ++a) {
    if ((*job.pa)[a] < 0) continue;
    float* phase_rows = job.planes + image * job.image_stride + (c * job.na + (*job.pa)[a]) * job.nb * plane;
    for (int64_t i = 0; i < job.Hq; ++i) {
      const int64_t yy = g.sh * i + a - g.pt;
      const bool inside = yy >= 0 && yy < job.H;
      const float* src = xc + yy * job.W;
      if (inside && g.sw > 1) {
        std::fill(padded, padded + job.Wq * g.sw, 0.0f);
        const int64_t n = std::min(job.W, job.Wq * g.sw - g.pl);
        if (n > 0) std::memcpy(padded + g.pl, src, sizeof(float) * n);
      }
      for (int64_t b = 0; b < g.sw; ++b) {
        if ((*job.pb)[b] < 0) continue;
        float* row = phase_rows + (*job.pb)[b] * plane + i * job.Wq;
        if (!inside) {
          std::fill(row, row + job.Wq, 0.0f);
        } else if (g.sw == 1) {  // columns [pl, pl + W) of the row are X's
          const int64_t lead = std::min(job.Wq, g.pl);
          std::fill(row, row + lead, 0.0f);
          const int64_t n = std::max<int64_t>(0, std::min(job.Wq - lead, job.W));
          if (n > 0) std::memcpy(row + lead, src, sizeof(float) * n);
          std::fill(row + lead + n, row + job.Wq, 0.0f);
        } else if (g.sw == 2) {
          const float* from = padded + b;
          for (int64_t j = 0; j < job.Wq; ++j) row[j] = from[2 * j];
        } else {
          const float* from = padded + b;
          for (int64_t j = 0; j < job.Wq; ++j) row[j] = from[g.sw * j];
        }
      }
    }
  }
}

}  // namespace

void block_sparse_conv2d(const PackedWeight& w, const ConvGeometry& g, const float* x, int64_t B, int64_t H,
                         int64_t W, const float* bias, const float* residual, Activation act, float* y, Isa isa,
                         ParallelFor parallel_for, void* runner_state) {
  const int64_t C = w.K / (g.kh * g.kw);
  int64_t Ho = 0, Wo = 0;
  if (!conv_output_size(g, w.K, B, C, H, W, Ho, Wo).empty() || B == 0) return;  // the caller checked
  const bool direct = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.pt == 0 && g.pl == 0 && g.pb == 0 &&
                      g.pr == 0;
  int64_t na = 1, nb = 1;
  const std::vector<int64_t> pa = used_phases(g.kh, g.dh, g.sh, na), pb = used_phases(g.kw, g.dw, g.sw, nb);
  const int64_t Hq = direct ? H : ceil_div(H + g.pt + g.pb, g.sh);
  const int64_t Wq = direct ? W : ceil_div(W + g.pl + g.pr, g.sw);
  const int64_t plane = Hq * Wq;
  const int64_t image_stride = direct ? C * H * W : C * na * nb * plane;
  const bool threads = parallel_for != nullptr && checked_mul(B * Ho * Wo, w.row_start[w.R] * w.BC * w.BR) >= detail::kSerialMacs;

  thread_local detail::AlignedScratch<float> plane_buffer;
  const float* planes = x;
  if (!direct) {
    // slack after the last image: a tile's reads run up to kTile - 1 pixels and (kw-1)*dw/sw columns
    // past the grid (garbage columns, dropped), at most one row past a plane
    const int64_t slack = kTile + Wq + g.kw * g.dw + 64;
    float* buffer = plane_buffer.reserve(static_cast<size_t>(B * image_stride + slack));
    std::fill(buffer + B * image_stride, buffer + B * image_stride + slack, 0.0f);
    PlaneJob pj{x, buffer, C, H, W, Hq, Wq, &g, &pa, &pb, na, nb, image_stride};
    const size_t copies = static_cast<size_t>(B * C);
    if (threads && copies > 1) {
      parallel_for(runner_state, plane_task, copies, &pj);
    } else {
      for (size_t t = 0; t < copies; ++t) plane_task(&pj, t);
    }
    planes = buffer;
  }

  ConvJob job;
  job.w = &w;
  job.planes = planes;
  job.image_stride = image_stride;
  job.G = Ho * Wq;
  job.Wq = Wq;
  job.Wo = Wo;
  job.HoWo = Ho * Wo;
  job.direct = Wq == Wo;
  job.bias = bias;
  job.act = act;
  job.residual = residual;
  job.y = y;
  const int64_t kept = w.row_start[w.R];
  job.off.assign(static_cast<size_t>(kept * w.BC), 0);
  for (int64_t blk = 0; blk < kept; ++blk) {
    for (int64_t j = 0; j < w.BC && w.cols[blk] + j < w.K; ++j) {
      const int64_t k = w.cols[blk] + j;
      const int64_t c = k / (g.kh * g.kw), ky = (k / g.kw) % g.kh, kx = k % g.kw;
      const int64_t a = (ky * g.dh) % g.sh, b = (kx * g.dw) % g.sw;
      job.off[blk * w.BC + j] = direct ? c * H * W
                                       : ((c * na + pa[a]) * nb + pb[b]) * plane + (ky * g.dh / g.sh) * Wq +
                                             (kx * g.dw / g.sw);
    }
  }
  job.tiles = ceil_div(job.G, kTile);
  static const int64_t target_tasks = detail::kTasksPerCore * std::max<int64_t>(2, std::thread::hardware_concurrency());
  // split the pixels first (a tile's loads are shared by every output channel of a block row), then
  // the block rows when the images are too small to give every thread work
  job.chunks = std::min(job.tiles, std::max<int64_t>(1, ceil_div(target_tasks, B)));
  job.tiles_per_task = ceil_div(job.tiles, job.chunks);
  job.chunks = ceil_div(job.tiles, job.tiles_per_task);
  const int64_t groups = std::min(w.R, std::max<int64_t>(1, ceil_div(target_tasks, B * job.chunks)));
  job.group_start = detail::balanced_groups(w.row_start, groups);

  void (*task)(void*, size_t) = conv_task<tile_scalar_any, 0>;
#if SPARSEC_X86
  if (isa == Isa::kAvx512) task = conv_task<tile_avx512_any, 16>;
  if (isa == Isa::kAvx2) task = conv_task<tile_avx2, 8>;
#else
  (void)isa;
#endif
  const size_t total = static_cast<size_t>(B * job.chunks * (static_cast<int64_t>(job.group_start.size()) - 1));
  if (total == 1 || !threads) {
    for (size_t t = 0; t < total; ++t) task(&job, t);
  } else {
    parallel_for(runner_state, task, total, &job);
  }
}

}  // namespace sparsec
