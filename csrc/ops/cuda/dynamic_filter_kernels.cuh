// The CUDA kernels of the dynamic filters (dynamic_filter.h) and the host code that launches them,
// with the launch itself left to the caller: dynamic_filter_kernel.cu starts them on the GPU, and
// tests/cuda_emulation/emulate.cpp runs the same kernels and host code on the CPU, thread by
// thread, so that their index arithmetic is tested on machines without a GPU.
//
// One thread per output element (forward), per input element (grad_x, gathered so no atomics),
// per spatial-filter element (grad_spatial_filter, a sum over the group's channels; on NHWC tensors
// whose channels suit nhwc_spatial_lanes, a warp per pixel and 32 channels, summed over each
// group's lanes by shuffles); for
// grad_channel_filter (a sum over output pixels), one block per (b, c, tap) on NCHW tensors and on
// NHWC ones per (b, chunk of pixels, 32 channels) with every tap's sum in registers, then a sum over
// the chunks (k <= 7; larger kernels take the block per (b, c, tap)). Threads walk elements in the
// tensors' memory order (NCHW or NHWC), so neighbouring threads touch neighbouring addresses.
// float16 and bfloat16 are loaded as such and accumulated in float32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

#include "../dynamic_filter.h"

namespace dynrobust {
namespace {

constexpr int kThreads = 256;

struct Layout {
  int64_t B, C, H, W, OH, OW, G, K, KK, cpg, r, dil, s;
  bool nhwc;

  __device__ __forceinline__ int64_t x_at(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return nhwc ? ((b * H + y) * W + x) * C + c : ((b * C + c) * H + y) * W + x;
  }
  __device__ __forceinline__ int64_t out_at(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return nhwc ? ((b * OH + y) * OW + x) * C + c : ((b * C + c) * OH + y) * OW + x;
  }
  // spatial filter channel grp*KK + t
  __device__ __forceinline__ int64_t sf_at(int64_t b, int64_t ch, int64_t y, int64_t x) const {
    return nhwc ? ((b * OH + y) * OW + x) * G * KK + ch : ((b * G * KK + ch) * OH + y) * OW + x;
  }
  // channel filter (B, C, KK), always contiguous
  __device__ __forceinline__ int64_t cf_at(int64_t b, int64_t c, int64_t t) const { return (b * C + c) * KK + t; }
  // the input (iy, ix) that tap (i, j) of output (y, x) reads; false where it lies outside the image
  __device__ __forceinline__ bool tap_input(int64_t y, int64_t x, int64_t i, int64_t j, int64_t& iy,
                                            int64_t& ix) const {
    iy = y * s + (i - r) * dil, ix = x * s + (j - r) * dil;
    return iy >= 0 && iy < H && ix >= 0 && ix < W;
  }
  // decode a linear index in memory order of a (B, channels, h, w) tensor into (b, ch, y, x)
  __device__ __forceinline__ void decode(int64_t i, int64_t channels, int64_t h, int64_t w, int64_t& b, int64_t& ch,
                                         int64_t& y, int64_t& x) const {
    if (nhwc) {
      ch = i % channels; i /= channels; x = i % w; i /= w; y = i % h; b = i / h;
    } else {
      x = i % w; i /= w; y = i % h; i /= h; ch = i % channels; b = i / channels;
    }
  }
};

template <Combine mode, typename acc_t>
__device__ __forceinline__ acc_t combine(acc_t channel_weight, acc_t spatial_weight) {
  if constexpr (mode == Combine::kMul) return channel_weight * spatial_weight;
  else if constexpr (mode == Combine::kAdd) return channel_weight + spatial_weight;
  else return spatial_weight;
}

// The weight W(b, c, t, y, x) of dynamic_filter.h, and its derivatives with respect to the spatial
// filter (the channel filter's value for kMul, else 1) and to the channel filter (the spatial
// filter's value for kMul, else 1).
template <Combine mode, typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> filter_weight(const scalar_t* CF, const scalar_t* SF,
                                                                   const Layout& L, int64_t b, int64_t c, int64_t t,
                                                                   int64_t y, int64_t x) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t cw = mode == Combine::kSpatialOnly ? acc_t(1) : acc_t(CF[L.cf_at(b, c, t)]);
  return combine<mode>(cw, acc_t(SF[L.sf_at(b, c / L.cpg * L.KK + t, y, x)]));
}

template <Combine mode, typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> weight_by_spatial(const scalar_t* CF, const Layout& L, int64_t b,
                                                                       int64_t c, int64_t t) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (mode == Combine::kMul) return acc_t(CF[L.cf_at(b, c, t)]);
  else return acc_t(1);
}

