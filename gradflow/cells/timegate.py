r"""Time-gated LSTMs: the Gaussian-gated g-LSTM and its predecessor, the Phased LSTM.

Both wrap a plain :func:`gradflow.cells.lstm.lstm` step (``ĉ, ĥ``) with a per-neuron time gate
``k_t`` that decides how much of the step's update is applied:

.. math:: c_t = k_t \odot \hat c_t + (1 - k_t) \odot c_{t-1}, \qquad
          h_t = k_t \odot \hat h_t + (1 - k_t) \odot h_{t-1}
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gradflow.cells.base import Cell, factory, uniform
from gradflow.cells.lstm import lstm

_INNER = ("init", "forget_bias", "forget_bias_init", "t_max")


def gaussian_gate(t, mu, sigma):
    r"""g-LSTM's time gate :math:`k_t = \exp(-(t - \mu)^2 / (2\sigma^2))`; ``mu, sigma: (H,)``."""
    return jnp.exp(-((t - mu) ** 2) / (2.0 * sigma ** 2))


def phased_gate(t, tau, s, r_on, alpha):
    r"""Phased LSTM's time gate (Neil et al. 2016).

    :math:`\phi_t = ((t - s) \bmod \tau) / \tau`;
    :math:`k_t = 2\phi/r_{on}` if :math:`\phi < r_{on}/2`, :math:`2 - 2\phi/r_{on}` if
    :math:`\phi < r_{on}`, else :math:`\alpha\phi` (the closed phase leaks with rate ``alpha``).
    """
    phi = jnp.mod(t - s, tau) / tau
    return jnp.where(phi < 0.5 * r_on, 2.0 * phi / r_on,
                     jnp.where(phi < r_on, 2.0 - 2.0 * phi / r_on, alpha * phi))


def _time_gated(name, o, time_init, gate_fn, eq, rescale=None, length_option=None) -> Cell:
    inner = lstm(**{k: o[k] for k in _INNER})

    def init_fn(key, input_size, hidden_size, dtype):
        k1, k2 = jax.random.split(key)
        p = inner.init_fn(k1, input_size, hidden_size, dtype)
        p["time"] = time_init(k2, hidden_size, dtype, o)
        return p

    def recur(p, state, xp, t):
        new, h_hat, gates = inner.recur_fn(p, state, xp, t)
        k = gate_fn(jnp.asarray(t, p["time"][next(iter(p["time"]))].dtype), p["time"], o)
        k = jnp.broadcast_to(k, h_hat.shape)
        c = k * new["c"] + (1.0 - k) * state["c"]
        h = k * h_hat + (1.0 - k) * state["h"]
        return {"c": c, "h": h}, h, {**gates, "k": k}

    return Cell(name=name, init_fn=init_fn, project_fn=inner.project_fn, recur_fn=recur,
                state_names=("c", "h"), gate_kinds=inner.gate_kinds + (("k", "time"),),
                equation=eq, forget=("f", 1), input_gate="i", retain=(("f", 1),),
                time_gate="k", preact_fn=inner.preact_fn,
                rescale_time=rescale, length_option=length_option)


