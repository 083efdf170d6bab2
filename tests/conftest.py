"""Fixtures of the test suite (the root ``conftest.py`` sets up matplotlib and the doctest
namespace). JAX runs in its default 32-bit mode.

The suite runs in the mode a user gets (``jax_enable_x64`` off), so every float32 path is
tested at 32 bits. A test that needs float64 asks for it:

``x64``: 64-bit JAX for one test (a ``jax.enable_x64`` context, undone afterwards).

Hypothesis tests (function-scoped fixtures do not mix with ``@given``) enter
``jax.enable_x64(True)`` in their body instead.
"""
import jax
import pytest


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
