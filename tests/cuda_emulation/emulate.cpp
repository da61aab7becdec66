// The CUDA kernels of csrc/ops/cuda/dynamic_filter_kernels.cuh and their host code, run on the CPU
// (tests/test_cuda_emulation.py). Each block of a launch runs as kThreads fibers (ucontext) on one
// CPU thread, taking turns: a fiber runs until it reaches __syncthreads() or ends, and the block
// goes on past a __syncthreads() once every fiber has reached it; the turns alternate between
// ascending and descending thread order, so most missing barriers change the result. The fibers
// share the block's __shared__ memory. The CUDA keywords become plain C++; the kernels' index
// arithmetic, grid-stride loops, launch sizes and block reductions are the ones nvcc compiles, so
// their results can be compared with the reference on a machine without a GPU. What this cannot
// check: the device's memory model, float16 arithmetic in device code, and speed.
#include <torch/extension.h>
#include <ucontext.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace cuda_emulation {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The launch being run: its sizes, and the indices of the fiber that runs now.
Dim3 grid_dim, block_dim, block_idx, thread_idx;

// The threads of one block as fibers, switched by run_block and __syncthreads.
class Block {
 public:
  explicit Block(int threads) : fibers_(threads) {
    for (auto& fiber : fibers_) fiber.stack.reset(new char[kStackBytes]);
  }
  // Runs body() as every thread of the block, passing each __syncthreads() together.
  void run(const std::function<void()>& body) {
    body_ = &body;
    for (auto& fiber : fibers_) {
      TORCH_CHECK(getcontext(&fiber.context) == 0, "emulation: getcontext failed");
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = &scheduler_;
      fiber.done = false;
      makecontext(&fiber.context, &Block::entry, 0);
    }
    // One round: each unfinished fiber runs to its next __syncthreads() or its end, in ascending and
    // descending order of threads in turn, starting one way in even blocks and the other in odd
    // ones, so that a value one thread reads before a barrier that should have kept it from another
    // thread's write is read out of order in one round or the other (a GPU gives no order at all).
    for (int64_t round = block_idx.x % 2;; ++round) {
      int done = 0;
      for (size_t n = 0; n < fibers_.size(); ++n) {
        const size_t t = round % 2 == 0 ? n : fibers_.size() - 1 - n;
        if (fibers_[t].done) {
          ++done;
          continue;
        }
        current_ = &fibers_[t];
        thread_idx = {static_cast<unsigned>(t), 0, 0};
        TORCH_CHECK(swapcontext(&scheduler_, &current_->context) == 0, "emulation: swapcontext failed");
        if (current_->done) ++done;
      }
      if (done == static_cast<int>(fibers_.size())) break;
      // some threads ended while others wait at a barrier: undefined behaviour on a GPU
      TORCH_CHECK(done == 0, "emulation: ", done, " threads of a block ended while others wait at __syncthreads()");
    }
    current_ = nullptr;
  }
  static void syncthreads() {
    TORCH_CHECK(current_ != nullptr, "emulation: __syncthreads() outside a kernel");
    TORCH_CHECK(swapcontext(&current_->context, &scheduler_) == 0, "emulation: swapcontext failed");
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    bool done = false;
  };
  static void entry() {
    (*body_)();
    current_->done = true;  // returning resumes uc_link, the scheduler
  }
  std::vector<Fiber> fibers_;
  static inline ucontext_t scheduler_;
  static inline Fiber* current_ = nullptr;
  static inline const std::function<void()>* body_ = nullptr;
};

}  // namespace cuda_emulation

