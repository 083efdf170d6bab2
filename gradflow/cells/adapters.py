r"""Your own recurrent cell as a gradflow :class:`~gradflow.cells.Cell`, unchanged.

A user's cell is one step :math:`(\mathrm{carry}_t, y_t) = f_\theta(\mathrm{carry}_{t-1}, x_t)`
whose carry is one array or a tuple/dict of arrays, all ``(*batch, H)``. gradflow needs to know
which carry leaf is the output :math:`h_t` (the state that goes both up to the next layer and
forward in time, where the gradient maps perturb it); it finds it by running one step on random
inputs and matching the output against the carry's leaves (``output=`` overrides). The carry
becomes gradflow's state dict: the output leaf is ``"h"``, the other leaf ``"c"`` if there is
exactly one, else ``"s1", "s2", ...`` in the carry's order.

* :func:`from_function`: a plain ``step(params, carry, x) -> (carry, y)`` on batched arrays
  (``batched=False``: on one example, vmapped over the batch), with ``init(key, input_size,
  hidden_size, dtype) -> params`` or the params themselves.
* :func:`from_linen`: a ``flax.linen`` RNN cell (``LSTMCell``, ``GRUCell``,
  ``OptimizedLSTMCell``, ``MGUCell``, ``SimpleCell``, a user's ``nn.RNNCellBase`` subclass);
  params are its ``{"params": ...}`` collection.
* :func:`from_nnx`: a ``flax.nnx`` cell (``nnx.LSTMCell``, ``nnx.GRUCell``, ...); params are its
  ``nnx.Param`` state as a plain nested dict; the weights in the module are the trained ones.
* :func:`from_equinox`: ``eqx.nn.LSTMCell``, ``eqx.nn.GRUCell`` or a user's ``eqx.Module`` with
  ``__call__(x, state) -> state`` on one example; params are its arrays as a flat dict named by
  attribute path (``{"weight_ih": ..., "weight_hh": ..., "bias": ...}``), the rest of the module
  (static configuration) is closed over.
* :func:`stack_params`: ``{"layers": [...]}`` for a :class:`gradflow.Stack` from a list of the
  user's trained modules or variable dicts, one per layer.

Gate statistics (:func:`gradflow.gates.saturation`) need the cell to say what its gates are:
``gates=`` a callable returning ``{name: (B, H)}`` from the step's inputs (or ``"sown"`` for a
linen module that ``self.sow("intermediates", name, value)``-s them), and ``gate_kinds=``
``{name: kind}``; a gate whose kind is not given is ``"sigmoid"`` if its values on the probe step
lie in ``[0, 1]``, ``"tanh"`` if they lie in ``[-1, 1]``, else ``"other"``. Without gates the
gradient and Jacobian maps work and ``saturation`` says that the cell reports none.

Flax and Equinox are optional: they are imported here, inside the functions that need them
(``pip install "gradflow[flax]"``, ``"gradflow[equinox]"``).

Example (a plain function: a tanh RNN whose carry is its output)::

  >>> def step(p, h, x):
  ...     h = jnp.tanh(x @ p["W"] + h @ p["U"])
  ...     return h, h
  >>> def init(key, n_in, n_h, dtype):
  ...     k1, k2 = jax.random.split(key)
  ...     return {"W": jax.random.normal(k1, (n_in, n_h), dtype) / n_in ** 0.5,
  ...             "U": jax.nn.initializers.orthogonal()(k2, (n_h, n_h), dtype)}
  >>> cell = gradflow.cells.from_function(step, init)
  >>> stack = gradflow.Stack(cell, layers=3, input_size=4, hidden_size=8)
  >>> params = stack.init(jax.random.key(0))
  >>> gradflow.gradient_map(stack, params, jnp.ones((2, 5, 4))).values.shape
  (3, 5)
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gradflow.cells.base import KINDS, Cell, check_retain
from gradflow.errors import InputError, InputTypeError
from gradflow.cells.base import cast_floating as _cast

__all__ = ["from_function", "from_linen", "from_nnx", "from_equinox", "stack_params"]

_PROBE_BATCH = 3
# Said where a carry array has another width than the output: what gradflow measures per unit.
_WIDE = ("; a layer's states are measured unit by unit at the output's width, so a wider "
         "memory is carried as several hidden_size-wide arrays (a tuple)")


# ---------------------------------------------------------------------------------------------
# Shared machinery


def _require(module: str, extra: str, who: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"gradflow.cells.{who} needs {module.split('.')[0]}, an optional "
                          f"dependency: pip install \"gradflow[{extra}]\"") from e


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_name(path) -> str:
    return ".".join(_key_name(k) for k in path)


def _differing(a, b) -> list[str] | None:
    """The paths of the array leaves where trees ``a`` and ``b`` differ in shape or values (a
    typed PRNG key by its bits): ``[]`` where they agree, None where they hold other leaves.
    What a layer's module holds outside its parameters must equal the wrapped module's."""
    la = jax.tree_util.tree_flatten_with_path(a)[0]
    lb = jax.tree_util.tree_flatten_with_path(b)[0]
    if [p for p, _ in la] != [p for p, _ in lb]:
        return None

    def plain(v):
        dtype = getattr(v, "dtype", None)
        return np.asarray(jax.random.key_data(v) if dtype is not None and jnp.issubdtype(
            dtype, jax.dtypes.prng_key) else v)

    return [_path_name(p) for (p, x), (_, y) in zip(la, lb)
            if not (np.shape(plain(x)) == np.shape(plain(y))
                    and bool(np.all(plain(x) == plain(y))))]


def _size(who: str, what: str, value):
    """``value``: None or a positive integer (not a bool), else a ValueError naming ``what``
    (a string or a negative size failed inside JAX's shape checks; 0 was ignored)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{who}: {what} must be a positive integer or None, got {value!r}")
    return int(value)


def _zero_carry(who: str, module, carry):
    """``carry`` of zeros (the structure gradflow's states take); a ValueError where the
    module's own ``initialize_carry`` gives a non-zero one (a ``carry_init`` of ones or a
    random one): every measurement starts from zero states, so its map would not be the
    user's network's (it was measured from zeros without a word)."""
    if not all(bool(jnp.all(jnp.asarray(a) == 0)) for a in jax.tree_util.tree_leaves(carry)):
        raise InputError(
            f"{who}: {type(module).__name__}.initialize_carry gives a non-zero carry (its "
            "carry_init), and gradflow's measurements start every layer from zero states, so "
            "they would not measure your network: measure the module with the default "
            "(zero) carry_init, or run stack.apply(params, xs, state0=...) and differentiate "
            "it yourself")
    return jax.tree_util.tree_map(jnp.zeros_like, carry)


def _template(state, hidden_size, who: str):
    """The carry's structure as a pytree of ``(1, H)`` zeros, from the ``state`` option:
    None (one array), an int ``k`` (a tuple of ``k`` arrays) or a callable
    ``(batch_shape, hidden_size, dtype) -> carry``."""
    H = hidden_size or 1
    if state is None:
        return jnp.zeros((1, H))
    if isinstance(state, int) and not isinstance(state, bool):
        if state < 1:
            raise InputError(f"{who}: state={state} must be a positive number of carry arrays")
        return tuple(jnp.zeros((1, H)) for _ in range(state))
    if callable(state):
        if hidden_size is None:
            raise InputError(f"{who}: a state function needs hidden_size=")
        return state((1,), int(hidden_size), jnp.float32)
    raise InputTypeError(f"{who}: state must be None (the carry is one array), a number of carry "
                         f"arrays, or a function (batch_shape, hidden_size, dtype) -> carry; got "
                         f"{type(state).__name__}")


def _resolve_output(output, paths, who: str) -> int:
    """The index (in flatten order) of the carry leaf named by ``output``: an int (index) or a
    key (dict key or attribute name) of the carry."""
    n = len(paths)
    if isinstance(output, (int, np.integer)) and not isinstance(output, bool):
        if not -n <= output < n:
            raise InputError(f"{who}: output={output} is out of range for a carry of {n} arrays")
        return int(output) % n
    names = [_key_name(p[-1]) if p else "" for p in paths]
    if output in names:
        return names.index(output)
    raise InputError(f"{who}: output={output!r} is not a leaf of the carry; valid: indices "
                     f"0..{n - 1} or keys {', '.join(map(repr, names))}")


def _state_names(n: int, out: int) -> tuple:
    """gradflow's state names for a carry of ``n`` leaves whose leaf ``out`` is the output."""
    others = [i for i in range(n) if i != out]
    names = [None] * n
    names[out] = "h"
    if len(others) == 1:
        names[others[0]] = "c"
    else:
        for j, i in enumerate(others, 1):
            names[i] = f"s{j}"
    return tuple(names)


def _kinds(gate_kinds) -> dict:
    if gate_kinds is None:
        return {}
    pairs = gate_kinds.items() if isinstance(gate_kinds, dict) else gate_kinds
    try:
        out = {str(g): k for g, k in pairs}
    except (TypeError, ValueError):
        raise InputTypeError("gate_kinds must be a dict {gate: kind} or (gate, kind) "
                             "pairs") from None
    for g, k in out.items():
        if k not in KINDS:
            raise InputError(f"gate {g!r} has unknown kind {k!r}; valid kinds: {', '.join(KINDS)}")
    return out


def _own_weights(who: str, module) -> Callable:
    """``(key) -> None`` warning once that every layer gets ``module``'s own weights (an adapter
    given a user's module class it cannot rebuild, and no ``init``); silent where the key is
    traced (shape inference, e.g. checking trained params against the stack's)."""
    said = []

    def warn(key):
        if not said and not isinstance(key, jax.core.Tracer):
            said.append(True)
            warnings.warn(
                f"{who}: {type(module).__name__} has no init=, so every layer starts from the "
                "module's own weights (identical layers; the key is not used): pass "
                "init=(key, input_size, hidden_size) -> module for fresh ones, or your "
                "trained modules through stack_params", UserWarning, stacklevel=5)
    return warn


def _message(e: Exception) -> str:
    return " ".join(str(e).split())[:400]


_TRACED = (jax.errors.TracerBoolConversionError, jax.errors.ConcretizationTypeError,
           jax.errors.TracerIntegerConversionError)
_CODE_BUGS = (NameError, AttributeError, ImportError, AssertionError, ZeroDivisionError,
              NotImplementedError, RecursionError)


# Errors about sizes (JAX's and NumPy's words for them): these earn the "do the parameters fit
# the sizes?" hint; any other error is named as it is.
_SIZES = re.compile(r"shape|dimension|dot_general|incompatible|broadcast|size", re.I)


_CALLED = {"from_function": "step(params, carry, x)", "from_linen": "module(carry, x)",
           "from_nnx": "module(carry, x)", "from_equinox": "module(x, state)"}


def _step_failed(who: str, e: Exception, what: str, fit: str = "", guessed: str = ""
                 ) -> Exception:
    """The exception to raise where the user's step failed in ``what`` (e.g. "one probe step
    (batch 3, ...)"): a ValueError with the cause and, where it is a known one, the fix; an
    error in the step's own code (a NameError, ...) or one gradflow raised about the step's
    result as it is, with a note saying where. ``fit``: the sizes to name when nothing
    more specific is known ("input_size=4, hidden_size=6"); ``guessed``: what to say where one
    of them was a guess (a module that does not say its input width)."""
    text = str(e)
    if isinstance(e, _TRACED):
        hint = ("the step decides in Python on an array's value (if/while/int() on a traced "
                "array); gradflow runs it under jax.jit: use jnp.where or jax.lax.cond")
    elif "values to unpack" in text:
        hint = ("the step unpacks its carry or its result: the carry is what state= says "
                "(None: one array; k: a tuple of k arrays; or a function), and the step "
                "returns (carry, y)")
    elif "string indexing" in text or "tuple indices must be" in text:
        hint = ("the step indexes an array by name: its carry is what state= says (None: one "
                "array; for a dict carry give state=lambda batch_shape, H, dtype: {'h': "
                "jnp.zeros(batch_shape + (H,), dtype), ...}), its params what init returns"
                + (f"; it is called as {_CALLED[who]}" if who in _CALLED else ""))
    elif isinstance(e, TypeError) and "positional argument" in text:
        return _CallSignature(f"{who}: {what} failed: {_message(e)} (the cell is called as "
                              f"{_CALLED.get(who)}: an RNN cell, one step)")
    elif "PRNG" in text or "rng" in text.lower():
        hint = ("the module draws random numbers (Dropout?): measure it deterministic "
                "(linen: deterministic=True; nnx: module.eval())")
    elif type(e).__name__ == "TraceContextError":  # flax: a variable changed inside a trace
        hint = ("the module changes its own state in a step (BatchNorm in training mode?): "
                "measure it at inference: module.eval(), then wrap it again")
    elif isinstance(e, _CODE_BUGS) or text.startswith(f"{who}:"):
        e.add_note(f"{who}: raised by the cell's step in {what}")
        return e
    elif fit and _SIZES.search(text):
        hint = guessed or f"do the parameters fit {fit}?"
    else:
        hint = ("it is called as step(params, carry, x)" if who == "from_function" else "")
    return InputError(f"{who}: {what} failed: {_message(e)}" + (f" ({hint})" if hint else ""))


def _pair(who: str, out, what: str = "the step"):
    """``(carry, y)`` from what the user's step returned, or a TypeError saying what it
    returned instead."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = (f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list))
               else f"a {type(out).__name__}")
        raise InputTypeError(f"{who}: {what} must return (carry, y), got {got}")
    return out


def _shapes(tree) -> str:
    """A carry's structure with each array as its shape, e.g. ``((1, 7),)``."""
    return str(jax.tree_util.tree_map(lambda a: tuple(jnp.shape(a)), tree))


def _carry_leaves(who: str, new, treedef, shape: tuple) -> list:
    """The leaves of the carry a step returned, once its structure is the one it was given (of
    ``shape`` arrays)."""
    if jax.tree_util.tree_structure(new) != treedef:
        given = _shapes(jax.tree_util.tree_unflatten(
            treedef, [jax.ShapeDtypeStruct(shape, jnp.float32)] * treedef.num_leaves))
        declared = ("the carry is what the module's initialize_carry builds" if
                    who == "from_linen" else "state= says what the carry is (None: one array, "
                    "k: a tuple of k arrays, or a function building it)")
        raise InputError(f"{who}: the step returns a carry shaped {_shapes(new)} but is given "
                         f"one shaped {given}; a step returns (carry, y) in that order, and "
                         f"{declared}")
    return treedef.flatten_up_to(new)


def _check_arity(who: str, fn, what: str, signature: str) -> None:
    """A TypeError naming ``signature`` unless ``fn`` takes its positional arguments (functions
    whose signature Python cannot read are not checked)."""
    names = [a.strip() for a in signature.split(",")]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*names)
    except TypeError:
        raise InputTypeError(f"{who}: {what} must take ({signature}); "
                             f"{getattr(fn, '__name__', what)}{sig} does not") from None


