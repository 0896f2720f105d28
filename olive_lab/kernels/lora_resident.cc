// olive_lab.LoraResident: the resident multi-LoRA branch of one projection as a single ONNX Runtime custom op.
//
//   inputs:  y [..., N] (the base projection's output), x [..., K] (its input), A [K, R], B [R, N], mask [R]
//            (one type for all: float16 on CUDA, float32 or float16 on CPU; A and B are every adapter's matrices
//            side by side, the mask picks one: see olive_lab/onnx/lora.make_resident)
//   outputs: out [..., N] = y + ((x @ A) * mask) @ B      (the inputs' type)
//            partial [M, P, R] (float32): scratch for the CUDA kernels' split of K (P = K / 64 blocks), read by
//            nothing else; ORT frees it after the node, so one slot's worth is live at a time. Empty on CPU.
//
// Why: on CUDA, ORT runs the four ONNX nodes of that branch as five kernels per slot (a cuBLAS split-K product and
// its reduce, the mask, the second product, the add), and at the sizes this project targets the launches, not the
// arithmetic, set the decode speed (README, "Adapters on the GPU"). The CUDA kernels (lora_resident_cuda.cu) do it
// in two launches and skip the adapter products when the mask is all zero. The CPU kernel serves CPU models (one op
// per slot instead of four) and is the reference the tests run in real ORT sessions on any host.
//
// ONNX Runtime's C API is a table of function pointers (OrtApi) that only ever grows, so a position in it is stable
// across releases. This file declares just the entries it calls, by position, rather than vendoring ORT's header
// (no package index this project can install from ships it). Positions are those of ORT's OrtApi as of API
// version 16 (ORT 1.16); RegisterCustomOps asks ORT for that version, so any ORT >= 1.16 serves it.
// tests/test_kernels.py runs every entry on the installed ORT but the CUDA stream's, which `python -m
// bench.cuda_lora kernel-check` runs on a GPU.
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "lora_resident.h"

