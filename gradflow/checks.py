"""Checks at the door: every public entry point validates its arguments here, before any tracing.

Each check raises one clear :class:`ValueError` (a value out of range, a shape that does not
match) or :class:`TypeError` (a value of the wrong kind), naming what was expected and what was
given, so that a user never has to read an error from deep inside JAX.

This module sits below everything else (it imports no other gradflow module) so cells, stacks,
measurements and the CLI can all share it.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
import math
import operator
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from gradflow.errors import own_code
from gradflow.xla import jit


def positive_int(name: str, value) -> int:
    """``int(value)`` if it is an integer ``>= 1`` (not a bool), else a ValueError naming it."""
    v = _int(name, value, "a positive integer")
    if v < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return v


def probe_count(value) -> int:
    """The number of Gaussian probes of a Jacobian map's estimate: an integer ``>= 2`` (a
    NumPy integer too), else a ValueError."""
    v = _int("probes", value, "an integer >= 2")
    if v < 2:
        raise ValueError(f"probes must be an integer >= 2, got {value!r}")
    return v


#: The widest layer (and input) a stack takes: one ``H x H`` float32 matrix at ``2**24`` units
#: is a pebibyte, and JAX indexes arrays with 32-bit integers a few sizes beyond it.
MAX_WIDTH = 1 << 24


def width(name: str, value) -> int:
    """A positive integer width (hidden or input size) up to :data:`MAX_WIDTH`, else a
    ValueError naming it (a width past JAX's 32-bit indexing failed deep inside the cells)."""
    v = positive_int(name, value)
    if v > MAX_WIDTH:
        raise ValueError(f"{name}={v} is beyond any machine (one {v} x {v} float32 matrix is "
                         f"{4 * v * v / 2 ** 50:,.0f} PiB); widths go up to {MAX_WIDTH:,}")
    return v


def nonneg_int(name: str, value) -> int:
    """``int(value)`` if it is an integer ``>= 0`` (not a bool), else a ValueError naming it."""
    v = _int(name, value, "a non-negative integer")
    if v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return v


def record_batch(value, eval_batch: int, default: int) -> int:
    """How many of the evaluation batch's sequences a training run records on: ``value``
    (None: ``default``) as a positive int, at most ``eval_batch``."""
    value = default if value is None else positive_int("record_batch", value)
    if value > eval_batch:
        raise ValueError(f"record_batch {value} is more than eval_batch {eval_batch}: records "
                         f"are taken on the evaluation batch's first record_batch sequences; "
                         f"pass record_batch <= {eval_batch}")
    return value


def int_at_least(name: str, value, low: int) -> int:
    """``int(value)`` if it is an integer ``>= low`` (not a bool), else a ValueError naming it."""
    v = _int(name, value, f"an integer >= {low}")
    if v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return v


#: Seeds are integers in [0, SEED_LIMIT): in JAX's default 32-bit mode a key's seed is taken
#: modulo 2**32 (2**32 is seed 0, -1 is 2**32 - 1), and the inputs use ``seed + 1``.
SEED_LIMIT = 2 ** 31 - 1


def seed(name: str, value) -> int:
    """``int(value)`` if it is an integer in ``[0, 2**31 - 1)`` (not a bool), else a
    ValueError naming it: larger or negative seeds would silently repeat other seeds."""
    v = _int(name, value, "an integer in [0, 2**31 - 1)")
    if not 0 <= v < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**31 - 1), got {value!r} (a key "
                         "takes its seed modulo 2**32, so larger or negative seeds repeat "
                         "others)")
    return v


