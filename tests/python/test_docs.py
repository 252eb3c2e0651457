"""Every ```python block of README.md and docs/**/*.md runs as written (the teaching path, docs/tutorial/).

Discovery is automatic: a page added to docs/ is covered without editing this file. The blocks of one
page run in order in one fresh interpreter (one namespace, like a reader pasting them into a REPL), with
the working directory a temporary folder and MPLBACKEND=Agg. A block that cannot run on a CPU-only
machine in a few seconds (it needs a GPU, a download, several processes) is fenced as
```python no-run: <reason>; the reason is required, and this test checks it is there.
"""

import glob
import os
import re
import subprocess
import sys

import pytest
from conftest import subprocess_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```\s*$", re.M | re.S)
NO_RUN = re.compile(r"^\s*no-run\s*:\s*\S")


def pages():
    found = [os.path.join(ROOT, "README.md")] + sorted(
        glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    )
    return [p for p in found if os.path.exists(p)]


def blocks(path):
    """[(line, info, code)] of the ```python blocks of a page."""
    with open(path) as f:
        text = f.read()
    return [(text[: m.start()].count("\n") + 1, m.group("info").strip(), m.group("code")) for m in FENCE.finditer(text)]


def test_discovery_covers_every_docs_page():
    names = {os.path.relpath(p, ROOT) for p in pages()}
    assert "README.md" in names
    on_disk = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)}
    assert on_disk <= names
    assert any(n.startswith(os.path.join("docs", "tutorial")) for n in names)


def test_fence_parser():
    sample = "x\n```python\na = 1\n```\n```python no-run: needs a GPU\nb = 2\n```\n```bash\nls\n```\n"
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "smoe_docs_parser_sample.md")
    with open(path, "w") as f:
        f.write(sample)
    got = blocks(path)
    os.remove(path)
    assert [(info, code) for _, info, code in got] == [("", "a = 1\n"), ("no-run: needs a GPU", "b = 2\n")]


_RUNNER = r"""
import sys, traceback
blocks = __import__("json").loads(sys.stdin.read())
ns = {"__name__": "__main__"}
for line, code in blocks:
    try:
        exec(compile(code, f"{sys.argv[1]}:{line}", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED block at line {line}", file=sys.stderr)
        sys.exit(1)
print(f"ran {len(blocks)} blocks")
"""


@pytest.mark.parametrize("page", pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_page_code_runs(page, tmp_path):
    import json

    runnable = []
    for line, info, code in blocks(page):
        if info.startswith("no-run"):
            assert NO_RUN.match(info), f"{page}:{line}: a no-run block must say why (```python no-run: <reason>)"
            continue
        assert info == "", f"{page}:{line}: unknown fence info {info!r} (use ```python or ```python no-run: <reason>)"
        runnable.append((line, code))
    if not runnable:
        pytest.skip("no runnable python blocks on this page")
    env = subprocess_env(MPLBACKEND="Agg")
    # Blocks read files as a reader in the repository root would (docs/...); they write into tmp_path.
    (tmp_path / "docs").symlink_to(os.path.join(ROOT, "docs"))
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, os.path.relpath(page, ROOT)],
        input=json.dumps(runnable),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
