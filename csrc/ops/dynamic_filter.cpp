// Argument checks shared by DDF and involution on every backend.
#include "dynamic_filter.h"

#include <algorithm>

namespace dynrobust {

Combine parse_combine(c10::string_view combine) {
  if (combine == "mul") return Combine::kMul;
  if (combine == "add") return Combine::kAdd;
  TORCH_CHECK(false, "ddf: combine must be 'mul' or 'add', got '", std::string(combine), "'");
}

FilterGeometry check_dynamic_filter(const at::Tensor& x, const c10::optional<at::Tensor>& channel_filter,
                                    const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation,
                                    int64_t stride, int64_t groups, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, op, ": kernel_size must be odd and positive, got ", kernel_size);
  TORCH_CHECK(dilation >= 1, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(stride >= 1, op, ": stride must be positive, got ", stride);
  FilterGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, groups, kernel_size, dilation, stride};
  // From a dilation of max(H, W) on, every tap but the centre lies outside the image for every
  // pixel: clamping there changes no result, and keeps the reach (k-1)/2 * d, the buffers padded by
  // it and the offsets computed from it in range (2^62 overflowed them).
  g.dilation = std::min(dilation, std::max<int64_t>({g.height, g.width, 1}));
  TORCH_CHECK(groups >= 1 && g.channels % groups == 0, op, ": ", groups, " groups do not divide ", g.channels,
              " channels");
  TORCH_CHECK(spatial_filter.dim() == 4 && spatial_filter.size(0) == g.batch &&
                  spatial_filter.size(1) == groups * g.taps(),
              op, ": spatial filter must be (B, G*k*k, H', W') = (", g.batch, ", ", groups * g.taps(),
              ", H', W'), got ", spatial_filter.sizes());
  g.out_height = spatial_filter.size(2);
  g.out_width = spatial_filter.size(3);
  TORCH_CHECK(g.out_height >= 1 && g.out_width >= 1 && (g.out_height - 1) * stride < g.height &&
                  (g.out_width - 1) * stride < g.width,
              op, ": output size ", g.out_height, "x", g.out_width, " does not fit a ", g.height, "x", g.width,
              " input at stride ", stride);
  TORCH_CHECK(spatial_filter.device() == x.device(), op, ": x is on ", x.device(), " but the spatial filter is on ",
              spatial_filter.device());
  TORCH_CHECK(spatial_filter.scalar_type() == x.scalar_type(), op, ": x is ", x.scalar_type(),
              " but the spatial filter is ", spatial_filter.scalar_type());
  if (channel_filter.has_value()) {
    const at::Tensor& cf = *channel_filter;
    TORCH_CHECK(cf.dim() == 4 && cf.size(0) == g.batch && cf.size(1) == g.channels && cf.size(2) == kernel_size &&
                    cf.size(3) == kernel_size,
                op, ": channel filter must be (B, C, k, k) = (", g.batch, ", ", g.channels, ", ", kernel_size, ", ",
                kernel_size, "), got ", cf.sizes());
    TORCH_CHECK(cf.device() == x.device(), op, ": x is on ", x.device(), " but the channel filter is on ", cf.device());
    TORCH_CHECK(cf.scalar_type() == x.scalar_type(), op, ": x is ", x.scalar_type(), " but the channel filter is ",
                cf.scalar_type());
  }
  return g;
}

}  // namespace dynrobust
