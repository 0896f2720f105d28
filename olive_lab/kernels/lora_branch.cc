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
// The kernel reads A and B once per row, in order, with float32 FMAs on float16 (or int8) loads: 16-wide with
// AVX-512, 8-wide with AVX, FMA and F16C (lora_branch_simd8.h; with AVX2 too, int8 widens in one instruction),
// chosen at run time; a portable loop otherwise. OLIVE_LAB_KERNELS_ISA picks one of them, which the tests compare.
// The work is split over ORT's intra-op threads (KernelContext_ParallelFor, ORT >= 1.17).
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
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

// Loops over a template constant, unrolled so that their accumulator arrays live in registers (GCC otherwise keeps
// acc[U][V] on the stack, and every FMA waits on a store and a load).
#define OLIVE_LAB_UNROLL _Pragma("GCC unroll 16")

namespace {

struct BranchShape {
  int64_t M;  // rows of x and y: batch x sequence
  int64_t K;  // in_features
  int64_t N;  // out_features
  int64_t r;  // rank of each part (rows of B)
  int64_t P;  // parts (columns of A = P * r)
  const int64_t* widths;
};

// A weight of A or B as float: float16 (LoraBranch) or int8 (LoraBranchQ8, whose per-column scales multiply t).
inline float weight(uint16_t h) { return olive_lab::half_to_float(h); }
inline float weight(int8_t q) { return static_cast<float>(q); }

// The two halves of a row, over a range, so that ORT's thread pool can split them (see `run`):
//   down: t[0:R] = x[k0:k1] @ A[k0:k1, :]           (R = P * r; partial sums when K is split)
//   up:   out[n0:n1] = y[n0:n1] + t_p @ B[:, n0:n1]  (t_p: the block of t of the part each column belongs to)
// Portable versions: the same order of operations, scalar conversions.
template <typename W>
void down_portable(const BranchShape& s, const float* x, const W* A, int64_t k0, int64_t k1, float* t) {
  const int64_t R = s.P * s.r;
  for (int64_t j = 0; j < R; ++j) t[j] = 0.f;
  for (int64_t k = k0; k < k1; ++k) {
    const W* a = A + k * R;
    for (int64_t j = 0; j < R; ++j) t[j] += x[k] * weight(a[j]);
  }
}

template <typename W>
void up_portable(const BranchShape& s, const float* y, const float* t, const W* B, int64_t n0, int64_t n1,
                 float* out) {
  int64_t c = 0;
  for (int64_t p = 0; p < s.P; c += s.widths[p++]) {
    const int64_t begin = c > n0 ? c : n0, end = c + s.widths[p] < n1 ? c + s.widths[p] : n1;
    const float* tp = t + p * s.r;
    for (int64_t n = begin; n < end; ++n) out[n] = y[n];
    for (int64_t i = 0; i < s.r; ++i) {
      const W* b = B + i * s.N;
      for (int64_t n = begin; n < end; ++n) out[n] += tp[i] * weight(b[n]);
    }
  }
}

#ifdef OLIVE_LAB_X86
// The 8-wide kernels, twice: AVX without AVX2 is enough for them (hosts like that run the benches: README "By model
// size"), but without AVX2 int8 widens in two halves, which made int8 adapters no faster than float16 there.
namespace avx {
#define OLIVE_LAB_SIMD __attribute__((target("avx,fma,f16c")))
#define OLIVE_LAB_SIMD_AVX2 0
#include "lora_branch_simd8.h"
#undef OLIVE_LAB_SIMD
#undef OLIVE_LAB_SIMD_AVX2
}  // namespace avx
namespace avx2 {
#define OLIVE_LAB_SIMD __attribute__((target("avx,avx2,fma,f16c")))
#define OLIVE_LAB_SIMD_AVX2 1
#include "lora_branch_simd8.h"
#undef OLIVE_LAB_SIMD
#undef OLIVE_LAB_SIMD_AVX2
}  // namespace avx2

// 16-wide: the same two halves with AVX-512 (F, BW and VL, for the masked 16-bit and 8-bit loads). A block's last
// vector is masked, so any width runs in vectors. x @ A keeps U sets of accumulators over interleaved rows of A, so
// that at least 8 FMA chains are in flight whatever the block's width (a rank-16 slot of one part has one vector of
// columns: one chain would wait on the FMA latency at every row); their sum is the same rows in another order.
#define OLIVE_LAB_AVX512 __attribute__((target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl")))

OLIVE_LAB_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
OLIVE_LAB_AVX512 inline __m512 load16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// The lane masks of V vectors that cover `width` columns (16 (V - 1) < width <= 16 V).
template <int V>
inline void lane_masks(int64_t width, __mmask16* mask) {
  OLIVE_LAB_UNROLL
  for (int v = 0; v < V; ++v) {
    const int64_t left = width - 16 * v;
    mask[v] = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
  }
}

template <int V, int U, typename W>
OLIVE_LAB_AVX512 void down_block16(const float* x, const W* A, int64_t K, int64_t stride, int64_t width, float* t) {
  __mmask16 mask[V];
  lane_masks<V>(width, mask);
  __m512 acc[U][V];
  OLIVE_LAB_UNROLL
  for (int u = 0; u < U; ++u)
    OLIVE_LAB_UNROLL
    for (int v = 0; v < V; ++v) acc[u][v] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U)
    OLIVE_LAB_UNROLL
    for (int u = 0; u < U; ++u) {
      const __m512 xk = _mm512_set1_ps(x[k + u]);
      const W* a = A + (k + u) * stride;
      OLIVE_LAB_UNROLL
      for (int v = 0; v < V; ++v) acc[u][v] = _mm512_fmadd_ps(xk, load16(a + 16 * v, mask[v]), acc[u][v]);
    }
  for (; k < K; ++k) {
    const __m512 xk = _mm512_set1_ps(x[k]);
    OLIVE_LAB_UNROLL
    for (int v = 0; v < V; ++v) acc[0][v] = _mm512_fmadd_ps(xk, load16(A + k * stride + 16 * v, mask[v]), acc[0][v]);
  }
  OLIVE_LAB_UNROLL
  for (int u = 1; u < U; ++u)
    OLIVE_LAB_UNROLL
    for (int v = 0; v < V; ++v) acc[0][v] = _mm512_add_ps(acc[0][v], acc[u][v]);
  OLIVE_LAB_UNROLL
  for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(t + 16 * v, mask[v], acc[0][v]);
}

