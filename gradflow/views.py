"""Reading packed Results back, with NumPy alone: the per-problem Results inside an experiment's
Result (:func:`panel`, :func:`gain_panel`, :func:`stats_panel`, :func:`run_curve`,
:func:`run_record`), a gate histogram's edges (:func:`hist_edges`) and pooled statistics
(:func:`summary`), and which entries of a gradient map must be positive
(:func:`expected_positive`).

Nothing here imports JAX: :mod:`gradflow.plot` draws saved ``.npz`` files through this module
without starting it. :mod:`gradflow.experiments`, :mod:`gradflow.gates` and
:mod:`gradflow.jacobian` re-export these names where they were first defined.
"""
from __future__ import annotations

import itertools

import numpy as np

from gradflow.results import Result, make_result

#: The default losses of a gradient map and what it can be taken with respect to
#: (:func:`gradflow.gradient_map`).
LOSSES = ("last", "all")
WRTS = ("hidden", "cell", "params")
#: The statistics of a gate (:func:`gradflow.gates.saturation`).
STATS = ("mean", "saturated", "slope", "slope_refine", "timescale", "update_fraction",
         "nonfinite")
#: The arrays of :func:`gradflow.local_gains`.
GAIN_ARRAYS = ("vertical_rms", "vertical_spectral", "temporal_rms", "temporal_spectral",
                "state_rms", "state_spectral")


def run_label(items, join: str = "/", times: str = "*") -> str:
    """``items`` (a stack's layers' cells, bottom up) joined by ``join``, each run of equal
    ones written once with its count after ``times``: how :func:`gradflow.experiments.stack_label`
    (``gradflow compare --cells``' syntax) and :func:`gradflow.plot.subject` (titles) write a
    stack of different cells.

    >>> run_label(["gru", "gru", "gru", "star"]), run_label(["lstm"] * 2 + ["star"], " / ", " x")
    ('gru*3/star', 'lstm x2 / star')
    """
    runs = [(str(k), len(list(g))) for k, g in itertools.groupby(items)]
    return join.join(k if n == 1 else f"{k}{times}{n}" for k, n in runs)


def finite_row_means(values) -> np.ndarray:
    """The mean over the finite entries of each row of a ``(L, T)`` array (a layer's mean over
    time; NaN for a row with none)."""
    values = np.asarray(values)
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, values, 0.0).sum(axis=1) / finite.sum(axis=1)


def expected_positive(loss, wrt: str, steps: int):
    """``{"values": mask}``: the entries of a ``(..., L, T)`` gradient map that the default
    losses make positive (for :attr:`Result.underflow`), or None for a callable loss (which
    may ignore any state). Every state reaches the readout, except a memory ``c`` at the last
    step: ``h_{T-1}`` is formed from ``c_{T-1}`` before ``c_{T-1}`` leaves the cell, so its
    gradient there is exactly 0. A cell can still have an exactly zero gradient (every ReLU
    unit off); such entries are counted with the underflow ones."""
    if callable(loss):
        return None
    if wrt == "cell":
        return {"values": np.arange(steps) < steps - 1}
    return {"values": True}


def value_range(kind: str = "sigmoid") -> tuple[float, float]:
    r"""``(lo, hi)``: the range of a gate of ``kind``, which its histogram covers and beyond
    which its values count as ``outside``: ``(-1, 1)`` for a ``"tanh"`` gate
    (:math:`a = \tanh(z)`), ``(0, 1)`` for every other kind (Cheng et al.'s refined gates leave
    it and are counted outside it, SPEC section 3; an ``"other"`` gate is read on it as a
    sigmoid).

    >>> value_range("tanh"), value_range("refined")
    ((-1.0, 1.0), (0.0, 1.0))
    """
    if kind not in GATE_KINDS:
        raise ValueError(f"unknown gate kind {kind!r}; valid: {', '.join(GATE_KINDS)}")
    return (-1.0, 1.0) if kind == "tanh" else (0.0, 1.0)


#: The gate kinds (:data:`gradflow.cells.base.KINDS`, which a test holds equal: this module
#: reads results with NumPy alone).
GATE_KINDS = ("sigmoid", "tanh", "refined", "effective", "master", "time", "other")


def bin_edges(bins: int, kind: str = "sigmoid") -> np.ndarray:
    """``(bins + 1,)`` float64 edges of the fixed histogram of a gate of ``kind``: ``bins``
    equal bins over :func:`value_range` (``[0, 1]``; ``[-1, 1]`` for ``"tanh"``)."""
    lo, hi = value_range(kind)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    return np.linspace(lo, hi, bins + 1)


