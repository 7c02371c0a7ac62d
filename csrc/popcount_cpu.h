// CPU popcount kernels for packed-bit mask retrieval (see memoir/ops.py for the layout).
#pragma once

#include <cstdint>

namespace memoir {
namespace cpu {

// Counts for a micro tile: acc[i * kMaxTile + j] = sum_w popcount(q[i][w] & b[j][w])
// for i < qb queries (rows of q, stride W) and j < rb bank rows (rows of b, stride W).
using MicroFn = void (*)(const uint64_t* q, int qb, const uint64_t* b, int rb, int64_t W, int64_t* acc);

constexpr int kMaxTile = 4;

struct Kernel {
  const char* name;  // "avx512_vpopcntdq", "popcnt" or "generic"
  int qb;            // queries per micro tile (<= kMaxTile)
  int rb;            // bank rows per micro tile (<= kMaxTile)
  int rb_single;     // bank rows per micro tile when there is a single query
  MicroFn micro;
};

// The best kernel for this CPU, detected once at run time.  The environment variable
// MEMOIR_CPU_ISA=generic|popcnt|avx512 caps the choice (for testing / comparison).
const Kernel& active_kernel();

// Popcount of one packed mask.
int64_t popcount_row(const uint64_t* row, int64_t W);

}  // namespace cpu
}  // namespace memoir
