r"""Experiments over several cells: each computes and returns one :class:`Result`, and draws nothing.

An experiment runs a measurement (:mod:`gradflow.jacobian`, :mod:`gradflow.gates`,
:func:`gradflow.train.train`) on several problems built the same way (:mod:`gradflow.problem`)
and packs the per-problem Results into one Result whose array names carry the problem
(``"values/{loss}/{cell}"``, ``"{label}/..."``), so one ``.npz`` holds a whole figure's numbers.
The unpacking functions (:func:`panel`, :func:`gain_panel`, :func:`stats_panel`,
:func:`run_curve`, :func:`run_record`) give the per-problem Results back.

* :func:`gradient_grid`: the STAR paper's Figure 2 computation (Turkoglu et al. 2021), the map
  :math:`P[l,t] = \mathrm{mean}_\theta |\partial\mathcal L/\partial\theta^l_{(t)}|` (or another
  ``wrt``) of several cells under several losses, all on the same problem;
  :func:`map_grid` the same of problems you built (trained weights, your own stacks).
* :func:`vertical_gain` (SPEC section 4 item 2): local gains of deep stacks at initialisation
  against the closed forms :data:`VERTICAL_GAIN`.
* :func:`gate_saturation` (item 3, Gu et al. 2020): gate statistics of cells (names, ``Cell``
  objects or ``(label, cell, options)`` entries, as :func:`gradflow.gates.compare`) at
  initialisation.
* :func:`training_runs` (items 3-5 after training): several cells trained on one task with one
  seed, or several (``seeds=``), learning curves plus gate statistics or gradient maps at the
  first and the last step.

>>> grid = gradient_grid(["rnn", "lstm"], ["last"], layers=2, steps=3, hidden=4, batch=2)
>>> panel(grid, "last", "lstm").values.shape
(2, 3)
"""
from __future__ import annotations

import collections.abc
import warnings

from gradflow import cells as _cells
from gradflow import checks as _checks
from gradflow import gates as _gates
from gradflow import tasks as _tasks
from gradflow.checks import choice, float_dtype
from gradflow.errors import user_input
from gradflow.jacobian import check_wrt, gradient_map, local_gains
from gradflow.problem import (Problem, cell_problem, precision, problem, problem_stack,
                              task_stack)
from gradflow.stack import Stack
from gradflow.results import NonFiniteForwardWarning, Result, make_result
from gradflow.views import (LOSSES, WRTS, _keys, expected_positive,  # noqa: F401
                            gain_panel, panel, run_curve, run_label, run_record, stats_panel)

# ---------------------------------------------------------------------------------------------
# Packing and unpacking


def _names(value, what: str, one: str, valid) -> list[str]:
    """``value`` (one name or several) as a list of distinct names, each one of ``valid``
    (``what``: the argument, ``one``: one of its items, as messages name them)."""
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f"{what} is empty; valid: {', '.join(valid)}")
    for item in items:
        if item not in valid:
            raise ValueError(f"unknown {one} {item!r} in {what}; valid: {', '.join(valid)}")
    dup = sorted({x for x in items if items.count(x) > 1})
    if dup:
        raise ValueError(f"{what} repeats {', '.join(dup)}")
    return items


def _cell_entries(cells) -> tuple[list[str], list]:
    """``(labels, cells)``: each entry a registered name, or a name with options
    (``"lstm:forget_bias=1.0"``, :func:`gradflow.cells.parse_spec`), its own label; a built
    :class:`gradflow.cells.Cell` (a user's, labelled by ``cell.name``); or a list of those, one
    per layer (labelled by :func:`stack_label`); distinct labels. A mapping ``{label: entry}``
    labels its entries itself."""
    given = cells if isinstance(cells, collections.abc.Mapping) else None  # {label: entry}
    items = ([cells] if isinstance(cells, (str, _cells.Cell)) else
             list(cells if given is None else given.values()))
    if not items:
        raise ValueError(f"cells is empty; give cell names ({', '.join(_cells.names())}) or "
                         "gradflow Cells")
    labels = []
    for item in items:
        if isinstance(item, (list, tuple)):
            if not item:
                raise ValueError("a stack of different cells in cells is empty; give one cell "
                                 "per layer")
            labels.append(stack_label([_cell_label(x) for x in item]))
        else:
            labels.append(_cell_label(item))
    if given is not None:  # labelled by the caller
        labels = [str(k) for k in given]
    return _names(labels, "cells", "cell", labels), items


