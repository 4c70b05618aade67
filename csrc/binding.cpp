// The torch binding of `echox_cuda`: checks the tensors, allocates outputs and workspaces with
// torch's caching allocator, and calls the extern "C" launchers of csrc/*.cu on the current
// stream. Nothing here reads device memory, so the ops are free of host syncs.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

// The launchers, as defined in decode_attention.cu, head_select.cu and vocoder_conv.cu (one per dtype).
extern "C" {
int echox_decode_attention_num_splits(int batch, int q_heads, int kv_heads, int max_len);
int echox_head_select_parts(int rows);
int echox_head_select_filtered(int rows, float temperature, float top_p, int top_k);
int echox_vocoder_conv_splits(int batch, int cin, int cout, int out_len);
}

#define ECHOX_DECLARE_LAUNCHERS(suffix)                                                                              \
  extern "C" cudaError_t echox_decode_attention_##suffix(                                                           \
      const void* q, const void* k_cache, const void* v_cache, const void* lengths, int lengths_int64,             \
      const bool* key_valid, void* out, float* part_ml, float* part_acc, int batch, int q_heads, int kv_heads,      \
      int max_len, int head_dim, int num_splits, cudaStream_t stream);                                              \
  extern "C" cudaError_t echox_head_select_##suffix(                                                                \
      const void* hidden, const void* weight, int batch, int rows, int width, float temperature, float top_p,        \
      int top_k, uint32_t seed, const long long* step, int per_row_step, float* scaled, float* part_val,           \
      int* part_idx, int* candidates, int* candidate_count, long long* out, cudaStream_t stream);                 \
  extern "C" cudaError_t echox_conv1d_valid_##suffix(                                                               \
      const void* x, const void* weight, const void* bias, const void* residual, void* y, float* partial,          \
      int batch, int cin, int cout, int length, int kernel, int dilation, float input_slope, int splits,           \
      cudaStream_t stream);                                                                                         \
  extern "C" cudaError_t echox_conv_transpose1d_window_##suffix(                                                    \
      const void* x, const void* weight, const void* bias, void* y, float* partial, int batch, int cin, int cout,  \
      int length, int kernel, int stride, int start, int count, float input_slope, int splits,                     \
      cudaStream_t stream);

ECHOX_DECLARE_LAUNCHERS(fp32)
ECHOX_DECLARE_LAUNCHERS(fp16)
ECHOX_DECLARE_LAUNCHERS(bf16)

namespace {

using AttentionLauncher = decltype(&echox_decode_attention_bf16);
using HeadSelectLauncher = decltype(&echox_head_select_bf16);
using Conv1dLauncher = decltype(&echox_conv1d_valid_bf16);
using ConvTransposeLauncher = decltype(&echox_conv_transpose1d_window_bf16);

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

