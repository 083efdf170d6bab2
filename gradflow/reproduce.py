"""The committed figures: their configs (package data), the registry of figure kinds, and
:func:`reproduce`, which regenerates them into an output folder.

Every committed figure is a JSON config in ``gradflow/figure_configs/`` (shipped with the
package, so an installed gradflow can reproduce it) naming its kind in the ``"figure"`` field
and holding everything that produced it (cells, sizes, seeds, losses, ...). A kind is a
:class:`Builder`, two pure functions::

    compute(config: dict) -> Result          # the numbers (gradflow.experiments)
    draw(config: dict, data: Result) -> Figure   # the picture (gradflow.plot)

registered under a name with :func:`register`; adding a figure kind is one function pair and one
``register`` line, adding a figure of an existing kind is one JSON file. :func:`reproduce` writes
``<name>.png`` and ``<name>.npz`` (a :class:`gradflow.results.Result`, so ``gradflow.load`` reads
the numbers back) into the folder it is given; the committed copies in a source checkout's
``figures/`` (:data:`FIGURES_DIR`) are only written over with ``update=True``, from the
shipped configs.

>>> [name for name in ("atlas_star_fig2", "deep_adding", "star_fig2") if name in configs()]
['atlas_star_fig2', 'deep_adding', 'star_fig2']
>>> load_config("star_fig2")["figure"]
'gradient_grid'
"""
from __future__ import annotations

import functools
import inspect
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple

from gradflow import atlas, atlas_training, experiments, plot
from gradflow.errors import InputError, user_input
from gradflow.results import Result

#: The figure configs shipped with the package (``<name>.json``).
CONFIG_DIR = Path(__file__).resolve().parent / "figure_configs"
#: A source checkout's ``figures/`` folder: the committed PNGs and data (absent when installed).
FIGURES_DIR = Path(__file__).resolve().parent.parent / "figures"


class Builder(NamedTuple):
    """How to make one kind of figure from its config; ``keys``: the config keys it reads
    (besides :data:`COMMON_KEYS`), or None to accept any; ``drawn``: those of them only
    ``draw`` reads (a redraw may change them)."""

    compute: Callable[[dict], Result]
    draw: Callable[[dict, Result], object]
    keys: frozenset | None = None
    required: frozenset = frozenset()
    drawn: frozenset = frozenset()


BUILDERS: dict[str, Builder] = {}
#: Keys every figure config may hold: its kind, and words recorded with its data.
COMMON_KEYS = frozenset({"figure", "title", "description"})


def register(name: str, compute: Callable[[dict], Result],
             draw: Callable[[dict, Result], object], keys=None, required=None,
             drawn=None) -> Builder:
    """Register a figure kind: configs with ``"figure": name`` are built by these functions.
    ``keys`` (the config keys ``compute`` and ``draw`` read; ``compute.keys`` where it is a
    :func:`from_config`) let a config with any other key be refused, not run with it ignored;
    ``required`` (``compute.required`` where it is a :func:`from_config`) those it must hold;
    ``drawn`` (``compute.drawn`` where it is a :func:`from_config`) those only ``draw`` reads,
    which a redraw from data computed before may change."""
    keys = getattr(compute, "keys", None) if keys is None else keys
    required = getattr(compute, "required", ()) if required is None else required
    drawn = getattr(compute, "drawn", ()) if drawn is None else drawn
    BUILDERS[name] = Builder(compute, draw, None if keys is None else frozenset(keys),
                             frozenset(required), frozenset(drawn))
    return BUILDERS[name]


