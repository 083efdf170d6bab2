r"""Reproducible figures: a JSON config in, a PNG and its data (``.npz``) out.

Every figure in ``figures/`` is a JSON file naming its builder in the ``"figure"`` field and
holding everything that produced it (cells, sizes, seeds, losses, ...). :func:`reproduce` reads
the configs and writes, next to each (or into ``out_dir``), ``<stem>.png`` and ``<stem>.npz``
(a :class:`gradflow.results.Result`, so ``gradflow.load`` reads the numbers back and a test can
check a figure's claim on the very data that was drawn).

A builder is a :class:`Builder`, two pure functions::

    compute(config: dict) -> Result          # the numbers
    draw(config: dict, data: Result) -> Figure

registered under a name with :func:`register`; adding a figure kind is one function pair and one
``register`` line, adding a figure of an existing kind is one JSON file.

Built in: ``"gradient_grid"``, the layout of the STAR paper's Figure 2 (Turkoglu et al. 2021):
rows = losses, columns = cells, each panel the map
:math:`P[l,t] = \mathrm{mean}_\theta |\partial\mathcal L/\partial\theta^l_{(t)}|` (or another
``wrt``) of :func:`gradflow.jacobian.gradient_map`, on a log colour scale. Config keys::

    {"figure": "gradient_grid", "cells": ["rnn", "lstm", "star"], "losses": ["last", "all"],
     "wrt": "params", "layers": 10, "steps": 10, "hidden": 128, "batch": 16, "seed": 0,
     "readout_seed": 0, "init": "orthogonal", "dtype": "float32", "input_scale": 1.0,
     "cell_options": {"g_lstm": {"steps": 10}}, "normalize": true, "title": "..."}
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np

from gradflow import cells as _cells
from gradflow import plot
from gradflow.jacobian import LOSSES, WRTS, gradient_map
from gradflow.problem import DTYPES, Problem, problem
from gradflow.results import Result, make_result

#: The repository's ``figures/`` folder (the package is installed editable from the repo).
FIGURES_DIR = Path(__file__).resolve().parent.parent / "figures"


# ---------------------------------------------------------------------------------------------
# Problems built the same way by the CLI and the figures


def cell_problem(cell: str, *, layers: int, steps: int, hidden: int, batch: int = 16,
                 seed: int = 0, dtype: str = "float32", init: str | None = None,
                 input_size: int | None = None, input_scale: float = 1.0,
                 input_projection: bool | None = None, options: dict | None = None) -> Problem:
    """:func:`gradflow.problem.problem` for a named cell, with its options applied to the cell.

    ``init`` (when given) and ``options`` become cell options. A cell with a ``steps`` option
    (``g_lstm``: ``μ ~ U[0, steps)``) gets the problem's ``steps`` unless ``options`` set it, as
    SPEC section 1 initialises it from the sequence length ``T``. The cell is built before the
    problem, so its options cannot clash with :func:`problem`'s own keywords.

    Raises:
      ValueError: unknown cell or option, or sizes the cell cannot take (refined cells need
        ``hidden``-wide layer inputs: ``input_projection=False`` with ``input_size != hidden``).
    """
    options = dict(options or {})
    if init is not None:
        options.setdefault("init", init)
    if "steps" in dict(_cells.get(cell).options) and "steps" not in options:
        options["steps"] = steps
    built = _cells.get(cell, **options)
    stack_options = {} if input_projection is None else {"input_projection": input_projection}
    return problem(built, layers=layers, steps=steps, hidden=hidden, batch=batch,
                   input_size=input_size, seed=seed, dtype=dtype, input_scale=input_scale,
                   stack_options=stack_options)


def precision(dtype: str):
    """Run float32 work in 32-bit mode and float64 work in 64-bit mode.

    The default readout draws its labels with ``jax.random.randint``'s default integer type,
    which follows ``jax_enable_x64``; pinning the mode makes a float32 map the same number
    whether it is computed from the CLI (32-bit) or from a test or notebook that enabled x64.
    """
    return jax.enable_x64(dtype == "float64")


# ---------------------------------------------------------------------------------------------
# Grids of gradient maps (STAR Fig. 2 layout)


def _keys(loss: str, label: str) -> tuple[str, str]:
    return f"values/{loss}/{label}", f"loss_value/{loss}/{label}"


def gradient_grid(cells, losses=("last", "all"), *, wrt: str = "params", layers: int = 10,
                  steps: int = 10, hidden: int = 128, batch: int = 16, seed: int = 0,
                  readout_seed: int = 0, init: str | None = "orthogonal",
                  dtype: str = "float32", input_scale: float = 1.0,
                  cell_options: dict | None = None, meta: dict | None = None) -> Result:
    r"""Gradient maps of several cells under several losses, all on the same problem.

    For each cell and loss: :func:`gradflow.jacobian.gradient_map` (``(L, T)`` map, ``wrt`` as
    there) on :func:`cell_problem` with the given sizes and seed, so every cell sees the same
    inputs ``xs ~ input_scale * N(0, 1)`` and the same readout.

    Args:
      cells: cell names (unique).
      losses: ``"last"`` and/or ``"all"``.
      cell_options: ``{cell: {option: value}}`` applied to that cell (over ``init``).
      meta: extra config recorded in the result.
    Returns:
      Result ``kind="gradient_grid"``: arrays ``"values/{loss}/{cell}": (L, T)`` and
      ``"loss_value/{loss}/{cell}": ()``; ``config["maps"]["{loss}/{cell}"]`` holds each map's
      full config, ``config["cells"]``, ``config["losses"]`` the order.
    """
    cells = _names(cells, "cells", _cells.names())
    losses = _names(losses, "losses", LOSSES)
    if wrt not in WRTS:
        raise ValueError(f"unknown wrt {wrt!r}; valid: {', '.join(WRTS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    cell_options = dict(cell_options or {})
    unknown = sorted(set(cell_options) - set(cells))
    if unknown:
        raise ValueError(f"cell_options for cells not in the grid: {', '.join(unknown)}")
    arrays, maps = {}, {}
    with precision(dtype):
        for cell in cells:
            prob = cell_problem(cell, layers=layers, steps=steps, hidden=hidden, batch=batch,
                                seed=seed, dtype=dtype, init=init, input_scale=input_scale,
                                options=cell_options.get(cell))
            for loss in losses:
                res = gradient_map(prob.stack, prob.params, prob.xs, loss=loss, wrt=wrt,
                                   readout_seed=readout_seed, meta=prob.config)
                key, value_key = _keys(loss, cell)
                arrays[key], arrays[value_key] = res.values, res.loss_value
                maps[f"{loss}/{cell}"] = res.config
    config = {**(meta or {}), "cells": list(cells), "losses": list(losses), "wrt": wrt,
              "layers": layers, "steps": steps, "hidden": hidden, "batch": batch, "seed": seed,
              "readout_seed": readout_seed, "init": init, "dtype": dtype,
              "input_scale": input_scale, "cell_options": cell_options, "maps": maps}
    return make_result("gradient_grid", arrays, config)


def _names(value, what: str, valid) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f"{what} is empty; valid: {', '.join(valid)}")
    for item in items:
        if item not in valid:
            raise ValueError(f"unknown {what[:-1]} {item!r} in {what}; valid: {', '.join(valid)}")
    dup = sorted({x for x in items if items.count(x) > 1})
    if dup:
        raise ValueError(f"{what} repeats {', '.join(dup)}")
    return items


def panel(grid: Result, loss: str, cell: str) -> Result:
    """One ``gradient_map`` Result (``values: (L, T)``) out of a :func:`gradient_grid` result."""
    key, value_key = _keys(loss, cell)
    if key not in grid.arrays:
        raise ValueError(f"no map for loss {loss!r} and cell {cell!r}; the grid has "
                         f"{', '.join(grid.config['maps'])}")
    return make_result("gradient_map", {"values": grid[key], "loss_value": grid[value_key]},
                       grid.config["maps"][f"{loss}/{cell}"], warn=False)


def draw_grid(grid: Result, *, normalize: bool = False, title: str | None = None):
    """The STAR Fig. 2 layout of a :func:`gradient_grid` result: rows losses, columns cells,
    one shared log colour scale (with ``normalize``, each map over its own top-last value).

    With ``normalize``, a map whose top-last value is 0 or non-finite has nothing to be
    relative to: its panel is left empty with a note saying so, instead of failing the figure.
    """
    cells, losses = grid.config["cells"], grid.config["losses"]
    panels, empty = {}, []
    for i, loss in enumerate(losses):
        for j, cell in enumerate(cells):
            p = panel(grid, loss, cell)
            ref = float(p.values[-1, -1])
            if normalize and not (math.isfinite(ref) and ref > 0):
                zeros = int(np.sum(p.values == 0))
                note = (f"all {zeros} entries are 0" if zeros == p.values.size
                        else f"top-last value is {ref:g}")
                empty.append((i, j, cell, note))
            else:
                panels[(f"loss={loss}", cell)] = p
    fig = plot.grid(panels, rows=[f"loss={loss}" for loss in losses], cols=cells,
                    normalize=normalize, title=title)
    for i, j, cell, note in empty:
        ax = fig.axes[i * len(cells) + j]  # the panels come first, row by row
        ax.text(0.5, 0.5, f"{cell}:\n{note};\nnothing to normalise by", ha="center",
                va="center", transform=ax.transAxes)
        if i == 0:
            ax.set_title(cell)
    return fig


# ---------------------------------------------------------------------------------------------
# The registry


class Builder(NamedTuple):
    """How to make one kind of figure from its config."""

    compute: Callable[[dict], Result]
    draw: Callable[[dict, Result], object]


BUILDERS: dict[str, Builder] = {}


def register(name: str, compute: Callable[[dict], Result],
             draw: Callable[[dict, Result], object]) -> Builder:
    """Register a figure kind: configs with ``"figure": name`` are built by these functions."""
    BUILDERS[name] = Builder(compute, draw)
    return BUILDERS[name]


_GRID_KEYS = ("cells", "losses", "wrt", "layers", "steps", "hidden", "batch", "seed",
              "readout_seed", "init", "dtype", "input_scale", "cell_options")


def _grid_compute(config: dict) -> Result:
    meta = {k: v for k, v in config.items() if k not in _GRID_KEYS}
    return gradient_grid(**{k: config[k] for k in _GRID_KEYS if k in config}, meta=meta)


def _grid_draw(config: dict, data: Result):
    return draw_grid(data, normalize=bool(config.get("normalize", False)),
                     title=config.get("title"))


register("gradient_grid", _grid_compute, _grid_draw)


# ---------------------------------------------------------------------------------------------
# Configs and reproduction


def configs(directory=None) -> dict[str, Path]:
    """``{stem: path}`` of the figure configs (``*.json`` with a ``"figure"`` field) in
    ``directory`` (default :data:`FIGURES_DIR`), sorted by name."""
    directory = Path(FIGURES_DIR if directory is None else directory)
    if not directory.is_dir():
        raise ValueError(f"figure config directory {str(directory)!r} does not exist")
    out = {}
    for path in sorted(directory.glob("*.json")):
        if "figure" in load_config(path):
            out[path.stem] = path
    return out


def load_config(path) -> dict:
    """A figure config from JSON; a ValueError when unreadable or of an unknown kind."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read figure config {str(path)!r}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"figure config {str(path)!r} must hold a JSON object")
    kind = config.get("figure")
    if kind is not None and kind not in BUILDERS:
        raise ValueError(f"figure config {str(path)!r} names unknown figure kind {kind!r}; "
                         f"known: {', '.join(sorted(BUILDERS))}")
    return config