template <Combine mode, typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> weight_by_channel(const scalar_t* SF, const Layout& L, int64_t b,
                                                                       int64_t c, int64_t t, int64_t y, int64_t x) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (mode == Combine::kMul) return acc_t(SF[L.sf_at(b, c / L.cpg * L.KK + t, y, x)]);
  else return acc_t(1);
}

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 30));
}

template <typename scalar_t, Combine mode>
__global__ void forward_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ CF,
                               const scalar_t* __restrict__ SF, scalar_t* __restrict__ OUT, Layout L, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    int64_t b, c, y, x;
    L.decode(i, L.C, L.OH, L.OW, b, c, y, x);
    acc_t acc = 0;
    for (int64_t t = 0; t < L.KK; ++t) {
      int64_t iy, ix;
      if (!L.tap_input(y, x, t / L.K, t % L.K, iy, ix)) continue;
      acc += acc_t(X[L.x_at(b, c, iy, ix)]) * filter_weight<mode>(CF, SF, L, b, c, t, y, x);
    }
    OUT[i] = scalar_t(acc);
  }
}

template <typename scalar_t, Combine mode>
__global__ void grad_input_kernel(const scalar_t* __restrict__ GO, const scalar_t* __restrict__ CF,
                                  const scalar_t* __restrict__ SF, scalar_t* __restrict__ GX, Layout L, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    int64_t b, c, iy, ix;
    L.decode(i, L.C, L.H, L.W, b, c, iy, ix);
    acc_t acc = 0;
    for (int64_t t = 0; t < L.KK; ++t) {
      const int64_t ny = iy - (t / L.K - L.r) * L.dil, nx = ix - (t % L.K - L.r) * L.dil;
      if (ny < 0 || nx < 0 || ny % L.s || nx % L.s) continue;
      const int64_t y = ny / L.s, x = nx / L.s;
      if (y >= L.OH || x >= L.OW) continue;
      acc += acc_t(GO[L.out_at(b, c, y, x)]) * filter_weight<mode>(CF, SF, L, b, c, t, y, x);
    }
    GX[i] = scalar_t(acc);
  }
}

template <typename scalar_t, Combine mode>
__global__ void grad_spatial_kernel(const scalar_t* __restrict__ GO, const scalar_t* __restrict__ X,
                                    const scalar_t* __restrict__ CF, scalar_t* __restrict__ GSF, Layout L, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    int64_t b, ch, y, x;
    L.decode(i, L.G * L.KK, L.OH, L.OW, b, ch, y, x);
    const int64_t grp = ch / L.KK, t = ch % L.KK;
    int64_t iy, ix;
    acc_t acc = 0;
    if (L.tap_input(y, x, t / L.K, t % L.K, iy, ix)) {
      for (int64_t c = grp * L.cpg; c < (grp + 1) * L.cpg; ++c)
        acc += acc_t(GO[L.out_at(b, c, y, x)]) * acc_t(X[L.x_at(b, c, iy, ix)]) *
               weight_by_spatial<mode>(CF, L, b, c, t);
    }
    GSF[i] = scalar_t(acc);
  }
}

// One block per (b, c, t): the sum over output pixels of grad_out * x_tap (* spatial weight for mul).
template <typename scalar_t, Combine mode>
__global__ void grad_channel_kernel(const scalar_t* __restrict__ GO, const scalar_t* __restrict__ X,
                                    const scalar_t* __restrict__ SF, scalar_t* __restrict__ GCF, Layout L) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kThreads];
  const int64_t bct = blockIdx.x;
  const int64_t t = bct % L.KK, bc = bct / L.KK, c = bc % L.C, b = bc / L.C;
  acc_t acc = 0;
  for (int64_t p = threadIdx.x; p < L.OH * L.OW; p += blockDim.x) {
    const int64_t y = p / L.OW, x = p % L.OW;
    int64_t iy, ix;
    if (!L.tap_input(y, x, t / L.K, t % L.K, iy, ix)) continue;
    acc += acc_t(GO[L.out_at(b, c, y, x)]) * acc_t(X[L.x_at(b, c, iy, ix)]) *
           weight_by_channel<mode>(SF, L, b, c, t, y, x);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) GCF[bct] = scalar_t(partial[0]);
}

