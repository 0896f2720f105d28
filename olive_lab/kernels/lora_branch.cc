// olive_lab.LoraBranch: the LoRA branch of one projection of a CPU model, its adapter fed as inputs (the tensors of
// an .onnx_adapter file), as a single ONNX Runtime custom op.
//
//   inputs:  y [..., N] float32 (the base projection's output), x [..., K] float32 (its input),
//            A [K, P * r] float16, B [r, N] float16, parts [P] int64 (the output widths of the P packed modules,
//            e.g. q, k and v of qkv_proj; they sum to N)
//   output:  out [..., N] float32; for part p, whose output columns are [c, c + parts[p]):
//            out[..., c:c + parts[p]] = y[..., c:...] + (x @ A[:, p * r:(p + 1) * r]) @ B[:, c:c + parts[p]]
//   r = 0 (A [K, 0], B [0, N]: the graph's defaults, no adapter) copies y.
//
// Why (README, "Adapters on the CPU"): the branches layout's adapter is float32 and, for a packed projection, its
// B is block-diagonal [P * r, N], two thirds zeros for qkv_proj. Decoding reads every byte of it at every token:
// 29 MB at 135M beside 103 MB of int4 weights. Here B keeps only the blocks ([r, N]: each part's columns read their
// own r rows of x @ A) and both matrices are float16, a third of the bytes (the size llama.cpp's float16 adapters
// have), in one op instead of ORT's three nodes.
//
// The kernel reads A and B once per row, in order, with 8-wide float32 FMAs on float16 loads (AVX, FMA and F16C,
// chosen at run time; a portable loop otherwise, or with OLIVE_LAB_KERNELS_PORTABLE=1, which the tests compare).
// One thread: at decode a slot is a few hundred kilobytes, which one core reads in microseconds.
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "half.h"
#include "ort_abi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define OLIVE_LAB_X86 1
#endif

namespace {

struct BranchShape {
  int64_t M;  // rows of x and y: batch x sequence
  int64_t K;  // in_features
  int64_t N;  // out_features
  int64_t r;  // rank of each part (rows of B)
  int64_t P;  // parts (columns of A = P * r)
  const int64_t* widths;
};

// Portable: the same order of operations, scalar conversions.
void branch_portable(const BranchShape& s, const float* y, const float* x, const uint16_t* A, const uint16_t* B,
                     float* out, float* t) {
  const int64_t R = s.P * s.r;
  for (int64_t m = 0; m < s.M; ++m) {
    const float* xm = x + m * s.K;
    for (int64_t j = 0; j < R; ++j) t[j] = 0.f;
    for (int64_t k = 0; k < s.K; ++k) {
      const float xk = xm[k];
      const uint16_t* a = A + k * R;
      for (int64_t j = 0; j < R; ++j) t[j] += xk * olive_lab::half_to_float(a[j]);
    }
    const float* ym = y + m * s.N;
    float* om = out + m * s.N;
    int64_t c = 0;
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t end = c + s.widths[p];
      const float* tp = t + p * s.r;
      for (int64_t n = c; n < end; ++n) om[n] = ym[n];
      for (int64_t i = 0; i < s.r; ++i) {
        const uint16_t* b = B + i * s.N;
        for (int64_t n = c; n < end; ++n) om[n] += tp[i] * olive_lab::half_to_float(b[n]);
      }
      c = end;
    }
  }
}

#ifdef OLIVE_LAB_X86
#define OLIVE_LAB_SIMD __attribute__((target("avx,fma,f16c")))

OLIVE_LAB_SIMD inline __m256 load_half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// t[0:8V] = x @ A[:, 0:8V] for one row x; A's rows are `stride` halves apart. V accumulators stay in registers.
template <int V>
OLIVE_LAB_SIMD void down_block(const float* x, const uint16_t* A, int64_t K, int64_t stride, float* t) {
  __m256 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 xk = _mm256_broadcast_ss(x + k);
    const uint16_t* a = A + k * stride;
    for (int v = 0; v < V; ++v) acc[v] = _mm256_fmadd_ps(xk, load_half8(a + 8 * v), acc[v]);
  }
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(t + 8 * v, acc[v]);
}

