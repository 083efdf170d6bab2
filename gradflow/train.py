r"""Training a stack on a task, with measurements recorded along the way.

The model is the stack plus a linear readout of its top layer at every step,
``out[b, t] = h^{L-1}_t[b] @ W + b_head`` (``(B, T, K)``), scored by the task's masked loss
(:func:`gradflow.tasks.loss_fn`). Parameters are one pytree
``{"stack": ..., "head": {"W": (H, K), "b": (K,)}}``, updated by one jitted step:
``value_and_grad`` of

.. math:: \mathcal{L} = \text{task loss} + \lambda \cdot \operatorname{mean}(k)

(the g-LSTM budget term: the mean over layers, batch, steps and neurons of the time gate ``k``;
``lambda = budget``, default 0), then ``optax.chain(clip_by_global_norm(clip),
scale_by_adam())`` and a step of ``-lr`` (together ``optax.adam(lr)`` after the clip).

Keys: ``k_init, k_data, k_eval = split(key(seed), 3)``; the stack's params come from
``stack.init(k_init)`` (the head starts at zero, :func:`init_head`), the batch of step ``s``
from ``tasks.sample(task, fold_in(k_data, s), batch)`` and the fixed evaluation batch from
``k_eval`` (:func:`eval_batch_of`). So a run is determined by its seed, and a resumed run
continues exactly where the interrupted one stopped.

The pieces: :class:`TrainConfig` (the run's options, checked when built), :class:`TrainState`
(parameters, optimiser state, step), :func:`init_state`, :func:`step` (one update),
:func:`evaluate`, :func:`record`; :func:`train` runs them in a loop and, with ``run_dir``,
saves the run as it goes (:mod:`gradflow.runs`).

>>> stack = gradflow.Stack("lstm", layers=2, input_size=2, hidden_size=32)
>>> task = gradflow.tasks.make("adding", steps=20)
>>> hist = train(stack, task, steps=300, lr=1e-2, progress=False)
>>> hist.curve.loss.shape, bool(hist.curve.eval_loss[-1] < hist.curve.eval_loss[0])
((300,), True)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import checks, runs
from gradflow import results as _results
from gradflow import tasks as _tasks
from gradflow.errors import InputError, user_input
from gradflow.problem import dtype_of
from gradflow.results import Result, make_result
from gradflow.stack import Stack
from gradflow.xla import jit

# Config entries a resumed run may change: the total length, and the schedules derived from it.
_RESUMABLE = ("train_steps", "eval_every", "cell_label")  # (of the options compared)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The options of one run (see :func:`train` for their meaning), checked when built.

    ``eval_every=None`` becomes ``max(1, steps // 10)``, ``record_batch=None`` becomes
    ``eval_batch``; ``record_at`` becomes a sorted tuple, ``curriculum`` a tuple of
    ``(until_step, seq_len)`` pairs.

    Raises:
      gradflow.errors.InputError: an option out of range, naming it.
    """

    steps: int = 500
    batch: int = 32
    lr: float = 1e-3
    clip: float | None = 1.0
    seed: int = 0
    dtype: str = "float32"
    eval_every: int | None = None
    eval_batch: int = 256
    record_at: tuple = ()
    record_batch: int | None = None
    budget: float = 0.0
    curriculum: tuple | None = None

    def __post_init__(self):
        with user_input():
            for name, value in self._checked().items():
                object.__setattr__(self, name, value)

    def _checked(self) -> dict:
        steps = checks.nonneg_int("steps", self.steps)
        eval_batch = checks.positive_int("eval_batch", self.eval_batch)
        lr, budget = float(self.lr), float(self.budget)
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if self.clip is not None and not float(self.clip) > 0:
            raise ValueError(f"clip must be positive or None, got {self.clip}")
        if not (budget >= 0 and math.isfinite(budget)):
            raise ValueError(f"budget must be a finite number >= 0, got {budget}")
        record_at = tuple(sorted({checks.nonneg_int("record_at step", s) for s in self.record_at}))
        if record_at and record_at[-1] > steps:
            raise ValueError(f"record_at steps must lie in 0..{steps}, got {record_at[-1]}")
        return dict(
            steps=steps, batch=checks.positive_int("batch", self.batch), lr=lr,
            clip=None if self.clip is None else float(self.clip),
            seed=checks.seed("seed", self.seed), dtype=str(dtype_of(self.dtype)),
            eval_every=(max(1, steps // 10) if self.eval_every is None
                        else checks.positive_int("eval_every", self.eval_every)),
            eval_batch=eval_batch, record_at=record_at,
            record_batch=checks.record_batch(self.record_batch, eval_batch, eval_batch),
            budget=budget, curriculum=_stages(self.curriculum))

    @property
    def eval_steps(self) -> frozenset:
        """The steps evaluated: every ``eval_every``-th from 0, and the last."""
        return frozenset(range(0, self.steps + 1, self.eval_every)) | {self.steps}

    def describe(self, stack: Stack, task, eval_task, initial_params=None) -> dict:
        """The run's JSON-able config: the stack's, the tasks', and these options;
        ``initial_params``: None where the run starts from its seed's parameters, else what
        it started from (:func:`fingerprint`)."""
        return {**stack.config, "task": task.config, "eval_task": eval_task.config,
                "initial_params": initial_params,
                "metric": task.metric, "train_steps": self.steps, "batch": self.batch,
                "lr": self.lr, "clip": self.clip, "seed": self.seed, "dtype": self.dtype,
                "budget": self.budget,
                "curriculum": None if self.curriculum is None else [list(s) for s in
                                                                    self.curriculum],
                "eval_every": self.eval_every, "eval_batch": self.eval_batch,
                "record_batch": self.record_batch}


def resume_differences(saved: dict, config: dict) -> list[tuple[str, Any, Any]]:
    """``[(key, the saved run's value, config's value), ...]`` where a run's ``config``
    (:meth:`TrainConfig.describe`) differs from a saved run's config (``runs.read_run(DIR)
    ["config"]``) in what a resumed run must keep (all but ``train_steps`` and
    ``eval_every``); ``[]``: it may resume."""
    new = json.loads(json.dumps(make_result("training", {}, config).config))
    keys_ = (set(saved) | set(new)) - set(_RESUMABLE)
    return [(k, saved.get(k), new.get(k)) for k in sorted(keys_) if saved.get(k) != new.get(k)]


#: What a refusal to resume from a run's files says to do.
_FRESH = ("a run is resumed from all its files (state, curve, records), as saved together: start "
          "a new run (gradflow train --overwrite)")


def curve_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """``"sha256:"`` and 16 hex digits of a learning curve's arrays (each name, dtype, shape
    and bytes): the state saved with a curve records it (``runs.read_run(DIR)["curve"]``), so
    that a resume knows the curve beside it for the one it was saved with."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()[:16]


def resume_files(run_dir, meta: dict) -> tuple[dict, list]:
    """The curve and records that a resume of the run saved in ``run_dir`` restores
    (``meta``: its state's, :func:`gradflow.runs.read_run`), each checked to be that state's:

    * the curve's and each record's config (a record's ``training``) equal the state's in
      what a resumed run must keep (:func:`resume_differences`);
    * the curve holds steps ``0..step-1`` of the state's ``step``: no gap (a curve saved
      earlier), and no other run's; it may go further (a run stopped between writing its
      curve and its state), which is cut off;
    * its steps and evaluations up to ``step`` are those the state was saved with, where the
      state records them (:func:`curve_digest`; a state saved before it did, unchecked);
    * each record listed in the state's index is of the step the index gives it.

    Returns:
      ``(curve, records)``: ``curve`` the curve's arrays up to the state's step (``step``,
      ``loss``, ... ``(step,)``; ``eval_*``: the evaluations at steps ``<= step``),
      ``records`` ``[(name, at, file, Result), ...]`` of the index's records at steps
      ``<= step``.
    Raises:
      gradflow.errors.InputError: a file gone, damaged or not the state's, naming it (and
        what differs).
    """
    run_dir = os.fspath(run_dir)
    try:
        return _resume_files(run_dir, meta, f"cannot resume from {run_dir!r}")
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot resume from {run_dir!r}: {type(e).__name__}: {e}; "
                         f"{_FRESH}") from e


def _resume_files(run_dir: str, meta: dict, where: str) -> tuple[dict, list]:
    start, config = int(meta["step"]), meta["config"]
    curve = Result.load(os.path.join(run_dir, runs.CURVE))
    if curve.kind != "training":
        raise InputError(f"{where}: its {runs.CURVE} is a {curve.kind!r} result, not a "
                         f"learning curve; {_FRESH}")
    _same_run(where, runs.CURVE, config, curve.config)
    steps = curve.arrays["step"]
    if len(steps) < start or not np.array_equal(steps[:start], np.arange(start)):
        raise InputError(f"{where}: its {runs.CURVE} holds steps {_steps(steps)}, where its "
                         f"{runs.STATE}, saved at step {start}, needs steps "
                         f"{_steps(np.arange(start))} (a curve saved at another step); "
                         f"{_FRESH}")
    n_eval = int(np.searchsorted(curve.arrays["eval_step"], start, side="right"))
    kept = {k: v[:n_eval] if k.startswith("eval_") else v[:start]
            for k, v in curve.arrays.items()}
    if meta.get("curve") not in (None, curve_digest(kept)):
        raise InputError(f"{where}: its {runs.CURVE} is not the one saved with its "
                         f"{runs.STATE}: its losses or evaluations up to step {start} are not "
                         f"those the state was saved with (a curve of another run of these "
                         f"settings); {_FRESH}")
    records, stack = [], meta.get("stack")
    for name, at, fname in meta["records"]:
        if at > start:
            continue
        r = Result.load(os.path.join(run_dir, fname))
        if r.config.get("train_step") != at:
            raise InputError(f"{where}: its {fname} is a record of step "
                             f"{r.config.get('train_step')}, its {runs.STATE} lists it as the "
                             f"record {name!r} of step {at}; {_FRESH}")
        if "training" in r.config and isinstance(stack, dict):  # (the run's settings, its
            _same_run(where, fname, {k: v for k, v in config.items() if k not in stack},
                      r.config["training"])  # stack's apart: record() keeps them so)
        records.append((name, at, fname, r))
    return kept, records


def _same_run(where: str, fname: str, saved: dict, config: dict):
    """Refuse a file of the run whose ``config`` differs from the state's (``saved``) in what
    a resumed run must keep (:func:`resume_differences`), naming each difference."""
    bad = resume_differences(saved, config)
    if bad:
        raise InputError(f"{where}: its {fname} is another run's: it differs from its "
                         f"{runs.STATE} in " + "; ".join(
                             f"{k} (the state's {_brief(a)}, the file's {_brief(b)})"
                             for k, a, b in bad) + f"; {_FRESH}")


def _steps(steps) -> str:
    """Steps in a message: ``0..4`` where they count up from 0, else the first few."""
    steps = np.asarray(steps).tolist()
    if not steps:
        return "none"
    if steps == list(range(len(steps))):
        return f"0..{len(steps) - 1}"
    return _brief(steps)


def _brief(value) -> str:
    """A config value in a message: JSON, cut at 60 characters."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _stages(curriculum):
    """``[(until_step, seq_len), ...]`` as a tuple of positive int pairs, until_steps rising."""
    if curriculum is None:
        return None
    try:
        stages = tuple((checks.positive_int("curriculum until_step", u),
                        checks.positive_int("curriculum seq_len", n)) for u, n in curriculum)
    except (TypeError, ValueError) as e:
        raise ValueError(f"curriculum must be a list of (until_step, seq_len) pairs of positive "
                         f"integers: {e}") from None
    untils = [u for u, _ in stages]
    if any(b <= a for a, b in zip(untils, untils[1:])):
        raise ValueError(f"curriculum until_steps must increase, got {untils}")
    return stages


