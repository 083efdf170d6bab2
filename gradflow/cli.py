"""The ``gradflow`` command line: ``heatmap``, ``compare``, ``gates``, ``cells``, ``reproduce``,
``train``.

Every subcommand checks its arguments before computing anything (sizes, names, output paths);
bad input gets one line ``gradflow <command>: error: ...`` on stderr and exit status 2, never a
traceback. Figures and data go to ``gradflow-out/`` unless ``--out``/``--data`` say otherwise,
and every path written is printed. ``main(argv)`` returns the exit status, so the CLI can be
driven in-process (tests, notebooks) as well as from the ``gradflow`` script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradflow import __version__, cells as _cells, figures, plot
from gradflow.cells.base import parse_init
from gradflow.jacobian import LOSSES, WRTS, gradient_map
from gradflow.problem import DTYPES
from gradflow.results import NonFiniteWarning

DEFAULT_OUT_DIR = "gradflow-out"
DATA_EXT = ".npz"


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise :class:`UsageError` (one line, no usage dump, no exit)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


# ---------------------------------------------------------------------------------------------
# Argument types: each turns a string into a checked value or raises ArgumentTypeError.


def positive_int(text: str) -> int:
    """An integer >= 1 (``"3"``; not ``"0"``, ``"-2"``, ``"2.5"``, ``"x"``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def cell_name(text: str) -> str:
    """A registered cell name."""
    if text not in _cells.names():
        raise argparse.ArgumentTypeError(f"unknown cell {text!r}; valid cells: "
                                         f"{', '.join(_cells.names())}")
    return text


def _name_list(text: str, what: str, valid) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got "
                                         f"{text!r}; valid: {', '.join(valid)}")
    for s in items:
        if s not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what[:-1]} {s!r}; valid {what}: "
                                             f"{', '.join(valid)}")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise argparse.ArgumentTypeError(f"{what} repeated: {', '.join(dup)}")
    return items


def cell_list(text: str) -> list[str]:
    """``"rnn,lstm,star"``: registered cell names, no repeats."""
    return _name_list(text, "cells", _cells.names())


def loss_list(text: str) -> list[str]:
    """``"last,all"``."""
    return _name_list(text, "losses", LOSSES)


