// onnxruntime custom-op library: domain "sparsec", ops "BlockSparseLinear", "BlockSparseConv" and
// "Attention" (opset 1).
//
// BlockSparseLinear inputs: 0 X float [..., K]; 1 values float [R, S, BR, BC] (int8 when scales
// are given); 2 block_cols int64 [R, S]; 3 row_nnz int64 [R]; 4 bias float [N] (optional);
// 5 scales float [R, S] (optional); 6 residual float, Y's shape (optional); 7 ln_scale float [N]
// and 8 ln_bias float [N] (optional). Attributes N, K, activation (string, optional: "gelu" |
// "gelu_tanh"), epsilon (float, optional, default 1e-5), compute (string, optional: "fp32" |
// "int8"). Output Y float [..., N] =
// Z = activation(X @ W^T + bias) + residual, or LayerNorm(Z) * ln_scale + ln_bias with ln_scale.
// compute = "int8": values int8 and scales float [N] (one per output row); X is quantized per row
// inside the kernel and the products are summed in int32 (block_sparse.h, block_sparse_int8.cc).
//
// BlockSparseConv inputs: 0 X float [B, C, H, W]; 1-3 and 5 as above, for the weight as the matrix
// [N, K = C*kh*kw]; 4 bias float [N] (optional); 6 residual float [B, N, Ho, Wo] (optional).
// Attributes N, K, kernel_shape [kh, kw], strides, pads [top, left, bottom, right], dilations (ONNX
// Conv's, optional), activation (optional: "relu"). Output Y float [B, N, Ho, Wo] =
// activation(conv2d(X, W) + bias + residual) (block_sparse_conv.cc).
//
// Attention inputs: 0 Q float [B, Sq, Hq * D]; 1 K float [B, Skv, Hkv * D]; 2 V float
// [B, Skv, Hkv * Dv]; 3 attn_mask bool or float (optional), broadcastable to [B, Hq, Sq, Skv].
// Attributes q_num_heads, kv_num_heads, scale (float, optional: 1 / sqrt(D)), is_causal (optional,
// 0 | 1), softcap (optional, 0 only), compute (optional: "fp32" | "bf16", the products in bf16 on AMX
// tiles), packed_qkv (optional: [NQ, NK, NV], then Q, K and V are each [B, S, NQ + NK + NV], one
// projection's output as a rule, and the node reads Q's columns [0, NQ), K's [NQ, NQ + NK) and V's
// [NQ + NK, NQ + NK + NV) in place). Output Y float [B, Sq, Hq * Dv]: ONNX Attention (opset 23) on these inputs (attention.h,
// attention.cc, attention_bf16.cc). Where the CPU has no AVX-512 (or SPARSEC_KERNEL_ISA caps it), the
// kernel invokes onnxruntime's own Attention instead (InvokeOp).
//
// Only the C API is used, through the OrtApi table handed to RegisterCustomOps, so the library
// does not link against libonnxruntime: it loads into any onnxruntime whose API version is at least
// kMinApi, and into newer ones than the headers it was compiled with.
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "attention.h"
#include "block_sparse.h"

namespace {

constexpr uint32_t kMinApi = 16;          // CreateKernelV2 / KernelComputeV2
constexpr uint32_t kParallelForApi = 17;  // KernelContext_ParallelFor
constexpr const char* kDomain = "sparsec";
constexpr const char* kLinearName = "BlockSparseLinear";
constexpr const char* kConvName = "BlockSparseConv";
constexpr const char* kAttentionName = "Attention";
// The op whose kernel this thread is creating or running: names it in error messages.
thread_local const char* t_op_name = kLinearName;

enum Input : size_t {
  kX = 0, kValues, kBlockCols, kRowNnz, kBias, kScales, kResidual, kLnScale, kLnBias, kNumInputs
};

const OrtApi* g_ort = nullptr;
uint32_t g_api_version = 0;

#define SPARSEC_RETURN_IF_ERROR(expr)   \
  do {                                  \
    OrtStatus* status_ = (expr);        \
    if (status_ != nullptr) return status_; \
  } while (0)

OrtStatus* fail(const std::string& message) {
  return g_ort->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(t_op_name) + ": " + message).c_str());
}

struct TensorView {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  size_t count = 0;
  void* data = nullptr;
};

