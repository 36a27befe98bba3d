// The Python module of radixserve's CPU kernels (kernels/__init__.py builds it on first use).
#include <torch/extension.h>

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor slots, torch::Tensor lens, double scale);
void lora_add(torch::Tensor y, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b, torch::Tensor token_slots,
              int64_t start, int64_t rows);
torch::Tensor gguf_matmul(torch::Tensor x, torch::Tensor weight, int64_t format, int64_t isa);
int64_t gguf_isa();
torch::Tensor exponential_race(torch::Tensor logits, torch::Tensor seeds, torch::Tensor steps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention over the paged KV pool, read in place");
  m.def("lora_add", &lora_add, "adds each adapter token's LoRA delta to its row of y, in place");
  m.def("gguf_matmul", &gguf_matmul, "x @ weight.T with the weight in GGUF blocks (Q4_0, Q4_1, Q8_0)");
  m.def("gguf_isa", &gguf_isa, "the instruction set gguf_matmul uses on this CPU: 1 portable, 2 AVX2, 3 AVX-512 VNNI");
  m.def("exponential_race", &exponential_race, "one seeded draw per row of logits (sampling/sampler.py's scheme)");
}
