"""The precision-sensitive test files again at XLA's default optimisation level.

The suite compiles at LLVM -O0 and with XLA:CPU's older fusion emitters, for speed (the root
``conftest.py``); users compile with XLA's defaults, where a kernel may round its last bits
differently (e.g. fused multiply-adds).
The float32 paths whose tests look closest at rounding (the precision mode of problems, the
underflow-free norms, the lean backward against autodiff) run once more as users compile them,
in a child pytest on the core the test process leaves idle.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["tests/test_precision.py", "tests/test_underflow.py", "tests/test_lean.py"]


def _default_level(env):
    env = {**env, "GRADFLOW_TEST_XLA_OPT": "default"}  # the root conftest.py drops its flags
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *FILES], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)


@pytest.mark.background(job=_default_level)
def test_precision_tests_pass_at_the_default_optimisation_level(background):
    r = background
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in last and "failed" not in last and "error" not in last, last


@pytest.mark.parametrize("mode, given, expected", [
    ("", "", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"),
    ("", "--xla_backend_optimization_level=2",
     "--xla_backend_optimization_level=2 --xla_cpu_use_fusion_emitters=false"),
    ("default", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                "--xla_force_host_platform_device_count=2",
     "--xla_force_host_platform_device_count=2"),
])
def test_the_suite_adds_its_compile_flags_and_the_default_mode_drops_them(mode, given, expected):
    env = {**os.environ, "XLA_FLAGS": given, "GRADFLOW_TEST_XLA_OPT": mode}
    show = "import conftest, os; print(os.environ['XLA_FLAGS'])"
    r = subprocess.run([sys.executable, "-c", show], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == expected
