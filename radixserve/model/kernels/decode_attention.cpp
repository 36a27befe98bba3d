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

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// Loads a row as float32. bfloat16 is the top half of a float32: a shift the compiler vectorises.
template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

// Slots are scattered over the pool, which the hardware prefetcher cannot follow: rows are requested
// this many keys ahead of their use.
constexpr int64_t kAhead = 8;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < dim * static_cast<int64_t>(sizeof(scalar_t)); off += 64) __builtin_prefetch(p + off);
}

// kDim: the head size as a compile-time constant (0: taken from head_dim at run time). With it, every
// row loop below compiles to a few whole vector instructions instead of a loop with remainders.
template <typename scalar_t, int64_t kDim>
void attend(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* slots,
            const int64_t* lens, scalar_t* out, int64_t num_seqs, int64_t heads, int64_t kv_heads,
            int64_t cache_slots, int64_t max_keys, int64_t head_dim, float scale) {
  const int64_t dim = kDim ? kDim : head_dim;
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), row(dim), scores(group * max_keys);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t seq = pair / kv_heads, kvh = pair % kv_heads;
      const int64_t n = lens[seq];
      const int64_t* seq_slots = slots + seq * max_keys;
      const scalar_t* q_base = q + (seq * heads + kvh * group) * dim;
      load_row(q_base, qf.data(), group * dim);
      for (int64_t i = 0; i < group * dim; ++i) qf[i] *= scale;
      const scalar_t* k_head = k_cache + kvh * cache_slots * dim;
      const scalar_t* v_head = v_cache + kvh * cache_slots * dim;
#if defined(__AVX512BF16__)
      // bfloat16 rows of 32-multiple size: dot products straight from bfloat16 pairs (vdpbf16ps, float32
      // accumulation, as oneDNN's bfloat16 matmuls do), 32 multiply-adds per instruction.
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && kDim > 0 && kDim % 32 == 0) {
        constexpr int64_t kChunks = kDim / 32;
        const __m512i* q_rows = reinterpret_cast<const __m512i*>(q_base);
        for (int64_t t = 0; t < n; ++t) {
          if (t + kAhead < n) prefetch_row(k_head + seq_slots[t + kAhead] * dim, dim);
          const __m512i* k_row = reinterpret_cast<const __m512i*>(k_head + seq_slots[t] * dim);
          __m512i kv[kChunks];
          for (int64_t c = 0; c < kChunks; ++c) kv[c] = _mm512_loadu_si512(k_row + c);
          for (int64_t j = 0; j < group; ++j) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < kChunks; ++c)
              acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q_rows + j * kChunks + c), (__m512bh)kv[c]);
            scores[j * max_keys + t] = _mm512_reduce_add_ps(acc) * scale;
          }
        }
      } else
#endif
      for (int64_t t = 0; t < n; ++t) {
        if (t + kAhead < n) prefetch_row(k_head + seq_slots[t + kAhead] * dim, dim);
        load_row(k_head + seq_slots[t] * dim, row.data(), dim);
        for (int64_t j = 0; j < group; ++j) {
          const float* __restrict__ qj = qf.data() + j * dim;
          const float* __restrict__ r = row.data();
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qj[d] * r[d];
          scores[j * max_keys + t] = s;
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
#if defined(__AVX512BF16__)
      // The same rows widened to float32 in registers (a bfloat16 is a float32's top half).
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && kDim > 0 && kDim % 32 == 0) {
        constexpr int64_t kChunks = kDim / 16;
        for (int64_t t = 0; t < n; ++t) {
          if (t + kAhead < n) prefetch_row(v_head + seq_slots[t + kAhead] * dim, dim);
          const __m256i* v_row = reinterpret_cast<const __m256i*>(v_head + seq_slots[t] * dim);
          __m512 vv[kChunks];
          for (int64_t c = 0; c < kChunks; ++c)
            vv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(v_row + c)), 16));
          for (int64_t j = 0; j < group; ++j) {
            const __m512 p = _mm512_set1_ps(scores[j * max_keys + t]);
            float* aj = acc.data() + j * kDim;
            for (int64_t c = 0; c < kChunks; ++c)
              _mm512_storeu_ps(aj + 16 * c, _mm512_fmadd_ps(p, vv[c], _mm512_loadu_ps(aj + 16 * c)));
          }
        }
      } else
#endif
      for (int64_t t = 0; t < n; ++t) {
        if (t + kAhead < n) prefetch_row(v_head + seq_slots[t + kAhead] * dim, dim);
        load_row(v_head + seq_slots[t] * dim, row.data(), dim);
        for (int64_t j = 0; j < group; ++j) {
          const float p = scores[j * max_keys + t];
          float* __restrict__ aj = acc.data() + j * dim;
          const float* __restrict__ r = row.data();
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) aj[d] += p * r[d];
        }
      }
      scalar_t* o = out + (seq * heads + kvh * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) o[i] = static_cast<scalar_t>(acc[i]);
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
