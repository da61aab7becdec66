// CPU kernels (at::parallel_for, i.e. OpenMP) for the dynamic filters of dynamic_filter.h.
//
// Two memory layouts, each with loops whose innermost dimension is contiguous so the compiler
// vectorises it:
//   NCHW (contiguous): one task per (b, c) plane; the innermost loop runs along a row (x).
//   NHWC (channels_last): one task per output row; the innermost loop runs over channels.
// The output takes x's layout. half and bfloat16 inputs are computed in float32.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <mutex>
#include <numeric>
#include <vector>

#include "../dynamic_filter.h"

namespace dynrobust {
namespace {

// First and last output index o with 0 <= o*stride + offset < size, o in [0, out_size).
inline void valid_range(int64_t offset, int64_t stride, int64_t size, int64_t out_size, int64_t& lo, int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  hi = size - 1 - offset < 0 ? -1 : std::min(out_size - 1, (size - 1 - offset) / stride);
}

template <Combine mode, typename T>
inline T combine(T channel_weight, T spatial_weight) {
  if constexpr (mode == Combine::kMul) return channel_weight * spatial_weight;
  else if constexpr (mode == Combine::kAdd) return channel_weight + spatial_weight;
  else return spatial_weight;
}

// ------------------------------------------------------------------------------------------ NCHW

template <typename scalar_t, Combine mode>
void forward_nchw(const scalar_t* X, const scalar_t* CF, const scalar_t* SF, scalar_t* out, const FilterGeometry& g) {
  const int64_t H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), cpg = g.channels_per_group(), r = g.radius(), s = g.stride;
  at::parallel_for(0, g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / g.channels, c = bc % g.channels, grp = c / cpg;
      const scalar_t* xp = X + bc * H * W;
      const scalar_t* sfp = SF + (b * g.groups + grp) * KK * OH * OW;
      scalar_t* op = out + bc * OH * OW;
      std::fill(op, op + OH * OW, scalar_t(0));
      for (int64_t t = 0; t < KK; ++t) {
        const int64_t dy = (t / K - r) * g.dilation, dx = (t % K - r) * g.dilation;
        const scalar_t cw = mode == Combine::kSpatialOnly ? scalar_t(1) : CF[bc * KK + t];
        int64_t y0, y1, x0, x1;
        valid_range(dy, s, H, OH, y0, y1);
        valid_range(dx, s, W, OW, x0, x1);
        for (int64_t y = y0; y <= y1; ++y) {
          const scalar_t* xr = xp + (y * s + dy) * W + dx;
          const scalar_t* sr = sfp + (t * OH + y) * OW;
          scalar_t* orow = op + y * OW;
          if (s == 1) {
#pragma omp simd
            for (int64_t x = x0; x <= x1; ++x) orow[x] += xr[x] * combine<mode>(cw, sr[x]);
          } else {
            for (int64_t x = x0; x <= x1; ++x) orow[x] += xr[x * s] * combine<mode>(cw, sr[x]);
          }
        }
      }
    }
  });
}

// grad_x and grad_channel_filter: one task per (b, c) plane, so every write is owned by its task.
template <typename scalar_t, Combine mode>
void backward_input_nchw(const scalar_t* GO, const scalar_t* X, const scalar_t* CF, const scalar_t* SF, scalar_t* GX,
                         scalar_t* GCF, const FilterGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), cpg = g.channels_per_group(), r = g.radius(), s = g.stride;
  at::parallel_for(0, g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / g.channels, c = bc % g.channels, grp = c / cpg;
      const scalar_t* xp = X + bc * H * W;
      const scalar_t* gop = GO + bc * OH * OW;
      const scalar_t* sfp = SF + (b * g.groups + grp) * KK * OH * OW;
      scalar_t* gxp = GX + bc * H * W;
      std::fill(gxp, gxp + H * W, scalar_t(0));
      for (int64_t t = 0; t < KK; ++t) {
        const int64_t dy = (t / K - r) * g.dilation, dx = (t % K - r) * g.dilation;
        const scalar_t cw = mode == Combine::kSpatialOnly ? scalar_t(1) : CF[bc * KK + t];
        int64_t y0, y1, x0, x1;
        valid_range(dy, s, H, OH, y0, y1);
        valid_range(dx, s, W, OW, x0, x1);
        acc_t gcf = 0;
        for (int64_t y = y0; y <= y1; ++y) {
          const scalar_t* xr = xp + (y * s + dy) * W + dx;
          scalar_t* gxr = gxp + (y * s + dy) * W + dx;
          const scalar_t* gor = gop + y * OW;
          const scalar_t* sr = sfp + (t * OH + y) * OW;
          if (s == 1) {
#pragma omp simd reduction(+ : gcf)
            for (int64_t x = x0; x <= x1; ++x) {
              gxr[x] += gor[x] * combine<mode>(cw, sr[x]);
              if constexpr (mode == Combine::kMul) gcf += acc_t(gor[x] * xr[x] * sr[x]);
              if constexpr (mode == Combine::kAdd) gcf += acc_t(gor[x] * xr[x]);
            }
          } else {
            for (int64_t x = x0; x <= x1; ++x) {
              gxr[x * s] += gor[x] * combine<mode>(cw, sr[x]);
              if constexpr (mode == Combine::kMul) gcf += acc_t(gor[x] * xr[x * s] * sr[x]);
              if constexpr (mode == Combine::kAdd) gcf += acc_t(gor[x] * xr[x * s]);
            }
          }
        }
        if constexpr (mode != Combine::kSpatialOnly) GCF[bc * KK + t] = scalar_t(gcf);
      }
    }
  });
}

