// C interface of the CUDA retrieval kernels (csrc/cuda/retrieval_kernels.cu).
// Plain C types and raw device pointers, so the .cu compiles with `nvcc -c` alone and the
// torch binding (csrc/cuda_binding.cpp) needs no CUDA headers.  All functions enqueue work
// on `stream` (a cudaStream_t) and return a cudaError_t value (0 = success).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// out[i * N + r] = popcount(q[i] AND bank[r]), int32, for i < B, r < N; masks have W words.
int memoir_cuda_overlap_counts(const int64_t* q, const int64_t* bank, int32_t* out, int64_t B, int64_t N,
                               int64_t W, void* stream);

// Best bank row per query by overlap; scores[i] = count / max(popcount(q[i]), 1) (float32),
// index[i] = lowest row with the best count, or -1 when scores[i] < threshold.  Requires
// 1 <= N < 2^32 - 1.  `index` doubles as the packed (count, row) atomic workspace.
int memoir_cuda_best_match(const int64_t* q, const int64_t* bank, float* scores, int64_t* index, int64_t B,
                           int64_t N, int64_t W, float threshold, void* stream);

// out[r] = popcount(masks[r]) (int32).
int memoir_cuda_popcounts(const int64_t* masks, int32_t* out, int64_t N, int64_t W, void* stream);

const char* memoir_cuda_error_string(int err);

#ifdef __cplusplus
}
#endif
