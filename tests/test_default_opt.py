"""The precision-sensitive test files again at XLA's default optimisation level.

The suite compiles at LLVM -O0 and with XLA:CPU's older fusion emitters, for speed (the root
``conftest.py``); users compile with XLA's defaults, where a kernel may round its last bits
differently (e.g. fused multiply-adds).
The float32 paths whose tests look closest at rounding (the precision mode of problems, the
underflow-free norms, the lean backward against autodiff) run once more as users compile them,
in a child pytest on the core the test process leaves idle. Of ``test_lean.py`` only its float32
tests: the others check the lean backward's algebra in float64 (to 1e-10), not rounding, and
took 100 of this job's 200 s. Of ``test_precision.py`` only the maps: its other tests check
that float64 draws are the float32 draws cast, or that the x64 flag changes no float32 draw,
which holds by construction at any optimisation level (39 of this job's 157 s). And the
float64 Jacobian maps at the one shape where XLA:CPU's fusion emitters were found to miscompile
them (:mod:`gradflow.xla`), which the suite's flags switch off.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["tests/test_precision.py", "tests/test_underflow.py",
         "tests/test_lean.py::test_lean_float32",
         "tests/test_lean.py::test_lean_layer_equals_autodiff_every_cell_float32",
         "tests/test_jacobian.py::test_float64_maps_where_xla_cpu_miscompiles",
         "-k", "not (draws or casts or x64_flag or task_samples)"]


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


BOGUS = "--xla_gradflow_no_such_flag=1"


def _refusing_jax(env):
    """The flags the root conftest keeps when one of its own is refused, and its header."""
    show = ("import conftest; print(conftest.suite_xla_flags("
            f"'--xla_force_host_platform_device_count=2', '', "
            f"ours=('--xla_backend_optimization_level=0', '{BOGUS}')))")
    flags = subprocess.run([sys.executable, "-c", show], cwd=ROOT, capture_output=True,
                           text=True, env={**env, "XLA_FLAGS": "", "GRADFLOW_TEST_XLA_OPT": ""},
                           timeout=300)
    header = ("import conftest; conftest.TEST_XLA_FLAGS_REFUSED[:] = ['--xla_x=1']; "
              "print(conftest.pytest_report_header(None))")
    return flags, subprocess.run([sys.executable, "-c", header], cwd=ROOT, capture_output=True,
                                 text=True, env=env, timeout=300)


@pytest.mark.background(job=_refusing_jax)
def test_flags_a_jax_refuses_are_left_out_and_the_header_says_which(background):
    """An XLA that does not know a flag ends every JAX process at its first backend, status 1,
    mostly without a word (jaxlib 0.11.2 no longer knows --xla_cpu_use_fusion_emitters): the
    root conftest starts a JAX with its flags first and leaves out each one it fails on. Here
    one of the suite's flags is one no XLA knows; real JAX processes answer."""
    r, header = background
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str((
        ["--xla_force_host_platform_device_count=2", "--xla_backend_optimization_level=0"],
        [BOGUS]))
    assert header.stdout.strip().endswith("(left out, a JAX started with it fails: --xla_x=1)")
