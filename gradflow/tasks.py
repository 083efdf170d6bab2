"""Synthetic sequence tasks (SPEC section 5): deterministic batch generators from a key.

Every task samples a batch as three arrays, all batch-major and aligned step by step with the
stack's outputs, so one masked loss serves every task:

* ``xs: (B, T, D)`` inputs;
* ``ys``: targets at every step, ``(B, T)`` int class labels for ``kind="classification"``,
  ``(B, T, K)`` values for ``kind="regression"`` (zeros where the loss does not look);
* ``mask: (B, T)``: 1 where the loss applies (the last step, or the recall steps of ``copy``).

The loss is the masked mean ``sum_{b,t} mask[b,t] l(out[b,t], ys[b,t]) / sum mask`` of the
squared error (regression, mean over the ``K`` outputs) or the cross-entropy (classification).

>>> task = make("adding", steps=20)
>>> xs, ys, mask = sample(task, jax.random.key(0), 4)
>>> xs.shape, ys.shape, mask.shape
((4, 20, 2), (4, 20, 1), (4, 20))

Tasks:

* ``adding`` (the STAR authors' generator): channel 0 holds values ``U(0, 1)``, channel 1 a
  marker, 1 at one step ``p1 ~ U{0..T//2-1}`` of the first half and one step
  ``p2 = T//2 + U{0..T//2-1}`` of the second; target ``x[p1] + x[p2]`` at the last step; MSE.
* ``copy``: ``n`` symbols from ``{1..A}``, ``lag`` blanks (0), the delimiter ``A+1``, then ``n``
  recall steps (blank inputs) whose targets are the ``n`` symbols; ``T = 2n + lag + 1``; inputs
  one-hot over ``A+2`` symbols, ``A+1`` output classes; cross-entropy on the recall steps only.
* ``counting``: step 0 shows the marked query symbol ``q`` (one-hot over ``A`` symbols plus a
  marker channel set to 1); steps ``1..T-1`` show symbols ``s_t ~ U{0..A-1}`` (marker 0); the
  count ``n = #{t >= 1: s_t = q}`` is the target at the last step, as the fraction
  ``n / (T - 1)`` (``target="regression"``, MSE) or one of the ``T`` classes ``0..T-1``
  (``target="classification"``, cross-entropy).
* ``digits``: scikit-learn's 8x8 digits read pixel by pixel, row by row (``T = 64``, ``D = 1``,
  pixels divided by ``scale``); the label (10 classes) at the last step. Needs the ``digits``
  extra (scikit-learn) unless ``images``/``labels`` arrays are given.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import checks

KINDS = ("regression", "classification")


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: static sizes and options, and its jitted batch generator.

    Equality and hashing use everything but ``sample_fn`` (``digits`` adds a fingerprint of
    its data to ``options``), so a ``Task`` is a valid static argument of ``jax.jit``.

    Attributes:
      name: registry name (``names()``).
      input_size: ``D``, features per step.
      output_size: ``K``, readout outputs per step (classes, or regression targets).
      kind: ``"regression"`` (MSE) or ``"classification"`` (cross-entropy).
      loss_on: ``"last"`` (only the last step is scored) or ``"steps"`` (the steps in ``mask``).
      steps: ``T``, the sequence length.
      metric: name of :func:`metric_fn`'s value, ``"mse"`` or ``"accuracy"``.
      options: the options it was built with, as sorted ``(key, value)`` pairs.
      sample_fn: ``(key, batch, dtype) -> (xs, ys, mask)``, jitted (batch and dtype static).
      classes: for classification, how many classes the scored targets can take (copy's
        recall steps never hold the blank, so ``A`` of its ``A + 1`` outputs); None for
        regression. :func:`chance` reads it.
    """

    name: str
    input_size: int
    output_size: int
    kind: str
    loss_on: str
    steps: int
    metric: str
    options: tuple
    sample_fn: Callable = dataclasses.field(compare=False, repr=False)
    classes: int | None = None

    @property
    def config(self) -> dict:
        """``{"task": name, "steps": T, **options}``: JSON-able (arrays are not included)."""
        return {"task": self.name, "steps": self.steps, **dict(self.options)}


def _int(task, name, value, low=1) -> int:
    return checks.int_at_least(f"task {task!r}: option {name}", value, low)