def seed_list(seeds, name: str = "seeds") -> list[int]:
    """``seeds`` as a non-empty list of distinct :func:`seed` integers; a TypeError for what
    is no list of them (a bare seed, a string, None), a ValueError naming the entry that is
    not a seed, or the seeds repeated (a repeated seed measures one problem twice and weighs
    it twice)."""
    if (isinstance(seeds, (str, bytes, int, np.integer)) or not hasattr(seeds, "__iter__")
            or np.ndim(seeds) == 0):  # (a 0-d array: one seed)
        raise TypeError(f"{name} must be a list of integers in [0, 2**31 - 1), got {seeds!r}")
    out = [seed(f"{name}[{i}]", s) for i, s in enumerate(seeds)]
    if not out:
        raise ValueError(f"{name} is empty; give at least one seed")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} repeat: {out} (a repeated seed measures the same problem "
                         "again and weighs it twice)")
    return out


def boolean(name: str, value, none=None) -> bool:
    """``bool(value)`` if it is True or False (a NumPy or concrete 0-d JAX bool, or the
    integer 0 or 1, too; None where ``none`` is a bool, which it then means), else a
    TypeError naming it: a string such as ``"no"`` is truthy, and was read as True."""
    if value is None and none is not None:
        return none
    if isinstance(value, (bool, np.bool_)) or (
            isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    if (hasattr(value, "dtype") and not isinstance(value, jax.core.Tracer)
            and np.shape(value) == () and np.dtype(value.dtype) == np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def _int(name, value, what) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


DTYPES = ("float32", "float64")


def float_dtype(name) -> jnp.dtype:
    """``"float32"``/``"float64"`` (or ``jnp.float32``, ``np.dtype("float64")``) -> dtype, else a
    ValueError listing the valid ones; float64 needs ``jax_enable_x64`` (checked here: without
    it JAX would make float32 arrays)."""
    try:
        text = jnp.dtype(name).name
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None
    if text in ("float16", "bfloat16"):
        raise ValueError(f"dtype {text}: gradflow measures in {' or '.join(DTYPES)} (a "
                         "vanishing gradient underflows 16 bits long before float32, and NumPy, "
                         "which holds the results, has no bfloat16): measure the same weights "
                         "in float32, jax.tree.map(lambda a: a.astype(jnp.float32), params)")
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {text}; valid: {', '.join(DTYPES)}")
    if text == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs 64-bit JAX: call "
                         "jax.config.update('jax_enable_x64', True) first")
    return jnp.dtype(text)


def _plain(v):
    """``v`` with tuples as lists, for comparing a config value with its JSON round trip."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def with_meta(measured: dict, meta, **extra) -> dict:
    """A result's config: ``measured`` (the stack's config and the sizes: what the numbers were
    made of), ``meta`` (what only the caller knows, e.g. the problem's seed and input scale),
    then the measurement's own settings ``extra``. ``meta`` adds keys; where it repeats one of
    ``measured`` it must agree (a stale ``meta=problem.config`` of another problem would
    otherwise record another network), else a ValueError naming the key."""
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    for k, v in meta.items():
        if k in measured and _plain(v) != _plain(measured[k]):
            raise ValueError(f"meta[{k!r}] = {v!r} disagrees with the measured {k} "
                             f"{measured[k]!r}: meta adds to a result's config (e.g. the "
                             "problem's seed); it cannot record another stack, size or dtype "
                             "(is it the config of another problem?)")
    return {**measured, **meta, **extra}


def check_concrete(params, xs) -> None:
    """A TypeError, at the door of a measurement that returns a
    :class:`gradflow.results.Result` (NumPy arrays, checks that look at values), when it is
    called under the user's ``jax.jit``, ``vmap`` or ``grad``: its ``params`` or ``xs`` are
    traced, or (closed over, so concrete) it runs inside a trace all the same (``jax.jit``,
    ``lax.scan``, ``lax.map``: a fresh array is a tracer there), where its first look at a
    value failed with JAX's own error. It names the traceable cores to transform instead."""
    if (any(isinstance(a, jax.core.Tracer) for a in [xs, *jax.tree_util.tree_leaves(params)])
            or isinstance(jnp.zeros((), jnp.int32) + 0, jax.core.Tracer)):
        raise TypeError(
            "gradflow's measurements return Results of NumPy arrays and check values, so they "
            "run outside jax.jit/vmap/grad/lax.scan; to transform one, use its traceable core: "
            "gradflow.jacobian.map_arrays (gradient_map: exact derivatives w.r.t. params and "
            "inputs), gradflow.jacobian.gain_arrays (local_gains), gradflow.gates.reductions "
            "(gate statistics), or gradflow.sweep.sweep for maps over many seeds; a model "
            "function's measurements (model_map, model_jacobian_map, model_saturation) have "
            "none: call them outside the transform")


def choice(name: str, value, valid):
    """``value`` if it is one of ``valid``, else a ValueError listing the valid choices."""
    valid = tuple(valid)
    try:
        ok = value in valid
    except TypeError:  # unhashable or uncomparable
        ok = False
    if not ok:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")
    return value


# ---------------------------------------------------------------------------------------------
# Arrays


def _dtype_of(x):
    dt = getattr(x, "dtype", None)
    if dt is None:
        try:
            dt = np.asarray(x).dtype
        except Exception:  # ragged lists and the like: reported by the shape check
            return None
    return dt


def _is_real_number_dtype(dt) -> bool:
    try:
        return (jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer)) \
            and not jnp.issubdtype(dt, jnp.bool_)
    except TypeError:
        return False


