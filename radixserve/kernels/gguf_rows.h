// The SIMD rows of gguf_matmul.cpp, compiled once per instruction set: gguf_matmul.cpp includes this
// file inside a `#pragma GCC target` region and a namespace of its own, with kVnni set to whether
// AVX-512 VNNI's vpdpbusd may be used (else AVX2's vpmaddubsw + vpmaddwd).

// Q8_0 without VNNI goes in as |q| times x with q's sign, not as q + 128: vpmaddubsw adds byte
// products in pairs into int16, which 255 * 127 * 2 would overflow.
template <int64_t kFormat>
constexpr bool kBySign = kFormat == kQ8_0 && !kVnni;

// (d, c) of a block, w = d * u + c: one pair, or one per half (kHalves; c unused where kBySign: no
// offset to undo).
struct Scale {
  float d0, c0, d1, c1;
};

// Block b of a row of Q4_0, Q4_1 or Q8_0 (the K-quants: super_block).
template <int64_t kFormat>
inline Scale scales(const uint8_t* row, int64_t b) {
  Scale s{};
  const uint8_t* blk = row + b * block_bytes(kFormat);
  uint16_t bits[2];
  std::memcpy(bits, blk, sizeof bits);
  s.d0 = _cvtsh_ss(bits[0]);
  if constexpr (kFormat == kQ4_1) s.c0 = _cvtsh_ss(bits[1]);
  else if constexpr (kFormat == kQ4_0) s.c0 = -8.0f * s.d0;
  else s.c0 = kBySign<kFormat> ? 0.0f : -128.0f * s.d0;
  return s;
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Block b of a row of Q4_0, Q4_1 or Q8_0: its 32 values in element order (u, or q itself where kBySign).
template <int64_t kFormat>
inline __m256i values(const uint8_t* row, int64_t b) {
  if constexpr (kFormat == kQ8_0) {
    const __m256i q = load32(row + b * block_bytes(kFormat) + 2);
    return kBySign<kFormat> ? q : _mm256_xor_si256(q, _mm256_set1_epi8(-128));
  } else {
    const uint8_t* blk = row + b * block_bytes(kFormat);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (kFormat == kQ4_1 ? 4 : 2)));
    const __m128i low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
  }
}

// A K-quant super-block's eight blocks at once: the scales unpacked once, every 32 bytes of nibbles
// loaded once for the two blocks they hold, shifts by constants (Q5_K's fifth bits aside).
template <int64_t kFormat>
inline void super_block(const uint8_t* sup, __m256i* u, Scale* s) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (kFormat == kQ6_K) {
    uint16_t bits;
    std::memcpy(&bits, sup + 208, sizeof bits);
    const float d = _cvtsh_ss(bits);
    const int8_t* scale = reinterpret_cast<const int8_t*>(sup + 192);
    const __m256i low2 = _mm256_set1_epi8(3);
    for (int64_t half = 0; half < 2; ++half) {
      const __m256i lo0 = load32(sup + 64 * half), lo1 = load32(sup + 64 * half + 32);
      const __m256i hi = load32(sup + 128 + 32 * half);
      const auto high = [&](__m256i h) { return _mm256_slli_epi16(_mm256_and_si256(h, low2), 4); };
      u[4 * half] = _mm256_or_si256(_mm256_and_si256(lo0, low4), high(hi));
      u[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(lo1, low4), high(_mm256_srli_epi16(hi, 2)));
      u[4 * half + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo0, 4), low4), high(_mm256_srli_epi16(hi, 4)));
      u[4 * half + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo1, 4), low4), high(_mm256_srli_epi16(hi, 6)));
      for (int64_t k = 0; k < 4; ++k) {
        Scale& t = s[4 * half + k];
        t.d0 = d * static_cast<float>(scale[8 * half + 2 * k]);
        t.d1 = d * static_cast<float>(scale[8 * half + 2 * k + 1]);
        t.c0 = -32.0f * t.d0;
        t.c1 = -32.0f * t.d1;
      }
    }
  } else {
    uint16_t bits[2];
    std::memcpy(bits, sup, sizeof bits);
    const float d = _cvtsh_ss(bits[0]), dmin = _cvtsh_ss(bits[1]);
    for (int64_t j = 0; j < 8; ++j) {
      int32_t scale, min;
      scale_min_k4(sup + 4, j, &scale, &min);
      s[j].d0 = d * static_cast<float>(scale);
      s[j].c0 = -dmin * static_cast<float>(min);
    }
    const uint8_t* nibbles = sup + (kFormat == kQ5_K ? 48 : 16);
    for (int64_t c = 0; c < 4; ++c) {
      const __m256i raw = load32(nibbles + 32 * c);
      u[2 * c] = _mm256_and_si256(raw, low4);
      u[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
    }
    if constexpr (kFormat == kQ5_K) {  // bit j of each of the 32 bytes: element l's fifth bit in block j
      const __m256i fifth = load32(sup + 16), one = _mm256_set1_epi8(1);
      for (int64_t j = 0; j < 8; ++j)
        u[j] = _mm256_or_si256(u[j], _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(fifth, _mm_cvtsi64_si128(j)), one), 4));
    }
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

