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

``perturb`` adds arrays to the state as it leaves each cell; the gradient w.r.t. a zero
perturbation is the total derivative of a loss w.r.t. that state (one backward pass gives the
whole ``[layer, time]`` map); ``taps`` do the same for the gradient's per-example norm only
(:func:`norm_tap`), reduced step by step inside the backward pass. ``checkpoint=C``
rematerialises the time scan in chunks of ``C`` steps and each layer as a whole
(``jax.checkpoint``), so the residuals kept for the backward pass are the layers' inputs plus
``T/C + C`` steps of one layer instead of every intermediate of every step.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gradflow import cells as _cells
from gradflow.cells.base import Cell

ORDERS = ("layer", "wavefront")


class StackOutput(NamedTuple):
    """What a stack computes.

    Attributes:
      states: ``{name: (L, B, T, H)}``: every layer's state after every step (``"h"`` is the
        output, ``"c"`` the memory of LSTM-type cells), perturbations included.
      gates: ``{gate: (L, B, T, H)}``: reported gate activations (empty unless requested).
      final: ``{name: (L, B, H)}``: the state after the last step.
    """

    states: dict
    gates: dict
    final: dict

    @property
    def h(self):
        """``(L, B, T, H)`` hidden outputs."""
        return self.states["h"]

    @property
    def top(self):
        """``(B, T, H)`` outputs of the top layer."""
        return self.states["h"][-1]


