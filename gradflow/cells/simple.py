"""Ungated cells: the vanilla tanh RNN and IndRNN."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gradflow.cells.base import (Cell, Lean, factory, fused_transpose, input_projection, matmul,
                                 packed_projection, parse_init, uniform, weight)
from gradflow.cells.mechanisms import standard_init


@factory
def rnn(*, init: str = "orthogonal") -> Cell:
    r"""Vanilla (Elman) RNN.

    .. math:: h_t = \tanh(W x_t + U h_{t-1} + b)

    Params: ``{"h": {"W": (in, H), "U": (H, H), "b": (H,)}}``. Reports no gates.

    Options: ``init`` (``orthogonal``, ``glorot``, ``torch``).

    Example::

      >>> cell = gradflow.cells.get("rnn")
      >>> p = cell.init(jax.random.key(0), 3, 8)
      >>> s = cell.initial_state((2,), 8)
      >>> s, h, gates = cell.step(p, s, jnp.ones((2, 3)), 0)
    """
    init_fn = standard_init({"h": {}}, init)

    def project(p, x):
        return input_projection(p, x, ("h",))

    def recur(p, state, xp, t):
        h = jnp.tanh(xp["h"] + matmul(state["h"], p["h"]["U"]))
        return {"h": h}, h, {}

    def lean_forward(p, state, xp, t):  # xp = x W (packed_projection); factor 1 - h_t^2
        h = jnp.tanh(xp + p["h"]["b"] + state["h"] @ p["h"]["U"])
        return {"h": h}, h, 1.0 - h * h

    def lean_backward(p, q, d):  # a = d_h (1 - h_t^2); d_h_{t-1} = a U^T
        a = d["h"] * q
        return {"h": fused_transpose(a, p, ("h",))}, a

    return Cell(name="rnn", init_fn=init_fn, project_fn=project, recur_fn=recur,
                lean=Lean(lean_forward, lean_backward, packed_projection(("h",))),
                equation="h = tanh(W x + U h + b)")


@factory
def indrnn(*, init: str = "orthogonal", u_max: float = 1.0) -> Cell:
    r"""Independently recurrent network (Li et al. 2018).

    .. math:: h_t = \mathrm{relu}(W x_t + u \odot h_{t-1} + b)

    ``u`` is a vector: each neuron recurs only onto itself. Params:
    ``{"h": {"W": (in, H), "u": (H,), "b": (H,)}}``; ``u ~ U[0, 1]`` at init (``u_max`` option
    sets the upper end). Reports no gates.
    """
    wscheme, bscheme = parse_init(init)
    if bscheme is not None:
        raise ValueError(f"cell 'indrnn' has no forget-type gate for init {init!r}")

    def init_fn(key, input_size, hidden_size, dtype):
        kw, ku = jax.random.split(key)
        return {"h": {"W": weight(kw, (input_size, hidden_size), wscheme, hidden_size, dtype),
                      "u": uniform(ku, (hidden_size,), dtype, 0.0, u_max),
                      "b": jnp.zeros((hidden_size,), dtype)}}

    def project(p, x):
        return input_projection(p, x, ("h",))

    def recur(p, state, xp, t):
        h = jax.nn.relu(xp["h"] + p["h"]["u"] * state["h"])
        return {"h": h}, h, {}

    return Cell(name="indrnn", init_fn=init_fn, project_fn=project, recur_fn=recur,
                equation="h = relu(W x + u * h + b)")
