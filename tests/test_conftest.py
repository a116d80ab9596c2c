"""tests/conftest.py pins every test, and every subprocess a test starts, to one thread: results
that sum floats over threads then do not depend on the machine's core count or load."""

import os
import subprocess
import sys

import torch


def test_this_process_runs_one_thread():
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"


def test_subprocesses_inherit_one_thread():
    code = "import torch; print(torch.get_num_threads())"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
