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

// kAmx is INT8 compute only: AMX tile multiplies for the block path, AVX-512 VNNI for the rest.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

const char* isa_name(Isa isa);
// Best instruction set this CPU (and OS) supports for fp32 compute (at most kAvx512), capped by env
// SPARSEC_KERNEL_ISA when set (scalar | avx2 | avx512 | amx); a request above what the CPU has falls
// back to the best available.
Isa select_isa();
// The cap SPARSEC_KERNEL_ISA asks for (kAmx, no cap, when unset or unknown).
Isa isa_cap();

struct FreeDeleter {
  void operator()(float* p) const;
};
using FloatBuffer = std::unique_ptr<float[], FreeDeleter>;

// The bytes of packed weights alive in this process, counted by the PackedBytes each packed weight
// holds. The kernel's guess whether a node's weights are still in cache from its last call: a
// model whose packed weights fit a core's L2 keeps them there between calls, a larger one (a
// BERT-base streams 35 MB per inference) reads them from L3 or memory every time.
int64_t packed_bytes_alive();

class PackedBytes {
 public:
  PackedBytes() = default;
  explicit PackedBytes(int64_t bytes);
  PackedBytes(PackedBytes&& other) noexcept : bytes_(other.bytes_) { other.bytes_ = 0; }
  PackedBytes& operator=(PackedBytes&& other) noexcept;
  PackedBytes(const PackedBytes&) = delete;
  PackedBytes& operator=(const PackedBytes&) = delete;
  ~PackedBytes();

 private:
  int64_t bytes_ = 0;
};

// How a call that reads X in place (AVX-512, blocks 32 rows high or wider than 16 columns) orders its
// row tiles and block rows (block_sparse.cc, "Two loop orders"): kAuto picks kStreaming when
// packed_bytes_alive() exceeds one core's L2, else kResident.
enum class LoopOrder { kAuto = 0, kResident = 1, kStreaming = 2 };
// kAuto, or what env SPARSEC_KERNEL_ORDER asks ("resident" or "streaming"); read when a weight is packed.
LoopOrder select_order();

// Kept blocks only (no padding slots), block row after block row, so that the weights of
// consecutive block rows are one sequential stream for the hardware prefetcher.
// Whether the row path's 32-bit offsets (16 * column, PackedWeight::slice_at) reach every input.
inline bool slice_offsets_fit(int64_t K) { return K <= INT32_MAX / 16; }

// Row vectors ([1, BC] with BC a multiple of 4) by columns of W inputs (W = 16, 12, 8 or 4, the
// widest that divides BC) for AVX-512 (block_sparse_columns.cc, block_sparse_int8_columns.cc): the
// outputs split into bands; for each band and column, the entries: the outputs with a vector there,
// each with its W weights (zero past K). The index, shared by the fp32 and INT8 packs:
struct ColumnIndex {
  int64_t W = 0;                    // inputs per column (0: no column pack, see active())
  int64_t ncols = 0;                // ceil(K / W)
  std::vector<int64_t> band_start;  // [bands + 1] output boundaries
  std::vector<int64_t> col_start;   // [bands * ncols + 1]: band b, column c holds entries
                                    // [col_start[b * ncols + c], col_start[b * ncols + c + 1])
  std::vector<int32_t> out;         // [entries] 16 x (each entry's output - its band's first)
  int64_t bands() const { return static_cast<int64_t>(band_start.size()) - 1; }
  bool active() const { return W > 0; }
};

struct ColumnPack : ColumnIndex {
  FloatBuffer values;       // [entries][W] weights, 64-byte aligned
  Isa isa = Isa::kAvx512;   // what it was packed for: kAvx512 (W up to 16) or kAvx2 (W 8 or 4)
};

struct PackedWeight {
  int64_t N = 0, K = 0;    // logical weight shape
  int64_t R = 0;           // block rows
  int64_t BR = 0, BC = 0;  // block shape
  int64_t BRp = 0;         // BR rounded up to a multiple of 16
  int64_t NBc = 0;         // block columns, ceil(K / BC)
  FloatBuffer blocks;      // [kept][BC][BRp], 64-byte aligned, zero padded
  std::vector<int64_t> cols;       // [kept] first input column of each kept block (c * BC)
  std::vector<int32_t> slice_at;   // unstructured (BR = BC = 1) where slice_offsets_fit(K): [kept]
                                   // 16 * cols, the input's offset in a slice of the row path
                                   // (block_sparse_rows.cc)
  std::vector<int64_t> row_start;  // [R + 1] kept blocks of block row r are [row_start[r], row_start[r+1])
  LoopOrder order = LoopOrder::kAuto;
  ColumnPack columns;              // where pack_columns made it (then `blocks` is released)
  PackedBytes counted;             // this weight's share of packed_bytes_alive()

