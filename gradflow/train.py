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

>>> stack = gradflow.Stack("lstm", layers=2, input_size=2, hidden_size=32)
>>> hist = train(stack, tasks.make("adding", steps=20), steps=300, lr=1e-2, progress=False)
>>> hist.curve.loss.shape, hist.curve.eval_loss[-1] < hist.curve.eval_loss[0]
((300,), True)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import tasks as _tasks
from gradflow.gates import TIME_GATED
from gradflow.problem import dtype_of
from gradflow.results import Result, make_result
from gradflow.stack import Stack

_STATE = "state.npz"
_CURVE = "curve.npz"
_META = "__meta__"
# Config entries a resumed run may change: the total length, and the schedules derived from it.
_RESUMABLE = ("train_steps", "eval_every")


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
        return (f"History({self.stack.cell.name} on {self.task.name}: {n} steps{end}; "
                f"records {', '.join(self.records) or '(none)'})")


def readout(head: dict, h):
    """``h: (B, T, H) -> (B, T, K)``: ``h @ head["W"] + head["b"]``."""
    return h @ head["W"] + head["b"]


def init_head(hidden_size: int, output_size: int, dtype) -> dict:
    """``{"W": zeros (H, K), "b": zeros (K,)}``.

    A zero readout starts every output at 0, so the loss at init is known in closed form
    (``mean(y^2)`` for regression, ``log K`` for classification) and the first gradients that
    reach the stack are not shaped by a random readout; the head's own gradient
    ``h^T dL/dout`` is nonzero, so training moves it at once.
    """
    return {"W": jnp.zeros((hidden_size, output_size), dtype),
            "b": jnp.zeros((output_size,), dtype)}


def _nonneg_int(name, value) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from None
    if v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return v


def _positive_int(name, value) -> int:
    v = _nonneg_int(name, value)
    if v < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return v


def _check_curriculum(curriculum, task: _tasks.Task):
    """Validate ``[(until_step, seq_len), ...]``; return it as a tuple of int pairs."""
    if curriculum is None:
        return None
    try:
        stages = tuple((_positive_int("curriculum until_step", u), _positive_int(
            "curriculum seq_len", n)) for u, n in curriculum)
    except (TypeError, ValueError) as e:
        raise ValueError(f"curriculum must be a list of (until_step, seq_len) pairs of positive "
                         f"integers: {e}") from None
    untils = [u for u, _ in stages]
    if any(b <= a for a, b in zip(untils, untils[1:])):
        raise ValueError(f"curriculum until_steps must increase, got {untils}")
    for _, n in stages:
        _tasks.resize(task, n)  # raises for fixed-length tasks and impossible lengths
    return stages


def _length_at(step: int, stages, full: int) -> int:
    """The training sequence length at ``step``: the first stage with ``step < until``."""
    for until, n in stages or ():
        if step < until:
            return n
    return full


def _rescale_time_gate(stack: Stack, params: dict, ratio: float) -> dict:
    """g-LSTM's ``mu, sigma`` multiplied by ``ratio`` in every layer (other cells unchanged)."""
    if stack.cell.name != "g_lstm":
        return params
    layers = [{**p, "time": {k: v * ratio for k, v in p["time"].items()}}
              for p in params["stack"]["layers"]]
    return {**params, "stack": {**params["stack"], "layers": layers}}


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


def _flatten(params, dtype):
    """All leaves, raveled and concatenated (in NumPy, on the host): ``(n,)``."""
    return jnp.asarray(np.concatenate([np.ravel(np.asarray(a, dtype))
                                       for a in jax.tree_util.tree_leaves(params)]))


def _unflatten(theta, spec):
    """The params pytree from ``theta (n,)`` and :func:`_spec`'s layout."""
    treedef, shapes = spec
    cuts = np.cumsum([math.prod(sh) for sh in shapes])[:-1]
    parts = jnp.split(theta, cuts) if len(shapes) > 1 else [theta]
    return jax.tree_util.tree_unflatten(treedef, [p.reshape(sh) for p, sh in zip(parts, shapes)])


