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
import functools
import inspect
import itertools
import math
import operator
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from gradflow.errors import InputError, InputTypeError

Params = dict
State = dict

WEIGHT_SCHEMES = ("orthogonal", "glorot", "torch")
BIAS_SCHEMES = ("chrono", "ugi")


KINDS = ("sigmoid", "tanh", "refined", "effective", "master", "time", "other")
"""Gate kinds a cell may declare (see :attr:`Cell.gate_kinds`)."""


def _identity_project(params, x):
    return x


class Lean(NamedTuple):
    r"""A cell's hand-written backward of one recurrent step (optional, see :attr:`Cell.lean`).

    * ``forward(params, state, xp_t, t) -> (new_state, h, factors)``: the step of
      :meth:`Cell.recur` from the projected input ``xp_t = cell.project(params, x_t)``, also
      returning the local derivative factors (a pytree of ``(*batch, H)``-type arrays) that make
      the step's backward linear.
    * ``backward(params, factors, d_new_state) -> (d_state, d_xp_t)``: the vector-Jacobian
      product of that step w.r.t. the previous state and ``xp_t`` (same pytrees as ``state``
      and ``xp_t``), for a state cotangent ``d_new_state``, with the parameters held constant:
      element-wise products with the factors plus the recurrent weights' transpose.

    * ``project(params, x) -> xp`` (optional): the input side of every step in the layout
      ``forward`` reads and ``backward`` returns, in place of :meth:`Cell.project`'s; e.g. all
      gates' projections as ONE ``(T, *batch, G*H)`` array (:func:`packed_projection`) instead
      of a dict of ``G`` arrays, so a step reads one slice of it and writes one slice of its
      cotangent (a per-gate dict costs ``G`` slices and a concatenation per step in each
      direction); or a tuple of arrays where the step uses the gates apart (STAR: its input
      cotangent is then two stores, not a concatenation and a store). The stack differentiates
      it by autodiff: its transpose is one matmul per layer when it is linear in ``x`` (a
      nonlinear one makes the backward recompute it per layer). Best the input matmul alone,
      the step adding the biases (:func:`packed_bias`): there the addition fuses into the
      step's first element-wise operation, where in the projection it is a pass of its own
      over the layer's whole sequence (LSTM's split map 0.93-0.97 of the time).

    The stack runs it only for the state maps (parameters constant); ``jax.grad`` w.r.t. the
    parameters always uses autodiff of ``recur``. A cell without one gets a step made by
    autodiff of ``recur`` (:func:`gradflow.stack.autodiff_step`) in the same place.
    """

    forward: Callable
    backward: Callable
    project: Callable | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell:
    r"""A recurrent cell: static configuration plus its pure functions; it describes itself.

    Construction is keyword-only. Equality and hashing use every field, the functions by
    identity: two cells built from different functions never compare equal (so they never
    share a ``jax.jit`` cache entry), while the registered factories are memoised on their
    options, so ``gradflow.cells.get("lstm")`` twice returns the same cell and compiles once.

    Attributes:
      name: a label, e.g. ``"lstm"`` (not an identity: user cells may share one).
      init_fn: ``(key, input_size, hidden_size, dtype) -> params``.
      recur_fn: ``(params, state, xp, t) -> (state, h, gates)``.
      project_fn: ``(params, x) -> xp``, the input-only part (default: ``xp = x``).
      options: the options it was built with, as sorted ``(key, value)`` pairs.
      state_names: the keys of the state dict (``("h",)`` or ``("c", "h")``).
      gate_kinds: ``((gate, kind), ...)`` for the gates ``recur`` reports, in order. Kinds:
        ``"sigmoid"`` (:math:`\sigma(z)`), ``"refined"`` (Cheng et al.: :math:`\sigma(z) \odot x`
        or :math:`\sigma(z) + x`), ``"effective"`` (Gu et al.'s
        :math:`g = r(1-(1-f)^2) + (1-r)f^2`), ``"master"`` (ON-LSTM's cumax gates), ``"time"``
        (a time gate ``k_t``), ``"tanh"`` (a user's :math:`\tanh(z)` gate, saturated near
        :math:`\pm 1`) and ``"other"`` (a user gate with no known form).
      square: True when the cell needs ``input_size == hidden_size`` (refined gates).
      equation: a one-line summary of the update, for listings.
      forget: ``(gate, sign)``: the parameter gate whose bias sets how much of the previous state
        is kept (sign -1 when the state is kept by ``1 - gate``), used by the bias schemes
        (chrono, UGI, ``forget_bias_init``); None if the cell has no such gate.
      input_gate: the parameter gate that admits the candidate (chrono sets ``b_i = -b_f``).
      retain: ``((gate, sign), ...)``: reported gates whose value (sign +1) or complement
        (sign -1) is the fraction of the previous state kept, for memory timescales.
      refine_gate: the reported auxiliary gate ``r`` behind an ``"effective"`` gate.
      refine_mode: ``"mul"``/``"add"``: the form of the ``"refined"`` gates.
      time_gate: the reported time gate (``"k"`` of g-LSTM/Phased LSTM), or None.
      rescale_time: ``(layer_params, ratio) -> layer_params``: the time parameters stretched
        by ``ratio`` (a temporal curriculum changing the sequence length), or None.
      length_option: an option that is the sequence length the cell is initialised for
        (g-LSTM's ``steps``); problems set it to their ``steps``. None if there is none.
      preact_fn: ``(params, state, xp, t) -> {gate: z}``: the pre-activations ``z`` of the
        ``"sigmoid"``/``"refined"`` gates (``a = sigma(z)`` before any refinement), or None.
      to_params: for adapters, ``(user object) -> params`` (e.g. a trained module's weights).
      lean: a :class:`Lean` (hand-written step backward over stored factors) or None: the
        state maps (:func:`gradflow.gradient_map` with ``wrt="hidden"``/``"cell"``) then run
        it instead of the step made by autodiff (:func:`gradflow.stack.autodiff_step`); it
        must equal autodiff of ``recur`` (tests/test_lean.py).
      couples_batch: True when a step mixes the examples of a batch (batch statistics, as
        BN-STAR's training-mode batch norm): the maps then never split a batch over devices
        (:mod:`gradflow.parallel`), since a part of the batch would change the numbers.
    """

    name: str
    init_fn: Callable = dataclasses.field(repr=False)
    recur_fn: Callable = dataclasses.field(repr=False)
    project_fn: Callable = dataclasses.field(default=_identity_project, repr=False)
    options: tuple = ()
    state_names: tuple = ("h",)
    gate_kinds: tuple = ()
    square: bool = False
    equation: str = ""
    forget: tuple | None = None
    input_gate: str | None = None
    retain: tuple = ()
    refine_gate: str | None = None
    refine_mode: str = "mul"
    time_gate: str | None = None
    rescale_time: Callable | None = dataclasses.field(default=None, repr=False)
    length_option: str | None = None
    preact_fn: Callable | None = dataclasses.field(default=None, repr=False)
    to_params: Callable | None = dataclasses.field(default=None, repr=False)
    lean: Lean | None = dataclasses.field(default=None, repr=False)
    couples_batch: bool = False

    def __post_init__(self):
        if "h" not in self.state_names:
            raise ValueError(f"cell {self.name!r}: state_names must include 'h' (the output), "
                             f"got {self.state_names}")
        for g, kind in self.gate_kinds:
            if kind not in KINDS:
                raise ValueError(f"cell {self.name!r}: gate {g!r} has unknown kind {kind!r}; "
                                 f"valid kinds: {', '.join(KINDS)}")

    @property
    def gate_names(self) -> tuple:
        """The gates ``recur`` reports, in a fixed order."""
        return tuple(g for g, _ in self.gate_kinds)

    @property
    def kinds(self) -> dict:
        """``{gate: kind}`` (see ``gate_kinds``)."""
        return dict(self.gate_kinds)

    @property
    def config(self) -> dict:
        """``{"cell": name, **options}``: enough to rebuild a registered cell with ``cells.get``."""
        return {"cell": self.name, **dict(self.options)}

    @property
    def label(self) -> str:
        """The cell as titles name it, in ``gradflow compare --cells``' syntax (a tuple's
        items joined by ``+``; typed back as ``--cell``, it builds this cell): its name and
        the options it was built with that differ from its factory's defaults
        (``"lstm:forget_bias=1.0"``), but ``init`` (a result names it apart) and the length a
        time gate is initialised over (the sequences' by default); the name alone for a cell
        not built by a factory."""
        if self.name not in _FACTORIES:
            return self.name
        defaults, own = _default_options(self.name), dict(self.options)
        changed = {k: v for k, v in own.items() if k in defaults and defaults[k] != v}

        def implied(k):  # by the others (star's variant sets its t_max)
            try:
                rest = {o: v for o, v in changed.items() if o != k}
                return dict(_FACTORIES[self.name](**rest).options).get(k) == own[k]
            except (TypeError, ValueError):
                return False

        shown = [f"{k}={written_value(v)}" for k, v in changed.items()
                 if k not in ("init", self.length_option) and not implied(k)]
        return self.name + (":" + ",".join(shown) if shown else "")

    def for_length(self, steps: int) -> "Cell":
        """This cell initialised for sequences of ``steps`` (only cells with a
        ``length_option`` change; built from the same registered factory)."""
        if self.length_option is None or self.name not in _FACTORIES:
            return self
        return _FACTORIES[self.name](**{**dict(self.options), self.length_option: int(steps)})

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

    def preactivations(self, params: Params, state: State, x, t=0) -> dict:
        """``{gate: z}`` for the cell's sigmoid/refined gates at one step (``x: (*batch, in)``)."""
        if self.preact_fn is None:
            raise ValueError(f"cell {self.name!r} does not declare its gate pre-activations")
        return self.preact_fn(params, state, self.project_fn(params, x), t)

    def param_count(self, input_size: int, hidden_size: int) -> int:
        """Number of scalar parameters for the given sizes."""
        shapes = jax.eval_shape(lambda k: self.init(k, input_size, hidden_size), jax.random.key(0))
        return sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))


