"""Compile and run standalone CUDA programs on the CPU with smoe's SIMT emulator.

A ``.cu`` file with kernels and a host ``main`` (cudaMalloc, cudaMemcpy, ``kernel<<<...>>>``
launches, cudaDeviceSynchronize) is compiled with the host C++ compiler: the launch syntax is
rewritten to the emulator's launcher, ``smoe/simt/simt.h`` is force-included, and the emulator's
runtime sources are compiled once and cached. See docs/simt.md.

    from smoe.simt import run
    status = run("examples/vector_add.cu", ["1000"], schedule="random:7")

Command line: ``python -m smoe.simt run FILE.cu [ARGS...]`` (``--help`` for options).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["find_root", "rewrite_source", "compile_program", "run", "main"]

_RUNTIME_SOURCES = ("fiber.cpp", "scheduler.cpp", "cuda_runtime.cpp")
_BASE_FLAGS = ("-std=c++20", "-ffp-contract=off", "-g")


def find_root() -> Path:
    """Directory holding include/smoe/simt and csrc/simt: $SMOE_SIMT_ROOT, else the source tree."""
    candidates = []
    if os.environ.get("SMOE_SIMT_ROOT"):
        candidates.append(Path(os.environ["SMOE_SIMT_ROOT"]))
    here = Path(__file__).resolve().parent
    candidates.append(here / "_data")  # installed package data (include/ and csrc/simt/)
    candidates.append(here.parents[2])  # python/smoe/simt -> repository root
    for root in candidates:
        if (root / "include/smoe/simt/simt.h").is_file() and (root / "csrc/simt").is_dir():
            return root
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"smoe SIMT emulator sources not found (tried {tried}); set SMOE_SIMT_ROOT to the smoe repository root"
    )


# --------------------------------------------------------------------------------- source rewrite
# A small tokenizer of C++ source, enough to find `<<<` launches outside comments and literals:
# comments, string and char literals (with u8/u/U/L prefixes), raw strings R"delim(...)delim",
# preprocessing numbers with digit separators (1'000, 0x1'FF), and identifiers, each skipped whole.
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_PP_NUMBER = re.compile(r"\.?[0-9](?:[eEpP][+-]|'[0-9A-Za-z_]|[0-9A-Za-z_.])*")
_STRING_PREFIXES = ("u8", "u", "U", "L")
_RAW_PREFIXES = ("R", "u8R", "uR", "UR", "LR")
_RAW_DELIMITER = re.compile(r"([^\s()\\]{0,16})\(")


def _line_of(src: str, i: int) -> int:
    return src.count("\n", 0, i) + 1


def _skip_quoted(src: str, i: int) -> int:
    """src[i] is ' or \"; the index just past the matching close quote on the same line (escapes honoured)."""
    quote, j = src[i], i + 1
    while j < len(src) and src[j] != quote:
        if src[j] == "\n":
            break
        j += 2 if src[j] == "\\" else 1
    if j >= len(src) or src[j] != quote:
        # Unterminated on its line (an apostrophe in an #error text or an #if 0 block): the compiler
        # reports it if it matters; here the quote is one character.
        return i + 1
    return j + 1


def _skip_raw_string(src: str, i: int) -> int:
    """src[i] is the \" of R\"delim( ... )delim\"; the index just past the closing quote."""
    m = _RAW_DELIMITER.match(src, i + 1)
    if m is None:
        raise SyntaxError(f"invalid raw string delimiter on line {_line_of(src, i)}")
    close = ")" + m.group(1) + '"'
    j = src.find(close, m.end())
    if j < 0:
        raise SyntaxError(f"unterminated raw string literal on line {_line_of(src, i)}")
    return j + len(close)


def _skip_literal_or_comment(src: str, i: int) -> int:
    """If a comment, literal or identifier starts at i, return the index just past it; else i."""
    c = src[i]
    if src.startswith("//", i):
        j = src.find("\n", i)
        return len(src) if j < 0 else j
    if src.startswith("/*", i):
        j = src.find("*/", i + 2)
        if j < 0:
            raise SyntaxError(f"unterminated comment on line {_line_of(src, i)}")
        return j + 2
    if c.isdigit() or (c == "." and src[i + 1 : i + 2].isdigit()):
        return _PP_NUMBER.match(src, i).end()
    if c == "_" or c.isalpha():
        m = _IDENT.match(src, i)
        if m is None:  # a non-ASCII letter: one character
            return i + 1
        j, word = m.end(), m.group()
        if src.startswith('"', j) and word in _RAW_PREFIXES:
            return _skip_raw_string(src, j)
        if j < len(src) and src[j] in "\"'" and word in _STRING_PREFIXES:
            return _skip_quoted(src, j)
        return j
    if c in "\"'":
        return _skip_quoted(src, i)
    return i