def _unflatten_host(theta, spec):
    """:func:`_unflatten` in NumPy on the host (nothing to compile), leaves as jax arrays."""
    flat = np.asarray(theta)
    treedef, shapes = spec
    cuts = np.cumsum([math.prod(sh) for sh in shapes])[:-1]
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(p.reshape(sh)) for p, sh in zip(np.split(flat, cuts), shapes)])


def _optimizer(clip):
    """``clip_by_global_norm(clip)`` then Adam's scaling; the step ``-lr * update`` is applied
    in :func:`_update`. ``clip`` may be traced (``inf`` for no clipping), so neither it nor
    ``lr`` is compiled in."""
    import optax

    return optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam())


def _timed(stack: Stack) -> bool:
    """Whether the stack's cell has a time gate ``k`` (STAR's gate is also named ``k``: it is
    an ordinary input-dependent gate, not a time gate)."""
    return stack.cell.name in TIME_GATED


def _forward(params, xs, stack: Stack, gates: bool):
    """``(out (B, T, K), k (L, B, T, H) or None)``."""
    o = stack.apply(params["stack"], xs, gates=gates)
    return readout(params["head"], o.top), o.gates.get("k")


@functools.partial(jax.jit, static_argnames=("spec", "stack", "kind"))
def _update(theta, opt_state, xs, ys, mask, lr, clip, budget, *, spec, stack, kind):
    """One Adam step on the batch ``(xs, ys, mask)``; returns
    ``(theta, opt_state, task loss, metric)``."""
    timed = _timed(stack)
    loss_f, metric_f = _tasks.loss_fn(kind), _tasks.metric_fn(kind)

    def objective(th):
        out, k = _forward(_unflatten(th, spec), xs, stack, timed)
        loss = loss_f(out, ys, mask)
        total = loss + budget * jnp.mean(k) if timed else loss
        return total, (loss, metric_f(out, ys, mask))

    (_, (loss, metric)), g = jax.value_and_grad(objective, has_aux=True)(theta)
    u, opt_state = _optimizer(clip).update(g, opt_state)
    return theta - lr * u, opt_state, loss, metric


@functools.partial(jax.jit, static_argnames=("spec", "stack", "kind"))
def _evaluate(theta, xs, ys, mask, *, spec, stack, kind):
    """Loss and metric on a fixed batch; for time-gated cells also ``mean(k)`` and the
    fraction of updates ``mean(k > 1e-3)``."""
    timed = _timed(stack)
    out, k = _forward(_unflatten(theta, spec), xs, stack, timed)
    res = {"eval_loss": _tasks.loss_fn(kind)(out, ys, mask),
           "eval_metric": _tasks.metric_fn(kind)(out, ys, mask)}
    if timed:
        res["eval_mean_k"] = jnp.mean(k)
        res["eval_updates"] = jnp.mean((k > 1e-3).astype(k.dtype))
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
# Checkpoints: <dir>/curve.npz (the learning curve so far), <dir>/record-NNNNN.npz (one per
# recorded measurement) and <dir>/state.npz (params, optimiser state and an index), written last
# so that a state file always describes complete files.


def _write_state(directory, step, leaves, config, index):
    meta = json.dumps({"step": step, "config": config, "records": index})
    tmp = os.path.join(directory, "state.tmp.npz")
    np.savez(tmp, **{_META: np.array(meta)},
             **{f"leaf{i:05d}": np.asarray(a) for i, a in enumerate(leaves)})
    os.replace(tmp, os.path.join(directory, _STATE))


def _read_state(directory):
    with np.load(os.path.join(directory, _STATE), allow_pickle=False) as f:
        meta = json.loads(str(f[_META]))
        leaves = [f[k] for k in sorted(k for k in f.files if k != _META)]
    return meta, leaves


def _config_mismatch(old: dict, new: dict) -> list:
    keys = (set(old) | set(new)) - set(_RESUMABLE)
    return sorted(k for k in keys if old.get(k) != new.get(k))