def hist_edges(stats, gate: str) -> np.ndarray:
    """``(bins + 1,)`` edges of ``stats``'s histogram ``hist/{gate}``: ``bin_edges/{gate}``
    where the gate has its own range (a ``"tanh"`` gate's ``[-1, 1]``), else the shared
    ``bin_edges`` over ``[0, 1]``; without either (a hand-made result) the ``[0, 1]`` edges of
    as many bins as ``hist/{gate}`` has. Results saved before per-gate edges existed have no
    ``bin_edges/{gate}``: every histogram of theirs is over ``[0, 1]``, which this returns.

    Args:
      stats: a ``gate_stats`` :class:`~gradflow.results.Result` (or a mapping of its arrays).
      gate: a gate it reports.
    Raises:
      ValueError: the edges do not fit the histogram (not ``bins + 1`` increasing values).
    """
    arrays = stats.arrays if isinstance(stats, Result) else stats
    if f"hist/{gate}" not in arrays:
        have = sorted(k[5:] for k in arrays if k.startswith("hist/"))
        raise ValueError(f"no histogram of gate {gate!r}; the gates with one: "
                         f"{', '.join(have) or 'none'}")
    hist = np.asarray(arrays[f"hist/{gate}"])
    bins = hist.shape[-1]
    key = next((k for k in (f"bin_edges/{gate}", "bin_edges") if k in arrays), None)
    edges = bin_edges(bins) if key is None else np.asarray(arrays[key], dtype=float)
    if edges.shape != (bins + 1,) or not np.all(np.diff(edges) > 0):
        raise ValueError(f"{key!r} must be {bins + 1} increasing edges for the {bins} bins of "
                         f"'hist/{gate}', got shape {edges.shape}")
    return edges


def summary(stats: Result) -> dict:
    """``{gate: {stat: float}}``: the pooled scalars of a :func:`saturation` result."""
    if not isinstance(stats, Result) or stats.kind != "gate_stats":
        raise ValueError(f"summary needs a 'gate_stats' result, got "
                         f"{getattr(stats, 'kind', type(stats).__name__)!r}")
    out = {}
    for g in stats.config["gates"]:
        out[g] = {s: float(stats.arrays[f"{s}/{g}/pooled"]) for s in STATS
                  if f"{s}/{g}/pooled" in stats.arrays}
    return out


def _positive(kind: str, config: dict, arrays: dict):
    """What a gradient map read back out of a packed result expects positive
    (:func:`expected_positive` of its loss and wrt: its underflow counted again, as where it
    was measured), or None for other kinds and for a loss of the user's own."""
    wrt, loss = config.get("wrt"), config.get("loss")
    if kind != "gradient_map" or wrt not in WRTS or loss not in LOSSES or "values" not in arrays:
        return None
    return expected_positive(loss, wrt, np.shape(arrays["values"])[-1])


def _result(kind: str, arrays: dict, config: dict, source: Result) -> Result:
    """A Result read out of ``source`` (its provenance; a gradient map's underflow counted)."""
    return make_result(kind, arrays, config, warn=False, source=source,
                       positive=_positive(kind, config, arrays))


def _unpack(data: Result, prefix: str, kind: str, config: dict) -> Result:
    """The arrays of ``data`` under ``prefix`` (stripped) as a Result of ``kind``."""
    return _result(kind, {k[len(prefix):]: v for k, v in data.arrays.items()
                          if k.startswith(prefix)}, config, data)


#: The result kind each reader takes apart, by the config section naming its parts.
_KINDS = {"maps": "gradient_grid", "cells": "vertical_gain", "stats": "gate_saturation",
          "runs": "training_runs"}


def _of_kind(data, section: str) -> Result:
    """``data`` if it is a Result of the kind whose parts ``section`` names, else a TypeError
    or ValueError saying which kind (and which experiment makes it) was expected."""
    kind = _KINDS[section]  # (each made by the experiment of that name)
    if not isinstance(data, Result):
        raise TypeError(f"expected a gradflow Result of kind {kind!r} (gradflow.experiments."
                        f"{kind}), got {type(data).__name__}")
    if data.kind != kind:
        raise ValueError(f"expected a result of kind {kind!r} (gradflow.experiments.{kind}), "
                         f"got kind {data.kind!r}")
    return data


def _label(data: Result, label: str, section: str, what: str) -> str:
    """``label`` if ``data`` is a result of the kind with a config ``section`` that has it,
    else a ValueError listing the valid ones."""
    if label not in _of_kind(data, section).config[section]:
        raise ValueError(f"no {what} {label!r}; valid: {', '.join(data.config[section])}")
    return label


def _keys(loss: str, cell: str) -> tuple[str, str]:
    return f"values/{loss}/{cell}", f"loss_value/{loss}/{cell}"


