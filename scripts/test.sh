#!/usr/bin/env bash
# smoe's whole test suite: the C++ GoogleTest suites (ctest) and the Python suite (pytest).
# Run scripts/setup.sh first (README's test command does both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

cmake --build build/cpp -j "$(nproc)"

echo "== ctest (C++ core, CPU backend, SIMT emulator)"
ctest --test-dir build/cpp --output-on-failure -j "$(nproc)"

echo "== pytest (Python package)"
$PY -m pytest tests/python -q -ra
