// Argument checks shared by the CPU and CUDA op implementations.  TORCH_CHECK_TYPE raises
// TypeError and TORCH_CHECK_VALUE raises ValueError in Python, matching memoir/ops.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace memoir {

inline void check_masks(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name,
                   " must hold packed masks as int64 words, got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [rows, words], got shape ", t.sizes());
}

inline void check_pair(const at::Tensor& queries, const at::Tensor& bank) {
  check_masks(queries, "queries");
  check_masks(bank, "bank");
  TORCH_CHECK_VALUE(queries.size(1) == bank.size(1), "word counts differ: queries have ", queries.size(1),
                    " words per mask, bank has ", bank.size(1));
  TORCH_CHECK_VALUE(queries.device() == bank.device(), "queries on ", queries.device(), " but bank on ",
                    bank.device(), ": move them to one device");
}

}  // namespace memoir
