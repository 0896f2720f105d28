// CUDA kernels of the fused resident-LoRA op (see lora_resident.cc for the op's contract and why it exists).
//
// out[m, :] = y[m, :] + ((x[m, :] @ A) * mask) @ B instead of ORT's five kernels per slot (cuBLAS split-K A product
// + its reduce, the mask Mul, the B product, the Add). Two steps:
//   down: block p reads rows [p * kRowsPerBlock, ...) of A, but only the columns the mask keeps (the active
//         adapter's block), and writes its partial sums of x @ A to partial[m, p, :];
//   up:   block c sums the P partials, then adds t @ B to y for columns [c * kThreads, ...).
// A decoding step (one row) runs both in one launch, lora_one: its blocks all fit on the GPU at once (checked when a
// session creates the op), so they meet at a grid-wide barrier between the steps. With an all-zero mask (no
// adapter) each block only copies its columns of y: one near-empty launch per slot, fewer than any ONNX layout.
// Prompts (many rows) take two launches, lora_down and lora_up, whose grids would not all fit.
// LoraResidentSwiGlu's up step also applies the packed gate/up projection's activation, silu(gate) * up, writing
// N / 2 columns: three fewer kernels per layer (ORT's Split, QuickGelu and Mul).
// The mask is read on the device, so a captured CUDA graph stays valid when the adapter changes (switching is a new
// mask, copied in by ORT GenAI).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lora_resident.h"

