// CUDA kernels of the fused resident-LoRA op (see lora_resident.cc for the op's contract and why it exists).
//
// out[m, :] = y[m, :] + ((x @ A) * mask) @ B, in two steps:
//   down: block p reads rows [p * kRowsPerBlock, ...) of A, but only the columns the mask keeps (the active
//         adapter's block), and writes its partial sums of x @ A to partial[m, p, :];
//   up:   each block sums the P partials in a fixed order (the same bits every run), then adds t @ B to its columns
//         of y.
// A decoding step (one row) runs both in one launch, `lora_one`: its blocks do the down step, meet at a grid
// barrier (a count and a generation in device memory that the op's kernel owns), then do the up step. With an
// all-zero mask (no adapter) each block only copies (or activates) its columns of y, so an idle slot costs one
// near-empty launch. lora_one's grid is at most what the GPU holds at once (counted at warm-up), so every
// block is resident and the barrier cannot wait forever. Prefill (several rows) runs the steps as two launches,
// `lora_down` and `lora_up`, and so does decoding for an op kernel without a barrier (one created with
// OLIVE_LAB_LORA_TWO_LAUNCHES=1, for A/B runs). The mask is read on the device, so a captured CUDA graph stays valid
// when the adapter changes (switching is a new mask, copied in by ORT GenAI).
// LoraResidentSwiGlu is the same op whose up step also applies the packed gate/up projection's activation,
// silu(gate) * up, writing N / 2 columns: three fewer kernels per layer (ORT's Split, QuickGelu and Mul).
#include <cuda/atomic>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "lora_resident.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kColumns = 32;  // columns of A one pass handles (an adapter's rank, padded)
// The most dynamic shared memory (the sums t, R floats) a lora_one block may have, as the occupancy check assumes. A
// block gets 48 KB without opting in, and the kernel's static shared memory comes on top: asking the check for all
// 48 KB made it count 0 blocks, and lora_one never ran (seen on an H100).
constexpr int kMaxSharedBytes = 32 * 1024;

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

// The down step of rows block p of one row x (partial: that row's [P, R]). Lanes run along the columns (a row of A is
// contiguous, so a warp reads it coalesced), warps along the rows. A block covers few rows (kRowsPerBlock) so that
// each thread has only a handful of independent loads, all in flight at once: at these sizes the kernel's time is
// memory latency, not bandwidth. The warps' sums meet in shared memory, in a fixed order.
__device__ void down_step(const __half* __restrict__ x, const __half* __restrict__ A, const __half* __restrict__ mask,
                          float* __restrict__ partial, int K, int R, int p, int first, int last) {
  constexpr int kRowsPerWarp = kRowsPerBlock / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int k_begin = p * kRowsPerBlock + warp * kRowsPerWarp;
  __shared__ float s_sum[kWarps][kColumns];
  for (int j0 = first; j0 <= last; j0 += kColumns) {
    const int j = j0 + lane;
    float acc = 0.f;
    if (j <= last) {
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int k = k_begin + i;
        if (k < K) acc += __half2float(x[k]) * __half2float(A[static_cast<int64_t>(k) * R + j]);
      }
    }
    s_sum[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && j <= last) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += s_sum[w][lane];
      partial[static_cast<int64_t>(p) * R + j] = v * __half2float(mask[j]);
    }
    __syncthreads();
  }
}

// t[j] = the sum over the P partials of column first + j, for j < width, into shared memory: warps take every
// kWarps-th partial, then one thread per column adds the warps' sums, always in the same order. __ldcg reads L2:
// in lora_one another block wrote the partials during this launch.
__device__ void sum_partials(const float* __restrict__ partial, int R, int P, int first, int width, float* s_t) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ float s_sum[kWarps][kColumns];
  for (int j0 = 0; j0 < width; j0 += kColumns) {
    const int j = j0 + lane;
    float v = 0.f;
    if (j < width)
      for (int p = warp; p < P; p += kWarps) v += __ldcg(partial + static_cast<int64_t>(p) * R + first + j);
    s_sum[warp][lane] = v;
    __syncthreads();
    if (warp == 0 && j < width) {
      float t = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) t += s_sum[w][lane];
      s_t[j] = t;
    }
    __syncthreads();
  }
}

