// smoe/smoe.h: the whole public C++ API of smoe's core.
#pragma once

#include "smoe/dtype.h"
#include "smoe/status.h"
#include "smoe/tensor.h"
#include "smoe/ops/gating.h"  // topk_gating.h, expert_choice.h, router_losses.h
#include "smoe/ops/routing.h"
#include "smoe/ops/permute.h"
#include "smoe/ops/activation.h"
#include "smoe/ops/gemm.h"
#include "smoe/ops/mlp.h"
