r"""Training claims under conditions: where does each paper's claim about training hold?

The training counterpart of :mod:`gradflow.atlas` (whose claims read one gradient map per seed).
A *training atlas* trains several runs (``[label, cell, cell options, training options]``, as
:func:`gradflow.experiments.training_runs`) on one task over a grid of conditions

* ``lr``: Adam's learning rate, every value for **every** run (a small sweep per model, so each
  baseline gets its best rate: the *fair* setting), and
* one difficulty factor (``config["factor"]``): a task option (copy ``lag``, adding ``steps``)
  for every run, or a training option (g-LSTM ``budget`` :math:`\lambda`) for the runs that
  name it (the others do not depend on it and are trained once),

each for every seed. All ``(lr, seed)`` pairs of one run and factor value are one vmapped
program (:func:`gradflow.seeds.train_lr_seeds`), cached on disk as
``<cache_dir>/<key>.npz`` (``key`` a hash of everything that determines the run), so an
interrupted atlas resumes; an entry is reused only where this code trained it for that run
(:func:`gradflow.results.read_cached`).

A :class:`TrainingClaim` is a named predicate on **one seed's** runs of one condition (all
runs at the same ``lr`` and factor value, the same seed: the same init draws, batches and
evaluation batch): ``predicate({label: run}) -> (statistic, holds)``, where a run is a dict
``{"step": (E,), "metric": (E,), "loss": (E,), "updates": (E,) (time-gated cells),
"saturated": {gate: share} (when gates are recorded)}`` of evaluations every ``eval_every``
steps. :func:`evaluate` reports, per condition, the statistic and whether it holds per seed
and the fraction of seeds where it holds; and the *fair* verdict: per factor value, each run
at its own best learning rate (lowest median final MSE over seeds, highest median final
accuracy), the predicate evaluated seed by seed on those runs.

>>> config = {"task": "adding", "task_options": {"steps": 4}, "layers": 1, "hidden": 4,
...           "steps": 2, "batch": 4, "eval_every": 1, "eval_batch": 8, "lrs": [1e-2, 1e-3],
...           "seeds": [0, 1], "factor": {"name": "steps", "where": "task", "values": [4]},
...           "runs": [["star", "star", {}]], "claims": ["deep_star_trains"]}
>>> data = training_atlas(config)
>>> data["claim/deep_star_trains/fraction"].shape, data["claim/deep_star_trains/fair_holds"].shape
((1, 2), (1, 2))
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from typing import Callable

import numpy as np

from gradflow import checks
from gradflow.registry import Registry

CACHE_VERSION = 1
#: The solved threshold of the adding task (MSE; a constant prediction scores 1/6).
ADDING_SOLVED = 0.01


# ---------------------------------------------------------------------------------------------
# Claims


@dataclasses.dataclass(frozen=True)
class TrainingClaim:
    """A named reading of one seed's training runs of one condition.

    Attributes:
      name, description: what the claim says (the description names the thresholds).
      labels: the run labels it reads (every one must be in the atlas's runs).
      predicate: ``{label: run dict} -> (statistic, holds)`` for one seed (see the module
        docstring for the run dict).
    """

    name: str
    description: str
    labels: tuple
    predicate: Callable

    def evaluate(self, runs: dict) -> tuple[float, bool]:
        s, ok = self.predicate({k: runs[k] for k in self.labels})
        return float(s), bool(ok)


def final(run) -> float:
    """The last evaluation's metric (MSE, or accuracy for classification)."""
    return float(run["metric"][-1])


def first_below(run, target: float = ADDING_SOLVED) -> float:
    """The first evaluation step with metric ``< target`` (inf if none)."""
    hit = np.flatnonzero(np.asarray(run["metric"]) < target)
    return float(run["step"][hit[0]]) if hit.size else float("inf")


def _earlier(refined: str, vanilla: str):
    """``refined`` gets below MSE 0.01 at an earlier evaluation than ``vanilla`` (or vanilla
    never does); statistic ``vanilla's step - refined's`` (a never counts as the last step +
    ``eval_every``)."""
    def predicate(runs):
        a, b = first_below(runs[refined]), first_below(runs[vanilla])
        never = 2 * runs[vanilla]["step"][-1] - runs[vanilla]["step"][-2]
        s = (never if np.isinf(b) else b) - (never if np.isinf(a) else a)
        return s, bool(np.isfinite(a) and a < b)
    return predicate


def _star_trains(runs):
    m = final(runs["star"])
    return m, m < ADDING_SOLVED


def _star_over_lstm(runs):
    s, lstm = final(runs["star"]), final(runs["lstm, forget bias 1"])
    return lstm / s, s < ADDING_SOLVED <= lstm


COPY_CHANCE = 1 / 8


def _binary_recall(runs):
    r = runs["UR-LSTM"]
    sat = float(r["saturated"]["g"])
    return sat, sat >= 0.5 and final(r) >= 2 * COPY_CHANCE


def _beats_baselines(runs):
    d = final(runs["UR-LSTM"]) - max(final(runs["LSTM+UGI"]), final(runs["LSTM, forget bias 1"]))
    return d, d >= 0.05


def _budget_10x(runs):
    b, lstm = runs["g-LSTM, budget"], runs["LSTM"]
    fewer = 1.0 / max(float(b["updates"][-1]), 1e-12)
    return fewer, fewer >= 10 and final(b) <= max(2 * final(lstm), ADDING_SOLVED)


def _curriculum_faster(runs):
    return _earlier("g-LSTM, curriculum", "g-LSTM")(runs)


#: Every registered :class:`TrainingClaim` by name (``CLAIMS.add`` registers one).
CLAIMS = Registry("training claim", TrainingClaim)
register_claim = CLAIMS.add


for _c in (
    TrainingClaim("deep_star_trains", "8-layer STAR trains on adding: final MSE < 0.01",
                  ("star",), _star_trains),
    TrainingClaim("deep_star_over_lstm", "STAR final MSE < 0.01 where the LSTM with forget "
                  "bias 1 (same seed) stays >= 0.01; statistic LSTM MSE / STAR MSE",
                  ("star", "lstm, forget bias 1"), _star_over_lstm),
    TrainingClaim("ur_lstm_binary_recall", "UR-LSTM after training on copy: >= 50% of its "
                  "effective gate g saturated (< 0.05 or > 0.95) AND recall accuracy >= 2x "
                  "chance (1/8); statistic the saturated share", ("UR-LSTM",), _binary_recall),
    TrainingClaim("ur_lstm_beats_baselines", "UR-LSTM's recall accuracy exceeds the better of "
                  "LSTM+UGI and LSTM with forget bias 1 (same seed) by >= 0.05; statistic the "
                  "difference", ("UR-LSTM", "LSTM+UGI", "LSTM, forget bias 1"), _beats_baselines),
    TrainingClaim("refined_gru_earlier", "refined GRU below MSE 0.01 at an earlier evaluation "
                  "than the GRU (or the GRU never); statistic the step difference",
                  ("refined_gru", "gru"), _earlier("refined_gru", "gru")),
    TrainingClaim("refined_mgu_earlier", "refined MGU below MSE 0.01 earlier than the MGU",
                  ("refined_mgu", "mgu"), _earlier("refined_mgu", "mgu")),
    TrainingClaim("refined_lstm_earlier", "refined LSTM (multiplicative, SPEC's reading) below "
                  "MSE 0.01 earlier than the LSTM", ("refined_lstm", "lstm"),
                  _earlier("refined_lstm", "lstm")),
    TrainingClaim("refined_lstm_add_earlier", "refined LSTM (additive reading) below MSE 0.01 "
                  "earlier than the LSTM", ("refined_lstm (add)", "lstm"),
                  _earlier("refined_lstm (add)", "lstm")),
    TrainingClaim("g_lstm_budget_10x", "g-LSTM with the budget loss: >= 10x fewer neuron "
                  "updates than the LSTM (update fraction <= 0.1) at comparable MSE (<= 2x the "
                  "LSTM's, same seed, or < 0.01); statistic 1 / update fraction",
                  ("g-LSTM, budget", "LSTM"), _budget_10x),
    TrainingClaim("g_lstm_curriculum_faster", "g-LSTM with a temporal curriculum below MSE "
                  "0.01 (at the full length) at an earlier evaluation than without",
                  ("g-LSTM, curriculum", "g-LSTM"), _curriculum_faster),
):
    register_claim(_c)


def get_claims(names) -> list:
    """Claims by name (or :class:`TrainingClaim` objects passed through)."""
    return CLAIMS.pick(names)


# ---------------------------------------------------------------------------------------------
# Conditions and runs

_KEYS = ("task", "task_options", "layers", "hidden", "steps", "batch", "clip", "dtype",
         "eval_every", "eval_batch", "lrs", "seeds", "factor", "runs")
_DEFAULTS = {"task_options": {}, "clip": 1.0, "dtype": "float32", "eval_every": None,
             "eval_batch": 256, "gates": {}, "record_batch": 64}
#: Every key a training atlas config may hold (besides figure, title, description).
CONFIG_KEYS = frozenset(_KEYS) | frozenset(_DEFAULTS) | {"claims"}


def parse_runs(runs) -> list:
    """``[(label, cell, options, training options)]`` from ``[label, cell, options]`` or
    ``[label, cell, options, training]`` entries (unique labels; training options of
    :func:`gradflow.experiments.training_runs`), a ValueError naming what is wrong."""
    from gradflow.experiments import _runs

    return _runs(runs)


def check(config: dict) -> dict:
    """``config`` with defaults filled in; a ValueError naming what is missing or wrong."""
    from gradflow import cells as _cells
    from gradflow import seeds as _seeds
    from gradflow.experiments import _RUN_OPTIONS

    missing = [k for k in _KEYS if k not in config and k not in _DEFAULTS]
    if missing:
        raise ValueError(f"training atlas config lacks {', '.join(missing)}")
    unknown = sorted(set(config) - CONFIG_KEYS - {"figure", "title", "description"})
    if unknown:  # (a misspelt key, e.g. "layer", was ignored and its default used)
        raise ValueError(f"training atlas config: unknown key(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(CONFIG_KEYS))}")
    c = {**_DEFAULTS, **config}
    c["eval_batch"] = checks.positive_int("eval_batch", c["eval_batch"])
    c["record_batch"] = checks.record_batch(config.get("record_batch"), c["eval_batch"],
                                            min(_DEFAULTS["record_batch"], c["eval_batch"]))
    c["lrs"], c["seeds"] = _seeds.lr_list(c["lrs"]), _seeds.seed_list(c["seeds"])
    f = c["factor"]
    if not isinstance(f, dict) or set(f) != {"name", "where", "values"} or \
            f["where"] not in ("task", "training") or not list(f["values"]):
        raise ValueError("factor is {'name': ..., 'where': 'task' | 'training', 'values': "
                         f"[...]}} with at least one value, got {f!r}")
    swept = [o for o in _RUN_OPTIONS if o != "lr"]  # (lr: every run at each of "lrs")
    if f["where"] == "training" and f["name"] not in swept:
        raise ValueError(f"factor {f['name']!r} is no training option; valid: "
                         f"{', '.join(swept)}"
                         + ("; the learning rates are the atlas's 'lrs'" if f["name"] == "lr"
                            else ""))
    runs = parse_runs(c["runs"])
    labels = [r[0] for r in runs]
    for label, _, _, extra in runs:
        if "lr" in extra:  # (it was dropped: every run trains at each of "lrs")
            raise ValueError(f"run {label!r}: a training atlas trains every run at each of its "
                             f"'lrs' ({', '.join(map(str, c['lrs']))}); give no 'lr' per run")
    if not isinstance(c["gates"], dict):
        raise ValueError(f"gates is {{run label: gate}}, got {c['gates']!r}")
    for label, gate in c["gates"].items():
        if label not in labels:
            raise ValueError(f"gates names run {label!r}; the atlas runs: {', '.join(labels)}")
        _, cell, opts, _ = runs[labels.index(label)]
        have = _cells.for_length(cell, 1, **opts).gate_names  # (as the run builds it)
        if gate not in have:
            raise ValueError(f"gates[{label!r}]: {cell} reports no gate {gate!r}; its gates: "
                             f"{', '.join(have) or 'none'}")
    for cl in get_claims(c.get("claims", [])) if c.get("claims") else []:
        bad = [x for x in cl.labels if x not in labels]
        if bad:
            raise ValueError(f"claim {cl.name!r} reads run(s) {', '.join(bad)}; the atlas "
                             f"runs: {', '.join(labels)}")
    return c


def run_spec(c: dict, run, value) -> dict:
    """Everything that determines one run's training at factor ``value`` (its cache key)."""
    label, cell, opts, extra = run
    f = c["factor"]
    task_options, extra = dict(c["task_options"]), dict(extra)
    if f["where"] == "task":
        task_options[f["name"]] = value
    elif f["name"] in extra:
        extra[f["name"]] = value
    return {"cell": cell, "options": opts, "training": extra, "task": c["task"],
            "task_options": task_options, "gate": c["gates"].get(label),
            **{k: c[k] for k in ("layers", "hidden", "steps", "batch", "clip", "dtype",
                                 "eval_every", "eval_batch", "lrs", "seeds", "record_batch")},
            "version": CACHE_VERSION}


def spec_key(spec: dict) -> str:
    """A 16-hex-digit hash of a run spec (the cache file's name)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_spec(spec: dict):
    """Train one run spec at every ``(lr, seed)`` (one vmapped program): a Result
    ``kind="training_grid"`` with ``eval_step: (E,)`` and ``eval_metric``, ``eval_loss`` (and
    ``eval_updates`` for time-gated cells, ``saturated/{gate}`` when a gate is named):
    ``(n_lr, S, E)`` / ``(n_lr, S)``; config the spec plus ``seconds``."""
    from gradflow import gates as _gates
    from gradflow import tasks as _tasks
    from gradflow.problem import precision, task_stack
    from gradflow.results import make_result
    from gradflow.seeds import train_lr_seeds

    task = _tasks.make(spec["task"], **spec["task_options"])
    extra = spec["training"]
    gate = spec["gate"]
    record = ({"gates": lambda s, p, x: _gates.saturation(s, p, x, 0.05)} if gate else None)
    start = time.perf_counter()
    with precision(spec["dtype"]):
        stack = task_stack(spec["cell"], task, layers=spec["layers"], hidden=spec["hidden"],
                           options=spec["options"], cell_steps=extra.get("cell_steps"))
        runs = train_lr_seeds(
            stack, task, spec["lrs"], spec["seeds"], steps=spec["steps"], batch=spec["batch"],
            clip=spec["clip"], dtype=spec["dtype"], eval_every=spec["eval_every"],
            eval_batch=spec["eval_batch"], budget=extra.get("budget", 0.0),
            curriculum=extra.get("curriculum"), record=record,
            record_at=(spec["steps"],) if gate else (), record_batch=spec["record_batch"])
    first = runs[0][0].curve
    arrays = {"eval_step": np.asarray(first["eval_step"])}
    for k in ("eval_metric", "eval_loss", "eval_updates"):
        if k in first.arrays:
            arrays[k] = np.array([[h.curve[k] for h in per] for per in runs])
    if gate:
        arrays[f"saturated/{gate}"] = np.array(
            [[float(np.asarray(h.records["gates"][-1][f"saturated/{gate}/pooled"]))
              for h in per] for per in runs])
    return make_result("training_grid", arrays,
                       {**spec, "seconds": time.perf_counter() - start}, warn=False)


def measure(c: dict, *, cache_dir=None, progress=None) -> dict:
    """``{(label, factor value): Result}`` of :func:`train_spec` for every run and factor value
    (a run that does not depend on the factor is trained once), read from ``cache_dir`` where
    cached, trained (and written there) otherwise; an entry damaged, trained by other code or
    holding another run (:func:`gradflow.results.read_cached`) is trained again, with a
    warning. ``progress``: called with one line per run."""
    from gradflow.results import read_cached

    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    out, done = {}, {}
    for run in parse_runs(c["runs"]):
        for value in c["factor"]["values"]:
            spec = run_spec(c, run, value)
            key = spec_key(spec)
            if key not in done:
                path = None if cache_dir is None else os.path.join(cache_dir, key + ".npz")
                cached, why = (None, None) if path is None else read_cached(path, spec)
                if why is not None:  # damaged, other code, another run's: trained again
                    warnings.warn(f"training atlas cache entry {path} cannot be reused ({why}); "
                                  "training its run again", RuntimeWarning, stacklevel=2)
                if cached is not None:
                    done[key] = cached
                else:
                    done[key] = train_spec(spec)
                    if path is not None:  # written whole: no torn files
                        done[key].save(path, whole=True)
                    if progress:
                        progress(f"{run[0]} @ {c['factor']['name']}={value}: "
                                 f"{done[key].config['seconds']:.0f} s")
            out[(run[0], value)] = done[key]
    return out


# ---------------------------------------------------------------------------------------------
# Evaluating claims


def seed_run(res, i: int, s: int) -> dict:
    """The run dict (module docstring) of lr index ``i``, seed index ``s`` of a
    :func:`train_spec` Result."""
    run = {"step": np.asarray(res["eval_step"]), "metric": res["eval_metric"][i, s],
           "loss": res["eval_loss"][i, s]}
    if "eval_updates" in res.arrays:
        run["updates"] = res["eval_updates"][i, s]
    run["saturated"] = {k.split("/", 1)[1]: float(v[i, s]) for k, v in res.arrays.items()
                        if k.startswith("saturated/")}
    return run


def best_lr_index(res, higher_is_better: bool) -> int:
    """The learning rate (index) with the best median final metric over seeds (the first of
    equals)."""
    med = np.median(res["eval_metric"][:, :, -1], axis=1)
    med = np.where(np.isfinite(med), med, -np.inf if higher_is_better else np.inf)
    return int(np.argmax(med) if higher_is_better else np.argmin(med))


def evaluate(c: dict, measured: dict, claims) -> dict:
    """Per claim: ``statistic``, ``holds`` ``(F, n_lr, S)`` (factor value x lr x seed),
    ``fraction`` ``(F, n_lr)``, and the fair verdict (each run at its best lr per factor
    value): ``fair_statistic``, ``fair_holds`` ``(F, S)``, ``fair_fraction`` ``(F,)``,
    ``best_lr`` ``{value: {label: lr}}``."""
    from gradflow import tasks as _tasks

    higher = _tasks.make(c["task"], **c["task_options"]).kind == "classification"
    values, lrs, S = c["factor"]["values"], c["lrs"], len(c["seeds"])
    out = {}
    for cl in get_claims(claims):
        stat = np.full((len(values), len(lrs), S), np.nan)
        holds = np.zeros(stat.shape, bool)
        fstat = np.full((len(values), S), np.nan)
        fholds = np.zeros(fstat.shape, bool)
        best = {}
        for f, v in enumerate(values):
            for i in range(len(lrs)):
                for s in range(S):
                    stat[f, i, s], holds[f, i, s] = cl.evaluate(
                        {x: seed_run(measured[(x, v)], i, s) for x in cl.labels})
            bi = {x: best_lr_index(measured[(x, v)], higher) for x in cl.labels}
            best[json.dumps(v)] = {x: lrs[i] for x, i in bi.items()}
            for s in range(S):
                fstat[f, s], fholds[f, s] = cl.evaluate(
                    {x: seed_run(measured[(x, v)], bi[x], s) for x in cl.labels})
        out[cl.name] = {"statistic": stat, "holds": holds, "fraction": holds.mean(-1),
                        "fair_statistic": fstat, "fair_holds": fholds,
                        "fair_fraction": fholds.mean(-1), "best_lr": best}
    return out


def training_atlas(config: dict, *, cache_dir=None, progress=None):
    """Train every run of ``config`` over its lr x factor x seed grid and evaluate its claims.

    Returns:
      Result ``kind="training_atlas"``: per run and factor value ``"run/{label}@{value}/{name}"``
      (:func:`train_spec`'s arrays, ``value`` JSON-encoded), per claim
      ``"claim/{name}/{array}"`` (:func:`evaluate`); config: the atlas config, ``claims``
      (``{name: {description, labels, best_lr}}``), ``seconds`` (``{label@value: s}``, the
      training time of each run as measured when first trained; a run that does not depend on
      the factor appears once per value), ``compute_seconds`` (their sum over distinct runs).
    """
    from gradflow.results import make_result

    c = check(config)
    measured = measure(c, cache_dir=cache_dir, progress=progress)
    arrays, seconds = {}, {}
    for (label, v), res in measured.items():
        key = f"{label}@{json.dumps(v)}"
        arrays.update({f"run/{key}/{k}": a for k, a in res.arrays.items()})
        seconds[key] = res.config["seconds"]
    claims = {}
    for name, ev in evaluate(c, measured, c.get("claims", [])).items():
        arrays.update({f"claim/{name}/{k}": a for k, a in ev.items() if k != "best_lr"})
        cl = CLAIMS[name]
        claims[name] = {"description": cl.description, "labels": list(cl.labels),
                        "best_lr": ev["best_lr"]}
    compute = sum({id(r): r.config["seconds"] for r in measured.values()}.values())
    return make_result("training_atlas", arrays, {**config, "lrs": c["lrs"],
                                                  "seeds": c["seeds"], "claims": claims,
                                                  "seconds": seconds,
                                                  "compute_seconds": compute}, warn=False)


def run_arrays(data, label: str, value) -> dict:
    """``{name: array}`` of run ``label`` at factor ``value`` out of a :func:`training_atlas`
    Result (``eval_metric: (n_lr, S, E)``, ...)."""
    prefix = f"run/{label}@{json.dumps(value)}/"
    got = {k[len(prefix):]: v for k, v in data.arrays.items() if k.startswith(prefix)}
    if not got:
        raise ValueError(f"no run {label!r} at {data.config['factor']['name']} = {value!r}")
    return got


def claim_arrays(data, name: str) -> dict:
    """``{array: value}`` of claim ``name`` out of a :func:`training_atlas` Result, plus
    ``best_lr``."""
    if name not in data.config["claims"]:
        raise ValueError(f"no claim {name!r}; valid: {', '.join(data.config['claims'])}")
    prefix = f"claim/{name}/"
    return {**{k[len(prefix):]: v for k, v in data.arrays.items() if k.startswith(prefix)},
            "best_lr": data.config["claims"][name]["best_lr"]}


__all__ = ["ADDING_SOLVED", "CLAIMS", "TrainingClaim", "best_lr_index", "check", "claim_arrays",
           "evaluate", "final", "first_below", "get_claims", "measure", "register_claim",
           "parse_runs", "run_arrays", "run_spec", "seed_run", "spec_key", "train_spec", "training_atlas"]
