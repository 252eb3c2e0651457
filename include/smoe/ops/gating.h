// smoe/ops/gating.h: the router op family, one header per member:
//   smoe/ops/topk_gating.h    top-k gating (token choice) and the family's conventions;
//   smoe/ops/expert_choice.h  expert-choice routing;
//   smoe/ops/router_losses.h  load-balancing and z losses, the aux-loss-free bias update.
#pragma once

#include "smoe/ops/expert_choice.h"
#include "smoe/ops/router_losses.h"
#include "smoe/ops/topk_gating.h"
