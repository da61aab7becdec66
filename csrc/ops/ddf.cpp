// dynrobust::ddf — Decoupled Dynamic Filter (Zhou et al., CVPR 2021): schema and per-backend dispatch.
#include <torch/library.h>

#include "dynamic_filter.h"

namespace dynrobust {
namespace {

FilterGeometry ddf_geometry(const at::Tensor& x, const at::Tensor& channel_filter, const at::Tensor& spatial_filter,
                            int64_t kernel_size, int64_t dilation, int64_t stride, int64_t head) {
  FilterGeometry g = check_dynamic_filter(x, channel_filter, spatial_filter, kernel_size, dilation, stride, head, "ddf");
  // The official op requires H' = H // stride (floor), unlike involution's ceil.
  TORCH_CHECK(g.out_height == g.height / stride && g.out_width == g.width / stride,
              "ddf: spatial filter must be H//stride x W//stride = ", g.height / stride, "x", g.width / stride,
              ", got ", g.out_height, "x", g.out_width);
  return g;
}

at::Tensor ddf_cpu(const at::Tensor& x, const at::Tensor& channel_filter, const at::Tensor& spatial_filter,
                   int64_t kernel_size, int64_t dilation, int64_t stride, c10::string_view combine, int64_t head) {
  auto g = ddf_geometry(x, channel_filter, spatial_filter, kernel_size, dilation, stride, head);
  return dynamic_filter_forward_cpu(x, channel_filter, spatial_filter, g, parse_combine(combine));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ddf_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& channel_filter,
    const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    c10::string_view combine, int64_t head) {
  auto g = ddf_geometry(x, channel_filter, spatial_filter, kernel_size, dilation, stride, head);
  auto grads = dynamic_filter_backward_cpu(grad_out, x, channel_filter, spatial_filter, g, parse_combine(combine));
  return {grads[0], grads[1], grads[2]};
}

#ifdef DYNROBUST_WITH_CUDA
at::Tensor ddf_cuda(const at::Tensor& x, const at::Tensor& channel_filter, const at::Tensor& spatial_filter,
                    int64_t kernel_size, int64_t dilation, int64_t stride, c10::string_view combine, int64_t head) {
  auto g = ddf_geometry(x, channel_filter, spatial_filter, kernel_size, dilation, stride, head);
  return dynamic_filter_forward_cuda(x, channel_filter, spatial_filter, g, parse_combine(combine));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ddf_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& channel_filter,
    const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    c10::string_view combine, int64_t head) {
  auto g = ddf_geometry(x, channel_filter, spatial_filter, kernel_size, dilation, stride, head);
  auto grads = dynamic_filter_backward_cuda(grad_out, x, channel_filter, spatial_filter, g, parse_combine(combine));
  return {grads[0], grads[1], grads[2]};
}
#endif

}  // namespace

TORCH_LIBRARY(dynrobust, m) {
  m.def("ddf(Tensor x, Tensor channel_filter, Tensor spatial_filter, int kernel_size, int dilation, int stride, "
        "str combine, int head) -> Tensor");
  m.def("ddf_backward(Tensor grad_out, Tensor x, Tensor channel_filter, Tensor spatial_filter, int kernel_size, "
        "int dilation, int stride, str combine, int head) -> (Tensor, Tensor, Tensor)");
  // what the CPU kernels were compiled for (dynrobust ops info; no tensors, so one kernel for all)
  m.def("cpu_vector_bytes() -> int", &cpu_vector_bytes);
}

TORCH_LIBRARY_IMPL(dynrobust, CPU, m) {
  m.impl("ddf", &ddf_cpu);
  m.impl("ddf_backward", &ddf_backward_cpu);
}

#ifdef DYNROBUST_WITH_CUDA
TORCH_LIBRARY_IMPL(dynrobust, CUDA, m) {
  m.impl("ddf", &ddf_cuda);
  m.impl("ddf_backward", &ddf_backward_cuda);
}
#endif

}  // namespace dynrobust
