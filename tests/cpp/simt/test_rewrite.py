"""Checks the launch-syntax rewrite of python/smoe/simt (run by ctest as simt_rewrite_py).

Loads the module from the source tree without importing the smoe package.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("smoe_simt_runner", ROOT / "python" / "smoe" / "simt" / "__init__.py")
simt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(simt)
rewrite = simt.rewrite_source

CASES = [
    ("k<<<1, 32>>>(a, b);", "::smoe::simt::detail::make_launcher(k, 1, 32)(a, b);"),
    ("k<<<g, b, 0, s>>>();", "::smoe::simt::detail::make_launcher(k, g, b, 0, s)();"),
    (
        "ns::kern<float, 4><<<dim3(2, 3), 64>>>(x, f(y, z));",
        "::smoe::simt::detail::make_launcher(ns::kern<float, 4>, dim3(2, 3), 64)(x, f(y, z));",
    ),
    ("(*fp)<<<g, b>>>(p);", "::smoe::simt::detail::make_launcher((*fp), g, b)(p);"),
    ('puts("<<<not a launch>>>"); // k<<<1,1>>>()', 'puts("<<<not a launch>>>"); // k<<<1,1>>>()'),
    ("extern __shared__ float tile[];", "SMOE_DYNAMIC_SMEM(float, tile);"),
    (
        "extern __shared__ __align__(16) unsigned char buf[];",
        "SMOE_DYNAMIC_SMEM(unsigned char, buf);",
    ),
]


def main() -> int:
    failures = 0
    for source, expected in CASES:
        got = rewrite(source)
        if got != expected:
            print(f"rewrite({source!r})\n  got      {got!r}\n  expected {expected!r}")
            failures += 1
    # Line breaks inside a launch are kept, so later lines keep their numbers.
    multi = "k<<<grid,\n   block>>>(a,\n b);\nint after = __LINE__;\n"
    out = rewrite(multi)
    if out.count("\n") != multi.count("\n") or not out.endswith("int after = __LINE__;\n"):
        print(f"line breaks not preserved: {out!r}")
        failures += 1
    print("ok" if failures == 0 else f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
