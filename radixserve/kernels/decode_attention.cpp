// Decode attention over the paged KV pool, reading each sequence's keys and values in place.
//
// One query token per sequence. For every (sequence, KV head) pair, the query heads that share the KV
// head (GQA) are scored together against the sequence's keys, found through its slot table, then
// softmax-normalised and used to weigh the values, all in float32. Nothing is gathered or copied: the
// torch path copies every sequence's keys and values out of the pool each layer, which costs more
// than the attention itself on a CPU.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace radixserve;

// Slots are scattered over the pool, which the hardware prefetcher cannot follow: rows are requested
// this many keys ahead of their use.
constexpr int64_t kAhead = 8;

// kDim: the head size as a compile-time constant (0: taken from head_dim at run time). With it, every
// row loop below compiles to a few whole vector instructions instead of a loop with remainders.
template <typename scalar_t, int64_t kDim>
void attend(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* slots,
            const int64_t* lens, scalar_t* out, int64_t num_seqs, int64_t heads, int64_t kv_heads,
            int64_t cache_slots, int64_t max_keys, int64_t head_dim, float scale) {
  const int64_t dim = kDim ? kDim : head_dim;
  const int64_t group = heads / kv_heads;
#if defined(__AVX512BF16__)
  // bfloat16 rows of 32-multiple size: dot products straight from bfloat16 pairs (as oneDNN's
  // bfloat16 matmuls do), value rows widened in registers.
  constexpr bool kBf16Avx = std::is_same_v<scalar_t, c10::BFloat16> && kDim > 0 && kDim % 32 == 0;
#else
  constexpr bool kBf16Avx = false;
#endif
  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), row(dim), scores(group * max_keys);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t seq = pair / kv_heads, kvh = pair % kv_heads;
      const int64_t n = lens[seq];
      const int64_t* seq_slots = slots + seq * max_keys;
      const scalar_t* q_base = q + (seq * heads + kvh * group) * dim;
      const scalar_t* k_head = k_cache + kvh * cache_slots * dim;
      const scalar_t* v_head = v_cache + kvh * cache_slots * dim;
      if constexpr (!kBf16Avx) load_f32(q_base, qf.data(), group * dim);
      for (int64_t t = 0; t < n; ++t) {
        if (t + kAhead < n) prefetch_row(k_head + seq_slots[t + kAhead] * dim, dim);
        const scalar_t* k_row = k_head + seq_slots[t] * dim;
        if constexpr (kBf16Avx) {
#if defined(__AVX512BF16__)
          for (int64_t j = 0; j < group; ++j) scores[j * max_keys + t] = dot_bf16(q_base + j * dim, k_row, kDim) * scale;
#endif
        } else {
          load_f32(k_row, row.data(), dim);
          for (int64_t j = 0; j < group; ++j) {
            const float* __restrict__ qj = qf.data() + j * dim;
            const float* __restrict__ r = row.data();
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < dim; ++d) s += qj[d] * r[d];
            scores[j * max_keys + t] = s * scale;
          }
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* sj = scores.data() + j * max_keys;
        float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
        for (int64_t t = 0; t < n; ++t) top = std::max(top, sj[t]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < n; ++t) {
          sj[t] = std::exp(sj[t] - top);
          total += sj[t];
        }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < n; ++t) sj[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        if (t + kAhead < n) prefetch_row(v_head + seq_slots[t + kAhead] * dim, dim);
        const scalar_t* v_row = v_head + seq_slots[t] * dim;
        if constexpr (kBf16Avx) {
#if defined(__AVX512BF16__)
          __m512 vv[kDim / 16];
          for (int64_t c = 0; c < kDim / 16; ++c) vv[c] = widen16(v_row + 16 * c);
          for (int64_t j = 0; j < group; ++j) {
            const __m512 p = _mm512_set1_ps(scores[j * max_keys + t]);
            float* aj = acc.data() + j * kDim;
            for (int64_t c = 0; c < kDim / 16; ++c)
              _mm512_storeu_ps(aj + 16 * c, _mm512_fmadd_ps(p, vv[c], _mm512_loadu_ps(aj + 16 * c)));
          }
#endif
        } else {
          load_f32(v_row, row.data(), dim);
          for (int64_t j = 0; j < group; ++j) axpy(acc.data() + j * dim, scores[j * max_keys + t], row.data(), dim);
        }
      }
      store_f32(acc.data(), out + (seq * heads + kvh * group) * dim, group * dim);
    }
  });
}

}  // namespace

// q [G, H, D]; k_cache, v_cache [KVH, slots, D]; slots [G, K] (int64, each row's first lens[g] entries
// are the sequence's keys in order); lens [G] (int64, >= 1). Returns [G, H, D] in q's dtype.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor slots, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3 && slots.dim() == 2 && lens.dim() == 1,
              "decode_attention: bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && slots.is_contiguous() &&
                  lens.is_contiguous(),
              "decode_attention: inputs must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "decode_attention: q and the caches must share a dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && lens.scalar_type() == torch::kInt64,
              "decode_attention: slots and lens must be int64");
  const int64_t num_seqs = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(0);
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(2) == dim && slots.size(0) == num_seqs &&
                  lens.size(0) == num_seqs,
              "decode_attention: shapes do not match");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    auto run = dim == 64 ? attend<scalar_t, 64> : dim == 128 ? attend<scalar_t, 128> : attend<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
        lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), num_seqs, heads, kv_heads, k_cache.size(1),
        slots.size(1), dim, static_cast<float>(scale));
  });
  return out;
}
