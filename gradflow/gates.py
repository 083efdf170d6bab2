r"""Gate statistics (SPEC section 3): saturation, slopes, memory timescales, time-gate compute.

For every gate ``a`` a cell reports (``stack.apply(params, xs, gates=True).gates[gate]``,
shape ``(L, B, T, H)``), :func:`saturation` returns one :class:`gradflow.results.Result` of
kind ``"gate_stats"`` (:func:`model_saturation`: the same from the activations a model of your
own reports) holding:

* ``mean``: the mean activation :math:`\bar a` (for a time gate: its openness :math:`\bar k`);
* ``saturated``: the fraction of entries with :math:`a < \varepsilon` or :math:`a > 1-\varepsilon`
  (taken literally for refined gates: values beyond ``[0, 1]`` count as saturated; for a
  ``"tanh"`` gate :math:`|a| > 1-\varepsilon`);
* ``slope``: the mean local slope :math:`|\partial a / \partial z|` w.r.t. the gate's own
  pre-activation ``z`` (how much gradient the gate passes to its own parameters), see
  :func:`slopes`: :math:`a(1-a)` for a sigmoid gate, :math:`1-a^2` for a tanh gate,
  recomputed from ``z`` for Cheng et al.'s refined gates; for Gu et al.'s effective gate ``g``
  w.r.t. ``f``'s pre-activation, and ``slope_refine`` w.r.t. the refine gate's; none for
  ON-LSTM's master gates and time gates;
* ``timescale``: for gates that keep the previous state (``cell.retain``: ``f``, the effective
  ``g`` of UR cells, ``1 - k`` of STAR, ...) the memory timescale in steps,
  :math:`1/(1-\bar\kappa)`, of the mean kept fraction :math:`\bar\kappa` (:math:`\kappa = a`, or
  ``1 - a`` where the cell keeps ``1 - a``). The timescale of the mean, not the mean of
  :math:`1/(1-\kappa)`, which one gate rounded to 1 (float32 saturates at
  :math:`z \approx 17`) would make infinite; the per-unit values give the distribution
  (Gu et al.'s UGI spreads them over ``[1, H]``). It is the gate's own timescale, SPEC's
  :math:`1/(1-f)`: where a cell keeps a blend of gates its state's retention differs (g-LSTM
  keeps :math:`1 - k(1-f)` of its memory, longer than ``f``'s where its time gate ``k`` is
  closed; ON-LSTM keeps :math:`\hat f = f\omega + (\tilde f - \omega)`; a UR cell's
  ``f`` gets one beside the effective ``g`` it keeps);
* ``update_fraction``: for time gates (``k`` of ``g_lstm``, ``phased_lstm``; not ``star``'s
  ``k``) the fraction of neuron updates that happen, :math:`k > 10^{-3}`: the compute used
  relative to a plain LSTM;
* ``nonfinite``: the number of inf/NaN activations (counted, never raised on, and left out of
  every other statistic: those are over the finite activations);
* ``hist`` / ``outside``: fixed-bin histogram counts over the range of the gate's kind
  (:func:`value_range`: ``[-1, 1]`` for a ``"tanh"`` gate, ``[0, 1]`` for every other kind)
  and the counts of values below it, above it (refined gates leave ``[0, 1]``) and NaN.

Array names (flat, ``/``-separated; they round-trip through ``Result.save``/``load``)::

    "{stat}/{gate}"           (L, T)     per (layer, step): over batch and units
    "{stat}/{gate}/layer"     (L,)       per layer: over batch, steps and units
    "{stat}/{gate}/pooled"    ()         over everything
    "{stat}/{gate}/unit"      (L, H)     per unit: over batch and steps
                                         (mean, timescale, update_fraction only)
    "hist/{gate}"             (L, bins)  counts in [e_j, e_{j+1}) (the last bin closed)
    "hist/{gate}/pooled"      (bins,)
    "outside/{gate}"          (L, 3)     counts of a < lo, a > hi, NaN ([lo, hi]: value_range)
    "outside/{gate}/pooled"   (3,)
    "bin_edges"               (bins + 1,)  edges over [0, 1], of every gate on that range
    "bin_edges/{gate}"        (bins + 1,)  only for a gate on another range (a "tanh" gate:
                                         [-1, 1]); read a gate's edges with hist_edges

``stat`` is one of :data:`STATS`. ``nonfinite`` maps hold counts (sums); every other map
holds means (fractions) over the gate's finite entries: ``(l, t)`` averages the ``B * H`` values
of step ``t`` in layer ``l`` less those that are inf or NaN, and ``/layer``, ``/pooled`` and
``/unit`` are the means over every finite entry they pool (``timescale``: of the kept
fraction, then transformed). So a forward pass that overflows in a few places (an exploding
cell, Cheng et al.'s refined gates at input scale 1) still has shares and means of the gates
that have values, and ``nonfinite`` says how many had none; an ``(l, t)`` with no finite entry
is NaN. Every entry that is not NaN lands in exactly one histogram bin or ``outside`` column
(inf below or above), so ``hist.sum() + outside.sum() == L * B * T * H``; normalise by that
to get densities. For layers of different widths (:attr:`gradflow.Stack.widths`) only each
layer's real ``H_l`` units count: ``(l, t)`` averages ``B * H_l`` entries, ``/pooled`` is the
mean over every real entry, the histograms hold ``B * T * sum_l H_l`` entries, and the
``/unit`` arrays are ``(L, max_l H_l)`` with 0 beyond ``H_l``. For layers of different cells
that report different gates (:func:`gate_layout`; a GRU under a STAR) each gate is pooled over
the layers that report it: in the others its means are NaN (not counted as non-finite in
``Result.nonfinite``: :func:`gradflow.results.not_measured`) and its counts 0 (no histogram
entries), ``config["gate_layers"]`` says which layers report which gate, and a name two cells
give to different gates is two gates qualified by the cell (``z@gru``, ``z@star``).
``config["gates"]`` lists the gates, ``config["gate_kinds"]`` their kinds (:func:`gate_kinds`);
:func:`summary` gives the pooled scalars as ``{gate: {stat: value}}``; :func:`hist_edges` the
edges of a gate's histogram (also of results saved before per-gate edges existed, whose
histograms were all over ``[0, 1]``).

Example::

  >>> from gradflow import gates
  >>> from gradflow.problem import problem
  >>> stack, params, xs, cfg = problem("ur_lstm", layers=2, steps=5, hidden=8)
  >>> stats = gates.saturation(stack, params, xs, meta=cfg)
  >>> stats["saturated/g"].shape, stats["timescale/f/unit"].shape
  ((2, 5), (2, 8))
  >>> sorted(gates.summary(stats)["g"])
  ['mean', 'nonfinite', 'saturated', 'slope', 'slope_refine', 'timescale']
"""
from __future__ import annotations

import functools
import numbers
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradflow.cells.base import KINDS as _KINDS
from gradflow.cells.base import Cell, check_retain
from gradflow.problem import problem, problem_stack
from gradflow.results import NonFiniteForwardWarning, Result, make_result
from gradflow.errors import user_input
from gradflow import checks
from gradflow import cost as _cost
from gradflow.checks import positive_int as _positive_int
from gradflow.stack import Stack, gate_keys, in_precision, map_layers, where_nonfinite
from gradflow.views import STATS, bin_edges, hist_edges, summary, value_range
from gradflow.xla import jit