OrtStatus* view_tensor(const OrtValue* value, TensorView& out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  SPARSEC_RETURN_IF_ERROR(g_ort->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = g_ort->GetTensorElementType(info, &out.type);
  if (status == nullptr) status = g_ort->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    out.shape.resize(rank);
    status = g_ort->GetDimensions(info, out.shape.data(), rank);
  }
  if (status == nullptr) status = g_ort->GetTensorShapeElementCount(info, &out.count);
  g_ort->ReleaseTensorTypeAndShapeInfo(info);
  if (status != nullptr) return status;
  return g_ort->GetTensorMutableData(const_cast<OrtValue*>(value), &out.data);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Checks the weight inputs' types and shapes and points `in` at their data.
// `int8_compute`: scales are per output row, float [N]; else per block, float [R, S].
OrtStatus* describe_blocks(const TensorView& values, const TensorView& cols, const TensorView& nnz,
                           const TensorView* scales, int64_t N, bool int8_compute, sparsec::BlockInputs& in) {
  if (values.shape.size() != 4) return fail("values must be [R, S, BR, BC], got " + shape_str(values.shape));
  in.R = values.shape[0];
  in.S = values.shape[1];
  in.BR = values.shape[2];
  in.BC = values.shape[3];
  in.values = values.data;
  if (int8_compute) {
    if (values.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) return fail("compute=int8 needs int8 values");
    if (scales == nullptr) return fail("int8 values need the scales input");
    if (scales->type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || scales->shape != std::vector<int64_t>{N}) {
      return fail("compute=int8 needs scales float [N=" + std::to_string(N) + "], got " + shape_str(scales->shape));
    }
    in.int8 = true;
    in.row_scales = static_cast<const float*>(scales->data);
  } else if (values.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) {
    if (scales == nullptr) return fail("int8 values need the scales input");
    if (scales->type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || scales->shape != std::vector<int64_t>{in.R, in.S}) {
      return fail("scales must be float [R, S], got " + shape_str(scales->shape));
    }
    in.int8 = true;
    in.scales = static_cast<const float*>(scales->data);
  } else if (values.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    return fail("values must be float32, or int8 with scales");
  }
  if (cols.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || cols.shape != std::vector<int64_t>{in.R, in.S}) {
    return fail("block_cols must be int64 [R, S], got " + shape_str(cols.shape));
  }
  if (nnz.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || nnz.shape != std::vector<int64_t>{in.R}) {
    return fail("row_nnz must be int64 [R], got " + shape_str(nnz.shape));
  }
  in.block_cols = static_cast<const int64_t*>(cols.data);
  in.row_nnz = static_cast<const int64_t*>(nnz.data);
  return nullptr;
}

// The weight of one node, packed for the fp32 path or for INT8 compute.
struct Weight {
  sparsec::PackedWeight fp32;
  sparsec::PackedInt8 int8;
};

// `inputs` holds one OrtValue per op input (null where absent). Packs the weight into `out`, for the
// fp32 path or INT8 compute by columns where that pays on `isa` (a linear's row vectors on AVX-512).
OrtStatus* pack_from_values(const OrtValue* const* inputs, int64_t N, int64_t K, bool int8_compute, bool conv,
                            sparsec::Isa isa, Weight& out) {
  TensorView values, cols, nnz, scales;
  SPARSEC_RETURN_IF_ERROR(view_tensor(inputs[kValues], values));
  SPARSEC_RETURN_IF_ERROR(view_tensor(inputs[kBlockCols], cols));
  SPARSEC_RETURN_IF_ERROR(view_tensor(inputs[kRowNnz], nnz));
  const bool has_scales = inputs[kScales] != nullptr;
  if (has_scales) SPARSEC_RETURN_IF_ERROR(view_tensor(inputs[kScales], scales));
  sparsec::BlockInputs in;
  SPARSEC_RETURN_IF_ERROR(describe_blocks(values, cols, nnz, has_scales ? &scales : nullptr, N, int8_compute, in));
  const std::string error = int8_compute ? sparsec::pack_weight_int8(in, N, K, out.int8)
                                         : sparsec::pack_weight(in, N, K, out.fp32);
  if (!error.empty()) return fail(error);
  if (!int8_compute && !conv && sparsec::columns_pay(out.fp32, isa)) sparsec::pack_columns(out.fp32, isa);
  if (int8_compute && sparsec::columns_pay_int8(out.int8, isa)) sparsec::pack_columns_int8(out.int8);
  return nullptr;
}

struct Kernel {
  int64_t N = 0;
  int64_t K = 0;
  sparsec::Activation act = sparsec::Activation::kNone;
  float epsilon = 1e-5f;
  sparsec::Isa isa = sparsec::Isa::kScalar;
  bool int8_compute = false;
  bool conv = false;                 // BlockSparseConv
  sparsec::ConvGeometry geometry;    // (conv)
  std::unique_ptr<Weight> constant;  // packed once when the weights are initializers
};

// Sets t_op_name for the scope of one call into the library.
struct OpScope {
  explicit OpScope(bool conv) { t_op_name = conv ? kConvName : kLinearName; }
  explicit OpScope(const char* name) { t_op_name = name; }
};

// An optional ints attribute of exactly `n` values: `out` keeps its defaults when absent.
OrtStatus* ints_attribute(const OrtKernelInfo* info, const char* attr, size_t n, int64_t* out) {
  size_t size = 0;
  OrtStatus* status = g_ort->KernelInfoGetAttributeArray_int64(info, attr, nullptr, &size);
  if (status != nullptr) {  // absent
    g_ort->ReleaseStatus(status);
    return nullptr;
  }
  if (size != n) {
    return fail("attribute " + std::string(attr) + " must have " + std::to_string(n) + " values, got " +
                std::to_string(size));
  }
  std::vector<int64_t> values(size);
  SPARSEC_RETURN_IF_ERROR(g_ort->KernelInfoGetAttributeArray_int64(info, attr, values.data(), &size));
  std::copy(values.begin(), values.end(), out);
  return nullptr;
}

OrtStatus* string_attribute(const OrtKernelInfo* info, const char* attr, const char* fallback, std::string& out);

// BlockSparseConv's geometry (kernel_shape is required) and activation ("relu" or none).
OrtStatus* read_conv(const OrtKernelInfo* info, Kernel& k) {
  int64_t kernel[2] = {0, 0}, strides[2] = {1, 1}, pads[4] = {0, 0, 0, 0}, dilations[2] = {1, 1};
  size_t size = 0;
  OrtStatus* status = g_ort->KernelInfoGetAttributeArray_int64(info, "kernel_shape", nullptr, &size);
  if (status != nullptr) {
    g_ort->ReleaseStatus(status);
    return fail("attribute kernel_shape [kh, kw] is required");
  }
  SPARSEC_RETURN_IF_ERROR(ints_attribute(info, "kernel_shape", 2, kernel));
  SPARSEC_RETURN_IF_ERROR(ints_attribute(info, "strides", 2, strides));
  SPARSEC_RETURN_IF_ERROR(ints_attribute(info, "pads", 4, pads));
  SPARSEC_RETURN_IF_ERROR(ints_attribute(info, "dilations", 2, dilations));
  sparsec::ConvGeometry& g = k.geometry;
  g.kh = kernel[0], g.kw = kernel[1], g.sh = strides[0], g.sw = strides[1];
  g.pt = pads[0], g.pl = pads[1], g.pb = pads[2], g.pr = pads[3];
  g.dh = dilations[0], g.dw = dilations[1];
  const std::string error = sparsec::check_conv_geometry(g, k.K);
  if (!error.empty()) return fail(error);
  std::string act;
  SPARSEC_RETURN_IF_ERROR(string_attribute(info, "activation", "", act));
  if (act == "relu") {
    k.act = sparsec::Activation::kRelu;
  } else if (!act.empty() && act != "none") {
    return fail("unknown activation \"" + act + "\" (allowed: relu)");
  }
  return nullptr;
}

// The weight inputs when they are all constant initializers, else false (they are packed per call).
bool constant_weight_inputs(const OrtKernelInfo* info, const OrtValue** inputs) {
  size_t count = 0;
  OrtStatus* status = g_ort->KernelInfo_GetInputCount(info, &count);
  if (status != nullptr) {
    g_ort->ReleaseStatus(status);
    return false;
  }
  for (size_t index : {kValues, kBlockCols, kRowNnz, kScales}) {
    if (index >= count) continue;
    int is_constant = 0;
    const OrtValue* value = nullptr;
    status = g_ort->KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value);
    if (status != nullptr) {
      g_ort->ReleaseStatus(status);
      is_constant = 0;
    }
    if (!is_constant || value == nullptr) {
      if (index == kScales) continue;  // absent (fp32 variant); an int8 weight without it fails to pack
      return false;
    }
    inputs[index] = value;
  }
  return true;
}

