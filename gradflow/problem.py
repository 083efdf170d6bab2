"""Problems: a stack, its parameters at init and Gaussian inputs, all from a seed.

The one place where "same seed, same config" becomes "same numbers": the CLI, the experiments,
the figures and the notebooks all build their problems here (:func:`problem`, :func:`cell_problem`
for a named cell with options, :func:`task_stack` for a training run), run them at the
:func:`precision` of their dtype, and every result records ``Problem.config``.
"""
from __future__ import annotations

from typing import NamedTuple

import inspect
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import cells as _cells
from gradflow import cost as _cost
from gradflow.cells.base import normal
from gradflow import checks as _checks
from gradflow.checks import positive_int
from gradflow.stack import Stack

DTYPES = _checks.DTYPES


class Problem(NamedTuple):
    """``stack``, ``params`` (at init), ``xs: (B, T, D)`` inputs, and the JSON-able ``config``."""

    stack: Stack
    params: dict
    xs: jax.Array
    config: dict


def dtype_of(name) -> jnp.dtype:
    """``"float32"``/``"float64"`` -> dtype; float64 needs ``jax_enable_x64`` (checked here,
    :func:`gradflow.checks.float_dtype`)."""
    return _checks.float_dtype(name)


def gaussian_inputs(seed, shape, dtype=jnp.float32, scale: float = 1.0):
    """``scale * N(0, 1)`` inputs of ``shape`` (e.g. ``(B, T, D)``) from ``key(seed + 1)``.

    Drawn in float32 and cast to ``dtype``, so that one seed is one problem at every precision
    (a float64 problem holds the float32 problem's draws). ``seed`` may be traced.

    >>> gaussian_inputs(0, (2, 3, 4)).shape
    (2, 3, 4)
    """
    shape = tuple(shape)
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0
               for n in shape):
        raise ValueError(f"shape must be non-negative integers, got {shape}")
    if not isinstance(scale, jax.core.Tracer) and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return scale * normal(jax.random.key(seed + 1), shape, dtype)


def check_input_scale(scale, dtype) -> float:
    """``scale`` if ``scale * N(0, 1)`` inputs stay finite in ``dtype``, else a ValueError
    (``1e39`` overflows float32 to inf)."""
    dt = np.dtype(dtype)  # (a check of the number: no 64-bit JAX needed for float64's)
    top = float(np.finfo(dt).max) / 16  # N(0, 1) draws stay far below 16
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not abs(scale) < top:
        raise ValueError(f"input_scale must be a finite number below {top:.2g} (scale * N(0, 1) "
                         f"in {dt.name}), got {scale!r}")
    return float(scale)


