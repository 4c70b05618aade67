// Fused head projection + token selection, the CUDA twin of echox.sampling.head_select.
//
// hidden [B, h] times head rows weight [R, h] gives logits [B, R] (fp32 accumulation), and one
// row per sequence is chosen:
// - greedy: the argmax, fused into the GEMV (the logits never reach memory);
// - temperature only: Gumbel-max, argmax of logits / T + g(seed, step, b, r), also fused;
// - with top-k / top-p: the GEMV stores the tempered logits and each block's maximum; a gather
//   over many blocks keeps the candidates (with top-p, the columns within kCandidateSpan of the
//   row maximum, the only ones top-p can keep, see below; with top-k alone, every column), and
//   one block per sequence finds the cut-off among them by radix descent over the float bits,
//   then draws by Gumbel-max over the kept set. At the released temperature 0.2 the candidates
//   are the columns within 6.4 raw logits of the best one, however many of the 128k that is.
// The noise is the counter-based hash of echox.sampling.uniform_noise, so the same token as the
// torch reference is drawn. `step` is read on the device: one counter for the batch (sequence b
// hashed as row b), or one per sequence (each hashed as row 0, as if it ran alone), which lets
// independent conversations share one read of the head. Ties go to the lowest row.

#include <stdint.h>

#include "common.cuh"

// Whether a call takes the top-k/top-p path (and so needs the `scaled` workspace instead of
// the partial argmaxes): one definition for the launcher and for the binding that sizes both.
extern "C" int echox_head_select_filtered(int rows, float temperature, float top_p, int top_k) {
  return temperature > 0.f && ((top_k > 0 && top_k < rows) || top_p < 1.f);
}

namespace {

using echox::ceil_div;
using echox::kVec;

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvBlocksPerSm = 4;  // 32 resident warps per SM, 2 KB of loads in flight each
constexpr int kBatchTile = 4;        // sequences sharing one read of the weights
constexpr int kGemvUnroll = 4;       // 16-byte weight loads in flight per lane
constexpr int kSelectThreads = 1024;
constexpr int kBins = 256;  // radix digits of 8 bits: four passes pin down a 32-bit key
constexpr float kMassScale = 1099511627776.0f;  // 2^40: masses in fixed point sum exactly, in any order
constexpr int kGatherThreads = 256;
constexpr int kGatherBlocksPerSm = 2;
// Which columns can matter under top-p. A column more than 27.8 below the row maximum has mass
// exp(x - max) * 2^40 < 1, zero in fixed point, and top-p < 1 never keeps a zero-mass column
// (the mass above it is the whole mass). So with top-p the columns more than kCandidateSpan below
// the maximum are dropped before the selection: no count within the kept set, no mass and no
// draw changes. Not with top-k alone, which keeps its k columns however low they are (the noise
// is bounded, within -2.82 .. 16.64, so this span would hold there too; top-k still scans them all).
constexpr float kCandidateSpan = 32.f;

enum Mode { kGreedy, kSample, kStoreScaled };

// murmur3's 32-bit finaliser and the key/bit mapping of echox.sampling.uniform_noise; only the
// low 32 bits of each product matter there too.
__device__ __forceinline__ uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// -log(-log(u)) with u in (0, 1); accurate logf (no fast math) so the bits match torch.log.
__device__ __forceinline__ float gumbel(uint32_t seed, uint32_t step, uint32_t row, uint32_t col) {
  const uint32_t key = col * 0x9E3779B1u + row * 0x85EBCA77u + step * 0xC2B2AE3Du + seed * 0x27D4EB2Fu;
  const uint32_t bits = fmix32(key) >> 9;  // 23 random bits: u <= 1 - 2^-24, never 1.0
  const float u = (static_cast<float>(bits) + 0.5f) * (1.0f / 8388608.0f);
  return -logf(-logf(u));
}

// Where each sequence's noise comes from: its step counter and the row it is hashed as.
struct NoiseCounters {
  const long long* step;
  bool per_row;  // a counter per sequence, each hashed as row 0; else one counter, rows by index