def _check_gates(who: str, gates, signature: str, returns: str, sown: bool = False) -> None:
    """A TypeError unless ``gates`` is None, a function of ``signature`` (or ``"sown"``)."""
    if gates is None or (sown and gates == "sown"):
        return
    if not callable(gates):
        raise InputTypeError(f"{who}: gates must be a function ({signature}) -> {returns}"
                             + (" or 'sown'" if sown else ""))
    _check_arity(who, gates, "gates", signature)


def _gates_checked(who: str, call_b: Callable, gate_kinds) -> Callable:
    """``call_b`` whose gates must be a dict ``{name: (batch, hidden_size) array}`` holding
    every gate ``gate_kinds`` names (a list, a bare array, a gate of another width or a
    missing one failed later, as an AttributeError, a KeyError or an internal error)."""
    def call(params, carry, x):
        new, y, gates = call_b(params, carry, x)
        if not isinstance(gates, dict) or not all(isinstance(k, str) for k in gates):
            got = "an array" if hasattr(gates, "shape") else type(gates).__name__
            raise InputTypeError(
                f"{who}: gates must return a dict {{name: (batch, hidden_size) array}}, got "
                f"{got}" + (f" with keys {list(gates)[:4]}" if isinstance(gates, dict) else ""))
        missing = [g for g in (gate_kinds or {}) if g not in gates]
        if missing:
            raise InputError(f"{who}: gate_kinds names {missing[0]!r}, which the gates do not "
                             f"report ({', '.join(map(repr, gates))})")
        want = jnp.shape(jax.tree_util.tree_leaves(carry)[0])
        for g, v in gates.items():
            if jnp.shape(v) != want:
                raise InputError(f"{who}: gate {g!r} has shape {jnp.shape(v)} where the "
                                 f"carry's arrays have {want}; gates must be (batch, "
                                 "hidden_size)")
        return new, y, gates
    return call


