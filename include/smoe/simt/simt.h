// smoe SIMT emulator: the header force-included (`g++ -x c++ -include smoe/simt/simt.h`) into a
// .cu file so that it compiles as C++ and runs on the CPU, one fiber per CUDA thread.
// See docs/simt.md.
#pragma once

#ifndef SMOE_SIMT
#define SMOE_SIMT 1
#endif

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "smoe/simt/device.h"
#include "smoe/simt/half.h"
#include "smoe/simt/launch.h"
#include "smoe/simt/runtime_api.h"
#include "smoe/simt/vector_types.h"

// Execution-space and storage qualifiers.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Static shared memory: one copy per OS thread, and a block's fibers all run on one OS thread.
// The scheduler refills the module's thread-local storage with the poison pattern before each
// block, so each block starts from NaN-filled shared memory (see csrc/simt/scheduler.cpp).
#define __shared__ static thread_local

#include "smoe/simt/kernel.h"
