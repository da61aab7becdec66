// dynrobust::involution — Involution (Li et al., CVPR 2021): schema and per-backend dispatch.
//
// The kernel (B, G, k*k, H', W') is viewed as a (B, G*k*k, H', W') spatial filter of the shared
// dynamic-filter kernels, with no channel filter.
#include <torch/library.h>

#include "dynamic_filter.h"

namespace dynrobust {
namespace {

at::Tensor as_spatial_filter(const at::Tensor& kernel, int64_t kernel_size) {
  TORCH_CHECK(kernel.dim() == 5, "involution: kernel must be (B, G, k*k, H', W'), got ", kernel.sizes());
  TORCH_CHECK(kernel.size(2) == kernel_size * kernel_size, "involution: kernel has ", kernel.size(2),
              " taps, kernel_size ", kernel_size, " needs ", kernel_size * kernel_size);
  return kernel.reshape({kernel.size(0), kernel.size(1) * kernel.size(2), kernel.size(3), kernel.size(4)});
}

FilterGeometry involution_geometry(const at::Tensor& x, const at::Tensor& spatial_filter, int64_t groups,
                                   int64_t kernel_size, int64_t dilation, int64_t stride) {
  FilterGeometry g = check_dynamic_filter(x, c10::nullopt, spatial_filter, kernel_size, dilation, stride, groups,
                                          "involution");
  // padding (k-1)/2 * dilation keeps the centre tap on y*s, so H' = ceil(H / s).
  TORCH_CHECK(g.out_height == (g.height - 1) / stride + 1 && g.out_width == (g.width - 1) / stride + 1,
              "involution: kernel must be ceil(H/stride) x ceil(W/stride) = ", (g.height - 1) / stride + 1, "x",
              (g.width - 1) / stride + 1, ", got ", g.out_height, "x", g.out_width);
  return g;
}

template <typename Forward>
at::Tensor involution_forward(const at::Tensor& x, const at::Tensor& kernel, int64_t kernel_size, int64_t dilation,
                              int64_t stride, Forward forward) {
  at::Tensor sf = as_spatial_filter(kernel, kernel_size);
  auto g = involution_geometry(x, sf, kernel.size(1), kernel_size, dilation, stride);
  return forward(x, c10::nullopt, sf, g, Combine::kSpatialOnly);
}

template <typename Backward>
std::tuple<at::Tensor, at::Tensor> involution_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& kernel, int64_t kernel_size,
                                                       int64_t dilation, int64_t stride, Backward backward) {
  at::Tensor sf = as_spatial_filter(kernel, kernel_size);
  auto g = involution_geometry(x, sf, kernel.size(1), kernel_size, dilation, stride);
  auto grads = backward(grad_out, x, c10::nullopt, sf, g, Combine::kSpatialOnly);
  return {grads[0], grads[2].reshape(kernel.sizes())};
}

at::Tensor involution_cpu(const at::Tensor& x, const at::Tensor& kernel, int64_t kernel_size, int64_t dilation,
                          int64_t stride) {
  return involution_forward(x, kernel, kernel_size, dilation, stride, dynamic_filter_forward_cpu);
}

std::tuple<at::Tensor, at::Tensor> involution_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& kernel, int64_t kernel_size,
                                                           int64_t dilation, int64_t stride) {
  return involution_backward(grad_out, x, kernel, kernel_size, dilation, stride, dynamic_filter_backward_cpu);
}

#ifdef DYNROBUST_WITH_CUDA
at::Tensor involution_cuda(const at::Tensor& x, const at::Tensor& kernel, int64_t kernel_size, int64_t dilation,
                           int64_t stride) {
  return involution_forward(x, kernel, kernel_size, dilation, stride, dynamic_filter_forward_cuda);
}

std::tuple<at::Tensor, at::Tensor> involution_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& kernel, int64_t kernel_size,
                                                            int64_t dilation, int64_t stride) {
  return involution_backward(grad_out, x, kernel, kernel_size, dilation, stride, dynamic_filter_backward_cuda);
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(dynrobust, m) {
  m.def("involution(Tensor x, Tensor kernel, int kernel_size, int dilation, int stride) -> Tensor");
  m.def("involution_backward(Tensor grad_out, Tensor x, Tensor kernel, int kernel_size, int dilation, int stride) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynrobust, CPU, m) {
  m.impl("involution", &involution_cpu);
  m.impl("involution_backward", &involution_backward_cpu);
}

#ifdef DYNROBUST_WITH_CUDA
TORCH_LIBRARY_IMPL(dynrobust, CUDA, m) {
  m.impl("involution", &involution_cuda);
  m.impl("involution_backward", &involution_backward_cuda);
}
#endif

}  // namespace dynrobust
