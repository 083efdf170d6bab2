r"""One training configuration, several seeds, one compiled program.

:func:`train_seeds` trains the same stack on the same task once per seed, as
:func:`gradflow.train.train` would with ``seed=s`` for each ``s`` (the same keys: the stack's
init from ``k_init``, the batch of step ``t`` from ``fold_in(k_data, t)``, the fixed evaluation
batch from ``k_eval``, ``k_init, k_data, k_eval = split(key(s), 3)``), but with the seeds
stacked on a leading axis ``S`` and the updates between two measurements run as one
``jax.lax.scan`` over steps of the ``jax.vmap`` over seeds of :mod:`gradflow.train`'s own
update. The arithmetic per seed is :func:`gradflow.train.train`'s; only the order in which XLA
fuses it may differ, so curves agree to float rounding (tested). :func:`train_lr_seeds` adds a
learning-rate factor to the same vmapped axis: one row per ``(lr, seed)`` pair, ``lr`` a traced
per-row argument (a learning-rate sweep compiles once).

>>> import gradflow
>>> task = gradflow.tasks.make("adding", steps=5)
>>> stack = gradflow.Stack("lstm", layers=1, input_size=2, hidden_size=4)
>>> hists = train_seeds(stack, task, [0, 1], steps=4, batch=4, eval_batch=8)
>>> [h.curve.config["seed"] for h in hists], hists[0].curve.loss.shape
([0, 1], (4,))
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import checks
from gradflow import tasks as _tasks
from gradflow import train as _train
from gradflow.errors import user_input
from gradflow.results import make_result
from gradflow.xla import jit


seed_list = checks.seed_list  # (training's seeds are checked as measurements' are)


@functools.partial(jit, static_argnames=("count", "spec", "stack", "kind", "sample",
                                              "batch", "dtype"))
def _chunk(theta, opt_state, k_data, start, lr, clip, budget, *, count, spec, stack, kind,
           sample, batch, dtype):
    """``count`` updates from step ``start`` for every row (leading axis ``R`` of ``theta``,
    ``opt_state``, ``k_data`` and ``lr: (R,)``: one (learning rate, seed) pair per row): returns ``(theta, opt_state, loss (S, count),
    metric (S, count))``."""
    def one(theta, opt_state, k, lr):
        def body(carry, s):
            th, op = carry
            xs, ys, mask = sample(jax.random.fold_in(k, s), batch, dtype)
            th, op, loss, metric = _train.update_theta(th, op, xs, ys, mask, lr, clip, budget,
                                                  spec=spec, stack=stack, kind=kind)
            return (th, op), (loss, metric)

        (th, op), (loss, metric) = jax.lax.scan(body, (theta, opt_state),
                                                start + jnp.arange(count))
        return th, op, loss, metric

    return jax.vmap(one)(theta, opt_state, k_data, lr)


@functools.partial(jit, static_argnames=("spec", "stack", "kind"))
def _evaluate_all(theta, xs, ys, mask, *, spec, stack, kind):
    """:func:`gradflow.train.evaluate_theta` of every seed on its own evaluation batch."""
    return jax.vmap(lambda th, x, y, m: _train.evaluate_theta(th, x, y, m, spec=spec, stack=stack,
                                                         kind=kind))(theta, xs, ys, mask)


def _boundaries(cfg) -> list[int]:
    """Steps where the scan stops: evaluations, records, curriculum stage changes, the end."""
    stages = {u for u, _ in cfg.curriculum or () if u < cfg.steps}
    return sorted(cfg.eval_steps | set(cfg.record_at) | stages | {0})


def _start(stack, task, cfgs, seeds):
    """Every seed's initial state, stacked on a leading axis: ``(theta, opt_state, spec,
    data keys, evaluation batch (xs, ys, mask), (lr, clip, budget))``."""
    cfg, dt = cfgs[0], jnp.dtype(cfgs[0].dtype)
    states = []
    for c in cfgs:
        state, spec = _train.init_state(stack, task, c)
        states.append(state)
    theta = jnp.stack([s.theta for s in states])
    opt_state = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[s.opt_state for s in states])
    k_data = jnp.stack([_train.keys(s)[1] for s in seeds])
    evals = [_train.eval_batch_of(task, _train.keys(s)[2], cfg.eval_batch, cfg.batch, dt)
             for s in seeds]
    batch = tuple(jnp.stack(parts) for parts in zip(*evals))
    consts = (jnp.asarray([c.lr for c in cfgs], dt), jnp.asarray(np.inf if cfg.clip is None else cfg.clip, dt),
              jnp.asarray(cfg.budget, dt))
    return theta, opt_state, spec, k_data, batch, consts


def _histories(cfgs, stack, task, curve, ev, recs, record_steps, theta, spec, dt) -> list:
    """One :class:`gradflow.train.History` per seed from the stacked curves and records."""
    cfg = cfgs[0]
    hists = []
    eval_step = np.asarray(ev.pop("eval_step"), np.int64)
    for j, c in enumerate(cfgs):
        arrays = {"step": np.arange(cfg.steps, dtype=np.int64),
                  **{k: (np.concatenate([v[j] for v in vs]) if vs else
                         np.zeros(0, np.int64 if k == "seq_len" else dt))
                     for k, vs in curve.items()},
                  "eval_step": eval_step,
                  **{k: np.asarray([v[j] for v in vs], dt) for k, vs in ev.items()}}
        arrays["loss"] = arrays["loss"].astype(dt)
        arrays["metric"] = arrays["metric"].astype(dt)
        config = c.describe(stack, task, task)
        hists.append(_train.History(
            make_result("training", arrays, config, who=f"train_seeds (seed {c.seed})"),
            {k: tuple(v) for k, v in recs[j].items()}, tuple(record_steps),
            _train.unflatten_host(theta[j], spec), stack, task))
    return hists


def train_seeds(stack, task, seeds, *, steps: int = 500, batch: int = 32, lr: float = 1e-3,
                clip: float | None = 1.0, dtype: str = "float32", eval_every: int | None = None,
                eval_batch: int = 256, record_at=(), record=None, record_batch: int | None = None,
                budget: float = 0.0, curriculum=None, progress: bool = False) -> list:
    """Train ``stack`` on ``task`` once per seed; ``[History per seed]`` in the order of
    ``seeds``, each as :func:`gradflow.train.train` returns it for that seed (same options, same
    meaning; ``record`` functions are called per seed on its trained params and the first
    ``record_batch`` sequences of its evaluation batch).

    Cost: one compile per distinct chunk length (the steps between two evaluations) and
    curriculum stage; the seeds share each kernel launch.

    Raises:
      gradflow.errors.InputError: a bad option or seed list, before any training.
    """
    return train_lr_seeds(stack, task, [lr], seeds, steps=steps, batch=batch, clip=clip,
                          dtype=dtype, eval_every=eval_every, eval_batch=eval_batch,
                          record_at=record_at, record=record, record_batch=record_batch,
                          budget=budget, curriculum=curriculum, progress=progress)[0]


def lr_list(lrs) -> list[float]:
    """``lrs`` as a non-empty list of distinct learning rates ``>= 0``."""
    if isinstance(lrs, (str, int, float, np.number)):
        raise TypeError(f"lrs must be a list of learning rates, got {lrs!r}")
    out = [float(x) for x in lrs]
    if not out:
        raise ValueError("lrs is empty; give at least one learning rate")
    bad = [x for x in out if not x >= 0]
    if bad:
        raise ValueError(f"learning rates must be >= 0, got {bad[0]}")
    if len(set(out)) != len(out):
        raise ValueError(f"lrs repeat: {out}")
    return out


def train_lr_seeds(stack, task, lrs, seeds, *, steps: int = 500, batch: int = 32,
                   clip: float | None = 1.0, dtype: str = "float32",
                   eval_every: int | None = None, eval_batch: int = 256, record_at=(),
                   record=None, record_batch: int | None = None, budget: float = 0.0,
                   curriculum=None, progress: bool = False) -> list:
    """:func:`train_seeds` at several learning rates, every ``(lr, seed)`` pair one row of the
    same vmapped program (``R = len(lrs) * len(seeds)`` rows; the learning rate is a traced
    per-row argument, so no recompile per rate). Returns ``[[History per seed] per lr]``; the
    run at ``(lr, s)`` is :func:`gradflow.train.train`'s with ``lr=lr, seed=s`` (the same init,
    batches and evaluation batch for every rate of one seed: a paired comparison).

    >>> import gradflow
    >>> task = gradflow.tasks.make("adding", steps=5)
    >>> stack = gradflow.Stack("lstm", layers=1, input_size=2, hidden_size=4)
    >>> runs = train_lr_seeds(stack, task, [1e-3, 1e-2], [0, 1], steps=4, batch=4, eval_batch=8)
    >>> [[h.curve.config["lr"] for h in per_lr] for per_lr in runs]
    [[0.001, 0.001], [0.01, 0.01]]

    Raises:
      gradflow.errors.InputError: a bad option, seed or learning-rate list, before training.
    """
    with user_input():
        seeds = seed_list(seeds)
        lrs = lr_list(lrs)
        task = _train.as_task(task, "task")
        rows = [(r, s) for r in lrs for s in seeds]
        cfgs = [_train.TrainConfig(steps=steps, batch=batch, lr=r, clip=clip, seed=s,
                                   dtype=dtype, eval_every=eval_every, eval_batch=eval_batch,
                                   record_at=record_at, record_batch=record_batch,
                                   budget=budget, curriculum=curriculum) for r, s in rows]
        record = _train.check_run(stack, task, task, cfgs[0], record)
        _train.check_memory(stack, task, task, cfgs[0], runs=len(rows))
    hists = _train_rows(stack, task, cfgs, [s for _, s in rows], record, progress)
    n = len(seeds)
    return [hists[i * n:(i + 1) * n] for i in range(len(lrs))]


def _train_rows(stack, task, cfgs, seeds, record, progress) -> list:
    """One History per row ``(cfgs[j], seeds[j])``: the rows differ only in seed and lr."""
    cfg, dt = cfgs[0], jnp.dtype(cfgs[0].dtype)
    theta, opt_state, spec, k_data, (eval_xs, eval_ys, eval_mask), consts = _start(
        stack, task, cfgs, seeds)
    n_seeds = len(seeds)
    curve = {"loss": [], "metric": [], "seq_len": []}
    ev = {}
    recs = [{name: [] for name in record} for _ in seeds]
    record_steps = []
    stage_tasks = {}
    bounds, evals = _boundaries(cfg), cfg.eval_steps
    length = _train.length_at(0, cfg.curriculum, task.steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc=f"{_train.cells_label(stack)} on {task.name}, {n_seeds} runs")
    try:
        for i, at in enumerate(bounds):
            if at in evals:
                res = jax.device_get(_evaluate_all(theta, eval_xs, eval_ys, eval_mask,
                                                   spec=spec, stack=stack, kind=task.kind))
                ev.setdefault("eval_step", []).append(at)
                for k, v in res.items():
                    ev.setdefault(k, []).append(np.asarray(v))
            if at in cfg.record_at:
                record_steps.append(at)
                for j in range(n_seeds):
                    params = _train.unflatten_host(theta[j], spec)["stack"]
                    got = _train.record(record, stack, params,
                                        eval_xs[j][:cfg.record_batch], at,
                                        cfgs[j].describe(stack, task, task))
                    for name, r in got.items():
                        recs[j][name].append(r)
            if at >= cfg.steps:
                break
            count = bounds[i + 1] - at
            n = _train.length_at(at, cfg.curriculum, task.steps)
            if n != length and _train.rescales_time(stack):
                theta = jnp.stack([_train.flatten(_train.rescale_time_gate(
                    stack, _train.unflatten_host(theta[j], spec), n / length), dt)
                    for j in range(n_seeds)])
            length = n
            if n not in stage_tasks:
                stage_tasks[n] = _tasks.resize(task, n)
            theta, opt_state, loss, metric = _chunk(
                theta, opt_state, k_data, jnp.asarray(at, jnp.int32), *consts, count=count,
                spec=spec, stack=stack, kind=task.kind, sample=stage_tasks[n].sample_fn,
                batch=cfg.batch, dtype=dt)
            curve["loss"].append(np.asarray(loss))
            curve["metric"].append(np.asarray(metric))
            curve["seq_len"].append(np.full((n_seeds, count), n, np.int64))
            if bar is not None:
                bar.update(count)
    finally:
        if bar is not None:
            bar.close()
    return _histories(cfgs, stack, task, curve, ev, recs, record_steps, theta, spec, dt)


def stacked(hists) -> "_train.History":
    """One History whose every curve and record array is the seeds' arrays stacked on a new
    leading axis ``S`` (``loss: (S, steps)``, a map's ``values: (S, L, T)``); the curve's config
    is the first seed's with ``"seed"`` replaced by ``"seeds"`` (the list), as is each record's
    (its ``training`` too); ``params`` are the first seed's."""
    hists = list(hists)
    if not hists:
        raise ValueError("stacked needs at least one History")
    first = hists[0]
    seeds = [h.curve.config["seed"] for h in hists]

    def of_seeds(config: dict) -> dict:  # "seed" -> "seeds", also in a record's "training"
        out = {k: v for k, v in config.items() if k != "seed"}
        if "seed" in config:
            out["seeds"] = seeds
        if isinstance(config.get("training"), dict):
            out["training"] = of_seeds(config["training"])
        return out

    curve = make_result("training", {k: np.stack([h.curve.arrays[k] for h in hists])
                                     for k in first.curve.arrays},
                        of_seeds(first.curve.config), warn=False)
    def joined(rs):  # the seeds' arrays stacked; their underflow counts (the measurement's
        # own: which entries it expects positive) added
        r = make_result(rs[0].kind, {k: np.stack([r.arrays[k] for r in rs])
                                     for k in rs[0].arrays}, of_seeds(rs[0].config), warn=False)
        return dataclasses.replace(r, underflow={k: sum(x.underflow.get(k, 0) for x in rs)
                                                 for k in rs[0].underflow})

    records = {name: tuple(joined(rs) for rs in zip(*(h.records[name] for h in hists)))
               for name in first.records}
    return _train.History(curve, records, first.record_steps, first.params, first.stack,
                          first.task)


__all__ = ["lr_list", "seed_list", "stacked", "train_lr_seeds", "train_seeds"]