def _match_forward(src: str, i: int, open_ch: str, close_ch: str) -> int:
    """src[i] == open_ch; return the index of the matching close_ch."""
    depth = 0
    while i < len(src):
        j = _skip_literal_or_comment(src, i)
        if j != i:
            i = j
            continue
        if src[i] == open_ch:
            depth += 1
        elif src[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise SyntaxError(f"unbalanced {open_ch!r} from line {_line_of(src, i)}")


def _find_forward(src: str, i: int, token: str) -> int:
    """Index of the first `token` at or after i outside comments and literals, or -1."""
    while i < len(src):
        j = _skip_literal_or_comment(src, i)
        if j != i:
            i = j
        elif src.startswith(token, i):
            return i
        else:
            i += 1
    return -1


_CLOSERS = {">": "<", ")": "(", "]": "["}


def _kernel_expression_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends just before `end` (the `<<<`): a name, qualified
    (ns::k), templated (k<T, 4>), a member (s.k, p->k), indexed (kp[0]) or parenthesised ((*fp))."""
    i = end - 1
    while i >= 0 and src[i].isspace():
        i -= 1
    while i >= 0:
        c = src[i]
        if c == ">" and i > 0 and src[i - 1] == "-":  # p->kernel
            i -= 2
        elif c in _CLOSERS:
            open_ch, depth = _CLOSERS[c], 0
            while i >= 0:
                if src[i] == c:
                    depth += 1
                elif src[i] == open_ch:
                    depth -= 1
                    if depth == 0:
                        break
                i -= 1
            i -= 1
        elif c.isalnum() or c in "_:&.*":
            i -= 1
        else:
            break
    return i + 1


def _line_count(text: str) -> int:
    return text.count("\n")


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([\w:<>,\s]+?)\s+(\w+)\s*\[\s*\]\s*;"
)


def rewrite_source(src: str) -> str:
    """Rewrites CUDA-only syntax into what the emulator compiles, keeping every line in place.

    * ``kernel<<<grid, block[, smem[, stream]]>>>(args)`` becomes
      ``::smoe::simt::detail::make_launcher(kernel, grid, block, ...)(args)``;
    * ``extern __shared__ T name[];`` becomes ``SMOE_DYNAMIC_SMEM(T, name);``.
    """
    out = []
    i = 0
    last = 0
    while i < len(src):
        j = _skip_literal_or_comment(src, i)
        if j != i:
            i = j
            continue
        if not src.startswith("<<<", i):
            i += 1
            continue
        start = _kernel_expression_start(src, i)
        kernel = src[start:i].strip()
        close = _find_forward(src, i + 3, ">>>")
        if not kernel or close < 0:
            raise SyntaxError(f"cannot parse the kernel launch on line {_line_of(src, i)}")
        config = src[i + 3 : close]
        k = close + 3
        while k < len(src) and src[k].isspace():
            k += 1
        if k >= len(src) or src[k] != "(":
            raise SyntaxError(f"launch of {kernel} on line {_line_of(src, i)} without an argument list")
        args_end = _match_forward(src, k, "(", ")")
        args = src[k + 1 : args_end]
        original = src[start : args_end + 1]
        call = f"::smoe::simt::detail::make_launcher({kernel}, {config})({args})"
        out.append(src[last:start])
        # Same number of line breaks as the original, so every later line keeps its number.
        out.append(call + "\n" * (_line_count(original) - _line_count(call)))
        i = last = args_end + 1
    out.append(src[last:])
    text = "".join(out)

    def shared(m: re.Match) -> str:
        return f"SMOE_DYNAMIC_SMEM({m.group(1).strip()}, {m.group(2)});" + "\n" * _line_count(m.group(0))

    return _EXTERN_SHARED.sub(shared, text)


# ------------------------------------------------------------------------------------ compiling
def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smoe" / "simt"


def _run_compiler(cmd: Sequence[str], verbose: bool) -> None:
    if verbose:
        print("+ " + shlex.join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compilation failed ({shlex.join(cmd)}):\n{proc.stdout}")
    if proc.stdout and verbose:
        print(proc.stdout, file=sys.stderr, end="")


def _runtime_objects(root: Path, cxx: str, flags: Sequence[str], verbose: bool) -> list[Path]:
    """Compiles the emulator runtime once per (sources, compiler, flags) and caches the objects."""
    h = hashlib.sha256()
    h.update(cxx.encode())
    h.update(" ".join(flags).encode())
    headers = sorted((root / "include/smoe/simt").rglob("*.h"))
    for path in [root / "csrc/simt" / s for s in _RUNTIME_SOURCES] + sorted((root / "csrc/simt").glob("*.h")) + headers:
        h.update(path.read_bytes())
    out_dir = _cache_dir() / ("runtime-" + h.hexdigest()[:16])
    objects = [out_dir / (Path(s).stem + ".o") for s in _RUNTIME_SOURCES]
    if all(o.is_file() for o in objects):
        return objects
    out_dir.mkdir(parents=True, exist_ok=True)
    for src, obj in zip(_RUNTIME_SOURCES, objects):
        tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
        _run_compiler(
            [cxx, *flags, "-I", str(root / "include"), "-c", str(root / "csrc/simt" / src), "-o", str(tmp)],
            verbose,
        )
        os.replace(tmp, obj)  # atomic: concurrent builds never see half-written objects
    return objects


def _read_source(source: Path) -> str:
    """The text of a .cu file; RuntimeError (reported as `smoe.simt: ...`, exit 2) for a directory,
    a missing or unreadable file, or bytes that are not UTF-8."""
    if source.is_dir():
        raise RuntimeError(f"{source} is a directory, not a CUDA source file")
    try:
        data = source.read_bytes()
    except OSError as e:
        raise RuntimeError(f"cannot read {source}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RuntimeError(
            f"{source} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
            "save it as UTF-8"
        ) from None


def compile_program(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    opt: str = "-O1",
    sanitize: bool = False,
    extra_flags: Iterable[str] = (),
    cxx: str | None = None,
    verbose: bool = False,
) -> Path:
    """Compiles a standalone .cu program for the emulator into the executable `output`."""
    root = find_root()
    source = Path(source).resolve()
    cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or "c++"
    flags = [*_BASE_FLAGS, opt]
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    flags += list(extra_flags)
    objects = _runtime_objects(root, cxx, flags, verbose)
    with tempfile.TemporaryDirectory(prefix="smoe-simt-") as tmp:
        rewritten = Path(tmp) / (source.stem + ".simt.cu")
        text = rewrite_source(_read_source(source))
        rewritten.write_text(f'#line 1 "{source}"\n' + text)
        _run_compiler(
            [
                cxx,
                *flags,
                "-x",
                "c++",
                "-include",
                "smoe/simt/simt.h",
                "-I",
                str(root / "include"),
                "-I",
                str(root / "include/smoe/simt/shim"),
                "-I",
                str(source.parent),
                "-c",
                str(rewritten),
                "-o",
                str(Path(tmp) / "main.o"),
            ],
            verbose,
        )
        _run_compiler(
            # -rdynamic: kernel names stay visible to dladdr for the emulator's error reports.
            [
                cxx,
                *flags,
                "-rdynamic",
                str(Path(tmp) / "main.o"),
                *map(str, objects),
                "-lpthread",
                "-ldl",
                "-o",
                str(output),
            ],
            verbose,
        )
    return Path(output)


def run(
    source: str | os.PathLike,
    args: Sequence[str] = (),
    *,
    schedule: str | None = None,
    parallel: bool | None = None,
    keep: str | os.PathLike | None = None,
    gdb: bool = False,
    **compile_kwargs,
) -> int:
    """Compiles `source` and runs it with `args`; returns the program's exit status.

    schedule: "forward", "reverse", "random" or "random:SEED" (sets SMOE_SIMT_SCHEDULE);
    parallel: run blocks on parallel OS threads (SMOE_SIMT_PARALLEL); keep: path to keep the
    executable at; gdb: run the program under gdb instead.
    """
    env = dict(os.environ)
    if schedule is not None:
        env["SMOE_SIMT_SCHEDULE"] = schedule
    if parallel is not None:
        env["SMOE_SIMT_PARALLEL"] = "1" if parallel else "0"
    with tempfile.TemporaryDirectory(prefix="smoe-simt-run-") as tmp:
        exe = Path(keep) if keep else Path(tmp) / Path(source).stem
        compile_program(source, exe, **compile_kwargs)
        cmd = [str(exe.resolve()), *args]
        if gdb:
            cmd = ["gdb", "--args", *cmd]
        status = subprocess.call(cmd, env=env)
    if status < 0:  # killed by a signal: say so, and report it the way a shell does
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        print(f"smoe.simt: {Path(source).name} was killed by {name}", file=sys.stderr)
        status = 128 - status
    return status


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m smoe.simt",
        description="Compile and run a CUDA program on the CPU with smoe's SIMT emulator.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "compile"):
        p = sub.add_parser(name, help=f"{name} FILE.cu")
        p.add_argument("file", help="the .cu source with kernels and a host main()")
        p.add_argument("-O", dest="opt", default="1", help="optimisation level (default 1)")
        p.add_argument("--asan", action="store_true", help="build with Address+UB sanitizers")
        p.add_argument("-v", "--verbose", action="store_true", help="print compiler commands")
        p.add_argument(
            "-X", dest="extra", action="append", default=[], help="extra compiler flag (repeatable), e.g. -X-DN=64"
        )
        if name == "run":
            p.add_argument("--schedule", help="forward | reverse | random[:SEED]")
            p.add_argument("--parallel", action="store_true", help="run blocks concurrently on OS threads")
            p.add_argument("--gdb", action="store_true", help="run under gdb")
            p.add_argument("--keep", help="keep the executable at this path")
            p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the program")
        else:
            p.add_argument("-o", dest="output", required=True, help="executable to write")
    ns = parser.parse_args(argv)
    common = dict(opt=f"-O{ns.opt}", sanitize=ns.asan, extra_flags=ns.extra, verbose=ns.verbose)
    try:
        if ns.command == "compile":
            compile_program(ns.file, ns.output, **common)
            return 0
        args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
        return run(
            ns.file, args, schedule=ns.schedule, parallel=ns.parallel or None, keep=ns.keep, gdb=ns.gdb, **common
        )
    except (RuntimeError, OSError, SyntaxError, ValueError) as e:
        print(f"smoe.simt: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
