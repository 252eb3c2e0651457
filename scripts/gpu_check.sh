#!/usr/bin/env bash
# scripts/gpu_check.sh OUT_DIR: the one-command GPU check (docs/gpu.md, section 1).
#
# On a machine with an NVIDIA GPU and, already installed, Python, torch with CUDA, nvcc, pybind11,
# scikit-build-core, cmake and ninja (no network is used): builds smoe with the CUDA backend for one
# architecture without build isolation, runs tests/python/test_gpu.py and the GPU benchmark, and writes
#   OUT_DIR/gpu_check.log    everything printed by every step
#   OUT_DIR/gpu_check.json   one summary: device, versions, per step rc / seconds / counts, figures file
#   OUT_DIR/test_gpu.xml     the test suite's JUnit report
#   OUT_DIR/bench_layer.json the benchmark's rows (bench/gpu/bench_layer.py --json)
# Exit status 0 only when the build, the import check, the tests and the benchmark all succeed.
#
# Environment: PYTHON (default python3), SMOE_GPU_ARCH (default: the first GPU's compute capability,
# 90 on an H100/H200), SMOE_GPU_CHECK_QUICK=1 (small benchmark shapes), SMOE_GPU_CHECK_BUILD=0 (reuse
# the installed build). The build goes to build/gpu-check (kept: a second run recompiles nothing).
# Budget on one H200 with 16 cores: build ~3 min, tests ~1-2 min, benchmark ~2 min (< 8 min in all).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/gpu_check.log"
py="${PYTHON:-python3}"
: >"$log"
start_all=$(date +%s)

say() { echo "== $*" | tee -a "$log"; }
declare -A rc secs
step() {  # name command...: runs the command with its output in the log, records rc and seconds
  local name="$1" t0 r
  shift
  say "$name: $*"
  t0=$(date +%s)
  "$@" >>"$log" 2>&1
  r=$?
  rc[$name]=$r
  secs[$name]=$(($(date +%s) - t0))
  say "$name: rc=$r in ${secs[$name]} s"
  return $r
}

arch="${SMOE_GPU_ARCH:-}"
if [ -z "$arch" ] && command -v nvidia-smi >/dev/null; then
  arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
fi
arch="${arch:-90}"
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"

step environment bash -c "nvidia-smi || true; nvcc --version; cmake --version | head -1; ninja --version; \
  $py -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  \"devices\", torch.cuda.device_count())'; $py -c 'import transformers; print(\"transformers\", transformers.__version__)' || true"

if [ "${SMOE_GPU_CHECK_BUILD:-1}" != "0" ]; then
  # --no-build-isolation: use the installed scikit-build-core / pybind11 / torch (no network);
  # --no-deps: torch and numpy are already there. One architecture keeps the compile to minutes.
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" step build "$py" -m pip install --no-build-isolation --no-deps -v \
    -C build-dir="$root/build/gpu-check" \
    -C cmake.define.SMOE_ENABLE_CUDA=ON \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" \
    -C cmake.define.SMOE_PTXAS_VERBOSE=ON \
    "$root"
else
  rc[build]=0
  secs[build]=0
fi

# From OUT_DIR, so that the installed package is imported (not python/ of the checkout).
cd "$out"
SMOE_REQUIRE_CUDA=1 step import "$py" -c \
  "import smoe, smoe._core as c; print(smoe.__file__, c.BUILT_BACKENDS); assert 'cuda' in c.BUILT_BACKENDS"

cd "$root"
SMOE_REQUIRE_CUDA=1 step tests timeout 360 "$py" -m pytest tests/python/test_gpu.py -q -rs \
  -p no:cacheprovider --junitxml="$out/test_gpu.xml"

bench_args=(--json "$out/bench_layer.json" --warmup 3 --repeats 10)
[ "${SMOE_GPU_CHECK_QUICK:-0}" = "1" ] && bench_args+=(--quick)
step bench timeout 300 "$py" bench/gpu/bench_layer.py "${bench_args[@]}"

total=$(($(date +%s) - start_all))
"$py" - "$out" "$arch" "$total" \
  "${rc[build]:-1}" "${secs[build]:-0}" "${rc[import]:-1}" "${rc[tests]:-1}" "${rc[bench]:-1}" <<'PY'
import json, os, subprocess, sys
import xml.etree.ElementTree as ET
out, arch, total, rc_build, s_build, rc_import, rc_tests, rc_bench = sys.argv[1:]
summary = {"arch": arch, "total_seconds": int(total),
           "steps": {"build": {"rc": int(rc_build), "seconds": int(s_build)}, "import": {"rc": int(rc_import)},
                     "tests": {"rc": int(rc_tests)}, "bench": {"rc": int(rc_bench)}}}
try:
    import torch
    summary["torch"] = torch.__version__
    summary["torch_cuda"] = torch.version.cuda
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception as e:  # the summary must still be written
    summary["torch_error"] = repr(e)
try:
    summary["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception:
    summary["nvcc"] = None
xml = os.path.join(out, "test_gpu.xml")
if os.path.exists(xml):
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = lambda k: int(suite.get(k, 0))
    summary["steps"]["tests"].update(tests=n("tests"), failures=n("failures"), errors=n("errors"),
                                     skipped=n("skipped"), seconds=float(suite.get("time", 0)))
bench = os.path.join(out, "bench_layer.json")
if os.path.exists(bench):
    summary["steps"]["bench"]["json"] = bench
    summary["steps"]["bench"]["rows"] = len(json.load(open(bench)).get("results", []))
summary["ok"] = all(s["rc"] == 0 for s in summary["steps"].values())
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
say "total ${total} s; log $log; summary $out/gpu_check.json"
for k in build import tests bench; do
  [ "${rc[$k]:-1}" = "0" ] || exit 1
done
exit 0
