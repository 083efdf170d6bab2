"""Deep stacks of recurrent cells, unrolled with ``lax.scan`` over time and depth.

Layer ``l`` at step ``t`` reads ``x^l_t`` (the data, or its projection to ``H``, for ``l = 0``;
``h^{l-1}_t`` above) and its own previous state, and emits ``h^l_t`` both up to ``(l+1, t)`` and
forward to ``(l, t+1)``.

Two evaluation orders give the same numbers:

* ``order="layer"``: one layer at a time, each a ``lax.scan`` over time whose whole input
  projection is one ``(B*T, in) x (in, G*H)`` matmul; layers of equal shapes go through a
  ``lax.scan`` over depth, so a 64-layer stack compiles one layer body.
* ``order="wavefront"``: anti-diagonals (layer ``l`` at step ``s - l``), so the ``L`` layers'
  matmuls of one wavefront step run as one batched matmul: ``T + L - 1`` sequential steps
  instead of ``L * T`` (the way cuDNN runs stacked RNNs). Needs all layers of one shape.

The default, ``order="auto"``, picks one per backend from measurements (``python -m bench
--only wavefront,accelerator``, LSTM hidden map, B = 32; :attr:`Stack.evaluation_order`):

* the wavefront on a GPU (JAX's default backend), for a uniform stack of two or more layers.
  On an NVIDIA H200 (jaxlib 0.11.2, float32 matmuls) it took 0.26x the layer order's time at
  16 layers x 1000 steps x H = 256 (143 vs 557 ms), 0.32x at 16 x 64 x 128, 0.35x at 32 x 32,
  0.47x at 64 x 16: every sequential step is a few kernel launches whatever its size, and it
  takes ``T + L - 1`` of them instead of ``L * T``.
* the layer order elsewhere. On the 2-core CPUs measured the wavefront (batch split over 2
  devices) took 1.56x the layer order's time at 16 x 64 x 128, 2.83x at 32 x 32 and 5.9x at
  64 x 16: XLA's CPU batched matmul over the layers is slower than one matmul per layer, the
  layer order projects a whole sequence's input in one matmul, and only the layer order runs
  the lean backward (:func:`lean_layers`). TPUs were not measured; they get the layer order
  until they are.

``perturb`` adds arrays to the state as it leaves each cell; the gradient w.r.t. a zero
perturbation is the total derivative of a loss w.r.t. that state (one backward pass gives the
whole ``[layer, time]`` map); ``taps`` do the same for the gradient's per-example norm only
(:func:`norm_tap`), reduced step by step inside the backward pass. ``checkpoint=C``
rematerialises the time scan in chunks of ``C`` steps and each layer as a whole
(``jax.checkpoint``), so the residuals kept for the backward pass are the layers' inputs plus
``T/C + C`` steps of one layer instead of every intermediate of every step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from gradflow import cells as _cells
from gradflow.checks import (_looks_like_key, boolean, check_params, check_xs, float_dtype,
                             nonfinite_params, params_fit)
from gradflow.checks import positive_int as _positive_int
from gradflow.checks import width as _width
from gradflow.cells.base import Cell, Lean, cast_floating, orthogonal
from gradflow.xla import jit

ORDERS = ("layer", "wavefront")
# The backends where order="auto" runs the wavefront (see the module docstring's numbers).
WAVEFRONT_BACKENDS = ("gpu",)
PRECISIONS = ("highest", "high", "default", None)


def precision_scope(precision):
    """The context a stack's matmuls are traced in: ``jax.default_matmul_precision(precision)``
    (``None``: whatever is set around it). Every matmul traced inside without a precision of
    its own gets it, a user cell's ``x @ W`` too; transposes keep their forward's."""
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def in_precision(fn):
    """``fn(stack, ...)`` traced in ``precision_scope(stack.matmul_precision)``: for a
    measurement's jitted body, so that its own matmuls (a readout, a cell's Jacobian) run at
    the stack's precision too. Goes under ``jax.jit``."""
    @functools.wraps(fn)
    def traced(stack, *args, **kwargs):
        with precision_scope(stack.matmul_precision):
            return fn(stack, *args, **kwargs)
    return traced


class StackOutput(NamedTuple):
    r"""What a stack computes.

    Attributes:
      states: ``{name: (L, B, T, H)}``: every layer's state after every step (``"h"`` is the
        output, ``"c"`` the memory of LSTM-type cells), perturbations included.
      gates: ``{gate: (L, B, T, H)}``: reported gate activations (empty unless requested).
      final: ``{name: (L, B, H)}``: the state after the last step.
      up: ``(L, B, T, H)``: what each layer emits upward, :math:`\mathrm{norm}(h^l_t + x^l_t)`
        (equal to ``states["h"]`` in a plain stack).
      widths: None for layers of one width ``H``; for layers of different widths
        (:attr:`Stack.widths`) the tuple ``(H_0, ..., H_{L-1})``, and every per-layer array
        above has ``H = max_l H_l`` units: layer ``l``'s in its first ``H_l``, exact zeros
        after (static: not a pytree leaf).
      h: ``(L, B, T, H)``: ``states["h"]``, the hidden outputs (a property).
      top: ``(B, T, H_{L-1})``: what the top layer emits, ``up[-1]`` (its real units only): the
        stack's output sequence (a property).
    """

    states: dict
    gates: dict
    final: dict
    up: object = None
    widths: tuple | None = None

    @property
    def h(self):
        """``(L, B, T, H)`` hidden outputs (the cells' states ``h``)."""
        return self.states["h"]

    @property
    def top(self):
        """``(B, T, H_{L-1})`` what the top layer emits: the stack's output sequence (its
        real units only)."""
        if self.widths is None or self.widths[-1] == self.up.shape[-1]:
            return self.up[-1]
        return self.up[-1][..., :self.widths[-1]]


# ``widths`` is static (aux data), so an output passes through jit, grad's aux and scans.
jax.tree_util.register_pytree_node(
    StackOutput, lambda o: ((o.states, o.gates, o.final, o.up), o.widths),
    lambda widths, children: StackOutput(*children, widths))


NORMS = (None, "layer", "rms")
SETTINGS = ("input_projection", "order", "checkpoint", "residual", "norm", "matmul_precision",
            "cell_options")
#: The fix a square cell's refusal of unprojected inputs names (the command line, which
#: sets it by a flag, names the flag instead).
_PROJECT = "use input_projection=True"
#: Keys a measurement's config adds beside the stack's (:func:`gradflow.checks.with_meta`).
MEASUREMENT_KEYS = ("steps", "batch", "dtype", "seed", "input_scale", "loss", "wrt",
                    "readout_seed")


class Instruments(NamedTuple):
    """What a run measures besides its outputs, as one pytree (see :meth:`Stack.apply`).

    ``perturb``: ``{name: (L, T, B, H)}``; ``taps``: ``{name: (L, T, B)}``; ``param_taps``:
    ``(L, T)`` or None (time-major inside the stack); ``gates``: return gate activations;
    ``constant_params``: the cell parameters are constants of this differentiation, so runs
    of layers go through :func:`lean_layers` (unless ``param_taps``, ``gates`` or
    checkpointing).
    """

    perturb: dict
    taps: dict
    param_taps: object
    gates: bool
    constant_params: bool = False

    def layer(self, l):
        """The instruments of layer(s) ``l`` (an index or a slice)."""
        return jax.tree_util.tree_map(lambda a: a[l], self)


# A pytree whose flags are static (aux data), so it passes through scans and maps.
jax.tree_util.register_pytree_node(
    Instruments, lambda i: ((i.perturb, i.taps, i.param_taps), (i.gates, i.constant_params)),
    lambda flags, children: Instruments(*children, *flags))


def _resolve_cells(cell, layers, cell_options) -> tuple:
    if isinstance(cell, (list, tuple)):
        if cell_options:
            raise ValueError("cell_options apply to one named cell; build each layer's cell with "
                             "gradflow.cells.get(name, **options) instead")
        if len(cell) != layers:
            raise ValueError(f"a list of cells needs one cell per layer: got {len(cell)} cells "
                             f"for {layers} layers")
        built = tuple(_cells.get(c) for c in cell)
        names = {tuple(sorted(c.state_names)) for c in built}  # state dicts: order is free
        if len(names) > 1:
            raise ValueError("every layer's cell must carry the same states (e.g. all ('c', 'h') "
                             f"or all ('h',)); got {sorted(names)}")
        return built
    return (_cells.get(cell, **(cell_options or {})),) * layers


def _one_cell(cells) -> bool:
    """Whether every layer runs one cell: by identity first (cells are memoised), so a stack of
    ten million layers answers in a second, not in the minute that hashing every cell took."""
    return all(c is cells[0] or c == cells[0] for c in cells)