def check_finite_inputs(xs) -> None:
    """A ValueError where concrete inputs hold NaN or inf (measurements are of finite
    inputs; a traced ``xs`` is not checked)."""
    if isinstance(xs, jax.core.Tracer):
        return
    if isinstance(xs, jax.Array) and len(xs.sharding.device_set) > 1:
        xs = np.asarray(xs)  # copied, not reduced by a program over the devices (gradflow.parallel)
    if not bool(jnp.all(jnp.isfinite(xs))):
        raise ValueError("inputs contain NaN or inf; gradient flow is measured on finite inputs")


def nonfinite_params(params) -> tuple[int, str | None]:
    """``(count, path of the first)`` of the NaN or inf values in concrete ``params``
    (``"['layers'][1]['f']['W']"``; traced leaves are not read)."""
    count, first = 0, None
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.core.Tracer) or not hasattr(leaf, "dtype") \
                or not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        n = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
        if n and first is None:
            first = jax.tree_util.keystr(path)
        count += n
    return count, first


def warn_nonfinite_params(params, who: str, stacklevel: int = 3) -> None:
    """Warn where concrete ``params`` hold NaN or inf, naming how many and the first: an
    infinite bias inside a sigmoid leaves the forward pass finite, and the maps were measured
    without a word. They are measured as they are."""
    count, first = nonfinite_params(params)
    if count:
        warnings.warn(f"{who}: the params hold {count} non-finite value{'s' * (count > 1)} "
                      f"(NaN or inf), the first in params{first}; measured as they are (a "
                      "sigmoid of inf is 1: the forward pass may stay finite)",
                      stacklevel=stacklevel)


def warn_narrowed(xs, params, who: str, stacklevel: int = 3) -> None:
    """Warn where 64-bit JAX is on and ``xs`` are float64 but ``params`` float32: the stack
    computes in its parameters' dtype, so the float64 inputs are measured in float32 (seen only
    in the result's ``config["dtype"]``)."""
    if not jax.config.jax_enable_x64:
        return
    dt = _dtype_of(xs)
    leaves = jax.tree_util.tree_leaves(params)
    have = jnp.result_type(leaves[0]) if leaves else None
    if (dt is not None and have is not None and jnp.issubdtype(dt, jnp.floating)
            and jnp.issubdtype(have, jnp.floating)
            and jnp.dtype(dt).itemsize > jnp.dtype(have).itemsize):
        warnings.warn(f"{who}: the inputs are {jnp.dtype(dt).name}, the parameters "
                      f"{jnp.dtype(have).name}: the stack computes in its parameters' dtype, "
                      f"so this is a {jnp.dtype(have).name} measurement; for a "
                      f"{jnp.dtype(dt).name} one give {jnp.dtype(dt).name} parameters "
                      f"(stack.init(key, jnp.{jnp.dtype(dt).name}))", stacklevel=stacklevel)


