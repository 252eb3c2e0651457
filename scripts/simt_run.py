#!/usr/bin/env python3
"""Runs a standalone CUDA program on the CPU with smoe's SIMT emulator.

    scripts/simt_run.py run FILE.cu [ARGS...]      (same options as python -m smoe.simt)

Loads python/smoe/simt directly, so it works without installing smoe (and without importing
the torch-based parts of the smoe package).
"""

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "python" / "smoe" / "simt" / "__init__.py"
_spec = importlib.util.spec_from_file_location("smoe_simt_runner", _PATH)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0].endswith(".cu"):
        argv = ["run", *argv]  # scripts/simt_run.py FILE.cu ARGS... is accepted too
    sys.exit(_module.main(argv))
