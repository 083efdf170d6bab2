r"""What a measurement will cost, known before anything is built, traced or compiled.

:func:`estimate` computes, from the stack's configuration and the sizes ``(B, T)`` alone, the
memory a measurement needs and the floating-point work it does. Everything is derived from the
shapes of ONE cell step (:func:`jax.eval_shape`, so nothing is allocated even for
``hidden_size = 100000``), multiplied out over ``L`` layers and ``T`` steps:

* ``params``: :math:`P_0 + (L-1) P_1` bytes (layer 0 may read ``D`` features, the others ``H``),
  plus the input projection; the layers of one shape are also stacked into one array inside the
  compiled function (a second copy, counted in ``working``).
* ``residuals``: what the forward pass keeps for the backward pass. Without checkpointing: every
  layer's input :math:`(T, B, n_{in})` plus, at every ``(l, t)``, the batch-shaped residuals of
  one step (the VJP residuals of ``cell.recur``). With ``stack.checkpoint = C`` (``"auto"``:
  :math:`C = \lceil\sqrt T\rceil`): every layer's input, plus for the one layer being
  differentiated ``T/C`` chunk-boundary states and ``C`` steps of residuals.
* ``working``: transient buffers of one layer (its input projection :math:`(T, B, G H)`, the
  cotangent of its input) and the stacked copy of the parameters.
* ``inputs``: ``xs``; ``result``: the ``(L, T)`` map(s).

``total`` is the peak estimate (their sum); :func:`check_fits` compares it with
:func:`available_memory` (or a limit) and refuses in one line, naming what would fit.
``flops`` counts the matmuls of every step (:math:`2 B\,n_{in} n_{out}` per ``(n_in, n_out)``
weight), forward plus backward (about 3x the forward; 4x with checkpointing, which recomputes
the forward); ``seconds`` adds ``L T`` sequential steps (``T + L - 1`` for ``order="wavefront"``)
at a per-step overhead, both from :func:`calibration` on this machine. Gate statistics
(``method="gates"``) and local gains (``"gains"``: a batch of one-step Jacobians and their
singular values, timed by :func:`svd_seconds`) have their own accounts.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import time
from typing import Callable

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax

from gradflow import checks
from gradflow.checks import available_memory  # noqa: F401  (cost's name for it)
from gradflow.errors import own_code, user_input
from gradflow.linalg import singular_values  # the kernel calls local gains make
from gradflow.results import cpu_model

WRTS = ("hidden", "cell", "params")
METHODS = ("gradient", "exact", "probe", "gates", "gains")
#: A request's method for local gains without their spectral norms (``estimate(...,
#: method="gains", spectral=False)``).
GAINS_RMS = "gains (rms)"
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Cost:
    """A measurement's estimated cost (bytes, FLOPs, seconds) and the request it describes.

    Attributes:
      params, inputs, residuals, working, result: bytes (see the module docstring).
      total: the peak memory estimate in bytes (the sum of the above).
      flops: floating-point operations, forward + backward.
      seconds: estimated run time on this machine (compilation not included).
      request: ``(stack signature, batch, steps, dtype name, wrt, method, k)``, for
        :func:`check_fits` to try what would fit (``k``: the probes, or local gains' steps per
        batch, 0 for their default).
    """

    params: int
    inputs: int
    residuals: int
    working: int
    result: int
    total: int
    flops: float
    seconds: float
    request: tuple = dataclasses.field(repr=False)

    @property
    def kept(self) -> str:
        """What ``residuals`` holds, in words: what the forward pass keeps for the backward pass,
        for gate statistics (forward only) every state and gate activation, for local gains
        the states and inputs each step's Jacobians are taken at."""
        return {"gates": "states and gates kept", "gains": "states and inputs kept",
                GAINS_RMS: "states and inputs kept"}.get(self.request[5],
                                                         "kept for the backward pass")

    @property
    def passes(self) -> str:
        """``"forward + backward"``, ``"forward"`` for gate statistics, or local gains' forward
        pass and one-step Jacobians."""
        return {"gates": "forward", "gains": "forward + one-step Jacobians and their "
                "spectral norms", GAINS_RMS: "forward + one-step Jacobians"}.get(
                    self.request[5], "forward + backward")

    def describe(self) -> str:
        """One line: ``memory 1.23 GiB (...), 4.5 GFLOP, about 3 s`` (sizes: :func:`size`)."""
        return (f"memory {size(self.total)} (parameters {size(self.params)}, {self.kept} "
                f"{size(self.residuals)}, working {size(self.working)}, inputs "
                f"{size(self.inputs)}), {flops_str(self.flops)}, "
                + (f"about {seconds_str(self.seconds)}" if math.isfinite(self.seconds)
                   else "time not estimated (calibrate=False)"))


def size(n: float) -> str:
    """Bytes with the largest binary unit that leaves at least 1 and 3 significant digits:
    ``"512 bytes"``, ``"1.5 KiB"``, ``"123 MiB"``, ``"1.23 GiB"``, ``"1,230 GiB"``."""
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return (f"{v:.3g}" if v < 1000 else f"{v:,.0f}") + " " + unit
    return f"{n:.0f} bytes"