@dataclasses.dataclass(frozen=True)
class Stack:
    r"""``layers`` recurrent cells stacked over ``input_size``-dim data, ``hidden_size`` wide.

    Layer ``l`` emits upward :math:`y^l_t = \mathrm{norm}(h^l_t + x^l_t)` (residual and norm
    optional; plain stacks emit :math:`h^l_t`), which is the next layer's input
    :math:`x^{l+1}_t`; its cell state :math:`h^l_t` goes forward to ``(l, t+1)``. The gradient
    maps measure the total derivative w.r.t. :math:`h^l_t` where it leaves the cell, so they
    cover both paths.

    Args:
      cell: a :class:`gradflow.cells.Cell` or a registered name (see ``gradflow.cells.names()``),
        or a list of them, one per layer (all carrying the same states).
      layers: ``L >= 1``.
      input_size: ``D``, the data's feature size.
      hidden_size: ``H``, or one width per layer ``[H_0, ..., H_{L-1}]`` (e.g. an input layer
        wider than the rest, ``[64, 32, 32, 32]``): layer ``l`` then reads ``H_{l-1}``
        features and emits ``H_l``; per-layer arrays (states, gates, perturbations) have
        ``max_l H_l`` units, layer ``l``'s in the first ``H_l`` and exact zeros after (see
        :class:`StackOutput`), and every measurement reads each layer at its own width.
      input_projection: map the data linearly to ``H_0`` before layer 0
        (``params["input"] = {"W": (D, H_0), "b": (H_0,)}``). Default: only when the cell needs
        ``in == H`` (refined gates) and ``D != H_0``.
      order: ``"auto"`` (default: the wavefront on a GPU for a uniform stack of two or more
        layers, else the layer order; :attr:`evaluation_order` says which runs),
        ``"layer"`` or ``"wavefront"`` (see the module docstring). Both give the same numbers
        up to float rounding.
      checkpoint: ``None`` (no rematerialisation), a chunk length ``C``, or ``"auto"``
        (``C = ceil(sqrt(T))``).
      residual: add each layer's input to its output, :math:`h^l_t + x^l_t`, where both have
        the same number of features (layer 0 reading ``D != H_0`` unprojected features, or a
        layer reading a wider or narrower layer, gets none).
      norm: ``None``, ``"layer"`` (LayerNorm with learned ``scale, bias``) or ``"rms"`` (RMSNorm
        with learned ``scale``) on each layer's output, after the residual; epsilon ``1e-6``
        under the square root (Flax's default; PyTorch's and Equinox's ``1e-5`` give outputs
        about ``5e-6 / variance`` relative apart)
        (``params["norm"]``: one dict per layer; not :func:`gradflow.jacobian_map`'s ``norm``,
        a matrix norm). Dropout is never applied: gradflow measures the deterministic network.
      matmul_precision: the precision of every float32 matmul the stack and the measurements
        on it trace (:func:`precision_scope`): ``"highest"`` (default: true float32 on every
        backend, so a map on a GPU or TPU equals the CPU's to float32 rounding), ``"high"`` or
        ``"default"`` (the backend's fast modes: TensorFloat-32 on recent NVIDIA GPUs, bfloat16
        passes on TPUs; on CPUs XLA computes float32 in every mode), or ``None`` (JAX's
        ``jax_default_matmul_precision`` as set around the call). ``python -m bench --only
        accelerator`` reports the time and the map's error of ``"default"`` where it differs.
      cell_options: options of a named ``cell`` (e.g. ``{"forget_bias": 1.0}``).

    Example::

      >>> stack = gradflow.Stack("lstm", layers=4, input_size=3, hidden_size=16)
      >>> params = stack.init(jax.random.key(0))
      >>> out = stack.apply(params, jnp.ones((2, 10, 3)))
      >>> out.h.shape
      (4, 2, 10, 16)
      >>> deep = gradflow.Stack("lstm", 16, 8, 8, residual=True, norm="layer")
      >>> wide_first = gradflow.Stack("lstm", 3, 5, [16, 8, 8])
      >>> wide_first.widths, wide_first.apply(wide_first.init(jax.random.key(0)),
      ...                                     jnp.ones((2, 4, 5))).top.shape
      ((16, 8, 8), (2, 4, 8))
    """

    cells: tuple
    layers: int
    input_size: int
    hidden_size: int | tuple
    input_projection: bool | None = None
    order: str = "auto"
    checkpoint: int | str | None = None
    residual: bool = False
    norm: str | None = None
    matmul_precision: str | None = "highest"

    def __hash__(self):
        # (equal stacks hash equal: their cell tuples share length, first and last cell)
        # in O(1), not over every cell: a stack is a static argument and a cache key
        return hash((type(self), len(self.cells), self.cells[0], self.cells[-1],
                     *(getattr(self, f.name) for f in dataclasses.fields(self)
                       if f.name != "cells")))

    def __init__(self, cell, layers: int = 1, input_size: int = 1, hidden_size=32, *,
                 input_projection: bool | None = None, order: str = "auto",
                 checkpoint=None, residual: bool = False, norm: str | None = None,
                 matmul_precision: str | None = "highest", cell_options: dict | None = None,
                 **unknown):
        if unknown:
            raise ValueError(_unknown_setting(cell, unknown))
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("layers", _positive_int("layers", layers))
        _check_layer_count(self.layers)
        cells = _resolve_cells(cell, self.layers, cell_options)
        set_("cells", cells)
        set_("input_size", _width("input_size", input_size))
        set_("hidden_size", _widths(hidden_size, self.layers))
        set_("_widths", ((self.hidden_size,) * self.layers if isinstance(self.hidden_size, int)
                         else self.hidden_size))
        H0 = self._widths[0]
        square = cells[0].square
        if input_projection is None:
            input_projection = square and input_size != H0
        elif not boolean("input_projection", input_projection) and square \
                and input_size != H0:
            raise ValueError(
                f"cell {cells[0].name!r} needs its input size to equal hidden_size "
                f"({H0}); the data has {input_size} features: {_PROJECT}")
        set_("input_projection", bool(input_projection))
        for l, c in enumerate(cells[1:], 1):
            if c.square and self._widths[l] != self._widths[l - 1]:
                raise ValueError(f"cell {c.name!r} needs its input size to equal its hidden size,"
                                 f" but layer {l} ({self._widths[l]} wide) reads layer {l - 1} "
                                 f"({self._widths[l - 1]} wide): give such layers one width")
        if order not in ORDERS + ("auto",):
            raise ValueError(f"unknown order {order!r}; valid: "
                             f"{', '.join(map(repr, ('auto',) + ORDERS))}")
        set_("order", order)
        if isinstance(checkpoint, bool):  # (True read as 1 by the integer check)
            raise TypeError(f"checkpoint={checkpoint}: give 'auto' (a chunk length chosen "
                            "from the sequence), a chunk length (an integer >= 1) or None")
        if checkpoint not in (None, "auto"):
            checkpoint = _positive_int("checkpoint", checkpoint)
        set_("checkpoint", checkpoint)
        set_("residual", boolean("residual", residual))
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: None, 'layer', 'rms'")
        set_("norm", norm)
        if matmul_precision not in PRECISIONS:
            raise ValueError(f"unknown matmul_precision {matmul_precision!r}; valid: 'highest' "
                             "(default), 'high', 'default', None")
        set_("matmul_precision", matmul_precision)
        if order == "wavefront" and not self.uniform:
            raise ValueError("order='wavefront' needs every layer to read H features, one "
                             "cell and one width for all layers: use input_projection=True or "
                             "input_size == hidden_size, and order='layer' for a list of "
                             "different cells or hidden sizes")

    @property
    def cell(self):
        """The cell of every layer (a ValueError for a stack of different cells)."""
        first = self.cells[0]
        for l, c in enumerate(self.cells):
            if c != first:
                o0, o = dict(first.options), dict(c.options)
                diff = sorted(k for k in set(o0) | set(o) if o0.get(k) != o.get(k))
                what = (f"options {', '.join(diff)}" if c.name == first.name and diff
                        else f"cell {c.name!r}" if c.name != first.name else "its functions")
                raise ValueError(f"this stack has different cells per layer (layer {l} differs "
                                 f"from layer 0 in {what}); use stack.cells")
        return first

    @property
    def state_names(self) -> tuple:
        """The state keys every layer carries (``("h",)`` or ``("c", "h")``)."""
        return self.cells[0].state_names

    @property
    def widths(self) -> tuple:
        """``(H_0, ..., H_{L-1})``: every layer's hidden size."""
        return self._widths

    def real_units(self):
        """``(L, max_width)`` bool (NumPy): True on layer ``l``'s first ``H_l`` units, the ones
        that exist where per-layer arrays are padded to ``max_width``; None when every layer
        has one width (nothing padded)."""
        if isinstance(self.hidden_size, int):
            return None
        return np.arange(self.max_width)[None, :] < np.asarray(self._widths)[:, None]

    @property
    def max_width(self) -> int:
        """``max_l H_l``: the last axis of every per-layer array (see :class:`StackOutput`)."""
        return (self.hidden_size if isinstance(self.hidden_size, int)
                else max(self.hidden_size))

    @property
    def evaluation_order(self) -> str:
        """The order :meth:`apply` runs: ``order``, or for ``"auto"`` ``"wavefront"`` where
        JAX's default backend is a GPU and the stack is uniform with two or more layers, else
        ``"layer"``. Configs record ``order`` as given, so a stack saved on one backend runs
        the order measured best on another (the numbers agree up to float rounding, as the
        same order's do across backends)."""
        if self.order != "auto":
            return self.order
        wave = (self.layers > 1 and self.uniform
                and jax.default_backend() in WAVEFRONT_BACKENDS)
        return "wavefront" if wave else "layer"

    @property
    def gate_names(self) -> tuple:
        """Every gate a layer's cell reports, in the order the layers first report them: the
        keys of ``apply(..., gates=True).gates`` (:func:`gate_keys`: a name two layers' cells
        give to different gates is qualified by the cell, ``"z@gru"``, ``"z@star"``)."""
        return tuple(dict.fromkeys(k for ks in gate_keys(self.cells) for k in ks.values()))

    @property
    def uniform(self) -> bool:
        """True when every layer reads ``H`` features, has width ``H`` and runs one cell (one
        shape)."""
        return (isinstance(self.hidden_size, int)
                and (self.input_projection or self.input_size == self.hidden_size)
                and _one_cell(self.cells))

    def layer_in(self, l: int) -> int:
        """The number of features layer ``l`` reads: ``H_{l-1}`` (``l > 0``), ``H_0`` (the
        projected data) or ``D``."""
        if isinstance(l, bool) or not isinstance(l, (int, np.integer)) \
                or not 0 <= l < self.layers:
            raise ValueError(f"layer index must be in 0..{self.layers - 1}, got {l!r}")
        if l > 0:
            return self._widths[l - 1]
        return self._widths[0] if self.input_projection else self.input_size

    def residual_at(self, l: int) -> bool:
        """Whether layer ``l`` adds its input to its output: ``residual``, and the layer reads as
        many features as it emits (a layer that changes the width has no skip)."""
        return self.residual and self.layer_in(l) == self._widths[l]

    def segments(self) -> list:
        """``[(start, stop), ...]``: runs of consecutive layers of one shape (input size,
        width) and cell (each run is one compiled body, scanned over depth)."""
        key = lambda l: (self.cells[l], self.layer_in(l), self._widths[l])  # noqa: E731
        out, start = [], 0
        for l in range(1, self.layers + 1):
            if l == self.layers or key(l) != key(start):
                out.append((start, l))
                start = l
        return out

    @property
    def config(self) -> dict:
        """JSON-able description: the cell's config plus the stack's sizes and settings. A
        cell option named like a measurement's setting (g-LSTM's ``steps``, which a map's
        ``steps``, the sequence length, replaces in its config) is also kept under
        ``cell_options``, so a result's config rebuilds the cell it measured. ``cell_label``
        (:attr:`gradflow.cells.Cell.label`, per layer in a stack of different cells) where a
        cell's options differ from its defaults: ``"lstm:forget_bias=1.0"``, as titles name
        it."""
        if _one_cell(self.cells):
            cell = self.cells[0]
            cells = {**cell.config}
            if set(dict(cell.options)) & set(MEASUREMENT_KEYS):
                cells["cell_options"] = dict(cell.options)
            if cell.label != cell.name:  # options of note: what titles name
                cells["cell_label"] = cell.label
        else:
            cells = {"cell": [c.name for c in self.cells],
                     "cell_options": [dict(c.options) for c in self.cells]}
            of = {id(c): c.label for c in {id(c): c for c in self.cells}.values()}
            if any(of[id(c)] != c.name for c in self.cells):
                cells["cell_label"] = [of[id(c)] for c in self.cells]
        return {**cells, "layers": self.layers, "input_size": self.input_size,
                "hidden_size": (self.hidden_size if isinstance(self.hidden_size, int)
                                else list(self.hidden_size)),
                "input_projection": self.input_projection,
                "order": self.order, "checkpoint": self.checkpoint, "residual": self.residual,
                "norm": self.norm, "matmul_precision": self.matmul_precision}

    def replace(self, **changes) -> "Stack":
        """A copy with some fields changed (``cell`` may be a name)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        cells = kw.pop("cells")
        cell = changes.pop("cell", changes.pop("cells", cells[0] if _one_cell(cells)
                                                 else cells))
        kw.update(changes)
        return Stack(cell, **kw)

    # ------------------------------------------------------------------------------------------
    def init(self, key, dtype=jnp.float32) -> dict:
        """``{"layers": [per-layer cell params, bottom first], "input": {"W", "b"}?,
        "norm": [per-layer {"scale", "bias"?}]?}``. ``key``: a JAX PRNG key
        (``jax.random.key(0)``, or a legacy ``jax.random.PRNGKey(0)``); ``dtype`` float32 or
        float64 (which needs 64-bit JAX). Call it as it is: under ``jax.jit`` every layer's
        initialisation (a QR per orthogonal matrix) is compiled apart: 85 s for 64 LSTM layers."""
        if not _looks_like_key(key):
            raise TypeError(f"Stack.init takes a PRNG key such as jax.random.key(0), got "
                            f"{type(key).__name__} {str(key)[:40]}")
        dtype = float_dtype(dtype)
        if not isinstance(key, jax.core.Tracer):  # (traced: expected_params reads its shapes)
            params_fit(self, dtype)  # a stack far too wide was allocated, and the process died
        kin, klayers = jax.random.split(key)
        Hs, D = self._widths, self.input_size
        keys = jax.random.split(klayers, self.layers)
        params = {"layers": [c.init(k, self.layer_in(l), Hs[l], dtype)
                             for l, (c, k) in enumerate(zip(self.cells, keys))]}
        if self.input_projection:
            params["input"] = {"W": orthogonal(kin, (D, Hs[0]), dtype),
                               "b": jnp.zeros((Hs[0],), dtype)}
        if self.norm is not None:
            params["norm"] = self._identity_norm(dtype)
        return params

    def _identity_norm(self, dtype) -> list:
        """Each layer's norm params at its own width, at identity (scale 1, bias 0)."""
        return [{"scale": jnp.ones((H,), dtype), **({"bias": jnp.zeros((H,), dtype)}
                                                    if self.norm == "layer" else {})}
                for H in self._widths]

    def params_from(self, layers, input: dict | None = None, *, norm=None, dtype=None) -> dict:
        """Params of this stack from trained per-layer objects, as :meth:`init` lays them out:
        ``params["layers"][l] = self.cells[l].to_params(layers[l])`` (an adapter cell converts
        the user's module or variable dict; a gradflow cell's layer is its params dict), the
        input projection ``input`` and the per-layer ``norm`` params (default: at identity),
        every floating leaf cast to ``dtype`` (default: the first layer's) and checked against
        the shapes :meth:`init` gives (:func:`gradflow.checks.check_params`). The public entry
        is :func:`gradflow.cells.stack_params`, which documents the arguments."""
        if isinstance(layers, Mapping) or not isinstance(layers, Iterable):
            keys = f" with keys {sorted(map(str, layers))[:6]}" if isinstance(
                layers, Mapping) else ""
            raise TypeError(f"layers is one trained object per layer, bottom first, in a list "
                            f"(e.g. [variables['params'][name] for name in the {self.layers} "
                            f"layers' names]); got a {type(layers).__name__}{keys}")
        layers = list(layers)
        if len(layers) != self.layers:
            raise ValueError(f"{len(layers)} layer objects for a stack of {self.layers} layers")
        out = [c.to_params(obj) if c.to_params is not None else obj
               for c, obj in zip(self.cells, layers)]
        params = {"layers": out}
        if self.input_projection:
            if input is None:
                raise ValueError("this stack projects its input (input_projection): give "
                                 "input={'W': (D, H), 'b': (H,)}")
            params["input"] = input
        elif input is not None:
            raise ValueError("input= given, but the stack has no input_projection")
        if dtype is None:
            dtype = jnp.asarray(jax.tree_util.tree_leaves(out[0])[0]).dtype
        else:  # asked for: one that JAX computes in (float64 without 64-bit JAX was truncated
            dtype = float_dtype(dtype)  # to float32 with a warning per leaf)
        dtype = jnp.dtype(dtype)
        if self.norm is not None:
            identity = self._identity_norm(dtype)
            if norm is not None and not isinstance(norm, Mapping) and hasattr(norm, "__iter__"):
                norm = list(norm)  # (any iterable, as layers)
            if norm is not None and (not isinstance(norm, list) or len(norm) != self.layers):
                got = (f"{len(norm)} entries" if isinstance(norm, list)
                       else f"a {type(norm).__name__}")
                raise ValueError(f"norm= holds one layer's norm params per layer, a list of "
                                 f"{self.layers}; got {got}")
            params["norm"] = (identity if norm is None
                              else [self._norm_layer(n, i) for n, i in zip(norm, identity)])
        elif norm is not None:
            raise ValueError("norm= given, but the stack has no norm")
        params = cast_floating(params, dtype)
        check_params(self, params)
        return params

    def _norm_layer(self, given, identity: dict):
        """One layer's trained norm params as :meth:`init` lays them out: a Flax variable dict
        ``{"params": {...}}`` unwrapped, and a norm made without a bias or a scale (Flax's
        ``use_bias=False``, ``use_scale=False``: the same function as a bias of 0, a scale of
        1) given those from ``identity``, the layer's norm at identity."""
        if isinstance(given, Mapping) and set(given) == {"params"}:
            given = given["params"]
        if isinstance(given, Mapping) and set(given) < set(identity):
            given = {**identity, **given}
        return given

    def initial_state(self, batch: int, dtype=jnp.float32) -> dict:
        """Zero state ``{name: (L, B, H)}`` (``H = max_width``)."""
        batch = _positive_int("batch", batch)
        return {k: jnp.zeros((self.layers, batch, self.max_width), dtype)
                for k in self.state_names}

    def _check_instruments(self, B: int, T: int, state0, perturb, taps) -> None:
        """A ValueError (TypeError for what is no dict) unless ``state0`` is ``{name: (L, B,
        H)}`` for every state of the cell and ``perturb``/``taps`` hold states of the cell at
        ``(L, B, T, H)``/``(L, B, T)`` (they failed inside the scan, as KeyError or JAX's
        shape errors)."""
        L, H = self.layers, self.max_width
        for what, given, shape, every in (("state0", state0, (L, B, H), True),
                                          ("perturb", perturb, (L, B, T, H), False),
                                          ("taps", taps, (L, B, T), False)):
            if given is None:
                continue
            if not isinstance(given, Mapping):
                raise TypeError(f"{what} must be a dict {{state name: {shape} array}} over "
                                f"the states {', '.join(self.state_names)}, got "
                                f"{type(given).__name__}")
            unknown = set(given) - set(self.state_names)
            missing = set(self.state_names) - set(given) if every else set()
            if unknown:
                raise ValueError(
                    f"{what} keys {sorted(map(str, given))} are not states of cell "
                    f"{self.cells[0].name!r} ({', '.join(self.state_names)})")
            if missing:
                raise ValueError(f"{what} lacks the states {sorted(missing)} of cell "
                                 f"{self.cells[0].name!r} (it needs every one of "
                                 f"{', '.join(self.state_names)})")
            for k, v in given.items():
                got = tuple(jnp.shape(v))
                if what != "taps" and len(got) == len(shape) and got[1] == 1 and all(
                        g == s for i, (g, s) in enumerate(zip(got, shape)) if i != 1):
                    continue  # one example's, broadcast over the batch
                if got != shape:
                    raise ValueError(f"{what}[{k!r}] must have shape {shape} (layers, batch"
                                     + (", steps" if len(shape) > 3 or what == "taps" else "")
                                     + (", max width)" if what != "taps" else ")")
                                     + f", got {tuple(jnp.shape(v))}")

    def check_inputs(self, xs):
        """Raise unless ``xs`` is a real ``(B, T, input_size)`` array: a ValueError for a wrong
        shape, a TypeError for a complex, boolean, string or object dtype
        (:func:`gradflow.checks.check_xs`)."""
        check_xs(self, xs)

    def layer_inputs(self, params: dict, xs, out) -> list:
        """``x^l_t`` for every layer, ``[(B, T, in_0), (B, T, H_0), ..., (B, T, H_{L-2})]``: the
        (projected) data, then what the layer below emits (``out.up``, from :meth:`apply` on
        ``xs``, at its own width)."""
        x0 = self.project_input(params, jnp.asarray(xs, out.up.dtype))
        return [x0] + [self.unpad(out.up[l], l) for l in range(self.layers - 1)]

    def project_input(self, params: dict, xs):
        """What the first layer reads of data ``xs (..., D)``: ``xs W + b`` where the stack
        projects its input (:attr:`input_projection`, ``params["input"]``), else ``xs``."""
        if not self.input_projection:
            return xs
        return xs @ params["input"]["W"] + params["input"]["b"]

    def previous_states(self, out) -> dict:
        """``s^l_{t-1}`` for every ``(l, t)``, ``{name: (L, B, T, H)}``: each state of ``out``
        (from :meth:`apply`) one step later, the initial state (:meth:`initial_state`) at
        ``t = 0``; with :meth:`layer_inputs`, what each step of each layer was given."""
        return {k: jnp.concatenate([self.initial_state(v.shape[1], v.dtype)[k][:, :, None],
                                    v[:, :, :-1]], axis=2)
                for k, v in out.states.items()}

    def unpad(self, a, l: int):
        """Layer ``l``'s real units ``a[..., :H_l]`` of a per-layer array ``a: (..., H)``
        (``a`` itself when it has ``H_l`` units)."""
        H = self._widths[l]
        return a if a.shape[-1] == H else a[..., :H]

    def apply(self, params: dict, xs, *, state0: dict | None = None, perturb: dict | None = None,
              taps: dict | None = None, param_taps=None, gates: bool = False,
              constant_params: bool = False) -> StackOutput:
        r"""Run the stack over a batch of sequences.

        Args:
          params: from :meth:`init`.
          xs: ``(B, T, D)`` inputs, batch-major.
          state0: ``{name: (L, B, H)}`` initial states (zeros if None; ``H = max_width``,
            layer ``l`` reading its first ``H_l`` units).
          perturb: ``{name: (L, B, T, H)}`` added to each state where it leaves its cell
            (keys a subset of the cell's ``state_names``; units beyond ``H_l`` are ignored).
          taps: ``{name: (L, B, T)}`` (zeros): the gradient of a loss w.r.t. ``taps[name]`` is
            :math:`\|\partial\mathcal L/\partial s^l_t[b]\|_2` per layer, example and step
            (:func:`norm_tap`), at ``H`` times less memory than differentiating ``perturb``.
          param_taps: ``(L, T)`` (zeros): every step uses its own tapped copy of its layer's
            cell parameters (input projection included, so it runs step by step) and the
            gradient of a loss w.r.t. ``param_taps[l, t]`` is
            :math:`\mathrm{mean}_\theta|\partial\mathcal L/\partial\theta^l_{(t)}|`
            (:func:`mean_abs_tap`).
          gates: also return every reported gate activation, one ``(L, B, T, H)`` array per
            gate of :attr:`gate_names` (a stack mixing, say, GRU and STAR layers: NaN in the
            layers whose cell does not report that gate).
          constant_params: a promise that nothing differentiates this call w.r.t. ``params``
            (the state maps set it): runs of layers then go through :func:`lean_layers`
            (a cell's own ``lean`` step, or :func:`autodiff_step`; not with ``param_taps``,
            ``gates`` or checkpointing), and the cell parameters get zero cotangents. Off by
            default, so ``jax.grad`` w.r.t. ``params`` (training) always uses autodiff.
        Returns:
          :class:`StackOutput` with ``(L, B, T, H)`` states, emissions and gates
          (``H = max_width``, zero-padded beyond each layer's width).

        Raises:
          TypeError, ValueError: params lacking a parameter of this stack or holding it at
            another shape (:func:`gradflow.checks.check_params`, ``strict=False``: checked
            when traced, not per call inside ``jax.jit``), or inputs of the wrong shape.
        """
        check_params(self, params, strict=False)
        with precision_scope(self.matmul_precision):
            return self._apply(params, xs, state0, perturb, taps, param_taps, gates,
                               constant_params)

    def _apply(self, params, xs, state0, perturb, taps, param_taps, gates, constant_params):
        self.check_inputs(xs)
        dtype = jax.tree_util.tree_leaves(params["layers"][0])[0].dtype
        xs = jnp.asarray(xs, dtype)
        B, T, _ = xs.shape
        L = self.layers
        self._check_instruments(B, T, state0, perturb, taps)
        if state0 is None:
            state0 = self.initial_state(B, dtype)
        else:
            state0 = {k: jnp.broadcast_to(jnp.asarray(v, dtype), (L, B, self.max_width))
                      for k, v in state0.items()}
        perturb, taps = dict(perturb or {}), dict(taps or {})
        if param_taps is not None and jnp.shape(param_taps) != (L, T):
            raise ValueError(f"param_taps must have shape (layers, steps) = {(L, T)}, got "
                             f"{jnp.shape(param_taps)}")
        x = self.project_input(params, jnp.swapaxes(xs, 0, 1))  # (T, B, .): time-major inside
        inst = Instruments({k: jnp.swapaxes(v, 1, 2) for k, v in perturb.items()},  # (L, T, B, H)
                           {k: jnp.swapaxes(v, 1, 2) for k, v in taps.items()},  # (L, T, B)
                           param_taps, boolean("gates", gates, none=False),
                           boolean("constant_params", constant_params, none=False))
        norm = params.get("norm") if self.norm is not None else None
        chunk = self._chunk(T)
        if self.evaluation_order == "wavefront":
            states, up, gts, final = _wavefront(self, _stack_layers(params["layers"]),
                                                _stack_layers(norm) if norm else None, x,
                                                state0, inst, chunk)
        else:
            states, up, gts, final = self._layerwise(params["layers"], norm, x, state0, inst,
                                                     chunk)
        t = lambda v: jnp.swapaxes(v, 1, 2)  # noqa: E731  (L, T, B, H) -> (L, B, T, H)
        return StackOutput({k: t(v) for k, v in states.items()},
                           {k: t(v) for k, v in gts.items()}, final, t(up),
                           None if isinstance(self.hidden_size, int) else self._widths)

    def _chunk(self, T):
        if self.checkpoint is None:
            return None
        if self.checkpoint == "auto":
            return max(1, math.ceil(math.sqrt(T)))
        return min(self.checkpoint, T)

    def _layerwise(self, layers, norm, x, state0, inst: Instruments, chunk):
        outs = []
        keys = gate_keys(self.cells)
        Hmax = self.max_width
        for start, stop in self.segments():
            cell = self.cells[start]
            H = self._widths[start]
            residual = self.residual_at(start)

            def run(p, pn, xx, s0, ins, cell=cell, residual=residual):
                states, gts, final = _layer(cell, p, xx, s0, ins, chunk)
                return states, emit(states["h"], xx, pn, residual, self.norm), gts, final

            if chunk is not None:
                # Checkpointed: a layer keeps only its input for the backward pass and
                # recomputes the rest (its input projection, the chunk carries) in its turn.
                run = jax.checkpoint(run)
            seg = slice(start, stop)
            sl = lambda tree: jax.tree_util.tree_map(lambda a: a[seg], tree)  # noqa: E731
            pn = _stack_layers(norm[seg]) if norm else None
            s0, ins = sl(state0), inst.layer(seg)
            if H != Hmax:  # this run of layers at its own width: cut the padded units off
                s0 = _cut(s0, H)
                ins = ins._replace(perturb=_cut(ins.perturb, H))
            if (inst.constant_params and inst.param_taps is None and not inst.gates
                    and chunk is None):
                P = jax.tree_util.tree_map(lax.stop_gradient, _stack_layers(layers[seg]))
                states, up, final = lean_layers(cell, residual, self.norm,
                                                self.matmul_precision, P, pn, x, s0,
                                                ins.perturb, ins.taps)  # P: truthfully constant
                out = (states, up, {}, final)
            elif stop - start == 1:
                out = run(layers[start], _index(pn, 0), x, _index(s0, 0), _index(ins, 0))
                out = jax.tree_util.tree_map(lambda a: a[None], out)
            else:
                def body(xx, inp):
                    p, pnl, s0, ins = inp
                    states, up, gts, final = run(p, pnl, xx, s0, ins)
                    return up, (states, up, gts, final)

                _, out = lax.scan(body, x, (_stack_layers(layers[seg]), pn, s0, ins))
            x = out[1][-1]
            if H != Hmax:  # back to the common layout: zeros beyond this width
                out = jax.tree_util.tree_map(lambda a: _pad(a, Hmax), out)
            if inst.gates:  # every gate of the stack; NaN where this run's cell has none
                own = {keys[start][g]: a for g, a in out[2].items()}
                nan = jnp.full((stop - start, *x.shape[:2], Hmax), jnp.nan, x.dtype)
                out = (*out[:2], {k: own.get(k, nan) for k in self.gate_names}, out[3])
            outs.append(out)
        if len(outs) == 1:
            return outs[0]
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *outs)


