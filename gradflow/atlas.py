r"""Claims under conditions: where does each paper's reading of a measurement hold?

A :class:`Claim` is a named predicate on one seed's measurement of a condition: a statistic
``s = predicate(measurement)`` and a threshold ``holds(s) -> bool``. What is measured is a
registered :class:`Measurement` kind (:data:`MEASUREMENTS`, the claim's ``reads``):

* ``"gradient_map"``: :func:`gradflow.gradient_map` ``values: (L, T)`` for a ``loss`` and
  ``wrt`` (the two factors this kind adds to a condition);
* ``"local_gains"``: :func:`gradflow.local_gains`, a dict of ``(L, T)`` arrays
  (``vertical_rms``, ``vertical_spectral``, ``temporal_rms``, ``temporal_spectral``);
* ``"gates"``: :func:`gradflow.gates.saturation` at initialisation (``eps`` 0.05), a dict of
  its named arrays (``"saturated/f"``, ``"timescale/f/unit"``, ``"outside/i/pooled"``, ...).

Each kind says how conditions are grouped into one compiled program, what arrays are cached
per condition, and how a cached Result splits into per-seed measurements; adding a kind is one
:func:`register_measurement`, adding a claim one :func:`register_claim`.

The predicates of SPEC section 4 item 1 read the map relative to where the loss enters,
:math:`r[l, t] = P[l, t] / P[L-1, T-1]`:

* ``rnn_amplified``: :math:`r[0, 0] \ge 2` (the STAR paper's Figure 2 itself shows 2.7x under the
  final-output loss and 4.6x under the sequence loss; 2 is below both, so the claim is read as
  "the bottom-first gradient is amplified by the factor the figure shows", not more);
  ``rnn_amplified_decade``: :math:`r[0, 0] \ge 10` (the over-reading "orders of magnitude");
* ``lstm_collapses``: :math:`\mathrm{median}\, r[l, t]` over the layers below the top two
  :math:`\le 0.1`;
* ``star_preserved``: the share of map entries with :math:`0.1 \le r \le 10` is :math:`\ge 0.8`.

Items 2-4 (vertical gains against closed forms, gate timescales and saturation at init, refined
vs vanilla gates) are claims on ``local_gains``, ``gates`` and ``gradient_map``; see
:data:`CLAIMS` and each claim's description.

A :class:`Grid` is the product of factors (cell, init, input scale, hidden size, layers x steps,
and the measurement's own: loss, wrt for maps) with a seed list; a cell factor value is a name
or ``"name:option=value,..."`` (e.g. ``"lstm:forget_bias=1.0"``, TensorFlow's LSTMCell;
``"star:variant=official"``, the authors' released STAR with chrono bias, ``T_max = 784``).
The ``init`` factor is the weight scheme (optionally ``"+bias scheme"``); a cell whose default
``init`` carries a bias scheme (``chrono``, ``ugi``) keeps it (``"torch"`` ->
``"torch+chrono"``).

:func:`atlas` measures every condition some claim reads. Each seed's problem is built by
:func:`gradflow.sweep.seed_problem` (so the map of seed ``s`` is
``gradient_map(*problem(cell, seed=s, ...)[:3])``), and the problems are measured under
``vmap`` inside one ``jax.shard_map`` that splits them over the devices, as
:func:`gradflow.sweep.sweep_arrays` does. Compiling dominates at small sizes, so one program per
(cell, size) measures every init x seed x input scale (x loss, wrt for maps) of the grid.
Each condition is cached as ``<cache_dir>/<key>.npz`` (a :class:`gradflow.Result` holding the
measurement's arrays with a leading seed axis, e.g. ``values: (S, L, T)``), ``key`` a hash of
the condition's config, so an interrupted atlas resumes where it stopped. An entry is reused
only where this code computed it for that condition (:func:`gradflow.results.read_cached`:
gradflow's source, JAX's version and backend as now; an entry from before an edit of gradflow
is measured again).

A condition's numbers are its config's to float rounding, not bit for bit: XLA compiles each
group's program as a whole (a forward shared by its losses, reductions over its seeds x scales
laid out by their count), so the same condition measured in another group (a resumed atlas
measures only what its cache lacks; a grid with other seeds, scales or losses groups it with
others) may differ in the last bits (seen: 5e-8 relative in float32). A verdict changes only
where a statistic lies that close to its threshold. The same grid with the same cache gives the
same numbers bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import warnings
from typing import Callable

import numpy as np

from gradflow.errors import InputError
from gradflow.registry import Registry
from gradflow.xla import jit

CACHE_VERSION = 1
FACTORS = ("cell", "init", "input_scale", "hidden", "size", "loss", "wrt")


# ---------------------------------------------------------------------------------------------
# Claims


def ratio(values) -> np.ndarray:
    """:math:`r = P / P[L-1, T-1]` for ``values: (L, T)``; all NaN if the top-last value is 0 or
    not finite (a claim read relative to it cannot be evaluated)."""
    values = np.asarray(values, np.float64)
    ref = values[-1, -1]
    if not np.isfinite(ref) or ref == 0:
        return np.full(values.shape, np.nan)
    return values / ref


def bottom_first(values) -> float:
    """:math:`r[0, 0]`: the bottom layer's first step over the top layer's last step."""
    return float(ratio(values)[0, 0])


def median_below_top2(values) -> float:
    """Median of :math:`r[l, t]` over layers ``0 .. L-3`` (all but the top two) and all steps."""
    r = ratio(values)
    if r.shape[0] < 3:
        raise ValueError(f"median_below_top2 needs at least 3 layers, got {r.shape[0]}")
    return float(np.median(r[:-2]))


def share_within_decade(values) -> float:
    """Share of entries with :math:`0.1 \\le r \\le 10` (NaN if ``r`` is)."""
    r = ratio(values)
    if np.isnan(r).all():
        return float("nan")
    return float(np.mean((r >= 0.1) & (r <= 10.0)))


@dataclasses.dataclass(frozen=True)
class Claim:
    """A named reading of one measurement of a condition.

    Attributes:
      name, description: what the claim says (the description names the threshold).
      cells: the cell names it speaks of (``"star"`` also covers ``"star:variant=official"``).
      predicate: one seed's measurement -> statistic (float; NaN where it cannot be read). The
        measurement is what :data:`MEASUREMENTS` ``[reads]`` gives per seed: for
        ``"gradient_map"`` the map ``values: (L, T)``; for ``"local_gains"`` and ``"gates"`` a
        dict of that seed's named arrays (those of :func:`gradflow.local_gains` /
        :func:`gradflow.gates.saturation`).
      holds: ``statistic -> bool`` (never true for NaN).
      reads: the measurement kind (a key of :data:`MEASUREMENTS`).
      where: ``((factor, values), ...)``: the claim reads only conditions whose ``factor`` is
        one of ``values`` (for ``"gradient_map"``: ``wrt`` and ``loss``).
      min_layers: the fewest layers a condition needs for the claim to read it.

    A predicate reading gates says which (``predicate.gates``, as :func:`saturated_share`,
    :func:`outside_share`, :func:`timescale_decades` and :func:`saturation_gain` set it): the
    claim reads only conditions whose cell reports them (``lstm:aux=refine,tied=True`` has no
    input gate ``i``).
    """

    name: str
    description: str
    cells: tuple
    predicate: Callable
    holds: Callable
    reads: str = "gradient_map"
    where: tuple = ()
    min_layers: int = 1

    def __post_init__(self):
        if not self.name or "/" in self.name:  # (it keys the saved arrays: "{name}/...")
            raise ValueError(f"a claim's name must be non-empty and hold no '/', got "
                             f"{self.name!r}")
        if self.reads not in MEASUREMENTS:
            raise ValueError(f"claim {self.name!r} reads unknown measurement {self.reads!r}; "
                             f"valid: {', '.join(MEASUREMENTS)}")
        object.__setattr__(self, "where", tuple((k, tuple(v)) for k, v in dict(self.where)
                                                .items()))

    def applies(self, condition: dict) -> bool:
        """Whether the claim reads ``condition``'s measurement."""
        return (measure_of(condition) == self.reads
                and parse_cell(condition["cell"])[0] in self.cells
                and condition.get("layers", self.min_layers) >= self.min_layers
                and all(condition.get(k) in v for k, v in self.where)
                and set(getattr(self.predicate, "gates", ())) <= _reported(condition["cell"]))

    def evaluate(self, measurement) -> tuple[float, bool]:
        """``(statistic, holds)`` for one seed's measurement."""
        s = float(self.predicate(measurement))
        return s, bool(np.isfinite(s) and self.holds(s))

    def scope(self) -> str:
        """The conditions it reads, in words (for error messages)."""
        gates = getattr(self.predicate, "gates", ())
        return ", ".join([f"reads {self.reads}", f"cells {', '.join(self.cells)}"]
                         + ([f"with gates {', '.join(gates)}"] if gates else [])
                         + ([f"layers >= {self.min_layers}"] if self.min_layers > 1 else [])
                         + [f"{k} {', '.join(map(str, v))}" for k, v in self.where])


