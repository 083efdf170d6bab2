"""Fixtures of the test suite (the root ``conftest.py`` sets up matplotlib and the doctest
namespace). JAX runs in its default 32-bit mode.

The suite runs in the mode a user gets (``jax_enable_x64`` off), so every float32 path is
tested at 32 bits. A test that needs float64 asks for it:

* ``x64``: 64-bit JAX for one test (``jax.enable_x64`` context, undone afterwards);
* ``x64_module``: the same for a whole module, for module-scoped fixtures that compute in
  float64 (use it with ``pytestmark = pytest.mark.usefixtures("x64_module")``).

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


@pytest.fixture(scope="module")
def x64_module():
    """64-bit JAX for every test (and module-scoped fixture) of a module."""
    with jax.enable_x64(True):
        yield