namespace ort {

struct Status;
struct Value;
struct KernelContext;
struct KernelInfo;
struct SessionOptions;
struct CustomOpDomain;
struct TypeAndShape;
struct ShapeInferContext;

constexpr uint32_t kApiVersion = 16;
enum ErrorCode { kOk = 0, kFail = 1, kInvalidArgument = 2 };
enum ElementType { kFloat = 1, kFloat16 = 10 };
enum Characteristic { kRequired = 0 };
enum MemType { kDefaultMemory = 0 };

// Positions in OrtApi of the entries used here.
enum Entry : size_t {
  CreateStatus = 0,
  CreateCustomOpDomain = 26,
  CustomOpDomain_Add = 27,
  AddCustomOpDomain = 28,
  GetTensorMutableData = 51,
  GetTensorElementType = 60,
  GetDimensionsCount = 61,
  GetDimensions = 62,
  GetTensorTypeAndShape = 65,
  KernelContext_GetInput = 90,
  KernelContext_GetOutput = 91,
  ReleaseTensorTypeAndShapeInfo = 99,
  KernelContext_GetGPUComputeStream = 193,
};

using Api = void* const;  // OrtApi, seen as its table of entries

struct ApiBase {  // OrtApiBase
  const Api* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// OrtCustomOp, through the members read at kOpVersion (16: the V2 kernel entries, which return a status).
constexpr uint32_t kOpVersion = 16;
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const Api*, const KernelInfo*);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  ElementType (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  ElementType (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void*, KernelContext*);
  void (*KernelDestroy)(void*);
  Characteristic (*GetInputCharacteristic)(const CustomOp*, size_t);
  Characteristic (*GetOutputCharacteristic)(const CustomOp*, size_t);
  MemType (*GetInputMemoryType)(const CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
  Status* (*CreateKernelV2)(const CustomOp*, const Api*, const KernelInfo*, void**);
  Status* (*KernelComputeV2)(void*, KernelContext*);
};

template <typename Fn>
Fn entry(const Api* api, Entry at) {
  return reinterpret_cast<Fn>(api[at]);
}

Status* error(const Api* api, const std::string& message) {
  return entry<Status* (*)(ErrorCode, const char*)>(api, CreateStatus)(kInvalidArgument, message.c_str());
}

struct Tensor {
  const Value* value = nullptr;
  ElementType type = kFloat;
  std::vector<int64_t> dims;
};

// Type and shape of a value; a status on failure.
Status* describe(const Api* api, const Value* value, Tensor* out) {
  TypeAndShape* info = nullptr;
  if (Status* s = entry<Status* (*)(const Value*, TypeAndShape**)>(api, GetTensorTypeAndShape)(value, &info)) return s;
  size_t rank = 0;
  Status* s = entry<Status* (*)(const TypeAndShape*, ElementType*)>(api, GetTensorElementType)(info, &out->type);
  if (!s) s = entry<Status* (*)(const TypeAndShape*, size_t*)>(api, GetDimensionsCount)(info, &rank);
  if (!s) {
    out->dims.resize(rank);
    s = entry<Status* (*)(const TypeAndShape*, int64_t*, size_t)>(api, GetDimensions)(info, out->dims.data(), rank);
  }
  entry<void (*)(TypeAndShape*)>(api, ReleaseTensorTypeAndShapeInfo)(info);
  out->value = value;
  return s;
}

void* data_of(const Api* api, const Value* value, Status** status) {
  void* data = nullptr;
  *status = entry<Status* (*)(Value*, void**)>(api, GetTensorMutableData)(const_cast<Value*>(value), &data);
  return data;
}

}  // namespace ort

namespace {

// IEEE half <-> float for the CPU reference kernel (no F16C or _Float16 needed).
float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0) return (sign ? -1.f : 1.f) * std::ldexp(static_cast<float>(mantissa), -24);
  uint32_t bits = exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)
                                 : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  const uint16_t sign = (bits >> 16) & 0x8000u;
  const float magnitude = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00u;
  if (magnitude >= 65520.f) return sign | 0x7c00u;                 // rounds to infinity
  if (magnitude < 6.103515625e-05f) {                               // subnormal half
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.f));
  }
  const uint32_t exponent = ((bits >> 23) & 0xff) - 112, mantissa = bits & 0x7fffffu;
  uint32_t half = (exponent << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;                          // round to nearest, ties to even
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return sign | static_cast<uint16_t>(half);
}

float to_float(float v) { return v; }
float to_float(uint16_t v) { return half_to_float(v); }
void store(float v, float* out) { *out = v; }
void store(float v, uint16_t* out) { *out = float_to_half(v); }

// The CPU kernel: float32 (CPU models) or float16 (the CUDA kernels' reference). Only the mask's active span of A's
// columns is read, rows of A and B are read contiguously (the inner loops vectorize), and with no adapter y is
// copied. One thread: ORT gives custom ops no thread pool, and at decode one row is a few thousand multiply-adds.
template <typename T>
void lora_resident_cpu(const LoraResidentShape& s, const T* y, const T* x, const T* A, const T* B, const T* mask,
                       T* out) {
  int first = s.R, last = -1;
  for (int j = 0; j < s.R; ++j)
    if (to_float(mask[j]) != 0.f) first = first < j ? first : j, last = j;
  if (last < 0) {
    memcpy(out, y, sizeof(T) * size_t(s.M) * s.N);
    return;
  }
  const int width = last + 1 - first;
  std::vector<float> t(width), row(s.N);
  for (int m = 0; m < s.M; ++m) {
    std::fill(t.begin(), t.end(), 0.f);
    const T* xm = x + int64_t(m) * s.K;
    for (int k = 0; k < s.K; ++k) {
      const float xk = to_float(xm[k]);
      const T* a = A + int64_t(k) * s.R + first;
      for (int j = 0; j < width; ++j) t[j] += xk * to_float(a[j]);
    }
    const T* ym = y + int64_t(m) * s.N;
    for (int n = 0; n < s.N; ++n) row[n] = to_float(ym[n]);
    for (int j = 0; j < width; ++j) {
      const float tj = t[j] * to_float(mask[first + j]);
      const T* b = B + int64_t(first + j) * s.N;
      for (int n = 0; n < s.N; ++n) row[n] += tj * to_float(b[n]);
    }
    T* om = out + int64_t(m) * s.N;
    for (int n = 0; n < s.N; ++n) store(row[n], om + n);
  }
}