_BOTH = ("last", "all")
_WRTS = ("params", "hidden")
_MAPS = (("wrt", _WRTS), ("loss", _BOTH))

#: Every registered :class:`Claim` by name (``CLAIMS.add`` registers one).
CLAIMS = Registry("claim", Claim)
register_claim = CLAIMS.add


def get_claims(names) -> list[Claim]:
    """Claims by name (or :class:`Claim` objects passed through)."""
    return CLAIMS.pick(names)


# ---------------------------------------------------------------------------------------------
# Grids and conditions


def parse_cell(spec: str) -> tuple[str, dict]:
    """``"lstm:forget_bias=1.0,init=torch"`` -> ``("lstm", {"forget_bias": 1.0, ...})``
    (:func:`gradflow.cells.parse_spec`, the syntax ``gradflow compare --cells`` shares; here so
    that reading a grid's conditions imports JAX only when called, not with the atlas)."""
    from gradflow.cells import parse_spec

    return parse_spec(spec)


def cell_for(spec: str, init: str, steps: int):
    """The :class:`gradflow.cells.Cell` of a cell factor value under an ``init`` weight scheme
    (a bias scheme in the cell's own default init is kept)."""
    from gradflow import cells as _cells

    name, options = parse_cell(spec)
    if "init" in options:
        raise ValueError(f"cell spec {spec!r} sets init: use the grid's init factor instead")
    weight, bias = _cells.parse_init(init)
    if bias is None:  # the cell's own default bias scheme (UR-LSTM's UGI), where it has one
        default = dict(_cells.for_length(name, steps, **options).options).get("init")
        if default is not None:
            bias = _cells.parse_init(default)[1]
    return _cells.for_length(name, steps, init=weight if bias is None else f"{weight}+{bias}",
                             **options)


def _reported(spec: str) -> set:
    """The gates the cell of a cell factor value reports (the same under every init)."""
    from gradflow import cells as _cells

    name, options = parse_cell(spec)
    return set(_cells.get(name, **options).gate_names)


def _tuple(name, v):
    if isinstance(v, (str, int, float)):
        v = (v,)
    v = tuple(v)
    if not v:
        raise ValueError(f"grid factor {name!r} needs at least one value")
    return v


#: ``Grid(readout_seed=PER_SEED)``: each seed's maps probed through a readout of its own.
PER_SEED = "seed"


