#!/usr/bin/env bash
# Installs everything smoe's build, tests, demo and benchmarks need on a fresh machine, then builds
# the C++ core + tests (build/cpp) and installs the Python package in editable mode.
#
#   bash scripts/setup.sh            # idempotent: a second run only rebuilds what changed
#
# Order matters: torch==2.13.0 (a CPU build that this workplace keeps on disk) is installed before
# anything that depends on torch, so that no looser requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

log() { printf '\n== %s\n' "$*"; }

# 1. System packages: GoogleTest, Google Benchmark, OpenBLAS (skipped when already present).
need_apt=()
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev libgmock-dev)
[ -f /usr/include/benchmark/benchmark.h ] || need_apt+=(libbenchmark-dev)
ls /usr/lib/*/libopenblas.so >/dev/null 2>&1 || ls /usr/lib/*/openblas*/libopenblas.so >/dev/null 2>&1 || need_apt+=(libopenblas-dev)
command -v clang-format >/dev/null || need_apt+=(clang-format)  # scripts/style_check.sh
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# 2. Python packages: the pinned torch first, then the rest.
log "pip: torch==2.13.0, build tools, test and demo dependencies"
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check \
  "pybind11>=2.12" "scikit-build-core>=0.10" cmake ninja numpy pytest hypothesis \
  "transformers>=4.57,<5" matplotlib tqdm rich "ruff>=0.17,<0.18"

# 2b. A side environment with transformers 5.x (same torch, through --system-site-packages), so the
#     tests cover both the 4.57 and the 5.x layouts of the Hugging Face MoE blocks.
log "side environment build/tf5: transformers 5.x"
[ -x build/tf5/bin/python ] || $PY -m venv --system-site-packages build/tf5
build/tf5/bin/python -m pip install -q --disable-pip-version-check "transformers>=5,<6"

# 2c. NCCL headers + library for the compile check of csrc/comm's NCCL communicator
#     (scripts/comm_nccl_check.sh), only where nvcc exists: the nvidia-nccl-cu13 wheel, in build/nccl.
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  if [ ! -f build/nccl/nvidia/nccl/include/nccl.h ]; then
    log "pip: nvidia-nccl-cu13 (headers + libnccl) into build/nccl"
    $PY -m pip install -q --disable-pip-version-check --no-deps --target build/nccl nvidia-nccl-cu13
  fi
fi

# 2d. cuBLAS headers for the compile check of the cuBLAS grouped-GEMM baseline (scripts/nvcc_check.sh),
#     only where nvcc exists and the toolkit has none: the headers of the nvidia-cublas wheel, in build/cublas.
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc_inc="$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")/../include"
  if [ ! -f "$nvcc_inc/cublas_v2.h" ] && [ ! -f build/cublas/include/cublas_v2.h ]; then
    log "pip: nvidia-cublas (cu13) headers into build/cublas"
    tmp=$(mktemp -d)
    $PY -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" "nvidia-cublas>=13,<14"
    $PY - "$tmp" <<'PYEOF'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "nvidia_cublas-*.whl"))[0]
os.makedirs("build/cublas/include", exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("nvidia/cu13/include/") and name.endswith(".h"):
            with open(os.path.join("build/cublas/include", os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PYEOF
    rm -rf "$tmp"
  fi
fi

# 3. The Python package (builds smoe._C with CMake; editable, so python/ is used in place).
log "pip install -e . (builds smoe._C)"
$PY -m pip install -q --disable-pip-version-check --no-build-isolation -e .

# 4. The C++ core, its GoogleTest suites and the microbenchmarks.
log "cmake: build/cpp"
# nvcc builds of the CUDA backend are CI's separate compile check (scripts/ci_extra.sh), not part of setup.
cmake -S . -B build/cpp -G Ninja -DCMAKE_BUILD_TYPE=Release -DSMOE_BUILD_TESTS=ON -DSMOE_BUILD_BENCH=ON -DSMOE_ENABLE_CUDA=OFF >/dev/null
cmake --build build/cpp -j "$(nproc)"
log "setup done"
