"""Singular values that never hang jaxlib's CPU LAPACK kernels, and differentiate.

:func:`singular_values` is what gradflow's spectral norms and spectra take
(:func:`gradflow.jacobian_map` with ``norm="spectral"`` or ``spectra_at``,
:func:`gradflow.local_gains`, the cost model's SVD calibration). It imports nothing of
gradflow, so every layer of the package may use it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_batching.sequential_vmap
def _matrix_singular_values(m):
    """The singular values of one matrix ``m: (p, q)``; batched (by ``vmap``, at any depth), a
    loop over the matrices (:func:`singular_values`)."""
    return jnp.linalg.svd(m, compute_uv=False)


@jax.custom_batching.sequential_vmap
def _matrix_svd(m):
    """``(u, s, vt)`` of one matrix ``m: (p, q)`` (reduced), looped over a batch as
    :func:`_matrix_singular_values`: the derivative of :func:`singular_values` reads them."""
    return jnp.linalg.svd(m, full_matrices=False)


def _flat(fn_cpu, fn_other, x):
    """``fn`` of ``x: (..., p, q)`` as a batch ``(n, p, q)``: ``fn_cpu`` on a CPU, ``fn_other``
    elsewhere (``lax.platform_dependent``: a GPU's or TPU's solver takes the batch as it is)."""
    p, q = x.shape[-2:]
    return lax.platform_dependent(x.reshape((-1, p, q)), cpu=jax.vmap(fn_cpu), default=fn_other)


@jax.custom_jvp
def singular_values(x):
    r"""The singular values of every matrix ``x: (..., p, q)`` -> ``(..., min(p, q))``, largest
    first; on a CPU handing jaxlib's LAPACK kernel one matrix per call, in a loop (also under
    any ``vmap`` of the caller's: ``jax.custom_batching.sequential_vmap``), elsewhere the
    batched call. Differentiable, the derivative of a simple singular value
    :math:`d\sigma_i = u_i^\top\,dX\,v_i` from the same per-matrix SVDs: forward mode at any
    order, reverse mode at first order (``jax.grad`` of a spectral measurement).

    Why not the batched call ``jnp.linalg.svd`` makes: in jaxlib 0.10.2 a LAPACK kernel given
    a batch of matrices hands them to XLA's intra-op thread pool and blocks until they are
    done; when as many such kernels run at once as the pool has threads (independent SVDs of
    one program, which XLA runs concurrently: the three one-step Jacobians of
    :func:`gradflow.local_gains`), no thread is left to do the work and the process hangs
    (seen on a 2-core machine, ``gdb``: both pool threads in ``BlockingCounter::Wait``, see
    :func:`gradflow.parallel.lapack_stalls`). A single matrix runs inline, so this never
    blocks; independent loops still run side by side, and a program of such calls may be split
    over devices (:func:`gradflow.parallel.lapack_stalls` reads ``num_batch_dims = "0"``). The
    cost, measured side by side (``python -m bench --only spectral``, a 2-core Zen 4, four
    runs): on 4096 matrices 32 x 32, 164-165 ms against the batched call's 91-163 ms (which
    spreads its batch over both cores when it can: up to 1.8x faster, the price of never
    hanging); on 512 of 128 x 128, 0.68-0.98x the batched call's time.
    """
    lead, (p, q) = x.shape[:-2], x.shape[-2:]
    s = _flat(_matrix_singular_values, lambda m: jnp.linalg.svd(m, compute_uv=False), x)
    return s.reshape(*lead, min(p, q))


@singular_values.defjvp
def _singular_values_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    lead, (p, q) = x.shape[:-2], x.shape[-2:]
    u, s, vt = _flat(_matrix_svd, lambda m: jnp.linalg.svd(m, full_matrices=False), x)
    ds = jnp.einsum("nji,njl,nil->ni", u, dx.reshape((-1, p, q)), vt)
    # the values from their own call, not from s: the same numbers with or without a derivative
    return singular_values(x), ds.reshape(*lead, min(p, q))


__all__ = ["singular_values"]