class TrainState(NamedTuple):
    """Where a run stands.

    Attributes:
      theta: ``(n,)`` every parameter of ``{"stack", "head"}``, raveled in flattening order
        (Adam and the clip act on one array; :func:`params_of` gives the pytree back).
      opt_state: the optimiser's state of ``theta``.
      step: updates done.
    """

    theta: Any
    opt_state: Any
    step: int



@dataclasses.dataclass(frozen=True, eq=False)
class History:
    """What :func:`train` returns.

    Attributes:
      curve: ``Result`` of kind ``"training"``: ``step, loss, metric, seq_len`` (``(steps,)``:
        the training batch's loss and metric before update ``step``, and its length ``T``),
        ``eval_step, eval_loss, eval_metric`` (``(E,)``, on the fixed evaluation batch) and, for
        cells with a time gate ``k``, ``eval_mean_k`` and ``eval_updates`` (the fraction of
        neuron updates with ``k > 1e-3``, the compute used relative to an LSTM). Its config
        holds the stack's config, ``task`` (the task's config) and the training options.
      records: ``{name: (Result, ...)}``, one per entry of ``record_steps``; each result's
        config gets ``train_step``.
      record_steps: the steps at which ``records`` were taken (updates done before them).
      params: the final ``{"stack": ..., "head": {"W": (H, K), "b": (K,)}}``.
      stack, task: what was trained.
    """

    curve: Result
    records: dict
    record_steps: tuple
    params: dict
    stack: Stack
    task: _tasks.Task

    def __repr__(self) -> str:
        n = len(self.curve.arrays["step"])
        last = self.curve.arrays["eval_metric"]
        end = f"; eval {self.task.metric} {float(last[-1]):.4g}" if len(last) else ""
        return (f"History({cells_label(self.stack)} on {self.task.name}: {n} steps{end}; "
                f"records {', '.join(self.records) or '(none)'})")


