"""The LSTM family: LSTM, UR-LSTM, ON-LSTM and Cheng et al.'s refined LSTM.

They are one cell with composable gate mechanisms (see :mod:`gradflow.cells.mechanisms`):
``aux`` adds Gu et al.'s refine gate or ON-LSTM's master gates to the forget gate, ``tied`` ties
the input gate to ``1 - forget``, ``init`` picks the weight scheme and the forget-bias scheme
(UGI, chrono), ``refined`` short-connects named gates to the input. Gu et al.'s ablation grid is
therefore a loop over ``init`` x ``aux``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gradflow.cells.base import (Cell, check_options, choice, freeze, input_projection,
                                 recurrent_projection, refined_set)
from gradflow.cells.mechanisms import (REFINED_MODES, cumax, master, refine, refined,
                                       standard_init)

LSTM_DEFAULTS = {
    "init": "orthogonal",
    "forget_bias": 0.0,
    "forget_bias_init": None,
    "t_max": 100.0,
    "aux": None,
    "tied": False,
    "refined": (),
    "mode": "mul",
    "chunks": 1,
}


def lstm(**options) -> Cell:
    r"""Long short-term memory.

    .. math::
        i = \sigma(W_i x + U_i h + b_i),\quad f = \sigma(W_f x + U_f h + b_f + \beta),\quad
        g = \tanh(W_g x + U_g h + b_g),\quad o = \sigma(W_o x + U_o h + b_o)

        c_t = f \odot c_{t-1} + i \odot g, \qquad h_t = o \odot \tanh(c_t)

    Params: ``{"i", "f", "g", "o"}``, each ``{"W": (in, H), "U": (H, H), "b": (H,)}``.
    Reports gates ``i, f, o``.

    Options:
      init: ``orthogonal`` (default), ``glorot``, ``torch``, ``chrono``, ``ugi`` or
        ``weights+bias`` (e.g. ``"glorot+chrono"``).
      forget_bias: :math:`\beta`, a constant added inside the forget sigmoid (TensorFlow's
        ``LSTMCell`` used 1.0); not a parameter.
      forget_bias_init: set the initial ``b_f`` to this constant.
      t_max: chrono's :math:`T_{max}`.
      aux: ``None``, ``"refine"`` (Gu et al.'s refine gate ``r``; the effective forget gate
        ``g = r(1-(1-f)^2) + (1-r)f^2`` is reported as ``g`` and the candidate is renamed ``u``)
        or ``"master"`` (ON-LSTM master gates ``f_master``, ``i_master``).
      tied: input gate tied to ``1 - forget`` (no ``i`` parameters).
      refined: gate names given Cheng et al.'s refined form (see :func:`mechanisms.refined`).
      mode: refined gate form, ``"mul"`` or ``"add"``.
      chunks: ON-LSTM master-gate chunk size (``H`` must be divisible by it).

    Example::

      >>> cell = gradflow.cells.get("lstm", forget_bias=1.0)
      >>> p = cell.init(jax.random.key(0), 3, 8)
      >>> s, h, gates = cell.step(p, cell.initial_state((2,), 8), jnp.ones((2, 3)), 0)
      >>> sorted(gates)
      ['f', 'i', 'o']
    """
    return _lstm("lstm", options, {})


def ur_lstm(**options) -> Cell:
    r"""UR-LSTM (Gu et al. 2020): refine gate on the forget gate, tied input gate, UGI.

    .. math::
        f = \sigma(W_f x + U_f h + b_f),\quad r = \sigma(W_r x + U_r h + b_r),\quad
        g = r \odot (1-(1-f)^2) + (1-r) \odot f^2

        c_t = g \odot c_{t-1} + (1-g) \odot \tanh(W_u x + U_u h + b_u), \qquad
        h_t = o \odot \tanh(c_t)

    with UGI: ``b_f = σ⁻¹(U[1/H, 1-1/H])``, ``b_r = -b_f``. Reports ``f, r, g, o``.
    Same options as :func:`lstm` (defaults ``init="ugi"``, ``aux="refine"``, ``tied=True``).
    """
    return _lstm("ur_lstm", options, {"init": "ugi", "aux": "refine", "tied": True})


def on_lstm(**options) -> Cell:
    r"""ON-LSTM (Shen et al. 2019): LSTM with master gates.

    .. math::
        \tilde f = \mathrm{cumax}(W_{\tilde f} x + U_{\tilde f} h + b_{\tilde f}),\quad
        \tilde i = 1 - \mathrm{cumax}(W_{\tilde i} x + U_{\tilde i} h + b_{\tilde i}),\quad
        \omega = \tilde f \odot \tilde i

        \hat f = f \odot \omega + (\tilde f - \omega),\quad
        \hat i = i \odot \omega + (\tilde i - \omega),\quad
        c_t = \hat f \odot c_{t-1} + \hat i \odot g

    ``cumax = cumsum ∘ softmax``; ``chunks=C`` gives master gates of size ``H/C`` repeated ``C``
    times. Reports ``i, f, f_master, i_master, o``.
    """
    return _lstm("on_lstm", options, {"aux": "master"})


def refined_lstm(**options) -> Cell:
    r"""LSTM with Cheng et al.'s refined input and output gates.

    .. math:: \hat i = \sigma(W_i x_t + U_i h_{t-1} + b_i) \odot x_t, \quad
              \hat o = \sigma(W_o x_t + U_o h_{t-1} + b_o) \odot x_t

    (``mode="add"``: ``σ(·) + x_t``). **Uncertain**: the paper's full text was not available;
    the multiplicative form follows spago's LSTM. Needs ``in == H``. Option ``refined`` picks
    the gates (default ``("i", "o")``). Reports the refined values of ``i, f, o``.
    """
    return _lstm("refined_lstm", options, {"refined": ("i", "o")})


def _lstm(name: str, options: dict, defaults: dict) -> Cell:
    o = check_options(name, options, {**LSTM_DEFAULTS, **defaults})
    aux = choice(name, "aux", o["aux"], (None, "refine", "master"))
    mode = choice(name, "mode", o["mode"], REFINED_MODES)
    tied = bool(o["tied"])
    chunks = int(o["chunks"])
    if tied and aux == "master":
        raise ValueError(f"cell {name!r}: tied=True cannot be combined with aux='master'")
    if chunks < 1 or (chunks > 1 and aux != "master"):
        raise ValueError(f"cell {name!r}: chunks must be a positive integer and needs aux='master'")
    cand = "u" if aux == "refine" else "g"
    sig = ("f", "o") + (() if tied else ("i",)) + (("r",) if aux == "refine" else ())
    rset = refined_set(name, o, sig)

    specs = {} if tied else {"i": {}}
    specs.update({"f": {}, cand: {}, "o": {}})
    if aux == "refine":
        specs["r"] = {}
    if aux == "master":
        specs["f_master"] = {}
        specs["i_master"] = {}
    reported = (() if tied else ("i",)) + ("f",) + {
        "refine": ("r", "g"), "master": ("f_master", "i_master"), None: ()}[aux] + ("o",)

    def init_fn(key, input_size, hidden_size, dtype):
        sp = dict(specs)
        if aux == "master":
            if hidden_size % chunks:
                raise ValueError(f"cell {name!r}: hidden_size {hidden_size} is not divisible by "
                                 f"chunks={chunks}")
            sp["f_master"] = sp["i_master"] = {"out": hidden_size // chunks}
        return standard_init(sp, o["init"], forget=("f", 1), input_gate=None if tied else "i",
                             refine_gate="r" if aux == "refine" else None, t_max=o["t_max"],
                             forget_bias_init=o["forget_bias_init"])(
            key, input_size, hidden_size, dtype)

    all_gates = tuple(specs)

    def project(p, x):
        xp = {"a": input_projection(p, x, all_gates)}
        if rset:
            xp["x"] = x
        return xp

    def recur(p, state, xp, t):
        c, h = state["c"], state["h"]
        rec = recurrent_projection(p, h, all_gates)
        z = {g: xp["a"][g] + rec[g] for g in all_gates}
        z["f"] = z["f"] + o["forget_bias"]
        act = {g: jax.nn.sigmoid(z[g]) for g in sig}
        for g in rset:
            act[g] = refined(act[g], xp["x"], mode)
        gates = dict(act)
        keep = act["f"]
        inp = None if tied else act["i"]
        if aux == "refine":
            keep = gates["g"] = refine(act["f"], act["r"])
        elif aux == "master":
            fm = cumax(z["f_master"], chunks)
            im = 1.0 - cumax(z["i_master"], chunks)
            gates["f_master"], gates["i_master"] = fm, im
            keep, inp = master(act["f"], act["i"], fm, im)
        if tied:
            inp = 1.0 - keep
        c = keep * c + inp * jnp.tanh(z[cand])
        h = act["o"] * jnp.tanh(c)
        return {"c": c, "h": h}, h, {g: gates[g] for g in reported}

    retain = (("f", 1),) + ((("g", 1),) if aux == "refine" else ())
    eq = {"lstm": "c = f*c + i*tanh(Wx+Uh+b); h = o*tanh(c)",
          "ur_lstm": "g = r(1-(1-f)^2) + (1-r)f^2; c = g*c + (1-g)*tanh(Wx+Uh+b); h = o*tanh(c)",
          "on_lstm": "f^ = f*w + (F-w), i^ = i*w + (I-w), w = F*I (cumax masters); c = f^*c + i^*g",
          "refined_lstm": "LSTM with i, o refined: sigma(Wx+Uh+b) * x"}.get(name, "")
    return Cell(name, freeze(o), reported, ("c", "h"), bool(rset), eq, ("f", 1), retain,
                init_fn, project, recur)
