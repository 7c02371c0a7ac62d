// Micro kernels: AND + 64-bit popcount over a (queries x bank rows) tile in one pass over the
// words, so every loaded bank word is reused for several queries while it is in a register.
//
// Three builds of the same computation, chosen once at run time:
//   avx512_vpopcntdq  8 words per instruction (VPOPCNTQ), 4x4 tile of zmm accumulators;
//   popcnt            scalar POPCNT (x86-64-v2), 2x4 tile of GPR accumulators;
//   generic           the same C++ without target flags (libgcc popcount), any CPU.
// Only code compiled with a target attribute uses the wider instructions, and it is only
// called after __builtin_cpu_supports says the CPU (and OS, for zmm state) has them.
#include "popcount_cpu.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEMOIR_X86 1
#include <immintrin.h>
#else
#define MEMOIR_X86 0
#endif

#define MEMOIR_INLINE inline __attribute__((always_inline))

namespace memoir {
namespace cpu {
namespace {

// ----------------------------------------------------------------------------- scalar
template <int QB, int RB>
MEMOIR_INLINE void micro_scalar_tile(const uint64_t* q, const uint64_t* b, int64_t W, int64_t* acc) {
  uint64_t a[QB][RB];
  for (int i = 0; i < QB; ++i)
    for (int j = 0; j < RB; ++j) a[i][j] = 0;
  for (int64_t w = 0; w < W; ++w) {
    uint64_t qv[QB], bv[RB];
    for (int i = 0; i < QB; ++i) qv[i] = q[i * W + w];
    for (int j = 0; j < RB; ++j) bv[j] = b[j * W + w];
    for (int i = 0; i < QB; ++i)
      for (int j = 0; j < RB; ++j) a[i][j] += static_cast<uint64_t>(__builtin_popcountll(qv[i] & bv[j]));
  }
  for (int i = 0; i < QB; ++i)
    for (int j = 0; j < RB; ++j) acc[i * kMaxTile + j] = static_cast<int64_t>(a[i][j]);
}

template <int QB>
MEMOIR_INLINE void micro_scalar_rows(const uint64_t* q, const uint64_t* b, int rb, int64_t W, int64_t* acc) {
  switch (rb) {
    case 4: micro_scalar_tile<QB, 4>(q, b, W, acc); break;
    case 3: micro_scalar_tile<QB, 3>(q, b, W, acc); break;
    case 2: micro_scalar_tile<QB, 2>(q, b, W, acc); break;
    default: micro_scalar_tile<QB, 1>(q, b, W, acc); break;
  }
}

// One query against one row, words unrolled by 4 with independent accumulators.  With a
// single query the scan is memory-bound, and walking the bank as one sequential stream is
// measurably faster here (~35% at W=224) than interleaving 4 row streams.
MEMOIR_INLINE void micro_scalar_single(const uint64_t* q, const uint64_t* b, int64_t W, int64_t* acc) {
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t w = 0;
  for (; w + 4 <= W; w += 4) {
    a0 += static_cast<uint64_t>(__builtin_popcountll(q[w] & b[w]));
    a1 += static_cast<uint64_t>(__builtin_popcountll(q[w + 1] & b[w + 1]));
    a2 += static_cast<uint64_t>(__builtin_popcountll(q[w + 2] & b[w + 2]));
    a3 += static_cast<uint64_t>(__builtin_popcountll(q[w + 3] & b[w + 3]));
  }
  for (; w < W; ++w) a0 += static_cast<uint64_t>(__builtin_popcountll(q[w] & b[w]));
  acc[0] = static_cast<int64_t>(a0 + a1 + a2 + a3);
}

MEMOIR_INLINE void micro_scalar_body(const uint64_t* q, int qb, const uint64_t* b, int rb, int64_t W, int64_t* acc) {
  if (qb == 1 && rb == 1) {
    micro_scalar_single(q, b, W, acc);
  } else if (qb >= 2) {
    micro_scalar_rows<2>(q, b, rb, W, acc);
  } else {
    micro_scalar_rows<1>(q, b, rb, W, acc);
  }
}

void micro_generic(const uint64_t* q, int qb, const uint64_t* b, int rb, int64_t W, int64_t* acc) {
  micro_scalar_body(q, qb, b, rb, W, acc);
}

#if MEMOIR_X86
__attribute__((target("popcnt"))) void micro_popcnt(const uint64_t* q, int qb, const uint64_t* b, int rb,
                                                     int64_t W, int64_t* acc) {
  micro_scalar_body(q, qb, b, rb, W, acc);
}

// ----------------------------------------------------------------------------- AVX-512
#define MEMOIR_AVX512 __attribute__((target("avx512f,avx512vpopcntdq"), always_inline)) inline

template <int QB, int RB>
MEMOIR_AVX512 void micro_avx512_tile(const uint64_t* q, const uint64_t* b, int64_t W, int64_t* acc) {
  __m512i a[QB][RB];
  for (int i = 0; i < QB; ++i)
    for (int j = 0; j < RB; ++j) a[i][j] = _mm512_setzero_si512();
  int64_t w = 0;
  for (; w + 8 <= W; w += 8) {
    __m512i qv[QB], bv[RB];
    for (int i = 0; i < QB; ++i) qv[i] = _mm512_loadu_si512(static_cast<const void*>(q + i * W + w));
    for (int j = 0; j < RB; ++j) bv[j] = _mm512_loadu_si512(static_cast<const void*>(b + j * W + w));
    for (int i = 0; i < QB; ++i)
      for (int j = 0; j < RB; ++j)
        a[i][j] = _mm512_add_epi64(a[i][j], _mm512_popcnt_epi64(_mm512_and_si512(qv[i], bv[j])));
  }
  if (w < W) {  // tail: masked loads read only the W % 8 remaining words (zero elsewhere)
    const __mmask8 m = static_cast<__mmask8>((1u << (W - w)) - 1u);
    __m512i qv[QB], bv[RB];
    for (int i = 0; i < QB; ++i) qv[i] = _mm512_maskz_loadu_epi64(m, static_cast<const void*>(q + i * W + w));
    for (int j = 0; j < RB; ++j) bv[j] = _mm512_maskz_loadu_epi64(m, static_cast<const void*>(b + j * W + w));
    for (int i = 0; i < QB; ++i)
      for (int j = 0; j < RB; ++j)
        a[i][j] = _mm512_add_epi64(a[i][j], _mm512_popcnt_epi64(_mm512_and_si512(qv[i], bv[j])));
  }
  for (int i = 0; i < QB; ++i)
    for (int j = 0; j < RB; ++j) acc[i * kMaxTile + j] = _mm512_reduce_add_epi64(a[i][j]);
}

template <int QB>
MEMOIR_AVX512 void micro_avx512_rows(const uint64_t* q, const uint64_t* b, int rb, int64_t W, int64_t* acc) {
  switch (rb) {
    case 4: micro_avx512_tile<QB, 4>(q, b, W, acc); break;
    case 3: micro_avx512_tile<QB, 3>(q, b, W, acc); break;
    case 2: micro_avx512_tile<QB, 2>(q, b, W, acc); break;
    default: micro_avx512_tile<QB, 1>(q, b, W, acc); break;
  }
}

__attribute__((target("avx512f,avx512vpopcntdq"))) void micro_avx512(const uint64_t* q, int qb, const uint64_t* b,
                                                                      int rb, int64_t W, int64_t* acc) {
  switch (qb) {
    case 4: micro_avx512_rows<4>(q, b, rb, W, acc); break;
    case 3: micro_avx512_rows<3>(q, b, rb, W, acc); break;
    case 2: micro_avx512_rows<2>(q, b, rb, W, acc); break;
    default: micro_avx512_rows<1>(q, b, rb, W, acc); break;
  }
}
#endif  // MEMOIR_X86

int isa_cap() {
  // 0 generic, 1 popcnt, 2 avx512
  const char* env = std::getenv("MEMOIR_CPU_ISA");
  if (env == nullptr || *env == '\0') return 2;
  if (std::strcmp(env, "generic") == 0) return 0;
  if (std::strcmp(env, "popcnt") == 0) return 1;
  return 2;
}

Kernel detect() {
  const int cap = isa_cap();
#if MEMOIR_X86
  __builtin_cpu_init();
  if (cap >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq")) {
    return Kernel{"avx512_vpopcntdq", 4, 4, 4, &micro_avx512};
  }
  if (cap >= 1 && __builtin_cpu_supports("popcnt")) {
    return Kernel{"popcnt", 2, 4, 1, &micro_popcnt};
  }
#else
  (void)cap;
#endif
  return Kernel{"generic", 2, 4, 1, &micro_generic};
}

}  // namespace

const Kernel& active_kernel() {
  static const Kernel k = detect();
  return k;
}

int64_t popcount_row(const uint64_t* row, int64_t W) {
  int64_t s = 0;
  for (int64_t w = 0; w < W; ++w) s += __builtin_popcountll(row[w]);
  return s;
}

}  // namespace cpu
}  // namespace memoir
