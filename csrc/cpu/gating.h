// csrc/cpu/gating.h: CPU backend of the whole router family, one header per member
// (csrc/cpu/topk_gating.h, expert_choice.h, router_losses.h).
#pragma once

#include "cpu/expert_choice.h"
#include "cpu/router_losses.h"
#include "cpu/topk_gating.h"