def _build(*, name: str, who: str, call: Callable, batched: bool, template, hidden_size,
           output, reports_gates: bool, gate_kinds, make_init: Callable,
           probe_params: Callable | None, finds_output: bool, to_params: Callable,
           options: dict, couples_batch: bool | None = False, retain=None,
           own=None) -> Cell:
    """A :class:`Cell` around ``call(params, carry, x) -> (carry, y or None, {gate: value})``.

    Args:
      call: on ``(N, ...)`` arrays if ``batched``, else on one example (vmapped here).
      template: the carry's structure (leaves ``(1, H)``).
      make_init: ``(key, input_size, hidden_size, dtype) -> params`` (not cast yet).
      probe_params: ``() -> (params, input_size)`` for the probe step, or None.
      finds_output: ``call`` returns the output ``y`` (so the probe can find its carry leaf).
      couples_batch: whether a step mixes the examples of a batch; None: found by the probe
        step (or refused at the first init if it does and no probe could run).
      own: ``(params, input_size)``: the user's module's own weights (the object
        ``make_init`` returns where it cannot make others) and the input size they are for
        (None: unknown); a step that fails on them at another size is told how to give
        each layer its own.
    """
    if not isinstance(name, str) or not name:
        raise InputTypeError(f"{who}: name must be a non-empty string, got {name!r}")
    call_b = call if batched else jax.vmap(call, in_axes=(None, 0, 0))
    if reports_gates:
        call_b = _gates_checked(who, call_b, _kinds(gate_kinds))
    leaves, treedef = jax.tree_util.tree_flatten(template)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    n = len(leaves)
    for p, leaf in zip(paths, leaves):
        if jnp.ndim(leaf) != 2 or (hidden_size and jnp.shape(leaf)[-1] != hidden_size):
            raise InputError(f"{who}: every carry array must be (batch, hidden_size); carry"
                             f"{_path_name(p) and ' ' + _path_name(p)} has shape "
                             f"{jnp.shape(leaf)} for batch 1{_WIDE}")
    kinds = _kinds(gate_kinds)
    out = None if output is None else _resolve_output(output, paths, who)
    need_output = out is None and n > 1
    if need_output and not finds_output:
        raise InputError(f"{who}: the carry has {n} arrays and the cell returns no separate "
                         "output to find h by; say which one is the output: output=INDEX or KEY")
    probe_gates = None
    can_probe = probe_params is not None and bool(hidden_size)
    if (need_output or (reports_gates and gate_kinds is None)) and not can_probe:
        raise InputError(f"{who}: finding the output leaf and the gate kinds runs one step; "
                         "give hidden_size= (or output= and gate_kinds=)")
    if couples_batch is not None and not isinstance(couples_batch, bool):
        raise InputTypeError(f"{who}: couples_batch must be True, False or None, got "
                             f"{couples_batch!r}")
    # found where not declared, and a declared False checked (measured per example, a step
    # that mixes them is another network): a vmapped step cannot mix examples
    detect = batched and couples_batch is not True
    declared = couples_batch is False
    if can_probe and (finds_output or reports_gates or detect):
        new_leaves, y, probe_gates, coupled = _probe(who, call_b, treedef, n, probe_params,
                                                     int(hidden_size), detect)
        if finds_output:  # also where output= or a one-array carry says which leaf is h
            out = _find_output(who, new_leaves, y, int(hidden_size), out)
        if detect:
            if declared and coupled:
                raise InputError(_mixes(who, declared))
            couples_batch, detect = coupled, False
    names = _state_names(n, 0 if out is None else out)
    if reports_gates:
        kinds = _settle_kinds(kinds, probe_gates)
    check_output = None
    if (finds_output or detect) and not can_probe:  # the first init's params run the probe
        def check_output(params, n_in, H):
            leaves, y, _, coupled = _probe(who, call_b, treedef, n,
                                           lambda: (_cast(params, jnp.float32), n_in), H,
                                           detect)
            if finds_output:
                _find_output(who, leaves, y, H, 0 if out is None else out)
            if detect and coupled:
                raise InputError(_mixes(who, declared))
    retain = check_retain(who, retain, kinds if reports_gates else {})
    recur, init_fn = _functions(who, call_b, treedef, names, tuple(kinds), n, hidden_size,
                                make_init, check_output, own)
    opts = {**options, "adapter": who}
    if hidden_size:
        opts["hidden_size"] = int(hidden_size)
    return Cell(name=name, init_fn=init_fn, recur_fn=recur, options=tuple(sorted(opts.items())),
                state_names=names, gate_kinds=tuple(kinds.items()),
                equation=f"{who}: {options.get('module', 'user function')}",
                to_params=to_params, couples_batch=bool(couples_batch), retain=retain)


def _mixes(who: str, declared: bool) -> str:
    """The message for a step that mixes the examples of a batch, undeclared or declared not
    to (``couples_batch=False``)."""
    return (f"{who}: the step mixes the examples of a batch (one example's new carry moves "
            "with another's input and carry)"
            + (", though couples_batch=False says it does not" if declared else "")
            + ": declare it, couples_batch=True, so that per-example measurements refuse it "
            "and batches are not split")


def _probe(who, call_b, treedef, n, probe_params, H, detect: bool = False):
    """One step on random inputs: ``(new carry leaves, output y, gates, coupled)``;
    ``coupled`` (``detect``: else False): another example's new carry changes when one
    example's input and carry do."""
    params, n_in = probe_params()
    ks = jax.random.split(jax.random.key(7), n + 1)
    carry = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, (_PROBE_BATCH, H)) for k in ks[:n]])
    x = jax.random.normal(ks[n], (_PROBE_BATCH, n_in))
    try:
        new, y, probe_gates = call_b(params, carry, x)
    except Exception as e:  # the user's function failed: say where, with its message
        raise _step_failed(who, e, f"one probe step (batch {_PROBE_BATCH}, input_size "
                                   f"{n_in}, hidden_size {H})",
                           f"input_size={n_in}, hidden_size={H}",
                           getattr(probe_params, "guessed", "")) from e
    leaves = _carry_leaves(who, new, treedef, (_PROBE_BATCH, H))
    coupled = False
    for i in range(_PROBE_BATCH) if detect else ():  # example i moved: do the others move?
        # (each in turn: a running statistic over the batch moves only the later ones)
        one = lambda a: a.at[i].set(-2.0 * a[i] + 1.0)  # noqa: E731
        moved, _, _ = call_b(params, jax.tree_util.tree_map(one, carry), one(x))
        rest = np.arange(_PROBE_BATCH) != i
        if not all(np.allclose(a[rest], b[rest], rtol=1e-5, atol=1e-7, equal_nan=True)
                   for a, b in zip(leaves, treedef.flatten_up_to(moved))):
            coupled = True
            break
    return leaves, y, probe_gates, coupled


def _module_probe(who, module, own, n_in, init, make_init, H) -> Callable:
    """The probe step's ``() -> (params, input_size)`` for a user's ``module``: its own weights
    when its input size ``n_in`` is known (``input_size=`` or the module's attribute); else,
    given ``init``, a fresh ``init(key, H, H)`` module (which reads H features whatever the
    module's own input width); else its own weights on H features, a guess the probe's error
    names (its ``guessed``)."""
    def probe():
        if isinstance(n_in, int) or init is None:
            return _cast(own, jnp.float32), n_in if isinstance(n_in, int) else H
        return _cast(make_init(jax.random.key(0), H, H, jnp.float32), jnp.float32), H
    if not isinstance(n_in, int) and init is None:
        probe.guessed = (f"{type(module).__name__} does not say how many features it reads, so "
                         f"the probe gave it hidden_size={H}: give {who}(..., input_size=N), N "
                         "the features this module reads, or init=(key, input_size, "
                         "hidden_size) -> module")
    return probe


