r"""Exact gradient maps, Jacobian maps and local gains through deep recurrent stacks.

Notation: ``h^l_t`` is the output of layer ``l`` at step ``t`` of a :class:`gradflow.Stack`;
maps are ``(L, T)`` arrays indexed ``[layer, time]``.

* :func:`gradient_map`: :math:`G[l,t] = \mathrm{mean}_b \|\partial \mathcal L/\partial h^l_t[b]\|_2`
  (``wrt="hidden"``; ``"cell"`` for the memory ``c^l_t`` as it is carried to the next step,
  :func:`gradient_map`) from ONE backward pass: a zero
  perturbation is added where every state leaves its cell and the loss is differentiated w.r.t.
  all of them at once. ``wrt="params"``: :math:`P[l,t] = \mathrm{mean}_\theta |\partial \mathcal L/
  \partial \theta^l_{(t)}|`, the gradient w.r.t. the copy of layer ``l``'s parameters used at step
  ``t`` (:math:`\sum_t \partial\mathcal L/\partial\theta^l_{(t)} = \partial\mathcal L/\partial\theta^l`),
  obtained in ONE backward pass without materialising ``L x T`` parameter copies: each step
  uses its own tapped copy of its layer's parameters (:func:`gradflow.stack.mean_abs_tap`),
  whose gradient is reduced to its mean absolute value inside the backward pass as soon as it
  is formed (:func:`per_step_param_grads` is the direct, per-step-VJP formulation).
* :func:`jacobian_map`: :math:`J[l,t] = \mathrm{mean}_b \|\partial h^{L'}_{T'}[b]/\partial h^l_t[b]\|`,
  exactly (one VJP per basis cotangent of the target, ``vmap``-ed in chunks) or estimated from
  ``k`` Gaussian probes (:math:`E\|v^\top J\|^2 = \|J\|_F^2`) with a standard error.
* :func:`local_gains`: the one-step Jacobians, vertical :math:`\partial h^l_t/\partial x^l_t` and
  temporal :math:`\partial h^l_t/\partial h^l_{t-1}`, as RMS gain and spectral norm.

Norms: ``"rms"`` is :math:`\|J\|_F/\sqrt{n}` for a Jacobian with ``n`` columns (the gain of an
isotropic random perturbation: 1.0 means magnitude preserved), ``"spectral"`` the largest
singular value. All results are :class:`gradflow.results.Result` objects.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
import warnings
from typing import Callable

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax

from gradflow import checks
from gradflow import cost as _cost
from gradflow.errors import InputError, user_input
from gradflow.results import NonFiniteForwardWarning, Result, make_result
from gradflow.views import LOSSES, WRTS, expected_positive
from gradflow.cells.base import normal
from gradflow.stack import (Stack, emit, finite_positions, finite_states, in_precision,
                            map_layers, safe_mean, safe_norm, scaled_reduction,
                            where_nonfinite)
from gradflow.linalg import singular_values
from gradflow.xla import jit

NORMS = ("rms", "spectral")
METHODS = ("exact", "probe")
CLASSES = 10


# ---------------------------------------------------------------------------------------------
# Losses


@dataclasses.dataclass(frozen=True)
class ReadoutLoss:
    r"""The default loss: a fixed random linear readout to ``classes`` classes, cross-entropy
    against fixed random labels, averaged over the batch.

    ``loss="last"``: the readout of the stack's output at the last step only (final-output
    loss); ``loss="all"``: the mean over ``t`` of the readout loss at every step (sequence
    loss). The stack's output is its top layer's: :math:`h^{L-1}_t` in a plain stack,
    ``norm(h + x)`` where the stack adds a residual and a norm (``Stack.apply``'s ``top``; the
    readout reads what the stack hands on, as a model's head would). A Jacobian map's target,
    by contrast, is the state :math:`h^{L'}_{T'}` itself (:func:`jacobian_map`).
    Readout :math:`W_r \sim N(0, 1/H)`, labels ``(B, T)`` uniform, both from ``key(seed)``;
    :math:`W_r` is drawn in float32 and cast to ``dtype``, so a float64 loss holds the float32
    loss's draws (one problem at every precision).

    A frozen (hashable) dataclass rather than a closure, so that jitted measurements taking it
    as a static argument compile once per configuration, not once per call.

    Call: ``loss(outputs: (B, T, H)) -> scalar``.
    """

    loss: str
    hidden_size: int
    steps: int
    batch: int
    seed: int = 0
    dtype: str = "float32"
    classes: int = CLASSES

    def readout(self, seed=None):
        """``(W_r: (H, classes), labels: (B, T) int32)`` from ``key(seed)`` (default
        ``self.seed``; ``seed`` may be traced, see :func:`seeded_readout_loss`)."""
        kw, ky = jax.random.split(jax.random.key(self.seed if seed is None else seed))
        w = normal(kw, (self.hidden_size, self.classes), jnp.dtype(self.dtype))
        labels = jax.random.randint(ky, (self.batch, self.steps), 0, self.classes,
                                    dtype=jnp.int32)
        return w / math.sqrt(self.hidden_size), labels

    def __call__(self, outputs):
        return self.of(outputs, *self.readout())

    def of(self, outputs, w, labels):
        """The loss of ``outputs`` under the readout ``w`` and ``labels``."""
        if self.loss == "last":
            logits, y = outputs[:, -1] @ w, labels[:, -1]
        else:
            logits, y = outputs @ w, labels
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


def readout_loss(loss: str, hidden_size: int, steps: int, batch: int, seed: int = 0,
                 dtype="float32", classes: int = CLASSES) -> ReadoutLoss:
    """The default loss for ``(B, T, H)`` outputs (see :class:`ReadoutLoss`)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    seed = checks.seed("readout_seed", seed)
    return ReadoutLoss(loss, int(hidden_size), int(steps), int(batch), seed,
                       jnp.dtype(dtype).name, int(classes))


def seeded_readout_loss(base: ReadoutLoss, seed) -> Callable:
    """``base`` with its readout and labels drawn from ``key(seed)`` for a traced ``seed``: one
    readout per problem under ``vmap`` (:mod:`gradflow.atlas` with ``readout_seed="seed"``).
    A plain closure over the traced seed, for use inside one trace (not a static argument:
    it is a new function at every call). Equal to ``readout_loss(..., seed)`` at that seed."""
    def loss(outputs):
        return base.of(outputs, *base.readout(seed))
    return loss


def _loss(loss, stack: Stack, xs, seed: int) -> tuple[Callable, str]:
    if callable(loss):
        return loss, getattr(loss, "__name__", "callable")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)} or a callable "
                         "loss(outputs: (B, T, H)) -> scalar")
    B, T, _ = xs.shape
    return readout_loss(loss, stack.widths[-1], T, B, seed, xs.dtype), loss


# ---------------------------------------------------------------------------------------------
# Shared checks and config


@user_input()
def _prepare(stack: Stack, params, xs, loss=None):
    """Check every argument at the door (:mod:`gradflow.checks`); ``xs`` in the params' dtype.

    Its ValueErrors/TypeErrors are the user's to fix: raised as
    :class:`gradflow.errors.InputError`.
    """
    if not isinstance(stack, Stack):
        raise TypeError(f"stack must be a gradflow.Stack, got {type(stack).__name__}")
    checks.check_concrete(params, xs)
    xs = checks.check_xs(stack, xs)
    checks.check_params(stack, params)
    checks.warn_narrowed(xs, params, "gradflow", stacklevel=5)
    checks.warn_nonfinite_params(params, "gradflow", stacklevel=5)
    dtype = jax.tree_util.tree_leaves(params["layers"][0])[0].dtype
    xs = jnp.asarray(xs, dtype)
    checks.check_finite_inputs(xs)
    if callable(loss):
        B, T, _ = xs.shape
        checks.check_scalar_loss(loss, jax.ShapeDtypeStruct((B, T, stack.widths[-1]), dtype))
    return xs


def _per_example(stack: Stack, who: str) -> None:
    """A ValueError where a cell of ``stack`` couples the examples of a batch
    (``Cell.couples_batch``): per-example Jacobians are not defined there."""
    coupled = sorted({c.name for c in stack.cells if c.couples_batch})
    if coupled:
        raise ValueError(
            f"{who} measures per-example Jacobians, and cell {coupled[0]!r} couples the "
            "examples of a batch (e.g. batch statistics: perturbing one example moves the "
            "others), so they are not defined; gradient_map measures such a stack (its "
            "gradients include the coupling), or use the cell with per-example statistics")


def _config(stack: Stack, xs, meta, **extra) -> dict:
    """A measurement's config: the stack's, the sizes, ``meta`` (e.g. the problem's seed and
    input scale; it must agree with the stack and sizes where it repeats them), then the
    measurement's own settings ``extra``, which ``meta`` cannot overwrite (they say how the
    numbers were made): :func:`gradflow.checks.with_meta`."""
    B, T, _ = xs.shape
    return checks.with_meta({**stack.config, "steps": int(T), "batch": int(B),
                             "dtype": str(xs.dtype)}, meta, **extra)


def _zeros_perturb(stack: Stack, xs, names):
    B, T, _ = xs.shape
    return {k: jnp.zeros((stack.layers, B, T, stack.max_width), xs.dtype) for k in names}


def state_gradients(stack: Stack, params, xs, loss_fn: Callable, names=("h",)):
    r"""Total derivatives :math:`\partial\mathcal L/\partial s^l_t` of every state in one backward pass.

    Args:
      loss_fn: ``(B, T, H_{L-1}) top-layer outputs -> scalar``.
      names: which states (``"h"``, ``"c"``).
    Returns:
      ``(value, grads {name: (L, B, T, H)}, out)`` with ``out`` the :class:`StackOutput`
      (``H = stack.max_width``; exact zeros beyond each layer's width, which reach nothing).
    """
    def f(eps):
        out = stack.apply(params, xs, perturb=eps)
        return loss_fn(out.top), out

    (value, out), grads = jax.value_and_grad(f, has_aux=True)(_zeros_perturb(stack, xs, names))
    return value, grads, out


