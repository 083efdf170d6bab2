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

from gradflow.cells.base import (Cell, Lean, choice, factory, fused_transpose, input_projection,
                                 packed, packed_bias, packed_projection, recurrent_projection,
                                 refined_set, check_t_max, written_value)
from gradflow.cells.mechanisms import (REFINED_MODES, check_biases, cumax, master, refine,
                                       refined, sigmoid_master, standard_init)

@factory
def lstm(*, init: str = "orthogonal", forget_bias: float = 0.0,
         forget_bias_init: float | None = None, t_max: float = 100.0, aux: str | None = None,
         tied: bool = False, refined: tuple[str, ...] = (), mode: str = "mul",
         chunk_size: int = 1, tie_refine_bias: bool = False,
         ordered: bool | None = None, biases: int = 1) -> Cell:
    r"""Long short-term memory.

    .. math::
        i = \sigma(W_i x + U_i h + b_i),\quad f = \sigma(W_f x + U_f h + b_f + \beta),\quad
        g = \tanh(W_g x + U_g h + b_g),\quad o = \sigma(W_o x + U_o h + b_o)

        c_t = f \odot c_{t-1} + i \odot g, \qquad h_t = o \odot \tanh(c_t)

    Params: ``{"i", "f", "g", "o"}``, each ``{"W": (in, H), "U": (H, H), "b": (H,)}``.
    Reports gates ``i, f, o`` and the candidate ``g`` (kind ``"tanh"``: saturated at
    :math:`|g| > 1 - \varepsilon`, where it passes little gradient to its own pre-activation).

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
      tie_refine_bias: with ``aux="refine"``, one bias vector for the forget and refine gates,
        ``+b`` in ``f`` and ``-b`` in ``r`` (Gu et al.'s pseudo-code; ``params["r"]`` then has
        no ``b``). Off by default: UGI initialises ``b_r = -b_f`` either way, so the two forms
        are equal at init, and untied biases are the form of the public implementations; the
        forms differ only once trained.
      chunk_size: ON-LSTM: neurons per master-gate chunk (``H`` must be divisible by it; the
        master gates have ``H / chunk_size`` entries, each repeated ``chunk_size`` times).
      ordered: Gu et al.'s primary gate "O": ON-LSTM's cumax activation (``cumsum`` of a
        ``softmax`` over the units, values rising from 0 to 1 across the units) on the gates
        that hold the memory. With ``aux=None`` or ``"refine"``, ``True`` puts it on the forget
        gate, :math:`f = \mathrm{cumax}(W_f x + U_f h + b_f)` (the grid's ``O-``, ``OR``; an
        untied input gate keeps its sigmoid); with ``aux="master"`` it is the master gates'
        activation, cumax (``True``, ON-LSTM, the grid's ``OM``) or a sigmoid (``False``:
        :math:`\tilde f = \sigma(\cdot)`, :math:`\tilde i = 1 - \sigma(\cdot)`, the grid's
        ``-M``, ``UM``). ``None`` (default): each gate as its cell defines it (a sigmoid forget
        gate, cumax master gates). **Uncertain**: Gu et al.'s table is read from memory (its
        full text was not available here): "O" as the cumax activation, "OM" as ON-LSTM; the
        grid is :data:`gradflow.gates.GU_ABLATION`. A cumax gate reports kind ``"master"``
        (not element-wise: no slope); a cumax forget gate's last unit is exactly 1, a memory
        kept forever, so its timescale is infinite (counted among the non-finite entries).
      biases: 1 (one ``b`` per gate), 0 (none: PyTorch's ``bias=False``), or 2 (PyTorch's
        ``b_ih`` and ``b_hh`` as ``b`` and ``b_hh``: the same function, whose parameter map
        counts PyTorch's parameters; :func:`gradflow.from_torch` sets it). Not with ``aux``.

    Example::

      >>> cell = gradflow.cells.get("lstm", forget_bias=1.0)
      >>> p = cell.init(jax.random.key(0), 3, 8)
      >>> s, h, gates = cell.step(p, cell.initial_state((2,), 8), jnp.ones((2, 3)), 0)
      >>> sorted(gates)
      ['f', 'g', 'i', 'o']
    """
    return _lstm("lstm", locals())


