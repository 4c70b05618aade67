// Decode attention over a static KV cache (flash-decoding), the CUDA twin of
// echox.attention.decode_attention_reference.
//
// One query per sequence: q [B, Hq, D] attends to the keys s < lengths[b] with key_valid[b, s]
// of k_cache/v_cache [B, Hkv, S, D]. The visible keys are cut into `num_splits` chunks; each
// block reads one chunk of one kv head once for all the q heads of its group (GQA) and keeps
// an online softmax (running max, sum and weighted values, fp32). A second kernel merges the
// chunks. Chunks are sized on the device from lengths[b], so the host never reads lengths and
// the launch shape depends only on the static cache size (CUDA-graph friendly).

#include "common.cuh"

namespace {

using echox::ceil_div;
using echox::kVec;

constexpr int kThreads = 128;
constexpr int kUnroll = 4;  // keys per thread group per iteration: their loads are all in flight before use
constexpr float kLog2e = 1.4426950408889634f;

// How a block of kThreads covers keys of head dim D stored as T: each key row is read by
// kLanes neighbouring threads with one 16-byte load each, and kSlots rows are read side by side.
template <typename T, int D>
struct Layout {
  static constexpr int kVecT = kVec<T>;
  static constexpr int kLanes = D / kVecT;
  static constexpr int kSlots = kThreads / kLanes;
  static constexpr int kStride = kSlots * kUnroll;  // keys per block iteration
  static_assert(D % kVecT == 0 && kLanes <= 32 && 32 % kLanes == 0, "head dim must fill whole 16-byte loads");
};

// q heads per block: one for MHA, four for GQA (EchoX has groups of 1, 3 and 4; larger groups
// take several blocks per kv head).
__host__ __device__ constexpr int head_tile(int group) { return group == 1 ? 1 : 4; }

__device__ __forceinline__ int visible_length(const void* lengths, bool lengths_int64, int b, int max_len) {
  const long long n = lengths_int64 ? static_cast<const long long*>(lengths)[b] : static_cast<const int*>(lengths)[b];
  return static_cast<int>(min(max(n, 0LL), static_cast<long long>(max_len)));
}

// exp2(m - new_max) with the empty state (m = -inf) weighing nothing, instead of the NaN of -inf - -inf.
__device__ __forceinline__ float rescale(float m, float new_max) { return m == -INFINITY ? 0.f : exp2f(m - new_max); }

// Grid (num_splits, Hkv * tiles, B). Writes the chunk's running max (log2 units), sum and
// un-normalised output for each q head: part_ml [B, Hq, splits, 2], part_acc [B, Hq, splits, D].
template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads)
    attention_split_kernel(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                           const void* __restrict__ lengths, bool lengths_int64, const bool* __restrict__ key_valid,
                           float* __restrict__ part_ml, float* __restrict__ part_acc, int q_heads, int kv_heads,
                           int max_len, float scale_log2) {
  using L = Layout<T, D>;
  constexpr int V = L::kVecT;
  const int split = blockIdx.x, num_splits = gridDim.x, b = blockIdx.z;
  const int group = q_heads / kv_heads, tiles = ceil_div(group, G);
  const int kv_head = blockIdx.y / tiles, tile = blockIdx.y % tiles;
  const int head0 = kv_head * group + tile * G, heads = min(G, group - tile * G);
  const int slot = threadIdx.x / L::kLanes, d0 = (threadIdx.x % L::kLanes) * V;

  // The query slice this thread multiplies, pre-scaled so scores come out in log2 units.
  float qs[G][V];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < heads) {
      echox::load_vec(q + (static_cast<size_t>(b) * q_heads + head0 + g) * D + d0, qs[g]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) qs[g][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) qs[g][i] *= scale_log2;
  }

  // Cut [0, len) into equal chunks of whole block iterations; trailing chunks may be empty.
  const int len = visible_length(lengths, lengths_int64, b, max_len);
  const int chunk = ceil_div(ceil_div(len, num_splits), L::kStride) * L::kStride;
  const int start = split * chunk, end = min(len, start + chunk);
  const size_t row0 = (static_cast<size_t>(b) * kv_heads + kv_head) * max_len;
  const T* k_rows = k_cache + row0 * D + d0;
  const T* v_rows = v_cache + row0 * D + d0;
  const bool* valid = key_valid + static_cast<size_t>(b) * max_len;

  float run_max[G], run_sum[G], acc[G][V];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    run_max[g] = -INFINITY;
    run_sum[g] = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[g][i] = 0.f;
  }

  // The loop bounds are block-uniform, so every lane reaches the shuffles in group_sum.
  for (int base = start; base < end; base += L::kStride) {
    float ks[kUnroll][V], vs[kUnroll][V];
    bool live[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = base + u * L::kSlots + slot;
      live[u] = s < end;
      if (live[u]) {
        echox::load_vec(k_rows + static_cast<size_t>(s) * D, ks[u]);
        echox::load_vec(v_rows + static_cast<size_t>(s) * D, vs[u]);
        live[u] = valid[s];
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) ks[u][i] = vs[u][i] = 0.f;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float score[kUnroll];
      float new_max = run_max[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) dot = fmaf(qs[g][i], ks[u][i], dot);
        score[u] = echox::group_sum<L::kLanes>(dot);
        if (live[u]) new_max = fmaxf(new_max, score[u]);
      }
      const float alpha = rescale(run_max[g], new_max);
      run_sum[g] *= alpha;
#pragma unroll
      for (int i = 0; i < V; ++i) acc[g][i] *= alpha;
      // Masked keys are skipped rather than weighted by 0, so garbage in their slots cannot leak in.
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!live[u]) continue;
        const float p = exp2f(score[u] - new_max);
        run_sum[g] += p;
