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

``"vertical_gain"`` (SPEC section 4 item 2): :func:`vertical_gain`, the local vertical gain of
every layer of deep stacks at initialisation against the closed forms :data:`VERTICAL_GAIN`
(keys ``cells, layers, steps, hidden, batch, seed, init, dtype, input_scale``).
``"gate_saturation"`` (item 3, Gu et al. 2020): :func:`gate_saturation`, gate statistics of
``(label, cell, options)`` entries at initialisation, drawn as pooled histograms of the gate
named per entry in ``"gates"`` (keys ``entries, gates, layers, steps, hidden, batch, seed,
dtype, input_scale, eps, bins``).

``"training_runs"`` (items 3-5 after training): :func:`training_runs`, several cells trained on
one task with one seed, learning curves plus gate statistics or gradient maps recorded at the
first and last step, and, for time-gated cells, the update fraction against the final result
(keys ``runs, task, task_options, layers, hidden, steps, batch, lr, clip, seed, dtype,
eval_every, eval_batch, record, record_batch, eps, bins, gates``).

Training helpers shared by the ``train`` CLI and the notebooks: :func:`task_stack` (the stack
for a cell on a task) and :func:`draw_curves` (learning curves of ``History.curve`` results).
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


def from_config(fn: Callable[..., Result], keys: tuple, first: str | None = None):
    """A ``Builder.compute`` calling ``fn([config[first],] **{k: config[k] for k in keys},
    meta=rest)``: the config keys ``fn`` takes are passed (where present), every other key
    (``figure``, ``title``, ``description``, drawing options) is recorded as ``meta``."""
    taken = set(keys) | {first}

    def compute(config: dict) -> Result:
        meta = {k: v for k, v in config.items() if k not in taken}
        args = (config[first],) if first is not None else ()
        return fn(*args, **{k: config[k] for k in keys if k in config}, meta=meta)

    return compute


_GRID_KEYS = ("cells", "losses", "wrt", "layers", "steps", "hidden", "batch", "seed",
              "readout_seed", "init", "dtype", "input_scale", "cell_options")


def _grid_draw(config: dict, data: Result):
    return draw_grid(data, normalize=bool(config.get("normalize", False)),
                     title=config.get("title"))


register("gradient_grid", from_config(gradient_grid, _GRID_KEYS), _grid_draw)


# ---------------------------------------------------------------------------------------------
# Vertical gains against depth (SPEC section 4 item 2)

#: Closed-form vertical RMS gains :math:`\|\partial h^l_t/\partial h^{l-1}_t\|_F/\sqrt H` at
#: orthogonal init, zero biases and inputs near 0 (every gate at :math:`\sigma(0) = 1/2`,
#: every tanh at slope 1): tanh RNN :math:`W` (1), LSTM :math:`o\,i\,W_g` (1/4),
#: GRU :math:`(1-z) W_n` (1/2), STAR :math:`k W_z` (1/2).
VERTICAL_GAIN = {"rnn": 1.0, "lstm": 0.25, "gru": 0.5, "star": 0.5}


def vertical_gain(cells=("rnn", "lstm", "gru", "star"), *, layers: int = 64, steps: int = 4,
                  hidden: int = 32, batch: int = 4, seed: int = 0, init: str = "orthogonal",
                  dtype: str = "float32", input_scale: float = 0.01,
                  meta: dict | None = None) -> Result:
    r"""Local gains (:func:`gradflow.jacobian.local_gains`) of several cells at every depth.

    Returns:
      Result ``kind="vertical_gain"``: ``"{stat}/{cell}": (L, T)`` for ``stat`` in
      ``vertical_rms, vertical_spectral, temporal_rms, temporal_spectral``;
      ``config["closed_form"]`` holds :data:`VERTICAL_GAIN` for the cells that have one.
    """
    from gradflow.jacobian import local_gains

    cells = _names(cells, "cells", _cells.names())
    arrays = {}
    with precision(dtype):
        for cell in cells:
            prob = cell_problem(cell, layers=layers, steps=steps, hidden=hidden, batch=batch,
                                seed=seed, dtype=dtype, init=init, input_scale=input_scale)
            res = local_gains(prob.stack, prob.params, prob.xs)
            for k, v in res.arrays.items():
                arrays[f"{k}/{cell}"] = v
    config = {**(meta or {}), "cells": list(cells), "layers": layers, "steps": steps,
              "hidden": hidden, "batch": batch, "seed": seed, "init": init, "dtype": dtype,
              "input_scale": input_scale,
              "closed_form": {c: VERTICAL_GAIN[c] for c in cells if c in VERTICAL_GAIN}}
    return make_result("vertical_gain", arrays, config)