def from_torch(model, *, prefix: str | None = None, nonlinearity: str | None = None,
               dtype=None, **stack_options) -> tuple[Stack, dict]:
    r"""``(stack, params)`` measuring a PyTorch ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` as it is.

    PyTorch's recurrent layers are gradflow's ``lstm``, ``gru`` and ``rnn`` cells (the same
    equations), built with PyTorch's two biases per gate kept apart (``biases=2``; none,
    ``biases=0``, for ``bias=False``), so that the parameter map is the mean over PyTorch's
    own parameters: the weights are read by their names and laid out as those cells' params
    (:func:`gradflow.cells.pytorch.torch_layers`), so every measurement runs on the model you
    trained, with no PyTorch in the loop (nothing here imports it). The data is
    ``(batch, steps, features)``, as ``batch_first=True`` has it: transpose a ``(steps,
    batch, features)`` batch first (``xs.swapaxes(0, 1)``).

    Args:
      model: an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (all its layers), an
        ``nn.LSTMCell``/``GRUCell``/``RNNCell``, a model holding one (``prefix=`` picks one
        of several), a ``state_dict()`` of any of these (tensors or NumPy arrays), or a list
        of them, one per layer, bottom first (widths may differ).
      prefix: the recurrent module's key prefix in a state dict holding several.
      nonlinearity: a vanilla RNN's, ``"tanh"`` or ``"relu"``, which a state dict does not
        record (a module's is read from it).
      dtype: the params' dtype; default the weights' (float32 where 64-bit JAX is off).
      **stack_options: :class:`Stack`'s settings (``residual``, ``norm`` at identity,
        ``checkpoint``, ``order``, ...): e.g. a residual stack of your single-layer modules.
    Returns:
      ``(stack, params)``, the stack of ``len(layers)`` layers of the cell reading the
      weights' input size.

    Example::

      >>> rng = np.random.default_rng(0)
      >>> sd = {f"{w}_l{l}": rng.normal(size=(16, 4)) / 2 for l in range(3)
      ...       for w in ("weight_ih", "weight_hh")}  # an LSTM's (4H, in), no biases
      >>> stack, params = gradflow.stack.from_torch(sd)
      >>> stack.cells[0].name, stack.layers, stack.input_size, stack.hidden_size
      ('lstm', 3, 4, 4)
      >>> gradflow.gradient_map(stack, params, rng.normal(size=(2, 5, 4))).values.shape
      (3, 5)
    """
    from gradflow.cells.pytorch import torch_layers

    if stack_options.get("input_projection"):
        raise ValueError("from_torch: a PyTorch recurrent layer reads its inputs as they are "
                         "(no input_projection)")
    t = torch_layers(model, prefix=prefix, nonlinearity=nonlinearity)
    widths = t.hidden_size[0] if len(set(t.hidden_size)) == 1 else list(t.hidden_size)
    stack = Stack(t.cell, layers=len(t.layers), input_size=t.input_size, hidden_size=widths,
                  **stack_options)
    return stack, stack.params_from(t.layers, dtype=t.dtype if dtype is None else dtype)