#: The most histogram bins :func:`saturation` takes (a million took the figure 6 minutes).
MAX_BINS = 10_000
KINDS = _KINDS
UPDATE_THRESHOLD = 1e-3
#: The default saturation margin (a gate is saturated below ``EPS`` or above ``1 - EPS``) and
#: histogram bins of every gate statistic (API, CLI, atlas and figures).
EPS, BINS = 0.05, 20

GU_GRID = (
    ("LSTM", "lstm", {}),
    ("LSTM+UGI", "lstm", {"init": "ugi"}),
    ("LSTM+R", "lstm", {"aux": "refine"}),
    ("UR-LSTM", "ur_lstm", {}),
    ("ON-LSTM", "on_lstm", {}),
)
"""Gu et al.'s (2020) comparison: the LSTM, its UGI initialisation, the refine gate alone, both
(UR-LSTM), and ON-LSTM's master gates, as ``(label, cell, options)`` entries for :func:`compare`."""

_REFINE, _MASTER = {"aux": "refine", "tied": True}, {"aux": "master"}
GU_ABLATION = (
    ("--", "lstm", {}),
    ("-R", "lstm", _REFINE),
    ("-M", "lstm", {**_MASTER, "ordered": False}),
    ("U-", "lstm", {"init": "ugi"}),
    ("UR", "lstm", {"init": "ugi", **_REFINE}),
    ("UM", "lstm", {"init": "ugi", **_MASTER, "ordered": False}),
    ("O-", "lstm", {"ordered": True}),
    ("OR", "lstm", {"ordered": True, **_REFINE}),
    ("OM", "lstm", {"ordered": True, **_MASTER}),
)
"""Gu et al.'s (2020) ablation grid, primary gate ``-`` (standard), ``U`` (UGI) or ``O``
(cumax, ``lstm(ordered=True)``) x auxiliary gate ``-``, ``R`` (refine, input gate tied as in
their refine-gate models) or ``M`` (master gates: cumax for ``O``, ON-LSTM; sigmoid
otherwise), labelled ``"--"``, ``"-R"``, ..., ``"OM"``, as ``(label, cell, options)`` entries for
:func:`compare`. ``UR`` is ``ur_lstm`` and ``OM`` is ``on_lstm``. Their master-gate models used
a downsize factor ``C > 1`` (``chunk_size``), left at 1 here. **Uncertain**: the letters are
read from memory (see :func:`gradflow.cells.lstm`'s ``ordered``)."""


# ---------------------------------------------------------------------------------------------
# What each gate is


class GateLayout(NamedTuple):
    """What a stack's layers report as gates (:func:`gate_layout`), by the names the stack's
    gates go by (:attr:`gradflow.Stack.gate_names`)."""

    kinds: dict  #: ``{gate: kind}``, every gate any layer reports, in the order first reported
    retain: dict  #: ``{gate: sign}`` of the gates that keep a state (:func:`kept_fraction`)
    layers: dict  #: ``{gate: (l, ...)}``: the layers that report the gate
    refine_mode: dict  #: ``{gate: "mul" | "add"}`` of the refined gates
    effective: dict  #: ``{gate: (f, r)}`` of the effective gates: the two gates it is made of
    depth: int  #: the number of layers

    @property
    def mixed(self) -> bool:
        """Some layer lacks a gate (another layer reports it)."""
        return any(len(ls) != self.depth for ls in self.layers.values())


def gate_layout(stack) -> GateLayout:
    """The gates of ``stack`` (a Stack, or its cells, one per layer): every gate any layer
    reports, its kind, whether it keeps the state, and which layers report it.

    Layers of different cells may report different gates: a GRU under a STAR reports ``r``,
    ``z``, ``n``, the STAR ``k``, ``z``. Each gate's statistics are over the layers that report
    it (:func:`saturation`: NaN means and zero counts in the others). A name that two cells
    give to different gates (GRU's ``z`` is a sigmoid update gate, STAR's a tanh candidate) is
    two gates, qualified by the cell: ``"z@gru"``, ``"z@star"``
    (:func:`gradflow.stack.gate_keys`).

    >>> from gradflow import Stack
    >>> lay = gate_layout(Stack(["gru", "star"], 2, 3, 4))
    >>> lay.layers
    {'r': (0,), 'z@gru': (0,), 'n': (0,), 'k': (1,), 'z@star': (1,)}
    """
    cells = stack.cells if isinstance(stack, Stack) else stack
    if not isinstance(cells, (list, tuple)) or not cells or not all(
            isinstance(c, Cell) for c in cells):
        raise TypeError(f"gate_layout takes a gradflow.Stack or its cells (one per layer), got "
                        f"{type(stack).__name__}")
    cells = tuple(cells)
    kinds, retain, layers, modes, effective = {}, {}, {}, {}, {}
    for l, (c, keys) in enumerate(zip(cells, gate_keys(cells))):
        kept = dict(c.retain)
        for g, kind in c.gate_kinds:
            k = keys[g]
            kinds[k] = kind
            layers.setdefault(k, []).append(l)
            if g in kept:
                retain[k] = kept[g]
            if kind == "refined":
                modes[k] = c.refine_mode
            if kind == "effective":
                parts = (keys["f"], keys[c.refine_gate])
                if effective.setdefault(k, parts) != parts:  # no cell gradflow has does this
                    raise ValueError(f"effective gate {k!r} is made of gates {parts} in layer "
                                     f"{l} and of {effective[k]} in layer {layers[k][0]}")
    return GateLayout(kinds, retain, {g: tuple(ls) for g, ls in layers.items()}, modes,
                      effective, len(cells))