// One block into the token's accumulator. The 8 partial sums of block_dot are 4 bytes each, in order:
// the first four cover the first half of the block.
template <int64_t kFormat>
inline void accumulate(__m256i u, const Scale& s, const QuantX& x, int64_t xb, __m256& acc, float& corr) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + xb * kBlock));
  const __m256 dot = _mm256_cvtepi32_ps(block_dot<kFormat>(u, q));
  if constexpr (kHalves<kFormat>) {
    const float dx = x.d[xb];
    acc = _mm256_fmadd_ps(dot, _mm256_set_m128(_mm_set1_ps(s.d1 * dx), _mm_set1_ps(s.d0 * dx)), acc);
    corr += s.c0 * x.h[2 * xb] + s.c1 * x.h[2 * xb + 1];
  } else {
    acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(s.d0 * x.d[xb]), acc);
    if constexpr (!kBySign<kFormat>) corr += s.c0 * x.s[xb];
  }
}

// y[t, n] for the rows n in [n0, n1) and every t. Blocks alternate between two accumulators per token,
// so that a single token's fused multiply-adds do not wait on each other.
template <int64_t kFormat>
void rows(const uint8_t* w, int64_t nb, const QuantX& x, int64_t tokens, float* y, int64_t n_total,
          int64_t n0, int64_t n1) {
  const int64_t row_bytes = nb * kBlock / block_weights(kFormat) * block_bytes(kFormat);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t t0 = 0; t0 < tokens; t0 += kTile) {
      const int64_t tt = std::min(kTile, tokens - t0);
      __m256 even[kTile], odd[kTile];
      float corr[kTile] = {};
      for (int64_t i = 0; i < kTile; ++i) even[i] = odd[i] = _mm256_setzero_ps();
      if constexpr (kFormat >= kQ4_K) {
        __m256i u[8];
        Scale s[8];
        for (int64_t b = 0; b < nb; b += 8) {
          super_block<kFormat>(row + b / 8 * block_bytes(kFormat), u, s);
          for (int64_t i = 0; i < tt; ++i) {
            const int64_t xb = (t0 + i) * nb + b;
            for (int64_t j = 0; j < 8; j += 2) {
              accumulate<kFormat>(u[j], s[j], x, xb + j, even[i], corr[i]);
              accumulate<kFormat>(u[j + 1], s[j + 1], x, xb + j + 1, odd[i], corr[i]);
            }
          }
        }
        for (int64_t i = 0; i < tt; ++i) y[(t0 + i) * n_total + n] = hsum(_mm256_add_ps(even[i], odd[i])) + corr[i];
        continue;
      }
      int64_t b = 0;
      for (; b + 2 <= nb; b += 2) {
        const Scale s0 = scales<kFormat>(row, b), s1 = scales<kFormat>(row, b + 1);
        const __m256i u0 = values<kFormat>(row, b), u1 = values<kFormat>(row, b + 1);
        for (int64_t i = 0; i < tt; ++i) {
          const int64_t xb = (t0 + i) * nb + b;
          accumulate<kFormat>(u0, s0, x, xb, even[i], corr[i]);
          accumulate<kFormat>(u1, s1, x, xb + 1, odd[i], corr[i]);
        }
      }
      if (b < nb) {
        const Scale s = scales<kFormat>(row, b);
        const __m256i u = values<kFormat>(row, b);
        for (int64_t i = 0; i < tt; ++i) accumulate<kFormat>(u, s, x, (t0 + i) * nb + b, even[i], corr[i]);
      }
      for (int64_t i = 0; i < tt; ++i) y[(t0 + i) * n_total + n] = hsum(_mm256_add_ps(even[i], odd[i])) + corr[i];
    }
  }
}
