"""The one interface every recurrent cell implements, and the parameter helpers they share.

A cell is a frozen, hashable description (name + options) carrying four pure functions:

* ``init(key, input_size, hidden_size, dtype) -> params``: per-gate dicts named after the
  paper's symbols, ``params[gate] = {"W": (in, H), "U": (H, H), "b": (H,)}`` (``x @ W``).
* ``initial_state(batch_shape, hidden_size, dtype) -> state``: a dict of ``(*batch, H)`` arrays;
  ``state["h"]`` is always the cell's output, ``state["c"]`` the memory where there is one.
* ``project(params, x) -> xp``: everything that depends on the input alone (``W x + b`` for
  every gate, fused into one matmul). ``x`` may carry any leading axes, so a stack projects a
  whole ``(B, T, in)`` sequence at once.
* ``recur(params, state, xp, t) -> (state, h, gates)``: the recurrent part of one step, with
  ``xp`` the projection of this step's input and ``t`` the integer step index (used by the
  time-gated cells). ``gates`` maps each reported gate name to its ``(*batch, H)`` activation.

``step(params, state, x, t) = recur(params, state, project(params, x), t)`` is the plain
step function of the papers' equations.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Params = dict
State = dict

WEIGHT_SCHEMES = ("orthogonal", "glorot", "torch")
BIAS_SCHEMES = ("chrono", "ugi")


@dataclasses.dataclass(frozen=True)
class Cell:
    """A recurrent cell: static configuration plus its pure functions.

    Equality and hashing use ``name`` and ``options`` only, so a ``Cell`` is a valid static
    argument of ``jax.jit`` and two ``gradflow.cells.get("lstm")`` calls compile once.

    Attributes:
      name: registry name, e.g. ``"lstm"``.
      options: the options it was built with, as sorted ``(key, value)`` pairs.
      gate_names: the gates ``recur`` reports, in a fixed order.
      state_names: the keys of the state dict (``("h",)`` or ``("c", "h")``).
      square: True when the cell needs ``input_size == hidden_size`` (refined gates).
      equation: a one-line summary of the update, for listings.
      forget: ``(gate, sign)``: the parameter gate whose bias sets how much of the previous state
        is kept (sign -1 when the state is kept by ``1 - gate``), used by the bias schemes
        (chrono, UGI, ``forget_bias_init``); None if the cell has no such gate.
      retain: ``((gate, sign), ...)``: reported gates whose value (sign +1) or complement
        (sign -1) is the fraction of the previous state kept, for memory timescales.
    """

    name: str
    options: tuple
    gate_names: tuple
    state_names: tuple
    square: bool
    equation: str
    forget: tuple | None
    retain: tuple
    init_fn: Callable = dataclasses.field(compare=False, repr=False)
    project_fn: Callable = dataclasses.field(compare=False, repr=False)
    recur_fn: Callable = dataclasses.field(compare=False, repr=False)

    @property
    def config(self) -> dict:
        """``{"cell": name, **options}``: enough to rebuild the cell with ``cells.get``."""
        return {"cell": self.name, **dict(self.options)}

    def init(self, key, input_size: int, hidden_size: int, dtype=jnp.float32) -> Params:
        """Fresh parameters: per-gate ``{"W": (in, H), "U": (H, H), "b": (H,)}`` dicts."""
        if self.square and input_size != hidden_size:
            raise ValueError(
                f"cell {self.name!r} needs input_size == hidden_size (its refined gates multiply "
                f"by the input); got input_size={input_size}, hidden_size={hidden_size}. "
                "Use a Stack with input_projection=True."
            )
        return self.init_fn(key, int(input_size), int(hidden_size), jnp.dtype(dtype))

    def initial_state(self, batch_shape, hidden_size: int, dtype=jnp.float32) -> State:
        """Zero state: ``{name: zeros((*batch_shape, H))}`` for each of ``state_names``."""
        shape = tuple(batch_shape) + (int(hidden_size),)
        return {k: jnp.zeros(shape, dtype) for k in self.state_names}

    def project(self, params: Params, x) -> Any:
        """Input-only part of the step for ``x: (..., in)``; leading axes are kept."""
        return self.project_fn(params, x)

    def recur(self, params: Params, state: State, xp, t):
        """Recurrent part of one step: ``(state, h: (*batch, H), gates: {name: (*batch, H)})``."""
        return self.recur_fn(params, state, xp, t)

    def step(self, params: Params, state: State, x, t=0):
        """One step of the cell's equations on input ``x: (*batch, in)``."""
        return self.recur_fn(params, state, self.project_fn(params, x), t)

    def param_count(self, input_size: int, hidden_size: int) -> int:
        """Number of scalar parameters for the given sizes."""
        shapes = jax.eval_shape(lambda k: self.init(k, input_size, hidden_size), jax.random.key(0))
        return sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))


# ---------------------------------------------------------------------------------------------
# Parameter initialisation


def parse_init(init: str) -> tuple[str, str | None]:
    """Split an ``init`` option into ``(weight_scheme, bias_scheme)``.

    Accepted: a weight scheme (``orthogonal``, ``glorot``, ``torch``), a bias scheme (``chrono``,
    ``ugi``: orthogonal weights implied), or both joined by ``+`` (``"glorot+ugi"``).
    """
    if not isinstance(init, str):
        raise TypeError(f"init must be a string, got {type(init).__name__}")
    weight, bias = None, None
    for part in init.split("+"):
        if part in WEIGHT_SCHEMES and weight is None:
            weight = part
        elif part in BIAS_SCHEMES and bias is None:
            bias = part
        else:
            raise ValueError(
                f"unknown init {init!r}: use one of {', '.join(WEIGHT_SCHEMES + BIAS_SCHEMES)}, "
                "or a weight scheme and a bias scheme joined by '+' (e.g. 'glorot+chrono')"
            )
    return weight or "orthogonal", bias


