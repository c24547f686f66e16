// Internal to the attention kernel (attention.cc, attention_bf16.cc): one head's rows as plain
// pointers and strides, and the row softmax that the bf16 paths borrow from the fp32 one.
#pragma once

#include <cstdint>

// GCC 10 and clang 12 know the AVX512-BF16 intrinsics and CPU check; older compilers build no bf16 paths.
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 10)
#define SPARSEC_HAS_BF16 1
#else
#define SPARSEC_HAS_BF16 0
#endif

namespace sparsec {
namespace detail {

// The weights of query row i in place: p holds its unscaled scores q_i . k_j for j < Skv, in a row
// padded to a multiple of 64 floats (64-byte aligned); afterwards p holds the unnormalised weights,
// zero past Skv, and the result is what the weighted values are multiplied by: 1 / the weights' sum,
// NaN for a NaN row (its weights are zero, so a NaN value still shows), 0 for a fully masked one.
using SoftmaxRow = float (*)(const void* context, int64_t i, float* p);

// Rows [i0, i1) of one query head against its key/value head. Row i of Q is q + i * ldq, key and
// value row j k + j * ldk and v + j * ldv, output row i y + i * ldy (all in floats).
struct HeadRows {
  const float *q, *k, *v;
  float* y;
  int64_t ldq, ldk, ldv, ldy;
  int64_t Skv, D, Dv, i0, i1;
  SoftmaxRow softmax;
  const void* context;
};

// bf16 compute on AMX tiles (attention_bf16.cc; amx_ready(AmxKind::kBf16) says whether it may run).
void head_rows_amx_bf16(const HeadRows& rows);
// bf16 compute with AVX512-BF16's VDPBF16PS (attention_bf16.cc; avx512_bf16_ready() says whether it
// may run). The same rounding as the AMX path.
void head_rows_avx512_bf16(const HeadRows& rows);
// Whether this CPU has AVX512-F, -BW, -VL and -BF16 (and the compiler the intrinsics).
bool avx512_bf16_ready();

}  // namespace detail
}  // namespace sparsec