template <int V, typename W>
OLIVE_LAB_AVX512 void up_block16(const float* y, const float* t, const W* B, int64_t r, int64_t stride, int64_t width,
                                 float* out) {
  __mmask16 mask[V];
  lane_masks<V>(width, mask);
  __m512 acc[V];
  OLIVE_LAB_UNROLL
  for (int v = 0; v < V; ++v) acc[v] = _mm512_maskz_loadu_ps(mask[v], y + 16 * v);
  for (int64_t i = 0; i < r; ++i) {
    const __m512 ti = _mm512_set1_ps(t[i]);
    const W* b = B + i * stride;
    OLIVE_LAB_UNROLL
    for (int v = 0; v < V; ++v) acc[v] = _mm512_fmadd_ps(ti, load16(b + 16 * v, mask[v]), acc[v]);
  }
  OLIVE_LAB_UNROLL
  for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(out + 16 * v, mask[v], acc[v]);
}

template <typename W>
OLIVE_LAB_AVX512 void down_avx512(const BranchShape& s, const float* x, const W* A, int64_t k0, int64_t k1, float* t) {
  const int64_t R = s.P * s.r, K = k1 - k0;
  x += k0, A += k0 * R;
  int64_t j = 0;
  for (; j + 64 <= R; j += 64) down_block16<4, 2>(x, A + j, K, R, 64, t + j);
  switch ((R - j + 15) / 16) {  // the rest: 1-63 columns
    case 3: down_block16<3, 3>(x, A + j, K, R, R - j, t + j); break;
    case 2: down_block16<2, 4>(x, A + j, K, R, R - j, t + j); break;
    case 1: down_block16<1, 8>(x, A + j, K, R, R - j, t + j); break;
    default: break;
  }
}

template <typename W>
OLIVE_LAB_AVX512 void up_avx512(const BranchShape& s, const float* y, const float* t, const W* B, int64_t n0,
                                int64_t n1, float* out) {
  int64_t c = 0;
  for (int64_t p = 0; p < s.P; c += s.widths[p++]) {
    const int64_t begin = c > n0 ? c : n0, end = c + s.widths[p] < n1 ? c + s.widths[p] : n1;
    if (begin >= end) continue;
    const float* tp = t + p * s.r;
    int64_t n = begin;
    for (; n + 128 <= end; n += 128) up_block16<8>(y + n, tp, B + n, s.r, s.N, 128, out + n);
    const int64_t left = end - n;
    switch ((left + 15) / 16) {
      case 7: up_block16<7>(y + n, tp, B + n, s.r, s.N, left, out + n); break;
      case 6: up_block16<6>(y + n, tp, B + n, s.r, s.N, left, out + n); break;
      case 5: up_block16<5>(y + n, tp, B + n, s.r, s.N, left, out + n); break;
      case 4: up_block16<4>(y + n, tp, B + n, s.r, s.N, left, out + n); break;
      case 3: up_block16<3>(y + n, tp, B + n, s.r, s.N, left, out + n); break;
      case 2: up_block16<2>(y + n, tp, B + n, s.r, s.N, left, out + n); break;
      case 1: up_block16<1>(y + n, tp, B + n, s.r, s.N, left, out + n); break;
      default: break;
    }
  }
}
#endif