  const float* block(int64_t b) const { return blocks.get() + b * BC * BRp; }
  int64_t cost(int64_t r) const { return row_start[r + 1] - row_start[r] + 1; }  // +1: the epilogue
};

// What the ONNX inputs say about the weight. `values` is float32, or int8 when `scales` is given.
struct BlockInputs {
  const void* values = nullptr;
  bool int8 = false;
  const float* scales = nullptr;  // [R, S] (int8 storage: dequantized when packed)
  const float* row_scales = nullptr;  // [N] (INT8 compute: one scale per output row)
  const int64_t* block_cols = nullptr;
  const int64_t* row_nnz = nullptr;
  int64_t R = 0, S = 0, BR = 0, BC = 0;
};

// Bounds of what a node may describe: 2^40 features, blocks of up to 4096 x 4096, 2^36 packed floats.
constexpr int64_t kMaxDim = int64_t(1) << 40;
constexpr int64_t kMaxBlock = 4096;
constexpr int64_t kMaxPackedFloats = int64_t(1) << 36;

// Validates the inputs against N and K (every index and size bounded) without reading the values.
std::string check_block_inputs(const BlockInputs& in, int64_t N, int64_t K);

// Validates the inputs against N and K and fills `out`. Returns an error message, empty on success.
std::string pack_weight(const BlockInputs& in, int64_t N, int64_t K, PackedWeight& out);

// Whether a weight packed for the fp32 path runs faster by columns on `isa` (AVX-512 or AVX2, row
// vectors [1, 4 j]); pack_columns then repacks it so for `isa` (block_sparse_columns.cc) and
// releases its blocks: from then on it runs on that instruction set only.
bool columns_pay(const PackedWeight& w, Isa isa);
void pack_columns(PackedWeight& w, Isa isa);

// Runs `fn(data, i)` for i in [0, total), possibly in parallel. Provided by the caller (ORT glue).
using ParallelFor = void (*)(void* runner_state, void (*fn)(void*, size_t), size_t total, void* data);

enum class Activation { kNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

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

// ------------------------------------------------------------------------------------------------
// INT8 compute (block_sparse_int8.cc). Weights: symmetric int8, one float32 scale per output row
// (sw[n]); X is quantized per row at each call to u8 with a zero point, as ONNX's
// DynamicQuantizeLinear does for a whole tensor: lo = min(0, min X[m]), hi = max(0, max X[m]),
// sx = (hi - lo) / 255 (1 when 0), zx = round(-lo / sx), xq = clamp(round(X / sx) + zx, 0, 255),
// rounding half to even. Then, exactly in int32,
//     acc[m, n] = sum_k xq[m, k] * wq[n, k] - zx[m] * colsum[n],   colsum[n] = sum_k wq[n, k]
// and Y = sx[m] * sw[n] * acc + bias, followed by the fp32 epilogue (activation, residual, LayerNorm).
// |acc| <= 255 * 128 * K < 2^31 for K <= kMaxInt8K, so no sum overflows.

struct ByteDeleter {
  void operator()(int8_t* p) const;
};
using ByteBuffer = std::unique_ptr<int8_t[], ByteDeleter>;

constexpr int64_t kMaxInt8K = int64_t(1) << 16;

// Kept blocks as in PackedWeight, each stored [BCq][BRp][4] int8: for a group of 4 consecutive
// reduction indices, the 4 weights of each output row are one 32-bit lane (the operand layout of
// vpdpbusd). BC is padded to 4 * BCq, BR to BRp, and weights at columns >= K are zero.
// Blocks one output high (BR == 1) are packed as windows instead (`windows`): per output row, 4-byte
// windows of consecutive weights from a kept column, `cols` their first columns, `row_start` [N + 1],
// `blocks` the windows' bytes (block_sparse_int8_rows.cc).
struct PackedInt8 {
  int64_t N = 0, K = 0, R = 0, BR = 0, BC = 0;
  bool windows = false;
  int64_t BRp = 0;  // BR rounded up to 16
  int64_t BCq = 0;  // ceil(BC / 4)
  int64_t NBc = 0;  // ceil(K / BC)
  ByteBuffer blocks;
  std::vector<int64_t> cols;       // [kept] first input column of each kept block
  std::vector<int64_t> row_start;  // [R + 1]
  // Per output row, indexed r * BRp + i (padded rows are zero), 64 entries of slack for vector loads.
  std::vector<float> scales;
  std::vector<int32_t> colsum;
  // Row vectors [1, 4 j] on VNNI, where pack_columns_int8 made it: then `blocks` holds each entry's
  // W / 4 windows ([entries][W / 4] int32) in place of the row path's, and `cols` is released.
  ColumnIndex columns;
  PackedBytes counted;  // this weight's share of packed_bytes_alive()

