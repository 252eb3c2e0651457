// The tensor-core GEMM as shipped, launched the same way as the mutant.
#define SMOE_CUDA_NS cuda_simt_control
#include "race_gemm.inc"