// The kernels a process runs, chosen once: the widest the CPU has, or OLIVE_LAB_KERNELS_ISA=portable|avx|avx2|avx512
// (the tests run each and compare them; asking for more than the CPU has falls back to what it has).
enum class Isa { kPortable, kAvx, kAvx2, kAvx512 };
constexpr const char* kIsaNames[] = {"portable", "avx", "avx2", "avx512"};

Isa isa() {
  static const Isa chosen = [] {
    Isa best = Isa::kPortable;
#ifdef OLIVE_LAB_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      best = Isa::kAvx;
      if (__builtin_cpu_supports("avx2")) best = Isa::kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl"))
        best = Isa::kAvx512;
    }
#endif
    const char* asked = getenv("OLIVE_LAB_KERNELS_ISA");
    if (!asked || !*asked) return best;
    for (int i = 0; i <= static_cast<int>(Isa::kAvx512); ++i)
      if (strcmp(asked, kIsaNames[i]) == 0) return static_cast<Isa>(i) < best ? static_cast<Isa>(i) : best;
    // a typo would otherwise measure the default kernel under another name
    fprintf(stderr, "olive_lab.LoraBranch: OLIVE_LAB_KERNELS_ISA=%s is not portable, avx, avx2 or avx512; running "
                    "the widest kernel the CPU has\n", asked);
    return best;
  }();
  return chosen;
}

// One op call, split over ORT's intra-op thread pool where that pays (KernelContext_ParallelFor runs the tasks
// inline when the session has one thread). Several rows (prefill): a row per task. One row (decoding): a slot of
// kParallelBytes of adapter or more splits K in 4 slices, whose partial sums of x @ A are added, then the columns
// in slices of 512; a smaller one runs on the calling thread. Measured on 2 cores with 2 threads (ORT's profiler,
// random rank-16 adapters): split, the LoraBranch nodes took 0.75x the time at SmolLM2-1.7B's dimensions (slots of
// 131-655 KB) and 1.27x at 135M's (50-135 KB), where waking the second thread costs more than it saves; decoding
// 135M with every slot split gave 0.987x with the adapter (bench/results/2026-12-07-cpu-lora-bytes-135m.json's run).
// `scale` (LoraBranchQ8, else null): t's per-column factor, applied once t is whole.
template <typename W>
struct Run {
  const BranchShape* s;
  const float *y, *x;
  const W *A, *B;
  const float* scale;
  float* out;
  float* t;  // rows > 1: [M, R]; one row: [slices + 1, R], the partial sums then their total
  int64_t slices;
  Isa isa;

  void down(const float* xm, int64_t k0, int64_t k1, float* tm) const {
#ifdef OLIVE_LAB_X86
    if (isa == Isa::kAvx512) return down_avx512(*s, xm, A, k0, k1, tm);
    if (isa == Isa::kAvx2) return avx2::down_simd(*s, xm, A, k0, k1, tm);
    if (isa == Isa::kAvx) return avx::down_simd(*s, xm, A, k0, k1, tm);
#endif
    down_portable(*s, xm, A, k0, k1, tm);
  }
  void scaled(float* tm) const {
    if (scale)
      for (int64_t j = 0; j < s->P * s->r; ++j) tm[j] *= scale[j];
  }
  void up(const float* ym, const float* tm, int64_t n0, int64_t n1, float* om) const {
#ifdef OLIVE_LAB_X86
    if (isa == Isa::kAvx512) return up_avx512(*s, ym, tm, B, n0, n1, om);
    if (isa == Isa::kAvx2) return avx2::up_simd(*s, ym, tm, B, n0, n1, om);
    if (isa == Isa::kAvx) return avx::up_simd(*s, ym, tm, B, n0, n1, om);
#endif
    up_portable(*s, ym, tm, B, n0, n1, om);
  }
};

constexpr int64_t kDownSlices = 4, kUpColumns = 512, kParallelBytes = 192 << 10;