@factory
def g_lstm(*, steps: int = 100, sigma_frac: float = 0.1, init: str = "orthogonal",
           forget_bias: float = 0.0, forget_bias_init: float | None = None,
           t_max: float = 100.0) -> Cell:
    r"""Gaussian-gated LSTM (Thornton et al. 2019).

    .. math:: k_t = \exp\!\left(-\frac{(t - \mu)^2}{2 \sigma^2}\right), \qquad
              c_t = k_t \odot \hat c_t + (1 - k_t) \odot c_{t-1}, \quad
              h_t = k_t \odot \hat h_t + (1 - k_t) \odot h_{t-1}

    with learned per-neuron ``μ, σ`` (``params["time"] = {"mu": (H,), "sigma": (H,)}``) and
    ``ĉ, ĥ`` the plain LSTM update. Init: ``μ ~ U[0, steps)``, ``σ = sigma_frac · steps``.
    **Uncertain** in detail (the full text was not available): the update form is Phased LSTM's.
    Options: ``steps`` (default 100), ``sigma_frac`` (default 0.1), and the LSTM options
    ``init, forget_bias, forget_bias_init, t_max``. Reports ``i, f, o``, the candidate
    ``g`` and ``k``.
    """
    def time_init(key, hidden, dtype, o):
        steps = float(o["steps"])
        if not steps > 0 or not o["sigma_frac"] > 0:
            raise ValueError("g_lstm: steps and sigma_frac must be positive")
        return {"mu": uniform(key, (hidden,), dtype, 0.0, steps),
                "sigma": jnp.full((hidden,), o["sigma_frac"] * steps, dtype)}

    def gate(t, tp, o):
        return gaussian_gate(t, tp["mu"], tp["sigma"])

    def rescale(layer_params, ratio):
        """A temporal curriculum stretching the sequence by ``ratio`` stretches ``mu, sigma``."""
        return {**layer_params, "time": {k: v * ratio for k, v in layer_params["time"].items()}}

    return _time_gated("g_lstm", locals(), time_init, gate,
                       "k = exp(-(t-mu)^2/2s^2); c = k*c^ + (1-k)*c; h = k*h^ + (1-k)*h",
                       rescale=rescale, length_option="steps")


@factory
def phased_lstm(*, log_tau: tuple[float, float] = (1.0, 3.0), shift_max: float | None = 100.0,
                r_on: float = 0.05, alpha: float = 1e-3, test_time: bool = False,
                init: str = "orthogonal", forget_bias: float = 0.0,
                forget_bias_init: float | None = None, t_max: float = 100.0) -> Cell:
    r"""Phased LSTM (Neil et al. 2016): an LSTM whose update is gated by a periodic time gate.

    :math:`\phi_t = ((t - s) \bmod \tau)/\tau`, :math:`k_t` from :func:`phased_gate`, and the
    ``c, h`` update of :func:`g_lstm`. Params ``params["time"] = {"tau", "s", "r_on"}``, each
    ``(H,)``. Reports ``i, f, o``, the candidate ``g`` and ``k``.

    Init (default, as in the authors' experiment script): ``τ = exp(U[1, 3])``,
    ``s ~ U[0, 100)``, ``r_on = 0.05``. ``log_tau=(1, 5), shift_max=None`` gives the earlier
    range of SPEC section 1 (``τ = exp(U[1, 5])``, ``s ~ U[0, τ)``). ``alpha`` (1e-3) is the
    closed phase's leak during training; ``test_time=True`` sets it to 0, as the authors do
    at test time.
    """
    if not log_tau[0] < log_tau[1]:
        raise ValueError(f"option log_tau={log_tau!r} of cell 'phased_lstm' is the range (low, "
                         "high) of log tau, with low < high")
    for what, value, ok, meaning in (
            ("r_on", r_on, 0 < r_on <= 1, "the open phase's share of each period, in (0, 1]"),
            ("alpha", alpha, 0 <= alpha < 1, "the closed phase's leak, in [0, 1)"),
            ("shift_max", shift_max, shift_max is None or 0 <= shift_max < math.inf,
             "the upper end of the phase shifts s ~ U[0, shift_max), >= 0 (None: tau)")):
        if not ok:
            raise ValueError(f"option {what}={value!r} of cell 'phased_lstm' is {meaning}")

    def time_init(key, hidden, dtype, o):
        k1, k2 = jax.random.split(key)
        tau = jnp.exp(uniform(k1, (hidden,), dtype, *o["log_tau"]))
        top = tau if o["shift_max"] is None else o["shift_max"]
        return {"tau": tau, "s": uniform(k2, (hidden,), dtype) * top,
                "r_on": jnp.full((hidden,), o["r_on"], dtype)}

    def gate(t, tp, o):
        return phased_gate(t, tp["tau"], tp["s"], tp["r_on"], 0.0 if o["test_time"] else o["alpha"])

    return _time_gated("phased_lstm", locals(), time_init, gate,
                       "phi = ((t-s) mod tau)/tau; k = open/close ramps of r_on, else alpha*phi")

