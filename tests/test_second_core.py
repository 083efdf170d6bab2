"""Heavy test files run in a child pytest on the core the test process leaves idle.

The suite's process works on one core; the background jobs (``tests/conftest.py``) keep the
second busy for about the first half of a run and then leave it idle (on a 2-core Zen 1, 1315 s
in all: 2.0 cores busy for the first 11 minutes, 1.1 for the last 11). The files in ``FILES``,
self-contained and mostly compiling (about 290 s of one core there), run in a child pytest
started at collection, and the test process leaves them out (``tests/conftest.py`` deselects
them whenever this test is selected). Their failures are this test's failure, with the child's
report. Run a file of ``FILES`` by name (``pytest tests/test_jacobian.py``) or deselect this
test (``-k 'not second_core'``) to see it in the test process itself.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["tests/test_jacobian.py", "tests/test_adapters.py"]


def _child(env):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                           *FILES], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)


@pytest.mark.background(job=_child)
def test_files_on_the_second_core_pass(background):
    r = background
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in last and "failed" not in last and "error" not in last, last
