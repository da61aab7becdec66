// CPU kernels (at::parallel_for, i.e. OpenMP) for the dynamic filters of dynamic_filter.h.
//
// Two memory layouts, each with loops whose innermost dimension is contiguous so the compiler
// vectorises it:
//   NCHW (contiguous): one task per (b, c) plane; the innermost loop runs along a row (x).
//   NHWC (channels_last): one task per output row; the innermost loop runs over channels.
// The output takes x's layout. half and bfloat16 inputs are computed in float32.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
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

// A task's share of grad_channel_filter, a sum over output pixels: a (KK, C) buffer for the image
// the task is in, added to that image's (KK, C) result under a lock when the task moves on to the
// next image or ends. Empty (and a no-op) when there is no channel filter.
template <typename acc_t>
class ChannelGradPartial {
 public:
  ChannelGradPartial(acc_t* result, int64_t size, std::mutex& lock, int64_t image)
      : result_(result), size_(result ? size : 0), lock_(lock), image_(image), sums_(size_, acc_t(0)) {}
  ~ChannelGradPartial() { flush(); }
  acc_t* data() { return sums_.data(); }
  void enter_image(int64_t image) {
    if (image == image_) return;
    flush();
    image_ = image;
  }

 private:
  void flush() {
    if (size_ == 0) return;
    std::lock_guard<std::mutex> guard(lock_);
    acc_t* dst = result_ + image_ * size_;
    for (int64_t i = 0; i < size_; ++i) dst[i] += sums_[i];
    std::fill(sums_.begin(), sums_.end(), acc_t(0));
  }
  acc_t* result_;
  int64_t size_;
  std::mutex& lock_;
  int64_t image_;
  std::vector<acc_t> sums_;
};

// X (B, H, W, C), SF (B, OH, OW, G*KK), CFT = channel filter transposed to (B, KK, C).
//
// Fast path, when every vector of channels (kVectorBytes below: 16 floats or 8 doubles with AVX-512,
// 8 or 4 with AVX2, the lanes) lies inside one group, so that one spatial weight per (pixel, tap)
// scales a whole vector:
//   forward and grad_x: per output pixel, blocks of kBlockVectors channel vectors accumulate in
//   registers over the taps inside the image (TapWindow: a window of kernel rows and columns,
//   walked by pointer steps; all k*k taps for inner pixels) and are stored once. Offsets are
//   computed once per call or row (a division per tap and pixel costs more than the tap).
//   grad_x gathers per input pixel over the taps that reach it: all k*k at stride 1, every
//   (s / gcd(s, d))-th kernel row and column at larger strides. Involution reads the weights from
//   rows of SF transposed to (G*KK, OW); DDF's k*k per pixel are read in place.
//   grad_spatial_filter of a 7x7 involution (stride 1, dilation 1) on rows of up to 32 pixels, with
//   vectors of 8 lanes or fewer, any channels per group: lanes over a kernel row's taps, from
//   transposed rows of the input (backward_spatial_nhwc_taps).
//   grad_spatial_filter of involution otherwise (stride 1, 8 or 16 channels per group): lanes over
//   pixels, from transposed rows of grad_out and of the input (backward_spatial_nhwc_pixels).
//   grad_spatial_filter otherwise, with grad_channel_filter in the same pass: per output pixel (or
//   pair of inner neighbours) and chunk of taps, the products grad_out * input are summed over the
//   group's channels in the lanes of p[tap], then a transposing add tree turns L such vectors into
//   one whose lane j holds tap j (of pixel j / (L / 2) for a pair); the same products are added
//   into a buffer of grad_channel_filter's (channel vector, tap) sums.
// Other channel layouts (C not a multiple of the lanes, or groups that split a vector) run the
// generic loops further down.

// The widest vector register the build targets (-march=native): 64 bytes with AVX-512, 32 with AVX or
// AVX2, else 16 (SSE, NEON). A wider GCC vector than the target's registers is not split into
// registers but kept in memory: every multiply-add goes through the stack (on an AVX2 machine, 64-byte
// vectors made the involution forward 6x slower than 32-byte ones).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

// One such vector (GCC/Clang vector extension) of T.
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(kVectorBytes)));
  static constexpr int kLanes = kVectorBytes / sizeof(T);
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
  // the first n <= kLanes lanes only (the others load as zeros); masked loads where AVX-512 or AVX2
  // have them
  static V load(const T* p, int64_t n) {
#if defined(__AVX512F__)
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    if constexpr (sizeof(T) == 4) return reinterpret_cast<V>(_mm512_maskz_loadu_ps(m, p));
    else return reinterpret_cast<V>(_mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p));
#elif defined(__AVX2__)
    if constexpr (sizeof(T) == 4) return reinterpret_cast<V>(_mm256_maskload_ps(p, mask(n)));
    else return reinterpret_cast<V>(_mm256_maskload_pd(p, mask(n)));
#else
    if (n == kLanes) return load(p);
    alignas(kVectorBytes) T lanes[kLanes] = {};
    copy_prefix<kLanes / 2>(lanes, p, n);
    V v;
    std::memcpy(&v, lanes, sizeof(V));
    return v;
#endif
  }
  static void store(T* p, const V& v, int64_t n) {
#if defined(__AVX512F__)
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    if constexpr (sizeof(T) == 4) _mm512_mask_storeu_ps(p, m, reinterpret_cast<__m512>(v));
    else _mm512_mask_storeu_pd(p, static_cast<__mmask8>(m), reinterpret_cast<__m512d>(v));
#else  // not AVX2's masked store, microcoded on AMD Zen (about 12 cycles each there)
    if (n == kLanes) return store(p, v);
    alignas(kVectorBytes) T lanes[kLanes];
    std::memcpy(lanes, &v, sizeof(V));
    copy_prefix<kLanes / 2>(p, lanes, n);
#endif
  }
  // a non-temporal store to p, aligned to a vector: the line is written without first being read
  // (a plain store to a line not in cache reads it from memory first); in builds without AVX (SSE,
  // NEON), a plain store
  static void stream(T* p, const V& v) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4) _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
    else _mm512_stream_pd(p, reinterpret_cast<__m512d>(v));
#elif defined(__AVX__)
    if constexpr (sizeof(T) == 4) _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
    else _mm256_stream_pd(p, reinterpret_cast<__m256d>(v));
#else
    store(p, v);
#endif
  }
  // orders a task's non-temporal stores before whatever follows it (they are weakly ordered)
  static void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
    _mm_sfence();
#endif
  }
  // dst[0, n) = src[0, n): the vectors of dst aligned to one by non-temporal stores, the values
  // before and after them by plain ones
  static void stream_copy(T* dst, const T* src, int64_t n) {
    const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(dst) / sizeof(T)) % kLanes;
    const int64_t head = std::min(n, (kLanes - misaligned) % kLanes);
    int64_t k = 0;
    for (; k < head; ++k) dst[k] = src[k];
    for (; k + kLanes <= n; k += kLanes) stream(dst + k, load(src + k));
    for (; k < n; ++k) dst[k] = src[k];
  }
  // dst[0, n) = src[0, n) for n < 2 * chunk, in pieces of chunk, chunk / 2, ..., 1 values of
  // constant size (a memcpy of n values would be a call)
  template <int chunk>
  static void copy_prefix(T* dst, const T* src, int64_t n) {
    if constexpr (chunk >= 1) {
      if (n & chunk) {
        std::memcpy(dst, src, chunk * sizeof(T));
        dst += chunk, src += chunk;
      }
      copy_prefix<chunk / 2>(dst, src, n);
    }
  }
#if !defined(__AVX512F__) && defined(__AVX2__)
  // lanes [0, n) set (all bits), as the AVX2 masked moves want them
  static __m256i mask(int64_t n) {
    if constexpr (sizeof(T) == 4)
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    else
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
#endif
};

// Lane k of the result is lane Ix::at(k) of the concatenation (a, b).
template <typename T, typename Ix, int... k>
inline typename Simd<T>::V shuffle(const typename Simd<T>::V& a, const typename Simd<T>::V& b,
                                   std::integer_sequence<int, k...>) {
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(a, b, Ix::at(k)...);
#else  // GCC before 12: the same permutation through __builtin_shuffle
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I M __attribute__((vector_size(kVectorBytes)));
  return __builtin_shuffle(a, b, M{Ix::at(k)...});
#endif
}

template <typename T, typename Ix>
inline typename Simd<T>::V shuffle(const typename Simd<T>::V& a, const typename Simd<T>::V& b) {
  return shuffle<T, Ix>(a, b, std::make_integer_sequence<int, Simd<T>::kLanes>{});
}

// One step of the add tree over vectors holding blocks of m lanes per tap: lane k takes the first
// (half 0) or second (half 1) halves of a's blocks then of b's, so the taps keep their order.
template <int m, int lanes, int half>
struct FoldIndex {
  static constexpr int at(int k) {
    const int h = m / 2, blocks = lanes / m, q = k / h, e = k % h;
    return (q < blocks ? q * m : lanes + (q - blocks) * m) + e + half * h;
  }
};

template <typename T, int m>
inline typename Simd<T>::V fold(const typename Simd<T>::V& a, const typename Simd<T>::V& b) {
  constexpr int L = Simd<T>::kLanes;
  return shuffle<T, FoldIndex<m, L, 0>>(a, b) + shuffle<T, FoldIndex<m, L, 1>>(a, b);
}

// p[0..L): returns the vector whose lane j is the sum of p[j]'s lanes (p is overwritten).
template <typename T, int m = Simd<T>::kLanes>
inline typename Simd<T>::V lane_sums(typename Simd<T>::V* p) {
  if constexpr (m == 1) {
    return p[0];
  } else {
    constexpr int L = Simd<T>::kLanes;
#pragma GCC unroll 16
    for (int j = 0; j < m / 2; ++j) p[j] = fold<T, m>(p[2 * j], p[2 * j + 1]);
    return lane_sums<T, m / 2>(p);
  }
}

// Swapping the off-diagonal b x b blocks of every 2b x 2b block of a square matrix, for b = 1, 2, 4,
// ..., transposes it. Rows i and i + b (i & b == 0) exchange their lanes l with l & b != 0 (of row i)
// and l & b == 0 (of row i + b).
template <int b, int lanes, bool kUpper>
struct SwapIndex {
  static constexpr int at(int l) { return kUpper ? ((l & b) ? lanes + l : l + b) : ((l & b) ? lanes + l - b : l); }
};

// Transposes the L x L matrix whose rows are r[0..L).
template <typename T, int b = 1>
inline void transpose(typename Simd<T>::V* r) {
  constexpr int L = Simd<T>::kLanes;
  if constexpr (b < L) {
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) {
      if (i & b) continue;
      const auto lo = shuffle<T, SwapIndex<b, L, false>>(r[i], r[i + b]);
      r[i + b] = shuffle<T, SwapIndex<b, L, true>>(r[i], r[i + b]);
      r[i] = lo;
    }
    transpose<T, 2 * b>(r);
  }
}

