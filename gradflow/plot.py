"""Figures of gradflow results: layer x time maps, grids of them, gate histograms, gain profiles.

Every function takes a :class:`gradflow.results.Result` (or a collection of them) and an optional
matplotlib ``Axes``, draws on that axes (or on a new ``Figure`` it creates) and returns the figure.
Only the object-oriented API is used (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): no
pyplot, no rcParams changes, no registered colormaps, so figures can be made from scripts, threads
and notebooks alike and nothing leaks between calls. :func:`save` writes PNG, PDF or SVG.

Maps are arrays ``values[l, t]`` (``(L, T)``) drawn the way the STAR paper's Figure 2 draws
them: layer ``l = 0`` at the bottom, time ``t`` left to right, magnitudes on a log colour scale.
Non-finite entries (an exploding gradient's inf, a NaN) are data: they are drawn hatched over grey
and counted in the title, never dropped silently; on a log scale an entry of exactly 0 (a
gradient that underflowed, or 0 by construction: the title counts each) is dotted over the
lowest colour, so it is told from the smallest value drawn. Example::

    from gradflow import plot
    fig = plot.heatmap(result)                   # one (L, T) map, log colour scale
    fig = plot.heatmap(result, normalize=True)   # relative to values[-1, -1]
    plot.save(fig, "lstm.pdf")
"""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from gradflow import views as _views
from gradflow.errors import InputError
from gradflow.views import gain_panel, panel, run_curve, run_record, stats_panel
from gradflow.results import Result, check_folder_of, make_result, origin

FORMATS = (".png", ".pdf", ".svg")
NONFINITE_HATCH = "xx"
ZERO_HATCH = ".."  # an entry of exactly 0 on a log scale
GAIN_KINDS = ("vertical", "temporal", "state")
GAIN_STATS = ("rms", "spectral")

_MAGNITUDE_CMAP = "viridis"
_RELATIVE_CMAP = "RdBu_r"  # blue: attenuated (< 1), red: amplified (> 1)
_FRACTION_CMAP = "magma"
_NONFINITE_FACE = "0.85"
# The normalised view spans at least a factor 2 either side of 1, so that ratios within rounding of
# 1 read as "preserved" (near-white) instead of being stretched over the whole diverging scale.
_MIN_RELATIVE_DECADES = float(np.log10(2.0))
_PANEL_SIZE = (3.0, 2.5)


# ---------------------------------------------------------------------------------------------
# Small helpers: figures, inputs, norms, titles.


def figure(size: tuple[float, float]) -> Figure:
    """A new constrained-layout ``Figure`` of ``size`` inches with an Agg canvas: no pyplot, no
    global state. Every figure gradflow draws is made here."""
    try:
        w, h = (float(v) for v in size)
    except (TypeError, ValueError):
        w = h = math.nan
    if not (0 < w < math.inf and 0 < h < math.inf):
        raise ValueError(f"a figure size is (width, height) in inches, both positive, got "
                         f"{size!r}")
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure_axes(ax, figsize):
    """``(root figure, axes)``: a new Agg-backed figure with one axes when ``ax`` is None."""
    if ax is None:
        fig = figure(figsize)
        return fig, fig.add_subplot()
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax.get_figure(root=True), ax


def _check_result(obj, where: str) -> Result:
    if not isinstance(obj, Result):
        raise TypeError(f"{where} expects a gradflow.results.Result, got {type(obj).__name__}")
    return obj


def _map_array(result: Result, key: str | None) -> np.ndarray:
    """The ``(L, T)`` array ``result.arrays[key]`` (``key`` defaults to ``"values"``) as float,
    its subnormal entries (positive, below its dtype's normal range: underflow, as
    :attr:`Result.underflow` counts them) as 0, so that they are drawn and counted as the
    underflow stored as 0 is (one such entry set a log scale's lower end at 1e-40)."""
    key = "values" if key is None else key
    if key not in result.arrays:
        raise ValueError(f"result of kind {result.kind!r} has no array {key!r}; its arrays: "
                         f"{', '.join(result.arrays) or '(none)'}")
    stored = np.asarray(result.arrays[key])
    values = stored.astype(float)
    if np.issubdtype(stored.dtype, np.floating):
        values[np.abs(values) < np.finfo(stored.dtype).tiny] = 0.0
    if values.ndim == 3 and "seeds" in result.config:  # a sweep: one map per seed
        raise ValueError(f"array {key!r} holds one map per seed, shape {values.shape} (a sweep "
                         "over seeds): draw one seed's, gradflow.views.seed_result(result, "
                         "seed), or a summary over them (e.g. np.median(values, axis=0) in a "
                         "make_result)")
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"array {key!r} must be a non-empty (layers, steps) map, got shape "
                         f"{values.shape}")
    return values


def _relative(values: np.ndarray, wrt: str | None = None) -> np.ndarray:
    """``values / values[-1, e]``: each entry relative to the top layer where the loss enters,
    ``e`` the last step (:func:`gradflow.views.entry_step`: the one before for a map wrt a
    memory ``c``, whose last step is 0 by construction)."""
    e = _views.entry_step(values, wrt)
    ref = values[-1, e]
    if not (np.isfinite(ref) and ref > 0):
        raise ValueError(f"normalize=True divides by values[-1, {e}] (top layer, the last step "
                         f"the loss reaches), which is {float(ref):g}; it must be finite and > 0 "
                         "(use normalize=False)")
    return values / ref


def _reference_label(wrt: str | None) -> str:
    """The colour bar's note on what a normalised map is relative to (:func:`_relative`)."""
    return f" / value at (top, last{_reaches(wrt)})"


def _reaches(wrt: str | None) -> str:
    """What qualifies "last" (step) in the words for :func:`_relative`'s reference."""
    return " c reaches" if wrt == "cell" else ""


def _wrt(result: Result, key: str | None) -> str | None:
    """What ``result``'s map ``key`` is taken w.r.t. (``"cell"``: a memory ``c``, see
    :func:`_relative`); None for arrays other than a gradient map's values."""
    return result.config.get("wrt") if key in (None, "values") else None


def _cmap(cmap, default: str) -> mcolors.Colormap:
    """A colormap whose 'bad' colour is its minimum colour.

    'Bad' entries are the ones a log norm masks (``<= 0``: no gradient at all reads as the smallest
    magnitude) and non-finite ones, which the hatched overlay covers anyway.
    """
    cmap = default if cmap is None else cmap
    if isinstance(cmap, str):
        try:
            cmap = matplotlib.colormaps[cmap]
        except KeyError:
            raise ValueError(f"unknown colormap {cmap!r}; use a name from matplotlib.colormaps "
                             "(e.g. 'viridis', 'magma', 'RdBu_r') or a Colormap") from None
    if not isinstance(cmap, mcolors.Colormap):
        raise TypeError(f"cmap must be a colormap name or a matplotlib Colormap, got "
                        f"{type(cmap).__name__}")
    return cmap.with_extremes(bad=cmap(0.0))


class CentredLogNorm(mcolors.LogNorm):
    r"""A log colour scale with 1 at the colour map's centre, each side on its own range:
    :math:`u(v) = \tfrac12\,(1 - \log_{10} v / \log_{10} v_{\min})` for
    :math:`v_{\min} \le v \le 1` and :math:`u(v) = \tfrac12\,(1 + \log_{10} v /
    \log_{10} v_{\max})` for :math:`1 \le v \le v_{\max}` (``0 < vmin < 1 < vmax``), so limits
    given either side of 1 keep 1 white on a diverging map, however many decades lie on either
    side (gradflow's own relative maps take as many on both, :func:`_norm`). Entries ``<= 0`` are masked, as by
    ``LogNorm`` (whose colour-bar axis, in decades, it keeps).

    >>> n = CentredLogNorm(1e-8, 10.0)
    >>> [round(float(n(v)), 3) for v in (1e-8, 1e-4, 1.0, 10 ** 0.5, 10.0)]
    [0.0, 0.25, 0.5, 0.75, 1.0]
    """

    def __init__(self, vmin: float, vmax: float, clip: bool = False):
        if not 0 < vmin < 1 < vmax:
            raise ValueError(f"CentredLogNorm needs 0 < vmin < 1 < vmax, got vmin={vmin!r}, "
                             f"vmax={vmax!r}")
        super().__init__(vmin, vmax, clip)

    def __call__(self, value, clip=None):
        result, is_scalar = self.process_value(value)
        lo, hi = np.log10(self.vmin), np.log10(self.vmax)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.ma.log10(result)  # masks v <= 0
        u = np.ma.where(t < 0, 0.5 * (1.0 - t / lo), 0.5 * (1.0 + t / hi))
        if self.clip if clip is None else clip:
            u = np.ma.clip(u, 0.0, 1.0)
        return u[0] if is_scalar else u

    def inverse(self, value):
        u = np.ma.asarray(value, dtype=float)
        lo, hi = np.log10(self.vmin), np.log10(self.vmax)
        return 10.0 ** np.ma.where(u < 0.5, lo * (1.0 - 2.0 * u), hi * (2.0 * u - 1.0))


def _norm(arrays: Sequence[np.ndarray], log: bool, relative: bool, vmin=None, vmax=None):
    """One colour norm covering the finite entries of every array.

    * ``log``: ``LogNorm`` over the positive finite range; ``relative`` gives a
      :class:`CentredLogNorm`, 1 at the centre, as many decades either side of it as the entry
      farthest from 1 (at least a factor 2), so values below 1 are blue and above red, a
      colour is as dark for ``10^k`` as for ``10^-k``, and the farthest entry takes the darkest
      colour of its side. (Until 2026-12-08 each side spanned its own entries' range: a 2x
      amplification beside 7 decades of attenuation was drawn as dark red as ``1e-7`` dark
      blue.)
    * linear: ``Normalize`` over the finite range; ``relative`` gives a ``TwoSlopeNorm`` centred
      at 1.

    ``vmin``/``vmax``, when given, override the computed limits; on the relative log scale a
    missing one is the mirror about 1 of the largest ``|log10 v|`` (at least ``log10 2``), and
    limits either side of 1 keep 1 at the centre (:class:`CentredLogNorm`: the STAR figure's
    ``(0.05, 5)`` as a plain ``LogNorm`` drew 0.5 white and the reference entry itself red),
    limits on one side of it give a plain ``LogNorm`` (e.g. :func:`draw_grid`'s
    ``color_range``).
    """
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    if log:
        pos = finite[finite > 0]
        if relative:  # as many decades either side of 1 as the farthest entry's
            m = float(np.max(np.abs(np.log10(pos)))) if pos.size else 0.0
            m = max(m, _MIN_RELATIVE_DECADES)
            lo, hi = 10.0 ** -m, 10.0 ** m
        else:
            lo, hi = (float(pos.min()), float(pos.max())) if pos.size else (0.1, 10.0)
        lo, hi = _limits(lo, hi, vmin, vmax)
        if lo <= 0:
            raise ValueError(f"a log colour scale needs 0 < vmin < vmax, got vmin={lo!r}")
        if relative and lo < 1.0 < hi:
            return CentredLogNorm(lo, hi)
        return mcolors.LogNorm(lo, hi)
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    lo, hi = _limits(lo, hi, vmin, vmax)
    if relative:
        lo, hi = min(lo, 1.0 - 1e-3), max(hi, 1.0 + 1e-3)
        return mcolors.TwoSlopeNorm(vcenter=1.0, vmin=lo, vmax=hi)
    return mcolors.Normalize(lo, hi)