// grad_spatial_filter: one task per (b, group, output row), a sum over the group's channels.
template <typename scalar_t, Combine mode>
void backward_spatial_nchw(const scalar_t* GO, const scalar_t* X, const scalar_t* CF, scalar_t* GSF,
                           const FilterGeometry& g) {
  const int64_t H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), cpg = g.channels_per_group(), r = g.radius(), s = g.stride;
  at::parallel_for(0, g.batch * g.groups * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t y = task % OH, bg = task / OH, b = bg / g.groups, grp = bg % g.groups;
      for (int64_t t = 0; t < KK; ++t) {
        const int64_t dy = (t / K - r) * g.dilation, dx = (t % K - r) * g.dilation;
        scalar_t* gsr = GSF + ((bg * KK + t) * OH + y) * OW;
        std::fill(gsr, gsr + OW, scalar_t(0));
        const int64_t iy = y * s + dy;
        if (iy < 0 || iy >= H) continue;
        int64_t x0, x1;
        valid_range(dx, s, W, OW, x0, x1);
        for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
          const int64_t bc = b * g.channels + c;
          const scalar_t cw = mode == Combine::kMul ? CF[bc * KK + t] : scalar_t(1);
          const scalar_t* xr = X + (bc * H + iy) * W + dx;
          const scalar_t* gor = GO + (bc * OH + y) * OW;
          if (s == 1) {
#pragma omp simd
            for (int64_t x = x0; x <= x1; ++x) gsr[x] += gor[x] * xr[x] * cw;
          } else {
            for (int64_t x = x0; x <= x1; ++x) gsr[x] += gor[x] * xr[x * s] * cw;
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ NHWC
// X (B, H, W, C), SF (B, OH, OW, G*KK), CFT = channel filter transposed to (B, KK, C).

// Channels are processed in blocks of kBlock whose accumulators stay in registers over all taps,
// so each output value is written once instead of once per tap. Within a block, every run of kSeg
// channels (kSeg = gcd(channels per group, kBlock), a template constant) shares one spatial weight;
// constant trip counts let the compiler unroll and keep the accumulators in vector registers.
constexpr int64_t kBlock = 64;

// acc[0, n) += src[c] * W(c) for the channels c0 + [0, n) of one tap; sw points at the tap's spatial
// weight of group 0 (group g's is sw[g * KK]); cft at the tap's channel weights (+ c0), or null.
template <typename scalar_t, Combine mode, int64_t kSeg>
inline void accumulate_block(scalar_t* acc, const scalar_t* src, const scalar_t* cft, const scalar_t* sw,
                             int64_t c0, int64_t n, int64_t cpg, int64_t KK) {
  if (kSeg > 1 && n == kBlock) {
    for (int64_t seg = 0; seg < kBlock / kSeg; ++seg) {
      const scalar_t w = sw[((c0 + seg * kSeg) / cpg) * KK];
      scalar_t* a = acc + seg * kSeg;
      const scalar_t* v = src + seg * kSeg;
      if constexpr (mode == Combine::kSpatialOnly) {
#pragma omp simd
        for (int64_t c = 0; c < kSeg; ++c) a[c] += v[c] * w;
      } else {
        const scalar_t* cw = cft + seg * kSeg;
#pragma omp simd
        for (int64_t c = 0; c < kSeg; ++c) a[c] += v[c] * combine<mode>(cw[c], w);
      }
    }
    return;
  }
  for (int64_t a = 0; a < n;) {  // any block: runs of channels that share a group's spatial weight
    const int64_t grp = (c0 + a) / cpg, e = std::min(n, (grp + 1) * cpg - c0);
    const scalar_t w = sw[grp * KK];
    if constexpr (mode == Combine::kSpatialOnly) {
#pragma omp simd
      for (int64_t c = a; c < e; ++c) acc[c] += src[c] * w;
    } else {
#pragma omp simd
      for (int64_t c = a; c < e; ++c) acc[c] += src[c] * combine<mode>(cft[c], w);
    }
    a = e;
  }
}

template <typename scalar_t, Combine mode, int64_t kSeg>
void forward_nhwc(const scalar_t* X, const scalar_t* CFT, const scalar_t* SF, scalar_t* out, const FilterGeometry& g) {
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), G = g.groups, cpg = g.channels_per_group(), r = g.radius(), s = g.stride;
  at::parallel_for(0, g.batch * OH, 1, [&](int64_t begin, int64_t end) {
    // offset of each (output pixel, tap)'s input pixel, -1 outside the image
    std::vector<int64_t> tap_offset(OW * KK);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / OH, y = row % OH;
      for (int64_t x = 0; x < OW; ++x) {
        for (int64_t t = 0; t < KK; ++t) {
          const int64_t iy = y * s + (t / K - r) * g.dilation, ix = x * s + (t % K - r) * g.dilation;
          tap_offset[x * KK + t] = (iy < 0 || iy >= H || ix < 0 || ix >= W) ? -1 : ((b * H + iy) * W + ix) * C;
        }
      }
      // channel block outermost: the k input rows of one block stay in cache while x sweeps the row
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t n = std::min(kBlock, C - c0);
        for (int64_t x = 0; x < OW; ++x) {
          const scalar_t* sfv = SF + (row * OW + x) * G * KK;
          alignas(64) scalar_t acc[kBlock] = {};
          for (int64_t t = 0; t < KK; ++t) {
            const int64_t offset = tap_offset[x * KK + t];
            if (offset < 0) continue;
            const scalar_t* cft = mode == Combine::kSpatialOnly ? nullptr : CFT + (b * KK + t) * C + c0;
            accumulate_block<scalar_t, mode, kSeg>(acc, X + offset + c0, cft, sfv + t, c0, n, cpg, KK);
          }
          std::copy(acc, acc + n, out + (row * OW + x) * C + c0);
        }
      }
    }
  });
}