template <typename T>
bool fast_channels(const FilterGeometry& g) {
  constexpr int64_t L = Simd<T>::kLanes;
  return g.channels % L == 0 && (g.groups == 1 || g.channels_per_group() % L == 0);
}

// Tap t of output (y, x) reads input (y*s + dy[t], x*s + dx[t]); computed once per call (a division
// per tap per pixel costs more than the tap's arithmetic).
struct TapGeometry {
  std::vector<int64_t> dy, dx;
  int64_t reach;  // radius * dilation, the largest |dy| and |dx|
  explicit TapGeometry(const FilterGeometry& g) : dy(g.taps()), dx(g.taps()), reach(g.radius() * g.dilation) {
    for (int64_t t = 0; t < g.taps(); ++t) {
      dy[t] = (t / g.kernel_size - g.radius()) * g.dilation;
      dx[t] = (t % g.kernel_size - g.radius()) * g.dilation;
    }
  }
};

// Channel vectors per block of the forward and grad_x (one register each, each a chain of
// multiply-adds over the taps): 4 with AVX-512's 32 registers of 16 floats; 8 with 16 narrower
// registers, enough independent chains to keep both FMA units busy through their latency.
constexpr int kBlockVectors = kVectorBytes == 64 ? 4 : 8;

// How many consecutive channel vectors share a group's spatial weight: 0 = all of a block.
inline int vectors_per_group(const FilterGeometry& g, int64_t lanes) {
  const int64_t vpg = g.channels_per_group() / lanes;
  return g.groups == 1 || vpg % kBlockVectors == 0 ? 0 : static_cast<int>(vpg);
}

// The taps of one pixel that read inside the image: the window of kernel rows i0..i1 and columns
// j0..j1 (the border cuts off the others; an inner pixel keeps all k*k). Tap (i, j) reads
// base + row[i] + j * col with spatial weight wbase[wrow[i] + j * wcol], base and wbase being the
// pixel's own; row and wrow are shared by the pixels of an image row. The tap's index (for DDF's
// channel weights) is i * trow + j * tcol: i * k + j, except in the strided gather of grad_x, whose
// window holds every (s / gcd(s, d))-th kernel row and column. Stepping through the window needs no
// table of per-tap offsets (loading them took a fifth of the loads of the inner loop), and border
// pixels skip the taps outside (43% of all taps at 7x7 with k = 7).
struct TapWindow {
  const int64_t* row;
  const int64_t* wrow;
  int64_t col, wcol, trow, tcol;
  int64_t i0, i1, j0, j1;
};

// The kernel indices n in [0, K) with 0 <= p + (n - r) * d < size (contiguous, possibly empty).
inline std::pair<int64_t, int64_t> inside_taps(int64_t p, int64_t size, const FilterGeometry& g) {
  int64_t lo = 0, hi = g.kernel_size - 1;
  while (lo <= hi && p + (lo - g.radius()) * g.dilation < 0) ++lo;
  while (hi >= lo && p + (hi - g.radius()) * g.dilation >= size) --hi;
  return {lo, hi};
}

// Calls at(xo, wo, t, u) for the taps of `win` in order: xo and wo are the tap's offsets from the
// pixel's input and weights, t its index, u its place in the current run of kSplit taps (a kernel
// row's last taps may run singly, u = 0). Offsets, not pointers, step through the window: a pointer
// one step past its last tap could lie outside the tensor.
template <int kSplit, typename F>
inline void for_each_tap(const TapWindow& win, F&& at) {
  const int64_t col = win.col, wcol = win.wcol, tcol = win.tcol;
  for (int64_t i = win.i0; i <= win.i1; ++i) {
    int64_t xo = win.row[i] + win.j0 * col, wo = win.wrow[i] + win.j0 * wcol, t = i * win.trow + win.j0 * tcol;
    int64_t j = win.j0;
    for (; j + kSplit - 1 <= win.j1; j += kSplit)
      for (int u = 0; u < kSplit; ++u, xo += col, wo += wcol, t += tcol) at(xo, wo, t, u);
    for (; j <= win.j1; ++j, xo += col, wo += wcol, t += tcol) at(xo, wo, t, 0);
  }
}

// One pixel and NV vectors of channels starting at c0: dst[v] = sum_t X_t[v] * W_t[v] over the taps
// of `win`, accumulated in registers. wg: offset of the first vector's group among the weights;
// kVpg: 0 when the NV vectors share that group, else vector v's group is v / kVpg groups further
// on, group_stride apart among the weights. cft: the image's (KK, C) channel weights at c0 (unused
// for involution). kAccumulate: dst[v] += the sum instead. kStream: stored by non-temporal stores (dst
// aligned to a vector).
template <typename T, Combine mode, int NV, int kVpg, bool kAccumulate = false, bool kStream = false>
inline void filter_pixel(const T* base, const T* wbase, const TapWindow& win, int64_t c0, int64_t wg, const T* cft,
                         int64_t C, int64_t group_stride, T* dst) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes;
  // a single vector accumulates in 4 registers (taps round-robin) so that the adds do not wait on
  // each other
  constexpr int kSplit = NV == 1 ? 4 : 1;
  V acc[NV * kSplit];
  for (int v = 0; v < NV * kSplit; ++v) acc[v] = V{};
  // xs, ws, cw: the tap's input, spatial weight and channel weights (DDF; null for involution)
  auto tap = [&](const T* xs, const T* ws, const T* cw, int u) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      T w;
      if constexpr (kVpg == 0) w = ws[0];
      else w = ws[v / kVpg * group_stride];
      const V xv = S::load(xs + v * L);
      V& a = acc[u * NV + v];
      if constexpr (mode == Combine::kMul) a += xv * (S::load(cw + v * L) * w);
      else if constexpr (mode == Combine::kAdd) a += xv * (S::load(cw + v * L) + w);
      else a += xv * w;
    }
  };
  for_each_tap<kSplit>(win, [&](int64_t xo, int64_t wo, int64_t t, int u) {
    const T* cw = nullptr;
    if constexpr (mode != Combine::kSpatialOnly) cw = cft + t * C;
    tap(base + xo + c0, wbase + wo + wg, cw, u);
  });
  for (int v = 0; v < NV; ++v) {
    V sum = acc[v];
    for (int u = 1; u < kSplit; ++u) sum += acc[u * NV + v];
    if constexpr (kAccumulate) sum += S::load(dst + v * L);
    if constexpr (kStream) S::stream(dst + v * L, sum);
    else S::store(dst + v * L, sum);
  }
}

// All channel vectors of one pixel, in blocks of kBlockVectors vectors, then 4, then single ones,
// through filter_pixel (adding to dst with kAccumulate).
template <typename T, Combine mode, bool kAccumulate = false, bool kStream = false>
inline void filter_pixel_channels(const T* base, const T* wbase, const TapWindow& win, const T* cft, T* dst, int vpg,
                                  int64_t group_stride, const FilterGeometry& g) {
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t C = g.channels, cpg = g.channels_per_group();
  int64_t c0 = 0;
  auto blocks = [&](auto nv, auto kvpg) {
    constexpr int NV = decltype(nv)::value, kVpg = decltype(kvpg)::value;
    for (; c0 + NV * L <= C; c0 += NV * L)
      filter_pixel<T, mode, NV, kVpg, kAccumulate, kStream>(base, wbase, win, c0, c0 / cpg * group_stride,
                                                            cft ? cft + c0 : nullptr, C, group_stride, dst + c0);
  };
  using I = std::integral_constant<int, 1>;
  // blocks start at multiples of kBlockVectors vectors, so where vpg divides kBlockVectors they
  // start at a group's first channel; a 4-block within one group (vpg 0 or 4) reads v / 4 = 0
  auto sizes = [&](auto kvpg) {
    blocks(std::integral_constant<int, kBlockVectors>{}, kvpg);
    if constexpr (kBlockVectors > 4) blocks(std::integral_constant<int, 4>{}, kvpg);
  };
  if (vpg == 0) sizes(std::integral_constant<int, 0>{});
  else if (vpg == 1) sizes(I{});
  else if (vpg == 2) sizes(std::integral_constant<int, 2>{});
  else if (kBlockVectors > 4 && vpg == 4) sizes(std::integral_constant<int, 4>{});
  else if (vpg % 4 == 0) blocks(std::integral_constant<int, 4>{}, std::integral_constant<int, 0>{});  // vpg 12, 20, ...
  blocks(I{}, std::integral_constant<int, 0>{});
}

// The forward's walk over an output row: tap (i, j) of output pixel (y, x) reads the input ((i - r)
// * d, (j - r) * d) pixels from (y * s, x * s), and weight i * K + j; row(r, pixel) calls
// pixel(x, win, wbase) for each pixel x of output row r (over all images) with the window of its taps
// inside the image and its weights.
template <typename T>
class OutputRowWalk {
 public:
  OutputRowWalk(const T* SF, const FilterGeometry& g)
      : SF_(SF), g_(g), GKK_(g.groups * g.taps()), xrow_(g.kernel_size), wrow_(g.kernel_size), columns_(g.out_width) {
    const int64_t K = g.kernel_size, r = g.radius(), d = g.dilation;
    for (int64_t i = 0; i < K; ++i) xrow_[i] = ((i - r) * d * g.width - r * d) * g.channels, wrow_[i] = i * K;
    for (int64_t x = 0; x < g.out_width; ++x) columns_[x] = inside_taps(x * g.stride, g.width, g);
  }
  template <typename F>
  void row(int64_t row, F&& pixel) const {
    const int64_t OW = g_.out_width, GKK = GKK_;
    const auto rows = inside_taps(row % g_.out_height * g_.stride, g_.height, g_);
    TapWindow win{xrow_.data(), wrow_.data(), g_.dilation * g_.channels, 1, g_.kernel_size, 1, rows.first,
                  rows.second, 0, -1};
    for (int64_t x = 0; x < OW; ++x) {
      const T* wbase = SF_ + (row * OW + x) * GKK;
      // the weights of the pixel 4 ahead (involution: G*KK values, 784 bytes per pixel for RedNet's
      // stage 1): the stride prefetcher misses them often enough to cost about a fifth of the time
      // (the one-thread forward on 32x64x56x56 went from 19.0 to 15.3 ms)
      for (int64_t i = 0; i < GKK; i += 64 / sizeof(T)) __builtin_prefetch(wbase + 4 * GKK + i);
      win.j0 = columns_[x].first, win.j1 = columns_[x].second;
      pixel(x, win, wbase);
    }
  }

