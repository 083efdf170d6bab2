"""Ungated cells: the vanilla (Elman) RNN, tanh or ReLU, and IndRNN."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gradflow.cells.base import (Cell, Lean, choice, factory, fused_transpose, gate_bias,
                                 input_projection,
                                 matmul, packed_projection, parse_init, uniform, weight)
from gradflow.cells.mechanisms import check_biases, standard_init


@factory
def rnn(*, init: str = "orthogonal", nonlinearity: str = "tanh", biases: int = 1) -> Cell:
    r"""Vanilla (Elman) RNN.

    .. math:: h_t = \tanh(W x_t + U h_{t-1} + b)

    Params: ``{"h": {"W": (in, H), "U": (H, H), "b": (H,)}}``. Reports no gates.

    Options: ``init`` (``orthogonal``, ``glorot``, ``torch``), ``nonlinearity`` (``"tanh"``,
    or ``"relu"``: :math:`h_t = \max(0, W x_t + U h_{t-1} + b)`, PyTorch's
    ``nn.RNN(nonlinearity="relu")`` and Le et al.'s IRNN with an identity ``U``), ``biases``
    (1: ``b``; 0: none, PyTorch's ``bias=False``; 2: PyTorch's ``b_ih`` and ``b_hh`` as ``b``
    and ``b_hh``, the same function, whose parameter map counts PyTorch's parameters:
    :func:`gradflow.from_torch` sets it).

    Example::

      >>> cell = gradflow.cells.get("rnn")
      >>> p = cell.init(jax.random.key(0), 3, 8)
      >>> s = cell.initial_state((2,), 8)
      >>> s, h, gates = cell.step(p, s, jnp.ones((2, 3)), 0)
    """
    choice("rnn", "nonlinearity", nonlinearity, ("tanh", "relu"))
    act = jnp.tanh if nonlinearity == "tanh" else jax.nn.relu
    init_fn = standard_init({"h": {}}, init, biases=check_biases("rnn", {"biases": biases}))

    def project(p, x):
        return input_projection(p, x, ("h",))

    def recur(p, state, xp, t):
        h = act(xp["h"] + matmul(state["h"], p["h"]["U"]))
        return {"h": h}, h, {}

    def lean_forward(p, state, xp, t):  # xp = x W (packed_projection); factor act'(a_t)
        h = act(xp + gate_bias(p["h"]) + state["h"] @ p["h"]["U"])
        slope = 1.0 - h * h if nonlinearity == "tanh" else (h > 0).astype(h.dtype)
        return {"h": h}, h, slope

    def lean_backward(p, q, d):  # a = d_h act'(a_t); d_h_{t-1} = a U^T
        a = d["h"] * q
        return {"h": fused_transpose(a, p, ("h",))}, a

    return Cell(name="rnn", init_fn=init_fn, project_fn=project, recur_fn=recur,
                lean=Lean(lean_forward, lean_backward, packed_projection(("h",))),
                equation=f"h = {nonlinearity}(W x + U h + b)")


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
    if not 0 <= u_max < float("inf"):
        raise ValueError(f"option u_max={u_max!r} of cell 'indrnn' is the upper end of the "
                         "recurrent weights u ~ U[0, u_max], >= 0")

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
