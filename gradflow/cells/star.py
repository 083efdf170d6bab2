"""STAR: the STAckable Recurrent cell (Turkoglu et al. 2021)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gradflow.cells.base import Cell, check_options, choice, freeze, input_projection
from gradflow.cells.mechanisms import standard_init


def star(**options) -> Cell:
    r"""STAR cell, as in the paper (default) or as in the authors' TensorFlow code.

    ``variant="paper"``:

    .. math::
        k = \sigma(W_k x + U_k h + b_k),\quad z = \tanh(W_z x + b_z), \qquad
        h_t = \tanh((1 - k) \odot h_{t-1} + k \odot z)

    ``variant="official"`` (defaults ``init="chrono"``, ``t_max=784``):

    .. math::
        a = W_k x + U_k h + b_k, \qquad
        h_t = \tanh(\sigma(a) \odot h_{t-1} + (1 - \sigma(a - 1)) \odot \tanh(W_z x + b_z))

    Params ``{"k": {"W", "U", "b"}, "z": {"W", "b"}}`` (``z`` has no recurrent weight).
    Reports ``k`` (for the official variant ``k = σ(a)``, the fraction of ``h_{t-1}`` kept).
    """
    variant = options.get("variant", "paper")
    defaults = {"init": "orthogonal", "variant": "paper", "forget_bias_init": None,
                "t_max": 100.0}
    if variant == "official":
        defaults.update(init="chrono", t_max=784.0)
    o = check_options("star", options, defaults)
    choice("star", "variant", o["variant"], ("paper", "official"))
    official = o["variant"] == "official"
    sign = 1 if official else -1
    init_fn = standard_init({"k": {}, "z": {"recurrent": False}}, o["init"], forget=("k", sign),
                            t_max=o["t_max"], forget_bias_init=o["forget_bias_init"])

    def project(p, x):
        return input_projection(p, x, ("k", "z"))

    def recur(p, state, xp, t):
        h = state["h"]
        a = xp["k"] + h @ p["k"]["U"]
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
    return Cell("star", freeze(o), ("k",), ("h",), False, eq, ("k", sign), (("k", sign),),
                init_fn, project, recur)