def _limits(lo: float, hi: float, vmin, vmax) -> tuple[float, float]:
    """Data limits overridden by the user's; a single data value widened to a non-empty range."""
    for name, v in (("vmin", vmin), ("vmax", vmax)):
        try:  # (a 0-d array, jnp.min(...), is a number)
            ok = v is None or (not isinstance(v, (bool, str)) and math.isfinite(float(v)))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a finite number or None, got {v!r}")
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise ValueError(f"vmin must be < vmax, got vmin={vmin!r}, vmax={vmax!r}")
    lo, hi = (lo if vmin is None else float(vmin)), (hi if vmax is None else float(vmax))
    if lo >= hi:  # one distinct value, or a user limit beyond the data on the other side
        if vmax is None:
            hi = lo * 2 if lo > 0 else lo + 1.0
        else:
            lo = hi / 2 if hi > 0 else hi - 1.0
    return lo, hi


def _with_counts(title: str, nonfinite: int, nonpositive: int = 0, underflow: int = 0) -> str:
    """``title`` plus the number of non-finite (and, on a log scale, non-positive) entries and
    of underflow entries (positive values below the dtype's range, stored as 0; not counted
    again among the non-positive ones)."""
    notes = [f"{nonfinite} non-finite"] if nonfinite else []
    if underflow:
        notes.append(f"{underflow} underflow")
    if nonpositive > underflow:
        notes.append(f"{nonpositive - underflow} \u2264 0")
    if not notes:
        return title
    return f"{title} ({', '.join(notes)})" if title else ", ".join(notes)


def _config_dict(who: str, config) -> None:
    if not isinstance(config, dict):
        raise TypeError(f"{who} takes a result's config (a dict, result.config), got "
                        f"{type(config).__name__}")


def subject(config: dict, default=None) -> str:
    """What a result measured, for titles and labels: its cell (with the options of note,
    ``"lstm:forget_bias=1.0"``: its config's ``cell_label``), or the model of
    :func:`gradflow.model_map` / :func:`gradflow.gates.model_saturation`; a stack of different
    cells by each layer's, bottom up, a run of one cell counted (``"lstm x15 / star"``).

    >>> subject({"cell": ["gru", "star", "gru"]}), subject({"cell": ["lstm"] * 3 + ["star"]})
    ('gru / star / gru', 'lstm x3 / star')
    """
    _config_dict("subject", config)
    what = config.get("cell_label", config.get("cell", config.get("model", default)))
    if not isinstance(what, (list, tuple)):
        return str(what)
    return _views.run_label(what, " / ", " x")


def _describe(result: Result, key: str | None) -> str:
    """Default title: cell (or a :func:`gradflow.model_map`'s model), then loss and wrt
    (gradient maps) or norm and target (Jacobian maps)."""
    c = result.config
    parts = [subject(c)] if "cell" in c or "model" in c else []
    if result.kind == "gradient_map":
        parts += [f"{k}={c[k]}" for k in ("loss", "wrt") if k in c]
    elif result.kind == "jacobian_map":
        parts.append(f"Jacobian ({c['jacobian_norm']})" if "jacobian_norm" in c
                     else "Jacobian")
        if "target" in c:
            target = c["target"]
            parts.append(f"target={tuple(target) if isinstance(target, list) else target}")
    else:
        parts.append(key if key not in (None, "values") else result.kind)
    line = settings(c)
    return " \u00b7 ".join(parts) + (f"\n{line}" if line else "")