def gain_panel(data: Result, cell: str) -> Result:
    """One cell's ``local_gains`` Result out of a :func:`vertical_gain` result."""
    keys = ("vertical_rms", "vertical_spectral", "temporal_rms", "temporal_spectral")
    return make_result("local_gains", {k: data[f"{k}/{cell}"] for k in keys},
                       {**data.config, "cell": cell}, warn=False)


_GAIN_KEYS = ("cells", "layers", "steps", "hidden", "batch", "seed", "init", "dtype",
              "input_scale")


def _gain_draw(config: dict, data: Result):
    refs = {}
    for c, v in data.config["closed_form"].items():
        refs.setdefault(v, []).append(c)
    return plot.gain_profile({c: gain_panel(data, c) for c in data.config["cells"]},
                             reference={"/".join(cs): v for v, cs in refs.items()},
                             band=True, title=config.get("title"))


register("vertical_gain", from_config(vertical_gain, _GAIN_KEYS), _gain_draw)


# ---------------------------------------------------------------------------------------------
# Gate saturation at initialisation (SPEC section 4 item 3, Gu et al. 2020)


def _entries(entries) -> list:
    return [(str(label), str(cell), dict(opts)) for label, cell, opts in entries]


def gate_saturation(entries, *, layers: int = 2, steps: int = 32, hidden: int = 64,
                    batch: int = 16, seed: int = 0, dtype: str = "float32",
                    input_scale: float = 1.0, eps: float = 0.05, bins: int = 20,
                    meta: dict | None = None) -> Result:
    """:func:`gradflow.gates.compare` of ``(label, cell, options)`` entries at initialisation,
    as one Result: every array of entry ``label``'s ``gate_stats`` under ``"{label}/..."``;
    ``config["stats"][label]`` holds its config. :func:`stats_panel` takes one back out."""
    from gradflow import gates as _gates

    entries = _entries(entries)
    with precision(dtype):
        found = _gates.compare(entries, layers=layers, steps=steps, hidden=hidden, batch=batch,
                               seed=seed, dtype=dtype, input_scale=input_scale, eps=eps,
                               bins=bins)
    arrays = {f"{label}/{k}": v for label, r in found.items() for k, v in r.arrays.items()}
    config = {**(meta or {}), "entries": [list(e) for e in entries], "layers": layers,
              "steps": steps, "hidden": hidden, "batch": batch, "seed": seed, "dtype": dtype,
              "input_scale": input_scale, "eps": eps, "bins": bins,
              "stats": {label: r.config for label, r in found.items()}}
    return make_result("gate_saturation", arrays, config)


def _unpack(data: Result, prefix: str, kind: str, config: dict) -> Result:
    """The arrays of ``data`` under ``prefix`` (stripped) as a Result of ``kind``."""
    return make_result(kind, {k[len(prefix):]: v for k, v in data.arrays.items()
                              if k.startswith(prefix)}, config, warn=False)


def stats_panel(data: Result, label: str) -> Result:
    """Entry ``label``'s ``gate_stats`` Result out of a :func:`gate_saturation` result."""
    if label not in data.config["stats"]:
        raise ValueError(f"no entry {label!r}; valid: {', '.join(data.config['stats'])}")
    return _unpack(data, f"{label}/", "gate_stats", data.config["stats"][label])