# ---------------------------------------------------------------------------------------------
# Gradient maps


def gradient_map(stack: Stack, params, xs, *, loss="last", wrt: str = "hidden",
                 readout_seed: int = 0, meta: dict | None = None) -> Result:
    r"""The ``[layer, time]`` map of gradient magnitudes.

    ``wrt="hidden"``: :math:`G[l,t] = \mathrm{mean}_b \|\partial\mathcal L/\partial h^l_t[b]\|_2`,
    the total derivative w.r.t. the output of layer ``l`` at step ``t``; ``wrt="cell"`` the
    same for an LSTM-type memory ``c^l_t`` as it leaves the cell, the state carried to step
    ``t + 1``: the gradient along the memory path, with ``h^l_t`` (formed from ``c^l_t``
    inside the step) held fixed, so the last step is exactly 0. That is not what
    ``c.retain_grad()`` gives in a PyTorch loop of ``nn.LSTMCell`` (its ``c`` also feeds that
    step's ``h``: the total derivative, the memory path plus ``(dh_t/dc_t)^T dL/dh_t``, larger
    and non-zero at the last step); the hidden map holds the rest. ``wrt="params"``:
    :math:`P[l,t] = \mathrm{mean}_\theta |\partial\mathcal L/\partial\theta^l_{(t)}|` over every
    parameter entry of layer ``l`` (the batch averaged inside the loss): the cell's
    parameters, used once per step; a normalised stack's norm scale and bias (and the input
    projection) are not among them.

    Args:
      stack, params: a :class:`gradflow.Stack` and its parameters.
      xs: ``(B, T, D)`` inputs.
      loss: ``"last"``, ``"all"`` (see :func:`readout_loss`) or ``fn(outputs: (B, T, H)) -> scalar``
        (compiled with the map: pass one function object, not a fresh ``lambda`` per call,
        or every call compiles again).
      wrt: ``"hidden"``, ``"cell"`` or ``"params"``.
      readout_seed: seed of the default readout and labels.
      meta: extra config recorded in the result (e.g. ``problem(...).config``).
    Returns:
      Result ``kind="gradient_map"`` with ``values: (L, T)`` and ``loss_value: ()``; with the
      default losses ``result.underflow["values"]`` counts the entries below the dtype's normal
      range (exactly 0: a gradient that underflowed) where the loss makes them positive
      (:func:`expected_positive`).
      Norms are formed without squaring tiny numbers (:func:`gradflow.stack.safe_norm`).
      Where the loss is not finite (the forward pass overflowed) every entry is NaN, with a
      :class:`~gradflow.results.NonFiniteForwardWarning` saying where the states are not finite.
    """
    check_wrt(stack, wrt)
    xs = _prepare(stack, params, xs, loss)
    with user_input():  # too big for this machine: the user's sizes to change
        _cost.check_fits(_cost.estimate(stack, xs.shape[0], xs.shape[1], xs.dtype, wrt,
                                        calibrate=False))
    loss_fn, loss_name = _loss(loss, stack, xs, readout_seed)
    value, vals = map_arrays(stack, params, xs, loss_fn, wrt)
    if not bool(jnp.isfinite(value)):
        warnings.warn(f"gradient_map: the loss is {float(value)} ("
                      f"{where_nonfinite(stack, params, xs)}): the gradient of a non-finite "
                      "loss is no gradient (where a state is NaN, ReLUs and comparisons pass "
                      "exact zeros back), so every entry of the map is NaN",
                      NonFiniteForwardWarning, stacklevel=2)
    config = _config(stack, xs, meta, loss=loss_name, wrt=wrt, readout_seed=readout_seed)
    return make_result("gradient_map", {"values": vals, "loss_value": value}, config,
                       positive=expected_positive(loss, wrt, xs.shape[1]))


@jax.custom_vjp
def tap(h, s):
    r"""Identity on a state ``h: (B, H)`` where it leaves a layer of a model of your own
    (:func:`model_map`, :func:`model_jacobian_map`); the gradient it hands to ``s`` is each
    example's norm :math:`\|\partial\mathcal L/\partial h\|_2` (``s: (B,)``, as
    :func:`gradflow.stack.norm_tap`, underflow-free), or that norm and ``H`` (``s: (B, 2)``,
    the taps of :func:`model_jacobian_map`, which divides by each layer's width). Taps
    ``s: (B, 3)`` count the model's reads of each tap instead (:func:`_tap_reads`)."""
    return h


#: The last axis of the taps with which :func:`_tap_reads` counts a model's reads.
_READS = 3


def _tap_fwd(h, s):
    _check_tap(h, s)
    # its rank says which taps these are, and where it is h's, its last axis which of the two
    rank = jnp.ndim(s)
    shape = (0,) * rank if rank < jnp.ndim(h) else (0,) * (rank - 1) + (jnp.shape(s)[-1],)
    return h, jnp.zeros(shape, s.dtype)


def _check_tap(h, s) -> None:
    """A ValueError unless ``s`` is a tap of ``h``'s examples: ``h.shape[:-1]`` (a map's
    ``taps[l, t]``), or that and 2 or 3 (a Jacobian map's, the read count's). A wrong slice
    of the taps failed inside JAX's custom_vjp machinery."""
    if not hasattr(h, "shape") or not hasattr(h, "dtype"):
        what = type(h).__name__ + (f" of {len(h)}" if isinstance(h, (tuple, list, dict)) else "")
        raise InputError(f"gradflow.tap(h, s) taps one array, the state h: (batch, H) that "
                         f"leaves a layer, got a {what}; for a carry such as an LSTM's (c, h), "
                         "tap its h: c, h = carry; h = gradflow.tap(h, taps[l, t])")
    lead = tuple(jnp.shape(h))[:-1]
    if tuple(jnp.shape(s)) not in (lead, lead + (2,), lead + (_READS,)):
        raise InputError(f"gradflow.tap(h, s): h has shape {tuple(jnp.shape(h))}, so s must "
                         f"be its examples' tap, shape {lead} (taps[l, t] of taps of shape "
                         f"(layers, steps, batch)), got {tuple(jnp.shape(s))}")


def _tap_bwd(kind, g):
    # s's cotangent in s's dtype, the norm in the wider of the two (a model's bfloat16
    # states, float32 taps: the norm of the bfloat16 gradient, summed in float32)
    if kind.shape[-1:] == (_READS,) and kind.ndim == g.ndim:  # one read: a 1 in the first
        reads = jnp.zeros(g.shape[:-1] + (_READS,), kind.dtype)  # entry of each example's tap
        return jnp.zeros_like(g), reads.at[..., 0].set(1)
    n = safe_norm(g.astype(jnp.promote_types(g.dtype, kind.dtype))).astype(kind.dtype)
    if kind.ndim < g.ndim:
        return g, n
    return g, jnp.stack([n, jnp.full_like(n, g.shape[-1])], -1)


@functools.partial(jit, static_argnames=("model", "rest"))
def _tap_reads(model, rest, arrays, xs, taps):
    """``(L, T, B)``: how often ``model`` passes each ``taps[l, t, b]`` through :func:`tap`
    (``taps: (L, T, B, 3)``, whose :func:`tap` hands each read a 1 back; a read past the last
    row is one of the last row's, as JAX clamps the index). Nothing of the model's arithmetic
    reaches the result, so XLA compiles little more than the reads."""
    model = checks.with_static(model, rest)
    out, pull = jax.vjp(lambda s: model(arrays, xs, s), taps)
    return pull(jnp.zeros_like(out))[0][..., 0]


def _tapped(who: str, model, rest, arrays, xs, L: int):
    """``(L, T)`` bool, where ``model`` taps a state of every example (None where the count
    cannot be taken: a model that indexes its taps by their shape); a ValueError where a row of
    taps is never read (``layers`` larger than the layers the model taps) or an entry is read
    more than once (``layers`` smaller: JAX clamps ``taps[l]``, ``l >= layers``, to the last
    row; or a state tapped twice), either of which made the map wrong without a word."""
    B, T, _ = xs.shape
    try:
        reads = np.asarray(_tap_reads(model, rest, arrays, xs,
                                      jnp.zeros((L, T, B, _READS), checks.tap_dtype(xs))))
    except Exception:  # noqa: BLE001  (the model's own error, if any, comes from the map)
        return None
    if reads.max(initial=0) > 1:
        l, t, _ = (int(i) for i in np.argwhere(reads > 1)[0])
        why = (f"it taps more layers than layers={L} (JAX reads taps[l] with l >= {L} as "
               f"taps[{L - 1}]), or taps one state twice" if l == L - 1 else
               "it taps two states (or one state twice) with one entry")
        raise ValueError(
            f"{who}: the model passes taps[{l}, {t}] through gradflow.tap {int(reads[l, t].max())}"
            f" times: {why}; tap each layer's state once, at its own index, and count every "
            "tapped layer in layers")
    rows = reads.reshape(L, -1).any(axis=1)
    if not rows.any():  # nothing tapped: the map's own check says so, with what it measured
        return None
    if not rows.all():
        never = [int(i) for i in np.flatnonzero(~rows)]
        raise ValueError(
            f"{who}: the model never passes taps[{never[0]}] through gradflow.tap to its "
            f"outputs (rows {never} of {L}): give layers={int(rows.sum())} if it taps "
            f"{int(rows.sum())} layers, or tap every layer's state as h = gradflow.tap(h, "
            "taps[l, t]) where it goes on; a layer whose states the outputs never read has "
            "no gradient to measure (its row would be 0 by construction)")
    return (reads > 0).all(axis=2)


