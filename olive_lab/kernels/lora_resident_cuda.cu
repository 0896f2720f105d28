// CUDA kernels of the fused resident-LoRA op (see lora_resident.cc for the op's contract and why it exists).
//
// out[m, :] = y[m, :] + ((x[m, :] @ A) * mask) @ B, in two launches per slot instead of ORT's five (cuBLAS split-K
// A product + its reduce, the mask Mul, the B product, the Add):
//   lora_down: grid (P, M). Block p reads rows [p * kRowsPerBlock, ...) of A, but only the columns the mask keeps
//              (the active adapter's block), and writes its partial sums of x @ A to partial[m, p, :].
//   lora_up:   grid (ceil(N / kThreads), M). Sums the P partials, then adds t @ B to y.
// With an all-zero mask (no adapter) lora_down returns at once and lora_up only copies y: the idle cost is two
// near-empty launches, which is what the branches layout pays too. The mask is read on the device, so a captured
// CUDA graph stays valid when the adapter changes (switching is a new mask, copied in by ORT GenAI).
// LoraResidentSwiGlu is the same pair whose lora_up also applies the packed gate/up projection's activation,
// silu(gate) * up, writing N / 2 columns: three fewer kernels per layer (ORT's Split, QuickGelu and Mul).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "lora_resident.h"

namespace {

constexpr int kThreads = 256;
constexpr int kColumns = 32;  // columns of A one pass of lora_down handles (an adapter's rank, padded)

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

// The mask's active span [first, last], the same for every thread of the block.
__device__ void active_span(const __half* mask, int R, int* first, int* last) {
  __shared__ int s_first, s_last;
  if (threadIdx.x == 0) {
    s_first = R;
    s_last = -1;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    if (__half2float(mask[j]) != 0.f) {
      atomicMin(&s_first, j);
      atomicMax(&s_last, j);
    }
  }
  __syncthreads();
  *first = s_first;
  *last = s_last;
}

// Lanes run along the columns (a row of A is contiguous, so a warp reads it coalesced), warps along the rows. A
// block covers few rows (kRowsPerBlock) so that each thread has only a handful of independent loads, all in flight
// at once: at these sizes the kernel's time is memory latency, not bandwidth. The warps' sums meet in shared memory.
__global__ void lora_down(const __half* __restrict__ x, const __half* __restrict__ A, const __half* __restrict__ mask,
                          float* __restrict__ partial, int K, int R, int P) {
  int first, last;
  active_span(mask, R, &first, &last);
  if (last < 0) return;  // no adapter: lora_up skips the partials too
  const int p = blockIdx.x, m = blockIdx.y;
  constexpr int kWarps = kThreads / 32, kRowsPerWarp = kRowsPerBlock / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int k_begin = p * kRowsPerBlock + warp * kRowsPerWarp;
  const __half* xm = x + static_cast<int64_t>(m) * K;
  __shared__ float s_sum[kWarps][kColumns];
  for (int j0 = first; j0 <= last; j0 += kColumns) {
    const int j = j0 + lane;
    float acc = 0.f;
    if (j <= last) {
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int k = k_begin + i;
        if (k < K) acc += __half2float(xm[k]) * __half2float(A[static_cast<int64_t>(k) * R + j]);
      }
    }
    s_sum[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && j <= last) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += s_sum[w][lane];
      partial[(static_cast<int64_t>(m) * P + p) * R + j] = v * __half2float(mask[j]);
    }
    __syncthreads();
  }
}

// Each block first sums the P partials of the active columns (all threads at once, into shared memory), then each
// thread adds t @ B for one output column (a row of B is contiguous: coalesced across the threads). kSwiGlu: thread
// n does columns n (gate) and n + N / 2 (up) and writes silu(gate) * up to out[m, n], out being [M, N / 2].
template <bool kSwiGlu>
__global__ void lora_up(const __half* __restrict__ y, const __half* __restrict__ B, const __half* __restrict__ mask,
                        const float* __restrict__ partial, __half* __restrict__ out, int N, int R, int P) {
  int first, last;
  active_span(mask, R, &first, &last);
  const int m = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t at = static_cast<int64_t>(m) * N + n;
  extern __shared__ float s_t[];  // t[first .. last]
  const int width = last + 1 - first;
  for (int j = threadIdx.x; j < width; j += blockDim.x) s_t[j] = 0.f;
  __syncthreads();
  const float* pm = partial + static_cast<int64_t>(m) * P * R + first;
  // Float atomics add the partials in whatever order the warps come, so with an adapter the last bits of a run (and,
  // on random weights' flat logits, greedy tokens) can differ between runs. A fixed-order sum is on branch
  // wip/lora-one, not yet run on a GPU.
  for (int i = threadIdx.x; i < P * width; i += blockDim.x) atomicAdd(&s_t[i % width], pm[(i / width) * R + i % width]);
  __syncthreads();
  const __half* column = B + static_cast<int64_t>(first) * N + n;
  if (kSwiGlu) {
    const int H = N / 2;
    if (n >= H) return;
    float gate = __half2float(y[at]), up = __half2float(y[at + H]);
#pragma unroll 16
    for (int j = 0; j < width; ++j) {
      gate += s_t[j] * __half2float(column[static_cast<int64_t>(j) * N]);
      up += s_t[j] * __half2float(column[static_cast<int64_t>(j) * N + H]);
    }
    out[static_cast<int64_t>(m) * H + n] = __float2half(silu(gate) * up);
    return;
  }
  if (n >= N) return;
  float v = __half2float(y[at]);
#pragma unroll 16
  for (int j = 0; j < width; ++j) v += s_t[j] * __half2float(column[static_cast<int64_t>(j) * N]);
  out[at] = __float2half(v);
}

template <bool kSwiGlu>
int enqueue(cudaStream_t s, const LoraResidentShape& shape, const void* y, const void* x, const void* A,
            const void* B, const void* mask, void* partial, void* out) {
  const int P = lora_partial_blocks(shape.K);
  const auto* mask16 = static_cast<const __half*>(mask);
  lora_down<<<dim3(P, shape.M), kThreads, 0, s>>>(static_cast<const __half*>(x), static_cast<const __half*>(A), mask16,
                                                  static_cast<float*>(partial), shape.K, shape.R, P);
  const int columns = kSwiGlu ? shape.N / 2 : shape.N;
  lora_up<kSwiGlu><<<dim3((columns + kThreads - 1) / kThreads, shape.M), kThreads, shape.R * sizeof(float), s>>>(
      static_cast<const __half*>(y), static_cast<const __half*>(B), mask16, static_cast<const float*>(partial),
      static_cast<__half*>(out), shape.N, shape.R, P);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}

}  // namespace

int lora_resident_cuda_warm_up() {
  // Load the kernels now, at session creation: a lazy load inside ORT's CUDA graph capture would break it.
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, lora_down) != cudaSuccess) return 1;
  if (cudaFuncGetAttributes(&attributes, lora_up<false>) != cudaSuccess) return 1;
  if (cudaFuncGetAttributes(&attributes, lora_up<true>) != cudaSuccess) return 1;
  return 0;
}

int lora_resident_cuda(void* stream, const LoraResidentShape& shape, const void* y, const void* x, const void* A,
                       const void* B, const void* mask, void* partial, void* out) {
  auto s = static_cast<cudaStream_t>(stream);
  return shape.swiglu ? enqueue<true>(s, shape, y, x, A, B, mask, partial, out)
                      : enqueue<false>(s, shape, y, x, A, B, mask, partial, out);
}
