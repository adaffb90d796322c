// Which instruction set the block kernels run with (isa.cpp): chosen at run time from what the
// CPU reports, and lowered on request (set_isa) so every variant can be tested on one machine.
#pragma once

namespace ppinfer {

// Ordered: each level runs the code of the ones below it where it has none of its own.
enum class Isa : int {
  kScalar = 0,      // portable C++
  kAvx2 = 1,        // AVX2 + FMA + F16C
  kAvx512Vnni = 2,  // AVX-512 F / BW / VL + VNNI, with the AVX2 code for what it has no kernel
};

Isa active_isa();

}  // namespace ppinfer
