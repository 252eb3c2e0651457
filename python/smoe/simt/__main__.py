"""python -m smoe.simt run FILE.cu [ARGS...]: run a CUDA program on the CPU (docs/simt.md)."""

import sys

from smoe.simt import main

sys.exit(main())