def check_xs(stack, xs):
    """Raise unless ``xs`` is a real ``(B, T, D)`` array with ``B, T >= 1`` and
    ``D = stack.input_size`` (:func:`check_inputs`). Returns ``xs``."""
    return check_inputs(xs, stack.input_size)


def check_inputs(xs, features: int | None = None):
    """Raise unless ``xs`` is a real ``(B, T, D)`` array with ``B, T, D >= 1`` and ``D =
    features`` (None: any).

    Returns ``xs``. Raises:
      TypeError: a dtype that is not real floating or integer (complex, bool, strings, objects).
      ValueError: not an array (e.g. a nested list), the wrong number of axes, the wrong
        feature size, or an empty batch/sequence.
    """
    D = "features" if features is None else features
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise ValueError(f"inputs must be a (batch, steps, {D}) array (NumPy or JAX), got "
                         f"{type(xs).__name__}" + (": use np.asarray(...)"
                                                   if isinstance(xs, (list, tuple)) else ""))
    if type(xs).__module__.split(".")[0] == "torch":  # its dtype is torch's, not NumPy's
        raise TypeError(f"inputs must be a NumPy or JAX array, got a {type(xs).__name__} of "
                        "PyTorch: pass xs.detach().cpu().numpy()")
    dt = _dtype_of(xs)
    if dt is None or not _is_real_number_dtype(dt):
        raise TypeError(f"inputs must be real numbers (a float or integer dtype), got dtype "
                        f"{dt}")
    shape = tuple(xs.shape)
    if len(shape) != 3 or (features is not None and shape[-1] != features):
        raise ValueError(f"inputs must have shape (batch, steps, {D}), got {shape}")
    if min(shape) < 1:
        need = ("one example and one step" if features is not None
                else "one example, one step and one feature")
        raise ValueError(f"inputs need at least {need}, got {shape}")
    return xs


def function_failed(where: str, e: Exception) -> ValueError:
    """The ValueError to raise, ``from e``, where a function the user gave failed on the
    shapes gradflow traced it with: ``"{where} failed: {type}: {its message}"`` (one line)."""
    msg = " ".join(str(e).split())[:300]
    return ValueError(f"{where} failed: {type(e).__name__}: {msg}")


def _looks_like_key(x) -> bool:
    dt = getattr(x, "dtype", None)
    if dt is None:
        return False
    try:
        if jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
            return True
    except TypeError:
        pass
    return np.dtype(dt) == np.uint32 and tuple(getattr(x, "shape", ())) in ((2,), (4,))


_SHALLOW = 3


def expected_params(stack, dtype=None):
    """``jax.eval_shape(stack.init, key, dtype)``: the shapes (no values, nothing allocated) of
    the params a stack expects (``dtype``: of the params at hand, default float32; a user's step
    is checked at it). Cached per stack and dtype (stacks are hashable).

    Tracing ``init`` costs milliseconds per layer, so a deep stack of one cell is read off a
    3-layer copy: layer 0 as it is, every layer above as layer 1 (per-layer lists, e.g.
    ``params["norm"]``, likewise).
    """
    dtype = jax.dtypes.canonicalize_dtype(jnp.float32 if dtype is None else dtype)
    with own_code("tracing the stack's init (its parameters' shapes)"):
        return _expected_params(stack, jnp.dtype(dtype))


