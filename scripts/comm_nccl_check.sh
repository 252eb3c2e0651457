#!/usr/bin/env bash
# Compile and link csrc/comm's NCCL communicator and comm_bench against NCCL (no GPU needed to build;
# running them needs GPUs). NCCL comes from the nvidia-nccl-cu13 wheel that scripts/setup.sh puts in
# build/nccl when nvcc exists, or from $SMOE_NCCL_ROOT (a dir with include/nccl.h and lib/libnccl.so*).
#   bash scripts/comm_nccl_check.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/nccl-check}
root=${SMOE_NCCL_ROOT:-$PWD/build/nccl/nvidia/nccl}
if [ ! -f "$root/include/nccl.h" ]; then
  echo "comm_nccl_check: no NCCL at $root (run scripts/setup.sh on a machine with nvcc, or set SMOE_NCCL_ROOT)" >&2
  exit 1
fi
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
cmake -S . -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSMOE_ENABLE_CUDA=OFF -DSMOE_BUILD_TESTS=OFF \
  -DSMOE_BUILD_BENCH=ON -DSMOE_NCCL_ROOT="$root" | tee "$out.cmake.log" | grep -E "NCCL communicator" || true
grep -q "NCCL communicator enabled" "$out.cmake.log" || { echo "comm_nccl_check: NCCL not picked up" >&2; exit 1; }
cmake --build "$out" -j "$(nproc)" --target comm_bench
# grep without -q: an early exit would SIGPIPE nm, and pipefail would call the pipeline failed.
nm -C "$out/csrc/comm/libsmoe_comm.a" | grep "make_nccl_communicator" >/dev/null || { echo "comm_nccl_check: NCCL code missing" >&2; exit 1; }
echo "comm_nccl_check: NCCL communicator and comm_bench built and linked against $root"
