// Internal to the kernel's AMX paths (block_sparse_int8_amx.cc: INT8 blocks; attention_bf16.cc: bf16
// attention): whether the compiler knows the intrinsics, the tile configuration, and whether this
// CPU and OS allow a kind of tile multiply.
#pragma once

#include <cstdint>

// GCC 11 and clang 12 know the AMX intrinsics; older compilers build the library without AMX paths.
#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define SPARSEC_HAS_AMX 1
#else
#define SPARSEC_HAS_AMX 0
#endif

namespace sparsec {
namespace detail {

// The tile configuration LDTILECFG reads (64 bytes, palette 1): rows and bytes per row of each tile.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

enum class AmxKind { kInt8, kBf16 };

// Whether the CPU has AMX tiles of `kind` (for bf16, with AVX512-BW and AVX512-BF16, which the bf16
// path's conversions use) and the OS grants this process the tile data state (Linux: arch_prctl
// ARCH_REQ_XCOMP_PERM, asked once). Always false without SPARSEC_HAS_AMX.
bool amx_ready(AmxKind kind);

}  // namespace detail
}  // namespace sparsec
