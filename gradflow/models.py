"""Models a :class:`gradflow.Stack` does not express, built from other frameworks' weights as
model functions for :func:`gradflow.model_map` and :func:`gradflow.model_jacobian_map`.

:func:`torch_model`: a PyTorch ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``, bidirectional too (each
layer runs forward and back in time and passes both directions' states up, concatenated),
its directions tapped one row each. One-directional modules a Stack measures with every
measurement (:func:`gradflow.from_torch`); this form gives the maps of both kinds.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow.cells import pytorch
from gradflow.checks import float_dtype
from gradflow.jacobian import tap


class TorchModel(NamedTuple):
    """What :func:`torch_model` built: ``model(params, xs, taps) -> (B, T, K)`` and its
    ``params``, ``layers`` (the rows of its maps: ``2 L`` for a bidirectional model, layer
    ``l``'s forward direction at row ``2 l``, its reverse one at ``2 l + 1``), each row's
    label (``"l0 fwd"``, ``"l0 bwd"``), the weights' ``source`` in words, and for
    :func:`gradflow.gates.model_saturation` ``gates(params, xs) -> {gate: (rows, B, T, H)}``
    with the cell's gate ``kinds`` and ``retain`` signs; ``input_size``, the ``D`` of the
    ``(B, T, D)`` inputs it reads."""
    model: Callable
    params: list
    layers: int
    rows: tuple
    source: str
    gates: Callable
    kinds: dict
    retain: dict
    input_size: int

    @property
    def bidirectional(self) -> bool:
        """Whether each layer also runs back in time (rows ``"l0 fwd"``, ``"l0 bwd"``, ...)."""
        return self.rows[-1].endswith("bwd")

    def reaches(self, loss, steps: int) -> np.ndarray:
        """The ``(layers, steps)`` rows and steps that ``loss`` (``"last"`` or ``"all"``)
        reaches, for :func:`gradflow.model_map`'s ``reaches=``: every one, but for
        ``"last"`` the top layer's reverse direction before the last step (that direction
        runs from the last step back, and only its state at the last step is read)."""
        mask = np.ones((self.layers, steps), bool)
        if loss == "last" and self.bidirectional:
            mask[-1, :-1] = False
        return mask


def torch_model(model, *, prefix: str | None = None, nonlinearity: str | None = None,
                dtype=None) -> TorchModel:
    r"""A PyTorch recurrent model as a model function for :func:`gradflow.model_map`.

    Each layer is gradflow's cell of the same equations (:mod:`gradflow.cells.pytorch` reads
    the weights, as :func:`gradflow.from_torch` does) run by ``lax.scan``; a bidirectional
    layer runs its reverse direction from the last step back and emits
    :math:`[\overrightarrow{h}_t, \overleftarrow{h}_t]`, which the layer above reads, as
    PyTorch's does; an LSTM with ``proj_size = P`` projects its state,
    :math:`h_t = W_{hr} (o_t \odot \tanh c_t)`, ``P`` wide (the memory ``c`` keeps ``H``).
    Every direction's state is tapped where it is carried to its next step and up, so row
    ``(l, direction)`` of a map holds
    :math:`\mathrm{mean}_b \|\partial\mathcal L / \partial h^{l,d}_t[b]\|`. The model returns the
    top layer's outputs, ``(B, T, H)`` or ``(B, T, 2H)``.

    Args:
      model, prefix, nonlinearity: as :func:`gradflow.from_torch` (a module, a model holding
        one, a state dict, or a list of one per layer).
      dtype: the params' dtype; default the weights' (float32 where 64-bit JAX is off).
    Returns:
      A :class:`TorchModel`: ``gradflow.model_map(t.model, t.params, xs, layers=t.layers,
      reaches=t.reaches(loss, T))`` (a bidirectional model's top reverse row is 0 by
      construction before the last step under loss ``last``: not underflow),
      ``gradflow.gates.model_saturation(t.gates, t.params, xs, kinds=t.kinds,
      retain=t.retain)``.

    Example::

      >>> rng = np.random.default_rng(0)
      >>> sd = {"weight_ih_l0": rng.normal(size=(12, 3)), "weight_hh_l0": rng.normal(size=(12, 4)),
      ...       "weight_ih_l0_reverse": rng.normal(size=(12, 3)),
      ...       "weight_hh_l0_reverse": rng.normal(size=(12, 4))}  # a bidirectional GRU layer
      >>> t = gradflow.torch_model(sd)
      >>> t.layers, t.rows, t.source
      (2, ('l0 fwd', 'l0 bwd'), 'torch state dict, 1 layer, bidirectional')
      >>> res = gradflow.model_map(t.model, t.params, rng.normal(size=(2, 5, 3)),
      ...                          layers=t.layers, reaches=t.reaches("last", 5))
      >>> res.values.shape, res.underflow["values"]
      ((2, 5), 0)
    """
    dt = None if dtype is None else float_dtype(dtype)  # (float64 without 64-bit JAX: refused)
    read = pytorch.read(model, prefix=prefix, nonlinearity=nonlinearity, both=True,
                        who="torch_model")
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, read.dtype if dtype is None else dt), read.layers)
    cell, both = read.cell, len(read.layers[0]) == 2
    names = ("fwd", "bwd") if both else ("",)
    rows = tuple(f"l{l} {d}".strip() for l in range(len(params)) for d in names)

    def run(p, x, taps, H, reverse):
        """One direction of one layer: ``x (T, B, D)``, ``taps (T, ...)`` -> its states and
        gates, each ``(T, B, H)``."""
        proj = p.get("proj")  # an LSTM's projection: h = (o * tanh(c)) W_hr^T, P wide
        p = {k: v for k, v in p.items() if k != "proj"}

        def step(state, inp):
            x_t, tap_t, t = inp
            new, h, gates = cell.step(p, state, x_t, t)
            if proj is not None:
                h = h @ proj
            h = tap(h, tap_t)  # the state as it goes on to the next step and up
            return {**new, "h": h}, (h, gates)

        s0 = cell.initial_state((x.shape[1],), H, x.dtype)
        if proj is not None:  # the memory c keeps the cell's width
            s0 = {**cell.initial_state((x.shape[1],), proj.shape[0], x.dtype), "h": s0["h"]}
        return lax.scan(step, s0, (x, taps, jnp.arange(x.shape[0])), reverse=reverse)[1]

    def forward(p, xs, taps):
        """The top layer's outputs ``(B, T, K)`` and every row's gates ``[{gate: (T, B, H)}]``."""
        x = jnp.swapaxes(xs, 0, 1)  # (T, B, D): time first for the scans
        row, gates = 0, []
        for l, dirs in enumerate(p):
            outs = []
            for d, pd in enumerate(dirs):
                h, g = run(pd, x, taps[row], read.hidden_size[l], reverse=d == 1)
                outs.append(h)
                gates.append(g)
                row += 1
            x = jnp.concatenate(outs, -1) if both else outs[0]
        return jnp.swapaxes(x, 0, 1), gates

    def fn(p, xs, taps):
        return forward(p, xs, taps)[0]

    def gates_fn(p, xs):
        B, T = xs.shape[:2]
        rows_gates = forward(p, xs, jnp.zeros((len(rows), T, B), xs.dtype))[1]
        return {g: jnp.stack([jnp.swapaxes(r[g], 0, 1) for r in rows_gates])
                for g in cell.gate_names}

    # what a result's config names (model_map's, model_saturation's "model")
    fn.__name__ = fn.__qualname__ = gates_fn.__name__ = gates_fn.__qualname__ = (
        f"torch_{cell.name}")
    return TorchModel(fn, params, len(rows), rows, read.source, gates_fn, cell.kinds,
                      dict(cell.retain), read.input_size)


__all__ = ["TorchModel", "torch_model"]
