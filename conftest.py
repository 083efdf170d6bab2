"""Test setup shared by the suite (``tests/``) and the docstring examples (``gradflow/``, run
with ``--doctest-modules``): headless matplotlib, and the names every docstring example may use
without importing them, ``gradflow``, ``jax``, ``jnp`` and ``np``. JAX stays in its default
32-bit mode; ``tests/conftest.py`` has the fixtures that turn on 64 bits for one test."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gradflow  # noqa: E402

# ``python -m gradflow`` runs the CLI when imported: not a module to collect doctests from.
collect_ignore = ["gradflow/__main__.py"]


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(gradflow=gradflow, jax=jax, jnp=jnp, np=np)