_FACTORIES: dict = {}


@functools.lru_cache(maxsize=None)
def _default_options(name: str) -> dict:
    """The options of the registered cell ``name`` built with none given."""
    return dict(_FACTORIES[name]().options)


def written_value(v) -> str:
    """An option's value as a cell is written (``refined=i+f``, ``tied=True``)."""
    if isinstance(v, (tuple, list)):
        return "+".join(map(str, v))
    return str(v)


def factory(fn: Callable) -> Callable:
    """Register a cell factory and memoise it on its (keyword-only, typed) options.

    The factory's signature is its documentation (``help()``, IDEs); unknown options raise a
    ValueError listing the valid ones; equal options (defaults filled in) give the very same
    :class:`Cell`, so jitted measurements compile once per configuration. The cell's
    ``options`` are the bound arguments, updated by any ``options`` the factory's cell resolves
    itself (e.g. ``star``'s variant-dependent ``init``).
    """
    sig = inspect.signature(fn)
    valid = tuple(sig.parameters)

    @functools.lru_cache(maxsize=None)
    def cached(frozen):
        cell = _build(frozen)
        if cell.options != frozen:  # defaults the factory resolved: the cell of those options
            canonical = cached(cell.options)  # (so a cell rebuilt from them is this very cell)
            if canonical.options == cell.options:
                return canonical
        return cell

    def _build(frozen):
        cell = fn(**dict(frozen))  # a factory may resolve option defaults in cell.options
        return dataclasses.replace(cell, options=freeze({**dict(frozen), **dict(cell.options)}))

    @functools.wraps(fn)
    def make(**options) -> Cell:
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for cell {fn.__name__!r}; "
                f"valid options: {', '.join(valid) or '(none)'}")
        options = {k: _check_option(fn.__name__, k, v, sig.parameters[k].annotation)
                   for k, v in options.items()}
        bound = sig.bind(**options)
        bound.apply_defaults()
        frozen = freeze(bound.arguments)
        try:
            hash(frozen)
        except TypeError:
            return _build(frozen)
        return cached(frozen)

    make.valid_options = valid
    _FACTORIES[fn.__name__] = make
    return make