  if (q.numel() == 0) return torch::empty_like(q);  // no sequence or no head: nothing to launch

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
                  step.is_contiguous() && (step.numel() == 1 || step.numel() == batch),
              "echox_cuda.head_select: step must be a contiguous int64 tensor on hidden's device with one counter, or "
              "one per row of hidden");
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0, "echox_cuda.head_select: temperature must be >= 0, got ",
              temperature);
  // In (0, 1] as the kernels see it, in fp32 (a smaller positive double rounds to 0 there).
  TORCH_CHECK(static_cast<float>(top_p) > 0 && top_p <= 1, "echox_cuda.head_select: top_p must be in (0, 1], got ",
              top_p);
  TORCH_CHECK(top_k >= 0, "echox_cuda.head_select: top_k must be >= 0, got ", top_k);
  TORCH_CHECK(rows > 0, "echox_cuda.head_select: the head has no rows");
  auto out = torch::empty({batch}, hidden.options().dtype(torch::kInt64));
  if (batch == 0) return out;

  const c10::cuda::CUDAGuard guard(hidden.device());
  // The kernels see these values in fp32; the path and its workspace are decided on them too.
  const float temperature_f = static_cast<float>(temperature), top_p_f = static_cast<float>(top_p);
  const int top_k_i = static_cast<int>(std::min<int64_t>(top_k, rows));
  const bool filtered = echox_head_select_filtered(rows, temperature_f, top_p_f, top_k_i);
  const int parts = echox_head_select_parts(rows);
  const auto f32 = hidden.options().dtype(torch::kFloat32);
  // The per-row workspace of top-k/top-p is sized only when that path runs; the rest is small.
  const auto i32 = hidden.options().dtype(torch::kInt32);
  auto scaled = torch::empty({filtered ? batch * rows : 0}, f32);
  auto candidates = torch::empty({filtered ? batch * rows : 0}, i32);
  auto candidate_count = torch::empty({filtered ? batch : 0}, i32);
  auto part_val = torch::empty({batch * parts}, f32);
  auto part_idx = torch::empty({batch * parts}, i32);
  const auto launch =
      by_dtype<HeadSelectLauncher>(hidden, op, echox_head_select_fp32, echox_head_select_fp16, echox_head_select_bf16);
  check_launch(launch(hidden.data_ptr(), weight.data_ptr(), batch, rows, width, temperature_f, top_p_f, top_k_i,
                      static_cast<uint32_t>(seed), reinterpret_cast<const long long*>(step.data_ptr<int64_t>()),
                      step.numel() > 1, scaled.data_ptr<float>(), part_val.data_ptr<float>(), part_idx.data_ptr<int>(),
                      candidates.data_ptr<int>(), candidate_count.data_ptr<int>(),
                      reinterpret_cast<long long*>(out.data_ptr<int64_t>()), c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

// The vocoder convs take any layout (streaming buffers are often slices): operands are made
// contiguous here, and read element by element, so no alignment is asked for.
torch::Tensor conv_operand(const torch::Tensor& t, const char* op, const char* name, int64_t dims,
                           const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "echox_cuda.", op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == dims, "echox_cuda.", op, ": ", name, " must have ", dims, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "echox_cuda.", op, ": ", name, " is ", t.scalar_type(),
              " but x is ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "echox_cuda.", op, ": ", name, " is on another device than x");
  TORCH_CHECK(t.numel() < INT32_MAX, "echox_cuda.", op, ": ", name, " has too many elements for 32-bit indices");
  return t.contiguous();
}

// fp32 partial sums over input-channel splits, [splits, B, Cout, out_len]; empty for one split.
torch::Tensor split_partials(const torch::Tensor& x, int64_t cout, int64_t out_len, int splits) {
  const int64_t size = splits > 1 ? splits * x.size(0) * cout * out_len : 0;
  return torch::empty({size}, x.options().dtype(torch::kFloat32));
}

torch::Tensor conv1d_valid(const torch::Tensor& x_in, const torch::Tensor& weight_in, const torch::Tensor& bias_in,
                           int64_t dilation, double input_slope, const c10::optional<torch::Tensor>& residual_in) {
  const char* op = "conv1d_valid";
  const auto x = conv_operand(x_in, op, "x", 3, x_in);
  const auto weight = conv_operand(weight_in, op, "weight", 3, x_in);
  const auto bias = conv_operand(bias_in, op, "bias", 1, x_in);
  const int64_t batch = x.size(0), cin = x.size(1), length = x.size(2);
  const int64_t cout = weight.size(0), kernel = weight.size(2);
  TORCH_CHECK(weight.size(1) == cin && kernel >= 1, "echox_cuda.conv1d_valid: weight ", weight.sizes(),
              " does not match x ", x.sizes(), " (expected [Cout, ", cin, ", K])");
  TORCH_CHECK(bias.size(0) == cout, "echox_cuda.conv1d_valid: bias ", bias.sizes(), " does not match ", cout,
              " output channels");
  TORCH_CHECK(dilation >= 1, "echox_cuda.conv1d_valid: dilation must be >= 1, got ", dilation);
  const int64_t out_len = length - (kernel - 1) * dilation;
  TORCH_CHECK(out_len >= 0, "echox_cuda.conv1d_valid: ", length, " inputs are fewer than the kernel's span ",
              (kernel - 1) * dilation + 1);
  torch::Tensor residual;
  if (residual_in.has_value()) {
    residual = conv_operand(*residual_in, op, "residual", 3, x_in);
    TORCH_CHECK(residual.sizes() == torch::IntArrayRef({batch, cout, out_len}), "echox_cuda.conv1d_valid: residual ",
                residual.sizes(), " differs from the output [", batch, ", ", cout, ", ", out_len, "]");
  }

  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({batch, cout, out_len}, x.options());
  if (out.numel() == 0) return out;
  const int splits = echox_vocoder_conv_splits(batch, cin, cout, out_len);
  auto partial = split_partials(x, cout, out_len, splits);
  const auto launch =
      by_dtype<Conv1dLauncher>(x, op, echox_conv1d_valid_fp32, echox_conv1d_valid_fp16, echox_conv1d_valid_bf16);
  const void* residual_ptr = residual.defined() ? residual.data_ptr() : nullptr;
  check_launch(launch(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), residual_ptr, out.data_ptr(),
                      partial.data_ptr<float>(), batch, cin, cout, length, kernel, dilation,
                      static_cast<float>(input_slope), splits, c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

torch::Tensor conv_transpose1d_window(const torch::Tensor& x_in, const torch::Tensor& weight_in,
                                      const torch::Tensor& bias_in, int64_t stride, int64_t start, int64_t count,
                                      double input_slope) {
  const char* op = "conv_transpose1d_window";
  const auto x = conv_operand(x_in, op, "x", 3, x_in);
  const auto weight = conv_operand(weight_in, op, "weight", 3, x_in);
  const auto bias = conv_operand(bias_in, op, "bias", 1, x_in);
  const int64_t batch = x.size(0), cin = x.size(1), length = x.size(2);
  const int64_t cout = weight.size(1), kernel = weight.size(2);
  TORCH_CHECK(weight.size(0) == cin && kernel >= 1, "echox_cuda.conv_transpose1d_window: weight ", weight.sizes(),
              " does not match x ", x.sizes(), " (expected [", cin, ", Cout, K])");
  TORCH_CHECK(bias.size(0) == cout, "echox_cuda.conv_transpose1d_window: bias ", bias.sizes(), " does not match ",
              cout, " output channels");
  TORCH_CHECK(stride >= 1, "echox_cuda.conv_transpose1d_window: stride must be >= 1, got ", stride);
  const int64_t full_length = length > 0 ? (length - 1) * stride + kernel : 0;
  TORCH_CHECK(start >= 0 && count >= 0 && start + count <= full_length, "echox_cuda.conv_transpose1d_window: window ",
              start, " + ", count, " is outside the ", full_length, " outputs");

  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({batch, cout, count}, x.options());
  if (out.numel() == 0) return out;
  const int splits = echox_vocoder_conv_splits(batch, cin, cout, count);
  auto partial = split_partials(x, cout, count, splits);
  const auto launch = by_dtype<ConvTransposeLauncher>(x, op, echox_conv_transpose1d_window_fp32,
                                                      echox_conv_transpose1d_window_fp16,
                                                      echox_conv_transpose1d_window_bf16);
  check_launch(launch(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), partial.data_ptr<float>(),
                      batch, cin, cout, length, kernel, stride, start, count, static_cast<float>(input_slope), splits,
                      c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "echox CUDA kernels: decode attention, fused head projection + token selection, vocoder convs";
  m.def("decode_attention", &decode_attention, "q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D], lengths [B], "
        "key_valid [B, S] -> [B, Hq, D] in q's dtype", py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("lengths"), py::arg("key_valid"));
  m.def("head_select", &head_select, "hidden [B, h], weight [R, h] -> chosen row [B] (int64); temperature 0 is greedy",
        py::arg("hidden"), py::arg("weight"), py::arg("temperature"), py::arg("top_p"), py::arg("top_k"),
        py::arg("seed"), py::arg("step"));
  m.def("conv1d_valid", &conv1d_valid, "conv1d(leaky_relu(x, input_slope), weight, bias, dilation), no padding, "
        "(+ residual): x [B, Cin, L], weight [Cout, Cin, K] -> [B, Cout, L - (K - 1) * dilation] in x's dtype",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("dilation"), py::arg("input_slope") = 1.0,
        py::arg("residual") = py::none());
  m.def("conv_transpose1d_window", &conv_transpose1d_window, "outputs start .. start + count - 1 of "
        "conv_transpose1d(leaky_relu(x, input_slope), weight, bias, stride), no padding: x [B, Cin, L], "
        "weight [Cin, Cout, K] -> [B, Cout, count] in x's dtype", py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("stride"), py::arg("start"), py::arg("count"), py::arg("input_slope") = 1.0);
}
