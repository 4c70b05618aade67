// The streaming-conv kernels of the unit vocoder, the CUDA twins of echox.vocoder_ops:
// - conv1d_valid: y = conv1d(leaky_relu(x, slope), w, b, dilation), no padding (+ residual);
// - conv_transpose1d_window: outputs start .. start + count - 1 of the unpadded
//   conv_transpose1d(leaky_relu(x, slope), w, b, stride), and only those.
//
// Both are direct convolutions tiled over (output channels, time). A block walks its input
// channels in chunks of kChunk: it stages the chunk's input window (leaky relu applied once,
// widened to fp32) and the chunk's weights for its channel tile in shared memory, then each
// thread accumulates a register tile of outputs in fp32. So a block reads each of its weights
// from global memory once, however many time steps it covers. A streaming push of a few frames
// gives few tiles and is bound by reading the weights, so the input channels are then also
// split across blocks: each split stores fp32 partial sums, and a second kernel adds them in a
// fixed order (the result does not depend on scheduling), then bias and residual.

#include "common.cuh"

namespace {

using echox::ceil_div;
using echox::from_float;
using echox::to_float;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;              // input channels staged per step, one warp each
constexpr int kMinChunksPerSplit = 2;  // a split sums over at least 16 input channels
constexpr int kReduceBlocksPerSm = 8;
constexpr size_t kDefaultSmem = 48 * 1024;  // more needs an explicit opt-in per kernel
static_assert(kWarps == kChunk, "the transposed-conv weights are staged one warp per input channel");

// Block tile: CoThreads x (kThreads / CoThreads) threads, each with CoPer channels x TPer steps.
// A thread's channels are adjacent (one vector read of the staged weights); its steps are
// kTThreads apart, so a warp reads consecutive staged inputs.
template <int CoThreads, int CoPer, int TPer>
struct Tile {
  static constexpr int kCoPer = CoPer;
  static constexpr int kTPer = TPer;
  static constexpr int kTThreads = kThreads / CoThreads;
  static constexpr int kCo = CoThreads * CoPer;
  static constexpr int kT = kTThreads * TPer;
  // Staged weight rows are padded by one vector: the staging stores of a warp (consecutive
  // rows) then spread over 8 banks instead of one, and rows stay vector-aligned.
  static constexpr int kWStride = kCo + CoPer;
};

using WideTile = Tile<16, 4, 4>;    // 64 channels x 64 steps: long inputs, >= 64 channels
using ShortTile = Tile<32, 1, 1>;   // 32 x 8: pushes of a few frames, many blocks per weight
using NarrowTile = Tile<4, 4, 2>;   // 16 x 128: the 16- and 32-channel late stages
using SingleTile = Tile<1, 1, 1>;   // 1 x 256: conv_post's single channel (no input splits: 16 channels)

enum TileKind { kWide, kShort, kNarrow, kSingle };

TileKind pick_tile(int cout, int out_len) {
  if (cout < 4) return kSingle;
  if (cout < 64) return kNarrow;
  return out_len <= 32 ? kShort : kWide;
}

template <typename Tl>
int tile_blocks(int batch, int cout, int out_len) {
  return batch * ceil_div(cout, Tl::kCo) * ceil_div(out_len, Tl::kT);
}

int blocks_per_split(TileKind kind, int batch, int cout, int out_len) {
  switch (kind) {
    case kWide:
      return tile_blocks<WideTile>(batch, cout, out_len);
    case kShort:
      return tile_blocks<ShortTile>(batch, cout, out_len);
    case kNarrow:
      return tile_blocks<NarrowTile>(batch, cout, out_len);
    default:
      return tile_blocks<SingleTile>(batch, cout, out_len);
  }
}

int multiprocessors() {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

// Sizes and scalars of one call. `step` is the dilation (conv) or the stride (transposed conv);
// `start` is the first output of the transposed conv's window (0 for the conv).
struct ConvShape {
  int batch, cin, cout, length, out_len, kernel, step, start;
  int chunks_per_split;
  int window;  // staged inputs per channel
  float slope;
};

__device__ __forceinline__ float leaky_relu(float x, float slope) { return x > 0.f ? x : x * slope; }

template <int N>
__device__ __forceinline__ void load_shared(const float* p, float (&out)[N]) {
  if constexpr (N == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x;
    out[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

// Inputs first .. first + window - 1 of the chunk's channels as xs[ci * window + j], leaky relu
// applied; zero past either end of the input and past the last channel. One warp per channel.
template <typename T>
__device__ void stage_inputs(const T* __restrict__ x, float* xs, const ConvShape& s, int b, int ci0, int first) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int ci = warp; ci < kChunk; ci += kWarps) {
    const bool channel = ci0 + ci < s.cin;
    const T* row = x + (static_cast<size_t>(b) * s.cin + ci0 + ci) * s.length;
    for (int j = lane; j < s.window; j += 32) {
      const int i = first + j;
      const bool inside = channel && i >= 0 && i < s.length;
      xs[ci * s.window + j] = inside ? leaky_relu(to_float(__ldg(row + i)), s.slope) : 0.f;
    }
  }
}

// Conv weights [Cout, Cin, K] of the chunk for the block's channels, as ws[(ci * K + k) * kWStride
// + co]; zero past the last channel either way. For one output channel the chunk's kChunk * K
// weights are contiguous: one warp per output channel, its lanes along them.
template <typename T, typename Tl>
__device__ void stage_conv_weights(const T* __restrict__ w, float* ws, const ConvShape& s, int co0, int ci0) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = kChunk * s.kernel;
  const int valid = min(kChunk, s.cin - ci0) * s.kernel;
  for (int co = warp; co < Tl::kCo; co += kWarps) {
    const bool channel = co0 + co < s.cout;
    const T* src = w + (static_cast<size_t>(co0 + co) * s.cin + ci0) * s.kernel;
    for (int r = lane; r < row; r += 32) {
      ws[r * Tl::kWStride + co] = channel && r < valid ? to_float(__ldg(src + r)) : 0.f;
    }
  }
}

// Transposed-conv weights [Cin, Cout, K] of the chunk, staged like stage_conv_weights. For one
// input channel the block's kCo * K weights are contiguous: one warp per input channel.
template <typename T, typename Tl>
__device__ void stage_transposed_weights(const T* __restrict__ w, float* ws, const ConvShape& s, int co0, int ci0) {
  const int lane = threadIdx.x % 32, ci = threadIdx.x / 32;
  const int kernel = s.kernel;
  const int valid = ci0 + ci < s.cin ? min(Tl::kCo, s.cout - co0) * kernel : 0;
  const T* src = w + (static_cast<size_t>(ci0 + ci) * s.cout + co0) * kernel;
  // (co, k) of element r = lane + 32 n, advanced without a division per element.
  int co = lane / kernel, k = lane % kernel;
  const int co_step = 32 / kernel, k_step = 32 % kernel;
  for (int r = lane; r < Tl::kCo * kernel; r += 32) {
    ws[(ci * kernel + k) * Tl::kWStride + co] = r < valid ? to_float(__ldg(src + r)) : 0.f;
    co += co_step;
    k += k_step;
    if (k >= kernel) {
      k -= kernel;
      ++co;
    }
  }
}

// The block's outputs: final values (bias, residual, cast) with one split, fp32 partials else.
// `o0` is the first output of the tile, counted from the start of y.
template <typename T, typename Tl>
__device__ void store_tile(const float (&acc)[Tl::kCoPer][Tl::kTPer], const T* __restrict__ bias,
                           const T* __restrict__ residual, T* __restrict__ y, float* __restrict__ partial,
                           const ConvShape& s, int b, int split, int co_first, int o_first) {
  const bool single = gridDim.z == static_cast<unsigned>(s.batch);
  const size_t outputs = static_cast<size_t>(s.batch) * s.cout * s.out_len;
#pragma unroll
  for (int c = 0; c < Tl::kCoPer; ++c) {
    const int co = co_first + c;
    if (co >= s.cout) continue;
    const float bias_c = single ? to_float(bias[co]) : 0.f;
#pragma unroll
    for (int j = 0; j < Tl::kTPer; ++j) {
      const int o = o_first + j * Tl::kTThreads;
      if (o >= s.out_len) continue;
      const size_t i = (static_cast<size_t>(b) * s.cout + co) * s.out_len + o;
      if (single) {
        y[i] = from_float<T>(acc[c][j] + bias_c + (residual ? to_float(residual[i]) : 0.f));
      } else {
        partial[split * outputs + i] = acc[c][j];
      }
    }
  }
}

// Grid (time tiles, channel tiles, batch * splits); dynamic shared memory holds the staged
// weights, then the staged inputs (window = kT + (K - 1) * dilation per channel).
template <typename T, typename Tl>
__global__ void __launch_bounds__(kThreads)
    conv1d_valid_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                        const T* __restrict__ residual, T* __restrict__ y, float* __restrict__ partial,
                        ConvShape s) {
  extern __shared__ float4 smem[];  // float4: 16-byte alignment for the weight vectors
  float* ws = reinterpret_cast<float*>(smem);
  float* xs = ws + kChunk * s.kernel * Tl::kWStride;
  const int tx = threadIdx.x % Tl::kTThreads, ty = threadIdx.x / Tl::kTThreads;
  const int t0 = blockIdx.x * Tl::kT, co0 = blockIdx.y * Tl::kCo;
  const int splits = gridDim.z / s.batch, b = blockIdx.z / splits, split = blockIdx.z % splits;
  const int ci_end = min(s.cin, (split + 1) * s.chunks_per_split * kChunk);

  float acc[Tl::kCoPer][Tl::kTPer] = {};
  for (int ci0 = split * s.chunks_per_split * kChunk; ci0 < ci_end; ci0 += kChunk) {
    stage_conv_weights<T, Tl>(w, ws, s, co0, ci0);
    stage_inputs(x, xs, s, b, ci0, t0);
    __syncthreads();
#pragma unroll
    for (int ci = 0; ci < kChunk; ++ci) {
      const float* x_row = xs + ci * s.window + tx;
      const float* w_row = ws + ci * s.kernel * Tl::kWStride + ty * Tl::kCoPer;
      for (int k = 0; k < s.kernel; ++k) {
        float wv[Tl::kCoPer], xv[Tl::kTPer];
        load_shared(w_row + k * Tl::kWStride, wv);
#pragma unroll
        for (int j = 0; j < Tl::kTPer; ++j) xv[j] = x_row[k * s.step + j * Tl::kTThreads];
#pragma unroll
        for (int c = 0; c < Tl::kCoPer; ++c) {
#pragma unroll
          for (int j = 0; j < Tl::kTPer; ++j) acc[c][j] = fmaf(wv[c], xv[j], acc[c][j]);
        }
      }
    }
    __syncthreads();  // the next chunk overwrites the staged tiles
  }
  store_tile<T, Tl>(acc, bias, residual, y, partial, s, b, split, co0 + ty * Tl::kCoPer, t0 + tx);
}

__device__ __forceinline__ int floor_div(int a, int b) { return a >= 0 ? a / b : -((b - 1 - a) / b); }

// Output t gathers input i = t / stride - n with tap k = t % stride + n * stride, for k < K.
// Grid and shared memory as conv1d_valid_kernel; the staged window starts at the first input
// the tile's first output can use.
template <typename T, typename Tl>
__global__ void __launch_bounds__(kThreads)
    conv_transpose1d_window_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                   T* __restrict__ y, float* __restrict__ partial, ConvShape s) {
  extern __shared__ float4 smem[];
  float* ws = reinterpret_cast<float*>(smem);
  float* xs = ws + kChunk * s.kernel * Tl::kWStride;
  const int tx = threadIdx.x % Tl::kTThreads, ty = threadIdx.x / Tl::kTThreads;
  const int o0 = blockIdx.x * Tl::kT, co0 = blockIdx.y * Tl::kCo;
  const int splits = gridDim.z / s.batch, b = blockIdx.z / splits, split = blockIdx.z % splits;
  const int ci_end = min(s.cin, (split + 1) * s.chunks_per_split * kChunk);
  const int stride = s.step, first = floor_div(s.start + o0 - (s.kernel - 1), stride);

  int phase[Tl::kTPer], newest[Tl::kTPer];  // per step: first tap, and its input within the window
#pragma unroll
  for (int j = 0; j < Tl::kTPer; ++j) {
    const int t = s.start + o0 + tx + j * Tl::kTThreads;
    phase[j] = t % stride;
    newest[j] = t / stride - first;
  }

  float acc[Tl::kCoPer][Tl::kTPer] = {};
  for (int ci0 = split * s.chunks_per_split * kChunk; ci0 < ci_end; ci0 += kChunk) {
    stage_transposed_weights<T, Tl>(w, ws, s, co0, ci0);
    stage_inputs(x, xs, s, b, ci0, first);
    __syncthreads();
#pragma unroll
    for (int ci = 0; ci < kChunk; ++ci) {
      const float* x_row = xs + ci * s.window;
      const float* w_row = ws + ci * s.kernel * Tl::kWStride + ty * Tl::kCoPer;
#pragma unroll
      for (int j = 0; j < Tl::kTPer; ++j) {
        for (int k = phase[j], i = newest[j]; k < s.kernel; k += stride, --i) {
          float wv[Tl::kCoPer];
          load_shared(w_row + k * Tl::kWStride, wv);
          const float xv = x_row[i];
#pragma unroll
          for (int c = 0; c < Tl::kCoPer; ++c) acc[c][j] = fmaf(wv[c], xv, acc[c][j]);
        }
      }
    }
    __syncthreads();
  }
  store_tile<T, Tl>(acc, bias, nullptr, y, partial, s, b, split, co0 + ty * Tl::kCoPer, o0 + tx);
}

