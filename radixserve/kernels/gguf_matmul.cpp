// y = x · Wᵀ with W in a GGUF file's own block format (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), read as stored.
//
// Each row of W is the file's blocks, as stored. The kernels see every format as 32-weight blocks
// w = d * u + c, with u an unsigned byte (Q6_K: d and c per half of 16):
//   Q4_0 (18 bytes per 32): a float16 d, then 16 bytes of 4-bit q (element j in the low nibble of byte
//        j, element j + 16 in its high nibble): u = q, c = -8 d
//   Q4_1 (20 bytes): d and an offset m as float16, then q as Q4_0: u = q, c = m
//   Q8_0 (34 bytes): d, then 32 signed bytes q: u = q + 128, c = -128 d (the portable path and AVX2
//        take the signed q as it is, with c = 0)
//   Q4_K, Q5_K (144, 176 bytes per 256): float16 d and dmin, 12 bytes of eight 6-bit (scale, min)
//        pairs, [Q5_K: 32 bytes with each element's fifth bit], 128 bytes of low nibbles (64-element
//        chunks: the first 32 in the low nibbles of 32 bytes, the next 32 in their high nibbles):
//        u = q (4 or 5 bits), d = d * scale, c = -dmin * min per block of 32
//   Q6_K (210 bytes per 256): 128 bytes of low nibbles, 64 bytes of 2-bit highs, sixteen int8 scales
//        (one per 16 elements), float16 d: u = q (6 bits), d = d * scale, c = -32 d * scale
// The rows of x are quantised per block of 32 to 8 bits (x ≈ dx * qx, dx = max|x| / 127), so that a
// block's dot product is  d dx Σ u qx  +  c dx Σ qx : the first sum is one integer instruction per 32
// (AVX2 vpmaddubsw, Q8_0 there by sign instead of offset) or 64 (AVX-512 VNNI vpdpbusd) weights, the
// second is known once per x block (per half block for Q6_K).
// Reading 4.5-8.5 bits per weight instead of 16 or 32 is what bounds a decode step on a CPU.
//
// The SIMD rows are compiled once per instruction set from gguf_rows.h (AVX2; AVX-512 VNNI) and chosen
// at run time from the CPU's features; the portable path is the reference the tests hold the others to
// (same integer sums, so the results match to float rounding). The module as a whole is still built per
// CPU with -march=native (kernels/__init__.py), so on an AVX-512 machine the compiler may encode the
// "AVX2" rows with AVX-512 instructions; on an AVX2-only machine they are AVX2.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
enum Format : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };  // GGML type ids
enum Isa : int64_t { kAuto = 0, kGeneric = 1, kAvx2 = 2, kAvx512 = 3 };

// Bytes and weights of one stored block (a K-quant's super-block holds eight blocks of 32).
constexpr int64_t block_bytes(int64_t format) {
  switch (format) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ8_0: return 34;
    case kQ4_K: return 144;
    case kQ5_K: return 176;
    case kQ6_K: return 210;
    default: return 0;
  }
}

constexpr int64_t block_weights(int64_t format) { return format >= kQ4_K ? 256 : 32; }

// Q6_K's blocks of 32 have a scale per half: the offset term needs x's sums per half.
template <int64_t kFormat>
constexpr bool kHalves = kFormat == kQ6_K;

void check_format(int64_t format) {
  TORCH_CHECK(block_bytes(format) > 0, "unsupported GGUF block type ", format,
              " (supported: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)");
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// x quantised per block: qx int8 [T, K], dx [T, nb], sx = dx * Σ qx [T, nb], and dx * Σ qx per half
// block [T, nb, 2].
struct QuantX {
  std::vector<int8_t> q;
  std::vector<float> d, s, h;
};

QuantX quantize_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t nb = k / kBlock;
  QuantX out{std::vector<int8_t>(rows * k), std::vector<float>(rows * nb), std::vector<float>(rows * nb),
             std::vector<float>(rows * nb * 2)};
  at::parallel_for(0, rows * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* v = x + i * kBlock;
      float amax = 0.0f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
      int32_t sum[2] = {0, 0};
      int8_t* q = out.q.data() + i * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
        sum[j / 16] += q[j];
      }
      out.d[i] = d;
      out.s[i] = d * static_cast<float>(sum[0] + sum[1]);
      out.h[2 * i] = d * static_cast<float>(sum[0]);
      out.h[2 * i + 1] = d * static_cast<float>(sum[1]);
    }
  });
  return out;
}

// A K-quant's (scale, min) pair j of its 12 packed bytes: 6 bits each, the high two bits of pairs 4-7
// kept in the top bits of pairs 0-3.
inline void scale_min_k4(const uint8_t* packed, int64_t j, int32_t* scale, int32_t* min) {
  if (j < 4) {
    *scale = packed[j] & 63;
    *min = packed[j + 4] & 63;
  } else {
    *scale = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4);
    *min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
}

