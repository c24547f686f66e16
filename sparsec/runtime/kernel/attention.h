// Multi-head attention on [batch, seq, heads * head] projections, independent of onnxruntime: the
// computation of ONNX's Attention (opset 23) for the inputs sparsec lowers to it (3-D Q, K, V, an
// optional boolean or additive mask, is_causal, grouped K/V heads; no past state, no softcap).
// sparsec_ort.cc adapts it to the custom-op API as sparsec::Attention.
//
// For each batch b, query head h (K/V head h / (Hq / Hkv)) and query row i:
//   s_j = scale * <q_i, k_j>, plus the mask (additive), or plus -inf where the boolean mask is false,
//   and plus -inf where is_causal and j > i (top-left aligned, as onnxruntime's Attention does);
//   y_i = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m), m = max_j s_j.
// IEEE semantics are kept where they matter to a user: a row whose scores hold a NaN (or +inf, where
// s_j - m is inf - inf) is NaN throughout; a row with every key masked (m = -inf) weighs every key 0,
// so it is 0, or NaN in the columns where a value is NaN or infinite (0 * inf); a masked key weighs
// exactly 0. Masks are added, not selected, as ONNX defines them: a +inf score at a masked key is
// NaN (inf - inf) and so is its row. onnxruntime's Attention does the same.
#pragma once

#include <cstdint>
#include <string>

#include "block_sparse.h"

namespace sparsec {

struct AttentionShape {
  int64_t B = 0, Sq = 0, Skv = 0;  // batch, query rows, keys
  int64_t Hq = 0, Hkv = 0;         // query heads, key/value heads (Hq a multiple of Hkv)
  int64_t D = 0, Dv = 0;           // head size of Q and K, of V
  float scale = 0.0f;
  bool causal = false;
  // bf16 compute: Q, K, V and the softmax weights rounded to bf16 for the two products (fp32 sums),
  // on AMX tiles where the CPU has them, else with AVX512-BF16's dot products; elsewhere the fp32
  // computation.
  bool bf16 = false;
  // Row strides of Q, K and V in floats (0: the rows are packed, Hq * D, Hkv * D, Hkv * Dv): a
  // projection of Q, K and V computed as one [B, S, Hq * D + Hkv * D + Hkv * Dv] tensor is read in
  // place, each from its own first column, with the whole width as every stride.
  int64_t ldq = 0, ldk = 0, ldv = 0;
  int64_t q_stride() const { return ldq != 0 ? ldq : Hq * D; }
  int64_t k_stride() const { return ldk != 0 ? ldk : Hkv * D; }
  int64_t v_stride() const { return ldv != 0 ? ldv : Hkv * Dv; }
};

// The mask's element for (b, h, i, j) is at offset b * sb + h * sh + i * si + j * sj (0 strides
// broadcast). Either `add` (float, added to the scores) or `keep` (bool bytes: 0 masks the key) or
// neither.
struct AttentionMask {
  const float* add = nullptr;
  const uint8_t* keep = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
};

// Empty when the shape is one the kernel computes, else what is wrong with it.
std::string check_attention(const AttentionShape& s);

// The instruction set for attention: kAmx for bf16 compute where the CPU and OS allow AMX-BF16 and
// SPARSEC_KERNEL_ISA does not cap it below amx, else select_isa() (with kAvx512, bf16 computes with
// AVX512-BF16 where the CPU has it, else in fp32; kAvx2 computes in fp32; below AVX2, attention()
// declines).
Isa select_isa_attention(bool bf16);
// What bf16 compute runs on here now: "amx", "avx512_bf16", "avx512" (fp32 products: no AVX512-BF16),
// or below AVX-512 the name of select_isa() ("avx2": fp32 products; "scalar": the caller runs
// onnxruntime's Attention).
const char* attention_bf16_path();

// q [B, Sq, Hq * D], k [B, Skv, Hkv * D], v [B, Skv, Hkv * Dv] (rows s.ldq, s.ldk, s.ldv floats
// apart where set) -> y [B, Sq, Hq * Dv]. The shape must
// pass check_attention. With `s.bf16`: AMX tiles when `isa` is kAmx, else AVX512-BF16 where the CPU
// has it; otherwise fp32 on AVX-512 or AVX2 (8-lane vectors, the same tiles). Returns false
// (and computes nothing) for kScalar: the caller runs onnxruntime's own Attention there.
bool attention(const AttentionShape& s, const float* q, const float* k, const float* v, const AttentionMask& mask,
               float* y, Isa isa, ParallelFor parallel_for, void* runner_state);

}  // namespace sparsec