// y = sum of the splits' partials (in split order) + bias (+ residual), cast to T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const float* __restrict__ partial, const T* __restrict__ bias, const T* __restrict__ residual,
                      T* __restrict__ y, int splits, int cout, int out_len, size_t outputs) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x; i < outputs;
       i += static_cast<size_t>(gridDim.x) * kThreads) {
    float v = partial[i];
    for (int p = 1; p < splits; ++p) v += partial[p * outputs + i];
    const int co = static_cast<int>(i / out_len % cout);
    y[i] = from_float<T>(v + to_float(bias[co]) + (residual ? to_float(residual[i]) : 0.f));
  }
}

template <typename Tl>
size_t shared_bytes(const ConvShape& s) {
  return sizeof(float) * kChunk * (static_cast<size_t>(s.kernel) * Tl::kWStride + s.window);
}

// Kernels above 48 KB of dynamic shared memory must say so first (long dilated kernels only).
template <typename Kernel>
cudaError_t allow_shared(Kernel* kernel, size_t bytes) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T>
cudaError_t sum_splits(const float* partial, const void* bias, const void* residual, void* y, int splits,
                       const ConvShape& s, cudaStream_t stream) {
  const size_t outputs = static_cast<size_t>(s.batch) * s.cout * s.out_len;
  const size_t wanted = (outputs + kThreads - 1) / kThreads;
  const size_t most = static_cast<size_t>(multiprocessors()) * kReduceBlocksPerSm;
  const int blocks = static_cast<int>(wanted < most ? wanted : most);
  sum_splits_kernel<T><<<blocks, kThreads, 0, stream>>>(partial, static_cast<const T*>(bias),
                                                        static_cast<const T*>(residual), static_cast<T*>(y), splits,
                                                        s.cout, s.out_len, outputs);
  return cudaGetLastError();
}