  __device__ uint32_t step_of(int b) const { return static_cast<uint32_t>(step[per_row ? b : 0]); }
  __device__ uint32_t row_of(int b) const { return per_row ? 0u : static_cast<uint32_t>(b); }
};

// Larger value wins; equal values go to the lower index, as torch.argmax.
__device__ __forceinline__ bool beats(float v, int i, float best_v, int best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float ov = __shfl_xor_sync(echox::kFullWarp, v, offset);
    const int oi = __shfl_xor_sync(echox::kFullWarp, i, offset);
    if (beats(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

// The row an argmax found, or row 0 when no value compared (every logit NaN, or -inf everywhere:
// torch.argmax's answer there) rather than the INT_MAX it starts from, which is no row at all.
__device__ __forceinline__ int chosen_row(int row) { return row == INT_MAX ? 0 : row; }

// Block-wide argmax; every thread gets the winner's index.
template <int Threads>
__device__ int block_argmax(float v, int i) {
  __shared__ float warp_v[Threads / 32];
  __shared__ int warp_i[Threads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  warp_argmax(v, i);
  if (lane == 0) {
    warp_v[warp] = v;
    warp_i[warp] = i;
  }
  __syncthreads();
  v = lane < Threads / 32 ? warp_v[lane] : -INFINITY;
  i = lane < Threads / 32 ? warp_i[lane] : INT_MAX;
  warp_argmax(v, i);
  __syncthreads();  // the shared slots are free again for the next call
  return i;
}

template <int Threads>
__device__ float block_max(float v) {
  __shared__ float warp_v[Threads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = echox::warp_max(v);
  if (lane == 0) warp_v[warp] = v;
  __syncthreads();
  v = echox::warp_max(lane < Threads / 32 ? warp_v[lane] : -INFINITY);
  __syncthreads();
  return v;
}

// Grid (blocks, ceil(B / kBatchTile)). Each warp takes whole rows (grid-stride) and dots them
// with up to kBatchTile hidden vectors, which stay in L1. Each block leaves its best (value, row)
// per sequence in part_val/part_idx [B, blocks]; kStoreScaled also writes logits / T to scaled.
template <typename T, Mode M>
__global__ void __launch_bounds__(kGemvThreads, kGemvBlocksPerSm)
    head_gemv_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, int batch, int rows, int width,
                     float inv_temperature, uint32_t seed, NoiseCounters counters,
                     float* __restrict__ scaled, float* __restrict__ part_val, int* __restrict__ part_idx) {
  constexpr int V = kVec<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b0 = blockIdx.y * kBatchTile, nb = min(kBatchTile, batch - b0);
  float best[kBatchTile];
  int best_row[kBatchTile];
  uint32_t step32[kBatchTile], hashed_row[kBatchTile];
#pragma unroll
  for (int t = 0; t < kBatchTile; ++t) {
    best[t] = -INFINITY;
    best_row[t] = INT_MAX;
    const bool noisy = M == kSample && t < nb;
    step32[t] = noisy ? counters.step_of(b0 + t) : 0u;
    hashed_row[t] = noisy ? counters.row_of(b0 + t) : 0u;
  }

  for (int r = blockIdx.x * kGemvWarps + warp; r < rows; r += gridDim.x * kGemvWarps) {
    const T* w_row = weight + static_cast<size_t>(r) * width;
    float acc[kBatchTile] = {};
    for (int base = lane * V; base < width; base += 32 * V * kGemvUnroll) {
      float w[kGemvUnroll][V];
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int i = base + u * 32 * V;
        if (i < width) {
          echox::load_vec(w_row + i, w[u]);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) w[u][e] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int i = base + u * 32 * V;
        if (i >= width) continue;
#pragma unroll
        for (int t = 0; t < kBatchTile; ++t) {
          if (t >= nb) continue;
          float x[V];
          echox::load_vec(hidden + static_cast<size_t>(b0 + t) * width + i, x);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[t] = fmaf(w[u][e], x[e], acc[t]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kBatchTile; ++t) {
      if (t >= nb) continue;
      const float logit = echox::group_sum<32>(acc[t]);
      // Explicit round-to-nearest multiply, then add: the reference rounds logits / T before adding
      // the noise, and nvcc would otherwise fuse the two into one fma (one rounding, other tokens).
      float v;
      if constexpr (M == kStoreScaled) {
        v = __fmul_rn(logit, inv_temperature);
        if (lane == 0) scaled[static_cast<size_t>(b0 + t) * rows + r] = v;
      } else {
        v = M == kGreedy ? logit
                         : __fadd_rn(__fmul_rn(logit, inv_temperature), gumbel(seed, step32[t], hashed_row[t], r));
      }
      if (v > best[t]) {  // rows rise within a warp, so a tie keeps the earlier row
        best[t] = v;
        best_row[t] = r;
      }
    }
  }

  {  // each block's best per sequence (for kStoreScaled, its maximum: the gather's row maximum)
    __shared__ float warp_best[kGemvWarps][kBatchTile];
    __shared__ int warp_row[kGemvWarps][kBatchTile];
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < kBatchTile; ++t) {
        warp_best[warp][t] = best[t];
        warp_row[warp][t] = best_row[t];
      }
    }
    __syncthreads();
    if (threadIdx.x < nb) {
      const int t = threadIdx.x;
      float v = warp_best[0][t];
      int row = warp_row[0][t];
      for (int w = 1; w < kGemvWarps; ++w) {
        if (beats(warp_best[w][t], warp_row[w][t], v, row)) {
          v = warp_best[w][t];
          row = warp_row[w][t];
        }
      }
      part_val[static_cast<size_t>(b0 + t) * gridDim.x + blockIdx.x] = v;
      part_idx[static_cast<size_t>(b0 + t) * gridDim.x + blockIdx.x] = row;
    }
  }
}

// Grid B: the best of the GEMV blocks' candidates.
__global__ void __launch_bounds__(kGemvThreads)
    argmax_parts_kernel(const float* __restrict__ part_val, const int* __restrict__ part_idx, int parts,
                        long long* __restrict__ out) {
  const float* vals = part_val + static_cast<size_t>(blockIdx.x) * parts;
  const int* idxs = part_idx + static_cast<size_t>(blockIdx.x) * parts;
  float v = -INFINITY;
  int row = INT_MAX;
  for (int p = threadIdx.x; p < parts; p += kGemvThreads) {
    if (beats(vals[p], idxs[p], v, row)) {
      v = vals[p];
      row = idxs[p];
    }
  }
  row = block_argmax<kGemvThreads>(v, row);
  if (threadIdx.x == 0) out[blockIdx.x] = chosen_row(row);
}

// A uint32 that orders like the float: flip all bits of negatives, the sign bit of the rest.
// -0 counts as +0 (they compare equal: one tie group for top-k and top-p, as in the reference).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.f ? 0.f : x);
  return bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
}

// Per-digit counts and fixed-point masses, turned in place into sums over digits >= each bin.
struct Histogram {
  uint32_t count[kBins];
  unsigned long long mass[kBins];
};

// Columns taking part in a radix pass: kept so far (key >= floor) with the higher digits fixed so far.
struct Region {
  uint32_t floor;
  uint32_t prefix;
  int shift;  // the digit of this pass is (key >> shift) & 0xff

  __device__ bool contains(uint32_t key) const {
    const uint32_t high = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
    return key >= floor && (key & high) == (prefix & high);
  }
};

// The candidates of one sequence: `count` column indices into its tempered logits, in any order.
struct Candidates {
  const float* scaled;
  const int* index;
  int count;

  __device__ float value(int i) const { return i < count ? scaled[index[i]] : -INFINITY; }
};

// Histogram of the pass digit over the region, masses exp(s - max) in fixed point when asked.
// Warp-aggregated counts keep the atomics few where most logits share their top bits.
__device__ void fill_histogram(Candidates c, Region region, bool with_mass, float max_value, Histogram& h) {
  for (int j = threadIdx.x; j < kBins; j += kSelectThreads) {
    h.count[j] = 0;
    h.mass[j] = 0;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  for (int base = 0; base < c.count; base += kSelectThreads) {
    const int i = base + threadIdx.x;
    const float x = c.value(i);
    const uint32_t key = order_key(x);
    const bool in = i < c.count && region.contains(key);
    const unsigned members = __ballot_sync(echox::kFullWarp, in);
    if (!in) continue;
    const uint32_t digit = (key >> region.shift) & (kBins - 1);
    const unsigned peers = __match_any_sync(members, digit);
    if (lane == __ffs(peers) - 1) atomicAdd(&h.count[digit], static_cast<uint32_t>(__popc(peers)));
    if (with_mass) {
      const unsigned long long m = __float2ull_rz(expf(x - max_value) * kMassScale);
      if (m) atomicAdd(&h.mass[digit], m);
    }
  }
  __syncthreads();
}

// In-place suffix sums (Hillis-Steele): count[j], mass[j] become the totals over digits >= j.
__device__ void suffix_sums(Histogram& h) {
  const int j = threadIdx.x;
  for (int offset = 1; offset < kBins; offset *= 2) {
    uint32_t c = 0;
    unsigned long long m = 0;
    if (j + offset < kBins) {
      c = h.count[j + offset];
      m = h.mass[j + offset];
    }
    __syncthreads();
    if (j < kBins) {
      h.count[j] += c;
      h.mass[j] += m;
    }
    __syncthreads();
  }
}

// Key of the k-th largest column (counting repeats, as torch.topk): a column is in the top-k set
// iff its key is >= this one.
__device__ uint32_t kth_largest_key(Candidates c, int k, Histogram& h) {
  __shared__ uint32_t chosen_digit;
  __shared__ int rank_left;
  Region region{0u, 0u, 24};
  int rank = k;  // rank of the target among the columns of the region, from the top
  for (; region.shift >= 0; region.shift -= 8) {
    fill_histogram(c, region, false, 0.f, h);
    suffix_sums(h);
    const int j = threadIdx.x;
    if (j < kBins) {
      const uint32_t above = j + 1 < kBins ? h.count[j + 1] : 0u;
      if (above < static_cast<uint32_t>(rank) && static_cast<uint32_t>(rank) <= h.count[j]) {
        chosen_digit = j;
        rank_left = rank - static_cast<int>(above);
      }
    }
    __syncthreads();
    region.prefix |= chosen_digit << region.shift;
    rank = rank_left;
    __syncthreads();
  }
  return region.prefix;
}

// Key of the least likely column kept by top-p among the columns with key >= floor: column i is
// kept iff the mass of the columns strictly more likely than i is < top_p. That set is every
// key >= the one found: a radix descent into the lowest digit whose best column still qualifies.
__device__ uint32_t top_p_key(Candidates c, uint32_t floor, float max_value, float top_p, Histogram& h) {
  __shared__ unsigned long long total_mass;
  __shared__ int lowest_digit;
  Region region{floor, 0u, 24};
  unsigned long long mass_above = 0;  // of the kept columns above the region
  for (; region.shift >= 0; region.shift -= 8) {
    fill_histogram(c, region, true, max_value, h);
    suffix_sums(h);
    const int j = threadIdx.x;
    if (j == 0) {
      lowest_digit = kBins;
      if (region.shift == 24) total_mass = h.mass[0];
    }
    __syncthreads();
    const double budget = static_cast<double>(top_p) * static_cast<double>(total_mass);
    if (j < kBins) {
      const uint32_t above_count = j + 1 < kBins ? h.count[j + 1] : 0u;
      const unsigned long long above = mass_above + (j + 1 < kBins ? h.mass[j + 1] : 0ull);
      if (h.count[j] > above_count && static_cast<double>(above) < budget) atomicMin(&lowest_digit, j);
    }
    __syncthreads();
    const int digit = lowest_digit;
    region.prefix |= static_cast<uint32_t>(digit) << region.shift;
    if (digit + 1 < kBins) mass_above += h.mass[digit + 1];
    __syncthreads();
  }
  return region.prefix;
}

// Grid (blocks, B): the row maximum from the GEMV blocks' maxima, then every column within
// `span` of it appended to candidates[b] (order is free: the selection does not use it).
__global__ void __launch_bounds__(kGatherThreads)
    gather_candidates_kernel(const float* __restrict__ scaled, int rows, const float* __restrict__ part_max, int parts,
                             float span, int* __restrict__ candidates, int* __restrict__ candidate_count) {
  const int b = blockIdx.y, lane = threadIdx.x % 32;
  const float* s = scaled + static_cast<size_t>(b) * rows;
  float m = -INFINITY;
  for (int p = threadIdx.x; p < parts; p += kGatherThreads) m = fmaxf(m, part_max[static_cast<size_t>(b) * parts + p]);
  const float floor_value = block_max<kGatherThreads>(m) - span;
  for (int base = blockIdx.x * kGatherThreads; base < rows; base += gridDim.x * kGatherThreads) {
    const int i = base + threadIdx.x;
    const bool keep = i < rows && s[i] >= floor_value;
    const unsigned keepers = __ballot_sync(echox::kFullWarp, keep);
    if (keepers == 0) continue;
    int slot = 0;  // one atomic per warp: lane 0 reserves the warp's slots
    if (lane == 0) slot = atomicAdd(candidate_count + b, __popc(keepers));
    slot = __shfl_sync(echox::kFullWarp, slot, 0);
    if (keep) candidates[static_cast<size_t>(b) * rows + slot + __popc(keepers & ((1u << lane) - 1u))] = i;
  }
}

// Grid B: top-k / top-p over the candidates of the stored tempered logits, then Gumbel-max over the kept ones.
__global__ void __launch_bounds__(kSelectThreads)
    filtered_select_kernel(const float* __restrict__ scaled, int rows, const int* __restrict__ candidates,
                           const int* __restrict__ candidate_count, int top_k, float top_p, uint32_t seed,
                           NoiseCounters counters, long long* __restrict__ out) {
  __shared__ Histogram h;
  const int b = blockIdx.x;
  const Candidates c{scaled + static_cast<size_t>(b) * rows, candidates + static_cast<size_t>(b) * rows,
                     candidate_count[b]};
  uint32_t floor = 0;
  if (top_k > 0 && top_k < c.count) floor = kth_largest_key(c, top_k, h);
  if (top_p < 1.f) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < c.count; i += kSelectThreads) m = fmaxf(m, c.value(i));
    m = block_max<kSelectThreads>(m);
    floor = max(floor, top_p_key(c, floor, m, top_p, h));
  }
  const uint32_t step32 = counters.step_of(b), hashed_row = counters.row_of(b);
  float best = -INFINITY;
  int best_row = INT_MAX;
  for (int i = threadIdx.x; i < c.count; i += kSelectThreads) {
    const float x = c.value(i);
    if (order_key(x) < floor) continue;
    const int row = c.index[i];
    const float v = __fadd_rn(x, gumbel(seed, step32, hashed_row, row));
    if (beats(v, row, best, best_row)) {  // candidates come in any order: ties compare rows
      best = v;
      best_row = row;
    }
  }
  const int row = block_argmax<kSelectThreads>(best, best_row);
  if (threadIdx.x == 0) out[b] = chosen_row(row);
}

int gemv_blocks(int rows) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return max(1, min(ceil_div(rows, kGemvWarps), sms * kGemvBlocksPerSm));
}

template <typename T, Mode M>
void launch_gemv(const void* hidden, const void* weight, int batch, int rows, int width, float inv_temperature,
                 uint32_t seed, NoiseCounters counters, float* scaled, float* part_val, int* part_idx,
                 cudaStream_t stream) {
  const dim3 grid(gemv_blocks(rows), ceil_div(batch, kBatchTile));
  head_gemv_kernel<T, M><<<grid, kGemvThreads, 0, stream>>>(static_cast<const T*>(hidden),
                                                            static_cast<const T*>(weight), batch, rows, width,
                                                            inv_temperature, seed, counters, scaled, part_val,
                                                            part_idx);
}

int gather_blocks(int rows) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return max(1, min(ceil_div(rows, kGatherThreads * 4), sms * kGatherBlocksPerSm));
}

template <typename T>
cudaError_t launch_head_select(const void* hidden, const void* weight, int batch, int rows, int width,
                               float temperature, float top_p, int top_k, uint32_t seed, const long long* step,
                               int per_row_step, float* scaled, float* part_val, int* part_idx, int* candidates,
                               int* candidate_count, long long* out, cudaStream_t stream) {
  // The reciprocal, as torch's CUDA division by a Python scalar computes it.
  const float inv_temperature = temperature > 0.f ? 1.f / temperature : 0.f;
  const NoiseCounters counters{step, per_row_step != 0};
  if (temperature == 0.f) {
    launch_gemv<T, kGreedy>(hidden, weight, batch, rows, width, 0.f, seed, counters, nullptr, part_val, part_idx,
                            stream);
  } else if (!echox_head_select_filtered(rows, temperature, top_p, top_k)) {
    launch_gemv<T, kSample>(hidden, weight, batch, rows, width, inv_temperature, seed, counters, nullptr, part_val,
                            part_idx, stream);
  } else {
    launch_gemv<T, kStoreScaled>(hidden, weight, batch, rows, width, inv_temperature, seed, counters, scaled,
                                 part_val, part_idx, stream);
    cudaError_t status = cudaMemsetAsync(candidate_count, 0, batch * sizeof(int), stream);
    if (status != cudaSuccess) return status;
    gather_candidates_kernel<<<dim3(gather_blocks(rows), batch), kGatherThreads, 0, stream>>>(
        scaled, rows, part_val, gemv_blocks(rows), top_p < 1.f ? kCandidateSpan : INFINITY, candidates,
        candidate_count);
    filtered_select_kernel<<<batch, kSelectThreads, 0, stream>>>(scaled, rows, candidates, candidate_count, top_k,
                                                                  top_p, seed, counters, out);
    return cudaGetLastError();
  }
  argmax_parts_kernel<<<batch, kGemvThreads, 0, stream>>>(part_val, part_idx, gemv_blocks(rows), out);
  return cudaGetLastError();
}

}  // namespace

