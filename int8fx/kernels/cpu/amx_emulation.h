// Scalar stand-ins for the AMX tile instructions gemm_amx.cpp uses, so that the kernel's
// packing, blocking and edge handling can be tested on CPUs without AMX
// (tests/test_cpu_kernels.py builds gemm_amx.cpp with -DINT8FX_EMULATE_AMX). They follow
// Intel's pseudo-code for TILELOADD, TILESTORED, TILEZERO, TDPBSSD and TDPBF16PS with every tile
// configured as 16 rows x 64 bytes, the only configuration the kernel uses.
#pragma once

#include <cstdint>
#include <cstring>

#undef _tile_loadconfig
#undef _tile_release
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbssd
#undef _tile_dpbf16ps

namespace int8fx {
namespace amx_emulation {

struct Tile {
  uint8_t bytes[16][64];
};
inline thread_local Tile tiles[8];

inline void loadd(int t, const void* base, int64_t stride) {
  for (int r = 0; r < 16; ++r) std::memcpy(tiles[t].bytes[r], static_cast<const char*>(base) + r * stride, 64);
}

inline void stored(int t, void* base, int64_t stride) {
  for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(base) + r * stride, tiles[t].bytes[r], 64);
}

// dst[m][n] += sum over k of the 4 signed byte products a[m][4k + i] * b[k][4n + i].
inline void dpbssd(int dst, int a, int b) {
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      int32_t sum;
      std::memcpy(&sum, &tiles[dst].bytes[m][4 * n], 4);
      for (int k = 0; k < 16; ++k)
        for (int i = 0; i < 4; ++i)
          sum += int32_t(int8_t(tiles[a].bytes[m][4 * k + i])) * int32_t(int8_t(tiles[b].bytes[k][4 * n + i]));
      std::memcpy(&tiles[dst].bytes[m][4 * n], &sum, 4);
    }
}

// dst[m][n] (fp32) += a[m][2k] * b[k][2n] then += a[m][2k + 1] * b[k][2n + 1] for k in
// order, each product exact (bf16 x bf16) and each sum rounded in fp32: Intel's pseudo-code
// for TDPBF16PS (without its flushing of subnormals).
inline float bf16_at(const uint8_t* bytes) {
  uint16_t half;
  std::memcpy(&half, bytes, 2);
  const uint32_t bits = uint32_t(half) << 16;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}
inline void dpbf16ps(int dst, int a, int b) {
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float sum;
      std::memcpy(&sum, &tiles[dst].bytes[m][4 * n], 4);
      for (int k = 0; k < 16; ++k)
        for (int i = 0; i < 2; ++i) sum += bf16_at(&tiles[a].bytes[m][4 * k + 2 * i]) * bf16_at(&tiles[b].bytes[k][4 * n + 2 * i]);
      std::memcpy(&tiles[dst].bytes[m][4 * n], &sum, 4);
    }
}

}  // namespace amx_emulation
}  // namespace int8fx

#define _tile_loadconfig(config) ((void)(config))
#define _tile_release() ((void)0)
#define _tile_zero(t) std::memset(int8fx::amx_emulation::tiles[t].bytes, 0, sizeof(int8fx::amx_emulation::Tile))
#define _tile_loadd(t, base, stride) int8fx::amx_emulation::loadd(t, base, stride)
#define _tile_stored(t, base, stride) int8fx::amx_emulation::stored(t, base, stride)
#define _tile_dpbssd(dst, a, b) int8fx::amx_emulation::dpbssd(dst, a, b)
#define _tile_dpbf16ps(dst, a, b) int8fx::amx_emulation::dpbf16ps(dst, a, b)
