// The CUDA entry points of the dynamic filters: the kernels and their host code
// (dynamic_filter_kernels.cuh), launched on the current stream of x's device.
//
// c10/cuda only (not ATen/cuda/CUDAContext.h): it needs no cuBLAS/cuSPARSE headers, so a bare
// toolkit (nvcc + runtime) builds it.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dynamic_filter_kernels.cuh"

namespace dynrobust {
namespace {

// launch(kernel, blocks, args...) for forward_with and backward_with: kernel<<<blocks, kThreads>>> on
// the current stream, checked at once.
struct DeviceLaunch {
  cudaStream_t stream;
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int blocks, Args... args) const {
    kernel<<<blocks, kThreads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

at::Tensor dynamic_filter_forward_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& cf,
                                       const at::Tensor& sf, const FilterGeometry& g, Combine mode) {
  c10::cuda::CUDAGuard guard(x.device());
  return forward_with(x, cf, sf, g, mode, DeviceLaunch{c10::cuda::getCurrentCUDAStream().stream()});
}

std::vector<at::Tensor> dynamic_filter_backward_cuda(const at::Tensor& go, const at::Tensor& x,
                                                     const c10::optional<at::Tensor>& cf, const at::Tensor& sf,
                                                     const FilterGeometry& g, Combine mode) {
  c10::cuda::CUDAGuard guard(x.device());
  return backward_with(go, x, cf, sf, g, mode, DeviceLaunch{c10::cuda::getCurrentCUDAStream().stream()});
}

}  // namespace dynrobust