def gate_kinds(cell: Cell) -> dict:
    r"""``{gate: kind}`` for every gate ``cell`` reports, in its order, as the cell declares them
    (:attr:`gradflow.cells.Cell.gate_kinds`).

    Kinds: ``"sigmoid"`` (:math:`a = \sigma(z)`), ``"refined"`` (Cheng et al.:
    :math:`a = \sigma(z) \odot x` or :math:`\sigma(z) + x`), ``"effective"`` (Gu et al.'s
    :math:`g = r(1-(1-f)^2) + (1-r)f^2`), ``"master"`` (ON-LSTM's cumax gates), ``"time"``
    (a time gate such as the ``k`` of ``g_lstm``/``phased_lstm``; ``star``'s ``k`` is a sigmoid
    gate), ``"tanh"`` (a user's :math:`a = \tanh(z)` gate) and ``"other"`` (a user gate of
    unknown form, whose saturation is read on ``[0, 1]`` as for a sigmoid).
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"cell must be a gradflow Cell (gradflow.cells.get(name)), got "
                        f"{type(cell).__name__}")
    return cell.kinds


# ---------------------------------------------------------------------------------------------
# Element-wise pieces


def sigmoid_slope(a):
    r""":math:`\sigma'(z) = a(1-a)` for :math:`a = \sigma(z)`; any shape."""
    return a * (1.0 - a)


def refine_partials(f, r):
    r"""Partials of Gu et al.'s effective gate :math:`g = r(1-(1-f)^2) + (1-r)f^2`.

    :math:`\partial g/\partial f = 2[r(1-f) + (1-r)f]`,
    :math:`\partial g/\partial r = (1-(1-f)^2) - f^2 = 2f(1-f)`.

    Args:
      f, r: arrays of one shape. Returns: ``(dg/df, dg/dr)`` of that shape.
    """
    return 2.0 * (r * (1.0 - f) + (1.0 - r) * f), 2.0 * f * (1.0 - f)


def bound(x, dtype, up: bool):
    """The number of ``dtype`` next to the threshold ``x`` (a Python or NumPy float) on one
    side: the least not below it (``up``) or the greatest not above it, so that ``a < bound(x,
    a.dtype, up=True)`` and ``a > bound(x, a.dtype, up=False)`` are the exact comparisons of
    ``a`` with ``x`` (rounded to nearest, a float32 threshold 0.8 is 0.800000012, and
    ``fl32(0.8) > 0.8`` came out False). A traced ``x`` is returned as it is (rounded to
    nearest by JAX).

    >>> float(bound(0.001, np.float32, up=False)) < 0.001 < float(np.float32(0.001))
    True
    """
    if isinstance(x, jax.core.Tracer):
        return x
    v = np.asarray(x, dtype)
    if (float(v) < float(x)) if up else (float(v) > float(x)):
        v = np.nextafter(v, np.asarray(np.inf if up else -np.inf, v.dtype))
    return v


def is_saturated(a, eps, kind: str = "sigmoid"):
    r"""``(a < eps) | (a > 1 - eps)``: the gate is within :math:`\varepsilon` of 0 or 1 (or
    beyond, for refined gates); for a ``"tanh"`` gate ``|a| > 1 - eps``, within
    :math:`\varepsilon` of :math:`\pm 1`; False for NaN.

    Exact in ``a``'s dtype for any ``eps`` (a Python float; :func:`bound`): the side at 1 is
    ``1 - a < eps`` (``1 - a`` is exact where it can be below ``eps < 0.5``), since ``1 - eps``
    rounds to 1 in float32 for ``eps`` below about 3e-8 and a gate at exactly 1 was not
    counted.

    >>> a = jnp.array([1.0, 0.99999994, 0.0, 0.5], jnp.float32)
    >>> is_saturated(a, 1e-8).tolist()
    [True, False, True, False]
    """
    value_range(kind)  # a known kind
    e = bound(eps, jnp.result_type(a), up=True)
    if kind == "tanh":
        return 1.0 - jnp.abs(a) < e
    return (a < e) | (1.0 - a < e)


def kept_fraction(a, sign: int):
    """The fraction of the previous state a retain gate keeps: ``a`` (sign +1) or ``1 - a``
    (sign -1)."""
    if sign not in (1, -1) or isinstance(sign, bool):
        raise ValueError(f"sign must be +1 (the gate keeps a) or -1 (it keeps 1 - a), got "
                         f"{sign!r}")
    return a if sign == 1 else 1.0 - a


def timescale(kept):
    r"""Memory timescale in steps, :math:`1/(1-\kappa)` (inf where :math:`\kappa = 1`)."""
    return 1.0 / (1.0 - kept)


def bin_index(a, bins: int, kind: str = "sigmoid"):
    """The histogram bin of each entry of ``a`` (any shape), and whether it has one.

    Bins are ``[e_j, e_{j+1})`` with the last one closed, ``e`` from :func:`bin_edges` over
    the range ``[lo, hi]`` of ``kind`` (:func:`value_range`): the rule of
    ``numpy.histogram(a, bins, range=(lo, hi))``, exact at the edges
    (``floor((a - lo) * bins / (hi - lo))``, moved by one where rounding put ``a`` on the wrong
    side of an edge). Returns ``(j: int32, inside: bool)`` of ``a``'s shape; ``inside`` is
    False for values outside ``[lo, hi]`` and NaN.
    """
    lo, hi = value_range(kind)
    e = jnp.asarray(bin_edges(bins, kind), a.dtype)
    inside = (a >= lo) & (a <= hi)
    scaled = (jnp.where(inside, a, lo) - lo) * (bins / (hi - lo))  # [0, 1]: a * bins, exactly
    j = jnp.clip(jnp.floor(scaled).astype(jnp.int32), 0, bins - 1)
    j = j - (a < e[j]) + ((a >= e[j + 1]) & (j < bins - 1))
    return j, inside


def histogram(a, bins: int, valid=None, kind: str = "sigmoid"):
    """Per-layer histogram counts of ``a: (L, ...)`` over the range ``[lo, hi]`` of gates of
    ``kind`` (:func:`value_range`; see :func:`bin_index`).

    One scatter-add, so memory stays at one index per entry. Returns ``(counts: (L, bins),
    outside: (L, 3))``, ``outside`` holding the counts of ``a < lo``, ``a > hi`` (infinities
    included) and NaN. ``valid``: a boolean mask broadcastable to ``a``; only its True entries
    are counted (e.g. the real units of layers of different widths).

    >>> a = jnp.array([[-1.0, -0.95, -0.5, 0.0, 0.5, 1.0, 1.5, -1.2, jnp.nan]])
    >>> counts, outside = histogram(a, 4, kind="tanh")
    >>> counts.tolist(), outside.tolist()
    ([[2, 1, 1, 2]], [[1, 1, 1]])
    """
    lo, hi = value_range(kind)
    L = a.shape[0]
    ok = None if valid is None else jnp.broadcast_to(valid, a.shape).reshape(L, -1)
    a = a.reshape(L, -1)
    j, inside = bin_index(a, bins, kind)
    if ok is not None:
        inside = inside & ok
    flat = jnp.where(inside, jnp.arange(L, dtype=jnp.int32)[:, None] * bins + j, L * bins)
    counts = jnp.zeros(L * bins + 1, jnp.int32).at[flat.ravel()].add(1)[:-1].reshape(L, bins)
    flags = [a < lo, a > hi, jnp.isnan(a)]
    if ok is not None:
        flags = [f & ok for f in flags]
    outside = jnp.stack([f.sum(1) for f in flags], axis=1)
    return counts, outside


# ---------------------------------------------------------------------------------------------
# Raw activations and slopes from a stack


def layer_inputs(stack: Stack, params: dict, xs, h):
    """``(L, B, T, H)`` inputs ``x^l_t`` of every layer: the (projected) data, then ``h^{l-1}``.

    Needs every layer to read ``H`` features (``stack.uniform``), as refined cells do
    (:meth:`gradflow.Stack.layer_inputs` gives them for any stack, as a list).
    """
    if not isinstance(stack.hidden_size, int):
        raise ValueError("gates.layer_inputs needs layers of one width; use "
                         "stack.layer_inputs(params, xs, out) (a list, each at its own width)")
    return jnp.concatenate([stack.project_input(params, jnp.asarray(xs, h.dtype))[None], h[:-1]])


def preactivation(stack: Stack, params: dict, xs, out, gate: str):
    r"""A sigmoid-type gate's pre-activation :math:`z^l_t` (e.g.
    :math:`x^l_t W_g + h^l_{t-1} U_g + b_g`, plus the LSTM's constant ``forget_bias`` for ``f``)
    for every ``(l, b, t)``, as the cell declares it (:meth:`gradflow.cells.Cell.preactivations`).

    Args:
      out: the :class:`gradflow.StackOutput` of the same run (zero initial state).
    Returns:
      ``(L, B, T, H)`` (``H = stack.max_width``, zeros beyond each layer's width, NaN in the
      layers whose cell has no gate ``gate``).
    """
    H = stack.max_width
    own = {c: {k: g for g, k in keys.items()} for c, keys in zip(stack.cells,
                                                                  gate_keys(stack.cells))}

    def layer(cell, p, prev_l, x_l):  # NaN in a layer whose cell has no such gate
        if gate not in own[cell]:
            h = next(iter(prev_l.values()))
            return jnp.full(h.shape[:-1] + (H,), jnp.nan, h.dtype)
        return _pad(cell.preactivations(p, prev_l, x_l)[own[cell][gate]], H)

    # one compiled body per run of like layers (a Python loop here unrolled every layer)
    return map_layers(stack, layer, params, stack.previous_states(out),
                      stack.layer_inputs(params, xs, out))


def _activation_slopes(acts: dict, kinds: dict) -> dict:
    """The slopes of the gates whose activation alone gives them: sigmoid :math:`a(1-a)`, tanh
    :math:`1-a^2`."""
    return {g: sigmoid_slope(acts[g]) if kind == "sigmoid" else 1.0 - acts[g] * acts[g]
            for g, kind in kinds.items() if kind in ("sigmoid", "tanh")}


def _slopes(stack: Stack, params: dict, xs, out) -> dict:
    """:func:`slopes` from a run's output ``out`` (a :class:`gradflow.StackOutput`)."""
    lay = gate_layout(stack)
    acts = out.gates
    s = _activation_slopes(acts, lay.kinds)
    for g, mode in lay.refine_mode.items():
        sz = sigmoid_slope(jax.nn.sigmoid(preactivation(stack, params, xs, out, g)))
        s[g] = sz * jnp.abs(layer_inputs(stack, params, xs, out.up)) if mode == "mul" else sz
    for g, (f, r) in lay.effective.items():
        dgdf, dgdr = refine_partials(acts[f], acts[r])
        if f in s:  # (a cumax forget gate, lstm(ordered=True), has no element-wise slope)
            s[g] = jnp.abs(dgdf) * s[f]
        s[g + ":refine"] = jnp.abs(dgdr) * s[r]
    return s