def _alphabet(task, value) -> int:
    """At least two symbols: with one, every target is known before the first input."""
    A = _int(task, "alphabet", value)
    if A < 2:
        raise ValueError(f"task {task!r}: option alphabet must be at least 2, got {A} (with one "
                         "symbol every target is known in advance: nothing to learn)")
    return A


def _options(task, given, defaults) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for task {task!r}; "
                         f"valid options: {', '.join(sorted(defaults))}")
    return {**defaults, **given}


def _last(batch, steps, dtype):
    """``(B, T)`` mask with a 1 at the last step."""
    return jnp.zeros((batch, steps), dtype).at[:, -1].set(1)


def _freeze(o: dict) -> tuple:
    return tuple(sorted(o.items()))


def _uniform(key, shape):
    """``U[0, 1)`` float32 draws: every task draws all its randomness in one call (one threefry
    kernel to compile, instead of one per ``split``/``randint``)."""
    return jax.random.uniform(key, shape, jnp.float32)


def _below(u, n: int):
    """``floor(n u)`` as int32, clipped to ``0..n-1``: uniform on ``{0..n-1}`` up to the
    ``2^-23``-resolution of a float32 ``u`` (a bias below ``n * 1.2e-7``)."""
    return jnp.clip(jnp.floor(u * n).astype(jnp.int32), 0, n - 1)


# ---------------------------------------------------------------------------------------------
# Generators


def adding(steps: int = 100) -> Task:
    r"""The adding problem, as generated by the STAR authors' code.

    ``xs[b, t] = (v_t, m_t)`` with ``v_t ~ U(0, 1)`` and ``m_t = [t = p_1] + [t = p_2]``,
    ``p_1 ~ U\{0, .., T//2 - 1\}``, ``p_2 = T//2 + U\{0, .., T//2 - 1\}``;
    target at the last step :math:`y = v_{p_1} + v_{p_2}`; ``ys: (B, T, 1)``; MSE.
    """
    T = _int("adding", "steps", steps, low=2)
    half = T // 2

    def sample_fn(key, batch, dtype):
        u = _uniform(key, (batch, T + 2))
        v = u[:, :T].astype(dtype)
        p1 = _below(u[:, T], half)
        p2 = half + _below(u[:, T + 1], half)
        m = jax.nn.one_hot(p1, T, dtype=dtype) + jax.nn.one_hot(p2, T, dtype=dtype)
        y = jnp.sum(v * m, axis=1)
        ys = jnp.zeros((batch, T, 1), dtype).at[:, -1, 0].set(y)
        return jnp.stack([v, m], axis=-1), ys, _last(batch, T, dtype)

    return Task("adding", 2, 1, "regression", "last", T, "mse", (),
                jax.jit(sample_fn, static_argnums=(1, 2)))


def copy(lag: int = 50, symbols: int = 10, alphabet: int = 8) -> Task:
    r"""The copy (memory) task.

    Input labels ``(s_1..s_n, 0 x lag, A+1, 0 x n)`` with ``s_i ~ U\{1..A\}``, one-hot over
    ``A + 2`` symbols (0 blank, ``A + 1`` the delimiter); target labels ``(0 x (n + lag + 1),
    s_1..s_n)`` over ``A + 1`` classes, scored on the last ``n`` (recall) steps only.
    ``T = 2n + lag + 1``; ``xs: (B, T, A+2)``, ``ys: (B, T)`` int32, chance cross-entropy
    ``log A``.
    """
    lag = _int("copy", "lag", lag, low=0)
    n = _int("copy", "symbols", symbols)
    A = _alphabet("copy", alphabet)
    T = 2 * n + lag + 1

    def sample_fn(key, batch, dtype):
        s = 1 + _below(_uniform(key, (batch, n)), A)
        zeros = lambda k: jnp.zeros((batch, k), s.dtype)  # noqa: E731
        x = jnp.concatenate([s, zeros(lag), jnp.full((batch, 1), A + 1, s.dtype), zeros(n)], 1)
        ys = jnp.concatenate([zeros(n + lag + 1), s], 1).astype(jnp.int32)
        mask = jnp.concatenate([jnp.zeros((batch, n + lag + 1), dtype),
                                jnp.ones((batch, n), dtype)], 1)
        return jax.nn.one_hot(x, A + 2, dtype=dtype), ys, mask

    return Task("copy", A + 2, A + 1, "classification", "steps", T, "accuracy",
                _freeze({"lag": lag, "symbols": n, "alphabet": A}),
                jax.jit(sample_fn, static_argnums=(1, 2)), classes=A)