def check_keys(config: dict, where: str) -> dict:
    """``config`` if its kind's builder reads every key it holds, else a ValueError naming the
    unknown keys and the valid ones (``where``: the config's name or path, for the message): a
    misspelt size would otherwise be recorded as a note and the figure computed at the
    default."""
    builder = BUILDERS.get(config.get("figure"))
    if builder is None:
        return config
    missing = sorted(builder.required - set(config))
    if missing:
        raise ValueError(f"figure config {where}: a {config['figure']} figure needs "
                         f"{', '.join(map(repr, missing))}, which it lacks")
    if builder.keys is None:
        return config
    unknown = sorted(set(config) - builder.keys - COMMON_KEYS)
    if unknown:
        raise ValueError(f"figure config {where}: unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} for a {config['figure']} figure; "
                         f"valid: {', '.join(sorted(builder.keys | COMMON_KEYS))}")
    return config


def from_config(fn: Callable[..., Result], keys: tuple, first: str | None = None,
                drawn: tuple = ()):
    """A ``Builder.compute`` calling ``fn([config[first],] **{k: config[k] for k in keys},
    meta=rest)``: the config keys ``fn`` takes are passed (where present), every other key
    (``figure``, ``title``, ``description``, the drawing options ``drawn``) is recorded as
    ``meta``. Its ``keys`` attribute names every key it and the drawing read, its ``drawn``
    attribute those only the drawing reads."""
    taken = set(keys) | ({first} if first is not None else set())

    def compute(config: dict) -> Result:
        meta = {k: v for k, v in config.items() if k not in taken}
        args = (config[first],) if first is not None else ()
        return fn(*args, **{k: config[k] for k in keys if k in config}, meta=meta)

    compute.keys = frozenset(taken | set(drawn))
    compute.drawn = frozenset(drawn)
    compute.required = frozenset({first} - {None}) | {
        k for k, p in inspect.signature(fn).parameters.items()
        if k in keys and p.default is inspect.Parameter.empty}
    return compute


_SIZES = ("layers", "steps", "hidden", "batch", "seed", "dtype")
register("gradient_grid",
         from_config(experiments.gradient_grid,
                     ("cells", "losses", "wrt", *_SIZES, "readout_seed", "init", "input_scale",
                      "cell_options"), drawn=("normalize", "color_range")),
         lambda config, data: plot.draw_grid(data, normalize=bool(config.get("normalize", False)),
                                             title=config.get("title"),
                                             color_range=config.get("color_range")))
register("vertical_gain",
         from_config(experiments.vertical_gain, ("cells", *_SIZES, "init", "input_scale")),
         lambda config, data: plot.draw_gains(data, title=config.get("title")))
register("gate_saturation",
         from_config(experiments.gate_saturation, (*_SIZES, "input_scale", "eps", "bins"),
                     "entries", drawn=("gates",)),
         lambda config, data: plot.draw_saturation(data, config.get("gates"),
                                                   title=config.get("title")))
register("training_runs",
         from_config(experiments.training_runs,
                     ("task", "task_options", "layers", "hidden", "steps", "batch", "lr", "clip",
                      "seed", "seeds", "dtype", "eval_every", "eval_batch", "record",
                      "record_batch", "eps", "bins"), "runs", drawn=("gates",)),
         lambda config, data: plot.draw_training(data, config.get("gates"),
                                                 title=config.get("title")))

register("atlas",
         lambda config: atlas.pack(atlas.atlas(config["claims"], config["grid"]),
                                   {k: v for k, v in config.items() if k != "claims"}),
         lambda config, data: plot.draw_atlas(
             atlas.unpack(data), config.get("rows", "input_scale"), config.get("cols", "init"),
             title=config.get("title")),
         keys=("claims", "grid", "rows", "cols"), required=("claims", "grid"),
         drawn=("rows", "cols"))
register("training_atlas", atlas_training.training_atlas,
         lambda config, data: plot.draw_training_atlas(data, title=config.get("title")),
         keys=atlas_training.CONFIG_KEYS)


# ---------------------------------------------------------------------------------------------
# Configs


