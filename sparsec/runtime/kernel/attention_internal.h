// Internal to the attention kernel (attention.cc, attention_amx.cc): one head's rows as plain
// pointers and strides, and the row softmax that the bf16 tile path borrows from the fp32 one.
#pragma once

#include <cstdint>

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

// bf16 compute on AMX tiles (attention_amx.cc; amx_ready(AmxKind::kBf16) says whether it may run).
void head_rows_amx_bf16(const HeadRows& rows);

}  // namespace detail
}  // namespace sparsec
