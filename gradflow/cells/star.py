"""STAR: the STAckable Recurrent cell (Turkoglu et al. 2021)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gradflow.cells.base import (Cell, Lean, check_t_max, choice, factory, fused,
                                 fused_transpose, input_projection, matmul, packed)
from gradflow.cells.mechanisms import standard_init


@factory
def star(*, variant: str = "paper", init: str | None = None,
         forget_bias_init: float | None = None, t_max: float | None = None,
         bn_scale: float = 0.1, bn_stats: str = "batch") -> Cell:
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

    ``variant="bn"``: BN-STAR, the default cell of the authors' repository (``bn_star.py``): the
    official update with batch normalisation of the gate's input and recurrent parts and of
    the candidate, each with a learned ``scale`` (initialised to ``bn_scale`` = 0.1) and
    ``offset`` (``params["bn"] = {"kx", "kh", "z"}``), :math:`\epsilon = 10^{-3}`:

    .. math::
        a = \mathrm{BN}_{kx}(W_k x) + \mathrm{BN}_{kh}(U_k h) + b_k, \qquad
        h_t = \tanh(\sigma(a) \odot h_{t-1} + (1 - \sigma(a - 1)) \odot
        \tanh(\mathrm{BN}_z(W_z x) + b_z))

    ``bn_stats="batch"`` (default, the training-mode statistics the authors' gradients flow
    through) normalises with each step's batch mean and variance, so the examples of a batch
    are coupled: splitting a batch changes the numbers, and per-example measurements
    (:func:`gradflow.local_gains`) need ``bn_stats="population"``, which uses the population
    statistics at initialisation (mean 0, variance 1).

    Params ``{"k": {"W", "U", "b"}, "z": {"W", "b"}}`` (``z`` has no recurrent weight).
    Reports ``k`` (for the official and BN variants ``k = σ(a)``, the fraction of ``h_{t-1}``
    kept) and the candidate ``z`` (kind ``"tanh"``).

    ``forget_bias_init=v``, chrono and UGI set how much of the state is kept, as for an LSTM's
    forget gate: where the state is kept by ``1 - k`` (the paper's form) the bias is negated,
    ``b_k = -v``. SPEC's ``b_f = v`` reads the gate as the one that keeps the state; this
    reading keeps ``v`` meaning the same retention in every cell.
    """
    choice("star", "variant", variant, ("paper", "official", "bn"))
    choice("star", "bn_stats", bn_stats, ("batch", "population"))
    if variant != "bn" and (float(bn_scale) != 0.1 or bn_stats != "batch"):
        raise ValueError(f"cell 'star': bn_scale and bn_stats shape BN-STAR's batch "
                         f"normalisation, which variant={variant!r} does not have; give "
                         "variant='bn' or drop them")
    # each variant's defaults (the official and BN code's chrono over 784 steps); t_max is
    # checked against the variant's own, so a cell rebuilt from its recorded options (which
    # hold the resolved t_max) is accepted
    paper_default = variant == "paper"
    if init is None or (variant == "bn" and not init):  # (BN-STAR's code read "" as unset)
        init = "orthogonal" if paper_default else "chrono"
    default_t_max = 100.0 if paper_default else 784.0
    check_t_max("star", {"t_max": t_max, "init": init}, default=default_t_max)
    t_max = default_t_max if t_max is None else t_max
    if variant == "bn":
        return _bn_star(init, t_max, forget_bias_init, bn_scale, bn_stats)
    official = variant == "official"
    sign = 1 if official else -1
    init_fn = standard_init({"k": {}, "z": {"recurrent": False}}, init, forget=("k", sign),
                            t_max=t_max, forget_bias_init=forget_bias_init)

    def project(p, x):
        return input_projection(p, x, ("k", "z"))

    def preact(p, state, xp, t):
        return {"k": xp["k"] + matmul(state["h"], p["k"]["U"])}

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
        return {"h": h}, h, {"k": k, "z": z}

    eq = ("h = tanh(s(a)*h + (1-s(a-1))*tanh(Wz x + bz)), a = Wk x + U h + bk" if official
          else "h = tanh((1-k)*h + k*tanh(Wz x + bz)), k = s(Wk x + Uk h + bk)")
    return Cell(name="star", init_fn=init_fn, project_fn=project, recur_fn=recur,
                lean=_lean(official), gate_kinds=(("k", "sigmoid"), ("z", "tanh")), equation=eq,
                forget=("k", sign),
                retain=(("k", sign),), preact_fn=preact,
                options=(("init", init), ("t_max", float(t_max))))