def configs(directory=None) -> dict[str, Path]:
    """``{name: path}`` of the figure configs (``*.json`` holding an object with a
    ``"figure"`` field) in ``directory`` (default :data:`CONFIG_DIR`), sorted by name; other
    JSON files there (a list, a result's metadata) are not configs and are passed over."""
    directory = Path(CONFIG_DIR if directory is None else directory)
    if not directory.is_dir():
        raise ValueError(f"figure config directory {str(directory)!r} does not exist")
    found = {}
    for path in sorted(directory.glob("*.json")):  # each read once; a file that is not JSON
        text = _read_json(path)  # is reported, as a config written wrongly would be
        if isinstance(text, dict) and "figure" in _checked(text, path):
            found[path.stem] = path
    return found


def load_config(path) -> dict:
    """A figure config from a JSON file, or by name (``"star_fig2"``: the shipped config);
    a ValueError when unreadable or of an unknown kind."""
    path = Path(path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{path}.json"
    return _checked(_read_json(path), path)


def _read_json(path: Path):
    """``path``'s JSON value; a ValueError naming the file when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not text (UnicodeDecodeError)
        raise ValueError(f"cannot read figure config {str(path)!r}: {e}") from None


def _checked(config, path: Path) -> dict:
    """``config`` read from ``path``, checked as a figure config (an object, a known kind,
    known keys)."""
    if not isinstance(config, dict):
        raise ValueError(f"figure config {str(path)!r} must hold a JSON object")
    kind = config.get("figure")
    if kind is not None and kind not in BUILDERS:
        raise ValueError(f"figure config {str(path)!r} names unknown figure kind {kind!r}; "
                         f"known: {', '.join(sorted(BUILDERS))}")
    return check_keys(config, repr(str(path)))


def _known(names, found: dict) -> list[str]:
    """``names`` (one, several, or None for all of ``found``), each one of ``found``."""
    names = list(found) if names is None else [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in found:
            raise ValueError(f"unknown figure {name!r}; valid: {', '.join(found) or '(none)'}")
    return names


# ---------------------------------------------------------------------------------------------
# Data and reproduction


def data_path(name: str, data_dir=None) -> Path:
    """Where figure ``name``'s data is: ``<data_dir>/<name>.npz`` (default the committed
    :data:`FIGURES_DIR`)."""
    return Path(FIGURES_DIR if data_dir is None else data_dir) / f"{name}.npz"


def figure_data(name: str, config_dir=None, data_dir=None, **overrides) -> Result:
    """The data of figure ``name``: without ``overrides``, the committed ``<name>.npz`` in
    ``data_dir`` (default :data:`FIGURES_DIR`, a source checkout's ``figures/``); with them, the
    config with those keys replaced, computed now (e.g. ``figure_data("deep_adding", steps=20,
    layers=2)`` for a quick run).

    Raises:
      ValueError: unknown figure (the message lists the valid ones), or its data missing.
    """
    found = configs(config_dir)
    _known(name, found)
    if not overrides:
        path = data_path(name, data_dir)
        if not path.exists():
            raise ValueError(f"figure {name!r} has no data at {str(path)!r}: run gradflow "
                             f"reproduce --only {name} --out DIR and pass data_dir=DIR")
        with user_input():  # (a damaged or foreign file: the user's to replace)
            return Result.load(path)
    config = check_keys({**load_config(found[name]), **overrides},
                        f"{name!r} with {', '.join(sorted(overrides))} given")
    if "description" in config and "description" not in overrides:  # (the figure's setting)
        config["description"] += (" [the committed figure's setting; changed here: "
                                   + ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items()))
                                   + "]")
    return BUILDERS[config["figure"]].compute(config)


def build(config: dict) -> tuple[Result, object]:
    """``(data, figure)`` for one config."""
    builder = BUILDERS[check_keys(config, "given")["figure"]]
    data = builder.compute(config)
    return data, builder.draw(config, data)


def _target(out_dir, update: bool, config_dir=None) -> Path:
    """The folder :func:`reproduce` writes to; refuses the committed figures without update,
    and with configs other than the shipped ones (``config_dir``)."""
    if out_dir is None:
        if not update:
            raise ValueError("reproduce needs an output folder (out_dir); to write over the "
                             f"committed figures in {str(FIGURES_DIR)!r} pass update=True")
        if not FIGURES_DIR.is_dir():  # (an installed package: no checkout's figures/)
            raise InputError(f"update=True (--update) replaces a source checkout's committed "
                             f"figures, {str(FIGURES_DIR)!r}, which this installation does not "
                             "have: write to a folder of yours (out_dir, --out DIR)")
        out_dir = FIGURES_DIR
    target = Path(out_dir)
    if not target.is_dir():
        raise InputError(f"output directory {str(target)!r} does not exist")
    committed = FIGURES_DIR.is_dir() and target.resolve() == FIGURES_DIR.resolve()
    if committed and not update:
        raise ValueError(f"{str(target)!r} holds the committed figures; write elsewhere, or "
                         "pass update=True to replace them")
    if committed and config_dir is not None and (
            Path(config_dir).resolve() != CONFIG_DIR.resolve()):
        raise ValueError(f"the committed figures in {str(target)!r} are made from the shipped "
                         f"configs, not those in {str(config_dir)!r}: write these to a folder "
                         "of yours (out_dir)")
    return target


#: The config keys a figure's data records in another form than its config gives them, by figure
#: kind, and how to read the config's form back from the data's config: an atlas's and a
#: training atlas's ``claims`` (their names) are ``{name: the claim's config}`` in the data; a
#: training_runs figure's ``runs`` (``[label, cell, options(, training)]``) are ``{label: the
#: run's resolved config}``, the runs as given kept in ``runs_spec`` (each with its training
#: options, ``{}`` where it had none; :func:`_as_given` pads the config's the same way; data
#: without ``runs_spec`` cannot show its runs were the config's, and is refused).
_RECORDED_AS = {
    ("atlas", "claims"): lambda recorded: list(recorded["claims"]),
    ("training_atlas", "claims"): lambda recorded: list(recorded["claims"]),
    ("training_runs", "runs"): lambda recorded: recorded.get("runs_spec"),
}


def _as_given(kind: str, key: str, value):
    """``value`` of config ``key`` in the form the data records it (see :data:`_RECORDED_AS`):
    a training_runs figure's runs without training options get ``{}``."""
    if (kind, key) == ("training_runs", "runs") and isinstance(value, list):
        return [[*r, {}] if isinstance(r, list) and len(r) == 3 else r for r in value]
    return value


def _difference(a, b, where: str = ""):
    """``(where, a', b')``: the first place where the JSON values ``a`` and ``b`` differ
    (``where`` extended by ``"[i]"`` and ``".key"`` into lists and objects) and their values
    there, or None when equal. Numbers compare as numbers (``2`` is ``2.0``; a bool is not
    ``1``); an object's keys as a set."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        found = (_difference(a[k], b[k], f"{where}.{k}") for k in a)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        found = (_difference(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    else:
        if isinstance(a, bool) or isinstance(b, bool):
            same = a is b
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            same = a == b
        else:
            same = type(a) is type(b) and a == b
        return None if same else (where, a, b)
    return next((d for d in found if d is not None), None)


def _check_drawn_data(name: str, config: dict, data: Result) -> None:
    """An InputError where the data to redraw was computed with other settings than ``config``
    holds (a config of ``--figures DIR`` edited, its data still the shipped one's): its title
    would name cells and sizes its panels do not show. Every key both hold is compared, nested
    values throughout and numbers as numbers, except :data:`COMMON_KEYS` and the keys only the
    drawing reads (``Builder.drawn``: a redraw is for changes to the drawing); the keys the
    data records in another form (:data:`_RECORDED_AS`) are compared in the config's."""
    kind = config["figure"]
    recorded = json.loads(json.dumps(data.config))
    found = {}
    for k in sorted(set(config) & set(recorded) - COMMON_KEYS - BUILDERS[kind].drawn):
        read = _RECORDED_AS.get((kind, k))
        theirs = recorded[k] if read is None else read(recorded)
        found[k] = _difference(theirs, _as_given(kind, k, json.loads(json.dumps(config[k]))),
                               k)
    differ = [k for k, d in found.items() if d is not None]
    if differ:
        where, theirs, ours = found[differ[0]]
        raise InputError(f"figure {name!r}: its committed data was computed with other settings "
                         f"than its config holds ({', '.join(differ)}; {where}: the data's "
                         f"{json.dumps(theirs)[:60]}, the config's {json.dumps(ours)[:60]}): "
                         "compute it (leave out --redraw)")


def reproduce(names=None, out_dir=None, *, update: bool = False, config_dir=None,
              log: Callable[[str], None] = print,
              progress: Callable[[str], None] = functools.partial(print, flush=True),
              dpi: float = 150, redraw: bool = False, data_dir=None) -> list[str]:
    """Regenerate figures from their configs: ``<name>.npz`` and ``<name>.png`` each, in
    ``out_dir``.

    Args:
      names: a name or list of names (default: every config in ``config_dir``).
      out_dir: an existing folder to write to. Required, unless ``update``.
      update: allow writing over the committed figures (:data:`FIGURES_DIR`, the default
        ``out_dir`` then), from the shipped configs only.
      config_dir: where the ``*.json`` configs are (default :data:`CONFIG_DIR`); figures from
        others are written to an ``out_dir`` of one's own, never over the committed ones.
      log: called with one line per written file (``"wrote <path>"``).
      progress: called before and after each figure (name, kind, seconds).
      redraw: compute nothing: draw each figure again from its committed data
        (``figures/<name>.npz``, :func:`figure_data`) and write only ``<name>.png`` (after a
        change to the drawing); an InputError where the data was computed with other
        settings than its config holds (an edited config of ``config_dir``; its drawing
        options may differ).
      data_dir: with ``redraw``, where the data is (default :data:`FIGURES_DIR`, the committed
        data): e.g. an ``out_dir`` of an earlier call.
    Returns:
      The written paths.
    """
    found = configs(config_dir)
    if not found:
        raise ValueError(f"no figure configs (*.json with a 'figure' field) in "
                         f"{str(config_dir or CONFIG_DIR)!r}")
    if data_dir is not None and not redraw:
        raise ValueError("data_dir is where redraw reads the data; computing writes to out_dir")
    names = _known(names, found)
    target = _target(out_dir, update, config_dir)
    written = []
    for i, name in enumerate(names, 1):
        config = load_config(found[name])
        progress(f"[{i}/{len(names)}] {name} ({config['figure']}): "
                 + (("drawing its committed data ..." if data_dir is None else
                     f"drawing its data in {str(data_dir)!r} ...") if redraw else "computing ..."))
        start = time.perf_counter()
        builder = BUILDERS[config["figure"]]
        if redraw:
            data = figure_data(name, config_dir=config_dir, data_dir=data_dir)
            _check_drawn_data(name, config, data)
            paths = ()
        else:
            data = builder.compute(config)
            # The data first: a figure that cannot be drawn must not cost the computation.
            paths = (data.save(target / f"{name}.npz"),)
        for path in (*paths,
                     plot.save(builder.draw(config, data), target / f"{name}.png", dpi=dpi)):
            written.append(str(path))
            log(f"wrote {path}")
        progress(f"[{i}/{len(names)}] {name}: done in {time.perf_counter() - start:.1f} s")
    return written


__all__ = ["BUILDERS", "Builder", "CONFIG_DIR", "FIGURES_DIR", "build", "configs", "figure_data",
           "from_config", "load_config", "register", "reproduce"]