// An optional string attribute: its value, or `fallback` when absent.
OrtStatus* string_attribute(const OrtKernelInfo* info, const char* attr, const char* fallback, std::string& out) {
  size_t size = 0;
  OrtStatus* status = g_ort->KernelInfoGetAttribute_string(info, attr, nullptr, &size);
  if (status != nullptr) {  // absent
    g_ort->ReleaseStatus(status);
    out = fallback;
    return nullptr;
  }
  out.assign(size, '\0');
  SPARSEC_RETURN_IF_ERROR(g_ort->KernelInfoGetAttribute_string(info, attr, out.data(), &size));
  out.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return nullptr;
}

// The optional string attribute "activation": absent, "" or "none", "gelu", "gelu_tanh".
OrtStatus* read_activation(const OrtKernelInfo* info, sparsec::Activation& act) {
  size_t size = 0;
  OrtStatus* status = g_ort->KernelInfoGetAttribute_string(info, "activation", nullptr, &size);
  if (status != nullptr) {  // absent
    g_ort->ReleaseStatus(status);
    act = sparsec::Activation::kNone;
    return nullptr;
  }
  std::string name(size, '\0');
  SPARSEC_RETURN_IF_ERROR(g_ort->KernelInfoGetAttribute_string(info, "activation", name.data(), &size));
  name.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  if (name.empty() || name == "none") {
    act = sparsec::Activation::kNone;
  } else if (name == "gelu") {
    act = sparsec::Activation::kGelu;
  } else if (name == "gelu_tanh") {
    act = sparsec::Activation::kGeluTanh;
  } else {
    return fail("unknown activation \"" + name + "\" (allowed: gelu, gelu_tanh)");
  }
  return nullptr;
}

bool is_conv(const OrtCustomOp* op) { return std::string(op->GetName(op)) == kConvName; }

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  const OpScope scope(is_conv(op));
  try {
    auto k = std::make_unique<Kernel>();
    k->conv = is_conv(op);
    SPARSEC_RETURN_IF_ERROR(g_ort->KernelInfoGetAttribute_int64(info, "N", &k->N));
    SPARSEC_RETURN_IF_ERROR(g_ort->KernelInfoGetAttribute_int64(info, "K", &k->K));
    if (k->N <= 0 || k->K <= 0 || k->N > sparsec::kMaxDim || k->K > sparsec::kMaxDim) {
      return fail("attributes N and K must be in [1, 2^40], got N=" + std::to_string(k->N) + ", K=" +
                  std::to_string(k->K));
    }
    if (k->conv) {
      SPARSEC_RETURN_IF_ERROR(read_conv(info, *k));
    } else {
      SPARSEC_RETURN_IF_ERROR(read_activation(info, k->act));
    }
    OrtStatus* eps = g_ort->KernelInfoGetAttribute_float(info, "epsilon", &k->epsilon);
    if (eps != nullptr) g_ort->ReleaseStatus(eps);  // absent: the default
    if (!(k->epsilon >= 0.0f) || k->epsilon > 1.0f) return fail("attribute epsilon must be in [0, 1]");
    std::string compute_mode;
    SPARSEC_RETURN_IF_ERROR(string_attribute(info, "compute", "fp32", compute_mode));
    if (compute_mode != "fp32" && compute_mode != "int8") {
      return fail("unknown compute \"" + compute_mode + "\" (allowed: fp32, int8)");
    }
    k->int8_compute = compute_mode == "int8";
    if (k->conv && k->int8_compute) return fail("compute=int8 is not supported (int8 values are dequantized)");
    k->isa = k->int8_compute ? sparsec::select_isa_int8() : sparsec::select_isa();
    const OrtValue* inputs[kNumInputs] = {};
    if (constant_weight_inputs(info, inputs)) {
      k->constant = std::make_unique<Weight>();
      SPARSEC_RETURN_IF_ERROR(pack_from_values(inputs, k->N, k->K, k->int8_compute, k->conv, k->isa, *k->constant));
    }
    *kernel = k.release();
    return nullptr;
  } catch (const std::exception& e) {
    return g_ort->CreateStatus(ORT_FAIL, (std::string(t_op_name) + ": " + e.what()).c_str());
  }
}

void ort_parallel_for(void* context, void (*fn)(void*, size_t), size_t total, void* data) {
#if ORT_API_VERSION >= 17
  if (g_api_version >= kParallelForApi) {
    OrtStatus* status = g_ort->KernelContext_ParallelFor(static_cast<const OrtKernelContext*>(context), fn,
                                                         total, 0, data);
    if (status == nullptr) return;
    g_ort->ReleaseStatus(status);  // no thread pool available: run serially below
  }
#endif
  for (size_t i = 0; i < total; ++i) fn(data, i);
}