def _cell_label(item) -> str:
    """One cell's label in a grid: a name (checked; with its options written in) or a built
    Cell's name."""
    if isinstance(item, _cells.Cell):
        return item.name
    if isinstance(item, str):
        _names(_cells.parse_spec(item)[0], "cells", "cell", _cells.names())
        return item
    raise TypeError(f"cells are names or gradflow Cells (or a list of them, one per layer), "
                    f"got {type(item).__name__}")


def stack_label(cells) -> str:
    """A stack of different cells (their labels, bottom up) labelled as ``gradflow compare
    --cells`` writes it: layers joined by ``/``, a run of one cell ``name*N``.

    >>> stack_label(["gru", "gru", "gru", "star"]), stack_label(["lstm", "star", "lstm"])
    ('gru*3/star', 'lstm/star/lstm')
    """
    return run_label(cells)


# ---------------------------------------------------------------------------------------------
# Grids of gradient maps (STAR Fig. 2 layout)


def gradient_grid(cells, losses=("last", "all"), *, wrt: str = "params", layers: int = 10,
                  steps: int = 10, hidden: int = 128, batch: int = 16, seed: int = 0,
                  readout_seed: int = 0, init: str | None = "orthogonal",
                  dtype: str = "float32", input_scale: float = 1.0,
                  cell_options: dict | None = None, meta: dict | None = None) -> Result:
    r"""Gradient maps of several cells under several losses, all on the same problem.

    For each cell and loss: :func:`gradflow.jacobian.gradient_map` (``(L, T)`` map, ``wrt`` as
    there) on :func:`gradflow.problem.cell_problem` with the given sizes and seed, so every cell
    sees the same inputs ``xs ~ input_scale * N(0, 1)`` and the same readout.

    Args:
      cells: cell names, names with options (``"lstm:forget_bias=1.0"``: the same cell at
        another setting beside it, labelled by that text), built cells
        (:class:`gradflow.cells.Cell`, e.g. a user's from :func:`gradflow.cells.from_function`:
        labelled by ``cell.name``, built on the same problem with its own initialisation;
        ``init`` and ``cell_options`` are for names), or a list of those, one per layer (a
        stack of different cells, bottom up: ``["lstm"] * 15 + ["star"]``, labelled
        ``"lstm*15/star"`` by :func:`stack_label`; ``init`` and that label's
        ``cell_options`` apply to each named layer); or a dict ``{label: entry}`` of those,
        labelled by its keys (two cells of one name side by side). Labels must be distinct.
      losses: ``"last"`` and/or ``"all"``.
      init: every named cell's initialisation: ``"orthogonal"`` by default, STAR Fig. 2's one
        setting for all cells (it replaces e.g. UR-LSTM's own ``ugi``); None gives each cell its
        own, as ``gradflow compare`` does without ``--init``.
      cell_options: ``{label: {option: value}}`` applied to that named cell (over ``init``;
        the options written in a label win over these).
      meta: extra config recorded in the result.
    Returns:
      Result ``kind="gradient_grid"``: arrays ``"values/{loss}/{cell}": (L, T)`` and
      ``"loss_value/{loss}/{cell}": ()``; ``config["maps"]["{loss}/{cell}"]`` holds each map's
      full config, ``config["cells"]``, ``config["losses"]`` the order.
    """
    with user_input(), precision(dtype):  # the plan, checked before anything is computed
        cells, built = _cell_entries(cells)
        losses = _names(losses, "losses", "loss", LOSSES)
        choice("wrt", wrt, WRTS)
        float_dtype(dtype)
        cell_options = dict(cell_options or {})
        unknown = sorted(set(cell_options) - {c for c, b in zip(cells, built) if any(
            isinstance(x, str) for x in (b if isinstance(b, (list, tuple)) else [b]))})
        if unknown:
            raise ValueError(f"cell_options for cells not in the grid: {', '.join(unknown)} "
                             "(a built Cell carries its own options)")

        def problem_of(cell, entry, seed):  # seed None: the checked stack only
            if not isinstance(entry, _cells.Cell):  # a name, or one per layer (options
                # written in a name win over cell_options)
                return cell_problem(entry, layers=layers, steps=steps, hidden=hidden,
                                    batch=batch, seed=seed, dtype=dtype, init=init,
                                    input_scale=input_scale, options=cell_options.get(cell))
            if seed is None:
                return problem_stack(entry, layers=layers, steps=steps, hidden=hidden,
                                     batch=batch, dtype=dtype, input_scale=input_scale)
            return problem(entry, layers=layers, steps=steps, hidden=hidden, batch=batch,
                           seed=seed, dtype=dtype, input_scale=input_scale)

        for cell, entry in zip(cells, built):
            check_wrt(problem_of(cell, entry, None), wrt)
    with precision(dtype):
        arrays, maps, positive = _maps(
            ((cell, lambda cell=cell, entry=entry: problem_of(cell, entry, seed))
             for cell, entry in zip(cells, built)), losses, wrt, readout_seed)
    config = {**(meta or {}), "cells": list(cells), "losses": list(losses), "wrt": wrt,
              "layers": layers, "steps": steps, "hidden": hidden, "batch": batch, "seed": seed,
              "readout_seed": readout_seed, "init": init, "dtype": dtype,
              "input_scale": input_scale, "cell_options": cell_options, "maps": maps}
    return make_result("gradient_grid", arrays, config, positive=positive)