def panel(grid: Result, loss: str, cell: str) -> Result:
    """One ``gradient_map`` Result (``values: (L, T)``) out of a :func:`gradient_grid` result."""
    _of_kind(grid, "maps")
    key, value_key = _keys(loss, cell)
    if key not in grid.arrays:
        raise ValueError(f"no map for loss {loss!r} and cell {cell!r}; the grid has "
                         f"{', '.join(grid.config['maps'])}")
    config = dict(grid.config["maps"][f"{loss}/{cell}"])
    config.setdefault("wrt", grid.config.get("wrt"))
    config.setdefault("loss", loss)
    return _result("gradient_map", {"values": grid[key], "loss_value": grid[value_key]},
                   config, grid)


def seed_result(result: Result, seed: int) -> Result:
    """One seed's map out of a :func:`gradflow.sweep` result: ``values: (L, T)`` and
    ``loss_value`` of that seed, its config with ``seed`` set, its underflow counted and its
    provenance the sweep's (for plots and summaries of one map; NumPy only)."""
    seeds = list(result.config.get("seeds") or [])
    if seed not in seeds:
        raise ValueError(f"no seed {seed!r} in this sweep; its seeds: {seeds or '(none)'}")
    return _one_seed(result, seeds.index(seed), seed)


def _one_seed(result: Result, i: int, seed: int) -> Result:
    """Entry ``i`` of every array of a multi-seed ``result`` (``(S, ...)``), the seed ``seed``'s,
    its config with ``seed`` set in place of ``seeds``."""
    config = {k: v for k, v in result.config.items() if k != "seeds"}
    return _result(result.kind, {k: np.asarray(v)[i] for k, v in result.arrays.items()},
                   {**config, "seed": seed}, result)


def gain_panel(data: Result, cell: str) -> Result:
    """One cell's ``local_gains`` Result out of a :func:`vertical_gain` result."""
    _label(data, cell, "cells", "cell")
    # (results saved before the state gains were measured have the other four)
    return make_result("local_gains", {k: data[f"{k}/{cell}"] for k in GAIN_ARRAYS
                                       if f"{k}/{cell}" in data.arrays},
                       {**data.config, "cell": cell}, warn=False, source=data)


def stats_panel(data: Result, label: str) -> Result:
    """Entry ``label``'s ``gate_stats`` Result out of a :func:`gate_saturation` result."""
    _label(data, label, "stats", "entry")
    return _unpack(data, f"{label}/", "gate_stats", data.config["stats"][label])


def _seed_of(data: Result, result: Result, seed) -> Result:
    """``result`` (arrays with a leading seed axis in a multi-seed ``data``) at ``seed``:
    None keeps every seed; an int picks that seed's slice (a single-seed ``data`` only has
    its own seed)."""
    seeds = data.config.get("seeds")
    if seed is None:
        return result
    if seeds is None:
        if seed != data.config["seed"]:
            raise ValueError(f"no seed {seed!r}; this result has seed {data.config['seed']}")
        return result
    if seed not in seeds:
        raise ValueError(f"no seed {seed!r}; seeds: {seeds}")
    return _one_seed(result, seeds.index(seed), seed)


def run_curve(data: Result, label: str, seed=None) -> Result:
    """Run ``label``'s learning curve (a ``History.curve`` Result) out of :func:`training_runs`;
    of a multi-seed result, every array ``(S, ...)`` (``seed=None``) or one seed's."""
    _label(data, label, "runs", "run")
    return _seed_of(data, _unpack(data, f"{label}/curve/", "training",
                                  data.config["runs"][label]), seed)


def run_record(data: Result, label: str, record: str, step="last", seed=None) -> Result:
    """Run ``label``'s ``record`` (``"gates"`` or ``"map"``) at ``step`` (an int, ``"first"``
    or ``"last"``) out of :func:`training_runs`; of a multi-seed result, stacked ``(S, ...)``
    (``seed=None``) or one seed's."""
    _label(data, label, "runs", "run")
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
    return _seed_of(data, _unpack(data, f"{label}/{key}/", cfg.pop("result_kind"), cfg), seed)


def entry_step(values: np.ndarray, wrt: str | None = None) -> int:
    """The step ``e`` at which the loss enters the top layer of an ``(L, T)`` map: ``T - 1``,
    or ``T - 2`` for a map wrt a memory ``c`` whose last step is exactly 0 (by construction:
    ``h_{T-1}`` is formed inside the step, so the gradient of ``c_{T-1}`` where it leaves the
    cell is 0), the last step that reaches the loss.

    >>> entry_step(np.ones((2, 3))), entry_step(np.array([[1., 0.], [1., 0.]]), "cell")
    (2, 0)
    """
    T = values.shape[-1]
    if wrt == "cell" and T > 1 and np.all(values[..., -1] == 0):
        return T - 2
    return T - 1


__all__ = ["GAIN_ARRAYS", "LOSSES", "STATS", "WRTS", "bin_edges", "expected_positive",
           "gain_panel", "hist_edges", "panel", "run_curve", "run_record", "seed_result",
           "stats_panel", "summary", "value_range"]
