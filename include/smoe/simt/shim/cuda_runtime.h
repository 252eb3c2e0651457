// smoe SIMT emulator shim: stands in for CUDA's <cuda_runtime.h> when a .cu file is compiled with g++.
// Only on the include path of emulator builds (see csrc/simt/CMakeLists.txt).
#pragma once
#include "smoe/simt/simt.h"