tap.defvjp(_tap_fwd, _tap_bwd)


def model_map(model: Callable, params, xs, *, layers: int, loss="last", readout_seed: int = 0,
              couples_batch: bool = True, reaches=None, meta: dict | None = None) -> Result:
    r"""The hidden map of a model of your own, one that a :class:`gradflow.Stack` does not
    express (layers that skip layers, a bidirectional layer, attention between layers, your
    own scan): :math:`G[l,t] = \mathrm{mean}_b \|\partial\mathcal L/\partial h^l_t[b]\|_2`, as
    :func:`gradient_map` with ``wrt="hidden"`` measures a stack's, in one backward pass.

    ``model(params, xs, taps) -> outputs (B, T, K)`` is your forward pass with one line per
    layer added: where layer ``l``'s state ``h: (B, H_l)`` of step ``t`` leaves the layer (to
    the next step and the layers above), ``h = gradflow.tap(h, taps[l, t])``. ``taps`` is
    ``(layers, T, B)`` zeros; :func:`tap` is the identity there, and the gradient w.r.t.
    ``taps`` is the map, each step's gradient reduced to its norms inside the backward pass
    (inside a ``lax.scan`` over time, scan ``taps[l]`` with the inputs). ``layers`` must count
    every layer the model taps, each state tapped once: the reads are counted first (a
    program of the model's taps alone, :func:`_tap_reads`), and a row never read or an entry
    read twice (JAX clamps an index past an array's end, so ``taps[l]`` with ``l >= layers``
    is a second read of row ``layers - 1``) is a ValueError; a ``(layer, step)`` left untapped
    reads 0 and is not counted as underflow. The model computes as it does
    elsewhere: its matmuls at JAX's default precision, a fast mode on GPUs and TPUs, unlike a
    Stack's float32 (``matmul_precision="highest"``); call ``model_map`` inside
    ``jax.default_matmul_precision("highest")`` for float32 there.

    >>> def rnn(params, xs, taps):       # 2 tanh layers; the top one also reads the inputs
    ...     def step(hs, inp):
    ...         x, tap_t = inp
    ...         h0 = gradflow.tap(jnp.tanh(x @ params["W0"] + hs[0] @ params["U0"]), tap_t[0])
    ...         h1 = jnp.tanh(h0 @ params["W1"] + x @ params["V1"] + hs[1] @ params["U1"])
    ...         h1 = gradflow.tap(h1, tap_t[1])
    ...         return (h0, h1), h1
    ...     h = jnp.zeros((xs.shape[0], 4))
    ...     _, top = jax.lax.scan(step, (h, h), (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(taps, 0, 1)))
    ...     return jnp.swapaxes(top, 0, 1)  # (B, T, 4)
    >>> k = iter(jax.random.split(jax.random.key(0), 6))
    >>> params = {n: jax.random.normal(next(k), (3 if n in ("W0", "V1") else 4, 4)) / 2
    ...           for n in ("W0", "U0", "W1", "V1", "U1")}
    >>> res = gradflow.model_map(rnn, params, jax.random.normal(next(k), (8, 6, 3)), layers=2)
    >>> res.values.shape, bool((res.values > 0).all())
    ((2, 6), True)

    Args:
      model: ``(params, xs, taps) -> (B, T, K)`` outputs, jittable (compiled with the map:
        pass one function object, not a fresh ``lambda`` per call).
      params: any pytree the model reads (trained weights as they are), an Equinox or Flax
        NNX module too: its array leaves are traced, the others (functions, Python numbers) held static
        as ``eqx.filter_jit`` holds them (a new value compiles again).
      xs: ``(B, T, D)`` inputs.
      layers: ``L``, the first axis of ``taps``.
      loss: ``"last"``, ``"all"`` (the readout losses of :func:`readout_loss`, of the ``K``
        outputs) or ``fn(outputs: (B, T, K)) -> scalar``.
      readout_seed: seed of the default readout and labels.
      couples_batch: whether the model mixes the examples of a batch (batch statistics,
        attention across examples). ``False`` is checked first (each of the first three
        examples' outputs differentiated w.r.t. the others' inputs,
        :func:`gradflow.checks.mixes_examples`; a ValueError where they depend on them), and
        lets it split the batch over the devices of :func:`gradflow.parallel.set_batch_devices`
        (on a CPU those of :func:`gradflow.parallel.use_cpu_devices`) as it does for a Stack's
        cells: the model runs on each device's examples, the loss on the gathered outputs (any
        loss, exact). Under ``"auto"`` any split that divides the batch is taken (the model's width,
        which the CPU rule weighs for a Stack, is unknown here). A model whose example's
        outputs move with its place in the batch or the batch's size (a dropout mask drawn
        with the batch's shape from a fixed key: each device would draw its own) is not
        split (:func:`gradflow.checks.depends_on_place`).
      reaches: a boolean ``(L, T)`` mask of the states the loss reaches, where an exact zero
        would be underflow rather than the model's structure (default, with the default
        losses: every tapped state; with a callable loss: none). E.g. a bidirectional model's
        top reverse states before the last step do not reach ``"last"``
        (:meth:`gradflow.models.TorchModel.reaches`).
      meta: extra config recorded in the result (e.g. where the weights come from).
    Returns:
      Result ``kind="gradient_map"``, ``values: (L, T)``, ``loss_value: ()``; drawn by
      :func:`gradflow.plot.heatmap`. Entries of ``reaches`` below the dtype's normal range
      count as underflow (as :func:`gradient_map`'s). Where the loss is not finite every entry
      is NaN.
    Raises:
      ValueError: ``xs`` not a floating ``(B, T, D)`` array (``checks.check_inputs``; a
        wrong dtype raises an ``InputTypeError``, both a ValueError and a TypeError) or not
        finite, ``layers`` not a positive integer,
        outputs not ``(B, T, K)``, a map of exact zeros (the model tapped no state), or a
        compiled map that needs more memory than is available (XLA's memory analysis, read
        before anything of the model's size runs; the message names about the batch and the
        steps that fit, :func:`gradflow.cost.shrink_hint`).
    """
    with user_input():
        xs, arrays, rest = checks.model_arguments("model_map", model,
                                                  "(params, xs, taps) -> outputs", params, xs)
        L = checks.positive_int("layers", layers)
        if not isinstance(couples_batch, bool):
            raise TypeError(f"couples_batch must be True or False, got {couples_batch!r}")
        B, T, _ = xs.shape
        if reaches is None:
            positive = expected_positive(loss, "hidden", T)
        else:
            positive = {"values": np.asarray(reaches)}
            if positive["values"].shape != (L, T) or positive["values"].dtype != bool:
                raise ValueError(f"reaches must be a boolean (layers, steps) = {(L, T)} mask, "
                                 f"got {positive['values'].dtype} of shape "
                                 f"{positive['values'].shape}")
        taps = jax.ShapeDtypeStruct((L, T, B), checks.tap_dtype(xs))  # (made once it fits)
        out = _model_outputs(model, rest, arrays, xs, taps)
        if callable(loss):
            checks.check_scalar_loss(loss, out)
            loss_fn, loss_name = loss, getattr(loss, "__name__", "callable")
        else:
            checks.choice("loss", loss, LOSSES)
            loss_fn = readout_loss(loss, out.shape[2], T, B, readout_seed, out.dtype)
            loss_name = loss
    what = (f"model_map ({getattr(model, '__name__', 'model')}, {L} layers x {T} steps, batch "
            f"{B}, {xs.dtype})")
    smaller = _cost.shrink_hint(B, T, "or checkpoint your scan (jax.checkpoint)",
                                checks.nbytes(arrays))
    # its memory checked before anything of the model's size runs (the checks below run it on
    # a few examples at full length: they took minutes and gigabytes before a refusal)
    program = _cost.compiled(_model_map, (model, loss_fn, rest), (arrays, xs, taps), what,
                             smaller)
    with user_input():
        tapped = _tapped("model_map", model, rest, arrays, xs, L)
        if not couples_batch and checks.mixes_examples(
                model, rest, arrays, xs, (((L, T, B), str(taps.dtype)),)):
            raise ValueError("model_map: couples_batch=False, but one example's outputs "
                             "depend on another's inputs: the model mixes the examples of a batch "
                             "(batch statistics, attention across examples), so splitting the "
                             "batch would change it; leave couples_batch=True (the default)")
        if tapped is not None and positive is not None:  # an untapped 0 is no underflow
            positive = {"values": np.asarray(positive["values"]) & tapped}
    from gradflow import parallel
    devices = () if couples_batch else parallel.should_split(xs, None, params)
    if devices and checks.depends_on_place(model, rest, arrays, xs, B // len(devices),
                                           (((L, T, B), str(taps.dtype)),)):
        devices = ()  # (a mask drawn with the batch's shape: each device would draw its own)
    if devices:
        value, vals = parallel.model_state_map(model, loss_fn, rest, arrays, xs, L, devices,
                                               what, smaller)
    else:
        taps = jnp.zeros(taps.shape, taps.dtype)
        value, vals = program(arrays, xs, taps)
    vals = jnp.where(jnp.isfinite(value), vals, jnp.nan)  # not a gradient where the loss is not
    if not bool(jnp.isfinite(value)):
        warnings.warn(f"model_map: the loss is {float(value)}: the model's forward pass left "
                      "the finite numbers, so every entry of the map is NaN",
                      NonFiniteForwardWarning, stacklevel=2)
    elif not bool(jnp.any(vals != 0)):
        raise InputError("model_map: every entry is exactly 0: the model passed no state "
                         "through gradflow.tap(h, taps[l, t]), or none of them reaches the loss")
    config = checks.with_meta({"model": getattr(model, "__name__", type(model).__name__),
                               "layers": L, "steps": int(T), "batch": int(B),
                               "dtype": str(xs.dtype)}, meta, loss=loss_name, wrt="hidden",
                              readout_seed=readout_seed)
    return make_result("gradient_map", {"values": vals, "loss_value": value}, config,
                       positive=positive, who="model_map")


