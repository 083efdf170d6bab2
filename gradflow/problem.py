"""A measurement problem from a seed: a stack, its parameters at init, and Gaussian inputs.

The one place where "same seed, same config" becomes "same numbers": the CLI, the figures and
the notebooks all build their problems here, and every result records ``Problem.config``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradflow import cells as _cells
from gradflow.stack import Stack

DTYPES = ("float32", "float64")


class Problem(NamedTuple):
    """``stack``, ``params`` (at init), ``xs: (B, T, D)`` inputs, and the JSON-able ``config``."""

    stack: Stack
    params: dict
    xs: jax.Array
    config: dict


def dtype_of(name) -> jnp.dtype:
    """``"float32"``/``"float64"`` -> dtype; float64 needs ``jax_enable_x64`` (checked here)."""
    if str(name) not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    if str(name) == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs 64-bit JAX: call "
                         "jax.config.update('jax_enable_x64', True) first")
    return jnp.dtype(str(name))


def problem(cell="lstm", *, layers: int = 10, steps: int = 10, hidden: int = 128,
            batch: int = 16, input_size: int | None = None, seed: int = 0,
            dtype: str = "float32", input_scale: float = 1.0, stack_options: dict | None = None,
            **cell_options) -> Problem:
    """Build a measurement problem.

    Args:
      cell: cell name or :class:`gradflow.cells.Cell`; ``cell_options`` are passed to it
        (e.g. ``init="orthogonal"``, ``forget_bias=1.0``). A cell with a ``steps`` option
        (``g_lstm``: ``μ ~ U[0, steps)``) gets the problem's ``steps``; pass a built ``Cell``
        to initialise it over another length.
      layers, steps, hidden, batch: ``L, T, H, B``.
      input_size: ``D`` (default ``H``).
      seed: parameters from ``key(seed)``, inputs ``input_scale * N(0, 1)`` from ``key(seed + 1)``.
      stack_options: extra :class:`Stack` options (``order``, ``checkpoint``, ...).
    Returns:
      :class:`Problem` with ``xs: (B, T, D)``.
    """
    from gradflow.stack import _positive_int

    steps = _positive_int("steps", steps)
    batch = _positive_int("batch", batch)
    hidden = _positive_int("hidden", hidden)
    D = hidden if input_size is None else input_size
    dt = dtype_of(dtype)
    if isinstance(cell, str) and "steps" in dict(_cells.get(cell).options):
        cell_options["steps"] = steps  # g_lstm's time gates are initialised over the sequence
    stack = Stack(cell, layers, D, hidden, **(stack_options or {}), **cell_options)
    params = stack.init(jax.random.key(seed), dt)
    xs = input_scale * jax.random.normal(jax.random.key(seed + 1), (batch, steps, D), dt)
    config = {**stack.config, "steps": steps, "batch": batch, "seed": int(seed),
              "dtype": str(dt), "input_scale": float(input_scale)}
    return Problem(stack, params, xs, config)
