// The emulated ops: tdpo_ext's device ops defined again under tdpo_ext_emulated, from the
// same schemas (op_schemas.h), so that the two namespaces cannot drift apart.
// ops_cuda.cpp registers their CPU implementations (the CUDA ops over emulated kernels).
#include <torch/library.h>

#include "../../op_schemas.h"

TORCH_LIBRARY(tdpo_ext_emulated, m) {
  tdpo_ext::define_device_ops(m);
}