def init_scheme(text: str) -> str:
    """An ``init`` string the cells understand (``orthogonal``, ``glorot+chrono``, ...)."""
    try:
        parse_init(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def fraction(text: str) -> float:
    """A number strictly between 0 and 0.5 (a saturation margin)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 0.5), got {text!r}")
    return value


def option(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as JSON (``1.0``, ``true``, ``null``, ``["i","o"]``),
    else as a comma-separated list (``i,o``), else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. forget_bias=1.0), got {text!r}")
    return key, _value(raw.strip())


def _value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    if "," in raw:
        return [_value(part.strip()) for part in raw.split(",")]
    return raw


# ---------------------------------------------------------------------------------------------
# Output paths: checked before any computation.


def _writable_dir(directory: Path, path: str):
    if not directory.is_dir():
        raise UsageError(f"gradflow: error: cannot write {path!r}: directory {str(directory)!r} "
                         "does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".gradflow-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"gradflow: error: cannot write {path!r}: "
                         f"{e.strerror or e} in {str(directory)!r}") from None


def _check_path(path: str, valid_exts, what: str) -> str:
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in valid_exts:
        raise UsageError(f"gradflow: error: unsupported {what} extension {ext or '(none)'!r} in "
                         f"{path!r}; use {', '.join(valid_exts)}")
    if p.is_dir():
        raise UsageError(f"gradflow: error: cannot write {path!r}: it is a directory")
    _writable_dir(p.resolve().parent, path)
    return path


def output_paths(args, stem: str) -> tuple[str, str | None]:
    """``(figure path, data path or None)`` from ``--out``/``--data``/``--no-data``.

    Defaults: ``gradflow-out/<stem>.png`` (the folder is created) and the figure's path with
    ``.npz``. Explicit paths must have a valid extension and an existing, writable folder.
    """
    if args.out is None:
        os.makedirs(DEFAULT_OUT_DIR, exist_ok=True)
        fig = os.path.join(DEFAULT_OUT_DIR, f"{stem}.png")
        _check_path(fig, plot.FORMATS, "figure")
    else:
        fig = _check_path(args.out, plot.FORMATS, "figure")
    if args.no_data:
        if args.data is not None:
            raise UsageError("gradflow: error: --data and --no-data cannot be used together")
        return fig, None
    data = str(Path(fig).with_suffix(DATA_EXT)) if args.data is None else args.data
    return fig, _check_path(data, (DATA_EXT,), "data")


# ---------------------------------------------------------------------------------------------
# Text summaries of (L, T) maps.


def _g(x) -> str:
    return f"{x:.3g}" if np.isfinite(x) else str(x)


def _ratio(a, b) -> str:
    """``a / b`` as ``x0.25 (-0.6 dec)``; ``n/a`` when undefined."""
    if not (np.isfinite(a) and np.isfinite(b)) or b <= 0 or a <= 0:
        return "n/a"
    r = a / b
    return f"x{r:.3g} ({math.log10(r):+.1f} dec)"


def _row_means(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, values, 0.0).sum(axis=1) / finite.sum(axis=1)


def map_summary(values: np.ndarray, max_rows: int = 16) -> list[str]:
    """Lines describing an ``(L, T)`` map ``V``.

    Per layer ``l``: ``mean_t V[l, t]`` (finite entries) and its ratio to the top layer's; over
    time: ``V[l, 0] / V[l, T-1]`` at the top and bottom layers; the range ``max / min`` in
    decades with where they are; the number of non-finite entries. Maps deeper than
    ``max_rows`` list evenly spaced layers (top and bottom always).
    """
    values = np.asarray(values, dtype=float)
    L, T = values.shape
    means = _row_means(values)
    shown = sorted(set(np.linspace(0, L - 1, min(L, max_rows)).round().astype(int)),
                   reverse=True)
    lines = ["per layer: mean over time, and its ratio to the top layer"]
    for l in shown:
        tag = " (top)" if l == L - 1 else " (bottom)" if l == 0 and L > 1 else ""
        lines.append(f"  layer {l:>3}{tag:<9} {_g(means[l]):>10}   {_ratio(means[l], means[-1])}")
    lines.append("over time: first step / last step")
    lines.append(f"  top layer    {_ratio(values[-1, 0], values[-1, -1])}")
    if L > 1:
        lines.append(f"  bottom layer {_ratio(values[0, 0], values[0, -1])}")
    finite = np.isfinite(values)
    pos = finite & (values > 0)
    if pos.any():
        masked = np.where(pos, values, np.nan)
        hi = np.unravel_index(np.nanargmax(masked), values.shape)
        lo = np.unravel_index(np.nanargmin(masked), values.shape)
        span = math.log10(values[hi] / values[lo])
        lines.append(f"range: max {_g(values[hi])} at (layer {hi[0]}, t {hi[1]}), min "
                     f"{_g(values[lo])} at (layer {lo[0]}, t {lo[1]}): {span:.1f} decades")
    lines.append(f"non-finite entries: {int((~finite).sum())} of {values.size}")
    return lines


def _panel_line(loss: str, cell: str, values: np.ndarray, width: int) -> str:
    values = np.asarray(values, dtype=float)
    ref = values[-1, -1]
    means = _row_means(values)
    pos = np.isfinite(values) & (values > 0)
    if pos.any() and np.isfinite(ref) and ref > 0:
        logs = np.log10(values[pos] / ref)
        span = f"{logs.min():+.1f} .. {logs.max():+.1f}"
    else:
        span = "n/a"
    return (f"  {loss:<5} {cell:<{width}} {_g(ref):>10}  {_ratio(means[0], means[-1]):>20}  "
            f"{_ratio(values[-1, 0], values[-1, -1]):>20}  {span:>15}  "
            f"{int((~np.isfinite(values)).sum()):>10}")


# ---------------------------------------------------------------------------------------------
# Subcommands


def _problem_kwargs(args) -> dict:
    kw = dict(layers=args.layers, steps=args.steps, hidden=args.hidden, batch=args.batch,
              seed=args.seed, dtype=args.dtype, init=args.init, input_scale=args.input_scale)
    options = dict(args.option or [])
    if args.command == "compare":
        return {**kw, "cell_options": {c: options for c in args.cells} if options else None}
    return {**kw, "input_size": args.input_size, "options": options,
            "input_projection": False if args.no_input_projection else None}


def _describe(config: dict, cell) -> str:
    """One line: cell, sizes, seed, init, dtype, and the cell options that differ from its
    defaults (the problem's config cannot show them all: a ``steps`` option shares its key)."""
    defaults = dict(_cells.get(cell.name).options)
    changed = [f"{k}={v}" for k, v in cell.options if k != "init" and defaults.get(k) != v]
    return (f"{config['cell']}, {config['layers']} layers x {config['steps']} steps, "
            f"H={config['hidden_size']}, B={config['batch']}, seed {config['seed']}, "
            f"init {config.get('init', '-')}, {config['dtype']}"
            + (f"; options {', '.join(changed)}" if changed else ""))


def _write(fig, data, fig_path, data_path) -> list[str]:
    lines = []
    if data_path is not None:
        lines.append(f"data:   {data.save(data_path)}")
    lines.append(f"figure: {plot.save(fig, fig_path)}")
    return lines


def run_heatmap(args) -> int:
    fig_path, data_path = output_paths(args, f"heatmap_{args.cell}_L{args.layers}")
    with figures.precision(args.dtype):
        prob = figures.cell_problem(args.cell, **_problem_kwargs(args))
        res = gradient_map(prob.stack, prob.params, prob.xs, loss=args.loss, wrt=args.wrt,
                           readout_seed=args.readout_seed, meta=prob.config)
    values = res.values
    notes = []
    normalize = args.normalize
    ref = values[-1, -1]
    if normalize and not (np.isfinite(ref) and ref > 0):
        notes.append(f"note: not normalised: the top-last value is {ref!r}")
        normalize = False
    fig = plot.heatmap(res, normalize=normalize)
    print(f"gradflow heatmap: {_describe(res.config, prob.stack.cell)}")
    print(f"gradient map wrt {args.wrt}, loss {args.loss} (value {_g(float(res.loss_value))})")
    for line in map_summary(values) + notes + _write(fig, res, fig_path, data_path):
        print(line)
    return 0


def run_compare(args) -> int:
    stem = f"compare_{'-'.join(args.cells)}_L{args.layers}"
    fig_path, data_path = output_paths(args, stem)
    grid = figures.gradient_grid(args.cells, args.losses, wrt=args.wrt,
                                 readout_seed=args.readout_seed, **_problem_kwargs(args))
    fig = figures.draw_grid(grid, normalize=args.normalize)
    first = grid.config["maps"][f"{args.losses[0]}/{args.cells[0]}"]
    print(f"gradflow compare: {', '.join(args.cells)}; {args.layers} layers x {args.steps} steps, "
          f"H={args.hidden}, B={args.batch}, seed {args.seed}, {first['dtype']}, wrt {args.wrt}")
    width = max(4, *(len(c) for c in args.cells))
    print(f"  {'loss':<5} {'cell':<{width}} {'top-last':>10}  {'bottom/top layer':>20}  "
          f"{'first/last step':>20}  {'dec. vs top-last':>15}  {'non-finite':>10}")
    for loss in args.losses:
        for cell in args.cells:
            print(_panel_line(loss, cell, figures.panel(grid, loss, cell).values, width))
    print("(bottom/top layer: ratio of the time-mean of layer 0 to that of the top layer; "
          "first/last step: at the top layer)")
    for line in _write(fig, grid, fig_path, data_path):
        print(line)
    return 0


def _gates_figure(stats, gates) -> Figure:
    """Per gate, a column: its saturation map above its per-layer histograms."""
    fig = Figure(figsize=(5.2 * len(gates), 7.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(gates), squeeze=False)
    for j, gate in enumerate(gates):
        plot.saturation_map(stats, gate, ax=axes[0, j])
        plot.gate_histograms(stats, gate, layers=None, ax=axes[1, j])
    return fig


def run_gates(args) -> int:
    from gradflow import gates as _gates

    fig_path, data_path = output_paths(args, f"gates_{args.cell}_L{args.layers}")
    cell = _cells.get(args.cell)
    if not cell.gate_names:
        with_gates = [n for n in _cells.names() if _cells.get(n).gate_names]
        raise UsageError(f"gradflow gates: error: cell {args.cell!r} reports no gates; cells "
                         f"with gates: {', '.join(with_gates)}")
    if args.gate is not None and args.gate not in cell.gate_names:
        raise UsageError(f"gradflow gates: error: cell {args.cell!r} has no gate {args.gate!r}; "
                         f"its gates: {', '.join(cell.gate_names)}")
    with figures.precision(args.dtype):
        prob = figures.cell_problem(args.cell, **_problem_kwargs(args))
        stats = _gates.saturation(prob.stack, prob.params, prob.xs, args.eps, bins=args.bins,
                                  meta=prob.config)
    shown = [args.gate] if args.gate else list(stats.config["gates"])
    fig = _gates_figure(stats, shown)
    print(f"gradflow gates: {_describe(stats.config, prob.stack.cell)}; saturated: < {args.eps:g} or "
          f"> {1 - args.eps:g}")
    summary = _gates.summary(stats)
    kinds = stats.config["gate_kinds"]
    for gate in shown:
        s = summary[gate]
        parts = [f"mean {s['mean']:.3f}", f"saturated {s['saturated']:.3f}"]
        if "slope" in s:
            parts.append(f"slope {s['slope']:.3f}")
        if "timescale" in s:
            parts.append(f"timescale {_g(s['timescale'])} steps")
        if "update_fraction" in s:
            parts.append(f"updates {s['update_fraction']:.3f}")
        parts.append(f"non-finite {int(s.get('nonfinite', 0))}")
        print(f"  gate {gate:<9} ({kinds[gate]}): " + ", ".join(parts))
        per_layer = stats[f"saturated/{gate}/layer"]
        print("    saturated per layer (bottom..top): "
              + " ".join(f"{v:.2f}" for v in per_layer))
        outside = np.asarray(stats[f"outside/{gate}/pooled"])
        if outside.sum():
            print(f"    outside [0, 1]: {int(outside[0])} below 0, {int(outside[1])} above 1"
                  + (f", {int(outside[2])} NaN" if outside.size > 2 else ""))
    for line in _write(fig, stats, fig_path, data_path):
        print(line)
    return 0


def run_cells(args) -> int:
    D = args.hidden if args.input_size is None else args.input_size
    names = _cells.names()
    width = max(len(n) for n in names)
    print(f"{'cell':<{width}}  {'params':>9}  {'gates':<28}  equation   "
          f"(params of one layer, input {D} -> hidden {args.hidden})")
    for name in names:
        cell = _cells.get(name)
        count = cell.param_count(args.hidden if cell.square else D, args.hidden)
        gates = ", ".join(cell.gate_names) or "-"
        print(f"{name:<{width}}  {count:>9,}  {gates:<28}  {cell.equation}")
    return 0


def run_reproduce(args) -> int:
    found = figures.configs(args.figures)
    if args.list:
        for name, path in found.items():
            cfg = figures.load_config(path)
            print(f"{name}: {cfg['figure']} ({', '.join(cfg.get('cells', []))})  [{path}]")
        return 0
    if args.only is not None:
        for name in args.only:
            if name not in found:
                raise UsageError(f"gradflow reproduce: error: unknown figure {name!r}; valid: "
                                 f"{', '.join(found) or '(none)'}")
    if args.out_dir is not None:
        _writable_dir(Path(args.out_dir), args.out_dir)
    figures.reproduce(args.only, config_dir=args.figures, out_dir=args.out_dir,
                      log=lambda line: print(line, flush=True))
    return 0


def step_list(text: str) -> list[int]:
    """``"0,100,300"`` -> ``[0, 100, 300]`` (training steps, non-negative integers)."""
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers such as "
                                         f"0,100,300, got {text!r}") from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative step numbers, got {text!r}")
    return steps


def task_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` task option (an int where it parses as one)."""
    return option(text)


def run_train(args) -> int:
    from gradflow import tasks as _tasks
    from gradflow.train import train

    options = dict(args.task_option or [])
    if args.seq_len is not None:
        if args.task == "copy":
            options.setdefault("lag", args.seq_len - 2 * options.get("symbols", 10) - 1)
        else:
            options.setdefault("steps", args.seq_len)
    task = _tasks.make(args.task, **options)
    if args.record and max(args.record) > args.steps:
        raise UsageError(f"gradflow train: error: --record steps must lie in 0..{args.steps} "
                         f"(--steps), got {max(args.record)}")
    stack = figures.task_stack(args.cell, task, layers=args.layers, hidden=args.hidden,
                               init=args.init, options=dict(args.option or []))
    out = Path(args.out if args.out is not None else os.path.join(
        DEFAULT_OUT_DIR, f"train_{args.task}_{args.cell}_L{args.layers}"))
    if not args.lr > 0 or not args.clip > 0 or not args.budget >= 0:
        raise UsageError(f"gradflow train: error: --lr and --clip must be positive and --budget "
                         f">= 0, got lr {args.lr:g}, clip {args.clip:g}, budget {args.budget:g}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"gradflow train: error: cannot create {str(out)!r}: "
                         f"{e.strerror or e}") from None
    _writable_dir(out, str(out))
    # The recorded maps use the fixed probe loss of `gradflow heatmap` (random readout, random
    # labels): the trained head is zero at step 0, so the task loss sends no gradient to the
    # stack there, and one probe makes maps at different steps comparable.
    record = {"gradient_map": lambda st, p, xs: gradient_map(
        st, p, xs, loss=args.record_loss, wrt=args.wrt, readout_seed=args.readout_seed)}
    print(f"gradflow train: {args.cell} x {args.layers} layers, H={args.hidden}, on "
          f"{task.name} (T={task.steps}, {task.metric}); {args.steps} steps of batch "
          f"{args.batch}, lr {args.lr:g}, seed {args.seed}"
          + (f", budget {args.budget:g}" if args.budget else ""), flush=True)
    with figures.precision(args.dtype):
        hist = train(stack, task, steps=args.steps, batch=args.batch, lr=args.lr,
                     clip=args.clip, seed=args.seed, dtype=args.dtype,
                     eval_every=args.eval_every, eval_batch=args.eval_batch,
                     record_at=args.record or (), record=record if args.record else None,
                     record_batch=args.record_batch, budget=args.budget,
                     progress=args.progress)
    c = hist.curve
    written = [c.save(out / "curve.npz"),
               plot.save(figures.draw_curves({args.cell: c}, title=(
                   f"{args.cell}, {args.layers} layers, on {task.name} (T={task.steps})")),
                   out / "curve.png")]
    timed = stack.cell.time_gate is not None and "eval_updates" in c.arrays
    print(f"  {'step':>6}  {'eval loss':>10}  {'eval ' + task.metric:>13}"
          + ("  updates" if timed else ""))
    for i, step in enumerate(c["eval_step"]):
        line = f"  {int(step):>6}  {float(c['eval_loss'][i]):>10.4g}  " \
               f"{float(c['eval_metric'][i]):>13.4g}"
        if timed:
            line += f"  {float(c['eval_updates'][i]):>7.3f}"
        print(line)
    maps = {}
    for step, res in zip(hist.record_steps, hist.records.get("gradient_map", ())):
        written.append(res.save(out / f"map_step{step:06d}.npz"))
        maps[("map", f"step {step}")] = res
        print(f"  gradient map wrt {args.wrt} at step {step} (probe loss {args.record_loss}, "
              f"value {_g(float(res.loss_value))}):")
        for line in map_summary(res.values, max_rows=8):
            print("    " + line)
    if maps:
        fig = plot.grid(maps, rows=["map"], cols=[k[1] for k in maps], normalize=False,
                        title=f"{args.cell}: gradient maps wrt {args.wrt} during training")
        written.append(plot.save(fig, out / "maps.png"))
    for path in written:
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# The parser


def _para(text: str) -> str:
    return textwrap.fill(text, 88)


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def _add_problem(p, layers, steps, hidden, batch, single_cell=True):
    g = p.add_argument_group("problem")
    g.add_argument("--layers", type=positive_int, default=layers, metavar="L",
                   help=f"stack depth (default: {layers})")
    g.add_argument("--steps", type=positive_int, default=steps, metavar="T",
                   help=f"sequence length (default: {steps})")
    g.add_argument("--hidden", type=positive_int, default=hidden, metavar="H",
                   help=f"hidden size (default: {hidden})")
    g.add_argument("--batch", type=positive_int, default=batch, metavar="B",
                   help=f"examples averaged over (default: {batch})")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="parameters from key(seed), inputs N(0, 1) from key(seed + 1) (default: 0)")
    g.add_argument("--init", type=init_scheme, default=None,
                   help="orthogonal, glorot, torch, chrono, ugi, or weights+bias such as "
                        "glorot+chrono (default: the cell's own, orthogonal for most)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: float32)")
    g.add_argument("--input-scale", type=float, default=1.0, metavar="S",
                   help="inputs are S * N(0, 1) (default: 1)")
    g.add_argument("--option", type=option, action="append", metavar="KEY=VALUE",
                   help="another cell option, repeatable (e.g. forget_bias=1.0, "
                        "variant=official, refined=i,o)")
    if single_cell:
        g.add_argument("--input-size", type=positive_int, default=None, metavar="D",
                       help="data features (default: H)")
        g.add_argument("--no-input-projection", action="store_true",
                       help="feed the data to layer 0 directly, even where a refined cell "
                            "needs D == H")


def _add_outputs(p):
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="PATH",
                   help=f"figure path, {'/'.join(e[1:] for e in plot.FORMATS)} "
                        f"(default: {DEFAULT_OUT_DIR}/<name>.png; the folder is created)")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="data path, .npz (default: the figure's path with .npz)")
    g.add_argument("--no-data", action="store_true", help="do not write the data file")


def build_parser() -> argparse.ArgumentParser:
    """The ``gradflow`` argument parser (errors raise :class:`UsageError`)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="gradflow", formatter_class=fmt,
        description=_para("Measure how gradients flow through deep stacks of recurrent cells."),
        epilog=_examples("""
            gradflow heatmap --cell lstm --layers 16
            gradflow compare --cells rnn,lstm,star --layers 10 --steps 10
            gradflow gates --cell ur_lstm
            gradflow cells
            gradflow reproduce --only star_fig2
            gradflow train --task adding --cell star --layers 8 --record 0,500
            gradflow COMMAND --help     # options of one command
        """))
    parser.add_argument("--version", action="version", version=f"gradflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "heatmap", formatter_class=fmt, help="gradient map of one cell over layers x time",
        description=_para("The [layer, time] map of gradient magnitudes of one stack at "
                        "initialisation (wrt hidden: mean_b ||dL/dh^l_t||; wrt params: "
                        "mean |dL/dθ^l_(t)|), as a figure, its data (.npz) and a text summary: "
                        "per-layer and over-time attenuation/amplification factors."),
        epilog=_examples("""
            gradflow heatmap --cell lstm --layers 16
            gradflow heatmap --cell star --wrt params --loss all --normalize --out star.pdf
            gradflow heatmap --cell lstm --init chrono --option t_max=64 --dtype float64
        """))
    p.add_argument("--cell", type=cell_name, default="lstm",
                   help="cell name, see `gradflow cells` (default: lstm)")
    _add_problem(p, layers=16, steps=32, hidden=64, batch=16)
    g = p.add_argument_group("measurement")
    g.add_argument("--loss", choices=LOSSES, default="last",
                   help="last: readout of the top layer's last output; all: mean over steps "
                        "(default: last)")
    g.add_argument("--wrt", choices=WRTS, default="hidden",
                   help="hidden states h, memory c, or per-step parameters (default: hidden)")
    g.add_argument("--readout-seed", type=seed_int, default=0, metavar="SEED",
                   help="seed of the random readout and labels (default: 0)")
    g.add_argument("--normalize", action="store_true",
                   help="draw each entry relative to the top layer's last step")
    _add_outputs(p)
    p.set_defaults(run=run_heatmap)

    p = sub.add_parser(
        "compare", formatter_class=fmt, help="several cells side by side (STAR Fig. 2 layout)",
        description=_para("Gradient maps of several cells on the same problem, rows = losses, "
                        "columns = cells, one shared log colour scale. The defaults are the STAR "
                        "paper's Figure 2 setting (10 x 10, H = 128, wrt params, both losses)."),
        epilog=_examples("""
            gradflow compare --cells rnn,lstm,star --layers 10 --steps 10
            gradflow compare --cells lstm,gru --losses last --wrt hidden --normalize
        """))
    p.add_argument("--cells", type=cell_list, default=["rnn", "lstm", "star"],
                   help="comma-separated cell names (default: rnn,lstm,star)")
    p.add_argument("--losses", type=loss_list, default=["last", "all"],
                   help="comma-separated rows: last, all (default: last,all)")
    _add_problem(p, layers=10, steps=10, hidden=128, batch=16, single_cell=False)
    g = p.add_argument_group("measurement")
    g.add_argument("--wrt", choices=WRTS, default="params", help="(default: params)")
    g.add_argument("--readout-seed", type=seed_int, default=0, metavar="SEED",
                   help="seed of the random readout and labels (default: 0)")
    g.add_argument("--normalize", action="store_true",
                   help="each map relative to its own top-layer, last-step value")
    _add_outputs(p)
    p.set_defaults(run=run_compare)

    p = sub.add_parser(
        "gates", formatter_class=fmt, help="gate saturation, slopes, timescales, histograms",
        description=_para("Statistics of every gate a cell reports, at initialisation: mean "
                        "activation, fraction saturated (< eps or > 1 - eps), local slope, memory "
                        "timescale 1/(1 - f), time-gate updates; a figure with each gate's "
                        "saturation map and per-layer histograms."),
        epilog=_examples("""
            gradflow gates --cell ur_lstm
            gradflow gates --cell lstm --init ugi --gate f --eps 0.1
        """))
    p.add_argument("--cell", type=cell_name, default="lstm", help="(default: lstm)")
    p.add_argument("--gate", default=None, help="only this gate (default: every gate)")
    p.add_argument("--eps", type=fraction, default=0.05,
                   help="saturation margin, in (0, 0.5) (default: 0.05)")
    p.add_argument("--bins", type=positive_int, default=20, help="histogram bins (default: 20)")
    _add_problem(p, layers=4, steps=32, hidden=64, batch=16)
    _add_outputs(p)
    p.set_defaults(run=run_gates)

    p = sub.add_parser(
        "cells", formatter_class=fmt, help="list every cell: equation, gates, parameter count",
        epilog=_examples("gradflow cells --hidden 256"))
    p.add_argument("--hidden", type=positive_int, default=128, metavar="H",
                   help="hidden size for the parameter counts (default: 128)")
    p.add_argument("--input-size", type=positive_int, default=None, metavar="D",
                   help="input size (default: H; refined cells always read H)")
    p.set_defaults(run=run_cells)

    p = sub.add_parser(
        "reproduce", formatter_class=fmt, help="regenerate the figures from their JSON configs",
        description=_para("Rebuild every figure in figures/ (PNG and .npz data) from the JSON "
                        "config beside it."),
        epilog=_examples("""
            gradflow reproduce --list
            gradflow reproduce --only star_fig2 --out-dir /tmp
        """))
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",")], default=None,
                   metavar="NAME[,NAME]", help="only these figures (see --list)")
    p.add_argument("--figures", default=None, metavar="DIR",
                   help=f"where the configs are (default: {figures.FIGURES_DIR})")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="where to write (default: beside each config); must exist")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    p.set_defaults(run=run_reproduce)

    p = sub.add_parser(
        "train", formatter_class=fmt, help="train a stack on a task; learning curve and maps",
        description=_para("Train a stack of one cell plus a linear readout on a synthetic task "
                        "with Adam (gradflow.train.train), then write to --out DIR: the "
                        "learning curve (curve.npz, curve.png) and, at each --record step, the "
                        "gradient map of the stack under a fixed probe loss "
                        "(map_stepNNNNNN.npz, maps.png). Note: --steps here counts training "
                        "updates; the sequence length is --seq-len."),
        epilog=_examples("""
            gradflow train --task adding --cell star --layers 8 --steps 500 --record 0,500
            gradflow train --task copy --cell ur_lstm --task-option lag=20 --lr 3e-3
            gradflow train --task adding --cell g_lstm --budget 0.01 --seq-len 50
        """))
    from gradflow import tasks as _tasks
    p.add_argument("--task", choices=_tasks.names(), default="adding",
                   help="(default: adding)")
    p.add_argument("--cell", type=cell_name, default="lstm", help="(default: lstm)")
    p.add_argument("--seq-len", type=positive_int, default=None, metavar="T",
                   help="sequence length (adding, counting: steps; copy: sets the lag; default: "
                        "the task's own)")
    p.add_argument("--task-option", type=task_option, action="append", metavar="KEY=VALUE",
                   help="a task option, repeatable (e.g. lag=20, symbols=5)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=positive_int, default=4, metavar="L", help="(default: 4)")
    g.add_argument("--hidden", type=positive_int, default=32, metavar="H", help="(default: 32)")
    g.add_argument("--init", type=init_scheme, default=None, help="(default: the cell's own)")
    g.add_argument("--option", type=option, action="append", metavar="KEY=VALUE",
                   help="another cell option, repeatable")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=500, metavar="N",
                   help="training updates (default: 500)")
    g.add_argument("--batch", type=positive_int, default=32, metavar="B", help="(default: 32)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    g.add_argument("--clip", type=float, default=1.0,
                   help="global gradient-norm clip (default: 1)")
    g.add_argument("--budget", type=float, default=0.0, metavar="LAMBDA",
                   help="g-LSTM budget loss LAMBDA * mean(k) (time-gated cells only; default 0)")
    g.add_argument("--seed", type=seed_int, default=0, help="(default: 0)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: float32)")
    g.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                   help="evaluate every N steps (default: steps // 10)")
    g.add_argument("--eval-batch", type=positive_int, default=256, metavar="B",
                   help="fixed evaluation batch size (default: 256)")
    g.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    g = p.add_argument_group("recorded gradient maps")
    g.add_argument("--record", type=step_list, default=None, metavar="S[,S]",
                   help="steps (updates done) at which to record the map, e.g. 0,500")
    g.add_argument("--record-batch", type=positive_int, default=32, metavar="B",
                   help="evaluation sequences the maps average over (default: 32)")
    g.add_argument("--record-loss", choices=LOSSES, default="last",
                   help="probe loss of the maps (default: last)")
    g.add_argument("--wrt", choices=WRTS, default="hidden", help="(default: hidden)")
    g.add_argument("--readout-seed", type=seed_int, default=0, metavar="SEED",
                   help="seed of the probe readout (default: 0)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"output folder, created (default: {DEFAULT_OUT_DIR}/train_<task>_"
                        "<cell>_L<layers>)")
    p.set_defaults(run=run_train)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 on success; 2 on bad input (one ``gradflow...: error: ...`` line on stderr).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("gradflow: error: choose a command: heatmap, compare, gates, cells, "
                             "reproduce, train (see gradflow --help)")
        with warnings.catch_warnings():
            # Non-finite entries are data: the summaries count them; no warning lines.
            warnings.simplefilter("ignore", NonFiniteWarning)
            return args.run(args)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"gradflow: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `gradflow cells | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