// grad_x by gathering (no write conflicts), one task per input row; blocked like the forward.
template <typename scalar_t, Combine mode, int64_t kSeg>
void backward_input_nhwc(const scalar_t* GO, const scalar_t* CFT, const scalar_t* SF, scalar_t* GX,
                         const FilterGeometry& g) {
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), G = g.groups, cpg = g.channels_per_group(), r = g.radius(), s = g.stride;
  at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
    // output pixel reading input (iy, ix) through each tap, -1 if none
    std::vector<int64_t> source(W * KK);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, iy = row % H;
      for (int64_t ix = 0; ix < W; ++ix) {
        for (int64_t t = 0; t < KK; ++t) {
          const int64_t ny = iy - (t / K - r) * g.dilation, nx = ix - (t % K - r) * g.dilation;
          const bool hit = ny >= 0 && nx >= 0 && ny % s == 0 && nx % s == 0 && ny / s < OH && nx / s < OW;
          source[ix * KK + t] = hit ? (b * OH + ny / s) * OW + nx / s : -1;
        }
      }
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t n = std::min(kBlock, C - c0);
        for (int64_t ix = 0; ix < W; ++ix) {
          alignas(64) scalar_t acc[kBlock] = {};
          for (int64_t t = 0; t < KK; ++t) {
            const int64_t pixel = source[ix * KK + t];
            if (pixel < 0) continue;
            const scalar_t* cft = mode == Combine::kSpatialOnly ? nullptr : CFT + (b * KK + t) * C + c0;
            accumulate_block<scalar_t, mode, kSeg>(acc, GO + pixel * C + c0, cft, SF + pixel * G * KK + t, c0, n,
                                                   cpg, KK);
          }
          std::copy(acc, acc + n, GX + (row * W + ix) * C + c0);
        }
      }
    }
  });
}

