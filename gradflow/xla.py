"""gradflow's programs compiled, float64 ones on a CPU around a wrong result of XLA's compiler.

XLA:CPU's fusion emitters miscompile the vectorised VJP of a ``lax.scan`` through an LSTM-like
step at some float64 shapes (jaxlib 0.9.2 to 0.10.2; found at batch 4 x H 5, where an exact
Jacobian map was 6-8% off and the probes' estimate biased likewise; float32: none found). The
same program compiled without them (``xla_cpu_use_fusion_emitters=False``) is exact and, in
float64, no slower (LSTM Jacobian maps 4 x 10 x 5 x 4 and 8 x 32 x 64 x 16 measured side by
side: 0.8-1.0x the time, compile 0.7-0.8x), while float32 maps lose about 15% without them. So
:func:`jit` compiles each program twice over, as it is asked for: with the emitters where no
argument is float64 or the backend is no CPU, without them otherwise. A program traced inside
another (your ``jax.jit`` or ``jax.grad`` around a traceable core such as
:func:`gradflow.jacobian.map_arrays`) is inlined there and compiled as that one is: set
``XLA_FLAGS=--xla_cpu_use_fusion_emitters=false`` before JAX starts to have it exact in float64
too. It imports nothing of gradflow, so every layer of the package may use it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

#: XLA options of the programs :func:`jit` compiles for float64 arguments on a CPU.
FLOAT64_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


class _Jit:
    """``jax.jit(fun, **options)`` twice over: :func:`jit`."""

    def __init__(self, fun, options: dict):
        self._plain = jax.jit(fun, **options)
        self._exact = jax.jit(fun, compiler_options=FLOAT64_CPU_OPTIONS, **options)
        functools.update_wrapper(self, fun)

    def _pick(self, args, kwargs):
        if jax.default_backend() != "cpu":
            return self._plain
        leaves = jax.tree_util.tree_leaves((args, kwargs))
        if any(isinstance(a, jax.core.Tracer) for a in leaves):
            return self._plain  # inside a trace it is inlined: the outer program's options hold
        f64 = jnp.dtype("float64")
        if any(getattr(a, "dtype", None) == f64 for a in leaves) and options_known():
            return self._exact
        return self._plain

    def __call__(self, *args, **kwargs):
        return self._pick(args, kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._pick(args, kwargs).lower(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def options_known() -> bool:
    """Whether this XLA knows :data:`FLOAT64_CPU_OPTIONS` (one tiny compile per process; a newer
    XLA without the older emitters does not, and then has no choice to make)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=FLOAT64_CPU_OPTIONS)(jnp.zeros(()))
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" in str(e):
            return False
        raise
    return True


def jit(fun=None, **options):
    """``jax.jit(fun, **options)``, but a call with a float64 array among its arguments on a
    CPU runs a program compiled without XLA:CPU's fusion emitters (:data:`FLOAT64_CPU_OPTIONS`;
    the module docstring says why). Usable as ``@jit``, ``@functools.partial(jit, ...)`` and
    ``jit(fun, ...)``; ``.lower`` picks as a call does.

    >>> f = jit(lambda x: 2 * x)
    >>> f(jnp.ones(2, jnp.float32)).tolist()
    [2.0, 2.0]
    """
    if fun is None:
        return functools.partial(jit, **options)
    return _Jit(fun, options)


__all__ = ["FLOAT64_CPU_OPTIONS", "jit", "options_known"]