template <typename T, typename Tl>
cudaError_t launch_conv1d(const void* x, const void* w, const void* bias, const void* residual, void* y,
                          float* partial, int splits, ConvShape s, cudaStream_t stream) {
  if (s.batch == 0 || s.cout == 0 || s.out_len <= 0) return cudaSuccess;
  s.window = Tl::kT + (s.kernel - 1) * s.step;
  s.chunks_per_split = ceil_div(ceil_div(s.cin, kChunk), splits);
  const size_t smem = shared_bytes<Tl>(s);
  if (const cudaError_t err = allow_shared(conv1d_valid_kernel<T, Tl>, smem); err != cudaSuccess) return err;
  const dim3 grid(ceil_div(s.out_len, Tl::kT), ceil_div(s.cout, Tl::kCo), s.batch * splits);
  conv1d_valid_kernel<T, Tl><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias),
      static_cast<const T*>(residual), static_cast<T*>(y), partial, s);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess || splits == 1) return err;
  return sum_splits<T>(partial, bias, residual, y, splits, s, stream);
}

template <typename T, typename Tl>
cudaError_t launch_conv_transpose1d(const void* x, const void* w, const void* bias, void* y, float* partial,
                                    int splits, ConvShape s, cudaStream_t stream) {
  if (s.batch == 0 || s.cout == 0 || s.out_len <= 0) return cudaSuccess;
  // Inputs a tile of kT outputs can use: see floor_div in the kernel; at most this many.
  s.window = (Tl::kT + s.kernel - 2) / s.step + 2;
  s.chunks_per_split = ceil_div(ceil_div(s.cin, kChunk), splits);
  const size_t smem = shared_bytes<Tl>(s);
  if (const cudaError_t err = allow_shared(conv_transpose1d_window_kernel<T, Tl>, smem); err != cudaSuccess) {
    return err;
  }
  const dim3 grid(ceil_div(s.out_len, Tl::kT), ceil_div(s.cout, Tl::kCo), s.batch * splits);
  conv_transpose1d_window_kernel<T, Tl><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias), static_cast<T*>(y), partial,
      s);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess || splits == 1) return err;
  return sum_splits<T>(partial, bias, nullptr, y, splits, s, stream);
}