@functools.partial(jit, static_argnames=("model", "loss_fn", "rest"))
def _model_map(model, loss_fn, rest, arrays, xs, taps):
    model = checks.with_static(model, rest)
    value, norms = jax.value_and_grad(lambda s: loss_fn(model(arrays, xs, s)))(taps)
    return value, safe_mean(norms, axis=2)  # (L, T)


def model_jacobian_map(model: Callable, params, xs, *, layers: int, target: int = -1,
                       method: str = "exact", probes: int = 16, seed: int = 0,
                       chunk: int | None = None, meta: dict | None = None) -> Result:
    r"""The Jacobian map of a model of your own, tapped as for :func:`model_map`:
    :math:`J[l,t] = \mathrm{mean}_b \|\partial y_{T'}[b] / \partial h^l_t[b]\|_F /
    \sqrt{H_l}`, the rms norm of the per-example Jacobian of the model's output at step
    ``T' = target`` (``outputs[:, T']``, ``K`` features: the top layer's state where the model
    returns it, as :func:`jacobian_map`'s default target) w.r.t. every tapped state
    :math:`h^l_t` (``H_l`` units, read from the tap). No loss: 1.0 means magnitude preserved.

    ``model(params, xs, taps)`` is :func:`model_map`'s, with ``taps`` of shape
    ``(layers, T, B, 2)`` here (index them as there: ``gradflow.tap(h, taps[l, t])``; the
    second channel carries each state's width back). The examples must be independent (no
    batch statistics, no attention across examples: a per-example Jacobian is the example's
    own): every example's cotangent is pulled back at once, and a model whose first or last
    example's output reads another example's states is refused. So the examples are split over the
    devices as :func:`jacobian_map`'s are (:func:`gradflow.parallel.should_split`; two per
    device at least, each device checking its first; not where an example's outputs move with
    its place in the batch, :func:`gradflow.checks.depends_on_place`). Exact: ``K`` VJPs, one
    per output unit, ``vmap``-ed ``chunk`` at a time, each reduced to its norms at the taps;
    ``probe``: ``probes`` Gaussian cotangents, :math:`\|J\|_F^2 \approx \mathrm{mean}_k
    \|v_k^\top J\|^2`, with a delta-method standard error (as :func:`jacobian_map`'s; the
    full spectra and the spectral norm need the Jacobians themselves, which the taps do not
    keep). The taps are counted as :func:`model_map`'s are: a row never read or a state tapped
    twice is a ValueError; a ``(layer, step)`` left untapped reads 0.

    >>> def rnn(params, xs, taps):       # 2 tanh layers, the top one's states the outputs
    ...     def step(hs, inp):
    ...         x, tap_t = inp
    ...         h0 = gradflow.tap(jnp.tanh(x @ params["W0"] + hs[0] @ params["U0"]), tap_t[0])
    ...         h1 = gradflow.tap(jnp.tanh(h0 @ params["W1"] + hs[1] @ params["U1"]), tap_t[1])
    ...         return (h0, h1), h1
    ...     h = jnp.zeros((xs.shape[0], 4))
    ...     _, top = jax.lax.scan(step, (h, h), (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(taps, 0, 1)))
    ...     return jnp.swapaxes(top, 0, 1)  # (B, T, 4)
    >>> k = iter(jax.random.split(jax.random.key(0), 5))
    >>> params = {n: jax.random.normal(next(k), (3 if n == "W0" else 4, 4)) / 2
    ...           for n in ("W0", "U0", "W1", "U1")}
    >>> jac = gradflow.model_jacobian_map(rnn, params, jax.random.normal(next(k), (8, 6, 3)),
    ...                                   layers=2)
    >>> jac.values.shape, float(jac.values[1, -1])  # the target itself: the identity
    ((2, 6), 1.0)

    Args:
      model: ``(params, xs, taps) -> (B, T, K)`` outputs, jittable (one function object).
      params: any pytree the model reads, an Equinox or Flax NNX module too (as
        :func:`model_map`).
      xs: ``(B, T, D)`` inputs.
      layers: ``L``, the first axis of ``taps``.
      target: the output step ``T'``, an integer (negative counts from the end).
      method: ``"exact"`` or ``"probe"``.
      probes: Gaussian cotangents of ``method="probe"``, an integer ``>= 2``.
      seed: the probes' seed (``key(seed)``), an integer in ``[0, 2**31 - 1)``.
      chunk: basis cotangents per ``vmap`` batch of ``method="exact"``, a positive integer
        (default: about 256 MiB of norms per batch, at most ``K``).
      meta: extra config recorded in the result.
    Returns:
      Result ``kind="jacobian_map"``: ``values: (L, T)``; ``stderr: (L, T)`` for probes;
      ``target_finite: (B,)``. Positions at or before ``T'`` are expected positive (zeros
      there count as underflow; a bidirectional model's later states may reach ``T'`` too and
      are shown, not counted). Where the target output is not finite in some examples the map
      is the mean over the others (a warning names them); in none, NaN at or before ``T'``.
      Drawn by :func:`gradflow.plot.heatmap`.
    Raises:
      ValueError: as :func:`model_map`'s, and a bad ``target``, ``method``, ``probes``,
        ``chunk``, or a model that mixes the examples of a batch.
    """
    with user_input():
        xs, arrays, rest = checks.model_arguments("model_jacobian_map", model,
                                                  "(params, xs, taps) -> outputs", params, xs)
        L = checks.positive_int("layers", layers)
        B, T, _ = xs.shape
        taps = jax.ShapeDtypeStruct((L, T, B, 2), checks.tap_dtype(xs))
        out = _model_outputs(model, rest, arrays, xs, taps)
        tt = _step(target, T)
        checks.choice("method", method, METHODS)
        seed = checks.seed("seed", seed)
        if method == "probe":
            probes = checks.probe_count(probes)
        chunk = None if chunk is None else checks.positive_int("chunk", chunk)
    from gradflow import parallel
    K, name = int(out.shape[2]), getattr(model, "__name__", type(model).__name__)
    chunk = min(chunk or _basis_chunk(L, T, B, K, "rms"), K)
    args = (xs,) if method == "exact" else (
        xs, normal(jax.random.key(seed), (probes, B, K), out.dtype))  # the same probes split
    static = (("chunk", chunk), ("layers", L), ("target", tt))
    what = (f"model_jacobian_map ({name}, {L} layers x {T} steps, batch {B}, {K} outputs, "
            f"{xs.dtype})")
    smaller = _cost.shrink_hint(B, T, "a smaller chunk, or checkpoint your scan "
                                      "(jax.checkpoint)", checks.nbytes(arrays))
    # its memory checked before anything of the model's size runs (the tap counts below, the
    # checks of the examples' places), as model_map's
    parallel.examples_program(_model_each, (model, rest), arrays, args, static, what, smaller)
    with user_input():
        _tapped("model_jacobian_map", model, rest, arrays, xs, L)
    # Independent examples (checked below) may be split over the devices: each device checks
    # its own, so it gets two at least, and under "auto" on CPU devices examples x outputs x
    # rows >= MODEL_SPLIT_WORK (the state maps' rule, examples x width x rows >=
    # MIN_ROWS_X_WIDTH, with the width scaled)
    rows = chunk if method == "exact" else probes
    width = math.ceil(K * parallel.MIN_ROWS_X_WIDTH / MODEL_SPLIT_WORK)
    devices = parallel.should_split(xs, None, arrays, rows=rows, width=width)
    n = max((k for k in range(1, len(devices) + 1) if B % k == 0 and B // k >= 2), default=1)
    devices = devices[:n] if n > 1 else ()  # fewer devices where each would get one example
    if devices and checks.depends_on_place(model, rest, arrays, xs, B // len(devices),
                                           (((L, T, B), str(taps.dtype)),)):
        devices = ()
    each, se, finite, leak = parallel.example_map(
        _model_each, (model, rest), arrays, args, (0, 1)[:len(args)], static, devices, what,
        smaller)
    leak = jnp.any(leak)
    vals = _mean_over(each, finite, axis=0)
    se = None if se is None else _stderr_over(se, finite, 0)
    if bool(leak):
        raise InputError("model_jacobian_map: an example's output depends on the states of "
                         "other examples: the model mixes the examples of a batch (batch "
                         "statistics, attention across examples), so a per-example Jacobian "
                         "is not defined; measure it with gradflow.model_map, which takes the "
                         "coupling in")
    if not bool(jnp.any(each != 0)):
        raise InputError("model_jacobian_map: every entry is exactly 0: the model passed no "
                         "state through gradflow.tap(h, taps[l, t]), or none of them reaches "
                         f"the output y[:, {tt}]")
    config = checks.with_meta({"model": name, "layers": L, "steps": int(T), "batch": int(B),
                               "outputs": K, "dtype": str(xs.dtype)}, meta, target=tt,
                              jacobian_norm="rms", method=method,
                              probes=probes if method == "probe" else None,
                              probe_seed=seed if method == "probe" else None)
    reach = jnp.broadcast_to(jnp.arange(T)[None, :] <= tt, (L, T))
    arrays = _leave_out_overflow(
        {"values": vals, **({"stderr": se} if method == "probe" else {})},
        np.asarray(finite), reach, "model_jacobian_map", f"the output y[:, {tt}]",
        lambda: "the model's forward pass left the finite numbers")
    return make_result("jacobian_map", arrays, config, positive={"values": reach},
                       who="model_jacobian_map")


#: The work a device needs (its examples x output units x vmapped rows: basis cotangents or
#: probes) before :func:`model_jacobian_map` splits a batch over CPU devices under the
#: ``"auto"`` setting (:func:`gradflow.parallel.devices_for`). Split / one device on the 2-vCPU
#: Xeon (family 6 model 207), 2 devices, :func:`bench.suite.dense_rnn` models, 9 interleaved
#: rounds: at 8192 per device 1.15x, 1.26x and 1.30x slower (probes 16 at B = 16 and 8, probes
#: 4 at B = 64; 21-46 ms maps) and 0.84x (probes 4, L 8 x T 64, B 32); from 32768 up 0.82x,
#: 0.85x (exact), 0.61x, 0.93x (probes 16): the split pays where each device has that much.
MODEL_SPLIT_WORK = 16384


def _model_each(model_rest, arrays, xs, v=None, *, chunk, layers, target):
    """Per example (the examples first, so :func:`gradflow.parallel.example_map` splits them):
    ``(rms: (B, L, T), stderr: (B, L, T) or None, target finite: (B,), leak: (B,))`` of
    :func:`model_jacobian_map`, exact, or from the probes ``v: (k, B, K)``; ``leak`` is True
    at example 0 where the first or the last example's outputs, pulled back alone, reach
    another example's states."""
    model = checks.with_static(*model_rest)
    B, T, _ = xs.shape
    taps = jnp.zeros((layers, T, B, 2), checks.tap_dtype(xs))
    y, vjp = jax.vjp(lambda s: model(arrays, xs, s)[:, target], taps)  # (B, K)
    finite = jnp.all(jnp.isfinite(y), axis=-1)
    K = y.shape[1]

    def pull(cot):  # (B, K) -> norms, widths: each (L, T, B)
        g = vjp(cot)[0]
        return g[..., 0], g[..., 1]

    # the first and the last example's outputs, each pulled back alone (random weights: a
    # centred output cancels equal ones), must reach no other example's states: the later
    # examples read the earlier ones (a running batch statistic) or these read the rest
    w = jax.random.normal(jax.random.key(0), (K,), y.dtype)
    alone, widths = pull(jnp.zeros((B, K), y.dtype).at[0].set(w))
    last, _ = pull(jnp.zeros((B, K), y.dtype).at[B - 1].set(w))
    leak = jnp.zeros(B, bool).at[0].set(jnp.any(alone[..., 1:] > 0)
                                        | jnp.any(last[..., :B - 1] > 0))
    cols = jnp.where(widths > 0, widths, 1)
    norms = lambda cot: pull(cot)[0]  # noqa: E731
    first = lambda a: jnp.moveaxis(a, -1, 0)  # noqa: E731  (L, T, B) -> (B, L, T)
    if v is not None:
        rms, se_rms = _probe_rms(norms, v, cols)
        return first(rms), first(se_rms), finite, leak
    return first(_basis_rms(norms, B, K, y.dtype, chunk, jnp.sqrt(cols))), None, finite, leak


def _model_outputs(model, rest, arrays, xs, taps):
    """The ShapeDtypeStruct of ``model(params, xs, taps)``, ``(B, T, K)`` or a ValueError; an
    error inside the model keeps its type, its message saying where it was raised."""
    B, T, _ = xs.shape
    try:
        out = jax.eval_shape(checks.with_static(model, rest), arrays, xs, taps)
    except Exception as e:  # the user's function failed: say where, with its own message
        raise checks.function_failed(f"model(params, xs {xs.shape}, taps {taps.shape})",
                                     e) from e
    if not hasattr(out, "shape") or len(out.shape) != 3 or tuple(out.shape[:2]) != (B, T):
        raise ValueError(f"model must return outputs of shape (batch, steps, K) = ({B}, {T}, "
                         f"K), got {getattr(out, 'shape', type(out).__name__)}")
    return out


def check_wrt(stack: Stack, wrt: str) -> None:
    """An InputError unless ``wrt`` is one of :data:`WRTS` that ``stack`` has (``"cell"``
    needs a memory state ``c``), naming the cell that lacks it."""
    checks.choice("wrt", wrt, WRTS)
    if wrt == "cell" and "c" not in stack.state_names:
        raise InputError(f"wrt='cell' needs a cell with a memory state c; cell "
                         f"{stack.cells[0].name!r} has only {', '.join(stack.state_names)}")


def map_arrays(stack: Stack, params, xs, loss_fn: Callable, wrt: str = "hidden"):
    """``(loss value, (L, T) map)`` as arrays: the traceable core of :func:`gradient_map`
    (no input checks, no :class:`Result`), for callers that ``vmap`` or shard it over seeds
    and conditions (:mod:`gradflow.sweep`, :mod:`gradflow.atlas`). Where the loss is not
    finite (the forward pass overflowed) every entry is NaN: backpropagating from a NaN or
    infinite loss through NaN states gives numbers, often exact zeros (a ReLU's or a
    comparison's derivative at NaN), that are no gradient and would read as vanishing."""
    if wrt == "params":
        value, vals = _params_map(stack, params, xs, loss_fn)
    else:
        value, vals = _state_map(stack, params, xs, loss_fn, "h" if wrt == "hidden" else "c")
    return value, jnp.where(jnp.isfinite(value), vals, jnp.nan)


def _state_map(stack, params, xs, loss_fn, name):
    # Examples are independent: on several devices the batch is split over them
    # (gradflow.parallel; never inside a trace, e.g. sweep's vmap over seeds, nor for cells
    # whose steps couple the examples, e.g. BN-STAR's batch statistics).
    from gradflow import parallel
    devices = parallel.should_split(xs, stack, params)
    if devices:
        return parallel.state_map(stack, params, xs, loss_fn, name, devices)
    return _state_map_local(stack, params, xs, loss_fn, name)


@functools.partial(jit, static_argnames=("stack", "loss_fn", "name"))
@in_precision
def _state_map_local(stack, params, xs, loss_fn, name):
    return differentiable(functools.partial(_taps_map, stack, loss_fn, name))(params, xs)


def _taps_map(stack, loss_fn, name, params, xs, constant_params=True):
    # Norm taps (Stack.apply(taps=...)): the backward pass reduces each step's (B, H) state
    # cotangent to its (B,) norms as it goes, so no (L, B, T, H) gradient is ever held. With
    # constant_params the runs of layers go through stack.lean_layers (Stack.apply).
    B, T, _ = xs.shape
    zeros = {name: jnp.zeros((stack.layers, B, T), xs.dtype)}
    value, norms = jax.value_and_grad(lambda taps: loss_fn(stack.apply(
        params, xs, taps=taps, constant_params=constant_params).top))(zeros)
    return value, safe_mean(norms[name], axis=1)  # (L, T)


def differentiable(fast: Callable) -> Callable:
    """``fast(params, xs)``, a map computed with the cell parameters held constant
    (``Stack.apply(constant_params=True)``: the lean backward, which gives the parameters zero
    cotangents), made exact to differentiate: its value is ``fast``'s, and its derivatives
    w.r.t. ``params`` and ``xs`` (``jax.grad``/``jax.jvp`` of a map, e.g. to tune an
    initialisation that flattens it) are those of the same map by plain autodiff
    (``fast(..., constant_params=False)``), which costs only when something differentiates."""
    f = jax.custom_jvp(fast)
    f.defjvp(lambda primals, tangents: jax.jvp(
        functools.partial(fast, constant_params=False), primals, tangents))
    return f


def per_step_param_grads(stack: Stack, params, xs, loss_fn: Callable, reduce=None,
                         chunk: int | None = None):
    r"""Per-step parameter gradients :math:`\partial\mathcal L/\partial\theta^l_{(t)}` of every layer.

    ``reduce(grad_tree) -> array`` is applied to each ``(l, t)`` gradient as soon as it is made
    (so the ``L x T`` copies are never held at once); with ``reduce=None`` the full trees are
    returned, with leading axes ``(L, T)`` (needs all layers of one shape; for tests and small
    problems).

    Returns: ``(loss value, per-(l, t) results with leading axes (L, T))``.
    """
    T = xs.shape[1]
    chunk = chunk or T
    names = stack.state_names
    value, grads, out = state_gradients(stack, params, xs, loss_fn, names)
    prev = stack.previous_states(out)
    inputs = stack.layer_inputs(params, xs, out)

    def layer(cell, p, prev_l, x_l, cot_l):
        def one(args):
            s, x, cot, t = args
            _, vjp = jax.vjp(lambda th: cell.step(th, s, x, t)[0], p)
            (g,) = vjp(cot)
            return g if reduce is None else reduce(g)

        tm = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731  (B, T, ...) -> (T, B, ...)
        args = (jax.tree_util.tree_map(tm, prev_l), tm(x_l), jax.tree_util.tree_map(tm, cot_l),
                jnp.arange(T))
        return lax.map(one, args, batch_size=min(chunk, T))

    return value, map_layers(stack, layer, params, prev, inputs, grads)


@functools.partial(jit, static_argnames=("stack", "loss_fn"))
@in_precision
def _params_map(stack, params, xs, loss_fn):
    # Parameter taps (Stack.apply(param_taps=...)): one forward and one backward pass, each
    # step's parameter gradient reduced to its mean |.| where the backward pass forms it.
    zeros = jnp.zeros((stack.layers, xs.shape[1]), xs.dtype)
    return jax.value_and_grad(
        lambda taps: loss_fn(stack.apply(params, xs, param_taps=taps).top))(zeros)


# ---------------------------------------------------------------------------------------------
# Jacobian maps


def jacobian_map(stack: Stack, params, xs, *, target=(-1, -1), norm: str = "rms",
                 method: str = "exact", probes: int = 16, seed: int = 0, chunk: int | None = None,
                 spectra_at=(), meta: dict | None = None) -> Result:
    r"""Per-example Jacobians of a target hidden state w.r.t. every hidden state.

    :math:`J[l,t] = \mathrm{mean}_b \|\partial h^{L'}_{T'}[b] / \partial h^l_t[b]\|` with
    ``(L', T') = target`` (negative indices count from the end; default top layer, last step).
    Positions that cannot reach the target (``t > T'`` or ``l > L'``: layers feed only upward)
    are 0 (not counted as underflow, nor set to NaN where the target is not finite); the
    target itself is the identity. Each Jacobian is ``(H_{L'}, H_l)`` for layers of different
    widths (:attr:`gradflow.Stack.widths`), its rms norm :math:`\|J\|_F/\sqrt{H_l}`.

    Args:
      stack, params: a :class:`gradflow.Stack` and its parameters.
      xs: ``(B, T, D)`` inputs.
      target: ``(layer, step)`` integers, negative ones counting from the end; a position
        outside the stack is a ValueError.
      norm: the matrix norm of each Jacobian (not the Stack's ``norm``, its layers'
        normalisation; recorded as ``config["jacobian_norm"]``): ``"rms"``
        (:math:`\|J\|_F/\sqrt H`) or ``"spectral"`` (largest singular value;
        ``method="exact"`` only; holds all ``(L, T, B, H, H)`` Jacobians, refused beyond 4 GiB).
      method: ``"exact"``: ``H`` VJPs, one per basis cotangent of the target, ``vmap``-ed
        ``chunk`` at a time; ``"probe"``: ``probes`` Gaussian cotangents ``v``,
        :math:`\|J\|_F^2 \approx \mathrm{mean}_k \|v_k^\top J\|^2`, with a delta-method standard
        error (rms only).
      probes: the number of Gaussian cotangents of ``method="probe"``, an integer ``>= 2``
        (ignored by ``"exact"``, recorded as None).
      seed: the probes' seed (``key(seed)``), an integer in ``[0, 2**31 - 1)``; recorded as
        ``config["probe_seed"]`` (None for ``"exact"``, which draws nothing), apart from the
        problem's ``seed`` that ``meta`` may carry.
      chunk: basis cotangents per ``vmap`` batch of ``method="exact"``, a positive integer
        (default: about 256 MiB of Jacobians per batch, at most ``H``; unused by ``"probe"``).
      spectra_at: ``[(l, t), ...]`` positions whose full singular spectra are returned
        (exact method).
      meta: extra config recorded in the result (e.g. ``problem(...).config``); where it
        repeats a key of the stack's config or sizes it must agree
        (:func:`gradflow.checks.with_meta`).
    Returns:
      Result ``kind="jacobian_map"``: ``values: (L, T)``; ``stderr: (L, T)`` for probes;
      ``spectra: (n, B, H)`` singular values (descending) at ``spectra_at`` (for layers of
      different widths ``H = min(H_{L'}, max_l H_l)``, zeros beyond ``min(H_{L'}, H_l)``). Positions that
      reach the target are expected positive (``result.underflow`` counts zeros among them).
      Norms and singular values are formed scaled by the largest entry
      (:func:`gradflow.stack.scaled_reduction`), so tiny Jacobians do not underflow. Where the
      target state is not finite in every example, every Jacobian that reaches it is NaN
      (with a :class:`~gradflow.results.NonFiniteForwardWarning`); where it is not finite in
      some examples, ``values`` (and ``stderr``) are the mean over the others (the examples
      are independent), those examples' spectra are NaN, and the warning names them;
      ``target_finite: (B,)`` says which examples were measured. The config records ``target``,
      ``method``, ``jacobian_norm``, ``probes`` and ``probe_seed`` (None for ``"exact"``)
      beside the stack's own (its ``norm`` is the layers' normalisation).
    """
    xs = _prepare(stack, params, xs)
    _per_example(stack, "jacobian_map")
    seed = checks.seed("seed", seed)
    chunk = None if chunk is None else checks.positive_int("chunk", chunk)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    T, L = xs.shape[1], stack.layers
    tl, tt = _position(target, L, T, "target")
    positions = tuple(_position(p, L, T, "spectra_at") for p in spectra_at)
    twice = sorted({p for p in positions if positions.count(p) > 1})
    if twice:  # (negative indices resolved: (-1, -1) and (L-1, T-1) are one position)
        raise ValueError(f"spectra_at names (layer, step) {twice[0]} twice; name each "
                         "position once")
    if method == "probe":
        arrays, target_ok = _probe_arrays(stack, params, xs, (tl, tt), norm, positions, probes,
                                          seed)
    else:
        arrays, target_ok = _exact_arrays(stack, params, xs, (tl, tt), norm, positions, chunk)
    # (jacobian_norm, probe_seed: the stack's own "norm" and the problem's "seed" differ)
    config = _config(stack, xs, meta, target=[tl, tt], jacobian_norm=norm, method=method,
                     probes=probes if method == "probe" else None,
                     probe_seed=seed if method == "probe" else None,
                     spectra_at=[list(p) for p in positions])
    # h^l_t reaches h^{L'}_{T'} only from below and before: layers feed upward, steps forward
    reach = (jnp.arange(T)[None, :] <= tt) & (jnp.arange(L)[:, None] <= tl)
    arrays = _leave_out_overflow(arrays, np.asarray(target_ok), reach, "jacobian_map",
                                 f"the target state h[{tl}, {tt}]",
                                 lambda: where_nonfinite(stack, params, xs))
    return make_result("jacobian_map", arrays, config, positive={"values": reach})


def _probe_arrays(stack, params, xs, target, norm, positions, probes, seed):
    """``({"values", "stderr"}, target_finite)`` of ``method="probe"``, its options checked."""
    if norm != "rms":
        raise ValueError("method='probe' estimates the rms (Frobenius) norm only; use "
                         "method='exact' for norm='spectral'")
    if positions:
        raise ValueError("spectra_at needs method='exact'")
    probes = checks.probe_count(probes)
    B, T, _ = xs.shape
    with user_input():  # too big for this machine: the user's sizes to change
        _cost.check_fits(_cost.estimate(stack, B, T, xs.dtype, method="probe", probes=probes,
                                        calibrate=False))
    v = _probes(stack, xs, target, probes, jax.random.key(seed))
    rms, se_rms, finite = _over_examples(_probe_each, stack, params, (xs, v), (0, 1),
                                         rows=probes, target=target)
    vals = _mean_over(rms, finite, axis=0)
    return {"values": vals, "stderr": _stderr_over(se_rms, finite, 0)}, finite


def _exact_arrays(stack, params, xs, target, norm, positions, chunk):
    """``({"values", "spectra"?}, target_finite)`` of ``method="exact"``, its size checked."""
    B, T, _ = xs.shape
    L, H = stack.layers, stack.widths[target[0]]  # the target's width: one VJP per unit
    with user_input():
        _cost.check_fits(_cost.estimate(stack, B, T, xs.dtype, method="exact", calibrate=False))
    chunk = chunk or _basis_chunk(L, T, B, H, norm)
    if norm == "spectral":
        need = L * T * B * H * stack.max_width * jnp.dtype(xs.dtype).itemsize
        if need > 4 << 30:
            raise ValueError(f"norm='spectral' would hold {need / 2**30:.1f} GiB of Jacobians;"
                             " use norm='rms', fewer examples, or spectra_at=[...]")
    chunk = min(chunk, H)
    each, spectra, finite = _over_examples(_exact_each, stack, params, (xs,), (0,), rows=chunk,
                                           target=target, norm=norm, positions=positions,
                                           chunk=chunk)
    vals = _mean_over(each, finite, axis=0)  # a non-finite example is left out
    if positions:  # (n, B, H)
        spectra = jnp.where(finite[None, :, None], jnp.swapaxes(spectra, 0, 1), jnp.nan)
    return {"values": vals, **({"spectra": spectra} if positions else {})}, finite


def _leave_out_overflow(arrays, target_ok, reach, who, target, where):
    """``arrays`` with ``target_finite``: as measured where the ``target`` (its name, e.g.
    ``"the target state h[2, 5]"``) is finite in every example; the mean over the finite ones
    where it is in some (the map's functions average finite examples only; a warning from
    ``who`` names the others and ``where()`` the first non-finite state); NaN where it reaches
    and is finite in none (NaN states pass back numbers that are no derivatives)."""
    B = target_ok.shape[0]
    bad = np.flatnonzero(~target_ok)
    if bad.size == B:
        warnings.warn(f"{who}: {target} is not finite ({where()}): every Jacobian that "
                      "reaches it is NaN", NonFiniteForwardWarning, stacklevel=3)
        arrays = {k: jnp.full_like(v, jnp.nan) if k == "spectra"
                  else jnp.where(reach, jnp.nan, 0.0).astype(v.dtype) for k, v in arrays.items()}
    elif bad.size:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if bad.size > 10 else "")
        warnings.warn(f"{who}: {target} is not finite in {bad.size} of {B} examples ({shown}; "
                      f"{where()}): the map is the mean over the other {B - bad.size} "
                      "(result.target_finite)" + ("; those examples' spectra are NaN"
                                                  if "spectra" in arrays else ""),
                      NonFiniteForwardWarning, stacklevel=3)
    return {**arrays, "target_finite": target_ok}


def _step(target, T):
    """The output step ``target`` of :func:`model_jacobian_map` in ``[0, T)``, or a
    ValueError."""
    try:
        t = operator.index(target)  # an integer: 1.0 is no step
    except TypeError:
        raise ValueError(f"target must be an integer output step, got {target!r}") from None
    if not -T <= t < T:
        raise ValueError(f"target {t} is outside the {T} steps")
    return t % T


def _position(p, L, T, what):
    try:
        if any(isinstance(v, (bool, np.bool_)) for v in p):  # True is no layer
            raise TypeError
        l, t = (operator.index(v) for v in p)  # integers only: 1.0 or 1.5 is no position
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a (layer, step) pair of integers, got {p!r}") from None
    if not (-L <= l < L and -T <= t < T):
        raise ValueError(f"{what} {p!r} is outside the stack ({L} layers x {T} steps)")
    return l % L, t % T


def _basis_chunk(L, T, B, H, norm):
    per = L * T * B * H * (H if norm == "spectral" else 1) * 4
    return int(max(1, min(H, (256 << 20) // max(per, 1))))


def _target_vjp(stack: Stack, params, xs, target, with_finite=False, norms=False):
    """``vjp(cot: (B, H_{L'})) -> {"h": (L, B, T, H)}``: cotangent on ``h^{L'}_{T'}`` pulled back
    to every ``h^l_t`` (total derivatives, through zero perturbations; ``H = max_width``, zeros
    beyond each layer's width); ``norms``: their per-example norms ``(L, B, T)`` instead, each
    reduced where it is formed inside the backward pass (the stack's norm taps, as
    :func:`gradient_map`'s), never materialising the gradients; ``with_finite``: also whether
    the target is finite, per example (``(B,)``)."""
    tl, tt = target
    zeros = (jnp.zeros((stack.layers, xs.shape[0], xs.shape[1]), xs.dtype) if norms
             else _zeros_perturb(stack, xs, ("h",))["h"])
    inst = "taps" if norms else "perturb"

    def f(s):
        return stack.unpad(stack.apply(params, xs, **{inst: {"h": s}}).states["h"][tl, :, tt], tl)

    h, vjp = jax.vjp(f, zeros)
    fn = lambda cot: vjp(cot)[0]  # noqa: E731
    return (fn, jnp.all(jnp.isfinite(h), axis=-1)) if with_finite else fn


def _mean_over(v, ok, axis=1):
    """The mean of ``v`` over ``axis`` (the examples) where ``ok: (B,)``; NaN where none is."""
    keep = jnp.expand_dims(ok, tuple(a for a in range(v.ndim) if a != axis % v.ndim))
    return safe_mean(jnp.where(keep, v, 0), axis=axis, count=jnp.sum(ok))


def _basis_rms(pull, B, K, dtype, chunk, cols):
    r"""Per example, the rms norm :math:`\|J\|_F/\sqrt{H}` of Jacobians whose rows'
    norms ``pull(cot: (B, K))`` gives (any layout of the examples), one basis cotangent per
    output unit, ``vmap``-ed ``chunk`` at a time; ``cols``: :math:`\sqrt H`, broadcasting."""
    rows = lax.map(lambda i: pull(jnp.broadcast_to(jax.nn.one_hot(i, K, dtype=dtype), (B, K))),
                   jnp.arange(K), batch_size=chunk)  # (K, ...): the norm of row i of each
    return safe_norm(rows, axis=0) / cols  # ||J||_F = the 2-norm of the rows' norms


def _probe_rms(pull, v, cols):
    """Per example, the probe estimate of the rms norm and its standard error (each in
    ``pull``'s layout) from the probes ``v: (k, B, K)`` (:func:`_probe_stats`; ``cols``: the
    Jacobians' columns, broadcasting)."""
    n = jax.vmap(pull)(v)  # (k, ...): ||v^T J||
    return scaled_reduction(lambda u: _probe_stats(u, cols), n, 0)


def _stderr_over(se, ok, axis):
    """The standard error of the mean over the examples (``axis``) where ``ok: (B,)`` of
    per-example standard errors ``se``."""
    keep = jnp.expand_dims(ok, tuple(a for a in range(se.ndim) if a != axis % se.ndim))
    return safe_norm(jnp.where(keep, se, 0), axis=axis) / jnp.sum(ok)


@in_precision
def _exact_each(stack, params, xs, *, target, norm, positions, chunk):
    """Per example: ``(norms: (B, L, T), spectra: (B, n, H) or None, target finite: (B,))``
    of ``method="exact"`` (the examples first: split over devices by
    :func:`_over_examples`)."""
    B, T, _ = xs.shape
    H = stack.widths[target[0]]
    cols = _sqrt(_columns(stack, xs.dtype))
    if norm == "rms" and not positions:  # norms suffice: the taps reduce each row
        vjp, finite = _target_vjp(stack, params, xs, target, with_finite=True, norms=True)
        return jnp.swapaxes(_basis_rms(vjp, B, H, xs.dtype, chunk, cols), 0, 1), None, finite
    vjp, finite = _target_vjp(stack, params, xs, target, with_finite=True)
    pos_l = jnp.array([p[0] for p in positions], int)
    pos_t = jnp.array([p[1] for p in positions], int)

    def row(i):
        cot = jnp.broadcast_to(jax.nn.one_hot(i, H, dtype=xs.dtype), (B, H))
        g = vjp(cot)  # (L, B, T, H): row i of every per-example Jacobian
        at = g[pos_l, :, pos_t] if positions else None
        if norm == "spectral":
            return g, at
        return safe_norm(g), at  # (L, B, T): the norm of row i

    rows, at = lax.map(row, jnp.arange(H), batch_size=chunk)
    if norm == "spectral":
        jac = jnp.moveaxis(rows, 0, -2)  # (L, B, T, H_out, H_in)
        each = scaled_reduction(_spectral, jac, (-2, -1))
    else:  # ||J||_F = the 2-norm of the rows' norms; / sqrt(columns = H_l)
        each = safe_norm(rows, axis=0) / cols
    spectra = None
    if positions:
        jac_at = jnp.moveaxis(at, 0, -2)  # (n, B, H_out, H_in)
        spectra = jnp.swapaxes(scaled_reduction(
            singular_values, jac_at, (-2, -1)), 0, 1)
    return jnp.swapaxes(each, 0, 1), spectra, finite


@functools.partial(jit, static_argnames=("stack", "target", "norm", "positions", "chunk"))
def _exact_map(stack, params, xs, target, norm, positions, chunk):
    """:func:`_exact_each` as one program (the unsplit map; its memory is what
    :func:`gradflow.cost.estimate` models)."""
    return _exact_each(stack, params, xs, target=target, norm=norm, positions=positions,
                       chunk=chunk)


def _over_examples(fn, stack, params, args, axes, rows: int = 1, **static):
    """``fn(stack, params, *args, **static)``, whose outputs have the examples on their first
    axis and ``args`` theirs on ``axes``: split over the devices of
    :func:`gradflow.parallel.should_split` (each example's work ``rows`` times a state map's:
    the vmapped rows of a Jacobian; a program taking SVDs runs on one CPU device,
    :func:`gradflow.parallel.lapack_stalls`), else one jitted call. The examples of a Jacobian
    map are independent (a stack that couples them is refused first), so the split is exact."""
    from gradflow import parallel
    return parallel.example_map(fn, stack, params, args, axes, tuple(sorted(static.items())),
                                parallel.should_split(args[0], stack, params, rows=rows))


def _columns(stack: Stack, dtype):
    """``H_l``, the columns of every Jacobian w.r.t. ``h^l_t``, to divide ``(L, B, T)`` arrays by:
    the int ``H`` for layers of one width, else an ``(L, 1, 1)`` array."""
    if isinstance(stack.hidden_size, int):
        return stack.hidden_size
    return jnp.asarray(stack.widths, dtype)[:, None, None]


def _sqrt(n):
    return math.sqrt(n) if isinstance(n, int) else jnp.sqrt(n)


def _spectral(j):
    """Largest singular value of ``j: (..., m, n)`` -> ``(...)``."""
    return singular_values(j)[..., 0]


def _probe_stats(n, H):
    r"""From probe norms ``n: (k, ...)``, :math:`n_k = \|v_k^\top J\|`: the estimate
    :math:`\mathrm{rms} = \sqrt{\mathrm{mean}_k n_k^2 / H}` and its delta-method standard
    error, each ``(...)``; ``H`` (the Jacobian's columns) an int or an array broadcasting
    against ``(...)``. Both are homogeneous of degree 1 in ``n`` (see
    :func:`gradflow.stack.scaled_reduction`)."""
    q = n * n  # unbiased estimates of ||J||_F^2
    f2 = jnp.mean(q, axis=0)
    se_f2 = jnp.std(q, axis=0, ddof=1) / math.sqrt(n.shape[0])
    rms = jnp.sqrt(f2 / H)
    # delta method: d sqrt(F2/H) / dF2 = 1 / (2 H rms)
    se_rms = jnp.where(rms > 0, se_f2 / (2.0 * H * jnp.where(rms > 0, rms, 1.0)), 0.0)
    return rms, se_rms


@in_precision
def _probe_each(stack, params, xs, v, *, target):
    """Per example: ``(rms: (B, L, T), its standard error: (B, L, T), target finite: (B,))``
    of the probes ``v: (k, B, H)``."""
    vjp, finite = _target_vjp(stack, params, xs, target, with_finite=True, norms=True)
    rms, se_rms = _probe_rms(vjp, v, _columns(stack, xs.dtype))  # each (L, B, T)
    return jnp.swapaxes(rms, 0, 1), jnp.swapaxes(se_rms, 0, 1), finite


def _probes(stack, xs, target, probes, key):
    """``(k, B, H)`` Gaussian probes: the same at every precision and every split."""
    return normal(key, (probes, xs.shape[0], stack.widths[target[0]]), xs.dtype)


@functools.partial(jit, static_argnames=("stack", "target", "probes"))
def _probe_map(stack, params, xs, target, probes, key):
    """:func:`_probe_each` as one program (the unsplit map; its memory is what
    :func:`gradflow.cost.estimate` models)."""
    return _probe_each(stack, params, xs, _probes(stack, xs, target, probes, key),
                       target=target)


# ---------------------------------------------------------------------------------------------
# Local gains


def local_gains(stack: Stack, params, xs, *, chunk: int | None = None, spectral: bool = True,
                meta: dict | None = None) -> Result:
    r"""One-step Jacobians at every ``(l, t)``, averaged over the batch.

    vertical :math:`\partial y^l_t / \partial x^l_t`, from a layer's input to what it emits
    upward, :math:`y^l_t = h^l_t` in a plain stack (``x^l_t = y^{l-1}_t``; for ``l = 0`` the
    data or its projection), :math:`\mathrm{norm}(h^l_t + x^l_t)` with ``residual`` and
    ``norm`` (the skip path and the norm are part of the step a gradient takes between layers,
    so a residual stack's vertical gain is near 1, not the cell's own
    :math:`\partial h/\partial x`), and temporal :math:`\partial h^l_t / \partial h^l_{t-1}`
    (other state components, e.g. ``c_{t-1}``, held fixed), and the whole state's
    :math:`\partial s^l_t / \partial s^l_{t-1}` (every component, e.g. ``(c, h)``, concatenated;
    the temporal gain again for a cell whose state is ``h`` alone), each as RMS gain
    :math:`\|J\|_F/\sqrt{n_{in}}` and spectral norm, along the trajectory of ``xs``. The
    temporal gain of an LSTM leaves out its memory path (:math:`\partial c_t/\partial c_{t-1}
    = f`, 0.5 at init, against 0.25 for ``h``): the state gain has it, so ask it how fast a
    gradient fades in time.

    Closed forms: an LSTM at orthogonal init, zero biases and small inputs has vertical gain
    :math:`\sigma(0)\sigma(0) = 0.25`; STAR with ``k ≈ 0.5`` has 0.5; a tanh RNN with orthogonal
    ``U`` has temporal gain 1.

    Args:
      stack, params: a :class:`gradflow.Stack` and its parameters (no cell that couples the
        examples of a batch: per-example Jacobians).
      xs: ``(B, T, D)`` inputs.
      chunk: steps per ``lax.map`` batch, a positive integer (default: about 64 MiB of
        Jacobians per batch, :func:`gain_arrays`).
      spectral: also the spectral norms (each Jacobian's singular values, on a CPU nearly all
        of the time: LSTM 16 layers x 32 steps, H 64, batch 8, on a 2-core Xeon: 9.7 s with
        them, 0.54 s without); False: the ``*_rms`` arrays alone, equal to those with them.
      meta: extra config recorded in the result (e.g. ``problem(...).config``); where it
        repeats a key of the stack's config or sizes it must agree
        (:func:`gradflow.checks.with_meta`).
    Returns:
      Result ``kind="local_gains"`` with ``vertical_rms, vertical_spectral, temporal_rms,
      temporal_spectral, state_rms, state_spectral`` (without ``spectral``: the ``*_rms``
      ones), each ``(L, T)``, its config saying ``spectral``; NaN where a step's
      states, its previous states or its input are not finite (a
      :class:`~gradflow.results.NonFiniteForwardWarning` says where the states are not
      finite).
    """
    xs = _prepare(stack, params, xs)
    _per_example(stack, "local_gains")
    chunk = None if chunk is None else checks.positive_int("chunk", chunk)
    spectral = checks.boolean("spectral", spectral)
    _check_gains_fit(stack, xs, chunk, spectral)
    arrays = gain_arrays(stack, params, xs, chunk, spectral)
    # NaN gains: say where the forward pass is not finite, if that is why
    if any(bool(jnp.isnan(v).any()) for v in arrays.values()):
        masks = finite_states(stack, params, xs)
        if not all(bool(m.all()) for m in masks.values()):
            warnings.warn(f"local_gains: {where_nonfinite(stack, params, xs, masks)}: the gains "
                          "where a step's states or inputs are not finite are NaN",
                          NonFiniteForwardWarning, stacklevel=2)
    return make_result("local_gains", arrays, _config(stack, xs, meta, spectral=spectral))


def _check_gains_fit(stack: Stack, xs, chunk: int | None, spectral: bool = True) -> None:
    """An InputError, before anything is compiled, when the forward pass and one ``lax.map``
    batch of :func:`local_gains`' Jacobians (:func:`gradflow.cost.estimate`, ``method=
    "gains"``) exceed the memory available, naming the batch that would fit."""
    with user_input():
        _cost.check_fits(_cost.estimate(stack, xs.shape[0], xs.shape[1], xs.dtype,
                                        method="gains", calibrate=False, chunk=chunk,
                                        spectral=spectral))


def gain_arrays(stack: Stack, params, xs, chunk: int | None = None,
                spectral: bool = True) -> dict:
    """The arrays of :func:`local_gains` (``vertical_rms, vertical_spectral, temporal_rms,
    temporal_spectral, state_rms, state_spectral``, each ``(L, T)``; without ``spectral`` the
    ``*_rms`` ones) without its checks: traceable, so a caller can ``vmap``/``shard_map`` it
    over problems (:mod:`gradflow.atlas` does). ``xs: (B, T, D)`` in the params' dtype;
    ``chunk`` steps per ``lax.map`` batch (default: about 64 MiB of Jacobians)."""
    return _gains(stack, params, xs, int(chunk or _cost.gains_chunk(*xs.shape[:2],
                                                                      stack.max_width)),
                  bool(spectral))


def _frobenius_rms(u):
    r""":math:`\|u\|_F / \sqrt{n}` of ``u: (..., m, n)``."""
    return jnp.sqrt(jnp.sum(u * u, axis=(-2, -1)) / u.shape[-1])


def _rms_spectral(j):
    r"""``(\|j\|_F / \sqrt{n}, \|j\|_2)`` of ``j: (..., m, n)``, each ``(...)``, without
    squaring tiny entries (:func:`gradflow.stack.scaled_reduction`)."""
    return scaled_reduction(lambda u: (_frobenius_rms(u), _spectral(u)), j, (-2, -1))


def _rms(j):
    r"""``(\|j\|_F / \sqrt{n},)`` of ``j: (..., m, n)``, as :func:`_rms_spectral`'s first."""
    return (scaled_reduction(_frobenius_rms, j, (-2, -1)),)


@functools.partial(jit, static_argnames=("stack", "chunk", "spectral"))
@in_precision
def _gains(stack, params, xs, chunk, spectral=True):
    B, T, _ = xs.shape
    out = stack.apply(params, xs)
    prev = stack.previous_states(out)
    inputs = stack.layer_inputs(params, xs, out)

    # What each layer emits upward, norm(h + x) (residual where its input is as wide as it,
    # norm): the vertical gain is the emission's, the path a gradient takes between layers.
    emits = stack.residual or stack.norm is not None
    residual = jnp.asarray([stack.residual_at(l) for l in range(stack.layers)], xs.dtype)
    Hmax = stack.max_width
    pn = {k: jnp.stack([jnp.pad(d[k], (0, Hmax - d[k].shape[-1])) for d in params["norm"]])
          for k in params["norm"][0]} if stack.norm is not None else {}

    norms = _rms_spectral if spectral else _rms

    def layer(cell, p, prev_l, x_l, r_l, pn_l):
        def one(args):  # one example at one step
            s, x, t = args

            def y_of_x(xx):
                h = cell.step(p, s, xx, t)[1]
                if not emits:
                    return h
                skip = r_l * xx if xx.shape == h.shape else jnp.zeros_like(h)
                return emit(h, skip, pn_l, True, stack.norm)

            h_of_h = lambda hh: cell.step(p, {**s, "h": hh}, x, t)[1]  # noqa: E731
            # reverse mode: the Jacobians backpropagation uses (a cell's custom_vjp, e.g.
            # gradient clipping or a straight-through estimator, has no forward mode)
            vertical = norms(jax.jacrev(y_of_x)(x))
            temporal = norms(jax.jacrev(h_of_h)(s["h"]))
            names = tuple(s)
            if len(names) == 1:  # the state is h: its gain is the temporal one
                return (*vertical, *temporal, *temporal)
            cuts = list(itertools.accumulate(s[k].shape[-1] for k in names[:-1]))

            def state_of_state(flat):  # every state component, concatenated, one step on
                new = cell.step(p, dict(zip(names, jnp.split(flat, cuts))), x, t)[0]
                return jnp.concatenate([new[k] for k in names])
            return (*vertical, *temporal, *norms(
                jax.jacrev(state_of_state)(jnp.concatenate([s[k] for k in names]))))

        def at_t(args):
            s, x, t = args
            return jax.vmap(lambda ss, xx: one((ss, xx, t)))(s, x)

        tm = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731
        res = lax.map(at_t, (jax.tree_util.tree_map(tm, prev_l), tm(x_l), jnp.arange(T)),
                      batch_size=min(chunk, T))
        return tuple(safe_mean(r, axis=1) for r in res)  # each (T,)

    names = [f"{kind}_{stat}" for kind in ("vertical", "temporal", "state")
             for stat in (("rms", "spectral") if spectral else ("rms",))]
    arrays = map_layers(stack, layer, params, prev, inputs, residual, pn)
    # A one-step Jacobian taken at non-finite states or inputs is no derivative (a ReLU's at
    # NaN is an exact 0): NaN where the step's states, its previous states or its input are.
    fin = finite_positions(out.states)  # (L, T)
    ok = fin & jnp.pad(fin, ((0, 0), (1, 0)), constant_values=True)[:, :-1] \
        & jnp.pad(fin, ((1, 0), (0, 0)), constant_values=True)[:-1]
    return {k: jnp.where(ok, v, jnp.nan) for k, v in zip(names, arrays)}


__all__ = ["gradient_map", "model_map", "model_jacobian_map", "tap", "check_wrt", "map_arrays",
           "jacobian_map", "local_gains", "gain_arrays",
           "readout_loss", "ReadoutLoss", "state_gradients",
           "per_step_param_grads", "LOSSES", "WRTS", "NORMS", "METHODS"]