def flops_str(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.3g} FLOP"


def seconds_str(s: float) -> str:
    if s < 60:
        return f"{s:.2g} s"
    if s < 3600:
        return f"{s / 60:.2g} min"
    if s < 86400 * 2:
        return f"{s / 3600:.2g} h"
    return f"{s / 86400:,.0f} days"


# ---------------------------------------------------------------------------------------------
# One step, by shapes only


@functools.lru_cache(maxsize=256)
def _step(cell, n_in: int, H: int, B: int, dtype: str, tapped: bool) -> tuple:
    """``(param bytes, per-step residual bytes, projection bytes, state bytes, matmul FLOPs)``
    of one step of ``cell`` reading ``n_in`` features, for a batch of ``B``."""
    dt = jnp.dtype(dtype)
    p = jax.eval_shape(lambda k: cell.init(k, n_in, H, dt), jax.random.key(0))
    s = {k: jax.ShapeDtypeStruct((B, H), dt) for k in cell.state_names}
    x = jax.ShapeDtypeStruct((B, n_in), dt)
    xp = jax.eval_shape(cell.project, p, x)
    if tapped:  # every step its own copy of the parameters: the whole step is differentiated
        def res(p, s, x):
            return jax.vjp(lambda pp, ss, xx: cell.step(pp, ss, xx, 0)[0], p, s, x)[1]
        out = jax.eval_shape(res, p, s, x)
    else:
        def res(p, s, xp):
            return jax.vjp(lambda ss, xx: cell.recur(p, ss, xx, 0)[0], s, xp)[1]
        out = jax.eval_shape(res, p, s, xp)
    # Residuals shaped by the batch are kept per step; the others are the (loop-invariant)
    # parameters themselves.
    per_step = sum(math.prod(a.shape) * dt.itemsize for a in jax.tree_util.tree_leaves(out)
                   if a.ndim >= 1 and a.shape[0] == B)
    mm = sum(2 * B * a.shape[0] * a.shape[1] for a in jax.tree_util.tree_leaves(p)
             if a.ndim == 2)
    return checks.nbytes(p), per_step, checks.nbytes(xp), checks.nbytes(s), mm


# ---------------------------------------------------------------------------------------------
# Calibration


