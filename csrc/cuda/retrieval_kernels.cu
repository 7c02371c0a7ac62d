// CUDA kernels for packed-bit mask retrieval (layout: memoir/ops.py).  Compiles with plain
// `nvcc -c` (CUDA runtime + raw pointers); csrc/cuda_binding.cpp wraps them as torch ops.
//
// Work mapping: one warp per bank row at a time, lanes stride over the row's words, so every
// warp load is 32 consecutive 64-bit words (256 B, coalesced) and each bank word is read once
// per query tile.  A block holds a tile of QT queries in shared memory (blockIdx.y picks the
// tile) and every loaded bank word is ANDed + popcounted against all QT of them.  The per-row
// sums are reduced across the warp with a "transpose" butterfly (QT values in QT-1+log2(32/QT)
// shuffles instead of 5*QT), after which lane L holds the total of query (L / (32/QT)) % QT.
// best_match keeps a per-lane running max of the key (count << 32 | ~row) and publishes it
// with one atomicMax per warp and query, so ties resolve to the lowest row.
#include "retrieval_kernels.h"

#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxQueryTile = 16;
constexpr int64_t kSharedLimit = 48 * 1024;  // default dynamic shared memory per block

typedef unsigned long long u64;

template <int QT>
__device__ __forceinline__ unsigned transpose_reduce(unsigned (&v)[QT], int lane) {
#pragma unroll
  for (int half = QT / 2, off = 16; half >= 1; half >>= 1, off >>= 1) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int k = 0; k < half; ++k) {
      const unsigned send = upper ? v[k] : v[k + half];
      const unsigned keep = upper ? v[k + half] : v[k];
      v[k] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
  unsigned s = v[0];
#pragma unroll
  for (int off = 16 / QT; off >= 1; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

template <int QT, bool SMEM, bool BEST>
__global__ void __launch_bounds__(kThreads) scan_kernel(const u64* __restrict__ q, const u64* __restrict__ bank,
                                                        int64_t B, int64_t N, int64_t W, int* __restrict__ out,
                                                        u64* __restrict__ keys) {
  extern __shared__ u64 sq[];
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * QT;
  const int nq = static_cast<int>(B - q0 < QT ? B - q0 : QT);
  if (SMEM) {
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(QT) * W; i += kThreads) {
      const int64_t qi = i / W;
      sq[i] = qi < nq ? q[(q0 + qi) * W + (i - qi * W)] : 0ull;
    }
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int my_q = (lane / (32 / QT)) % QT;  // the query whose total this lane ends up with
  const bool writer = (lane % (32 / QT)) == 0 && my_q < nq;
  u64 best = 0;  // key 0 = nothing seen (count 0 at row 2^32-1, never a real row)

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < N; row += stride) {
    const u64* brow = bank + row * W;
    unsigned acc[QT];
#pragma unroll
    for (int k = 0; k < QT; ++k) acc[k] = 0;
#pragma unroll 4
    for (int64_t w = lane; w < W; w += 32) {
      const u64 b = __ldg(brow + w);
#pragma unroll
      for (int k = 0; k < QT; ++k) {
        const u64 qv = SMEM ? sq[k * W + w] : (k < nq ? __ldg(q + (q0 + k) * W + w) : 0ull);
        acc[k] += static_cast<unsigned>(__popcll(b & qv));
      }
    }
    const unsigned total = transpose_reduce<QT>(acc, lane);
    if (BEST) {
      const u64 key = (static_cast<u64>(total) << 32) | static_cast<u64>(0xffffffffu - static_cast<unsigned>(row));
      best = key > best ? key : best;
    } else if (writer) {
      out[(q0 + my_q) * N + row] = static_cast<int>(total);
    }
  }
  if (BEST && writer && best != 0) atomicMax(keys + q0 + my_q, best);
}

// One warp per query: popcount of the query, then decode the (count, row) key in place.
__global__ void finalize_kernel(const u64* __restrict__ q, int64_t B, int64_t W, float threshold,
                                float* __restrict__ scores, int64_t* __restrict__ index) {
  const int lane = threadIdx.x & 31;
  const int64_t qi = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (qi >= B) return;
  unsigned s = 0;
  for (int64_t w = lane; w < W; w += 32) s += static_cast<unsigned>(__popcll(q[qi * W + w]));
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) {
    const u64 key = reinterpret_cast<const u64*>(index)[qi];
    const unsigned count = static_cast<unsigned>(key >> 32);
    const int64_t row = static_cast<int64_t>(0xffffffffu - static_cast<unsigned>(key & 0xffffffffull));
    const float score = static_cast<float>(count) / static_cast<float>(s > 0 ? s : 1u);  // IEEE division
    scores[qi] = score;
    index[qi] = score >= threshold ? row : -1;
  }
}