namespace {

constexpr int kThreads = 256;
constexpr int kColumns = 32;  // columns of A one pass of the down step handles (an adapter's rank, padded)

int max_resident_blocks = 0;  // blocks of lora_one the GPU holds at once (set by lora_resident_cuda_warm_up)

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

// The down step of block p for row m. Lanes run along the columns (a row of A is contiguous, so a warp reads it
// coalesced), warps along the rows. A block covers few rows (kRowsPerBlock) so that each thread has only a handful of
// independent loads, all in flight at once: at these sizes the time is memory latency, not bandwidth. The warps'
// sums meet in shared memory.
__device__ void down_step(const __half* __restrict__ x, const __half* __restrict__ A, const __half* __restrict__ mask,
                          float* __restrict__ partial, int K, int R, int P, int p, int m, int first, int last) {
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

// The up step of block c for row m: sum the P partials of the active columns (all threads at once, in a fixed
// order), then each thread adds t @ B for one output column (a row of B is contiguous: coalesced across the
// threads). kSwiGlu: thread n does columns n (gate) and n + N / 2 (up) and writes silu(gate) * up to out[m, n], out
// being [M, N / 2]. The partials are read past L1 (__ldcg): in lora_one other blocks wrote them in this launch.
template <bool kSwiGlu>
__device__ void up_step(const __half* __restrict__ y, const __half* __restrict__ B, const float* partial,
                        __half* __restrict__ out, int N, int R, int P, int c, int m, int first, int last) {
  const int n = c * kThreads + threadIdx.x;
  const int64_t at = static_cast<int64_t>(m) * N + n;
  extern __shared__ float s_t[];       // t[first .. last]
  __shared__ float s_share[kThreads];  // the groups' sums, [group][column]
  const int width = last + 1 - first;  // <= 0 with no adapter
  const float* pm = partial + static_cast<int64_t>(m) * P * R + first;
  // The P partials are summed in a fixed order, so that a run's output (and its greedy tokens) is the same every
  // time: float atomics added them in whatever order the warps came. `groups` threads per column each sum every
  // groups-th partial; then one thread per column adds the groups' sums.
  if (width > 0 && width <= kThreads) {
    const int groups = kThreads / width, g = threadIdx.x / width, j = threadIdx.x % width;
    if (g < groups) {
      float share = 0.f;
      for (int p = g; p < P; p += groups) share += __ldcg(pm + static_cast<int64_t>(p) * R + j);
      s_share[g * width + j] = share;
    }
    __syncthreads();
    if (threadIdx.x < width) {
      float v = 0.f;
      for (int h = 0; h < groups; ++h) v += s_share[h * width + threadIdx.x];
      s_t[threadIdx.x] = v;
    }
  } else {
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
      float v = 0.f;
      for (int p = 0; p < P; ++p) v += __ldcg(pm + static_cast<int64_t>(p) * R + j);
      s_t[j] = v;
    }
  }
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

// Prompts: grid (P, M).
__global__ void lora_down(const __half* __restrict__ x, const __half* __restrict__ A, const __half* __restrict__ mask,
                          float* __restrict__ partial, int K, int R, int P) {
  int first, last;
  active_span(mask, R, &first, &last);
  if (last < 0) return;  // no adapter: lora_up skips the partials too
  down_step(x, A, mask, partial, K, R, P, blockIdx.x, blockIdx.y, first, last);
}

// Prompts: grid (ceil(columns / kThreads), M).
template <bool kSwiGlu>
__global__ void lora_up(const __half* __restrict__ y, const __half* __restrict__ B, const __half* __restrict__ mask,
                        const float* partial, __half* __restrict__ out, int N, int R, int P) {
  int first, last;
  active_span(mask, R, &first, &last);
  up_step<kSwiGlu>(y, B, partial, out, N, R, P, blockIdx.x, blockIdx.y, first, last);
}

// Every block of the grid arrives here before any leaves: block 0's thread 0 of the last block to arrive resets the
// count and moves the generation on, which the others wait for. The count and the generation belong to one op
// kernel (one ONNX node; ORT runs a node's launches one after another on its stream) and start at zero.
__device__ void grid_barrier(unsigned int* barrier) {
  __syncthreads();
  if (threadIdx.x == 0) {
    volatile unsigned int* generation = barrier + 1;
    const unsigned int seen = *generation;  // before arriving: the last arrival may move it at once
    __threadfence();                        // this block's partials, visible to every block
    if (atomicAdd(barrier, 1u) == gridDim.x - 1) {
      barrier[0] = 0;
      __threadfence();
      atomicAdd(barrier + 1, 1u);
    } else {
      while (*generation == seen) __nanosleep(32);
    }
    __threadfence();
  }
  __syncthreads();
}

// A decoding step (M = 1) in one launch: grid max(P, column blocks), all resident at once. Blocks p < P do the down
// step, all meet at the barrier, blocks c < column blocks do the up step. With no adapter there is no down step and
// no barrier: each block copies (or, kSwiGlu, activates) its columns of y.
template <bool kSwiGlu>
__global__ void lora_one(const __half* __restrict__ y, const __half* __restrict__ x, const __half* __restrict__ A,
                         const __half* __restrict__ B, const __half* __restrict__ mask, float* partial,
                         __half* __restrict__ out, unsigned int* barrier, int K, int N, int R, int P, int up_blocks) {
  int first, last;
  active_span(mask, R, &first, &last);
  const int b = blockIdx.x;
  if (last >= 0) {
    if (b < P) down_step(x, A, mask, partial, K, R, P, b, 0, first, last);
    grid_barrier(barrier);
  }
  if (b < up_blocks) up_step<kSwiGlu>(y, B, partial, out, N, R, P, b, 0, first, last);
}

bool two_launches_only = false;  // OLIVE_LAB_LORA_TWO_LAUNCHES=1: an A/B switch, read at session creation

template <bool kSwiGlu>
int enqueue(cudaStream_t s, const LoraResidentShape& shape, const void* y, const void* x, const void* A,
            const void* B, const void* mask, void* partial, void* out, void* barrier) {
  const int P = lora_partial_blocks(shape.K);
  const int columns = kSwiGlu ? shape.N / 2 : shape.N;
  const int up_blocks = (columns + kThreads - 1) / kThreads;
  const auto* mask16 = static_cast<const __half*>(mask);
  const size_t shared = shape.R * sizeof(float);
  const int one_grid = P > up_blocks ? P : up_blocks;
  if (shape.M == 1 && barrier && !two_launches_only && one_grid <= max_resident_blocks && shape.R <= 2048) {
    lora_one<kSwiGlu><<<one_grid, kThreads, shared, s>>>(
        static_cast<const __half*>(y), static_cast<const __half*>(x), static_cast<const __half*>(A),
        static_cast<const __half*>(B), mask16, static_cast<float*>(partial), static_cast<__half*>(out),
        static_cast<unsigned int*>(barrier), shape.K, shape.N, shape.R, P, up_blocks);
    return cudaGetLastError() == cudaSuccess ? 0 : 1;
  }
  lora_down<<<dim3(P, shape.M), kThreads, 0, s>>>(static_cast<const __half*>(x), static_cast<const __half*>(A), mask16,
                                                  static_cast<float*>(partial), shape.K, shape.R, P);
  lora_up<kSwiGlu><<<dim3(up_blocks, shape.M), kThreads, shared, s>>>(
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
  // lora_one's blocks wait for each other: it runs only where all of them fit at once, with up to 8 KiB of mask
  // span (R <= 2048 columns) in shared memory
  int device = 0, sms = 0, per_sm = 0, per_sm_swiglu = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, lora_one<false>, kThreads, 8192) != cudaSuccess) return 1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_swiglu, lora_one<true>, kThreads, 8192) != cudaSuccess)
    return 1;
  max_resident_blocks = sms * (per_sm < per_sm_swiglu ? per_sm : per_sm_swiglu);
  const char* setting = getenv("OLIVE_LAB_LORA_TWO_LAUNCHES");
  two_launches_only = setting && strcmp(setting, "1") == 0;
  return 0;
}

void* lora_resident_cuda_barrier() {
  void* barrier = nullptr;
  if (cudaMalloc(&barrier, 2 * sizeof(unsigned int)) != cudaSuccess) return nullptr;
  if (cudaMemset(barrier, 0, 2 * sizeof(unsigned int)) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
    cudaFree(barrier);
    return nullptr;
  }
  return barrier;
}

void lora_resident_cuda_free(void* barrier) {
  if (barrier) cudaFree(barrier);
}

int lora_resident_cuda(void* stream, const LoraResidentShape& shape, const void* y, const void* x, const void* A,
                       const void* B, const void* mask, void* partial, void* out, void* barrier) {
  auto s = static_cast<cudaStream_t>(stream);
  return shape.swiglu ? enqueue<true>(s, shape, y, x, A, B, mask, partial, out, barrier)
                      : enqueue<false>(s, shape, y, x, A, B, mask, partial, out, barrier);
}
