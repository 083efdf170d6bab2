"""Gate mechanisms as small pure functions, composed by the cells rather than copied into them.

* bias schemes: :func:`chrono_bias` (Tallec & Ollivier 2018), :func:`ugi_bias` (Gu et al. 2020),
  applied to a cell's forget-type gate by :func:`apply_bias_scheme`;
* :func:`refine` (Gu et al.'s refine gate), :func:`cumax` and :func:`master` (ON-LSTM's master
  gates, Shen et al. 2019; :func:`sigmoid_master` the master gate without the ordering, Gu et
  al.'s ``-M``), :func:`refined` (Cheng et al.'s refined gate).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gradflow.cells.base import set_bias, uniform


def ugi_bias(key, hidden_size: int, dtype=jnp.float32):
    r"""Uniform gate initialisation: :math:`u \sim U[1/H, 1-1/H]`, :math:`b = \sigma^{-1}(u)`.

    The gate then starts at activations spread uniformly over ``[1/H, 1-1/H]``, i.e. memory
    timescales ``1/(1-f)`` spread over ``[H/(H-1), H]`` (Gu et al. 2020, section 3.3).

    Returns: ``(H,)`` biases ``-log(1/u - 1)``. ``H = 1`` is a ValueError: the interval
    ``[1, 0]`` is empty (it gave an infinite bias, a gate stuck at 1).
    """
    if hidden_size < 2:
        raise ValueError(f"UGI (uniform gate initialisation) needs a hidden size of 2 or more "
                         f"(its gates spread over [1/H, 1-1/H]), got {hidden_size}; give "
                         "another init (e.g. init='orthogonal') or a larger hidden size")
    lo = 1.0 / hidden_size
    u = uniform(key, (hidden_size,), dtype, lo, 1.0 - lo)
    return -jnp.log(1.0 / u - 1.0)


def chrono_bias(key, hidden_size: int, t_max: float, dtype=jnp.float32):
    r"""Chrono initialisation: :math:`b_f = \log U[1, T_{max} - 1]` (Tallec & Ollivier 2018).

    Returns: ``(H,)`` forget biases; the input gate bias of an LSTM is set to ``-b_f``.
    """
    if not t_max > 2:
        raise ValueError(f"chrono initialisation needs t_max > 2, got {t_max}")
    return jnp.log(uniform(key, (hidden_size,), dtype, 1.0, t_max - 1.0))


def apply_bias_scheme(key, params, scheme: str | None, *, forget, input_gate=None, refine_gate=None,
                      t_max: float = 100.0, forget_bias_init=None):
    """Set a forget-type gate's bias (and its partners') by a scheme.

    Args:
      params: a cell's per-gate params.
      scheme: ``None``, ``"chrono"`` or ``"ugi"``.
      forget: ``(gate, sign)``: the gate keeping the previous state; sign -1 means the state
        is kept by ``1 - gate``, so the bias is negated to give the same retention.
      input_gate: chrono sets it to ``-b_f`` (LSTM's ``b_i``).
      refine_gate: UGI sets it to ``-b_f`` (Gu et al.'s ``b_r``).
      forget_bias_init: a constant ``b_f`` (applied after the scheme, if given).
    """
    if scheme is None and forget_bias_init is None:
        return params
    if forget is None:
        raise ValueError(f"bias scheme {scheme or 'forget_bias_init'!r} needs a cell with a "
                         "forget-type gate")
    gate, sign = forget
    hidden = params[gate]["b"].shape[0]
    dtype = params[gate]["b"].dtype
    if scheme == "chrono":
        b = chrono_bias(key, hidden, t_max, dtype)
        params = set_bias(params, gate, sign * b)
        if input_gate is not None:
            params = set_bias(params, input_gate, -b)
    elif scheme == "ugi":
        b = ugi_bias(key, hidden, dtype)
        params = set_bias(params, gate, sign * b)
        if refine_gate is not None:
            params = set_bias(params, refine_gate, -b)
    elif scheme is not None:
        raise ValueError(f"unknown bias scheme {scheme!r}; valid: 'chrono', 'ugi'")
    if forget_bias_init is not None:
        params = set_bias(params, gate, jnp.full((hidden,), sign * forget_bias_init, dtype))
    return params


def refine(f, r):
    r"""Gu et al.'s refine gate: the effective gate
    :math:`g = r (1-(1-f)^2) + (1-r) f^2`.

    ``g`` lies between ``f^2`` and ``1-(1-f)^2``; ``r`` interpolates, so a gate near saturation
    can still be pushed further without its own slope vanishing.
    """
    return r * (1.0 - (1.0 - f) ** 2) + (1.0 - r) * f ** 2


def cumax(a, chunks: int = 1):
    r"""ON-LSTM's cumulative softmax :math:`\mathrm{cumsum}(\mathrm{softmax}(a))` over the last
    axis; with ``chunks > 1`` each of the ``n`` values is repeated ``chunks`` times (chunked
    master gates: ``a: (..., H/chunks)`` gives ``(..., H)``).

    Clipped at 1: a softmax sums to 1 only to rounding, so the last entries (1 exactly, in
    exact arithmetic) came out at ``1 + ulp`` and were counted outside the gate's range
    ``[0, 1]``. The clip moves only such entries, by an ulp, where the derivative is 0 (the
    last entry is constant) or a rounding error."""
    y = jnp.minimum(jnp.cumsum(jax.nn.softmax(a, axis=-1), axis=-1), 1.0)
    return jnp.repeat(y, chunks, axis=-1) if chunks > 1 else y


def sigmoid_master(a, chunks: int = 1):
    """A master gate's sigmoid activation (Gu et al.'s ``-M``: the master gate without
    :func:`cumax`'s ordering), each value repeated ``chunks`` times as :func:`cumax` does."""
    y = jax.nn.sigmoid(a)
    return jnp.repeat(y, chunks, axis=-1) if chunks > 1 else y


def master(f, i, f_master, i_master):
    r"""ON-LSTM's master gates (Shen et al. 2019).

    :math:`\omega = \tilde f \odot \tilde i`, :math:`\hat f = f \odot \omega + (\tilde f - \omega)`,
    :math:`\hat i = i \odot \omega + (\tilde i - \omega)`, where ``f_master`` is
    :math:`\tilde f = \mathrm{cumax}(\cdot)` and ``i_master`` is :math:`\tilde i = 1-\mathrm{cumax}(\cdot)`.

    Returns: ``(f_hat, i_hat)``.
    """
    w = f_master * i_master
    return f * w + (f_master - w), i * w + (i_master - w)


REFINED_MODES = ("mul", "add")


def refined(g, x, mode: str = "mul"):
    r"""Cheng et al.'s refined gate: a vanilla gate's output short-connected to the input features.

    ``mode="mul"``: :math:`\hat g = g \odot x_t` (the form of the one public implementation,
    spago's LSTM); ``mode="add"``: :math:`\hat g = g + x_t`. **Uncertain**: the paper's full text
    was not available; both readings are kept so they can be compared. Needs ``in == H``.
    """
    if mode == "mul":
        return g * x
    if mode == "add":
        return g + x
    raise ValueError(f"unknown refined mode {mode!r}; valid: {', '.join(REFINED_MODES)}")


#: How many bias vectors a gate adds (a cell's ``biases`` option): none (PyTorch's
#: ``bias=False``), one (``b``), or PyTorch's two (``b`` and ``b_hh``, its ``b_ih`` and
#: ``b_hh``: the same function, and the parameter map counts PyTorch's parameters).
BIASES = (0, 1, 2)


def standard_init(specs, init: str, *, forget=None, input_gate=None, refine_gate=None,
                  t_max: float = 100.0, forget_bias_init=None, extra=None, biases: int = 1):
    """An ``init_fn`` for a gated cell: weight scheme per gate block, then the bias scheme.

    Args:
      specs: ``{gate: gate_params options}`` (e.g. ``{"z": {"recurrent": False}}``).
      init: the cell's ``init`` option (see :func:`gradflow.cells.base.parse_init`).
      forget, input_gate, refine_gate, t_max, forget_bias_init: as :func:`apply_bias_scheme`.
      extra: optional ``extra(key, input_size, hidden_size, dtype) -> dict`` of further params
        (e.g. a time gate's ``{"time": {...}}``).
      biases: :data:`BIASES`: 0 leaves out every gate's ``b`` (and a GRU's ``b_hn``); 2 adds
        ``b_hh`` beside ``b`` to every gate without a ``b_hn`` (drawn as ``b`` is under the
        ``torch`` scheme, as PyTorch draws it; zeros under other schemes and where a bias
        scheme or ``forget_bias_init`` sets ``b``, so that ``b + b_hh`` is what it set).
        (0 with a bias scheme is refused by :func:`check_biases`, when the cell is built.)
    """
    from gradflow.cells.base import init_gates, parse_init

    wscheme, bscheme = parse_init(init)
    if (bscheme is not None or forget_bias_init is not None) and forget is None:
        raise ValueError(f"init {init!r}: this cell has no forget-type gate for a bias scheme")

    def init_fn(key, input_size, hidden_size, dtype):
        kw, kb, ke = jax.random.split(key, 3)
        params = init_gates(kw, input_size, hidden_size, wscheme, dtype, specs)
        params = apply_bias_scheme(kb, params, bscheme, forget=forget, input_gate=input_gate,
                                   refine_gate=refine_gate, t_max=t_max,
                                   forget_bias_init=forget_bias_init)
        if biases != 1:  # (b_hh drawn as PyTorch draws it, unless b was set by a scheme)
            drawn = bscheme is None and forget_bias_init is None
            params = _bias_layout(jax.random.fold_in(kb, 1), params, biases,
                                  wscheme if drawn else None, dtype)
        if extra is not None:
            params.update(extra(ke, input_size, hidden_size, dtype))
        return params

    return init_fn


def check_biases(name: str, o: dict) -> int:
    """A cell's ``biases`` option (:data:`BIASES`; 1 where the cell has none), refused with an
    auxiliary gate (PyTorch's layers have none) and, at 0, with a bias scheme or
    ``forget_bias_init`` (nothing for them to set)."""
    value = o.get("biases", 1)
    if isinstance(value, bool) or value not in BIASES:
        raise ValueError(f"cell {name!r}: option biases={value!r} is not valid; choose from "
                         "0 (no biases, PyTorch's bias=False), 1 (one b per gate) or 2 "
                         "(PyTorch's b_ih and b_hh)")
    if value != 1 and o.get("aux") is not None:
        raise ValueError(f"cell {name!r}: biases={value} lays out the biases of PyTorch's "
                         f"plain layers; with aux={o['aux']!r} the cell is none of them")
    from gradflow.cells.base import parse_init

    setters = ([f"init={o.get('init')!r}"] if parse_init(o.get("init", "orthogonal"))[1]
               else []) + ([f"forget_bias_init={o['forget_bias_init']!r}"]
                           if o.get("forget_bias_init") is not None else [])
    if value == 0 and setters:
        raise ValueError(f"cell {name!r}: biases=0 (no biases) leaves no bias for "
                         f"{' and '.join(setters)} to set")
    return int(value)


def _bias_layout(key, params, biases: int, scheme, dtype):
    """``params`` with each gate's biases as ``biases`` (:data:`BIASES`) says; ``scheme``: the
    weight scheme that draws a ``b_hh`` (``torch``), None for zeros."""
    from gradflow.cells.base import bias

    out = {}
    for k, (g, p) in zip(jax.random.split(key, len(params)), params.items()):
        if not isinstance(p, dict) or "b" not in p:
            out[g] = p
        elif biases == 0:
            out[g] = {n: v for n, v in p.items() if n not in ("b", "b_hn")}
        elif "b_hn" in p:  # (a GRU's candidate: b and b_hn are already PyTorch's two)
            out[g] = p
        else:
            out[g] = {**p, "b_hh": bias(k, p["b"].shape[0], scheme or "zeros", dtype)}
    return out