def _lean(official: bool) -> Lean:
    r"""STAR's :class:`~gradflow.cells.base.Lean` step (paper and official variants). With
    :math:`q = 1 - h_t^2`, :math:`\zeta = \tanh(xp_z)`: factors ``(A, K_k, K_z)``, paper
    ``(q(1-k), q(\zeta-h)k(1-k), q k(1-\zeta^2))``, official (``k_2 = \sigma(a-1)``)
    ``(q k, q(h k(1-k) - \zeta k_2(1-k_2)), q(1-k_2)(1-\zeta^2))``;
    :math:`\bar a = \bar h K_k`, :math:`\bar h_{t-1} = \bar h A + \bar a U_k^\top`,
    :math:`\overline{xp}_z = \bar h K_z`. Projected input: ``(x W_k + b_k, x W_z + b_z)``
    from one matmul, as two arrays, so the step's input cotangent is two stores, not a
    concatenation and a store. Its gate(s) and the candidate are separate ``tanh`` fusions
    (:math:`\sigma(a) = (1 + \tanh(a/2))/2`): a concatenation to share one ``tanh`` costs an
    op of its own.
    """
    def project(p, x):
        y = packed(x, p, ("k", "z"), "W", with_bias=True)
        H = y.shape[-1] // 2
        return y[..., :H], y[..., H:]

    def forward(p, state, xp, t):
        h = state["h"]
        xk, xz = xp
        a = xk + h @ p["k"]["U"]
        zc = jnp.tanh(xz)
        if official:
            u = jnp.tanh(jnp.concatenate([0.5 * a, 0.5 * (a - 1.0)], axis=-1))
            H = h.shape[-1]
            k, k2 = 0.5 * u[..., :H] + 0.5, 0.5 * u[..., H:] + 0.5
            new = jnp.tanh(k * h + (1.0 - k2) * zc)
            q = 1.0 - new * new
            fac = (q * k, q * (h * k * (1 - k) - zc * k2 * (1 - k2)),
                   q * (1 - k2) * (1 - zc * zc))
        else:
            k = 0.5 * jnp.tanh(0.5 * a) + 0.5
            new = jnp.tanh((1.0 - k) * h + k * zc)
            q = 1.0 - new * new
            fac = (q * (1 - k), q * (zc - h) * k * (1 - k), q * k * (1 - zc * zc))
        return {"h": new}, new, fac

    def backward(p, factors, d):
        A, kk, kz = factors
        dh = d["h"]
        da = dh * kk
        return {"h": dh * A + fused_transpose(da, p, ("k",))}, (da, dh * kz)

    return Lean(forward, backward, project)


def batch_norm(v, p, stats: str, eps: float = 1e-3):
    r""":math:`\mathrm{scale} \cdot (v - \mu) / \sqrt{\sigma^2 + \epsilon} + \mathrm{offset}` for
    ``v: (..., B, H)``: batch statistics over the batch axis ``-2`` (``stats="batch"``) or the
    population statistics at initialisation, ``mu = 0, sigma^2 = 1`` (``"population"``)."""
    if stats == "population":
        return p["scale"] * v / jnp.sqrt(1.0 + eps) + p["offset"]
    if v.ndim < 2:
        raise ValueError("BN-STAR with bn_stats='batch' normalises over a batch of examples; "
                         "per-example measurements need star(variant='bn', "
                         "bn_stats='population')")
    mean = jnp.mean(v, axis=-2, keepdims=True)
    var = jnp.mean(jnp.square(v - mean), axis=-2, keepdims=True)
    return p["scale"] * (v - mean) * jax.lax.rsqrt(var + eps) + p["offset"]


def _bn_star(init, t_max, forget_bias_init, bn_scale, bn_stats) -> Cell:
    base = standard_init({"k": {}, "z": {"recurrent": False}}, init, forget=("k", 1),
                         t_max=t_max, forget_bias_init=forget_bias_init)

    def init_fn(key, input_size, hidden_size, dtype):
        p = base(key, input_size, hidden_size, dtype)
        one = {"scale": jnp.full((hidden_size,), bn_scale, dtype),
               "offset": jnp.zeros((hidden_size,), dtype)}
        p["bn"] = {k: dict(one) for k in ("kx", "kh", "z")}
        return p

    def project(p, x):
        a = fused(x, p, ("k", "z"), "W")
        return {"k": batch_norm(a["k"], p["bn"]["kx"], bn_stats) + p["k"]["b"],
                "z": batch_norm(a["z"], p["bn"]["z"], bn_stats) + p["z"]["b"]}

    def recur(p, state, xp, t):
        h = state["h"]
        a = xp["k"] + batch_norm(matmul(h, p["k"]["U"]), p["bn"]["kh"], bn_stats)
        k = jax.nn.sigmoid(a)
        z = jnp.tanh(xp["z"])
        h = jnp.tanh(k * h + (1.0 - jax.nn.sigmoid(a - 1.0)) * z)
        return {"h": h}, h, {"k": k, "z": z}

    return Cell(name="star", init_fn=init_fn, project_fn=project, recur_fn=recur,
                gate_kinds=(("k", "sigmoid"), ("z", "tanh")), forget=("k", 1), retain=(("k", 1),),
                equation="h = tanh(s(a)*h + (1-s(a-1))*tanh(BN(Wz x) + bz)), "
                         "a = BN(Wk x) + BN(U h) + bk",
                couples_batch=bn_stats == "batch", options=(("init", init), ("t_max", float(t_max))))