def cache_home() -> str:
    """gradflow's folder for what it keeps between runs on this machine (the calibration below,
    compiled programs: :func:`gradflow.parallel.use_compile_cache`):
    ``$XDG_CACHE_HOME/gradflow``, ``~/.cache/gradflow`` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gradflow")


def _cache_file() -> str:
    return os.path.join(cache_home(), "calibration.json")


@functools.lru_cache(maxsize=None)
def calibration() -> tuple[float, float]:
    """``(FLOP/s, seconds per sequential step)`` on the default device: a 512 x 512 float32
    matmul, and a 2000-step ``lax.scan`` of a tiny cell-like update (the fixed cost of one step
    of a recurrence). Measured once per machine and device kind, kept in
    ``~/.cache/gradflow/calibration.json`` (``$XDG_CACHE_HOME``), and once per process."""
    rate, per_step = _calibrated("", _measure, 2)
    return rate, per_step


@functools.lru_cache(maxsize=None)
def svd_rates() -> tuple[float, float]:
    """FLOP/s of the singular values of small and larger matrices on the default device
    (:func:`_svd_flops` of 16 matrices ``128 x 128`` and of 4 ``512 x 512``, float32, one
    matrix per LAPACK call: :func:`gradflow.linalg.singular_values`), which local gains'
    spectral norms take (:func:`svd_seconds`); kept as :func:`calibration`
    is."""
    small, large = _calibrated("svd1:", _measure_svd, 2)  # svd1: one matrix per call
    return small, large


def svd_seconds(m: int, n: int, count: float = 1) -> float:
    """Seconds for the singular values of ``count`` ``m x n`` matrices: :func:`_svd_flops` at
    the rate :func:`svd_rates` gives, interpolated over the matrix size as a power law between
    its two sizes (held at their rates beyond them). LAPACK's rate on such matrices rises with
    their size and is far below the matmul rate."""
    small, large = svd_rates()
    k = min(max(min(m, n), _SVD_SIZES[0]), _SVD_SIZES[1])
    rate = small * (large / small) ** (math.log(k / _SVD_SIZES[0])
                                       / math.log(_SVD_SIZES[1] / _SVD_SIZES[0]))
    return count * _svd_flops(m, n) / rate


def _calibrated(prefix: str, measure, n: int) -> list:
    """The ``n`` numbers ``measure()`` gives on this machine and device kind, from the cache
    file where they are kept (under ``prefix`` and the device's key), else measured and kept."""
    import json

    d = jax.devices()[0]
    key = (f"{prefix}{d.platform}:{getattr(d, 'device_kind', '')}:{cpu_model()}:"
           f"{os.cpu_count()}:{jax.__version__}")  # (a home shared by machines: each its own)
    path = _cache_file()
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    try:  # the numbers, then when they were measured: kept for CALIBRATION_DAYS
        values = [float(v) for v in saved[key]]
        if (len(values) == n + 1 and all(v > 0 for v in values)
                and 0 <= time.time() - values[-1] < CALIBRATION_DAYS * 86400):
            return values[:n]
    except (KeyError, ValueError, TypeError):
        pass
    values = [float(v) for v in measure()]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        saved[key] = values + [time.time()]
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(saved, f)
        os.replace(tmp, path)
    except OSError:  # a read-only home: measure again next time
        pass
    return values


#: Days a calibration is kept before it is measured again (a machine's load, BIOS and
#: libraries change; one measured on a loaded machine should not stand for ever).
CALIBRATION_DAYS = 7


def _best_of(fn, arg, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of the jitted ``fn(arg)``, after a warm-up."""
    fn(arg).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure() -> tuple[float, float]:
    n = 512
    rate = 2 * n ** 3 / max(_best_of(jax.jit(lambda a: a @ a), jnp.ones((n, n), jnp.float32)),
                            1e-9)
    steps = 2000
    w = jnp.eye(16, dtype=jnp.float32) * 0.5

    @jax.jit
    def scan(h):
        return lax.scan(lambda c, _: (jnp.tanh(c @ w), None), h, None, length=steps)[0]

    return rate, _best_of(scan, jnp.ones((4, 16), jnp.float32)) / steps


#: The matrix sizes :func:`svd_rates` measures.
_SVD_SIZES = (128, 512)


def _measure_svd() -> tuple[float, float]:
    rates = []
    for n, k in zip(_SVD_SIZES, (16, 4)):
        a = jax.random.normal(jax.random.key(0), (k, n, n), jnp.float32)
        seconds = _best_of(jax.jit(singular_values), a)
        rates.append(k * _svd_flops(n, n) / max(seconds, 1e-9))
    return tuple(rates)


# ---------------------------------------------------------------------------------------------
# The estimate


def _chunk(checkpoint, T: int):
    if checkpoint is None:
        return None
    if checkpoint == "auto":
        return max(1, math.ceil(math.sqrt(T)))
    return min(int(checkpoint), T)


def estimate(stack, batch: int, steps: int, dtype="float32", wrt: str = "hidden",
             method: str = "gradient", probes: int = 16, calibrate: bool = True, *,
             chunk: int | None = None, spectral: bool = True) -> Cost:
    r"""Memory and work of one measurement on ``stack``, from shapes alone (nothing runs).

    Args:
      stack: a :class:`gradflow.Stack` (its ``checkpoint`` and the order it runs,
        ``evaluation_order``, are taken into account).
      batch, steps: ``B, T``.
      dtype: of parameters and inputs, as JAX computes in it (float64 with 64-bit JAX off:
        float32).
      wrt: ``"hidden"``, ``"cell"`` or ``"params"`` (``method="gradient"``).
      method: ``"gradient"`` (:func:`gradflow.gradient_map`), ``"exact"`` or ``"probe"``
        (:func:`gradflow.jacobian_map`: ``H`` or ``probes`` backward passes, with a
        ``(L, B, T, H)`` cotangent each), or ``"gates"`` (:func:`gradflow.gates.saturation`:
        one forward pass that keeps every state and gate activation, ``(L, B, T, H)`` each,
        for the reductions, which also hold a stacked copy of the gates and their histogram
        bins; ``wrt`` and checkpointing do not apply), or ``"gains"``
        (:func:`gradflow.local_gains`: one forward pass that keeps every state and layer input,
        then, ``chunk`` steps at a time, every example's one-step Jacobians and their spectral
        norms; ``wrt`` and checkpointing do not apply).
      calibrate: time this machine once (:func:`calibration`, and :func:`svd_rates` for local
        gains) for ``seconds``; if False, ``seconds`` is NaN.
      chunk: local gains' steps per batch (default: :func:`gains_chunk`).
      spectral: whether local gains take the spectral norms (their SVDs).
    Returns:
      :class:`Cost`. Example::

        >>> c = estimate(gradflow.Stack("lstm", layers=100000, hidden_size=128), 16, 32)
        >>> c.total > 50 * 2**30   # the parameters alone: 100000 x 4 x (2 x 128 x 128 + 128) x 4 B
        True
    """
    if not hasattr(stack, "layers") or not hasattr(stack, "cells"):
        raise TypeError(f"stack must be a gradflow.Stack, got {type(stack).__name__}")
    B = checks.positive_int("batch", batch)
    T = checks.positive_int("steps", steps)
    checks.choice("wrt", wrt, WRTS)
    checks.choice("method", method, METHODS)
    dt = jax.dtypes.canonicalize_dtype(dtype)  # (float64 with 64-bit JAX off: float32)
    calibrate = checks.boolean("calibrate", calibrate)
    if method == "gains":
        probes = 0 if chunk is None else checks.positive_int("chunk", chunk)
        method = "gains" if checks.boolean("spectral", spectral) else GAINS_RMS
    elif chunk is not None:  # (local gains' only: checked, not read)
        checks.positive_int("chunk", chunk)
    if method == "probe" and checks.positive_int("probes", probes) < 2:
        raise ValueError(f"probes must be an integer >= 2 (as jacobian_map's), got {probes!r}")
    return _estimate(_signature(stack), B, T, dt.name, wrt, method, int(probes), calibrate)


def gains_chunk(batch: int, steps: int, width: int) -> int:
    """:func:`gradflow.local_gains`' default steps per ``lax.map`` batch: about 64 MiB of
    ``width x width`` Jacobians for ``batch`` examples, at least 1, at most ``steps``."""
    return max(1, min(steps, (64 << 20) // max(batch * width ** 2 * 8, 1)))


class _Sig(tuple):
    """What an estimate depends on, hashable in O(1) even for 100000 layers:
    ``(kinds, L, H, D, input_projection, norm, checkpoint, order, name, widths)`` with ``kinds``
    the ``((cell, n_in, width, count), ...)`` of the layers, ``H`` the largest width and
    ``widths`` None for layers of one width (else every layer's)."""

    kinds = property(lambda s: s[0])
    layers = property(lambda s: s[1])
    hidden_size = property(lambda s: s[2])
    input_size = property(lambda s: s[3])
    input_projection = property(lambda s: s[4])
    norm = property(lambda s: s[5])
    checkpoint = property(lambda s: s[6])
    order = property(lambda s: s[7])
    name = property(lambda s: s[8])
    widths = property(lambda s: s[9])

    def replace(self, layers=None, checkpoint=False):
        kinds, L = self.kinds, self.layers
        if layers is not None:
            if len({c for c, _, _, _ in kinds}) != 1 or self.widths is not None:
                raise ValueError("per-layer cells or widths: cannot change the depth")
            c = kinds[0][0]
            kinds = _kinds_of(c, layers, self.hidden_size, self._first())
            L = layers
        ck = self.checkpoint if checkpoint is False else checkpoint
        return _Sig((kinds, L) + tuple(self[2:6]) + (ck,) + tuple(self[7:]))

    def _first(self):
        return self.hidden_size if self.input_projection else self.input_size


def _kinds_of(cell, L, H, first):
    kinds = {(cell, first): 1}
    if L > 1:
        kinds[(cell, H)] = kinds.get((cell, H), 0) + L - 1
    return tuple((c, n_in, H, n) for (c, n_in), n in kinds.items())


def _signature(stack) -> _Sig:
    """``{(cell, n_in, width): count}`` over the layers, and the settings an estimate reads."""
    L, H = stack.layers, stack.hidden_size
    widths = None if isinstance(H, int) else tuple(H)
    if widths is None:
        first = H if stack.input_projection else stack.input_size
        ins = None
    else:
        H = max(widths)
        first = widths[0] if stack.input_projection else stack.input_size
        ins = [first] + list(widths[:-1])
    cells = getattr(stack, "cells", None)
    one = cells is None or all(c is cells[0] for c in cells)
    if one and widths is None:  # one cell object, one width: no per-layer walk
        c = stack.cell if cells is None else cells[0]
        kinds, name = _kinds_of(c, L, H, first), c.name
    else:
        cells = cells or (stack.cell,) * L
        counts = collections.Counter(zip(cells, ins or [first] + [H] * (L - 1),
                                         widths or (H,) * L))
        kinds = tuple((c, n_in, h, n) for (c, n_in, h), n in counts.items())
        name = "+".join(dict.fromkeys(c.name for c in cells))
    return _Sig((kinds, L, H, stack.input_size, bool(stack.input_projection),
                 getattr(stack, "norm", None), stack.checkpoint, stack.evaluation_order, name,
                 widths))


def _params_bytes(stack: _Sig, kinds: dict, item: int) -> int:
    """The layers' parameters (``kinds``: ``{(cell, n_in, width): (count, _step(...))}``), the
    input projection's and a norm's scale (and bias)."""
    params = sum(n * st[0] for n, st in kinds.values())
    if stack.input_projection:
        H0 = stack.hidden_size if stack.widths is None else stack.widths[0]
        params += (stack.input_size * H0 + H0) * item
    if stack.norm is not None:
        all_w = sum(n * h for (_, _, h), (n, _) in kinds.items())
        params += all_w * (2 if stack.norm == "layer" else 1) * item
    return params


def _kinds(stack: _Sig, B, dtype, tapped: bool) -> dict:
    """``{(cell, n_in, width): (count, _step(...))}``: one step's sizes and FLOPs per kind of
    layer in ``stack``."""
    with own_code("tracing one step of the stack's cells (its memory and FLOPs)"):
        return {(c, n_in, h): (n, _step(c, n_in, h, B, dtype, tapped))
                for c, n_in, h, n in stack.kinds}


def _stacked(kinds: dict) -> int:
    """Bytes of the layers of one shape stacked into one array inside the compiled function."""
    return sum(n * st[0] for n, st in kinds.values() if n > 1)


def _seconds(stack: _Sig, T: int, flops: float, sweeps: float, calibrate: bool,
             dtype: str = "float32") -> float:
    """Seconds for ``flops`` and ``sweeps`` passes over the sequential steps (``T + L - 1`` in
    wavefront order, ``L T`` layer by layer), from the machine's calibration (a float32
    matmul; float64 at half its rate, as CPUs and GPUs run it); NaN unasked."""
    if not calibrate:
        return math.nan
    rate, per_step = calibration()
    rate = rate / 2 if dtype == "float64" else rate
    seq = (T + stack.layers - 1) if stack.order == "wavefront" else stack.layers * T
    return flops / rate + seq * per_step * sweeps


@functools.lru_cache(maxsize=256)
def _estimate(stack: _Sig, B, T, dtype, wrt, method, probes, calibrate) -> Cost:
    L, H, D = stack.layers, stack.hidden_size, stack.input_size  # H: the largest width
    Ws = stack.widths  # None: every layer H wide
    H0 = H if Ws is None else Ws[0]
    below = (L - 1) * H if Ws is None else sum(Ws[:-1])  # features read by layers 1..L-1
    all_w = L * H if Ws is None else sum(Ws)
    item = jnp.dtype(dtype).itemsize
    first = H0 if stack.input_projection else D
    tapped = wrt == "params" and method == "gradient"
    if method == "gates":
        return _gates_estimate(stack, B, T, dtype, wrt, probes, calibrate)
    if method in ("gains", GAINS_RMS):
        return _gains_estimate(stack, B, T, dtype, wrt, probes, calibrate, method == "gains")
    kinds = _kinds(stack, B, dtype, tapped)
    r_all = sum(n * st[1] for n, st in kinds.values())  # one step of every layer
    r_step = max(st[1] for _, st in kinds.values())  # one step of the worst layer
    xp_step = max(st[2] for _, st in kinds.values())
    s_step = max(st[3] for _, st in kinds.values())
    f_all = sum(n * st[4] for n, st in kinds.values())
    params = _params_bytes(stack, kinds, item)
    norm = stack.norm
    inputs = B * T * D * item
    # The layers' inputs (layer 0: the data or its projection; above: what the layer below emits).
    layer_inputs = B * T * (first + below) * item
    # A norm (and the residual sum) keeps about two (B, H) arrays per step of every layer.
    emit = 2 * B * H * item if norm is not None else 0
    C = _chunk(stack.checkpoint, T)
    if C is None:
        residuals = layer_inputs + T * (r_all + (2 * B * all_w * item if norm else 0))
    else:  # one layer recomputed at a time: T/C chunk-boundary states + C steps inside a chunk
        # (plus that layer's recomputed states over the whole sequence); a state map keeps
        # every layer's input projection, which its forward computes whole and its backward
        # reads (XLA: an LSTM of 4 layers x 2000 steps, H 128, batch 16 took 453 MB for the
        # 305 MB estimated without them, 131 MB of projections; a parameter map recomputes
        # them, 60 MB for 78 MB estimated at 4 x 1000, H 64)
        xp_kept = (xp_step if wrt == "params"
                   else sum(n * st[2] for n, st in kinds.values()))
        residuals = (layer_inputs + math.ceil(T / C) * s_step + C * r_step
                     + T * (xp_kept + s_step + emit))
    # One layer's transient buffers: its input projection (and cotangent) and the cotangent of
    # its input; the layers of one shape stacked into one array inside the compiled function.
    working = 2 * T * xp_step + B * T * max(first, H) * item + _stacked(kinds)
    if method == "gradient":
        result = 2 * L * T * item + L * B * T * item  # the map and the taps' gradient
        passes = 1
    else:  # backward passes vmapped over basis vectors / probes, several at once
        n = H if method == "exact" else probes
        # per vector: the (L, B, T, H) cotangents of every state and of every layer's input,
        # and one layer's projection cotangents (as jacobian._basis_chunk sizes the chunks)
        per = 2 * L * B * T * H * item + 2 * T * xp_step + B * T * max(first, H) * item
        chunk = n if method == "probe" else max(1, min(H, (256 << 20) // max(L * T * B * H * 4,
                                                                              1)))
        working += min(n, chunk) * per
        result = 2 * L * T * item
        passes = n
    total = params + inputs + residuals + working + result
    fwd = T * f_all
    flops = fwd * (1 + 2 * passes + (1 if C is not None else 0))
    seconds = _seconds(stack, T, flops, 1 + 2 * passes + (C is not None), calibrate, dtype)
    return Cost(int(params), int(inputs), int(residuals), int(working), int(result), int(total),
                float(flops), float(seconds), (stack, B, T, dtype, wrt, method, probes))


def _gates_estimate(stack: _Sig, B, T, dtype, wrt, probes, calibrate) -> Cost:
    """:func:`estimate` for ``method="gates"``: one forward pass, nothing kept for a backward.

    The forward keeps every state and reported gate of every ``(l, t)`` and each layer's input
    (``S + G + 1`` arrays ``(B, T, H)`` per layer, ``H`` the largest width); the reductions
    add a stacked copy of the gates and their histogram bin indices (``2 G`` more), besides one
    layer's input projection.
    """
    item = jnp.dtype(dtype).itemsize
    L, D = stack.layers, stack.input_size
    kinds = _kinds(stack, B, dtype, False)
    params = _params_bytes(stack, kinds, item)
    H = stack.hidden_size  # the largest width: narrower layers' states and gates are padded
    # every layer holds an array for every gate of the stack (NaN where its cell has none)
    gates = len(dict.fromkeys(g for c, _, _, _ in stack.kinds for g in c.gate_names))
    kept = sum(n * (len(c.state_names) + gates + 1) * B * T * H * item
               for (c, _, _), (n, _) in kinds.items())
    working = (L * 2 * gates * B * T * H * item
               + T * max(st[2] for _, st in kinds.values()) + _stacked(kinds))
    # about a dozen (L, T) and (L, H) maps and an (L, bins) histogram per gate
    result = 12 * gates * L * (T + H + 20) * item
    inputs = B * T * D * item
    flops = float(T * sum(n * st[4] for n, st in kinds.values()))
    seconds = _seconds(stack, T, flops, 1, calibrate, dtype)
    total = params + inputs + kept + working + result
    return Cost(int(params), int(inputs), int(kept), int(working), int(result), int(total),
                flops, float(seconds), (stack, B, T, dtype, wrt, "gates", probes))


def _svd_flops(m: int, n: int) -> float:
    """FLOPs of the singular values of an ``m x n`` matrix: its reduction to bidiagonal form,
    :math:`4 m n^2 - 4 n^3 / 3` for ``m >= n`` (Golub and Van Loan, Alg. 5.4.2); the
    iterations on the bidiagonal are :math:`O(n^2)`."""
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n - 4.0 * n ** 3 / 3


def _gains_estimate(stack: _Sig, B, T, dtype, wrt, k, calibrate, spectral) -> Cost:
    r""":func:`estimate` for ``method="gains"`` (:func:`gradflow.local_gains`).

    Memory: the forward pass keeps every layer's states, its previous states and its input
    (``2 S + 1`` arrays ``(B, T, H)`` per layer, ``S`` state components, ``H`` the largest
    width); then one ``lax.map`` batch of ``chunk`` steps holds every example's Jacobians, the
    vertical ``H x n_in`` and temporal ``H x H`` and (``S > 1``) the whole state's
    ``S H x S H``, about four times over (the Jacobians, their scaled copies and squares, the
    SVD's work). Work: the forward's matmuls, and at every ``(l, t)`` of every example one
    reverse-mode pass per Jacobian row, each about one step's matmuls for one example
    (:math:`2 \sum n_{in} n_{out}`), plus the singular values of the three Jacobians
    (:func:`_svd_flops`), timed by :func:`svd_seconds`: on a CPU far below the matmul rate,
    they take most of the time (without ``spectral``: none).
    """
    item = jnp.dtype(dtype).itemsize
    L, D, H = stack.layers, stack.input_size, stack.hidden_size
    chunk = min(k or gains_chunk(B, T, H), T)  # k: the caller's chunk, 0 for the default
    kinds = _kinds(stack, B, dtype, False)
    params = _params_bytes(stack, kinds, item)
    inputs = B * T * D * item
    kept = sum(n * (2 * len(c.state_names) + 1) * B * T * H * item
               for (c, _, _), (n, _) in kinds.items())
    mm, svd, svd_time, jac = 0.0, 0.0, 0.0, 0
    for (c, n_in, h), (n, st) in kinds.items():
        S = len(c.state_names)
        f = st[4] / B  # one example's step
        rows = 2 * h + (S * h if S > 1 else 0)
        mm += n * T * B * ((3 if S > 1 else 2) * f + rows * f)
        shapes = ((h, n_in), (h, h)) + (((S * h, S * h),) if S > 1 else ())
        jac = max(jac, sum(a * b for a, b in shapes))
        if not spectral:
            continue
        svd += n * T * B * sum(_svd_flops(*mn) for mn in shapes)
        if calibrate:
            svd_time += sum(svd_seconds(*mn, count=n * T * B) for mn in shapes)
    working = 4 * chunk * B * jac * item + T * max(st[2] for _, st in kinds.values()) \
        + _stacked(kinds)
    result = (6 if spectral else 3) * L * T * item
    flops = float(T * sum(n * st[4] for n, st in kinds.values()) + mm + svd)
    seconds = _seconds(stack, T, flops - svd, 1, calibrate, dtype) + svd_time
    total = params + inputs + kept + working + result
    return Cost(int(params), int(inputs), int(kept), int(working), int(result), int(total),
                flops, float(seconds),
                (stack, B, T, dtype, wrt, "gains" if spectral else GAINS_RMS, k))


# ---------------------------------------------------------------------------------------------
# Limits


def parse_size(text) -> int:
    """``"2G"``, ``"512M"``, ``"1.5GiB"``, ``"100000"`` (bytes) -> bytes (binary units)."""
    if isinstance(text, bool) or not isinstance(text, (str, int, np.integer, float, np.floating)) \
            or (not isinstance(text, str) and float(text) != math.floor(float(text))):
        raise ValueError(f"memory size must be a whole number of bytes or a string such as 2G "
                         f"or 512M, got {text!r}")
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    for unit, k in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if s.endswith(unit):
            s, scale = s[:-1], k
            break
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"memory size must be a number with an optional unit K, M, G or T "
                         f"(e.g. 2G, 512M), got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"memory size must be a finite positive size, got {text!r}")
    if scale == 1 and v != math.floor(v):  # ("1.5" read as 1 byte: a unit left out)
        raise ValueError(f"memory size {text!r} without a unit is in bytes, a whole number: "
                         "give a unit, e.g. 1.5G")
    return int(v * scale)


def _fits(stack, B, T, req, limit) -> Cost | None:
    _, _, _, dtype, wrt, method, probes = req
    c = _estimate(stack, B, T, dtype, wrt, method, probes, False)
    return c if c.total <= limit else None


def _largest(fits, hi: int) -> int:
    """The largest ``n`` in ``1..hi`` with ``fits(n)`` (monotone), 0 if none."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def suggestions(cost: Cost, limit: int, cli: bool = False,
                checkpoint: bool = True) -> list[str]:
    """What would fit under ``limit`` bytes: checkpointing, a smaller batch or fewer steps, or
    (when even one example of one step does not fit) fewer layers or a smaller hidden size."""
    stack, B, T, dtype, wrt, method, probes = cost.request
    req = cost.request
    name = (lambda k, v: f"--{k} {v}") if cli else (lambda k, v: f"{k}={v!r}")
    out = []
    cands = [stack]
    if stack.checkpoint is None and checkpoint and method not in ("gates", "gains", GAINS_RMS):
        ck = stack.replace(checkpoint="auto")
        c = _estimate(ck, B, T, dtype, wrt, method, probes, False)
        if c.total < cost.total:
            verb = "brings it to" if c.total <= limit else "only brings it to"
            out.append(f"{name('checkpoint', 'auto')} {verb} {size(c.total)}")
            if c.total <= limit:
                return out
            cands.append(ck)
    best = cands[-1]
    also = "" if best is stack else f" with {name('checkpoint', 'auto')}"  # not without it
    b = _largest(lambda n: _fits(best, n, T, req, limit) is not None, B)
    if b:
        out.append(f"{name('batch', b)} fits{also}")
    t = _largest(lambda n: _fits(best, B, n, req, limit) is not None, T)
    if t:
        out.append(f"{name('steps', t)} fits{also}")
    if not b and not t:
        one = _estimate(best, 1, 1, dtype, wrt, method, probes, False)
        what = (f"even 1 example of 1 step needs {size(one.total)} (the parameters alone "
                f"{size(one.params)})")

        def layers_fit(n):
            return _fits(best.replace(layers=n), 1, 1, req, limit) is not None

        one_cell = len({c for c, _, _, _ in stack.kinds}) == 1 and stack.widths is None
        n = _largest(layers_fit, stack.layers) if stack.layers > 1 and one_cell else 0
        hint = [f"{name('layers', n)}" if n else None, "a smaller hidden size"]
        out.append(what + ": use " + " or ".join(h for h in hint if h))
    return out


def check_fits(cost: Cost, limit=None, cli: bool = False, checkpoint: bool = True) -> Cost:
    """Return ``cost`` if its ``total`` fits in ``limit`` bytes (default
    :func:`available_memory`), else raise one ValueError naming the need, the limit and what
    would fit (see :func:`suggestions`; ``cli``: written as command-line options;
    ``checkpoint``: whether checkpointing may be suggested). Raised before anything is
    compiled."""
    if not isinstance(cost, Cost):
        raise TypeError(f"cost must be a Cost (cost.estimate(...)), got {type(cost).__name__}")
    source = "limit"
    if limit is None:
        limit, source = available_memory(), "available"
    else:
        limit = parse_size(limit) if isinstance(limit, str) else int(limit)
    if cost.total <= limit:
        return cost
    stack, B, T, dtype, wrt, method, probes = cost.request
    what = (f"this measurement ({stack.name}, {stack.layers} layer{'s' * (stack.layers != 1)} "
            f"x {T} steps, "
            f"H={_width_text(stack)}, batch {B}, {dtype}"
            + {"gradient": f", wrt {wrt}", "gates": ", gate statistics",
               "gains": ", local gains", GAINS_RMS: ", local gains (rms)"}.get(
                method, f", jacobian {method}") + ")")
    tips = suggestions(cost, limit, cli, checkpoint)
    raise ValueError(f"{what} needs about {size(cost.total)} of memory (parameters "
                     f"{size(cost.params)}, {cost.kept} {size(cost.residuals)}), "
                     f"more than the {size(limit)} {source}"
                     + (f"; {'; '.join(tips)}" if tips else ""))


def at_once(c: "Cost", problems: int) -> int:
    """Bytes for ``problems`` measured at once in one program (vmapped seeds and inits: ``c``
    estimated for their examples as one batch): each problem's parameters and their
    layer-stacked copy on top (XLA: 15 GiB for 64 seeds of 6 x H = 1024, where the examples
    alone make 0.5 GiB)."""
    return c.total + (2 * problems - 1) * c.params


def check_need(need: int, what: str, smaller: str) -> None:
    """A ValueError, before anything is compiled, when ``need`` bytes (an estimate made of
    :func:`estimate` parts) exceed :func:`available_memory`: ``"{what} needs about ...; more
    than the ... available: {smaller}"`` (``smaller``: what the caller can shrink). For work
    that is not one measurement (training, an atlas's vmapped seeds); a measurement checks
    itself with :func:`check_fits`."""
    avail = available_memory()
    if need > avail:
        raise ValueError(f"{what} needs about {size(need)} of memory, more than the "
                         f"{size(avail)} available: {smaller}")


def compiled(jitted, statics: tuple, args: tuple, what: str, smaller, copies: int = 1):
    """``jitted`` (a ``jax.jit`` function whose first ``len(statics)`` arguments are its
    static ones) lowered and compiled for ``args``' shapes, dtypes and shardings at the matmul
    precision in force, once per them (part of the key, as of ``jax.jit``'s own cache), and
    its memory checked before it is returned to run: the programs of a user's own function
    (:func:`gradflow.model_map`, :func:`gradflow.model_jacobian_map`,
    :func:`gradflow.gates.model_saturation`), whose need no estimate here can know. XLA's count of the compiled program's memory (arguments, outputs
    and temporaries; ``memory_analysis()``, per device for a sharded one) times ``copies``
    (the devices that share one memory: a CPU's simulated devices) is checked on every call
    against :func:`available_memory`: an :class:`~gradflow.errors.InputError` naming
    ``what`` and ``smaller`` (what the caller can shrink: text, or ``smaller(need,
    available)`` making it, :func:`shrink_hint`) where it does not fit; nothing where the
    backend gives no analysis.

    ``jitted(*statics, *args)`` is what the returned program computes, as ``program(*args)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    specs = tuple(jax.ShapeDtypeStruct(  # placed where committed, as a call would place them
        jnp.shape(a), jnp.result_type(a),
        sharding=a.sharding if getattr(a, "committed", False) else None) for a in leaves)
    program = _compile(jitted, tuple(statics), treedef, specs,
                       jax.config.jax_default_matmul_precision)
    memory = program.memory_analysis()
    if memory is not None:
        need = copies * (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                         + memory.output_size_in_bytes)
        with user_input():
            check_need(need, what, smaller(need, available_memory()) if callable(smaller)
                       else smaller)
    return program


def shrink_hint(batch: int, steps: int, also: str = "", fixed: int = 0
                ) -> Callable[[int, int], str]:
    """``smaller`` for :func:`compiled` where a program's memory grows with a batch of
    ``batch`` examples of ``steps`` steps (a user's model): ``hint(need, available)`` names
    about the batch and the number of steps that fit, each alone, the need less ``fixed``
    bytes (the parameters) taken as proportional to it: an estimate (XLA may keep more that
    does not shrink), which the refusal of a smaller request corrects. ``also``: what else
    may shrink.

    >>> shrink_hint(16, 1000, "or checkpoint your scan")(4 << 30, 1 << 30)
    'give fewer examples or steps (about batch 4 or 250 steps would fit), or checkpoint your scan'
    """
    def hint(need: int, available: int) -> str:
        share = (available - fixed) / max(need - fixed, 1)
        fit = [f"batch {b}" for b in [math.floor(batch * share)] if 0 < b < batch]
        fit += [f"{t} steps" for t in [math.floor(steps * share)] if 0 < t < steps]
        return ("give fewer examples or steps" + (f" (about {' or '.join(fit)} would fit)"
                                                 if fit else "") + (f", {also}" if also else ""))
    return hint


@functools.lru_cache(maxsize=64)
def _compile(jitted, statics, treedef, specs, precision):
    """:func:`compiled`'s cache: ``precision`` is only a key (the compile reads it from the
    config in force)."""
    return jitted.lower(*statics, *jax.tree_util.tree_unflatten(treedef, specs)).compile()


def _width_text(sig) -> str:
    """``H`` of an estimate's stack signature: one width, or every layer's."""
    return str(sig.hidden_size if sig.widths is None else list(sig.widths))


def check_arrays_fit(stack, batch: int, steps: int, dtype) -> None:
    """A ValueError, before anything is allocated, when a problem's own arrays (parameters and
    inputs, from :func:`estimate`'s shapes) exceed :func:`available_memory`, naming what would
    fit (parameters within half the memory, leaving room for a measurement). A measurement on
    them checks its own, larger, need (:func:`check_fits`)."""
    c = estimate(stack, batch, steps, dtype, calibrate=False)
    avail = available_memory()
    if c.params + c.inputs <= avail:
        return
    sig = c.request[0]
    tips = []
    if c.inputs > avail / 2:
        tips.append("a smaller batch or fewer steps")
    if c.params > avail / 2:
        def fits(n):
            return estimate(stack.replace(layers=n), 1, 1, dtype,
                            calibrate=False).params <= avail / 2
        n = _largest(fits, stack.layers) if sig.widths is None else 0
        tips.append((f"at most {n} layers (half the memory) or " if n else "")
                    + "a smaller hidden size")
    raise ValueError(f"this problem ({sig.name}, layers {stack.layers}, H={_width_text(sig)}, "
                     f"batch {batch}, {steps} steps, {jnp.dtype(dtype).name}) needs "
                     f"{size(c.params)} of parameters and {size(c.inputs)} of inputs, more "
                     f"than the {size(avail)} of memory available; use " + " and ".join(tips))


__all__ = ["Cost", "estimate", "available_memory", "check_fits", "check_arrays_fit",
           "calibration", "parse_size", "at_once", "suggestions", "WRTS", "METHODS"]