 private:
  const T* SF_;
  const FilterGeometry& g_;
  int64_t GKK_;
  std::vector<int64_t> xrow_, wrow_;
  std::vector<std::pair<int64_t, int64_t>> columns_;  // each output column's window columns
};

template <typename T, Combine mode>
void forward_nhwc_fast(const T* X, const T* CFT, const T* SF, T* out, const FilterGeometry& g) {
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, s = g.stride, KK = g.taps();
  const int vpg = vectors_per_group(g, Simd<T>::kLanes);
  const OutputRowWalk<T> walk(SF, g);
  at::parallel_for(0, g.batch * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / OH, iy = row % OH * s;
      const T* cft = CFT ? CFT + b * KK * C : nullptr;
      walk.row(row, [&](int64_t x, const TapWindow& win, const T* wbase) {
        filter_pixel_channels<T, mode>(X + ((b * H + iy) * W + x * s) * C, wbase, win, cft,
                                       out + (row * g.out_width + x) * C, vpg, KK, g);
      });
    }
  });
}

// One L x L tile, dst[j * dst_pitch + i] = src[i * src_pitch + j], of which src holds the first ni
// rows (the others read as zeros). For float on AVX2 spelled out in intrinsics: rows i and i + 4
// loaded into the halves of one register, then 8 unpacks and 8 shuffles. From the generic
// transpose<T> GCC 12 made a permute and a blend per lane swap and kept the rows on the stack; this
// one made involution's backward 1-7% faster (RESULTS.md, session 16).
template <typename T>
inline void transpose_tile(const T* src, int64_t src_pitch, T* dst, int64_t dst_pitch, int64_t ni = Simd<T>::kLanes) {
  using S = Simd<T>;
  constexpr int64_t L = S::kLanes;
#if defined(__AVX__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    auto quad = [&](int64_t i, int64_t j) { return i < ni ? _mm_loadu_ps(src + i * src_pitch + j) : _mm_setzero_ps(); };
    auto halves = [&](int64_t i, int64_t j) {  // rows i and i + 4, columns j .. j + 3
      return _mm256_insertf128_ps(_mm256_castps128_ps256(quad(i, j)), quad(i + 4, j), 1);
    };
    const __m256 r0 = halves(0, 0), r1 = halves(1, 0), r2 = halves(2, 0), r3 = halves(3, 0);
    const __m256 r4 = halves(0, 4), r5 = halves(1, 4), r6 = halves(2, 4), r7 = halves(3, 4);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    _mm256_storeu_ps(dst + 0 * dst_pitch, _mm256_shuffle_ps(t0, t2, 0x44));
    _mm256_storeu_ps(dst + 1 * dst_pitch, _mm256_shuffle_ps(t0, t2, 0xEE));
    _mm256_storeu_ps(dst + 2 * dst_pitch, _mm256_shuffle_ps(t1, t3, 0x44));
    _mm256_storeu_ps(dst + 3 * dst_pitch, _mm256_shuffle_ps(t1, t3, 0xEE));
    _mm256_storeu_ps(dst + 4 * dst_pitch, _mm256_shuffle_ps(t4, t6, 0x44));
    _mm256_storeu_ps(dst + 5 * dst_pitch, _mm256_shuffle_ps(t4, t6, 0xEE));
    _mm256_storeu_ps(dst + 6 * dst_pitch, _mm256_shuffle_ps(t5, t7, 0x44));
    _mm256_storeu_ps(dst + 7 * dst_pitch, _mm256_shuffle_ps(t5, t7, 0xEE));
    return;
  }
#endif
  typename S::V r[L];
#pragma GCC unroll 16
  for (int64_t i = 0; i < L; ++i) r[i] = i < ni ? S::load(src + i * src_pitch) : typename S::V{};
  transpose<T>(r);
#pragma GCC unroll 16
  for (int64_t j = 0; j < L; ++j) S::store(dst + j * dst_pitch, r[j]);
}

// dst[j * dst_pitch + i] = src[i * src_pitch + j] for i < rows, j < cols, in L x L tiles. dst_room:
// how many values each row of dst may take from its start; a tile short of rows (ni < L) whose L
// columns fit there is stored whole, zeros in its extra columns, instead of through partial stores
// (on AVX2 copies of 4, 2 and 1 values). On 7x7 maps, whose rows of 7 pixels make every tile short,
// the transposes fell from a quarter of involution's backward to an eighth.
template <typename T>
void transpose_matrix(const T* src, int64_t src_pitch, int64_t rows, int64_t cols, T* dst, int64_t dst_pitch,
                      int64_t dst_room = 0) {
  using S = Simd<T>;
  constexpr int64_t L = S::kLanes;
  for (int64_t i0 = 0; i0 < rows; i0 += L) {
    const int64_t ni = std::min(L, rows - i0);
    for (int64_t j0 = 0; j0 < cols; j0 += L) {
      const int64_t nj = std::min(L, cols - j0);
      if (ni == L && nj == L) {
        transpose_tile(src + i0 * src_pitch + j0, src_pitch, dst + j0 * dst_pitch + i0, dst_pitch);
      } else if (nj == L && i0 + L <= dst_room) {  // short of rows, stored whole
        transpose_tile(src + i0 * src_pitch + j0, src_pitch, dst + j0 * dst_pitch + i0, dst_pitch, ni);
      } else {  // a partial tile, padded with zeros
        typename S::V r[L];
        for (int64_t i = 0; i < L; ++i) r[i] = i < ni ? S::load(src + (i0 + i) * src_pitch + j0, nj) : typename S::V{};
        transpose<T>(r);
        for (int64_t j = 0; j < nj; ++j) S::store(dst + (j0 + j) * dst_pitch + i0, r[j], ni);
      }
    }
  }
}

// Rows of a channels_last tensor transposed: row `row` of src, a (pixels, values) matrix, is kept as
// (values, pitch) with pixel x at column pad + x and zeros around it, in one of a ring of slots, and
// transposed only when its slot held another row. With phases p > 1 each value's row of pitch
// values is cut into p parts of pitch / p: part f holds pixels f, f + p, f + 2p, ... at columns
// pad, pad + 1, ... (so that pixels p apart are consecutive).
template <typename T>
class TransposedRows {
 public:
  TransposedRows(const T* src, int64_t pixels, int64_t values, int64_t pitch, int64_t pad, int64_t slots,
                 int64_t phases = 1)
      : src_(src), pixels_(pixels), values_(values), pitch_(pitch), pad_(pad), slots_(slots), phases_(phases),
        data_(slots * values * pitch, T(0)), tag_(slots, -1) {}
  const T* data() const { return data_.data(); }
  // Offset in data() of row `row`, kept in slot `index` % slots.
  int64_t offset(int64_t row, int64_t index) {
    const int64_t slot = index % slots_, start = slot * values_ * pitch_;
    if (tag_[slot] != row) {
      tag_[slot] = row;
      const int64_t part = pitch_ / phases_;  // phase f: pixels f, f + phases, ... at part * f + pad + 0, 1, ...
      for (int64_t f = 0; f < std::min(phases_, pixels_); ++f)
        transpose_matrix(src_ + (row * pixels_ + f) * values_, phases_ * values_, (pixels_ - f + phases_ - 1) / phases_,
                         values_, data_.data() + start + f * part + pad_, pitch_, part - pad_);
    }
    return start;
  }
  // Row iy of image b (of H rows) transposed, or `outside` where iy lies outside the image.
  const T* image_row(int64_t b, int64_t iy, int64_t H, const T* outside) {
    return iy >= 0 && iy < H ? data() + offset(b * H + iy, iy) : outside;
  }

 private:
  const T* src_;
  int64_t pixels_, values_, pitch_, pad_, slots_, phases_;
  std::vector<T> data_;
  std::vector<int64_t> tag_;
};

// Software prefetch of the source rows the next row of a task reads and the current one does not,
// spread over the current row's pixels, so that their misses overlap the current row's arithmetic.
// TransposedRows reads a whole row (44 KB of SF for RedNet's 7x7 involution) in a burst with nothing
// to hide the misses behind; the strided filter gradients read 2 new input rows per output row,
// whose misses the hardware prefetcher left exposed (session 9, RESULTS.md).
class RowsAhead {
 public:
  // Source rows of row_bytes bytes from base: B images of in_size rows, which B * out_size rows read
  // at stride `stride`, with taps up to `reach` rows below their centre.
  RowsAhead(const void* base, int64_t row_bytes, int64_t out_size, int64_t in_size, int64_t stride, int64_t reach)
      : base_(static_cast<const char*>(base)), row_bytes_(row_bytes), out_size_(out_size), in_size_(in_size),
        stride_(stride), reach_(reach) {}
  // Before row `row` of a task that ends at `end`: the source rows its next row reads first, if any.
  // A task that steps `rows` rows at a time passes it: the next step's rows are then the next `rows`.
  void before(int64_t row, int64_t end, int64_t rows = 1) {
    const int64_t first = last_read(row + rows - 1) + 1,
                  last = row + rows < end ? last_read(std::min(row + 2 * rows, end) - 1) : first - 1;
    from_ = base_ + first * row_bytes_;
    lines_ = last < first ? 0 : ((last - first + 1) * row_bytes_ + 63) / 64;
  }
  // the share of pixels x .. x + count - 1, of n, of those rows
  void pixel(int64_t x, int64_t n, int64_t count = 1) const {
    for (int64_t l = x * lines_ / n; l < (x + count) * lines_ / n; ++l) __builtin_prefetch(from_ + 64 * l);
  }

 private:
  // the last source row that row `row` reads
  int64_t last_read(int64_t row) const {
    return row / out_size_ * in_size_ + std::min(in_size_ - 1, row % out_size_ * stride_ + reach_);
  }
  const char* base_;
  int64_t row_bytes_, out_size_, in_size_, stride_, reach_;
  const char* from_ = nullptr;
  int64_t lines_ = 0;
};

// Where grad_x is stored once per input pixel (the gather below; the stride-1 sweep in a single band)
// and is over kStreamBytes, it goes out by non-temporal stores: a plain store first reads its line
// from memory (read for ownership), a second pass over a result that size. DDF's backward on its
// paper's shape took 69.6 ms (median) against 74.7 (grad_x 26.5 against 30.1), on the stride-2
// stage shapes 8-12% less (involution's 3-5%), on 56x56 to 14x14 (stride 1) 4%. Smaller results
// stay on plain stores, which leave them in cache: at 1.6 MB (DDF on 8x256x14x14) non-temporal
// stores made the backward 8% slower (RESULTS.md, session 20).
constexpr int64_t kStreamBytes = int64_t(2) << 20;

