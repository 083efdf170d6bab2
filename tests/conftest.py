"""Fixtures of the test suite (the root ``conftest.py`` sets up matplotlib and the doctest
namespace). JAX runs in its default 32-bit mode.

The suite runs in the mode a user gets (``jax_enable_x64`` off), so every float32 path is
tested at 32 bits. A test that needs float64 asks for it:

``x64``: 64-bit JAX for one test (a ``jax.enable_x64`` context, undone afterwards).
``run_readme_block``: run the README's one ``python`` block holding a marker string.
``background``: the result of the test's ``@pytest.mark.background(job=fn)`` job.

Background jobs: a test whose work is mostly another process (a child with simulated devices,
an installed copy of the package, a notebook kernel) marks that part
``@pytest.mark.background(job=fn)``; ``fn`` (called with the test's parameters it names, and
``env``, the environment as it was at collection, if it names that) starts when the test is
collected, in one background thread, so those processes run on the core the test process leaves
idle, and the test asserts on its ``background`` result when its turn comes. Deselected tests
start nothing.

Hypothesis tests (function-scoped fixtures do not mix with ``@given``) enter
``jax.enable_x64(True)`` in their body instead.
"""
import inspect
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def x64():
    """64-bit JAX for the duration of one test."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Each test module starts from empty JAX caches, so the suite's one long process does not
    carry every module's compiled programs (memory) or traces into the next module."""
    yield
    jax.clear_caches()


@pytest.fixture
def run_readme_block():
    """``run(marker) -> namespace``: execute, as written, the one ``python`` code block of
    README.md that contains ``marker``, and return the names it defined."""
    def run(marker: str) -> dict:
        blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                  if marker in b]
        assert len(blocks) == 1, f"{len(blocks)} README python blocks contain {marker!r}"
        ns = {"__name__": "readme"}
        exec(compile(blocks[0], str(README), "exec"), ns)
        return ns
    return run


_JOBS = {}
_LANE = {"times": {}, "waits": []}  # job -> (start, end) after collection; the tests' waits


def pytest_configure(config):
    config.addinivalue_line("markers", "background(job=fn): run fn (the test's other-process work) "
                                       "in a background thread from collection on")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: deselected tests start nothing
def pytest_collection_modifyitems(config, items):
    marked = [(item, m.kwargs["job"]) for item in items for m in item.iter_markers("background")]
    if not marked or config.option.collectonly:  # --collect-only runs nothing
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradflow-tests-background")
    env = dict(os.environ)  # tests running meanwhile may change os.environ; jobs see this
    _LANE["start"] = time.perf_counter()

    def timed(nodeid, fn, **kw):
        start = time.perf_counter()
        try:
            return fn(**kw)
        finally:
            _LANE["times"][nodeid] = (start - _LANE["start"], time.perf_counter() - _LANE["start"])
    for item, fn in marked:
        given = {**getattr(getattr(item, "callspec", None), "params", {}), "env": env}
        names = inspect.signature(fn).parameters
        _JOBS[item.nodeid] = pool.submit(timed, item.nodeid, fn,
                                         **{k: v for k, v in given.items() if k in names})
    pool.shutdown(wait=False)  # the queued jobs still run; nothing new is accepted


@pytest.fixture
def background(request):
    """The return value of this test's ``@pytest.mark.background(job=fn)`` job (waits for it)."""
    start = time.perf_counter()
    try:
        return _JOBS[request.node.nodeid].result()
    finally:
        _LANE["waits"].append(time.perf_counter() - start)


def pytest_terminal_summary(terminalreporter):
    """One line on the background lane's balance: its busy time, when it finished, and how
    long tests waited for it (a lane that finishes early has room for more other-process work;
    waits mean it has too much)."""
    times = _LANE["times"]
    if times:
        busy = sum(end - start for start, end in times.values())
        terminalreporter.write_line(
            f"gradflow: background lane: {len(times)} jobs, busy {busy:.0f} s, done "
            f"{max(end for _, end in times.values()):.0f} s after collection; tests waited "
            f"{sum(_LANE['waits']):.0f} s for it")