def build(config: dict) -> tuple[Result, object]:
    """``(data, figure)`` for one config."""
    builder = BUILDERS[config["figure"]]
    data = builder.compute(config)
    return data, builder.draw(config, data)


def reproduce(only=None, config_dir=None, out_dir=None, log: Callable[[str], None] = print,
              dpi: float = 150) -> list[str]:
    """Regenerate figures from their configs: ``<stem>.png`` and ``<stem>.npz`` per config.

    Args:
      only: a stem or list of stems (default: every config in ``config_dir``).
      config_dir: where the ``*.json`` configs are (default :data:`FIGURES_DIR`).
      out_dir: where to write (default: beside each config); must exist.
      log: called with one line per written file.
    Returns:
      The written paths.
    """
    found = configs(config_dir)
    if not found:
        raise ValueError(f"no figure configs (*.json with a 'figure' field) in "
                         f"{str(config_dir or FIGURES_DIR)!r}")
    names = list(found) if only is None else ([only] if isinstance(only, str) else list(only))
    for name in names:
        if name not in found:
            raise ValueError(f"unknown figure {name!r}; valid: {', '.join(found)}")
    if out_dir is not None and not os.path.isdir(out_dir):
        raise ValueError(f"output directory {str(out_dir)!r} does not exist")
    written = []
    for name in names:
        config = load_config(found[name])
        target = Path(out_dir) if out_dir is not None else found[name].parent
        builder = BUILDERS[config["figure"]]
        data = builder.compute(config)
        # The data first: a figure that cannot be drawn must not cost the computation.
        for path in (data.save(target / f"{name}.npz"),
                     plot.save(builder.draw(config, data), target / f"{name}.png", dpi=dpi)):
            written.append(str(path))
            log(f"wrote {path}")
    return written


__all__ = ["BUILDERS", "Builder", "FIGURES_DIR", "build", "cell_problem", "configs", "draw_grid",
           "gradient_grid", "load_config", "panel", "precision", "register", "reproduce"]
