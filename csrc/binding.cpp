// The torch binding of `echox_cuda`: checks the tensors, allocates outputs and workspaces with
// torch's caching allocator, and calls the extern "C" launchers of csrc/*.cu on the current
// stream. Nothing here reads device memory, so both ops are free of host syncs.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

// The launchers, as defined in decode_attention.cu and head_select.cu (one per dtype).
extern "C" {
int echox_decode_attention_num_splits(int batch, int q_heads, int kv_heads, int max_len);
int echox_head_select_parts(int rows);
int echox_head_select_filtered(int rows, float temperature, float top_p, int top_k);
}

#define ECHOX_DECLARE_LAUNCHERS(suffix)                                                                              \
  extern "C" cudaError_t echox_decode_attention_##suffix(                                                           \
      const void* q, const void* k_cache, const void* v_cache, const void* lengths, int lengths_int64,             \
      const bool* key_valid, void* out, float* part_ml, float* part_acc, int batch, int q_heads, int kv_heads,      \
      int max_len, int head_dim, int num_splits, cudaStream_t stream);                                              \
  extern "C" cudaError_t echox_head_select_##suffix(                                                                \
      const void* hidden, const void* weight, int batch, int rows, int width, float temperature, float top_p,        \
      int top_k, uint32_t seed, const long long* step, float* scaled, float* part_val, int* part_idx,               \
      long long* out, cudaStream_t stream);

ECHOX_DECLARE_LAUNCHERS(fp32)
ECHOX_DECLARE_LAUNCHERS(fp16)
ECHOX_DECLARE_LAUNCHERS(bf16)