template <typename T>
cudaError_t conv1d_valid(const void* x, const void* w, const void* bias, const void* residual, void* y,
                         float* partial, int splits, const ConvShape& s, cudaStream_t stream) {
  switch (pick_tile(s.cout, s.out_len)) {
    case kWide:
      return launch_conv1d<T, WideTile>(x, w, bias, residual, y, partial, splits, s, stream);
    case kShort:
      return launch_conv1d<T, ShortTile>(x, w, bias, residual, y, partial, splits, s, stream);
    case kNarrow:
      return launch_conv1d<T, NarrowTile>(x, w, bias, residual, y, partial, splits, s, stream);
    default:
      return launch_conv1d<T, SingleTile>(x, w, bias, residual, y, partial, splits, s, stream);
  }
}

template <typename T>
cudaError_t conv_transpose1d_window(const void* x, const void* w, const void* bias, void* y, float* partial,
                                    int splits, const ConvShape& s, cudaStream_t stream) {
  switch (pick_tile(s.cout, s.out_len)) {
    case kWide:
      return launch_conv_transpose1d<T, WideTile>(x, w, bias, y, partial, splits, s, stream);
    case kShort:
      return launch_conv_transpose1d<T, ShortTile>(x, w, bias, y, partial, splits, s, stream);
    case kNarrow:
      return launch_conv_transpose1d<T, NarrowTile>(x, w, bias, y, partial, splits, s, stream);
    default:
      return launch_conv_transpose1d<T, SingleTile>(x, w, bias, y, partial, splits, s, stream);
  }
}

}  // namespace