@factory
def ur_lstm(*, init: str = "ugi", forget_bias: float = 0.0,
         forget_bias_init: float | None = None, t_max: float = 100.0, aux: str | None = "refine",
         tied: bool = True, refined: tuple[str, ...] = (), mode: str = "mul",
         chunk_size: int = 1, tie_refine_bias: bool = False,
         ordered: bool | None = None) -> Cell:
    r"""UR-LSTM (Gu et al. 2020): refine gate on the forget gate, tied input gate, UGI.

    .. math::
        f = \sigma(W_f x + U_f h + b_f),\quad r = \sigma(W_r x + U_r h + b_r),\quad
        g = r \odot (1-(1-f)^2) + (1-r) \odot f^2

        c_t = g \odot c_{t-1} + (1-g) \odot \tanh(W_u x + U_u h + b_u), \qquad
        h_t = o \odot \tanh(c_t)

    with UGI: ``b_f = σ⁻¹(U[1/H, 1-1/H])``, ``b_r = -b_f``. Reports ``f, r, g, o`` and the
    candidate ``u``.
    Same options as :func:`lstm` (defaults ``init="ugi"``, ``aux="refine"``, ``tied=True``).
    """
    return _lstm("ur_lstm", locals())


@factory
def on_lstm(*, init: str = "orthogonal", forget_bias: float = 0.0,
         forget_bias_init: float | None = None, t_max: float = 100.0, aux: str | None = "master",
         tied: bool = False, refined: tuple[str, ...] = (), mode: str = "mul",
         chunk_size: int = 1, tie_refine_bias: bool = False,
         ordered: bool | None = None) -> Cell:
    r"""ON-LSTM (Shen et al. 2019): LSTM with master gates.

    .. math::
        \tilde f = \mathrm{cumax}(W_{\tilde f} x + U_{\tilde f} h + b_{\tilde f}),\quad
        \tilde i = 1 - \mathrm{cumax}(W_{\tilde i} x + U_{\tilde i} h + b_{\tilde i}),\quad
        \omega = \tilde f \odot \tilde i

        \hat f = f \odot \omega + (\tilde f - \omega),\quad
        \hat i = i \odot \omega + (\tilde i - \omega),\quad
        c_t = \hat f \odot c_{t-1} + \hat i \odot g

    ``cumax = cumsum ∘ softmax``; ``chunk_size=C`` gives master gates of size ``H/C``, each entry
    shared by a chunk of ``C`` neurons. Reports ``i, f, f_master, i_master, o`` and the
    candidate ``g``.
    """
    return _lstm("on_lstm", locals())


@factory
def refined_lstm(*, init: str = "orthogonal", forget_bias: float = 0.0,
         forget_bias_init: float | None = None, t_max: float = 100.0, aux: str | None = None,
         tied: bool = False, refined: tuple[str, ...] = ("i", "o"), mode: str = "mul",
         chunk_size: int = 1, tie_refine_bias: bool = False,
         ordered: bool | None = None) -> Cell:
    r"""LSTM with Cheng et al.'s refined input and output gates.

    .. math:: \hat i = \sigma(W_i x_t + U_i h_{t-1} + b_i) \odot x_t, \quad
              \hat o = \sigma(W_o x_t + U_o h_{t-1} + b_o) \odot x_t

    (``mode="add"``: ``σ(·) + x_t``). **Uncertain**: the paper's full text was not available;
    the multiplicative form follows spago's LSTM. Needs ``in == H``. Option ``refined`` picks
    the gates (default ``("i", "o")``). Reports the refined values of ``i, f, o`` and the
    candidate ``g``.
    """
    return _lstm("refined_lstm", locals())


_EQUATIONS = {
    "lstm": "c = f*c + i*tanh(Wx+Uh+b); h = o*tanh(c)",
    "ur_lstm": "g = r(1-(1-f)^2) + (1-r)f^2; c = g*c + (1-g)*tanh(Wx+Uh+b); h = o*tanh(c)",
    "on_lstm": "f^ = f*w + (F-w), i^ = i*w + (I-w), w = F*I (cumax masters); c = f^*c + i^*g",
    "refined_lstm": "LSTM with i, o refined: sigma(Wx+Uh+b) * x"}


def _layout(aux, tied, cumax_forget=False):
    """``(candidate gate, sigmoid gates, parameter specs, reported gates)`` of an LSTM variant."""
    cand = "u" if aux == "refine" else "g"
    sig = (() if cumax_forget else ("f",)) + ("o",) + (() if tied else ("i",)) + (
        ("r",) if aux == "refine" else ())
    specs = {} if tied else {"i": {}}
    specs.update({"f": {}, cand: {}, "o": {}})
    if aux == "refine":
        specs["r"] = {}
    if aux == "master":
        specs["f_master"] = {}
        specs["i_master"] = {}
    reported = (() if tied else ("i",)) + ("f",) + {
        "refine": ("r", "g"), "master": ("f_master", "i_master"), None: ()}[aux] + ("o", cand)
    return cand, sig, specs, reported