def problem_stack(cell="lstm", *, layers: int = 10, steps: int = 10, hidden: int = 128,
                  batch: int = 16, input_size: int | None = None, dtype: str = "float32",
                  input_scale: float = 1.0, stack_options: dict | None = None,
                  **cell_options) -> Stack:
    """The :class:`Stack` of :func:`problem` (same arguments, but no seed), with every check
    :func:`problem` makes of the names, options and sizes, and nothing drawn: a caller can
    check a whole plan of problems before computing any (:mod:`gradflow.experiments`).

    Raises:
      ValueError: as :func:`problem`.
    """
    steps = positive_int("steps", steps)
    batch = positive_int("batch", batch)
    if isinstance(hidden, (list, tuple)):  # one width per layer: the Stack checks them
        hidden = list(hidden)
        D = input_size
        if D is None:
            D = positive_int("hidden[0]", hidden[0]) if hidden else 1
    else:
        hidden = positive_int("hidden", hidden)
        D = hidden if input_size is None else input_size
    dt = dtype_of(dtype)
    if isinstance(cell, str):  # g_lstm's time gates are initialised over the sequence
        cell = _cells.for_length(cell, steps, **cell_options)
    elif cell_options:
        raise ValueError("cell options cannot be given together with a built Cell")
    stack = Stack(cell, layers, D, hidden, **(stack_options or {}))
    _cost.check_arrays_fit(stack, batch, steps, dt)
    check_input_scale(input_scale, dt)
    return stack


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
      layers, steps, hidden, batch: ``L, T, H, B`` (``hidden`` may list one width per layer,
        see :class:`gradflow.Stack`).
      input_size: ``D`` (default ``H``, the first layer's width).
      seed: parameters from ``key(seed)``, inputs ``input_scale * N(0, 1)`` from ``key(seed + 1)``
        (:func:`gaussian_inputs`), all drawn in float32 and cast to ``dtype``: the same problem
        at every precision. An integer in ``[0, 2**31 - 1)``.
      dtype: of the parameters and inputs: ``"float32"`` or ``"float64"`` (or the dtype itself,
        ``jnp.float32``; :data:`DTYPES`); float64 needs ``jax_enable_x64``, and float16/bfloat16
        are refused (:func:`gradflow.checks.float_dtype`).
      input_scale: the inputs' scale, a finite real number whose magnitude is below
        ``finfo(dtype).max / 16``, so that ``input_scale * N(0, 1)`` stays finite
        (:func:`check_input_scale`; 0 and negative scales are accepted).
      stack_options: extra :class:`Stack` options (``order``, ``checkpoint``, ...).
    Returns:
      :class:`Problem` with ``xs: (B, T, D)``.
    Raises:
      ValueError: bad sizes or options, or parameters and inputs larger than the memory
        available (before anything is allocated; the message names what would fit).
    """
    seed = _checks.seed("seed", seed)
    stack = problem_stack(cell, layers=layers, steps=steps, hidden=hidden, batch=batch,
                          input_size=input_size, dtype=dtype, input_scale=input_scale,
                          stack_options=stack_options, **cell_options)
    dt, D = dtype_of(dtype), stack.input_size
    params = stack.init(jax.random.key(seed), dt)
    xs = gaussian_inputs(seed, (batch, steps, D), dt, input_scale)
    config = {**stack.config, "steps": steps, "batch": batch, "seed": int(seed),
              "dtype": str(dt), "input_scale": float(input_scale)}
    return Problem(stack, params, xs, config)


def precision(dtype: str):
    """A context that runs float32 work in 32-bit mode and float64 work in 64-bit mode.

    The default readout draws its labels with ``jax.random.randint``'s default integer type,
    which follows ``jax_enable_x64``; pinning the mode makes a float32 map the same number
    whether it is computed from the CLI (32-bit) or from a test or notebook that enabled x64.

    >>> with precision("float64"):
    ...     jnp.zeros(2).dtype == jnp.float64
    True
    """
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _checks.DTYPES:  # float_dtype's message (16 bits: why not)
        _checks.float_dtype(dtype)
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_checks.DTYPES)}")
    return jax.enable_x64(name == "float64")


def _cell_options(init: str | None, options: dict | None) -> dict:
    """Cell options with ``init`` (when given) applied unless ``options`` set one already."""
    options = dict(options or {})
    if init is not None:
        options.setdefault("init", init)
    return options


def cell_problem(cell, *, layers: int, steps: int, hidden: int, batch: int = 16,
                 seed: int | None = 0, dtype: str = "float32", init: str | None = None,
                 input_size: int | None = None, input_scale: float = 1.0,
                 input_projection: bool | None = None, options: dict | None = None):
    """:func:`problem` for a named cell (or one written with options, ``"lstm:forget_bias=1.0"``:
    those win), with ``init`` and ``options`` applied to the cell; or for a list of them, one
    per layer (a built :class:`gradflow.cells.Cell` among them is taken as it is)
    (``seed=None``: its checked :class:`Stack` only, :func:`problem_stack`, nothing drawn).

    The cell is built first (:func:`gradflow.cells.for_length`: a cell with a
    ``length_option``, g-LSTM's ``steps``, is initialised over the problem's ``steps`` unless
    ``options`` set it), so its options cannot clash with :func:`problem`'s own keywords.

    >>> p = cell_problem("g_lstm", layers=2, steps=7, hidden=4, batch=3)
    >>> p.xs.shape, p.stack.cell.config["steps"]
    ((3, 7, 4), 7)
    >>> cell_problem(["gru", "gru", "star"], layers=3, steps=7, hidden=4).stack.config["cell"]
    ['gru', 'gru', 'star']

    Raises:
      ValueError: unknown cell or option, or sizes the cell cannot take (refined cells need
        ``hidden``-wide layer inputs: ``input_projection=False`` with ``input_size != hidden``).
    """
    built = _built(cell, steps, _cell_options(init, options))
    stack_options = {} if input_projection is None else {"input_projection": input_projection}
    if seed is None:  # the plan only (see problem_stack)
        return problem_stack(built, layers=layers, steps=steps, hidden=hidden, batch=batch,
                             input_size=input_size, dtype=dtype, input_scale=input_scale,
                             stack_options=stack_options)
    return problem(built, layers=layers, steps=steps, hidden=hidden, batch=batch,
                   input_size=input_size, seed=seed, dtype=dtype, input_scale=input_scale,
                   stack_options=stack_options)


def task_stack(cell, task, *, layers: int, hidden: int, init: str | None = None,
               options: dict | None = None, cell_steps: int | None = None) -> Stack:
    """The :class:`gradflow.Stack` a training run of ``cell`` on ``task`` uses: ``layers`` x
    ``hidden``, reading the task's ``input_size`` features (projected to ``hidden`` where the
    cell needs it). A cell with a ``length_option`` (g-LSTM) is initialised over
    ``cell_steps`` (default: the task's length ``T``) unless ``options`` set it. ``cell`` may
    list one cell per layer, as :func:`cell_problem`'s.

    >>> task_stack("g_lstm", "adding", layers=2, hidden=8, cell_steps=20).cell.config["steps"]
    20
    >>> task_stack(["gru", "star"], "adding", layers=2, hidden=8).config["cell"]
    ['gru', 'star']

    Raises:
      ValueError: unknown cell, task or option.
    """
    from gradflow import tasks as _tasks

    if isinstance(task, str):
        task = _tasks.make(task)
    length = task.steps if cell_steps is None else int(cell_steps)
    return Stack(_built(cell, length, _cell_options(init, options)), layers, task.input_size,
                 hidden)


def _built(cell, steps: int, options: dict):
    """``cell`` (a name, a Cell, or a list of those, one per layer) built for ``steps`` with
    ``options`` (:func:`gradflow.cells.for_length`; a built Cell is taken as it is)."""
    if isinstance(cell, (list, tuple)):
        return tuple(c if isinstance(c, _cells.Cell) else _cells.for_length(c, steps, **options)
                     for c in cell)
    return _cells.for_length(cell, steps, **options)


__all__ = ["DTYPES", "Problem", "cell_problem", "check_input_scale", "dtype_of",
           "gaussian_inputs", "precision", "problem", "problem_stack", "task_stack"]


# ``gradflow.problem`` is both this module and its function :func:`problem`: importing the
# submodule rebinds the package attribute to the module (the package loads its names lazily),
# so the module itself forwards calls to :func:`problem` and shows its signature and docstring
# to ``inspect.signature``, ``help()`` and IDEs (a ``__doc__`` property replaces a class
# docstring, hence this comment); its names, ``cell_problem`` and the rest, stay the module's.
class _CallableModule(type(jax)):

    def __call__(self, *args, **kwargs) -> Problem:
        return problem(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(problem)

    @property  # a data descriptor: it wins over the module's own ``__doc__``
    def __doc__(self) -> str:
        return problem.__doc__


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
