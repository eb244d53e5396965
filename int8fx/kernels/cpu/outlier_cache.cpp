// The weight columns the outlier part reads, kept contiguous from call to call.
//
// The outlier part reads W[:, c] for each outlier column c (the fp weight's, or CB's to
// dequantize): one element per row of W, rows K elements apart, so one cache line (and
// often one page) per row and column. Out of cache each is a DRAM round trip: on 4096 x
// 4096 fp32 at M = 1 (AMD EPYC Zen 5, 2 threads, caches evicted before each call) four
// columns cost 0.14 ms on top of a 0.52 ms linear. Real activations put their outliers in
// the same few columns token after token, so the columns read once are kept here,
// contiguous, and copied from here after.
//
// Columns are kept per source tensor (the fp weight, or CB) and checked against it on
// every call: the same storage (held weakly: a freed tensor's entry is dropped, and its
// address is not reused while the entry exists), offset, shape, strides and dtype, and the
// same version counter, which every in-place update bumps (W.mul_(2), an optimizer step).
// They are also tied to the call's CB, its storage and version: the backend requantizes CB
// in place whenever it sees the weight change, also where the weight's own counter does not
// move (a DTensor's local shard: the update bumps the DTensor's counter, int8fx/weights.py).
// A change the backend does not see either (through W.data) is not seen here. CB's columns
// are kept unscaled and scaled by the SCB of each call. Inference tensors have no version
// counter: theirs are never kept.
// Each source keeps at most max(4, K / 256) columns (as fp32: at most 1/64 of the int8
// weight's bytes, plus 4 columns); the ones past that are read on every call, as without
// this cache.

#include "outlier_cache.h"

#include <ATen/Parallel.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace int8fx {
namespace {

constexpr int64_t kMinColumnsPerWeight = 4;
constexpr int64_t kColumnsPerWeightDivisor = 256;  // of K

struct WeightKey {
  const c10::StorageImpl* storage;
  int64_t offset, N, K, row_stride, column_stride;
  int dtype;
  bool operator<(const WeightKey& other) const {
    return std::tie(storage, offset, N, K, row_stride, column_stride, dtype) <
           std::tie(other.storage, other.offset, other.N, other.K, other.row_stride, other.column_stride, other.dtype);
  }
};

struct KeptColumns {
  KeptColumns(c10::weak_intrusive_ptr<c10::StorageImpl> of, c10::weak_intrusive_ptr<c10::StorageImpl> cb)
      : storage(std::move(of)), cb_storage(std::move(cb)) {}
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  c10::weak_intrusive_ptr<c10::StorageImpl> cb_storage;  // the CB it was read for (held weakly: its address stays its own)
  int64_t version = -1, cb_version = -1;
  std::vector<int64_t> ids;     // weight columns kept, in the order they came
  std::vector<float> values;    // [ids.size(), N]: the source's column ids[i] as fp32 (unscaled) at i * N
};

std::mutex cache_mutex;
std::map<WeightKey, KeptColumns>& cache() {
  static auto* kept = new std::map<WeightKey, KeptColumns>();  // never destroyed: no exit-order issues
  return *kept;
}

void drop_freed_weights() {
  for (auto it = cache().begin(); it != cache().end();) it = it->second.storage.expired() ? cache().erase(it) : std::next(it);
}

// The source's column (W's, or CB's unscaled) into `to` ([N] fp32), rows split between the threads.
void read_column(const OutlierColumns& outliers, int64_t column, float* to) {
  at::parallel_for(0, outliers.N, 256, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n) to[n] = outliers.raw(n, column);
  });
}

}  // namespace

int64_t kept_columns_capacity(int64_t K) { return std::max(kMinColumnsPerWeight, K / kColumnsPerWeightDivisor); }

void gather_kept_outlier_columns(const at::Tensor& source, const at::Tensor& CB, const OutlierColumns& outliers, float* gathered) {
  const int64_t N = outliers.N, K = outliers.K;
  // An inference tensor has no version counter to check a kept column against.
  if (!source.has_storage() || !CB.has_storage() || source.is_inference() || CB.is_inference()) {
    gather_outlier_columns(outliers, gathered);
    return;
  }
  const WeightKey key{source.storage().unsafeGetStorageImpl(), source.storage_offset(), N, K,
                      source.stride(0),     source.stride(1),         int(source.scalar_type())};
  const int64_t version = source._version(), cb_version = CB._version();
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto found = cache().find(key);
  if (found == cache().end()) {
    drop_freed_weights();
    found = cache().emplace(key, KeptColumns(source.storage().getWeakStorageImpl(), CB.storage().getWeakStorageImpl())).first;
  }
  KeptColumns& kept = found->second;
  const bool same_cb = kept.cb_storage._unsafe_get_target() == CB.storage().unsafeGetStorageImpl() && kept.cb_version == cb_version;
  if (kept.version != version || !same_cb) {  // updated in place since, or requantized: start over
    kept = KeptColumns(source.storage().getWeakStorageImpl(), CB.storage().getWeakStorageImpl());
    kept.version = version;
    kept.cb_version = cb_version;
  }
  for (int64_t o = 0; o < outliers.count; ++o) {
    const int64_t column = outliers.columns[o];
    float* to = gathered + o * N;
    const auto at = std::find(kept.ids.begin(), kept.ids.end(), column);
    if (at != kept.ids.end()) {
      const float* from = kept.values.data() + (at - kept.ids.begin()) * N;
      std::copy(from, from + N, to);
    } else {
      read_column(outliers, column, to);
      if (int64_t(kept.ids.size()) < kept_columns_capacity(K)) {
        kept.ids.push_back(column);
        kept.values.insert(kept.values.end(), to, to + N);
      }
    }
    if (!outliers.W.data) {  // CB's values: dequantize as OutlierColumns::scaled does
      for (int64_t n = 0; n < N; ++n) to[n] = to[n] * (outliers.SCB[n] / kInt8Max);
    }
  }
}

OutlierCacheStats outlier_cache_stats() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  drop_freed_weights();
  OutlierCacheStats stats;
  for (const auto& [key, kept] : cache()) {
    stats.weights += 1;
    stats.columns += int64_t(kept.ids.size());
    stats.bytes += int64_t(kept.values.size() * sizeof(float));
  }
  return stats;
}

void clear_outlier_cache() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache().clear();
}

}  // namespace int8fx