// An optional float [N] input (bias, ln_scale, ln_bias): `out` points at its data, or stays null.
OrtStatus* vector_input(const OrtValue* value, const char* name, int64_t N, const float*& out) {
  if (value == nullptr) return nullptr;
  TensorView v;
  SPARSEC_RETURN_IF_ERROR(view_tensor(value, v));
  if (v.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || v.count != static_cast<size_t>(N)) {
    return fail(std::string(name) + " must be float [N=" + std::to_string(N) + "], got " + shape_str(v.shape));
  }
  out = static_cast<const float*>(v.data);
  return nullptr;
}

// The weight of a call: packed at session creation, or now when the weight inputs are not constants.
OrtStatus* call_weight(const Kernel& k, const OrtValue* const* inputs, const Weight*& weight,
                       std::unique_ptr<Weight>& per_call) {
  weight = k.constant.get();
  if (weight == nullptr) {
    per_call = std::make_unique<Weight>();
    SPARSEC_RETURN_IF_ERROR(pack_from_values(inputs, k.N, k.K, k.int8_compute, k.conv, k.isa, *per_call));
    weight = per_call.get();
  }
  return nullptr;
}

OrtStatus* compute_conv(const Kernel& k, const OrtValue* const* inputs, const TensorView& x,
                        OrtKernelContext* context) {
  if (x.shape.size() != 4) return fail("X must be [B, C, H, W], got " + shape_str(x.shape));
  int64_t Ho = 0, Wo = 0;
  const std::string error =
      sparsec::conv_output_size(k.geometry, k.K, x.shape[0], x.shape[1], x.shape[2], x.shape[3], Ho, Wo);
  if (!error.empty()) return fail(error + " (X " + shape_str(x.shape) + ")");
  const Weight* weight = nullptr;
  std::unique_ptr<Weight> per_call;
  SPARSEC_RETURN_IF_ERROR(call_weight(k, inputs, weight, per_call));
  const float* bias = nullptr;
  SPARSEC_RETURN_IF_ERROR(vector_input(inputs[kBias], "bias", k.N, bias));
  const std::vector<int64_t> y_shape{x.shape[0], k.N, Ho, Wo};
  const float* residual = nullptr;
  if (inputs[kResidual] != nullptr) {
    TensorView res;
    SPARSEC_RETURN_IF_ERROR(view_tensor(inputs[kResidual], res));
    if (res.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || res.shape != y_shape) {
      return fail("residual must be float " + shape_str(y_shape) + " (the output's shape), got " + shape_str(res.shape));
    }
    residual = static_cast<const float*>(res.data);
  }
  OrtValue* y_value = nullptr;
  SPARSEC_RETURN_IF_ERROR(g_ort->KernelContext_GetOutput(context, 0, y_shape.data(), y_shape.size(), &y_value));
  if (x.shape[0] == 0) return nullptr;
  void* y = nullptr;
  SPARSEC_RETURN_IF_ERROR(g_ort->GetTensorMutableData(y_value, &y));
  sparsec::block_sparse_conv2d(weight->fp32, k.geometry, static_cast<const float*>(x.data), x.shape[0], x.shape[2],
                               x.shape[3], bias, residual, k.act, static_cast<float*>(y), k.isa, ort_parallel_for,
                               context);
  return nullptr;
}

OrtStatus* compute(const Kernel& k, OrtKernelContext* context) {
  size_t count = 0;
  SPARSEC_RETURN_IF_ERROR(g_ort->KernelContext_GetInputCount(context, &count));
  const OrtValue* inputs[kNumInputs] = {};
  for (size_t i = 0; i < std::min<size_t>(count, kNumInputs); ++i) {
    SPARSEC_RETURN_IF_ERROR(g_ort->KernelContext_GetInput(context, i, &inputs[i]));
  }

  TensorView x;
  SPARSEC_RETURN_IF_ERROR(view_tensor(inputs[kX], x));
  if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return fail("X must be float32");
  if (k.conv) return compute_conv(k, inputs, x, context);
  if (x.shape.empty() || x.shape.back() != k.K) {
    return fail("X must be [..., K=" + std::to_string(k.K) + "], got " + shape_str(x.shape));
  }

  const Weight* weight = nullptr;
  std::unique_ptr<Weight> per_call;
  SPARSEC_RETURN_IF_ERROR(call_weight(k, inputs, weight, per_call));

  sparsec::Epilogue epilogue;
  epilogue.act = k.act;
  epilogue.ln_epsilon = k.epsilon;
  SPARSEC_RETURN_IF_ERROR(vector_input(inputs[kBias], "bias", k.N, epilogue.bias));
  SPARSEC_RETURN_IF_ERROR(vector_input(inputs[kLnScale], "ln_scale", k.N, epilogue.ln_scale));
  SPARSEC_RETURN_IF_ERROR(vector_input(inputs[kLnBias], "ln_bias", k.N, epilogue.ln_bias));
  if (epilogue.ln_bias != nullptr && epilogue.ln_scale == nullptr) return fail("ln_bias needs ln_scale");

  std::vector<int64_t> y_shape = x.shape;
  y_shape.back() = k.N;
  if (inputs[kResidual] != nullptr) {
    TensorView res;
    SPARSEC_RETURN_IF_ERROR(view_tensor(inputs[kResidual], res));
    if (res.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || res.shape != y_shape) {
      return fail("residual must be float " + shape_str(y_shape) + " (the output's shape), got " +
                  shape_str(res.shape));
    }
    epilogue.residual = static_cast<const float*>(res.data);
  }
  OrtValue* y_value = nullptr;
  SPARSEC_RETURN_IF_ERROR(g_ort->KernelContext_GetOutput(context, 0, y_shape.data(), y_shape.size(), &y_value));
  const int64_t M = static_cast<int64_t>(x.count) / k.K;
  if (M == 0) return nullptr;
  void* y = nullptr;
  SPARSEC_RETURN_IF_ERROR(g_ort->GetTensorMutableData(y_value, &y));
  if (k.int8_compute) {
    sparsec::block_sparse_linear_int8(weight->int8, static_cast<const float*>(x.data), epilogue, static_cast<float*>(y),
                                      M, k.isa, ort_parallel_for, context);
  } else {
    sparsec::block_sparse_linear(weight->fp32, static_cast<const float*>(x.data), epilogue, static_cast<float*>(y), M,
                                 k.isa, ort_parallel_for, context);
  }
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* context) {
  const OpScope scope(static_cast<const Kernel*>(kernel)->conv);
  try {
    return compute(*static_cast<const Kernel*>(kernel), context);
  } catch (const std::exception& e) {
    return g_ort->CreateStatus(ORT_FAIL, (std::string(t_op_name) + ": " + e.what()).c_str());
  }
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* ORT_API_CALL linear_name(const OrtCustomOp*) { return kLinearName; }
const char* ORT_API_CALL conv_name(const OrtCustomOp*) { return kConvName; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return nullptr; }  // CPU

ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t index) {
  switch (index) {
    case kValues: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float32 or int8
    case kBlockCols:
    case kRowNnz: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}
size_t ORT_API_CALL linear_inputs(const OrtCustomOp*) { return kNumInputs; }
size_t ORT_API_CALL conv_inputs(const OrtCustomOp*) { return kResidual + 1; }
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp*, size_t index) {
  return index >= kBias ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL variadic_min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL variadic_homogeneity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return INT_MAX; }