// The up step of output column n of one row (y, out: that row): a row of B is contiguous, so consecutive threads'
// loads coalesce. kSwiGlu: columns n (gate) and n + N / 2 (up) give silu(gate) * up at out[n], out being N / 2 wide.
// width 0 (no adapter) copies or activates y.
template <bool kSwiGlu>
__device__ void up_step(const __half* __restrict__ y, const __half* __restrict__ B, const float* s_t,
                        __half* __restrict__ out, int N, int first, int width, int n) {
  const __half* column = B + static_cast<int64_t>(first) * N + n;
  if (kSwiGlu) {
    const int H = N / 2;
    if (n >= H) return;
    float gate = __half2float(y[n]), up = __half2float(y[n + H]);
#pragma unroll 16
    for (int j = 0; j < width; ++j) {
      gate += s_t[j] * __half2float(column[static_cast<int64_t>(j) * N]);
      up += s_t[j] * __half2float(column[static_cast<int64_t>(j) * N + H]);
    }
    out[n] = __float2half(silu(gate) * up);
    return;
  }
  if (n >= N) return;
  if (width == 0) {
    out[n] = y[n];  // bit for bit
    return;
  }
  float v = __half2float(y[n]);
#pragma unroll 16
  for (int j = 0; j < width; ++j) v += s_t[j] * __half2float(column[static_cast<int64_t>(j) * N]);
  out[n] = __float2half(v);
}

// Prefill, first launch: grid (P, M).
__global__ void lora_down(const __half* __restrict__ x, const __half* __restrict__ A, const __half* __restrict__ mask,
                          float* __restrict__ partial, int K, int R, int P) {
  int first, last;
  active_span(mask, R, &first, &last);
  if (last < 0) return;  // no adapter: lora_up skips the partials too
  const int m = blockIdx.y;
  down_step(x + static_cast<int64_t>(m) * K, A, mask, partial + static_cast<int64_t>(m) * P * R, K, R, blockIdx.x,
            first, last);
}

// Prefill, second launch: grid (column blocks, M).
template <bool kSwiGlu>
__global__ void lora_up(const __half* __restrict__ y, const __half* __restrict__ B, const __half* __restrict__ mask,
                        const float* __restrict__ partial, __half* __restrict__ out, int N, int R, int P) {
  int first, last;
  active_span(mask, R, &first, &last);
  const int m = blockIdx.y, width = last + 1 - first;
  extern __shared__ float s_t[];  // t[first .. last]
  sum_partials(partial + static_cast<int64_t>(m) * P * R, R, P, first, width, s_t);
  up_step<kSwiGlu>(y + static_cast<int64_t>(m) * N, B, s_t, out + static_cast<int64_t>(m) * (kSwiGlu ? N / 2 : N), N,
                   first, width, blockIdx.x * blockDim.x + threadIdx.x);
}

// Every block of the launch waits here until all have arrived (the pattern of cooperative groups' grid sync, whose
// cooperative launch ORT's custom-op API does not give us). barrier[0] counts the arrivals, barrier[1] is the
// generation: the last block to arrive resets the count and moves the generation on, which releases the others. So
// a launch may have any grid size, whatever the node's launches before it had. It needs a node's launches never to
// overlap: ORT's CUDA provider runs a session on one stream, so the next launch starts after this one has finished.
// The fences make the block's partial sums visible to the GPU before it arrives.
__device__ void grid_barrier(unsigned int* barrier, unsigned int blocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> count(barrier[0]), generation(barrier[1]);
    __threadfence();
    const unsigned int seen = generation.load(cuda::memory_order_acquire);  // before arriving: it cannot move yet
    if (count.fetch_add(1, cuda::memory_order_acq_rel) == blocks - 1) {
      count.store(0, cuda::memory_order_relaxed);
      generation.fetch_add(1, cuda::memory_order_release);
    } else {
      while (generation.load(cuda::memory_order_acquire) == seen) __nanosleep(32);
    }
    __threadfence();
  }
  __syncthreads();
}

// A decoding step (one row) in one launch: grid lora_one_blocks(...). Blocks take the down step's row blocks and the
// up step's column blocks in turn (grid-stride), so a grid smaller than either still covers both.
template <bool kSwiGlu>
__global__ void lora_one(const __half* __restrict__ y, const __half* __restrict__ x, const __half* __restrict__ A,
                         const __half* __restrict__ B, const __half* __restrict__ mask, float* __restrict__ partial,
                         __half* __restrict__ out, int K, int N, int R, int P, unsigned int* barrier) {
  int first, last;
  active_span(mask, R, &first, &last);
  const int columns = kSwiGlu ? N / 2 : N;
  const int column_blocks = (columns + kThreads - 1) / kThreads;
  if (last < 0) {  // no adapter: the whole grid agrees, so none waits at the barrier
    for (int b = blockIdx.x; b < column_blocks; b += gridDim.x)
      up_step<kSwiGlu>(y, B, nullptr, out, N, 0, 0, b * kThreads + threadIdx.x);
    return;
  }
  for (int p = blockIdx.x; p < P; p += gridDim.x) down_step(x, A, mask, partial, K, R, p, first, last);
  grid_barrier(barrier, gridDim.x);
  if (static_cast<int>(blockIdx.x) >= column_blocks) return;
  const int width = last + 1 - first;
  extern __shared__ float s_t[];  // t[first .. last]
  sum_partials(partial, R, P, first, width, s_t);
  for (int b = blockIdx.x; b < column_blocks; b += gridDim.x)
    up_step<kSwiGlu>(y, B, s_t, out, N, first, width, b * kThreads + threadIdx.x);
}

