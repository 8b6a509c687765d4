// The portable path: plain C++, compiled for the baseline architecture, always present.
#include "element_loops.h"

namespace ds_zero {

void adam_scalar(const AdamStep& step) { run_step<AdamRange<ScalarOps>>(step); }

void adagrad_scalar(const AdagradStep& step) { run_step<AdagradRange<ScalarOps>>(step); }

}  // namespace ds_zero