size_t ORT_API_CALL no_index_map(int** input_index, int** output_index) {
  *input_index = nullptr;
  *output_index = nullptr;
  return 0;
}
void ORT_API_CALL release_index_map(int*, int*) {}

OrtCustomOp make_op(bool conv) {
  OrtCustomOp op{};
  op.version = std::min<uint32_t>(ORT_API_VERSION, g_api_version);
  op.GetName = conv ? conv_name : linear_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = conv ? conv_inputs : linear_inputs;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = input_characteristic;
  op.GetOutputCharacteristic = output_characteristic;
  op.GetInputMemoryType = input_memory_type;
  op.GetVariadicInputMinArity = variadic_min_arity;
  op.GetVariadicInputHomogeneity = variadic_homogeneity;
  op.GetVariadicOutputMinArity = variadic_min_arity;
  op.GetVariadicOutputHomogeneity = variadic_homogeneity;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute_kernel;
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
#if ORT_API_VERSION >= 18
  op.GetMayInplace = no_index_map;
  op.ReleaseMayInplace = release_index_map;
#endif
#if ORT_API_VERSION >= 20
  op.GetAliasMap = no_index_map;
  op.ReleaseAliasMap = release_index_map;
#endif
  return op;
}

// ------------------------------------------------------------------------------------------------
// Attention

enum AttentionInput : size_t { kQ = 0, kK, kV, kMask, kAttentionInputs };

// onnxruntime's own Attention (opset 23), created by the kernel and invoked in its place where the CPU
// has no AVX-512: the node then runs as fast as the plain file would.
struct OrtAttention {
  OrtOp* op = nullptr;
  ~OrtAttention() {
    if (op != nullptr) g_ort->ReleaseOp(op);
  }
};

struct AttentionKernel {
  int64_t Hq = 0, Hkv = 0;
  float scale = 0.0f;  // 0: 1 / sqrt(D), known at the first call
  bool causal = false;
  bool bf16 = false;
  int64_t packed[3] = {0, 0, 0};  // packed_qkv: the widths of Q, K and V in one input, or zeros
  bool is_packed() const { return packed[0] != 0; }
  sparsec::Isa isa = sparsec::Isa::kScalar;
  std::unique_ptr<OrtAttention> native;  // set where the kernel delegates to onnxruntime
};

// Tensors the kernel makes for onnxruntime's own Attention: a packed node's Q, K and V, copied out of
// their columns (CPUs without AVX-512 only).
struct OwnedInputs {
  std::vector<float> data[3];
  OrtValue* values[3] = {nullptr, nullptr, nullptr};
  OrtMemoryInfo* memory = nullptr;
  ~OwnedInputs() {
    for (OrtValue* v : values) {
      if (v != nullptr) g_ort->ReleaseValue(v);
    }
    if (memory != nullptr) g_ort->ReleaseMemoryInfo(memory);
  }
};

// The element type the model declares for input `index` (UNDEFINED where it declares none).
OrtStatus* declared_input_type(const OrtKernelInfo* info, size_t index, ONNXTensorElementDataType& type) {
  type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  OrtTypeInfo* type_info = nullptr;
  SPARSEC_RETURN_IF_ERROR(g_ort->KernelInfo_GetInputTypeInfo(info, index, &type_info));
  const OrtTensorTypeAndShapeInfo* tensor = nullptr;
  OrtStatus* status = g_ort->CastTypeInfoToTensorInfo(type_info, &tensor);
  if (status == nullptr && tensor != nullptr) status = g_ort->GetTensorElementType(tensor, &type);
  g_ort->ReleaseTypeInfo(type_info);
  return status;
}

// onnxruntime's Attention with the node's attributes, for CPUs without AVX2.
OrtStatus* create_native_attention(const OrtKernelInfo* info, const AttentionKernel& k, size_t inputs,
                                   std::unique_ptr<OrtAttention>& out) {
  ONNXTensorElementDataType mask_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (inputs > kMask) SPARSEC_RETURN_IF_ERROR(declared_input_type(info, kMask, mask_type));
  if (mask_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) mask_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  const int64_t causal = k.causal ? 1 : 0;
  struct Attr {
    const char* name;
    const void* data;
    OrtOpAttrType type;
  };
  std::vector<Attr> wanted{{"q_num_heads", &k.Hq, ORT_OP_ATTR_INT},
                           {"kv_num_heads", &k.Hkv, ORT_OP_ATTR_INT},
                           {"is_causal", &causal, ORT_OP_ATTR_INT}};
  if (k.scale != 0.0f) wanted.push_back({"scale", &k.scale, ORT_OP_ATTR_FLOAT});
  std::vector<OrtOpAttr*> attrs;
  OrtStatus* status = nullptr;
  for (const Attr& a : wanted) {
    OrtOpAttr* attr = nullptr;
    status = g_ort->CreateOpAttr(a.name, a.data, 1, a.type, &attr);
    if (status != nullptr) break;
    attrs.push_back(attr);
  }
  if (status == nullptr) {
    const char* names[] = {"T1", "T2", "U"};
    const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                               mask_type};
    out = std::make_unique<OrtAttention>();
    status = g_ort->CreateOp(info, "Attention", "", 23, names, types, 3, attrs.data(), static_cast<int>(attrs.size()),
                             static_cast<int>(inputs), 1, &out->op);
  }
  for (OrtOpAttr* attr : attrs) g_ort->ReleaseOpAttr(attr);
  return status;
}

