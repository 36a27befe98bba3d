// The SIMD rows of gguf_matmul.cpp, compiled once per instruction set: gguf_matmul.cpp includes this
// file inside a `#pragma GCC target` region and a namespace of its own, with kVnni set to whether
// AVX-512 VNNI's vpdpbusd may be used (else AVX2's vpmaddubsw + vpmaddwd).

// Q8_0 without VNNI goes in as |q| times x with q's sign, not as q + 128: vpmaddubsw adds byte
// products in pairs into int16, which 255 * 127 * 2 would overflow.
template <int64_t kFormat>
constexpr bool kBySign = kFormat == kQ8_0 && !kVnni;

// (d, c) of a block: w = d * u + c (c = 0 where kBySign: no offset to undo).
template <int64_t kFormat>
inline void scales(const uint8_t* blk, float* d, float* c) {
  uint16_t bits[2];
  std::memcpy(bits, blk, sizeof bits);
  *d = _cvtsh_ss(bits[0]);
  if constexpr (kFormat == kQ4_1) *c = _cvtsh_ss(bits[1]);
  else if constexpr (kFormat == kQ4_0) *c = -8.0f * *d;
  else *c = kBySign<kFormat> ? 0.0f : -128.0f * *d;
}

// The block's 32 values in element order: u, or q itself where kBySign.
template <int64_t kFormat>
inline __m256i values(const uint8_t* blk) {
  if constexpr (kFormat == kQ8_0) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    return kBySign<kFormat> ? q : _mm256_xor_si256(q, _mm256_set1_epi8(-128));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (kFormat == kQ4_1 ? 4 : 2)));
    const __m128i low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
  }
}

// Σ u qx over a block, as 8 int32 partial sums.
template <int64_t kFormat>
inline __m256i block_dot(__m256i u, __m256i q) {
  if constexpr (kBySign<kFormat>) {
    q = _mm256_sign_epi8(q, u);
    u = _mm256_sign_epi8(u, u);
  }
  if constexpr (kVnni) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One block into the token's accumulator.
template <int64_t kFormat>
inline void accumulate(__m256i u, float d, float c, const QuantX& x, int64_t xb, __m256& acc, float& corr) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + xb * kBlock));
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<kFormat>(u, q)), _mm256_set1_ps(d * x.d[xb]), acc);
  if constexpr (!kBySign<kFormat>) corr += c * x.s[xb];
}

// y[t, n] for the rows n in [n0, n1) and every t. Blocks alternate between two accumulators per token,
// so that a single token's fused multiply-adds do not wait on each other.
template <int64_t kFormat>
void rows(const uint8_t* w, int64_t nb, const QuantX& x, int64_t tokens, float* y, int64_t n_total,
          int64_t n0, int64_t n1) {
  constexpr int64_t bytes = block_bytes(kFormat);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * nb * bytes;
    for (int64_t t0 = 0; t0 < tokens; t0 += kTile) {
      const int64_t tt = std::min(kTile, tokens - t0);
      __m256 even[kTile], odd[kTile];
      float corr[kTile] = {};
      for (int64_t i = 0; i < kTile; ++i) even[i] = odd[i] = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 2 <= nb; b += 2) {
        float d0, c0, d1, c1;
        scales<kFormat>(row + b * bytes, &d0, &c0);
        scales<kFormat>(row + (b + 1) * bytes, &d1, &c1);
        const __m256i u0 = values<kFormat>(row + b * bytes), u1 = values<kFormat>(row + (b + 1) * bytes);
        for (int64_t i = 0; i < tt; ++i) {
          const int64_t xb = (t0 + i) * nb + b;
          accumulate<kFormat>(u0, d0, c0, x, xb, even[i], corr[i]);
          accumulate<kFormat>(u1, d1, c1, x, xb + 1, odd[i], corr[i]);
        }
      }
      if (b < nb) {
        float d, c;
        scales<kFormat>(row + b * bytes, &d, &c);
        const __m256i u = values<kFormat>(row + b * bytes);
        for (int64_t i = 0; i < tt; ++i) accumulate<kFormat>(u, d, c, x, (t0 + i) * nb + b, even[i], corr[i]);
      }
      for (int64_t i = 0; i < tt; ++i) y[(t0 + i) * n_total + n] = hsum(_mm256_add_ps(even[i], odd[i])) + corr[i];
    }
  }
}