def readout(head: dict, h):
    """``h: (B, T, H) -> (B, T, K)``: ``h @ head["W"] + head["b"]``."""
    return h @ head["W"] + head["b"]


def task_loss(head: dict, task, ys, mask) -> Callable:
    """``task(top: (B, T, H)) -> scalar``: a task's own loss of a stack's top layer through
    the readout ``head`` (``{"W", "b"}``, e.g. a run's, :func:`gradflow.runs.load_head`) on
    targets ``ys`` where ``mask`` scores them, as training computes it (:func:`update_theta`).
    As ``gradflow.gradient_map(..., loss=task_loss(...))`` it maps the gradient training
    followed, where the default losses probe the stack with a random readout and labels.

    Args:
      head: the readout's parameters.
      task: the :class:`gradflow.tasks.Task` (or its kind, ``"regression"``/
        ``"classification"``): which loss.
      ys, mask: the targets and the mask of the batch the map's inputs come from
        (``tasks.sample`` or :func:`eval_batch_of`).
    """
    loss_f = _tasks.loss_fn(task)
    classify = _tasks._kind(task) == "classification"
    W = head.get("W") if isinstance(head, Mapping) else None
    if W is None or "b" not in head or np.ndim(W) != 2:
        raise ValueError("head must be a readout {'W': (H, K), 'b': (K,)} (e.g. "
                         "gradflow.runs.load_head(RUN))")
    if np.ndim(mask) != 2 or tuple(np.shape(ys))[:2] != tuple(np.shape(mask)):
        raise ValueError(f"ys {tuple(np.shape(ys))} and mask {tuple(np.shape(mask))} must share "
                         "their (batch, steps), the mask (B, T)")
    if classify and not np.issubdtype(np.asarray(ys).dtype, np.integer):
        raise ValueError(f"a classification task's ys are integer labels (B, T), got "
                         f"{np.asarray(ys).dtype}")

    def task(top):
        if top.shape[-1] != W.shape[0] or tuple(top.shape[:2]) != tuple(np.shape(mask)):
            raise ValueError(f"the top layer's states {tuple(top.shape)} do not fit the readout "
                             f"({W.shape[0]} inputs) and the targets' (batch, steps) "
                             f"{tuple(np.shape(mask))}: are ys and mask those of the map's "
                             "inputs?")
        return loss_f(readout(head, top), ys, mask)

    return task


def run_eval_batch(path, dtype=jnp.float32, batch: int | None = None):
    """``(xs, ys, mask, task)``: the fixed evaluation batch of the training run at ``path``
    (its folder or ``state.npz``), as training drew it (:func:`eval_batch_of` with the run's
    seed and sizes), its first ``batch`` sequences (default: all), and the evaluation task.
    With :func:`gradflow.runs.load_params` and :func:`task_loss` of
    :func:`gradflow.runs.load_head`, the run's own loss: over the whole batch its value is
    the run's last evaluation loss.

    Raises:
      InputError: no such run, a params file (no task), or ``batch`` beyond the batch.
    """
    from gradflow.runs import read_run

    config = read_run(path).get("config")
    if config is None:
        raise InputError(f"{path} is a params file: it records no task or evaluation batch; a "
                         "run folder of gradflow train does")
    size = config["eval_batch"]
    batch = size if batch is None else batch
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= size:
        raise InputError(f"batch must be an integer in 1..{size} (the evaluation sequences of "
                         f"the run at {path}), got {batch!r}")
    task = _tasks.from_config(config["eval_task"])
    xs, ys, mask = eval_batch_of(task, keys(config["seed"])[2], size, config["batch"], dtype)
    return xs[:batch], ys[:batch], mask[:batch], task


