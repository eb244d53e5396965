// The int8 GEMM split between torch's threads; each piece runs one kernel's sweep.
//
// The work is split into tasks, (a chunk of rows of A) x (a block of rows of B sized to
// stay in L2), numbered so that consecutive tasks share rows of A: torch's thread pool
// hands each thread a contiguous range of tasks, and every thread then gets a similar mix
// of (possibly uneven) blocks. With few rows of A (decode) each row of B is used by few
// rows of A: the weight streams from memory once, so it is split evenly between the
// threads instead.
//
// Sibling linears (q/k/v, gate/up) share their A: one call runs all their products as one
// task list, so A is prepared once, and the threads meet once for all of them instead of
// once per product (at decode a small product costs little more than that meeting).

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
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

// The products' rows of B laid end to end (one product: B itself). A block of these
// stacked rows may span several products: each piece of it runs against its own B and
// output. Blocks never straddle a product where each is blocked on its own (L2 blocks,
// panels); at decode they do, so that every thread streams an even share of all the weights.
class StackedProducts {
 public:
  StackedProducts(const GemmProblem& shared, const std::vector<GemmSegment>& segments) : shared_(shared), segments_(segments) {
    starts_.push_back(0);
    for (const GemmSegment& s : segments) starts_.push_back(starts_.back() + s.N);
  }
  int64_t rows() const { return starts_.back(); }
  size_t count() const { return segments_.size(); }
  int64_t start(size_t s) const { return starts_[s]; }
  int64_t rows_of(size_t s) const { return segments_[s].N; }

  // fn(problem of a product, n0, n1 within it, its output) for each product's part of [v0, v1).
  template <class Fn>
  void for_each_piece(int64_t v0, int64_t v1, Fn fn) const {
    for (size_t s = 0; s < segments_.size(); ++s) {
      const int64_t n0 = std::max(v0, starts_[s]) - starts_[s], n1 = std::min(v1, starts_[s + 1]) - starts_[s];
      if (n0 < n1) fn(problem(s), n0, n1, *segments_[s].out);
    }
  }
  // The product holding stacked row v, and its problem.
  size_t product_of(int64_t v) const { return size_t(std::upper_bound(starts_.begin(), starts_.end(), v) - starts_.begin() - 1); }
  GemmProblem problem(size_t s) const {
    GemmProblem p = shared_;
    p.B = segments_[s].B;
    p.N = segments_[s].N;
    return p;
  }
  const GemmOutput& output(size_t s) const { return *segments_[s].out; }

 private:
  GemmProblem shared_;
  const std::vector<GemmSegment>& segments_;
  std::vector<int64_t> starts_;  // stacked row where each product starts, then the total
};

using Block = std::pair<int64_t, int64_t>;  // stacked rows [first, last)

// Each product [N, K] cut into blocks of about `block_bytes` of B, rows a multiple of
// `align` (only its last block is ragged), none straddling two products.
std::vector<Block> blocks_within_products(const StackedProducts& stacked, int64_t K, int64_t block_bytes, int64_t align) {
  std::vector<Block> blocks;
  for (size_t s = 0; s < stacked.count(); ++s) {
    const int64_t N = stacked.rows_of(s), start = stacked.start(s);
    const int64_t count = std::max<int64_t>(1, ceil_div(N * K, block_bytes));
    const int64_t block = ceil_div(ceil_div(N, count), align) * align;
    for (int64_t n0 = 0; n0 < N; n0 += block) blocks.emplace_back(start + n0, start + std::min(N, n0 + block));
  }
  return blocks;
}

// The panel kernel (gemm_avx512.cpp): tasks are (a panel of 64 rows of B) x (a chunk of
// rows of A), numbered panel first, so that a thread's consecutive tasks share a panel and
// it packs each panel it meets once, into a buffer of its own.
void gemm_by_panels(const StackedProducts& stacked, int64_t M, int64_t K) {
  constexpr int64_t kRowsPerPanelTask = 48;  // a multiple of the 6-row tile
  const std::vector<Block> panels = blocks_within_products(stacked, K, kPanelColumns * K, kPanelColumns);
  const int64_t m_chunks = ceil_div(M, kRowsPerPanelTask);
  at::parallel_for(0, int64_t(panels.size()) * m_chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<uint8_t> storage(panel_bytes(K) + 63);
    uint8_t* panel = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
    int64_t packed = -1;
    for (int64_t task = first; task < last; ++task) {
      const int64_t index = task / m_chunks, m0 = task % m_chunks * kRowsPerPanelTask;
      const size_t s = stacked.product_of(panels[index].first);
      const GemmProblem p = stacked.problem(s);
      const int64_t n0 = panels[index].first - stacked.start(s);
      if (index != packed) pack_panel_avx512_vnni(p.B, p.N, K, n0, panel);
      packed = index;
      sweep_panel_avx512_vnni(p, panel, m0, std::min(M, m0 + kRowsPerPanelTask), n0, stacked.output(s));
    }
  });
}