@dataclasses.dataclass(frozen=True)
class Grid:
    """The conditions of an atlas: the product of the factors, each measured for every seed.

    ``sizes`` are ``(layers, steps)`` pairs; ``measure`` the :data:`MEASUREMENTS` kind taken
    of every condition (``losses`` and ``wrts`` are factors of ``"gradient_map"`` only).
    ``conditions()`` lists dicts with keys :data:`FACTORS` (``size`` split into ``layers``,
    ``steps``; ``loss``, ``wrt`` only for maps) plus ``seeds``, ``batch``, ``dtype``,
    ``readout_seed`` (and ``measure`` unless it is ``"gradient_map"``).

    ``readout_seed``: the seed of the maps' probe loss (random readout and labels), one for
    every seed (an int, 0 by default), or ``"seed"``: each seed draws its own readout too, so
    a claim's agreement over seeds covers the probe as well as the parameters and inputs.
    """

    cells: tuple = ("rnn", "lstm", "star")
    inits: tuple = ("orthogonal",)
    input_scales: tuple = (1.0,)
    hidden: tuple = (32,)
    sizes: tuple = ((10, 10),)
    losses: tuple = ("last", "all")
    wrts: tuple = ("params",)
    seeds: tuple = (0, 1, 2)
    batch: int = 16
    dtype: str = "float32"
    readout_seed: int | str = 0
    measure: str = "gradient_map"

    def __post_init__(self):
        from gradflow import jacobian as _jac
        from gradflow import sweep as _sweep
        from gradflow.checks import DTYPES, positive_int, width
        from gradflow.problem import check_input_scale

        from gradflow import cells as _cells

        object.__setattr__(self, "batch", positive_int("batch", self.batch))
        if self.readout_seed != PER_SEED:
            from gradflow.checks import seed as _seed

            try:
                object.__setattr__(self, "readout_seed", _seed("readout_seed",
                                                               self.readout_seed))
            except ValueError as e:
                raise ValueError(f"{e}, or {PER_SEED!r} (each seed its own readout)") from None

        for f in ("cells", "inits", "input_scales", "hidden", "losses", "wrts"):
            object.__setattr__(self, f, _tuple(f, getattr(self, f)))
        given = _tuple("sizes", self.sizes)
        if not all(isinstance(s, (list, tuple)) for s in given):
            raise ValueError(f"sizes are (layers, steps) pairs of positive integers, e.g. "
                             f"[[8, 32], [16, 64]], got {list(given)}")
        if any(len(s) != 2 for s in given):
            raise ValueError(f"sizes are (layers, steps) pairs of positive integers, got "
                             f"{[list(s) for s in given]}")
        # (3.7 steps read as 3, True as 1 layer)
        object.__setattr__(self, "sizes", tuple((positive_int("sizes' layers", s[0]),
                                                 positive_int("sizes' steps", s[1]))
                                                for s in given))
        object.__setattr__(self, "seeds", _sweep.check_seeds(self.seeds))
        try:
            dtype = np.dtype(self.dtype).name
        except TypeError:
            dtype = None
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        object.__setattr__(self, "dtype", dtype)
        # finite in the grid's dtype (a map of inf inputs measured nothing), and positive
        object.__setattr__(self, "input_scales", tuple(check_input_scale(s, dtype)
                                                       for s in self.input_scales))
        bad = [s for s in self.input_scales if not s > 0]
        if bad:
            raise ValueError(f"input scales must be positive finite numbers, got {bad[0]}")
        for f, what, valid in (("losses", "loss", _jac.LOSSES),
                               ("wrts", "wrt", ("params", "hidden"))):
            bad = [v for v in getattr(self, f) if v not in valid]
            if bad:
                raise ValueError(f"unknown {what} {bad[0]!r}; valid: {', '.join(valid)}")
        for c in self.cells:
            name = parse_cell(c)[0]
            if name not in _cells.names():
                raise ValueError(f"unknown cell {name!r} in the grid; valid: "
                                 f"{', '.join(_cells.names())}")
        for init in self.inits:
            _cells.parse_init(init)
        object.__setattr__(self, "hidden", tuple(width("hidden", h) for h in self.hidden))
        if self.measure not in MEASUREMENTS:
            raise ValueError(f"unknown measure {self.measure!r}; valid: "
                             f"{', '.join(MEASUREMENTS)}")
        default = {f.name: f.default for f in dataclasses.fields(self)}
        unused = unused_map_fields(self.measure, [f for f in MAP_FIELDS
                                                  if getattr(self, f) != default[f]])
        if unused:  # (they were recorded in the grid and never used)
            raise ValueError(f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} the "
                             f"gradient maps' conditions; measure {self.measure!r} has none: "
                             "leave them out")

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        """A grid from a JSON-able dict with the field names (unknown keys rejected)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - fields)
        if bad:
            raise ValueError(f"unknown grid key {bad[0]!r}; valid: {', '.join(sorted(fields))}")
        return cls(**d)

    @classmethod
    def load(cls, path):
        """A grid from a JSON file (an object with the field names; a list of objects gives a
        list of grids)."""
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read grid {path!r}: {e.strerror or e}") from None
        except ValueError as e:  # not JSON, or not text at all (UnicodeDecodeError)
            raise ValueError(f"grid {path!r} is not JSON: {e}") from None
        if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
            return [cls.from_dict(x) for x in d]
        if not isinstance(d, dict):
            raise ValueError(f"grid {path!r} must hold a JSON object or a list of them")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return {f.name: (list(map(list, v)) if f.name == "sizes" else
                         list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    def conditions(self) -> list[dict]:
        """The condition dicts; the measurement's own factors (for ``"gradient_map"``: loss,
        wrt) only where it has them, and ``measure`` unless it is ``"gradient_map"``."""
        own = MEASUREMENTS[self.measure].factors
        out = []
        for cell, init, scale, hidden, (layers, steps), *values in itertools.product(
                self.cells, self.inits, self.input_scales, self.hidden, self.sizes,
                *(getattr(self, f) for _, f in own)):
            c = {"cell": cell, "init": init, "input_scale": scale, "hidden": int(hidden),
                 "layers": layers, "steps": steps, **dict(zip((k for k, _ in own), values)),
                 "seeds": list(self.seeds), "batch": int(self.batch), "dtype": self.dtype,
                 "readout_seed": self.readout_seed}
            if self.measure != "gradient_map":
                c["measure"] = self.measure
            out.append(c)
        return out


#: The Grid fields that set gradient maps' conditions: their factors, and their probe loss.
MAP_FIELDS = ("losses", "wrts", "readout_seed")


def unused_map_fields(measure: str, fields) -> list[str]:
    """Those of ``fields`` (:data:`MAP_FIELDS` given) that ``measure`` (a key of
    :data:`MEASUREMENTS`) does not take: the factors it lacks, and the readout seed where it
    has no loss."""
    own = {f for _, f in MEASUREMENTS[measure].factors}
    return [f for f in MAP_FIELDS if f in fields and f not in own
            and not (f == "readout_seed" and "losses" in own)]


def condition_key(condition: dict) -> str:
    """A 16-hex-digit hash of a condition's config (the cache file's name)."""
    text = json.dumps({**condition, "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Measuring: one program per (cell, size), every init x seed x input scale x (loss, wrt)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A kind of measurement the atlas can make of a condition, and how.

    Attributes:
      name: the key in :data:`MEASUREMENTS` (and a claim's ``reads``).
      description: what is measured (definition and options).
      factors: ``{factor: Grid field}``: the condition keys this measurement adds to the common
        ones (cell, init, input scale, hidden, layers, steps, seeds, batch, dtype, readout seed),
        with the :class:`Grid` field listing their values.
      grouped: the condition keys one call of ``measure_group`` may vary over (the rest equal).
      measure_group: ``(conditions, devices) -> [Result]``, one Result per condition in order,
        each array with a leading seed axis ``S`` (what the cache holds per condition).
      per_seed: ``Result -> list`` of ``S`` measurements, what a :class:`Claim`'s predicate
        reads.
      max_devices: at most this many devices per program (``None``: all given).
    """

    name: str
    description: str
    factors: tuple
    grouped: tuple
    measure_group: Callable
    per_seed: Callable
    max_devices: int | None = None


#: Every registered :class:`Measurement` kind by name.
MEASUREMENTS = Registry("measurement", Measurement)
register_measurement = MEASUREMENTS.add


def measure_of(condition: dict) -> str:
    """The measurement kind of a condition (``"gradient_map"`` conditions carry no
    ``measure`` key: their cache keys predate the registry)."""
    return condition.get("measure", "gradient_map")


# One compiled program per (cell, size): every init x seed x input scale x variant.


