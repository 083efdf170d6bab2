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

The child lane: a test marked ``@pytest.mark.child`` (or a module with ``pytestmark =
pytest.mark.child``) whose work is all in this process runs instead in one child ``pytest``
process, the background lane's last job, so it too uses the core the test process leaves idle;
here it is an item at the end of the run that reports the child's outcome for it (its failure
text, its skip reason). A test that also has a background job stays here (its work is in the
lane already), and a run whose every test is marked runs them here (nothing to overlap with).

Hypothesis tests (function-scoped fixtures do not mix with ``@given``) enter
``jax.enable_x64(True)`` in their body instead.
"""
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
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
CHILD = "GRADFLOW_TEST_CHILD_OUTCOMES"  # set in the child lane's process: where it writes them
_OUTCOMES = {}  # in that process: nodeid -> {"outcome", "text"}


def pytest_configure(config):
    config.addinivalue_line("markers", "background(job=fn): run fn (the test's other-process work) "
                                       "in a background thread from collection on")
    config.addinivalue_line("markers", "child: run the test in the child lane's pytest process "
                                       "(tests/conftest.py)")
    # JAX's CPU backend starts now, with one device, whichever test comes first: a CLI test run
    # first would start it with one device per core (gradflow.cli's speed settings), and every
    # later test in that process would split its maps over them (a test-order dependence: an
    # atlas condition measured alone then differed from its group in the last bits)
    jax.devices()


class ChildOutcome(pytest.Item):
    """Where a test run by the child lane stood: reports the child's outcome for it."""

    def runtest(self):
        outcomes, tail = _result("child lane")
        got = outcomes.get(self.nodeid)
        if got is None:
            pytest.fail(f"the child lane did not run this test; its output ends:\n{tail}",
                        pytrace=False)
        if got["outcome"] == "skipped":
            pytest.skip(got["text"])
        if got["outcome"] != "passed":
            pytest.fail(f"in the child lane's process ({got['outcome']}):\n{got['text']}",
                        pytrace=False)

    def reportinfo(self):
        return self.path, None, f"{self.name} (child lane)"


def _child_lane(nodeids, env):
    """Run ``nodeids`` in one child pytest process; ``(nodeid -> outcome, output's tail)``."""
    with tempfile.TemporaryDirectory(prefix="gradflow-tests-child-") as folder:
        wanted, outcomes = Path(folder) / "nodeids.json", Path(folder) / "outcomes.json"
        wanted.write_text(json.dumps(nodeids))
        files = sorted({n.split("::")[0] for n in nodeids})
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
            env={**env, CHILD: str(outcomes), CHILD + "_WANTED": str(wanted)},
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        tail = (done.stdout + done.stderr)[-4000:]
        return (json.loads(outcomes.read_text()) if outcomes.exists() else {}), tail


def _timed(nodeid, fn, **kw):
    start = time.perf_counter()
    try:
        return fn(**kw)
    finally:
        _LANE["times"][nodeid] = (start - _LANE["start"], time.perf_counter() - _LANE["start"])


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: deselected tests start nothing
def pytest_collection_modifyitems(config, items):
    if config.option.collectonly:  # --collect-only runs nothing
        return
    if CHILD in os.environ:  # the child lane's process: the tests asked for, nothing in the lane
        wanted = set(json.loads(Path(os.environ[CHILD + "_WANTED"]).read_text()))
        items[:] = [item for item in items if item.nodeid in wanted]
        return
    moved = [item for item in items if item.get_closest_marker("child")
             and not item.get_closest_marker("background")]
    if len(moved) == len(items):
        moved = []
    if moved:
        ids = {item.nodeid for item in moved}
        items[:] = ([item for item in items if item.nodeid not in ids]
                    + [ChildOutcome.from_parent(item.parent, name=item.name) for item in moved])
    marked = [(item, m.kwargs["job"]) for item in items for m in item.iter_markers("background")]
    if not marked and not moved:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradflow-tests-background")
    env = dict(os.environ)  # tests running meanwhile may change os.environ; jobs see this
    _LANE["start"] = time.perf_counter()
    for item, fn in marked:
        given = {**getattr(getattr(item, "callspec", None), "params", {}), "env": env}
        names = inspect.signature(fn).parameters
        _JOBS[item.nodeid] = pool.submit(_timed, item.nodeid, fn,
                                         **{k: v for k, v in given.items() if k in names})
    if moved:  # last: the tests that wait for the jobs above come first
        _JOBS["child lane"] = pool.submit(_timed, f"child lane ({len(moved)} tests)", _child_lane,
                                          nodeids=sorted(ids), env=env)
    pool.shutdown(wait=False)  # the queued jobs still run; nothing new is accepted


def pytest_runtest_logreport(report):
    """In the child lane's process: keep each test's outcome (written out at the session's end)."""
    if CHILD not in os.environ:
        return
    got = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "text": ""})
    if report.failed:
        got.update(outcome="failed" if report.when == "call" else f"error in {report.when}",
                   text=report.longreprtext)
    elif report.skipped and got["outcome"] == "passed":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        got.update(outcome="skipped", text=reason)


def pytest_sessionfinish(session):
    if CHILD in os.environ:
        Path(os.environ[CHILD]).write_text(json.dumps(_OUTCOMES))


def _result(key):
    start = time.perf_counter()
    try:
        return _JOBS[key].result()
    finally:
        _LANE["waits"].append(time.perf_counter() - start)


@pytest.fixture
def background(request):
    """The return value of this test's ``@pytest.mark.background(job=fn)`` job (waits for it)."""
    return _result(request.node.nodeid)


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
    longest = sorted(times.items(), key=lambda kv: kv[1][0] - kv[1][1])[:6]
    if longest:
        terminalreporter.write_line("gradflow: its longest jobs: " + "; ".join(
            f"{name.split('::')[-1]} {end - start:.0f} s" for name, (start, end) in longest))