// The blocks of the other kernels' tasks: with few rows of A, the stacked weights split
// evenly between the threads; else L2-sized blocks of each product.
std::vector<Block> sweep_blocks(const StackedProducts& stacked, Kernel kernel, int64_t M, int64_t K) {
  const int64_t align = tile_columns(kernel, M);
  if (M >= kStreamingRows) return blocks_within_products(stacked, K, kL2BlockBytes, align);
  const int64_t total = stacked.rows();
  const int64_t count = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total * K / kMinStreamBytes));
  const int64_t block = ceil_div(ceil_div(total, count), align) * align;
  std::vector<Block> blocks;
  for (int64_t v0 = 0; v0 < total; v0 += block) blocks.emplace_back(v0, std::min(total, v0 + block));
  return blocks;
}

// The AMX kernel's rows of A per task. A thread keeps its task's packed rows in L2 while it
// goes through every block of B, so each task streams the whole weight from L3 or memory
// once: more rows per task, fewer passes over the weight (Intel Xeon, 2 threads, bf16 input
// at threshold 6, 64 rows -> this rule: 4096 x 4096 at M = 128 / 512 996 -> 917 / 4470 -> 4034
// us, 4096 x 11008 at M = 512 10.3 -> 8.9 ms; SmolLM2's shapes within 6%, K = 11008 unchanged).
// Bounded by a quarter of a 2 MiB L2 (every AMX CPU's) for the packed rows, and by enough
// tasks to share between the threads.
constexpr int64_t kAmxTaskRowBytes = 512 * 1024;
int64_t amx_rows_per_task(int64_t M, int64_t K, int64_t n_blocks) {
  int64_t rows = std::clamp<int64_t>(kAmxTaskRowBytes / std::max<int64_t>(K, 1) / 32 * 32, kRowsPerTask, 256);
  while (rows > kRowsPerTask && ceil_div(M, rows) * n_blocks < 2 * at::get_num_threads()) rows /= 2;
  return std::max(rows, kRowsPerTask);
}

}  // namespace

void int8_gemm(Kernel kernel, const int8_t* A, int64_t M, int64_t K, const std::vector<GemmSegment>& products) {
  int64_t total = 0;
  for (const GemmSegment& product : products) total += product.N;
  if (M == 0 || total == 0) return;
  // vpdpbusd multiplies an offset copy of B and takes 128 * (row sum of A) back off
  // (gemm_avx512.cpp); AMX reads A packed into tiles (gemm_amx.cpp). Both are prepared
  // once here, for every product, not once per tile.
  std::unique_ptr<int32_t[]> a_row_sums;
  std::unique_ptr<int8_t[]> a_packed;
  if (kernel == Kernel::kAvx512Vnni || kernel == Kernel::kAvx512VnniPanels) {
    a_row_sums.reset(new int32_t[M]);
    row_sums_avx512_vnni(A, M, K, a_row_sums.get());
  } else if (kernel == Kernel::kAmx) {
    a_packed.reset(new int8_t[amx_packed_bytes(M, K)]);
    const int64_t group_bytes = 16 * K, grain = std::max<int64_t>(1, kMinStreamBytes / group_bytes);
    at::parallel_for(0, amx_row_groups(M), grain, [&](int64_t first, int64_t last) {
      pack_activation_amx(A, M, K, first, last, a_packed.get());
    });
  }
  const StackedProducts stacked(GemmProblem{A, nullptr, M, 0, K, a_row_sums.get(), a_packed.get()}, products);
  if (kernel == Kernel::kAvx512VnniPanels) {
    gemm_by_panels(stacked, M, K);
    return;
  }
  const Sweep sweep = sweep_of(kernel);
  const std::vector<Block> blocks = sweep_blocks(stacked, kernel, M, K);
  const int64_t n_blocks = int64_t(blocks.size());
  const int64_t m_chunk = M < kStreamingRows ? M : kernel == Kernel::kAmx ? amx_rows_per_task(M, K, n_blocks) : kRowsPerTask;
  const int64_t m_chunks = ceil_div(M, m_chunk);
  at::parallel_for(0, m_chunks * n_blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t m0 = task / n_blocks * m_chunk, m1 = std::min(M, m0 + m_chunk);
      const Block& block = blocks[task % n_blocks];
      stacked.for_each_piece(block.first, block.second, [&](const GemmProblem& p, int64_t n0, int64_t n1, const GemmOutput& out) {
        sweep(p, m0, m1, n0, n1, out);
      });
    }
  });
}

void int8_gemm(Kernel kernel, const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, const GemmOutput& out) {
  int8_gemm(kernel, A, M, K, {GemmSegment{B, N, &out}});
}

}  // namespace int8fx