// grad_channel_filter for channels_last tensors, in two steps. grad_channel_kernel's block per
// (b, c, tap) would read grad_out and x there at strides of C values (a 32-byte sector for each
// 4-byte value), and read each value again for every tap. Here a warp's 32 lanes take 32
// consecutive channels of one pixel (one coalesced read), each thread keeps the sums of all KK <=
// KKMAX taps in registers, and a block's warps take every kPixelWarps-th pixel of a chunk of
// kChunkPixels pixels; the warps' sums are added in shared memory, and each (image, chunk, tap,
// channel) sum goes to PART (B, chunks, KK, C). grad_channel_sum_kernel then adds the chunks in
// order: no atomics, so the result is the same on every run.
constexpr int kChannelLanes = 32, kPixelWarps = kThreads / kChannelLanes;
constexpr int64_t kChunkPixels = 2048;

template <typename scalar_t, Combine mode, int KKMAX>
__global__ void grad_channel_nhwc_kernel(const scalar_t* __restrict__ GO, const scalar_t* __restrict__ X,
                                         const scalar_t* __restrict__ SF, at::opmath_type<scalar_t>* __restrict__ PART,
                                         Layout L, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sums[kPixelWarps][kChannelLanes];
  const int64_t tiles = (L.C + kChannelLanes - 1) / kChannelLanes;
  const int64_t tile = blockIdx.x % tiles, chunk = blockIdx.x / tiles % chunks, b = blockIdx.x / tiles / chunks;
  const int lane = threadIdx.x % kChannelLanes, warp = threadIdx.x / kChannelLanes;
  // lanes past the last channel load nothing but still meet the others at every __syncthreads()
  const int64_t c = tile * kChannelLanes + lane;
  acc_t acc[KKMAX];
#pragma unroll
  for (int t = 0; t < KKMAX; ++t) acc[t] = 0;
  const int64_t p_end = (chunk + 1) * kChunkPixels < L.OH * L.OW ? (chunk + 1) * kChunkPixels : L.OH * L.OW;
  if (c < L.C) {
    for (int64_t p = chunk * kChunkPixels + warp; p < p_end; p += kPixelWarps) {
      const int64_t y = p / L.OW, x = p % L.OW;
      const acc_t go = acc_t(GO[L.out_at(b, c, y, x)]);
      int64_t i = 0, j = 0;  // tap t's kernel row and column
#pragma unroll
      for (int t = 0; t < KKMAX; ++t) {
        if (t < L.KK) {
          int64_t iy, ix;
          if (L.tap_input(y, x, i, j, iy, ix))
            acc[t] += go * acc_t(X[L.x_at(b, c, iy, ix)]) * weight_by_channel<mode>(SF, L, b, c, t, y, x);
          if (++j == L.K) j = 0, ++i;
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < KKMAX; ++t) {
    if (t >= L.KK) break;  // the same for every thread of the block
    sums[warp][lane] = acc[t];
    __syncthreads();
    if (warp == 0 && c < L.C) {
      acc_t total = 0;
      for (int w = 0; w < kPixelWarps; ++w) total += sums[w][lane];
      PART[((b * chunks + chunk) * L.KK + t) * L.C + c] = total;
    }
    __syncthreads();
  }
}

// GCF (B, C, KK) from grad_channel_nhwc_kernel's partial sums, one thread per value.
template <typename scalar_t>
__global__ void grad_channel_sum_kernel(const at::opmath_type<scalar_t>* __restrict__ PART, scalar_t* __restrict__ GCF,
                                        Layout L, int64_t chunks, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t t = i % L.KK, c = i / L.KK % L.C, b = i / L.KK / L.C;
    acc_t total = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) total += PART[((b * chunks + chunk) * L.KK + t) * L.C + c];
    GCF[i] = scalar_t(total);
  }
}

// grad_spatial_filter for channels_last tensors with C a multiple of 32 and channels per group
// (cpg) that divide 32 or are a multiple of it (nhwc_spatial_lanes). grad_spatial_kernel's thread
// per filter value would have a warp's 32 loads of x hit up to 32 different pixels. Here a warp takes
// one output pixel and 32 consecutive channels, its lanes S = min(cpg, 32) to a group (32 / S groups
// at once; with cpg > 32, one group in steps of 32 channels), so every load is one coalesced read.
// Per tap, each lane's products are added over its group's S lanes by log2(S) butterfly shuffles,
// and the group's first lane writes the sum. Every warp of a block runs the same number of items,
// taps and shuffles (a warp past the last item computes zeros and writes nothing), so the shuffles
// always meet all 32 lanes.
inline bool nhwc_spatial_lanes(const FilterGeometry& g) {
  const int64_t cpg = g.channels_per_group();
  return g.channels % 32 == 0 && (cpg % 32 == 0 || (cpg < 32 && (cpg & (cpg - 1)) == 0));
}

template <typename scalar_t, Combine mode>
__global__ void grad_spatial_nhwc_kernel(const scalar_t* __restrict__ GO, const scalar_t* __restrict__ X,
                                         const scalar_t* __restrict__ CF, scalar_t* __restrict__ GSF, Layout L,
                                         int64_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kChannelLanes, warp = threadIdx.x / kChannelLanes;
  const bool narrow = L.cpg < kChannelLanes;
  const int S = narrow ? static_cast<int>(L.cpg) : kChannelLanes;    // lanes per group
  const int64_t steps = narrow ? 1 : L.cpg / kChannelLanes;           // 32-channel steps per group
  const int64_t slices = narrow ? L.C / kChannelLanes : L.G;          // warp items per pixel
  const int64_t warps = int64_t(gridDim.x) * kPixelWarps;
  const int64_t rounds = (items + warps - 1) / warps;  // the same for every warp
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t item = (round * gridDim.x + blockIdx.x) * kPixelWarps + warp;
    const bool active = item < items;
    const int64_t slice = item % slices, pixel = item / slices;
    const int64_t x = pixel % L.OW, y = pixel / L.OW % L.OH, b = pixel / L.OW / L.OH;
    const int64_t c0 = (narrow ? slice * kChannelLanes : slice * L.cpg) + lane, grp = c0 / L.cpg;
    int64_t i = 0, j = 0;  // tap t's kernel row and column
    for (int64_t t = 0; t < L.KK; ++t) {
      int64_t iy, ix;
      const bool inside = L.tap_input(y, x, i, j, iy, ix);
      if (++j == L.K) j = 0, ++i;
      acc_t v = 0;
      if (active && inside) {
        for (int64_t k = 0; k < steps; ++k) {
          const int64_t c = c0 + k * kChannelLanes;
          v += acc_t(GO[L.out_at(b, c, y, x)]) * acc_t(X[L.x_at(b, c, iy, ix)]) *
               weight_by_spatial<mode>(CF, L, b, c, t);
        }
      }
      for (int offset = S / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (active && lane % S == 0) GSF[L.sf_at(b, grp * L.KK + t, y, x)] = scalar_t(v);
    }
  }
}

inline Layout make_layout(const FilterGeometry& g, bool nhwc) {
  return Layout{g.batch, g.channels, g.height, g.width, g.out_height, g.out_width, g.groups, g.kernel_size,
                g.taps(), g.channels_per_group(), g.radius(), g.dilation, g.stride, nhwc};
}

inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                      : at::MemoryFormat::Contiguous;
}

