// The tensor-core GEMM with its cp.async refill moved above the barrier (a real race on a GPU).
#define SMOE_CUDA_NS cuda_simt_mutant
#define SMOE_TEST_MUTATION 1
#include "race_gemm.inc"