@functools.partial(jit, static_argnames=("stack",))
@in_precision
def activations(stack: Stack, params: dict, xs) -> dict:
    """``{gate: (L, B, T, H)}``: every reported gate activation of ``stack`` on ``xs``
    ``(B, T, D)``, by the names of :func:`gate_layout` (NaN in the layers without the gate)."""
    return stack.apply(params, xs, gates=True).gates


@functools.partial(jit, static_argnames=("stack",))
@in_precision
def slopes(stack: Stack, params: dict, xs) -> dict:
    r"""``{gate: (L, B, T, H)}``: local slopes :math:`|\partial a/\partial z|` of each gate ``a``
    w.r.t. its own pre-activation ``z``.

    * sigmoid gate: :math:`a(1-a)`; tanh gate: :math:`1-a^2`;
    * refined gate (Cheng et al.; the reported value :math:`\sigma(z) \odot x` is no sigmoid,
      so ``z`` is recomputed from the params, see :func:`preactivation`):
      :math:`\sigma'(z)\,|x|` (``mode="mul"``) or :math:`\sigma'(z)` (``"add"``);
    * effective gate ``g`` (Gu et al.): w.r.t. ``f``'s pre-activation
      :math:`|\partial g/\partial f| \cdot |\partial f/\partial z_f|`, and under the key
      ``"g:refine"`` w.r.t. the refine gate's, :math:`|\partial g/\partial r| \cdot
      |\partial r/\partial z_r|` (:func:`refine_partials`);
    * master (cumax, not element-wise) and time gates: no entry.
    """
    return _slopes(stack, params, xs, stack.apply(params, xs, gates=True))


# ---------------------------------------------------------------------------------------------
# Reductions

_UNIT_STATS = ("mean", "timescale", "update_fraction")
_SLOPED = ("sigmoid", "tanh", "refined", "effective")  # the kinds :func:`slopes` covers


def _rows(acts: dict, kinds: dict, retain: dict, sl, eps, threshold) -> dict:
    """``{(stat, gate): (L, B, T, H)}`` element-wise quantities of the activations ``acts``
    (gates of ``kinds``; ``retain``: ``{gate: sign}`` of the gates that keep a state, see
    :func:`kept_fraction`; ``sl``: :func:`slopes`) whose means over the gate's finite entries
    make the maps (``timescale``: the kept fraction; 0 where the gate is not finite);
    ``finite``, ``nonfinite``, ``below``, ``above``, ``nan`` are 0/1 integers to be counted
    (``below``/``above``: beyond the kind's :func:`value_range`)."""
    rows = {}
    for g, kind in kinds.items():
        a = acts[g]
        ok = jnp.isfinite(a)
        rows["mean", g] = a
        rows["saturated", g] = is_saturated(a, eps, kind).astype(a.dtype)
        if kind in _SLOPED and g in sl:
            rows["slope", g] = sl[g]
        if kind == "effective":
            rows["slope_refine", g] = sl[g + ":refine"]
        if g in retain:
            rows["timescale", g] = kept_fraction(a, retain[g])
        if kind == "time":
            rows["update_fraction", g] = (a > bound(threshold, a.dtype, up=False)
                                          ).astype(a.dtype)
        rows.update({k: jnp.where(ok, v, jnp.zeros((), v.dtype))
                     for k, v in rows.items() if k[1] == g})
        lo, hi = value_range(kind)
        for stat, m in (("finite", ok), ("nonfinite", ~ok), ("below", a < lo),
                        ("above", a > hi), ("nan", jnp.isnan(a))):
            rows[stat, g] = m.astype(jnp.int32)
    return rows


@jax.custom_jvp
def _batch_sums(ops: tuple) -> tuple:
    """Each ``(L, B, T, H)`` row summed over the batch by one variadic ``lax.reduce`` (the
    element-wise rows fuse into it and are never stored). Sums are linear, so the derivative
    is the sums of the tangents (JAX's own rule for a variadic reduce fails on the integer
    rows' zero tangents): the statistics differentiate, e.g. a saturation penalty."""
    return jax.lax.reduce(ops, tuple(jnp.zeros((), o.dtype) for o in ops),
                          lambda x, y: tuple(u + v for u, v in zip(x, y)), (1,))


@_batch_sums.defjvp
def _batch_sums_jvp(primals, tangents):
    (ops,), (dops,) = primals, tangents
    out = _batch_sums(ops)
    dout = tuple(jnp.sum(d, axis=1) if jnp.issubdtype(o.dtype, jnp.inexact)
                 else np.zeros(s.shape, jax.dtypes.float0) for o, d, s in zip(ops, dops, out))
    return out, dout


@functools.partial(jit, static_argnames=("stack", "eps", "threshold", "bins"))
@in_precision
def _reduce(stack: Stack, params: dict, xs, eps: float, threshold: float, bins: int):
    """All reductions of :func:`saturation` in one compiled function.

    The element-wise rows (:func:`_rows`) are summed over the batch by one variadic
    ``lax.reduce``, so they are fused into it and never stored; the histograms are one
    scatter-add per gate range (:func:`value_range`). Returns ``({(stat, gate): ((L, T) map,
    (L, H) unit)}, {gate: (L, bins)})``: means (float rows) or counts (integer rows).
    """
    sums, hists = _stack_sums(stack, params, xs, eps=eps, threshold=threshold, bins=bins)
    return _means(sums), hists


@in_precision
def _stack_sums(stack: Stack, params: dict, xs, *, eps, threshold, bins: int):
    """:func:`_activation_sums` of the stack's gates on ``xs``: sums over its examples (of a
    share of the batch on one device, :func:`_arrays`)."""
    out = stack.apply(params, xs, gates=True)
    if not out.gates:
        return {}, {}
    lay = gate_layout(stack)
    return _activation_sums(out.gates, lay.kinds, lay.retain, _slopes(stack, params, xs, out),
                            _real_units(stack, lay), eps, threshold, bins)


def _means(sums: dict) -> dict:
    """The means over each gate's finite entries (0/0: NaN) of :func:`_activation_sums`' float
    sums; its counts as they are."""
    red = {}
    for k, (m, u) in sums.items():
        if jnp.issubdtype(m.dtype, jnp.integer):
            red[k] = (m, u)
        else:
            n, nu = sums["finite", k[1]]
            red[k] = (m / n.astype(m.dtype), u / nu.astype(u.dtype))
    return red


