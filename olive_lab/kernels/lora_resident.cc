// olive_lab.LoraResident: the resident multi-LoRA branch of one projection as a single ONNX Runtime custom op.
//
//   inputs:  y [..., N] (the base projection's output), x [..., K] (its input), A [K, R], B [R, N], mask [R]
//            (one type for all: float16 on CUDA, float32 or float16 on CPU; A and B are every adapter's matrices
//            side by side, the mask picks one: see olive_lab/onnx/lora.make_resident)
//   outputs: out [..., N] = y + ((x @ A) * mask) @ B      (the inputs' type)
//            olive_lab.LoraResidentSwiGlu, the same op for a packed gate/up projection, instead gives
//            out [..., N / 2] = silu(z[..., :N / 2]) * z[..., N / 2:] of that z: the activation ORT would run as a
//            Split, a Sigmoid and two Muls after it (olive_lab.onnx.lora.fuse_swiglu), folded into the same launch
//            partial [M, P, R] (float32): scratch for the CUDA kernels' split of K (P = K / 64 blocks), read by
//            nothing else; ORT frees it after the node, so one slot's worth is live at a time. Empty on CPU.
//
// Why: on CUDA, ORT runs the four ONNX nodes of that branch as five kernels per slot (a cuBLAS split-K product and
// its reduce, the mask, the second product, the add), and at the sizes this project targets the launches, not the
// arithmetic, set the decode speed (README, "Adapters on the GPU"). The CUDA kernels (lora_resident_cuda.cu) do it
// in one launch per decoding step (two for prefill) and skip the adapter products when the mask is all zero. The
// CPU kernel is the reference the tests run in real ORT sessions on any host (CPU models use olive_lab.LoraBranch,
// lora_branch.cc).
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "half.h"
#include "lora_resident.h"
#include "ort_abi.h"