template <typename T>
bool stream_grad_x(const T* GX, const FilterGeometry& g) {
  return g.batch * g.height * g.width * g.channels * int64_t(sizeof(T)) > kStreamBytes &&
         reinterpret_cast<uintptr_t>(GX) % kVectorBytes == 0;
}

// grad_x by gathering, for strides over 1: input pixel (iy, ix) sums grad_out times the weight over
// the taps (i, j) that reach it, from output pixel ((iy - (i - r) d) / s, (ix - (j - r) d) / s) where
// both divide exactly and lie inside, accumulated in registers (filter_pixel_channels) and stored
// once: no zeroing pass and no read-modify-write of grad_x per tap, as scattering each output
// pixel's grad_out into its taps' inputs needs. The taps reaching a row are every e-th kernel row,
// e = s / gcd(s, d) (their output rows d / gcd(s, d) apart), from the first whose output row lies
// inside; the same for columns. At stride 2 a pixel has 1, 2 or 4 taps for k = 3, 9 to 16 for k = 7.
// DDF reads the weights from the output pixels' own blocks in SF (k*k per pixel: few lines).
// Involution (no channel filter: kRing) reads them from SF's rows transposed to (G*KK, OW) in a ring, as the stride-1
// gather does: in SF a pixel's taps would each read a line of another output pixel's 49-per-group
// block. Against the scatter this replaced, involution's backward was 12-13% faster on 32x256x28x28/2,
// 5% on 32x512x14x14/2 and 0-3% on 32x128x56x56/2; reading SF in place was 1-20% slower than the
// scatter (RESULTS.md, session 13).
template <typename T, Combine mode>
void backward_input_nhwc_gather(const T* GO, const T* CFT, const T* SF, T* GX, const FilterGeometry& g) {
  constexpr bool kRing = mode == Combine::kSpatialOnly;
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), GKK = g.groups * KK, s = g.stride, d = g.dilation, r = g.radius();
  const int64_t common = std::gcd(s, d), tap_step = s / common, out_step = d / common;
  const int vpg = vectors_per_group(g, Simd<T>::kLanes);
  struct Reach {  // an input row's (or column's) first reaching kernel row, its output row, and how many
    int64_t tap = 0, out = 0, count = 0;
  };
  auto reaches = [&](int64_t size, int64_t out_size) {
    std::vector<Reach> all(size);
    for (int64_t p = 0; p < size; ++p)
      for (int64_t i = 0; i < K; ++i) {
        const int64_t n = p - (i - r) * d;  // s * (output coordinate)
        if (n % s != 0 || n < 0 || n / s >= out_size) continue;
        if (all[p].count++ == 0) all[p].tap = i, all[p].out = n / s;
      }
    return all;
  };
  const std::vector<Reach> rows = reaches(H, OH), columns = reaches(W, OW);
  const int64_t OWp = std::max<int64_t>(OW, Simd<T>::kLanes);
  const bool stream = stream_grad_x(GX, g);
  at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> xrow(K), wrow(K);
    // kRing: SF's rows transposed to (G*KK, OWp), as in backward_input_nhwc_fast, one slot per output
    // row an input row can reach: they span at most (K - 1) * d / s rows
    std::optional<TransposedRows<T>> ring;
    if constexpr (kRing) ring.emplace(SF, OW, GKK, OWp, 0, (K - 1) * d / s + 1);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H;
      const Reach& ry = rows[row % H];
      // window row m: kernel row ry.tap + m * tap_step, output row ry.out - m * out_step
      for (int64_t m = 0; m < ry.count; ++m) {
        const int64_t oy = ry.out - m * out_step;
        xrow[m] = oy * OW * C;
        if constexpr (kRing) wrow[m] = ring->offset(b * OH + oy, oy) + (ry.tap + m * tap_step) * K * OWp;
        else wrow[m] = oy * OW * GKK + (ry.tap + m * tap_step) * K;
      }
      TapWindow win{xrow.data(), wrow.data(), -out_step * C,
                    kRing ? tap_step * OWp - out_step : -out_step * GKK + tap_step, tap_step * K, tap_step,
                    0, ry.count - 1, 0, -1};
      const T* go = GO + b * OH * OW * C;
      const T* sf = SF + b * OH * OW * GKK;
      const T* cft = CFT ? CFT + (b * KK + ry.tap * K) * C : nullptr;
      auto sweep = [&](auto stream_stores) {
        constexpr bool kStream = decltype(stream_stores)::value;
        for (int64_t ix = 0; ix < W; ++ix) {
          const Reach& rx = columns[ix];
          win.j1 = rx.count - 1;
          if constexpr (kRing)
            filter_pixel_channels<T, mode, false, kStream>(go + rx.out * C, ring->data() + rx.out + rx.tap * OWp, win,
                                                           nullptr, GX + (row * W + ix) * C, vpg, KK * OWp, g);
          else
            filter_pixel_channels<T, mode, false, kStream>(go + rx.out * C, sf + rx.out * GKK + rx.tap, win,
                                                           cft ? cft + rx.tap * C : nullptr, GX + (row * W + ix) * C,
                                                           vpg, KK, g);
        }
      };
      if (stream) sweep(std::true_type{});
      else sweep(std::false_type{});
    }
    if (stream) Simd<T>::stream_fence();
  });
}

// grad_x by gathering, stride 1: input pixel q receives grad_out at the output pixels q - (dy, dx)
// whose taps read it, each weighted by that output pixel's filter (no two tasks write the same
// value). The weights are read where they are in SF when the SF rows that an input row reaches
// (2 * reach + 1) fit in L2 and rows are longer than a vector: in SF a tap's weights for
// consecutive pixels lie G*KK apart, each on its own cache line, but within a band of kernel rows
// (below) those lines are few enough to stay in L1 from pixel to pixel. Otherwise they come from
// SF's rows transposed to (G*KK, OWp), one slot per kernel row, so that a tap's weights for
// consecutive pixels are consecutive and group g's lie KK * OWp apart. The ring predates the bands
// and was the only way until session 17; reading in place then made involution's backward 3.5%
// faster on 32x64x56x56, 6.5% on 32x128x28x28, 7% on 32x256x14x14 and DDF's 3-14% on 32x64x56x56,
// where the ring's transposes had been a third of grad_x. It was 5% slower on 7x7 maps, and 40%
// slower for involution on the DDF paper's shape, whose SF rows (940 KB each) do not fit in L2
// (RESULTS.md).
// An input row is swept once per band of kernel rows, the first sweep storing and the others adding
// to grad_x, with as many kernel rows per band as keep what one pixel reads in L1 (kL1Budget): per
// kernel row, K weights of each group, each on its own cache line, and K pixels of grad_out. For
// RedNet's 7x7 involution on 28x28 maps (128 channels, 8 groups) one sweep read 7 KB per kernel
// row, 49 KB in all, and the lines a pixel shares with its neighbour were gone from L1 by the time
// the neighbour came; in three sweeps of 3, 3 and 1 kernel rows the backward ran 14-15% faster.
// With one kernel row per band, 14x14 ran 15-16% faster, 7x7 9-10% and the DDF paper's shape
// 16-19% (RESULTS.md, session 12). The budget was 24 KB until session 15 found it too generous:
// on 56x56 (64 channels, 4 groups) bands of 2, 2, 2, 1 kernel rows instead of 6, 1 took a third
// less time for grad_x, and the backward was 7-12% faster; on 28x28 bands of 1 instead of 3, 8-17%.
// The other RedNet stages, and DDF's k = 3 (now 2 or 3 bands at 256 and 512 channels), were no
// slower. Reading the weights in place (session 17), 16 KB did better again: on 56x56 bands of 4, 3
// made the backward 1-3% faster, on 100x150 (64 channels) 2-5%, on 28x28 (2, 2, 2, 1) 2-3%; DDF's
// k = 3 (the RedNet stages' channels and the paper's shape) and 7x7 maps were no slower.
constexpr int64_t kL1Budget = 16 * 1024;

inline int64_t grad_x_rows_per_sweep(const FilterGeometry& g, int64_t value_bytes) {
  const int64_t per_row = g.kernel_size * (g.groups * 64 + g.channels * value_bytes);
  return std::clamp<int64_t>(kL1Budget / per_row, 1, g.kernel_size);
}

// Above this size the ring of transposed SF rows no longer stays in L2 (512 KB per core on the
// machine measured), each row's transpose pushes the others out, and a band's sweep waits on
// every new line of weights (in the DDF paper's shape, 16 groups, 300 pixels: 940 KB per SF row,
// 6.6 MB in the ring): each sweep then prefetches its weight rows a line ahead, and grad_x on that
// shape took half the time (the backward 26-32% less). On rings that fit, prefetching was no
// faster on 56x56 and 10% slower on 28x28 (RESULTS.md, session 15).
// Where in addition each band is a single kernel row, grad_x now goes by output rows instead (see
// backward_input_nhwc_fast).
constexpr int64_t kL2Budget = 512 * 1024;

