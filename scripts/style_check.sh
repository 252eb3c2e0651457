#!/usr/bin/env bash
# The style check: ruff (lint + format, configured in pyproject.toml) over the Python files and
# clang-format (.clang-format) over the C++/CUDA sources, in check mode. To apply instead:
#   ruff check --fix . && ruff format . && clang-format -i $(git ls-files '*.h' '*.cpp' '*.cu' '*.cuh' '*.inc')
# Formatting differs between major versions, so each tool is checked only at the version the tree
# was formatted with (ruff 0.17.x from pip, clang-format 14 from Debian); other versions are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
if command -v ruff >/dev/null && ruff --version | grep -Eq '^ruff 0\.17\.'; then
  echo "== ruff check / ruff format --check"
  ruff check . || status=1
  ruff format --check . || status=1
else
  echo "== ruff 0.17.x not found: Python style check skipped"
fi
if command -v clang-format >/dev/null && clang-format --version | grep -Eq 'version 14\.'; then
  echo "== clang-format --dry-run --Werror"
  git ls-files '*.h' '*.cpp' '*.cu' '*.cuh' '*.inc' | xargs clang-format --dry-run --Werror || status=1
else
  echo "== clang-format 14 not found: C++ style check skipped"
fi
exit $status