def draw_gate_panels(panels: dict, gates: dict, title: str | None = None, *, fig=None):
    """Rows = ``panels`` (``{row label: {entry label: gate_stats}}``), columns = entries; each
    panel the pooled histogram of the entry's gate ``gates[entry]`` with its saturated
    fraction in the title. Drawn into ``fig`` (a Figure or SubFigure) if given."""
    from gradflow import gates as _gates

    rows = list(panels)
    cols = list(next(iter(panels.values())))
    fig = fig if fig is not None else _figure((3.6 * len(cols), 2.9 * len(rows)))
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for i, row in enumerate(rows):
        for j, label in enumerate(cols):
            stats, gate = panels[row][label], gates[label]
            s = _gates.summary(stats)[gate]
            plot.gate_histograms(stats, gate, layers="pooled", ax=axes[i, j],
                                 title=f"{label}, gate {gate} ({row})\nsaturated "
                                       f"{s['saturated']:.2f}, mean {s['mean']:.2f}")
    if title:
        fig.suptitle(title)
    return fig


_SAT_KEYS = ("layers", "steps", "hidden", "batch", "seed", "dtype", "input_scale", "eps", "bins")


def _sat_draw(config: dict, data: Result):
    labels = list(data.config["stats"])
    gates = {label: config.get("gates", {}).get(label, "f") for label in labels}
    return draw_gate_panels({"init": {label: stats_panel(data, label) for label in labels}},
                            gates, title=config.get("title"))


register("gate_saturation", from_config(gate_saturation, _SAT_KEYS, "entries"), _sat_draw)


# ---------------------------------------------------------------------------------------------
# Training runs (SPEC section 4 items 3-5): stacks for tasks, learning curves


def task_stack(cell: str, task, *, layers: int, hidden: int, init: str | None = None,
               options: dict | None = None, cell_steps: int | None = None):
    """The :class:`gradflow.Stack` a training run of ``cell`` on ``task`` uses: ``layers`` x
    ``hidden``, reading the task's ``input_size`` features (projected to ``hidden`` where the
    cell needs it). A cell with a ``steps`` option (``g_lstm``) gets ``cell_steps`` (default:
    the task's length ``T``) unless ``options`` set it.

    Raises:
      ValueError: unknown cell or option.
    """
    from gradflow import tasks as _tasks
    from gradflow.stack import Stack

    if isinstance(task, str):
        task = _tasks.make(task)
    options = dict(options or {})
    if init is not None:
        options.setdefault("init", init)
    if "steps" in dict(_cells.get(cell).options) and "steps" not in options:
        options["steps"] = task.steps if cell_steps is None else int(cell_steps)
    return Stack(cell, layers, task.input_size, hidden, **options)


def _smooth(v: np.ndarray, width: int) -> np.ndarray:
    """Running mean over ``width`` steps (shorter at the start); non-finite entries skipped."""
    v = np.asarray(v, float)
    ok = np.isfinite(v)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(i - width, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c[i] - c[lo]) / (n[i] - n[lo])