def gate_identity(cell: Cell, gate: str) -> tuple:
    """What makes gate ``gate`` of ``cell`` the gate it is, for pooling it with other layers':
    ``(kind, retain sign or None, refine form of a refined gate, auxiliary gate of an effective
    gate)`` (:class:`gradflow.cells.Cell`)."""
    kind = cell.kinds[gate]
    return (kind, dict(cell.retain).get(gate), cell.refine_mode if kind == "refined" else None,
            cell.refine_gate if kind == "effective" else None)


def gate_keys(cells) -> tuple:
    """``({gate: key}, ...)``, one per layer of ``cells``: the name each layer's gates go by in
    a stack of these cells (:attr:`Stack.gate_names`). A gate is its own name where every
    layer reporting that name means the same gate (:func:`gate_identity`); where layers of
    different cells give one name to different gates (GRU's ``z`` is a sigmoid update gate,
    STAR's ``z`` a tanh candidate) each is qualified by its cell's name, ``"z@gru"`` and
    ``"z@star"`` (by its first layer, ``"z@3"``, where one cell name differs in options).

    >>> gate_keys([_cells.get("gru"), _cells.get("star")])[1]
    {'k': 'k', 'z': 'z@star'}
    """
    groups = {}  # gate -> {identity: (first layer, cell name)}
    for l, c in enumerate(cells):
        for g in c.gate_names:
            groups.setdefault(g, {}).setdefault(gate_identity(c, g), (l, c.name))

    def key(g, ident):
        if len(groups[g]) == 1:
            return g
        l, name = groups[g][ident]
        unique = sum(n == name for _, n in groups[g].values()) == 1
        return f"{g}@{name if unique else l}"

    return tuple({g: key(g, gate_identity(c, g)) for g in c.gate_names} for c in cells)


