"""Recurrent cells behind one interface, and their registry.

>>> import gradflow
>>> gradflow.cells.names()[:4]
('g_lstm', 'gru', 'indrnn', 'lstm')
>>> cell = gradflow.cells.get("lstm", forget_bias=1.0)

Adding a cell is one file (a factory decorated with :func:`gradflow.cells.base.factory`, returning
a :class:`Cell` that declares its gates, states and time gate) and one line in ``_REGISTRY``.
"""
from __future__ import annotations

import json

from gradflow.cells import adapters, mechanisms, pytorch
from gradflow.cells.adapters import (from_equinox, from_function, from_linen, from_nnx,
                                     stack_params)
from gradflow.cells.base import Cell, factory, parse_init
from gradflow.cells.gru import gru, mgu, refined_gru, refined_mgu, ur_gru
from gradflow.cells.lstm import lstm, on_lstm, refined_lstm, ur_lstm
from gradflow.cells.simple import indrnn, rnn
from gradflow.cells.star import star
from gradflow.cells.timegate import g_lstm, phased_lstm

_REGISTRY = {
    "rnn": rnn,
    "lstm": lstm,
    "gru": gru,
    "mgu": mgu,
    "star": star,
    "ur_lstm": ur_lstm,
    "ur_gru": ur_gru,
    "refined_lstm": refined_lstm,
    "refined_gru": refined_gru,
    "refined_mgu": refined_mgu,
    "g_lstm": g_lstm,
    "phased_lstm": phased_lstm,
    "indrnn": indrnn,
    "on_lstm": on_lstm,
}


def names() -> tuple[str, ...]:
    """Every registered cell name, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name, **options) -> Cell:
    """The cell ``name`` built with ``options`` (a ``Cell`` is passed through unchanged).

    Raises:
      ValueError: unknown name (the message lists the valid ones) or unknown/invalid option.
    """
    if isinstance(name, Cell):
        if options:
            raise ValueError("options cannot be given together with a Cell instance")
        return name
    if not isinstance(name, str):
        hint = adapters.adapter_hint("", name)  # a Flax/Equinox module given as it is
        if hint is not None:
            raise TypeError(f"a cell is a name or a gradflow Cell, got {hint} to wrap it")
        text = " ".join(repr(name).split())
        raise ValueError(f"unknown cell {text[:60] + '...' if len(text) > 60 else text}; a cell "
                         f"is a name or a gradflow Cell; valid cells: {', '.join(names())}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown cell {name!r}; valid cells: {', '.join(names())}")
    return _REGISTRY[name](**options)


def parse_spec(spec: str) -> tuple[str, dict]:
    """A cell written as text: ``"lstm:forget_bias=1.0,init=torch"`` -> ``("lstm",
    {"forget_bias": 1.0, "init": "torch"})``, values read as JSON where they are (numbers,
    ``true``/``false``), else kept as strings; a bare name has no options. The syntax of the
    atlas's cell factor and of ``gradflow compare --cells``.

    >>> gradflow.cells.parse_spec("lstm:forget_bias=1.0")
    ('lstm', {'forget_bias': 1.0})
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a cell is a name or 'name:option=value,...', got {spec!r}")
    name, _, rest = spec.partition(":")
    if name not in _REGISTRY and ":" in rest.partition("=")[0]:  # "mymod:factory:gain=0.5"
        attr, _, first = rest.partition(":")
        raise ValueError(f"cell spec {spec!r}: {name!r} is no registered cell; a factory of "
                         f"yours, {attr!r} in {name!r}, takes its options as --option "
                         f"KEY=VALUE (e.g. --cell {name}:{attr} --option "
                         f"{first.split(',')[0]})")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"cell spec {spec!r}: options are 'option=value' pairs")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        if key in options:  # (the last one won, without a word)
            raise ValueError(f"cell spec {spec!r}: option {key} is given twice "
                             f"({options[key]!r} and {value!r}); give it once")
        options[key] = value
    return name, options


def options_of(name: str) -> tuple[str, ...]:
    """The option names of the registered cell ``name`` (its factory's keyword arguments).

    >>> "forget_bias" in gradflow.cells.options_of("lstm")
    True
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown cell {name!r}; valid cells: {', '.join(names())}")
    return tuple(_REGISTRY[name].valid_options)


def is_spec(text: str) -> bool:
    """Whether ``text`` is written as a cell with options, ``"name:option=value,..."`` (not a
    user's ``"module:factory"``, whose part after the colon is a name, never ``key=value``)."""
    if not isinstance(text, str):
        raise TypeError(f"a cell spec is a string such as 'lstm:forget_bias=1.0', got "
                        f"{type(text).__name__}")
    _, colon, rest = text.partition(":")
    return bool(colon) and "=" in rest


def for_length(cell, steps: int, /, **options) -> Cell:
    """:func:`get`, with the cell's ``length_option`` (g-LSTM's ``steps``: its time gates are
    initialised over the sequence) set to ``steps`` unless ``options`` set it. ``cell`` may be
    written with its options (``"lstm:forget_bias=1.0"``, :func:`parse_spec`): those win over
    ``options``.

    >>> gradflow.cells.for_length("g_lstm", 50).config["steps"]
    50
    >>> dict(gradflow.cells.for_length("lstm:forget_bias=1.0", 9, forget_bias=2.0).options)[
    ...     "forget_bias"]
    1.0
    """
    if isinstance(cell, str) and is_spec(cell):
        cell, own = parse_spec(cell)
        options = {**options, **own}
    if isinstance(cell, Cell):
        return get(cell, **options)
    built = get(cell)
    if built.length_option is not None and built.length_option not in options:
        options[built.length_option] = int(steps)
    return get(cell, **options)


__all__ = ["Cell", "factory", "for_length", "get", "names", "options_of", "parse_spec", "is_spec",
           "mechanisms", "pytorch",
           "parse_init", "from_function", "from_linen", "from_nnx", "from_equinox",
           "stack_params"] + list(_REGISTRY)