def init_head(hidden_size: int, output_size: int, dtype) -> dict:
    """``{"W": zeros (H, K), "b": zeros (K,)}``.

    A zero readout starts every output at 0, so the loss at init is known in closed form
    (``mean(y^2)`` for regression, ``log K`` for classification) and the first gradients that
    reach the stack are not shaped by a random readout; the head's own gradient
    ``h^T dL/dout`` is nonzero, so training moves it at once.
    """
    return {"W": jnp.zeros((hidden_size, output_size), dtype),
            "b": jnp.zeros((output_size,), dtype)}


def length_at(step: int, stages, full: int) -> int:
    """The training sequence length at ``step``: the first stage with ``step < until``."""
    for until, n in stages or ():
        if step < until:
            return n
    return full


def rescale_time_gate(stack: Stack, params: dict, ratio: float) -> dict:
    """The time parameters stretched by ``ratio`` in every layer, as the cell declares it
    (:attr:`gradflow.cells.Cell.rescale_time`: g-LSTM's ``mu, sigma``; other cells unchanged)."""
    if not rescales_time(stack):
        return params
    layers = [p if cell.rescale_time is None else cell.rescale_time(p, ratio)
              for cell, p in zip(stack.cells, params["stack"]["layers"])]
    return {**params, "stack": {**params["stack"], "layers": layers}}


def rescales_time(stack: Stack) -> bool:
    """Whether any layer's cell declares how to stretch its time parameters."""
    return any(c.rescale_time is not None for c in stack.cells)


def cells_label(stack: Stack) -> str:
    """The stack's cell names, ``"lstm"`` or ``"lstm+gru"`` (each once, bottom first)."""
    return "+".join(dict.fromkeys(c.name for c in stack.cells))


def time_gate(stack: Stack):
    """The time gate every layer's cell declares (g-LSTM's ``k``), None where none does; a
    ValueError for layers that disagree (training reads one time gate for the whole stack)."""
    named = dict.fromkeys(c.time_gate for c in stack.cells)
    if len(named) > 1:
        raise ValueError(f"training needs one time gate in every layer or none: this stack's "
                         f"layers have {', '.join(map(repr, named))} ({cells_label(stack)})")
    return next(iter(named))


def _check_params(params, template):
    same = jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(template) and all(
        np.shape(a) == np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                   jax.tree_util.tree_leaves(template)))
    if not same:
        raise ValueError("params must be a {'stack': stack params, 'head': {'W', 'b'}} pytree "
                         "shaped like a fresh one (or the stack's params alone)")


# ---------------------------------------------------------------------------------------------
# The jitted pieces. Module-level with the stack and the loss kind static (both hashable) and
# lr, clip, budget traced, so runs of one configuration (a resumed run, a sweep over
# seeds or learning rates) compile once. The parameters travel as one flat vector ``theta``
# (unflattened inside the traced code): Adam and the clip then act on one array instead of one
# per leaf, which cuts the update's compiled kernels by about a quarter (198 -> 142 fusions for
# a 2-layer LSTM); the arithmetic is the same (Adam is element-wise, the clip's global norm is
# the vector's norm).


def _spec(params) -> tuple:
    """``(treedef, leaf shapes)``: the hashable layout that :func:`_unflatten` inverts."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return treedef, tuple(tuple(np.shape(a)) for a in leaves)


def flatten(params, dtype):
    """All leaves, raveled and concatenated (in NumPy, on the host): ``(n,)``."""
    return jnp.asarray(np.concatenate([np.ravel(np.asarray(a, dtype))
                                       for a in jax.tree_util.tree_leaves(params)]))


def _unflatten(theta, spec):
    """The params pytree from ``theta (n,)`` and :func:`_spec`'s layout."""
    treedef, shapes = spec
    cuts = np.cumsum([math.prod(sh) for sh in shapes])[:-1]
    parts = jnp.split(theta, cuts) if len(shapes) > 1 else [theta]
    return jax.tree_util.tree_unflatten(treedef, [p.reshape(sh) for p, sh in zip(parts, shapes)])


def unflatten_host(theta, spec):
    """:func:`_unflatten` in NumPy on the host (nothing to compile), leaves as jax arrays."""
    flat = np.asarray(theta)
    treedef, shapes = spec
    cuts = np.cumsum([math.prod(sh) for sh in shapes])[:-1]
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(p.reshape(sh)) for p, sh in zip(np.split(flat, cuts), shapes)])


def _optimizer(clip):
    """``clip_by_global_norm(clip)`` then Adam's scaling; the step ``-lr * update`` is applied
    in :func:`update_theta`. ``clip`` may be traced (``inf`` for no clipping), so neither it nor
    ``lr`` is compiled in."""
    import optax

    return optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam())


def _timed(stack: Stack) -> bool:
    """Whether the stack's cell declares a time gate (STAR's gate is also named ``k``: it is
    an ordinary input-dependent gate, not a time gate)."""
    return time_gate(stack) is not None


def _unit_mean(stack: Stack, a):
    """The mean of a per-layer array ``a: (L, B, T, H)`` over its real units (layers of
    different widths pad theirs to ``H`` with zeros, which are no neurons)."""
    real = stack.real_units()
    if real is None:
        return jnp.mean(a)
    m = jnp.asarray(real, a.dtype)[:, None, None, :]
    return jnp.sum(a * m) / (np.sum(real) * a.shape[1] * a.shape[2])


def _forward(params, xs, stack: Stack, gates: bool):
    """``(out (B, T, K), k (L, B, T, H) or None)``."""
    o = stack.apply(params["stack"], xs, gates=gates)
    return readout(params["head"], o.top), o.gates.get(time_gate(stack))


