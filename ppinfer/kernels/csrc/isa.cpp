// The instruction set the block kernels run with, and its ops (namespace ppinfer_kernels):
//   isa() -> the active one's name; set_isa(name) -> "auto" (the best this CPU runs), or a
//   named one, which must be one the CPU runs: "scalar", "avx2", "avxvnni", "avx512vnni";
//   isa_unavailable(name) -> why this CPU or build cannot run `name` ("" where it can, and for
//   "auto").
#include <torch/library.h>

#include <atomic>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include "isa.h"
#include "qtypes.h"

namespace ppinfer {
namespace {

constexpr const char* kNames[] = {"scalar", "avx2", "avxvnni", "avx512vnni"};
constexpr int kLevels = sizeof(kNames) / sizeof(kNames[0]);

#if defined(PPINFER_HAS_AVXVNNI)
// AVX-VNNI: CPUID leaf 7, sub-leaf 1, EAX bit 4 (asked directly: not every compiler's
// __builtin_cpu_supports knows the name). Its YMM state is the one the AVX2 check confirmed.
bool cpu_has_avx_vnni() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && (eax & (1u << 4)) != 0;
}
#endif

// Why this CPU (or this build) cannot run `isa`, or nullptr.
const char* missing(Isa isa) {
  if (isa == Isa::kScalar) return nullptr;
#if defined(PPINFER_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) {
    return "this CPU lacks AVX2, FMA or F16C";
  }
  if (isa == Isa::kAvx2) return nullptr;
  if (isa == Isa::kAvxVnni) {
#if defined(PPINFER_HAS_AVXVNNI)
    return cpu_has_avx_vnni() ? nullptr : "this CPU lacks AVX-VNNI";
#else
    return "this build's compiler has no AVX-VNNI target";
#endif
  }
#if defined(PPINFER_HAS_AVX512)
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))) {
    return "this CPU lacks AVX-512 F, BW, VL or VNNI";
  }
  return nullptr;
#else
  return "this build's compiler has no AVX-512 VNNI target";
#endif
#else
  return "not an x86-64 build";
#endif
}

Isa best() {
  for (Isa isa : {Isa::kAvx512Vnni, Isa::kAvxVnni, Isa::kAvx2}) {
    if (missing(isa) == nullptr) return isa;
  }
  return Isa::kScalar;
}

std::atomic<int>& level() {
  static std::atomic<int> active{static_cast<int>(best())};
  return active;
}

Isa parse(const std::string& name) {
  for (int i = 0; i < kLevels; ++i) {
    if (name == kNames[i]) return static_cast<Isa>(i);
  }
  TORCH_CHECK(false, "set_isa: expected 'auto', 'scalar', 'avx2', 'avxvnni' or 'avx512vnni', got '", name, "'");
}

std::string isa() { return kNames[level().load()]; }

void set_isa(const std::string& name) {
  if (name == "auto") {
    level().store(static_cast<int>(best()));
    return;
  }
  const Isa isa = parse(name);
  const char* why = missing(isa);
  TORCH_CHECK(why == nullptr, "set_isa: cannot run '", name, "' here: ", why);
  level().store(static_cast<int>(isa));
}

std::string isa_unavailable(const std::string& name) {
  if (name == "auto") return "";
  const char* why = missing(parse(name));
  return why == nullptr ? "" : why;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(level().load(std::memory_order_relaxed)); }

bool avx2_active() { return active_isa() >= Isa::kAvx2; }

}  // namespace ppinfer

TORCH_LIBRARY_FRAGMENT(ppinfer_kernels, m) {
  m.def("isa() -> str", &ppinfer::isa);
  m.def("set_isa(str isa) -> ()", &ppinfer::set_isa);
  m.def("isa_unavailable(str isa) -> str", &ppinfer::isa_unavailable);
}