// out[0:8V] = y[0:8V] + t[0:r] @ B[0:r, 0:8V]; B's rows are `stride` halves apart.
template <int V>
OLIVE_LAB_SIMD void up_block(const float* y, const float* t, const uint16_t* B, int64_t r, int64_t stride,
                             float* out) {
  __m256 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm256_loadu_ps(y + 8 * v);
  for (int64_t i = 0; i < r; ++i) {
    const __m256 ti = _mm256_broadcast_ss(t + i);
    const uint16_t* b = B + i * stride;
    for (int v = 0; v < V; ++v) acc[v] = _mm256_fmadd_ps(ti, load_half8(b + 8 * v), acc[v]);
  }
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(out + 8 * v, acc[v]);
}

OLIVE_LAB_SIMD void down_any(const float* x, const uint16_t* A, int64_t K, int64_t stride, int64_t width, float* t) {
  int64_t j = 0;
  for (; j + 64 <= width; j += 64) down_block<8>(x, A + j, K, stride, t + j);
  switch ((width - j) / 8) {  // the rest, one block of 1-7 vectors
    case 7: down_block<7>(x, A + j, K, stride, t + j); break;
    case 6: down_block<6>(x, A + j, K, stride, t + j); break;
    case 5: down_block<5>(x, A + j, K, stride, t + j); break;
    case 4: down_block<4>(x, A + j, K, stride, t + j); break;
    case 3: down_block<3>(x, A + j, K, stride, t + j); break;
    case 2: down_block<2>(x, A + j, K, stride, t + j); break;
    case 1: down_block<1>(x, A + j, K, stride, t + j); break;
    default: break;
  }
  for (j += (width - j) / 8 * 8; j < width; ++j) {  // columns past the last full vector
    float sum = 0.f;
    for (int64_t k = 0; k < K; ++k) sum += x[k] * _cvtsh_ss(A[k * stride + j]);
    t[j] = sum;
  }
}

OLIVE_LAB_SIMD void branch_simd(const BranchShape& s, const float* y, const float* x, const uint16_t* A,
                                const uint16_t* B, float* out, float* t) {
  const int64_t R = s.P * s.r;
  for (int64_t m = 0; m < s.M; ++m) {
    down_any(x + m * s.K, A, s.K, R, R, t);
    const float* ym = y + m * s.N;
    float* om = out + m * s.N;
    int64_t c = 0;
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t end = c + s.widths[p];
      const float* tp = t + p * s.r;
      int64_t n = c;
      for (; n + 64 <= end; n += 64) up_block<8>(ym + n, tp, B + n, s.r, s.N, om + n);
      for (; n + 8 <= end; n += 8) up_block<1>(ym + n, tp, B + n, s.r, s.N, om + n);
      for (; n < end; ++n) {
        float sum = ym[n];
        for (int64_t i = 0; i < s.r; ++i) sum += tp[i] * _cvtsh_ss(B[i * s.N + n]);
        om[n] = sum;
      }
      c = end;
    }
  }
}

bool simd_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

// Chosen once per process: the SIMD kernel where the CPU has it, unless OLIVE_LAB_KERNELS_PORTABLE=1.
bool use_simd() {
#ifdef OLIVE_LAB_X86
  static const bool simd = [] {
    const char* portable = getenv("OLIVE_LAB_KERNELS_PORTABLE");
    return !(portable && strcmp(portable, "1") == 0) && simd_available();
  }();
  return simd;
#else
  return false;
#endif
}

struct Kernel {
  const ort::Api* api;
};

constexpr const char* kInputs[] = {"y", "x", "A", "B", "parts"};
constexpr ort::ElementType kTypes[] = {ort::kFloat, ort::kFloat, ort::kFloat16, ort::kFloat16, ort::kInt64};
constexpr const char* kTypeNames[] = {"float32", "float32", "float16", "float16", "int64"};

