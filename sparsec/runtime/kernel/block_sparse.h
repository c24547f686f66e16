// Block-sparse linear layer, independent of onnxruntime: the packed weight layout and the compute
// entry points. sparsec_ort.cc adapts this to the ORT custom-op C API.
//
// Weight W is [N, K]. The ONNX inputs hold it as padded blocked-ELL (values [R, S, BR, BC]); the
// kernel repacks each kept block transposed, [BC][BRp] with BRp = BR rounded up to 16, so that one
// step of the reduction index j reads BR contiguous weights (one or more zmm/ymm loads) that are
// multiplied by one broadcast input value.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sparsec {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
// Best instruction set this CPU (and OS) supports, capped by env SPARSEC_KERNEL_ISA when set
// (scalar | avx2 | avx512); a request above what the CPU has falls back to the best available.
Isa select_isa();

struct FreeDeleter {
  void operator()(float* p) const;
};
using FloatBuffer = std::unique_ptr<float[], FreeDeleter>;

// Kept blocks only (no padding slots), block row after block row, so that the weights of
// consecutive block rows are one sequential stream for the hardware prefetcher.
struct PackedWeight {
  int64_t N = 0, K = 0;    // logical weight shape
  int64_t R = 0;           // block rows
  int64_t BR = 0, BC = 0;  // block shape
  int64_t BRp = 0;         // BR rounded up to a multiple of 16
  int64_t NBc = 0;         // block columns, ceil(K / BC)
  FloatBuffer blocks;      // [kept][BC][BRp], 64-byte aligned, zero padded
  std::vector<int64_t> cols;       // [kept] first input column of each kept block (c * BC)
  std::vector<int64_t> row_start;  // [R + 1] kept blocks of block row r are [row_start[r], row_start[r+1])

  const float* block(int64_t b) const { return blocks.get() + b * BC * BRp; }
  int64_t cost(int64_t r) const { return row_start[r + 1] - row_start[r] + 1; }  // +1: the epilogue
};

// What the ONNX inputs say about the weight. `values` is float32, or int8 when `scales` is given.
struct BlockInputs {
  const void* values = nullptr;
  bool int8 = false;
  const float* scales = nullptr;  // [R, S] (int8 only)
  const int64_t* block_cols = nullptr;
  const int64_t* row_nnz = nullptr;
  int64_t R = 0, S = 0, BR = 0, BC = 0;
};

// Bounds of what a node may describe: 2^40 features, blocks of up to 4096 x 4096, 2^36 packed floats.
constexpr int64_t kMaxDim = int64_t(1) << 40;
constexpr int64_t kMaxBlock = 4096;
constexpr int64_t kMaxPackedFloats = int64_t(1) << 36;

// Validates the inputs against N and K and fills `out`. Returns an error message, empty on success.
std::string pack_weight(const BlockInputs& in, int64_t N, int64_t K, PackedWeight& out);

// Runs `fn(data, i)` for i in [0, total), possibly in parallel. Provided by the caller (ORT glue).
using ParallelFor = void (*)(void* runner_state, void (*fn)(void*, size_t), size_t total, void* data);

enum class Activation { kNone = 0, kGelu = 1, kGeluTanh = 2 };

// What is applied to X @ W^T as each output tile is stored, Z = act(X @ W^T + bias) + residual,
// then, when ln_scale is set, over each finished row: Y = LayerNorm(Z) * ln_scale + ln_bias.
struct Epilogue {
  const float* bias = nullptr;      // [N], or null
  Activation act = Activation::kNone;
  const float* residual = nullptr;  // [M, N] like Y, or null
  const float* ln_scale = nullptr;  // [N]: normalise each output row (mean 0, variance 1), or null
  const float* ln_bias = nullptr;   // [N], or null (with ln_scale only)
  float ln_epsilon = 1e-5f;
  const float* y = nullptr;         // set by block_sparse_linear: Y's start (locates the residual)
};

// Y[M, N] = LayerNorm?(act(X[M, K] @ W^T + bias) + residual). X, Y and residual are dense row-major.
void block_sparse_linear(const PackedWeight& w, const float* x, const Epilogue& epilogue, float* y,
                         int64_t M, Isa isa, ParallelFor parallel_for, void* runner_state);

}  // namespace sparsec