def _check_option(cell: str, key: str, value, annotation: str):
    """An option's value checked against its annotation: a ValueError naming the option when
    one typed ``bool`` is given anything but a bool
    (or the text ``"true"``/``"false"``, any case: returned as the bool), or one typed
    ``float`` or ``int`` (``| None``) is given
    something that is not a number (``forget_bias="abc"`` from a CLI ``--option``, ``True``),
    a NaN or an infinity (no option of a cell means anything there), or, typed ``int``, a
    fraction (``chunk_size=2.5``); NumPy and JAX scalars are numbers. Returns the value, an
    integral float given for an ``int`` option as that ``int`` (``2.0`` from a CLI is 2), and
    a tuple option given as text as :attr:`Cell.label` writes it, its items joined by ``+``
    (``refined="i+f"`` is ``("i", "f")``, ``log_tau="1.0+3.0"`` is ``(1.0, 3.0)``, ``""`` is
    ``()``), so that a label typed back as ``--cell`` builds its cell."""
    text = str(annotation)
    kind, optional = text.removesuffix(" | None"), text.endswith(" | None")
    if value is None and optional:
        return value
    if kind == "bool":  # "False" from a command line was a truthy string: a tied LSTM
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"option {key}={value!r} of cell {cell!r} takes true or false, got "
                         f"{type(value).__name__}")
    given = value
    if kind.startswith("tuple[") and isinstance(value, str):  # as a label writes it: i+f
        value = tuple(re.split(r"(?<![eE])\+", value)) if value else ()  # (not 1e+20's)
    if kind == "tuple[float, float]":  # a range: two finite numbers
        if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            try:  # ("1.0", "3.0") from the text "1.0+3.0"
                value = tuple(float(v) for v in value)
            except ValueError:
                pass
        pair = tuple(value) if isinstance(value, (list, tuple)) else None
        if pair is None or len(pair) != 2 or not all(
                isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                and math.isfinite(float(v)) for v in pair):
            raise ValueError(f"option {key}={given!r} of cell {cell!r} takes two finite "
                             "numbers (low, high)")
        return tuple(float(v) for v in pair)
    if kind not in ("float", "int"):
        return value
    try:
        number = float(value)
        ok = not isinstance(value, (str, bytes, bool))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"option {key}={value!r} of cell {cell!r} takes a number "
                         f"({annotation}), got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"option {key}={number!r} of cell {cell!r} must be a finite number")
    if kind == "int":
        if not number.is_integer():
            raise ValueError(f"option {key}={value!r} of cell {cell!r} takes an integer, got "
                             f"{number!r}")
        try:
            operator.index(value)
        except TypeError:
            return int(number)
    return value


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


