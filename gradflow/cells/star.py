"""STAR: the STAckable Recurrent cell (Turkoglu et al. 2021)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gradflow.cells.base import Cell, choice, factory, input_projection
from gradflow.cells.mechanisms import standard_init


@factory
def star(*, variant: str = "paper", init: str | None = None,
         forget_bias_init: float | None = None, t_max: float | None = None) -> Cell:
    r"""STAR cell, as in the paper (default) or as in the authors' TensorFlow code.

    ``variant="paper"``:

    .. math::
        k = \sigma(W_k x + U_k h + b_k),\quad z = \tanh(W_z x + b_z), \qquad
        h_t = \tanh((1 - k) \odot h_{t-1} + k \odot z)

    ``variant="official"`` (``init`` defaults to ``"chrono"`` and ``t_max`` to 784, as hard-coded
    in the authors' code; for ``"paper"`` they default to ``"orthogonal"`` and 100):

    .. math::
        a = W_k x + U_k h + b_k, \qquad
        h_t = \tanh(\sigma(a) \odot h_{t-1} + (1 - \sigma(a - 1)) \odot \tanh(W_z x + b_z))

    Params ``{"k": {"W", "U", "b"}, "z": {"W", "b"}}`` (``z`` has no recurrent weight).
    Reports ``k`` (for the official variant ``k = σ(a)``, the fraction of ``h_{t-1}`` kept).
    """
    choice("star", "variant", variant, ("paper", "official"))
    official = variant == "official"
    if init is None:
        init = "chrono" if official else "orthogonal"
    if t_max is None:
        t_max = 784.0 if official else 100.0
    sign = 1 if official else -1
    init_fn = standard_init({"k": {}, "z": {"recurrent": False}}, init, forget=("k", sign),
                            t_max=t_max, forget_bias_init=forget_bias_init)

    def project(p, x):
        return input_projection(p, x, ("k", "z"))

    def preact(p, state, xp, t):
        return {"k": xp["k"] + state["h"] @ p["k"]["U"]}

    def recur(p, state, xp, t):
        h = state["h"]
        a = preact(p, state, xp, t)["k"]
        z = jnp.tanh(xp["z"])
        if official:
            k = jax.nn.sigmoid(a)
            h = jnp.tanh(k * h + (1.0 - jax.nn.sigmoid(a - 1.0)) * z)
        else:
            k = jax.nn.sigmoid(a)
            h = jnp.tanh((1.0 - k) * h + k * z)
        return {"h": h}, h, {"k": k}

    eq = ("h = tanh(s(a)*h + (1-s(a-1))*tanh(Wz x + bz)), a = Wk x + U h + bk" if official
          else "h = tanh((1-k)*h + k*tanh(Wz x + bz)), k = s(Wk x + Uk h + bk)")
    return Cell(name="star", init_fn=init_fn, project_fn=project, recur_fn=recur,
                gate_kinds=(("k", "sigmoid"),), equation=eq, forget=("k", sign),
                retain=(("k", sign),), preact_fn=preact,
                options=(("init", init), ("t_max", float(t_max))))