// The forward and the backward on x's device: launch(kernel, blocks, args...) starts `kernel` on
// `blocks` blocks of kThreads threads with those arguments.
template <typename Launch>
at::Tensor forward_with(const at::Tensor& x_in, const c10::optional<at::Tensor>& cf_in, const at::Tensor& sf_in,
                        const FilterGeometry& g, Combine mode, Launch&& launch) {
  const auto fmt = layout_of(x_in);
  at::Tensor x = x_in.contiguous(fmt), sf = sf_in.contiguous(fmt);
  at::Tensor cf = mode == Combine::kSpatialOnly ? at::Tensor() : cf_in->contiguous();
  at::Tensor out = at::empty({g.batch, g.channels, g.out_height, g.out_width}, x.options().memory_format(fmt));
  const int64_t n = out.numel();
  if (n == 0) return out;
  const Layout L = make_layout(g, fmt == at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_filter_forward", [&] {
    const scalar_t* cfp = cf.defined() ? cf.const_data_ptr<scalar_t>() : nullptr;
    dispatch_mode(mode, [&](auto m) {
      launch(forward_kernel<scalar_t, decltype(m)::value>, blocks_for(n), x.const_data_ptr<scalar_t>(), cfp,
             sf.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), L, n);
    });
  });
  return out;
}