def finite_masks(states: dict) -> dict:
    """``{name: (L, T) bool}`` from ``{name: (L, B, T, H)}`` states: state ``name`` of layer
    ``l`` at step ``t`` is finite in every example."""
    return {k: jnp.all(jnp.isfinite(v), axis=(1, 3)) for k, v in states.items()}


def finite_positions(states: dict):
    """``(L, T)`` bool: every state of layer ``l`` at step ``t`` is finite in every example."""
    return functools.reduce(jnp.logical_and, finite_masks(states).values())


@functools.partial(jit, static_argnames=("stack",))
@in_precision
def finite_states(stack: Stack, params, xs) -> dict:
    """:func:`finite_masks` of the stack's forward pass on ``xs``."""
    return finite_masks(stack.apply(params, xs).states)


def where_nonfinite(stack: Stack, params, xs, masks: dict | None = None) -> str:
    """Where the forward pass leaves the finite numbers (any example), in words, for the
    warnings of measurements taken there: how many ``(layer, step)`` positions, the earliest
    (lowest step, then layer) and the lowest (lowest layer, then step), with the states that
    are not finite there (``masks``: :func:`finite_states`, if already at hand)."""
    masks = {k: np.asarray(v) for k, v in (
        finite_states(stack, params, xs) if masks is None else masks).items()}
    finite = np.logical_and.reduce(list(masks.values()))
    if finite.all():
        return "the forward pass is finite everywhere"
    bad = [tuple(int(i) for i in lt) for lt in np.argwhere(~finite)]

    def at(layer, step):
        names = [k for k, m in masks.items() if not m[layer, step]]
        return f"layer {layer}, step {step} ({', '.join(names)})"

    early, low = min(bad, key=lambda lt: (lt[1], lt[0])), min(bad)
    return (f"the states are not finite at {len(bad)} of {finite.size} (layer, step) "
            f"positions, the earliest at {at(*early)}"
            + ("" if low == early else f", the lowest at {at(*low)}") + _nonfinite_params(params))


def _nonfinite_params(params) -> str:
    """``"; the params hold N non-finite values, the first in params[...]"`` where concrete
    ``params`` do (a diverged training run's), else ``""``."""
    count, first = nonfinite_params(params)
    return "" if not count else (f"; the params hold {count} non-finite value"
                                 f"{'s' * (count > 1)}, the first in params{first}")


#: Bytes of a stack's per-layer bookkeeping (a reference to each layer's cell, its width, ...)
#: counted by :func:`_check_layer_count`; a layer's parameters come on top.
_PER_LAYER_BYTES = 64


def _check_layer_count(layers: int) -> None:
    """A ValueError for a depth whose per-layer bookkeeping alone would take a quarter of the
    memory available (``Stack(layers=10**9)`` was killed by the kernel before any check);
    :func:`gradflow.cost.estimate` describes any stack that can be built, parameters
    included, without allocating them."""
    if layers * _PER_LAYER_BYTES <= 1 << 30:  # up to ~16 million layers: never a question
        return
    from gradflow.cost import available_memory, size

    avail = available_memory()
    if layers * _PER_LAYER_BYTES > avail / 4:
        raise ValueError(f"layers={layers}: a stack that deep takes about "
                         f"{size(layers * _PER_LAYER_BYTES)} to describe, before any "
                         f"parameter, more than a quarter of the {size(avail)} available; at "
                         f"most {int(avail / 4 / _PER_LAYER_BYTES):,} layers here")


def map_layers(stack: Stack, fn, params: dict, *arrays):
    """``fn(cell, layer_params, *layer_arrays)`` for every layer, stacked on a leading axis.

    Each run of layers of one shape and cell (:meth:`Stack.segments`) goes through one
    ``lax.map`` (one compiled body). ``arrays`` are lists (one entry per layer, each at that
    layer's own size) or arrays (or trees of arrays) ``(L, ..., H)`` in the stack's per-layer
    layout (:class:`StackOutput`): ``fn`` gets layer ``l``'s real units, ``(..., H_l)``.
    ``fn``'s results must have one shape across layers.
    """
    outs = []
    Hmax = stack.max_width
    for start, stop in stack.segments():
        cell = stack.cells[start]
        H = stack.widths[start]
        cut = (lambda v: v) if H == Hmax else (lambda v, H=H: v[..., :H])
        seg = [a[start:stop] if isinstance(a, list)
               else jax.tree_util.tree_map(lambda v: cut(v[start:stop]), a) for a in arrays]
        seg = [jnp.stack(a) if isinstance(a, list) else a for a in seg]
        p = _stack_layers(params["layers"][start:stop])
        outs.append(lax.map(lambda args, cell=cell: fn(cell, *args), (p, *seg)))
    if len(outs) == 1:
        return outs[0]
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *outs)


def _widths(hidden_size, layers: int):
    """``hidden_size`` checked: one positive int (kept), or one per layer (a tuple; an int
    when all are equal, so such a stack is the uniform one)."""
    if isinstance(hidden_size, (list, tuple)):
        if len(hidden_size) != layers:
            raise ValueError(f"hidden_size as a list gives one width per layer: got "
                             f"{len(hidden_size)} widths for {layers} layers")
        ws = tuple(_width(f"hidden_size[{l}]", h) for l, h in enumerate(hidden_size))
        return ws[0] if len(set(ws)) == 1 else ws
    try:
        h = _positive_int("hidden_size", hidden_size)
    except ValueError:
        raise ValueError(f"hidden_size must be a positive integer or a list of {layers} "
                         f"(one per layer), got {hidden_size!r}") from None
    return _width("hidden_size", h)


def _cut(tree, H: int):
    """The first ``H`` units (last axis) of every array in ``tree``."""
    return jax.tree_util.tree_map(lambda a: a[..., :H], tree)


def _pad(a, H: int):
    """``a: (..., h)`` padded with zeros to ``(..., H)``."""
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, H - a.shape[-1])])


def _unknown_setting(cell, unknown) -> str:
    names = ", ".join(map(repr, sorted(unknown)))
    msg = f"unknown Stack setting(s) {names}; valid options of Stack: {', '.join(SETTINGS)}"
    try:
        valid = _cells.get(cell).config if not isinstance(cell, (list, tuple)) else {}
    except (ValueError, TypeError):
        valid = {}
    cell_opts = sorted(set(unknown) & set(valid))
    if cell_opts:
        msg += (f". {', '.join(map(repr, cell_opts))} are options of cell {valid['cell']!r}: "
                f"pass cell_options={{{cell_opts[0]!r}: ...}} or a built gradflow.cells.get(...)")
    return msg


def emit(h, x, pn, residual: bool, norm: str | None):
    r"""What a layer emits upward: :math:`\mathrm{norm}(h + x)` (residual and norm optional)
    for ``h, x: (..., H)``; ``pn`` the norm's ``{"scale", "bias"?}``."""
    y = h + x if residual else h
    if norm is None:
        return y
    if norm == "layer":
        y = y - jnp.mean(y, axis=-1, keepdims=True)
    y = y * lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6)
    y = y * pn["scale"]
    return y + pn["bias"] if "bias" in pn else y


@jax.custom_vjp
def norm_tap(v, s):
    r"""Identity on ``v: (..., H)``; the cotangent it hands to ``s: (...)`` is the per-example
    norm :math:`\|\partial\mathcal L/\partial v\|_2` of ``v``'s cotangent.

    ``jax.grad`` w.r.t. zeros ``s`` thus gives gradient norms without ever materialising the
    gradients: inside a scan's backward each step's ``(B, H)`` cotangent is reduced to ``(B,)``
    on the spot.
    """
    return v


def _norm_tap_fwd(v, s):
    return v, None


def _norm_tap_bwd(_, g):
    return g, safe_norm(g)


def times_pow2(v, k):
    r"""``v * 2**k`` for integer arrays ``k`` (broadcast against ``v``) with :math:`|k|` up to
    twice the dtype's largest exponent (254 in float32; the exponents :func:`_exponent` gives
    and their negatives), exact: as the two factors :math:`2^{\lfloor k/2 \rfloor}` and
    :math:`2^{k - \lfloor k/2 \rfloor}`, each a normal number, where :math:`2^k` itself may
    not be (for ``k < -126`` in float32 it is subnormal, which XLA's CPU flushes to 0)."""
    k = jnp.asarray(k)
    h = k // 2
    return v * _pow2(h, v.dtype) * _pow2(k - h, v.dtype)


def _bits(dtype):
    """``(integer type, mantissa bits, exponent bias)`` of a float dtype."""
    info = jnp.finfo(dtype)
    return jnp.dtype(f"int{info.bits}"), info.nmant, info.maxexp - 1


def _pow2(k, dtype):
    """``2.0**k`` in ``dtype`` for integers ``k`` of normal numbers, built from its bits."""
    itype, nmant, bias = _bits(dtype)
    return lax.bitcast_convert_type(jnp.left_shift((k + bias).astype(itype), nmant), dtype)


def _scale_exponent(m):
    """:func:`_exponent` of ``m`` where it is positive and finite, else 0 (no scaling: zeros
    stay 0, inf and NaN pass through as they are)."""
    return jnp.where(jnp.isfinite(m) & (m > 0), _exponent(m), 0)


def _exponent(m):
    """``e`` with ``m = f 2^e``, ``f`` in ``[0.5, 1)``, for positive normal ``m`` (as
    ``jnp.frexp``'s, read from the bits; a subnormal ``m`` gives the smallest normal's)."""
    itype, nmant, bias = _bits(m.dtype)
    field = jnp.right_shift(lax.bitcast_convert_type(m, itype), nmant) & (2 * bias + 1)
    return jnp.maximum(field, 1).astype(jnp.int32) - bias + 1


