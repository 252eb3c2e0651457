"""The Hugging Face tests under a transformers 5.x interpreter (fused expert layout).

test_hf.py runs with whichever transformers this interpreter has. When that is 4.x, this test runs
test_hf.py (and test_hf_experts.py, which needs 5.x) again in a side environment that has transformers 5.x and the same torch, named by
$SMOE_TF5_PYTHON (default build/tf5/bin/python of the repository, which scripts/setup.sh creates with
`python -m venv --system-site-packages build/tf5 && build/tf5/bin/pip install 'transformers>=5,<6'`).
It skips when no such interpreter exists.
"""

import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TF5_PYTHON = os.environ.get(
    "SMOE_TF5_PYTHON", os.path.join(os.path.dirname(os.path.dirname(HERE)), "build", "tf5", "bin", "python")
)


def _version(python):
    out = subprocess.run(
        [python, "-c", "import transformers, torch; print(transformers.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout.split() if out.returncode == 0 else None


def _run_under_tf5(test_file):
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("this interpreter already has transformers 5.x: test_hf.py covers the 5.x layout directly")
    if not os.path.exists(TF5_PYTHON):
        pytest.skip(f"no transformers 5.x interpreter at {TF5_PYTHON} (set SMOE_TF5_PYTHON)")
    versions = _version(TF5_PYTHON)
    if versions is None or int(versions[0].split(".")[0]) < 5:
        pytest.skip(f"{TF5_PYTHON} does not import transformers 5.x (got {versions})")
    import torch

    assert versions[1] == torch.__version__, "the 5.x environment must use this interpreter's torch"
    # smoe's own directory only: this interpreter's site-packages (transformers 4.x) must not shadow the
    # 5.x environment's (which sees the shared torch through --system-site-packages).
    import smoe

    smoe_dir = os.path.dirname(os.path.dirname(os.path.abspath(smoe.__file__)))
    env = dict(os.environ, PYTHONPATH=smoe_dir)
    proc = subprocess.run(
        [TF5_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, test_file)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=HERE,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    check = subprocess.run(
        [TF5_PYTHON, "-c", "import transformers, smoe; print(transformers.__version__, smoe.__file__)"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert check.stdout.split()[0].startswith("5.") and check.stdout.split()[1].startswith(smoe_dir), check.stdout
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2], tail


def test_hf_blocks_in_transformers_5_layout():
    _run_under_tf5("test_hf.py")


def test_smoe_experts_backend_under_transformers_5():
    """test_hf_experts.py (the ExpertsInterface backend) needs transformers 5.x."""
    _run_under_tf5("test_hf_experts.py")


def test_hf_block_families_under_transformers_5():
    """test_hf_families.py (every block family, whole-model patching) in the 5.x layouts."""
    _run_under_tf5("test_hf_families.py")