#define gridDim cuda_emulation::grid_dim
#define blockDim cuda_emulation::block_dim
#define blockIdx cuda_emulation::block_idx
#define threadIdx cuda_emulation::thread_idx
#define __global__
#define __device__
#define __forceinline__ inline
// one block runs at a time, so a function's static array is its block's shared memory
#define __shared__ static
inline void __syncthreads() { cuda_emulation::Block::syncthreads(); }
// A shuffle as every lane of the block's warps taking part (the kernels call them with all 32 lanes,
// the same number of times in every warp of a block): each thread leaves its value, all meet, each
// takes its partner's, all meet again before the values can be overwritten.
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static T exchange[1024];
  TORCH_CHECK(mask == 0xffffffffu && lane_mask > 0 && lane_mask < 32, "emulation: shuffle mask ", mask, ", lane mask ",
              lane_mask);
  TORCH_CHECK(cuda_emulation::block_dim.x <= 1024, "emulation: more than 1024 threads");
  exchange[cuda_emulation::thread_idx.x] = value;
  cuda_emulation::Block::syncthreads();
  const T other = exchange[cuda_emulation::thread_idx.x ^ static_cast<unsigned>(lane_mask)];
  cuda_emulation::Block::syncthreads();
  return other;
}

#include "ops/cuda/dynamic_filter_kernels.cuh"

namespace {

// launch(kernel, blocks, args...) as forward_with and backward_with call it: the blocks one after
// another, each by kThreads fibers. max_blocks > 0 launches at most that many blocks, so that the
// grid-stride loops, which a GPU only runs past their first step on tensors of over 2^38 elements,
// take several steps (a kernel of one block per item, grad_channel_filter's, then leaves items out).
struct EmulatedLaunch {
  int64_t max_blocks;
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int blocks, Args... args) const {
    TORCH_CHECK(blocks >= 1, "emulated launch of ", blocks, " blocks");
    if (max_blocks > 0 && blocks > max_blocks) blocks = static_cast<int>(max_blocks);
    cuda_emulation::grid_dim = {static_cast<unsigned>(blocks), 1, 1};
    cuda_emulation::block_dim = {static_cast<unsigned>(dynrobust::kThreads), 1, 1};
    cuda_emulation::Block block(dynrobust::kThreads);
    const std::function<void()> body = [&] { kernel(args...); };
    for (int b = 0; b < blocks; ++b) {
      cuda_emulation::block_idx = {static_cast<unsigned>(b), 0, 0};
      block.run(body);
    }
  }
};

dynrobust::Combine combine_of(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0 (mul), 1 (add) or 2 (spatial only), got ", mode);
  return static_cast<dynrobust::Combine>(mode);
}

at::Tensor forward(const at::Tensor& x, const c10::optional<at::Tensor>& channel_filter,
                   const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
                   int64_t groups, int64_t mode, int64_t max_blocks) {
  const auto g = dynrobust::check_dynamic_filter(x, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                                 groups, "emulated");
  return dynrobust::forward_with(x, channel_filter, spatial_filter, g, combine_of(mode), EmulatedLaunch{max_blocks});
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& channel_filter, const at::Tensor& spatial_filter,
                                 int64_t kernel_size, int64_t dilation, int64_t stride, int64_t groups, int64_t mode,
                                 int64_t max_blocks) {
  const auto g = dynrobust::check_dynamic_filter(x, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                                 groups, "emulated");
  return dynrobust::backward_with(grad_out, x, channel_filter, spatial_filter, g, combine_of(mode),
                                   EmulatedLaunch{max_blocks});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("forward", &forward, "the CUDA forward, emulated on the CPU", py::arg("x"), py::arg("channel_filter"),
        py::arg("spatial_filter"), py::arg("kernel_size"), py::arg("dilation"), py::arg("stride"), py::arg("groups"),
        py::arg("mode"), py::arg("max_blocks") = 0);
  m.def("backward", &backward, "the CUDA backward (grad_x, grad_channel_filter, grad_spatial_filter), emulated",
        py::arg("grad_out"), py::arg("x"), py::arg("channel_filter"), py::arg("spatial_filter"),
        py::arg("kernel_size"), py::arg("dilation"), py::arg("stride"), py::arg("groups"), py::arg("mode"),
        py::arg("max_blocks") = 0);
}