# One problem at every precision: every random number gradflow uses is a standard variate drawn
# in float32 (the same bits whatever the dtype and whether 64-bit JAX is on) and cast; what is
# computed from it (an affine map, a QR, a log) is computed in the target dtype. A float64
# problem is thus the float32 problem up to float32 rounding, and an orthogonal float64 block is
# orthogonal to float64 accuracy.


def cast_floating(tree, dtype):
    """Floating leaves of ``tree`` as ``dtype`` (other leaves unchanged): trained weights
    brought to a stack's dtype (:meth:`gradflow.Stack.params_from`, the adapters)."""
    def one(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree_util.tree_map(one, tree)


def normal(key, shape, dtype=jnp.float32):
    """Standard normal draws of ``shape``: float32 draws cast to ``dtype``."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def uniform(key, shape, dtype=jnp.float32, minval=0.0, maxval=1.0):
    """``U[minval, maxval)`` draws of ``shape``: float32 ``U[0, 1)`` draws cast to ``dtype``,
    then mapped affinely in ``dtype`` as ``jax.random.uniform`` maps them (jitted like it, so
    float32 draws are bit for bit ``jax.random.uniform``'s, fused multiply-add included)."""
    u = jax.random.uniform(key, shape, jnp.float32).astype(dtype)
    lo, hi = jnp.asarray(minval, dtype), jnp.asarray(maxval, dtype)
    return jnp.maximum(lo, u * (hi - lo) + lo)


def orthogonal(key, shape, dtype=jnp.float32):
    """An ``(n, m)`` matrix with orthonormal columns (``n >= m``) or rows (``n < m``): the Q
    factor, signs fixed by ``diag(R) > 0``, of the QR decomposition (in ``dtype``) of a
    :func:`normal` ``(max, min)`` matrix (``jax.nn.initializers.orthogonal``'s construction)."""
    n, m = shape
    q, r = jnp.linalg.qr(normal(key, (max(n, m), min(n, m)), dtype))
    q = q * jnp.sign(jnp.diag(r))
    return q if n >= m else q.T


def weight(key, shape, scheme: str, hidden_size: int, dtype):
    """One weight block ``(in, out)`` under a weight scheme.

    orthogonal: an orthogonal (semi-orthogonal if not square) matrix per block.
    glorot: ``U(-a, a)``, ``a = sqrt(6 / (in + out))``.
    torch: ``U(-1/sqrt(H), 1/sqrt(H))`` as PyTorch's RNN modules.
    """
    if scheme == "orthogonal":
        return orthogonal(key, shape, dtype)
    if scheme == "glorot":
        # jax.nn.initializers.glorot_uniform's arithmetic: sqrt(3 var), var = 2 / (in + out)
        scale = jnp.sqrt(3 * jnp.asarray(2.0 / sum(shape), dtype))
        return uniform(key, shape, dtype, -1.0, 1.0) * scale
    if scheme == "torch":
        a = 1.0 / math.sqrt(hidden_size)
        return uniform(key, shape, dtype, -a, a)
    raise ValueError(f"unknown weight scheme {scheme!r}; valid: {', '.join(WEIGHT_SCHEMES)}")


def bias(key, hidden_size: int, scheme: str, dtype):
    """A bias vector: zeros, except ``U(-1/sqrt(H), 1/sqrt(H))`` under ``torch``."""
    if scheme == "torch":
        a = 1.0 / math.sqrt(hidden_size)
        return uniform(key, (hidden_size,), dtype, -a, a)
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
    y = packed(v, params, gates, key, with_bias)
    cuts = list(itertools.accumulate(params[g][key].shape[1] for g in gates))[:-1]
    return dict(zip(gates, jnp.split(y, cuts, axis=-1)))


def packed(v, params: Params, gates, key: str, with_bias: bool = False):
    """:func:`fused` without the split: ``v @ concat(params[g][key]) (+ concat(b))``, one
    ``(..., sum of the blocks' widths)`` array with the gates' blocks in the order of ``gates``."""
    blocks = [params[g][key] for g in gates]
    m = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
    y = matmul(v, m)
    if with_bias:
        y = y + jnp.concatenate([gate_bias(params[g]) for g in gates])
    return y


def gate_bias(p):
    """A gate's bias: its ``"b"``, plus ``"b_hh"`` where the cell keeps PyTorch's second bias
    apart (``biases=2``), zeros where it has none (``biases=0``)."""
    parts = [p[k] for k in ("b", "b_hh") if k in p]
    if parts:
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]
    ref = p["W"] if "W" in p else p["U"]
    return jnp.zeros(ref.shape[-1:], ref.dtype)


def fused_transpose(dy, params: Params, gates, key: str = "U"):
    """``dy @ concat(params[g][key] for g in gates).T``: the transpose of :func:`fused` (no
    bias) as one matmul, for ``dy: (..., sum of the blocks' widths)`` -> ``(..., n)``.

    The transposed matrix is materialised (``lax.optimization_barrier`` keeps XLA from
    folding the transpose back into the dot): inside a scan XLA hoists it out of the loop,
    and XLA's CPU matmul with a transposed right operand repacks it on every call (LSTM,
    ``(16, 512) x (512, 128)``: 18 us per step vs 11 us; the lean map 10% faster).
    """
    blocks = [params[g][key] for g in gates]
    m = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
    return jax.lax.dot_general(dy, _transposed(m), (((dy.ndim - 1,), (0,)), ((), ())))


def _transposed(m):
    """``m.T`` materialised: the barrier keeps XLA from folding the transpose back into the
    dot that reads it (see :func:`fused_transpose`)."""
    return jax.lax.optimization_barrier(jnp.transpose(m))


@jax.custom_jvp
def matmul(v, m):
    """``v @ m`` for ``v: (..., n)``, ``m: (n, k)``, whose reverse-mode derivative w.r.t. ``v``
    multiplies by a materialised ``m^T`` (see :func:`fused_transpose`): the cells' recurrent
    matmuls, so that autodiff's backward (steps made by autodiff, parameter maps, training)
    does not repack ``U`` on every step (LSTM map 5-9% faster). Forward and
    reverse mode; the values are those of ``v @ m``."""
    return jnp.matmul(v, m)


def _matmul_jvp(primals, tangents):
    v, m = primals
    dv, dm = tangents  # symbolic zeros where not differentiated (e.g. constant parameters)
    out = jnp.matmul(v, m)  # (not ``@``: JAX 0.8 may hand the rule NumPy-typed arrays)
    parts = []
    if not isinstance(dv, SymbolicZero):
        # dv @ m written against m^T, so its transpose (the backward) is g @ m^T, contiguous
        parts.append(jax.lax.dot_general(dv, _transposed(m), (((dv.ndim - 1,), (1,)), ((), ()))))
    if not isinstance(dm, SymbolicZero):
        parts.append(jnp.matmul(v, dm))
    return out, sum(parts[1:], parts[0]) if parts else jnp.zeros_like(out)


matmul.defjvp(_matmul_jvp, symbolic_zeros=True)


def input_projection(params: Params, x, gates) -> dict:
    """``{g: x @ W_g + b_g}`` for ``gates``: the input side of every gate in one matmul."""
    return fused(x, params, gates, "W", with_bias=True)


def packed_projection(gates):
    """A :attr:`Lean.project` for cells whose input side is ``x @ W_g + b_g`` for every gate:
    ``(params, x) -> x @ concat(W)``, one ``(..., G*H)`` array, gates in the order of
    ``gates``; the step adds :func:`packed_bias`."""
    gates = tuple(gates)
    return lambda params, x: packed(x, params, gates, "W")


def packed_bias(params: Params, gates):
    """``concat(gate_bias(params[g]) for g in gates)``: the biases :func:`packed_projection`
    leaves to the step."""
    return jnp.concatenate([gate_bias(params[g]) for g in gates])


def recurrent_projection(params: Params, h, gates) -> dict:
    """``{g: h @ U_g}`` for ``gates``: the recurrent side of every gate in one matmul."""
    return fused(h, params, gates, "U")


def set_bias(params: Params, gate: str, value):
    """A copy of ``params`` with ``params[gate]["b"] = value``."""
    return {**params, gate: {**params[gate], "b": jnp.asarray(value, params[gate]["b"].dtype)}}


def check_retain(who: str, retain, kinds: Mapping) -> tuple:
    """``retain={gate: 1 or -1}`` checked against the gates' ``kinds`` (``{gate: kind}``), as
    ``Cell.retain`` pairs: the gates whose value (1) or complement (-1) is the fraction of the
    previous state kept (a sigmoid gate's, or an ``"other"`` one the user vouches for; a
    tanh or time gate's is none). ``who`` names the caller in the messages (an adapter,
    :func:`gradflow.gates.model_saturation`)."""
    if retain is None:
        return ()
    if not isinstance(retain, Mapping):
        raise InputTypeError(f"{who}: retain must be a dict {{gate: 1 or -1}}, e.g. "
                             f"{{'f': 1}} for an LSTM's forget gate; got "
                             f"{type(retain).__name__}")
    for g, sign in retain.items():
        if g not in kinds:
            raise InputError(f"{who}: retain names {g!r}, which is not a reported gate ("
                             f"{', '.join(map(repr, kinds)) or 'none: give gates='})")
        if isinstance(sign, bool) or sign not in (1, -1):
            raise InputError(f"{who}: retain[{g!r}] must be 1 (the state kept is the gate's "
                             f"value a) or -1 (it is 1 - a), got {sign!r}")
        if kinds[g] not in ("sigmoid", "other"):
            raise InputError(f"{who}: retain[{g!r}]: a {kinds[g]!r} gate is no fraction of the "
                             "state kept (a sigmoid gate is)")
    return tuple((g, int(sign)) for g, sign in retain.items())


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
    given = options["refined"]
    if not isinstance(given, (str, list, tuple)):  # (a dict's keys were taken for gates)
        raise ValueError(f"cell {name!r}: option refined={given!r} is not valid; give a gate "
                         f"name or a list of them, among {', '.join(map(repr, valid))}")
    rset = (given,) if isinstance(given, str) else tuple(given)
    for g in rset:
        choice(name, "refined", g, valid)
    options["refined"] = rset
    if not rset and options.get("mode", "mul") != "mul":
        raise ValueError(f"cell {name!r}: option mode={options['mode']!r} shapes refined gates "
                         f"and this cell has none; give refined= (gates among "
                         f"{', '.join(valid)}) or drop mode")
    return rset


def check_t_max(name: str, options: dict, default: float | None = 100.0) -> None:
    """A ValueError where ``t_max`` is set away from its default (``default=None``: set at
    all) but the cell's ``init`` has no chrono bias, the one scheme that reads it (it was
    silently unused)."""
    t_max = options.get("t_max")
    if t_max is not None and (default is None or float(t_max) != default) \
            and parse_init(options["init"])[1] != "chrono":
        raise ValueError(f"cell {name!r}: option t_max={options['t_max']!r} sets chrono "
                         f"initialisation's range and init={options['init']!r} has no chrono "
                         "bias; give init='chrono' (or e.g. 'glorot+chrono') or drop t_max")