def _activation_sums(acts: dict, kinds: dict, retain: dict, sl: dict, real, eps, threshold,
                     bins: int):
    """``({(stat, gate): ((L, T), (L, H))}, {gate: (L, bins)})``: the sums over the examples
    (before :func:`_means`; sums add over any split of the batch) of :func:`_reduce`'s rows
    from the activations ``acts`` ``{gate: (L, B, T, H)}`` of gates of ``kinds``, their slopes
    ``sl`` and ``real`` (None, or ``{gate: (L, H)}``: the units of layer ``l`` that hold gate
    values, its first ``H_l`` where it reports the gate, none where it does not; the others
    are padding, counted nowhere); traceable."""
    rows = _rows(acts, kinds, retain, sl, eps, threshold)
    keys = list(rows)
    sums = _batch_sums(tuple(rows[k] for k in keys))  # (L, T, H) each
    if real is not None:  # padded units (exact zeros) and absent gates (NaN) count nowhere
        sums = tuple(jnp.where(real[k[1]][:, None, :], sm, jnp.zeros((), sm.dtype))
                     for k, sm in zip(keys, sums))
    sums = {k: (sm.sum(-1), sm.sum(1)) for k, sm in zip(keys, sums)}  # (L, T), (L, H)
    hists = {}
    for span in dict.fromkeys(value_range(kinds[g]) for g in acts):  # one scatter-add each
        names = [g for g in acts if value_range(kinds[g]) == span]
        A = jnp.stack([acts[g] for g in names])  # (G, L, B, T, H)
        G, L = A.shape[:2]
        valid = None if real is None else jnp.broadcast_to(
            jnp.stack([real[g] for g in names])[:, :, None, None, :], A.shape
        ).reshape((G * L, -1))
        hist, _ = histogram(A.reshape((G * L, -1)), bins, valid, kinds[names[0]])
        hists.update({g: hist[i * L:(i + 1) * L] for i, g in enumerate(names)})
    return sums, {g: hists[g] for g in acts}


def reductions(stack: Stack, params: dict, xs, eps: float = EPS,
               update_threshold: float = UPDATE_THRESHOLD, bins: int = BINS):
    """The device part of :func:`saturation`, unchecked and traceable (``vmap``/``shard_map``
    over problems, as :mod:`gradflow.atlas` does; ``jax.grad`` of its means, e.g. a saturation
    penalty): ``(red, hist)`` with ``red[(stat, gate)] =
    ((L, T) map, (L, H) per unit)`` (means, or counts for integer rows) and ``hist[gate]:
    (L, bins)``. :func:`named_arrays` turns one problem's ``(red, hist)`` into the named
    arrays; ``eps``, ``update_threshold`` and ``bins`` are :func:`saturation`'s, numbers (not
    traced: the thresholds are compared exactly in the gates' dtype, :func:`bound`)."""
    return _reduce(stack, params, xs, float(eps), float(update_threshold), int(bins))


def _arrays(stack: Stack, params: dict, xs, eps: float, threshold: float, bins: int) -> dict:
    """The named arrays of the module docstring's scheme, from :func:`_stack_sums`; the
    examples split over the devices as a state map's are (:func:`gradflow.parallel.should_split`:
    not for cells that couple them), each device's sums and counts added, from twice the
    examples per device under ``"auto"`` on CPU devices (a forward pass only). Split / one
    device on the 2-vCPU Xeon (family 6 model 207), 2 devices, 9 interleaved rounds, float32:
    at 1024 examples x H per device 1.19-1.20x (GRU 8 x 32 x H 64) and 0.94-1.11x (LSTM 16 x
    64 x 128); at 2048 1.01x, 1.005x (GRU, LSTM 8 x 32), 0.87x (GRU 16 x 64 x 64), 0.92x (STAR
    16 x 64 x 128), 0.78-0.88x (LSTM 16 x 64 x 128)."""
    from gradflow import parallel
    sums, hists = parallel.example_map(
        _stack_sums, stack, params, (xs,), (0,), (("bins", bins), ("eps", eps),
                                                  ("threshold", threshold)),
        parallel.should_split(xs, stack, params, rows=0.5), summed=True)
    return named_arrays(stack, _means(sums), hists, bins)


def _real_units(stack: Stack, lay: GateLayout):
    """``{gate: (L, max_l H_l)}`` bool, True on layer ``l``'s first ``H_l`` units where it
    reports the gate; None for layers of one width that all report every gate."""
    units = stack.real_units()
    if units is None and not lay.mixed:
        return None
    return _gate_masks(np.ones((stack.layers, stack.max_width), bool) if units is None
                       else units, lay.layers, lay.kinds)


def _gate_masks(units, layers: dict, kinds: dict) -> dict:
    """``{gate: (L, H)}`` bool: ``units`` (``(L, H)``, each layer's real units) in the layers
    ``layers`` gives for a gate (``{gate: (l, ...)}``; every layer for a gate it omits)."""
    L = units.shape[0]
    return {g: units & np.isin(np.arange(L), layers.get(g, range(L)))[:, None] for g in kinds}


def _pad(a, H: int):
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, H - a.shape[-1])])


def named_arrays(stack: Stack, red: dict, hist: dict, bins: int) -> dict:
    """The named arrays of the module docstring's scheme (``"{stat}/{gate}"``, ...) from one
    problem's :func:`reductions` (NumPy; ``bins`` as given there)."""
    lay = gate_layout(stack)
    return _named(lay.kinds, _real_units(stack, lay), red, hist, bins)


def _named(kinds: dict, real, red: dict, hist: dict, bins: int) -> dict:
    """:func:`named_arrays` for gates of ``kinds`` (``real`` as :func:`_activation_sums`)."""
    red = {k: (np.asarray(m), np.asarray(u)) for k, (m, u) in red.items()}
    arrays = {"bin_edges": bin_edges(bins)}
    for g, kind in kinds.items():
        if value_range(kind) != value_range():  # the shared edges are [0, 1]'s
            arrays[f"bin_edges/{g}"] = bin_edges(bins, kind)
        n = red["finite", g][0].astype(np.float64)  # (L, T): finite entries of each mean

        def over(m, axis=None):  # the mean over the finite entries of the (l, t) it pools
            with np.errstate(invalid="ignore"):
                return (np.where(n > 0, m * n, 0).sum(axis=axis) / n.sum(axis=axis)
                        ).astype(m.dtype)

        for stat in STATS:
            if (stat, g) not in red:
                continue
            m, u = red[stat, g]
            if stat == "nonfinite":
                m = m.astype(np.int64)
                vals = {"": m, "/layer": m.sum(axis=1), "/pooled": m.sum()}
            else:
                vals = {"": m, "/layer": over(m, 1), "/pooled": over(m)}
                if stat in _UNIT_STATS:
                    vals["/unit"] = u
            if stat == "timescale":  # the means are of the kept fraction
                with np.errstate(divide="ignore"):
                    vals = {k: timescale(v) for k, v in vals.items()}
            if real is not None and "/unit" in vals:  # no unit beyond a layer's width
                present = real[g].any(axis=1, keepdims=True)  # NaN in layers without g
                vals["/unit"] = np.where(real[g], vals["/unit"], np.where(present, 0, np.nan)
                                         ).astype(vals["/unit"].dtype)
            arrays.update({f"{stat}/{g}{k}": v for k, v in vals.items()})
        h = np.asarray(hist[g], np.int64)
        outside = np.stack([red[c, g][0].sum(axis=1, dtype=np.int64)
                            for c in ("below", "above", "nan")], axis=1)
        arrays[f"hist/{g}"], arrays[f"hist/{g}/pooled"] = h, h.sum(axis=0)
        arrays[f"outside/{g}"], arrays[f"outside/{g}/pooled"] = outside, outside.sum(axis=0)
    return arrays