// A required int attribute.
OrtStatus* int_attribute(const OrtKernelInfo* info, const char* attr, int64_t& out) {
  OrtStatus* status = g_ort->KernelInfoGetAttribute_int64(info, attr, &out);
  if (status == nullptr) return nullptr;
  g_ort->ReleaseStatus(status);
  return fail(std::string("attribute ") + attr + " is required");
}

// An optional attribute: `out` keeps its value when absent.
template <typename T, typename Get>
OrtStatus* optional_attribute(const OrtKernelInfo* info, const char* attr, Get get, T& out) {
  T value{};
  OrtStatus* status = get(info, attr, &value);
  if (status != nullptr) {
    g_ort->ReleaseStatus(status);
    return nullptr;
  }
  out = value;
  return nullptr;
}

OrtStatus* ORT_API_CALL create_attention(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  const OpScope scope(kAttentionName);
  try {
    auto k = std::make_unique<AttentionKernel>();
    SPARSEC_RETURN_IF_ERROR(int_attribute(info, "q_num_heads", k->Hq));
    SPARSEC_RETURN_IF_ERROR(int_attribute(info, "kv_num_heads", k->Hkv));
    if (k->Hq < 1 || k->Hkv < 1 || k->Hq % k->Hkv != 0 || k->Hq > sparsec::kMaxDim) {
      return fail("q_num_heads (" + std::to_string(k->Hq) + ") must be a positive multiple of kv_num_heads (" +
                  std::to_string(k->Hkv) + ")");
    }
    SPARSEC_RETURN_IF_ERROR(optional_attribute(info, "scale", g_ort->KernelInfoGetAttribute_float, k->scale));
    if (!std::isfinite(k->scale)) return fail("attribute scale must be finite");
    int64_t causal = 0;
    SPARSEC_RETURN_IF_ERROR(optional_attribute(info, "is_causal", g_ort->KernelInfoGetAttribute_int64, causal));
    if (causal != 0 && causal != 1) return fail("attribute is_causal must be 0 or 1, got " + std::to_string(causal));
    k->causal = causal == 1;
    float softcap = 0.0f;
    SPARSEC_RETURN_IF_ERROR(optional_attribute(info, "softcap", g_ort->KernelInfoGetAttribute_float, softcap));
    if (softcap != 0.0f) return fail("attribute softcap is not supported (only 0)");
    SPARSEC_RETURN_IF_ERROR(ints_attribute(info, "packed_qkv", 3, k->packed));
    const bool given = k->packed[0] != 0 || k->packed[1] != 0 || k->packed[2] != 0;  // absent: all zero
    for (int64_t width : k->packed) {
      if (given && (width < 1 || width > sparsec::kMaxDim)) {
        return fail("attribute packed_qkv must hold three positive widths, got [" + std::to_string(k->packed[0]) +
                    ", " + std::to_string(k->packed[1]) + ", " + std::to_string(k->packed[2]) + "]");
      }
    }
    std::string compute_mode;
    SPARSEC_RETURN_IF_ERROR(string_attribute(info, "compute", "fp32", compute_mode));
    if (compute_mode != "fp32" && compute_mode != "bf16") {
      return fail("unknown compute \"" + compute_mode + "\" (allowed: fp32, bf16)");
    }
    k->bf16 = compute_mode == "bf16";
    k->isa = sparsec::select_isa_attention(k->bf16);
    if (k->isa == sparsec::Isa::kScalar) {
      size_t inputs = 0;
      SPARSEC_RETURN_IF_ERROR(g_ort->KernelInfo_GetInputCount(info, &inputs));
      SPARSEC_RETURN_IF_ERROR(create_native_attention(info, *k, std::min<size_t>(inputs, kAttentionInputs), k->native));
    }
    *kernel = k.release();
    return nullptr;
  } catch (const std::exception& e) {
    return g_ort->CreateStatus(ORT_FAIL, (std::string(t_op_name) + ": " + e.what()).c_str());
  }
}

// The mask's strides over [B, Hq, Sq, Skv] (right-aligned, a dimension of 1 broadcasts).
OrtStatus* mask_strides(const TensorView& mask, const sparsec::AttentionShape& s, sparsec::AttentionMask& m) {
  const std::vector<int64_t> full{s.B, s.Hq, s.Sq, s.Skv};
  if (mask.shape.empty() || mask.shape.size() > 4) {
    return fail("attn_mask must have 1 to 4 dimensions, got " + shape_str(mask.shape));
  }
  int64_t strides[4] = {0, 0, 0, 0};
  int64_t stride = 1;
  for (size_t back = 0; back < mask.shape.size(); ++back) {
    const size_t axis = 3 - back;
    const int64_t dim = mask.shape[mask.shape.size() - 1 - back];
    if (dim != 1 && dim != full[axis]) {
      return fail("attn_mask " + shape_str(mask.shape) + " does not broadcast to [batch, heads, q_seq, kv_seq] = " +
                  shape_str(full));
    }
    strides[axis] = dim == 1 ? 0 : stride;
    stride *= dim;
  }
  m.sb = strides[0], m.sh = strides[1], m.si = strides[2], m.sj = strides[3];
  if (mask.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    m.add = static_cast<const float*>(mask.data);
  } else if (mask.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) {
    m.keep = static_cast<const uint8_t*>(mask.data);
  } else {
    return fail("attn_mask must be bool or float");
  }
  return nullptr;
}