def scaled_reduction(fn, x, axis=-1):
    r"""``fn(x)`` for a reduction ``fn`` over ``axis`` that is positively homogeneous,
    :math:`f(cx) = c\,f(x)` for :math:`c > 0` (norms, RMS, singular values), computed as
    :math:`s\,f(x/s)` with :math:`s = 2^e`, the power of two just above :math:`m = \max|x|`
    over ``axis`` (:math:`m = f\,2^e`, :math:`f \in [0.5, 1)`).

    Squares inside ``fn`` then neither underflow nor overflow: float32 squares underflow below
    ~1e-19 (and overflow above ~1e19), while gradients attenuated through deep stacks reach
    1e-33 and stay representable. The scaling is by a power of two (:func:`times_pow2`), exact
    and never through :math:`1/m`, which is subnormal (flushed to 0 on CPU) for :math:`m` above
    ``1 / finfo.tiny`` (8.5e37 in float32): an exploding gradient of 1e38 read 0. Where
    ``m`` is 0 the result is 0, with derivative 0 (a square root's at 0 would be NaN: the map
    of a state the loss never reads, differentiated w.r.t. the parameters); where ``m`` is inf
    or NaN, ``fn(x)`` unscaled (inf or NaN, counted as non-finite).

    Args:
      fn: ``x -> array`` (or a tuple of arrays) of ``x``'s shape with ``axis`` removed,
        optionally followed by trailing axes (e.g. a spectrum).
      x: any shape; axis: an int or a tuple of ints.
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    mk = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    ok = jnp.isfinite(mk) & (mk > 0)
    zero = mk == 0
    e = _scale_exponent(mk)  # m = f 2^e, f in [0.5, 1)
    # all-zero x: fn of ones (any input with a finite derivative), its value replaced by 0
    y = fn(jnp.where(zero, jnp.ones((), x.dtype), times_pow2(x, -e)))
    e, ok, zero = (jnp.squeeze(a, axes) for a in (e, ok, zero))

    def back(v):
        shape = e.shape + (1,) * (v.ndim - e.ndim)
        return jnp.where(ok.reshape(shape), times_pow2(v, e.reshape(shape)),
                         jnp.where(zero.reshape(shape), jnp.zeros((), v.dtype), v))

    return jax.tree_util.tree_map(back, y)


def safe_mean(x, axis=0, count=None):
    """The mean of ``x`` over ``axis`` (its sum over ``count``, default the axis' length),
    the sum formed at a power of two near ``max|x|`` (:func:`times_pow2`): a mean that is a
    float32 number does not overflow in its sum (norms of 3e38 over a batch of 2 read inf),
    nor do tiny entries underflow. NaN or inf entries give NaN or inf."""
    e = _scale_exponent(jnp.max(jnp.abs(x), axis=axis))
    total = jnp.sum(times_pow2(x, -jnp.expand_dims(e, axis)), axis=axis)
    n = x.shape[axis] if count is None else count
    return times_pow2(total / jnp.asarray(n, x.dtype), e)


def safe_norm(g, axis=-1):
    r""":math:`\|g\|_2` along ``axis`` without underflow (:func:`scaled_reduction`).

    ``g: (..., n)`` -> ``(...)`` for ``axis=-1``; NaN or inf in ``g`` give NaN or inf.
    """
    return scaled_reduction(lambda u: jnp.sqrt(jnp.sum(jnp.square(u), axis=axis)), g, axis)


norm_tap.defvjp(_norm_tap_fwd, _norm_tap_bwd)


@jax.custom_vjp
def mean_abs_tap(p, s):
    r"""Identity on a parameter tree ``p``; the cotangent it hands to ``s`` is the mean of
    :math:`|\partial\mathcal L/\partial p|` over every entry of the tree (for ``s`` with axes,
    per index of ``p``'s leading axes of that shape, e.g. ``s: (L,)`` for layer-stacked
    parameters). ``p`` itself gets a zero cotangent: the tap measures, it does not train.

    A step that uses ``mean_abs_tap(p, s_t)`` as its own copy of the parameters makes
    ``jax.grad`` w.r.t. zeros ``s`` the per-step parameter-gradient map
    :math:`\mathrm{mean}_\theta|\partial\mathcal L/\partial\theta_{(t)}|`, each step's gradient
    reduced inside the backward pass as soon as it is formed.
    """
    return p


def _mean_abs_tap_fwd(p, s):
    return p, s


def _mean_abs_tap_bwd(s, g):
    # summed scaled by a power of two near the largest |entry| (times_pow2, exact), so that a
    # sum of representable entries does not overflow (float32 entries of 1e37 over 100 of them)
    leaves = jax.tree_util.tree_leaves(g)
    n = s.ndim
    over = lambda a: tuple(range(n, a.ndim))  # noqa: E731
    m = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(a), axis=over(a)) for a in leaves])
    e = _scale_exponent(m)
    total = sum(jnp.sum(times_pow2(jnp.abs(a), -e.reshape(e.shape + (1,) * (a.ndim - n))),
                        axis=over(a)) for a in leaves)
    count = sum(math.prod(a.shape[n:]) for a in leaves)
    return (jax.tree_util.tree_map(jnp.zeros_like, g),
            times_pow2(total / count, e).astype(s.dtype))


mean_abs_tap.defvjp(_mean_abs_tap_fwd, _mean_abs_tap_bwd)


def _leave(new: dict, e_t: dict, tap_t: dict) -> dict:
    """States as they leave a cell: perturbation added, then tapped (see :func:`norm_tap`)."""
    new = {k: v + e_t[k] if k in e_t else v for k, v in new.items()}
    return {k: norm_tap(v, tap_t[k]) if k in tap_t else v for k, v in new.items()}


def _stack_layers(layers):
    """A list of per-layer param trees of one shape -> one tree with a leading layer axis."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)


def _scan(body, carry, xs, length, chunk):
    """``lax.scan(body, carry, xs)``, rematerialised in chunks of ``chunk`` steps if given."""
    if chunk is None or chunk >= length:
        if chunk is not None:
            body = jax.checkpoint(body)
        return lax.scan(body, carry, xs)
    n, rem = divmod(length, chunk)
    head = jax.tree_util.tree_map(lambda a: a[: n * chunk].reshape((n, chunk) + a.shape[1:]), xs)
    inner = jax.checkpoint(lambda c, x: lax.scan(body, c, x))
    carry, ys = lax.scan(inner, carry, head)
    ys = jax.tree_util.tree_map(lambda a: a.reshape((n * chunk,) + a.shape[2:]), ys)
    if rem:
        tail = jax.tree_util.tree_map(lambda a: a[n * chunk:], xs)
        carry, yt = jax.checkpoint(lambda c, x: lax.scan(body, c, x))(carry, tail)
        ys = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), ys, yt)
    return carry, ys


def lean_inputs(cell: Cell, p, x):
    """The projected inputs a lean layer's steps read (:func:`lean_layers`):
    ``cell.lean.project(p, x)`` where the cell's :class:`~gradflow.cells.base.Lean` has one
    (its own layout, e.g. all gates as one array), ``cell.project(p, x)`` otherwise."""
    lean = cell.lean
    return (lean.project if lean is not None and lean.project else cell.project)(p, x)


def step_rule(cell: Cell, p, state, xp) -> Lean:
    """The :class:`~gradflow.cells.base.Lean` step :func:`lean_layers` runs for ``cell``: its
    own where it has one, else one made by autodiff of ``cell.recur``
    (:func:`autodiff_step`) for the shapes of ``p``, ``state``, ``xp``."""
    return cell.lean if cell.lean is not None else autodiff_step(cell, p, state, xp)


# What an autodiff-made step stores per step: the outputs of these primitives (transcendental
# functions, matmuls, divisions: costly to recompute); the backward recomputes every other
# residual (cheap element-wise arithmetic) from them, fused into the ops that use it.
_SAVED_PRIMITIVES = frozenset(("tanh", "logistic", "exp", "exp2", "expm1", "log", "log1p", "sin",
                               "cos", "erf", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow",
                               "div", "dot_general", "reduce_sum", "reduce_max", "reduce_min",
                               "cumsum", "sort"))


def _saved(prim, *_, **__) -> bool:
    return prim.name in _SAVED_PRIMITIVES


def _recur_vjp(cell, p, state, xp, t):
    def f(s, x):
        new, h, _ = cell.recur(p, s, x, t)
        return new, h
    # called inside the time scans only (no CSE across steps to prevent)
    f = jax.checkpoint(f, policy=_saved, prevent_cse=False)
    new, pull, h = jax.vjp(f, state, xp, has_aux=True)
    leaves, tree = jax.tree_util.tree_flatten(pull)
    return new, h, leaves, tree


def _literal(v) -> bool:
    return isinstance(v, jax.extend.core.Literal)


def _depends(jaxpr, flagged) -> dict:
    """``{var: bool}`` for every variable of ``jaxpr``: whether it depends on one of the
    ``flagged`` variables (data flow through every equation; an equation's outputs depend on
    all its inputs)."""
    dep = dict.fromkeys(flagged, True)
    for eqn in jaxpr.eqns:
        d = any(dep.get(v, False) for v in eqn.invars if not _literal(v))
        dep.update((o, d) for o in eqn.outvars)
    return dep


def _varying(jaxpr, inputs) -> list:
    """Per output of ``jaxpr``: whether it depends on an input flagged in ``inputs``."""
    dep = _depends(jaxpr, [v for v, f in zip(jaxpr.invars, inputs) if f])
    return [not _literal(v) and dep.get(v, False) for v in jaxpr.outvars]


def autodiff_step(cell: Cell, p, state, xp) -> Lean:
    r"""A :class:`~gradflow.cells.base.Lean` step for any cell, from autodiff of
    ``cell.recur``: the forward is ``jax.vjp`` of the step w.r.t. ``(state, xp_t)`` (parameters
    constant), its factors the pullback's residuals that depend on the step's inputs; the
    backward rebuilds the pullback from them and the residuals that depend on the parameters
    only (the transposed recurrent matrix, ...: recomputed from ``p``, loop-invariant, so XLA
    computes them once per layer). The step is differentiated under ``jax.checkpoint`` with a
    policy that saves only the outputs of costly primitives (``tanh``, ``logistic``, matmuls,
    ...: ``_SAVED_PRIMITIVES``) and recomputes cheap element-wise residuals in the backward,
    fused into their users: a user's GRU stores 5 arrays per step instead of 9 (forward 16 ops
    per step instead of 20), UR-LSTM 8 instead of 17. So every cell, a user's too, runs
    :func:`lean_layers` with its factors in the run's one buffer; the numbers are autodiff's.
    Made once per cell and shapes of ``p``, ``state``, ``xp`` (arrays or
    ``ShapeDtypeStruct``s)."""
    return _autodiff_step(cell, *_shapes(p, state, xp))


def _shapes(*trees) -> tuple:
    """``(treedef, ((shape, dtype), ...))`` of ``trees``: a hashable key for the per-cell
    caches (arrays or ``ShapeDtypeStruct``s alike)."""
    leaves, tree = jax.tree_util.tree_flatten(trees)
    return tree, tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in leaves)


