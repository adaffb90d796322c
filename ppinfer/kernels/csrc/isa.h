// Which instruction set the block kernels run with (isa.cpp): chosen at run time from what the
// CPU reports, and lowered on request (set_isa) so every variant can be tested on one machine.
#pragma once

namespace ppinfer {

// Ordered: each level runs the code of the ones below it where it has none of its own, except
// that AVX-512 VNNI runs the AVX2 code, not AVX-VNNI's (a CPU with AVX-512 VNNI need not have
// AVX-VNNI: Ice Lake, Zen 4).
enum class Isa : int {
  kScalar = 0,      // portable C++
  kAvx2 = 1,        // AVX2 + FMA + F16C
  kAvxVnni = 2,     // AVX2 + FMA + F16C + AVX-VNNI (256-bit dpbusd, VEX): the AVX2 kernels' dots by VNNI
  kAvx512Vnni = 3,  // AVX-512 F / BW / VL + VNNI, with the AVX2 code for what it has no kernel
};

Isa active_isa();

}  // namespace ppinfer