def _figure(size):
    """A new constrained-layout Figure with an Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def draw_curves(curves: dict, *, title: str | None = None, smooth: int = 20, fig=None):
    """Learning curves of ``{label: training Result}`` (``History.curve``): left, the training
    loss (running mean over ``smooth`` steps, faint: raw) and the evaluation loss (markers),
    log scale; right, the evaluation metric (accuracy or MSE) against the step. Drawn into
    ``fig`` (a Figure or SubFigure) if given."""
    fig = fig if fig is not None else _figure((11, 3.6))
    ax_loss, ax_metric = fig.subplots(1, 2)
    metric = "metric"
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i}"
        metric = c.config.get("metric", metric)
        ax_loss.plot(c["step"], c["loss"], color=color, alpha=0.15, linewidth=0.8)
        ax_loss.plot(c["step"], _smooth(c["loss"], smooth), color=color, linewidth=1.2,
                     label=f"{label} (train, mean of {smooth})")
        ax_loss.plot(c["eval_step"], c["eval_loss"], "o--", color=color, markersize=3,
                     linewidth=0.8, label=f"{label} (eval)")
        ax_metric.plot(c["eval_step"], c["eval_metric"], "o-", color=color, markersize=3,
                       label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize="x-small")
    ax_metric.set_xlabel("training step")
    ax_metric.set_ylabel(f"eval {metric}")
    if metric == "mse":
        ax_metric.set_yscale("log")
    ax_metric.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------
# Training runs as figures (SPEC section 4 items 3-5 after training, the deep-stack comparison)

#: What :func:`training_runs` can record at the first and the last step of every run.
RECORDS = ("gates", "map")


def _runs(runs) -> list:
    out = []
    for r in runs:
        if not isinstance(r, (list, tuple)) or len(r) not in (3, 4):
            raise ValueError(f"training runs are [label, cell, options] or [label, cell, "
                             f"options, training options] lists, got {r!r}")
        label, cell, opts = str(r[0]), str(r[1]), dict(r[2])
        extra = dict(r[3]) if len(r) == 4 else {}
        bad = sorted(set(extra) - {"budget", "curriculum", "lr", "cell_steps"})
        if bad:
            raise ValueError(f"run {label!r}: unknown training option(s) {', '.join(bad)}; "
                             "valid: budget, curriculum, cell_steps, lr")
        out.append((label, cell, opts, extra))
    if len({r[0] for r in out}) != len(out):
        raise ValueError("training run labels must be unique")
    return out


def training_runs(runs, *, task: str = "adding", task_options: dict | None = None,
                  layers: int = 2, hidden: int = 32, steps: int = 500, batch: int = 64,
                  lr: float = 3e-3, clip: float = 1.0, seed: int = 0, dtype: str = "float32",
                  eval_every: int | None = None, eval_batch: int = 256, record=(),
                  record_batch: int = 64, eps: float = 0.05, bins: int = 20,
                  meta: dict | None = None) -> Result:
    r"""Train several stacks on one task with one seed (:func:`gradflow.train.train`: Adam,
    gradient clip, fresh batches, a fixed evaluation batch) and record measurements at the
    first and the last step.

    Args:
      runs: ``[label, cell, options]`` or ``[label, cell, options, training]`` entries;
        ``options`` are cell options (``init``, ``mode``, ...), ``training`` per-run overrides
        of ``budget`` (g-LSTM :math:`\lambda\,\mathrm{mean}(k)`), ``curriculum``
        (``[[until_step, seq_len], ...]``), ``cell_steps`` (the length the time gates are
        initialised over, e.g. the first curriculum stage) and ``lr``.
      task, task_options: :func:`gradflow.tasks.make` arguments.
      layers, hidden: every run's stack (:func:`task_stack`).
      steps, batch, lr, clip, seed, dtype, eval_every, eval_batch: :func:`gradflow.train.train`.
      record: a subset of :data:`RECORDS`: ``"gates"``, :func:`gradflow.gates.saturation` with
        ``eps`` and ``bins``; ``"map"``, the hidden-state gradient map under the probe loss
        ``"last"`` (the random readout of ``gradflow heatmap``, so maps at both steps compare),
        each on the first ``record_batch`` evaluation sequences.
    Returns:
      Result ``kind="training_runs"``: ``"{label}/curve/{name}"`` (every array of the run's
      ``History.curve``), ``"{label}/{record}@{step}/{name}"`` (every array of each record);
      ``config["runs"][label]`` is the curve's config and ``config["records"][label]`` maps
      ``"{record}@{step}"`` to the record's config. :func:`run_curve` and :func:`run_record`
      take them back out.
    """
    from gradflow import gates as _gates
    from gradflow import tasks as _tasks
    from gradflow.train import train

    runs = _runs(runs)
    record = _names(record, "record", RECORDS) if record else []
    the_task = _tasks.make(task, **(task_options or {}))
    fns = {"gates": lambda s, p, x: _gates.saturation(s, p, x, eps, bins=bins),
           "map": lambda s, p, x: gradient_map(s, p, x, loss="last", wrt="hidden")}
    arrays, run_configs, record_configs = {}, {}, {}
    with precision(dtype):
        for label, cell, opts, extra in runs:
            stack = task_stack(cell, the_task, layers=layers, hidden=hidden, options=opts,
                               cell_steps=extra.get("cell_steps"))
            hist = train(stack, the_task, steps=steps, batch=batch, lr=extra.get("lr", lr),
                         clip=clip, seed=seed, dtype=dtype, eval_every=eval_every,
                         eval_batch=eval_batch, record_at=(0, steps) if record else (),
                         record={k: fns[k] for k in record} or None,
                         record_batch=record_batch, budget=extra.get("budget", 0.0),
                         curriculum=extra.get("curriculum"), progress=False)
            arrays.update({f"{label}/curve/{k}": v for k, v in hist.curve.arrays.items()})
            run_configs[label] = hist.curve.config
            record_configs[label] = {}
            for name, results in hist.records.items():
                for step, res in zip(hist.record_steps, results):
                    key = f"{name}@{step}"
                    arrays.update({f"{label}/{key}/{k}": v for k, v in res.arrays.items()})
                    record_configs[label][key] = {**res.config, "result_kind": res.kind}
    config = {**(meta or {}), "runs_spec": [list(r) for r in runs], "task": task,
              "task_options": dict(task_options or {}), "layers": layers, "hidden": hidden,
              "steps": steps, "batch": batch, "lr": lr, "clip": clip, "seed": seed,
              "dtype": dtype, "eval_every": eval_every, "eval_batch": eval_batch,
              "record": list(record), "record_batch": record_batch, "eps": eps, "bins": bins,
              "runs": run_configs, "records": record_configs}
    return make_result("training_runs", arrays, config)


def run_curve(data: Result, label: str) -> Result:
    """Run ``label``'s learning curve (a ``History.curve`` Result) out of :func:`training_runs`."""
    if label not in data.config["runs"]:
        raise ValueError(f"no run {label!r}; valid: {', '.join(data.config['runs'])}")
    return _unpack(data, f"{label}/curve/", "training", data.config["runs"][label])