def _input_size(who: str, given, own) -> int | None:
    """The features a user's module reads: ``input_size=`` (a positive integer) or else the
    module's own attribute ``own`` where it is an integer; None when neither says."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 1:
            raise InputError(f"{who}: input_size must be a positive integer, got {given!r}")
        return int(given)
    return own if isinstance(own, int) else None


def _find_output(who, new_leaves, y, H, out=None) -> int:
    """The index of the carry leaf equal to the step's output ``y``: the one there is, or
    ``out`` (``output=``, or 0 for a one-array carry) checked to be one."""
    if y is None:  # no output to match
        if len(new_leaves) > 1 and out is None:
            raise InputError(f"{who}: the step's output y is None; say which carry array is "
                             "the output h: output=INDEX or KEY")
        return 0 if out is None else out
    hits = [i for i, v in enumerate(new_leaves) if jnp.shape(v) == jnp.shape(y)
            and bool(jnp.array_equal(v, y, equal_nan=True))]  # a NaN probe is still h
    if not hits:  # a readout inside the cell: the stack would pass h up
        raise InputError(
            f"{who}: the step's output y (shape {jnp.shape(y)}) is none of the carry's "
            "arrays on a probe step. A gradflow layer passes h up to the next layer and "
            "forward in time as one array, so y must be the carry's output h (as in "
            "return carry, h); a readout computed from h (e.g. a Dense) belongs in the loss "
            "(loss=a function of the top layer's h) or in the next layer, not in the cell")
    if len(new_leaves) == 1:
        return 0
    if out is not None:
        if out not in hits:
            raise InputError(f"{who}: output={out} names carry array {out}, but the step's "
                             f"output y equals carry array(s) {hits} on a probe step")
        return out
    if len(hits) != 1:
        raise InputError(f"{who}: carry arrays {hits} all equal the step's output y on a "
                         "probe step; say which one is h: output=INDEX or KEY")
    return hits[0]


def _settle_kinds(kinds: dict, probe_gates) -> dict:
    """The gate kinds: as given (the probe's gates hold every one, at the carry's shape:
    :func:`_gates_checked`); a gate not given is ``"sigmoid"`` when its probe values lie in
    [0, 1], ``"tanh"`` in [-1, 1], else ``"other"``."""
    if probe_gates is None:
        return kinds
    for g, v in probe_gates.items():
        if g not in kinds:
            v = np.asarray(v)
            kinds[g] = ("sigmoid" if bool(np.all((v >= 0) & (v <= 1))) else
                        "tanh" if bool(np.all(np.abs(v) <= 1)) else "other")
    return {g: kinds[g] for g in probe_gates}


class _CallSignature(InputError):
    """A step that cannot be called as a cell (a module of another kind): no size hint."""


class _CarryDtype(InputError):
    """A step that returns its carry in another dtype than it was given."""


def _functions(who, call_b, treedef, names, gate_names, n, hidden_size, make_init,
               check_output=None, own=None):
    """The cell's ``(recur, init_fn)`` around the batched user step ``call_b``;
    ``check_output(params, n_in, H)``, if given, runs on the first concrete params
    ``init_fn`` makes (a probe step: is the step's output the carry's ``h``?)."""
    checked = []
    def recur(params, state, xp, t):
        lead = xp.shape[:-1]
        H = state["h"].shape[-1]
        x2 = xp.reshape((-1, xp.shape[-1]))
        carry = jax.tree_util.tree_unflatten(treedef, [state[k].reshape((-1, H)) for k in names])
        new, _, g = call_b(params, carry, x2)
        new_state = {k: v.reshape(lead + (H,))
                     for k, v in zip(names, treedef.flatten_up_to(new))}
        return new_state, new_state["h"], {k: g[k].reshape(lead + (H,)) for k in gate_names}

    def fits(params, n_in, H, dtype):
        """Raise a ValueError unless one step on ``(1, n_in)`` inputs gives ``(1, H)`` carry."""
        carry = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct((1, H), dtype)] * n)
        x = jax.ShapeDtypeStruct((1, n_in), dtype)
        try:
            new, _, _ = jax.eval_shape(call_b, params, carry, x)
        except Exception as e:
            raise _step_failed(who, e, f"one step on a (1, {n_in}) input and (1, {H}) carry "
                                       "with these parameters",
                               f"input_size={n_in}, hidden_size={H}") from e
        leaves = _carry_leaves(who, new, treedef, (1, H))
        shapes = [tuple(v.shape) for v in leaves]
        if any(s != (1, H) for s in shapes):
            raise InputError(f"{who}: with input_size={n_in}, hidden_size={H} the carry comes out "
                             f"as {shapes}, expected (batch, {H}) arrays{_WIDE}")
        other = sorted({jnp.dtype(v.dtype).name for v in leaves} - {jnp.dtype(dtype).name})
        if other:  # a scan's carry keeps its dtype: say so here, not in lax.scan's words
            raise _CarryDtype(f"{who}: the step turns a {jnp.dtype(dtype).name} carry into "
                             f"{', '.join(other)} (a constant or an array of another dtype in "
                             "the step?); keep the carry's dtype, e.g. jnp.asarray(c, h.dtype)")

    def init_fn(key, n_in, H, dtype):
        if hidden_size and H != hidden_size:
            raise InputError(f"{who}: the cell's hidden size is {hidden_size}, the stack's "
                             f"hidden_size is {H} (for a layer of it): layers of other widths "
                             f"need cells of their own, one per layer, Stack([{who}(m) for m "
                             "in modules], ...), each module built at its layer's width")
        made = make_init(key, n_in, H, dtype)
        params = _cast(made, dtype)
        try:
            fits(params, n_in, H, dtype)
        except (_CarryDtype, _CallSignature) as e:
            raise InputError(str(e)) from None
        except ValueError as e:  # a module's own weights made for another input size
            if own is None or made is not own[0] or own[1] == n_in:
                raise
            raise InputError(
                f"{e}; these are the parameters the cell makes for a layer of input size "
                f"{n_in} (Stack.init, or the shapes stack_params checks against): a module "
                "gradflow cannot rebuild at that size gives every layer its own weights, so "
                "give init=(key, input_size, hidden_size) -> module, or one cell per layer: "
                f"Stack([{who}(m) for m in modules], ...)") from e
        if check_output is not None and not checked and not any(
                isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(params)):
            with jax.ensure_compile_time_eval():  # concrete params, also inside a trace
                check_output(params, n_in, H)
            checked.append(True)
        return params

    return recur, init_fn


# ---------------------------------------------------------------------------------------------
# A plain function


def from_function(step: Callable, init=None, *, hidden_size: int | None = None,
                  input_size: int | None = None, state=None, output=None, batched: bool = True,
                  gates: Callable | None = None, gate_kinds=None, name: str = "user",
                  couples_batch: bool | None = None, retain=None) -> Cell:
    r"""A cell from a plain step function
    :math:`(\mathrm{carry}_t, y_t) = f_\theta(\mathrm{carry}_{t-1}, x_t)`.

    Args:
      step: ``step(params, carry, x) -> (carry, y)`` with ``x: (B, in)`` and every carry array
        ``(B, H)`` (``batched=False``: ``x: (in,)``, carry arrays ``(H,)``; vmapped here).
      init: ``init(key, input_size, hidden_size, dtype) -> params`` (fresh parameters), or the
        params themselves (every layer gets these, cast to the stack's dtype; their sizes are
        checked against the layer's).
      hidden_size: ``H``; needed when a probe step runs (a carry of several arrays without
        ``output=``, or ``gates`` without all ``gate_kinds``) and checked against the stack's.
      input_size: the input size of the probe step (default ``hidden_size``).
      state: the carry's structure: None (one ``(B, H)`` array, the output), ``k`` (a tuple of
        ``k`` arrays), or ``state(batch_shape, hidden_size, dtype) -> carry`` (any tuple/dict
        of ``(*batch_shape, H)`` arrays; gradflow starts from zeros).
      output: which carry array is the output ``h`` (an index in flatten order, or a dict key);
        default: found by a probe step (the leaf equal to ``y``).
      batched: whether ``step`` takes a batch (see ``step``).
      gates: ``gates(params, carry, x) -> {name: (B, H)}`` (the previous carry and this step's
        input, as ``step`` gets them): the values gate statistics report.
      gate_kinds: ``{gate: kind}`` (:data:`gradflow.cells.base.KINDS`); default per gate:
        ``"sigmoid"`` if its probe values lie in ``[0, 1]``, ``"tanh"`` if in ``[-1, 1]``,
        else ``"other"``.
      retain: ``{gate: 1 or -1}``: the reported gates whose value (1, an LSTM's ``f``) or
        complement (-1, a GRU's update gate where it keeps ``1 - z``) is the fraction of the
        state kept, so that :func:`gradflow.gates.saturation` gives their memory timescales
        (``Cell.retain``); default none.
      name: a label (two cells of one name stay distinct: equality compares the functions).
      couples_batch: whether the step mixes the examples of a batch (batch statistics);
        default: found by the probe step (one example's carry moving with another's inputs),
        or, where none could run, refused at the first init if it does; ``False`` is checked
        the same way (a step that mixes them is refused). Such a cell's batch is never split
        over devices, and the per-example measurements (``jacobian_map``, ``local_gains``)
        refuse it.
    Returns:
      A :class:`Cell` whose state is the carry (output leaf ``"h"``, the other ``"c"``, or
      ``"s1", "s2", ...``).
    """
    who = "from_function"
    hidden_size = _size(who, "hidden_size", hidden_size)
    input_size = _size(who, "input_size", input_size)
    hint = adapter_hint(who, step)
    if hint is not None:
        raise InputTypeError(f"{who}: step is {hint}")
    if not callable(step):
        raise InputTypeError(f"{who}: step must be a function (params, carry, x) -> (carry, y)")
    if init is None:
        raise InputTypeError(f"{who}: init must be a function (key, input_size, hidden_size, "
                             "dtype) -> params, or the params")
    _check_arity(who, step, "step", "params, carry, x")
    if callable(init):
        _check_arity(who, init, "init", "key, input_size, hidden_size, dtype")
    _check_gates(who, gates, "params, carry, x", "{name: (B, H)}")
    template = _template(state, hidden_size, who)

    def call(params, carry, x):
        new, y = _pair(who, step(params, carry, x))
        return new, y, (gates(params, carry, x) if gates is not None else {})

    if callable(init):
        make_init = init

        def probe():
            n_in = int(input_size or hidden_size)
            return _cast(init(jax.random.key(0), n_in, int(hidden_size), jnp.float32),
                         jnp.float32), n_in
    else:
        given = init
        make_init = lambda key, n_in, H, dtype: given  # noqa: E731

        def probe():
            return _cast(given, jnp.float32), int(input_size or hidden_size)

    return _build(name=name, who=who, call=call, batched=batched, template=template,
                  hidden_size=hidden_size, output=output,
                  reports_gates=gates is not None, gate_kinds=gate_kinds, make_init=make_init,
                  probe_params=probe, finds_output=True, to_params=lambda obj: obj,
                  options={"module": getattr(step, "__name__", "step")},
                  couples_batch=couples_batch, retain=retain)


# ---------------------------------------------------------------------------------------------
# Flax linen


def _sown(tree) -> dict:
    """``{"a/b": value}`` from linen's ``intermediates`` collection (each sow a tuple)."""
    out = {}
    for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [_key_name(k) for k in path]
        if keys and keys[-1].isdigit():  # the index inside a sow's tuple
            keys = keys[:-1]
        out["/".join(keys)] = v
    return out


# The module families an adapter takes: adapter -> (package prefix of their classes, name).
_FAMILIES = {"from_linen": ("flax.linen", "a flax.linen"), "from_nnx": ("flax.nnx", "a flax.nnx"),
             "from_equinox": ("equinox", "an equinox")}


def _family(obj):
    """``(adapter, name)`` of the module family ``obj`` (an instance or a class) belongs to,
    or None (by its classes' packages: nothing is imported)."""
    cls = obj if isinstance(obj, type) else type(obj)
    for adapter, (prefix, name) in _FAMILIES.items():
        if any(c.__module__.split(".")[:prefix.count(".") + 1] == prefix.split(".")
               for c in cls.__mro__):
            return adapter, name
    return None


def adapter_hint(who: str, obj) -> str | None:
    """``"[the class ]GRUCell, an equinox module: use gradflow.cells.from_equinox"`` where
    ``obj`` is a module (or module class) of another family than adapter ``who`` takes."""
    other = _family(obj)
    if other is None or other[0] == who:
        return None
    cls = obj if isinstance(obj, type) else type(obj)
    what = "the class " if isinstance(obj, type) else ""
    return f"{what}{cls.__name__}, {other[1]} module: use gradflow.cells.{other[0]}"


_HALF = ("float16", "bfloat16")


def _check_module_dtypes(who: str, module) -> None:
    """A Flax module's ``param_dtype`` in 16 bits is refused (gradflow measures in float32 or
    float64, and casts the parameters anyway); a ``dtype`` (computation) in 16 bits is measured
    as the module computes, with a warning that the map then has 16-bit precision."""
    def name(attr):
        d = getattr(module, attr, None)
        try:
            return None if d is None else jnp.dtype(d).name
        except TypeError:
            return None

    if name("param_dtype") in _HALF:
        raise InputError(f"{who}: {type(module).__name__} has param_dtype={name('param_dtype')}; "
                         "gradflow measures in float32 or float64: build it with "
                         "param_dtype=jnp.float32 (trained 16-bit weights go in through "
                         "stack_params(stack, layers, dtype=jnp.float32), which casts them)")
    if name("dtype") in _HALF:
        warnings.warn(f"{who}: {type(module).__name__} computes in {name('dtype')} "
                      "(dtype=...): the map measures that computation, with its precision "
                      "(about 1e-3 relative per step in bfloat16); dtype=jnp.float32 measures "
                      "the cell itself", UserWarning, stacklevel=3)


def _refuse_scan(who: str, module, scans: tuple) -> None:
    """A TypeError where ``module`` is one of the family's ``scans`` (its ``RNN`` or
    ``Bidirectional``), which run a cell over time: the adapter takes the cell."""
    if isinstance(module, scans):
        raise InputTypeError(f"{who} takes one step's cell, not the {type(module).__name__} "
                             f"that scans it over time: {who}(rnn.cell) (a bidirectional layer "
                             "is a model: gradflow.model_map)")


def _not_a_module(who: str, module) -> str:
    """The TypeError message of an adapter given something else: a module class (not an
    instance), another family's module (naming its adapter), a function, or anything."""
    family = _FAMILIES[who][1]
    cls = module if isinstance(module, type) else type(module)
    hint = adapter_hint(who, module)
    if hint is not None:
        return f"{who}: expected {family} Module, got {hint}"
    if isinstance(module, type):
        return (f"{who}: expected {family} Module instance, got the class {cls.__name__}: "
                "build the cell first (with its sizes) and pass that")
    if callable(module):
        return (f"{who}: expected {family} Module, got {cls.__name__}; a step function "
                "step(params, carry, x) -> (carry, y) goes through gradflow.cells.from_function")
    return f"{who}: expected {family} Module, got {cls.__name__}"


def from_linen(module, *, hidden_size: int | None = None, output=None, gates=None,
               gate_kinds=None, name: str | None = None,
               couples_batch: bool | None = None, retain=None) -> Cell:
    r"""A cell from a ``flax.linen`` RNN cell, called as ``module.apply({"params": p}, carry, x)``.

    Works for ``nn.LSTMCell``, ``nn.OptimizedLSTMCell``, ``nn.GRUCell``, ``nn.MGUCell``,
    ``nn.SimpleCell`` and a user's ``nn.RNNCellBase`` subclass (``initialize_carry(rng,
    input_shape)`` and ``__call__(carry, x) -> (carry, y)``). Fresh parameters come from
    ``module.init`` (each layer its own key); trained ones from :func:`stack_params` with the
    layers' ``{"params": ...}`` variable dicts.

    Args:
      module: the linen module (a configuration: unbound).
      hidden_size: ``H`` (default ``module.features``).
      output: the carry leaf that is the output (default: found by a probe step; ``h`` of the
        LSTM carry ``(c, h)``).
      gates: ``gates(params, carry, x) -> {name: (B, H)}``, or ``"sown"``: every value the
        module sows with ``self.sow("intermediates", name, value)`` (only those ``gate_kinds``
        names, where it is given: a module may sow more than its gates).
      gate_kinds: ``{gate: kind}``; default as :func:`from_function`.
      retain: ``{gate: 1 or -1}``, as :func:`from_function`'s.
      name: a label (default the module's class name).
      couples_batch: whether the step mixes the examples of a batch, as
        :func:`from_function`'s (default: found by the probe step).

    Example::

      >>> import flax.linen as nn
      >>> cell = gradflow.cells.from_linen(nn.LSTMCell(features=8))
      >>> cell.state_names
      ('c', 'h')
    """
    who = "from_linen"
    hidden_size = _size(who, "hidden_size", hidden_size)
    nn = _require("flax.linen", "flax", who)
    if not isinstance(module, nn.Module):
        raise InputTypeError(_not_a_module(who, module))
    _refuse_scan(who, module, (nn.RNN, nn.Bidirectional))
    H = hidden_size or getattr(module, "features", None)
    if not isinstance(H, int):
        raise InputError(f"{who}: {type(module).__name__} has no integer 'features': give "
                         "hidden_size=")
    _check_gates(who, gates, "params, carry, x", "{name: (B, H)}", sown=True)
    _check_module_dtypes(who, module)
    if not callable(getattr(module, "initialize_carry", None)):
        raise InputTypeError(
            f"{who}: {type(module).__name__} has no initialize_carry(rng, input_shape): "
            "from_linen takes an RNN cell (an nn.RNNCellBase, __call__(carry, x) -> (carry, "
            "y)); for another module, from_function(lambda p, carry, x: module.apply("
            "{'params': p}, carry, x), init, state=...) says what its carry is")
    try:
        template = module.initialize_carry(jax.random.key(0), (1, H))
    except Exception as e:
        raise InputError(f"{who}: {type(module).__name__}.initialize_carry(rng, (1, {H})) "
                         f"failed: {_message(e)}") from e
    template = _zero_carry(who, module, template)
    unfreeze = _require("flax.core", "flax", who).unfreeze
    named = None if gate_kinds is None else _kinds(gate_kinds)

    def call(params, carry, x):
        if gates == "sown":
            out, st = module.apply({"params": params}, carry, x, mutable=["intermediates"])
            new, y = _pair(who, out, "the module")
            sown = _sown(st.get("intermediates", {}))
            if named is not None:  # the gates among what the module sows
                absent = [g for g in named if g not in sown]
                if absent:
                    raise InputError(f"{who}: gate_kinds names {absent[0]!r}, which the module "
                                     f"does not sow; it sows "
                                     f"{', '.join(map(repr, sown)) or 'nothing'}")
                sown = {g: sown[g] for g in named}
            return new, y, sown
        new, y = _pair(who, module.apply({"params": params}, carry, x), "the module")
        return new, y, (gates(params, carry, x) if gates is not None else {})

    def make_init(key, n_in, H_, dtype):
        kc, kp = jax.random.split(key)
        carry = module.initialize_carry(kc, (1, n_in))
        variables = unfreeze(module.init(kp, carry, jnp.zeros((1, n_in), jnp.float32)))
        extra = sorted(k for k in variables if k not in ("params", "intermediates"))
        if extra:  # module.apply gets {"params": ...} alone: say so, not "do the sizes fit?"
            raise InputError(
                f"{who}: {type(module).__name__} has variable collections besides params "
                f"({', '.join(extra)}; e.g. BatchNorm's running statistics), and gradflow "
                "passes module.apply its params alone; close over your trained ones in a step "
                "of your own: from_function(lambda p, carry, x: module.apply({'params': p, "
                f"{extra[0]!r}: yours}}, carry, x), init=...)")
        return variables["params"]

    def probe():
        return _cast(make_init(jax.random.key(0), H, H, jnp.float32), jnp.float32), H

    def to_params(obj):
        obj = unfreeze(obj) if isinstance(obj, dict) or hasattr(obj, "unfreeze") else obj
        if not isinstance(obj, dict):
            raise InputTypeError(f"{who}: a layer's weights are its variables {{'params': ...}} or "
                                 f"its params dict, got {type(obj).__name__}")
        return obj["params"] if "params" in obj else obj

    return _build(name=name or type(module).__name__, who=who, call=call, batched=True,
                  template=template, hidden_size=H, output=output,
                  reports_gates=gates is not None, gate_kinds=gate_kinds, make_init=make_init,
                  probe_params=probe, finds_output=True, to_params=to_params,
                  options={"module": type(module).__name__}, couples_batch=couples_batch,
                  retain=retain)


# ---------------------------------------------------------------------------------------------
# Flax NNX


def _nnx_rebuild(nnx, module, key, n_in: int, H: int):
    """A fresh module of ``module``'s class, ``type(module)(n_in, H, rngs=nnx.Rngs(key), **kw)``
    with every other constructor argument that the module keeps as an attribute of the same
    name (NNX's cells keep ``gate_fn``, ``activation_fn``, ``dtype``, ``param_dtype``, ...; the
    initialisers they do not keep take their defaults). None where the class is not built as
    ``(in_features, hidden_features, ..., rngs=)``."""
    try:
        params = list(inspect.signature(type(module).__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params]
    if names[:2] != ["in_features", "hidden_features"] or "rngs" not in names:
        return None
    kw = {p.name: getattr(module, p.name) for p in params[2:]
          if p.name != "rngs" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
          and p.name in vars(module)}
    return type(module)(n_in, H, rngs=nnx.Rngs(key), **kw)


def _pure_dict(nnx, state) -> dict:
    """An ``nnx.State`` as a plain nested dict (``nnx.to_pure_dict``; the State method on
    older Flax)."""
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def _same_fixed_state(who: str, nnx, own, its) -> None:
    """A ValueError unless a layer module's state outside its parameters (``nnx.BatchStat``
    running statistics, other variables) equals the wrapped module's, which every layer runs
    with (closed over): a layer's own running statistics would otherwise be dropped
    without a word and the layer measured as another network."""
    differ = _differing(_pure_dict(nnx, own), _pure_dict(nnx, its))
    if differ != []:
        what = ", ".join(differ[:4]) if differ else "its structure"
        raise InputError(f"{who}: a layer's module holds other state outside its nnx.Params "
                         f"than the cell's module ({what}; e.g. BatchNorm running statistics): "
                         "every layer runs with the cell's module's, so this layer's would be "
                         "dropped; give each layer its own cell: Stack([from_nnx(m) for m in "
                         "modules], ...)")


def _runs_as_itself(who: str, own, cell, template, widths, make: str) -> None:
    """An InputError unless a layer's module run as itself, ``own(carry, x)``, equals the cell
    run on the weights taken from it, ``cell(carry, x)`` (both a batch of two): every layer
    runs with the wrapped module's fixed settings (an activation, a float or static field),
    so a layer whose own differ was measured as another network without a word (up to 65x
    off). Probed on random inputs of the first of ``widths`` the module reads; nothing is
    checked where it reads none of them (the measurement then says what is wrong)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten(template)
    carry = treedef.unflatten([0.5 * jax.random.normal(k, (2,) + tuple(np.shape(z)[1:]))
                               for k, z in zip(jax.random.split(k1, len(leaves)), leaves)])
    for n_in in dict.fromkeys(w for w in widths if isinstance(w, int)):
        x = jax.random.normal(k2, (2, n_in))
        try:
            mine = jax.tree_util.tree_leaves(own(carry, x))
        except Exception:  # noqa: BLE001  (not this width: the next one)
            continue
        try:
            theirs = jax.tree_util.tree_leaves(cell(carry, x))
        except Exception:  # noqa: BLE001  (the measurement says what is wrong with it)
            return
        if len(mine) != len(theirs) or not all(
                np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                            rtol=1e-5, atol=1e-6, equal_nan=True)
                for a, b in zip(mine, theirs)):
            raise InputError(
                f"{who}: a layer's module computes another function than the cell's module "
                "does with that layer's weights: its fixed settings differ (an activation, a "
                "float or static field), and every layer runs with the cell's module's; give "
                f"each layer its own cell: Stack([{make}(m) for m in modules], ...)")
        return


def from_nnx(module, *, hidden_size: int | None = None, state=None, output=None, gates=None,
             gate_kinds=None, init: Callable | None = None, name: str | None = None,
             couples_batch: bool | None = None, input_size: int | None = None,
             retain=None) -> Cell:
    r"""A cell from a ``flax.nnx`` RNN cell (``nnx.LSTMCell``, ``nnx.GRUCell``, ...; any module
    with ``__call__(carry, x) -> (carry, y)`` on batched arrays).

    Params are the module's ``nnx.Param`` state as a plain nested dict
    (``nnx.split(module, nnx.Param, ...)``); everything else in the module (``nnx.BatchStat``
    running statistics, other variables) is closed over: every layer runs with ``module``'s,
    a fresh module's own (``init``, a rebuild) is not used.
    Trained weights: :func:`stack_params` with one trained module per layer. Fresh weights
    (:meth:`Stack.init`): ``init`` if given; else a new module of the same class for each layer
    (NNX's cells: ``type(module)(input_size, hidden_size, rngs=nnx.Rngs(key), ...)`` with the
    module's kept options, e.g. ``gate_fn``; initialisers at their defaults); else, for a class
    not built that way, the module's own weights in every layer.

    Args:
      module: the NNX module.
      hidden_size: ``H`` (default ``module.hidden_features``).
      state: the carry's structure as in :func:`from_function` (default:
        ``module.initialize_carry``).
      output: the carry leaf that is the output (default: found by a probe step).
      gates: ``gates(module, carry, x) -> {name: (B, H)}`` (``module`` holding the layer's
        weights).
      gate_kinds: ``{gate: kind}``; default as :func:`from_function`.
      retain: ``{gate: 1 or -1}``, as :func:`from_function`'s.
      init: ``init(key, input_size, hidden_size) -> module``, a fresh module per layer (e.g.
        ``lambda k, i, h: nnx.LSTMCell(i, h, kernel_init=..., rngs=nnx.Rngs(k))``).
        A probe step (finding the output or gate kinds) runs ``module`` on
        ``input_size`` features, or else on ``init(key, H, H)``.
      name: a label (default the module's class name).
      couples_batch: whether the step mixes the examples of a batch, as
        :func:`from_function`'s (default: found by the probe step).
      input_size: the features ``module`` reads (default ``module.in_features``; a module
        without it is probed on ``init``'s module, or else on ``H`` features).
    """
    who = "from_nnx"
    hidden_size = _size(who, "hidden_size", hidden_size)
    input_size = _size(who, "input_size", input_size)
    nnx = _require("flax.nnx", "flax", who)
    if not isinstance(module, nnx.Module):
        raise InputTypeError(_not_a_module(who, module))
    _refuse_scan(who, module, (nnx.RNN, nnx.Bidirectional))
    H = hidden_size or getattr(module, "hidden_features", None)
    if not isinstance(H, int):
        raise InputError(f"{who}: {type(module).__name__} has no integer 'hidden_features': "
                         "give hidden_size=")
    _check_gates(who, gates, "module, carry, x", "{name: (B, H)}")
    _check_module_dtypes(who, module)
    if init is not None:
        _check_arity(who, init, "init", "key, input_size, hidden_size")
    n_in = _input_size(who, input_size, getattr(module, "in_features", None))
    graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
    own = _pure_dict(nnx, pstate)
    if state is not None:
        template = _template(state, H, who)
    else:
        try:
            template = module.initialize_carry((1, n_in or H), rngs=nnx.Rngs(0))
        except Exception as e:
            raise InputError(f"{who}: {type(module).__name__}.initialize_carry((1, "
                             f"{n_in or H}), rngs=...) failed ({_message(e)}); give "
                             "state=") from e
        template = _zero_carry(who, module, template)

    def merged(params, others=rest):
        st = jax.tree_util.tree_map(lambda a: a, pstate)
        if hasattr(nnx, "replace_by_pure_dict"):  # (the State method is deprecated)
            nnx.replace_by_pure_dict(st, params)
        else:
            st.replace_by_pure_dict(params)
        return nnx.merge(graphdef, st, others)

    def call(params, carry, x):
        # run eagerly (a probe step) on copies of the module's other state, which a step may
        # update (a count; a BatchNorm in training mode): the user's module is left as it was;
        # traced (a measurement), on that state itself, whose update then fails by name
        traced = any(isinstance(a, jax.core.Tracer)
                     for a in jax.tree_util.tree_leaves((params, carry, x)))
        m = merged(params, rest if traced else jax.tree_util.tree_map(lambda a: a, rest))
        new, y = _pair(who, m(carry, x), "the module")
        return new, y, (gates(m, carry, x) if gates is not None else {})

    def to_params(obj, trained=True):
        if isinstance(obj, nnx.Module):
            if type(obj) is not type(module):
                raise InputTypeError(f"{who}: a layer's module is a {type(obj).__name__}, the cell "
                                     f"wraps a {type(module).__name__}")
            _, params, others = nnx.split(obj, nnx.Param, ...)
            params = _pure_dict(nnx, params)
            if trained:  # (a fresh module's, traced inside Stack.init, is its class's default)
                _same_fixed_state(who, nnx, rest, others)
                _runs_as_itself(who, lambda c, x: _pair(who, nnx.clone(obj)(c, x),
                                                        "the module")[0],
                                lambda c, x: call(params, c, x)[0],
                                template,
                                (getattr(obj, "in_features", None), n_in, H), "from_nnx")
            return params
        if isinstance(obj, dict):
            return obj
        raise InputTypeError(f"{who}: a layer's weights are an nnx module or its params dict, got "
                             f"{type(obj).__name__}")

    same = _own_weights(who, module)

    def make_init(key, n_in_, H_, dtype):
        if init is not None:
            return to_params(init(key, n_in_, H_), trained=False)
        fresh = _nnx_rebuild(nnx, module, key, n_in_, H_)
        if fresh is None:
            same(key)
            return own
        return to_params(fresh, trained=False)

    return _build(name=name or type(module).__name__, who=who, call=call, batched=True,
                  template=template, hidden_size=H, output=output,
                  reports_gates=gates is not None, gate_kinds=gate_kinds, make_init=make_init,
                  probe_params=_module_probe(who, module, own, n_in, init, make_init, H),
                  finds_output=True,
                  to_params=to_params, options={"module": type(module).__name__},
                  couples_batch=couples_batch, retain=retain, own=(own, n_in))


# ---------------------------------------------------------------------------------------------
# Equinox


def _eqx_split(eqx, m):
    """An Equinox module's floating-point arrays as a flat dict named by attribute path, plus
    how to rebuild it: ``(params, treedef, static)`` (integer and boolean arrays, e.g. an index
    buffer, stay in ``static``: they are not parameters)."""
    arrays, static = eqx.partition(m, eqx.is_inexact_array)
    flat, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    return {_path_name(p): v for p, v in flat}, treedef, static


def _eqx_to_params(eqx, module, keys, runs_as_itself, obj, trained=True):
    """A layer's params from a trained module like ``module`` (or its params dict), checked to
    compute, as itself, what the cell computes with them (``runs_as_itself(obj, params)``:
    :func:`_runs_as_itself`); a fresh one's (``trained=False``: ``init``'s, traced inside
    ``Stack.init``) is not compared, every layer runs with ``module``'s."""
    who = "from_equinox"
    if isinstance(obj, eqx.Module):
        p, _, static = _eqx_split(eqx, obj)
        if type(obj) is not type(module) or sorted(p) != sorted(keys):
            raise InputTypeError(f"{who}: a layer's module ({type(obj).__name__}) does not have "
                                 f"the structure of the cell's ({type(module).__name__})")
        if trained and _differing(eqx.filter(_eqx_split(eqx, module)[2], eqx.is_array),
                      eqx.filter(static, eqx.is_array)) != []:
            raise InputError(f"{who}: a layer's module has other integer or boolean arrays "
                             "than the cell's module (they are fixed, not parameters); give "
                             "each layer its own cell: Stack([from_equinox(m) for m in "
                             "modules], ...)")
        if trained:
            runs_as_itself(obj, p)
        return p
    if isinstance(obj, dict):
        return obj
    raise InputTypeError(f"{who}: a layer's weights are an equinox module or its params dict, "
                         f"got {type(obj).__name__}")


def from_equinox(module, *, hidden_size: int | None = None, state=None, output=None,
                 gates=None, gate_kinds=None, init: Callable | None = None,
                 name: str | None = None, input_size: int | None = None,
                 retain=None) -> Cell:
    r"""A cell from an Equinox module called on one example, ``module(x, state) -> state``
    (``eqx.nn.LSTMCell``: state ``(h, c)``; ``eqx.nn.GRUCell``: state ``h``), vmapped over the
    batch.

    Params are the module's floating-point arrays as a flat dict named by attribute path
    (``eqx.filter(module, eqx.is_inexact_array)``: ``{"weight_ih": (G*H, in), "weight_hh":
    (G*H, H), "bias": (G*H,), ...}``); the rest (static configuration, non-array fields,
    integer or boolean arrays such as an index buffer) is closed over.
    Fresh parameters: ``eqx.nn.LSTMCell``/``GRUCell`` are rebuilt with the layer's key and sizes;
    other modules give every layer their own weights unless ``init`` makes fresh ones.
    :func:`stack_params` takes one trained module per layer.

    Args:
      module: the Equinox module.
      hidden_size: ``H`` (default ``module.hidden_size``).
      state: the state's structure, as :func:`from_function`'s ``state`` (default: ``(h, c)``
        for ``eqx.nn.LSTMCell``, one array otherwise).
      output: which state array is the output ``h`` (index or key); the module returns no
        separate output, so a state of several arrays needs it (``eqx.nn.LSTMCell``: 0).
      gates: ``gates(module, state, x) -> {name: (H,)}`` on one example (vmapped like the
        module).
      gate_kinds: ``{gate: kind}``; default as :func:`from_function`.
      retain: ``{gate: 1 or -1}``, as :func:`from_function`'s.
      init: ``init(key, input_size, hidden_size) -> module``, a fresh module per layer.
        Finding gate kinds runs one probe step: on ``module`` with ``input_size`` features,
        or else on ``init(key, H, H)``.
      name: a label (default the module's class name).
      input_size: the features ``module`` reads (default ``module.input_size``; a module
        without it is probed on ``init``'s module, or else on ``H`` features).

    Example::

      >>> import equinox as eqx
      >>> cell = gradflow.cells.from_equinox(eqx.nn.GRUCell(4, 8, key=jax.random.key(0)))
      >>> sorted(cell.init(jax.random.key(1), 4, 8))
      ['bias', 'bias_n', 'weight_hh', 'weight_ih']
    """
    who = "from_equinox"
    hidden_size = _size(who, "hidden_size", hidden_size)
    input_size = _size(who, "input_size", input_size)
    eqx = _require("equinox", "equinox", who)
    if not isinstance(module, eqx.Module):
        raise InputTypeError(_not_a_module(who, module))
    H = hidden_size or getattr(module, "hidden_size", None)
    if not isinstance(H, int):
        raise InputError(f"{who}: {type(module).__name__} has no integer 'hidden_size': give "
                         "hidden_size=")
    _check_gates(who, gates, "module, state, x", "{name: (H,)}")
    if init is not None:
        _check_arity(who, init, "init", "key, input_size, hidden_size")
    builtin = type(module) in (eqx.nn.LSTMCell, eqx.nn.GRUCell)
    if state is None and type(module) is eqx.nn.LSTMCell:
        state = 2
        output = 0 if output is None else output
    template = _template(state, H, who)

    split = functools.partial(_eqx_split, eqx)
    own, treedef, static = split(module)
    keys = list(own)

    def rebuilt(params):
        return eqx.combine(jax.tree_util.tree_unflatten(treedef, [params[k] for k in keys]),
                           static)

    def call(params, carry, x):
        m = rebuilt(params)
        return m(x, carry), None, (gates(m, carry, x) if gates is not None else {})

    n_in = _input_size(who, input_size, getattr(module, "input_size", None))

    def runs_as_itself(obj, p):
        _runs_as_itself(who, lambda c, x: jax.vmap(obj)(x, c),
                        lambda c, x: jax.vmap(rebuilt(p))(x, c), template,
                        (getattr(obj, "input_size", None), n_in, H), "from_equinox")

    to_params = functools.partial(_eqx_to_params, eqx, module, keys, runs_as_itself)
    same = _own_weights(who, module)

    def make_init(key, n_in, H_, dtype):
        if init is not None:
            return to_params(init(key, n_in, H_), trained=False)
        if builtin:
            return split(type(module)(n_in, H_, use_bias=module.use_bias, key=key))[0]
        same(key)
        return own

    probe = _module_probe(who, module, own, n_in, init, make_init, H)
    return _build(name=name or type(module).__name__, who=who, call=call, batched=False,
                  template=template, hidden_size=H, output=output,
                  reports_gates=gates is not None, gate_kinds=gate_kinds, make_init=make_init,
                  probe_params=probe, finds_output=False,
                  to_params=to_params, options={"module": type(module).__name__},
                  retain=retain, own=(own, n_in))


# ---------------------------------------------------------------------------------------------
# Trained weights in


def stack_params(stack, layers, input: dict | None = None, *, norm=None, dtype=None) -> dict:
    r"""Params for ``stack`` from the user's trained per-layer objects.

    ``params["layers"][l] = stack.cells[l].to_params(layers[l])`` (an adapter cell converts the
    user's module or variable dict; a gradflow cell's layer is its params dict), checked against
    the shapes ``stack.init`` gives (:meth:`gradflow.Stack.params_from`, which lays them out).

    Args:
      stack: a :class:`gradflow.Stack`.
      layers: one object per layer, bottom first (e.g. three trained ``eqx.nn.GRUCell``).
      input: ``{"W": (D, H), "b": (H,)}`` for a stack with ``input_projection``.
      norm: per-layer norm params (``[{"scale": (H,), "bias": (H,)}, ...]``) for a stack with
        ``norm``; default the identity (scale 1, bias 0). A Flax ``LayerNorm``'s params as
        they come (``{"params": {...}}`` too; made with ``use_bias=False``: bias 0;
        ``use_scale=False``: scale 1).
      dtype: cast every floating leaf to this (default: the first layer's dtype).
    Returns:
      ``{"layers": [...], "input"?: ..., "norm"?: [...]}`` as :meth:`Stack.init` returns.

    Example::

      >>> import equinox as eqx
      >>> ks = jax.random.split(jax.random.key(0), 3)
      >>> trained = [eqx.nn.GRUCell(8, 8, key=k) for k in ks]
      >>> stack = gradflow.Stack(gradflow.cells.from_equinox(trained[0]), 3, 8, 8)
      >>> params = gradflow.cells.stack_params(stack, trained)
      >>> bool(jnp.array_equal(params["layers"][2]["weight_hh"], trained[2].weight_hh))
      True
    """
    if not callable(getattr(stack, "params_from", None)):
        raise InputTypeError(f"stack must be a gradflow.Stack, got {type(stack).__name__}")
    return stack.params_from(layers, input, norm=norm, dtype=dtype)