@functools.partial(jit, static_argnames=("spec", "stack", "kind"))
def update_theta(theta, opt_state, xs, ys, mask, lr, clip, budget, *, spec, stack, kind):
    """One Adam step on the batch ``(xs, ys, mask)``; returns
    ``(theta, opt_state, task loss, metric)``."""
    timed = _timed(stack)
    loss_f, metric_f = _tasks.loss_fn(kind), _tasks.metric_fn(kind)

    def objective(th):
        out, k = _forward(_unflatten(th, spec), xs, stack, timed)
        loss = loss_f(out, ys, mask)
        total = loss + budget * _unit_mean(stack, k) if timed else loss
        return total, (loss, metric_f(out, ys, mask))

    (_, (loss, metric)), g = jax.value_and_grad(objective, has_aux=True)(theta)
    u, opt_state = _optimizer(clip).update(g, opt_state)
    return theta - lr * u, opt_state, loss, metric


@functools.partial(jit, static_argnames=("spec", "stack", "kind"))
def evaluate_theta(theta, xs, ys, mask, *, spec, stack, kind):
    """Loss and metric on a fixed batch; for time-gated cells also ``mean(k)`` and the
    fraction of updates ``mean(k > 1e-3)``."""
    timed = _timed(stack)
    out, k = _forward(_unflatten(theta, spec), xs, stack, timed)
    res = {"eval_loss": _tasks.loss_fn(kind)(out, ys, mask),
           "eval_metric": _tasks.metric_fn(kind)(out, ys, mask)}
    if timed:
        res["eval_mean_k"] = _unit_mean(stack, k)
        res["eval_updates"] = _unit_mean(stack, (k > 1e-3).astype(k.dtype))
    return res


