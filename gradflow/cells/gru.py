"""The GRU family: GRU (both reset placements), UR-GRU, MGU, and Cheng et al.'s refined GRU/MGU."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gradflow.cells.base import (Cell, Lean, choice, factory, fused_transpose, input_projection,
                                 matmul, packed, packed_bias, packed_projection,
                                 recurrent_projection, refined_set, check_t_max)
from gradflow.cells.mechanisms import (REFINED_MODES, check_biases, refine, refined,
                                       standard_init)

@factory
def gru(*, init: str = "orthogonal", reset: str = "after",
        forget_bias_init: float | None = None, t_max: float = 100.0, aux: str | None = None,
        refined: tuple[str, ...] = (), mode: str = "mul", biases: int = 1) -> Cell:
    r"""Gated recurrent unit, in the PyTorch/cuDNN (and Flax) form by default.

    .. math::
        r = \sigma(W_r x + U_r h + b_r),\quad z = \sigma(W_z x + U_z h + b_z)

        n = \tanh(W_n x + b_n + r \odot (U_n h + b_{hn})), \qquad
        h_t = (1 - z) \odot n + z \odot h_{t-1}

    ``reset="before"`` gives Cho et al.'s :math:`n = \tanh(W_n x + U_n (r \odot h) + b_n)` (no
    ``b_hn``). Params ``{"r", "z", "n"}``, ``params["n"]["b_hn"]`` in the default form.
    Reports ``r, z`` and the candidate ``n`` (kind ``"tanh"``).

    Options: ``init``, ``reset`` (``"after"``/``"before"``), ``forget_bias_init`` (initial
    ``b_z``), ``t_max``, ``aux`` (``"refine"``: see :func:`ur_gru`), ``refined``, ``mode``,
    ``biases`` (1: ``b`` and the candidate's ``b_hn``; 0: none, PyTorch's ``bias=False``; 2:
    PyTorch's ``b_ih`` and ``b_hh`` as ``b`` and ``b_hh`` in ``r`` and ``z``, the same function,
    whose parameter map counts PyTorch's parameters: :func:`gradflow.from_torch` sets it).
    """
    return _gru("gru", locals())


@factory
def ur_gru(*, init: str = "ugi", reset: str = "before",
        forget_bias_init: float | None = None, t_max: float = 100.0, aux: str | None = "refine",
        refined: tuple[str, ...] = (), mode: str = "mul") -> Cell:
    r"""UR-GRU (Gu et al. 2020): the update gate (the coefficient of :math:`h_{t-1}`), here
    ``f``, gets a refine gate and UGI; the reset gate ``r`` is kept.

    .. math::
        f = \sigma(W_f x + U_f h + b_f),\quad \rho = \sigma(W_\rho x + U_\rho h + b_\rho),\quad
        g = \rho \odot (1-(1-f)^2) + (1-\rho) \odot f^2

        h_t = g \odot h_{t-1} + (1 - g) \odot n

    with ``n`` as in :func:`gru`, reset before the recurrent matrix by default
    (:math:`n = \tanh(W_n x + U_n (r \odot h) + b_n)`, ``reset="before"``: the placement of the
    only UR-GRU code from the authors' group; ``reset="after"`` for the PyTorch form). Params
    ``{"r", "f", "refine", "n"}``; reports ``r, f, refine, g, n``. UGI by default
    (``b_f = σ⁻¹(U[1/H, 1-1/H])``, ``b_refine = -b_f``).
    """
    return _gru("ur_gru", locals())


@factory
def refined_gru(*, init: str = "orthogonal", reset: str = "after",
        forget_bias_init: float | None = None, t_max: float = 100.0, aux: str | None = None,
        refined: tuple[str, ...] = ("z", "r"), mode: str = "mul") -> Cell:
    r"""GRU with Cheng et al.'s refined update and reset gates,
    :math:`\hat z = \sigma(\cdot) \odot x_t`, :math:`\hat r = \sigma(\cdot) \odot x_t`
    (``mode="add"``: ``σ(·) + x_t``). **Uncertain** form (see :func:`mechanisms.refined`).
    Needs ``in == H``. Reports the refined ``r, z`` and the candidate ``n``.
    """
    return _gru("refined_gru", locals())


def _gates_rz(a):
    r"""``r, z`` from ONE tanh of the ``(*batch, 2H)`` pre-activations ``a = [a_r, a_z]``,
    :math:`\sigma(v) = (1 + \tanh(v/2)) / 2`."""
    H = a.shape[-1] // 2
    u = 0.5 * jnp.tanh(0.5 * a) + 0.5
    return u[..., :H], u[..., H:]


def _lean(reset: str) -> Lean:
    r"""The plain GRU's :class:`~gradflow.cells.base.Lean` step (gates ``r, z, n``), both reset
    placements. Projected input: the three gates' ``x W`` as one ``(T, *batch, 3H)`` array
    (:func:`~gradflow.cells.base.packed_projection`; the step adds the biases). With
    :math:`K_n = (1-z)(1-n^2)`:

    ``reset="after"``: factors ``K = [K_n (U_n h + b_{hn}) r(1-r), (h-n) z(1-z), K_n r]``,
    ``K_n``, ``z``; :math:`\bar{a} = [\bar h K_r, \bar h K_z, \bar h K_n]`,
    :math:`\bar h_{t-1} = \bar h z + (\bar h \odot K) U^\top` (one matmul).
    ``reset="before"``: :math:`\bar a_n = \bar h K_n`, :math:`\overline{rh} = \bar a_n U_n^\top`,
    :math:`\bar a_r = \overline{rh} \odot h r(1-r)`, :math:`\bar a_z = \bar h (h-n) z(1-z)`,
    :math:`\bar h_{t-1} = \bar h z + \overline{rh} \odot r + [\bar a_r, \bar a_z] [U_r, U_z]^\top`
    (two matmuls, the second needing the first).
    """
    inputs = ("r", "z", "n")
    if reset == "after":
        def forward(p, state, xp, t):
            h = state["h"]
            H = h.shape[-1]
            rec = packed(h, p, inputs, "U")
            xp = xp + packed_bias(p, inputs)
            r, z = _gates_rz(xp[..., :2 * H] + rec[..., :2 * H])
            hn = rec[..., 2 * H:] + p["n"].get("b_hn", 0.0)
            n = jnp.tanh(xp[..., 2 * H:] + r * hn)
            new = (1.0 - z) * n + z * h
            kn = (1.0 - z) * (1.0 - n * n)
            k = jnp.concatenate([kn * hn * r * (1 - r), (h - n) * z * (1 - z), kn * r], axis=-1)
            return {"h": new}, new, (k, kn, z)

        def backward(p, factors, d):
            k, kn, z = factors
            dh = d["h"]
            H = dh.shape[-1]
            dy = jnp.concatenate([dh, dh, dh], axis=-1) * k
            dxp = jnp.concatenate([dy[..., :2 * H], dh * kn], axis=-1)
            return {"h": dh * z + fused_transpose(dy, p, inputs)}, dxp
    else:
        gates = ("r", "z")

        def forward(p, state, xp, t):
            h = state["h"]
            H = h.shape[-1]
            xp = xp + packed_bias(p, inputs)
            r, z = _gates_rz(xp[..., :2 * H] + packed(h, p, gates, "U"))
            n = jnp.tanh(xp[..., 2 * H:] + (r * h) @ p["n"]["U"])
            new = (1.0 - z) * n + z * h
            return {"h": new}, new, ((1.0 - z) * (1.0 - n * n), (h - n) * z * (1 - z),
                                     h * r * (1 - r), r, z)

        def backward(p, factors, d):
            kn, kz, kr, r, z = factors
            dh = d["h"]
            dan = dh * kn
            drh = fused_transpose(dan, p, ("n",))
            dy = jnp.concatenate([drh * kr, dh * kz], axis=-1)
            return ({"h": dh * z + drh * r + fused_transpose(dy, p, gates)},
                    jnp.concatenate([dy, dan], axis=-1))

    return Lean(forward, backward, packed_projection(inputs))


def _gru(name: str, o: dict) -> Cell:
    o = dict(o)
    aux = choice(name, "aux", o["aux"], (None, "refine"))
    reset = choice(name, "reset", o["reset"], ("after", "before"))
    mode = choice(name, "mode", o["mode"], REFINED_MODES)
    upd = "f" if aux == "refine" else "z"
    sig = ("r", upd) + (("refine",) if aux == "refine" else ())
    rset = refined_set(name, o, sig)
    check_t_max(name, o)
    specs = {"r": {}, upd: {}}
    if aux == "refine":
        specs["refine"] = {}
    specs["n"] = {"extra_bias": ("b_hn",)} if reset == "after" else {}
    rec_gates = tuple(specs) if reset == "after" else sig
    init_fn = standard_init(specs, o["init"], forget=(upd, 1),
                            refine_gate="refine" if aux == "refine" else None, t_max=o["t_max"],
                            forget_bias_init=o["forget_bias_init"],
                            biases=check_biases(name, o))
    reported = sig + (("g",) if aux == "refine" else ()) + ("n",)  # n: the tanh candidate

    def project(p, x):
        xp = {"a": input_projection(p, x, tuple(specs))}
        if rset:
            xp["x"] = x
        return xp

    def preact(p, state, xp, t):
        rec = recurrent_projection(p, state["h"], sig)
        return {g: xp["a"][g] + rec[g] for g in sig}

    def recur(p, state, xp, t):
        h = state["h"]
        rec = recurrent_projection(p, h, rec_gates)
        gates = {g: jax.nn.sigmoid(xp["a"][g] + rec[g]) for g in sig}
        for g in rset:
            gates[g] = refined(gates[g], xp["x"], mode)
        if reset == "after":
            n = jnp.tanh(xp["a"]["n"] + gates["r"] * (rec["n"] + p["n"].get("b_hn", 0.0)))
        else:
            n = jnp.tanh(xp["a"]["n"] + matmul(gates["r"] * h, p["n"]["U"]))
        gates["n"] = n
        keep = gates[upd]
        if aux == "refine":
            keep = gates["g"] = refine(gates["f"], gates["refine"])
        h = (1.0 - keep) * n + keep * h
        return {"h": h}, h, gates

    retain = ((upd, 1),) + ((("g", 1),) if aux == "refine" else ())
    eq = {"gru": "n = tanh(Wx + r*(Uh + b_hn) + b); h = (1-z)*n + z*h",
          "ur_gru": "g = r'(1-(1-f)^2) + (1-r')f^2; h = g*h + (1-g)*n",
          "refined_gru": "GRU with z, r refined: sigma(Wx+Uh+b) * x"}.get(name, "")
    kinds = {g: "refined" if g in rset else "sigmoid" for g in sig}
    kinds.update({"g": "effective"} if aux == "refine" else {})
    kinds["n"] = "tanh"
    plain = aux is None and not rset  # a lean backward for the plain equations only
    return Cell(name=name, init_fn=init_fn, project_fn=project, recur_fn=recur,
                lean=_lean(reset) if plain else None,
                gate_kinds=tuple((g, kinds[g]) for g in reported), square=bool(rset),
                equation=eq, forget=(upd, 1), retain=retain,
                refine_gate="refine" if aux == "refine" else None, refine_mode=mode,
                preact_fn=preact)


@factory
def mgu(*, init: str = "orthogonal", variant: str = "zhou",
        forget_bias_init: float | None = None, t_max: float = 100.0,
        refined: tuple[str, ...] = (), mode: str = "mul") -> Cell:
    r"""Minimal gated unit (Zhou et al. 2016).

    .. math::
        f = \sigma(W_f x + U_f h + b_f),\quad
        \tilde n = \tanh(W_n x + U_n (f \odot h_{t-1}) + b_n), \qquad
        h_t = (1 - f) \odot h_{t-1} + f \odot \tilde n

    ``variant="flax"`` is the form of Flax's ``MGUCell`` (a GRU with ``r = z = f``):
    :math:`n = \tanh(W_n x + b_n + f \odot (U_n h + b_{hn}))`,
    :math:`h_t = (1 - f) \odot n + f \odot h_{t-1}` (``f`` keeps the state instead of
    admitting the candidate, and ``params["n"]["b_hn"]`` exists). Reports ``f`` and the
    candidate ``n`` (kind ``"tanh"``).

    ``forget_bias_init=v``, chrono and UGI set how much of the state is kept, as for an LSTM's
    forget gate: where the state is kept by ``1 - f`` (Zhou's form; Flax's keeps it by ``f``)
    the bias is negated, ``b_f = -v``. SPEC's ``b_f = v`` reads the gate as the one that keeps
    the state; this reading keeps ``v`` meaning the same retention in every cell.
    """
    return _mgu("mgu", locals())


@factory
def refined_mgu(*, init: str = "orthogonal", variant: str = "zhou",
        forget_bias_init: float | None = None, t_max: float = 100.0,
        refined: tuple[str, ...] = ("f",), mode: str = "mul") -> Cell:
    r"""MGU with Cheng et al.'s refined forget gate :math:`\hat f = \sigma(\cdot) \odot x_t`
    (``mode="add"``: ``σ(·) + x_t``). **Uncertain** form (see :func:`mechanisms.refined`).
    Needs ``in == H``. Reports the refined ``f`` and the candidate ``n``.
    """
    return _mgu("refined_mgu", locals())


def _mgu(name: str, o: dict) -> Cell:
    o = dict(o)
    variant = choice(name, "variant", o["variant"], ("zhou", "flax"))
    mode = choice(name, "mode", o["mode"], REFINED_MODES)
    rset = refined_set(name, o, ("f",))
    check_t_max(name, o)
    specs = {"f": {}, "n": {"extra_bias": ("b_hn",)} if variant == "flax" else {}}
    sign = 1 if variant == "flax" else -1
    init_fn = standard_init(specs, o["init"], forget=("f", sign), t_max=o["t_max"],
                            forget_bias_init=o["forget_bias_init"])

    def project(p, x):
        xp = {"a": input_projection(p, x, ("f", "n"))}
        if rset:
            xp["x"] = x
        return xp

    def preact(p, state, xp, t):
        return {"f": xp["a"]["f"] + matmul(state["h"], p["f"]["U"])}

    def recur(p, state, xp, t):
        h = state["h"]
        if variant == "flax":
            rec = recurrent_projection(p, h, ("f", "n"))
            f = jax.nn.sigmoid(xp["a"]["f"] + rec["f"])
            f = refined(f, xp["x"], mode) if rset else f
            n = jnp.tanh(xp["a"]["n"] + f * (rec["n"] + p["n"].get("b_hn", 0.0)))
            h = (1.0 - f) * n + f * h
        else:
            f = jax.nn.sigmoid(xp["a"]["f"] + matmul(h, p["f"]["U"]))
            f = refined(f, xp["x"], mode) if rset else f
            n = jnp.tanh(xp["a"]["n"] + matmul(f * h, p["n"]["U"]))
            h = (1.0 - f) * h + f * n
        return {"h": h}, h, {"f": f, "n": n}

    eq = {"mgu": "n = tanh(Wx + U(f*h) + b); h = (1-f)*h + f*n",
          "refined_mgu": "MGU with f refined: sigma(Wx+Uh+b) * x"}.get(name, "")
    return Cell(name=name, init_fn=init_fn, project_fn=project, recur_fn=recur,
                gate_kinds=(("f", "refined" if rset else "sigmoid"), ("n", "tanh")),
                square=bool(rset),
                equation=eq, forget=("f", sign), retain=(("f", sign),), refine_mode=mode,
                preact_fn=preact)