def counting(steps: int = 20, alphabet: int = 4, target: str = "regression") -> Task:
    r"""Count the occurrences of a marked symbol.

    ``xs[b, 0] = (onehot_A(q), 1)``, ``xs[b, t] = (onehot_A(s_t), 0)`` for ``t >= 1``, with
    ``q, s_t ~ U\{0..A-1\}``; the count :math:`n = \#\{t \ge 1 : s_t = q\}` (``0..T-1``) is
    the target at the last step: ``ys: (B, T, 1)`` holding ``n / (T - 1)``
    (``target="regression"``, MSE) or ``(B, T)`` int32 labels ``n`` over ``T`` classes
    (``target="classification"``).

    The regression target is scaled to ``[0, 1]`` (the scale of the adding task) because raw
    counts stall training: a 2-layer LSTM fits their mean within a few dozen steps and then sits
    on that plateau (measured: T = 8, A = 2, 300 Adam steps, lr 3e-3 and 1e-2), while the
    scaled target is learned to below 2% of its variance in the same budget.
    """
    T = _int("counting", "steps", steps, low=2)
    A = _alphabet("counting", alphabet)
    if target not in KINDS:
        raise ValueError(f"task 'counting': target={target!r} is not valid; choose from "
                         f"{', '.join(map(repr, KINDS))}")
    classify = target == "classification"

    def sample_fn(key, batch, dtype):
        qs = _below(_uniform(key, (batch, T)), A)
        q, s = qs[:, :1], qs[:, 1:]
        count = jnp.sum(s == q, axis=1)
        sym = jax.nn.one_hot(jnp.concatenate([q, s], 1), A, dtype=dtype)
        marker = jnp.zeros((batch, T, 1), dtype).at[:, 0, 0].set(1)
        xs = jnp.concatenate([sym, marker], -1)
        if classify:
            ys = jnp.zeros((batch, T), jnp.int32).at[:, -1].set(count.astype(jnp.int32))
        else:
            ys = jnp.zeros((batch, T, 1), dtype).at[:, -1, 0].set(count.astype(dtype) / (T - 1))
        return xs, ys, _last(batch, T, dtype)

    return Task("counting", A + 1, T if classify else 1, target, "last", T,
                "accuracy" if classify else "mse",
                _freeze({"alphabet": A, "target": target}),
                jax.jit(sample_fn, static_argnums=(1, 2)), classes=T if classify else None)