OrtStatus* compute_attention(const AttentionKernel& k, OrtKernelContext* context) {
  size_t count = 0;
  SPARSEC_RETURN_IF_ERROR(g_ort->KernelContext_GetInputCount(context, &count));
  const OrtValue* inputs[kAttentionInputs] = {};
  for (size_t i = 0; i < std::min<size_t>(count, kAttentionInputs); ++i) {
    SPARSEC_RETURN_IF_ERROR(g_ort->KernelContext_GetInput(context, i, &inputs[i]));
  }
  TensorView q, key, value;
  const char* names[3] = {"Q", "K", "V"};
  TensorView* views[3] = {&q, &key, &value};
  for (size_t i = 0; i < 3; ++i) {
    if (inputs[i] == nullptr) return fail(std::string(names[i]) + " is required");
    SPARSEC_RETURN_IF_ERROR(view_tensor(inputs[i], *views[i]));
    if (views[i]->type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || views[i]->shape.size() != 3) {
      return fail(std::string(names[i]) + " must be float [batch, seq, heads * head], got " +
                  shape_str(views[i]->shape));
    }
  }
  sparsec::AttentionShape s;
  s.B = q.shape[0], s.Sq = q.shape[1], s.Skv = key.shape[1], s.Hq = k.Hq, s.Hkv = k.Hkv;
  // the widths of Q, K and V: the inputs' own, or their columns named by packed_qkv
  const int64_t nq = k.is_packed() ? k.packed[0] : q.shape[2];
  const int64_t nk = k.is_packed() ? k.packed[1] : key.shape[2];
  const int64_t nv = k.is_packed() ? k.packed[2] : value.shape[2];
  if (k.is_packed()) {
    const int64_t total = k.packed[0] + k.packed[1] + k.packed[2];
    if (q.shape[2] != total || key.shape[2] != total || value.shape[2] != total) {
      return fail("packed_qkv [" + std::to_string(nq) + ", " + std::to_string(nk) + ", " + std::to_string(nv) +
                  "] needs Q, K and V of width " + std::to_string(total) + ", got Q " + shape_str(q.shape) + ", K " +
                  shape_str(key.shape) + ", V " + shape_str(value.shape));
    }
    s.ldq = s.ldk = s.ldv = total;
  }
  if (key.shape[0] != s.B || value.shape[0] != s.B || value.shape[1] != s.Skv || nq % k.Hq != 0 ||
      nk % k.Hkv != 0 || nv % k.Hkv != 0 || nq / k.Hq != nk / k.Hkv) {
    return fail("Q " + shape_str(q.shape) + ", K " + shape_str(key.shape) + " and V " + shape_str(value.shape) +
                (k.is_packed() ? " (packed_qkv)" : "") + " do not fit " + std::to_string(k.Hq) + " query and " +
                std::to_string(k.Hkv) + " key/value heads");
  }
  s.D = nq / k.Hq;
  s.Dv = nv / k.Hkv;
  s.scale = k.scale != 0.0f ? k.scale : 1.0f / std::sqrt(static_cast<float>(s.D));
  s.causal = k.causal;
  s.bf16 = k.bf16;
  const std::string error = sparsec::check_attention(s);
  if (!error.empty()) return fail(error + " (Q " + shape_str(q.shape) + ", K " + shape_str(key.shape) + ")");
  sparsec::AttentionMask mask;
  if (inputs[kMask] != nullptr) {
    TensorView m;
    SPARSEC_RETURN_IF_ERROR(view_tensor(inputs[kMask], m));
    SPARSEC_RETURN_IF_ERROR(mask_strides(m, s, mask));
  }
  const std::vector<int64_t> y_shape{s.B, s.Sq, s.Hq * s.Dv};
  OrtValue* y_value = nullptr;
  SPARSEC_RETURN_IF_ERROR(g_ort->KernelContext_GetOutput(context, 0, y_shape.data(), y_shape.size(), &y_value));
  if (s.B * s.Sq * s.Hq * s.Dv == 0) return nullptr;
  const float* q_data = static_cast<const float*>(q.data);
  const float* k_data = static_cast<const float*>(key.data) + (k.is_packed() ? nq : 0);
  const float* v_data = static_cast<const float*>(value.data) + (k.is_packed() ? nq + nk : 0);
  if (k.native != nullptr) {
    const size_t n = inputs[kMask] != nullptr ? kAttentionInputs : kMask;
    OwnedInputs owned;
    if (k.is_packed()) {  // onnxruntime's Attention reads dense Q, K, V: copy each one's columns out
      SPARSEC_RETURN_IF_ERROR(g_ort->CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, &owned.memory));
      const float* starts[3] = {q_data, k_data, v_data};
      const int64_t widths[3] = {nq, nk, nv};
      const int64_t rows[3] = {s.B * s.Sq, s.B * s.Skv, s.B * s.Skv};
      for (int i = 0; i < 3; ++i) {
        std::vector<float>& dense = owned.data[i];
        dense.resize(static_cast<size_t>(rows[i] * widths[i]));
        for (int64_t r = 0; r < rows[i]; ++r) {
          std::copy(starts[i] + r * s.ldq, starts[i] + r * s.ldq + widths[i], dense.data() + r * widths[i]);
        }
        const int64_t shape[3] = {s.B, i == 0 ? s.Sq : s.Skv, widths[i]};
        SPARSEC_RETURN_IF_ERROR(g_ort->CreateTensorWithDataAsOrtValue(
            owned.memory, dense.data(), dense.size() * sizeof(float), shape, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
            &owned.values[i]));
        inputs[i] = owned.values[i];
      }
    }
    return g_ort->InvokeOp(context, k.native->op, inputs, static_cast<int>(n), &y_value, 1);
  }
  void* y = nullptr;
  SPARSEC_RETURN_IF_ERROR(g_ort->GetTensorMutableData(y_value, &y));
  if (!sparsec::attention(s, q_data, k_data, v_data, mask, static_cast<float*>(y), k.isa, ort_parallel_for, context)) {
    return fail(std::string("no ") + sparsec::isa_name(k.isa) + " path (onnxruntime's Attention was not created)");
  }
  return nullptr;
}

