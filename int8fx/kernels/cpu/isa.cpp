// Which int8 kernels this CPU can run: CPUID says what the cores implement, XGETBV what
// register state the OS saves on a context switch (an instruction whose registers the OS
// does not save faults), and on Linux the AMX tile data must also be granted to the process.

#include <cpuid.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"

namespace int8fx {
namespace {

// CPUID.(EAX=7, ECX=0) feature bits.
constexpr unsigned kEbxAvx2 = 1u << 5, kEbxAvx512F = 1u << 16, kEbxAvx512Bw = 1u << 30, kEbxAvx512Vl = 1u << 31;
constexpr unsigned kEcxAvx512Vnni = 1u << 11;
constexpr unsigned kEdxAmxBf16 = 1u << 22, kEdxAmxTile = 1u << 24, kEdxAmxInt8 = 1u << 25;
// CPUID.1:ECX: the OS has enabled XGETBV.
constexpr unsigned kEcxOsXsave = 1u << 27;
// XCR0: register state the OS saves.
constexpr uint64_t kXcr0Avx = 0x6;           // XMM, YMM
constexpr uint64_t kXcr0Avx512 = 0xE0;       // opmask, ZMM upper halves, ZMM16-31
constexpr uint64_t kXcr0AmxTile = 0x60000;   // TILECFG, TILEDATA

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// Linux keeps the 8 KiB AMX tile state off until a process asks for it (kernel >= 5.16).
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
#else
  return false;
#endif
}

// INT8FX_MAX_CPU_ISA caps what the library uses, as ONEDNN_MAX_CPU_ISA does for oneDNN: to run
// this machine as an older one (the test suite of an AVX2-only server, on a newer CPU), or to
// rule a kernel out. "none" is handled in Python (the library is not loaded); an unknown value
// caps nothing (Python warns about it).
void apply_isa_cap(CpuFeatures& features) {
  const char* cap = std::getenv("INT8FX_MAX_CPU_ISA");
  if (cap == nullptr) return;
  if (std::strcmp(cap, "avx2") == 0) {
    features.avx512_vnni = features.amx_hardware = false;
  } else if (std::strcmp(cap, "avx512_vnni") == 0) {
    features.amx_hardware = false;
  }
}

CpuFeatures detect() {
  CpuFeatures features;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & kEcxOsXsave)) return features;
  const uint64_t xcr0 = xgetbv0();
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return features;
  const bool avx_state = (xcr0 & kXcr0Avx) == kXcr0Avx;
  const bool avx512_state = avx_state && (xcr0 & kXcr0Avx512) == kXcr0Avx512;
  features.avx2 = avx_state && (ebx & kEbxAvx2);
  const unsigned avx512 = kEbxAvx512F | kEbxAvx512Bw | kEbxAvx512Vl;
  features.avx512_vnni = features.avx2 && avx512_state && (ebx & avx512) == avx512 && (ecx & kEcxAvx512Vnni);
  // The AMX kernel quantizes and stores with AVX-512, so it needs that too.
  features.amx_hardware = features.avx512_vnni && (edx & kEdxAmxTile) && (edx & kEdxAmxInt8) &&
                          (xcr0 & kXcr0AmxTile) == kXcr0AmxTile;
  apply_isa_cap(features);
  features.amx_hardware = features.amx_hardware && request_amx_permission();
  // The AMX kernel was written without AMX hardware at hand: it proves itself first.
  features.amx_int8 = features.amx_hardware && amx_self_check();
  features.amx_bf16_hardware = features.amx_hardware && (edx & kEdxAmxBf16);
  features.amx_bf16 = features.amx_int8 && features.amx_bf16_hardware && amx_bf16_self_check();
  return features;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();  // once per process (thread-safe static)
  return features;
}

bool can_run(Kernel kernel) {
  const CpuFeatures& f = cpu_features();
  switch (kernel) {
    case Kernel::kAvx2: return f.avx2;
    case Kernel::kAvx512Vnni:
    case Kernel::kAvx512VnniPanels: return f.avx512_vnni;
    case Kernel::kAmx: return f.amx_int8;
  }
  return false;
}

QuantizerIsa best_quantizer() { return cpu_features().avx512_vnni ? QuantizerIsa::kAvx512 : QuantizerIsa::kAvx2; }

const char* kernel_name(Kernel kernel) {
  switch (kernel) {
    case Kernel::kAvx2: return "avx2";
    case Kernel::kAvx512Vnni: return "avx512_vnni";
    case Kernel::kAvx512VnniPanels: return "avx512_vnni_panels";
    case Kernel::kAmx: return "amx";
  }
  return "?";
}

}  // namespace int8fx
