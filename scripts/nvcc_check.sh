#!/usr/bin/env bash
# Compile-only check of the CUDA backend with nvcc, with the ptxas resource report.
#
#   scripts/nvcc_check.sh [OUT_DIR] [ARCHS...]
#
# Compiles every csrc/cuda/*.cu and csrc/cuda/naive/*.cu for each architecture (default: 80 90) with -Xptxas -v and writes
#   OUT_DIR/ptxas_<file>_sm<arch>.log   the raw ptxas output
#   OUT_DIR/ptxas_report.txt            one line per kernel: arch, registers, spill bytes, smem, name
# Also compiles bench/cpp/bench_ladder.cpp's GPU path (SMOE_BENCH_CUDA=1) with nvcc as the host driver.
# Exits non-zero if a file fails to compile. No GPU is needed. OUT_DIR defaults to build-nvcc-check.
# NVCC_JOBS (default 2) files compile in parallel; NVCC (default nvcc) picks the compiler.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/build-nvcc-check}"
shift || true
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(80 90)
nvcc_bin="${NVCC:-nvcc}"
jobs="${NVCC_JOBS:-2}"
mkdir -p "$out"
command -v "$nvcc_bin" >/dev/null || { echo "nvcc_check: $nvcc_bin not found" >&2; exit 2; }

compile() {  # file arch
  local f="$1" arch="$2" base
  base="$(basename "$f" .cu)"
  if "$nvcc_bin" -std=c++20 -O3 -lineinfo --expt-relaxed-constexpr -Xptxas -v \
      -gencode "arch=compute_${arch},code=sm_${arch}" \
      -I"$root/include" -I"$root/csrc" -c "$f" -o "$out/${base}_sm${arch}.o" \
      >"$out/ptxas_${base}_sm${arch}.log" 2>&1; then
    echo "ok   sm_${arch} ${base}.cu"
  else
    echo "FAIL sm_${arch} ${base}.cu (see $out/ptxas_${base}_sm${arch}.log)"
    return 1
  fi
}
export -f compile
export nvcc_bin root out

status=0
for arch in "${archs[@]}"; do
  for f in "$root"/csrc/cuda/*.cu "$root"/csrc/cuda/naive/*.cu; do echo "$f $arch"; done
done | xargs -P "$jobs" -n 2 bash -c 'compile "$0" "$1"' || status=1

# The cuBLAS grouped-GEMM baseline: the loop above compiles gemm_cublas.cu without SMOE_HAVE_CUBLAS (an
# empty unit); here it is compiled for real, with its GPU smoke test (tests/cpp/cuda/cublas), wherever
# cublas_v2.h is found (the toolkit beside nvcc, SMOE_CUBLAS_ROOT, build/cublas from scripts/setup.sh, or the nvidia-cublas wheel). Compile
# only: no GPU needed. No cuBLAS headers: a skip line, not a failure.
cublas_inc=""
for d in "${SMOE_CUBLAS_ROOT:+$SMOE_CUBLAS_ROOT/include}" "$(dirname "$(command -v "$nvcc_bin")")/../include" \
         "$root/build/cublas/include" \
         $(python3 -c "import site; print(' '.join(p + '/nvidia/cu13/include' for p in site.getsitepackages()))" 2>/dev/null); do
  if [ -n "$d" ] && [ -f "$d/cublas_v2.h" ]; then cublas_inc="$d"; break; fi
done
if [ -n "$cublas_inc" ]; then
  if "$nvcc_bin" -std=c++20 -O3 --expt-relaxed-constexpr -DSMOE_HAVE_CUBLAS=1 -I"$cublas_inc" \
      -gencode "arch=compute_${archs[0]},code=sm_${archs[0]}" -I"$root/include" -I"$root/csrc" \
      -c "$root/csrc/cuda/gemm_cublas.cu" -o "$out/gemm_cublas_real.o" >"$out/cublas.log" 2>&1 &&
     "$nvcc_bin" -std=c++20 -x cu -I"$cublas_inc" -I"$root/include" -I"$root/csrc" \
      -c "$root/tests/cpp/cuda/cublas/smoke_gemm_cublas.cpp" -o "$out/smoke_gemm_cublas.o" >>"$out/cublas.log" 2>&1; then
    echo "ok   cuBLAS baseline (gemm_cublas.cu with SMOE_HAVE_CUBLAS=1, smoke test; headers in $cublas_inc)"
  else
    echo "FAIL cuBLAS baseline (see $out/cublas.log)"
    status=1
  fi
else
  echo "skip cuBLAS baseline: cublas_v2.h not found (toolkit, SMOE_CUBLAS_ROOT, nvidia-cublas wheel)"
fi

# bench/cpp/bench_ladder.cpp's GPU path (SMOE_BENCH_CUDA=1: device buffers, smoe::cuda launchers) builds
# only in a CUDA build; compile it here as such a build would (nvcc driving the host compiler, which
# puts the CUDA headers on the path), wherever Google Benchmark's headers are found. Compile only.
if echo '#include <benchmark/benchmark.h>' | "$nvcc_bin" -std=c++20 -x c++ -E - >/dev/null 2>&1; then
  if "$nvcc_bin" -std=c++20 -O1 -DSMOE_BENCH_CUDA=1 -I"$root/include" -I"$root/csrc" \
      -c "$root/bench/cpp/bench_ladder.cpp" -o "$out/bench_ladder_cuda.o" >"$out/bench_ladder.log" 2>&1; then
    echo "ok   bench_ladder.cpp with SMOE_BENCH_CUDA=1"
  else
    echo "FAIL bench_ladder.cpp with SMOE_BENCH_CUDA=1 (see $out/bench_ladder.log)"
    status=1
  fi
else
  echo "skip bench_ladder.cpp with SMOE_BENCH_CUDA=1: benchmark/benchmark.h not found"
fi

# ptxas prints "Compiling entry function '<mangled>' for 'sm_XX'", then "N bytes stack frame, N bytes
# spill stores, N bytes spill loads" and "Used N registers, used N barriers[, N bytes smem]".
report="$out/ptxas_report.txt"
python3 - "$out" >"$report" <<'PY'
import glob, re, sys
rows = []
for log in sorted(glob.glob(sys.argv[1] + "/ptxas_*_sm*.log")):
    name = arch = None
    st = ld = 0
    for line in open(log):
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            name, arch, st, ld = m.group(1), m.group(2), 0, 0
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            st, ld = int(m.group(1)), int(m.group(2))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append((arch, int(m.group(1)), st, ld, int(smem.group(1)) if smem else 0, name))
            name = None
print("%-6s %5s %10s %10s %7s  %s" % ("arch", "regs", "spill_st_B", "spill_ld_B", "smem_B", "kernel"))
for r in rows:
    print("%-6s %5d %10d %10d %7d  %s" % r)
PY
if command -v c++filt >/dev/null; then
  c++filt <"$report" >"$report.tmp" && mv "$report.tmp" "$report"
fi
echo "nvcc_check: report in $report"
exit $status