namespace {

using AttentionLauncher = decltype(&echox_decode_attention_bf16);
using HeadSelectLauncher = decltype(&echox_head_select_bf16);

template <typename Launcher>
Launcher by_dtype(const torch::Tensor& t, const char* op, Launcher fp32, Launcher fp16, Launcher bf16) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return fp32;
    case torch::kFloat16:
      return fp16;
    case torch::kBFloat16:
      return bf16;
    default:
      TORCH_CHECK(false, "echox_cuda.", op, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Every float operand is read with 16-byte loads along its last dimension.
void check_operand(const torch::Tensor& t, const char* op, const char* name, int64_t dims, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "echox_cuda.", op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == dims, "echox_cuda.", op, ": ", name, " must have ", dims, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "echox_cuda.", op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "echox_cuda.", op, ": ", name, " is ", t.scalar_type(),
              " but the other operands are ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "echox_cuda.", op, ": ", name, " is on another device");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "echox_cuda.", op, ": ", name,
              " must be 16-byte aligned");
  TORCH_CHECK(t.size(-1) * t.element_size() % 16 == 0, "echox_cuda.", op, ": the last dimension of ", name,
              " must span a multiple of 16 bytes");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "echox_cuda.", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& lengths, const torch::Tensor& key_valid) {
  const char* op = "decode_attention";
  check_operand(q, op, "q", 3, q);
  check_operand(k_cache, op, "k_cache", 4, q);
  check_operand(v_cache, op, "v_cache", 4, q);
  const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), max_len = k_cache.size(2);
  TORCH_CHECK(head_dim == 16 || head_dim == 64 || head_dim == 128, "echox_cuda.decode_attention: head dim ",
              head_dim, " is not supported (16, 64 or 128)");
  TORCH_CHECK(k_cache.sizes() == torch::IntArrayRef({batch, kv_heads, max_len, head_dim}),
              "echox_cuda.decode_attention: k_cache ", k_cache.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "echox_cuda.decode_attention: v_cache ", v_cache.sizes(),
              " differs from k_cache ", k_cache.sizes());
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "echox_cuda.decode_attention: ", q_heads,
              " q heads are not a multiple of ", kv_heads, " kv heads");
  TORCH_CHECK(lengths.is_cuda() && lengths.device() == q.device() && lengths.dim() == 1 && lengths.size(0) == batch &&
                  (lengths.scalar_type() == torch::kInt32 || lengths.scalar_type() == torch::kInt64),
              "echox_cuda.decode_attention: lengths must be a [", batch, "] int32 or int64 tensor on q's device");
  TORCH_CHECK(key_valid.is_cuda() && key_valid.device() == q.device() && key_valid.scalar_type() == torch::kBool &&
                  key_valid.sizes() == torch::IntArrayRef({batch, max_len}),
              "echox_cuda.decode_attention: key_valid must be a [", batch, ", ", max_len, "] bool tensor on q's device");

  const c10::cuda::CUDAGuard guard(q.device());
  const auto lengths_c = lengths.contiguous();
  const auto valid_c = key_valid.contiguous();
  const int splits = echox_decode_attention_num_splits(batch, q_heads, kv_heads, max_len);
  const auto f32 = q.options().dtype(torch::kFloat32);
  auto part_ml = torch::empty({batch, q_heads, splits, 2}, f32);
  auto part_acc = torch::empty({batch, q_heads, splits, head_dim}, f32);
  auto out = torch::empty_like(q);
  const auto launch = by_dtype<AttentionLauncher>(q, op, echox_decode_attention_fp32, echox_decode_attention_fp16,
                                                  echox_decode_attention_bf16);
  check_launch(launch(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), lengths_c.data_ptr(),
                      lengths_c.scalar_type() == torch::kInt64, valid_c.data_ptr<bool>(), out.data_ptr(),
                      part_ml.data_ptr<float>(), part_acc.data_ptr<float>(), batch, q_heads, kv_heads, max_len,
                      head_dim, splits, c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

torch::Tensor head_select(const torch::Tensor& hidden, const torch::Tensor& weight, double temperature, double top_p,
                          int64_t top_k, int64_t seed, const torch::Tensor& step) {
  const char* op = "head_select";
  check_operand(hidden, op, "hidden", 2, hidden);
  check_operand(weight, op, "weight", 2, hidden);
  const int64_t batch = hidden.size(0), width = hidden.size(1), rows = weight.size(0);
  TORCH_CHECK(weight.size(1) == width, "echox_cuda.head_select: weight ", weight.sizes(), " does not match hidden ",
              hidden.sizes());
  TORCH_CHECK(step.is_cuda() && step.device() == hidden.device() && step.scalar_type() == torch::kInt64 &&
                  step.numel() == 1,
              "echox_cuda.head_select: step must be a one-element int64 tensor on hidden's device");
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0, "echox_cuda.head_select: temperature must be >= 0, got ",
              temperature);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "echox_cuda.head_select: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK(top_k >= 0, "echox_cuda.head_select: top_k must be >= 0, got ", top_k);

  const c10::cuda::CUDAGuard guard(hidden.device());
  // The kernels see these values in fp32; the path and its workspace are decided on them too.
  const float temperature_f = static_cast<float>(temperature), top_p_f = static_cast<float>(top_p);
  const int top_k_i = static_cast<int>(std::min<int64_t>(top_k, rows));
  const bool filtered = echox_head_select_filtered(rows, temperature_f, top_p_f, top_k_i);
  const int parts = echox_head_select_parts(rows);
  const auto f32 = hidden.options().dtype(torch::kFloat32);
  // Only the workspace of the chosen path is sized; the other is empty.
  auto scaled = torch::empty({filtered ? batch * rows : 0}, f32);
  auto part_val = torch::empty({filtered ? 0 : batch * parts}, f32);
  auto part_idx = torch::empty({filtered ? 0 : batch * parts}, hidden.options().dtype(torch::kInt32));
  auto out = torch::empty({batch}, hidden.options().dtype(torch::kInt64));
  const auto launch =
      by_dtype<HeadSelectLauncher>(hidden, op, echox_head_select_fp32, echox_head_select_fp16, echox_head_select_bf16);
  check_launch(launch(hidden.data_ptr(), weight.data_ptr(), batch, rows, width, temperature_f, top_p_f, top_k_i,
                      static_cast<uint32_t>(seed), reinterpret_cast<const long long*>(step.data_ptr<int64_t>()),
                      scaled.data_ptr<float>(), part_val.data_ptr<float>(), part_idx.data_ptr<int>(),
                      reinterpret_cast<long long*>(out.data_ptr<int64_t>()), c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "echox CUDA kernels: decode attention and fused head projection + token selection";
  m.def("decode_attention", &decode_attention, "q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D], lengths [B], "
        "key_valid [B, S] -> [B, Hq, D] in q's dtype", py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("lengths"), py::arg("key_valid"));
  m.def("head_select", &head_select, "hidden [B, h], weight [R, h] -> chosen row [B] (int64); temperature 0 is greedy",
        py::arg("hidden"), py::arg("weight"), py::arg("temperature"), py::arg("top_p"), py::arg("top_k"),
        py::arg("seed"), py::arg("step"));
}