// step: one int64 counter, or (per_row_step) one per sequence. Workspace the caller provides:
// part_val/part_idx of batch * echox_head_select_parts(rows) entries (every path); for top-k/top-p
// also scaled (floats) and candidates (ints) of batch * rows and candidate_count of batch ints.
extern "C" int echox_head_select_parts(int rows) { return gemv_blocks(rows); }

#define ECHOX_HEAD_SELECT_LAUNCHER(suffix, T)                                                                       \
  extern "C" cudaError_t echox_head_select_##suffix(                                                                \
      const void* hidden, const void* weight, int batch, int rows, int width, float temperature, float top_p,       \
      int top_k, uint32_t seed, const long long* step, int per_row_step, float* scaled, float* part_val,          \
      int* part_idx, int* candidates, int* candidate_count, long long* out, cudaStream_t stream) {                \
    return launch_head_select<T>(hidden, weight, batch, rows, width, temperature, top_p, top_k, seed, step,         \
                                 per_row_step, scaled, part_val, part_idx, candidates, candidate_count, out,       \
                                 stream);                                                                           \
  }

ECHOX_HEAD_SELECT_LAUNCHER(fp32, float)
ECHOX_HEAD_SELECT_LAUNCHER(fp16, __half)
ECHOX_HEAD_SELECT_LAUNCHER(bf16, __nv_bfloat16)