def load_digits():
    """scikit-learn's 8x8 digits: ``(images (1797, 8, 8) in 0..16, labels (1797,))``.

    Raises:
      ImportError: scikit-learn is not installed (with the pip command that installs it).
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise ImportError("the 'digits' task needs scikit-learn: pip install 'gradflow[digits]' "
                          "(or pip install scikit-learn), or pass images= and labels= arrays"
                          ) from None
    d = _load()
    return d.images, d.target


def digits(images=None, labels=None, split: str = "all", test_fraction: float = 0.2,
           scale: float = 16.0) -> Task:
    r"""8x8 digit images read pixel by pixel (sequential digits, 64 steps).

    ``xs[b, t, 0] = image[i_b].ravel()[t] / scale`` (row-major), ``i_b ~ U`` over the split's
    images; ``ys[b, T-1] = label[i_b]`` (10 classes) scored at the last step.

    Args:
      images: ``(N, 8, 8)`` or ``(N, 64)`` pixel array; default scikit-learn's digits
        (:func:`load_digits`, pixels 0..16).
      labels: ``(N,)`` integers in ``0..9`` (given together with ``images``).
      split: ``"all"``, ``"train"`` or ``"test"``: a fixed split, the test part the first
        ``round(N * test_fraction)`` images of the permutation ``default_rng(0).permutation(N)``.
      test_fraction: in ``(0, 1)``.
      scale: the pixel value mapped to 1.
    """
    if (images is None) != (labels is None):
        raise ValueError("task 'digits': give both images= and labels=, or neither")
    source = "sklearn" if images is None else "array"
    if images is None:
        images, labels = load_digits()
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim not in (2, 3) or images.shape[1:] not in ((8, 8), (64,)):
        raise ValueError(f"task 'digits': images must have shape (N, 8, 8) or (N, 64), "
                         f"got {images.shape}")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"task 'digits': labels must be {images.shape[:1]} integers, got "
                         f"{labels.shape} {labels.dtype}")
    if not ((np.issubdtype(images.dtype, np.number) or images.dtype == bool)
            and not np.iscomplexobj(images)):
        raise ValueError(f"task 'digits': images must hold real numbers, got {images.dtype}")
    bad = np.size(images) - int(np.isfinite(images).sum())
    if bad:
        raise ValueError(f"task 'digits': images hold {bad} non-finite pixels (NaN or inf); "
                         "the task needs finite pixel values")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError("task 'digits': labels must lie in 0..9")
    if split not in ("all", "train", "test"):
        raise ValueError(f"task 'digits': split={split!r} is not valid; choose from 'all', "
                         "'train', 'test'")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"task 'digits': test_fraction must lie in (0, 1), got {test_fraction}")
    if not float(scale) > 0:
        raise ValueError(f"task 'digits': scale must be positive, got {scale}")
    # A fixed shuffle: the digits come ordered in cycles 0..9, so a stride would select classes.
    n_test = int(round(len(labels) * float(test_fraction)))
    test = np.zeros(len(labels), bool)
    test[np.random.default_rng(0).permutation(len(labels))[:n_test]] = True
    keep = {"all": np.ones_like(test), "train": ~test, "test": test}[split]
    pix = images.reshape(len(images), 64)[keep].astype(np.float64) / float(scale)
    lab = labels[keep].astype(np.int32)
    if len(lab) == 0:
        raise ValueError(f"task 'digits': split {split!r} holds no images")
    T = 64

    def sample_fn(key, batch, dtype):
        i = _below(_uniform(key, (batch,)), len(lab))
        xs = jnp.asarray(pix, dtype)[i][:, :, None]
        ys = jnp.zeros((batch, T), jnp.int32).at[:, -1].set(jnp.asarray(lab)[i])
        return xs, ys, _last(batch, T, dtype)

    # The data's fingerprint makes tasks built from different arrays compare unequal, so a
    # Task stays a safe static (cache) key for jax.jit.
    fingerprint = hashlib.sha1(pix.tobytes() + lab.tobytes()).hexdigest()[:16]
    return Task("digits", 1, 10, "classification", "last", T, "accuracy",
                _freeze({"source": source, "n_images": int(len(lab)), "split": split,
                         "test_fraction": float(test_fraction), "scale": float(scale),
                         "fingerprint": fingerprint}),
                jax.jit(sample_fn, static_argnums=(1, 2)), classes=10)


def _copy_length(options: dict, steps: int) -> dict:
    lag = steps - 2 * options["symbols"] - 1
    if lag < 0:
        raise ValueError(f"task 'copy' with {options['symbols']} symbols needs at least "
                         f"{2 * options['symbols'] + 1} steps, got {steps}")
    return {"lag": lag}


def _steps_length(options: dict, steps: int) -> dict:
    return {"steps": steps}


#: ``name: (generator, length)``: ``length(options, T) -> the options that make sequences of
#: ``T`` steps`` (None: a fixed length). :func:`resize` and :func:`for_length` read it.
_REGISTRY: dict[str, tuple[Callable[..., Task], Callable[[dict, int], dict] | None]] = {
    "adding": (adding, _steps_length),
    "copy": (copy, _copy_length),
    "counting": (counting, _steps_length),
    "digits": (digits, None),
}


def names() -> tuple[str, ...]:
    """Every task name, sorted."""
    return tuple(sorted(_REGISTRY))


def make(name: str, **options) -> Task:
    """The task ``name`` built with ``options`` (see the generator of each name).

    Raises:
      ValueError: unknown name or option (the message lists the valid ones), bad option value.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(names())}")
    fn = _REGISTRY[name][0]
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
    options = _options(name, options, defaults)
    try:
        frozen = _freeze(options)
        hash(frozen)
    except TypeError:  # arrays (digits' images): build afresh
        return fn(**options)
    return _make_cached(name, frozen)