def eval_batch_of(task: _tasks.Task, key, size: int, batch: int, dtype):
    """The fixed evaluation batch: ``ceil(size / batch)`` draws of ``batch`` sequences,
    ``tasks.sample(task, fold_in(key, j), batch)``, concatenated and cut to ``size``.

    Drawn with the training batch size so the task's generator compiles once per run.
    """
    draws = [task.sample_fn(jax.random.fold_in(key, j), batch, dtype)
             for j in range(-(-size // batch))]
    return tuple(jnp.concatenate(parts)[:size] for parts in zip(*draws))


# ---------------------------------------------------------------------------------------------
# The pieces of a run


def keys(seed: int):
    """``(k_init, k_data, k_eval) = split(key(seed), 3)``: the stack's init, the training
    batches (``fold_in(k_data, step)``), the fixed evaluation batch."""
    return tuple(jax.random.split(jax.random.key(seed), 3))


def params_of(state: TrainState, spec) -> dict:
    """The ``{"stack", "head"}`` pytree of ``state.theta`` (on the host, nothing compiled)."""
    return unflatten_host(state.theta, spec)


def init_state(stack: Stack, task, cfg: TrainConfig, params=None) -> tuple[TrainState, tuple]:
    """``(TrainState at step 0, spec)``: ``params`` (``{"stack", "head"}``, or the stack's
    params alone with a fresh head) or fresh ones from ``k_init``; ``spec`` is the layout
    that :func:`params_of` inverts."""
    dt = jnp.dtype(cfg.dtype)
    fresh = {"stack": stack.init(keys(cfg.seed)[0], dt),
             "head": init_head(stack.widths[-1], task.output_size, dt)}
    if params is None:
        params = fresh
    else:
        if "stack" not in params:
            params = {"stack": params, "head": fresh["head"]}
        _check_params(params, fresh)
    theta = flatten(params, dt)
    return TrainState(theta, _optimizer(math.inf).init(theta), 0), _spec(fresh)


def fingerprint(theta) -> str:
    """``"sha256:"`` and 16 hex digits of a run's flattened starting parameters (stack and
    head, in its dtype; :func:`gradflow.results.fingerprint`): what a run given ``params=``
    records, so that its config tells it from the run of its seed's own parameters, and two
    starts apart."""
    return _results.fingerprint(theta)


def step(state: TrainState, batch, cfg: TrainConfig, *, spec, stack: Stack, kind: str):
    """One update on ``batch = (xs, ys, mask)``: ``(next state, task loss, metric)``."""
    dt = jnp.dtype(cfg.dtype)
    clip = math.inf if cfg.clip is None else cfg.clip
    theta, opt_state, loss, metric = update_theta(
        state.theta, state.opt_state, *batch, jnp.asarray(cfg.lr, dt), jnp.asarray(clip, dt),
        jnp.asarray(cfg.budget, dt), spec=spec, stack=stack, kind=kind)
    return TrainState(theta, opt_state, state.step + 1), loss, metric


def evaluate(state: TrainState, batch, *, spec, stack: Stack, kind: str) -> dict:
    """``{"eval_loss", "eval_metric"}`` (and ``"eval_mean_k", "eval_updates"`` for time-gated
    cells) on ``batch = (xs, ys, mask)``, as host scalars."""
    return jax.device_get(evaluate_theta(state.theta, *batch, spec=spec, stack=stack, kind=kind))


def record(fns: Mapping[str, Callable], stack: Stack, stack_params, xs, at: int,
           run: dict | None = None) -> dict:
    """``{name: fn(stack, stack_params, xs)}``, each result's config given ``train_step=at``
    and, with ``run`` (the run's config, :meth:`TrainConfig.describe`), ``training``: the
    run's settings beyond the stack's (task, seed, lr, batch, ...: which run a record is of)
    and ``inputs`` (what ``xs`` is).

    Raises:
      TypeError: a function returned something that is not a :class:`gradflow.results.Result`.
    """
    out = {}
    for name, fn in fns.items():
        r = fn(stack, stack_params, xs)
        if not isinstance(r, Result):
            raise TypeError(f"record function {name!r} returned {type(r).__name__}, not a "
                            "gradflow Result")
        extra = {} if run is None else {
            "training": {k: v for k, v in run.items() if k not in stack.config},
            "inputs": f"the first {len(xs)} sequences of the run's evaluation batch"}
        out[name] = r.with_config({**r.config, "train_step": at, **extra})
    return out


def check_run(stack, task, eval_task, cfg: TrainConfig, record_fns) -> dict:
    """The checks that need the stack and the tasks; returns ``record_fns`` as a dict."""
    if not isinstance(stack, Stack):
        raise TypeError(f"stack must be a gradflow.Stack, got {type(stack).__name__}")
    if task.input_size != stack.input_size:
        raise ValueError(f"task {task.name!r} has {task.input_size} input features but the stack "
                         f"reads {stack.input_size}: build it with input_size={task.input_size}")
    if (eval_task.input_size, eval_task.output_size, eval_task.kind) != (
            task.input_size, task.output_size, task.kind):
        raise ValueError("eval_task must have the training task's input size, output size and "
                         "kind")
    time_gate(stack)  # layers that disagree on it: refused before anything runs
    fixed = [(jax.tree_util.keystr(p), a.dtype) for p, a in jax.tree_util.tree_flatten_with_path(
             checks.expected_params(stack, jnp.dtype(cfg.dtype)))[0]
             if not jnp.issubdtype(a.dtype, jnp.inexact)]
    if fixed:  # (Adam made a mask of 0/1 into floats that drifted; a saved run read them back
        raise ValueError(  # truncated to integers: other weights than the ones trained)
            f"training updates every parameter with Adam, and params{fixed[0][0]} of the "
            f"stack is {fixed[0][1]} (a fixed mask or index of the cell): it would become a "
            "float and drift; keep fixed arrays out of the cell's parameters (close over "
            "them in its step), or measure this cell untrained")
    if cfg.budget and not _timed(stack):
        raise ValueError(f"budget needs a cell with a time gate (e.g. g_lstm, phased_lstm); "
                         f"{cells_label(stack)!r} has none")
    for _, n in cfg.curriculum or ():
        stage = _tasks.resize(task, n)  # raises for fixed-length tasks and impossible lengths
        if stage.output_size > task.output_size:  # (labels the head has no output for)
            raise ValueError(f"curriculum stage of {n} steps: task {task.name!r} then has "
                             f"{stage.output_size} outputs (classes), more than the "
                             f"{task.output_size} the head reads (the task at {task.steps} "
                             "steps); make the task at the longest stage's length")
    record_fns = dict(record_fns or {})
    for name, fn in record_fns.items():
        if not isinstance(name, str) or not callable(fn):
            raise TypeError("record must map names (str) to callables fn(stack, params, xs)")
    if cfg.record_at and not record_fns:
        raise ValueError("record_at given without record functions")
    return record_fns


def check_memory(stack, task, eval_task, cfg: TrainConfig, runs: int = 1) -> None:
    """A ValueError before anything is compiled when a run cannot fit in memory: the
    parameters with Adam's two moments, and the larger of one training step (a forward and a
    backward pass for the parameters' gradient, :func:`gradflow.cost.estimate` with
    ``wrt="params"``) and one evaluation (a forward pass over ``eval_batch`` sequences); times
    ``runs`` trained at once in one program (:func:`gradflow.seeds.train_lr_seeds`' rows)."""
    from gradflow import cost

    step = cost.estimate(stack, cfg.batch, task.steps, cfg.dtype, wrt="params",
                         calibrate=False)
    evaluation = cost.estimate(stack, cfg.eval_batch, eval_task.steps, cfg.dtype,
                               method="gates", calibrate=False)
    need = runs * (2 * step.params + max(step.total, evaluation.total))
    cost.check_need(need, f"training ({'' if runs == 1 else f'{runs} runs at once, '}"
                          f"{cells_label(stack)}, {stack.layers} layer{'s' * (stack.layers != 1)}, "
                          f"H={stack.hidden_size}, batch {cfg.batch}, eval batch "
                          f"{cfg.eval_batch}, sequences of {task.steps} steps)",
                    "use a smaller hidden size, fewer layers, or a smaller batch or eval batch")


def as_task(task, name: str):
    """``task`` as a :class:`gradflow.tasks.Task` (a name is built with its defaults)."""
    if isinstance(task, str):
        return _tasks.make(task)
    if not isinstance(task, _tasks.Task):
        raise TypeError(f"{name} must be a gradflow.tasks.Task or a task name, got "
                        f"{type(task).__name__}")
    return task


# ---------------------------------------------------------------------------------------------
# What a run keeps: the curve, the evaluations and the records, and the run folder


class _Log:
    """The growing history of a run (host lists), turned into a :class:`History` on demand."""

    def __init__(self, timed: bool, names):
        self.curve = {k: [] for k in ("step", "loss", "metric", "seq_len")}
        self.evals = {k: [] for k in ("eval_step", "eval_loss", "eval_metric")
                      + (("eval_mean_k", "eval_updates") if timed else ())}
        self.records = {name: [] for name in names}
        self.record_steps = []
        self.index = []  # [[name, step, file], ...] of the records written to the run folder

    def curve_result(self, config: dict, warn: bool = False) -> Result:
        """The learning curve so far; ``warn``: a :class:`NonFiniteWarning` where a loss left
        the finite numbers (a diverged run: the curve keeps them, counted)."""
        dt = np.dtype(config["dtype"])
        c, e = self.curve, self.evals
        arrays = {"step": np.asarray(c["step"], np.int64),
                  "loss": np.asarray(jax.device_get(c["loss"]), dt),
                  "metric": np.asarray(jax.device_get(c["metric"]), dt),
                  "seq_len": np.asarray(c["seq_len"], np.int64),
                  "eval_step": np.asarray(e["eval_step"], np.int64),
                  **{k: np.asarray(v, dt) for k, v in e.items() if k != "eval_step"}}
        return make_result("training", arrays, config, warn=warn, who="train")

    def restore(self, run_dir: str, meta: dict):
        """The curve, evaluations and records of a saved run up to its state's step, each
        checked to be the state's (:func:`resume_files`: an InputError naming a file that is
        gone, damaged or another run's)."""
        curve, records = resume_files(run_dir, meta)
        for k in self.curve:
            self.curve[k] = list(curve[k])
        for k in self.evals:
            self.evals[k] = list(curve[k])
        for name, s, fname, r in records:
            if name in self.records:
                self.records[name].append(r)
                if s not in self.record_steps:
                    self.record_steps.append(s)
                self.index.append([name, s, fname])


class _Run:
    """A run's fixed context (stack, tasks, config, keys, evaluation batch, folder) and the
    loop's steps; each method does one thing to a :class:`TrainState`."""

    def __init__(self, stack, task, eval_task, cfg, record_fns, run_dir, spec,
                 initial_params=None):
        self.stack, self.task, self.cfg, self.fns, self.spec = stack, task, cfg, record_fns, spec
        self.run_dir = None if run_dir is None else os.fspath(run_dir)
        self.config = cfg.describe(stack, task, eval_task, initial_params)
        self.dt = jnp.dtype(cfg.dtype)
        _, self.k_data, k_eval = keys(cfg.seed)
        self.eval_batch = eval_batch_of(eval_task, k_eval, cfg.eval_batch, cfg.batch, self.dt)
        self.log = _Log(_timed(stack), record_fns)
        self.evals_at = cfg.eval_steps
        self.stage_tasks = {}
        self.bar = None

    def history(self, state: TrainState) -> History:
        log = self.log
        return History(log.curve_result(self.config, warn=True), {k: tuple(v) for k, v in
                                                        log.records.items()},
                       tuple(log.record_steps), params_of(state, self.spec), self.stack,
                       self.task)

    def resume(self, state: TrainState) -> TrainState:
        """The saved state of ``run_dir`` (its config must match, its curve and records be
        its own: :func:`resume_files`), or ``state`` if none."""
        if not os.path.exists(os.path.join(self.run_dir, runs.STATE)):
            return state
        meta, arrays = runs.read_state(self.run_dir)
        bad = resume_differences(meta["config"], self.config)
        if bad:
            raise InputError(f"cannot resume from {self.run_dir!r}: its config differs in "
                             + "; ".join(f"{k} (the run's {_brief(a)}, now {_brief(b)})"
                                         for k, a, b in bad))
        where = f"cannot resume from {self.run_dir!r}"
        params, opt_state = runs.restore_state(arrays, params_of(state, self.spec),
                                               state.opt_state, where)
        start = int(meta["step"])
        if start > self.cfg.steps:
            raise InputError(f"{where}: it has done {start} steps, more than steps="
                             f"{self.cfg.steps}; give steps >= {start}")
        self.log.restore(self.run_dir, meta)
        lost = [s for s in self.cfg.record_at if s < start and s not in self.log.record_steps]
        if lost:
            raise InputError(f"{where}: record_at asks for step(s) {', '.join(map(str, lost))} "
                             f"before its saved step {start}, which it did not record (those "
                             f"parameters are gone); record at steps from {start} on")
        return TrainState(flatten(params, self.dt), jax.tree_util.tree_map(
            jnp.asarray, opt_state), start)

    def measure(self, state: TrainState):
        """Evaluate and record where due at ``state.step`` and not done yet (a resumed run's
        first step was measured before it was saved, as its schedule then asked); save the
        run if anything new."""
        s, log = state.step, self.log
        due_eval = s in self.evals_at and s not in log.evals["eval_step"]
        due_record = s in self.cfg.record_at and s not in log.record_steps
        if due_eval:
            res = evaluate(state, self.eval_batch, spec=self.spec, stack=self.stack,
                           kind=self.task.kind)
            log.evals["eval_step"].append(s)
            for k, v in res.items():
                log.evals[k].append(v)
            self._show(res)
        if due_record:
            xs = self.eval_batch[0][:self.cfg.record_batch]
            got = record(self.fns, self.stack, params_of(state, self.spec)["stack"], xs, s,
                         self.config)
            for name, r in got.items():
                log.records[name].append(r)
                if self.run_dir is not None:
                    fname = runs.record_file(len(log.index))
                    r.save(os.path.join(self.run_dir, fname))
                    log.index.append([name, s, fname])
            log.record_steps.append(s)
        if (due_eval or due_record) and self.run_dir is not None:
            self.save(state)

    def save(self, state: TrainState):
        """``curve.npz`` then ``state.npz`` (written last, so it describes complete files; it
        records the curve's :func:`curve_digest`)."""
        curve = self.log.curve_result(self.config)
        curve.save(os.path.join(self.run_dir, runs.CURVE), whole=True)
        runs.save_state(self.run_dir, state.step, params_of(state, self.spec), state.opt_state,
                        curve.config, self.stack, self.log.index,
                        curve=curve_digest(curve.arrays))

    def advance(self, state: TrainState, length: int) -> tuple[TrainState, int]:
        """One update at the curriculum's length for this step (the g-LSTM's time parameters
        rescaled where the length changes); returns ``(state, length)``."""
        s = state.step
        n = length_at(s, self.cfg.curriculum, self.task.steps)
        if n != length and rescales_time(self.stack):
            params = rescale_time_gate(self.stack, params_of(state, self.spec), n / length)
            state = state._replace(theta=flatten(params, self.dt))
        if n not in self.stage_tasks:
            self.stage_tasks[n] = _tasks.resize(self.task, n)
        batch = self.stage_tasks[n].sample_fn(jax.random.fold_in(self.k_data, s),
                                              self.cfg.batch, self.dt)
        state, loss, metric = step(state, batch, self.cfg, spec=self.spec, stack=self.stack,
                                   kind=self.task.kind)
        for k, v in (("step", s), ("loss", loss), ("metric", metric), ("seq_len", n)):
            self.log.curve[k].append(v)
        if self.bar is not None:
            self.bar.update(1)
        return state, n

    def _show(self, res: dict):
        if self.bar is not None:
            shown = {"eval_loss": f"{float(res['eval_loss']):.4g}"}
            if self.task.kind == "classification":
                shown[self.task.metric] = f"{float(res['eval_metric']):.4g}"
            self.bar.set_postfix(shown)

    def loop(self, state: TrainState, progress: bool) -> TrainState:
        """From ``state.step`` to ``cfg.steps``: measure, then update."""
        start, steps = state.step, self.cfg.steps
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=steps, initial=start,
                            desc=f"{cells_label(self.stack)} on {self.task.name}")
        length = length_at(max(start - 1, 0), self.cfg.curriculum, self.task.steps)
        try:
            while True:
                self.measure(state)
                if state.step >= steps:
                    return state
                state, length = self.advance(state, length)
        finally:
            if self.bar is not None:
                self.bar.close()


def train(stack: Stack, task, *, steps: int = 500, batch: int = 32, lr: float = 1e-3,
          clip: float | None = 1.0, seed: int = 0, dtype: str = "float32", params=None,
          eval_task=None, eval_every: int | None = None, eval_batch: int = 256,
          record_at=(), record: Mapping[str, Callable] | None = None,
          record_batch: int | None = None, budget: float = 0.0, curriculum=None,
          run_dir=None, resume: bool = False, progress: bool = True) -> History:
    """Train ``stack`` and a linear readout on ``task`` with Adam; record measurements.

    Args:
      stack: a :class:`gradflow.Stack` whose ``input_size`` is the task's.
      task: a :class:`gradflow.tasks.Task` or a task name (default options).
      steps: number of updates.
      batch: training batch size (a fresh batch every step).
      lr, clip: Adam's learning rate; the global-norm gradient clip (None: no clipping).
      seed: the stack's parameters, the training batches and the evaluation batch all derive
        from it (see the module docstring for the keys).
      dtype: ``"float32"`` or ``"float64"``.
      params: start from these (``{"stack", "head"}``, or stack params with a fresh head);
        the run's config records their :func:`fingerprint` as ``initial_params``.
      eval_task: the task evaluated (default ``task``; e.g. the test split of ``digits``).
      eval_every: evaluate every this many steps (default ``max(1, steps // 10)``); also at
        step 0 and at ``steps``, on one fixed batch of ``eval_batch`` sequences of full length.
      record_at: steps (``0..steps``, updates done) at which to call ``record``.
      record: ``{name: fn(stack, stack_params, xs) -> Result}``, e.g.
        ``lambda s, p, x: gradflow.gates.saturation(s, p, x)``; called outside jit on the first
        ``record_batch`` (default all; at most ``eval_batch``) sequences of the evaluation
        batch. (Not
        :func:`gradflow.experiments.training_runs`'s ``record``, a tuple of names measured at
        the first and the last step.)
      budget: ``lambda`` of the budget loss ``lambda * mean(k)`` over every time gate ``k`` of
        the stack; needs a cell with a time gate (``g_lstm``, ``phased_lstm``).
      curriculum: ``[(until_step, seq_len), ...]``: train on the task resized to ``seq_len``
        (:func:`gradflow.tasks.resize`) while ``step < until_step``, on its own length after the
        last stage. When the length changes from ``T_old`` to ``T_new`` the cell's time
        parameters are rescaled by ``T_new / T_old`` (:attr:`gradflow.cells.Cell.rescale_time`:
        g-LSTM's ``mu`` and ``sigma``; build the stack with the first stage's length as the
        cell's ``steps`` option). Evaluation always uses the full length.
      run_dir: a folder (created if missing) where, after every evaluation and record, the
        learning curve so far, each recorded result, and the params with the optimiser state
        and the stack's config are written (``curve.npz``, ``record-NNNNN.npz``,
        ``state.npz``; see :mod:`gradflow.runs`; a run that does not resume first deletes
        those files). ``gradflow.results.load`` reads ``curve.npz`` and the records,
        :func:`gradflow.runs.load_params` the trained stack.
      resume: continue from ``run_dir`` if it holds a state: params, optimiser state, curve
        and records are restored and training goes on from the saved step to ``steps``; the
        configuration must match (except ``steps`` and ``eval_every``), and the curve and
        records must be the ones saved with the state (:func:`resume_files`).
      progress: show a tqdm progress bar (on stderr); False prints nothing.
    Returns:
      :class:`History`.
    Raises:
      gradflow.errors.InputError: a bad option (a ValueError/TypeError), before any training;
        a resume from a run of another configuration, or from files not saved together.
    """
    with user_input():
        task = as_task(task, "task")
        eval_task = task if eval_task is None else as_task(eval_task, "eval_task")
        cfg = TrainConfig(steps=steps, batch=batch, lr=lr, clip=clip, seed=seed, dtype=dtype,
                          eval_every=eval_every, eval_batch=eval_batch, record_at=record_at,
                          record_batch=record_batch, budget=budget, curriculum=curriculum)
        record = check_run(stack, task, eval_task, cfg, record)
        check_memory(stack, task, eval_task, cfg)
        if resume and run_dir is None:
            raise ValueError("resume=True needs run_dir, the checkpoint directory to resume "
                             "from")
        if run_dir is not None:  # made (or refused) before anything is computed
            runs.made_folder(run_dir)
    state, spec = init_state(stack, task, cfg, params)
    run = _Run(stack, task, eval_task, cfg, record, run_dir, spec,
               None if params is None else fingerprint(state.theta))
    if run_dir is not None:
        if resume:
            state = run.resume(state)
        else:
            runs.clear(run_dir)
    state = run.loop(state, progress)
    return run.history(state)


__all__ = ["History", "TrainConfig", "TrainState", "train", "init_state", "step", "evaluate",
           "resume_differences", "resume_files", "curve_digest",
           "record", "params_of", "keys", "readout", "init_head", "eval_batch_of", "as_task",
           "check_run", "update_theta", "evaluate_theta", "flatten", "unflatten_host",
           "length_at", "rescale_time_gate", "task_loss", "time_gate", "cells_label",
           "rescales_time", "run_eval_batch", "fingerprint"]
