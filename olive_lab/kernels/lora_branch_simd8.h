// The 8-wide kernels of lora_branch.cc (float32 FMAs on float16 or int8 loads). lora_branch.cc includes this file
// twice, inside its anonymous namespace: in namespace avx with OLIVE_LAB_SIMD = target("avx,fma,f16c"), and in
// namespace avx2 with AVX2 added and OLIVE_LAB_SIMD_AVX2 = 1, where int8 widens in one instruction instead of two
// halves. The arithmetic is the same in both, so are the bits; lora_branch.cc picks one at run time. No include
// guard, by design.

OLIVE_LAB_SIMD inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
OLIVE_LAB_SIMD inline __m256 load8(const int8_t* p) {
  const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
#if OLIVE_LAB_SIMD_AVX2
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
#else  // AVX has no 256-bit integer ops: widen each half to 4 int32, then join them
  const __m256i wide = _mm256_insertf128_si256(_mm256_castsi128_si256(_mm_cvtepi8_epi32(q)),
                                               _mm_cvtepi8_epi32(_mm_srli_si128(q, 4)), 1);
  return _mm256_cvtepi32_ps(wide);
#endif
}

// t[0:8V] = x @ A[:, 0:8V] for one row x; A's rows are `stride` weights apart. V accumulators stay in registers.
template <int V, typename W>
OLIVE_LAB_SIMD void down_block(const float* x, const W* A, int64_t K, int64_t stride, float* t) {
  __m256 acc[V];
  OLIVE_LAB_UNROLL
  for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 xk = _mm256_broadcast_ss(x + k);
    const W* a = A + k * stride;
    OLIVE_LAB_UNROLL
    for (int v = 0; v < V; ++v) acc[v] = _mm256_fmadd_ps(xk, load8(a + 8 * v), acc[v]);
  }
  OLIVE_LAB_UNROLL
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(t + 8 * v, acc[v]);
}

// out[0:8V] = y[0:8V] + t[0:r] @ B[0:r, 0:8V]; B's rows are `stride` weights apart.
template <int V, typename W>
OLIVE_LAB_SIMD void up_block(const float* y, const float* t, const W* B, int64_t r, int64_t stride, float* out) {
  __m256 acc[V];
  OLIVE_LAB_UNROLL
  for (int v = 0; v < V; ++v) acc[v] = _mm256_loadu_ps(y + 8 * v);
  for (int64_t i = 0; i < r; ++i) {
    const __m256 ti = _mm256_broadcast_ss(t + i);
    const W* b = B + i * stride;
    OLIVE_LAB_UNROLL
    for (int v = 0; v < V; ++v) acc[v] = _mm256_fmadd_ps(ti, load8(b + 8 * v), acc[v]);
  }
  OLIVE_LAB_UNROLL
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(out + 8 * v, acc[v]);
}

template <typename W>
OLIVE_LAB_SIMD void down_any(const float* x, const W* A, int64_t K, int64_t stride, int64_t width, float* t) {
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
    for (int64_t k = 0; k < K; ++k) sum += x[k] * weight(A[k * stride + j]);
    t[j] = sum;
  }
}

template <typename W>
OLIVE_LAB_SIMD void down_simd(const BranchShape& s, const float* x, const W* A, int64_t k0, int64_t k1, float* t) {
  const int64_t R = s.P * s.r;
  down_any(x + k0, A + k0 * R, k1 - k0, R, R, t);
}

template <typename W>
OLIVE_LAB_SIMD void up_simd(const BranchShape& s, const float* y, const float* t, const W* B, int64_t n0, int64_t n1,
                            float* out) {
  int64_t c = 0;
  for (int64_t p = 0; p < s.P; c += s.widths[p++]) {
    const int64_t begin = c > n0 ? c : n0, end = c + s.widths[p] < n1 ? c + s.widths[p] : n1;
    const float* tp = t + p * s.r;
    int64_t n = begin;
    for (; n + 64 <= end; n += 64) up_block<8>(y + n, tp, B + n, s.r, s.N, out + n);
    for (; n + 8 <= end; n += 8) up_block<1>(y + n, tp, B + n, s.r, s.N, out + n);
    for (; n < end; ++n) {
      float sum = y[n];
      for (int64_t i = 0; i < s.r; ++i) sum += tp[i] * weight(B[i * s.N + n]);
      out[n] = sum;
    }
  }
}

