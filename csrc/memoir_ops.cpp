// memoir._C: op schemas (namespace `memoir`), CPU kernels, and the Python module stub.
//
// Loading the shared library (`import memoir._C`) runs the static TORCH_LIBRARY
// registrations below; the CUDA kernels register themselves in cuda_binding.cpp when the
// extension was built with CUDA.  Fake (meta) kernels for torch.compile live in
// memoir/ops.py (torch.library.register_fake).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "popcount_cpu.h"

namespace memoir {
namespace {

using cpu::kMaxTile;
using cpu::Kernel;

// Visit every (query, bank row) pair of rows [r0, r1): the bank is walked once, in tiles of
// k.rb rows that stay in L1 while every query tile (k.qb queries) is run against them (a
// single query walks the rows as one sequential stream, k.rb_single rows per tile).
template <class Sink>
void scan_rows(const Kernel& k, const uint64_t* q, int64_t B, const uint64_t* bank, int64_t r0, int64_t r1,
               int64_t W, Sink&& sink) {
  int64_t acc[kMaxTile * kMaxTile];
  const int tile_rows = B == 1 ? k.rb_single : k.rb;
  for (int64_t r = r0; r < r1; r += tile_rows) {
    const int rb = static_cast<int>(std::min<int64_t>(tile_rows, r1 - r));
    const uint64_t* b = bank + r * W;
    for (int64_t i = 0; i < B; i += k.qb) {
      const int qb = static_cast<int>(std::min<int64_t>(k.qb, B - i));
      k.micro(q + i * W, qb, b, rb, W, acc);
      sink(i, qb, r, rb, acc);
    }
  }
}

// Enough (query x word) work per task that threading pays off (~32K AND+popcounts).
constexpr int64_t kMinWorkPerTask = 1 << 15;

const uint64_t* words(const at::Tensor& t) { return reinterpret_cast<const uint64_t*>(t.const_data_ptr<int64_t>()); }

at::Tensor overlap_counts_cpu(const at::Tensor& queries, const at::Tensor& bank) {
  check_pair(queries, bank);
  const at::Tensor q = queries.contiguous();
  const at::Tensor m = bank.contiguous();
  const int64_t B = q.size(0), N = m.size(0), W = q.size(1);
  at::Tensor out = at::empty({B, N}, q.options().dtype(at::kInt));
  if (B == 0 || N == 0) return out;
  const Kernel& k = cpu::active_kernel();
  const uint64_t* qp = words(q);
  const uint64_t* mp = words(m);
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(k.rb, kMinWorkPerTask / std::max<int64_t>(1, B * W));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    scan_rows(k, qp, B, mp, r0, r1, W, [&](int64_t i0, int qb, int64_t r, int rb, const int64_t* acc) {
      for (int i = 0; i < qb; ++i)
        for (int j = 0; j < rb; ++j) op[(i0 + i) * N + r + j] = static_cast<int32_t>(acc[i * kMaxTile + j]);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> best_match_cpu(const at::Tensor& queries, const at::Tensor& bank,
                                                  double threshold) {
  check_pair(queries, bank);
  const at::Tensor q = queries.contiguous();
  const at::Tensor m = bank.contiguous();
  const int64_t B = q.size(0), N = m.size(0), W = q.size(1);
  at::Tensor scores = at::zeros({B}, q.options().dtype(at::kFloat));
  at::Tensor index = at::full({B}, -1, q.options().dtype(at::kLong));
  if (B == 0 || N == 0) return {scores, index};

  const Kernel& k = cpu::active_kernel();
  const uint64_t* qp = words(q);
  const uint64_t* mp = words(m);

  // One contiguous bank chunk per thread (each streams its part of the bank once); per-chunk
  // winners are merged in chunk order, so ties resolve to the lowest index.
  const int64_t work = N * B * std::max<int64_t>(W, 1);
  int64_t chunks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, work / kMinWorkPerTask));
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, (N + k.rb - 1) / k.rb));
  int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  rows_per_chunk = (rows_per_chunk + k.rb - 1) / k.rb * k.rb;
  chunks = (N + rows_per_chunk - 1) / rows_per_chunk;

  std::vector<int64_t> best_count(chunks * B, -1), best_row(chunks * B, -1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * rows_per_chunk, r1 = std::min(N, r0 + rows_per_chunk);
      int64_t* bc = best_count.data() + c * B;
      int64_t* br = best_row.data() + c * B;
      scan_rows(k, qp, B, mp, r0, r1, W, [&](int64_t i0, int qb, int64_t r, int rb, const int64_t* acc) {
        for (int i = 0; i < qb; ++i)
          for (int j = 0; j < rb; ++j) {  // rows ascending + strict '>' keeps the lowest index
            const int64_t v = acc[i * kMaxTile + j];
            if (v > bc[i0 + i]) {
              bc[i0 + i] = v;
              br[i0 + i] = r + j;
            }
          }
      });
    }
  });

  float* sp = scores.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  const float thr = static_cast<float>(threshold);  // torch compares float32 scores in float32
  for (int64_t i = 0; i < B; ++i) {
    int64_t bc = -1, br = -1;
    for (int64_t c = 0; c < chunks; ++c) {
      if (best_count[c * B + i] > bc) {
        bc = best_count[c * B + i];
        br = best_row[c * B + i];
      }
    }
    const int64_t qpop = std::max<int64_t>(1, cpu::popcount_row(qp + i * W, W));
    const float s = static_cast<float>(bc) / static_cast<float>(qpop);
    sp[i] = s;
    ip[i] = s >= thr ? br : -1;
  }
  return {scores, index};
}

at::Tensor popcounts_cpu(const at::Tensor& masks) {
  check_masks(masks, "masks");
  const at::Tensor m = masks.contiguous();
  const int64_t N = m.size(0), W = m.size(1);
  at::Tensor out = at::empty({N}, m.options().dtype(at::kInt));
  if (N == 0) return out;
  const uint64_t* mp = words(m);
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, W));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = static_cast<int32_t>(cpu::popcount_row(mp + r * W, W));
  });
  return out;
}

}  // namespace
}  // namespace memoir

TORCH_LIBRARY(memoir, m) {
  m.def("overlap_counts(Tensor queries, Tensor bank) -> Tensor");
  m.def("best_match(Tensor queries, Tensor bank, float threshold) -> (Tensor, Tensor)");
  m.def("popcounts(Tensor masks) -> Tensor");
}

TORCH_LIBRARY_IMPL(memoir, CPU, m) {
  m.impl("overlap_counts", &memoir::overlap_counts_cpu);
  m.impl("best_match", &memoir::best_match_cpu);
  m.impl("popcounts", &memoir::popcounts_cpu);
}

// ----------------------------------------------------------------------------- Python module
namespace {

PyObject* py_has_cpu(PyObject*, PyObject*) { Py_RETURN_TRUE; }

PyObject* py_has_cuda(PyObject*, PyObject*) {
#ifdef MEMOIR_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(memoir::cpu::active_kernel().name); }

PyMethodDef kMethods[] = {
    {"has_cpu", py_has_cpu, METH_NOARGS, "True: the C++ CPU kernels are built in."},
    {"has_cuda", py_has_cuda, METH_NOARGS, "True when the CUDA kernels were compiled into this build."},
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The CPU popcount kernel in use: avx512_vpopcntdq, popcnt or generic."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "memoir native retrieval kernels (torch.ops.memoir.*)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
