// The int8 GEMM split between torch's threads; each piece runs one kernel's sweep.
//
// The work is split into tasks, (a chunk of rows of A) x (a block of rows of B sized to
// stay in L2), numbered so that consecutive tasks share rows of A: torch's thread pool
// hands each thread a contiguous range of tasks, and every thread then gets a similar mix
// of (possibly uneven) blocks. With few rows of A (decode) each row of B is used by few
// rows of A: the weight streams from memory once, so it is split evenly between the
// threads instead.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/Parallel.h>

#include "kernels.h"

namespace int8fx {
namespace {

constexpr int64_t kL2BlockBytes = 256 * 1024;  // half of a 512 KiB L2: room for rows of A
constexpr int64_t kMinStreamBytes = 64 * 1024;  // few rows of A: the least weight worth a thread
constexpr int64_t kStreamingRows = 16;  // below this many rows of A, the weight is streamed once
constexpr int64_t kRowsPerTask = 64;  // rows of A per task (a multiple of every tile's rows)

using Sweep = void (*)(const GemmProblem&, int64_t, int64_t, int64_t, int64_t, const GemmOutput&);

// Blocks of B rows are a multiple of the kernel's tile width, so that only the last one
// has a ragged edge.
int64_t tile_columns(Kernel kernel, int64_t M) {
  switch (kernel) {
    case Kernel::kAmx: return 16;
    case Kernel::kAvx512Vnni: return M == 1 ? 8 : 4;
    case Kernel::kAvx512VnniPanels: return kPanelColumns;
    case Kernel::kAvx2: break;
  }
  return M == 1 ? 8 : 6;
}

Sweep sweep_of(Kernel kernel) {
  switch (kernel) {
    case Kernel::kAvx512Vnni:
    case Kernel::kAvx512VnniPanels: return sweep_avx512_vnni;  // (panels: gemm_by_panels instead)
    case Kernel::kAmx: return sweep_amx;
    case Kernel::kAvx2: break;
  }
  return sweep_avx2;
}

// The panel kernel (gemm_avx512.cpp): tasks are (a panel of 64 rows of B) x (a chunk of
// rows of A), numbered panel first, so that a thread's consecutive tasks share a panel and
// it packs each panel it meets once, into a buffer of its own.
void gemm_by_panels(const GemmProblem& p, const GemmOutput& out) {
  constexpr int64_t kRowsPerPanelTask = 48;  // a multiple of the 6-row tile
  const int64_t panels = ceil_div(p.N, kPanelColumns), m_chunks = ceil_div(p.M, kRowsPerPanelTask);
  at::parallel_for(0, panels * m_chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<uint8_t> storage(panel_bytes(p.K) + 63);
    uint8_t* panel = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
    int64_t packed = -1;
    for (int64_t task = first; task < last; ++task) {
      const int64_t n0 = task / m_chunks * kPanelColumns, m0 = task % m_chunks * kRowsPerPanelTask;
      if (n0 != packed) pack_panel_avx512_vnni(p.B, p.N, p.K, n0, panel);
      packed = n0;
      sweep_panel_avx512_vnni(p, panel, m0, std::min(p.M, m0 + kRowsPerPanelTask), n0, out);
    }
  });
}

}  // namespace

void int8_gemm(Kernel kernel, const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, const GemmOutput& out) {
  if (M == 0 || N == 0) return;
  // vpdpbusd multiplies an offset copy of B and takes 128 * (row sum of A) back off
  // (gemm_avx512.cpp); AMX reads A packed into tiles (gemm_amx.cpp). Both are prepared
  // once here, not once per tile.
  std::unique_ptr<int32_t[]> a_row_sums;
  std::unique_ptr<int8_t[]> a_packed;
  if (kernel == Kernel::kAvx512Vnni || kernel == Kernel::kAvx512VnniPanels) {
    a_row_sums.reset(new int32_t[M]);
    row_sums_avx512_vnni(A, M, K, a_row_sums.get());
  } else if (kernel == Kernel::kAmx) {
    a_packed.reset(new int8_t[amx_packed_bytes(M, K)]);
    pack_activation_amx(A, M, K, a_packed.get());
  }
  const GemmProblem problem{A, B, M, N, K, a_row_sums.get(), a_packed.get()};
  if (kernel == Kernel::kAvx512VnniPanels) {
    gemm_by_panels(problem, out);
    return;
  }
  const Sweep sweep = sweep_of(kernel);
  const int64_t threads = at::get_num_threads();
  int64_t n_blocks, m_chunk;
  if (M < kStreamingRows) {
    n_blocks = std::max<int64_t>(1, std::min(threads, N * K / kMinStreamBytes));
    m_chunk = M;
  } else {
    n_blocks = std::max<int64_t>(1, ceil_div(N * K, kL2BlockBytes));
    m_chunk = kRowsPerTask;
  }
  const int64_t n_block = ceil_div(ceil_div(N, n_blocks), tile_columns(kernel, M)) * tile_columns(kernel, M);
  n_blocks = ceil_div(N, n_block);
  const int64_t m_chunks = std::max<int64_t>(1, ceil_div(M, m_chunk));
  at::parallel_for(0, m_chunks * n_blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t m0 = task / n_blocks * m_chunk, n0 = task % n_blocks * n_block;
      sweep(problem, m0, std::min(M, m0 + m_chunk), n0, std::min(N, n0 + n_block), out);
    }
  });
}

}  // namespace int8fx