struct Kernel {
  const ort::Api* api;
  bool cuda;
};

constexpr const char* kInputs[] = {"y", "x", "A", "B", "mask"};

ort::Status* compute(void* opaque, ort::KernelContext* context) {
  const auto* kernel = static_cast<Kernel*>(opaque);
  const ort::Api* api = kernel->api;
  using ort::entry;
  ort::Tensor in[5];
  for (size_t i = 0; i < 5; ++i) {
    const ort::Value* value = nullptr;
    if (ort::Status* s = entry<ort::Status* (*)(const ort::KernelContext*, size_t, const ort::Value**)>(
            api, ort::KernelContext_GetInput)(context, i, &value))
      return s;
    if (ort::Status* s = ort::describe(api, value, &in[i])) return s;
    if (in[i].type != in[0].type)
      return ort::error(api, std::string("LoraResident: input ") + kInputs[i] + " differs in type from y");
  }
  const auto &y = in[0].dims, &x = in[1].dims, &A = in[2].dims, &B = in[3].dims, &mask = in[4].dims;
  if (y.empty() || x.size() != y.size() || A.size() != 2 || B.size() != 2 || mask.size() != 1)
    return ort::error(api, "LoraResident: expected y [..., N], x [..., K], A [K, R], B [R, N], mask [R]");
  int64_t M = 1;
  for (size_t d = 0; d + 1 < y.size(); ++d) {
    if (x[d] != y[d]) return ort::error(api, "LoraResident: x and y differ in their leading dimensions");
    M *= y[d];
  }
  const LoraResidentShape shape{static_cast<int>(M), static_cast<int>(x.back()), static_cast<int>(y.back()),
                                static_cast<int>(A[1])};
  if (A[0] != shape.K || B[0] != shape.R || B[1] != shape.N || mask[0] != shape.R)
    return ort::error(api, "LoraResident: A [" + std::to_string(A[0]) + ", " + std::to_string(A[1]) + "], B [" +
                               std::to_string(B[0]) + ", " + std::to_string(B[1]) + "], mask [" +
                               std::to_string(mask[0]) + "] do not fit x [..., " + std::to_string(shape.K) +
                               "] and y [..., " + std::to_string(shape.N) + "]");
  // the CPU kernel needs no scratch: an empty one costs nothing
  const int64_t partial_dims[] = {kernel->cuda ? M : 0, lora_partial_blocks(shape.K), shape.R};
  ort::Value* outputs[2] = {nullptr, nullptr};
  auto get_output = entry<ort::Status* (*)(ort::KernelContext*, size_t, const int64_t*, size_t, ort::Value**)>(
      api, ort::KernelContext_GetOutput);
  if (ort::Status* s = get_output(context, 0, y.data(), y.size(), &outputs[0])) return s;
  if (ort::Status* s = get_output(context, 1, partial_dims, 3, &outputs[1])) return s;
  ort::Status* status = nullptr;
  const void* data[5];
  for (size_t i = 0; i < 5; ++i) {
    data[i] = ort::data_of(api, in[i].value, &status);
    if (status) return status;
  }
  void* out = ort::data_of(api, outputs[0], &status);
  if (status) return status;
  void* partial = ort::data_of(api, outputs[1], &status);
  (void)partial;  // the CUDA kernels' only
  if (status) return status;
  if (M == 0) return nullptr;
  if (!kernel->cuda && in[0].type == ort::kFloat) {
    auto f = [&](int i) { return static_cast<const float*>(data[i]); };
    lora_resident_cpu(shape, f(0), f(1), f(2), f(3), f(4), static_cast<float*>(out));
    return nullptr;
  }
  if (!kernel->cuda) {
    auto h = [&](int i) { return static_cast<const uint16_t*>(data[i]); };
    lora_resident_cpu(shape, h(0), h(1), h(2), h(3), h(4), static_cast<uint16_t*>(out));
    return nullptr;
  }
#ifdef OLIVE_LAB_CUDA
  void* stream = nullptr;
  if (ort::Status* s = entry<ort::Status* (*)(const ort::KernelContext*, void**)>(
          api, ort::KernelContext_GetGPUComputeStream)(context, &stream))
    return s;
  if (lora_resident_cuda(stream, shape, data[0], data[1], data[2], data[3], data[4], partial, out) != 0)
    return ort::error(api, "LoraResident: CUDA kernel launch failed");
  return nullptr;
#else
  return ort::error(api, "LoraResident: this build of the library has no CUDA kernels");
#endif
}