#pragma unroll
        for (int i = 0; i < V; ++i) acc[g][i] = fmaf(p, vs[u][i], acc[g][i]);
      }
      run_max[g] = new_max;
    }
  }

  // Merge the block's slots, then write one partial per q head.
  __shared__ float slot_max[L::kSlots][G], slot_sum[L::kSlots][G];
  __shared__ float slot_acc[L::kSlots][G][D];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (d0 == 0) {
      slot_max[slot][g] = run_max[g];
      slot_sum[slot][g] = run_sum[g];
    }
#pragma unroll
    for (int i = 0; i < V; ++i) slot_acc[slot][g][d0 + i] = acc[g][i];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < heads * D; e += kThreads) {
    const int g = e / D, d = e % D;
    float m = -INFINITY;
    for (int s = 0; s < L::kSlots; ++s) m = fmaxf(m, slot_max[s][g]);
    float sum = 0.f, out = 0.f;
    for (int s = 0; s < L::kSlots; ++s) {
      const float w = rescale(slot_max[s][g], m);
      sum = fmaf(w, slot_sum[s][g], sum);
      out = fmaf(w, slot_acc[s][g][d], out);
    }
    const size_t part = (static_cast<size_t>(b) * q_heads + head0 + g) * num_splits + split;
    part_acc[part * D + d] = out;
    if (d == 0) {
      part_ml[part * 2] = m;
      part_ml[part * 2 + 1] = sum;
    }
  }
}

// Grid (Hq, B), D threads: merges the splits of one q head. A sequence with no visible key
// ends as 0/0 = NaN, as the reference's softmax over all -inf does.
template <typename T>
__global__ void attention_combine_kernel(const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                                         T* __restrict__ out, int num_splits) {
  const int head_dim = blockDim.x, d = threadIdx.x;
  const size_t row = static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const float* ml = part_ml + row * num_splits * 2;
  const float* acc = part_acc + row * num_splits * head_dim + d;
  float m = -INFINITY;
  for (int s = 0; s < num_splits; ++s) m = fmaxf(m, ml[2 * s]);
  float sum = 0.f, total = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float w = rescale(ml[2 * s], m);
    sum = fmaf(w, ml[2 * s + 1], sum);
    total = fmaf(w, acc[static_cast<size_t>(s) * head_dim], total);
  }
  out[row * head_dim + d] = echox::from_float<T>(total / sum);
}