template <typename T, Combine mode>
void backward_input_nhwc_fast(const T* GO, const T* CFT, const T* SF, T* GX, const FilterGeometry& g) {
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), GKK = g.groups * KK;
  TORCH_CHECK(g.stride == 1 && OH == H && OW == W, "dynamic filter: the fast grad_x needs stride 1");
  const TapGeometry taps(g);
  const int64_t r = g.radius(), d = g.dilation;
  const int vpg = vectors_per_group(g, Simd<T>::kLanes);
  // tap (i, j) reaches input q from output q - ((i - r) * d, (j - r) * d)
  std::vector<int64_t> xrow(K);
  for (int64_t i = 0; i < K; ++i) xrow[i] = (-(i - r) * d * OW + r * d) * C;
  std::vector<std::pair<int64_t, int64_t>> columns(W);  // each input column's window columns
  for (int64_t ix = 0; ix < W; ++ix) {
    // tap j reaches input ix from output ix - dx[j], inside when 0 <= ix - dx[j] < OW
    int64_t lo = 0, hi = K - 1;
    while (lo <= hi && ix - taps.dx[lo] >= OW) ++lo;
    while (hi >= lo && ix - taps.dx[hi] < 0) --hi;
    columns[ix] = {lo, hi};
  }
  // the ring's rows are at least a vector long, so that on 7x7 maps, where every tile is short of
  // rows, the transposes store whole vectors (involution's backward on 32x512x7x7 17-20% faster);
  // longer rows are not padded (to 16 or 32 pixels, grad_x's weights for a pixel then lie on more
  // cache lines, and 14x14 and 28x28 were no faster)
  const int64_t OWp = std::max<int64_t>(OW, Simd<T>::kLanes);
  const int64_t band_rows = grad_x_rows_per_sweep(g, sizeof(T)), bands = (K + band_rows - 1) / band_rows;
  const int64_t slots = 2 * taps.reach + 1, ring_values = slots * GKK * OWp;
  constexpr int64_t kLineValues = 64 / sizeof(T);
  const bool rows_fit_l2 = ring_values * int64_t(sizeof(T)) <= kL2Budget;
  const bool in_place = rows_fit_l2 && OW > Simd<T>::kLanes;
  // By output rows: where the ring outgrows L2 and a band is one kernel row, each part of a transposed
  // SF row (one kernel row of every group) is read by one input row, the last of them 7 rows after
  // the transpose (k = 7), by when the ring (6.6 MB per thread on the DDF paper's shape) has sent it
  // to memory. Taken in the order of the output rows instead, SF row ny is transposed once into a
  // single slot and at once swept into each input row ny + dy[i] of the task that its kernel row i
  // reaches, adding to what the earlier output rows left there (the sweep from the smallest ny
  // stores). grad_x is still read and written once per kernel row, as with bands of one row, but
  // the transposed row stays in cache. On the DDF paper's shape (2 threads) grad_x took 119 / 132
  // ms (min / median) against 163 / 179, the backward 244 / 267 against 281 / 315; on 2x256x100x150
  // and 2x512x50x75 grad_x took 15-24% less. Sweeps of one kernel row in output-row order lose where
  // bands are wider: on 4x64x100x150 (bands of 4) 40% slower, 4x128x100x150 and 2x80x200x300 (bands
  // of 2) 2-10% (RESULTS.md, session 19); there the ring, prefetched, stays.
  const bool by_output_rows = !rows_fit_l2 && band_rows == 1, prefetch_ring = !rows_fit_l2 && !by_output_rows;
  if (by_output_rows) {
    std::vector<int64_t> first(H);  // per input row, the kernel row of its first sweep: the largest inside
    for (int64_t iy = 0; iy < H; ++iy)
      for (int64_t i = 0; i < K; ++i)
        if (iy - taps.dy[i * K] >= 0 && iy - taps.dy[i * K] < OH) first[iy] = i;
    std::vector<int64_t> wrow(K);  // as below, with the row in the ring's only slot
    for (int64_t i = 0; i < K; ++i) wrow[i] = i * K * OWp + r * d;
    at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
      TransposedRows<T> row_t(SF, OW, GKK, OWp, 0, 1);
      // the output rows that reach input rows [begin, end): up to `reach` rows either side
      const int64_t out_end = std::min(g.batch * OH, end + taps.reach);
      for (int64_t orow = std::max<int64_t>(0, begin - taps.reach); orow < out_end; ++orow) {
        const int64_t b = orow / OH, ny = orow % OH;
        const T* cft = CFT ? CFT + b * KK * C : nullptr;
        bool transposed = false;
        for (int64_t i = 0; i < K; ++i) {
          const int64_t iy = ny + taps.dy[i * K], row = b * H + iy;
          if (iy < 0 || iy >= H || row < begin || row >= end) continue;
          if (!transposed) row_t.offset(orow, 0), transposed = true;
          TapWindow win{xrow.data(), wrow.data(), -d * C, OWp - d, K, 1, i, i, 0, -1};
          for (int64_t ix = 0; ix < W; ++ix) {
            win.j0 = columns[ix].first, win.j1 = columns[ix].second;
            const T* go = GO + (row * OW + ix) * C;
            T* gx = GX + (row * W + ix) * C;
            if (i == first[iy]) filter_pixel_channels<T, mode>(go, row_t.data() + ix, win, cft, gx, vpg, KK * OWp, g);
            else filter_pixel_channels<T, mode, true>(go, row_t.data() + ix, win, cft, gx, vpg, KK * OWp, g);
          }
        }
      }
    });
    return;
  }
  // a single band stores each pixel's grad_x once; more bands add to it
  const bool stream = bands == 1 && stream_grad_x(GX, g);
  at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::optional<TransposedRows<T>> rows;
    if (!in_place) rows.emplace(SF, OW, GKK, OWp, 0, slots);
    // input row iy reads SF rows up to iy + reach
    RowsAhead ahead(SF, OW * GKK * int64_t(sizeof(T)), H, OH, 1, taps.reach);
    std::vector<int64_t> wrow(K), line_ahead;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, iy = row % H;
      ahead.before(row, end);
      int64_t i0 = K, i1 = -1;  // the kernel rows whose output row ny lies inside
      for (int64_t i = 0; i < K; ++i) {
        const int64_t ny = iy - taps.dy[i * K];
        const bool inside = ny >= 0 && ny < OH;
        if (inside) i0 = std::min(i0, i), i1 = i;
        // tap (i, j)'s weight for output column ox = ix - (j - r) * d sits at
        //   in SF (from the image's start): (ny * OW + ox) * GKK + i * K + j,
        //   in the ring: (the row's slot) + (i * K + j) * OWp + ox
        // so from the pixel's own weights (SF + ix * GKK, or the ring + ix), at wrow[i] plus j times
        // the window's column step (1 - d * GKK, or OWp - d)
        if (in_place) wrow[i] = (ny * OW + r * d) * GKK + i * K;
        else wrow[i] = (inside ? rows->offset(b * OH + ny, ny) : 0) + i * K * OWp + r * d;
      }
      TapWindow win{xrow.data(), wrow.data(), -d * C, in_place ? 1 - d * GKK : OWp - d, K, 1, i0, i1, 0, -1};
      const T* weights = in_place ? SF + b * OH * OW * GKK : rows->data();
      const int64_t group_stride = in_place ? KK : KK * OWp;
      const T* cft = CFT ? CFT + b * KK * C : nullptr;
      const int64_t q0 = (b * OH + iy) * OW;  // output pixel at the row's start
      for (int64_t band = 0; band < bands; ++band) {
        TapWindow bw = win;
        bw.i0 = std::max(i0, band * band_rows), bw.i1 = std::min(i1, (band + 1) * band_rows - 1);
        if (band > 0 && bw.i0 > bw.i1) continue;  // the first band stores (zeros if it has no taps)
        // prefetch_ring: per weight row of the band (a tap of a group), the value a cache line
        // ahead of the pixel's, for 1 / kLineValues of the rows at each pixel, so that each row's
        // next line is asked for once (clamped to the ring: a row's end can point past it)
        line_ahead.clear();
        if (prefetch_ring)
          for (int64_t grp = 0; grp < g.groups; ++grp)
            for (int64_t i = bw.i0; i <= bw.i1; ++i)
              for (int64_t j = 0; j < K; ++j)
                line_ahead.push_back(wrow[i] + j * (OWp - d) + grp * KK * OWp + kLineValues);
        const int64_t lines = line_ahead.size();
        for (int64_t ix = 0; ix < W; ++ix) {
          ahead.pixel(band * W + ix, bands * W);
          const int64_t share = ix % kLineValues;
          for (int64_t n = share * lines / kLineValues; n < (share + 1) * lines / kLineValues; ++n)
            __builtin_prefetch(weights + std::clamp<int64_t>(line_ahead[n] + ix, 0, ring_values - 1));
          bw.j0 = columns[ix].first, bw.j1 = columns[ix].second;
          const T* go = GO + (q0 + ix) * C;
          T* gx = GX + (row * W + ix) * C;
          const T* w = weights + (in_place ? ix * GKK : ix);
          if (band == 0 && stream)
            filter_pixel_channels<T, mode, false, true>(go, w, bw, cft, gx, vpg, group_stride, g);
          else if (band == 0) filter_pixel_channels<T, mode>(go, w, bw, cft, gx, vpg, group_stride, g);
          else filter_pixel_channels<T, mode, true>(go, w, bw, cft, gx, vpg, group_stride, g);
        }
      }
    }
    if (stream) Simd<T>::stream_fence();
  });
}

// The sums of up to 4 taps (acc[u]: tap u at L consecutive pixels) stored pixel-major: dst[p *
// pitch + u] = lane p of acc[u], for p < L and u < taps.
template <typename T>
inline void store_tap_quad(const typename Simd<T>::V* acc, T* dst, int64_t pitch, int taps) {
  using S = Simd<T>;
  constexpr int L = S::kLanes;
#if defined(__AVX__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (taps == 4) {  // a 4 x 8 transpose: p[k] holds pixel k in its lower half, pixel k + 4 in its upper
      const __m256 t0 = _mm256_unpacklo_ps(acc[0], acc[1]), t1 = _mm256_unpackhi_ps(acc[0], acc[1]);
      const __m256 t2 = _mm256_unpacklo_ps(acc[2], acc[3]), t3 = _mm256_unpackhi_ps(acc[2], acc[3]);
      const __m256 p[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                           _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
      for (int k = 0; k < 4; ++k) {
        _mm_storeu_ps(dst + k * pitch, _mm256_castps256_ps128(p[k]));
        _mm_storeu_ps(dst + (k + 4) * pitch, _mm256_extractf128_ps(p[k], 1));
      }
      return;
    }
  }
#endif
  if constexpr (L == 4) {  // a 4 x 4 transpose (double on AVX2)
    typename S::V r[4] = {acc[0], acc[1], acc[2], acc[3]};
    transpose<T>(r);
    for (int p = 0; p < 4; ++p) S::store(dst + p * pitch, r[p], taps);
  } else {
    alignas(64) T lanes[4][L];
    for (int u = 0; u < taps; ++u) S::store(lanes[u], acc[u]);
    for (int p = 0; p < L; ++p)
      for (int u = 0; u < taps; ++u) dst[p * pitch + u] = lanes[u][p];
  }
}