// Block j (of 8) of a K-quant super-block: u[32], and (d, c) for each half.
template <int64_t kFormat>
void unpack_k(const uint8_t* sup, int64_t j, uint8_t* u, float* d, float* c) {
  if constexpr (kFormat == kQ6_K) {
    const int64_t half = j / 4, k = j % 4;
    const uint8_t* low = sup + 64 * half + 32 * (k % 2);
    const uint8_t* high = sup + 128 + 32 * half;
    const int8_t* scale = reinterpret_cast<const int8_t*>(sup + 192) + 8 * half + 2 * k;
    for (int64_t l = 0; l < kBlock; ++l)
      u[l] = ((low[l] >> (4 * (k / 2))) & 0x0F) | (((high[l] >> (2 * k)) & 3) << 4);
    for (int64_t h = 0; h < 2; ++h) {
      d[h] = half_at(sup + 208) * static_cast<float>(scale[h]);
      c[h] = -32.0f * d[h];
    }
  } else {
    int32_t scale, min;
    scale_min_k4(sup + 4, j, &scale, &min);
    const uint8_t* low = sup + (kFormat == kQ5_K ? 48 : 16) + 32 * (j / 2);
    for (int64_t l = 0; l < kBlock; ++l) {
      u[l] = (low[l] >> (4 * (j % 2))) & 0x0F;
      if constexpr (kFormat == kQ5_K) u[l] |= ((sup[16 + l] >> j) & 1) << 4;
    }
    d[0] = d[1] = half_at(sup) * static_cast<float>(scale);
    c[0] = c[1] = -half_at(sup + 2) * static_cast<float>(min);
  }
}

// The portable path, the reference of the others: one block at a time, in plain integer arithmetic.
template <int64_t kFormat>
void rows_generic(const uint8_t* w, int64_t nb, const QuantX& x, int64_t tokens, float* y, int64_t n_total,
                  int64_t n0, int64_t n1) {
  constexpr int64_t bytes = block_bytes(kFormat);
  const int64_t row_bytes = nb * kBlock / block_weights(kFormat) * bytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t t = 0; t < tokens; ++t) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* q = x.q.data() + (t * nb + b) * kBlock;
        const int64_t xb = t * nb + b;
        if constexpr (kFormat >= kQ4_K) {
          uint8_t u[kBlock];
          float d[2], c[2];
          unpack_k<kFormat>(row + b / 8 * bytes, b % 8, u, d, c);
          int32_t dot[2] = {0, 0};
          for (int64_t j = 0; j < kBlock; ++j) dot[j / 16] += static_cast<int32_t>(u[j]) * q[j];
          acc += x.d[xb] * (d[0] * static_cast<float>(dot[0]) + d[1] * static_cast<float>(dot[1])) +
                 c[0] * x.h[2 * xb] + c[1] * x.h[2 * xb + 1];
          continue;
        }
        const uint8_t* blk = row + b * bytes;
        const float d = half_at(blk);
        const float c = kFormat == kQ4_1 ? half_at(blk + 2) : kFormat == kQ4_0 ? -8.0f * d : 0.0f;
        int32_t dot = 0;
        if constexpr (kFormat == kQ8_0) {
          const int8_t* v = reinterpret_cast<const int8_t*>(blk + 2);
          for (int64_t j = 0; j < kBlock; ++j) dot += static_cast<int32_t>(v[j]) * q[j];
        } else {
          const uint8_t* v = blk + (kFormat == kQ4_1 ? 4 : 2);
          for (int64_t j = 0; j < 16; ++j) dot += (v[j] & 0x0F) * q[j] + (v[j] >> 4) * q[j + 16];
        }
        acc += d * x.d[xb] * static_cast<float>(dot) + c * x.s[xb];
      }
      y[t * n_total + n] = acc;
    }
  }
}

// Tokens per pass over a weight row: each unpacked block serves this many rows of x.
constexpr int64_t kTile = 4;

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr bool kVnni = false;
#include "gguf_rows.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace avx512 {
constexpr bool kVnni = true;
#include "gguf_rows.h"
}  // namespace avx512
#pragma GCC pop_options

using RowsFn = void (*)(const uint8_t*, int64_t, const QuantX&, int64_t, float*, int64_t, int64_t, int64_t);

template <int64_t kFormat>
RowsFn rows_for(int64_t isa) {
  return isa == kAvx512 ? avx512::rows<kFormat> : isa == kAvx2 ? avx2::rows<kFormat> : rows_generic<kFormat>;
}

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return kAvx2;
  return kGeneric;
}

}  // namespace

int64_t gguf_isa() {
  static const Isa isa = best_isa();
  return isa;
}

torch::Tensor gguf_matmul(torch::Tensor x, torch::Tensor weight, int64_t format, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a CPU matrix [tokens, in]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kUInt8 && weight.is_contiguous(),
              "weight must be contiguous uint8 rows of GGUF blocks");
  check_format(format);
  const int64_t k = x.size(1), tokens = x.size(0), n = weight.size(0), nb = k / kBlock;
  const int64_t per_block = block_weights(format), row_bytes = k / per_block * block_bytes(format);
  TORCH_CHECK(k % per_block == 0, "GGUF block type ", format, " needs inputs in multiples of ", per_block, ", got ", k);
  TORCH_CHECK(weight.size(1) == row_bytes, "weight rows hold ", weight.size(1), " bytes; ", k, " inputs need ", row_bytes);
  if (isa == kAuto) isa = gguf_isa();
  TORCH_CHECK(isa >= kGeneric && isa <= gguf_isa(), "instruction set ", isa, " is not available on this CPU");
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  const QuantX qx = quantize_rows(xf.data_ptr<float>(), tokens, k);
  torch::Tensor y = torch::empty({tokens, n}, xf.options());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  const RowsFn rows = format == kQ4_0   ? rows_for<kQ4_0>(isa)
                      : format == kQ4_1 ? rows_for<kQ4_1>(isa)
                      : format == kQ8_0 ? rows_for<kQ8_0>(isa)
                      : format == kQ4_K ? rows_for<kQ4_K>(isa)
                      : format == kQ5_K ? rows_for<kQ5_K>(isa)
                                        : rows_for<kQ6_K>(isa);
  // Output rows in chunks that keep the step's x blocks hot in cache while the weights stream by.
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) { rows(w, nb, qx, tokens, out, n, n0, n1); });
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}