def _check_fraction(name: str, value, hi: float) -> float:
    scalar = (isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0
              and jnp.issubdtype(value.dtype, jnp.floating))  # jnp.float32(0.1)
    if not scalar and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not 0.0 < v < hi:
        raise ValueError(f"{name} must lie in (0, {hi}), got {value!r}")
    return v


def _settings(eps, update_threshold, bins) -> tuple:
    """``(eps, update_threshold, bins)`` of :func:`saturation` and :func:`model_saturation`,
    checked."""
    eps = _check_fraction("eps", eps, 0.5)
    threshold = _check_fraction("update_threshold", update_threshold, 1.0)
    bins = _positive_int("bins", bins)
    if bins > MAX_BINS:
        raise ValueError(f"bins={bins}: at most {MAX_BINS:,} (finer than a float32 gate's "
                         "spread can fill; a figure draws a bar per bin and layer)")
    return eps, threshold, bins


def _warn_outside(who: str, kinds: dict, arrays: dict, checked, said: str, fix: str):
    """Warn, per gate of a kind in ``checked``, where its values leave that kind's range
    (:func:`value_range`): the kind is wrong (said by the user, or read off one probe step by
    an adapter), and the statistics assume the range. ``fix``: how to give the kind, formatted
    with ``g``, the gate."""
    for g, kind in kinds.items():
        below, above, _ = (int(n) for n in arrays[f"outside/{g}/pooled"])
        if kind in checked and below + above:
            lo, hi = value_range(kind)
            warnings.warn(
                f"{who}: gate {g!r} is {said} {kind!r}, but {below + above} of its values lie "
                f"outside that kind's range [{lo:g}, {hi:g}] ({below} below, {above} above): its "
                f"saturation, slope and timescale assume the range; give its kind "
                f"({fix.format(g=g)}), or report the gate itself where this is a quantity made "
                "from it", stacklevel=3)


def _nonfinite_total(arrays: dict) -> int:
    """The non-finite gate values of every gate (their ``nonfinite/{gate}/pooled`` counts)."""
    return sum(int(v) for k, v in arrays.items()
               if k.startswith("nonfinite/") and k.endswith("/pooled"))


def saturation(stack: Stack, params: dict, xs, eps: float = EPS, *, bins: int = BINS,
               update_threshold: float = UPDATE_THRESHOLD, meta: dict | None = None) -> Result:
    r"""Gate statistics of every reported gate of ``stack`` on ``xs`` (see the module docstring
    for the definitions and the array names).

    Args:
      stack: a :class:`gradflow.Stack`; params: from ``stack.init``; xs: ``(B, T, D)``.
      eps: saturation margin, ``0 < eps < 0.5``: saturated means :math:`a < \varepsilon` or
        :math:`a > 1 - \varepsilon`.
      bins: number of histogram bins over each gate's range (:func:`value_range`: ``[0, 1]``,
        ``[-1, 1]`` for a tanh gate), up to :data:`MAX_BINS`.
      update_threshold: a time gate updates a neuron where :math:`k >` this (``0 < . < 1``).
      meta: merged into the config (e.g. ``problem(...).config`` with the seed).
    Returns:
      :class:`gradflow.results.Result` of kind ``"gate_stats"``; non-finite activations are
      counted (``nonfinite/{gate}``), left out of the other statistics (means and shares over
      the finite activations) and warned about, with where the states are not finite
      (:class:`gradflow.results.NonFiniteForwardWarning`), never raised on.
    Raises:
      ValueError: the stack's cells report no gates (``rnn``, ``indrnn``, or a user cell built
        without ``gates=``, see :mod:`gradflow.cells.adapters`); the request needs more memory
        than this machine has (:func:`gradflow.cost.estimate` with ``method="gates"``), raised
        before anything is compiled, naming a batch or length that fits.
    """
    if not isinstance(stack, Stack):
        raise TypeError(f"stack must be a gradflow.Stack, got {type(stack).__name__}")
    if not any(c.gate_kinds for c in stack.cells):
        raise ValueError(
            f"cell {stack.cells[0].name!r} reports no gates, so there are no gate statistics "
            "(gradient and Jacobian maps need none). A cell of your own reports its gates with "
            "gates=fn returning {name: (B, H)} (and gate_kinds={name: kind}) in "
            "gradflow.cells.from_function / from_linen / from_nnx / from_equinox")
    lay = gate_layout(stack)
    checks.check_concrete(params, xs)
    eps, threshold, bins = _settings(eps, update_threshold, bins)
    xs = checks.check_xs(stack, xs)
    checks.check_params(stack, params)
    checks.warn_narrowed(xs, params, "gates.saturation")
    checks.check_finite_inputs(xs)
    with user_input():  # too big for this machine: the user's sizes to change
        _cost.check_fits(_cost.estimate(stack, xs.shape[0], xs.shape[1], xs.dtype,
                                        method="gates", calibrate=False))
    arrays = _arrays(stack, params, xs, eps, threshold, bins)
    bad = _nonfinite_total(arrays)
    if bad:  # counted in nonfinite/*; said where the forward pass overflowed
        warnings.warn(f"gates.saturation: {bad} gate values are not finite ("
                      f"{where_nonfinite(stack, params, xs)}); every other statistic is "
                      "over the finite gate values (nonfinite/{gate} counts the rest)",
                      NonFiniteForwardWarning, stacklevel=2)
    # (Cheng et al.'s refined gates leave [0, 1] by design; a gate of no kind may)
    _warn_outside("gates.saturation", lay.kinds, arrays, ("sigmoid", "tanh", "effective",
                  "master", "time"), "of kind", "gate_kinds={{{g!r}: 'tanh'}} for values in "
                  "[-1, 1], to the adapter that made the cell, from_function, from_linen, ...: "
                  "where it is not given, the adapter reads a gate's kind off one probe step")
    B, T, _ = xs.shape
    dtype = jax.tree_util.tree_leaves(params["layers"][0])[0].dtype
    kinds = lay.kinds
    where = {"gate_layers": {g: list(ls) for g, ls in lay.layers.items()}} if lay.mixed else {}
    config = checks.with_meta({**stack.config, "steps": int(T), "batch": int(B),
                               "dtype": str(dtype)}, meta, eps=eps, bins=bins,
                              update_threshold=threshold, gates=list(kinds), gate_kinds=kinds,
                              **where)
    # a mixed stack's NaN in layers without a gate are not counted (results.not_measured)
    return make_result("gate_stats", arrays, config)


#: The gate kinds :func:`model_saturation` reads from the activations alone.
MODEL_KINDS = ("sigmoid", "tanh", "time", "other")


