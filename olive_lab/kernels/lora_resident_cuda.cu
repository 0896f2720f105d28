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
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "lora_resident.h"

namespace {

constexpr int kThreads = 256;
constexpr int kColumns = 32;  // columns of A one pass of lora_down handles (an adapter's rank, padded)

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

__global__ void lora_down(const __half* __restrict__ x, const __half* __restrict__ A, const __half* __restrict__ mask,
                          float* __restrict__ partial, int K, int R, int P) {
  int first, last;
  active_span(mask, R, &first, &last);
  if (last < 0) return;  // no adapter: lora_up skips the partials too
  const int p = blockIdx.x, m = blockIdx.y;
  const int k_begin = p * kRowsPerBlock, k_end = min(K, k_begin + kRowsPerBlock);
  const __half* xm = x + static_cast<int64_t>(m) * K;
  __shared__ float s_sum[kThreads / 32][kColumns];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j0 = first; j0 <= last; j0 += kColumns) {
    const int width = min(kColumns, last + 1 - j0);
    float acc[kColumns];
#pragma unroll
    for (int c = 0; c < kColumns; ++c) acc[c] = 0.f;
    for (int k = k_begin + threadIdx.x; k < k_end; k += blockDim.x) {
      const float xk = __half2float(xm[k]);
      const __half* row = A + static_cast<int64_t>(k) * R + j0;
#pragma unroll
      for (int c = 0; c < kColumns; ++c)
        if (c < width) acc[c] += xk * __half2float(row[c]);
    }
#pragma unroll
    for (int c = 0; c < kColumns; ++c) {
      float v = acc[c];
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) s_sum[warp][c] = v;
    }
    __syncthreads();
    if (threadIdx.x < width) {
      float v = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) v += s_sum[w][threadIdx.x];
      const int j = j0 + threadIdx.x;
      partial[(static_cast<int64_t>(m) * P + p) * R + j] = v * __half2float(mask[j]);
    }
    __syncthreads();
  }
}

__global__ void lora_up(const __half* __restrict__ y, const __half* __restrict__ B, const __half* __restrict__ mask,
                        const float* __restrict__ partial, __half* __restrict__ out, int N, int R, int P) {
  int first, last;
  active_span(mask, R, &first, &last);
  const int m = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t at = static_cast<int64_t>(m) * N + n;
  extern __shared__ float s_t[];  // t[first .. last]
  const int width = last + 1 - first;
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    float v = 0.f;
    for (int p = 0; p < P; ++p) v += partial[(static_cast<int64_t>(m) * P + p) * R + first + j];
    s_t[j] = v;
  }
  __syncthreads();
  if (n >= N) return;
  float v = __half2float(y[at]);
  for (int j = 0; j < width; ++j) v += s_t[j] * __half2float(B[static_cast<int64_t>(first + j) * N + n]);
  out[at] = __float2half(v);
}

}  // namespace

int lora_resident_cuda_warm_up() {
  // Load the kernels now, at session creation: a lazy load inside ORT's CUDA graph capture would break it.
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, lora_down) != cudaSuccess) return 1;
  if (cudaFuncGetAttributes(&attributes, lora_up) != cudaSuccess) return 1;
  return 0;
}

int lora_resident_cuda(void* stream, const LoraResidentShape& shape, const void* y, const void* x, const void* A,
                       const void* B, const void* mask, void* partial, void* out) {
  auto s = static_cast<cudaStream_t>(stream);
  const int P = lora_partial_blocks(shape.K);
  lora_down<<<dim3(P, shape.M), kThreads, 0, s>>>(static_cast<const __half*>(x), static_cast<const __half*>(A),
                                                  static_cast<const __half*>(mask), static_cast<float*>(partial),
                                                  shape.K, shape.R, P);
  const int shared = static_cast<int>(shape.R * sizeof(float));
  lora_up<<<dim3((shape.N + kThreads - 1) / kThreads, shape.M), kThreads, shared, s>>>(
      static_cast<const __half*>(y), static_cast<const __half*>(B), static_cast<const __half*>(mask),
      static_cast<const float*>(partial), static_cast<__half*>(out), shape.N, shape.R, P);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