OrtStatus* ORT_API_CALL compute_attention_kernel(void* kernel, OrtKernelContext* context) {
  const OpScope scope(kAttentionName);
  try {
    return compute_attention(*static_cast<const AttentionKernel*>(kernel), context);
  } catch (const std::exception& e) {
    return g_ort->CreateStatus(ORT_FAIL, (std::string(t_op_name) + ": " + e.what()).c_str());
  }
}

void ORT_API_CALL destroy_attention(void* kernel) { delete static_cast<AttentionKernel*>(kernel); }
const char* ORT_API_CALL attention_name(const OrtCustomOp*) { return kAttentionName; }
ONNXTensorElementDataType ORT_API_CALL attention_input_type(const OrtCustomOp*, size_t index) {
  return index == kMask ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL attention_inputs(const OrtCustomOp*) { return kAttentionInputs; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL attention_input_characteristic(const OrtCustomOp*, size_t index) {
  return index == kMask ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

OrtCustomOp make_attention_op() {
  OrtCustomOp op = make_op(false);
  op.GetName = attention_name;
  op.GetInputType = attention_input_type;
  op.GetInputTypeCount = attention_inputs;
  op.GetInputCharacteristic = attention_input_characteristic;
  op.KernelDestroy = destroy_attention;
  op.CreateKernelV2 = create_attention;
  op.KernelComputeV2 = compute_attention_kernel;
  return op;
}

}  // namespace

// The library is built with -fvisibility=hidden; these are its only exported symbols.
#define SPARSEC_EXPORT __attribute__((visibility("default")))

extern "C" {

SPARSEC_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  static const bool found_api = [api_base] {  // once per process, thread-safe static init
    for (uint32_t v = ORT_API_VERSION; v >= kMinApi && g_ort == nullptr; --v) {
      g_ort = api_base->GetApi(v);
      if (g_ort != nullptr) g_api_version = v;
    }
    return g_ort != nullptr;
  }();
  if (!found_api) {
    const OrtApi* oldest = api_base->GetApi(1);
    if (oldest == nullptr) return nullptr;
    return oldest->CreateStatus(ORT_FAIL, "sparsec kernel needs onnxruntime API version >= 16 (onnxruntime 1.16)");
  }
  static OrtCustomOp linear = make_op(false);
  static OrtCustomOp conv = make_op(true);
  static OrtCustomOp attention = make_attention_op();
  // The domain must outlive every session built from these options; it is deliberately never freed.
  OrtCustomOpDomain* domain = nullptr;
  SPARSEC_RETURN_IF_ERROR(g_ort->CreateCustomOpDomain(kDomain, &domain));
  SPARSEC_RETURN_IF_ERROR(g_ort->CustomOpDomain_Add(domain, &linear));
  SPARSEC_RETURN_IF_ERROR(g_ort->CustomOpDomain_Add(domain, &conv));
  SPARSEC_RETURN_IF_ERROR(g_ort->CustomOpDomain_Add(domain, &attention));
  return g_ort->AddCustomOpDomain(options, domain);
}

// For diagnostics (ctypes): the instruction set the kernel would use now, and the API it was built for.
SPARSEC_EXPORT const char* SparsecKernelIsa() { return sparsec::isa_name(sparsec::select_isa()); }
SPARSEC_EXPORT const char* SparsecKernelIsaInt8() { return sparsec::isa_name(sparsec::select_isa_int8()); }
SPARSEC_EXPORT const char* SparsecKernelIsaAttentionBf16() { return sparsec::attention_bf16_path(); }

// For tests (ctypes), without onnxruntime: one INT8-compute layer on instruction set `isa` (0 scalar,
// 1 avx2, 2 avx512 VNNI, 3 AMX), single-threaded. Writes the exact int32 sums (block_sparse.h: acc) to
// `raw` [M, N] and Y = sx * sw * acc + bias to `y` [M, N]. Returns 0, or 1 with a message in `error`
// (2 when this CPU lacks `isa`).
SPARSEC_EXPORT int SparsecInt8Linear(const int8_t* values, const float* scales, const int64_t* block_cols,
                                     const int64_t* row_nnz, const int64_t* dims, const float* x, const float* bias,
                                     int64_t M, int isa, int32_t* raw, float* y, char* error, size_t error_size) {
  try {
    // dims: R, S, BR, BC, N, K
    const auto isa_value = static_cast<sparsec::Isa>(isa);
    if (isa < 0 || isa > 3 || !sparsec::isa_int8_supported(isa_value)) return 2;
    sparsec::BlockInputs in;
    in.values = values;
    in.int8 = true;
    in.row_scales = scales;
    in.block_cols = block_cols;
    in.row_nnz = row_nnz;
    in.R = dims[0];
    in.S = dims[1];
    in.BR = dims[2];
    in.BC = dims[3];
    sparsec::PackedInt8 w;
    std::string message = sparsec::pack_weight_int8(in, dims[4], dims[5], w);
    if (message.empty()) {
      if (sparsec::columns_pay_int8(w, isa_value)) sparsec::pack_columns_int8(w);  // as a node packs it
      sparsec::Epilogue ep;
      ep.bias = bias;
      sparsec::block_sparse_linear_int8(w, x, ep, y, M, isa_value, nullptr, nullptr, raw);
      sparsec::block_sparse_linear_int8(w, x, ep, y, M, isa_value, nullptr, nullptr, nullptr);
      return 0;
    }
    std::snprintf(error, error_size, "%s", message.c_str());
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
  }
  return 1;
}
SPARSEC_EXPORT int SparsecKernelHeaderApiVersion() { return ORT_API_VERSION; }

}  // extern "C"
