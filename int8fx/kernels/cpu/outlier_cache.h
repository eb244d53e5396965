// The weight columns the outlier part reads, kept from call to call (outlier_cache.cpp).
// Apart from kernels.h because it needs torch's tensor headers, which only the files that
// register ops pay for.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "kernels.h"

namespace int8fx {

// gathered [count, N] = what gather_outlier_columns gives, from the columns kept for
// `source` where it has them: `source` is the tensor `outliers` reads, the fp weight (the
// very tensor of outliers.W) or, without one, CB; `CB` is the call's (kept columns are
// dropped when it changes).
void gather_kept_outlier_columns(const at::Tensor& source, const at::Tensor& CB, const OutlierColumns& outliers, float* gathered);

// How many columns of a source with K columns are kept at most: max(4, K / 256).
int64_t kept_columns_capacity(int64_t K);

struct OutlierCacheStats {
  int64_t weights = 0, columns = 0, bytes = 0;
};
OutlierCacheStats outlier_cache_stats();  // after dropping the entries of freed weights
void clear_outlier_cache();

}  // namespace int8fx