template <typename W>
void row_task(void* opaque, size_t m) {
  const Run<W>& run = *static_cast<const Run<W>*>(opaque);
  const BranchShape& s = *run.s;
  float* tm = run.t + m * s.P * s.r;
  run.down(run.x + m * s.K, 0, s.K, tm);
  run.scaled(tm);
  run.up(run.y + m * s.N, tm, 0, s.N, run.out + m * s.N);
}

template <typename W>
void down_task(void* opaque, size_t i) {
  const Run<W>& run = *static_cast<const Run<W>*>(opaque);
  const int64_t K = run.s->K, slices = run.slices;
  run.down(run.x, K * int64_t(i) / slices, K * (int64_t(i) + 1) / slices, run.t + int64_t(i) * run.s->P * run.s->r);
}

template <typename W>
void up_task(void* opaque, size_t i) {
  const Run<W>& run = *static_cast<const Run<W>*>(opaque);
  const int64_t n0 = int64_t(i) * kUpColumns, n1 = n0 + kUpColumns < run.s->N ? n0 + kUpColumns : run.s->N;
  run.up(run.y, run.t + run.slices * run.s->P * run.s->r, n0, n1, run.out);
}

template <typename W>
ort::Status* run(const ort::Api* api, const ort::KernelContext* context, const BranchShape& s, const float* y,
                 const float* x, const W* A, const W* B, const float* scale, float* out) {
  auto parallel = ort::entry<ort::Status* (*)(const ort::KernelContext*, void (*)(void*, size_t), size_t, size_t,
                                              void*)>(api, ort::KernelContext_ParallelFor);
  const int64_t R = s.P * s.r;
  Run<W> job{&s, y, x, A, B, scale, out, nullptr, 1, isa()};
  if (s.M > 1) {
    std::vector<float> t(size_t(s.M * R));
    job.t = t.data();
    return parallel(context, row_task<W>, size_t(s.M), 0, &job);
  }
  if (int64_t(sizeof(W)) * (s.K * R + s.r * s.N) < kParallelBytes) {  // one task, on this thread
    std::vector<float> t(static_cast<size_t>(R));
    job.down(x, 0, s.K, t.data());
    job.scaled(t.data());
    job.up(y, t.data(), 0, s.N, out);
    return nullptr;
  }
  job.slices = s.K >= 256 * kDownSlices ? kDownSlices : 1;
  std::vector<float> t(size_t((job.slices + 1) * R));
  job.t = t.data();
  if (ort::Status* status = parallel(context, down_task<W>, size_t(job.slices), 0, &job)) return status;
  float* total = job.t + job.slices * R;
  for (int64_t j = 0; j < R; ++j) {
    float sum = 0.f;
    for (int64_t i = 0; i < job.slices; ++i) sum += job.t[i * R + j];
    total[j] = sum;
  }
  job.scaled(total);
  return parallel(context, up_task<W>, size_t((s.N + kUpColumns - 1) / kUpColumns), 0, &job);
}

struct Kernel {
  const ort::Api* api;
};

// LoraBranch: y, x, A, B, parts. LoraBranchQ8: y, x, A, B, scale, parts, with A and B int8 and scale [P * r].
template <bool kQ8>
struct Signature {
  static constexpr size_t kCount = kQ8 ? 6 : 5;
  static constexpr const char* kNames[6] = {"y", "x", "A", "B", kQ8 ? "scale" : "parts", "parts"};
  static constexpr ort::ElementType kTypes[6] = {ort::kFloat, ort::kFloat, kQ8 ? ort::kInt8 : ort::kFloat16,
                                                 kQ8 ? ort::kInt8 : ort::kFloat16, kQ8 ? ort::kFloat : ort::kInt64,
                                                 ort::kInt64};
  static constexpr const char* kTypeNames[6] = {"float32", "float32", kQ8 ? "int8" : "float16",
                                                kQ8 ? "int8" : "float16", kQ8 ? "float32" : "int64", "int64"};
  static constexpr const char* kOp = kQ8 ? "LoraBranchQ8" : "LoraBranch";
};