// grad_spatial_filter (a dot product over each group's channels) and grad_channel_filter (a sum over
// output pixels, accumulated per task in a (KK, C) buffer and added under a lock per image).
template <typename scalar_t, Combine mode>
void backward_filters_nhwc(const scalar_t* GO, const scalar_t* X, const scalar_t* CFT, const scalar_t* SF,
                           scalar_t* GSF, at::opmath_type<scalar_t>* GCFT, const FilterGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), G = g.groups, cpg = g.channels_per_group(), r = g.radius(), s = g.stride;
  constexpr bool kChannel = mode != Combine::kSpatialOnly;
  std::mutex lock;
  at::parallel_for(0, g.batch * OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> partial(kChannel ? KK * C : 0, acc_t(0));
    int64_t partial_b = begin / OH;
    auto flush = [&]() {
      if constexpr (kChannel) {
        std::lock_guard<std::mutex> guard(lock);
        acc_t* dst = GCFT + partial_b * KK * C;
        for (int64_t i = 0; i < KK * C; ++i) dst[i] += partial[i];
        std::fill(partial.begin(), partial.end(), acc_t(0));
      }
    };
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / OH, y = row % OH;
      if (b != partial_b) {
        flush();
        partial_b = b;
      }
      for (int64_t x = 0; x < OW; ++x) {
        const scalar_t* gov = GO + (row * OW + x) * C;
        const scalar_t* sfv = SF + (row * OW + x) * G * KK;
        scalar_t* gsf = GSF + (row * OW + x) * G * KK;
        for (int64_t t = 0; t < KK; ++t) {
          const int64_t iy = y * s + (t / K - r) * g.dilation, ix = x * s + (t % K - r) * g.dilation;
          if (iy < 0 || iy >= H || ix < 0 || ix >= W) {
            for (int64_t grp = 0; grp < G; ++grp) gsf[grp * KK + t] = scalar_t(0);
            continue;
          }
          const scalar_t* xv = X + ((b * H + iy) * W + ix) * C;
          const scalar_t* cft = kChannel ? CFT + (b * KK + t) * C : nullptr;
          acc_t* pc = kChannel ? partial.data() + t * C : nullptr;
          for (int64_t grp = 0; grp < G; ++grp) {
            const int64_t c0 = grp * cpg, c1 = c0 + cpg;
            const scalar_t sw = sfv[grp * KK + t];
            acc_t dot = 0;
            if constexpr (mode == Combine::kMul) {
#pragma omp simd reduction(+ : dot)
              for (int64_t c = c0; c < c1; ++c) {
                const scalar_t gx = gov[c] * xv[c];
                dot += acc_t(gx * cft[c]);
                pc[c] += acc_t(gx * sw);
              }
            } else if constexpr (mode == Combine::kAdd) {
#pragma omp simd reduction(+ : dot)
              for (int64_t c = c0; c < c1; ++c) {
                const scalar_t gx = gov[c] * xv[c];
                dot += acc_t(gx);
                pc[c] += acc_t(gx);
              }
            } else {
#pragma omp simd reduction(+ : dot)
              for (int64_t c = c0; c < c1; ++c) dot += acc_t(gov[c] * xv[c]);
            }
            gsf[grp * KK + t] = scalar_t(dot);
          }
        }
      }
    }
    flush();
  });
}

// ------------------------------------------------------------------------------------------ entry

bool use_channels_last(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// The run length kSeg of channels sharing a spatial weight inside a kBlock block: gcd(cpg, kBlock),
// specialised for 64 (DDF, one head), 16 (involution's 16 channels per group) and 8; 1 = generic.
template <typename F>
void dispatch_segment(const FilterGeometry& g, F&& f) {
  const int64_t seg = std::gcd(g.channels_per_group(), kBlock);
  if (seg == 64) f(std::integral_constant<int64_t, 64>{});
  else if (seg == 32) f(std::integral_constant<int64_t, 32>{});
  else if (seg == 16) f(std::integral_constant<int64_t, 16>{});
  else if (seg == 8) f(std::integral_constant<int64_t, 8>{});
  else f(std::integral_constant<int64_t, 1>{});
}

// half / bfloat16 run in float32 on the CPU.
at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu_dtype(const at::Tensor& x, const char* what) {
  auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "dynamic filter (CPU): ", what, " must be float32, float64, float16 or bfloat16, got ", t);
}

}  // namespace