def settings(config: dict) -> str:
    """The settings a figure's title carries, as far as ``config`` records them:
    ``"L=16, T=32, H=64, init orthogonal, seed 0"`` (layers, steps, hidden size, init, seed,
    the input scale where it is not 1); trained weights (a config recording ``params``, see
    :func:`gradflow.results.origin`) are named by their source instead of the init.

    >>> settings({"layers": 2, "steps": 5, "hidden_size": 8, "seed": 1})
    'L=2, T=5, H=8, seed 1'
    >>> settings({"layers": 2, "seed": 1, "input_scale": 0.01})
    'L=2, seed 1, input scale 0.01'
    """
    _config_dict("settings", config)
    sizes = (("L", config.get("layers")), ("T", config.get("steps")),
             ("H", config.get("hidden_size", config.get("hidden"))))
    parts = [f"{k}={v}" for k, v in sizes if v is not None]
    if origin(config):  # the init, or where trained weights come from
        parts.append(origin(config))
    if config.get("seed") is not None:
        parts.append(f"seed {config['seed']}")
    scale = config.get("input_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        parts.append(f"input scale {scale:g}")  # (the vRNN's gains move with it)
    if config.get("inputs_from"):  # the user's sequences (the CLI's --inputs)
        parts.append(f"inputs {inputs_text(config)}")
    if options_text(config):
        parts.append(options_text(config))
    return ", ".join(parts)


def inputs_text(config: dict) -> str:
    """The user's sequences a config records (the CLI's ``--inputs``): ``"xs.npy"``, or
    ``"xs.npy (time-major)"``."""
    return str(config["inputs_from"]) + (" (time-major)" if config.get("inputs_time_major")
                                         else "")


def options_text(config: dict) -> str:
    """The cell options a grid's config records for its cells (``cell_options`` keyed by cell,
    as :func:`gradflow.experiments.gradient_grid` takes them; not a map's per-layer list), in
    words: ``"options
    init=orthogonal, t_max=50"`` when every cell has the same, else each cell's; ``""`` for
    none.

    >>> options_text({"cell_options": {"lstm": {"init": "orthogonal"}, "gru": {"init": "orthogonal"}}})
    'options init=orthogonal'
    >>> options_text({"cell_options": {"lstm": {"forget_bias": 3.0}}, "cells": ["lstm", "gru"]})
    'options lstm: forget_bias=3.0'
    """
    given = config.get("cell_options")
    if not isinstance(given, dict) or not all(isinstance(o, dict) for o in given.values()):
        return ""  # a map's own config: its cells' options, layer by layer or of its one cell
    opts = {c: o for c, o in given.items() if o}
    if not opts:
        return ""

    def kv(o):
        return ", ".join(f"{k}={v}" for k, v in o.items())

    texts = {kv(o) for o in opts.values()}
    if len(texts) == 1 and len(opts) == len(config.get("cells", opts)):
        return "options " + texts.pop()
    return "options " + "; ".join(f"{c}: {kv(o)}" for c, o in opts.items())


def _quantity(result: Result, key: str | None) -> str:
    """Colour-bar label: what the map's numbers are."""
    c = result.config
    if result.kind == "gradient_map":
        labels = {"hidden": r"mean $\|\partial L/\partial h^l_t\|_2$",
                  "cell": r"mean $\|\partial L/\partial c^l_t\|_2$",
                  "params": r"mean $|\partial L/\partial \theta^l_{(t)}|$"}
        return labels.get(c.get("wrt"), "gradient magnitude")
    if result.kind == "jacobian_map":
        # (``norm`` is the stack's normalisation; the Jacobian's own is ``jacobian_norm``)
        return (rf"$\|\partial h_{{\mathrm{{target}}}}/\partial h^l_t\|$ "
                f"({c.get('jacobian_norm', 'norm')})")
    if result.kind == "local_gains" and key:
        return key.replace("_", " ") + " gain"
    return key or "value"


def _row_names(config: dict, n: int) -> list | None:
    """A config's ``rows``, one label per row of an ``(n, T)`` map (a bidirectional model's
    ``"l0 fwd"``, ``"l0 bwd"``, ...: :func:`gradflow.torch_model`), or None."""
    rows = config.get("rows")
    return [str(r) for r in rows] if isinstance(rows, (list, tuple)) and len(rows) == n else None


def _draw_map(ax: Axes, values: np.ndarray, norm, cmap: mcolors.Colormap, rows=None):
    """``imshow`` of ``values[l, t]``, layer 0 at the bottom, plus hatches on non-finite cells
    and, on a log scale, dots on cells of exactly 0 (or below: no colour of their own; a
    masked array's masked cells are left blank, neither drawn nor hatched); ``rows``, if
    given, label the rows (:func:`_row_names`)."""
    image = ax.imshow(values, origin="lower", aspect="auto", interpolation="nearest",
                      norm=norm, cmap=cmap)
    filled = np.ma.filled(values, np.nan if np.ma.isMaskedArray(values) else 0.0)
    marks = [(~np.isfinite(np.ma.filled(values, 0.0)), dict(
        facecolor=_NONFINITE_FACE, edgecolor="0.1", hatch=NONFINITE_HATCH, label="non-finite"))]
    if isinstance(norm, mcolors.LogNorm):
        with np.errstate(invalid="ignore"):
            marks.append((np.isfinite(filled) & (filled <= 0), dict(
                facecolor="none", edgecolor="0.75", hatch=ZERO_HATCH, label="<= 0")))
    for where, style in marks:
        bad_l, bad_t = np.nonzero(where)
        if bad_l.size:
            cells = [Rectangle((t - 0.5, l - 0.5), 1.0, 1.0) for l, t in zip(bad_l, bad_t)]
            ax.add_collection(PatchCollection(cells, linewidth=0.0, **style), autolim=False)
    ax.set_xlabel("time step $t$")
    ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", integer=True, min_n_ticks=1))
    if rows is None:
        ax.set_ylabel("layer $l$")
        ax.yaxis.set_major_locator(MaxNLocator(nbins="auto", integer=True, min_n_ticks=1))
    else:
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylabel("row (layer, direction)")
    return image


def _colorbar(fig: Figure, image, axes, label: str, values_list, norm, relative: bool):
    """One colour bar for ``axes``; its arrows mark values beyond the scale (clipped by a given
    ``vmin``/``vmax``, or not positive on a log scale), at the end they fall off.

    On a relative log scale (:class:`CentredLogNorm`, or a ``LogNorm`` symmetric about 1) the
    ticks are whole decades (at most 9) that include ``10^0 = 1``, so the centre is always
    labelled. Where no entry has a colour (all
    non-finite; on a log scale, none positive) the bar has no ticks and says so, instead of
    showing a made-up range.
    """
    log = isinstance(norm, mcolors.LogNorm)
    # beyond the scale (clipped by a given vmin), or not on a log scale at all
    below = any(np.any(np.isfinite(v) & ((v < norm.vmin) | ((v <= 0) & log)))
                for v in values_list)
    above = any(np.any(np.isfinite(v) & (v > norm.vmax)) for v in values_list)
    finite = any(np.any(np.isfinite(v)) for v in values_list)
    if not finite or (log and not any(np.any(np.isfinite(v) & (v > 0)) for v in values_list)):
        bar = fig.colorbar(image, ax=axes, label=f"{label}\n(no "
                           f"{'finite' if not finite else 'positive'} entries)")
        bar.set_ticks([])
        bar.ax.minorticks_off()
        return bar
    extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get(
        (bool(below), bool(above)), "neither")
    bar = fig.colorbar(image, ax=axes, label=label, extend=extend)
    if isinstance(norm, CentredLogNorm):
        low = int(np.ceil(np.log10(norm.vmin) - 1e-9))
        high = int(np.floor(np.log10(norm.vmax) + 1e-9))
        if high - low >= 1:
            step = int(np.ceil((high - low) / 8))  # at most 9 labelled ticks, one of them 1
            bar.set_ticks(10.0 ** (step * np.arange(-(-low // step), high // step + 1)))
        return bar
    decades = int(np.floor(np.log10(norm.vmax) + 1e-9)) if log and relative else 0
    if decades >= 1 and np.isclose(norm.vmin * norm.vmax, 1.0):
        step = int(np.ceil(decades / 4))  # at most 9 labelled ticks
        bar.set_ticks(10.0 ** np.arange(-(decades // step) * step, decades + 1, step))
    return bar


# ---------------------------------------------------------------------------------------------
# Layer x time maps.


def _heatmap_on(ax, result, values, key, log, cmap, title, norm):
    """Draw ``values`` (one result's map, maybe normalised) on ``ax``, titled; returns the image.
    A config's ``rows`` label the rows (:func:`_row_names`)."""
    image = _draw_map(ax, values, norm, cmap, _row_names(result.config, values.shape[0]))
    nonpositive = int(np.sum(np.isfinite(values) & (values <= 0))) if log else 0
    ax.set_title(_with_counts(_describe(result, key) if title is None else title,
                              int(np.sum(~np.isfinite(values))), nonpositive,
                              result.underflow.get(key or "values", 0)))
    return image


def heatmap(result: Result, ax: Axes | None = None, log: bool = True, normalize: bool = False,
            cmap=None, title: str | None = None, colorbar: bool = True, *, key: str | None = None,
            vmin: float | None = None, vmax: float | None = None) -> Figure:
    """Layer x time map of one result, layer 0 at the bottom and time left to right.

    Draws ``V[l, t] = result.arrays[key][l, t]`` (``(L, T)``; ``key`` defaults to ``"values"``, the
    map of a ``gradient_map`` or ``jacobian_map``; for ``local_gains`` pass e.g.
    ``key="vertical_rms"``).

    * ``log=True``: ``LogNorm`` over the positive finite entries; entries ``<= 0`` are drawn in the
      minimum colour (and counted in the title, the colour bar gets a "below" arrow).
    * ``normalize=True``: draws ``R[l, t] = V[l, t] / V[L-1, T-1]``, every entry relative to the top
      layer at the last step, on a diverging colour map (blue < 1 < red) with a log norm centred
      on 1 (:class:`CentredLogNorm`), as many decades either side of 1 as the entry farthest
      from it (at least a factor 2): ``10^k`` as dark red as ``10^-k`` dark blue, so a collapse
      over 9 decades is drawn dark and a 2x amplification beside it pale.
      ``V[L-1, T-1]`` must be finite and positive (for a map wrt a
      memory ``c``, whose last step is 0 by construction, ``V[L-1, T-2]``).
    * Non-finite entries are hatched (``"xx"``) over grey and their number is appended to the title
      (``"... (3 non-finite)"``), also when ``title`` is given; so is the number of underflow
      entries, positive values stored as 0 below the dtype's range (``result.underflow``:
      ``"... (5 underflow)"``), apart from other entries ``<= 0``.

    Args:
      result: a :class:`~gradflow.results.Result` holding an ``(L, T)`` array ``key``.
      ax: axes to draw on; a new figure is made when None.
      log, normalize: colour scale, as above.
      cmap: colormap name or object; default ``"viridis"`` (``"RdBu_r"`` when normalised).
      title: axes title; default cell, loss and wrt (or norm and target) from ``result.config``.
      colorbar: add a labelled colour bar.
      key: which array of ``result`` to draw.
      vmin, vmax: colour limits (default: the finite data range; centred on 1 if normalised).
        When normalised: the given limit(s), and for a missing one the mirror about 1 of the
        largest ``|log10 R|``, with 1 still at the centre where they lie either side of it
        (:class:`CentredLogNorm`), else a plain ``LogNorm``.

    Returns:
      The figure holding the axes.
    """
    _check_result(result, "heatmap")
    fig, ax = _figure_axes(ax, (5.2, 3.6))
    values = _map_array(result, key)
    shown = _relative(values, _wrt(result, key)) if normalize else values
    norm = _norm([shown], log, normalize, vmin, vmax)
    cm = _cmap(cmap, _RELATIVE_CMAP if normalize else _MAGNITUDE_CMAP)
    image = _heatmap_on(ax, result, shown, key, log, cm, title, norm)
    if colorbar:
        label = _quantity(result, key)
        _colorbar(fig, image, ax, label + (_reference_label(_wrt(result, key)) if normalize
                                           else ""), [shown], norm, normalize)
    return fig


def _arrange(results, rows, cols):
    """``(cells, row_labels, col_labels)``: ``cells[i][j]`` a Result or None; labels may be None."""
    if isinstance(results, Result):
        results = [results]
    if isinstance(results, Mapping):
        if not results:
            raise ValueError("grid needs at least one result, got an empty mapping")
        if all(isinstance(v, Mapping) for v in results.values()):
            flat = {(r, c): res for r, inner in results.items() for c, res in inner.items()}
        elif all(isinstance(k, tuple) and len(k) == 2 for k in results):
            flat = dict(results)
        elif all(isinstance(v, Result) for v in results.values()):
            flat = {(None, c): res for c, res in results.items()}
        else:
            raise TypeError("grid takes {(row_label, col_label): Result}, "
                            "{row_label: {col_label: Result}}, {col_label: Result}, "
                            "a list of lists of Results or a list of Results")
        row_labels = list(rows) if rows is not None else list(dict.fromkeys(k[0] for k in flat))
        col_labels = list(cols) if cols is not None else list(dict.fromkeys(k[1] for k in flat))
        cells = [[flat.get((r, c)) for c in col_labels] for r in row_labels]
        if row_labels == [None]:
            row_labels = None
    elif isinstance(results, Sequence) and not isinstance(results, str):
        rows_in = list(results)
        if rows_in and all(isinstance(r, Result) or r is None for r in rows_in):
            rows_in = [rows_in]
        cells = [list(r) for r in rows_in]
        if not cells or not all(isinstance(r, Sequence) and not isinstance(r, str)
                                for r in rows_in):
            raise TypeError("grid takes a non-empty list of lists of Results (or a mapping)")
        width = max(len(r) for r in cells)
        cells = [r + [None] * (width - len(r)) for r in cells]
        row_labels, col_labels = rows, cols
        for name, labels, n in (("rows", rows, len(cells)), ("cols", cols, width)):
            if labels is not None and len(labels) != n:
                raise ValueError(f"{name} has {len(labels)} labels for {n} {name}")
    else:
        raise TypeError(f"grid takes a mapping or a list of lists of Results, got "
                        f"{type(results).__name__}")
    for row in cells:
        for res in row:
            if res is not None:
                _check_result(res, "grid")
    if all(res is None for row in cells for res in row):
        raise ValueError("grid found no result to draw for the given rows/cols")
    row_labels = None if row_labels is None else list(row_labels)
    col_labels = None if col_labels is None else list(col_labels)
    return cells, row_labels, col_labels


def grid(results, rows: Sequence | None = None, cols: Sequence | None = None, *, log: bool = True,
         normalize: bool = False, cmap=None, key: str | None = None, title: str | None = None,
         vmin: float | None = None, vmax: float | None = None,
         panel_size: tuple[float, float] = _PANEL_SIZE) -> Figure:
    """Several layer x time maps on one shared colour scale (STAR Fig. 2: cells x losses).

    Every panel is a :func:`heatmap` (layer 0 at the bottom, time left to right, non-finite cells
    hatched and counted in the panel title) and all panels use one norm object, so equal colours
    mean equal values across panels; one colour bar serves the whole figure.

    Args:
      results: ``{(row_label, col_label): Result}`` (e.g. ``{("last", "lstm"): r, ...}``),
        ``{row_label: {col_label: Result}}``, ``{col_label: Result}`` (one row), a list of lists of
        Results (``None`` leaves a panel empty) or a list of Results (one row).
      rows, cols: for mappings, which labels to show and in which order (default: order of first
        appearance; a missing ``(row, col)`` leaves an empty panel); for lists, the labels of the
        rows / columns (default: none, each panel titled from its config).
      log, normalize, cmap, key, vmin, vmax: as in :func:`heatmap`; with ``normalize`` each panel is
        divided by its own ``values[-1, -1]`` and the scale centred on 1 covers all panels (from
        the smallest ratio of any panel to the largest).
      title: figure title; the total non-finite count is appended when there are any.
      panel_size: ``(width, height)`` of one panel in inches.

    Returns:
      The figure: ``len(rows) * len(cols)`` panel axes plus one colour-bar axes.
    """
    cells, row_labels, col_labels = _arrange(results, rows, cols)
    n_rows, n_cols = len(cells), len(cells[0])
    drawn = [[None if r is None else (_relative(_map_array(r, key), _wrt(r, key)) if normalize
                                      else _map_array(r, key)) for r in row] for row in cells]
    shown = [v for row in drawn for v in row if v is not None]
    norm = _norm(shown, log, normalize, vmin, vmax)
    cm = _cmap(cmap, _RELATIVE_CMAP if normalize else _MAGNITUDE_CMAP)

    fig = figure((panel_size[0] * n_cols + 1.2, panel_size[1] * n_rows + 0.5))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    image = None
    for i, row in enumerate(cells):
        for j, res in enumerate(row):
            ax = axes[i, j]
            if res is None:
                ax.set_axis_off()
                continue
            if col_labels is not None:
                panel_title = str(col_labels[j]) if i == 0 else ""
            else:
                panel_title = None
            image = _heatmap_on(ax, res, drawn[i][j], key, log, cm, panel_title, norm)
            if row_labels is not None and j == 0:
                ax.set_ylabel(f"{row_labels[i]}\nlayer $l$")
            elif j > 0:
                ax.set_ylabel("")
            if i < n_rows - 1:
                ax.set_xlabel("")
    labels = dict.fromkeys(  # each quantity once (panels of h beside panels of c: both)
        _quantity(r, key) + (_reference_label(_wrt(r, key)) if normalize else "")
        for row in cells for r in row if r is not None)
    _colorbar(fig, image, axes, "; ".join(labels), shown, norm, normalize)
    total = int(sum(np.sum(~np.isfinite(v)) for v in shown))
    if title or total:
        fig.suptitle(_with_counts(title, total) if title else f"{total} non-finite in total")
    return fig


# ---------------------------------------------------------------------------------------------
# Gate statistics. Every array is looked up through _gate_key, the one place that knows how the
# gates module names them ("{stat}/{gate}").


def _gate_key(stat: str, gate: str) -> str:
    return f"{stat}/{gate}"


def _gate_names(stats: Result) -> list[str]:
    gates = stats.config.get("gates")
    if gates is None:
        gates = list(dict.fromkeys(k.split("/", 1)[1] for k in stats.arrays if "/" in k))
    return [str(g) for g in gates]


def _memory_gate(stats: Result) -> str | None:
    """The gate that keeps the state: ``f`` where the stats have it, else the first with a
    timescale (GRU's ``z``), else None (the first gate, :func:`_gate`)."""
    kept = [g for g in _gate_names(stats) if f"timescale/{g}" in stats.arrays]
    return "f" if "f" in kept else (kept[0] if kept else None)


def _gate(stats: Result, gate: str | None, where: str) -> str:
    """The gate to plot: ``gate`` if the stats have it, the first reported gate when None."""
    _check_result(stats, where)
    if stats.kind != "gate_stats":
        raise ValueError(f"{where} expects a result of kind 'gate_stats', got {stats.kind!r}")
    gates = _gate_names(stats)
    if not gates:
        raise ValueError(f"{where}: these gate stats report no gates (cell "
                         f"{subject(stats.config)!r} has none)")
    if gate is None:
        return gates[0]
    if gate not in gates:
        raise ValueError(f"unknown gate {gate!r}; these stats have gates: {', '.join(gates)}")
    return gate


def _gate_array(stats: Result, stat: str, gate: str, required: bool = True):
    """``stats.arrays["{stat}/{gate}"]`` as a float array; a ValueError (or None) when absent."""
    key = _gate_key(stat, gate)
    if key not in stats.arrays:
        if not required:
            return None
        have = sorted({k.split("/", 1)[0] for k in stats.arrays if k.endswith("/" + gate)})
        raise ValueError(f"gate stats have no {key!r} array (statistic {stat!r} of gate {gate!r}); "
                         f"statistics present for this gate: {', '.join(have) or '(none)'}")
    return np.asarray(stats.arrays[key], dtype=float)


_ABSENT_FACE = "0.88"  # a layer without the gate, in a saturation map


def _gate_layers(stats: Result, gate: str, n_layers: int) -> list[int]:
    """The layers that report ``gate``: every layer, except in a stack whose layers report
    different gates (``config["gate_layers"]``, :func:`gradflow.gates.gate_layout`)."""
    return [int(l) for l in stats.config.get("gate_layers", {}).get(gate, range(n_layers))]


def _headed(head: str, rest: str) -> str:
    """A panel's title: ``head`` (what was measured, :func:`subject`) and ``rest``, on one
    line (``"lstm \u00b7 gate f saturated (eps=0.05)"``), or on two where that line would be
    long (a stack of different cells, a gate in some layers only), so that the panels of one
    figure do not overlap."""
    if not head:
        return rest
    return f"{head}\n{rest}" if len(head) + len(rest) > 42 else f"{head} \u00b7 {rest}"


def _only_in(layers: list[int], n_layers: int) -> str:
    """``" (layers 1, 3 only)"`` where a gate is in some layers only, else ``""``."""
    if len(layers) == n_layers:
        return ""
    return f" (layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))} only)"


def _layer_selection(layers, n_layers: int):
    """``None``: every layer; ``"pooled"``; an int or a sequence of ints (negative: from top)."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, str):
        if layers != "pooled":
            raise ValueError(f"layers must be None, 'pooled', an int or a list of ints, "
                             f"got {layers!r}")
        return "pooled"
    chosen = [layers] if np.ndim(layers) == 0 else list(layers)
    out = []
    for l in chosen:
        is_int = isinstance(l, (int, np.integer)) and not isinstance(l, bool)
        if not is_int or not -n_layers <= l < n_layers:
            raise ValueError(f"layer {l!r} out of range for {n_layers} layers (0..{n_layers - 1})")
        out.append(int(l) % n_layers)
    if not out:
        raise ValueError("layers selects no layer")
    return out


def gate_histograms(stats: Result, gate: str | None = None, layers=None, ax: Axes | None = None, *,
                    title: str | None = None) -> Figure:
    """Histograms of one gate's activations over its range, per layer or pooled over layers.

    Reads ``hist/{gate}``: ``(L, bins)`` counts of activations in the ``bins`` equal bins of the
    gate's range, on the edges :func:`gradflow.gates.hist_edges` gives (``[0, 1]``; ``[-1, 1]``
    for a tanh gate, ``bin_edges/{gate}``), and, when present, ``outside/{gate}``: ``(L, 3)``
    counts below and above that range and NaN (as :func:`gradflow.gates.saturation` writes them;
    refined gates leave [0, 1]; an ``(L, 2)`` array without the NaN column is accepted too); the
    outside counts of the drawn layers are summed and written under the title.

    Args:
      stats: a ``gate_stats`` result.
      gate: gate name (default: the first of ``stats.config["gates"]``).
      layers: ``None``: every layer, one outline per layer coloured from bottom (dark) to top
        (light); an int: that layer; a list of ints: those layers; ``"pooled"``: counts summed over
        layers. One layer or pooled is drawn as bars (bar heights = counts).
      ax: axes to draw on; a new figure is made when None.
      title: axes title (default: cell and gate); non-finite counts are appended.

    Returns:
      The figure.
    """
    gate = _gate(stats, gate, "gate_histograms")
    hist = _gate_array(stats, "hist", gate)
    if hist.ndim != 2:
        raise ValueError(f"{_gate_key('hist', gate)!r} must be (layers, bins), got {hist.shape}")
    outside = _gate_array(stats, "outside", gate, required=False)
    if outside is not None and (outside.ndim != 2 or outside.shape[0] != hist.shape[0]
                                or outside.shape[1] not in (2, 3)):
        raise ValueError(f"{_gate_key('outside', gate)!r} must be (layers, 3) counts below / "
                         f"above the gate's range and NaN, got {outside.shape}")
    n_layers, bins = hist.shape
    edges = _views.hist_edges(stats, gate)
    present = _gate_layers(stats, gate, n_layers)
    chosen = present if layers is None else _layer_selection(layers, n_layers)
    lacking = [] if chosen == "pooled" else [l for l in chosen if l not in present]
    if lacking:  # (its zero counts drew as a measured, empty histogram)
        raise ValueError(f"gate_histograms: gate {gate!r} is in layer(s) "
                         f"{', '.join(map(str, present))} only; layers={layers!r} asks for "
                         f"{', '.join(map(str, lacking))}")
    fig, ax = _figure_axes(ax, (5.2, 3.4))

    names = _row_names(stats.config, n_layers) or [f"layer {l}" for l in range(n_layers)]
    if chosen == "pooled" or len(chosen) == 1:
        counts = hist.sum(axis=0) if chosen == "pooled" else hist[chosen[0]]
        what = "all layers pooled" if chosen == "pooled" else names[chosen[0]]
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C0",
               edgecolor="white", linewidth=0.5, label=what)
    else:
        what = f"{len(chosen)} layers"
        cm = matplotlib.colormaps[_MAGNITUDE_CMAP]
        depth = mcolors.Normalize(0, max(n_layers - 1, 1))
        for l in chosen:
            ax.stairs(hist[l], edges, color=cm(depth(l)), linewidth=1.2, label=names[l])
        if len(chosen) <= 8:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      borderaxespad=0.0)
        else:
            fig.colorbar(ScalarMappable(depth, cm), ax=ax, label="layer $l$")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xticks(np.linspace(edges[0], edges[-1], 5))  # [-1, 1] in halves, [0, 1] in quarters
    ax.set_xlabel(f"gate {gate} activation")
    ax.set_ylabel("count")

    rows = list(range(n_layers)) if chosen == "pooled" else chosen
    bad = int(np.sum(~np.isfinite(hist[rows])))
    if chosen == "pooled":
        what += _only_in(present, n_layers)
    base = _headed(subject(stats.config, ""), f"gate {gate} ({what})")
    lines = [_with_counts(base if title is None else title, bad)]
    if outside is not None:
        counts = outside[rows].sum(axis=0)
        lo, hi = f"{edges[0]:g}", f"{edges[-1]:g}"
        line = f"outside [{lo}, {hi}]: {counts[0]:.0f} below {lo}, {counts[1]:.0f} above {hi}"
        if counts.size > 2 and counts[2]:
            line += f", {counts[2]:.0f} NaN"
        lines.append(line)
    ax.set_title("\n".join(lines))
    return fig


def saturation_map(stats: Result, gate: str | None = None, ax: Axes | None = None, *,
                   cmap=None, title: str | None = None, colorbar: bool = True,
                   vmin: float | None = 0.0, vmax: float | None = 1.0) -> Figure:
    """Fraction of a gate's activations that are saturated, per layer and step, on a linear
    colour scale fixed to ``[0, 1]``, so a colour means the same fraction in every map (1%
    saturation is drawn dark, not in the brightest colour); ``vmax=None`` scales the colours to
    the largest fraction in this map instead. The colour bar's label says the scale.

    Draws ``S[l, t] = saturated/{gate}[l, t]``, the fraction of units (and examples) with
    activation ``< eps`` or ``> 1 - eps``, layer 0 at the bottom, time left to right; non-finite
    entries hatched and counted in the title.

    Args:
      stats: a ``gate_stats`` result.
      gate: gate name (default: the first of ``stats.config["gates"]``).
      ax, cmap, title, colorbar: as in :func:`heatmap` (default colormap ``"magma"``).
      vmin, vmax: colour limits (default 0 and 1; ``None`` for the map's smallest / largest
        finite fraction, an all-zero map getting [0, 1]).

    Returns:
      The figure.
    """
    return _saturation_map(stats, gate, ax, cmap, title, colorbar, vmin, vmax,
                           "this map's" if vmax is None else None)


def _fraction_label(norm, fitted: str | None) -> str:
    """The saturation colour bar's label: what it shows and on which scale; ``fitted`` names
    whose largest fraction set the top when it was not given (e.g. ``"this map's"``)."""
    top = f"{norm.vmax:.3g}" + (f", {fitted} largest" if fitted else "")
    return f"fraction saturated\n(colour scale {norm.vmin:.3g} to {top})"


def _saturation_map(stats, gate, ax, cmap, title, colorbar, vmin, vmax, fitted):
    """:func:`saturation_map`; ``fitted`` (or None) names whose largest fraction ``vmax`` is,
    for the colour bar's label."""
    gate = _gate(stats, gate, "saturation_map")
    values = _gate_array(stats, "saturated", gate)
    if values.ndim != 2:
        raise ValueError(f"{_gate_key('saturated', gate)!r} must be (layers, steps), got "
                         f"{values.shape}")
    fig, ax = _figure_axes(ax, (5.2, 3.6))
    present = _gate_layers(stats, gate, values.shape[0])
    absent = ~np.isin(np.arange(values.shape[0]), present)[:, None]  # blank rows, not NaN
    values = np.ma.masked_array(values, np.broadcast_to(absent, values.shape))
    norm = _norm([values.compressed()], False, False, vmin, vmax)
    image = _draw_map(ax, values, norm, _cmap(cmap, _FRACTION_CMAP),
                      _row_names(stats.config, values.shape[0]))
    T = values.shape[1]
    for l in np.flatnonzero(absent[:, 0]):  # grey, and said: this layer's cell has no such gate
        ax.add_patch(Rectangle((-0.5, l - 0.5), T, 1.0, facecolor=_ABSENT_FACE, linewidth=0.0))
        ax.text((T - 1) / 2, l, f"no gate {gate}", ha="center", va="center", fontsize="small",
                color="0.3")
    eps = next((stats.config[k] for k in ("eps", "epsilon") if k in stats.config), None)
    base = _headed(subject(stats.config, ""), f"gate {gate} saturated"
                   + _only_in(present, values.shape[0])
                   + (f" (eps={eps:g})" if isinstance(eps, (int, float)) else ""))
    ax.set_title(_with_counts(base if title is None else title,
                              int(np.sum(~np.isfinite(values.compressed())))))
    if colorbar:
        fig.colorbar(image, ax=ax, label=_fraction_label(norm, fitted))
    return fig


# ---------------------------------------------------------------------------------------------
# Local gains.


def _labelled(results, where: str) -> dict:
    """``{label: Result}`` from one Result (labelled by its cell) or a mapping."""
    if isinstance(results, Result):
        return {subject(results.config, results.kind): results}
    if isinstance(results, Mapping) and results:
        return {str(k): _check_result(v, where) for k, v in results.items()}
    raise TypeError(f"{where} takes a Result or a non-empty mapping label -> Result, got "
                    f"{type(results).__name__}")


def _references(reference) -> dict:
    """``{label: value}`` from None, a number, a sequence of numbers or a mapping label -> value."""
    if reference is None:
        return {}
    if isinstance(reference, Mapping):
        return {f"{k}: {float(v):g}": float(v) for k, v in reference.items()}
    if np.ndim(reference) == 0:
        return {f"reference {float(reference):g}": float(reference)}
    return {f"reference {float(v):g}": float(v) for v in reference}


_MARKERS = "os^Dvx"


def gain_profile(gains, ax: Axes | None = None, kind: str = "vertical", stat: str = "rms",
                 reference=None, *, band: bool = True, title: str | None = None) -> Figure:
    """Time-averaged local gain per layer against depth, on a log y axis.

    For each ``local_gains`` result, with ``A = arrays[f"{kind}_{stat}"]`` (``(L, T)``), draws
    ``mean_t A[l, t]`` for ``l = 0..L-1`` (the mean over the finite entries of each row; the
    non-finite ones are counted in the title, as are gains of 0, which a log axis cannot
    show) and, with ``band``, the range ``min_t .. max_t`` as a
    shaded band. A dashed line marks gain 1 (magnitude preserved); ``reference`` adds dotted lines
    at closed-form values, e.g. ``0.25`` (LSTM vertical gain at init) or ``{"LSTM": 0.25,
    "STAR": 0.5}``.

    Args:
      gains: a ``local_gains`` result or a mapping label -> result (one line each).
      ax: axes to draw on; a new figure is made when None.
      kind: ``"vertical"`` (``dh^l_t/dh^{l-1}_t``), ``"temporal"`` (``dh^l_t/dh^l_{t-1}``) or
        ``"state"`` (the whole state's, ``ds^l_t/ds^l_{t-1}``: with an LSTM's memory path).
      stat: ``"rms"`` (``||J||_F / sqrt(H)``) or ``"spectral"`` (``||J||_2``).
      reference: None, a number, a list of numbers or a mapping label -> number.
      band: shade the min..max over time.
      title: axes title; the counts of non-finite and zero gains are appended.

    Returns:
      The figure.
    """
    if kind not in GAIN_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, GAIN_KINDS))}, got {kind!r}")
    if stat not in GAIN_STATS:
        raise ValueError(f"stat must be one of {', '.join(map(repr, GAIN_STATS))}, got {stat!r}")
    series = _labelled(gains, "gain_profile")
    refs = _references(reference)
    fig, ax = _figure_axes(ax, (6.4, 3.6))
    bad = zero = 0
    for i, (label, res) in enumerate(series.items()):
        values = _map_array(res, f"{kind}_{stat}")
        finite = np.isfinite(values)
        bad += int(np.sum(~finite))
        zero += int(np.sum(finite & (values <= 0)))  # off the log axis: counted instead
        n = finite.sum(axis=1)
        mean = _views.finite_row_means(values)
        depth = np.arange(values.shape[0])
        # hollow markers of their own shape, larger first: cells with equal gains (GRU and
        # STAR at 0.5) stay visible one inside the other
        (line,) = ax.plot(depth, mean, "-", marker=_MARKERS[i % len(_MARKERS)],
                          fillstyle="none", color=f"C{i}",
                          markersize=max(3.0, 8.0 - 1.5 * i), label=label)
        if band:
            lo = np.where(n > 0, np.where(finite, values, np.inf).min(axis=1), np.nan)
            hi = np.where(n > 0, np.where(finite, values, -np.inf).max(axis=1), np.nan)
            ax.fill_between(depth, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0,
                            label="min..max over $t$" if i == 0 else None)
    ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1.0, label="gain 1 (preserved)")
    for j, (label, value) in enumerate(refs.items()):
        ax.axhline(value, color=f"C{len(series) + j}", linestyle=":", linewidth=1.2, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer $l$ (depth)")
    ax.set_ylabel(f"{kind} gain ({stat}), mean over $t$")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    # Outside the axes: profiles and bands can fill the whole plot area.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.set_title(_with_counts(f"{kind} local gains ({stat})" if title is None else title, bad,
                              zero))
    return fig


# ---------------------------------------------------------------------------------------------
# Figures of whole experiments (gradflow.experiments results) and of one gate_stats result.


def gains_figure(gains: Result, stat: str = "rms") -> Figure:
    """A :func:`gain_profile` per kind of a ``local_gains`` result (vertical, temporal, the whole
    state's), side by side; the figure title names the stack and the problem's settings."""
    fig = figure((5.6 * len(GAIN_KINDS), 3.8))
    for ax, kind in zip(fig.subplots(1, len(GAIN_KINDS)), GAIN_KINDS):
        gain_profile(gains, ax=ax, kind=kind, stat=stat)
    line = settings(gains.config)
    fig.suptitle(subject(gains.config, "local gains") + (f" \u00b7 {line}" if line else ""))
    return fig


def gates_figure(stats: Result, gates: Sequence[str] | None = None, *,
                 vmax: float | None = 1.0) -> Figure:
    """Per gate, a column: its :func:`saturation_map` above its per-layer
    :func:`gate_histograms`; the figure title names the cell and the problem's settings.

    Every saturation map has the same colour scale, ``[0, vmax]`` (default ``[0, 1]``), so one
    colour is one fraction in every panel; ``vmax=None`` sets the top to the largest fraction
    of the gates shown (still one scale for all). The colour bars' labels say the scale.

    Args:
      stats: a ``gate_stats`` result (:func:`gradflow.gates.saturation`).
      gates: the gates to show (default: every gate the stats report).
      vmax: the top of the shared colour scale, or None for the largest fraction shown.
    """
    _gate(stats, None, "gates_figure")  # a gate_stats result reporting gates
    gates = _gate_names(stats) if gates is None else list(gates)
    for gate in gates:
        _gate(stats, gate, "gates_figure")
    fitted = None
    if vmax is None:
        fractions = [_gate_array(stats, "saturated", g) for g in gates]
        finite = np.concatenate([f[np.isfinite(f)].ravel() for f in fractions])
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        fitted = "the gates'"
    fig = figure((5.2 * len(gates), 7.0))
    axes = fig.subplots(2, len(gates), squeeze=False)
    for j, gate in enumerate(gates):
        _saturation_map(stats, gate, axes[0, j], None, None, True, 0.0, vmax, fitted)
        gate_histograms(stats, gate, layers=None, ax=axes[1, j])
    line = settings(stats.config)
    fig.suptitle(subject(stats.config, "gates") + (f" \u00b7 {line}" if line else ""))
    return fig


def _titled(title: str | None, line: str) -> str:
    """``title`` over the settings ``line`` (either may be empty)."""
    return "\n".join(p for p in (title, line) if p)


def draw_grid(grid: Result, *, normalize: bool = True, title: str | None = None,
              color_range=None) -> Figure:
    """The STAR Fig. 2 layout of a :func:`gradflow.experiments.gradient_grid` result: rows
    losses, columns cells, one shared log colour scale.

    With ``normalize`` (the default, as in the paper's figure) each map is drawn relative to its
    own top-last value, ``P[l, t] / P[L-1, T-1]``; ``normalize=False`` draws the absolute values.
    A map whose top-last value is 0 or non-finite has nothing to be relative to: its panel is
    left empty with a note saying so, instead of failing the figure. The title is ``title``
    (default: what is drawn) over the settings (:func:`settings`: L, T, H, init, seed); the
    row labels name the losses. ``color_range=(low, high)``, ``0 < low < high``, fixes the
    colour scale (the STAR paper's figure is clipped to about ``(0.05, 5)``); values beyond it
    take the end colours and the colour bar's arrows say they exist.
    """
    vmin, vmax = _color_range(color_range)
    _views._of_kind(grid, "maps")
    cells, losses = grid.config["cells"], grid.config["losses"]
    panels, empty = {}, []
    for i, loss in enumerate(losses):
        for j, cell in enumerate(cells):
            p = panel(grid, loss, cell)
            ref = float(p.values[-1, _views.entry_step(p.values, p.config.get("wrt"))])
            if normalize and not (np.isfinite(ref) and ref > 0):
                zeros = int(np.sum(p.values == 0))
                bad = int(np.sum(~np.isfinite(p.values)))
                note = (f"all {zeros} entries are 0" if zeros == p.values.size
                        else f"top-last value is {ref:g}"
                        + (f" ({bad} non-finite)" if bad else ""))
                empty.append((i, j, cell, note))
            else:
                panels[(f"loss={loss}", cell)] = p
    if title is None:
        title = f"gradient maps wrt {grid.config.get('wrt', '?')}" + (
            f", relative to (top layer, last step{_reaches(grid.config.get('wrt'))})"
            if normalize else "")
    heading = _titled(title, settings(grid.config))
    fig = _grid_or_empty(panels, losses, cells, normalize, heading, vmin, vmax)
    total = sum(int(np.sum(~np.isfinite(grid[_views._keys(loss, cell)[0]])))
                for loss in losses for cell in cells)
    if total:  # the empty panels' too (the drawn ones alone were counted)
        fig.suptitle(_with_counts(heading, total))
    for i, j, cell, note in empty:
        ax = fig.axes[i * len(cells) + j]  # the panels come first, row by row
        ax.text(0.5, 0.5, f"{cell}:\n{note};\nnothing to normalise by", ha="center",
                va="center", transform=ax.transAxes)
        if i == 0:
            ax.set_title(cell)
    return fig


def _color_range(color_range) -> tuple:
    """:func:`draw_grid`'s ``color_range`` as ``(vmin, vmax)`` for :func:`grid` (None: the
    data's range), else a ValueError naming ``color_range``: its log scale needs
    ``0 < low < high``, both finite."""
    if color_range is None:
        return None, None
    try:
        low, high = (float(v) for v in color_range)
    except (TypeError, ValueError):
        raise ValueError(f"color_range must be a (low, high) pair of numbers, got "
                         f"{color_range!r}") from None
    if not 0 < low < high < np.inf:
        raise ValueError(f"color_range must be (low, high) with 0 < low < high, both finite "
                         f"(a log colour scale), got {color_range!r}")
    return low, high


def _grid_or_empty(panels, losses, cells, normalize, title, vmin=None, vmax=None) -> Figure:
    """:func:`grid` of ``panels``; when no panel can be drawn, a figure of empty panels."""
    rows = [f"loss={loss}" for loss in losses]
    if panels:
        return grid(panels, rows=rows, cols=cells, normalize=normalize, title=title, vmin=vmin,
                    vmax=vmax)
    fig = figure((_PANEL_SIZE[0] * len(cells) + 1.2, _PANEL_SIZE[1] * len(rows) + 0.5))
    for ax in fig.subplots(len(rows), len(cells), squeeze=False).flat:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


def draw_gains(data: Result, *, title: str | None = None) -> Figure:
    """:func:`gain_profile` of every cell of a :func:`gradflow.experiments.vertical_gain`
    result, with the closed forms as reference lines (cells sharing one value share a line)."""
    refs = {}
    for c, v in _views._of_kind(data, "cells").config["closed_form"].items():
        refs.setdefault(v, []).append(c)
    return gain_profile({c: gain_panel(data, c) for c in data.config["cells"]},
                        reference={"/".join(cs): v for v, cs in refs.items()}, band=True,
                        title=_titled(title, settings(data.config)))


def draw_gate_panels(panels: dict, gates: dict, title: str | None = None, *, fig=None):
    """Rows = ``panels`` (``{row label: {entry label: gate_stats}}``), columns = entries; each
    panel the pooled histogram of the entry's gate ``gates[entry]`` (absent or None: the gate
    that keeps its state, ``f`` or GRU's ``z``, else its first gate) with its saturated
    fraction in the title. Drawn into ``fig`` (a Figure or SubFigure) if given."""
    rows = list(panels)
    cols = list(next(iter(panels.values())))
    fig = fig if fig is not None else figure((3.6 * len(cols), 2.9 * len(rows)))
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for i, row in enumerate(rows):
        for j, label in enumerate(cols):
            stats = panels[row][label]
            gate = _gate(stats, gates.get(label) or _memory_gate(stats),
                         f"the gate panel of {label!r}")
            s = _views.summary(stats)[gate]
            gate_histograms(stats, gate, layers="pooled", ax=axes[i, j],
                            title=f"{label}, gate {gate} ({row})\nsaturated "
                                  f"{s['saturated']:.2f}, mean {s['mean']:.2f}")
    if title:
        fig.suptitle(title)
    return fig


def draw_saturation(data: Result, gates: Mapping | None = None, *,
                    title: str | None = None) -> Figure:
    """The pooled gate histograms of every entry of a
    :func:`gradflow.experiments.gate_saturation` result, one column each; ``gates`` maps an
    entry's label to the gate drawn (default: the gate that keeps its state, ``f`` or GRU's
    ``z``, else its first gate)."""
    labels = list(_views._of_kind(data, "stats").config["stats"])
    return draw_gate_panels({"init": {label: stats_panel(data, label) for label in labels}},
                            dict(gates or {}), title=_titled(title, settings(data.config)))


def _smooth(v: np.ndarray, width: int) -> np.ndarray:
    """Running mean over ``width`` steps (shorter at the start) of the finite entries, NaN
    where the entry itself is not finite: a diverged run's line stops there (a mean of the
    finite ones drew it on, flat, at its last finite loss)."""
    v = np.asarray(v, float)
    ok = np.isfinite(v)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(i - width, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, (c[i] - c[lo]) / (n[i] - n[lo]), np.nan)


def _diverged(curves: dict) -> str:
    """``"run: 11 of 12 losses non-finite from step 1; ..."`` for the runs (seeds) whose
    training or evaluation loss left the finite numbers, "" if none did."""
    notes = []
    for label, c in curves.items():
        bad = ~np.isfinite(np.asarray(c["loss"], float))
        bad_eval = ~np.isfinite(np.asarray(c["eval_loss"], float))
        if bad.any() or bad_eval.any():
            steps = np.broadcast_to(np.asarray(c["step"]), bad.shape)[bad]
            notes.append(f"{label}: {int(bad.sum())} of {bad.size} losses" + (
                f" non-finite from step {int(steps.min())}" if bad.any() else "")
                + (f", {int(bad_eval.sum())} of {bad_eval.size} evaluations" if bad_eval.any()
                   else "") + (" non-finite" if not bad.any() else ""))
    return "; ".join(notes)


def _seed_band(ax, x, v: np.ndarray, color: str, style: str, label: str, **kw):
    """``v: (n,)`` drawn as a line; ``v: (S, n)`` (one row per seed) as its median over seeds
    with the min-max band shaded and the interquartile band darker."""
    v = np.asarray(v, float)
    if v.ndim == 1:
        return ax.plot(x, v, style, color=color, label=label, **kw)
    label = None if label is None else f"{label} (median of {len(v)} seeds)"
    x = np.asarray(x)[0] if np.ndim(x) == 2 else x
    lo, q1, med, q3, hi = np.nanpercentile(v, [0, 25, 50, 75, 100], axis=0)
    ax.fill_between(x, lo, hi, color=color, alpha=0.12, linewidth=0)
    ax.fill_between(x, q1, q3, color=color, alpha=0.25, linewidth=0)
    return ax.plot(x, med, style, color=color, label=label, **kw)


#: A loss axis ends at this factor times the largest first loss of its runs, where a burst
#: (a run diverging for a while) would stretch it over many more decades.
BURST_FACTOR = 100.0


def _clip_bursts(ax, losses) -> None:
    """End the log loss axis ``ax`` at :data:`BURST_FACTOR` times the largest first training
    loss of ``losses`` (``(n,)`` or ``(S, n)`` each) where some finite loss lies beyond it (a
    refined MGU reached 3e11 in its first steps, and every other curve was squeezed into the
    bottom quarter of 15 decades), saying so on the axis."""
    with warnings.catch_warnings():  # (a run diverged from its first step: no first loss)
        warnings.simplefilter("ignore", RuntimeWarning)
        arrays = [np.asarray(v, float) for v in losses]
        first = np.nanmax([np.nanmax(a[..., 0]) for a in arrays])
        peak = np.nanmax([np.nanmax(np.where(np.isfinite(a), a, np.nan)) for a in arrays])
    top = BURST_FACTOR * first
    if np.isfinite(top) and np.isfinite(peak) and peak > top:
        ax.set_ylim(top=top)
        ax.text(0.99, 0.98, f"off the axis: losses up to {peak:.2g}", transform=ax.transAxes,
                ha="right", va="top", fontsize="x-small", color="0.3")


def draw_curves(curves: dict, *, title: str | None = None, smooth: int = 20, fig=None):
    """Learning curves of ``{label: training Result}`` (``History.curve``): left, the training
    loss (running mean over ``smooth`` steps, faint: raw) and the evaluation loss (markers),
    log scale; right, the evaluation metric (accuracy or MSE) against the step. Drawn into
    ``fig`` (a Figure or SubFigure) if given. Multi-seed curves (arrays ``(S, n)``, from
    ``training_runs(seeds=...)``) are drawn as the median over seeds with the min-max band
    (light) and the interquartile band (darker). One legend, beside the panels (it covered
    the curves inside them): a colour per run, then what the line styles and bands mean."""
    if not isinstance(curves, dict) or not curves or not all(
            isinstance(c, Result) for c in curves.values()):
        raise TypeError("draw_curves takes {label: training Result} (gradflow.train's "
                        "History.curve, or gradflow.load of a run's curve.npz), got "
                        + (type(curves).__name__ if not isinstance(curves, dict) else
                           "{" + ", ".join(f"{k!r}: {type(v).__name__}"
                                           for k, v in list(curves.items())[:3]) + "}"))
    fig = fig if fig is not None else figure((11, 3.6))
    ax_loss, ax_metric = fig.subplots(1, 2)
    metric, seeds = "metric", 0
    for i, (label, c) in enumerate(curves.items()):
        # a marker per run too: two runs' equal evaluations (both stuck) stay told apart
        color, mk = f"C{i}", _MARKERS[i % len(_MARKERS)]
        metric = c.config.get("metric", metric)
        if np.ndim(c["loss"]) == 2:
            seeds = max(seeds, len(c["loss"]))
            sm = np.stack([_smooth(v, smooth) for v in c["loss"]])
            _seed_band(ax_loss, c["step"], sm, color, "-", None, linewidth=1.2)
            _seed_band(ax_loss, c["eval_step"], c["eval_loss"], color, f"{mk}--", None,
                       markersize=3, linewidth=0.8, fillstyle="none")
            _seed_band(ax_metric, c["eval_step"], c["eval_metric"], color, f"{mk}-", None,
                       markersize=3, fillstyle="none")
            continue
        ax_loss.plot(c["step"], c["loss"], color=color, alpha=0.15, linewidth=0.8)
        ax_loss.plot(c["step"], _smooth(c["loss"], smooth), color=color, linewidth=1.2)
        ax_loss.plot(c["eval_step"], c["eval_loss"], f"{mk}--", color=color, markersize=3,
                     linewidth=0.8, fillstyle="none")
        ax_metric.plot(c["eval_step"], c["eval_metric"], f"{mk}-", color=color, markersize=3,
                       fillstyle="none")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("loss")
    _clip_bursts(ax_loss, [c["loss"] for c in curves.values()])
    ax_metric.set_xlabel("training step")
    ax_metric.set_ylabel(f"eval {metric}")
    if metric == "mse":
        ax_metric.set_yscale("log")
    handles = [Line2D([], [], color=f"C{i}", linewidth=2, marker=_MARKERS[i % len(_MARKERS)],
                      markersize=4, fillstyle="none", label=label)
               for i, label in enumerate(curves)]
    handles += [Line2D([], [], color="0.35", linewidth=1.2,
                       label=f"train loss (mean of {smooth} steps)"),
                Line2D([], [], color="0.35", linestyle="none", marker="o", markersize=3,
                       fillstyle="none", label="evaluations (eval loss dashed)")]
    if seeds:
        handles.append(Patch(color="0.35", alpha=0.3, label=f"median of {seeds} seeds; bands: "
                                                            "quartiles, min-max"))
    ax_metric.legend(handles=handles, fontsize="small", loc="upper left",
                     bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    diverged = _diverged(curves)
    if title or diverged:
        fig.suptitle("\n".join(t for t in (title, diverged and f"diverged ({diverged}): the "
                                                                 "lines stop there") if t))
    return fig


def draw_updates(curves: dict, ax=None, title: str | None = None):
    """Compute against accuracy: for every run, the fraction of neuron updates at the end of
    training (time gate ``k > 1e-3``; 1 for cells without a time gate, which update every
    neuron at every step) against the final evaluation metric."""
    fig, ax = _figure_axes(ax, (5, 3.6))
    metric = "metric"
    for i, (label, c) in enumerate(curves.items()):
        metric = c.config.get("metric", metric)
        # per seed (a single-seed curve is one seed); median with min-max bars over seeds
        fracs = (np.atleast_2d(c["eval_updates"])[:, -1] if "eval_updates" in c.arrays
                 else np.ones(1))
        finals = np.atleast_2d(c["eval_metric"])[:, -1]
        frac, final = float(np.median(fracs)), float(np.median(finals))
        ax.errorbar([frac], [final], xerr=[[frac - fracs.min()], [fracs.max() - frac]],
                    yerr=[[final - finals.min()], [finals.max() - final]], fmt="o",
                    color=f"C{i}", capsize=2, label=label)
        ax.annotate(f"{frac:.3g}", (frac, final), fontsize="x-small",
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("fraction of neuron updates (k > 1e-3) at the end (median, min-max)")
    ax.set_ylabel(f"final eval {metric}")
    if metric == "mse":
        ax.set_yscale("log")
    ax.legend(fontsize="x-small")
    ax.set_title(title or "compute vs result")
    return fig


def _training_settings(config: dict, curve: dict) -> str:
    """``task adding(steps=10), L=8, H=32, 1500 steps of batch 64, lr 0.003, seed 0, eval metric
    mse`` (a run's own ``lr`` beside it: ``lr 0.003 (star 0.01)``; the metric is the task's
    evaluation metric, which for copy is accuracy while training minimises cross-entropy)."""
    task = curve.get("task", {})
    args = ", ".join(f"{k}={v}" for k, v in task.items() if k != "task")
    own = {label: run["lr"] for label, run in config.get("runs", {}).items()
           if run.get("lr", config["lr"]) != config["lr"]}
    lr = f"lr {config['lr']:g}" + (" (" + ", ".join(f"{k} {v:g}" for k, v in own.items())
                                   + ")" if own else "")
    return (f"task {task.get('task', config.get('task'))}({args}), L={config['layers']}, "
            f"H={config['hidden']}, {config['steps']} steps of batch {config['batch']}, "
            f"{lr}, {_seeds_text(config)}, eval metric {curve.get('metric', '?')}")


def _seeds_text(config: dict) -> str:
    """``"seed 0"``, or ``"seeds 0-4 (5)"`` / ``"seeds 0, 3 (2)"`` for a multi-seed result."""
    seeds = config.get("seeds")
    if not seeds:
        return f"seed {config.get('seed')}"
    consecutive = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    shown = f"{seeds[0]}-{seeds[-1]}" if consecutive and len(seeds) > 2 else ", ".join(
        map(str, seeds))
    return f"seeds {shown} ({len(seeds)})"


def _seed_mean(stats: Result) -> Result:
    """A multi-seed record (every array ``(S, ...)``) as its mean over the seeds."""
    return make_result(stats.kind, {k: np.mean(v, axis=0) for k, v in stats.arrays.items()},
                       stats.config, warn=False, source=stats)


def draw_training(data: Result, gates: Mapping | None = None, *,
                  title: str | None = None) -> Figure:
    """A :func:`gradflow.experiments.training_runs` result: learning curves, then (runs with a
    time gate) update fraction against the final result, then (runs that recorded ``"gates"``)
    the pooled histograms of each run's gate ``gates[label]`` (default: the gate that keeps
    its state, ``f`` or GRU's ``z``, else its first gate) at the first and the last step."""
    labels = list(_views._of_kind(data, "runs").config["runs"])
    curves = {label: run_curve(data, label) for label in labels}
    timed = any("eval_updates" in c.arrays for c in curves.values())
    gated = "gates" in data.config["record"]
    n_gate = len(labels) if gated else 0
    fig = figure((max(11.0, 3.6 * n_gate), 3.6 * (1 + timed) + 5.8 * gated))
    subs = fig.subfigures(1 + timed + gated, 1, squeeze=False,
                          height_ratios=[3.6] + [3.6] * timed + [5.8] * gated)[:, 0]
    draw_curves(curves, fig=subs[0], title="learning curves")
    if timed:
        draw_updates(curves, ax=subs[1].subplots(), title="update fraction vs final result")
    if gated:
        seeded = bool(data.config.get("seeds"))
        finals = {label: np.atleast_2d(curves[label]["eval_metric"])[:, -1] for label in labels}
        def final(v):  # a median over the seeds that did not diverge, which it names
            bad = int(np.count_nonzero(~np.isfinite(v)))
            good = np.asarray(v, float)[np.isfinite(v)]
            text = f"{float(np.median(good)):.3g}" if good.size else "nan"
            return text + ((f" ({bad} of {v.size} seeds diverged)" if seeded else
                            " (diverged)") if bad else "")

        acc = {label: final(v) for label, v in finals.items()}
        mean = _seed_mean if seeded else (lambda r: r)
        panels = {f"step {s}": {label: mean(run_record(data, label, "gates", which))
                                for label in labels}
                  for s, which in ((0, "first"), (data.config["steps"], "last"))}
        draw_gate_panels(panels, dict(gates or {}),
                         fig=subs[-1], title="gate activations, pooled over layers"
                         + (f" and averaged over {len(data.config['seeds'])} seeds" if seeded
                            else "") + "; final eval" + (" (median)" if seeded else "") + " "
                         + ", ".join(f"{k}: {v}" for k, v in acc.items()))
    fig.suptitle(_titled(title, _training_settings(data.config,
                                                   data.config["runs"][labels[0]])))
    return fig


# ---------------------------------------------------------------------------------------------
# Output.


def save(fig: Figure, path, *, dpi: float = 150) -> str:
    """Write ``fig`` to ``path`` as PNG, PDF or SVG, chosen by the extension. Returns the path.

    Raises ValueError for another extension (naming the valid ones) and when the path cannot be
    written (missing directory, no permission).
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"save expects a matplotlib Figure, got {type(fig).__name__}")
    if isinstance(dpi, bool) or not isinstance(dpi, numbers.Real) or not 0 < dpi < math.inf:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    path = os.fsdecode(path)  # (a bytes path too)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot save {path!r}: unsupported extension {ext or '(none)'!r}; "
                         f"use one of {', '.join(FORMATS)}")
    check_folder_of(path)
    # No creation date in PDF/SVG output, so equal figures give comparable files.
    metadata = {".pdf": {"CreationDate": None}, ".svg": {"Date": None}}.get(ext)
    try:
        fig.savefig(path, format=ext[1:], dpi=dpi, metadata=metadata, bbox_inches="tight")
    except Exception as e:  # the machine's refusal (a full disk): an OSError, or one raised
        # while it was handled (matplotlib's PDF writer fails closing the stream)
        error = e
        while error is not None and not isinstance(error, OSError):
            error = error.__cause__ or error.__context__
        if error is None:
            raise
        raise InputError(f"cannot write {path!r}: {error.strerror or error}") from None
    return path


def _factor_value(condition: dict, factor: str):
    if factor == "size":
        return f"{condition['layers']}x{condition['steps']}"
    return condition.get(factor, "-")  # loss, wrt: factors of gradient-map conditions only


def draw_atlas(results: Mapping[str, Result], rows: str = "input_scale", cols: str = "init", *,
               title: str | None = None) -> Figure:
    """Where each claim holds: a :func:`gradflow.atlas.atlas` result drawn as small panels.

    One band of panels per claim and cell (``"lstm"``, ``"lstm:forget_bias=1.0"``, ...), one
    panel per combination of the other factors (size ``LxT``, hidden, loss, wrt); inside a panel
    the rows and columns are the values of the factors ``rows`` and ``cols``, each square
    coloured by the fraction of seeds for which the claim holds (0 red .. 1 green, the fraction
    written on it; grey: not measured). A square where some seeds' statistic is not finite
    (the map overflowed: NaN counts as "does not hold") is hatched and says ``NaN k/S``, so a
    non-finite map does not read as a measured failure.
    """
    factors = ("input_scale", "init", "size", "hidden", "loss", "wrt")
    for name, f in (("rows", rows), ("cols", cols)):
        if f not in factors:
            raise ValueError(f"unknown {name} factor {f!r}; valid: {', '.join(factors)}")
    if rows == cols:
        raise ValueError(f"rows and cols must be two different factors, got {rows!r} twice")
    if not results:
        raise ValueError("draw_atlas needs at least one claim's result")
    rest = [f for f in factors if f not in (rows, cols)]
    for res in results.values():
        _check_result(res, "draw_atlas")
    # settings beyond the factors that tell conditions apart (grids that differ in batch: one
    # square was drawn for two conditions) take their own panels
    every = [c for res in results.values() for c in res.config["conditions"]]
    rest += [k for k in ("batch", "dtype", "readout_seed", "measure")
             if len({str(c.get(k)) for c in every}) > 1]
    bands = {}
    for name, res in results.items():
        stat = np.asarray(res.statistic, float)
        for c, frac, st in zip(res.config["conditions"], res.fraction, stat):
            key = tuple(_factor_value(c, f) for f in rest)
            bands.setdefault((name, c["cell"]), {}).setdefault(key, {})[
                (_factor_value(c, rows), _factor_value(c, cols))] = (
                    float(frac), int(np.count_nonzero(~np.isfinite(st))), st.size)
    ncol = max(len(p) for p in bands.values())
    # Bands fill rows of ncol panels in order; a band of fewer panels shares its row with the
    # next ones (a claim read in one condition group was a row of its own: a tall strip).
    rows_, row = [], []
    for b, panels in enumerate(bands.values()):
        if row and len(row) + len(panels) > ncol:
            rows_.append(row)
            row = []
        row += [(b, j) for j in range(len(panels))]
    rows_.append(row)
    fig = figure((1.9 * ncol + 1.0, 1.45 * len(rows_) + 0.6))
    axes = fig.subplots(len(rows_), ncol, squeeze=False)
    for i, row in enumerate(rows_):
        for ax in axes[i, len(row):]:
            ax.set_axis_off()
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="0.8")
    image = None
    items = list(bands.items())
    for i, row in enumerate(rows_):
        for slot, (b, j) in enumerate(row):
            (name, cell), panels = items[b]
            ax = axes[i, slot]
            key, cells = list(panels.items())[j]
            rv = list(dict.fromkeys(r for r, _ in cells))
            cv = list(dict.fromkeys(c for _, c in cells))
            grid_ = np.full((len(rv), len(cv)), np.nan)
            for (r, c), (frac, _, _) in cells.items():
                grid_[rv.index(r), cv.index(c)] = frac
            image = ax.imshow(grid_, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
            for (r, c), (frac, bad, n) in cells.items():
                a, b = rv.index(r), cv.index(c)
                text = f"{frac:.2g}"
                if bad:
                    text += f"\nNaN {bad}/{n}"
                    ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1.0, 1.0, fill=False,
                                           hatch="////", edgecolor="0.35", linewidth=0.0))
                ax.text(b, a, text, ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(cv)), [str(v) for v in cv], fontsize=6)
            ax.set_yticks(range(len(rv)), [str(v) for v in rv], fontsize=6)
            parts = [_panel_label(f, v) for f, v in zip(rest, key) if v != "-"]
            half = (len(parts) + 1) // 2  # two lines where one would run into the next title
            ax.set_title(", ".join(parts) if len(", ".join(parts)) <= 24 else
                         ", ".join(parts[:half]) + "\n" + ", ".join(parts[half:]), fontsize=6)
            if j == 0:
                ax.set_ylabel(f"{name}\n{cell}\n{rows}", fontsize=6)
            if i == len(rows_) - 1 or slot >= len(rows_[i + 1]):  # nothing drawn below
                ax.set_xlabel(cols, fontsize=6)
    if image is not None:
        counts = sorted({np.shape(r.statistic)[1] for r in results.values()})
        fig.colorbar(image, ax=axes, shrink=0.5, label=(
            f"fraction of the {' or '.join(map(str, counts))} seed"
            f"{'' if counts == [1] else 's'} where the claim holds"))
    legend = "(panel titles: " + ", ".join(_FACTOR_NAMES.get(f, f) for f in rest) + ")"
    fig.suptitle(f"{title}\n{legend}" if title else f"where each claim holds {legend}",
                 fontsize=8)  # (a given title too: "0.1, orthogonal" named no factor)
    return fig


# How draw_atlas names a factor in its panel titles and suptitle.
_FACTOR_NAMES = {"size": "layers x steps", "hidden": "H", "loss": "loss", "wrt": "map wrt",
                 "input_scale": "input scale", "init": "init"}


def _panel_label(factor: str, value) -> str:
    """``H=32``, ``10x10``, ``last``, ``scale 0.1``, ``batch 16``: a factor's value in an atlas
    panel title (a bare number is named by its factor)."""
    if factor in ("batch", "readout_seed"):
        return f"{factor.replace('_', ' ')} {value}"
    if factor == "input_scale":
        return f"scale {value}"
    return f"H={value}" if factor == "hidden" else str(value)


def draw_training_atlas(data: Result, *, title: str | None = None) -> Figure:
    """A :func:`gradflow.atlas_training.training_atlas` result: one row of panels per factor
    value with each run's evaluation metric against the step, one colour per learning rate
    (median over seeds, min-max band shaded; log scale for a regression loss); a last row with
    one panel per claim: the fraction of seeds where it holds per learning rate (rows) and
    factor value (columns), and in the last row the fair verdict (each run at its best
    rate), coloured 0 red .. 1 green, the fraction written on each square."""
    _check_result(data, "draw_training_atlas")
    cfg = data.config
    labels = [r[0] for r in cfg["runs"]]
    values, lrs, claims = cfg["factor"]["values"], cfg["lrs"], list(cfg["claims"])
    ncol = max(len(labels), len(claims), 1)
    fig = figure((2.3 * ncol + 0.6, 2.0 * (len(values) + 1) + 0.5))
    axes = fig.subplots(len(values) + 1, ncol, squeeze=False)
    fname = {"steps": "T"}.get(cfg["factor"]["name"], cfg["factor"]["name"])  # adding's length
    accuracy = cfg.get("task") == "copy"

    def curve(label, v):
        prefix = f"run/{label}@{json.dumps(v)}/"
        return data[prefix + "eval_step"], np.asarray(data[prefix + "eval_metric"])

    # a run the factor does not change (a baseline) is drawn once, in the first row
    fixed = {label for label in labels if len(values) > 1 and all(
        np.array_equal(curve(label, v)[1], curve(label, values[0])[1], equal_nan=True)
        for v in values[1:])}
    for f, v in enumerate(values):
        for j in range(ncol):
            ax = axes[f, j]
            if j >= len(labels) or (f > 0 and labels[j] in fixed):
                ax.set_axis_off()
                continue
            steps, metric = curve(labels[j], v)
            for i, lr in enumerate(lrs):
                _seed_band(ax, steps, metric[i], f"C{i}", "-", f"lr {lr:g}", linewidth=1)
            if accuracy:
                ax.set_ylim(0.0, 1.0)  # one scale: chance-level noise does not read as learning
            else:
                ax.set_yscale("log")
            ax.set_title(f"{labels[j]}, " + (f"any {fname}" if labels[j] in fixed
                                             else f"{fname} = {v}"), fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("training step", fontsize=6)
            if j == 0:
                ax.set_ylabel("eval " + ("accuracy" if accuracy else "MSE"), fontsize=7)
            if f == 0 and j == 0:
                ax.legend(fontsize=5)
    if not accuracy:  # one MSE scale for every panel of curves (a row's own made a panel of
        # 0.1-1 read as learning beside panels reaching 1e-3)
        drawn = [ax for f in range(len(values)) for ax in axes[f] if ax.axison and ax.lines]
        if drawn:
            lo = min(ax.get_ylim()[0] for ax in drawn)
            hi = max(ax.get_ylim()[1] for ax in drawn)
            for ax in drawn:
                ax.set_ylim(lo, hi)
    cmap = matplotlib.colormaps["RdYlGn"]
    for j in range(ncol):
        ax = axes[-1, j]
        if j >= len(claims):
            ax.set_axis_off()
            continue
        frac = np.asarray(data[f"claim/{claims[j]}/fraction"], float).T  # (n_lr, F)
        fair = np.asarray(data[f"claim/{claims[j]}/fair_fraction"], float)[None, :]
        grid_ = np.concatenate([frac, fair])  # (n_lr + 1, F): the last row at best lrs
        ax.imshow(grid_, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.axhline(len(lrs) - 0.5, color="k", linewidth=1.5)
        for (a, b), x in np.ndenumerate(grid_):
            if np.isfinite(x):
                ax.text(b, a, f"{x:.2g}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(values)), [str(v) for v in values], fontsize=6)
        ax.set_yticks(range(len(lrs) + 1), [f"lr {lr:g}" for lr in lrs]
                      + ["each run at\nits best lr"], fontsize=6)
        ax.set_xlabel(fname, fontsize=6)
        ax.set_title(claims[j], fontsize=7)
    fig.suptitle((title or "training atlas") + f"; {len(cfg['seeds'])} seeds (curves: their "
                 "median, bands: quartiles and min-max), bottom row: fraction of seeds where "
                 "each claim holds", fontsize=8)
    return fig


__all__ = ["BURST_FACTOR", "FORMATS", "GAIN_KINDS", "GAIN_STATS", "NONFINITE_HATCH", "ZERO_HATCH",
           "CentredLogNorm", "draw_atlas",
           "draw_curves",
           "draw_gains", "draw_gate_panels", "draw_grid", "draw_saturation", "draw_training", "draw_training_atlas",
           "draw_updates",
           "figure", "gain_profile", "gains_figure", "gate_histograms", "gates_figure", "grid",
           "heatmap", "saturation_map", "save", "settings", "subject"]