def map_grid(problems, losses=("last", "all"), *, wrt: str = "hidden", readout_seed: int = 0,
             meta: dict | None = None) -> Result:
    r"""Gradient maps of problems you built (trained weights, your own stacks and inputs), in
    the layout of :func:`gradient_grid`, so :func:`panel` and :func:`gradflow.plot.draw_grid`
    read it as they read a grid of fresh cells.

    Each problem keeps its own stack, parameters and inputs (sizes may differ between them);
    every map is :func:`gradflow.jacobian.gradient_map` with the same ``losses``, ``wrt`` and
    readout seed. :func:`gradient_grid` is this over fresh problems of named cells.

    Args:
      problems: ``{label: problem}``, each a :class:`gradflow.problem.Problem` or a
        ``(stack, params, xs)`` triple (e.g. ``gradflow.runs.load_params`` and your inputs).
      losses: ``"last"`` and/or ``"all"``, and ``(name, make)`` pairs: a row of each
        problem's own loss, ``make(label, problem) -> loss(top: (B, T, H)) -> scalar`` (e.g.
        a trained run's, :func:`gradflow.train.task_loss`), named ``name`` (its underflow is
        not counted: such a loss may leave states unread).
      wrt: ``"hidden"``, ``"cell"`` or ``"params"``, as :func:`gradflow.gradient_map`.
      readout_seed: the random readout and labels of the default losses (one probe for every
        problem).
      meta: extra config recorded in the result, over what the maps share (e.g.
        ``{"params": "runs/lstm", "train_step": 200}``: where the weights come from, which
        a figure's title then names instead of the stack's init).
    Returns:
      Result ``kind="gradient_grid"`` as :func:`gradient_grid`'s; its config records each
      map's own config (``config["maps"]``) and, where every problem agrees on it, ``layers``,
      ``steps``, ``hidden``, ``batch``, ``seed``, ``init``, ``dtype``, ``params`` and
      ``train_step`` (for a figure's title). Trained weights are titled by their source where
      a problem's config records it (``{"params": "runs/lstm", "train_step": 200}``, as
      ``gradflow compare --params`` gives; :func:`gradflow.results.origin`), else by the
      stack's init, which the weights you pass may no longer be.

    >>> from gradflow.problem import problem
    >>> grid = map_grid({"short": problem("lstm", layers=2, steps=3, hidden=4, batch=2),
    ...                  "long": problem("lstm", layers=2, steps=6, hidden=4, batch=2)}, "last")
    >>> panel(grid, "last", "long").values.shape, grid.config["steps"], grid.config["layers"]
    ((2, 6), None, 2)
    """
    with user_input():
        if not hasattr(problems, "items") or not all(isinstance(k, str) for k in problems):
            raise TypeError("problems must be a mapping {label: Problem or (stack, params, "
                            f"xs)}} with string labels, got {type(problems).__name__}")
        if not problems:
            raise ValueError("problems is empty; give {label: Problem or (stack, params, xs)}")
        labels = list(problems)
        given = {}
        for label, prob in problems.items():
            if not isinstance(prob, Problem):
                try:
                    stack, params, xs = prob
                except (TypeError, ValueError):
                    raise TypeError(f"problem {label!r} must be a gradflow Problem or a "
                                    f"(stack, params, xs) triple, got {type(prob).__name__}"
                                    ) from None
                prob = Problem(stack, params, xs, {})
            if not isinstance(prob.stack, Stack):
                raise TypeError(f"problem {label!r}: its stack must be a gradflow Stack, got "
                                f"{type(prob.stack).__name__}")
            given[label] = prob if prob.config else prob._replace(config=prob.stack.config)
        losses = _loss_entries(losses)
        choice("wrt", wrt, WRTS)
        for prob in given.values():
            check_wrt(prob.stack, wrt)
    arrays, maps, positive = _maps(((label, lambda p=p: p) for label, p in given.items()),
                                   losses, wrt, readout_seed)
    config = {"cells": labels, "losses": [_loss_name(x) for x in losses], "wrt": wrt,
              "readout_seed": readout_seed, "maps": maps}
    for key, names in _SHARED.items():  # what every map agrees on, for a figure's title
        each = [next((m[n] for n in names if m.get(n) is not None), None) for m in maps.values()]
        config[key] = each[0] if all(v == each[0] for v in each) else None
    if any(m.get("params") is not None for m in maps.values()):
        config["init"] = None  # trained weights: named by their source, not the stack's init
    config.update(meta or {})  # yours win (e.g. {"params": "runs/lstm"}, the title's source)
    return make_result("gradient_grid", arrays, config, positive=positive)