def model_saturation(model, params, xs, *, kinds: dict, retain: dict | None = None,
                     layers: dict | None = None, eps: float = EPS, bins: int = BINS,
                     update_threshold: float = UPDATE_THRESHOLD, couples_batch: bool = True,
                     meta: dict | None = None) -> Result:
    r"""Gate statistics of a model of your own, one a :class:`gradflow.Stack` does not express
    (as :func:`gradflow.model_map` measures its gradients): the statistics, array names and
    Result of :func:`saturation`, from the activations your model reports.

    ``model(params, xs) -> {gate: (L, B, T, H)}`` returns each gate's activation in every layer
    ``l``, example ``b`` and step ``t`` (e.g. your scan's per-step gates, stacked). ``kinds``
    says what each gate is, from :data:`MODEL_KINDS`: ``"sigmoid"`` (slope :math:`a(1-a)`),
    ``"tanh"`` (slope :math:`1-a^2`, range ``[-1, 1]``), ``"time"`` (a time gate: its
    ``update_fraction``) or ``"other"`` (read on ``[0, 1]``, no slope); gates whose slope needs
    the pre-activation (refined, effective, master) need a Stack's structure: wrap your cell
    with an adapter (:mod:`gradflow.cells.adapters`) for those. ``retain`` names the gates that
    keep the previous state, ``{gate: 1}`` when the state kept is :math:`a` (an LSTM's ``f``),
    ``{gate: -1}`` when it is :math:`1 - a` (a GRU's update gate in the
    :math:`(1-z) h + z 	ilde h` convention), for their memory ``timescale``.

    >>> def lstm_gates(p, xs):            # one LSTM layer; its forget gate, stacked as (1, B, T, H)
    ...     def step(hc, x):
    ...         h, c = hc
    ...         i, f, g, o = jnp.split(x @ p["W"] + h @ p["U"], 4, axis=-1)
    ...         f = jax.nn.sigmoid(f + 1.0)
    ...         c = f * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    ...         return (jax.nn.sigmoid(o) * jnp.tanh(c), c), f
    ...     z = jnp.zeros((xs.shape[0], 4))
    ...     _, f = jax.lax.scan(step, (z, z), jnp.swapaxes(xs, 0, 1))
    ...     return {"f": jnp.swapaxes(f, 0, 1)[None]}
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> p = {"W": jax.random.normal(k1, (3, 16)) / 2, "U": jax.random.normal(k2, (4, 16)) / 2}
    >>> st = gradflow.gates.model_saturation(lstm_gates, p, jax.random.normal(k3, (8, 6, 3)),
    ...                                      kinds={"f": "sigmoid"}, retain={"f": 1})
    >>> st.arrays["saturated/f"].shape, bool(st.arrays["timescale/f/pooled"] > 1)
    ((1, 6), True)

    Args:
      model: ``(params, xs) -> {gate: (L, B, T, H)}``, jittable (compiled once per model,
        shapes and settings: pass one function object).
      params: any pytree the model reads, an Equinox or Flax NNX module too (arrays traced,
        other leaves static, as :func:`gradflow.model_map` takes them).
      xs: ``(B, T, D)`` inputs.
      kinds: ``{gate: kind}`` for every gate the model returns.
      retain: ``{gate: 1 | -1}`` for the gates that keep the state (default none).
      layers: ``{gate: [l, ...]}`` for gates only some layers have (layers of different
        cells): the layers that report it; its values in the others (anything, NaN too) are
        read nowhere, and its statistics there are NaN means and zero counts, as
        :func:`saturation` gives for a stack whose layers report different gates (default:
        every gate in every layer).
      eps, bins, update_threshold, meta: as :func:`saturation`.
      couples_batch: whether the model mixes the examples of a batch, as
        :func:`gradflow.model_map`'s (``False`` is checked, and refused for a model whose
        one example's gates move with another's inputs): ``False`` splits the batch over the
        devices, each device's sums and counts added up (the same statistics to rounding),
        unless an example's gates move with its place in the batch (a mask drawn with the
        batch's shape: :func:`gradflow.checks.depends_on_place`).
    Returns:
      Result of kind ``"gate_stats"`` (drawn by :func:`gradflow.plot.gate_histograms` and the
      other gate figures), its config naming the model; non-finite activations counted,
      warned about and left out of the other statistics, as :func:`saturation` does.
    Raises:
      ValueError: bad ``xs`` (as every measurement), a gate without a kind or a kind not in
        :data:`MODEL_KINDS`, activations not ``(L, B, T, H)`` of one shape with this ``B``
        and ``T``, or a compiled program that needs more memory than is available.
    """
    with user_input():
        xs, arrays, rest = checks.model_arguments("model_saturation", model,
                                                  "(params, xs) -> {gate: (L, B, T, H)}",
                                                  params, xs)
        eps, threshold, bins = _settings(eps, update_threshold, bins)
        if not isinstance(kinds, dict) or not kinds:
            raise TypeError(f"kinds must be a dict {{gate: kind}}, kinds from "
                            f"{', '.join(MODEL_KINDS)}; got {kinds!r}")
        for g, kind in kinds.items():
            if kind not in MODEL_KINDS:
                raise ValueError(f"gate {g!r}: kind {kind!r} is not one the activations alone "
                                 f"give; valid: {', '.join(MODEL_KINDS)} (a refined, effective "
                                 "or master gate: wrap your cell with gradflow.cells.from_*)")
        where = _model_layers(layers, kinds)
        if not isinstance(couples_batch, bool):
            raise TypeError(f"couples_batch must be True or False, got {couples_batch!r}")
        retain = dict(check_retain("model_saturation", retain, kinds))  # (an adapter's too)
        B, T, _ = xs.shape
        try:
            out = jax.eval_shape(checks.with_static(model, rest), arrays, xs)
        except Exception as e:  # the user's function failed: say where, with its own message
            raise checks.function_failed(f"model(params, xs {xs.shape})", e) from e
        shapes = {g: getattr(a, "shape", None) for g, a in out.items()} if isinstance(
            out, dict) else None
        first = None if not shapes else next(iter(shapes.values()))
        if (not shapes or any(s != first for s in shapes.values()) or first is None
                or len(first) != 4 or tuple(first[1:3]) != (B, T)):
            raise ValueError(f"model must return {{gate: (L, B, T, H)}} activations of one "
                             f"shape with B = {B}, T = {T}; got "
                             f"{shapes if shapes is not None else type(out).__name__}")
        if set(out) != set(kinds):
            raise ValueError(f"kinds must name every gate the model returns: it returns "
                             f"{', '.join(map(str, out))}; kinds names {', '.join(kinds)}")
        if not couples_batch and checks.mixes_examples(model, rest, arrays, xs, axis=1):
            raise ValueError("gates.model_saturation: couples_batch=False, but one example's "
                             "gates depend on another's inputs: the model mixes the examples "
                             "of a batch (batch statistics, attention across examples), so "
                             "splitting the batch would change it; leave couples_batch=True")
    name = getattr(model, "__name__", type(model).__name__)
    L = int(first[0])
    with user_input():
        for g, ls in where.items():
            if any(not -L <= l < L for l in ls):
                raise ValueError(f"layers[{g!r}] = {list(ls)}: the model has {L} layers "
                                 f"(0..{L - 1})")
    where = tuple((g, tuple(sorted({l % L for l in ls}))) for g, ls in where.items())
    static = (("bins", bins), ("eps", eps), ("kinds", tuple(kinds.items())),
              ("retain", tuple(retain.items())), ("threshold", threshold), ("where", where))
    what = f"gates.model_saturation ({name}, {L} layers x {T} steps, batch {B}, {xs.dtype})"
    from gradflow import parallel
    devices = () if couples_batch else parallel.should_split(xs, None, arrays)
    if devices and checks.depends_on_place(model, rest, arrays, xs, B // len(devices), axis=1):
        devices = ()  # (a mask drawn with the batch's shape: each device would draw its own)
    sums, hist = parallel.example_map(  # split: sums and counts add over the devices
        _model_sums, (model, rest), arrays, (xs,), (0,), static, devices, what,
        _cost.shrink_hint(B, T, fixed=checks.nbytes(arrays)), summed=True)
    red = _means(sums)
    arrays = _named(kinds, _layer_masks(where, kinds, L, int(first[3])), red, hist, bins)
    bad = _nonfinite_total(arrays)
    if bad:
        warnings.warn(f"gates.model_saturation: {bad} gate values are not finite; every other "
                      "statistic is over the finite gate values (nonfinite/{gate} counts the "
                      "rest)", NonFiniteForwardWarning, stacklevel=2)
    _warn_outside("gates.model_saturation", kinds, arrays, MODEL_KINDS, "declared",
                  "kinds={{{g!r}: 'tanh'}} for values in [-1, 1]")
    dtype = next(iter(out.values())).dtype
    config = checks.with_meta({"model": name, "layers": L, "steps": int(T), "batch": int(B),
                               "hidden": int(first[3]), "dtype": str(dtype)}, meta, eps=eps,
                              bins=bins, update_threshold=threshold, gates=list(kinds),
                              gate_kinds=dict(kinds), retain=retain,
                              **({"gate_layers": {g: list(ls) for g, ls in where}} if where
                                 else {}))
    return make_result("gate_stats", arrays, config)


def _model_layers(layers, kinds: dict) -> dict:
    """``model_saturation``'s ``layers``, checked: ``{gate: [int, ...]}`` (non-empty)."""
    if layers is None:
        return {}
    if not isinstance(layers, dict):
        raise TypeError(f"layers must be a dict {{gate: [layer, ...]}}, got {layers!r}")
    for g, ls in layers.items():
        if g not in kinds:
            raise ValueError(f"layers names gate {g!r}, which kinds does not; gates: "
                             f"{', '.join(kinds)}")
        ok = isinstance(ls, (list, tuple)) and ls and all(
            isinstance(l, numbers.Integral) and not isinstance(l, bool) for l in ls)
        if not ok:
            raise ValueError(f"layers[{g!r}] must be a non-empty list of layer indices, got "
                             f"{ls!r}")
    return {g: [int(l) for l in ls] for g, ls in layers.items()}


def _layer_masks(where: tuple, kinds: dict, L: int, H: int):
    """``{gate: (L, H)}`` bool, True in the layers ``where`` gives for a gate (every layer for
    the others); None when ``where`` is empty."""
    return _gate_masks(np.ones((L, H), bool), dict(where), kinds) if where else None


def _model_sums(model_rest, arrays, xs, *, kinds, retain, where, eps, threshold, bins):
    """:func:`_activation_sums` of a model's gates (:func:`model_saturation`)."""
    acts = checks.with_static(*model_rest)(arrays, xs)
    kinds = dict(kinds)
    acts = {g: acts[g] for g in kinds}
    L, H = next(iter(acts.values())).shape[::3]
    return _activation_sums(acts, kinds, dict(retain), _activation_slopes(acts, kinds),
                            _layer_masks(where, kinds, L, H), eps, threshold, bins)



# ---------------------------------------------------------------------------------------------
# Several cells, one problem


def _entry(e):
    if isinstance(e, str):
        return e, e, {}
    if isinstance(e, Cell):
        return e.name, e, {}
    if isinstance(e, (tuple, list)) and len(e) in (2, 3) and isinstance(e[0], str):
        if len(e) == 3 and not isinstance(e[2], dict):
            raise TypeError(f"compare: the options of entry {e[0]!r} must be a dict "
                            f"{{option: value}}, got {e[2]!r}")
        return e[0], e[1], dict(e[2]) if len(e) == 3 else {}
    raise TypeError(f"compare entries must be a cell name, a Cell, or (label, cell[, options]) "
                    f"tuples; got {e!r}")


def parse_entries(entries) -> list[tuple]:
    """:func:`compare`'s ``entries`` as ``[(label, cell, options)]``: a cell name is its own
    label, a ``Cell`` is labelled by its ``name``, both with no options; a ``(label, cell)``
    pair gets none. A TypeError for anything else, a ValueError for repeated labels.

    >>> parse_entries(["lstm", ("UGI", "lstm", {"init": "ugi"})])
    [('lstm', 'lstm', {}), ('UGI', 'lstm', {'init': 'ugi'})]
    >>> parse_entries("lstm")  # one cell alone
    [('lstm', 'lstm', {})]
    """
    if isinstance(entries, (str, Cell)):  # one cell ("lstm" was four cells, its letters)
        entries = [entries]
    if isinstance(entries, dict) or not hasattr(entries, "__iter__"):
        raise TypeError(f"compare entries must be a list of cell names, Cells or (label, "
                        f"cell[, options]) tuples, got {type(entries).__name__}")
    parsed = [_entry(e) for e in entries]
    if not parsed:  # (as gradient_grid, sweep and Grid refuse none)
        raise ValueError("compare: name at least one cell (a name, a Cell, or a (label, cell, "
                         "options) entry)")
    labels = [p[0] for p in parsed]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"compare: duplicate labels {dup}; give each entry its own label")
    return parsed