@functools.lru_cache(maxsize=16)
def _group_program(kind, stack, mesh, steps, batch, dtype, variants, readout_seed):
    """jit ``(params (N, ...), xs (N, B, T, D), scales (K,)) -> {variant: {name: (N, K,
    ...)}}``, the ``N`` problems split over ``mesh``'s devices; per problem, scale and variant
    the arrays of ``_VMAPPED[kind](stack, variant, ...)`` on ``scale * xs``."""
    import jax
    from jax.sharding import PartitionSpec

    from gradflow import sweep as _sweep

    fns = {v: _VMAPPED[kind][0](stack, v, steps=steps, batch=batch, dtype=dtype,
                             readout_seed=readout_seed) for v in variants}

    def local(params, xs, seeds, scales):
        def per_scale(k):  # the same float multiply as seed_problem's input_scale * N(0, 1)
            return {v: jax.vmap(lambda p, x, s, fn=fn: fn(p, k.astype(dtype) * x, s))(
                params, xs, seeds) for v, fn in fns.items()}
        return jax.vmap(per_scale, out_axes=1)(scales)

    spec = PartitionSpec(_sweep.AXIS)
    return jit(jax.shard_map(local, mesh=mesh,
                                 in_specs=(spec, spec, spec, PartitionSpec()),
                                 out_specs=spec, check_vma=False))


def _map_arrays(stack, variant, *, steps, batch, dtype, readout_seed):
    """``(params, xs, seed) -> {"loss_value": (), "values": (L, T)}``:
    :func:`gradflow.gradient_map` for ``variant = (loss, wrt)``, its probe readout drawn from
    ``readout_seed``, or from the problem's own ``seed`` where that is ``"seed"``."""
    from gradflow import jacobian as _jac

    loss, wrt = variant
    base = _jac.readout_loss(loss, stack.widths[-1], steps, batch,
                             0 if readout_seed == PER_SEED else readout_seed, dtype)

    def fn(params, xs, seed):
        loss_fn = _jac.seeded_readout_loss(base, seed) if readout_seed == PER_SEED else base
        value, m = _jac.map_arrays(stack, params, xs, loss_fn,
                                   "params" if wrt == "params" else "hidden")
        return {"loss_value": value, "values": m}
    return fn


def _gain_arrays(stack, variant, **_):
    """``(params, xs, seed) -> {vertical_rms, ...: (L, T)}``: :func:`gradflow.local_gains`."""
    from gradflow import jacobian as _jac

    return lambda params, xs, seed: _jac.gain_arrays(stack, params, xs)


#: :data:`gradflow.gates.EPS` and ``BINS`` (written again: this module loads without JAX; a
#: test keeps them equal, and the CLI's ``--eps``/``--bins`` defaults).
GATE_EPS, GATE_BINS = 0.05, 20


def _gate_arrays(stack, variant, **_):
    """``(params, xs) -> (red, hist)``: :func:`gradflow.gates.reductions` (``eps`` 0.05,
    20 bins, the default update threshold)."""
    from gradflow import gates as _gates

    return lambda params, xs, seed: _gates.reductions(stack, params, xs, GATE_EPS,
                                                      _gates.UPDATE_THRESHOLD, GATE_BINS)


def _finish_arrays(stack, tree, n, k):
    """``{name: (n, ...)}`` of the first ``n`` problems at scale ``k``."""
    return {name: np.asarray(a)[:n, k] for name, a in tree.items()}




def _split(tree, i, k):
    """Problem ``i``, scale ``k`` of a program output (NumPy)."""
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a)[i, k], tree)


def _finish_gates(stack, tree, n, k):
    """``{name: (n, ...)}`` named gate arrays (:func:`gradflow.gates.named_arrays`) of the
    first ``n`` problems at scale ``k``."""
    from gradflow import gates as _gates

    per = [_gates.named_arrays(stack, *_split(tree, i, k), GATE_BINS) for i in range(n)]
    return {name: np.stack([p[name] for p in per]) for name in per[0]}


#: ``kind: (arrays, finish, result kind)``: ``arrays(stack, variant, steps=, batch=, dtype=,
#: readout_seed=) -> fn(params, xs, seed) -> tree`` (traced under ``vmap``; ``seed``: the
#: problem's); ``finish(stack, tree
#: (N, K, ...), n, k) -> {name: (n, ...)}`` (NumPy, the ``n`` seeds at scale ``k``).
_VMAPPED = {"gradient_map": (_map_arrays, _finish_arrays, "gradient_map"),
            "local_gains": (_gain_arrays, _finish_arrays, "local_gains"),
            "gates": (_gate_arrays, _finish_gates, "gate_stats")}


