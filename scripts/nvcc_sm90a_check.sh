#!/usr/bin/env bash
# Compile check of the sm_90a code (wgmma, TMA, mbarrier, setmaxnreg) with nvcc; no GPU needed.
#
#   scripts/nvcc_sm90a_check.sh [OUT_DIR]
#
# Compiles csrc/cuda/gemm_wgmma.cu and tests/cpp/simt/test_hopper.cu with
# -gencode=arch=compute_90a,code=sm_90a -Xptxas -v, writes OUT_DIR/ptxas_sm90a_<file>.log, prints
# each kernel's registers and spills, and fails if a file does not compile or any kernel spills.
# Then checks that the SASS has HGMMA (the wgmma tensor-core instruction) and UTMALDG (the TMA
# load) with cuobjdump -sass; where cuobjdump is missing it says so and checks the PTX for
# wgmma.mma_async and cp.async.bulk.tensor instead. OUT_DIR defaults to build/nvcc-sm90a.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/build/nvcc-sm90a}"
nvcc_bin="${NVCC:-nvcc}"
command -v "$nvcc_bin" >/dev/null || { echo "nvcc_sm90a_check: $nvcc_bin not found" >&2; exit 2; }
mkdir -p "$out"
gencode="-gencode=arch=compute_90a,code=sm_90a"
status=0
for f in csrc/cuda/gemm_wgmma.cu tests/cpp/simt/test_hopper.cu; do
  base="$(basename "$f" .cu)"
  if "$nvcc_bin" -std=c++20 -O3 -lineinfo --expt-relaxed-constexpr -Xptxas -v $gencode \
      -I"$root/include" -I"$root/csrc" -c -x cu "$root/$f" -o "$out/$base.o" >"$out/ptxas_sm90a_$base.log" 2>&1; then
    echo "ok   sm_90a $f"
  else
    echo "FAIL sm_90a $f (see $out/ptxas_sm90a_$base.log)"; status=1; continue
  fi
  python3 - "$out/ptxas_sm90a_$base.log" <<'PY' || status=1
import re, sys
name, bad = None, 0
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m: name = m.group(1)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        st, ld = int(m.group(1)), int(m.group(2))
        if st or ld: bad += 1
        spill = (st, ld)
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        print(f"  sm_90a regs={m.group(1):>3} spill_st={spill[0]} spill_ld={spill[1]} {name[:90]}")
        name = None
sys.exit(1 if bad else 0)
PY
  if command -v cuobjdump >/dev/null; then
    sass="$(cuobjdump -sass "$out/$base.o")"
    for insn in HGMMA UTMALDG; do
      if grep -q "$insn" <<<"$sass"; then echo "  SASS has $insn"; else echo "  FAIL: no $insn in the SASS"; status=1; fi
    done
  else
    echo "  cuobjdump not found: SASS check skipped; checking the PTX instead"
    "$nvcc_bin" -std=c++20 -O3 --expt-relaxed-constexpr -arch=compute_90a -ptx -I"$root/include" -I"$root/csrc" \
      -x cu "$root/$f" -o "$out/$base.ptx"
    for insn in wgmma.mma_async cp.async.bulk.tensor; do
      if grep -q "$insn" "$out/$base.ptx"; then echo "  PTX has $insn"; else echo "  FAIL: no $insn in the PTX"; status=1; fi
    done
  fi
done
exit $status
