// Weight buffers on transparent huge pages (pages.cpp).
#pragma once

#include <ATen/ATen.h>

namespace ppinfer {

// An uninitialised uint8 tensor of `sizes`, on transparent huge pages where Linux grants them:
// the buffers of weights that every decode step streams.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes);

}  // namespace ppinfer