template <bool kQ8>
ort::Status* compute(void* opaque, ort::KernelContext* context) {
  using Sig = Signature<kQ8>;
  const ort::Api* api = static_cast<Kernel*>(opaque)->api;
  const std::string op = Sig::kOp;
  ort::Tensor in[Sig::kCount];
  for (size_t i = 0; i < Sig::kCount; ++i) {
    if (ort::Status* s = ort::input(api, context, i, &in[i])) return s;
    if (in[i].type != Sig::kTypes[i])  // ORT's schema check comes first in a model; this guards a loose one
      return ort::error(api, op + ": input " + Sig::kNames[i] + " must be " + Sig::kTypeNames[i]);
  }
  const size_t kParts = Sig::kCount - 1;
  const auto &y = in[0].dims, &x = in[1].dims, &A = in[2].dims, &B = in[3].dims, &parts = in[kParts].dims;
  if (y.empty() || x.size() != y.size() || A.size() != 2 || B.size() != 2 || parts.size() != 1 ||
      (kQ8 && in[4].dims.size() != 1))
    return ort::error(api, op + (kQ8 ? ": expected y [..., N], x [..., K], A [K, P * r], B [r, N], scale [P * r], "
                                       "parts [P]"
                                     : ": expected y [..., N], x [..., K], A [K, P * r], B [r, N], parts [P]"));
  int64_t M = 1;
  for (size_t d = 0; d + 1 < y.size(); ++d) {
    if (x[d] != y[d]) return ort::error(api, op + ": x and y differ in their leading dimensions");
    M *= y[d];
  }
  ort::Status* status = nullptr;
  const void* data[Sig::kCount];
  for (size_t i = 0; i < Sig::kCount; ++i) {
    data[i] = ort::data_of(api, in[i].value, &status);
    if (status) return status;
  }
  const int64_t K = x.back(), N = y.back(), P = parts[0], r = B[0];
  const auto* widths = static_cast<const int64_t*>(data[kParts]);
  int64_t total = 0;
  bool positive = P > 0;
  for (int64_t p = 0; p < P; ++p) total += widths[p], positive = positive && widths[p] > 0;
  if (!positive || total != N)
    return ort::error(api, op + ": parts " + ort::dims_text(std::vector<int64_t>(widths, widths + P)) +
                               " must be positive widths that sum to y's last dimension, " + std::to_string(N));
  if (A[0] != K || B[1] != N || A[1] != P * r)
    return ort::error(api, op + ": A " + ort::dims_text(A) + ", B " + ort::dims_text(B) + " do not fit x [..., " +
                               std::to_string(K) + "], y [..., " + std::to_string(N) + "] and " + std::to_string(P) +
                               " parts (A must be [K, parts x rank], B [rank, N])");
  if (kQ8 && in[4].dims[0] != P * r)
    return ort::error(api, op + ": scale " + ort::dims_text(in[4].dims) + " must be [" + std::to_string(P * r) +
                               "], one factor per column of A " + ort::dims_text(A));
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
  const auto* xf = static_cast<const float*>(data[1]);
  if (kQ8)
    return run(api, context, shape, yf, xf, static_cast<const int8_t*>(data[2]), static_cast<const int8_t*>(data[3]),
               static_cast<const float*>(data[4]), out);
  return run(api, context, shape, yf, xf, static_cast<const uint16_t*>(data[2]), static_cast<const uint16_t*>(data[3]),
             static_cast<const float*>(nullptr), out);
}

template <bool kQ8>
ort::CustomOp make_op() {
  ort::CustomOp op{};
  op.version = ort::kOpVersion;
  op.GetName = [](const ort::CustomOp*) { return Signature<kQ8>::kOp; };
  op.GetExecutionProviderType = [](const ort::CustomOp*) -> const char* { return nullptr; };  // the CPU provider
  op.GetInputType = [](const ort::CustomOp*, size_t i) { return Signature<kQ8>::kTypes[i]; };
  op.GetInputTypeCount = [](const ort::CustomOp*) -> size_t { return Signature<kQ8>::kCount; };
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
  op.KernelComputeV2 = compute<kQ8>;
  return op;
}

// static storage: ORT keeps the pointers while a session uses them
const ort::CustomOp kOp = make_op<false>();
const ort::CustomOp kOpQ8 = make_op<true>();

}  // namespace

// The kernels this process runs ("portable", "avx", "avx2" or "avx512"): for tests and benches, through ctypes.
extern "C" __attribute__((visibility("default"))) const char* olive_lab_kernels_isa() {
  return kIsaNames[static_cast<int>(isa())];
}

ort::Status* add_lora_branch_ops(const ort::Api* api, ort::CustomOpDomain* domain) {
  auto add = ort::entry<ort::Status* (*)(ort::CustomOpDomain*, const ort::CustomOp*)>(api, ort::CustomOpDomain_Add);
  if (ort::Status* s = add(domain, &kOp)) return s;
  return add(domain, &kOpQ8);
}
