// Small vector helpers shared by the CPU kernels: widening rows to float32 and back, multiply-adds,
// prefetches, and bfloat16 dot products where the CPU has AVX512-BF16.
#pragma once

#include <torch/extension.h>

#include <type_traits>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace radixserve {

// dst = src in float32. A bfloat16 is a float32's top half: a shift, which compilers vectorise.
template <typename scalar_t>
inline void load_f32(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// dst = src rounded to scalar_t (to nearest even, as torch does).
template <typename scalar_t>
inline void store_f32(const float* src, scalar_t* dst, int64_t n) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (n % 16 == 0) {
      for (int64_t i = 0; i < n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// acc += a * x
inline void axpy(float* __restrict__ acc, float a, const float* __restrict__ x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += a * x[i];
}

// Requests a row's cache lines ahead of its use (for rows the hardware prefetcher cannot predict).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(scalar_t)); off += 64) __builtin_prefetch(p + off);
}

#if defined(__AVX512BF16__)
// 16 bfloat16 values widened to float32.
inline __m512 widen16(const c10::BFloat16* src) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16));
}

// a · b for n a multiple of 32: bfloat16 pair products (vdpbf16ps), float32 accumulation.
inline float dot_bf16(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) {
  const __m512i* av = reinterpret_cast<const __m512i*>(a);
  const __m512i* bv = reinterpret_cast<const __m512i*>(b);
  __m512 s = _mm512_setzero_ps();
  for (int64_t c = 0; c < n / 32; ++c)
    s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(av + c), (__m512bh)_mm512_loadu_si512(bv + c));
  return _mm512_reduce_add_ps(s);
}
#endif

}  // namespace radixserve
