// Seeded sampling as an exponential race, with the noise computed in registers.
//
// For token t of a row, E_t ~ Exp(1) is a pure function of (seed, step, t) through splitmix64, and the
// drawn token is argmax_t (logit_t - log E_t), which is token t with probability softmax(logits)_t
// (sampling/sampler.py explains the scheme; its torch path is the reference). The torch path builds
// the noise as [rows, vocab] int64 and float32 tensors — about 10 of them, 250 MB per step at 64 rows
// of a 49k vocabulary, which the allocator keeps as a fragmented heap — this kernel computes it block
// by block on the stack, and skips a block whose largest logit cannot win (the noise -log E is below
// 16.7 whatever the token).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kMix2 = 0x94D049BB133111EBull;

// -log E < 16.64 for the largest u the hash can give (1 - 2^-24); a margin covers rounding.
constexpr float kNoiseMax = 17.0f;
constexpr int64_t kBlock = 512;

inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= kMix1;
  z ^= z >> 27;
  z *= kMix2;
  z ^= z >> 31;
  return z;
}

// Natural log of a positive normal float (here in [2^-24, 17]), without branches so that its loops
// vectorise: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), log m = log1p(m - 1) by Cephes' minimax
// polynomial; within about 1 ulp of std::log.
inline float log_positive(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int32_t offset = bits - 0x3f3504f3;  // the bits of sqrt(1/2)
  const int32_t e = offset >> 23;
  const int32_t mbits = bits - (e << 23);
  float m;
  std::memcpy(&m, &mbits, sizeof m);
  const float f = m - 1.0f, z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  return f + (p * f * z - 0.5f * z) + static_cast<float>(e) * 0.693147180559945f;
}

int64_t race_row(const float* logits, int64_t vocab, uint64_t key) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_token = 0;  // as torch's argmax over a row of -inf
  int32_t bits[kBlock];
  float score[kBlock];
  for (int64_t t0 = 0; t0 < vocab; t0 += kBlock) {
    const int64_t n = std::min(kBlock, vocab - t0);
    const float* l = logits + t0;
    float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
    for (int64_t i = 0; i < n; ++i) top = std::max(top, l[i]);
    // Rounding is monotone, so no token here can score above fl(top + kNoiseMax); ties keep the
    // earlier token, as argmax does.
    if (!(top + kNoiseMax > best)) continue;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      bits[i] = static_cast<int32_t>(mix64(key + static_cast<uint64_t>(t0 + i + 1) * kGolden) >> 41);
    float block_best = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : block_best)
    for (int64_t i = 0; i < n; ++i) {
      // The top 23 bits + 1/2: u in [2^-24, 1 - 2^-24], so neither log is of 0.
      const float u = (static_cast<float>(bits[i]) + 0.5f) * 0x1p-23f;
      score[i] = l[i] - log_positive(-log_positive(u));
      block_best = std::max(block_best, score[i]);
    }
    if (block_best > best) {
      best = block_best;
      best_token = t0 + (std::find(score, score + n, block_best) - score);
    }
  }
  return best_token;
}

}  // namespace

torch::Tensor exponential_race(torch::Tensor logits, torch::Tensor seeds, torch::Tensor steps) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.device().is_cpu(),
              "logits must be a float32 CPU matrix");
  TORCH_CHECK(seeds.scalar_type() == torch::kInt64 && steps.scalar_type() == torch::kInt64 &&
                  seeds.numel() == logits.size(0) && steps.numel() == logits.size(0),
              "seeds and steps must be int64, one per row");
  logits = logits.contiguous();
  seeds = seeds.contiguous();
  steps = steps.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto out = torch::empty({rows}, seeds.options());
  const float* l = logits.data_ptr<float>();
  const int64_t* seed = seeds.data_ptr<int64_t>();
  const int64_t* step = steps.data_ptr<int64_t>();
  int64_t* token = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      // The row's key, as the torch path derives it (wrapping arithmetic on the seed's bits).
      const uint64_t key = mix64(mix64(static_cast<uint64_t>(seed[r])) + static_cast<uint64_t>(step[r]));
      token[r] = race_row(l + r * vocab, vocab, key);
    }
  });
  return out;
}