ort::Status* compute(void* opaque, ort::KernelContext* context) {
  const ort::Api* api = static_cast<Kernel*>(opaque)->api;
  ort::Tensor in[5];
  for (size_t i = 0; i < 5; ++i) {
    if (ort::Status* s = ort::input(api, context, i, &in[i])) return s;
    if (in[i].type != kTypes[i])  // ORT's schema check comes first in a model; this guards a loose one
      return ort::error(api, std::string("LoraBranch: input ") + kInputs[i] + " must be " + kTypeNames[i]);
  }
  const auto &y = in[0].dims, &x = in[1].dims, &A = in[2].dims, &B = in[3].dims, &parts = in[4].dims;
  if (y.empty() || x.size() != y.size() || A.size() != 2 || B.size() != 2 || parts.size() != 1)
    return ort::error(api, "LoraBranch: expected y [..., N], x [..., K], A [K, P * r], B [r, N], parts [P]");
  int64_t M = 1;
  for (size_t d = 0; d + 1 < y.size(); ++d) {
    if (x[d] != y[d]) return ort::error(api, "LoraBranch: x and y differ in their leading dimensions");
    M *= y[d];
  }
  ort::Status* status = nullptr;
  const void* data[5];
  for (size_t i = 0; i < 5; ++i) {
    data[i] = ort::data_of(api, in[i].value, &status);
    if (status) return status;
  }
  const int64_t K = x.back(), N = y.back(), P = parts[0], r = B[0];
  const auto* widths = static_cast<const int64_t*>(data[4]);
  int64_t total = 0;
  bool positive = P > 0;
  for (int64_t p = 0; p < P; ++p) total += widths[p], positive = positive && widths[p] > 0;
  if (!positive || total != N)
    return ort::error(api, "LoraBranch: parts " + ort::dims_text(std::vector<int64_t>(widths, widths + P)) +
                               " must be positive widths that sum to y's last dimension, " + std::to_string(N));
  if (A[0] != K || B[1] != N || A[1] != P * r)
    return ort::error(api, "LoraBranch: A " + ort::dims_text(A) + ", B " + ort::dims_text(B) + " do not fit x [..., " +
                               std::to_string(K) + "], y [..., " + std::to_string(N) + "] and " + std::to_string(P) +
                               " parts (A must be [K, parts x rank], B [rank, N])");
  ort::Value* output = nullptr;
  if (ort::Status* s = ort::entry<ort::Status* (*)(ort::KernelContext*, size_t, const int64_t*, size_t, ort::Value**)>(
          api, ort::KernelContext_GetOutput)(context, 0, y.data(), y.size(), &output))
    return s;
  auto* out = static_cast<float*>(ort::data_of(api, output, &status));
  if (status) return status;
  const auto* yf = static_cast<const float*>(data[0]);
  if (M == 0) return nullptr;
  if (r == 0) {  // no adapter
    memcpy(out, yf, sizeof(float) * size_t(M) * size_t(N));
    return nullptr;
  }
  const BranchShape shape{M, K, N, r, P, widths};
  std::vector<float> t(size_t(P * r));
  const auto* xf = static_cast<const float*>(data[1]);
  const auto* a = static_cast<const uint16_t*>(data[2]);
  const auto* b = static_cast<const uint16_t*>(data[3]);
#ifdef OLIVE_LAB_X86
  if (use_simd()) {
    branch_simd(shape, yf, xf, a, b, out, t.data());
    return nullptr;
  }
#endif
  branch_portable(shape, yf, xf, a, b, out, t.data());
  return nullptr;
}

ort::CustomOp make_op() {
  ort::CustomOp op{};
  op.version = ort::kOpVersion;
  op.GetName = [](const ort::CustomOp*) { return "LoraBranch"; };
  op.GetExecutionProviderType = [](const ort::CustomOp*) -> const char* { return nullptr; };  // the CPU provider
  op.GetInputType = [](const ort::CustomOp*, size_t i) { return kTypes[i]; };
  op.GetInputTypeCount = [](const ort::CustomOp*) -> size_t { return 5; };
  op.GetOutputType = [](const ort::CustomOp*, size_t) { return ort::kFloat; };
  op.GetOutputTypeCount = [](const ort::CustomOp*) -> size_t { return 1; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const ort::CustomOp*, size_t) { return ort::kRequired; };
  op.GetOutputCharacteristic = [](const ort::CustomOp*, size_t) { return ort::kRequired; };
  op.GetInputMemoryType = [](const ort::CustomOp*, size_t) { return ort::kDefaultMemory; };
  op.GetVariadicInputMinArity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const ort::CustomOp*) { return 1; };
  op.CreateKernelV2 = [](const ort::CustomOp*, const ort::Api* api, const ort::KernelInfo*, void** kernel) {
    *kernel = new Kernel{api};
    return static_cast<ort::Status*>(nullptr);
  };
  op.KernelComputeV2 = compute;
  return op;
}

const ort::CustomOp kOp = make_op();  // static storage: ORT keeps the pointer while a session uses it

}  // namespace

ort::Status* add_lora_branch_ops(const ort::Api* api, ort::CustomOpDomain* domain) {
  return ort::entry<ort::Status* (*)(ort::CustomOpDomain*, const ort::CustomOp*)>(api, ort::CustomOpDomain_Add)(
      domain, &kOp);
}