@functools.lru_cache(maxsize=256)
def _autodiff_step(cell: Cell, tree, avals) -> Lean:
    p_like, s_like, x_like = jax.tree_util.tree_unflatten(
        tree, [jax.ShapeDtypeStruct(*a) for a in avals])
    t0 = jax.ShapeDtypeStruct((), jnp.int32)
    closed = jax.make_jaxpr(lambda p, s, x, t: _recur_vjp(cell, p, s, x, t)[2])(
        p_like, s_like, x_like, t0)
    n_p = len(jax.tree_util.tree_leaves(p_like))
    varying = _varying(closed.jaxpr, [False] * n_p + [True] * (len(closed.jaxpr.invars) - n_p))

    def forward(p, state, xp, t):
        new, h, leaves, _ = _recur_vjp(cell, p, state, xp, t)
        return new, h, [a for a, v in zip(leaves, varying) if v]

    def backward(p, factors, d):
        zeros = lambda tree: jax.tree_util.tree_map(  # noqa: E731
            lambda a: jnp.zeros(a.shape, a.dtype), tree)
        _, _, fixed, tree = _recur_vjp(cell, p, zeros(s_like), zeros(x_like),
                                       jnp.zeros((), jnp.int32))
        it = iter(factors)
        leaves = [next(it) if v else a for a, v in zip(fixed, varying)]
        return jax.tree_util.tree_unflatten(tree, leaves)(d)

    return Lean(forward, backward)


# Primitives through which a step's input-only values stay linear (affine) in the input: the
# part of a step that :func:`hoist_inputs` moves out of the time loop.
_LINEAR_PRIMITIVES = frozenset(("dot_general", "add", "add_any", "sub", "neg", "mul", "reshape",
                                "squeeze", "expand_dims", "broadcast_in_dim", "slice", "split",
                                "concatenate", "transpose", "convert_element_type", "copy",
                                "reduce_sum", "pad", "rev"))


def hoist_inputs(cell: Cell, p, state, xp) -> Cell:
    r"""``cell`` with the input-only linear part of its step moved into its projection.

    A cell without a projection of its own (an adapter or :func:`~gradflow.cells.from_function`
    cell: its step computes ``x W + b`` itself) runs an input matmul per step, in the forward
    and in the backward; a built-in cell projects the whole sequence in one. Here the step's
    jaxpr (traced once per cell and shapes of ``p``, ``state``, ``xp = cell.project(p, x_t)``)
    is split: the equations that read only the parameters and the input, through linear
    operations (``_LINEAR_PRIMITIVES``: matmuls, sums, reshapes, slices, ...; a product of two
    input-dependent values, or any nonlinearity, stays in the step) up to the last matmul on
    each path become the new projection, run for all steps at once; the rest is the new
    ``recur``, reading their values (so a bias added after ``x W``, or a split of it into
    gates, runs in the step, fused into its first element-wise operation, not as a pass over
    the whole sequence). Linear, so the projection's transpose in :func:`lean_layers`'
    backward is one matmul per layer without recomputing its forward. The numbers are the
    cell's own. Returns ``cell`` itself when nothing is to be moved (e.g. every built-in
    cell)."""
    # the jaxpr keeps the precision its matmuls were traced with, and the mesh it was traced
    # in (inside ``shard_map`` its values' types name the manual axes: a sweep's seeds
    # over 2 devices, then over 1): one entry per setting and mesh
    return _hoisted(cell, *_shapes(p, state, xp), jax.config.jax_default_matmul_precision,
                    jax.sharding.get_abstract_mesh())


@functools.lru_cache(maxsize=256)
def _hoisted(cell: Cell, tree, avals, precision, mesh) -> Cell:
    p_like, s_like, x_like = jax.tree_util.tree_unflatten(
        tree, [jax.ShapeDtypeStruct(*a) for a in avals])
    closed, out_shape = jax.make_jaxpr(cell.recur, return_shape=True)(
        p_like, s_like, x_like, jax.ShapeDtypeStruct((), jnp.int32))
    jaxpr = closed.jaxpr
    n_p, n_s = len(jax.tree_util.tree_leaves(p_like)), len(jax.tree_util.tree_leaves(s_like))
    p_in, s_in = jaxpr.invars[:n_p], jaxpr.invars[n_p:n_p + n_s]
    x_in, t_in = jaxpr.invars[n_p + n_s:-1], jaxpr.invars[-1]
    recurrent = _depends(jaxpr, (*s_in, t_in))  # depends on the state or the step
    from_x = _depends(jaxpr, x_in)               # depends on the input
    ready = set(p_in) | set(x_in) | set(jaxpr.constvars)  # computable in the projection
    kinds = []
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if not _literal(v)]
        r = any(recurrent.get(v, False) for v in ins)
        xs = [from_x.get(v, False) for v in ins]
        linear = eqn.primitive.name in _LINEAR_PRIMITIVES and (
            eqn.primitive.name not in ("mul", "dot_general") or sum(xs) <= 1)
        if not r and not any(xs):
            kind = "params"
        elif not r and linear and all(v in ready for v in ins):
            kind = "hoist"
        else:
            kind = "step"
        kinds.append(kind)
        if kind != "step":
            ready.update(eqn.outvars)
    # What follows the input matmuls only in the step (a bias added, a split into gates)
    # stays there, where it fuses into the step's first element-wise operation: in the
    # projection it would be a pass of its own over the layer's whole sequence.
    users = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not _literal(v):
                users.setdefault(v, []).append(i)
    for i in reversed(range(len(kinds))):
        eqn = jaxpr.eqns[i]
        if kinds[i] == "hoist" and eqn.primitive.name != "dot_general" and all(
                kinds[j] == "step" for o in eqn.outvars for j in users.get(o, ())):
            kinds[i] = "step"
    if "hoist" not in kinds:
        return cell
    hoisted = {o for e, k in zip(jaxpr.eqns, kinds) if k == "hoist" for o in e.outvars}
    crossing = set(hoisted) | set(x_in)
    used = [v for e, k in zip(jaxpr.eqns, kinds) if k == "step" for v in e.invars] + [
        v for v in jaxpr.outvars]
    boundary = list(dict.fromkeys(v for v in used if not _literal(v) and v in crossing))
    core = jax.extend.core

    def part(name, invars, outvars, keep):
        # the traced jaxpr's own DebugInfo, renamed (``jax.extend.core.DebugInfo`` is public
        # only since JAX 0.10; the NamedTuple's ``_replace`` works in every supported version)
        info = jaxpr.debug_info._replace(traced_for=name, func_src_info=f"{name} of {cell.name}",
                                         arg_names=None, result_paths=None)
        return core.jaxpr_as_fun(core.ClosedJaxpr(core.Jaxpr(
            jaxpr.constvars, invars, outvars, [e for e, k in zip(jaxpr.eqns, kinds) if k != keep],
            jaxpr.effects, info), closed.consts))

    project_j = part("hoisted_projection", [*p_in, *x_in], boundary, "step")
    step_j = part("hoisted_step", [*p_in, *s_in, *boundary, t_in], jaxpr.outvars, "hoist")
    out_tree = jax.tree_util.tree_structure(out_shape)

    def project(params, x):
        leaves = jax.tree_util.tree_leaves(params)
        xp = jax.tree_util.tree_leaves(cell.project(params, x))
        return tuple(jax.vmap(lambda *xp_t: project_j(*leaves, *xp_t))(*xp))

    def recur(params, state, xp, t):
        outs = step_j(*jax.tree_util.tree_leaves(params), *jax.tree_util.tree_leaves(state),
                      *xp, t)
        return jax.tree_util.tree_unflatten(out_tree, outs)

    return dataclasses.replace(cell, project_fn=project, recur_fn=recur)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def lean_layers(cell: Cell, residual: bool, norm: str | None, precision: str | None, P, pn, x,
                s0: dict, perturb: dict, taps: dict):
    r"""A run of layers of one cell and shape (:meth:`Stack.segments`), each a time scan of
    a :class:`~gradflow.cells.base.Lean` step (:func:`step_rule`: the cell's own, or
    :func:`autodiff_step` for any cell, after :func:`hoist_inputs` moved its input-only linear
    work out of the loop), with a hand-written backward: per layer, top down, a reverse scan
    of the step's ``backward`` over the factors the forward stored.

    Forward, layer by layer: :math:`s_t = \mathrm{forward}(p, s_{t-1}, xp_t, t) + e_t`
    (perturbations added where the state leaves the cell; ``taps`` are identities, as
    :func:`norm_tap`), from the layer's input ``xp = lean_inputs(cell, p, x)``, emitting
    ``emit(h, x)`` (residual, norm) to the next layer. Every step's factors go straight into
    ONE buffer for the whole run, ``(layers * T, *factor)``, carried through both scans:
    per-layer factor arrays stacked over depth by the scan's autodiff cost a zero-filled
    ``(L, T, ...)`` copy in and a copy out per layer (LSTM: 6H floats per example and step),
    and this memory traffic is what the batch split's devices compete for (the split hidden
    map 0.88-0.90 of that time, LSTM 16 x 64 x 128 x 32 on 2 cores; GRU 0.91, STAR 0.97).

    Backward, for the cotangent :math:`\bar s_t` of each leaving state (from the outputs
    and step ``t + 1``; ``h`` also from the layer above, through ``emit``'s VJP):
    ``perturb[k][t]`` gets :math:`\bar s_t[k]`, ``taps[k][t]`` its per-example norm
    (:func:`safe_norm`, all steps at once after the scan), :math:`(\bar s_{t-1},
    \overline{xp}_t) = \mathrm{backward}(p, \mathrm{factors}_t, \bar s_t)`; the stacked
    :math:`\overline{xp}` goes through the input projection's transpose as one matmul per
    layer (autodiff of :func:`lean_inputs`), except in the run's first layer where the
    caller does not differentiate ``x`` (a map of the stack's inputs: that matmul is not
    formed, ``x`` gets zeros). ``P`` gets zeros: the caller holds the cell
    parameters constant (``Stack.apply(constant_params=True)`` wraps them in
    ``lax.stop_gradient``); the norm's ``pn`` get their true cotangents.

    Args:
      cell: any cell; residual, norm, precision: the stack's settings for this run (the
        backward traces its matmuls in the forward's :func:`precision_scope`, wherever the
        caller differentiates);
      P: the run's cell parameters with a leading layer axis ``n``; pn: its norm parameters
        (leading axis ``n``) or None; x: ``(T, B, in)``, the first layer's input;
      s0: ``{name: (n, B, H)}``; perturb: ``{name: (n, T, B, H)}``; taps: ``{name: (n, T, B)}``.
    Returns:
      ``(states {name: (n, T, B, H)}, emitted (n, T, B, H), final {name: (n, B, H)})``.
    """
    return _lean_fwd(cell, residual, norm, precision, P, pn, x, s0, perturb, taps)[0]


