// Shared by the op's glue (lora_resident.cc) and its CUDA kernels (lora_resident_cuda.cu).
#pragma once
#include <stdint.h>

// lora_down splits the K rows of A into blocks of this many; each block writes one partial sum per column.
constexpr int kRowsPerBlock = 64;
constexpr int lora_partial_blocks(int K) { return (K + kRowsPerBlock - 1) / kRowsPerBlock; }

struct LoraResidentShape {
  int M;  // rows of x and y: batch x sequence
  int K;  // in_features
  int N;  // out_features
  int R;  // columns of A (adapters x rank)
  // LoraResidentSwiGlu: out [M, N / 2] = silu(z[:, :N / 2]) * z[:, N / 2:] of z = LoraResident's out, the
  // packed gate/up projection's activation (the Split, Sigmoid and two Muls ORT would run after it)
  bool swiglu;
};

// Enqueue the op on `stream` (a cudaStream_t); 0 on success. `barrier`: the op kernel's counter
// (lora_resident_cuda_barrier), which a decoding step's single launch needs; null runs two launches.
int lora_resident_cuda(void* stream, const LoraResidentShape& shape, const void* y, const void* x, const void* A,
                       const void* B, const void* mask, void* partial, void* out, void* barrier);
// Load the kernels and count what the GPU holds (0 on success); called when a session creates the op's kernel,
// before any graph capture.
int lora_resident_cuda_warm_up();
// A zeroed 8-byte device counter for lora_one's grid barrier, one per op kernel (null if it cannot be allocated),
// and its release.
void* lora_resident_cuda_barrier();
void lora_resident_cuda_free(void* barrier);