template <bool kCuda>
ort::Status* create_kernel(const ort::CustomOp*, const ort::Api* api, const ort::KernelInfo*, void** kernel) {
#ifdef OLIVE_LAB_CUDA
  if (kCuda && lora_resident_cuda_warm_up() != 0) return ort::error(api, "LoraResident: cannot load the CUDA kernels");
#endif
  *kernel = new Kernel{api, kCuda};
  return nullptr;
}

template <bool kCuda, ort::ElementType kType>
ort::CustomOp make_op() {
  ort::CustomOp op{};
  op.version = ort::kOpVersion;
  op.GetName = [](const ort::CustomOp*) { return "LoraResident"; };
  op.GetExecutionProviderType = [](const ort::CustomOp*) -> const char* {
    return kCuda ? "CUDAExecutionProvider" : nullptr;  // null: the CPU provider
  };
  op.GetInputType = [](const ort::CustomOp*, size_t) { return kType; };
  op.GetInputTypeCount = [](const ort::CustomOp*) -> size_t { return 5; };
  op.GetOutputType = [](const ort::CustomOp*, size_t i) { return i == 0 ? kType : ort::kFloat; };
  op.GetOutputTypeCount = [](const ort::CustomOp*) -> size_t { return 2; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const ort::CustomOp*, size_t) { return ort::kRequired; };
  op.GetOutputCharacteristic = [](const ort::CustomOp*, size_t) { return ort::kRequired; };
  op.GetInputMemoryType = [](const ort::CustomOp*, size_t) { return ort::kDefaultMemory; };
  op.GetVariadicInputMinArity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const ort::CustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel<kCuda>;
  op.KernelComputeV2 = compute;
  return op;
}

// ORT keeps pointers to these for as long as a session uses them: static storage. One op per (provider, type):
// ORT merges ops of one name into one schema whose type constraint is the union.
const ort::CustomOp kCpuOp = make_op<false, ort::kFloat>();
const ort::CustomOp kCpuOp16 = make_op<false, ort::kFloat16>();
#ifdef OLIVE_LAB_CUDA
const ort::CustomOp kCudaOp = make_op<true, ort::kFloat16>();
#endif

}  // namespace

// The entry point ORT looks up in a custom-op library (SessionOptions.register_custom_ops_library, or ORT GenAI's
// session_options.custom_ops_library).
extern "C" __attribute__((visibility("default"))) ort::Status* RegisterCustomOps(ort::SessionOptions* options,
                                                                                 const ort::ApiBase* base) {
  const ort::Api* api = base->GetApi(ort::kApiVersion);
  if (!api) return nullptr;  // ORT older than 1.16 cannot even make a status for this: it reports the missing op
  using ort::entry;
  ort::CustomOpDomain* domain = nullptr;
  if (ort::Status* s = entry<ort::Status* (*)(const char*, ort::CustomOpDomain**)>(api, ort::CreateCustomOpDomain)(
          "olive_lab", &domain))
    return s;
  auto add = entry<ort::Status* (*)(ort::CustomOpDomain*, const ort::CustomOp*)>(api, ort::CustomOpDomain_Add);
  if (ort::Status* s = add(domain, &kCpuOp)) return s;
  if (ort::Status* s = add(domain, &kCpuOp16)) return s;
#ifdef OLIVE_LAB_CUDA
  if (ort::Status* s = add(domain, &kCudaOp)) return s;
#endif
  // The domain must outlive every session built from `options`: it is never released (one per registration).
  return entry<ort::Status* (*)(ort::SessionOptions*, ort::CustomOpDomain*)>(api, ort::AddCustomOpDomain)(options,
                                                                                                          domain);
}