__global__ void popcount_kernel(const u64* __restrict__ m, int* __restrict__ out, int64_t N, int64_t W) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < N; r += stride) {
    unsigned s = 0;
    for (int64_t w = lane; w < W; w += 32) s += static_cast<unsigned>(__popcll(__ldg(m + r * W + w)));
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) out[r] = static_cast<int>(s);
  }
}

int64_t grid_rows(int64_t N) {
  int dev = 0, sms = 108;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t want = (N + kWarps - 1) / kWarps;
  const int64_t cap = static_cast<int64_t>(sms) * 8;  // 8 blocks of 256 threads fill an SM
  return want < cap ? (want > 0 ? want : 1) : cap;
}

template <bool BEST>
int launch_scan(const int64_t* q, const int64_t* bank, int64_t B, int64_t N, int64_t W, int* out, u64* keys,
                cudaStream_t stream) {
  int qt = 1;
  while (qt < kMaxQueryTile && qt < B) qt <<= 1;
  while (qt > 1 && qt * W * 8 > kSharedLimit) qt >>= 1;
  const bool smem = qt * W * 8 <= kSharedLimit;
  const int64_t tiles = (B + qt - 1) / qt;
  if (tiles > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(grid_rows(N)), static_cast<unsigned>(tiles));
  const size_t shmem = smem ? static_cast<size_t>(qt * W * 8) : 0;
  const u64* qp = reinterpret_cast<const u64*>(q);
  const u64* bp = reinterpret_cast<const u64*>(bank);
#define MEMOIR_LAUNCH(QT) scan_kernel<QT, true, BEST><<<grid, kThreads, shmem, stream>>>(qp, bp, B, N, W, out, keys)
  if (!smem) {  // only when even one query row exceeds shared memory (W > 6144): qt == 1
    scan_kernel<1, false, BEST><<<grid, kThreads, 0, stream>>>(qp, bp, B, N, W, out, keys);
  } else {
    switch (qt) {
      case 16: MEMOIR_LAUNCH(16); break;
      case 8: MEMOIR_LAUNCH(8); break;
      case 4: MEMOIR_LAUNCH(4); break;
      case 2: MEMOIR_LAUNCH(2); break;
      default: MEMOIR_LAUNCH(1); break;
    }
  }
#undef MEMOIR_LAUNCH
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int memoir_cuda_overlap_counts(const int64_t* q, const int64_t* bank, int32_t* out, int64_t B, int64_t N,
                                          int64_t W, void* stream) {
  if (B == 0 || N == 0) return 0;
  return launch_scan<false>(q, bank, B, N, W, reinterpret_cast<int*>(out), nullptr,
                            static_cast<cudaStream_t>(stream));
}

extern "C" int memoir_cuda_best_match(const int64_t* q, const int64_t* bank, float* scores, int64_t* index,
                                      int64_t B, int64_t N, int64_t W, float threshold, void* stream) {
  if (B == 0) return 0;
  if (N <= 0 || N >= 0xffffffffll) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaMemsetAsync(index, 0, static_cast<size_t>(B) * sizeof(int64_t), s);
  if (err != cudaSuccess) return static_cast<int>(err);
  int rc = launch_scan<true>(q, bank, B, N, W, nullptr, reinterpret_cast<u64*>(index), s);
  if (rc != 0) return rc;
  const unsigned blocks = static_cast<unsigned>((B + kWarps - 1) / kWarps);
  finalize_kernel<<<blocks, kThreads, 0, s>>>(reinterpret_cast<const u64*>(q), B, W, threshold, scores, index);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int memoir_cuda_popcounts(const int64_t* masks, int32_t* out, int64_t N, int64_t W, void* stream) {
  if (N == 0) return 0;
  popcount_kernel<<<static_cast<unsigned>(grid_rows(N)), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const u64*>(masks), reinterpret_cast<int*>(out), N, W);
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* memoir_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
