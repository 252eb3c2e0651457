"""`python -m smoe.simt run` (issue 9): the launch rewriter on real C++ literals, clear errors for
files it cannot read, a stack overflow reported with the kernel's name, and SMOE_SIMT_SPIN_TIMEOUT
values that are not a number of seconds. Programs run in subprocesses under timeouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env  # noqa: E402
from smoe.simt import rewrite_source

ROOT = Path(__file__).resolve().parents[2]
L = "::smoe::simt::detail::make_launcher"

REWRITES = [
    # digit separators are not char literals
    ("int n = 1'000; k<<<1, n>>>(a);", f"int n = 1'000; {L}(k, 1, n)(a);"),
    ("k<<<0x1'0000, 2>>>(b, 1'2'3);", f"{L}(k, 0x1'0000, 2)(b, 1'2'3);"),
    # raw strings that hold quotes and launch-looking text
    ('auto s = R"(say "hi" k<<<1,1>>>())"; k<<<1, 2>>>(s);', f'auto s = R"(say "hi" k<<<1,1>>>())"; {L}(k, 1, 2)(s);'),
    ('auto s = R"x(a )" b)x"; k<<<1, 2>>>(s);', f'auto s = R"x(a )" b)x"; {L}(k, 1, 2)(s);'),
    ('auto s = u8R"(")"; k<<<1, 2>>>(s);', f'auto s = u8R"(")"; {L}(k, 1, 2)(s);'),
    # char and prefixed literals, escapes, comments
    ("char q = '\"'; k<<<1, 2>>>(q); // k<<<3,4>>>()", f"char q = '\"'; {L}(k, 1, 2)(q); // k<<<3,4>>>()"),
    ('auto c = u8\'x\'; auto w = L"a\\"b"; k<<<1, 2>>>(c);', f'auto c = u8\'x\'; auto w = L"a\\"b"; {L}(k, 1, 2)(c);'),
    ("/* k<<<1,1>>>() */ k<<<1, 2>>>(x);", f"/* k<<<1,1>>>() */ {L}(k, 1, 2)(x);"),
    ("k<<<1, 2>>>(f(\")\"), ')');", f"{L}(k, 1, 2)(f(\")\"), ')');"),
    # kernel expressions: indexed, members, pointers to members
    ("kp[0]<<<g, b>>>(x);", f"{L}(kp[0], g, b)(x);"),
    ("table[i + 1]<<<g, b, 0, s>>>(x);", f"{L}(table[i + 1], g, b, 0, s)(x);"),
    ("s.kernel<<<1, 1>>>();", f"{L}(s.kernel, 1, 1)();"),
    ("p->kernel<<<1, 1>>>();", f"{L}(p->kernel, 1, 1)();"),
    ("ns::k<float, 4><<<1, 1>>>(y);", f"{L}(ns::k<float, 4>, 1, 1)(y);"),
]


@pytest.mark.parametrize("source,expected", REWRITES)
def test_rewrite_on_cpp_literals(source, expected):
    assert rewrite_source(source) == expected


def test_rewrite_reports_what_it_cannot_parse():
    with pytest.raises(SyntaxError, match="line 2"):
        rewrite_source('int x;\nauto s = R"(never closed\n')
    with pytest.raises(SyntaxError, match="line 1.*argument list"):
        rewrite_source("k<<<1, 1>>>;")


def _runner(*args, env=None, timeout=240):
    full_env = subprocess_env()
    full_env.update(env or {})
    try:
        return subprocess.run(
            [sys.executable, "-m", "smoe.simt", *args], capture_output=True, text=True, timeout=timeout, env=full_env
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the runner did not finish in {timeout} s: {e.stderr}")


def test_run_on_a_directory_or_non_utf8_file(tmp_path):
    proc = _runner("run", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("smoe.simt: ") and "directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "latin1.cu"
    bad.write_bytes(b"// caf\xe9\nint main() { return 0; }\n")
    proc = _runner("run", str(bad))
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr and "line 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _runner("run", str(tmp_path / "missing.cu"))
    assert proc.returncode == 2 and proc.stderr.startswith("smoe.simt: ")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One runtime cache for the module: the emulator's runtime is compiled once."""
    return {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("simt-cache"))}


needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")

OVERFLOW = r"""
#include <cuda_runtime.h>
#include <cstdio>
__device__ int deep(int n) {
  volatile char pad[4096];
  pad[0] = static_cast<char>(n);
  return n == 0 ? pad[0] : deep(n - 1) + pad[0];
}
__global__ void recurse_forever(int* out) { out[threadIdx.x] = deep(1 << 20); }
int main() {
  int* d;
  cudaMalloc(&d, 32 * sizeof(int));
  recurse_forever<<<1, 32>>>(d);
  cudaDeviceSynchronize();
  std::printf("not reached\n");
  return 0;
}
"""

OPTIONS = r"""
#include <cuda_runtime.h>
#include <cstdio>
#include <cstring>
__global__ void spin(int* flag) { while (atomicAdd(flag, 0) == 0) {} }
int main(int argc, char** argv) {
  std::printf("timeout %g\n", smoe::simt::options().spin_timeout_s);
  if (argc > 1 && std::strcmp(argv[1], "spin") == 0) {
    int* d;
    cudaMalloc(&d, sizeof(int));
    cudaMemset(d, 0, sizeof(int));
    spin<<<1, 1>>>(d);
    std::printf("%s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  }
  return 0;
}
"""


@needs_cxx
def test_stack_overflow_is_reported_with_the_kernel_name(tmp_path, cache):
    src = tmp_path / "overflow.cu"
    src.write_text(OVERFLOW)
    proc = _runner("run", str(src), env=cache)
    assert proc.returncode == 139, proc.stderr  # the fiber cannot be resumed: the process still ends
    assert "stack overflow in kernel recurse_forever" in proc.stderr, proc.stderr
    assert "overflow.cu:13" in proc.stderr and "SMOE_SIMT_STACK_KB" in proc.stderr
    assert "not reached" not in proc.stdout


@needs_cxx
def test_spin_timeout_values_that_are_not_seconds(tmp_path, cache):
    src = tmp_path / "options.cu"
    src.write_text(OPTIONS)
    exe = tmp_path / "options"
    assert _runner("compile", str(src), "-o", str(exe), env=cache).returncode == 0
    for value in ("nan", "junk", "", "-1", "inf", "5s"):
        proc = subprocess.run(
            [str(exe)], capture_output=True, text=True, timeout=60, env=dict(os.environ, SMOE_SIMT_SPIN_TIMEOUT=value)
        )
        assert proc.stdout.startswith("timeout 20\n"), (value, proc.stdout)  # the default, not 0 or nan
        assert f"SMOE_SIMT_SPIN_TIMEOUT={value} is not a finite number" in proc.stderr, (value, proc.stderr)
    proc = subprocess.run(
        [str(exe), "spin"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, SMOE_SIMT_SPIN_TIMEOUT="0.5"),
    )
    assert proc.stdout.startswith("timeout 0.5\n") and proc.stderr.count("not a finite") == 0
    assert "livelock" in proc.stderr and "unspecified launch failure" in proc.stdout