@functools.lru_cache(maxsize=64)
def _expected_params(stack, dtype):
    key = jax.random.key(0)
    cells = getattr(stack, "cells", None)
    one_width = isinstance(getattr(stack, "hidden_size", 0), int)  # else every layer traced
    if stack.layers > 64 and one_width and (cells is None or all(c is cells[0] for c in cells)):
        try:
            short = jax.eval_shape(functools.partial(stack.replace(layers=_SHALLOW).init,
                                                     dtype=dtype), key)
        except Exception:  # a stack that cannot be shortened: trace it whole
            short = None
        if short is not None:
            def same(a, b):
                return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
                    x.shape == y.shape for x, y in zip(jax.tree_util.tree_leaves(a),
                                                       jax.tree_util.tree_leaves(b)))
            out = {}
            for k, v in short.items():
                if isinstance(v, list) and len(v) == _SHALLOW:
                    if not same(v[1], v[2]):
                        break
                    v = [v[0]] + [v[1]] * (stack.layers - 1)
                out[k] = v
            else:
                return out
    return jax.eval_shape(functools.partial(stack.init, dtype=dtype), key)


def _shape_str(x) -> str:
    return str(tuple(getattr(x, "shape", ())))


def _what_is_there(params, path: tuple) -> str:
    """For a missing leaf at ``path`` (a key path): what the deepest dict on it holds instead
    (e.g. a whole model's params given for one layer), as
    ``"; params['layers'][0] holds 'LSTMCell_0', ..."``."""
    node, depth = params, 0
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", None))
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
        depth += 1
    if not isinstance(node, dict) or not node:
        return ""
    names = [repr(k) for k in node]
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"; params{jax.tree_util.keystr(path[:depth])} holds {shown}"


def check_params(stack, params, strict: bool = True):
    """Raise unless ``params`` has the structure and shapes of ``stack.init(key)``.

    ``strict=False`` (:meth:`gradflow.Stack.apply`, which computes with whatever runs) checks
    only that every parameter the stack reads is there at its shape: any mapping, other
    entries beside them (a readout's) and any floating dtype (bfloat16) pass.

    Raises:
      TypeError: a PRNG key given instead of params, params that are not a dict, or leaves that
        are not real floating arrays.
      ValueError: a layer count that differs from ``stack.layers``, or the first leaf (by
        path, e.g. ``['layers'][2]['f']['W']``) whose presence or shape differs from what the
        stack expects, with the expected and given shapes.
    """
    if _looks_like_key(params):
        raise TypeError("params looks like a PRNG key; call stack.init(key) to get the "
                        "parameters")
    if not isinstance(params, dict if strict else Mapping):
        raise TypeError(f"params must be the dict returned by stack.init(key), got "
                        f"{type(params).__name__}")
    layers = params.get("layers")
    if not isinstance(layers, (list, tuple)):
        raise ValueError("params must hold a list params['layers'] (one entry per layer), as "
                         "returned by stack.init(key)")
    if len(layers) != stack.layers:
        raise ValueError(f"params hold {len(layers)} layers, the stack has {stack.layers}")
    dtype = next((leaf.dtype for leaf in jax.tree_util.tree_leaves(params)  # the params' own
                  if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
                  and jnp.dtype(leaf.dtype) != jnp.dtype(jnp.bfloat16)), None)
    expected = expected_params(stack, dtype)
    exp = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    ks = jax.tree_util.keystr
    exp_by = {ks(p): v for p, v in exp.items()}
    got_by = {ks(p): v for p, v in got.items()}
    for key_path, e in exp.items():  # in the order of stack.init: the first wrong leaf
        path = ks(key_path)
        if path not in got_by:
            raise ValueError(f"params{path} is missing: expected an array of shape "
                             f"{_shape_str(e)}{_what_is_there(params, key_path)}")
        g = got_by[path]
        if not hasattr(g, "shape") or not hasattr(g, "dtype"):
            raise TypeError(f"params{path} must be an array of shape {_shape_str(e)}, got "
                            f"{type(g).__name__}")
        if tuple(g.shape) != tuple(e.shape):
            raise ValueError(f"params{path} has shape {_shape_str(g)}, the stack expects "
                             f"{_shape_str(e)}")
        if not jnp.issubdtype(g.dtype, jnp.floating):
            raise TypeError(f"params{path} must be a real floating array, got dtype {g.dtype}")
    if not strict:
        return
    extra = [p for p in got_by if p not in exp_by]
    if extra:
        names = "+".join(dict.fromkeys(c.name for c in getattr(stack, "cells", None)
                                       or (stack.cell,)))
        raise ValueError(f"params{extra[0]} is not a parameter of this stack (cell "
                         f"{names!r}, {stack.layers} layers)")
    dtypes = {jnp.dtype(g.dtype) for g in got_by.values()}
    if len(dtypes) > 1:
        raise TypeError(f"params mix dtypes {sorted(d.name for d in dtypes)}; use one "
                        "(stack.init(key, dtype))")
    if jnp.dtype(jnp.bfloat16) in dtypes:  # NumPy has no bfloat16: results could not hold it
        raise TypeError("params are bfloat16; gradflow measures in float32 or float64 "
                        "(its results, counts and saved files are NumPy arrays): measure the "
                        "same weights in float32, jax.tree.map(lambda a: "
                        "a.astype(jnp.float32), params)")