#: The settings :func:`map_grid` records where every map agrees (a title's settings line),
#: each with the names a map's config may give it under.
_SHARED = {"layers": ("layers",), "steps": ("steps",), "hidden": ("hidden_size", "hidden"),
           "batch": ("batch",), "seed": ("seed",), "init": ("init",), "dtype": ("dtype",),
           "params": ("params",), "train_step": ("train_step",)}


def _loss_entries(losses) -> list:
    """``losses`` of :func:`map_grid` checked: names of :data:`LOSSES` and ``(name, make)``
    pairs, the names distinct."""
    items = [losses] if isinstance(losses, str) else list(losses)
    named = [x for x in items if isinstance(x, str)]
    if named:
        _names(named, "losses", "loss", LOSSES)
    for x in items:
        if not isinstance(x, str) and not (isinstance(x, tuple) and len(x) == 2 and isinstance(
                x[0], str) and x[0] not in LOSSES and callable(x[1])):
            raise TypeError(f"a loss of map_grid is one of {', '.join(LOSSES)} or a (name, "
                            f"make) pair, make(label, problem) -> loss, named apart from those; "
                            f"got {x!r:.80}")
    names = [_loss_name(x) for x in items]
    if not items or len(set(names)) < len(names):
        raise ValueError(f"losses must be distinct and at least one, got {', '.join(names)}")
    return items


def _loss_name(entry) -> str:
    return entry if isinstance(entry, str) else entry[0]