def run_record(data: Result, label: str, record: str, step="last") -> Result:
    """Run ``label``'s ``record`` (``"gates"`` or ``"map"``) at ``step`` (an int, ``"first"``
    or ``"last"``) out of :func:`training_runs`."""
    if label not in data.config["runs"]:
        raise ValueError(f"no run {label!r}; valid: {', '.join(data.config['runs'])}")
    found = data.config["records"][label]
    steps = sorted(int(k.split("@")[1]) for k in found if k.split("@")[0] == record)
    if not steps:
        raise ValueError(f"run {label!r} recorded no {record!r}; recorded: "
                         f"{', '.join(sorted(found)) or 'nothing'}")
    step = {"first": steps[0], "last": steps[-1]}.get(step, step)
    key = f"{record}@{step}"
    if key not in found:
        raise ValueError(f"run {label!r} has no {record!r} at step {step!r}; steps: {steps}")
    cfg = dict(found[key])
    return _unpack(data, f"{label}/{key}/", cfg.pop("result_kind"), cfg)


def draw_updates(curves: dict, ax=None, title: str | None = None):
    """Compute against accuracy: for every run, the fraction of neuron updates at the end of
    training (time gate ``k > 1e-3``; 1 for cells without a time gate, which update every
    neuron at every step) against the final evaluation metric."""
    if ax is None:
        ax = _figure((5, 3.6)).subplots()
    metric = "metric"
    for i, (label, c) in enumerate(curves.items()):
        metric = c.config.get("metric", metric)
        frac = float(c["eval_updates"][-1]) if "eval_updates" in c.arrays else 1.0
        ax.plot([frac], [float(c["eval_metric"][-1])], "o", color=f"C{i}", label=label)
        ax.annotate(f"{frac:.3g}", (frac, float(c["eval_metric"][-1])), fontsize="x-small",
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("fraction of neuron updates (k > 1e-3) at the end")
    ax.set_ylabel(f"final eval {metric}")
    if metric == "mse":
        ax.set_yscale("log")
    ax.legend(fontsize="x-small")
    ax.set_title(title or "compute vs result")
    return ax.figure


_TRAIN_KEYS = ("task", "task_options", "layers", "hidden", "steps", "batch", "lr", "clip",
               "seed", "dtype", "eval_every", "eval_batch", "record", "record_batch", "eps",
               "bins")


def _train_draw(config: dict, data: Result):
    labels = list(data.config["runs"])
    curves = {label: run_curve(data, label) for label in labels}
    timed = any("eval_updates" in c.arrays for c in curves.values())
    gated = "gates" in data.config["record"]
    gates = config.get("gates", {})
    n_gate = len(labels) if gated else 0
    fig = _figure((max(11.0, 3.6 * n_gate), 3.6 * (1 + timed) + 5.8 * gated))
    subs = fig.subfigures(1 + timed + gated, 1, squeeze=False,
                          height_ratios=[3.6] + [3.6] * timed + [5.8] * gated)[:, 0]
    draw_curves(curves, fig=subs[0], title="learning curves")
    if timed:
        draw_updates(curves, ax=subs[1].subplots(), title="update fraction vs final result")
    if gated:
        acc = {label: f"{float(curves[label]['eval_metric'][-1]):.3g}" for label in labels}
        panels = {f"step {s}": {label: run_record(data, label, "gates", which)
                                for label in labels}
                  for s, which in ((0, "first"), (data.config["steps"], "last"))}
        draw_gate_panels(panels, {label: gates.get(label, "f") for label in labels},
                         fig=subs[-1], title="gate activations, pooled over layers; final eval "
                         + ", ".join(f"{k}: {v}" for k, v in acc.items()))
    if config.get("title"):
        fig.suptitle(config["title"])
    return fig


register("training_runs", from_config(training_runs, _TRAIN_KEYS, "runs"), _train_draw)


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


def figure_data(name: str, config_dir=None, **overrides) -> Result:
    """The data of figure ``name``: without ``overrides``, the committed ``<name>.npz`` beside
    its config (as :func:`reproduce` wrote it); with them, the config with those keys replaced,
    computed now (e.g. ``figure_data("deep_adding", steps=20, layers=2)`` for a quick run).

    Raises:
      ValueError: unknown figure (the message lists the valid ones), or committed data missing.
    """
    found = configs(config_dir)
    if name not in found:
        raise ValueError(f"unknown figure {name!r}; valid: {', '.join(found)}")
    if not overrides:
        path = found[name].with_suffix(".npz")
        if not path.exists():
            raise ValueError(f"figure {name!r} has no data yet: run gradflow reproduce --only "
                             f"{name}")
        return Result.load(path)
    config = {**load_config(found[name]), **overrides}
    return BUILDERS[config["figure"]].compute(config)


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


__all__ = ["BUILDERS", "Builder", "FIGURES_DIR", "VERTICAL_GAIN", "build", "cell_problem",
           "configs", "figure_data", "draw_curves", "draw_updates", "from_config", "RECORDS", "run_curve", "run_record",
           "training_runs", "draw_gate_panels", "draw_grid", "gain_panel", "gate_saturation",
           "gradient_grid", "load_config", "panel", "precision", "register", "reproduce",
           "stats_panel", "task_stack", "vertical_gain"]