// Input-channel splits for a call with these sizes (the binding sizes the fp32 partials
// [splits, B, Cout, out_len] by it; none are needed for 1). Enough blocks to fill the GPU
// twice over, each split still summing over kMinChunksPerSplit chunks.
extern "C" int echox_vocoder_conv_splits(int batch, int cin, int cout, int out_len) {
  const int blocks = blocks_per_split(pick_tile(cout, out_len), batch, cout, out_len);
  const int wanted = ceil_div(2 * multiprocessors(), max(1, blocks));
  const int most = max(1, min(ceil_div(cin, kChunk) / kMinChunksPerSplit, 65535 / max(1, batch)));
  return max(1, min(wanted, most));
}

#define ECHOX_VOCODER_CONV_LAUNCHERS(suffix, T)                                                                    \
  extern "C" cudaError_t echox_conv1d_valid_##suffix(                                                              \
      const void* x, const void* weight, const void* bias, const void* residual, void* y, float* partial,         \
      int batch, int cin, int cout, int length, int kernel, int dilation, float input_slope, int splits,          \
      cudaStream_t stream) {                                                                                       \
    const int out_len = length - (kernel - 1) * dilation;                                                          \
    const ConvShape s{batch, cin, cout, length, out_len, kernel, dilation, 0, 0, 0, input_slope};                  \
    return conv1d_valid<T>(x, weight, bias, residual, y, partial, splits, s, stream);                              \
  }                                                                                                                \
  extern "C" cudaError_t echox_conv_transpose1d_window_##suffix(                                                   \
      const void* x, const void* weight, const void* bias, void* y, float* partial, int batch, int cin, int cout, \
      int length, int kernel, int stride, int start, int count, float input_slope, int splits,                    \
      cudaStream_t stream) {                                                                                       \
    const ConvShape s{batch, cin, cout, length, count, kernel, stride, start, 0, 0, input_slope};                  \
    return conv_transpose1d_window<T>(x, weight, bias, y, partial, splits, s, stream);                             \
  }

ECHOX_VOCODER_CONV_LAUNCHERS(fp32, float)
ECHOX_VOCODER_CONV_LAUNCHERS(fp16, __half)
ECHOX_VOCODER_CONV_LAUNCHERS(bf16, __nv_bfloat16)
