// y = x · Wᵀ with W in a GGUF file's own block format (Q4_0, Q4_1, Q8_0), read as stored.
//
// Each row of W is the file's blocks of 32 weights, as stored: a float16 scale d (and for Q4_1 an offset
// m), then 16 bytes of 4-bit values (Q4_*: element j in the low nibble of byte j, element j + 16 in its
// high nibble) or 32 signed bytes (Q8_0). Every block is w = d * u + c with u an unsigned byte:
//   Q4_0: u = q,       c = -8 d;   Q4_1: u = q, c = m;   Q8_0: u = q + 128, c = -128 d
// (the portable path and AVX2 take Q8_0's signed q as it is, with c = 0).
// The rows of x are quantised per block of 32 to 8 bits (x ≈ dx * qx, dx = max|x| / 127), so that a
// block's dot product is  d dx Σ u qx  +  c dx Σ qx : the first sum is one integer instruction per 32
// (AVX2 vpmaddubsw, Q8_0 there by sign instead of offset) or 64 (AVX-512 VNNI vpdpbusd) weights, the
// second is known once per x block.
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
enum Format : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };  // GGML type ids
enum Isa : int64_t { kAuto = 0, kGeneric = 1, kAvx2 = 2, kAvx512 = 3 };

constexpr int64_t block_bytes(int64_t format) {
  return format == kQ4_0 ? 18 : format == kQ4_1 ? 20 : format == kQ8_0 ? 34 : 0;
}

void check_format(int64_t format) {
  TORCH_CHECK(block_bytes(format) > 0, "unsupported GGUF block type ", format, " (supported: Q4_0, Q4_1, Q8_0)");
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// x quantised per block: qx int8 [T, K], dx [T, nb], sx = dx * Σ qx [T, nb].
struct QuantX {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

QuantX quantize_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t nb = k / kBlock;
  QuantX out{std::vector<int8_t>(rows * k), std::vector<float>(rows * nb), std::vector<float>(rows * nb)};
  at::parallel_for(0, rows * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* v = x + i * kBlock;
      float amax = 0.0f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
      int32_t sum = 0;
      int8_t* q = out.q.data() + i * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
        sum += q[j];
      }
      out.d[i] = d;
      out.s[i] = d * static_cast<float>(sum);
    }
  });
  return out;
}

// The portable path, the reference of the others: one block at a time, in plain integer arithmetic.
template <int64_t kFormat>
void rows_generic(const uint8_t* w, int64_t nb, const QuantX& x, int64_t tokens, float* y, int64_t n_total,
                  int64_t n0, int64_t n1) {
  constexpr int64_t bytes = block_bytes(kFormat);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * nb * bytes;
    for (int64_t t = 0; t < tokens; ++t) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bytes;
        const float d = half_at(blk);
        const float c = kFormat == kQ4_1 ? half_at(blk + 2) : kFormat == kQ4_0 ? -8.0f * d : 0.0f;
        const int8_t* q = x.q.data() + (t * nb + b) * kBlock;
        int32_t dot = 0;
        if constexpr (kFormat == kQ8_0) {
          const int8_t* v = reinterpret_cast<const int8_t*>(blk + 2);
          for (int64_t j = 0; j < kBlock; ++j) dot += static_cast<int32_t>(v[j]) * q[j];
        } else {
          const uint8_t* v = blk + (kFormat == kQ4_1 ? 4 : 2);
          for (int64_t j = 0; j < 16; ++j) dot += (v[j] & 0x0F) * q[j] + (v[j] >> 4) * q[j + 16];
        }
        acc += d * x.d[t * nb + b] * static_cast<float>(dot) + c * x.s[t * nb + b];
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
  TORCH_CHECK(k % kBlock == 0 && weight.size(1) == nb * block_bytes(format), "weight rows hold ", weight.size(1),
              " bytes; ", k, " inputs need ", nb * block_bytes(format));
  if (isa == kAuto) isa = gguf_isa();
  TORCH_CHECK(isa >= kGeneric && isa <= gguf_isa(), "instruction set ", isa, " is not available on this CPU");
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  const QuantX qx = quantize_rows(xf.data_ptr<float>(), tokens, k);
  torch::Tensor y = torch::empty({tokens, n}, xf.options());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  const RowsFn rows = format == kQ4_0 ? rows_for<kQ4_0>(isa) : format == kQ4_1 ? rows_for<kQ4_1>(isa) : rows_for<kQ8_0>(isa);
  // Output rows in chunks that keep the step's x blocks hot in cache while the weights stream by.
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) { rows(w, nb, qx, tokens, out, n, n0, n1); });
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}