template <typename T, int D, int G>
void launch_split(const void* q, const void* k_cache, const void* v_cache, const void* lengths, int lengths_int64,
                  const bool* key_valid, float* part_ml, float* part_acc, int batch, int q_heads, int kv_heads,
                  int max_len, int num_splits, cudaStream_t stream) {
  const dim3 grid(num_splits, kv_heads * ceil_div(q_heads / kv_heads, G), batch);
  const float scale_log2 = kLog2e / sqrtf(static_cast<float>(D));
  attention_split_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), lengths,
      lengths_int64 != 0, key_valid, part_ml, part_acc, q_heads, kv_heads, max_len, scale_log2);
}

template <typename T, int D>
void launch_split_for_group(const void* q, const void* k_cache, const void* v_cache, const void* lengths,
                            int lengths_int64, const bool* key_valid, float* part_ml, float* part_acc, int batch,
                            int q_heads, int kv_heads, int max_len, int num_splits, cudaStream_t stream) {
  if (head_tile(q_heads / kv_heads) == 1) {
    launch_split<T, D, 1>(q, k_cache, v_cache, lengths, lengths_int64, key_valid, part_ml, part_acc, batch, q_heads,
                          kv_heads, max_len, num_splits, stream);
  } else {
    launch_split<T, D, 4>(q, k_cache, v_cache, lengths, lengths_int64, key_valid, part_ml, part_acc, batch, q_heads,
                          kv_heads, max_len, num_splits, stream);
  }
}

template <typename T>
cudaError_t launch_decode_attention(const void* q, const void* k_cache, const void* v_cache, const void* lengths,
                                    int lengths_int64, const bool* key_valid, void* out, float* part_ml,
                                    float* part_acc, int batch, int q_heads, int kv_heads, int max_len, int head_dim,
                                    int num_splits, cudaStream_t stream) {
  switch (head_dim) {
    case 16:
      launch_split_for_group<T, 16>(q, k_cache, v_cache, lengths, lengths_int64, key_valid, part_ml, part_acc, batch,
                                    q_heads, kv_heads, max_len, num_splits, stream);
      break;
    case 64:
      launch_split_for_group<T, 64>(q, k_cache, v_cache, lengths, lengths_int64, key_valid, part_ml, part_acc, batch,
                                    q_heads, kv_heads, max_len, num_splits, stream);
      break;
    case 128:
      launch_split_for_group<T, 128>(q, k_cache, v_cache, lengths, lengths_int64, key_valid, part_ml, part_acc,
                                     batch, q_heads, kv_heads, max_len, num_splits, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  attention_combine_kernel<T><<<dim3(q_heads, batch), head_dim, 0, stream>>>(part_ml, part_acc, static_cast<T*>(out),
                                                                              num_splits);
  return cudaGetLastError();
}

}  // namespace

// Splits per sequence: enough blocks for about two waves over the GPU, but at least 64 cache
// slots per split so short caches are not cut into slivers the merge would then dominate.
extern "C" int echox_decode_attention_num_splits(int batch, int q_heads, int kv_heads, int max_len) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int group = q_heads / kv_heads;
  const int blocks = batch * kv_heads * ceil_div(group, head_tile(group));
  const int wanted = ceil_div(2 * sms, max(1, blocks));  // no blocks (an empty batch): one split
  return max(1, min(wanted, ceil_div(max_len, 64)));
}

#define ECHOX_DECODE_ATTENTION_LAUNCHER(suffix, T)                                                                 \
  extern "C" cudaError_t echox_decode_attention_##suffix(                                                          \
      const void* q, const void* k_cache, const void* v_cache, const void* lengths, int lengths_int64,            \
      const bool* key_valid, void* out, float* part_ml, float* part_acc, int batch, int q_heads, int kv_heads,     \
      int max_len, int head_dim, int num_splits, cudaStream_t stream) {                                            \
    return launch_decode_attention<T>(q, k_cache, v_cache, lengths, lengths_int64, key_valid, out, part_ml,        \
                                      part_acc, batch, q_heads, kv_heads, max_len, head_dim, num_splits, stream);  \
  }

ECHOX_DECODE_ATTENTION_LAUNCHER(fp32, float)
ECHOX_DECODE_ATTENTION_LAUNCHER(fp16, __half)
ECHOX_DECODE_ATTENTION_LAUNCHER(bf16, __nv_bfloat16)
