"""Test setup shared by the suite (``tests/``) and the docstring examples (``gradflow/``, run
with ``--doctest-modules``): headless matplotlib, and the names every docstring example may use
without importing them, ``gradflow``, ``jax``, ``jnp`` and ``np``. JAX stays in its default
32-bit mode; ``tests/conftest.py`` has the fixtures that turn on 64 bits for one test."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

# The suite compiles about six thousand small XLA programs; compiling them is two thirds of its
# time, and two settings halve that while changing nothing the tests check beyond the last bits
# of float32 sums: LLVM at -O0 (the whole suite passed at both levels: 841 tests, 902 s at XLA's
# default level, 618 s at -O0, 2 cores), and XLA:CPU's older element-wise emitters instead of its
# MLIR fusion emitters (test_lean.py and test_stack.py: 110 s of compiling instead of 48 s, 94 s
# instead of 159 s in all; the MLIR pipeline costs about 0.1 s per small program). So the suite
# compiles with TEST_XLA_FLAGS unless XLA_FLAGS already sets one of them, and leaves out any that
# a JAX started with fails on: an XLA that does not know a flag ends every process at its first
# backend, status 1, mostly without a word (jaxlib 0.11.2, CPU and CUDA builds, no longer knows
# --xla_cpu_use_fusion_emitters: seen on an H200 machine, 2026-12-04); the header says which. With
# GRADFLOW_TEST_XLA_OPT=default it compiles as users do, without them (tests/test_default_opt.py
# reruns the precision-sensitive files that way, in a child that inherits the flags).
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _jax_starts(flags) -> bool:
    """Whether a fresh Python starts a JAX backend with ``XLA_FLAGS`` set to ``flags``."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                          env={**os.environ, "XLA_FLAGS": " ".join(flags)},
                          capture_output=True, timeout=300).returncode == 0


def suite_xla_flags(given: str, mode: str, ours=TEST_XLA_FLAGS):
    """``(the suite's XLA_FLAGS, those of ours left out)``, from the ``XLA_FLAGS`` and
    ``GRADFLOW_TEST_XLA_OPT`` given: ours added where not given, none of ours in the default
    mode; each of ours a JAX started with fails on is left out (asked only when all together
    fail, so a process pays one probe)."""
    names = {t.split("=")[0] for t in ours}
    flags = given.split()
    if mode == "default":
        return [f for f in flags if f.split("=")[0] not in names], []
    named = {f.split("=")[0] for f in flags}
    added = [t for t in ours if t.split("=")[0] not in named]
    if not added or _jax_starts(flags + added):
        return flags + added, []
    refused = [t for t in added if not _jax_starts(flags + [t])] or added
    return flags + [t for t in added if t not in refused], refused


_flags, TEST_XLA_FLAGS_REFUSED = suite_xla_flags(os.environ.get("XLA_FLAGS", ""),
                                                 os.environ.get("GRADFLOW_TEST_XLA_OPT", ""))
os.environ["XLA_FLAGS"] = " ".join(_flags)

# Programs that recur across test modules (each starts from empty in-memory caches) and in the
# suite's child processes (CLI runs, notebooks, simulated devices: they inherit the variables)
# compile once: JAX's persistent compilation cache, in a fresh folder per run unless one is
# set. On 3 modules (test_jacobian, test_widths, test_cli) 299 s instead of 335 s, 2 cores.
# Its key covers XLA_FLAGS, so the default-level reruns (tests/test_default_opt.py) get their own.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _CACHE = tempfile.mkdtemp(prefix="gradflow-tests-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gradflow  # noqa: E402

# ``python -m gradflow`` runs the CLI when imported: not a module to collect doctests from;
# tests/data's scripts wrote the reference data with PyTorch, which the suite does not install.
collect_ignore = ["gradflow/__main__.py", "tests/data"]


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(gradflow=gradflow, jax=jax, jnp=jnp, np=np)


def pytest_report_header(config):
    left_out = (f" (left out, a JAX started with it fails: {' '.join(TEST_XLA_FLAGS_REFUSED)})"
                if TEST_XLA_FLAGS_REFUSED else "")
    return f"gradflow: XLA_FLAGS={os.environ['XLA_FLAGS']!r}{left_out}"