def _positive_int(name, value) -> int:
    """``int(value)`` if it is a positive integer (not a bool), else a ValueError naming it."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return v


@dataclasses.dataclass(frozen=True)
class Stack:
    """``layers`` recurrent cells stacked over ``input_size``-dim data, ``hidden_size`` wide.

    Args:
      cell: a :class:`gradflow.cells.Cell` or a registered name (see ``gradflow.cells.names()``).
      layers: ``L >= 1``.
      input_size: ``D``, the data's feature size.
      hidden_size: ``H``.
      input_projection: map the data linearly to ``H`` before layer 0
        (``params["input"] = {"W": (D, H), "b": (H,)}``). Default: only when the cell needs
        ``in == H`` (refined gates) and ``D != H``.
      order: ``"layer"`` (default) or ``"wavefront"`` (see the module docstring).
      checkpoint: ``None`` (no rematerialisation), a chunk length ``C``, or ``"auto"``
        (``C = ceil(sqrt(T))``).
      options: cell options when ``cell`` is a name.

    Example::

      >>> stack = gradflow.Stack("lstm", layers=4, input_size=3, hidden_size=16)
      >>> params = stack.init(jax.random.key(0))
      >>> out = stack.apply(params, jnp.ones((2, 10, 3)))
      >>> out.h.shape
      (4, 2, 10, 16)
    """

    cell: Cell
    layers: int
    input_size: int
    hidden_size: int
    input_projection: bool | None = None
    order: str = "layer"
    checkpoint: int | str | None = None

    def __init__(self, cell, layers: int = 1, input_size: int = 1, hidden_size: int = 32, *,
                 input_projection: bool | None = None, order: str = "layer",
                 checkpoint=None, **options):
        cell = _cells.get(cell, **options)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("cell", cell)
        set_("layers", _positive_int("layers", layers))
        set_("input_size", _positive_int("input_size", input_size))
        set_("hidden_size", _positive_int("hidden_size", hidden_size))
        if input_projection is None:
            input_projection = cell.square and input_size != hidden_size
        elif cell.square and input_size != hidden_size and not input_projection:
            raise ValueError(
                f"cell {cell.name!r} needs its input size to equal hidden_size ({hidden_size}); "
                f"the data has {input_size} features: use input_projection=True")
        set_("input_projection", bool(input_projection))
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
        set_("order", order)
        if checkpoint not in (None, "auto"):
            checkpoint = _positive_int("checkpoint", checkpoint)
        set_("checkpoint", checkpoint)
        if order == "wavefront" and not self.uniform:
            raise ValueError("order='wavefront' needs every layer to read H features: use "
                             "input_projection=True or input_size == hidden_size")

    @property
    def uniform(self) -> bool:
        """True when every layer reads ``H`` features (so the layers share one shape)."""
        return self.input_projection or self.input_size == self.hidden_size

    @property
    def config(self) -> dict:
        """JSON-able description: the cell's config plus the stack's sizes."""
        return {**self.cell.config, "layers": self.layers, "input_size": self.input_size,
                "hidden_size": self.hidden_size, "input_projection": self.input_projection,
                "order": self.order, "checkpoint": self.checkpoint}

    def replace(self, **changes) -> "Stack":
        """A copy with some fields changed (``cell`` may be a name)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw.update(changes)
        return Stack(kw.pop("cell"), **kw)

    # ------------------------------------------------------------------------------------------
    def init(self, key, dtype=jnp.float32) -> dict:
        """``{"layers": [per-layer cell params, bottom first], "input": {"W", "b"}?}``."""
        kin, klayers = jax.random.split(key)
        H, D = self.hidden_size, self.input_size
        first = H if self.input_projection else D
        keys = jax.random.split(klayers, self.layers)
        params = {"layers": [self.cell.init(k, first if l == 0 else H, H, dtype)
                             for l, k in enumerate(keys)]}
        if self.input_projection:
            params["input"] = {"W": jax.nn.initializers.orthogonal()(kin, (D, H), dtype),
                               "b": jnp.zeros((H,), dtype)}
        return params

    def initial_state(self, batch: int, dtype=jnp.float32) -> dict:
        """Zero state ``{name: (L, B, H)}``."""
        return {k: jnp.zeros((self.layers, batch, self.hidden_size), dtype)
                for k in self.cell.state_names}

    def check_inputs(self, xs):
        """Raise a ValueError unless ``xs`` is ``(B, T, input_size)``."""
        shape = getattr(xs, "shape", None)
        if shape is None or len(shape) != 3 or shape[-1] != self.input_size:
            raise ValueError(f"inputs must have shape (batch, steps, {self.input_size}), "
                             f"got {shape}")
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"inputs need at least one example and one step, got {shape}")

    def apply(self, params: dict, xs, *, state0: dict | None = None, perturb: dict | None = None,
              taps: dict | None = None, param_taps=None, gates: bool = False) -> StackOutput:
        r"""Run the stack over a batch of sequences.

        Args:
          params: from :meth:`init`.
          xs: ``(B, T, D)`` inputs, batch-major.
          state0: ``{name: (L, B, H)}`` initial states (zeros if None).
          perturb: ``{name: (L, B, T, H)}`` added to each state where it leaves its cell
            (keys a subset of ``cell.state_names``).
          taps: ``{name: (L, B, T)}`` (zeros): the gradient of a loss w.r.t. ``taps[name]`` is
            :math:`\|\partial\mathcal L/\partial s^l_t[b]\|_2` per layer, example and step
            (:func:`norm_tap`), at ``H`` times less memory than differentiating ``perturb``.
          param_taps: ``(L, T)`` (zeros): every step uses its own tapped copy of its layer's
            parameters (input projection included, so it runs step by step) and the gradient of
            a loss w.r.t. ``param_taps[l, t]`` is
            :math:`\mathrm{mean}_\theta|\partial\mathcal L/\partial\theta^l_{(t)}|`
            (:func:`mean_abs_tap`).
          gates: also return every reported gate activation.
        Returns:
          :class:`StackOutput` with ``(L, B, T, H)`` states and gates.
        """
        self.check_inputs(xs)
        dtype = jax.tree_util.tree_leaves(params["layers"][0])[0].dtype
        xs = jnp.asarray(xs, dtype)
        B, T, _ = xs.shape
        L = self.layers
        if state0 is None:
            state0 = self.initial_state(B, dtype)
        perturb, taps = dict(perturb or {}), dict(taps or {})
        for what, given in (("perturb", perturb), ("taps", taps)):
            unknown = set(given) - set(self.cell.state_names)
            if unknown:
                raise ValueError(f"{what} keys {sorted(unknown)} are not states of cell "
                                 f"{self.cell.name!r} ({', '.join(self.cell.state_names)})")
        x = jnp.swapaxes(xs, 0, 1)  # (T, B, D): time-major inside
        if self.input_projection:
            x = x @ params["input"]["W"] + params["input"]["b"]
        eps = {k: jnp.swapaxes(v, 1, 2) for k, v in perturb.items()}  # (L, T, B, H)
        tap = {k: jnp.swapaxes(v, 1, 2) for k, v in taps.items()}  # (L, T, B)
        if param_taps is not None and jnp.shape(param_taps) != (L, T):
            raise ValueError(f"param_taps must have shape (layers, steps) = {(L, T)}, got "
                             f"{jnp.shape(param_taps)}")
        chunk = self._chunk(T)
        if self.order == "wavefront":
            states, gts, final = _wavefront(self.cell, _stack_layers(params["layers"]), x,
                                            state0, eps, tap, param_taps, gates, chunk)
        else:
            states, gts, final = self._layerwise(params["layers"], x, state0, eps, tap,
                                                 param_taps, gates, chunk)
        t = lambda v: jnp.swapaxes(v, 1, 2)  # noqa: E731  (L, T, B, H) -> (L, B, T, H)
        return StackOutput({k: t(v) for k, v in states.items()},
                           {k: t(v) for k, v in gts.items()}, final)

    def _chunk(self, T):
        if self.checkpoint is None:
            return None
        if self.checkpoint == "auto":
            return max(1, math.ceil(math.sqrt(T)))
        return min(self.checkpoint, T)

    def _layerwise(self, layers, x, state0, eps, tap, ptap, gates, chunk):
        L = self.layers
        pick = lambda tree, l: jax.tree_util.tree_map(lambda a: a[l], tree)  # noqa: E731

        def run(p, xx, s0, e, tp, ptp):
            return _layer(self.cell, p, xx, s0, e, tp, ptp, gates, chunk)

        if chunk is not None:
            # Checkpointed: a layer keeps only its input for the backward pass and recomputes
            # the rest (its input projection, the chunk carries) when its turn comes.
            run = jax.checkpoint(run)
        outs = []
        start = 0
        if not self.uniform or L == 1:  # layer 0 has its own shape (or there is only one layer)
            outs.append(jax.tree_util.tree_map(lambda a: a[None], run(
                layers[0], x, pick(state0, 0), pick(eps, 0), pick(tap, 0), pick(ptap, 0))))
            x = outs[-1][0]["h"][0]
            start = 1
        if start < L:
            rest = slice(start, L)

            def body(xx, inp):
                p, s0, e, tp, ptp = inp
                states, gts, final = run(p, xx, s0, e, tp, ptp)
                return states["h"], (states, gts, final)

            sl = lambda tree: jax.tree_util.tree_map(lambda a: a[rest], tree)  # noqa: E731
            _, out = lax.scan(body, x, (_stack_layers(layers[start:]), sl(state0), sl(eps),
                                        sl(tap), sl(ptap)))
            outs.append(out)
        if len(outs) == 1:
            return outs[0]
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *outs)


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
    return g, jnp.sqrt(jnp.sum(g * g, axis=-1))


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
    leaves = jax.tree_util.tree_leaves(g)
    n = s.ndim
    total = sum(jnp.sum(jnp.abs(a), axis=tuple(range(n, a.ndim))) for a in leaves)
    count = sum(math.prod(a.shape[n:]) for a in leaves)
    return jax.tree_util.tree_map(jnp.zeros_like, g), (total / count).astype(s.dtype)


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