def _init_fn(name, o, specs, aux, tied, tie, chunks):
    """The LSTM family's ``init_fn``: per-gate blocks, the bias scheme, master-gate sizes."""
    biases = check_biases(name, o)  # (here, so a bad value is refused when the cell is built)
    def init_fn(key, input_size, hidden_size, dtype):
        sp = dict(specs)
        if aux == "master":
            if hidden_size % chunks:
                raise ValueError(f"cell {name!r}: hidden_size {hidden_size} is not divisible by "
                                 f"chunk_size={chunks}")
            sp["f_master"] = sp["i_master"] = {"out": hidden_size // chunks}
        p = standard_init(sp, o["init"], forget=("f", 1), input_gate=None if tied else "i",
                          refine_gate="r" if aux == "refine" and not tie else None,
                          t_max=o["t_max"], forget_bias_init=o["forget_bias_init"],
                          biases=biases)(key, input_size, hidden_size, dtype)
        if tie:
            p["r"] = {k: v for k, v in p["r"].items() if k != "b"}
        return p

    return init_fn


def _lean(forget_bias: float) -> Lean:
    r"""The plain LSTM's :class:`~gradflow.cells.base.Lean` step (gates ``i, f, g, o``).

    Projected input: all four gates' ``x W`` as one ``(T, *batch, 4H)`` array
    (:func:`~gradflow.cells.base.packed_projection`; the step adds the biases), so its gate
    cotangent is ``\bar z`` itself. Factors, one ``(*batch, 6H)`` array (one store per step):
    ``K = [g i(1-i), c_{t-1} f(1-f), i(1-g^2), tanh(c) o(1-o)]``, ``a = o(1 - tanh(c)^2)`` and
    ``f``. Backward: :math:`\bar c = \bar c_t + \bar h_t a`,
    :math:`\bar z = [\bar c, \bar c, \bar c, \bar h_t] \odot K`,
    :math:`\bar h_{t-1} = \bar z\, U^\top`, :math:`\bar c_{t-1} = \bar c \odot f`,
    :math:`\bar{xp} = \bar z`.
    """
    gates = ("i", "f", "g", "o")

    def forward(p, state, xp, t):
        c_prev = state["c"]
        H = c_prev.shape[-1]
        # every gate from ONE tanh of the (*batch, 4H) pre-activations (XLA's CPU backend
        # ends a fusion at each tanh with several users): sigma(z) = (1 + tanh(z/2)) / 2
        z = xp + packed(state["h"], p, gates, "U")
        half, one = jnp.full((H,), 0.5, z.dtype), jnp.ones((H,), z.dtype)
        zero = jnp.zeros((H,), z.dtype)
        shift = packed_bias(p, gates) + jnp.concatenate([zero, zero + forget_bias, zero, zero])
        s = jnp.tanh(jnp.concatenate([half, half, one, half]) * (z + shift))
        i, f = 0.5 * s[..., :H] + 0.5, 0.5 * s[..., H:2 * H] + 0.5
        g, o = s[..., 2 * H:3 * H], 0.5 * s[..., 3 * H:] + 0.5
        c = f * c_prev + i * g
        tc = jnp.tanh(c)
        h = o * tc
        k = jnp.concatenate([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g),
                             tc * o * (1 - o), o * (1 - tc * tc), f], axis=-1)
        return {"c": c, "h": h}, h, k

    def backward(p, factors, d):
        H = d["h"].shape[-1]
        k, a, f = factors[..., :4 * H], factors[..., 4 * H:5 * H], factors[..., 5 * H:]
        dc = d["c"] + d["h"] * a
        dz = jnp.concatenate([dc, dc, dc, d["h"]], axis=-1) * k
        return {"c": dc * f, "h": fused_transpose(dz, p, gates)}, dz

    return Lean(forward, backward, packed_projection(gates))