@functools.lru_cache(maxsize=256)
def _make_cached(name: str, frozen: tuple) -> Task:
    """One Task object per configuration, so its jitted generator compiles once per process."""
    return _REGISTRY[name][0](**dict(frozen))


def _check_task(task) -> None:
    if not isinstance(task, Task):
        raise TypeError(f"task must be a gradflow.tasks.Task (from tasks.make), got "
                        f"{type(task).__name__}")


def sample(task: Task, key, batch: int, dtype=jnp.float32):
    """One batch ``(xs (B, T, D), ys, mask (B, T))`` of ``task``; the same key, the same batch.

    ``ys`` is ``(B, T)`` int32 for classification, ``(B, T, K)`` of ``dtype`` for regression.
    """
    _check_task(task)
    batch = checks.int_at_least("batch", batch, 1)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"tasks.sample: dtype must be a floating dtype (float32, float64, "
                         f"bfloat16, ...), got {dtype!r}")
    if not checks._looks_like_key(key):
        raise TypeError(f"key must be a PRNG key (jax.random.key(seed)), got "
                        f"{type(key).__name__}")
    _check_batch_fits(task, batch, dtype)
    return task.sample_fn(key, batch, dtype)


def _check_batch_fits(task: Task, batch: int, dtype) -> None:
    """A ValueError where one batch ``(xs, ys, mask)`` of ``task`` takes more than the memory
    available (:func:`gradflow.checks.available_memory`): a batch of 10**10 was handed to the
    allocator. The three arrays' sizes, each B x T wide (``ys`` times K for regression)."""
    per = (task.input_size + 1) * dtype.itemsize + (  # xs, the mask, ys
        task.output_size * dtype.itemsize if task.kind == "regression" else 4)
    need = batch * task.steps * per
    avail = checks.available_memory()
    if need > avail:
        fit = max(avail // max(task.steps * per, 1), 0)
        raise ValueError(f"tasks.sample: a batch of {batch:,} x {task.steps:,} steps "
                         f"of task {task.name!r} takes {need / 2**30:,.1f} GiB, more than the "
                         f"{avail / 2**30:,.1f} GiB available"
                         + (f": at most about {fit:,} fit" if fit else
                            ": fewer steps are needed"))


def resize(task: Task, steps: int) -> Task:
    """``task`` rebuilt with sequence length ``T = steps`` (for curricula).

    ``adding``/``counting`` set ``steps``; ``copy`` sets ``lag = steps - 2 * symbols - 1``;
    ``digits`` has a fixed length (64) and raises a ValueError for any other.
    """
    steps = _int(task.name, "steps", steps)
    if steps == task.steps:
        return task
    length = _REGISTRY[task.name][1]
    if length is None:
        resizable = ", ".join(n for n in names() if _REGISTRY[n][1] is not None)
        raise ValueError(f"task {task.name!r} has a fixed length of {task.steps} steps; "
                         f"resizable tasks: {resizable}")
    options = dict(task.options)
    return make(task.name, **{**options, **length(options, steps)})


def for_length(name: str, steps: int | None = None, /, **options) -> Task:
    """:func:`make`, resized to sequences of ``T = steps`` (:func:`resize`: ``copy`` gets
    ``lag = steps - 2 * symbols - 1``) unless ``steps`` is None or ``options`` fix the length
    themselves (``steps``, ``lag``; then they must make ``steps``, or a ValueError says so).
    ``name`` and ``steps`` are positional, so a task option ``steps`` goes to the task.

    >>> for_length("copy", 30, symbols=5).options
    (('alphabet', 8), ('lag', 19), ('symbols', 5))
    """
    task = make(name, **options)
    if steps is None:
        return task
    length = _REGISTRY[task.name][1]
    fixed = sorted(set(length(dict(task.options), task.steps) if length else ()) & set(options))
    if fixed:  # two lengths given: they must agree
        if task.steps != steps:
            raise ValueError(f"the sequence length is {steps} but {fixed[0]}={options[fixed[0]]} "
                             f"makes {name} sequences of {task.steps} steps; give only one "
                             "of the two, or two that agree")
        return task
    return resize(task, steps)


def from_config(config: dict) -> Task:
    """The task a :attr:`Task.config` describes (``{"task": name, "steps": T, **options}``,
    e.g. a saved run's): ``steps`` is derived for ``copy`` (from ``lag`` and ``symbols``),
    so it is checked there, not passed (:func:`for_length`).

    >>> from_config(make("copy", lag=5).config) == make("copy", lag=5)
    True
    """
    if not isinstance(config, dict) or "task" not in config:
        raise ValueError(f"a task config is a dict {{'task': name, 'steps': T, ...options}} "
                         f"(Task.config), got {config!r}")
    options = dict(config)
    name, steps = options.pop("task"), options.pop("steps", None)
    if name != "digits":
        return for_length(name, steps, **options)
    # digits records its data, not options: scikit-learn's set is loaded again (and must be
    # the one the run read); arrays given to make are not saved with a run
    source, fingerprint = options.pop("source", None), options.pop("fingerprint", None)
    options.pop("n_images", None)
    if source == "array":
        raise ValueError("the task is 'digits' made from images= and labels= arrays, which a "
                         "run does not save: rebuild it with gradflow.tasks.make('digits', "
                         "images=..., labels=...) from the same arrays and measure the run "
                         "through the API (gradflow.runs.load_params)")
    task = for_length(name, steps, **options)
    if fingerprint is not None and task.config["fingerprint"] != fingerprint:
        raise ValueError(f"the task is 'digits', but scikit-learn's digits here (fingerprint "
                         f"{task.config['fingerprint']}) are not the images the run read "
                         f"({fingerprint})")
    return task


# ---------------------------------------------------------------------------------------------
# Losses and metrics on readout outputs ``out: (B, T, K)``


def _masked_mean(v, mask):
    return jnp.sum(v * mask) / jnp.maximum(jnp.sum(mask), 1)


def _kind(task) -> str:
    kind = task if isinstance(task, str) else getattr(task, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"expected a Task or a kind ({', '.join(KINDS)}), got {task!r}")
    return kind


def loss_fn(task: Task | str) -> Callable[[Any, Any, Any], jax.Array]:
    r"""``loss(out (B, T, K), ys, mask (B, T)) -> scalar`` for ``task`` (or its ``kind``).

    Regression: :math:`\sum_{b,t} m_{bt} \tfrac1K \sum_k (o_{btk} - y_{btk})^2 / \sum m`.
    Classification: :math:`\sum_{b,t} m_{bt} (\operatorname{logsumexp}_k o_{btk} - o_{b,t,y_{bt}})
    / \sum m` (cross-entropy of softmax logits).
    """
    if _kind(task) == "regression":
        def loss(out, ys, mask):
            return _masked_mean(jnp.mean((out - ys) ** 2, axis=-1), mask.astype(out.dtype))
    else:
        def loss(out, ys, mask):
            picked = jnp.take_along_axis(out, ys[..., None].astype(jnp.int32), axis=-1)[..., 0]
            ce = jax.nn.logsumexp(out, axis=-1) - picked
            return _masked_mean(ce, mask.astype(out.dtype))
    return loss


def metric_fn(task: Task | str) -> Callable[[Any, Any, Any], jax.Array]:
    """``metric(out, ys, mask) -> scalar``: the masked MSE (regression) or the fraction of
    masked steps whose ``argmax_k out`` equals the label (classification); see ``task.metric``.
    """
    if _kind(task) == "regression":
        return loss_fn(task)

    def accuracy(out, ys, mask):
        hit = (jnp.argmax(out, axis=-1) == ys).astype(out.dtype)
        return _masked_mean(hit, mask.astype(out.dtype))
    return accuracy


def chance(task: Task) -> float:
    """A reference loss that needs no learning: for classification the cross-entropy of the
    uniform guess over the classes the targets can take (``task.classes``: ``log A`` for copy,
    ``log 10`` for digits, ``log T`` for counting); for regression nan (it depends on the
    data)."""
    _check_task(task)
    if task.kind == "regression":
        return math.nan
    return math.log(task.classes)


__all__ = ["Task", "adding", "copy", "counting", "digits", "load_digits", "names", "make",
           "for_length", "from_config", "sample", "resize", "loss_fn", "metric_fn", "chance"]
