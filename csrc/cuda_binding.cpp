// Thin torch binding for the CUDA kernels in csrc/cuda/retrieval_kernels.cu.  Compiled into
// memoir._C only when setup.py builds with CUDA (MEMOIR_WITH_CUDA); otherwise empty.
#ifdef MEMOIR_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/retrieval_kernels.h"

namespace memoir {
namespace {

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "memoir CUDA kernel ", what, " failed: ", memoir_cuda_error_string(err));
}

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

at::Tensor overlap_counts_cuda(const at::Tensor& queries, const at::Tensor& bank) {
  check_pair(queries, bank);
  const c10::cuda::CUDAGuard guard(queries.device());
  const at::Tensor q = queries.contiguous();
  const at::Tensor m = bank.contiguous();
  const int64_t B = q.size(0), N = m.size(0), W = q.size(1);
  at::Tensor out = at::empty({B, N}, q.options().dtype(at::kInt));
  if (B == 0 || N == 0) return out;
  if (W == 0) return out.zero_();
  check_cuda(memoir_cuda_overlap_counts(q.const_data_ptr<int64_t>(), m.const_data_ptr<int64_t>(),
                                        out.data_ptr<int32_t>(), B, N, W, current_stream()),
             "overlap_counts");
  return out;
}

std::tuple<at::Tensor, at::Tensor> best_match_cuda(const at::Tensor& queries, const at::Tensor& bank,
                                                   double threshold) {
  check_pair(queries, bank);
  const c10::cuda::CUDAGuard guard(queries.device());
  const at::Tensor q = queries.contiguous();
  const at::Tensor m = bank.contiguous();
  const int64_t B = q.size(0), N = m.size(0), W = q.size(1);
  TORCH_CHECK_VALUE(N < 0xffffffffLL, "best_match on CUDA supports banks of fewer than 2^32-1 rows, got ", N);
  if (B == 0 || N == 0) {
    return {at::zeros({B}, q.options().dtype(at::kFloat)), at::full({B}, -1, q.options().dtype(at::kLong))};
  }
  at::Tensor scores = at::empty({B}, q.options().dtype(at::kFloat));
  at::Tensor index = at::empty({B}, q.options().dtype(at::kLong));
  check_cuda(memoir_cuda_best_match(q.const_data_ptr<int64_t>(), m.const_data_ptr<int64_t>(), scores.data_ptr<float>(),
                                    index.data_ptr<int64_t>(), B, N, W, static_cast<float>(threshold),
                                    current_stream()),
             "best_match");
  return {scores, index};
}

at::Tensor popcounts_cuda(const at::Tensor& masks) {
  check_masks(masks, "masks");
  const c10::cuda::CUDAGuard guard(masks.device());
  const at::Tensor m = masks.contiguous();
  const int64_t N = m.size(0), W = m.size(1);
  at::Tensor out = at::empty({N}, m.options().dtype(at::kInt));
  if (N == 0) return out;
  if (W == 0) return out.zero_();
  check_cuda(memoir_cuda_popcounts(m.const_data_ptr<int64_t>(), out.data_ptr<int32_t>(), N, W, current_stream()),
             "popcounts");
  return out;
}

}  // namespace
}  // namespace memoir

TORCH_LIBRARY_IMPL(memoir, CUDA, m) {
  m.impl("overlap_counts", &memoir::overlap_counts_cuda);
  m.impl("best_match", &memoir::best_match_cuda);
  m.impl("popcounts", &memoir::popcounts_cuda);
}

#endif  // MEMOIR_WITH_CUDA
