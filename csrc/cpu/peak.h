// csrc/cpu/peak.h: the machine's own arithmetic peak, measured in-process on the CPU backend's pool.
//
// The benchmark (python -m smoe.bench) reports every implementation as a fraction of what this CPU can
// do, measured now, on the same threads smoe's kernels run on: a register-only multiply-add loop per
// thread of the pool, all threads at once, that touches no memory. Its GFLOP/s is an upper bound for
// any GEMM on this machine (it does nothing but the arithmetic).
#pragma once

#include <cstdint>
#include <string>

namespace smoe::cpu {

struct PeakResult {
  double gflops = 0.0;   // all threads together: flops / wall seconds
  double seconds = 0.0;  // wall time of the measured run
  int threads = 0;       // threads that ran the loop (the pool's size)
  std::string isa;       // the instruction the loop used: "avx512 vfmadd231ps", "avx2 vfmadd231ps",
                         // "avx512 vdpbf16ps", "scalar"
};

// Which microkernels this CPU can run (runtime detection, __builtin_cpu_supports).
bool peak_has_bf16_dp();   // AVX512-BF16 (vdpbf16ps)
bool peak_has_amx_bf16();  // AMX-BF16 (tdpbf16ps), with the kernel's permission for the tile state

// kind "fp32": fused multiply-adds on 32-bit floats, 2 flops per lane (AVX-512 > AVX2+FMA > scalar);
// kind "bf16": vdpbf16ps, 4 flops per fp32 lane (two bf16 products + two adds), only with AVX512-BF16;
// kind "amx_bf16": AMX tdpbf16ps tiles, only with AMX-BF16 (what oneDNN's bf16 GEMM runs there);
// otherwise returns gflops = 0 and isa "unsupported". `iterations` is the inner loop count per thread
// (16 independent vector instructions, or 4 tile instructions for AMX); >= 1.
PeakResult measure_peak(const std::string& kind, int64_t iterations);

}  // namespace smoe::cpu
