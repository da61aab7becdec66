// Shared description of the two dynamic operators (DDF and involution) for every backend.
//
// Both compute, for output (b, c, y, x) and kernel tap t = (i, j) of a k x k window,
//     out[b,c,y,x] = sum_t X[b, c, y*s + (i-r)*d, x*s + (j-r)*d] * W(b, c, t, y, x),   r = (k-1)/2,
// with zero padding, where the per-pixel weight W is built from a spatial filter SF of shape
// (B, G*k*k, OH, OW) (channels split into G contiguous groups, g(c) = c / (C/G)) and, for DDF,
// a channel filter CF of shape (B, C, k, k):
//     kMul        (DDF 'mul'):  W = CF[b,c,t] * SF[b, g(c)*k*k + t, y, x]
//     kAdd        (DDF 'add'):  W = CF[b,c,t] + SF[b, g(c)*k*k + t, y, x]
//     kSpatialOnly (involution): W = SF[b, g(c)*k*k + t, y, x]
// DDF uses G = head and OH = H / s (floor); involution uses G groups of C/G channels and
// OH = ceil(H / s). The output size is always read from SF.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace dynrobust {

enum class Combine : int { kMul = 0, kAdd = 1, kSpatialOnly = 2 };

// Calls f with the combination as a compile-time constant (std::integral_constant).
template <typename F>
void dispatch_mode(Combine mode, F&& f) {
  switch (mode) {
    case Combine::kMul: f(std::integral_constant<Combine, Combine::kMul>{}); break;
    case Combine::kAdd: f(std::integral_constant<Combine, Combine::kAdd>{}); break;
    case Combine::kSpatialOnly: f(std::integral_constant<Combine, Combine::kSpatialOnly>{}); break;
  }
}

struct FilterGeometry {
  int64_t batch, channels, height, width;   // input X
  int64_t out_height, out_width;             // output, = SF's spatial size
  int64_t groups;                            // G
  int64_t kernel_size, dilation, stride;

  int64_t taps() const { return kernel_size * kernel_size; }
  int64_t channels_per_group() const { return channels / groups; }
  int64_t radius() const { return (kernel_size - 1) / 2; }
};

// Checks shared by every backend; the Python wrapper checks the same with friendlier messages.
FilterGeometry check_dynamic_filter(const at::Tensor& x, const c10::optional<at::Tensor>& channel_filter,
                                    const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation,
                                    int64_t stride, int64_t groups, const char* op);

// Backend entry points (cpu/dynamic_filter_kernel.cpp, cuda/dynamic_filter_kernel.cu).
at::Tensor dynamic_filter_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& channel_filter,
                                      const at::Tensor& spatial_filter, const FilterGeometry& geo, Combine mode);
std::vector<at::Tensor> dynamic_filter_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const c10::optional<at::Tensor>& channel_filter,
                                                    const at::Tensor& spatial_filter, const FilterGeometry& geo,
                                                    Combine mode);
#ifdef DYNROBUST_WITH_CUDA
at::Tensor dynamic_filter_forward_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& channel_filter,
                                       const at::Tensor& spatial_filter, const FilterGeometry& geo, Combine mode);
std::vector<at::Tensor> dynamic_filter_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const c10::optional<at::Tensor>& channel_filter,
                                                     const at::Tensor& spatial_filter, const FilterGeometry& geo,
                                                     Combine mode);
#endif

Combine parse_combine(c10::string_view combine);

// Bytes per vector register the CPU kernels were compiled for (64 AVX-512, 32 AVX/AVX2, 16 otherwise).
int64_t cpu_vector_bytes();

}  // namespace dynrobust