def check_scalar_loss(loss_fn, outputs):
    """Raise unless ``loss_fn(outputs)`` is a real scalar, checked with :func:`jax.eval_shape`
    (nothing is computed).

    Args:
      loss_fn: ``fn(outputs: (B, T, H)) -> scalar``.
      outputs: an array or :class:`jax.ShapeDtypeStruct` of the outputs' shape and dtype.
    Raises:
      ValueError: the loss returns something of another shape (its shape is named), or fails
        on outputs of that shape (its error is named).
      TypeError: the loss returns a non-floating value.
    """
    spec = jax.ShapeDtypeStruct(tuple(outputs.shape), outputs.dtype)
    where = f"loss(outputs: {spec.shape} {jnp.dtype(spec.dtype).name})"
    try:
        out = jax.eval_shape(loss_fn, spec)
    except Exception as e:  # the user's function failed: say where, with its own message
        raise function_failed(where, e) from e
    leaves = jax.tree_util.tree_leaves(out)
    if len(leaves) != 1 or not hasattr(leaves[0], "shape"):
        raise ValueError(f"{where} must return one scalar array, got "
                         f"{jax.tree_util.tree_structure(out)}")
    v = leaves[0]
    if tuple(v.shape) != ():
        raise ValueError(f"{where} must return a scalar, got an array of shape "
                         f"{tuple(v.shape)} (reduce it, e.g. with jnp.mean)")
    if not jnp.issubdtype(v.dtype, jnp.floating):
        raise TypeError(f"{where} must return a real floating scalar, got dtype {v.dtype}")


def model_arguments(where: str, model, signature: str, params, xs):
    """The checks every measurement of a model of the user's own makes at its door:
    ``params``/``xs`` not traced, ``model`` callable (``signature`` names its form), ``xs`` a
    finite floating ``(B, T, D)`` array. Returns ``(xs as a JAX array, arrays, rest)``, the
    params split by :func:`split_static`."""
    check_concrete(params, xs)
    if not callable(model):
        raise TypeError(f"model must be a function {signature}, got {type(model).__name__}")
    xs = jnp.asarray(check_inputs(xs))
    if not jnp.issubdtype(xs.dtype, jnp.floating):  # the maps take its dtype (tap_dtype)
        raise TypeError(f"{where}: inputs must be floating point, got dtype {xs.dtype}")
    check_finite_inputs(xs)
    return (xs, *split_static(params))


def tap_dtype(xs):
    """The dtype of a model's taps (:func:`gradflow.tap`), and so of its maps, for inputs
    ``xs``: theirs, float32 at least. A model of bfloat16 or float16 states is measured as it
    computes (its gradients underflow where its own dtype does), their norms summed and kept
    in float32 (a map's underflow is counted in float32 or float64)."""
    return jnp.promote_types(jnp.result_type(xs), jnp.float32)


