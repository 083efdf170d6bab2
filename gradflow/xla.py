"""gradflow's programs compiled, float64 ones on a CPU around a wrong result of XLA's compiler.

XLA:CPU's fusion emitters miscompile the vectorised VJP of a ``lax.scan`` through an LSTM-like
step at some float64 shapes (jaxlib 0.9.2 to 0.10.2; found at batch 4 x H 5, where an exact
Jacobian map was 6-8% off and the probes' estimate biased likewise; float32: none found). The
same program compiled without them (``xla_cpu_use_fusion_emitters=False``) is exact and, in
float64, no slower (LSTM Jacobian maps 4 x 10 x 5 x 4 and 8 x 32 x 64 x 16 measured side by
side: 0.8-1.0x the time, compile 0.7-0.8x), while float32 maps lose about 15% without them. So
:func:`jit` compiles each program as it is asked for: without them where 64-bit JAX is on
(gradflow runs float64 work in 64-bit mode and float32 work in 32-bit mode,
:func:`gradflow.problem.precision`; a float32 map run with 64-bit JAX on by the user is exact
too, and about 15% slower) and the backend is a CPU, with them otherwise. A program called
inside your own ``jax.jit`` (around a traceable core such as
:func:`gradflow.jacobian.map_arrays`) is compiled as part of yours: set
``XLA_FLAGS=--xla_cpu_use_fusion_emitters=false`` before JAX starts to have that exact in
float64 too. It imports nothing of gradflow, so every layer of the package may use it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

#: XLA options of the programs :func:`jit` compiles for calls with 64-bit JAX on, on a CPU.
FLOAT64_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


class _Jit:
    """``jax.jit(fun, **options)`` twice over: :func:`jit`."""

    def __init__(self, fun, options: dict):
        self._plain = jax.jit(fun, **options)
        self._exact = jax.jit(fun, compiler_options=FLOAT64_CPU_OPTIONS, **options)
        functools.update_wrapper(self, fun)

    def _pick(self):
        """The program without the emitters where 64-bit JAX is on (float64 work: gradflow's
        float32 work runs in 32-bit mode, :func:`gradflow.problem.precision`) on a CPU."""
        if (jax.default_backend() == "cpu" and jax.config.jax_enable_x64
                and options_known()):
            return self._exact
        return self._plain

    def __call__(self, *args, **kwargs):
        program = self._pick()
        try:
            return program(*args, **kwargs)
        except ValueError as e:  # inside the caller's jax.jit: compiled as that program is
            if program is self._plain or "can only be passed to top-level" not in str(e):
                raise
            return self._plain(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._pick().lower(*args, **kwargs)

    def _cache_size(self) -> int:
        """The programs compiled for calls (of both kinds), as ``jax.jit``'s: a test that a
        program compiles once reads it."""
        return self._plain._cache_size() + self._exact._cache_size()


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
    """``jax.jit(fun, **options)``, but a call made with 64-bit JAX on, on a CPU, runs a
    program compiled without XLA:CPU's fusion emitters (:data:`FLOAT64_CPU_OPTIONS`; the module
    docstring says why), except inside the caller's own ``jax.jit``, where JAX allows no
    options of its own. Usable as ``@jit``, ``@functools.partial(jit, ...)`` and ``jit(fun,
    ...)``; ``.lower`` picks as a call does.

    >>> f = jit(lambda x: 2 * x)
    >>> f(jnp.ones(2, jnp.float32)).tolist()
    [2.0, 2.0]
    """
    if fun is None:
        return functools.partial(jit, **options)
    return _Jit(fun, options)


__all__ = ["FLOAT64_CPU_OPTIONS", "jit", "options_known"]