def _index(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _run_rule(cell, P, x, state):
    """``(cell, rule, xp0)`` of a run, for its first layer's shapes (the forward and the
    backward each ask): the cell its steps use (``cell`` where it has a hand-written step, else
    with its input-only work moved out of the time loop, :func:`hoist_inputs`), its step rule
    (:func:`step_rule`) and the shape of one step's projected input."""
    p0 = _index(P, 0)
    if cell.lean is None:
        cell = hoist_inputs(cell, p0, state,
                            jax.eval_shape(lambda: _index(cell.project(p0, x), 0)))
    xp0 = jax.eval_shape(lambda: _index(lean_inputs(cell, p0, x), 0))
    return cell, step_rule(cell, p0, state, xp0), xp0


def _over_layers(layer, carry, xs, reverse=False):
    """``lax.scan(layer, carry, xs)`` over a run's layers; a run of one layer is called
    directly (the first layer's input may be narrower or wider than what it emits)."""
    if jax.tree_util.tree_leaves(xs)[0].shape[0] > 1:
        return lax.scan(layer, carry, xs, reverse=reverse)
    carry, out = layer(carry, _index(xs, 0))
    return carry, jax.tree_util.tree_map(lambda a: a[None], out)


def _lean_fwd(cell, residual, norm, precision, P, pn, x, s0, perturb, taps):
    with precision_scope(precision):
        return _lean_fwd_traced(cell, residual, norm, P, pn, x, s0, perturb, taps)


def _lean_fwd_rule(cell, residual, norm, precision, *args):
    """:func:`lean_layers`' forward rule (``symbolic_zeros``: each argument leaf says whether
    the caller differentiates it). Whether the run's input ``x`` is differentiated travels to
    the backward in the residuals' tree structure (``()`` yes, ``None`` no): a map of the
    stack's raw inputs leaves it undifferentiated, and the first layer's input cotangent, one
    ``(T, B, G H) x (G H, D)`` matmul, is then not formed."""
    P, pn, x, s0, perturb, taps = custom_vjp_primal_tree_values(args)
    need_dx = any(a.perturbed for a in jax.tree_util.tree_leaves(args[2]))
    out, res = _lean_fwd(cell, residual, norm, precision, P, pn, x, s0, perturb, taps)
    return out, (res, () if need_dx else None)


def _lean_fwd_traced(cell, residual, norm, P, pn, x, s0, perturb, taps):
    T = x.shape[0]
    n = jax.tree_util.tree_leaves(P)[0].shape[0]
    p0, s00 = _index(P, 0), _index(s0, 0)
    cell, lean, xp0 = _run_rule(cell, P, x, s00)
    factor = jax.eval_shape(lambda xp: lean.forward(p0, s00, xp, jnp.zeros((), jnp.int32))[2],
                            xp0)
    buf0 = jax.tree_util.tree_map(lambda a: jnp.zeros((n * T,) + a.shape, a.dtype), factor)

    def layer(carry, inp):
        xx, buf = carry
        p, pnl, s0_l, e_l, l = inp

        def step(carry, inp):
            state, buf = carry
            xp_t, e_t, t = inp
            new, _, f = lean.forward(p, state, xp_t, t)
            new = {k: v + e_t[k] if k in e_t else v for k, v in new.items()}
            buf = jax.tree_util.tree_map(
                lambda b, a: lax.dynamic_update_index_in_dim(b, a, l * T + t, 0), buf, f)
            return (new, buf), new

        (final, buf), states = lax.scan(step, (s0_l, buf),
                                        (lean_inputs(cell, p, xx), e_l, jnp.arange(T)))
        up = emit(states["h"], xx, pnl, residual, norm)
        return (up, buf), (states, up, final)

    (_, buf), (states, up, final) = _over_layers(layer, (x, buf0),
                                                 (P, pn, s0, perturb, jnp.arange(n)))
    return (states, up, final), (P, pn, x, states["h"], up, buf, perturb, taps)


def _lean_bwd(cell, residual, norm, precision, res, cts):
    res, need_dx = res
    cts = jax.tree_util.tree_map(  # the outputs nobody reads have symbolic zero cotangents
        lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c, cts)
    with precision_scope(precision):
        return _lean_bwd_traced(cell, residual, norm, res, cts, need_dx is not None)


def _lean_bwd_traced(cell, residual, norm, res, cts, need_dx=True):
    P, pn, x, hs, up, buf, perturb, taps = res
    d_states, d_up, d_final = cts
    T, n = x.shape[0], hs.shape[0]
    keep = set(perturb) | set(taps)
    cell, lean, _ = _run_rule(cell, P, x, _index(d_final, 0))

    def layer(d_above, inp):  # d_above: the layer above's input cotangent (its own emission)
        p, pnl, ds_l, dup_l, dfin_l, l = inp
        # this layer's input: x for the run's first layer, the emission below otherwise
        # (read only where the backward needs its values: a norm's VJP)
        xx = x if n == 1 else jnp.where(l > 0, up[jnp.maximum(l - 1, 0)], x)
        _, emit_vjp = jax.vjp(lambda h, xx, pnl: emit(h, xx, pnl, residual, norm),
                              hs[l], xx, pnl)
        dh, dx_emit, dpn = emit_vjp(dup_l + d_above)
        ds_l = {**ds_l, "h": ds_l["h"] + dh}

        def step(d_next, inp):
            ds_t, t = inp
            d = {k: d_next[k] + ds_t[k] for k in d_next}  # the leaving state's whole cotangent
            f_t = jax.tree_util.tree_map(lambda b: b[l * T + t], buf)
            d_prev, d_xp = lean.backward(p, f_t, d)
            return d_prev, (d_xp, {k: d[k] for k in keep})

        d_s0, (d_xin, d_s) = lax.scan(step, dfin_l, (ds_l, jnp.arange(T)), reverse=True)

        def input_cotangent(d_xin, dx_emit):
            (dx,) = jax.vjp(lambda xx: lean_inputs(cell, p, xx), xx)[1](d_xin)
            return dx + dx_emit

        if need_dx:
            dx = input_cotangent(d_xin, dx_emit)
        elif n == 1:
            dx = jnp.zeros_like(x)
        else:  # the first layer's input cotangent is not needed
            dx = lax.cond(l > 0, input_cotangent, lambda *_: jnp.zeros_like(x), d_xin, dx_emit)
        # the norms of all steps at once, after the scan (fewer ops per step)
        d_taps = {k: safe_norm(d_s[k]).astype(taps[k].dtype) for k in taps}
        return dx, (d_s0, {k: d_s[k] for k in perturb}, d_taps, dpn)

    dx, (d_s0, d_perturb, d_taps, d_pn) = _over_layers(
        layer, jnp.zeros_like(d_up[0]), (P, pn, d_states, d_up, d_final, jnp.arange(n)),
        reverse=True)
    return jax.tree_util.tree_map(jnp.zeros_like, P), d_pn, dx, d_s0, d_perturb, d_taps


lean_layers.defvjp(_lean_fwd_rule, _lean_bwd, symbolic_zeros=True)


def _layer(cell: Cell, p, x, s0, inst: Instruments, chunk):
    """One layer over a whole sequence, autodiff of ``cell.recur`` (runs of lean layers go
    through :func:`lean_layers` instead).

    Args:
      x: ``(T, B, in)``; s0: ``{name: (B, H)}``; inst: this layer's :class:`Instruments`
        (``perturb {name: (T, B, H)}``, ``taps {name: (T, B)}``, ``param_taps (T,)`` or None).
    Returns:
      ``(states {name: (T, B, H)}, gates {g: (T, B, H)}, final {name: (B, H)})``.
    """
    T = x.shape[0]
    if inst.param_taps is None:
        xin = cell.project(p, x)  # the whole sequence's input side: one matmul

        def step(state, xp_t, _, t):
            return cell.recur(p, state, xp_t, t)
    else:  # each step its own tapped copy of the parameters, for its input side too
        xin = x

        def step(state, x_t, ptap_t, t):
            return cell.step(mean_abs_tap(p, ptap_t), state, x_t, t)

    def body(state, inp):
        xin_t, e_t, tap_t, ptap_t, t = inp
        new, _, g = step(state, xin_t, ptap_t, t)
        new = _leave(new, e_t, tap_t)
        return new, (new, g if inst.gates else {})

    final, (states, gts) = _scan(body, s0, (xin, inst.perturb, inst.taps, inst.param_taps,
                                            jnp.arange(T)), T, chunk)
    return states, gts, final


def _wavefront(stack: "Stack", P, PN, x, s0, inst: Instruments, chunk):
    """All layers at once along anti-diagonals; ``P`` (and the norms ``PN``) have a leading
    layer axis.

    Args:
      x: ``(T, B, H)`` layer-0 inputs; s0: ``{name: (L, B, H)}``; inst: :class:`Instruments`
        with a leading layer axis.
    Returns:
      ``(states, up, gates, final)`` as :meth:`Stack._layerwise`, with a leading layer axis.
    """
    cell = stack.cells[0]
    T = x.shape[0]
    L = jax.tree_util.tree_leaves(P)[0].shape[0]
    S = T + L - 1
    lidx = jnp.arange(L)
    x_pad = jnp.concatenate([x, jnp.zeros((L - 1,) + x.shape[1:], x.dtype)])  # (S, B, H)
    step = jax.vmap(cell.step, in_axes=(0, 0, 0, 0))
    emit_all = jax.vmap(lambda h, xx, pn: emit(h, xx, pn, stack.residual, stack.norm))
    ptap = inst.param_taps

    def body(carry, inp):
        state, below = carry  # below: (L, B, H), what each layer emitted at the last step
        x_s, s = inp
        t = s - lidx
        active = (t >= 0) & (t < T)
        tc = jnp.clip(t, 0, T - 1)
        inputs = jnp.concatenate([x_s[None], below[:-1]])
        Pt = P if ptap is None else mean_abs_tap(P, ptap[lidx, tc])
        new, _, g = step(Pt, state, inputs, t)
        new = _leave(new, {k: v[lidx, tc] for k, v in inst.perturb.items()},
                     {k: v[lidx, tc] for k, v in inst.taps.items()})
        mask = active[:, None, None]
        new = {k: jnp.where(mask, v, state[k]) for k, v in new.items()}
        up = emit_all(new["h"], inputs, PN)
        return (new, up), (new, up, g if inst.gates else {})

    h0 = jnp.zeros_like(s0["h"])
    (final, _), (states, up, gts) = _scan(body, (s0, h0), (x_pad, jnp.arange(S)), S, chunk)
    # states[s, l] holds layer l at step s - l: gather the diagonal back to [l, t].
    tt = jnp.arange(T)[None, :] + lidx[:, None]
    gather = lambda a: a[tt, lidx[:, None]]  # noqa: E731  (S, L, ...) -> (L, T, ...)
    return ({k: gather(v) for k, v in states.items()}, gather(up),
            {k: gather(v) for k, v in gts.items()}, final)