// grad_spatial_filter of involution with NCH channels per group, lanes over pixels: for L
// consecutive output pixels x of a row, group g and tap t,
//     GSF[x, g, t] = sum_c GO^T[c, x] * X^T[y * s + dy, c, x * s + dx]
// from the rows of grad_out and of the input transposed to (C, pixels), the input's padded with
// zeros on either side, so every term is one vector multiply-add, with the group's NCH rows of
// grad_out held in registers. At stride s > 1 the input rows are transposed in s phases, so that
// the columns x * s + dx of consecutive x are consecutive: in phase dx mod s, from x + (dx - dx mod
// s) / s. (Until session 18 strides over 1 took backward_filters_nhwc_fast's channel lanes, whose
// sums across lanes cost more than the multiply-adds with 16 channels per group.) A row is swept
// one group at a time, so that the group's input rows (7 x NCH rows, 28 KB on 56-pixel rows) stay
// in L1 from block to block; sweeping all groups at each block made this filter gradient 5% slower
// on 2x64x56x56 and 1x256x50x150 (one thread), and involution's backward 2-5% slower at batch 32 on
// 56x56 maps and the DDF paper's shape (RESULTS.md, session 16); holding the whole row's results
// (950 KB on that shape) was no slower than strips of 64-256 KB. Each quad of taps' sums is
// transposed in registers to (pixel, tap) into a buffer of the row's results, written to GSF by
// non-temporal stores (as in backward_spatial_nhwc_taps below: the backward on 32x64x56x56 7-15%
// faster, on the DDF paper's shape no different). Until session 18 the sums were kept as vectors
// and the row's transposed block by block at its end, which took a seventh of this gradient's time;
// in registers, it took 9% less time on 32x64x56x56 (one thread) and the backward 3% less
// (RESULTS.md).
template <typename T, int NCH>
void backward_spatial_nhwc_pixels(const T* GO, const T* X, T* GSF, const FilterGeometry& g) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t L = S::kLanes;
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), G = g.groups, GKK = G * KK;
  TORCH_CHECK(g.channels_per_group() == NCH, "dynamic filter: the pixel-lane filter gradient needs ", NCH,
              " channels per group");
  const TapGeometry taps(g);
  const int64_t s = g.stride, OWp = (OW + L - 1) / L * L;
  const int64_t pad = (taps.reach + s - 1) / s, part = pad + OWp + taps.reach / s, Wp = s * part;
  at::parallel_for(0, g.batch * OH, 1, [&](int64_t begin, int64_t end) {
    TransposedRows<T> input_rows(X, W, C, Wp, pad, 2 * taps.reach + 1, s);
    TransposedRows<T> grad_row(GO, OW, C, OWp, 0, 1);
    RowsAhead input_ahead(X, W * C * int64_t(sizeof(T)), OH, H, s, taps.reach);
    RowsAhead grad_ahead(GO, OW * C * int64_t(sizeof(T)), OH, OH, 1, 0);
    const std::vector<T> zero_row(C * Wp, T(0));  // kernel rows outside the image
    // per tap, where its input row's values for output pixel 0 start: divisions by K here would
    // cost as much as the multiply-adds they feed (3 idivs per 64 FMAs)
    std::vector<const T*> tap_base(KK + 3);
    const int64_t blocks = OWp / L;
    std::vector<T> row_out(OWp * GKK);  // the row's results, (pixel, tap), to be streamed to GSF
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / OH, y = row % OH;
      input_ahead.before(row, end), grad_ahead.before(row, end);
      const T* go_t = grad_row.data() + grad_row.offset(row, 0);
      for (int64_t i = 0; i < K; ++i) {
        const int64_t iy = y * s + taps.dy[i * K];
        const T* in = input_rows.image_row(b, iy, H, zero_row.data());
        for (int64_t j = 0; j < K; ++j) {
          // output pixel x reads input column x * s + dx: in phase f = dx mod s, at x + (dx - f) / s
          const int64_t dx = taps.dx[i * K + j], f = (dx % s + s) % s;
          tap_base[i * K + j] = in + f * part + pad + (dx - f) / s;
        }
      }
      for (int64_t t = KK; t < KK + 3; ++t) tap_base[t] = tap_base[KK - 1];  // the last quad's spare taps
      for (int64_t grp = 0; grp < G; ++grp) {
        for (int64_t x0 = 0; x0 < OW; x0 += L) {
          const int64_t step = grp * blocks + x0 / L;
          input_ahead.pixel(step, G * blocks), grad_ahead.pixel(step, G * blocks);
          T* out = row_out.data() + x0 * GKK + grp * KK;
          V go[NCH];
          for (int c = 0; c < NCH; ++c) go[c] = S::load(go_t + (grp * NCH + c) * OWp + x0);
          const int64_t shift = grp * NCH * Wp + x0;
          for (int64_t t0 = 0; t0 < KK; t0 += 4) {  // 4 taps at once: 4 independent sums
            const T* xs[4];
            for (int u = 0; u < 4; ++u) xs[u] = tap_base[t0 + u] + shift;
            V acc[4] = {};
#pragma GCC unroll 16
            for (int c = 0; c < NCH; ++c)
              for (int u = 0; u < 4; ++u) acc[u] += go[c] * S::load(xs[u] + c * Wp);
            store_tap_quad<T>(acc, out + t0, GKK, static_cast<int>(std::min<int64_t>(4, KK - t0)));
          }
        }
      }
      S::stream_copy(GSF + row * OW * GKK, row_out.data(), OW * GKK);
    }
    S::stream_fence();
  });
}

// Makes the compiler hold v in a vector register from here on: it cannot see through the empty asm,
// so it cannot fold v's load into each instruction that uses it (one load per use). GCC on x86
// only (a no-op elsewhere).
template <typename V>
inline void in_register(V& v) {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#endif
}

// grad_spatial_filter of involution at stride 1 and dilation 1 with k = KS, lanes over the taps of a
// kernel row: for output pixel (y, x), group g and kernel row i,
//     GSF[y, x, g, i * K + j] = sum_c GO[y, x, c] * X^T[y + i - r, c, x + j - r],   j = 0 .. K-1,
// the K taps of a row read K consecutive values of an input row transposed to (C, W) (zero padded):
// the lanes of NVR vectors (one for k = 7 with 8 lanes), to which each channel adds GO[y, x, c]
// times them. The pixel's G*K*K results are then stored in their own order with no transpose
// back (the pixel-lane version's transpose of its results took about a quarter of its time): a
// row's last vector spills its spare lanes into the next row's first values, which a later store
// overwrites, and the pixel's very last row stores only its K lanes. Blocks of kPixelBlock pixels,
// and within them one group at a time, keep the input values in L1.
// Output rows go in pairs (y, y + 1), which read K + 1 input rows between them: the vector loaded
// from input row y + i - r serves kernel row i of pixel (y, x) and kernel row i - 1 of (y + 1, x).
// In two passes over the channels (input rows 0 .. h-1, then h .. K, h = (K + 1) / 2), each with K
// accumulators for k = 7, a channel step loads 4 input vectors and 2 grad_out values for 7
// multiply-adds, where one row at a time loaded 7 and 1: the backward on 32x128x28x28 3-6%
// faster, 14x14 5-7%, 7x7 2-6% (RESULTS.md, session 14). A task's last row, or an image's, when
// unpaired, runs the same code with its partner's results dropped.
// The block's results are gathered in a buffer and written to GSF by non-temporal stores: GSF has
// G*K*K values per pixel (392 for RedNet's 8 groups, against 128 channels of grad_out), and plain
// stores read each of its lines from memory before writing it. On 32x128x28x28 the backward was
// 0-8% faster (varying from run to run); on 14x14 and 7x7 no different (RESULTS.md, session 12).
constexpr int64_t kPixelBlock = 8;

template <typename T, int KS>
void backward_spatial_nhwc_taps(const T* GO, const T* X, T* GSF, const FilterGeometry& g) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes, NVR = (KS + L - 1) / L, R = (KS - 1) / 2;
  constexpr int HA = (KS + 1) / 2, HB = KS - HA;  // pass A: input rows 0 .. HA-1; pass B: HA .. KS
  constexpr int kLastLanes = KS - (NVR - 1) * L;  // lanes of a kernel row's last vector that hold taps
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, OW = g.out_width;
  const int64_t KK = g.taps(), G = g.groups, GKK = G * KK, cpg = g.channels_per_group();
  TORCH_CHECK(g.stride == 1 && g.dilation == 1 && g.kernel_size == KS && OH == H && OW == W,
              "dynamic filter: the tap-lane filter gradient needs stride 1, dilation 1 and k = ", KS);
  const int64_t Wp = W - 1 + NVR * L;  // pixel x reads padded columns x .. x + NVR * L - 1
  at::parallel_for(0, g.batch * OH, 1, [&](int64_t begin, int64_t end) {
    TransposedRows<T> input_rows(X, W, C, Wp, R, KS + 1);
    RowsAhead input_ahead(X, W * C * int64_t(sizeof(T)), OH, H, 1, R);
    const std::vector<T> zero_row(C * Wp, T(0));  // kernel rows outside the image
    std::vector<T> block_out(2 * kPixelBlock * GKK);  // both rows' results
    const int64_t blocks = (OW + kPixelBlock - 1) / kPixelBlock;
    for (int64_t row = begin; row < end;) {
      const int64_t b = row / OH, y = row % OH;
      const bool pair = row + 1 < end && y + 1 < OH;
      input_ahead.before(row, end, pair ? 2 : 1);
      const T* in[KS + 1];  // input rows y - r .. y + r + 1
      for (int i = 0; i <= KS; ++i)
        in[i] = i < KS || pair ? input_rows.image_row(b, y + i - R, H, zero_row.data()) : zero_row.data();
      for (int64_t x0 = 0; x0 < OW; x0 += kPixelBlock) {
        input_ahead.pixel(x0 / kPixelBlock, blocks);
        const int64_t x1 = std::min(OW, x0 + kPixelBlock), n = (x1 - x0) * GKK;
        for (int64_t grp = 0; grp < G; ++grp) {
          const T* go0 = GO + (row * OW + x0) * C + grp * cpg;
          const T* go1 = pair ? go0 + OW * C : go0;  // unpaired: a stand-in whose results are dropped
          T* out0 = block_out.data() + grp * KK;
          const int64_t c0 = grp * cpg * Wp;
          const bool last_group = grp == G - 1;
          // vector v of kernel row i of a pixel whose results start at dst (fully unrolled below, so
          // that the accumulators stay in registers: a rolled loop sent them through the stack)
          auto put = [&](T* dst, int i, int v, const V& value) {
            if (last_group && i == KS - 1 && v == NVR - 1) S::store(dst + i * KS + v * L, value, kLastLanes);
            else S::store(dst + i * KS + v * L, value);
          };
          for (int64_t x = x0; x < x1; ++x, go0 += C, go1 += C, out0 += GKK) {
            T* out1 = out0 + n;
            {  // pass A: input row i is kernel row i of y and i - 1 of y + 1
              V a[HA][NVR] = {}, a1[HA - 1][NVR] = {};
              for (int64_t c = 0; c < cpg; ++c) {
                const T u = go0[c], u1 = go1[c];
                const int64_t at = c0 + c * Wp + x;
#pragma GCC unroll 16
                for (int i = 0; i < HA; ++i)
#pragma GCC unroll 4
                  for (int v = 0; v < NVR; ++v) {
                    V xv = S::load(in[i] + at + v * L);
                    if (i > 0) {
                      in_register(xv);  // one load for both multiply-adds
                      a1[i - 1][v] += xv * u1;
                    }
                    a[i][v] += xv * u;
                  }
              }
#pragma GCC unroll 16
              for (int i = 0; i < HA; ++i)
#pragma GCC unroll 4
                for (int v = 0; v < NVR; ++v) put(out0, i, v, a[i][v]);
              if (pair)
#pragma GCC unroll 16
                for (int i = 0; i < HA - 1; ++i)
#pragma GCC unroll 4
                  for (int v = 0; v < NVR; ++v) put(out1, i, v, a1[i][v]);
            }
            {  // pass B: input row HA + i is kernel row HA + i of y and HA + i - 1 of y + 1
              V a[HB][NVR] = {}, a1[HB + 1][NVR] = {};
              for (int64_t c = 0; c < cpg; ++c) {
                const T u = go0[c], u1 = go1[c];
                const int64_t at = c0 + c * Wp + x;
#pragma GCC unroll 16
                for (int i = 0; i <= HB; ++i)
#pragma GCC unroll 4
                  for (int v = 0; v < NVR; ++v) {
                    V xv = S::load(in[HA + i] + at + v * L);
                    if (i < HB) {
                      in_register(xv);
                      a[i][v] += xv * u;
                    }
                    a1[i][v] += xv * u1;
                  }
              }
#pragma GCC unroll 16
              for (int i = 0; i < HB; ++i)
#pragma GCC unroll 4
                for (int v = 0; v < NVR; ++v) put(out0, HA + i, v, a[i][v]);
              if (pair)
#pragma GCC unroll 16
                for (int i = 0; i <= HB; ++i)
#pragma GCC unroll 4
                  for (int v = 0; v < NVR; ++v) put(out1, HA - 1 + i, v, a1[i][v]);
            }
          }
        }
        S::stream_copy(GSF + (row * OW + x0) * GKK, block_out.data(), n);
        if (pair) S::stream_copy(GSF + ((row + 1) * OW + x0) * GKK, block_out.data() + n, n);
      }
      row += pair ? 2 : 1;
    }
    S::stream_fence();
  });
}