template <typename Launch>
std::vector<at::Tensor> backward_with(const at::Tensor& go_in, const at::Tensor& x_in,
                                      const c10::optional<at::Tensor>& cf_in, const at::Tensor& sf_in,
                                      const FilterGeometry& g, Combine mode, Launch&& launch) {
  TORCH_CHECK(go_in.sizes() == at::IntArrayRef({g.batch, g.channels, g.out_height, g.out_width}),
              "dynamic filter: grad_out must be (B, C, H', W'), got ", go_in.sizes());
  const auto fmt = layout_of(x_in);
  at::Tensor x = x_in.contiguous(fmt), sf = sf_in.contiguous(fmt);
  at::Tensor go = go_in.to(x.scalar_type()).contiguous(fmt);
  const bool has_cf = mode != Combine::kSpatialOnly;
  at::Tensor cf = has_cf ? cf_in->contiguous() : at::Tensor();
  at::Tensor gx = at::empty_like(x), gsf = at::empty_like(sf);
  at::Tensor gcf = has_cf ? at::empty({g.batch, g.channels, g.kernel_size, g.kernel_size}, x.options()) : at::Tensor();
  const Layout L = make_layout(g, fmt == at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_filter_backward", [&] {
    const scalar_t* cfp = has_cf ? cf.const_data_ptr<scalar_t>() : nullptr;
    dispatch_mode(mode, [&](auto m) {
      constexpr Combine M = decltype(m)::value;
      if (gx.numel() > 0)
        launch(grad_input_kernel<scalar_t, M>, blocks_for(gx.numel()), go.const_data_ptr<scalar_t>(), cfp,
               sf.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), L, gx.numel());
      if (gsf.numel() > 0 && L.nhwc && nhwc_spatial_lanes(g)) {
        const int64_t cpg = g.channels_per_group();
        const int64_t items = g.batch * g.out_height * g.out_width * (cpg < 32 ? g.channels / 32 : g.groups);
        launch(grad_spatial_nhwc_kernel<scalar_t, M>, blocks_for(items * kChannelLanes),
               go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), cfp, gsf.mutable_data_ptr<scalar_t>(),
               L, items);
      } else if (gsf.numel() > 0) {
        launch(grad_spatial_kernel<scalar_t, M>, blocks_for(gsf.numel()), go.const_data_ptr<scalar_t>(),
               x.const_data_ptr<scalar_t>(), cfp, gsf.mutable_data_ptr<scalar_t>(), L, gsf.numel());
      }
      if (has_cf && gcf.numel() > 0 && L.nhwc && L.KK <= 49) {
        using acc_t = at::opmath_type<scalar_t>;
        const int64_t chunks = (g.out_height * g.out_width + kChunkPixels - 1) / kChunkPixels;
        const int64_t blocks = (g.channels + kChannelLanes - 1) / kChannelLanes * chunks * g.batch;
        TORCH_CHECK(blocks < (int64_t(1) << 31), "dynamic filter: grad_channel_filter of ", g.batch, " images of ",
                    g.out_height, "x", g.out_width, " pixels and ", g.channels, " channels needs too many blocks");
        at::Tensor part = at::empty({g.batch, chunks, g.taps(), g.channels},
                                    x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        auto sums = [&](auto kkmax) {
          launch(grad_channel_nhwc_kernel<scalar_t, M, decltype(kkmax)::value>, static_cast<int>(blocks),
                 go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), sf.const_data_ptr<scalar_t>(),
                 part.mutable_data_ptr<acc_t>(), L, chunks);
        };
        if (L.KK <= 9) sums(std::integral_constant<int, 9>{});  // k = 1 or 3
        else sums(std::integral_constant<int, 49>{});           // k = 5 or 7
        launch(grad_channel_sum_kernel<scalar_t>, blocks_for(gcf.numel()), part.const_data_ptr<acc_t>(),
               gcf.mutable_data_ptr<scalar_t>(), L, chunks, gcf.numel());
      } else if (has_cf && gcf.numel() > 0) {
        launch(grad_channel_kernel<scalar_t, M>, static_cast<int>(gcf.numel()), go.const_data_ptr<scalar_t>(),
               x.const_data_ptr<scalar_t>(), sf.const_data_ptr<scalar_t>(), gcf.mutable_data_ptr<scalar_t>(), L);
      }
    });
  });
  return {gx, gcf, gsf};
}

}  // namespace
}  // namespace dynrobust