namespace {

using olive_lab::store;
using olive_lab::to_float;

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// The CPU kernel: float32 (CPU models) or float16 (the CUDA kernels' reference). Only the mask's active span of A's
// columns is read, rows of A and B are read contiguously (the inner loops vectorize), and with no adapter y is
// copied. One thread: ORT gives custom ops no thread pool, and at decode one row is a few thousand multiply-adds.
// SwiGlu: z stays float32 until the activation's product is stored, as in the CUDA kernel.
template <typename T>
void lora_resident_cpu(const LoraResidentShape& s, const T* y, const T* x, const T* A, const T* B, const T* mask,
                       T* out) {
  int first = s.R, last = -1;
  for (int j = 0; j < s.R; ++j)
    if (to_float(mask[j]) != 0.f) first = first < j ? first : j, last = j;
  if (last < 0 && !s.swiglu) {
    memcpy(out, y, sizeof(T) * size_t(s.M) * s.N);
    return;
  }
  const int width = last + 1 - first;  // 0 with no adapter
  const int H = s.N / 2;
  std::vector<float> t(std::max(width, 0)), row(s.N);
  for (int m = 0; m < s.M; ++m) {
    std::fill(t.begin(), t.end(), 0.f);
    const T* xm = x + int64_t(m) * s.K;
    for (int k = 0; k < s.K && width > 0; ++k) {
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
    if (s.swiglu) {
      T* om = out + int64_t(m) * H;
      for (int n = 0; n < H; ++n) store(silu(row[n]) * row[H + n], om + n);
    } else {
      T* om = out + int64_t(m) * s.N;
      for (int n = 0; n < s.N; ++n) store(row[n], om + n);
    }
  }
}

struct Kernel {
  const ort::Api* api;
  bool cuda;
  bool swiglu;
  void* barrier;  // CUDA: this node's grid-barrier counter for single-launch decoding steps; null: two launches
};

constexpr const char* kInputs[] = {"y", "x", "A", "B", "mask"};

ort::Status* compute(void* opaque, ort::KernelContext* context) {
  const auto* kernel = static_cast<Kernel*>(opaque);
  const ort::Api* api = kernel->api;
  const std::string op = kernel->swiglu ? "LoraResidentSwiGlu" : "LoraResident";
  using ort::entry;
  ort::Tensor in[5];
  for (size_t i = 0; i < 5; ++i) {
    const ort::Value* value = nullptr;
    if (ort::Status* s = entry<ort::Status* (*)(const ort::KernelContext*, size_t, const ort::Value**)>(
            api, ort::KernelContext_GetInput)(context, i, &value))
      return s;
    if (ort::Status* s = ort::describe(api, value, &in[i])) return s;
    if (in[i].type != in[0].type)
      return ort::error(api, op + ": input " + kInputs[i] + " differs in type from y");
  }
  const auto &y = in[0].dims, &x = in[1].dims, &A = in[2].dims, &B = in[3].dims, &mask = in[4].dims;
  if (y.empty() || x.size() != y.size() || A.size() != 2 || B.size() != 2 || mask.size() != 1)
    return ort::error(api, op + ": expected y [..., N], x [..., K], A [K, R], B [R, N], mask [R]");
  int64_t M = 1;
  for (size_t d = 0; d + 1 < y.size(); ++d) {
    if (x[d] != y[d]) return ort::error(api, op + ": x and y differ in their leading dimensions");
    M *= y[d];
  }
  const LoraResidentShape shape{static_cast<int>(M), static_cast<int>(x.back()), static_cast<int>(y.back()),
                                static_cast<int>(A[1]), kernel->swiglu};
  if (A[0] != shape.K || B[0] != shape.R || B[1] != shape.N || mask[0] != shape.R)
    return ort::error(api, op + ": A [" + std::to_string(A[0]) + ", " + std::to_string(A[1]) + "], B [" +
                               std::to_string(B[0]) + ", " + std::to_string(B[1]) + "], mask [" +
                               std::to_string(mask[0]) + "] do not fit x [..., " + std::to_string(shape.K) +
                               "] and y [..., " + std::to_string(shape.N) + "]");
  if (shape.swiglu && shape.N % 2 != 0)
    return ort::error(api, op + ": y [..., " + std::to_string(shape.N) +
                               "] has an odd last dimension: expected the gate and up halves of a packed projection");
  std::vector<int64_t> out_dims(y);
  if (shape.swiglu) out_dims.back() /= 2;
  // the CPU kernel needs no scratch: an empty one costs nothing
  const int64_t partial_dims[] = {kernel->cuda ? M : 0, lora_partial_blocks(shape.K), shape.R};
  ort::Value* outputs[2] = {nullptr, nullptr};
  auto get_output = entry<ort::Status* (*)(ort::KernelContext*, size_t, const int64_t*, size_t, ort::Value**)>(
      api, ort::KernelContext_GetOutput);
  if (ort::Status* s = get_output(context, 0, out_dims.data(), out_dims.size(), &outputs[0])) return s;
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
  if (lora_resident_cuda(stream, shape, data[0], data[1], data[2], data[3], data[4], partial, out, kernel->barrier) !=
      0)
    return ort::error(api, op + ": CUDA kernel launch failed");
  return nullptr;
#else
  return ort::error(api, op + ": this build of the library has no CUDA kernels");
#endif
}

template <bool kCuda, bool kSwiGlu>
ort::Status* create_kernel(const ort::CustomOp*, const ort::Api* api, const ort::KernelInfo*, void** kernel) {
  void* barrier = nullptr;
#ifdef OLIVE_LAB_CUDA
  if (kCuda && lora_resident_cuda_warm_up() != 0) return ort::error(api, "LoraResident: cannot load the CUDA kernels");
  // OLIVE_LAB_LORA_TWO_LAUNCHES=1 (A/B runs): this kernel gets no barrier, so its decoding steps take two launches.
  // Read here, per op kernel, so that a session keeps the setting it was created with.
  const char* two_launches = getenv("OLIVE_LAB_LORA_TWO_LAUNCHES");
  const bool one_launch = two_launches == nullptr || strcmp(two_launches, "1") != 0;
  if (kCuda && one_launch && (barrier = lora_resident_cuda_barrier()) == nullptr)
    return ort::error(api, "LoraResident: cannot allocate its 8-byte barrier counter on the GPU");
#endif
  *kernel = new Kernel{api, kCuda, kSwiGlu, barrier};
  return nullptr;
}

template <bool kCuda, ort::ElementType kType, bool kSwiGlu = false>
ort::CustomOp make_op() {
  ort::CustomOp op{};
  op.version = ort::kOpVersion;
  op.GetName = [](const ort::CustomOp*) { return kSwiGlu ? "LoraResidentSwiGlu" : "LoraResident"; };
  op.GetExecutionProviderType = [](const ort::CustomOp*) -> const char* {
    return kCuda ? "CUDAExecutionProvider" : nullptr;  // null: the CPU provider
  };
  op.GetInputType = [](const ort::CustomOp*, size_t) { return kType; };
  op.GetInputTypeCount = [](const ort::CustomOp*) -> size_t { return 5; };
  op.GetOutputType = [](const ort::CustomOp*, size_t i) { return i == 0 ? kType : ort::kFloat; };
  op.GetOutputTypeCount = [](const ort::CustomOp*) -> size_t { return 2; };
  op.KernelDestroy = [](void* opaque) {
    auto* kernel = static_cast<Kernel*>(opaque);
#ifdef OLIVE_LAB_CUDA
    lora_resident_cuda_free(kernel->barrier);
#endif
    delete kernel;
  };
  op.GetInputCharacteristic = [](const ort::CustomOp*, size_t) { return ort::kRequired; };
  op.GetOutputCharacteristic = [](const ort::CustomOp*, size_t) { return ort::kRequired; };
  op.GetInputMemoryType = [](const ort::CustomOp*, size_t) { return ort::kDefaultMemory; };
  op.GetVariadicInputMinArity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const ort::CustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel<kCuda, kSwiGlu>;
  op.KernelComputeV2 = compute;
  return op;
}

// ORT keeps pointers to these for as long as a session uses them: static storage. One op per (provider, type):
// ORT merges ops of one name into one schema whose type constraint is the union.
const ort::CustomOp kCpuOp = make_op<false, ort::kFloat>();
const ort::CustomOp kCpuOp16 = make_op<false, ort::kFloat16>();
const ort::CustomOp kCpuSwiGluOp = make_op<false, ort::kFloat, true>();
const ort::CustomOp kCpuSwiGluOp16 = make_op<false, ort::kFloat16, true>();
#ifdef OLIVE_LAB_CUDA
const ort::CustomOp kCudaOp = make_op<true, ort::kFloat16>();
const ort::CustomOp kCudaSwiGluOp = make_op<true, ort::kFloat16, true>();
#endif

}  // namespace

ort::Status* add_lora_resident_ops(const ort::Api* api, ort::CustomOpDomain* domain) {
  auto add = ort::entry<ort::Status* (*)(ort::CustomOpDomain*, const ort::CustomOp*)>(api, ort::CustomOpDomain_Add);
  if (ort::Status* s = add(domain, &kCpuOp)) return s;
  if (ort::Status* s = add(domain, &kCpuOp16)) return s;
  if (ort::Status* s = add(domain, &kCpuSwiGluOp)) return s;
  if (ort::Status* s = add(domain, &kCpuSwiGluOp16)) return s;
#ifdef OLIVE_LAB_CUDA
  if (ort::Status* s = add(domain, &kCudaOp)) return s;
  if (ort::Status* s = add(domain, &kCudaSwiGluOp)) return s;
#endif
  return nullptr;
}