// Set at warm-up: blocks the GPU holds at once per lora_one kernel (0: it cannot launch).
int g_resident_blocks[2] = {0, 0};

int lora_one_blocks(const LoraResidentShape& shape) {
  const int columns = shape.swiglu ? shape.N / 2 : shape.N;
  return std::max(lora_partial_blocks(shape.K), (columns + kThreads - 1) / kThreads);
}

// Whether a decoding step of `shape` can run as one launch: one row, and a grid the GPU holds at once.
bool one_launch(const LoraResidentShape& shape) {
  return shape.M == 1 && shape.R * sizeof(float) <= kMaxSharedBytes &&
         lora_one_blocks(shape) <= g_resident_blocks[shape.swiglu];
}

template <bool kSwiGlu>
int enqueue(cudaStream_t s, const LoraResidentShape& shape, const void* y, const void* x, const void* A,
            const void* B, const void* mask, void* partial, void* out, void* barrier) {
  const int P = lora_partial_blocks(shape.K);
  const auto* mask16 = static_cast<const __half*>(mask);
  const size_t shared = shape.R * sizeof(float);
  if (barrier != nullptr && one_launch(shape)) {
    lora_one<kSwiGlu><<<lora_one_blocks(shape), kThreads, shared, s>>>(
        static_cast<const __half*>(y), static_cast<const __half*>(x), static_cast<const __half*>(A),
        static_cast<const __half*>(B), mask16, static_cast<float*>(partial), static_cast<__half*>(out), shape.K,
        shape.N, shape.R, P, static_cast<unsigned int*>(barrier));
    return cudaGetLastError() == cudaSuccess ? 0 : 1;
  }
  lora_down<<<dim3(P, shape.M), kThreads, 0, s>>>(static_cast<const __half*>(x), static_cast<const __half*>(A), mask16,
                                                  static_cast<float*>(partial), shape.K, shape.R, P);
  const int columns = kSwiGlu ? shape.N / 2 : shape.N;
  lora_up<kSwiGlu><<<dim3((columns + kThreads - 1) / kThreads, shape.M), kThreads, shared, s>>>(
      static_cast<const __half*>(y), static_cast<const __half*>(B), mask16, static_cast<const float*>(partial),
      static_cast<__half*>(out), shape.N, shape.R, P);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}

}  // namespace

void* lora_resident_cuda_barrier() {
  void* counter = nullptr;  // [count, generation]
  if (cudaMalloc(&counter, 2 * sizeof(unsigned int)) != cudaSuccess) return nullptr;
  if (cudaMemset(counter, 0, 2 * sizeof(unsigned int)) != cudaSuccess) {
    cudaFree(counter);
    return nullptr;
  }
  return counter;
}

void lora_resident_cuda_free(void* barrier) {
  if (barrier != nullptr) cudaFree(barrier);
}

int lora_resident_cuda_warm_up() {
  // Load the kernels now, at session creation: a lazy load inside ORT's CUDA graph capture would break it.
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, lora_down) != cudaSuccess) return 1;
  if (cudaFuncGetAttributes(&attributes, lora_up<false>) != cudaSuccess) return 1;
  if (cudaFuncGetAttributes(&attributes, lora_up<true>) != cudaSuccess) return 1;
  // lora_one's grid barrier needs every block resident at once: count what the GPU holds (with the most shared
  // memory a block may ask for), and launch lora_one only for grids within it
  int device = 0, sms = 0, per_sm[2] = {0, 0};
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[0], lora_one<false>, kThreads, kMaxSharedBytes) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[1], lora_one<true>, kThreads, kMaxSharedBytes) !=
          cudaSuccess)
    return 1;
  for (int i = 0; i < 2; ++i) g_resident_blocks[i] = per_sm[i] * sms;
  return 0;
}

int lora_resident_cuda(void* stream, const LoraResidentShape& shape, const void* y, const void* x, const void* A,
                       const void* B, const void* mask, void* partial, void* out, void* barrier) {
  auto s = static_cast<cudaStream_t>(stream);
  return shape.swiglu ? enqueue<true>(s, shape, y, x, A, B, mask, partial, out, barrier)
                      : enqueue<false>(s, shape, y, x, A, B, mask, partial, out, barrier);
}