def weight(key, shape, scheme: str, hidden_size: int, dtype):
    """One weight block ``(in, out)`` under a weight scheme.

    orthogonal: an orthogonal (semi-orthogonal if not square) matrix per block.
    glorot: ``U(-a, a)``, ``a = sqrt(6 / (in + out))``.
    torch: ``U(-1/sqrt(H), 1/sqrt(H))`` as PyTorch's RNN modules.
    """
    if scheme == "orthogonal":
        return jax.nn.initializers.orthogonal()(key, shape, dtype)
    if scheme == "glorot":
        return jax.nn.initializers.glorot_uniform()(key, shape, dtype)
    if scheme == "torch":
        a = 1.0 / math.sqrt(hidden_size)
        return jax.random.uniform(key, shape, dtype, -a, a)
    raise ValueError(f"unknown weight scheme {scheme!r}; valid: {', '.join(WEIGHT_SCHEMES)}")


def bias(key, hidden_size: int, scheme: str, dtype):
    """A bias vector: zeros, except ``U(-1/sqrt(H), 1/sqrt(H))`` under ``torch``."""
    if scheme == "torch":
        a = 1.0 / math.sqrt(hidden_size)
        return jax.random.uniform(key, (hidden_size,), dtype, -a, a)
    return jnp.zeros((hidden_size,), dtype)


def gate_params(key, input_size, hidden_size, scheme, dtype, *, recurrent=True, input=True,
                out=None, extra_bias=()):
    """``{"W": (in, n), "U": (H, n), "b": (n,)}`` for one gate, ``n = out or H``.

    ``recurrent=False``/``input=False`` leave out ``U``/``W``; ``extra_bias`` names further bias
    vectors (e.g. GRU's ``b_hn``).
    """
    n = out or hidden_size
    kw, ku, kb, ke = jax.random.split(key, 4)
    p = {}
    if input:
        p["W"] = weight(kw, (input_size, n), scheme, hidden_size, dtype)
    if recurrent:
        p["U"] = weight(ku, (hidden_size, n), scheme, hidden_size, dtype)
    p["b"] = bias(kb, n, scheme, dtype)
    for name, k in zip(extra_bias, jax.random.split(ke, max(len(extra_bias), 1))):
        p[name] = bias(k, n, scheme, dtype)
    return p


def init_gates(key, input_size, hidden_size, scheme, dtype, specs: Mapping[str, dict]):
    """Parameters for several gates; ``specs[gate]`` holds ``gate_params`` keyword options."""
    keys = jax.random.split(key, len(specs))
    return {g: gate_params(k, input_size, hidden_size, scheme, dtype, **kw)
            for k, (g, kw) in zip(keys, specs.items())}


# ---------------------------------------------------------------------------------------------
# Fused matmuls: one matmul for all gates, split back into per-gate pre-activations.


def fused(v, params: Params, gates, key: str, with_bias: bool = False) -> dict:
    """``{g: v @ params[g][key] (+ params[g]["b"])}`` computed as one matmul over all ``gates``.

    Args:
      v: ``(..., n)``.
      gates: gate names whose ``params[g][key]`` are ``(n, H)`` blocks.
    Returns:
      dict of ``(..., H)`` arrays.
    """
    gates = tuple(gates)
    if not gates:
        return {}
    blocks = [params[g][key] for g in gates]
    y = v @ jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else v @ blocks[0]
    if with_bias:
        y = y + jnp.concatenate([params[g]["b"] for g in gates])
    cuts = list(itertools.accumulate(b.shape[1] for b in blocks))[:-1]
    return dict(zip(gates, jnp.split(y, cuts, axis=-1)))


def input_projection(params: Params, x, gates) -> dict:
    """``{g: x @ W_g + b_g}`` for ``gates``: the input side of every gate in one matmul."""
    return fused(x, params, gates, "W", with_bias=True)


def recurrent_projection(params: Params, h, gates) -> dict:
    """``{g: h @ U_g}`` for ``gates``: the recurrent side of every gate in one matmul."""
    return fused(h, params, gates, "U")


def set_bias(params: Params, gate: str, value):
    """A copy of ``params`` with ``params[gate]["b"] = value``."""
    return {**params, gate: {**params[gate], "b": jnp.asarray(value, params[gate]["b"].dtype)}}


def check_options(name: str, given: Mapping[str, Any], valid: Mapping[str, Any]) -> dict:
    """Merge ``given`` options over defaults ``valid``; unknown keys raise a ValueError."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for cell {name!r}; "
            f"valid options: {', '.join(sorted(valid)) or '(none)'}"
        )
    return {**valid, **given}


def freeze(options: Mapping[str, Any]) -> tuple:
    """Options as sorted, hashable ``(key, value)`` pairs (lists become tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def choice(name: str, option: str, value, valid):
    """Raise a ValueError unless ``value`` is one of ``valid``."""
    if value not in valid:
        raise ValueError(
            f"cell {name!r}: option {option}={value!r} is not valid; choose from "
            f"{', '.join(map(repr, valid))}"
        )
    return value


def refined_set(name: str, options: dict, valid: tuple) -> tuple:
    """Validate and normalise a cell's ``refined`` option (gate names) in place; return it."""
    rset = (options["refined"],) if isinstance(options["refined"], str) else tuple(options["refined"])
    for g in rset:
        choice(name, "refined", g, valid)
    options["refined"] = rset
    return rset