def _layer(cell: Cell, p, x, s0, eps, tap, ptap, gates: bool, chunk):
    """One layer over a whole sequence.

    Args:
      x: ``(T, B, in)``; s0: ``{name: (B, H)}``; eps: ``{name: (T, B, H)}`` and
      tap: ``{name: (T, B)}`` (subsets of the states); ptap: ``(T,)`` parameter taps or None.
    Returns:
      ``(states {name: (T, B, H)}, gates {g: (T, B, H)}, final {name: (B, H)})``.
    """
    T = x.shape[0]
    if ptap is None:
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
        return new, (new, g if gates else {})

    final, (states, gts) = _scan(body, s0, (xin, eps, tap, ptap, jnp.arange(T)), T, chunk)
    return states, gts, final


def _wavefront(cell: Cell, P, x, s0, eps, tap, ptap, gates: bool, chunk):
    """All layers at once along anti-diagonals; ``P`` has a leading layer axis.

    Args:
      x: ``(T, B, H)`` layer-0 inputs; s0: ``{name: (L, B, H)}``; eps: ``{name: (L, T, B, H)}``;
      tap: ``{name: (L, T, B)}``; ptap: ``(L, T)`` parameter taps or None.
    Returns:
      as :func:`_layer`, with a leading layer axis on every array.
    """
    T = x.shape[0]
    L = jax.tree_util.tree_leaves(P)[0].shape[0]
    S = T + L - 1
    lidx = jnp.arange(L)
    x_pad = jnp.concatenate([x, jnp.zeros((L - 1,) + x.shape[1:], x.dtype)])  # (S, B, H)
    step = jax.vmap(cell.step, in_axes=(0, 0, 0, 0))

    def body(carry, inp):
        state, below = carry  # below: (L, B, H), the outputs of each layer at the last step
        x_s, s = inp
        t = s - lidx
        active = (t >= 0) & (t < T)
        tc = jnp.clip(t, 0, T - 1)
        inputs = jnp.concatenate([x_s[None], below[:-1]])
        Pt = P if ptap is None else mean_abs_tap(P, ptap[lidx, tc])
        new, _, g = step(Pt, state, inputs, t)
        new = _leave(new, {k: v[lidx, tc] for k, v in eps.items()},
                     {k: v[lidx, tc] for k, v in tap.items()})
        mask = active[:, None, None]
        new = {k: jnp.where(mask, v, state[k]) for k, v in new.items()}
        return (new, new["h"]), (new, g if gates else {})

    h0 = jnp.zeros_like(s0["h"])
    (final, _), (states, gts) = _scan(body, (s0, h0), (x_pad, jnp.arange(S)), S, chunk)
    # states[s, l] holds layer l at step s - l: gather the diagonal back to [l, t].
    tt = jnp.arange(T)[None, :] + lidx[:, None]
    gather = lambda a: a[tt, lidx[:, None]]  # noqa: E731  (S, L, ...) -> (L, T, ...)
    return ({k: gather(v) for k, v in states.items()}, {k: gather(v) for k, v in gts.items()},
            final)
