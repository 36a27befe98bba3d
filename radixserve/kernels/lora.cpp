// The LoRA delta of a decode-sized step, token by token with each token's own adapter (as Punica's
// BGMV does on GPUs): y[start + i] += B[s]ᵀ (A[s] x[start + i]) for the adapter slot s of token i.
//
// The torch path for such steps multiplies every adapter token by every slot's stacked weights and
// masks, in two small matmuls per projection whose fixed cost dominates at a few rows; this does each
// token's own work in one call, accumulating in float32 and rounding into y once.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace radixserve;

// Tokens of one adapter are adjacent (the step is laid out by slot): up to this many of them share
// each read of a B row.
constexpr int64_t kRun = 4;

// h[r] = A[r] · x for the first rows rows of A.
template <typename scalar_t>
inline void shrink(const scalar_t* a, const scalar_t* x, float* h, int64_t rows, int64_t in, float* xf) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (in % 32 == 0) {
      for (int64_t r = 0; r < rows; ++r) h[r] = dot_bf16(a + r * in, x, in);
      return;
    }
  }
#endif
  load_f32(x, xf, in);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* ar = a + r * in;
    float s = 0.f;
    for (int64_t d = 0; d < in; ++d) s += static_cast<float>(ar[d]) * xf[d];
    h[r] = s;
  }
}

#if defined(__AVX512BF16__)
// acc[i] += hᵀ B for N tokens (acc [N, out], h [N, rows]), 64 outputs at a time kept in registers
// while the rows of B stream past, each widened once for all N tokens. out % 64 == 0.
template <int N>
void expand_bf16(const c10::BFloat16* b, const float* h, int64_t rows, int64_t out, float* acc) {
  for (int64_t o = 0; o < out; o += 64) {
    __m512 c[N][4];
    for (int i = 0; i < N; ++i)
      for (int v = 0; v < 4; ++v) c[i][v] = _mm512_loadu_ps(acc + i * out + o + 16 * v);
    for (int64_t r = 0; r < rows; ++r) {
      __m512 bv[4];
      for (int v = 0; v < 4; ++v) bv[v] = widen16(b + r * out + o + 16 * v);
      for (int i = 0; i < N; ++i) {
        const __m512 hv = _mm512_set1_ps(h[i * rows + r]);
        for (int v = 0; v < 4; ++v) c[i][v] = _mm512_fmadd_ps(hv, bv[v], c[i][v]);
      }
    }
    for (int i = 0; i < N; ++i)
      for (int v = 0; v < 4; ++v) _mm512_storeu_ps(acc + i * out + o + 16 * v, c[i][v]);
  }
}
#endif

template <typename scalar_t>
void add_deltas(scalar_t* y, const scalar_t* x, const scalar_t* a, const scalar_t* b, const int64_t* token_slots,
                int64_t tokens, int64_t rows, int64_t max_rows, int64_t in, int64_t out) {
  // Runs of up to kRun adjacent tokens of one slot; threads take whole runs.
  std::vector<int64_t> run_starts;
  for (int64_t i = 0; i < tokens; ++i)
    if (i == 0 || token_slots[i] != token_slots[i - 1] || i - run_starts.back() == kRun) run_starts.push_back(i);
  run_starts.push_back(tokens);
  const int64_t num_runs = static_cast<int64_t>(run_starts.size()) - 1;
  at::parallel_for(0, num_runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(kRun * rows), acc(kRun * out), row(out), xf(in);
    for (int64_t run = begin; run < end; ++run) {
      const int64_t first = run_starts[run], n = run_starts[run + 1] - first;
      const int64_t slot = token_slots[first];
      const scalar_t* a_slot = a + slot * max_rows * in;
      const scalar_t* b_slot = b + slot * max_rows * out;
      for (int64_t i = 0; i < n; ++i) {
        shrink(a_slot, x + (first + i) * in, h.data() + i * rows, rows, in, xf.data());
        load_f32(y + (first + i) * out, acc.data() + i * out, out);
      }
      // y += hᵀ B: each B row is widened once and added to every token of the run.
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (out % 64 == 0) {
          static_assert(kRun == 4, "expand_bf16 is instantiated for runs of 1 to 4 tokens");
          auto expand = n == 1 ? expand_bf16<1> : n == 2 ? expand_bf16<2> : n == 3 ? expand_bf16<3> : expand_bf16<4>;
          expand(b_slot, h.data(), rows, out, acc.data());
          for (int64_t i = 0; i < n; ++i) store_f32(acc.data() + i * out, y + (first + i) * out, out);
          continue;
        }
      }
#endif
      for (int64_t r = 0; r < rows; ++r) {
        load_f32(b_slot + r * out, row.data(), out);
        for (int64_t i = 0; i < n; ++i) axpy(acc.data() + i * out, h[i * rows + r], row.data(), out);
      }
      for (int64_t i = 0; i < n; ++i) store_f32(acc.data() + i * out, y + (first + i) * out, out);
    }
  });
}

}  // namespace

// y [T, out] (rows start.. are updated in place); x [T, in]; lora_a [slots, R, in]; lora_b [slots, R, out];
// token_slots [T - start] int64: the slot of each adapter token; rows <= R: the first rows of each slot
// to use (the rest are zero: the step's largest rank times the pieces).
void lora_add(torch::Tensor y, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b, torch::Tensor token_slots,
              int64_t start, int64_t rows) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && lora_a.dim() == 3 && lora_b.dim() == 3 && token_slots.dim() == 1,
              "lora_add: bad ranks");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && lora_a.is_contiguous() && lora_b.is_contiguous() &&
                  token_slots.is_contiguous(),
              "lora_add: inputs must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && lora_a.scalar_type() == y.scalar_type() &&
                  lora_b.scalar_type() == y.scalar_type() && token_slots.scalar_type() == torch::kInt64,
              "lora_add: dtypes do not match");
  const int64_t tokens = token_slots.size(0), in = x.size(1), out = y.size(1);
  TORCH_CHECK(x.size(0) == y.size(0) && start + tokens == y.size(0) && lora_a.size(2) == in &&
                  lora_b.size(2) == out && lora_a.size(1) == lora_b.size(1) && rows <= lora_a.size(1),
              "lora_add: shapes do not match");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lora_add", [&] {
    add_deltas<scalar_t>(y.data_ptr<scalar_t>() + start * out, x.data_ptr<scalar_t>() + start * in,
                         lora_a.data_ptr<scalar_t>(), lora_b.data_ptr<scalar_t>(), token_slots.data_ptr<int64_t>(),
                         tokens, rows, lora_a.size(1), in, out);
  });
}
