// The schemas of the emulated ops: every tdpo_ext op defined again under tdpo_ext_emulated,
// copied from the tdpo_ext library already loaded (tdpo_ext._C, so `import tdpo_ext` comes
// first), so that the two namespaces cannot drift apart. ops_cuda.cpp registers their CPU
// implementations (the CUDA ops over emulated kernels).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdio>
#include <sstream>
#include <string>

TORCH_LIBRARY(tdpo_ext_emulated, m) {
  constexpr std::string_view kPrefix = "tdpo_ext::";
  int defined = 0;
  for (const c10::OperatorName& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind(kPrefix, 0) != 0) continue;
    const auto op = c10::Dispatcher::singleton().findSchema(name);
    if (!op.has_value()) continue;
    std::ostringstream schema;
    schema << op->schema();
    m.def(schema.str().substr(kPrefix.size()).c_str());
    ++defined;
  }
  if (defined == 0) {
    std::fprintf(stderr,
                 "tdpo_ext_emulated: no tdpo_ext op is registered; import tdpo_ext before "
                 "loading the emulated kernels\n");
  }
}