  const int8_t* block(int64_t b) const { return blocks.get() + b * BCq * BRp * 4; }
};

// Whether an INT8-compute weight runs faster by columns on `isa` (VNNI or AMX: row vectors
// [1, 4 j]); pack_columns_int8 then repacks its windows so (block_sparse_int8_columns.cc) and
// releases them: from then on it runs on VNNI only.
bool columns_pay_int8(const PackedInt8& w, Isa isa);
void pack_columns_int8(PackedInt8& w);

// Best instruction set for INT8 compute: kAvx512 needs AVX-512 VNNI (and BW), kAvx2 AVX2; capped
// like select_isa (SPARSEC_KERNEL_ISA).
Isa select_isa_int8();
// kAvx512 / kAvx2 / kScalar when this CPU can run that INT8 path.
bool isa_int8_supported(Isa isa);

// Validates (check_block_inputs, int8 values, row_scales set, K <= kMaxInt8K) and packs.
std::string pack_weight_int8(const BlockInputs& in, int64_t N, int64_t K, PackedInt8& out);

// Y[M, N] as above. With `raw` set, writes acc (int32 [M, N]) there and leaves Y alone (tests).
void block_sparse_linear_int8(const PackedInt8& w, const float* x, const Epilogue& epilogue, float* y, int64_t M,
                              Isa isa, ParallelFor parallel_for, void* runner_state, int32_t* raw = nullptr);

// ------------------------------------------------------------------------------------------------
// Convolution (block_sparse_conv.cc). The weight [N, C, kh, kw] is the matrix [N, K = C*kh*kw]
// (channel-major, then kernel row and column: F.unfold's order), packed as PackedWeight. The input
// is padded and split by stride phase once per call, into planes where every kernel tap of a
// stride-1 grid of output pixels is one contiguous run: output pixel (oy, ox) of tap (c, ky, kx)
// reads phase ((ky*dh) % sh, (kx*dw) % sw) of channel c at (oy + ky*dh / sh, ox + kx*dw / sw).
// The lanes run over output pixels (a row of Y in NCHW), each kept weight is one broadcast.
struct ConvGeometry {
  int64_t kh = 1, kw = 1;              // kernel
  int64_t sh = 1, sw = 1;              // strides
  int64_t pt = 0, pl = 0, pb = 0, pr = 0;  // pads: top, left, bottom, right (ONNX's begin/end order)
  int64_t dh = 1, dw = 1;              // dilations
};

constexpr int64_t kMaxKernel = 1024;      // kh, kw, strides and dilations up to this
constexpr int64_t kMaxPad = int64_t(1) << 20;

// Why the geometry cannot describe a weight of K columns ('' when it can).
std::string check_conv_geometry(const ConvGeometry& g, int64_t K);
// The output size for an input [B, C, H, W]; an error message when the input does not fit (C is not
// K / (kh*kw), the padded input is smaller than the dilated kernel, a size too large).
std::string conv_output_size(const ConvGeometry& g, int64_t K, int64_t B, int64_t C, int64_t H, int64_t W,
                             int64_t& Ho, int64_t& Wo);
// Y [B, N, Ho, Wo] = act(conv2d(X [B, C, H, W], W) + bias + residual), act none or relu, bias and
// residual (shaped like Y) optional. The residual comes before the activation (ResNet's block ends
// relu(bn(conv(x)) + shortcut)), unlike the linear's epilogue.
void block_sparse_conv2d(const PackedWeight& w, const ConvGeometry& g, const float* x, int64_t B, int64_t H,
                         int64_t W, const float* bias, const float* residual, Activation act, float* y, Isa isa,
                         ParallelFor parallel_for, void* runner_state);

}  // namespace sparsec