// The sum of v's lanes.
template <typename T>
inline T lane_total(const typename Simd<T>::V& v) {
  T sum = 0;
  for (int l = 0; l < Simd<T>::kLanes; ++l) sum += v[l];
  return sum;
}

// Both filter gradients of P output pixels (1, or 2 neighbours of a row), one group and a chunk of
// NT taps, in one pass over the group's channel vectors: u = grad_out * input at the tap is summed
// over the channels into p (times the channel weight for 'mul') for grad_spatial_filter, and added
// into the (channel vector, tap) sums of grad_channel_filter (times the spatial weight for 'mul'), so
// grad_out and the input are loaded once for both; two pixels share the channel weights' loads and
// one update of the sums.
//   go, src[j], sw, gsf: pixel 0's grad_out, tap j's input pixel, spatial weights and their
//   gradient at the chunk's first tap; pixel 1's lie out_step, in_step (stride * out_step) and
//   weight_step values further on. The group starts at channel c0 and has `vectors` channel vectors.
//   cfb, gcb: the channel weights and sums of the group's first channel vector at the chunk's first
//   tap, in blocks of KK * L values per channel vector (tap j at j * L: constant offsets).
// Tap sums: M = L / P taps per pixel share the transposing add tree (lane q * M + j: pixel q, tap
// j); a tap M (NT = M + 1) is summed on its own.
// gcb is __restrict: without it the compiler has to assume that a store of the sums may change the
// spatial weights (both float), so it broadcast them again, and reloaded the pointer to pixel 1's,
// for every channel vector; with it they are broadcast once per chunk (DDF's backward 3-6% faster,
// RESULTS.md session 11).
template <typename T, Combine mode, int P, int NT>
inline void filter_grad_chunk(const T* go, int64_t out_step, const T* const* src, int64_t in_step, int64_t c0,
                              const T* sw, int64_t weight_step, const T* cfb, T* __restrict gcb, int64_t vectors,
                              int64_t KK, T* gsf) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes, M = L / P;
  static_assert(NT <= M + 1, "a chunk has at most L / P + 1 taps");
  V p[L], extra[P];  // p[q * M + j]: pixel q, tap j < M; extra[q]: pixel q, tap M
  for (auto& v : p) v = V{};
  for (auto& v : extra) v = V{};
  for (int64_t v = 0; v < vectors; ++v) {
    const int64_t c = c0 + v * L, o = v * KK * L;
    V g[P];
    for (int q = 0; q < P; ++q) g[q] = S::load(go + q * out_step + c);
#pragma GCC unroll 17
    for (int j = 0; j < NT; ++j) {
      V u[P];
      for (int q = 0; q < P; ++q) u[q] = g[q] * S::load(src[j] + q * in_step + c);
      V cw{};
      if constexpr (mode == Combine::kMul) {
        cw = S::load(cfb + o + j * L);
        // the P pixels' multiply-adds share it: GCC otherwise loaded it once for each (DDF's
        // backward on 28x28 and 56x56 1-6% faster, within 2% elsewhere; RESULTS.md session 13)
        if constexpr (P > 1) in_register(cw);
      }
      for (int q = 0; q < P; ++q) {
        V& a = j < M ? p[q * M + j] : extra[q];
        if constexpr (mode == Combine::kMul) a += u[q] * cw;
        else a += u[q];
      }
      if constexpr (mode != Combine::kSpatialOnly) {
        V sum = S::load(gcb + o + j * L);
        for (int q = 0; q < P; ++q) {
          if constexpr (mode == Combine::kMul) sum += u[q] * sw[q * weight_step + j];
          else sum += u[q];
        }
        S::store(gcb + o + j * L, sum);
      }
    }
  }
  if constexpr (NT == 1) {
    for (int q = 0; q < P; ++q) gsf[q * weight_step] = lane_total<T>(p[q * M]);
  } else if constexpr (P == 1 && NT >= L) {
    S::store(gsf, lane_sums<T>(p));
  } else {
    alignas(64) T sums[L];
    S::store(sums, lane_sums<T>(p));
    for (int q = 0; q < P; ++q) std::memcpy(gsf + q * weight_step, sums + q * M, std::min(NT, M) * sizeof(T));
  }
  if constexpr (NT > M)
    for (int q = 0; q < P; ++q) gsf[q * weight_step + M] = lane_total<T>(extra[q]);
}

// grad_spatial_filter and grad_channel_filter, fused (filter_grad_chunk) per output pixel, or pair
// of neighbouring pixels whose taps all read inside the image, group and chunk of taps.
// grad_channel_filter is summed in a task's (channel vector, tap, lane) buffer, added every 64
// pixels or more (at a row's end) into the task's share of the image (ChannelGradPartial), in the
// same blocked layout: GCFB is (B, C / L, KK, L).
template <typename T, Combine mode>
void backward_filters_nhwc_fast(const T* GO, const T* X, const T* CFT, const T* SF, T* GSF, T* GCFB,
                                const FilterGeometry& g) {
  using S = Simd<T>;
  constexpr int L = S::kLanes;
  constexpr bool kChannel = mode != Combine::kSpatialOnly;
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, s = g.stride;
  const int64_t KK = g.taps(), G = g.groups, GKK = G * KK, cpg = g.channels_per_group();
  const TapGeometry taps(g);
  // chunks of M = L / P taps, the last of up to M + 1: an odd k's k * k is 1 more than a multiple
  // of 8, so the last chunk has M + 1 taps, or 9 (P = 1 and AVX-512 floats: 9 = 9, 25 = 16 + 9), or
  // 1 (k = 1)
  auto chunks_of = [&](int64_t M) {
    std::vector<std::pair<int64_t, int64_t>> chunks;
    for (int64_t t0 = 0; t0 < KK;) {
      const int64_t n = KK - t0 <= M + 1 ? KK - t0 : M;
      TORCH_INTERNAL_ASSERT(n == M || n == M + 1 || n == 9 || n == 1, "dynamic filter: a chunk of ", n, " taps");
      chunks.emplace_back(t0, n);
      t0 += n;
    }
    return chunks;
  };
  const auto single_chunks = chunks_of(L), pair_chunks = chunks_of(L / 2);
  std::vector<int64_t> offset(KK);  // tap t's input pixel from an inner pixel's own, in values
  for (int64_t t = 0; t < KK; ++t) offset[t] = (taps.dy[t] * W + taps.dx[t]) * C;
  std::mutex lock;
  at::parallel_for(0, g.batch * OH, 1, [&](int64_t begin, int64_t end) {
    ChannelGradPartial<T> partial(kChannel ? GCFB : nullptr, KK * C, lock, begin / OH);
    std::vector<T> cfb(mode == Combine::kMul ? KK * C : 0);  // the image's channel filter, blocked
    std::vector<T> sums(kChannel ? KK * C : 0, T(0));
    int64_t image = -1, pending = 0;
    auto add_sums = [&] {
      T* dst = partial.data();
      for (int64_t i = 0; i < KK * C; i += L) S::store(dst + i, S::load(dst + i) + S::load(sums.data() + i));
      std::fill(sums.begin(), sums.end(), T(0));
      pending = 0;
    };
    const std::vector<T> zero_pixel(C, T(0));
    std::vector<const T*> src(KK);
    // the input rows the next output row adds, prefetched at strides over 1 only: there it made DDF's
    // backward on 8x128x56x56/2 17-32% faster; at stride 1 it gained nothing (session 9, RESULTS.md)
    RowsAhead input_ahead(X, W * C * int64_t(sizeof(T)), OH, H, s, taps.reach);
    const bool prefetch = s > 1;
    // pixels x (and x + 1 when P = 2) of output row `row`, whose taps read src
    auto pixels = [&](auto pixel_count, int64_t row, int64_t x, const auto& chunks) {
      constexpr int P = decltype(pixel_count)::value, M = L / P;
      const T* gov = GO + (row * OW + x) * C;
      const T* sw = SF + (row * OW + x) * GKK;
      T* gsf = GSF + (row * OW + x) * GKK;
      for (int64_t grp = 0; grp < G; ++grp) {
        const int64_t c0 = grp * cpg, v0 = c0 / L;
        for (const auto& [t0, n] : chunks) {
          const int64_t at = v0 * KK * L + t0 * L, w = grp * KK + t0;
          auto chunk = [&](auto nt) {
            filter_grad_chunk<T, mode, P, decltype(nt)::value>(
                gov, C, src.data() + t0, s * C, c0, sw + w, GKK, mode == Combine::kMul ? cfb.data() + at : nullptr,
                kChannel ? sums.data() + at : nullptr, cpg / L, KK, gsf + w);
          };
          if (n == M) chunk(std::integral_constant<int, M>{});
          else if (n == M + 1) chunk(std::integral_constant<int, M + 1>{});
          else if (n == 1) chunk(std::integral_constant<int, 1>{});
          else if constexpr (M + 1 > 9) chunk(std::integral_constant<int, 9>{});  // n == 9 (checked above)
        }
      }
    };
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / OH, iy = row % OH * s;
      if (kChannel && b != image) {
        if (pending > 0) add_sums();
        partial.enter_image(b);
        image = b;
        if constexpr (mode == Combine::kMul)
          for (int64_t t = 0; t < KK; ++t)
            for (int64_t c = 0; c < C; ++c) cfb[(c / L * KK + t) * L + c % L] = CFT[(b * KK + t) * C + c];
      }
      const bool inner_row = iy >= taps.reach && iy + taps.reach < H;
      auto inner = [&](int64_t x) { return inner_row && x * s >= taps.reach && x * s + taps.reach < W; };
      if (prefetch) input_ahead.before(row, end);
      for (int64_t x = 0; x < OW;) {
        const int64_t ix = x * s;
        const T* base = X + ((b * H + iy) * W + ix) * C;
        if (inner(x)) {
          for (int64_t t = 0; t < KK; ++t) src[t] = base + offset[t];
        } else {
          for (int64_t t = 0; t < KK; ++t) {
            const int64_t ty = iy + taps.dy[t], tx = ix + taps.dx[t];
            src[t] = ty >= 0 && ty < H && tx >= 0 && tx < W ? base + offset[t] : zero_pixel.data();
          }
        }
        const bool pair = x + 1 < OW && inner(x) && inner(x + 1);
        if (prefetch) input_ahead.pixel(x, OW, pair ? 2 : 1);
        if (pair) {
          pixels(std::integral_constant<int, 2>{}, row, x, pair_chunks);
          x += 2;
        } else {
          pixels(std::integral_constant<int, 1>{}, row, x, single_chunks);
          x += 1;
        }
      }
      pending += OW;
      if (kChannel && pending >= 64) add_sums();
    }
    if (pending > 0 && kChannel) add_sums();
  });
}