def _lstm(name: str, o: dict) -> Cell:
    o = dict(o)
    aux = choice(name, "aux", o["aux"], (None, "refine", "master"))
    mode = choice(name, "mode", o["mode"], REFINED_MODES)
    tied = bool(o["tied"])
    chunks = int(o["chunk_size"])
    if tied and aux == "master":
        raise ValueError(f"cell {name!r}: tied=True cannot be combined with aux='master'")
    if chunks < 1 or (chunks > 1 and aux != "master"):
        raise ValueError(f"cell {name!r}: chunk_size must be a positive integer and needs "
                         "aux='master'")
    ordered = o["ordered"]
    cumax_forget = bool(ordered) and aux != "master"  # Gu et al.'s O- and OR
    sigmoid_masters = aux == "master" and ordered is False  # their -M and UM
    for shift in ("forget_bias", "forget_bias_init"):  # one constant on every unit
        if cumax_forget and o[shift] is not None and float(o[shift]) != 0.0:
            raise ValueError(f"cell {name!r}: {shift} shifts the forget gate's sigmoid; "
                             "ordered=True gives it the cumax activation, which a constant "
                             f"shift does not change: leave {shift} out")
    if ordered is False and aux != "master":
        raise ValueError(f"cell {name!r}: ordered=False picks sigmoid master gates and needs "
                         "aux='master'; without master gates the forget gate is a sigmoid "
                         "already (ordered=None)")
    cand, sig, specs, reported = _layout(aux, tied, cumax_forget)
    if tied and isinstance(o["refined"], (list, tuple)) and "i" in o["refined"]:
        rest = [g for g in o["refined"] if g != "i"]  # (refined_lstm's default refines i, o)
        raise ValueError(f"cell {name!r}: tied=True ties the input gate to 1 - forget, so there "
                         f"is no input gate i to refine (refined={written_value(o['refined'])})"
                         + (f"; give refined={written_value(rest)} with it" if rest else
                            "; leave refined out with it"))
    rset = refined_set(name, o, sig)
    check_t_max(name, o)
    tie = bool(o["tie_refine_bias"])
    if tie and aux != "refine":
        raise ValueError(f"cell {name!r}: tie_refine_bias=True needs aux='refine'")

    init_fn = _init_fn(name, o, specs, aux, tied, tie, chunks)
    all_gates = tuple(specs)
    biased = tuple(g for g in all_gates if not (tie and g == "r"))

    def project(p, x):
        xp = {"a": input_projection(p, x, biased)}
        if tie:  # the refine gate's bias is minus the forget gate's
            xp["a"]["r"] = x @ p["r"]["W"] - p["f"]["b"]
        if rset:
            xp["x"] = x
        return xp

    def preact(p, state, xp, t):
        rec = recurrent_projection(p, state["h"], all_gates)
        z = {g: xp["a"][g] + rec[g] for g in all_gates}
        z["f"] = z["f"] + o["forget_bias"]
        return z

    def recur(p, state, xp, t):
        c = state["c"]
        z = preact(p, state, xp, t)
        act = {g: jax.nn.sigmoid(z[g]) for g in sig}
        if cumax_forget:
            act["f"] = cumax(z["f"])
        for g in rset:
            act[g] = refined(act[g], xp["x"], mode)
        gates = dict(act)
        keep = act["f"]
        inp = None if tied else act["i"]
        if aux == "refine":
            keep = gates["g"] = refine(act["f"], act["r"])
        elif aux == "master":
            masters = sigmoid_master if sigmoid_masters else cumax
            fm = masters(z["f_master"], chunks)
            im = 1.0 - masters(z["i_master"], chunks)
            gates["f_master"], gates["i_master"] = fm, im
            keep, inp = master(act["f"], act["i"], fm, im)
        if tied:
            inp = 1.0 - keep
        gates[cand] = jnp.tanh(z[cand])
        c = keep * c + inp * gates[cand]
        h = act["o"] * jnp.tanh(c)
        return {"c": c, "h": h}, h, {g: gates[g] for g in reported}

    retain = (("f", 1),) + ((("g", 1),) if aux == "refine" else ())
    kinds = {g: "refined" if g in rset else "sigmoid" for g in reported}
    kinds[cand] = "tanh"  # the candidate, tanh(W x + U h + b)
    kinds.update({"g": "effective"} if aux == "refine" else {})
    kinds.update({"f": "master"} if cumax_forget else {})
    kinds.update({g: "sigmoid" if sigmoid_masters else "master" for g in ("f_master", "i_master")
                  if aux == "master"})
    # A hand-written lean step for the plain equations only (aux, tied and refined gates: the
    # step made by autodiff).
    plain = aux is None and not tied and not rset and not cumax_forget
    return Cell(name=name, lean=_lean(float(o["forget_bias"])) if plain else None, init_fn=init_fn, project_fn=project, recur_fn=recur,
                state_names=("c", "h"), gate_kinds=tuple((g, kinds[g]) for g in reported),
                square=bool(rset), equation=_EQUATIONS.get(name, ""), forget=("f", 1),
                input_gate=None if tied else "i", retain=retain,
                refine_gate="r" if aux == "refine" else None, refine_mode=mode,
                preact_fn=lambda p, s, xp, t: {g: v for g, v in preact(p, s, xp, t).items()
                                               if g in sig})