def train(stack: Stack, task, *, steps: int = 500, batch: int = 32, lr: float = 1e-3,
          clip: float | None = 1.0, seed: int = 0, dtype: str = "float32", params=None,
          eval_task=None, eval_every: int | None = None, eval_batch: int = 256,
          record_at=(), record: Mapping[str, Callable] | None = None,
          record_batch: int | None = None, budget: float = 0.0, curriculum=None,
          checkpoint=None, resume: bool = False, progress: bool = True) -> History:
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
      params: start from these (``{"stack", "head"}``, or stack params with a fresh head).
      eval_task: the task evaluated (default ``task``; e.g. the test split of ``digits``).
      eval_every: evaluate every this many steps (default ``max(1, steps // 10)``); also at
        step 0 and at ``steps``, on one fixed batch of ``eval_batch`` sequences of full length.
      record_at: steps (``0..steps``, updates done) at which to call ``record``.
      record: ``{name: fn(stack, stack_params, xs) -> Result}``, e.g.
        ``lambda s, p, x: gradflow.gates.saturation(s, p, x)``; called outside jit on the first
        ``record_batch`` (default all) sequences of the evaluation batch.
      budget: ``lambda`` of the budget loss ``lambda * mean(k)`` over every time gate ``k`` of
        the stack; needs a cell with a time gate (``g_lstm``, ``phased_lstm``).
      curriculum: ``[(until_step, seq_len), ...]``: train on the task resized to ``seq_len``
        (:func:`gradflow.tasks.resize`) while ``step < until_step``, on its own length after the
        last stage. When the length changes from ``T_old`` to ``T_new`` the g-LSTM's ``mu`` and
        ``sigma`` are multiplied by ``T_new / T_old`` (build the stack with the first stage's
        length as the cell's ``steps`` option). Evaluation always uses the full length.
      checkpoint: a directory (created if missing) where, after every evaluation and record,
        the learning curve so far, each recorded result, and the params with the optimiser
        state are written (``curve.npz``, ``record-NNNNN.npz``, ``state.npz``; a run that
        does not resume first deletes those files). ``gradflow.results.load`` reads
        ``curve.npz`` and the records.
      resume: continue from ``checkpoint`` if it holds a state: params, optimiser state, curve
        and records are restored and training goes on from the saved step to ``steps``; the
        configuration must match (except ``steps`` and ``eval_every``).
      progress: show a tqdm progress bar (on stderr); False prints nothing.
    Returns:
      :class:`History`.
    """
    if isinstance(task, str):
        task = _tasks.make(task)
    if not isinstance(stack, Stack):
        raise TypeError(f"stack must be a gradflow.Stack, got {type(stack).__name__}")
    for name, t in (("task", task), ("eval_task", eval_task)):
        if t is not None and not isinstance(t, _tasks.Task):
            raise TypeError(f"{name} must be a gradflow.tasks.Task or a task name, got "
                            f"{type(t).__name__}")
    eval_task = task if eval_task is None else eval_task
    if task.input_size != stack.input_size:
        raise ValueError(f"task {task.name!r} has {task.input_size} input features but the stack "
                         f"reads {stack.input_size}: build it with input_size={task.input_size}")
    if (eval_task.input_size, eval_task.output_size, eval_task.kind) != (
            task.input_size, task.output_size, task.kind):
        raise ValueError("eval_task must have the training task's input size, output size and "
                         "kind")
    steps = _nonneg_int("steps", steps)
    batch = _positive_int("batch", batch)
    eval_batch = _positive_int("eval_batch", eval_batch)
    eval_every = max(1, steps // 10) if eval_every is None else _positive_int("eval_every",
                                                                               eval_every)
    record_batch = eval_batch if record_batch is None else _positive_int("record_batch",
                                                                         record_batch)
    dt = dtype_of(dtype)
    lr = float(lr)
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if clip is not None and not float(clip) > 0:
        raise ValueError(f"clip must be positive or None, got {clip}")
    budget = float(budget)
    if not budget >= 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    timed = _timed(stack)
    if budget and not timed:
        raise ValueError(f"budget needs a cell with a time gate k ({', '.join(TIME_GATED)}); "
                         f"{stack.cell.name!r} has none")
    record = dict(record or {})
    for name, fn in record.items():
        if not isinstance(name, str) or not callable(fn):
            raise TypeError("record must map names (str) to callables fn(stack, params, xs)")
    record_at = sorted({_nonneg_int("record_at step", s) for s in record_at})
    if record_at and record_at[-1] > steps:
        raise ValueError(f"record_at steps must lie in 0..{steps}, got {record_at[-1]}")
    if record_at and not record:
        raise ValueError("record_at given without record functions")
    stages = _check_curriculum(curriculum, task)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint directory")

    config = {**stack.config, "task": task.config, "eval_task": eval_task.config,
              "metric": task.metric, "train_steps": steps, "batch": batch, "lr": lr,
              "clip": None if clip is None else float(clip), "seed": int(seed),
              "dtype": str(dt), "budget": budget,
              "curriculum": None if stages is None else [list(s) for s in stages],
              "eval_every": eval_every, "eval_batch": eval_batch, "record_batch": record_batch}

    # --- parameters, optimiser, keys ------------------------------------------------------
    k_init, k_data, k_eval = jax.random.split(jax.random.key(seed), 3)
    fresh = {"stack": stack.init(k_init, dt),
             "head": init_head(stack.hidden_size, task.output_size, dt)}
    if params is None:
        params = fresh
    else:
        if "stack" not in params:
            params = {"stack": params, "head": fresh["head"]}
        _check_params(params, fresh)
    spec = _spec(fresh)
    theta = _flatten(params, dt)
    opt_state = _optimizer(math.inf).init(theta)
    ev_xs, ev_ys, ev_mask = eval_batch_of(eval_task, k_eval, eval_batch, batch, dt)
    lr_arr, budget_arr = jnp.asarray(lr, dt), jnp.asarray(budget, dt)
    clip_arr = jnp.asarray(math.inf if clip is None else float(clip), dt)

    # --- history, possibly restored -------------------------------------------------------
    curve = {k: [] for k in ("step", "loss", "metric", "seq_len")}
    evals = {k: [] for k in ("eval_step", "eval_loss", "eval_metric")
             + (("eval_mean_k", "eval_updates") if timed else ())}
    records = {name: [] for name in record}
    record_steps = []
    index = []  # [[name, step, file], ...] of the records written to the checkpoint
    start = 0
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        os.makedirs(checkpoint, exist_ok=True)
        if not resume:
            for f in os.listdir(checkpoint):
                if f in (_STATE, _CURVE) or (f.startswith("record-") and f.endswith(".npz")):
                    os.remove(os.path.join(checkpoint, f))
    if resume and os.path.exists(os.path.join(checkpoint, _STATE)):
        meta, leaves = _read_state(checkpoint)
        bad = _config_mismatch(meta["config"], json.loads(json.dumps(
            make_result("training", {}, config).config)))
        if bad:
            raise ValueError(f"cannot resume from {checkpoint!r}: its config differs in "
                             f"{', '.join(bad)}")
        treedef = jax.tree_util.tree_structure((theta, opt_state))
        template = jax.tree_util.tree_leaves((theta, opt_state))
        if len(leaves) != len(template) or any(np.shape(a) != np.shape(b)
                                                for a, b in zip(leaves, template)):
            raise ValueError(f"cannot resume from {checkpoint!r}: its saved state does not match "
                             "this stack and optimiser")
        theta, opt_state = jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(a, b.dtype) for a, b in zip(leaves, template)])
        start = int(meta["step"])
        old = Result.load(os.path.join(checkpoint, _CURVE))
        for k in curve:
            curve[k] = list(old.arrays[k][:start])
        n_eval = int(np.searchsorted(old.arrays["eval_step"], start, side="right"))
        for k in evals:
            evals[k] = list(old.arrays[k][:n_eval])
        for name, s, fname in meta["records"]:
            if name in records and s <= start:
                records[name].append(Result.load(os.path.join(checkpoint, fname)))
                if s not in record_steps:
                    record_steps.append(s)
                index.append([name, s, fname])

    def history() -> History:
        arrays = {"step": np.asarray(curve["step"], np.int64),
                  "loss": np.asarray(jax.device_get(curve["loss"]), dt),
                  "metric": np.asarray(jax.device_get(curve["metric"]), dt),
                  "seq_len": np.asarray(curve["seq_len"], np.int64),
                  "eval_step": np.asarray(evals["eval_step"], np.int64),
                  **{k: np.asarray(jax.device_get(v), dt) for k, v in evals.items()
                     if k != "eval_step"}}
        return History(make_result("training", arrays, config, warn=False),
                       {k: tuple(v) for k, v in records.items()}, tuple(record_steps),
                       _unflatten_host(theta, spec), stack, task)

    def save(step: int):
        h = history()
        tmp = h.curve.save(os.path.join(checkpoint, "curve.tmp.npz"))
        os.replace(tmp, os.path.join(checkpoint, _CURVE))
        _write_state(checkpoint, step, jax.tree_util.tree_leaves((theta, opt_state)),
                     h.curve.config, index)
        return h

    if start > 0 and start >= steps:  # a finished run, resumed
        return history()

    # --- the loop -------------------------------------------------------------------------
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc=f"{stack.cell.name} on {task.name}")
    evals_at = set(range(0, steps + 1, eval_every)) | {steps}
    length = _length_at(max(start - 1, 0), stages, task.steps)
    stage_tasks = {}
    try:
        for s in range(start, steps + 1):
            done = s == start and start > 0  # the resumed checkpoint already holds step s
            wrote = False
            if s in evals_at and not done:
                res = jax.device_get(_evaluate(theta, ev_xs, ev_ys, ev_mask, spec=spec,
                                               stack=stack, kind=task.kind))
                evals["eval_step"].append(s)
                for k, v in res.items():
                    evals[k].append(v)
                wrote = True
                if bar is not None:
                    shown = {"eval_loss": f"{float(res['eval_loss']):.4g}"}
                    if task.kind == "classification":
                        shown[task.metric] = f"{float(res['eval_metric']):.4g}"
                    bar.set_postfix(shown)
            if s in record_at and not done:
                xs = ev_xs[:record_batch]
                stack_params = _unflatten_host(theta, spec)["stack"]
                for name, fn in record.items():
                    r = fn(stack, stack_params, xs)
                    if not isinstance(r, Result):
                        raise TypeError(f"record function {name!r} returned "
                                        f"{type(r).__name__}, not a gradflow Result")
                    r = make_result(r.kind, r.arrays, {**r.config, "train_step": s}, warn=False)
                    records[name].append(r)
                    if checkpoint is not None:
                        fname = f"record-{len(index):05d}.npz"
                        r.save(os.path.join(checkpoint, fname))
                        index.append([name, s, fname])
                record_steps.append(s)
                wrote = True
            if wrote and checkpoint is not None:
                save(s)
            if s == steps:
                break
            n = _length_at(s, stages, task.steps)
            if n != length:
                if stack.cell.name == "g_lstm":
                    theta = _flatten(_rescale_time_gate(
                        stack, _unflatten_host(theta, spec), n / length), dt)
                length = n
            if n not in stage_tasks:
                stage_tasks[n] = _tasks.resize(task, n)
            xs, ys, mask = stage_tasks[n].sample_fn(jax.random.fold_in(k_data, s), batch, dt)
            theta, opt_state, loss, metric = _update(
                theta, opt_state, xs, ys, mask, lr_arr, clip_arr, budget_arr, spec=spec,
                stack=stack, kind=task.kind)
            curve["step"].append(s)
            curve["loss"].append(loss)
            curve["metric"].append(metric)
            curve["seq_len"].append(n)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return history()


__all__ = ["History", "train", "readout", "init_head", "eval_batch_of"]