def nbytes(tree) -> int:
    """Bytes of the leaves of ``tree``, arrays or their shapes (``jax.ShapeDtypeStruct``); a
    PRNG key array (``jax.random.key``) counts its key data."""
    return sum(math.prod(a.shape) * _itemsize(a.dtype) for a in jax.tree_util.tree_leaves(tree))


def _itemsize(dtype) -> int:
    """Bytes of one element of ``dtype``, a PRNG key's (``key<fry>``: 8) too."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
        return math.prod(data.shape) * data.dtype.itemsize
    return jnp.dtype(dtype).itemsize


def split_static(params):
    """``params`` split as ``eqx.filter_jit`` splits a module: its array leaves (traced, in
    ``params``' structure with ``None`` elsewhere) and the rest (``(treedef, leaves, types)``
    with ``None`` at the arrays: functions, Python numbers, strings; static, part of the
    compiled program's key), so a model's parameters may be an Equinox module holding its
    activation functions. An unhashable non-array leaf is a TypeError naming where it is."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    is_array = [isinstance(a, (jax.Array, np.ndarray, np.generic)) for _, a in leaves]
    rest = tuple(None if dyn else a for dyn, (_, a) in zip(is_array, leaves))
    for (path, a), dyn in zip(leaves, is_array):
        if not dyn:
            try:
                hash(a)
            except TypeError:
                raise TypeError(f"params{jax.tree_util.keystr(path)} is a "
                                f"{type(a).__name__}, neither an array nor hashable: make it an "
                                "array (np.asarray) or a static field") from None
    arrays = treedef.unflatten([a if dyn else None for dyn, (_, a) in zip(is_array, leaves)])
    return arrays, (treedef, rest, tuple(map(type, rest)))  # types: 1 == 1.0, not the same


def with_static(fn, rest):
    """``fn(params, *args)`` as a function of the array leaves of ``params`` (``rest`` from
    :func:`split_static`)."""
    treedef, static, _ = rest

    def of_arrays(arrays, *args):
        dyn = iter(jax.tree_util.tree_leaves(arrays))
        return fn(treedef.unflatten([next(dyn) if a is None else a for a in static]), *args)

    return of_arrays


def mixes_examples(model, rest, arrays, xs, extra: tuple = (), axis: int = 0) -> bool:
    """Whether ``model(params, xs[:3], *extra)``'s outputs of one example (its index on
    ``axis`` of every output leaf) move with another example's inputs, each of the (up to)
    three in turn (a running statistic over the batch moves only the later ones): a model that
    mixes the examples of a batch (batch statistics, attention across examples), which a
    split of the batch would change. The outputs are weighted at random (equal weights cancel
    on a centred output). An independent model passes exact zeros back (a NaN is not
    counted). False where the model cannot run on these examples (one built for its batch
    size is not checked) or there is one. ``extra``: the model's further arguments, as shapes
    ``((shape, dtype), ...)`` of zeros whose axis ``-1`` (a model map's taps: ``(L, T, B)``)
    is cut to those examples."""
    few = xs[:3]
    if few.shape[0] < 2:
        return False
    try:
        return bool(_reads_another(model, rest, arrays, few, extra, axis))
    except Exception:  # noqa: BLE001  (the model's own error, if any, comes from the map)
        return False


@functools.partial(jit, static_argnames=("model", "rest", "extra", "axis"))
def _reads_another(model, rest, arrays, xs, extra, axis):
    args = [jnp.zeros(shape[:-1] + (xs.shape[0],), dtype) for shape, dtype in extra]
    call = with_static(model, rest)

    def of(i):  # example i's outputs, weighted at random
        def read(x):
            leaves = [a for a in jax.tree_util.tree_leaves(call(arrays, x, *args))
                      if jnp.issubdtype(a.dtype, jnp.inexact)]
            keys = jax.random.split(jax.random.key(0), max(len(leaves), 1))
            return sum(jnp.sum(jnp.take(a, i, axis=axis)
                               * jax.random.normal(k, jnp.take(a, i, axis=axis).shape, a.dtype))
                       for a, k in zip(leaves, keys))
        return read

    n = xs.shape[0]
    return functools.reduce(jnp.logical_or, [
        jnp.any(jnp.abs(jnp.delete(jax.grad(of(i))(xs), i, axis=0)) > 0) for i in range(n)])


def depends_on_place(model, rest, arrays, xs, per_device: int, extra: tuple = (),
                     axis: int = 0) -> bool:
    """Whether a split of the batch would change ``model``'s outputs although no example reads
    another (:func:`mixes_examples`): an example's outputs move with its place in the batch or
    the batch's size (a dropout mask or noise drawn from a fixed key with the batch's shape:
    each device would draw its own). The first ``2c`` examples (``c = min(per_device, 2)``,
    ``per_device`` the examples a device would get) are run whole and as two halves of ``c``,
    as two devices run them; outputs apart by more than ``1e-3`` of the largest finite output
    move (rounding that differs with the batch's size stays far below). True also where the
    model cannot run on those halves (one built for its batch size): a split would not run it
    as a whole. ``extra`` and ``axis`` as for :func:`mixes_examples`."""
    c = max(1, min(int(per_device), 2))
    if xs.shape[0] < 2 * c:
        return False
    try:
        return bool(_place_moves(model, rest, arrays, xs[:2 * c], extra, axis, c))
    except Exception:  # noqa: BLE001  (the whole batch's error, if any, comes from the map)
        return True


@functools.partial(jit, static_argnames=("model", "rest", "extra", "axis", "c"))
def _place_moves(model, rest, arrays, xs, extra, axis, c):
    call = with_static(model, rest)

    def run(x):
        args = [jnp.zeros(shape[:-1] + (x.shape[0],), dtype) for shape, dtype in extra]
        return [a for a in jax.tree_util.tree_leaves(call(arrays, x, *args))
                if jnp.issubdtype(a.dtype, jnp.inexact)]

    moved = jnp.asarray(False)
    for whole, first, second in zip(run(xs), run(xs[:c]), run(xs[c:])):
        scale = jnp.max(jnp.where(jnp.isfinite(whole), jnp.abs(whole), 0), initial=0)
        apart = jnp.abs(whole - jnp.concatenate([first, second], axis=axis))
        moved = moved | jnp.any(apart > 1e-3 * scale)
    return moved


# ---------------------------------------------------------------------------------------------
# Memory


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_memory(device=None) -> int:
    """Bytes a measurement may use: on an accelerator the device's ``bytes_limit`` less what is
    in use (:meth:`jax.Device.memory_stats`); on CPU ``MemAvailable`` from ``/proc/meminfo``
    (else the physical memory)."""
    d = device or jax.devices()[0]
    if d.platform != "cpu":
        stats = d.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    avail = _meminfo_available()
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62  # unknown: do not refuse
    return int(avail)


def params_fit(stack, dtype) -> None:
    """A ValueError unless the parameters of ``stack`` in ``dtype`` fit in
    :func:`available_memory` (a stack far too wide was allocated, and the process aborted)."""
    need = nbytes(expected_params(stack, dtype))
    avail = available_memory()
    if need > avail:
        raise ValueError(f"Stack.init: the parameters take {need / 2**30:,.1f} GiB, more than "
                         f"the {avail / 2**30:,.1f} GiB available: use a smaller hidden size "
                         "or fewer layers")


__all__ = ["positive_int", "nonneg_int", "boolean", "choice", "check_xs", "check_inputs",
           "function_failed", "check_params", "check_scalar_loss", "expected_params",
           "model_arguments", "split_static", "with_static", "mixes_examples",
           "depends_on_place"]