def _vmapped_group(kind: str, conditions: list[dict], devices, variant_of) -> list:
    """Measure conditions that differ only in ``init``, ``input_scale`` and the variant
    ``variant_of(condition)``: one compiled program (:func:`_group_program`), one Result per
    condition with arrays ``(S, ...)``.

    Each seed's problem is :func:`gradflow.sweep.seed_problem` with ``input_scale = 1`` (built
    by the condition's own cell, so its init), its inputs scaled inside the program. The
    program is compiled for the cell as built with the ``orthogonal`` weight scheme: a cell's
    ``init`` option changes its initial parameters only, never its step (the tests compare
    ``torch``-init maps with :func:`gradflow.gradient_map` on the ``torch`` cell).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from gradflow import parallel
    from gradflow import sweep as _sweep
    from gradflow.problem import dtype_of
    from gradflow.results import make_result
    from gradflow.stack import Stack

    grouped = MEASUREMENTS[kind].grouped
    c0 = conditions[0]
    rest = {k: v for k, v in c0.items() if k not in grouped}
    if any({k: v for k, v in c.items() if k not in grouped} != rest for c in conditions):
        raise ValueError(f"measure_group ({kind}): the conditions may differ only in "
                         + ", ".join(grouped))
    steps, hidden, layers, batch = c0["steps"], c0["hidden"], c0["layers"], c0["batch"]
    dt = jnp.dtype(dtype_of(c0["dtype"]))
    seeds = _sweep.check_seeds(c0["seeds"])
    inits = list(dict.fromkeys(c["init"] for c in conditions))
    scales = list(dict.fromkeys(c["input_scale"] for c in conditions))
    variants = tuple(dict.fromkeys(variant_of(c) for c in conditions))
    problems, cell_configs = [], {}
    for init in inits:
        st = Stack(cell_for(c0["cell"], init, steps), layers, hidden, hidden)
        cell_configs[init] = st.cell.config
        problems += [_sweep.seed_problem(st, s, steps=steps, batch=batch, dtype=dt)
                     for s in seeds]
    cap = MEASUREMENTS[kind].max_devices
    devices = list(jax.devices() if devices is None else devices)[:cap]
    stack = Stack(cell_for(c0["cell"], inits[0], steps), layers, hidden, hidden)  # (any init:
    # the program's shapes; the problems bring their own parameters)

    def placed(devices):
        """The program on ``devices`` and its arguments, the seeds padded to fill them."""
        mesh = _sweep.device_mesh(devices)
        n = len(problems)
        pad = math.ceil(n / mesh.devices.size) * mesh.devices.size - n
        padded = problems + [problems[-1]] * pad
        shard = NamedSharding(mesh, PartitionSpec(_sweep.AXIS))
        args = (jax.device_put(jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                                      *[p for p, _ in padded]), shard),
                jax.device_put(jnp.stack([x for _, x in padded]), shard),
                jax.device_put(jnp.asarray(list(seeds) * len(inits) + [seeds[-1]] * pad,
                                           jnp.int32), shard),
                jnp.asarray(scales, dt))
        run = _group_program(kind, stack, mesh, steps, batch, dt, variants, c0["readout_seed"])
        return mesh, run, args

    with parallel.outside_mesh():  # (a mesh the caller set)
        mesh, run, args = placed(devices)
        if parallel.lapack_stalls(run, args, mesh):  # e.g. local gains' SVDs: on one CPU device
            mesh, run, args = placed(devices[:1])
        out = jax.tree_util.tree_map(np.asarray, run(*args))
    n_used = mesh.devices.size
    S = len(seeds)
    results = []
    for c in conditions:
        i, k = inits.index(c["init"]), scales.index(c["input_scale"])
        tree = jax.tree_util.tree_map(lambda a: np.asarray(a)[i * S:(i + 1) * S],
                                      out[variant_of(c)])
        _, finish, rkind = _VMAPPED[kind]
        results.append(make_result(rkind, finish(stack, tree, S, k), {**c, "cell_config": cell_configs[c["init"]],
                                                   "devices": n_used}, warn=False))
    return results


def _seed_dicts(res) -> list:
    """One dict of named arrays per seed of a cached Result (arrays ``(S, ...)``)."""
    S = len(res.config["seeds"])
    return [{k: v[s] for k, v in res.arrays.items()} for s in range(S)]


def measure_group(conditions: list[dict], devices=None) -> list:
    """Measure conditions of one kind (:func:`measure_of`) that differ only in that kind's
    ``grouped`` factors: one Result per condition, in order (for ``"gradient_map"``:
    ``values: (S, L, T)``, ``loss_value: (S,)``)."""
    from gradflow.problem import precision

    kinds = {measure_of(c) for c in conditions}
    if len(kinds) != 1:
        raise ValueError(f"measure_group: one measurement kind per group, got {sorted(kinds)}")
    # a group shares its dtype (not a grouped factor), as _vmapped_group reads it
    with precision(conditions[0]["dtype"]):  # float64: 64-bit JAX
        return MEASUREMENTS[kinds.pop()].measure_group(conditions, devices)


for _m in (
    Measurement("gradient_map", "gradflow.gradient_map(loss, wrt) with the default readout loss",
                (("loss", "losses"), ("wrt", "wrts")), ("init", "input_scale", "loss", "wrt"),
                lambda cs, d: _vmapped_group("gradient_map", cs, d,
                                             lambda c: (c["loss"], c["wrt"])),
                lambda res: list(res.values)),
    # Its SVDs keep it on one CPU device (gradflow.parallel.lapack_stalls): split over 2
    # simulated CPU devices it stalled with no thread running (jaxlib 0.10.2; H = 16, 8 layers)
    Measurement("local_gains", "gradflow.local_gains: vertical/temporal RMS and spectral "
                "one-step gains per (l, t)", (), ("init", "input_scale"),
                lambda cs, d: _vmapped_group("local_gains", cs, d, lambda c: ()), _seed_dicts),
    Measurement("gates", f"gradflow.gates.saturation (eps {GATE_EPS}, {GATE_BINS} bins): gate "
                "means, saturated fractions, slopes, timescales, ranges per (l, t)", (),
                ("init", "input_scale"),
                lambda cs, d: _vmapped_group("gates", cs, d, lambda c: ()), _seed_dicts),
):
    register_measurement(_m)


def _groups(conditions):
    groups = {}
    for c in conditions:
        grouped = MEASUREMENTS[measure_of(c)].grouped
        groups.setdefault(condition_key({k: v for k, v in c.items() if k not in grouped}),
                          []).append(c)
    return list(groups.values())


def measure(conditions: list[dict], *, cache_dir=None, devices=None, progress: bool = True):
    """``{condition_key: Result}`` for every condition, read from ``cache_dir`` where cached,
    measured (and written there) otherwise. A cached entry is read only where this code
    computed it with the condition's settings (:func:`gradflow.results.read_cached`); one
    damaged, computed by other code (an edited gradflow, another JAX) or holding another
    condition is measured again, with a warning saying how many and why."""
    from gradflow.results import read_cached

    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    out, todo, again = {}, [], []
    for c in conditions:
        key = condition_key(c)
        if cache_dir is not None:
            path = os.path.join(cache_dir, key + ".npz")
            res, why = read_cached(path, c)
            if res is not None:
                out[key] = res
                continue
            if why is not None:
                again.append(f"{path}: {why}")
        todo.append(c)
    if again:
        warnings.warn(f"{len(again)} atlas cache entr{'y' if len(again) == 1 else 'ies'} "
                      f"cannot be reused; measuring again (the first, {again[0]})",
                      RuntimeWarning, stacklevel=2)
    bar = _bar(len(conditions), len(conditions) - len(todo), progress)
    try:
        for group in _groups(todo):
            for c, res in zip(group, measure_group(group, devices)):
                key = condition_key(c)
                if cache_dir is not None:  # written whole: no torn files
                    res.save(os.path.join(cache_dir, key + ".npz"), whole=True)
                out[key] = res
            bar.update(len(group))
    finally:
        bar.close()
    return out


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(total, done, progress):
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency
        return _NoBar()
    return tqdm(total=total, initial=done, desc="atlas maps", unit="cond")


# ---------------------------------------------------------------------------------------------
# The atlas


def _grid(g) -> Grid:
    if isinstance(g, dict):
        g = Grid.from_dict(g)
    if not isinstance(g, Grid):
        raise TypeError(f"grid must be a Grid, a dict or a JSON path, got {type(g).__name__}")
    return g


def plan(claims, grid) -> tuple[list, list, list]:
    """``(claims, grids, needed conditions)`` of an :func:`atlas` call, checked before
    anything is measured: a ValueError (the user's to fix) for an unknown claim, a bad grid, a
    cell spec that does not build (an unknown option, a bad value), grids of other seeds, or a
    claim that reads no condition of the grid (naming what it reads)."""
    claims = get_claims(claims)
    names = [cl.name for cl in claims]
    if len(set(names)) != len(names):  # (one result per name: one of them was dropped)
        raise ValueError(f"claims repeat a name: "
                         f"{', '.join(sorted({n for n in names if names.count(n) > 1}))}; "
                         "give your own claim a name of its own")
    grids = []
    for g in (grid if isinstance(grid, list) else [grid]):
        g = Grid.load(g) if isinstance(g, (str, os.PathLike)) else g
        grids += [_grid(x) for x in (g if isinstance(g, list) else [g])]
    if not grids:
        raise ValueError("grid: an empty list of grids")
    conditions = list({condition_key(c): c for g in grids for c in g.conditions()}.values())
    if any(g.seeds != grids[0].seeds for g in grids):
        raise ValueError("grids of one atlas must share their seeds")
    needed = [c for c in conditions if any(cl.applies(c) for cl in claims)]
    if not needed:
        raise ValueError("no condition of the grid is read by the claims "
                         + "; ".join(f"{c.name} ({c.scope()})" for c in claims))
    for cl in claims:
        if not any(cl.applies(c) for c in needed):
            raise ValueError(f"claim {cl.name!r} reads no condition of the grid "
                             f"({cl.scope()})")
    for spec in sorted({(c["cell"], c["init"], c["steps"]) for c in needed}):
        cell_for(*spec)  # builds, or says what is wrong with the spec
    _check_memory(needed)
    return claims, grids, needed


def _check_memory(conditions) -> None:
    """A ValueError, before anything is compiled, where a group of conditions measured at once
    (every seed and init of one condition, :func:`_vmapped_group`) cannot fit in memory: its
    problems' measurement as one batch of ``batch x problems`` examples, with each problem's
    parameters and their layer-stacked copy (:func:`gradflow.cost.at_once`)
    (:func:`gradflow.cost.estimate`; a local gains condition's Jacobians batched as one
    problem's, ``lax.map``-ped ``vmap`` over the problems)."""
    from gradflow import cost
    from gradflow.problem import precision
    from gradflow.stack import Stack

    for group in _groups(conditions):
        c0 = group[0]
        n = len({c["init"] for c in group}) * len(c0["seeds"])
        method = {"gates": "gates", "local_gains": "gains"}.get(measure_of(c0), "gradient")
        stack = Stack(cell_for(c0["cell"], c0["init"], c0["steps"]), c0["layers"],
                      c0["hidden"], c0["hidden"])
        with precision(c0["dtype"]):  # (float64: 64-bit JAX, as its measurement runs)
            need = max(cost.at_once(cost.estimate(
                stack, c0["batch"] * n, c0["steps"], c0["dtype"], c.get("wrt", "hidden"),
                method, calibrate=False,
                chunk=cost.gains_chunk(c0["batch"], c0["steps"], c0["hidden"])), n)
                for c in group)
        cost.check_need(need, f"measuring the atlas's {c0['cell']} conditions at "
                              f"{c0['layers']} layers x {c0['steps']} steps, H={c0['hidden']}, "
                              f"batch {c0['batch']} (seeds x inits: {n} "
                              f"problem{'s' * (n > 1)} at once)",
                        "use fewer layers or steps, a smaller hidden size or batch, or "
                        "fewer seeds")


def atlas(claims, grid, *, cache_dir=None, devices=None, progress: bool = True) -> dict:
    r"""Evaluate each claim on every condition of ``grid`` it reads, for every seed.

    Args:
      claims: claim names (:data:`CLAIMS`) or :class:`Claim` objects.
      grid: a :class:`Grid`, a dict of its fields or a JSON file's path (holding an object or
        a list of them), or a list of these: the union of their conditions (same seeds).
      cache_dir: where each condition's maps are cached (``None``: no cache).
      devices: devices to shard the seeds over (default ``jax.devices()``).
    Returns:
      ``{claim name: Result}``, each ``kind="atlas"`` with ``statistic: (C, S)`` (the predicate's
      value per condition and seed), ``holds: (C, S)`` (bool), ``fraction: (C,)`` (share of seeds
      for which it holds), and config ``claim``, ``description``, ``conditions`` (the ``C``
      condition dicts), ``seeds``, ``grid``.

    >>> g = Grid(cells=("rnn",), sizes=((3, 3),), hidden=(4,), seeds=(0, 1), batch=2)
    >>> res = atlas(["rnn_amplified"], g, progress=False)["rnn_amplified"]
    >>> res.statistic.shape, res.fraction.shape
    ((2, 2), (2,))
    """
    from gradflow.results import make_result

    claims, grids, needed = plan(claims, grid)
    seeds = grids[0].seeds
    maps = measure(needed, cache_dir=cache_dir, devices=devices, progress=progress)
    out = {}
    for cl in claims:
        conds = [c for c in needed if cl.applies(c)]
        read = MEASUREMENTS[cl.reads].per_seed
        ev = [[cl.evaluate(v) for v in read(maps[condition_key(c)])] for c in conds]
        stat = np.array([[e[0] for e in row] for row in ev], np.float64)
        holds = np.array([[e[1] for e in row] for row in ev], bool)
        out[cl.name] = make_result(
            "atlas", {"statistic": stat, "holds": holds, "fraction": holds.mean(axis=1)},
            {"claim": cl.name, "description": cl.description, "reads": cl.reads,
             "conditions": conds,
             "seeds": list(seeds), "grid": [g.to_dict() for g in grids]}, warn=False)
    overflowed = [c for c in needed if maps[condition_key(c)].total_nonfinite]
    if overflowed:  # data (the statistics read NaN there, not holding), and said
        from gradflow.results import NonFiniteWarning

        c = overflowed[0]
        warnings.warn(f"atlas: the measurements of {len(overflowed)} of {len(needed)} "
                      f"conditions hold non-finite entries (e.g. {c['cell']}, init "
                      f"{c['init']}, input scale {c['input_scale']:g}): a claim reading them "
                      "has a NaN statistic there, which does not hold", NonFiniteWarning,
                      stacklevel=2)
    return out


def mechanism(cell: str, init: str, input_scales=(0.01, 0.1, 1.0), *, layers: int = 10,
              steps: int = 10, hidden: int = 32, batch: int = 16, seed: int = 0) -> dict:
    r"""The quantities behind a claim's boundary, per layer, for one seed's problem.

    For each input scale: the one-step gains of :func:`gradflow.local_gains` averaged over
    steps (``vertical_rms``, ``temporal_rms``, ``temporal_spectral``: ``(L,)`` each), the mean of
    :math:`1 - h^2` over batch, steps and units (for a cell whose output is
    :math:`h = \tanh(\cdot)`, the mean slope :math:`\tanh'` of its last nonlinearity) and the
    RMS of :math:`h` (``rms_h``), each ``(L,)``.

    Returns:
      ``{input_scale: {quantity: list of L floats}}``.

    Raises:
      ValueError: as :class:`Grid` for the same condition (a bad seed, scale, size), and where
        its local gains cannot fit in memory, before anything is computed.
    """
    import jax.numpy as jnp

    from gradflow import jacobian as _jac
    from gradflow import sweep as _sweep
    from gradflow.stack import Stack

    grid = Grid(cells=(cell,), inits=(init,), input_scales=tuple(input_scales),
                hidden=(hidden,), sizes=((layers, steps),), seeds=(seed,), batch=batch,
                measure="local_gains")  # the same checks as an atlas of it
    _check_memory(grid.conditions())
    stack = Stack(cell_for(cell, init, steps), layers, hidden, hidden)
    out = {}
    for scale in input_scales:
        params, xs = _sweep.seed_problem(stack, seed, steps=steps, batch=batch,
                                         dtype=jnp.float32, input_scale=scale)
        g = _jac.local_gains(stack, params, xs)
        h = np.asarray(stack.apply(params, xs).states["h"], np.float64)  # (L, B, T, H)
        out[float(scale)] = {
            "vertical_rms": np.asarray(g.vertical_rms).mean(axis=1).tolist(),
            "temporal_rms": np.asarray(g.temporal_rms).mean(axis=1).tolist(),
            "temporal_spectral": np.asarray(g.temporal_spectral).mean(axis=1).tolist(),
            "one_minus_h2": (1.0 - h ** 2).mean(axis=(1, 2, 3)).tolist(),
            "rms_h": np.sqrt((h ** 2).mean(axis=(1, 2, 3))).tolist()}
    return out


#: The keys of a condition, in the order tables name them (:data:`FACTORS`, the size as its
#: layers and steps, and the settings a grid's conditions may differ in).
CONDITION_KEYS = ("cell", "init", "input_scale", "hidden", "layers", "steps", "loss", "wrt",
                  "batch", "measure", "dtype", "readout_seed")


def varied(results: dict) -> tuple:
    """The :data:`CONDITION_KEYS` whose value differs between the conditions of ``results``
    (the cell always): what tells its conditions apart."""
    every = [c for res in results.values() for c in res.config["conditions"]]
    return tuple(k for k in CONDITION_KEYS
                 if k == "cell" or len({json.dumps(c.get(k), default=str) for c in every}) > 1)


def median_text(s) -> str:
    """A condition's median over seeds, over the seeds where it is a number, with ``(NaN
    k/n)`` where k of the n are not (a median of the rest, which may be one seed's value)."""
    s = np.asarray(s, float)
    bad = int(np.count_nonzero(np.isnan(s)))
    median = np.nanmedian(s) if bad < s.size else float("nan")
    return f"{median:.3g}" + (f" (NaN {bad}/{s.size})" if bad else "")


def table(results: dict, factors=None) -> str:
    """A Markdown table: one row per (claim, condition) with the median statistic over seeds
    (:func:`median_text`) and the fraction of seeds for which the claim holds; ``factors``
    (default: those that differ between the conditions, :func:`varied`) name the condition."""
    factors = varied(results) if factors is None else tuple(factors)
    lines = ["| claim | " + " | ".join(factors) + " | median statistic | holds (seeds) |",
             "|---" * (len(factors) + 3) + "|"]
    for name, res in results.items():
        for c, s, f in zip(res.config["conditions"], res.statistic, res.fraction):
            lines.append(f"| {name} | " + " | ".join(str(c.get(k, "-")) for k in factors)
                         + f" | {median_text(s)} | {f:.2f} |")
    return "\n".join(lines)


def pack(results: dict, meta: dict | None = None):
    """One :class:`gradflow.results.Result` (``kind="atlas"``) holding every claim's arrays as
    ``"<claim>/<array>"`` and their configs in ``config["claims"]``; :func:`unpack` inverts it.
    This is what ``gradflow reproduce`` and :func:`save` write."""
    from gradflow.results import make_result

    arrays = {f"{n}/{k}": v for n, r in results.items() for k, v in r.arrays.items()}
    return make_result("atlas", arrays, {**(meta or {}),
                                         "claims": {n: r.config for n, r in results.items()}},
                       warn=False)


def unpack(data) -> dict:
    """``{claim: Result}`` from a :func:`pack` result."""
    from gradflow.results import make_result

    return {n: make_result("atlas", {k.split("/", 1)[1]: v for k, v in data.arrays.items()
                                     if k.split("/", 1)[0] == n}, cfg, warn=False)
            for n, cfg in data.config["claims"].items()}


def save(results: dict, stem) -> tuple[str, str]:
    """Write ``stem.npz`` (:func:`pack`: a :class:`gradflow.results.Result` file) and
    ``stem.json`` (each claim's config, for reading). Returns both paths; :func:`load` reads
    them back."""
    stem = os.fspath(stem)
    pack(results).save(stem + ".npz")
    try:
        with open(stem + ".json", "w") as f:
            json.dump({n: r.config for n, r in results.items()}, f, indent=1)
    except OSError as e:  # (as Result.save says of its file)
        raise InputError(f"cannot write {stem + '.json'!r}: {e.strerror or e}") from e
    return stem + ".npz", stem + ".json"


def load(stem) -> dict:
    """``{claim: Result}`` written by :func:`save` (or by ``gradflow reproduce``)."""
    from gradflow.results import load as load_result

    stem = os.fspath(stem)
    return unpack(load_result(stem if stem.endswith(".npz") else stem + ".npz"))


# ---------------------------------------------------------------------------------------------
# The claims (SPEC section 4)

for _c in (
    Claim("rnn_amplified", "vRNN: r[bottom, first] >= 2 (the figure shows 2.7x / 4.6x)",
          ("rnn",), bottom_first, lambda s: s >= 2.0, where=_MAPS),
    Claim("rnn_amplified_decade", "vRNN: r[bottom, first] >= 10 ('orders of magnitude')",
          ("rnn",), bottom_first, lambda s: s >= 10.0, where=_MAPS),
    Claim("lstm_collapses", "LSTM: median r over layers below the top two <= 0.1",
          ("lstm",), median_below_top2, lambda s: s <= 0.1, where=_MAPS, min_layers=3),
    Claim("star_preserved", "STAR: share of the map with r in [0.1, 10] >= 0.8",
          ("star",), share_within_decade, lambda s: s >= 0.8, where=_MAPS),
):
    register_claim(_c)


# Item 2: vertical gains at initialisation against their closed forms.


def median_vertical_gain(gains: dict) -> float:
    r"""Median over every ``(l, t)`` of the vertical RMS gain
    :math:`\|\partial h^l_t/\partial x^l_t\|_F/\sqrt{H}` (``gains``: one seed's
    :func:`gradflow.local_gains` arrays)."""
    return float(np.median(np.asarray(gains["vertical_rms"], np.float64)))


def _within(closed: float, tol: float = 0.1):
    return lambda s: abs(s / closed - 1.0) <= tol


for _name, _cells, _closed, _why in (
        ("rnn_vertical_one", ("rnn",), 1.0, "tanh'(0) |W|_rms, W orthogonal"),
        ("lstm_vertical_quarter", ("lstm",), 0.25, "o i tanh'(0) = sigma(0)^2"),
        ("gru_vertical_half", ("gru",), 0.5, "(1 - z) = 1 - sigma(0)"),
        ("mgu_vertical_half", ("mgu",), 0.5, "f = sigma(0)"),
        ("star_vertical_half", ("star",), 0.5, "k = sigma(0)")):
    register_claim(Claim(_name, f"median vertical RMS gain within 10% of {_closed} ({_why})",
                         _cells, median_vertical_gain, _within(_closed), reads="local_gains"))


# Item 3 at initialisation (Gu et al.): timescales and saturation of the forget-type gates.


def timescale_decades(gate: str):
    """``gates -> log10(max / min)`` of the per-unit memory timescales ``1/(1 - kept)`` of
    ``gate`` over every layer and unit (``"timescale/{gate}/unit"``: ``(L, H)``); NaN if a
    timescale is not finite and positive, or a value of ``gate`` is not finite."""
    def stat(gates: dict) -> float:
        ts = np.asarray(gates[f"timescale/{gate}/unit"], np.float64)
        if _overflowed(gates, (gate,)) or not np.all(np.isfinite(ts)) or ts.min() <= 0:
            return float("nan")
        return float(np.log10(ts.max() / ts.min()))
    stat.__name__, stat.gates = f"timescale_decades_{gate}", (gate,)
    return stat


def _overflowed(gates: dict, gates_: tuple) -> bool:
    """Whether any value of ``gates_`` is not finite (``"nonfinite/{g}/pooled"``): a gate
    claim then has no reading (NaN, "does not hold"), as a map claim on a non-finite map.
    :func:`gradflow.gates.saturation`'s shares are over the finite values, which describe
    a forward pass that overflowed, not the condition's gates."""
    return any(int(gates[f"nonfinite/{g}/pooled"]) for g in gates_)


def saturated_share(gates_: tuple):
    """``gates -> `` the share of ``gates_``'s activations with :math:`a < 0.05` or
    :math:`a > 0.95` (values outside [0, 1] included), pooled over those gates, every layer,
    step, example and unit (``"saturated/{g}/pooled"``; each gate has as many entries); NaN
    if any is not finite."""
    def stat(gates: dict) -> float:
        if _overflowed(gates, gates_):
            return float("nan")
        return float(np.mean([float(gates[f"saturated/{g}/pooled"]) for g in gates_]))
    stat.__name__, stat.gates = "saturated_share_" + "_".join(gates_), tuple(gates_)
    return stat


def outside_share(gates_: tuple):
    """``gates -> `` the share of ``gates_``'s activations outside their range ([0, 1]; a tanh
    gate's [-1, 1], :func:`gradflow.gates.value_range`; Cheng et al.'s refined gates leave
    [0, 1]), from the histogram and ``outside`` counts; NaN if any is not finite."""
    def stat(gates: dict) -> float:
        if _overflowed(gates, gates_):
            return float("nan")
        out = sum(np.asarray(gates[f"outside/{g}/pooled"], np.int64) for g in gates_)
        total = sum(int(np.sum(gates[f"hist/{g}/pooled"])) for g in gates_) + int(out.sum())
        return float(out[0] + out[1]) / total
    stat.__name__, stat.gates = "outside_share_" + "_".join(gates_), tuple(gates_)
    return stat


def saturation_gain(gate: str, base: str):
    """``gates -> `` saturated share of ``gate`` minus that of ``base`` (e.g. UR-LSTM's
    effective gate ``g`` against its forget gate ``f``); NaN if either has a value that is not
    finite."""
    def stat(gates: dict) -> float:
        if _overflowed(gates, (gate, base)):
            return float("nan")
        return float(gates[f"saturated/{gate}/pooled"]) - float(gates[f"saturated/{base}/pooled"])
    stat.gates = (gate, base)
    return stat


for _c in (
    Claim("ugi_timescales_two_decades", "forget-gate timescales 1/(1-f) per unit span >= 2 "
          "decades (max/min over layers and units)", ("lstm", "ur_lstm"),
          timescale_decades("f"), lambda s: s >= 2.0, reads="gates"),
    Claim("ur_effective_two_decades", "UR-LSTM: effective-gate timescales 1/(1-g) span >= 2 "
          "decades", ("ur_lstm",), timescale_decades("g"), lambda s: s >= 2.0, reads="gates"),
    Claim("lstm_forget_not_saturated", "LSTM: share of f < 0.05 or > 0.95 <= 0.1",
          ("lstm",), saturated_share(("f",)), lambda s: s <= 0.1, reads="gates"),
    Claim("ur_effective_more_saturated", "UR-LSTM: the effective gate g is saturated more "
          "often than f (share of < 0.05 or > 0.95, g minus f, > 0)", ("ur_lstm",),
          saturation_gain("g", "f"), lambda s: s > 0.0, reads="gates"),
):
    register_claim(_c)


# Item 4 (Cheng et al.): refined vs vanilla gates, maps and gate ranges.


def bottom_layer_kept(values) -> float:
    """Median over steps of :math:`r[0, t]` (the bottom layer relative to the top-last entry);
    NaN if ``r`` is (a non-finite or zero top-last value) or any bottom entry is not finite
    (an inf entry, which a median would pass over)."""
    bottom = ratio(values)[0]
    return float(np.median(bottom)) if np.all(np.isfinite(bottom)) else float("nan")


register_claim(Claim("bottom_layer_kept", "median r over the bottom layer in [0.1, 10] (kept: "
                     "neither vanished nor exploded)",
                     ("lstm", "gru", "mgu", "refined_lstm", "refined_gru", "refined_mgu"),
                     bottom_layer_kept, lambda s: 0.1 <= s <= 10.0, where=_MAPS))
for _fam, _gs in (("lstm", ("i", "o")), ("gru", ("r", "z")), ("mgu", ("f",))):
    _which = ", ".join(_gs)
    register_claim(Claim(f"{_fam}_gates_outside_unit", f"{_fam.upper()} gates {_which}: share of "
                         "values outside [0, 1] >= 0.05", (_fam, f"refined_{_fam}"),
                         outside_share(_gs), lambda s: s >= 0.05, reads="gates"))
    register_claim(Claim(f"{_fam}_gates_saturated", f"{_fam.upper()} gates {_which}: share of "
                         "values < 0.05 or > 0.95 (outside [0, 1] included) >= 0.5",
                         (_fam, f"refined_{_fam}"), saturated_share(_gs), lambda s: s >= 0.5,
                         reads="gates"))


__all__ = ["CLAIMS", "Claim", "CONDITION_KEYS", "FACTORS", "Grid", "MEASUREMENTS",
           "Measurement", "atlas",
           "bottom_first", "cell_for", "condition_key", "get_claims", "load", "measure",
           "measure_group", "measure_of", "mechanism", "median_below_top2", "plan",
           "median_vertical_gain", "outside_share", "pack", "parse_cell", "ratio",
           "register_claim", "register_measurement", "saturated_share", "saturation_gain",
           "save", "share_within_decade", "table", "timescale_decades", "unpack",
           "bottom_layer_kept", "varied", "median_text"]