def compare(entries=GU_GRID, *, layers: int = 2, steps: int = 20, hidden: int = 32,
            batch: int = 16, seed: int = 0, dtype: str = "float32", input_scale: float = 1.0,
            eps: float = EPS, bins: int = BINS,
            update_threshold: float = UPDATE_THRESHOLD) -> dict:
    """:func:`saturation` for several cells on the same problem: one seed, one size, the same
    inputs ``xs: (batch, steps, hidden)`` (each cell's params from the same key).

    Args:
      entries: cell names, ``Cell`` objects or ``(label, cell, options)`` tuples
        (default :data:`GU_GRID`); labels must be unique. (``g_lstm``'s own ``steps`` option
        cannot pass through :func:`~gradflow.problem.problem`, whose ``steps`` it shares: give
        ``cells.get("g_lstm", steps=T)`` as the cell.)
      layers, steps, hidden, batch, seed, dtype, input_scale: as
        :func:`gradflow.problem.problem`.
      eps, bins, update_threshold: as :func:`saturation`: the saturation margin
        ``0 < eps < 0.5``, histogram bins (a positive integer up to :data:`MAX_BINS`) and the
        time-gate update threshold ``0 < update_threshold < 1``.
    Returns:
      ``{label: Result}`` in the order given; each config holds the problem's config and
      ``"label"``.
    """
    with user_input():  # every entry checked before any is computed
        parsed = parse_entries(entries)
        for label, cell, options in parsed:
            problem_stack(cell, layers=layers, steps=steps, hidden=hidden, batch=batch,
                          dtype=dtype, input_scale=input_scale, **options)
    out = {}
    for label, cell, options in parsed:
        prob = problem(cell, layers=layers, steps=steps, hidden=hidden, batch=batch, seed=seed,
                       dtype=dtype, input_scale=input_scale, **options)
        out[label] = saturation(prob.stack, prob.params, prob.xs, eps, bins=bins,
                                update_threshold=update_threshold,
                                meta={**prob.config, "label": label})
    return out


__all__ = ["GU_ABLATION", "GU_GRID", "GateLayout", "KINDS", "STATS", "UPDATE_THRESHOLD",
           "activations", "bin_edges", "compare", "gate_kinds", "gate_layout", "hist_edges",
           "histogram", "is_saturated", "kept_fraction", "MODEL_KINDS", "model_saturation",
           "layer_inputs", "named_arrays", "parse_entries", "preactivation", "reductions",
           "refine_partials", "saturation",
           "sigmoid_slope", "slopes", "summary", "timescale", "value_range"]