def _maps(problems, losses, wrt, readout_seed):
    """``(arrays, maps, positive)`` of a grid: ``problems`` yields ``(label, make)`` pairs,
    ``make()`` the label's :class:`~gradflow.problem.Problem` (built when its maps are due, so
    one problem is held at a time); a forward overflow is warned once per label."""
    arrays, maps, positive = {}, {}, {}
    for cell, make in problems:
        prob = make()
        said = set()  # the forward pass, hence where it overflows, is every loss's
        for entry in losses:
            loss = _loss_name(entry)
            fn = entry if isinstance(entry, str) else entry[1](cell, prob)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NonFiniteForwardWarning)
                res = gradient_map(prob.stack, prob.params, prob.xs, loss=fn, wrt=wrt,
                                   readout_seed=readout_seed, meta=prob.config)
            for w in caught:  # the forward overflow once per cell, named by it
                if not issubclass(w.category, NonFiniteForwardWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                elif str(w.message) not in said:
                    said.add(str(w.message))
                    warnings.warn(f"cell {cell}: {w.message}", w.category, stacklevel=3)
            key, value_key = _keys(loss, cell)
            arrays[key], arrays[value_key] = res.values, res.loss_value
            maps[f"{loss}/{cell}"] = {**res.config, "loss": loss}  # the row's name
            if loss in LOSSES:
                positive[key] = expected_positive(loss, wrt, res.values.shape[-1])["values"]
    return arrays, maps, positive


# ---------------------------------------------------------------------------------------------
# Vertical gains against depth (SPEC section 4 item 2)

#: Closed-form vertical RMS gains :math:`\|\partial h^l_t/\partial h^{l-1}_t\|_F/\sqrt H` at
#: orthogonal init, zero biases and inputs near 0 (every gate at :math:`\sigma(0) = 1/2`,
#: every tanh at slope 1): tanh RNN :math:`W` (1), LSTM :math:`o\,i\,W_g` (1/4),
#: GRU :math:`(1-z) W_n` (1/2), MGU :math:`f W_n` (1/2), STAR :math:`k W_z` (1/2); the atlas's
#: ``*_vertical_*`` claims test the same values (a test keeps the two in step).
VERTICAL_GAIN = {"rnn": 1.0, "lstm": 0.25, "gru": 0.5, "mgu": 0.5, "star": 0.5}

def vertical_gain(cells=("rnn", "lstm", "gru", "star"), *, layers: int = 64, steps: int = 4,
                  hidden: int = 32, batch: int = 4, seed: int = 0, init: str = "orthogonal",
                  dtype: str = "float32", input_scale: float = 0.01,
                  meta: dict | None = None) -> Result:
    r"""Local gains (:func:`gradflow.jacobian.local_gains`) of several cells at every depth.

    Args:
      cells: registered cell names (one name or several, distinct; default the four of
        :data:`VERTICAL_GAIN`).
      layers, steps, hidden, batch, seed, dtype, input_scale: each cell's problem, as
        :func:`gradflow.problem.cell_problem`; the defaults (a deep stack on small inputs
        ``0.01 * N(0, 1)``) are where the closed forms hold.
      init: every cell's initialisation (``"orthogonal"``, the closed forms' setting; None
        gives each cell its own).
      meta: extra config recorded in the result.
    Returns:
      Result ``kind="vertical_gain"``: ``"{stat}/{cell}": (L, T)`` for ``stat`` in
      ``vertical_rms, vertical_spectral, temporal_rms, temporal_spectral, state_rms,
      state_spectral`` (:func:`gradflow.local_gains`);
      ``config["closed_form"]`` holds :data:`VERTICAL_GAIN` for the cells that have one.
    """
    with user_input(), precision(dtype):  # the plan, checked before anything is computed
        cells = _names(cells, "cells", "cell", _cells.names())
        for cell in cells:
            cell_problem(cell, layers=layers, steps=steps, hidden=hidden, batch=batch,
                         seed=None, dtype=dtype, init=init, input_scale=input_scale)
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


# ---------------------------------------------------------------------------------------------
# Gate saturation at initialisation (SPEC section 4 item 3, Gu et al. 2020)


def gate_saturation(entries, *, layers: int = 2, steps: int = 32, hidden: int = 64,
                    batch: int = 16, seed: int = 0, dtype: str = "float32",
                    input_scale: float = 1.0, eps: float = _gates.EPS, bins: int = _gates.BINS,
                    meta: dict | None = None) -> Result:
    """:func:`gradflow.gates.compare` of several cells at initialisation, as one Result: every
    array of entry ``label``'s ``gate_stats`` under ``"{label}/..."``; ``config["stats"][label]``
    holds its config. :func:`stats_panel` takes one back out.

    Args:
      entries: as :func:`gradflow.gates.compare`: cell names, ``Cell`` objects or
        ``(label, cell, options)`` triples (a name or a Cell is labelled by its name, with no
        options); labels must be unique. ``config["entries"]`` records each as
        ``[label, cell, options]``, a Cell by its name.
      layers, steps, hidden, batch, seed, dtype, input_scale: the one problem every entry is
        measured on, as :func:`gradflow.problem.problem`.
      eps, bins: as :func:`gradflow.gates.saturation`: the saturation margin ``0 < eps < 0.5``
        and the histogram bins (a positive integer up to :data:`gradflow.gates.MAX_BINS`); the
        time gates' update threshold is its default, :data:`gradflow.gates.UPDATE_THRESHOLD`.
      meta: extra config recorded in the result.
    Returns:
      Result ``kind="gate_saturation"``.

    >>> data = gate_saturation(["lstm"], layers=2, steps=3, hidden=4, batch=2)
    >>> stats_panel(data, "lstm").kind, data.config["entries"]
    ('gate_stats', [['lstm', 'lstm', {}]])
    """
    with user_input():
        entries = _gates.parse_entries(entries)
    with precision(dtype):  # (gates.compare checks every entry before computing any)
        found = _gates.compare(entries, layers=layers, steps=steps, hidden=hidden, batch=batch,
                               seed=seed, dtype=dtype, input_scale=input_scale, eps=eps,
                               bins=bins)
    arrays = {f"{label}/{k}": v for label, r in found.items() for k, v in r.arrays.items()}
    recorded = [[label, cell if isinstance(cell, str) else cell.name, options]
                for label, cell, options in entries]  # (a Cell's own config is in "stats")
    config = {**(meta or {}), "entries": recorded, "layers": layers,
              "steps": steps, "hidden": hidden, "batch": batch, "seed": seed, "dtype": dtype,
              "input_scale": input_scale, "eps": eps, "bins": bins,
              "stats": {label: r.config for label, r in found.items()}}
    return make_result("gate_saturation", arrays, config)


# ---------------------------------------------------------------------------------------------
# Training runs (SPEC section 4 items 3-5 after training, the deep-stack comparison)

#: What :func:`training_runs` can record at the first and the last step of every run.
RECORDS = ("gates", "map")
_RUN_OPTIONS = ("budget", "curriculum", "cell_steps", "lr")


def _runs(runs) -> list:
    out = []
    for r in runs:
        if not isinstance(r, (list, tuple)) or len(r) not in (3, 4):
            raise ValueError(f"training runs are [label, cell, options] or [label, cell, "
                             f"options, training options] lists, got {r!r}")
        label, cell, opts = str(r[0]), str(r[1]), dict(r[2])
        extra = dict(r[3]) if len(r) == 4 else {}
        bad = sorted(set(extra) - set(_RUN_OPTIONS))
        if bad:
            raise ValueError(f"run {label!r}: unknown training option(s) {', '.join(bad)}; "
                             f"valid: {', '.join(_RUN_OPTIONS)}")
        out.append((label, cell, opts, extra))
    if len({r[0] for r in out}) != len(out):
        raise ValueError("training run labels must be unique")
    return out


def _recorders(record, eps: float, bins: int) -> dict | None:
    """``{name: (stack, params, xs) -> Result}`` for the names in ``record`` (None if empty)."""
    fns = {"gates": lambda s, p, x: _gates.saturation(s, p, x, eps, bins=bins),
           "map": lambda s, p, x: gradient_map(s, p, x, loss="last", wrt="hidden")}
    return {k: fns[k] for k in record} or None


def _pack_run(label: str, hist, arrays: dict) -> dict:
    """Add run ``label``'s curve and records to ``arrays``; return its records' configs."""
    arrays.update({f"{label}/curve/{k}": v for k, v in hist.curve.arrays.items()})
    configs = {}
    for name, results in hist.records.items():
        for step, res in zip(hist.record_steps, results):
            key = f"{name}@{step}"
            arrays.update({f"{label}/{key}/{k}": v for k, v in res.arrays.items()})
            configs[key] = {**res.config, "result_kind": res.kind}
    return configs


def training_runs(runs, *, task: str = "adding", task_options: dict | None = None,
                  layers: int = 2, hidden: int = 32, steps: int = 500, batch: int = 64,
                  lr: float = 3e-3, clip: float = 1.0, seed: int = 0, seeds=None,
                  dtype: str = "float32", eval_every: int | None = None,
                  eval_batch: int = 256, record=(), record_batch: int | None = None,
                  eps: float = _gates.EPS, bins: int = _gates.BINS,
                  meta: dict | None = None) -> Result:
    r"""Train several stacks on one task with one seed, or several (``seeds=``)
    (:func:`gradflow.train.train`: Adam, gradient clip, fresh batches, a fixed evaluation
    batch) and record measurements at the first and the last step.

    Args:
      runs: ``[label, cell, options]`` or ``[label, cell, options, training]`` entries;
        ``options`` are cell options (``init``, ``mode``, ...), ``training`` per-run overrides
        of ``budget`` (g-LSTM :math:`\lambda\,\mathrm{mean}(k)`), ``curriculum``
        (``[[until_step, seq_len], ...]``), ``cell_steps`` (the length the time gates are
        initialised over, e.g. the first curriculum stage) and ``lr``.
      task, task_options: :func:`gradflow.tasks.make` arguments.
      layers, hidden: every run's stack (:func:`gradflow.problem.task_stack`).
      steps, batch, lr, clip, seed, dtype, eval_every, eval_batch: :func:`gradflow.train.train`.
      record: a subset of :data:`RECORDS`: ``"gates"``, :func:`gradflow.gates.saturation` with
        ``eps`` and ``bins``; ``"map"``, the hidden-state gradient map under the probe loss
        ``"last"`` (the random readout of ``gradflow heatmap``, so maps at both steps compare),
        each on the first ``record_batch`` evaluation sequences (None: ``min(64,
        eval_batch)``; at most ``eval_batch``). (Not
        :func:`gradflow.train.train`'s ``record``, ``{name: fn}`` called at ``record_at``.)
      seeds: a list of seeds: every run is trained once per seed
        (:func:`gradflow.seeds.train_seeds`, the seeds vmapped in one program; ``seed`` is then
        unused and recorded as None) and every array below gets a leading seed axis ``S``
        (``loss: (S, steps)``, a map ``(S, L, T)``); ``config["seeds"]`` lists them.
    Returns:
      Result ``kind="training_runs"``: ``"{label}/curve/{name}"`` (every array of the run's
      ``History.curve``), ``"{label}/{record}@{step}/{name}"`` (every array of each record);
      ``config["runs"][label]`` is the curve's config and ``config["records"][label]`` maps
      ``"{record}@{step}"`` to the record's config. :func:`run_curve` and :func:`run_record`
      take them back out.
    """
    from gradflow import seeds as _seeds
    from gradflow.train import train  # needs the "train" extra (optax)

    with user_input():  # the plan, checked before anything is trained
        runs = _runs(runs)
        if seeds is not None:
            seeds = _seeds.seed_list(seeds)
        record = _names(record, "record", "record", RECORDS) if record else []
        eval_batch = _checks.positive_int("eval_batch", eval_batch)
        record_batch = _checks.record_batch(record_batch, eval_batch, min(64, eval_batch))
        the_task = _tasks.make(task, **(task_options or {}))
        for label, cell, opts, extra in runs:
            task_stack(cell, the_task, layers=layers, hidden=hidden, options=opts,
                       cell_steps=extra.get("cell_steps"))
    recorders = _recorders(record, eps, bins)
    arrays, run_configs, record_configs = {}, {}, {}
    with precision(dtype):
        for label, cell, opts, extra in runs:
            stack = task_stack(cell, the_task, layers=layers, hidden=hidden, options=opts,
                               cell_steps=extra.get("cell_steps"))
            opts_ = dict(steps=steps, batch=batch, lr=extra.get("lr", lr), clip=clip,
                         dtype=dtype, eval_every=eval_every, eval_batch=eval_batch,
                         record_at=(0, steps) if record else (), record=recorders,
                         record_batch=record_batch, budget=extra.get("budget", 0.0),
                         curriculum=extra.get("curriculum"), progress=False)
            if seeds is None:
                hist = train(stack, the_task, seed=seed, **opts_)
            else:
                hist = _seeds.stacked(_seeds.train_seeds(stack, the_task, seeds, **opts_))
            record_configs[label] = _pack_run(label, hist, arrays)
            run_configs[label] = hist.curve.config
    config = {**(meta or {}), "runs_spec": [list(r) for r in runs], "task": task,
              "task_options": dict(task_options or {}), "layers": layers, "hidden": hidden,
              "steps": steps, "batch": batch, "lr": lr, "clip": clip,
              "seed": seed if seeds is None else None, "seeds": seeds, "dtype": dtype,
              "eval_every": eval_every, "eval_batch": eval_batch,
              "record": list(record), "record_batch": record_batch, "eps": eps, "bins": bins,
              "runs": run_configs, "records": record_configs}
    return make_result("training_runs", arrays, config)


__all__ = ["RECORDS", "VERTICAL_GAIN", "gain_panel", "gate_saturation", "gradient_grid",
           "map_grid", "panel", "run_curve", "run_record", "stack_label", "stats_panel",
           "training_runs", "vertical_gain"]