at::Tensor dynamic_filter_forward_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& cf_in,
                                      const at::Tensor& sf_in, const FilterGeometry& g, Combine mode) {
  check_cpu_dtype(x_in, "x");
  const auto ct = compute_type(x_in);
  const bool nhwc = use_channels_last(x_in);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor x = x_in.to(ct).contiguous(fmt);
  at::Tensor sf = sf_in.to(ct).contiguous(fmt);
  at::Tensor cf;
  if (mode != Combine::kSpatialOnly) {
    cf = cf_in->to(ct).reshape({g.batch, g.channels, g.taps()});
    cf = nhwc ? cf.transpose(1, 2).contiguous() : cf.contiguous();
  }
  at::Tensor out = at::empty({g.batch, g.channels, g.out_height, g.out_width}, x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES(ct, "dynamic_filter_forward_cpu", [&] {
    const scalar_t* cfp = cf.defined() ? cf.const_data_ptr<scalar_t>() : nullptr;
    dispatch_mode(mode, [&](auto m) {
      if (nhwc)
        dispatch_segment(g, [&](auto seg) {
          forward_nhwc<scalar_t, decltype(m)::value, decltype(seg)::value>(
              x.const_data_ptr<scalar_t>(), cfp, sf.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g);
        });
      else
        forward_nchw<scalar_t, decltype(m)::value>(x.const_data_ptr<scalar_t>(), cfp, sf.const_data_ptr<scalar_t>(),
                                                    out.mutable_data_ptr<scalar_t>(), g);
    });
  });
  return out.scalar_type() == x_in.scalar_type() ? out : out.to(x_in.scalar_type());
}

std::vector<at::Tensor> dynamic_filter_backward_cpu(const at::Tensor& go_in, const at::Tensor& x_in,
                                                    const c10::optional<at::Tensor>& cf_in, const at::Tensor& sf_in,
                                                    const FilterGeometry& g, Combine mode) {
  check_cpu_dtype(x_in, "x");
  TORCH_CHECK(go_in.sizes() == at::IntArrayRef({g.batch, g.channels, g.out_height, g.out_width}),
              "dynamic filter: grad_out must be (B, C, H', W'), got ", go_in.sizes());
  const auto ct = compute_type(x_in);
  const bool nhwc = use_channels_last(x_in);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor x = x_in.to(ct).contiguous(fmt);
  at::Tensor go = go_in.to(ct).contiguous(fmt);
  at::Tensor sf = sf_in.to(ct).contiguous(fmt);
  const bool has_cf = mode != Combine::kSpatialOnly;
  at::Tensor cf;
  if (has_cf) {
    cf = cf_in->to(ct).reshape({g.batch, g.channels, g.taps()});
    cf = nhwc ? cf.transpose(1, 2).contiguous() : cf.contiguous();
  }
  at::Tensor gx = at::empty_like(x);
  at::Tensor gsf = at::empty_like(sf);
  at::Tensor gcf;
  AT_DISPATCH_FLOATING_TYPES(ct, "dynamic_filter_backward_cpu", [&] {
    const scalar_t* cfp = has_cf ? cf.const_data_ptr<scalar_t>() : nullptr;
    dispatch_mode(mode, [&](auto m) {
      constexpr Combine M = decltype(m)::value;
      if (nhwc) {
        // channel-filter gradient accumulated in (B, KK, C) at float precision or better
        at::Tensor gcft = has_cf ? at::zeros({g.batch, g.taps(), g.channels}, x.options().dtype(
                                                                                   c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value))
                                 : at::Tensor();
        dispatch_segment(g, [&](auto seg) {
          backward_input_nhwc<scalar_t, M, decltype(seg)::value>(go.const_data_ptr<scalar_t>(), cfp,
                                                                 sf.const_data_ptr<scalar_t>(),
                                                                 gx.mutable_data_ptr<scalar_t>(), g);
        });
        backward_filters_nhwc<scalar_t, M>(go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), cfp,
                                           sf.const_data_ptr<scalar_t>(), gsf.mutable_data_ptr<scalar_t>(),
                                           has_cf ? gcft.mutable_data_ptr<at::opmath_type<scalar_t>>() : nullptr, g);
        if (has_cf) gcf = gcft.transpose(1, 2).to(ct).contiguous();
      } else {
        if (has_cf) gcf = at::empty({g.batch, g.channels, g.taps()}, x.options());
        backward_input_nchw<scalar_t, M>(go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), cfp,
                                         sf.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
                                         has_cf ? gcf.mutable_data_ptr<scalar_t>() : nullptr, g);
        backward_spatial_nchw<scalar_t, M>(go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), cfp,
                                           gsf.mutable_data_ptr<scalar_t>(), g);
      }
    });
  });
  const auto out_type = x_in.scalar_type();
  auto cast = [&](const at::Tensor& t) { return t.scalar_type() == out_type ? t : t.to(out_type); };
  at::Tensor grad_cf = has_cf ? cast(gcf.view({g.batch, g.channels, g.kernel_size, g.kernel_size})) : at::Tensor();
  return {cast(gx), grad_cf, cast(gsf)};
}

}  // namespace dynrobust