// ---------------------------------------------------------------------------------- NHWC, generic
// Generic path: channels in blocks of kBlock accumulated over all taps, each block split into runs
// of channels that share a group's spatial weight.
constexpr int64_t kBlock = 64;

// acc[0, n) += src[c] * W(c) for the channels c0 + [0, n) of one tap; sw points at the tap's spatial
// weight of group 0 (group g's is sw[g * KK]); cft at the tap's channel weights (+ c0), or null.
template <typename scalar_t, Combine mode>
inline void accumulate_block(scalar_t* acc, const scalar_t* src, const scalar_t* cft, const scalar_t* sw,
                             int64_t c0, int64_t n, int64_t cpg, int64_t KK) {
  for (int64_t a = 0; a < n;) {
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

template <typename scalar_t, Combine mode>
void forward_nhwc_generic(const scalar_t* X, const scalar_t* CFT, const scalar_t* SF, scalar_t* out, const FilterGeometry& g) {
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
            accumulate_block<scalar_t, mode>(acc, X + offset + c0, cft, sfv + t, c0, n, cpg, KK);
          }
          std::copy(acc, acc + n, out + (row * OW + x) * C + c0);
        }
      }
    }
  });
}

// grad_x by gathering (no write conflicts), one task per input row; blocked like the forward.
template <typename scalar_t, Combine mode>
void backward_input_nhwc_generic(const scalar_t* GO, const scalar_t* CFT, const scalar_t* SF, scalar_t* GX,
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
            accumulate_block<scalar_t, mode>(acc, GO + pixel * C + c0, cft, SF + pixel * G * KK + t, c0, n,
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
void backward_filters_nhwc_generic(const scalar_t* GO, const scalar_t* X, const scalar_t* CFT, const scalar_t* SF,
                           scalar_t* GSF, at::opmath_type<scalar_t>* GCFT, const FilterGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.channels, H = g.height, W = g.width, OH = g.out_height, OW = g.out_width, K = g.kernel_size;
  const int64_t KK = g.taps(), G = g.groups, cpg = g.channels_per_group(), r = g.radius(), s = g.stride;
  constexpr bool kChannel = mode != Combine::kSpatialOnly;
  std::mutex lock;
  at::parallel_for(0, g.batch * OH, 1, [&](int64_t begin, int64_t end) {
    ChannelGradPartial<acc_t> partial(kChannel ? GCFT : nullptr, KK * C, lock, begin / OH);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / OH, y = row % OH;
      partial.enter_image(b);
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
  });
}

// ------------------------------------------------------------------------------------------ entry

bool use_channels_last(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
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

// Each of `images` (rows, cols) matrices at src, one after the other, transposed into dst, in
// parallel over the images. For the channel filter, (C, k*k) per image to the (k*k, C) the NHWC
// kernels read, and its gradient back: at::Tensor's transpose + contiguous (a TensorIterator copy)
// took 60-100 us on 32 x 512 x 9 values, a tenth of DDF's backward on 32x512x7x7.
template <typename T>
void transpose_images(const T* src, T* dst, int64_t images, int64_t rows, int64_t cols) {
  const int64_t size = rows * cols;
  at::parallel_for(0, images, std::max<int64_t>(1, 4096 / std::max<int64_t>(size, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) transpose_matrix(src + n * size, cols, rows, cols, dst + n * size, rows);
  });
}

// The channel filter (B, C, k, k) in the compute type, as the kernels read it: (B, k*k, C) for
// channels_last inputs, else (B, C, k*k).
at::Tensor channel_filter(const at::Tensor& cf_in, at::ScalarType ct, const FilterGeometry& g, bool nhwc) {
  const at::Tensor cf = cf_in.to(ct).reshape({g.batch, g.channels, g.taps()}).contiguous();
  if (!nhwc) return cf;
  at::Tensor out = at::empty({g.batch, g.taps(), g.channels}, cf.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "channel_filter", [&] {
    transpose_images(cf.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g.batch, g.channels, g.taps());
  });
  return out;
}

}  // namespace

int64_t cpu_vector_bytes() { return kVectorBytes; }

at::Tensor dynamic_filter_forward_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& cf_in,
                                      const at::Tensor& sf_in, const FilterGeometry& g, Combine mode) {
  check_cpu_dtype(x_in, "x");
  const auto ct = compute_type(x_in);
  const bool nhwc = use_channels_last(x_in);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor x = x_in.to(ct).contiguous(fmt);
  at::Tensor sf = sf_in.to(ct).contiguous(fmt);
  at::Tensor cf;
  if (mode != Combine::kSpatialOnly) cf = channel_filter(*cf_in, ct, g, nhwc);
  at::Tensor out = at::empty({g.batch, g.channels, g.out_height, g.out_width}, x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES(ct, "dynamic_filter_forward_cpu", [&] {
    const scalar_t* cfp = cf.defined() ? cf.const_data_ptr<scalar_t>() : nullptr;
    dispatch_mode(mode, [&](auto m) {
      constexpr Combine M = decltype(m)::value;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* sfp = sf.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      if (nhwc && fast_channels<scalar_t>(g))
        forward_nhwc_fast<scalar_t, M>(xp, cfp, sfp, op, g);
      else if (nhwc)
        forward_nhwc_generic<scalar_t, M>(xp, cfp, sfp, op, g);
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
  if (has_cf) cf = channel_filter(*cf_in, ct, g, nhwc);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gsf = at::empty_like(sf);
  at::Tensor gcf;
  AT_DISPATCH_FLOATING_TYPES(ct, "dynamic_filter_backward_cpu", [&] {
    const scalar_t* cfp = has_cf ? cf.const_data_ptr<scalar_t>() : nullptr;
    dispatch_mode(mode, [&](auto m) {
      constexpr Combine M = decltype(m)::value;
      if (nhwc) {
        // channel-filter gradient accumulated at float precision or better, in (B, KK, C), or in blocks
        // (B, C / L, KK, L) on the fast path
        at::Tensor gcft = has_cf ? at::zeros({g.batch, g.taps(), g.channels}, x.options().dtype(
                                                                                   c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value))
                                 : at::Tensor();
        const scalar_t* gop = go.const_data_ptr<scalar_t>();
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const scalar_t* sfp = sf.const_data_ptr<scalar_t>();
        scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
        scalar_t* gsfp = gsf.mutable_data_ptr<scalar_t>();
        at::opmath_type<scalar_t>* gcfp = has_cf ? gcft.mutable_data_ptr<at::opmath_type<scalar_t>>() : nullptr;
        const bool fast = fast_channels<scalar_t>(g);
        if (fast && g.stride == 1) backward_input_nhwc_fast<scalar_t, M>(gop, cfp, sfp, gxp, g);
        else if (fast) backward_input_nhwc_gather<scalar_t, M>(gop, cfp, sfp, gxp, g);
        else backward_input_nhwc_generic<scalar_t, M>(gop, cfp, sfp, gxp, g);
        const int64_t cpg = g.channels_per_group();
        // tap lanes (k = 7 fills 7 of 8 lanes; not 16) beat pixel lanes by 5-25% on rows up to 28
        // pixels and lost by 4-10% on rows of 40 and 56 (RESULTS.md, session 7). At strides over 1,
        // pixel lanes beat channel lanes (backward_filters_nhwc_fast) where an output row fills more
        // than half a vector: involution's backward on RedNet's strided shapes 11-15% faster; on
        // 32x512x7x7/2 (4 pixels a row) they were 4% slower (RESULTS.md, session 18).
        const bool pixel_lanes = g.stride == 1 || 2 * g.out_width > Simd<scalar_t>::kLanes;
        if (M == Combine::kSpatialOnly && g.stride == 1 && g.dilation == 1 && g.kernel_size == 7 &&
            kVectorBytes <= 32 && g.out_width <= 32)
          backward_spatial_nhwc_taps<scalar_t, 7>(gop, xp, gsfp, g);
        else if (M == Combine::kSpatialOnly && pixel_lanes && cpg == 16)
          backward_spatial_nhwc_pixels<scalar_t, 16>(gop, xp, gsfp, g);
        else if (M == Combine::kSpatialOnly && pixel_lanes && cpg == 8)
          backward_spatial_nhwc_pixels<scalar_t, 8>(gop, xp, gsfp, g);
        else if (fast)
          backward_filters_nhwc_fast<scalar_t, M>(gop, xp, cfp, sfp, gsfp, gcfp, g);
        else
          backward_filters_nhwc_generic<scalar_t, M>(gop, xp, cfp, sfp, gsfp, gcfp, g);
        if (has_cf) {  // to (B, C, KK) from (B, C / L, KK, L) blocks on the fast path, else from (B, KK, C)
          static_assert(std::is_same_v<at::opmath_type<scalar_t>, scalar_t>, "float and double sum in their own type");
          const int64_t L = Simd<scalar_t>::kLanes, B = g.batch, C = g.channels, KK = g.taps();
          gcf = at::empty({B, C, KK}, x.options());
          if (fast) transpose_images(gcfp, gcf.mutable_data_ptr<scalar_t>(), B * C / L, KK, L);
          else transpose_images(gcfp, gcf.mutable_data_ptr<scalar_t>(), B, KK, C);
        }
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
