#!/usr/bin/env bash
# The checks CI makes after README's test command (.ci/run calls this). No GPU is needed:
#  1. nvcc compiles the CUDA backend (csrc/cuda) for sm_80 and sm_90 and prints ptxas's register,
#     spill and shared-memory figures per kernel;
#  2. nvcc compiles the emulator's own test kernels for the same architectures (compile only);
#  3. the emulated tests (emulator suite, emulated CUDA backend, core) run again under
#     AddressSanitizer + UndefinedBehaviorSanitizer;
#  4. the style check (scripts/style_check.sh: ruff and clang-format, where installed).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
  echo "== nvcc: CUDA backend for sm_80, sm_90 (ptxas resource usage)"
  NVCC_JOBS=$jobs bash scripts/nvcc_check.sh build/nvcc-check 80 90
  cat build/nvcc-check/ptxas_report.txt

  echo "== nvcc: emulator test kernels for sm_80, sm_90 (compile only)"
  cmake -S . -B build/nvcc-simt -G Ninja -DSMOE_NVCC_CHECK=ON -DSMOE_ENABLE_CUDA=OFF \
    -DSMOE_BUILD_BENCH=OFF >/dev/null
  cmake --build build/nvcc-simt -j "$jobs" --target simt_nvcc_check

  echo "== NCCL communicator (csrc/comm) and comm_bench, built against the nvidia-nccl wheel"
  bash scripts/comm_nccl_check.sh build/nccl-check
  echo "== nvcc: sm_90a (wgmma/TMA) kernels, ptxas report, no spills, HGMMA in the SASS"
  bash scripts/nvcc_sm90a_check.sh build/nvcc-sm90a
else
  echo "== nvcc not found: CUDA compile checks skipped"
fi

echo "== ASan + UBSan: emulated tests"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSMOE_SANITIZE=ON -DSMOE_ENABLE_CUDA=OFF \
  -DSMOE_BUILD_BENCH=OFF >/dev/null
cmake --build build/asan -j "$jobs"
ASAN_OPTIONS=detect_leaks=0 ctest --test-dir build/asan --output-on-failure -j "$jobs"

echo "== style: ruff + clang-format (scripts/style_check.sh)"
bash scripts/style_check.sh
