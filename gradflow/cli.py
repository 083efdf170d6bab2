"""The ``gradflow`` command line: ``heatmap``, ``compare``, ``gates``, ``cells``, ``reproduce``,
``train``, ``atlas``.

Each subcommand is a pair: ``add_<command>(subparsers)`` declares its options (the shared
groups, problem sizes, measurement and outputs, are written once), and ``run_<command>(args)``
checks what argparse cannot, calls one gradflow function, and prints. Nothing heavy is imported
at the top: ``gradflow --help`` and ``gradflow COMMAND --help`` answer without loading JAX or
matplotlib.

Errors: bad input (a :class:`UsageError` here, or a :class:`gradflow.errors.InputError` from
gradflow's own checks), and an output the machine would not take (a full disk, a quota, no
permission), get one line ``gradflow <command>: error: ...`` on stderr and exit status 2; an
unexpected exception is a bug in gradflow: one line naming it, with a pointer to ``--debug``
(which prints the traceback), and exit status 1; Ctrl-C ends with one line and exit status
130. When stdout's reader goes away (``| head``), the printing stops quietly, the command
still writes its files, and the exit status is 141 (as for a program ended by SIGPIPE).
Figures and data go to ``gradflow-out/`` unless ``--out``/``--data`` say otherwise, named
after the settings that differ from the defaults, and every path written is printed.
``main(argv)`` returns the exit status, so the CLI can be driven in-process (tests, notebooks)
as well as from the ``gradflow`` script.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import importlib
import json
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import textwrap
import traceback
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from gradflow import __version__
from gradflow.errors import InputError, user_input
from gradflow.results import (NonFiniteForwardWarning, NonFiniteWarning, fingerprint,
                              not_measured, origin)
from gradflow.views import entry_step, finite_row_means

DEFAULT_OUT_DIR = "gradflow-out"
DATA_EXT = ".npz"
# The vocabularies the parser offers, written here so that --help needs no JAX; each equals
# its source (tests/test_cli.py checks): plot.FORMATS, jacobian.LOSSES, jacobian.WRTS,
# problem.DTYPES, tasks.names(), the Stack's norms.
FORMATS = (".png", ".pdf", ".svg")
LOSSES = ("last", "all")
WRTS = ("hidden", "cell", "params")
DTYPES = ("float32", "float64")
TASKS = ("adding", "copy", "counting", "digits")
NORMS = ("layer", "rms")
MATMUL_PRECISIONS = ("highest", "high", "default")


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise :class:`UsageError` (one line, no usage dump, no exit)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")

    def _get_option_tuples(self, option_string):
        # an abbreviation matching two spellings of one option (--ou: --out, --out-dir) is
        # that option, not "ambiguous"
        tuples, actions = super()._get_option_tuples(option_string), set()
        return [t for t in tuples if not (id(t[0]) in actions or actions.add(id(t[0])))]

    def _print_message(self, message, file=None):
        # argparse's own drops an OSError: `gradflow --help > /dev/full` exited 0 with nothing
        # written; here it reaches main, which says so and exits 2
        file = file or sys.stderr
        if message and file is not None:  # (None: a program started without stderr)
            file.write(message)


def _usage(args, message: str) -> UsageError:
    return UsageError(f"gradflow {args.command}: error: {message}")


# ---------------------------------------------------------------------------------------------
# Argument types: each turns a string into a checked value or raises ArgumentTypeError.


def positive_int(text: str) -> int:
    """An integer >= 1 (``"3"``; not ``"0"``, ``"-2"``, ``"2.5"``, ``"x"``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def device_count(text: str) -> int:
    """:func:`positive_int` up to ``max(64, 8 x the CPU cores)``: a typo of 4000 made 4000
    simulated devices (7 s and 630 MB before anything ran; 100000 never finished)."""
    value = positive_int(text)
    cores = os.cpu_count() or 1
    if value > max(64, 8 * cores):
        raise argparse.ArgumentTypeError(
            f"{value} devices: at most {max(64, 8 * cores)} (8 per CPU core, 64 at least; "
            f"this machine has {cores} cores); more only cost memory and start-up time")
    return value


def finite_float(text: str) -> float:
    """A finite number (``"0.5"``, ``"1e-3"``; not ``"nan"``, ``"inf"``, ``"x"``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def width(text: str) -> int:
    """A positive integer up to :data:`gradflow.checks.MAX_WIDTH` (a hidden or input size)."""
    return _within_max_width(positive_int(text))


def _within_max_width(value: int) -> int:
    from gradflow.checks import MAX_WIDTH

    if value > MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"{value} is beyond any machine (one {value} x {value} "
                                         f"matrix); widths go up to {MAX_WIDTH:,}")
    return value


def bin_count(text: str) -> int:
    """A positive integer up to :data:`gradflow.gates.MAX_BINS` (histogram bins)."""
    from gradflow.gates import MAX_BINS

    value = positive_int(text)
    if value > MAX_BINS:
        raise argparse.ArgumentTypeError(f"at most {MAX_BINS:,} bins, got {text!r}")
    return value


def hidden_sizes(text: str):
    """``"64"`` -> 64, or one width per layer ``"64,32,32"`` -> ``(64, 32, 32)``."""
    if "," not in text:
        return width(text)
    try:
        widths = tuple(positive_int(t) for t in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or one per layer (e.g. 64,32,32), got {text!r}") from None
    return tuple(_within_max_width(w) for w in widths)


def width_text(hidden) -> str:
    """``--hidden`` as typed: ``64`` or ``64,32,32``."""
    return ",".join(map(str, hidden)) if isinstance(hidden, (list, tuple)) else str(hidden)


def first_width(hidden) -> int:
    """The first layer's width of ``--hidden`` (an int or one per layer)."""
    return hidden if isinstance(hidden, int) else hidden[0]


def memory_size(text: str) -> int:
    """Bytes from ``"2G"``, ``"512M"``, ``"1.5GiB"`` or a plain number of bytes."""
    from gradflow.cost import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def checkpoint_arg(text: str):
    """``"auto"`` or a chunk length ``>= 1``."""
    if text == "auto":
        return "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto or a positive chunk length, got "
                                         f"{text!r}") from None


def seed_int(text: str) -> int:
    """An integer in ``[0, 2**31 - 1)`` (:func:`gradflow.checks.seed`)."""
    from gradflow import checks

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < checks.SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer below 2**31 - 1, got "
                                         f"{text!r}")
    return value


def cell_name(text: str) -> str:
    """A registered cell name (also written with its options, ``lstm:forget_bias=1.0``),
    ``module:attribute`` naming a user's cell (resolved by :func:`load_cell` when the command
    runs), or one of those per layer, comma-separated (:func:`layer_cells`)."""
    bad = _unknown_layer_cell(text)
    if bad == "":
        raise argparse.ArgumentTypeError(f"expected a cell, or one per layer separated by "
                                         f"commas (gru,star,gru), got {text!r}")
    if bad is not None:
        raise argparse.ArgumentTypeError(f"unknown cell {bad!r}; valid cells: "
                                         f"{_valid_cells()} (or module:factory)")
    return text


def _unknown_layer_cell(text: str) -> str | None:
    """The first of ``text``'s cells (:func:`layer_cells`) that is neither a registered name
    nor ``module:attribute`` (``""`` for an empty one), or None."""
    from gradflow import cells as _cells

    return next((c if c.strip() else "" for c in layer_cells(text)
                 if not c.strip() or (":" not in c and c not in _cells.names())), None)


def _valid_cells() -> str:
    from gradflow import cells as _cells

    return ", ".join(_cells.names())


def layer_cells(text: str) -> list[str]:
    """``--cell`` split into one cell per layer at its commas (or slashes, as ``compare
    --cells`` writes a stack: its commas separate the compared columns); an entry ``key=value``
    after a cell written with its options continues that cell's options (:func:`gradflow.cells.
    parse_spec`), so one cell with several options stays one; a cell ending in ``*N`` is N
    layers of it (quote it in a shell: ``--cell 'lstm*15,star'``). A stack as titles and
    summaries write it reads the same (``lstm x3 / star``: spaces around the separators, a
    run as `` xN``), so that a label printed can be typed back.

    >>> layer_cells("gru,star,gru"), layer_cells("lstm:forget_bias=1.0,init=torch,star")
    (['gru', 'star', 'gru'], ['lstm:forget_bias=1.0,init=torch', 'star'])
    >>> layer_cells("lstm*3,star"), layer_cells("lstm x3 / star")
    (['lstm', 'lstm', 'lstm', 'star'], ['lstm', 'lstm', 'lstm', 'star'])
    """
    cells = []
    for item in re.split(r"[,/]", text):
        item = item.strip()
        if cells and ":" in cells[-1] and "=" in item and ":" not in item:
            cells[-1] += "," + item
        else:
            cells.append(item)
    # (" xN" as titles write a run; not after a user's module:factory, a name of theirs)
    runs = [re.fullmatch(r"(.+?)\*([1-9][0-9]*)", c) or (
        re.fullmatch(r"(.+?) x([1-9][0-9]*)", c) if ":" not in c or "=" in c else None)
        for c in cells]
    return [c for c, m in zip(cells, runs) for c in ([m[1]] * int(m[2]) if m else [c])]


def _name_list(text: str, what: str, one: str, valid, also=lambda s: False,
               join=lambda items: items) -> list[str]:
    """The comma-separated ``text`` as distinct items, each in ``valid`` or ``also(item)``
    (``what``: the items, ``one``: one of them, as messages name them; ``join``: the pieces
    put back together where a comma belongs to an item)."""
    items = join([s.strip() for s in text.split(",")])
    if not text.strip() or any(not s for s in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got "
                                         f"{text!r}; valid: {', '.join(valid)}")
    for s in items:
        if s not in valid and not also(s):
            raise argparse.ArgumentTypeError(f"unknown {one} {s!r}; valid {what}: "
                                             f"{', '.join(valid)}")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise argparse.ArgumentTypeError(f"{what} repeated: {', '.join(dup)}")
    return items


def cell_list(text: str) -> list[str]:
    """``"rnn,lstm,star"``: registered cell names, a name with its options written in
    (``"lstm:forget_bias=1.0"``; ``"lstm:aux=refine,tied=True"``: a piece ``key=value`` after
    one is that cell's next option, no cell name holding ``=``), a user's ``module:factory``
    (resolved by :func:`load_cell` when the command runs), or a stack of registered cells,
    one per layer joined by ``/`` (``"lstm*15/star"``, :func:`layer_cells`), no repeats."""
    from gradflow import cells as _cells

    items = _name_list(text, "cells", "cell",
                       [*_cells.names(), "name:option=value", "module:factory",
                        "cell/cell/...", "cell*N"],
                       also=lambda s: ":" in s or _layered(s), join=_options_joined)
    for item in filter(_layered, items):
        bad = _unknown_layer_cell(item)
        if bad is not None:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected registered cells joined by / (lstm*15/star), got "
                f"{bad!r}; valid cells: {_valid_cells()}")
    return items


def _options_joined(pieces: list[str]) -> list[str]:
    """Comma-split cells put back together where a piece ``key=value`` continues the options
    of the cell before it (``["lstm:aux=refine", "tied=True", "star"]`` -> two cells)."""
    out = []
    for s in pieces:
        if out and "=" in s and ":" not in s and "/" not in s and ":" in out[-1]:
            out[-1] += "," + s
        else:
            out.append(s)
    return out


def _layered(text: str) -> bool:
    """Whether a ``compare --cells`` entry is a stack written one cell per layer."""
    return "/" in text or re.search(r"\*[0-9]+$", text) is not None


def path_list(text: str) -> list[str]:
    """``"runs/lstm,runs/star"``: comma-separated paths (read when the command runs), no
    repeats."""
    return _name_list(text, "paths", "path", ["run folders", ".npz files"],
                      also=lambda s: True)


def loss_list(text: str) -> list[str]:
    """``"last,all"`` (``task``: trained runs' own losses, ``compare --params``)."""
    return _name_list(text, "losses", "loss", LOSSES + ("task",))


def init_scheme(text: str) -> str:
    """An ``init`` string the cells understand (``orthogonal``, ``glorot+chrono``, ...)."""
    from gradflow.cells.base import parse_init

    try:
        parse_init(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def fraction(text: str) -> float:
    """A number strictly between 0 and 0.5 (a saturation margin)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 0.5), got {text!r}")
    return value


def option(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as JSON (``1.0``, ``true``, ``null``, ``["i","o"]``),
    else as a comma-separated list (``i,o``), else as a string (``nan`` and ``inf`` as the
    floats they name, which a number option then refuses by name)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. forget_bias=1.0), got {text!r}")
    return key, _value(raw.strip())


def _value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    if "," in raw:
        return [_value(part.strip()) for part in raw.split(",")]
    if raw.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(raw)
    return raw


def out_path(text: str) -> str:
    """An ``--out`` that names something: empty (an unset ``"$DIR"``) would write into, and
    clear files of, the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a folder or a file name (. for the "
                                         "current folder)")
    return text


def step_list(text: str) -> list[int]:
    """``"0,100,300"`` -> ``[0, 100, 300]`` (training steps, non-negative integers)."""
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers such as "
                                         f"0,100,300, got {text!r}") from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative step numbers, got {text!r}")
    return steps


# ---------------------------------------------------------------------------------------------
# A user's cell by import path


#: The code of the modules ``--cell module:factory`` loaded, as real paths: their files, and
#: the folder of each (of its top package: the helpers it imports); an exception raised there
#: (the user's ``init`` opening a file, a typo in a step) is the user's, not gradflow's.
USER_CODE: set = set()
_OURS = os.path.dirname(os.path.realpath(__file__)) + os.sep


def _add_user_code(module) -> None:
    """Count ``module``'s code as the user's (:data:`USER_CODE`): its file, and the folder of
    its top package or its own folder unless that holds gradflow or an installed library's
    (then the file alone); never gradflow's own files."""
    from gradflow.errors import _library_dirs

    path = getattr(module, "__file__", None)
    if not path or os.path.realpath(path).startswith(_OURS):
        return
    USER_CODE.add(os.path.realpath(path))
    top = sys.modules.get(module.__name__.split(".")[0], module)
    root = os.path.dirname(os.path.realpath(getattr(top, "__file__", None) or path)) + os.sep
    shared = [_OURS, *(os.path.realpath(d) + os.sep for d in _library_dirs())]
    if not any(d.startswith(root) or root.startswith(d) for d in shared):
        USER_CODE.add(root)


def _causes(e: BaseException) -> list:
    """``e`` and the exceptions it was raised from (``__cause__``, outermost first)."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    return chain


def _raised_in_user_code(e: BaseException) -> str | None:
    """``"file.py, line N, in name"`` where ``e`` was raised in a user's cell code
    (:data:`USER_CODE`: the last such frame of its traceback, with no gradflow frame after it;
    libraries' frames after it are what that code called); None otherwise."""
    from gradflow.errors import _library_dirs

    libraries = tuple(os.path.realpath(d) + os.sep for d in _library_dirs())
    last = None
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename.startswith("<"):  # (<frozen importlib._bootstrap>: no file)
            continue
        path = os.path.realpath(frame.filename)
        if path.startswith(_OURS):
            last = None
        elif path.startswith(libraries):
            continue
        elif path in USER_CODE or any(path.startswith(d) for d in USER_CODE
                                      if d.endswith(os.sep)):
            last = frame
    return (None if last is None
            else f"{os.path.basename(last.filename)}, line {last.lineno}, in {last.name}")


def load_cell(spec: str, options: dict | None = None):
    """The :class:`gradflow.cells.Cell` named by ``"module:attribute"``: a Cell object, or a
    factory (any callable) called with ``options`` that returns one. The current folder is
    searched first, as for ``python -m``.

    Raises:
      gradflow.errors.InputError: the module cannot be imported, has no such attribute, the
        factory fails, or what it names is not a Cell.
    """
    from gradflow.cells import Cell, names

    module_name, _, attr = spec.partition(":")
    if not attr and module_name in names():  # "lstm:": a cell with no options written
        raise InputError(f"--cell {spec!r}: no option after the colon; write {module_name!r} "
                         f"or {module_name + ':option=value'!r} (e.g. "
                         f"{module_name}:init=glorot)")
    if not module_name or not attr:
        raise InputError(f"--cell {spec!r}: expected module:attribute, e.g. mycells:my_lstm")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
        _add_user_code(obj)
    except ModuleNotFoundError as e:
        from gradflow import cells as _cells

        if module_name in _cells.names() and e.name == module_name:  # an option without =
            key = attr.split("=")[0]
            raise InputError(f"cell {spec!r}: {module_name!r} is a gradflow cell, not a module "
                             f"of yours (module:attribute); write its options as "
                             f"{module_name}:{key}=VALUE or --option {key}=VALUE") from None
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise InputError(f"--cell {spec!r}: no module named {e.name!r} (on the Python path "
                             "or in the current folder)") from None
        raise InputError(f"--cell {spec!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:  # the user's module failed: their code, not gradflow's
        raise InputError(f"--cell {spec!r}: importing {module_name!r} raised "
                         f"{type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"--cell {spec!r}: {getattr(obj, '__name__', module_name)!r} has "
                             f"no attribute {part!r}")
        obj = getattr(obj, part)
    options = dict(options or {})
    if not isinstance(obj, Cell) and callable(obj):
        try:
            obj = obj(**options)
        except Exception as e:
            hint = (" (--init is passed to a factory as init=: accept it, or leave --init out)"
                    if "init" in options and isinstance(e, TypeError) and "'init'" in str(e)
                    else "")
            raise InputError(f"--cell {spec!r}: calling it raised {type(e).__name__}: "
                             f"{_one_line(e)}{hint}") from e
    elif options:
        raise InputError(f"--cell {spec!r} is a Cell, not a factory: it takes no --option or "
                         "--init")
    if not isinstance(obj, Cell):
        raise InputError(f"--cell {spec!r} gave an object of type {type(obj).__name__}, not a "
                         "gradflow Cell (build one with gradflow.cells.Cell(...) or an adapter "
                         "such as gradflow.cells.from_function)")
    own = dict(obj.options)
    if "factory" in own or "factory_options" in own:  # the user's own names: left as theirs
        return obj
    # How it was built, among its options: every config of a stack of it (a result's, a
    # training run's) records it, and a cell built otherwise is refused on the run's params
    # (runs.stack_from_config) and on its resume (train.resume_differences).
    from gradflow.cells.base import freeze

    return dataclasses.replace(obj, options=freeze(
        {**own, "factory": spec, "factory_options": freeze(options)}))


# ---------------------------------------------------------------------------------------------
# Output paths: named after the settings, checked before any computation.


def _writable_dir(directory: Path, path: str):
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise UsageError(f"gradflow: error: cannot write {path!r}: {str(directory)!r} {what}")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".gradflow-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"gradflow: error: cannot write {path!r}: "
                         f"{e.strerror or e} in {str(directory)!r}") from None


def _check_path(path: str, valid_exts, what: str, hint: str = "") -> str:
    p = Path(path)
    ext = p.suffix.lower() if what == "figure" else p.suffix  # NumPy writes x.NPZ.npz
    if ext not in valid_exts:
        raise UsageError(f"gradflow: error: unsupported {what} extension {ext or '(none)'!r} in "
                         f"{path!r}; use {', '.join(valid_exts)}{hint}")
    try:
        if p.is_dir():
            raise UsageError(f"gradflow: error: cannot write {path!r}: it is a directory")
        _writable_dir(p.resolve().parent, path)
    except OSError as e:  # (a name longer than the file system takes: ENAMETOOLONG)
        raise UsageError(f"gradflow: error: cannot write {path!r}: {e.strerror or e}") from None
    return path


def output_paths(args, stem: str, create: bool = True) -> tuple[str, str | None]:
    """``(figure path, data path or None)`` from ``--out``/``--data``/``--no-data``.

    Defaults: ``gradflow-out/<stem>.png`` (the folder is created, unless not ``create``: a
    dry run checks the paths it was given and makes nothing) and the figure's path with
    ``.npz``. ``--out`` naming an existing folder (or ending with ``/``) puts ``<stem>.png``
    in it. Explicit paths must have a valid extension and an existing, writable folder.
    """
    default = args.out is None
    if default:
        fig = os.path.join(DEFAULT_OUT_DIR, f"{stem}.png")
        if create:
            os.makedirs(DEFAULT_OUT_DIR, exist_ok=True)
            _check_path(fig, FORMATS, "figure")
    elif os.path.isdir(args.out) or args.out.endswith(("/", os.sep)):
        fig = _check_path(os.path.join(args.out, f"{stem}.png"), FORMATS, "figure")
    else:
        fig = _check_path(args.out, FORMATS, "figure", hint=" (--out is the figure's file, "
                          "e.g. DIR/name.png, or an existing folder)")
    if args.no_data:
        if args.data is not None:
            raise UsageError("gradflow: error: --data and --no-data cannot be used together")
        return fig, None
    if args.data is None:
        data = str(Path(fig).with_suffix(DATA_EXT))
        return fig, (_check_path(data, (DATA_EXT,), "data") if create or not default else data)
    return fig, _check_path(args.data, (DATA_EXT,), "data")


def _options_token(options) -> str:
    return "-".join(f"{k}{'-'.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in options)


# How a setting that differs from its default shows in a default output name, in this order.
_TOKENS = {
    "seq_len": "T{}".format, "steps": "T{}".format,
    "hidden": lambda v: "H" + width_text(v).replace(",", "-"),
    "batch": "B{}".format, "input_size": "D{}".format, "init": str, "option": _options_token,
    "task_option": _options_token, "no_input_projection": lambda v: "noproj",
    "residual": lambda v: "residual", "norm": "{}norm".format, "seed": "s{}".format,
    "matmul_precision": "mm-{}".format,
    "input_scale": "x{:g}".format, "dtype": str, "loss": "loss-{}".format,
    "losses": lambda v: "loss-" + "-".join(v), "record_loss": "loss-{}".format,
    "wrt": "wrt-{}".format, "readout_seed": "r{}".format, "eps": "eps{:g}".format,
    "bins": "bins{}".format, "gate": "gate-{}".format, "normalize": lambda v: "normalized",
    "absolute": lambda v: "absolute", "lr": "lr{:g}".format, "clip": "clip{:g}".format,
    "budget": "budget{:g}".format, "inputs": lambda v: "in-" + Path(v).stem,
    "time_major": lambda v: "tm", "prefix": lambda v: "m-" + v.strip("."),
}


def default_stem(args, *head, skip=(), tokens=None) -> str:
    """``head`` joined by ``_``, then one token per setting that differs from its default
    (e.g. ``heatmap_lstm_L16_T200_orthogonal``), so runs with other settings do not write over
    each other; characters unsafe in file names become ``-``."""
    tokens = {**_TOKENS, **(tokens or {})}
    parts = [str(h) for h in head]
    for dest, fmt in tokens.items():
        if dest in skip or dest not in vars(args):
            continue
        value = getattr(args, dest)
        if value != args.defaults.get(dest):
            parts.append(fmt(value))
    stem = re.sub(r"[^A-Za-z0-9_.+=-]+", "-", "_".join(parts))
    if len(stem) > _STEM_MAX:  # a name the file system takes (255 bytes), still one per setting
        digest = hashlib.sha1(stem.encode()).hexdigest()[:10]
        stem = f"{stem[:_STEM_MAX - 11]}-{digest}"
    return stem


#: The longest default file stem: the system's 255 bytes, less an extension (``.json``).
_STEM_MAX = 245


# ---------------------------------------------------------------------------------------------
# Text summaries of (L, T) maps.


def _g(x) -> str:
    return f"{x:.3g}" if np.isfinite(x) else str(x)


def _ratio(a, b) -> str:
    """``a / b`` as ``x0.25 (-0.6 dec)``; ``n/a`` when undefined."""
    if not (np.isfinite(a) and np.isfinite(b)) or b <= 0 or a <= 0:
        return "n/a"
    r = a / b
    return f"x{r:.3g} ({round(math.log10(r), 1) + 0.0:+.1f} dec)"  # (+ 0.0: no "-0.0")


def _rel(a, ref) -> str:
    """``a / ref`` as :func:`_ratio` does, but an entry that is exactly 0 reads
    ``x0 (-inf dec)`` (a gradient that underflowed, never "n/a") and a non-finite one ``nan``
    or ``inf``; ``n/a`` only when ``ref`` is not positive and finite (nothing to be relative
    to).

    >>> _rel(0.0, 2.0), _rel(float("nan"), 2.0), _rel(1.0, 0.0), _rel(0.5, 2.0)
    ('x0 (-inf dec)', 'nan', 'n/a', 'x0.25 (-0.6 dec)')
    """
    if not (np.isfinite(ref) and ref > 0):
        return "n/a"
    if not np.isfinite(a):
        return str(float(a))
    return "x0 (-inf dec)" if a == 0 else _ratio(a, ref)


def path_factor(path) -> tuple[float, int, float | None]:
    """The geometric-mean factor per step along ``path`` (1-D, ``path[0]`` where the loss
    enters), ``(path[k] / path[0]) ** (1 / k)``, over the leading stretch ``path[0..k]`` of
    positive finite entries. Returns ``(factor, k, stop)``: ``stop`` is the entry that ended
    the stretch before the path's end (0: an underflow; NaN or inf), else None; ``factor`` is
    NaN when ``k == 0`` (no step to measure).

    >>> path_factor([1.0, 0.25, 0.0625])
    (0.25, 2, None)
    >>> path_factor([1.0, 0.5, 0.0, 0.1])
    (0.5, 1, 0.0)
    """
    p = np.asarray(path, dtype=float)
    good = np.isfinite(p) & (p > 0)
    k = int(np.argmin(good)) - 1 if not good.all() else p.size - 1
    stop = float(p[k + 1]) if k + 1 < p.size else None
    if k <= 0:
        return float("nan"), max(k, 0), stop
    return float((p[k] / p[0]) ** (1.0 / k)), k, stop


def _factor(f: float) -> str:
    return f"x{f:#.3g}".rstrip(".") if np.isfinite(f) else "n/a"  # (x100, not x100.)


def _walk(path, unit: str, names) -> str:
    """``"x0.250 per layer (geometric mean, layers 15..0)"`` for :func:`path_factor` of
    ``path``, ``names[i]`` naming its entry ``i``; where the path stops early, the entry that
    stopped it: ``"; layer 3: 0 (underflow)"``, or ``"x0 per layer (layer 14: 0, underflow)"``
    when it stops at the first step."""
    f, k, stop = path_factor(path)
    what = None if stop is None else "0, underflow" if stop == 0 else str(stop)
    if k == 0:
        return (f"{'x0' if stop == 0 else 'n/a'} per {unit}" +
                (f" ({names[1]}: {what})" if what else ""))
    return (f"{_factor(f)} per {unit} (geometric mean, {names[0]}..{names[k].split()[-1]})"
            + (f"; {names[k + 1]}: {what}" if what else ""))


def marginal_lines(values: np.ndarray, last: int = -1, loss: str | None = None,
                   where: str | None = None, along: str | None = None) -> list[str]:
    """The two marginals of an ``(L, T)`` map ``G`` from where the loss enters, the top layer at
    step ``e = last % T``: down that step's column, ``G[l, e] / G[L-1, e]``, and back along the
    top layer's row, ``G[L-1, t] / G[L-1, e]``, each with its geometric-mean factor per layer or
    per step (:func:`path_factor`). Under ``loss="all"`` the loss enters at every step, so the
    top row is not a pure temporal path: its first/last ratio is given without a per-step factor.
    The column at ``e`` is a pure vertical path under either loss (no later step exists).
    ``where`` names the entry point in words (default: the last step, or the last one a memory
    ``c`` reaches); ``along``, in place of the top row's ratios, says why it has none (a
    bidirectional model's reverse direction, which ``"last"`` reads at its first step only).

    >>> G = np.array([[0.01, 0.0625], [0.1, 1.0]])
    >>> marginal_lines(G)[1].split(":")[1]
    ' x0.0625 per layer (geometric mean, layers 1..0); bottom/top x0.0625 (-1.2 dec)'
    """
    L, T = values.shape
    e = last % T
    ref = values[-1, e]
    at = where or ("top layer, last step" if e == T - 1 else
                   f"top layer, the last step c reaches it; c at t {T - 1} is 0 by construction")
    lines = [f"from where the loss enters: layer {L - 1}, t {e} ({at}), G = {_g(ref)}"
             + ("; loss all also enters at every earlier step" if loss == "all" else "")]
    down = f"down the last step (t {e}):" if e == T - 1 else f"down step t {e}:"
    width = max(len(down), len("back along the top layer:")) + 1
    if not (np.isfinite(ref) and ref > 0):
        return lines + ["  no ratios: the entry is not positive and finite"]
    if L > 1:
        names = [f"layer{'s' if i == L - 1 else ''} {i}" for i in range(L - 1, -1, -1)]
        lines.append(f"  {down:<{width}}{_walk(values[::-1, e], 'layer', names)}; bottom/top "
                     f"{_rel(values[0, e], ref)}")
    if e > 0:
        if along is not None:
            lines.append(f"  {'back along the top layer:':<{width}}{along}")
        elif loss == "all":
            lines.append(f"  {'back along the top layer:':<{width}}first/last "
                         f"{_rel(values[-1, 0], ref)}, not a per-step decay: each step adds its "
                         "own loss term")
        else:
            names = [f"t {t}" for t in range(e, -1, -1)]
            lines.append(f"  {'back along the top layer:':<{width}}"
                         f"{_walk(values[-1, e::-1], 'step', names)}; first/last "
                         f"{_rel(values[-1, 0], ref)}")
    return lines


def map_summary(values: np.ndarray, max_rows: int = 16, underflow: int | None = None,
                last: int = -1, loss: str | None = None, where: str | None = None,
                along: str | None = None, stacked: bool = True) -> list[str]:
    """Lines describing an ``(L, T)`` gradient map ``V``.

    First the two marginals from where the loss enters, the top layer at step ``e``
    (:func:`marginal_lines`; ``last``: the last step the map reaches, ``T - 2`` for a memory
    ``c`` whose last step is 0 by construction, see :func:`result_summary`). Then per layer
    ``l``: ``V[l, e] / V[L-1, e]`` down that column, beside ``mean_t V[l, t]`` (finite entries)
    over the top layer's (time-averaged: it includes the diagonal paths from later steps, so it
    is the total signal a layer receives, not a per-layer gain); the bottom layer's
    ``V[0, 0] / V[0, e]`` (off the two axes); the range ``max / min`` in decades with where they
    are; the number of non-finite entries and of underflow entries (below the normal range of
    ``values``' dtype, where every entry is expected positive: ``underflow`` if given, e.g.
    ``result.underflow["values"]``, else counted here). ``stacked=False`` (one direction of
    a bidirectional model, whose layers also read the other direction's) leaves out the
    bottom layer's ratio, which names the paths of a plain stack. Maps deeper than
    ``max_rows`` list evenly spaced layers (top and bottom always). Zeros and non-finite
    entries are printed as such (``x0 (-inf dec)``, ``nan``), never dropped.
    """
    from gradflow.results import underflow_count

    dtype = np.asarray(values).dtype
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(float)
    if underflow is None:
        underflow = underflow_count(np.asarray(values, dtype))
    values = np.asarray(values, dtype=float)
    L, T = values.shape
    e = last % T
    means = finite_row_means(values)
    shown = sorted(set(np.linspace(0, L - 1, min(L, max_rows)).round().astype(int)),
                   reverse=True)
    lines = marginal_lines(values, last, loss, where, along)
    finite = np.isfinite(values)
    of_finite = "" if finite.all() else " of the finite entries"
    lines.append(f"per layer, relative to the top layer: at t {e}, down the column | mean over "
                 f"time{of_finite} (time-averaged: includes the diagonal paths, not a per-layer "
                 "gain)")
    for l in shown:
        tag = " (top)" if l == L - 1 else " (bottom)" if l == 0 and L > 1 else ""
        out = T - int(finite[l].sum())  # left out of its mean (a reader must not take the
        lines.append(f"  layer {l:>3}{tag:<9} {_g(values[l, e]):>9} "  # rest for the layer)
                     f"{_rel(values[l, e], values[-1, e]):<21}| {_g(means[l]):>9} "
                     f"{_rel(means[l], means[-1])}"
                     + (f"  ({out} of {T} not finite, left out)" if out else ""))
    if not finite.all():
        lines.append("  (a layer's mean leaves out its non-finite entries: inf where the "
                     "gradient overflowed, its largest; NaN where the forward pass did"
                     + ("" if dtype == np.float64 else "; --dtype float64 holds numbers up to "
                        "1.8e308") + ")")
    if L > 1 and e > 0 and stacked:
        lines.append(f"bottom layer, t 0 / t {e}: {_rel(values[0, 0], values[0, e])}, off the "
                     f"two axes: t {e} is reached by the vertical path only, earlier steps also "
                     "by diagonal ones (not an amplification)")
    pos = finite & (values > 0)
    if pos.any():
        masked = np.where(pos, values, np.nan)
        hi = np.unravel_index(np.nanargmax(masked), values.shape)
        lo = np.unravel_index(np.nanargmin(masked), values.shape)
        span = math.log10(values[hi] / values[lo])
        lines.append(f"range{of_finite}: max {_g(values[hi])} at (layer {hi[0]}, t {hi[1]}), "
                     f"min {_g(values[lo])} at (layer {lo[0]}, t {lo[1]}): {span:.1f} decades")
    bad = np.argwhere(~finite)
    lines.append(f"non-finite entries: {len(bad)} of {values.size}" + (
        "" if not len(bad) else " (" + ", ".join(
            f"{_g(values[l, t])} at (layer {l}, t {t})" for l, t in bad[:4])
        + (", ..." if len(bad) > 4 else "") + ")"))
    lines.append(f"underflow entries: {int(underflow)} of {values.size} (below the {dtype.name} "
                 f"range, {np.finfo(dtype).tiny:.2g}, where a gradient reaches: one stored as 0"
                 + (", or exactly 0 in the model itself, e.g. a LayerNorm over 1 unit or a "
                    "ReLU that is off)" if underflow else ")"))
    return lines


def result_summary(res, max_rows: int = 16, reads: str | None = None,
                   enters: int | None = None) -> list[str]:
    """:func:`map_summary` of a gradient-map :class:`~gradflow.results.Result`: its own
    underflow count (which leaves out the entries 0 by construction: a memory ``c`` at the
    last step), its loss and the step where the loss enters (:func:`entry_step`). For a
    callable loss: ``reads``, where it reads the top layer as a default loss does
    (``"last"``/``"all"``: how the summary words it, and which entries must be positive),
    ``enters``, the step the summary starts from (default: the last step the map reaches)."""
    from gradflow.results import underflow_count
    from gradflow.views import expected_positive

    values = np.asarray(res.values)
    loss = reads or res.config.get("loss")
    wrt = res.config.get("wrt")
    underflow = res.underflow.get("values")
    if underflow is None and reads is not None and wrt is not None:
        underflow = underflow_count(values, np.asarray(
            expected_positive(reads, wrt, values.shape[-1])["values"]))
    where = None if enters is None else (
        "top layer, the first step the loss scores; it enters at later steps too")
    return map_summary(values, max_rows, underflow,
                       entry_step(values, wrt) if enters is None else enters,
                       loss if isinstance(loss, str) else None, where)


def decade_range(values: np.ndarray, e: int, ref: float) -> str:
    """``"lo .. hi"``: ``log10(V / ref)`` over the finite entries the loss reaches (steps
    ``0..e``), ``-inf`` as the low end where one of them is exactly 0 (so an all-zero map
    never reads like a preserved one); ``n/a`` when ``ref`` is not positive and finite or no
    such entry is finite.

    >>> decade_range(np.array([[0.0, 0.0], [0.1, 1.0]]), 1, 1.0)
    '-inf .. +0.0'
    """
    reached = np.asarray(values, dtype=float)[:, :e + 1]
    finite = reached[np.isfinite(reached)]
    if not (np.isfinite(ref) and ref > 0) or finite.size == 0:
        return "n/a"
    with np.errstate(divide="ignore"):
        logs = np.log10(np.abs(finite) / ref)
    lo, hi = logs.min(), logs.max()

    def fmt(x):
        return f"{round(x, 1) + 0.0:+.1f}" if np.isfinite(x) else ("-inf" if x < 0 else "+inf")
    return f"{fmt(lo)} .. {fmt(hi)}"


def _panel_line(loss: str, cell: str, res, width: int) -> str:
    """One row of compare's table from a panel's map ``res``: the value where the loss enters
    (top layer, :func:`entry_step`), bottom/top down that step and its per-layer factor, the
    time-averaged bottom/top, first/last step at the top layer, the range in decades over the
    entries the loss reaches, non-finite and underflow counts."""
    values = np.asarray(res.values, dtype=float)
    L = values.shape[0]
    e = entry_step(values, res.config.get("wrt"))
    ref = values[-1, e]
    means = finite_row_means(values)
    ok = np.isfinite(ref) and ref > 0
    bottom = values[0, e]
    if L < 2 or not ok or not np.isfinite(bottom):
        per_layer = "n/a" if L < 2 or not ok else str(float(bottom))
    else:
        per_layer = "x0" if bottom == 0 else _factor((bottom / ref) ** (1.0 / (L - 1)))
    mean = _rel(means[0], means[-1]) + ("*" if not (  # * : of the finite entries only
        np.isfinite(values[0]).all() and np.isfinite(values[-1]).all()) else "")
    return (f"  {loss:<5} {cell:<{width}} {_g(ref):>10}  {_rel(bottom, ref):>20}  "
            f"{per_layer:>9}  {mean:>20}  "
            f"{_rel(values[-1, 0], ref):>20}  {decade_range(values, e, ref):>16}  "
            f"{int((~np.isfinite(values)).sum()):>10}  {res.total_underflow:>9}")


QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def timescale_lines(per_unit: np.ndarray) -> list[str]:
    """The distribution of per-unit memory timescales ``tau[l, u] = 1/(1 - mean kept
    fraction)`` (``(L, H)`` or the units' values, pooled over layers): the :data:`QUANTILES`
    and a count per decade (``1-10`` for ``[1, 10)``, ``10-100``, ...; ``below 1``: a mean
    kept fraction below 0, which refined gates reach; ``inf``: units that keep everything;
    ``undefined``: NaN).

    >>> timescale_lines(np.array([[0.5, 2.0, 30.0], [np.inf, np.nan, 5.0]]))[1]
    '  units per decade: below 1 1, 1-10 2, 10-100 1, inf 1, undefined 1'
    """
    tau = np.asarray(per_unit, dtype=float).ravel()
    finite = tau[np.isfinite(tau)]
    if finite.size == 0:
        return [f"timescale per unit: all {tau.size} infinite or undefined"]
    q = np.quantile(finite, QUANTILES)
    names = ("min", "10%", "median", "90%", "max")
    lines = ["timescale per unit (steps): " + ", ".join(f"{n} {_g(v)}" for n, v in zip(names, q))]
    top = max(1, int(np.ceil(np.log10(max(finite.max(), 1.0) * (1 + 1e-12)))))
    edges = 10.0 ** np.arange(top + 1)
    counts, _ = np.histogram(finite[finite >= 1.0], edges)
    below = int((finite < 1.0).sum())
    parts = ([f"below 1 {below}"] if below else []) + [
        f"{edges[i]:g}-{edges[i + 1]:g} {c}" for i, c in enumerate(counts)]
    inf, nan = int(np.isinf(tau).sum()), int(np.isnan(tau).sum())
    lines.append("  units per decade: " + ", ".join(parts) + (f", inf {inf}" if inf else "")
                 + (f", undefined {nan}" if nan else ""))
    return lines


def _trained_title(config: dict, head: str, sep: str = "\n") -> str:
    """A figure title for ``--params``: ``head`` over the settings line, which names trained
    weights by their source (:func:`gradflow.results.origin`), not by the stack's init."""
    from gradflow import plot

    return f"{head}{sep}{plot.settings(config)}"


def _describe(config: dict, cell) -> str:
    """One line: cell, sizes, seed, init, dtype, and the cell options that differ from its
    defaults (registered cells; a user's cell lists every option)."""
    from gradflow import cells as _cells
    from gradflow import plot
    from gradflow.cells.base import written_value

    extra = [k for k in ("residual", "norm") if config.get(k)]
    if isinstance(config.get("cell"), list):  # one per layer: each with its own options
        subject, changed = plot.subject(config), []
    else:  # its options listed after the rest
        subject = plot.subject({k: v for k, v in config.items() if k != "cell_label"})
        defaults = dict(_cells.get(cell.name).options) if cell.name in _cells.names() else {}
        if cell.length_option is not None:  # its default is the sequences' length
            defaults[cell.length_option] = config["steps"]
        own = dict(cell.options)
        typed = dict(own.pop("factory_options", ()))  # a user's factory's --option: named
        # as typed, not again as the cell stores it
        changed = [f"{k}={written_value(v)}"
                   for k, v in [*typed.items(), *((k, v) for k, v in own.items()
                                                  if k not in typed)]
                   if k not in ("init", "factory") and defaults.get(k) != v]
    L = config["layers"]
    return (f"{subject}, {L} layer{'s' * (L != 1)} x {config['steps']} steps, "
            f"H={width_text(config['hidden_size'])}, B={config['batch']}, "
            f"seed {config.get('seed', '-')}, "
            f"{origin(config) or 'init -'}, "
            + (f"inputs from {plot.inputs_text(config)}, " if config.get("inputs_from")
               else f"input scale {config['input_scale']:g}, "
               if config.get("input_scale", 1.0) != 1.0 else "")
            + f"{config['dtype']}"
            + (f"; options {', '.join(changed)}" if changed else "")
            + "".join(f"; {k} {config[k]}" for k in extra))


def _write(fig, data, fig_path, data_path) -> list[str]:
    from gradflow import plot

    lines = []
    if data_path is not None:
        lines.append(f"data:   {data.save(data_path)}")
    lines.append(f"figure: {plot.save(fig, fig_path)}")
    return lines


# ---------------------------------------------------------------------------------------------
# Problems from the options


def _cell_options(args) -> dict:
    """The cell's options from ``--option`` (each key once) and ``--init``, which must agree
    with an ``--option init=``."""
    options = {}
    for k, v in args.option or []:
        if k in options and options[k] != v:
            raise _usage(args, f"--option {k} is given twice ({options[k]!r} and {v!r})")
        options[k] = v
    if args.init is not None:
        if options.get("init", args.init) != args.init:
            raise _usage(args, f"--init {args.init} and --option init={options['init']} "
                               "disagree; give one")
        options["init"] = args.init
    return options


def _user_cell(text: str) -> bool:
    """Whether a cell written ``text`` is a user's ``module:factory`` (not a registered name,
    nor one written with its options, ``lstm:forget_bias=1.0``)."""
    return ":" in text and not _written(text)


def _written(text: str) -> bool:
    """Whether ``text`` is a registered cell written with its options (``name:key=value``)."""
    from gradflow import cells as _cells

    return _cells.is_spec(text)


def _cell(args, steps: int, saved: dict | None = None):
    """The cell ``--cell`` names (registered, written with options as ``compare --cells``
    reads them, or a user's ``module:factory``), with ``--init``/``--option`` (an option also
    written in must agree: ``compare`` lets the written one win, as ``--option`` applies to
    every cell there), initialised for ``steps`` where the cell has a length option; or, where
    it names one registered cell per layer (``gru,star,gru``), a tuple of them, each with
    ``--init``/``--option``. ``saved``: the stack config of ``--params``: a factory it
    records as its cell's, named again without ``--option``/``--init``, is called with the
    options it was called with then (a resumed run is refused other options instead)."""
    from gradflow.runs import built_by

    specs = layer_cells(args.cell)
    built = None if saved is None else built_by(saved)
    if (len(specs) == 1 and built is not None and built[0] == specs[0]
            and not _given(args, ("option", "init"))):
        with user_input():
            return load_cell(specs[0], built[1])
    if len(specs) == 1:
        return _one_cell(args, specs[0], steps)
    _check_layer_specs(args, "--cell", specs, "one cell, or one per layer",
                       "built with the API, gradflow.Stack([cell, ...], layers, ...)")
    return tuple(_one_cell(args, s, steps) for s in specs)


def _check_layer_specs(args, flag: str, specs: list, give: str, yours: str) -> None:
    """Refuse (one line, exit 2) a stack written on the command line (``flag``: where) whose
    cells are not one per layer (``give``: what to write instead) or hold a user's
    ``module:factory`` (``yours``: how such a stack is built instead)."""
    if len(specs) != args.layers:
        raise _usage(args, f"{flag} names {len(specs)} cells for --layers {args.layers}: give "
                           f"{give}")
    if any(_user_cell(s) for s in specs):
        raise _usage(args, f"{flag}: a cell of your own (module:factory) is given alone; a "
                           f"stack of different cells of yours is {yours}")


def _one_cell(args, spec: str, steps: int):
    """One cell of ``--cell`` (``spec``), with ``--init``/``--option``."""
    from gradflow import cells as _cells

    options = _cell_options(args)
    with user_input():
        if _user_cell(spec):
            return load_cell(spec, options)
        written = _cells.parse_spec(spec)[1]
    clash = sorted(k for k in set(written) & set(options) if written[k] != options[k])
    if clash:  # one cell: two values for one option is a mistake, not a default to override
        k = clash[0]
        given = f"--init {options[k]}" if k == "init" and args.init is not None else \
            f"--option {k}={options[k]}"
        raise _usage(args, f"--cell {spec} and {given} disagree; give one")
    with user_input():
        return _cells.for_length(spec, steps, **options)


def _stack_settings(args) -> dict:
    settings = {"residual": args.residual, "norm": args.norm,
                "matmul_precision": args.matmul_precision}
    if getattr(args, "checkpoint", None) is not None:
        settings["checkpoint"] = args.checkpoint
    if args.no_input_projection:
        settings["input_projection"] = False
    return settings


def checked_stack(cell, layers: int, input_size: int, hidden: int, dtype=None, **settings):
    """``Stack(cell, layers, input_size, hidden, **settings)``, its parameters' shapes traced
    abstractly (:func:`jax.eval_shape`, nothing computed) in the run's ``dtype`` (a user's
    step with a float64 constant is fine at float64, refused at float32), so that the cell's
    own checks of the sizes run too; any ValueError/TypeError is the user's input
    (:class:`gradflow.errors.InputError`)."""
    from gradflow.checks import expected_params
    from gradflow.stack import _PROJECT, Stack

    try:
        with user_input():
            stack = Stack(cell, layers, input_size, hidden, **settings)
            expected_params(stack, dtype)
    except InputError as e:  # the API's fix, in the flag that asked for it
        if settings.get("input_projection") is False and _PROJECT in str(e):
            raise InputError(str(e).replace(_PROJECT,
                                            "leave out --no-input-projection")) from e
        raise
    return stack


def _problem(args, cell):
    """:func:`gradflow.problem.problem` of ``cell`` with the command's sizes; the stack is
    checked (a user error) before anything is drawn."""
    from gradflow.problem import problem

    settings = _stack_settings(args)
    D = first_width(args.hidden) if args.input_size is None else args.input_size
    checked_stack(cell, args.layers, D, args.hidden, args.dtype, **settings)
    return problem(cell, layers=args.layers, steps=args.steps, hidden=args.hidden,
                   batch=args.batch, input_size=args.input_size, seed=args.seed,
                   dtype=args.dtype, input_scale=args.input_scale, stack_options=settings)


# The options that build a stack: with --params the saved run fixes them.
_STACK_OPTIONS = ("cell", "layers", "hidden", "input_size", "init", "option",
                  "no_input_projection", "residual", "norm")


def _given(args, dests) -> list[str]:
    """The options among ``dests`` typed on the command line (also at their default value,
    e.g. ``--batch 16`` where 16 is the default; argparse's abbreviations included) or set to
    something other than their default."""
    flags = {"--" + d.replace("_", "-") for d in args.defaults}
    typed = [a.split("=", 1)[0] for a in getattr(args, "argv", ()) if a.startswith("--")]

    def given(flag):
        return any(t == flag or (flag.startswith(t) and t not in flags) for t in typed)

    return ["--" + d.replace("_", "-") for d in dests if d in args.defaults and (
        given("--" + d.replace("_", "-")) or getattr(args, d) != args.defaults[d])]


def _adopt_run_dtype(args) -> None:
    """``--dtype`` not given with ``--params`` of training runs: the runs' own dtype (a run
    trained in float64 is measured in float64, as its recorded maps were), where they agree.
    A file that cannot be read is left to the command, which says why."""
    params = getattr(args, "params", None)
    if params is None or "dtype" not in vars(args) or _given(args, ["dtype"]):
        return
    from gradflow import runs

    dtypes = set()
    for path in params if isinstance(params, list) else [params]:
        try:
            dtypes.add(runs.read_run(path).get("config", {}).get("dtype"))
        except (InputError, OSError, ValueError):
            return
    if len(dtypes) == 1 and dtypes <= {"float32", "float64"}:
        args.dtype = dtypes.pop()


def _read_params(args, path):
    """``(stack, params, meta)`` saved at ``path``, one of ``--params`` (a run folder or a
    params file; :mod:`gradflow.runs` raises an InputError for anything it cannot read)."""
    from gradflow import runs

    user = _user_cell(getattr(args, "cell", ""))  # a user's cell is not rebuilt from its name
    conflicts = _given(args, [d for d in _STACK_OPTIONS
                              if not (user and d in ("cell", "init", "option"))])
    if conflicts and conflicts != ["--cell"]:  # --cell alone: named with the run's cell below
        raise _usage(args, f"{', '.join(conflicts)} cannot be used with --params: the saved "
                           "run fixes the stack (a params file's or PyTorch state dict's too)")
    with user_input():
        meta = runs.read_run(path)
    cell = _cell(args, args.steps, saved=meta.get("stack")) if user else None
    with user_input():
        try:
            from gradflow.problem import dtype_of

            dtype = getattr(args, "dtype", None)
            stack, params = runs.load_params(path, cell=cell,
                                             dtype=None if dtype is None else dtype_of(dtype),
                                             prefix=getattr(args, "prefix", None))
        except InputError as e:  # a model only torch_model builds: which commands read it
            from gradflow.cells.pytorch import _TORCH_MODEL

            if runs._REBUILD in str(e):  # the API's fix, as the option that does it
                built = runs.built_by(meta.get("stack"))  # (by a factory on the command line)
                factory = "module:factory" if built is None else built[0]
                raise InputError(str(e).replace(runs._REBUILD, (
                    f"give the factory that built it, --cell {factory}" if hasattr(
                        args, "cell") else f"gradflow {args.command} cannot rebuild it: "
                    f"gradflow heatmap --params {path} --cell {factory} measures it"))
                ) from None
            if _TORCH_MODEL not in str(e):
                raise
            raise InputError(f"{e}; of the commands, gradflow heatmap and gradflow gates "
                             "measure it (--params)") from None
    if conflicts and not user:  # --cell alone (also --cell lstm, the default's name)
        from gradflow import plot

        raise _usage(args, f"--cell cannot be used with --params: the saved run fixes the "
                           f"stack (of {plot.subject(stack.config)!r})")
    # how to compute is this command's choice, not the saved run's
    return (stack.replace(matmul_precision=getattr(args, "matmul_precision",
                                                   stack.matmul_precision)), params, meta)


def _numpy_magic(path) -> bool | None:
    """Whether the file ``path`` begins as a ``.npy`` (``\\x93NUMPY``) or a zip archive
    (``.npz``) does; None where it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    return head == b"\x93NUMPY" or head[:4] == b"PK\x03\x04"


def _read_inputs(args):
    """The sequences of ``--inputs`` (NumPy, ``(B, T, D)``, the first ``--batch`` where
    given), or None. Every problem with the file is the user's: one line, exit 2."""
    from gradflow.checks import check_inputs

    if getattr(args, "inputs", None) is None:
        if getattr(args, "time_major", False):
            raise _usage(args, "--time-major says how the --inputs array is laid out: give "
                               "--inputs FILE")
        return None
    given = _given(args, ("steps", "input_size", "input_scale"))
    if given:
        raise _usage(args, f"{', '.join(given)} cannot be used with --inputs: the sequences fix "
                           "them")
    path = args.inputs
    try:
        data = np.load(path, allow_pickle=False)
        if hasattr(data, "files"):  # an .npz: the one array, or the one named xs
            with data as f:
                if "xs" not in f.files and len(f.files) != 1:
                    raise InputError(f"--inputs: {path!r} holds several arrays "
                                     f"({', '.join(f.files[:6])}); name the sequences xs, or "
                                     "save only them")
                name = "xs" if "xs" in f.files else f.files[0]
                data = f[name]
                if not isinstance(data, np.ndarray):  # a zip member that is not an .npy
                    raise InputError(f"--inputs: {path!r} holds {name!r}, which is not a "
                                     "NumPy array (np.savez writes them)")
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        # no such file, not .npy/.npz, pickled, a damaged or truncated archive
        if isinstance(e, InputError):
            raise
        expected = ("a .npy of shape (batch, steps, features) (np.save), or a .npz holding "
                    "one such array (np.savez)")
        # (not NumPy's advice on pickles and allow_pickle: --inputs reads arrays of numbers)
        if not isinstance(e, OSError) and _numpy_magic(path) is False:
            raise InputError(f"--inputs: cannot read {path!r}: it is not a NumPy file; give "
                             f"{expected}") from e
        if isinstance(e, ValueError) and "allow_pickle" in str(e):  # an array of objects
            raise InputError(f"--inputs: {path!r} holds Python objects (dtype object), not "
                             f"numbers; give {expected}") from e
        raise InputError(f"--inputs: cannot read {path!r} as a .npy or .npz array: "
                         f"{type(e).__name__}: {e}") from e
    layout = "(steps, batch, features)" if args.time_major else "(batch, steps, features)"
    if data.ndim != 3:
        raise InputError(f"--inputs: {path!r} holds an array of shape {data.shape}; the "
                         f"sequences are {layout}"
                         + (": add a batch axis" if data.ndim == 2 else ""))
    if args.time_major:
        data = data.swapaxes(0, 1)
    try:  # real numbers, no empty axis: the API's own check of inputs
        check_inputs(data)
    except (TypeError, ValueError) as e:
        raise InputError(f"--inputs: {path!r}: {e}") from e
    bad = int(data.size - np.isfinite(data).sum())
    if bad:
        raise InputError(f"--inputs: {path!r} holds {bad} NaN or infinite entries")
    if _given(args, ("batch",)):
        if args.batch > data.shape[0]:
            raise _usage(args, f"--batch {args.batch} is more than the {data.shape[0]} "
                               f"sequences in {path}")
        data = data[:args.batch]
    return data


def _with_inputs(args, prob, xs, source=None):
    """``prob`` (of ``--params`` ``source``, if any) measured on the sequences ``xs`` of
    ``--inputs`` (cast to ``--dtype``): its config records the file instead of the Gaussian
    inputs' scale."""
    xs = _read_width(args, xs, prob.stack.input_size,
                     "the stack" + ("" if source is None else f" of {source}"))
    config = {k: v for k, v in prob.config.items() if k not in ("input_scale", "inputs")}
    config.update(steps=int(xs.shape[1]), batch=int(xs.shape[0]), **_inputs_config(args, xs))
    return prob._replace(xs=xs, config=config)


def _inputs_config(args, xs) -> dict:
    """What a config records of ``--inputs``: the file, the fingerprint of the sequences ``xs``
    read from it (another array saved under that name is told apart), and its layout where it
    is ``--time-major`` (the same file read either way gives other sequences)."""
    return {"inputs_from": str(args.inputs), "inputs_fingerprint": fingerprint(xs),
            **({"inputs_time_major": True} if args.time_major else {})}


def _read_width(args, xs, width: int, who: str):
    """The sequences ``xs`` of ``--inputs`` cast to ``--dtype``, refused in one line where
    their features are not the ``width`` that ``who`` (the network measured) reads."""
    from gradflow.problem import dtype_of

    if xs.shape[-1] != width:
        raise InputError(f"--inputs: the sequences have {xs.shape[-1]} features; {who} reads "
                         f"{width}")
    return np.asarray(xs, dtype_of(args.dtype))


def _gaussian(args, width: int, dt):
    """``--batch`` x ``--steps`` Gaussian inputs of ``width`` features, ``--input-scale``
    times N(0, 1) from ``--seed``, as :func:`gradflow.problem` draws them, after its checks:
    the scale, and their size against the memory (one line, before anything is drawn)."""
    from gradflow import cost
    from gradflow.problem import check_input_scale, gaussian_inputs

    with user_input():
        check_input_scale(args.input_scale, dt)
        cost.check_need(args.batch * args.steps * width * np.dtype(dt).itemsize,
                        f"{args.batch} x {args.steps} inputs of {width} features",
                        "use a smaller --batch or fewer --steps")
    return gaussian_inputs(args.seed, (args.batch, args.steps, width), dt, args.input_scale)


def _trained_problem(args, path):
    """The :class:`gradflow.problem.Problem` of ``path``, one of ``--params``: the saved stack
    and params (cast to ``--dtype``); a training run's inputs are the first ``--batch``
    sequences of its fixed evaluation batch (the ones its recorded maps used), a params file's
    are Gaussian as for a fresh stack."""
    import jax

    from gradflow.cost import check_arrays_fit
    from gradflow.problem import Problem, dtype_of

    stack, params, meta = _read_params(args, path)
    dt = dtype_of(args.dtype)
    params = jax.tree_util.tree_map(lambda a: jax.numpy.asarray(a, dt), params)
    config = {"params": str(path), "params_fingerprint": fingerprint(
                  *jax.tree_util.tree_leaves(params)),  # (another file under that name)
              **({"prefix": args.prefix} if getattr(args, "prefix", None) else {})}
    if "config" not in meta:  # a params file: Gaussian inputs as gradflow.problem draws them
        own = getattr(args, "inputs", None) is not None  # (not drawn: --inputs replace them)
        with user_input():  # gradflow.problem's check of parameters and inputs together
            check_arrays_fit(stack, 1 if own else args.batch, 1 if own else args.steps, dt)
        xs = (np.zeros((1, 1, stack.input_size), dt) if own
              else _gaussian(args, stack.input_size, dt))
        return Problem(stack, params, xs, {
            **stack.config, "steps": args.steps, "batch": args.batch, "seed": int(args.seed),
            "dtype": str(dt), "input_scale": float(args.input_scale), **config})
    given = _given(args, ("steps", "seed", "input_scale"))
    if given:
        raise _usage(args, f"{', '.join(given)} cannot be used with a training run's --params: "
                           "the inputs are the run's evaluation sequences (or --inputs)")
    own = getattr(args, "inputs", None) is not None  # --inputs replace the run's sequences
    xs = (np.zeros((1, 1, stack.input_size)) if own
          else _run_batch(args, meta["config"], dt, path)[0])
    config.update({**stack.config, "steps": int(xs.shape[1]), "batch": int(xs.shape[0]),
                   "seed": meta["config"]["seed"], "dtype": str(dt), "train_step": meta["step"],
                   "inputs": "evaluation batch of the run's task",
                   # the run's settings, as its recorded maps carry them: the folder may change
                   "training": {k: v for k, v in meta["config"].items()
                                if k not in stack.config}})
    return Problem(stack, params, xs, config)


def _run_batch(args, config: dict, dt, path):
    """The first ``--batch`` sequences of the fixed evaluation batch of the run at ``path``
    (default: as many as its recorded maps used): ``(xs: (B, T, D), ys, mask, task)``
    (:func:`gradflow.train.run_eval_batch`)."""
    from gradflow.train import run_eval_batch

    batch = args.batch
    if not _given(args, ("batch",)):  # the run's own maps' batch: the same numbers
        batch = min(config.get("record_batch", batch), config["eval_batch"])
    if batch > config["eval_batch"]:
        raise _usage(args, f"--batch {batch} is more than the {config['eval_batch']} "
                           f"evaluation sequences of the run at {path}")
    with user_input():
        return run_eval_batch(path, dt, batch)


# ---------------------------------------------------------------------------------------------
# Subcommands: add_<command> declares, run_<command> runs.


def _para(text: str) -> str:
    return textwrap.fill(text, 88)


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def _command(sub, name: str, help: str, description: str | None, examples: str):
    return sub.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                          description=description and _para(description),
                          epilog=_examples(examples), parents=[_COMMON])


def _finish(p, run):
    """Attach ``run`` and the parser's defaults (for default names and conflict checks)."""
    p.set_defaults(run=run, defaults={a.dest: a.default for a in p._actions})


#: ``--init``'s help, wherever a command builds cells.
INIT_HELP = ("orthogonal, glorot, torch, chrono, ugi, or weights+bias such as glorot+chrono; a "
             "bare weight scheme replaces the cell's own bias scheme too (ur_lstm keeps its UGI "
             "biases with orthogonal+ugi; the atlas's init factor keeps them) (default: the "
             "cell's own, orthogonal for most)")


def add_problem_options(p, layers, steps, hidden, batch, single_cell=True, maps=True):
    """The problem group: sizes, seed, init, dtype, inputs, cell options (and, for one cell,
    its input size and the stack's topology; ``maps``: the command draws gradient maps)."""
    g = p.add_argument_group("problem")
    g.add_argument("--layers", type=positive_int, default=layers, metavar="L",
                   help=f"stack depth (default: {layers})")
    g.add_argument("--steps", type=positive_int, default=steps, metavar="T",
                   help=f"sequence length (default: {steps})")
    g.add_argument("--hidden", type=hidden_sizes, default=hidden, metavar="H",
                   help=f"hidden size, or one per layer such as 64,32,32 (default: {hidden})")
    trained = "; with a training run's --params, the run's record batch" if single_cell else ""
    g.add_argument("--batch", type=positive_int, default=batch, metavar="B",
                   help=f"examples (default: {batch}{trained})" + (
                       ". The default losses average over them, so a gradient map's entries "
                       "scale as 1/B: compare maps at one B" if maps else ""))
    g.add_argument("--seed", type=seed_int, default=0,
                   help="parameters from key(seed), inputs N(0, 1) from key(seed + 1) (default: 0)")
    g.add_argument("--init", type=init_scheme, default=None, help=INIT_HELP)
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: float32)")
    g.add_argument("--input-scale", type=finite_float, default=1.0, metavar="S",
                   help="inputs are S * N(0, 1) (default: 1)")
    g.add_argument("--option", type=option, action="append", metavar="KEY=VALUE",
                   help="another cell option, repeatable (e.g. forget_bias=1.0, "
                        "variant=official, refined=i,o)")
    if single_cell:
        g.add_argument("--input-size", type=width, default=None, metavar="D",
                       help="data features (default: H)")
        g.add_argument("--no-input-projection", action="store_true",
                       help="feed the data to layer 0 directly, even where a refined cell "
                            "needs D == H")
        g.add_argument("--residual", action="store_true",
                       help="residual stack: each layer emits h + x (its output plus its input)")
        g.add_argument("--norm", choices=NORMS, default=None,
                       help="normalise each layer's output: layer (LayerNorm) or rms (RMSNorm)")
        g.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest",
                       help="float32 matmuls: highest (true float32 on every backend), or the "
                            "backend's faster modes high, default (TensorFloat-32 on recent "
                            "NVIDIA GPUs, bfloat16 passes on TPUs; CPUs compute float32 in "
                            "every mode) (default: highest)")


def add_measurement_options(p, wrt: str, loss: bool = True, task: bool = False):
    """The measurement group: what the gradient is taken of and with respect to (``task``:
    ``--loss task`` too, a training run's own loss)."""
    g = p.add_argument_group("measurement")
    if loss:
        g.add_argument("--loss", choices=LOSSES + (("task",) if task else ()), default="last",
                       help="last: a random readout of the top layer's last output; all: mean "
                            "over steps" + ("; task: a training run's own loss through its "
                                            "trained readout (with --params RUN)" if task
                                            else "") + " (default: last)")
    g.add_argument("--wrt", choices=WRTS, default=wrt,
                   help=f"hidden states h, memory c, or per-step parameters (default: {wrt})")
    g.add_argument("--readout-seed", type=seed_int, default=0, metavar="SEED",
                   help="seed of the random readout and labels (default: 0)")
    return g


def add_cost_options(p, checkpoint: bool = True):
    """The cost group: --dry-run, --max-memory (and --checkpoint, which changes the cost)."""
    g = p.add_argument_group("cost")
    g.add_argument("--dry-run", action="store_true",
                   help="print the estimated memory, FLOPs and time, and exit without running")
    g.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="refuse (exit 2) a request estimated to need more than SIZE, e.g. 2G, "
                        "512M (default: the memory available on this machine)")
    if checkpoint:
        g.add_argument("--checkpoint", type=checkpoint_arg, default=None, metavar="auto|C",
                       help="rematerialise in chunks of C steps (auto: sqrt(T)): less memory, "
                            "one more forward pass (default: none)")


#: Requests estimated to run longer than this (seconds) report progress on stderr.
PROGRESS_AFTER = 10.0


def _budget(args, stacks, wrt: str = "hidden", runs: int = 1, stem: str | None = None,
            method: str = "gradient", sizes=None):
    """Check and estimate the request (:mod:`gradflow.cost`) before anything is built or
    compiled: every check a run makes first (``wrt`` against the stacks' states, the output
    paths from ``stem``), so that a dry run passes what the run does.

    ``--dry-run``: print memory, FLOPs and time, return None (the caller exits 0). Otherwise
    refuse a request over ``--max-memory`` or the available memory (an InputError: one line,
    exit 2), and return ``(say, (figure path, data path))``: ``say(message)`` prints progress
    lines on stderr when the request is estimated to take over :data:`PROGRESS_AFTER` seconds.
    ``method``: as :func:`gradflow.cost.estimate` (``"gates"``: forward only; ``"gains"``:
    :func:`gradflow.local_gains`). ``sizes``:
    each stack's ``(batch, steps)`` where they differ (trained runs), else ``--batch``/``--steps``.
    """
    import time

    from gradflow import cost
    from gradflow.jacobian import check_wrt

    for s in stacks:
        check_wrt(s, wrt)
    if getattr(args, "input_scale", None) is not None:
        from gradflow.problem import check_input_scale

        with user_input():
            check_input_scale(args.input_scale, args.dtype)
    paths = output_paths(args, stem, create=False) if stem is not None else None

    sizes = sizes or [(args.batch, args.steps)] * len(stacks)
    spectral = not getattr(args, "no_spectral", False)  # gains: with the spectral norms
    costs = [cost.estimate(s, b, t, args.dtype, wrt, method, calibrate=False, spectral=spectral)
             for s, (b, t) in zip(stacks, sizes)]
    worst = max(costs, key=lambda c: c.total)
    limit = args.max_memory
    can_checkpoint = "checkpoint" in args
    name = f"gradflow {args.command}"
    if not args.dry_run:  # a refusal needs no calibration
        with user_input():
            cost.check_fits(worst, limit, cli=True, checkpoint=can_checkpoint)
    costs = [cost.estimate(s, b, t, args.dtype, wrt, method, spectral=spectral)
             for s, (b, t) in zip(stacks, sizes)]
    seconds = runs * sum(c.seconds for c in costs)
    if args.dry_run:
        cap = limit if limit is not None else cost.available_memory()
        print(f"{name}: dry run (nothing built or computed)")
        print(f"memory:  {cost.size(worst.total)} at the peak (parameters "
              f"{cost.size(worst.params)}, {worst.kept} "
              f"{cost.size(worst.residuals)}, working {cost.size(worst.working)}, inputs "
              f"{cost.size(worst.inputs)})")
        print(f"work:    {cost.flops_str(runs * sum(c.flops for c in costs))} "
              f"({worst.passes})")
        print(f"time:    about {cost.seconds_str(seconds)} on this machine (compilation not "
              "included; from its matmul rate and per-step cost, calibrated within "
              f"{cost.CALIBRATION_DAYS} days: a floor where element-wise work per step "
              "dominates, as in gate statistics and parameter maps, measured up to 10x longer)")
        try:
            cost.check_fits(worst, cap, cli=True, checkpoint=can_checkpoint)
            verdict = "fits"
        except ValueError as e:
            verdict = "does not fit" + ("; " + str(e).split("; ", 1)[1] if "; " in str(e)
                                        else "")
        print(f"limit:   {cost.size(cap)} "
              f"{'(--max-memory)' if limit is not None else 'available'}: {verdict}")
        return None
    start = time.perf_counter()

    def say(message: str):
        if seconds > PROGRESS_AFTER:
            print(f"{name}: {message} (estimated about {cost.seconds_str(seconds)}; "
                  f"{time.perf_counter() - start:.0f} s so far)", file=sys.stderr, flush=True)

    return say, (output_paths(args, stem) if paths is not None else None)


def add_output_options(p):
    """The output group: figure and data paths."""
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, type=out_path, metavar="PATH",
                   help=f"figure path, {'/'.join(e[1:] for e in FORMATS)}, or an existing "
                        "folder to write <name>.png into "
                        f"(default: {DEFAULT_OUT_DIR}/<name>.png, the name carrying the settings "
                        "that differ from the defaults, its folder created; a PATH's folder "
                        "must exist)")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="data path, .npz (default: the figure's path with .npz)")
    g.add_argument("--no-data", action="store_true", help="do not write the data file")


# --- heatmap ---------------------------------------------------------------------------------


def add_heatmap(sub):
    p = _command(sub, "heatmap", "gradient map of one cell over layers x time",
                 "The [layer, time] map of gradient magnitudes of one stack, at initialisation "
                 "or with trained parameters (--params), (wrt hidden: mean_b ||dL/dh^l_t||; wrt "
                 "params: mean |dL/dθ^l_(t)|), as a figure, its data (.npz) and a text summary: "
                 "per-layer and over-time attenuation/amplification factors.", """
            gradflow heatmap --cell lstm --layers 16
            gradflow heatmap --cell star --wrt params --loss all --normalize --out star.pdf
            gradflow heatmap --cell lstm --init chrono --option t_max=64 --dtype float64
            gradflow heatmap --cell lstm --layers 16 --residual --norm layer
            gradflow heatmap --cell mycells:my_lstm --layers 8
            gradflow heatmap --params gradflow-out/train_adding_lstm_L4
            gradflow heatmap --params lstm.npz --inputs xs.npy
        """)
    p.add_argument("--cell", type=cell_name, default="lstm",
                   help="cell name, see `gradflow cells`, a name with options "
                        "(lstm:forget_bias=1.0), or module:factory, a user's factory returning a "
                        "gradflow Cell (or a Cell); or one cell per layer, bottom up "
                        "(gru,star,gru or 'gru*2,star') (default: lstm)")
    add_params_option(p)
    add_problem_options(p, layers=16, steps=32, hidden=64, batch=16)
    g = add_measurement_options(p, wrt="hidden", task=True)
    g.add_argument("--normalize", action="store_true",
                   help="draw each entry relative to the top layer's last step")
    add_cost_options(p)
    add_output_options(p)
    _finish(p, run_heatmap)


def add_params_option(p):
    """``--params`` (trained weights) and ``--inputs`` (your sequences): what a one-stack
    command measures, where it does not build and draw them itself."""
    p.add_argument("--params", default=None, metavar="RUN",
                   help="measure trained parameters: a run folder of `gradflow train` (its "
                        "stack, on its task's evaluation sequences), a .npz of "
                        "gradflow.runs.save_params, or a PyTorch nn.LSTM/GRU/RNN's state_dict "
                        "saved with np.savez; a user's cell is given again with --cell")
    add_prefix_option(p, "which recurrent module of a PyTorch state dict holding several, by "
                         "its name in the model (e.g. encoder.lstm)")
    add_inputs_options(p, "measure on your own sequences instead of Gaussian ones")


def add_prefix_option(p, what: str):
    """``--prefix NAME``: the module of a PyTorch state dict ``--params`` reads (``what`` it
    does, in the command's words; refused without ``--params``, in :func:`_main`)."""
    p.add_argument("--prefix", default=None, metavar="NAME", help=what)


def add_inputs_options(p, what: str):
    """``--inputs FILE`` (``what`` it does, in the command's words) and ``--time-major``."""
    p.add_argument("--inputs", default=None, metavar="FILE",
                   help=f"{what}: a .npy of shape (batch, steps, features), or a .npz holding "
                        "one such array (or one named xs); they fix --steps and --input-size, "
                        "--batch B takes the first B (default: all)")
    p.add_argument("--time-major", action="store_true",
                   help="the --inputs array is (steps, batch, features), as PyTorch's RNNs "
                        "take it by default (batch_first=False)")


def _measured_problem(args, wrt: str = "hidden", method: str = "gradient",
                      check_cell=None):
    """The problem a one-stack command measures, checked and its cost budgeted first: the
    stack and parameters saved at ``--params``, or a fresh stack of ``--cell`` (built after the
    budget). ``check_cell(cells, what)`` checks the command's own needs of the layers' cells
    (e.g. gates), ``what`` naming them in its message.
    Returns ``(say, (figure path, data path), problem)``, or None after a dry run."""
    from gradflow import cells as _cells

    xs = _read_inputs(args)
    if xs is not None and getattr(args, "loss", None) == "task":
        raise _usage(args, "--loss task reads a training run's own targets, which --inputs "
                           "do not have: use --loss last or all")
    if args.params is not None:
        prob = _trained_problem(args, args.params)
        if xs is not None:
            prob = _with_inputs(args, prob, xs, args.params)
        args.batch, args.steps = (int(n) for n in prob.xs.shape[:2])  # the sizes measured
        if check_cell is not None:
            check_cell(prob.stack.cells, f"the cell of {args.params}")
        source = Path(args.params)
        source = source.parent if source.name == "state.npz" else source
        stem = default_stem(args, args.command, prob.stack.config["cell"],
                            f"L{prob.stack.layers}", source.stem,
                            skip=_STACK_OPTIONS + (("steps", "seed", "input_scale")
                                                   if "train_step" in prob.config else ()))
        budget = _budget(args, [prob.stack], wrt, stem=stem, method=method)
        if budget is None:
            return None
        return (*budget, prob)
    if xs is not None:  # the sizes of a fresh stack and its problem
        args.batch, args.steps, args.input_size = (int(n) for n in xs.shape)
    cell = _cell(args, args.steps)  # or one per layer
    per_layer = isinstance(cell, tuple)
    if check_cell is not None:
        check_cell(cell if per_layer else (cell,),
                   f"{'--cell' if per_layer else 'cell'} {args.cell!r}")
    D = first_width(args.hidden) if args.input_size is None else args.input_size
    named = args.cell if per_layer or _written(args.cell) or cell.name in _cells.names() \
        else cell.name  # (a user's cell named like a shipped one: by its module:factory)
    budget = _budget(args, [checked_stack(cell, args.layers, D, args.hidden, args.dtype,
                                          **_stack_settings(args))], wrt,
                     stem=default_stem(args, args.command, named, f"L{args.layers}",
                                       skip=("cell", "layers")), method=method)
    if budget is None:
        return None
    say, paths = budget
    say("building the stack and its parameters...")
    prob = _problem(args, cell)
    return say, paths, (prob if xs is None else _with_inputs(args, prob, xs))


def _check_task_loss(args, paths) -> None:
    """The ``task`` loss needs training runs' ``--params`` (their readouts and targets):
    refused before anything is built, so that a dry run refuses it too."""
    from gradflow import runs

    option = "--loss" if "loss" in args else "--losses"
    if not paths:
        raise _usage(args, f"{option} task is a training run's own loss: give the run with "
                           "--params RUN (the losses last and all probe any stack with a "
                           "random readout)")
    if _given(args, ["readout_seed"]) and "loss" in args:
        raise _usage(args, "--readout-seed sets the random readout of --loss last and all; "
                           "--loss task reads through the run's trained readout")
    with user_input():
        for path in paths:
            if "config" not in runs.read_run(path):
                raise InputError(f"{option} task: {path} is a params file, with no readout "
                                 "or task; a run folder of gradflow train has both")


def _task_loss(args, prob, path):
    """``(loss, what it is in words, enters)``: the run's own loss
    (:func:`gradflow.train.task_loss`) of the run at ``path`` through its trained readout on
    the targets of the sequences ``prob.xs`` are (the first ``--batch`` of its evaluation
    batch); ``enters``: the step the summary starts from, the first the loss scores (copy: its
    recall steps, whose gradient is carried back across the steps before them), None for the
    last step."""
    import jax

    from gradflow import runs
    from gradflow.problem import dtype_of
    from gradflow.train import task_loss

    dt = dtype_of(args.dtype)
    with user_input():
        config = runs.read_run(path)["config"]
        head = {k: jax.numpy.asarray(v, dt) for k, v in runs.load_head(path).items()}
    xs, ys, mask, task = _run_batch(args, config, dt, path)
    if not np.array_equal(np.asarray(xs), np.asarray(prob.xs)):  # one batch, read twice
        raise AssertionError("the task loss's targets are not those of the map's inputs")
    scored = np.flatnonzero(np.asarray(mask).any(axis=0))
    first, T = int(scored[0]), prob.xs.shape[1]
    where = ("the last step" if first == T - 1 else
             f"t {first}..{int(scored[-1])} ({len(scored)} scored steps)")
    text = (f"{task.name}: {task.kind} ({task.metric}) at {where}, trained readout, on the "
            f"first {prob.xs.shape[0]} of the run's {config['eval_batch']} evaluation sequences")
    return task_loss(head, task, ys, mask), text, None if first == T - 1 else first


def run_heatmap(args) -> int:
    from gradflow import plot
    from gradflow.jacobian import gradient_map
    from gradflow.problem import precision

    if args.loss == "task":
        _check_task_loss(args, [] if args.params is None else [args.params])
    with precision(args.dtype):
        model = None if args.params is None else _torch_model_problem(args)
        if model is not None:
            return _torch_heatmap(args, *model)
        measured = _measured_problem(args, args.wrt)
        if measured is None:
            return 0
        say, (fig_path, data_path), prob = measured
        loss, meta, reads, enters = args.loss, prob.config, args.loss, None
        if args.loss == "task":
            loss, text, enters = _task_loss(args, prob, args.params)
            reads, meta = "last", {**meta, "task_loss": text}
        say("compiling and running the gradient map...")
        res = gradient_map(prob.stack, prob.params, prob.xs, loss=loss, wrt=args.wrt,
                           readout_seed=args.readout_seed, meta=meta)
        say("done")
    normalize, notes = _normalizable(args, res)
    title = None if args.params is None else _trained_title(res.config, " \u00b7 ".join(
        [plot.subject(res.config, prob.stack.cells[0].name),
         f"loss={args.loss}", f"wrt={args.wrt}"]))
    fig = plot.heatmap(res, normalize=normalize, title=title)
    print(f"gradflow heatmap: {_describe(res.config, prob.stack.cells[0])}")
    if args.params is not None:
        print(_params_line(args, res.config))
    print(f"gradient map wrt {args.wrt}, loss {args.loss} (value {_g(float(res.loss_value))})"
          + (f": {res.config['task_loss']}" if args.loss == "task" else ""))
    for line in result_summary(res, reads=reads, enters=enters) + notes + _write(
            fig, res, fig_path, data_path):
        print(line)
    return 0


def _normalizable(args, res) -> tuple[bool, list[str]]:
    """``(normalize, notes)`` of ``heatmap --normalize`` for the map ``res``: drawn relative to
    its value where the loss enters (top layer, :func:`entry_step`) only where that is
    positive and finite, else a note says why not."""
    e = entry_step(res.values, res.config.get("wrt"))  # a memory c's last step is 0
    ref = res.values[-1, e]
    if args.normalize and not (np.isfinite(ref) and ref > 0):
        return False, [f"note: not normalised: the value at (top layer, t {e}) is "
                       f"{_g(float(ref))}"]
    return args.normalize, []


def _torch_model_problem(args):
    """``(model, xs, config, (figure path, data path))`` where ``--params`` is a PyTorch
    state dict that a Stack does not express (bidirectional layers, an LSTM with
    ``proj_size``; :func:`gradflow.runs.load_torch_model`), measured as the model
    :func:`gradflow.torch_model` builds, on Gaussian inputs of ``--batch``, ``--steps``,
    ``--seed`` and ``--input-scale`` or on ``--inputs``; None for any other ``--params``.
    What only a Stack has is refused in one line: stack options, ``--wrt`` other than hidden,
    ``--checkpoint``, and ``--dry-run`` and ``--max-memory`` (no estimate before a model is
    compiled: XLA's count of the compiled program is checked against the available memory
    before it runs, :func:`gradflow.cost.compiled`)."""
    import jax

    from gradflow import runs
    from gradflow.problem import dtype_of

    with user_input():
        t = runs.load_torch_model(args.params, dtype_of(args.dtype), args.prefix)
    if t is None:
        return None
    kind = f"{args.params} ({t.source})"
    given = _given(args, _STACK_OPTIONS + ("checkpoint",))
    if given:
        raise _usage(args, f"{', '.join(given)} cannot be used with --params {kind}: the "
                           "state dict fixes the model")
    if getattr(args, "wrt", "hidden") != "hidden":
        raise _usage(args, f"--wrt {args.wrt}: {kind} is measured as a model "
                           "(gradflow.torch_model), whose map is wrt the hidden state of every "
                           "layer (and direction): use --wrt hidden")
    cost = _given(args, ("dry_run", "max_memory"))
    if cost:
        raise _usage(args, f"{', '.join(cost)}: {kind} is measured as a model, whose cost is "
                           "known only once compiled (its memory is then checked against the "
                           "available memory, before it runs)")
    xs = _read_inputs(args)
    config = {"params": str(args.params), "params_fingerprint": fingerprint(
                  *jax.tree_util.tree_leaves(t.params)), "source": t.source,
              "rows": list(t.rows), **({"prefix": args.prefix} if args.prefix else {})}
    if xs is None:
        xs = np.asarray(_gaussian(args, t.input_size, dtype_of(args.dtype)))
        config.update(seed=args.seed, input_scale=args.input_scale)
    else:
        xs = _read_width(args, xs, t.input_size, kind)
        config.update(_inputs_config(args, xs))
    stem = default_stem(args, args.command, Path(args.params).stem,
                        skip=_STACK_OPTIONS + (("steps", "seed", "input_scale")
                                               if "inputs_from" in config else ()))
    return t, xs, config, output_paths(args, stem)


def _params_line(args, config: dict) -> str:
    """``trained parameters from FILE``, with the PyTorch module ``--prefix`` picked and the
    training step where the config records them."""
    return (f"trained parameters from {args.params}"
            + (f", module {args.prefix}" if getattr(args, "prefix", None) else "")
            + (f" (step {config['train_step']})" if "train_step" in config else ""))


def _torch_header(args, t, xs, config, name: str) -> str:
    """The first lines of a command's output on a PyTorch model (:func:`_torch_model_problem`):
    what it is, its rows, sizes and inputs, and the file."""
    from gradflow import plot

    B, T, _ = xs.shape
    return (f"gradflow {args.command}: {t.source} ({name}), {len(t.rows)} rows x {T} steps, "
            f"B={B}, " + (f"inputs {plot.inputs_text(config)}" if "inputs_from" in config
                          else f"seed {args.seed}") + f", {xs.dtype}\n"
            + (f"rows, bottom up: {', '.join(t.rows)}\n" if t.bidirectional else "")
            + _params_line(args, config))


def _torch_gates(args, t, xs, config, paths) -> int:
    """``gradflow gates --params`` of a PyTorch model a Stack does not express
    (:func:`_torch_model_problem`): :func:`gradflow.gates.model_saturation` of its gates, one
    row per layer and direction."""
    import jax

    from gradflow import gates as _gates
    from gradflow import plot

    if args.gate is not None and args.gate not in t.kinds:
        raise _usage(args, f"{args.params} has no gate {args.gate!r}; its gates: "
                           f"{', '.join(t.kinds)}")
    with jax.default_matmul_precision(args.matmul_precision):
        stats = _gates.model_saturation(t.gates, t.params, xs, kinds=t.kinds, retain=t.retain,
                                        eps=args.eps, bins=args.bins, couples_batch=False,
                                        meta={**config, "gate": args.gate})
    shown = [args.gate] if args.gate else list(stats.config["gates"])
    fig = plot.gates_figure(stats, shown)
    fig.suptitle(f"{t.source} \u00b7 gates")
    print(_torch_header(args, t, xs, config, stats.config["model"])
          + f"\nsaturated: < {args.eps:g} or > 1 - {args.eps:g}")
    summary, kinds = _gates.summary(stats), stats.config["gate_kinds"]
    absent = not_measured(stats.kind, stats.arrays, stats.config)
    for gate in shown:
        for line in _gate_lines(stats, gate, summary, kinds[gate], absent):
            print(line)
    for line in _write(fig, stats, *paths):
        print(line)
    return 0


def _torch_heatmap(args, t, xs, config, paths) -> int:
    """``gradflow heatmap --params`` of a PyTorch model a Stack does not express
    (:func:`_torch_model_problem`): :func:`gradflow.model_map` of it, one row per layer and
    direction; the summary per direction (the reverse one runs from the last step back)."""
    import jax

    from gradflow import plot
    from gradflow.jacobian import model_map

    fig_path, data_path = paths
    B, T, _ = xs.shape
    with jax.default_matmul_precision(args.matmul_precision):
        res = model_map(t.model, t.params, xs, layers=t.layers, loss=args.loss,
                        readout_seed=args.readout_seed, couples_batch=False,
                        reaches=t.reaches(args.loss, T), meta=config)
    normalize, notes = _normalizable(args, res)
    title = " \u00b7 ".join([t.source, f"loss={args.loss}", "wrt=hidden"])
    fig = plot.heatmap(res, normalize=normalize, title=title)
    print(_torch_header(args, t, xs, config, res.config["model"]))
    print(f"gradient map wrt hidden, loss {args.loss} (value {_g(float(res.loss_value))})")
    if t.bidirectional:  # each direction on its own: rows 0, 2, ... and 1, 3, ...
        from gradflow.results import underflow_count

        values, reaches, lines = np.asarray(res.values), t.reaches(args.loss, T), []
        along = (f"none: this direction runs from t {T - 1} back, and loss last reads its top "
                 f"state at t {T - 1} only (0 before it by construction)")
        for d, name in enumerate(("forward", "reverse")):
            lines.append(f"{name} direction (rows {', '.join(t.rows[d::2])}), as layers:")
            lines += ["  " + x for x in map_summary(
                values[d::2], underflow=underflow_count(values[d::2], reaches[d::2]),
                last=T - 1, loss=args.loss, stacked=False,
                along=along if d == 1 and args.loss == "last" else None)]
    else:
        lines = result_summary(res)
    for line in lines + notes + _write(fig, res, fig_path, data_path):
        print(line)
    return 0


# --- compare ---------------------------------------------------------------------------------


def add_compare(sub):
    p = _command(sub, "compare", "several cells side by side (STAR Fig. 2 layout)",
                 "Gradient maps of several cells on the same problem, rows = losses, "
                 "columns = cells, one shared log colour scale, each map relative to its own "
                 "top-layer, last-step value as in the STAR paper's Figure 2 (--absolute: the "
                 "raw values). The defaults are that figure's setting (10 x 10, H = 128, wrt "
                 "params, both losses). With --params: trained runs instead, each on its own "
                 "inputs (--losses task: each under its own loss).", """
            gradflow compare --cells rnn,lstm,star --layers 10 --steps 10
            gradflow compare --cells lstm,gru --losses last --wrt hidden --absolute
            gradflow compare --cells lstm,lstm:forget_bias=1.0,ur_lstm --wrt hidden
            gradflow compare --cells 'lstm,lstm*9/ur_lstm' --wrt hidden
            gradflow compare --params runs/lstm,runs/star --wrt hidden --losses last
        """)
    p.add_argument("--cells", type=cell_list, default=["rnn", "lstm", "star"],
                   help="comma-separated cell names, a name with options such as "
                        "lstm:forget_bias=1.0 or lstm:aux=refine,tied=True (the same cell at "
                        "another setting), "
                        "module:factory (a user's cell), or a stack of different cells, one "
                        "per layer joined by / and bottom up (gru*9/star: nine GRU layers under "
                        "a STAR one) (default: rnn,lstm,star)")
    p.add_argument("--params", type=path_list, default=None, metavar="RUN[,RUN...]",
                   help="trained runs side by side instead of fresh cells: comma-separated run "
                        "folders of `gradflow train` (each on its own task's evaluation "
                        "sequences, as many as its recorded maps used unless --batch) or .npz "
                        "files of gradflow.runs.save_params or PyTorch state dicts (Gaussian "
                        "inputs at --steps and --batch), each labelled by its file or folder "
                        "name")
    add_prefix_option(p, "with --params of PyTorch state dicts holding several recurrent "
                         "modules: the one measured in each, by its name in the model (e.g. "
                         "decoder.lstm: a decoder at two checkpoints side by side)")
    add_inputs_options(p, "with --params: every run measured on these sequences")
    p.add_argument("--losses", type=loss_list, default=["last", "all"],
                   help="comma-separated rows: last, all, and with --params task (each run's "
                        "own loss through its trained readout) (default: last,all)")
    add_problem_options(p, layers=10, steps=10, hidden=128, batch=16, single_cell=False)
    add_cost_options(p, checkpoint=False)
    g = add_measurement_options(p, wrt="params", loss=False)
    g.add_argument("--absolute", action="store_true",
                   help="draw the raw values (default: each map relative to its top-last value)")
    g.add_argument("--normalize", dest="absolute", action="store_false", default=False,
                   help=argparse.SUPPRESS)  # the default; accepted for older scripts
    add_output_options(p)
    _finish(p, run_compare)


#: What the columns of ``gradflow compare``'s table mean (printed under it).
_COMPARE_FOOTNOTE = (
    "(from where the loss enters, the top layer's last step (wrt cell: the last step c "
    "reaches it): bottom/top down that step and its geometric-mean factor per layer; "
    "bottom/top, mean: of the time-means, which include the diagonal paths (not a "
    "per-layer gain; * where the bottom or top layer has non-finite entries, which its mean "
    "leaves out: inf where the gradient overflowed, its largest; NaN where the forward pass "
    "did); first/last step: along the top layer (under loss all not a "
    "per-step decay: the loss enters at every step); dec. vs top-last: the range over the "
    "entries the loss reaches, -inf where one is exactly 0; x0 (-inf dec): exactly 0; "
    "underflow: entries below the smallest normal float, where the gradient vanished "
    "past the float range; loss task: read from the top-last entry too, also where the "
    "task's loss first enters earlier (copy's recall steps: heatmap --loss task's summary "
    "starts there))")


def _compare_notes(problems: dict) -> list[str]:
    """``note:`` lines where trained runs side by side are not measured alike: over different
    numbers of sequences (the default losses average over the batch: entries scale as 1/B),
    or a params file (Gaussian inputs) beside runs (their tasks' sequences)."""
    notes = []
    sizes = {label: int(p.xs.shape[0]) for label, p in problems.items()}
    if len(set(sizes.values())) > 1:
        notes.append("note: the maps are over different numbers of sequences (" + ", ".join(
            f"{k}: B={v}" for k, v in sizes.items()) + "); the losses average over the batch, "
            "so entries scale as 1/B: give --batch to measure every run at one")
    files = [label for label, p in problems.items() if "train_step" not in p.config]
    if files and len(files) < len(problems):
        what = "is a params file" if len(files) == 1 else "are params files"
        notes.append(f"note: {', '.join(files)} {what} measured on Gaussian inputs, the runs on "
                     "their tasks' evaluation sequences")
    return notes


def _compare_table(grid, column: str) -> None:
    """Print ``compare``'s table of a grid (one line per loss and cell, :func:`_panel_line`)
    and what its columns mean; ``column`` heads the labels' column."""
    from gradflow import experiments

    labels = grid.config["cells"]
    width = max(4, *(len(c) for c in labels))
    print(f"  {'loss':<5} {column:<{width}} {'top-last':>10}  {'bottom/top, last step':>20}  "
          f"{'per layer':>9}  {'bottom/top, mean':>20}  {'first/last step':>20}  "
          f"{'dec. vs top-last':>16}  {'non-finite':>10}  {'underflow':>9}")
    for loss in grid.config["losses"]:
        for label in labels:
            print(_panel_line(loss, label, experiments.panel(grid, loss, label), width))
    print(textwrap.fill(_COMPARE_FOOTNOTE, 100))


def _not_written(cells: str, options: dict) -> dict:
    """``options`` less those written in ``cells`` (``lstm:forget_bias=1.0``, or a stack of
    them, ``gru*9/star:t_max=5``), which win there: what the config and the title say
    ``--option`` set for that column."""
    from gradflow import cells as _cells

    written = {k for spec in layer_cells(cells) for k in _cells.parse_spec(spec)[1]}
    return {k: v for k, v in options.items() if k not in written}


def run_compare(args) -> int:
    from gradflow import cells as _cells
    from gradflow import experiments, plot

    if args.params is not None:
        return _compare_trained(args)
    if args.inputs is not None:
        raise _usage(args, "--inputs measures trained --params on your sequences; fresh cells "
                           "on them: gradflow heatmap --inputs, one cell at a time, or "
                           "gradflow.experiments.map_grid")
    if "task" in args.losses:
        _check_task_loss(args, [])
    options = _cell_options(args)
    stacks, entries = [], []  # a name (with options), one per layer, or a user's built cell
    named = [c for c in args.cells if not _user_cell(c) or _layered(c)]
    for c in args.cells:
        specs = layer_cells(c) if _layered(c) else [c]
        if _layered(c):
            _check_layer_specs(args, f"--cells: {c}", specs, "one cell per layer",
                               "compared with the API, gradflow.experiments.map_grid")
        with user_input():
            if c in named:  # (options written in c win over --option)
                cell = tuple(_cells.for_length(s, args.steps, **options) for s in specs)
            else:
                cell = (load_cell(c, options),)
        entries.append((specs if len(specs) > 1 else specs[0]) if c in named else cell[0])
        try:
            stacks.append(checked_stack(cell if len(cell) > 1 else cell[0], args.layers,
                                        first_width(args.hidden), args.hidden, args.dtype))
        except InputError as e:  # which of the columns
            raise InputError(f"--cells {c}: {e}") from None
    labels = [experiments.stack_label(e) if isinstance(e, list) else
              e if isinstance(e, str) else e.name for e in entries]
    labels = [c if c not in named and labels.count(label) > 1 else label  # (a user's cell
              for c, label in zip(args.cells, labels)]  # named like another: its --cells text)
    if len(set(labels)) < len(labels):
        raise InputError(f"--cells names a cell twice ({', '.join(labels)}); a user's cell is "
                         "labelled by its name, or by its module:factory where another column "
                         "has that name")
    stem = default_stem(args, "compare", "-".join(args.cells), f"L{args.layers}",
                        skip=("cells", "layers"))
    budget = _budget(args, stacks, args.wrt, runs=len(args.losses), stem=stem)
    if budget is None:
        return 0
    say, (fig_path, data_path) = budget
    say("building, compiling and running the gradient maps...")
    grid = experiments.gradient_grid(
        dict(zip(labels, entries)), args.losses, wrt=args.wrt, readout_seed=args.readout_seed,
        layers=args.layers, steps=args.steps, hidden=args.hidden, batch=args.batch,
        seed=args.seed, dtype=args.dtype, init=args.init, input_scale=args.input_scale,
        cell_options={label: _not_written(c, dict(args.option))
                      for label, c in zip(labels, args.cells) if c in named}
        if args.option else None)
    fig = plot.draw_grid(grid, normalize=not args.absolute)
    first = grid.config["maps"][f"{args.losses[0]}/{labels[0]}"]
    print(f"gradflow compare: {', '.join(labels)}; {args.layers} layers x {args.steps} steps, "
          f"H={width_text(args.hidden)}, B={args.batch}, seed {args.seed}, "
          + (f"init {args.init}, " if args.init is not None else "")
          + (f"input scale {args.input_scale:g}, " if args.input_scale != 1.0 else "")
          + f"{first['dtype']}, wrt {args.wrt}; "
          + (f"{plot.options_text(grid.config)}; " if plot.options_text(grid.config) else "")
          + ("absolute values" if args.absolute else "each map relative to its top-last value"))
    _compare_table(grid, "cell")
    for line in _write(fig, grid, fig_path, data_path):
        print(line)
    return 0


def _compare_trained(args) -> int:
    """``compare --params``: the maps of trained runs (or params files) side by side, each
    on its own inputs, every map with the same losses, ``--wrt`` and readout seed."""
    from gradflow import experiments, plot
    from gradflow.problem import precision

    given = _given(args, ("cells",))
    if given:
        raise _usage(args, "--cells cannot be used with --params: the saved runs fix the "
                           "stacks")
    sources = [Path(p).parent if Path(p).name == "state.npz" else Path(p) for p in args.params]
    labels = [s.name if s.is_dir() else s.stem for s in sources]  # runs/lr0.001: the folder
    if len(set(labels)) < len(labels):
        labels = [str(s) for s in sources]  # runs/a/x and runs/b/x: their paths
    if len(set(labels)) < len(labels):
        raise _usage(args, f"--params repeats a run: {', '.join(map(str, args.params))}")
    xs = _read_inputs(args)
    if xs is not None and "task" in args.losses:
        raise _usage(args, "--losses task reads training runs' own targets, which --inputs do "
                           "not have: use last and all")
    if "task" in args.losses:
        _check_task_loss(args, args.params)
    with precision(args.dtype):
        problems = {label: _trained_problem(args, path)
                    for label, path in zip(labels, args.params)}
        if xs is not None:
            problems = {label: _with_inputs(args, p, xs, path) for (label, p), path in zip(
                problems.items(), args.params)}
        stem = default_stem(args, "compare", "-".join(labels), skip=_STACK_OPTIONS + (
            "steps", "seed", "input_scale", "batch"))
        budget = _budget(args, [p.stack for p in problems.values()], args.wrt,
                         runs=len(args.losses), stem=stem,
                         sizes=[tuple(int(n) for n in p.xs.shape[:2]) for p in problems.values()])
        if budget is None:
            return 0
        say, (fig_path, data_path) = budget
        say("compiling and running the gradient maps...")
        task, path_of = {}, dict(zip(labels, args.params))  # each run's own loss

        def task_of(label, prob):
            task[label] = _task_loss(args, prob, path_of[label])
            return task[label][0]

        grid = experiments.map_grid(problems, [("task", task_of) if loss == "task" else loss
                                               for loss in args.losses],
                                    wrt=args.wrt, readout_seed=args.readout_seed)
    fig = plot.draw_grid(grid, normalize=not args.absolute, title=(
        f"trained: gradient maps wrt {args.wrt}"
        + (", relative to (top layer, last step)" if not args.absolute else "")))
    print(f"gradflow compare: trained parameters, wrt {args.wrt}, "
          + ("absolute values" if args.absolute else "each map relative to its top-last value"))
    for label, prob in problems.items():
        print(f"  {label}: {_describe(prob.config, prob.stack.cells[0])}"
              + (f"; loss task: {task[label][1]}" if label in task else ""))
    for note in _compare_notes(problems):
        print(note)
    _compare_table(grid, "run")
    for line in _write(fig, grid, fig_path, data_path):
        print(line)
    return 0


# --- gates -----------------------------------------------------------------------------------


def add_gates(sub):
    p = _command(sub, "gates", "gate saturation, slopes, timescales, histograms",
                 "Statistics of every gate a cell reports, at initialisation: mean activation, "
                 "fraction saturated (< eps or > 1 - eps), local slope, memory timescales "
                 "1/(1 - f) per unit (their quantiles and a count per decade), time-gate "
                 "updates; a figure with each gate's saturation map and per-layer histograms.",
                 """
            gradflow gates --cell ur_lstm
            gradflow gates --cell lstm --init ugi --gate f --eps 0.1
        """)
    p.add_argument("--cell", type=cell_name, default="lstm",
                   help="cell name, name:option=value, or module:factory; or one per layer, "
                        "bottom up (gru,star,gru or 'gru*2,star') (default: lstm)")
    p.add_argument("--gate", default=None,
                   help="print and draw only this gate (default: every gate); the data file "
                        "holds every gate's statistics, with this choice as config['gate']")
    p.add_argument("--eps", type=fraction, default=0.05,
                   help="saturation margin, in (0, 0.5) (default: 0.05)")
    p.add_argument("--bins", type=bin_count, default=20,
                   help="histogram bins (default: 20; at most 10000)")
    add_params_option(p)
    add_problem_options(p, layers=4, steps=32, hidden=64, batch=16, maps=False)
    add_cost_options(p, checkpoint=False)
    add_output_options(p)
    _finish(p, run_gates)


def _gate_lines(stats, gate: str, summary: dict, kind: str, absent: dict) -> list[str]:
    """The summary lines of one gate (``absent``: :func:`gradflow.results.not_measured` of
    ``stats``)."""
    s = summary[gate]
    parts = [f"mean {s['mean']:.3f}", f"saturated {s['saturated']:.3f}"]
    if "slope" in s:
        parts.append(f"slope {s['slope']:.3f}")
    if "timescale" in s:
        parts.append(f"timescale of the mean {_g(s['timescale'])} steps")
    if "update_fraction" in s:
        parts.append(f"updates {s['update_fraction']:.3f}")
    parts.append(f"non-finite {int(s.get('nonfinite', 0))}")
    lines = [f"  gate {gate:<9} ({kind}): " + ", ".join(parts)]
    per_layer = stats[f"saturated/{gate}/layer"]
    off = absent.get(f"saturated/{gate}/layer", np.zeros(per_layer.shape, bool))  # no gate
    lines.append("    saturated per layer (bottom..top): "
                 + " ".join("-" if o else f"{v:.3f}" for v, o in zip(per_layer, off)))
    if f"timescale/{gate}/unit" in stats.arrays:  # the units that exist and have the gate
        tau = np.asarray(stats[f"timescale/{gate}/unit"], dtype=float)
        keep = ~np.broadcast_to(absent.get(f"timescale/{gate}/unit", False), tau.shape)
        widths = stats.config.get("hidden_size")
        if isinstance(widths, list) and len(widths) == tau.shape[0]:  # padded to the widest
            keep = keep & (np.arange(tau.shape[1]) < np.array(widths)[:, None])
        lines += ["    " + line for line in timescale_lines(tau[keep])]
    outside = np.asarray(stats[f"outside/{gate}/pooled"])
    if outside.sum():
        from gradflow.views import value_range

        lo, hi = value_range(kind)  # the kind's range: [-1, 1] for tanh, else [0, 1]
        lines.append(f"    outside [{lo:g}, {hi:g}]: {int(outside[0])} below {lo:g}, "
                     f"{int(outside[1])} above {hi:g}"
                     + (f", {int(outside[2])} NaN" if outside.size > 2 else ""))
    return lines


def run_gates(args) -> int:
    from gradflow import cells as _cells
    from gradflow import gates as _gates
    from gradflow import plot
    from gradflow.problem import precision

    def check(cells, what):
        if not any(c.gate_names for c in cells):
            with_gates = [n for n in _cells.names() if _cells.get(n).gate_names]
            raise _usage(args, f"{what} reports no gates; cells with gates: "
                               f"{', '.join(with_gates)}")
        with user_input():
            names = list(_gates.gate_layout(cells).kinds)
        if args.gate is not None and args.gate not in names:
            raise _usage(args, f"{what} has no gate {args.gate!r}; its gates: "
                               f"{', '.join(names)}")

    with precision(args.dtype):
        model = None if args.params is None else _torch_model_problem(args)
        if model is not None:
            return _torch_gates(args, *model)
        measured = _measured_problem(args, method="gates", check_cell=check)
        if measured is None:
            return 0
        say, (fig_path, data_path), prob = measured
        say("compiling and running the gate statistics...")
        stats = _gates.saturation(prob.stack, prob.params, prob.xs, args.eps, bins=args.bins,
                                  meta={**prob.config, "gate": args.gate})
    shown = [args.gate] if args.gate else list(stats.config["gates"])
    fig = plot.gates_figure(stats, shown)
    if args.params is not None:
        fig.suptitle(_trained_title(stats.config, plot.subject(stats.config, "gates"),
                                    " \u00b7 "))
    print(f"gradflow gates: {_describe(stats.config, prob.stack.cells[0])}; saturated: "
          f"< {args.eps:g} or > 1 - {args.eps:g}")
    if args.params is not None:
        print(_params_line(args, stats.config))
    summary, kinds = _gates.summary(stats), stats.config["gate_kinds"]
    absent = not_measured(stats.kind, stats.arrays, stats.config)
    for gate in shown:
        for line in _gate_lines(stats, gate, summary, kinds[gate], absent):
            print(line)
    for line in _write(fig, stats, fig_path, data_path):
        print(line)
    return 0


# --- gains -----------------------------------------------------------------------------------


def add_gains(sub):
    p = _command(sub, "gains", "one-step gains of each layer: upward and in time",
                 "Local gains along the inputs' trajectory, at initialisation (or --params): "
                 "at every (layer, step) the one-step Jacobians, vertical (what a layer passes "
                 "up: dy/dx, with a residual or normalised stack's skip path and norm), temporal "
                 "(dh_t/dh_t-1, other state such as an LSTM's memory held fixed) and the whole "
                 "state's (ds_t/ds_t-1, with the memory path), each example's RMS gain "
                 "||J||_F / sqrt(n) and spectral norm, averaged over the batch; a table of each "
                 "layer's mean over the steps and a figure of those profiles over depth. A gain "
                 "below 1 shrinks a gradient at every such step. Its cost is estimated "
                 "before it runs (--dry-run: only that); the spectral norms take most of the "
                 "time.", """
            gradflow gains --cell lstm --layers 16
            gradflow gains --cell lstm --layers 16 --residual --norm layer
            gradflow gains --params runs/star8
            gradflow gains --cell gru --layers 32 --hidden 256 --no-spectral
        """)
    p.add_argument("--cell", type=cell_name, default="lstm",
                   help="cell name, name:option=value, or module:factory; or one per layer, "
                        "bottom up (gru,star,gru or 'gru*2,star') (default: lstm)")
    add_params_option(p)
    p.add_argument("--no-spectral", action="store_true",
                   help="RMS gains only, without the spectral norms (their SVDs take nearly all "
                        "of the time: 12-18x faster)")
    add_problem_options(p, layers=16, steps=32, hidden=64, batch=8, maps=False)
    add_cost_options(p, checkpoint=False)
    add_output_options(p)
    _finish(p, run_gains)


#: What the columns of ``gradflow gains``' table mean (printed under it).
_GAINS_FOOTNOTE = (
    "(each layer's mean over the steps of the batch-mean gains; rms: ||J||_F / sqrt(n), 1 where "
    "a gradient keeps its size on average; spectral: the largest factor any direction gets; "
    "vertical: from a layer's input to what it emits upward (layer 0: from the data or its "
    "projection); temporal: dh_t/dh_t-1 with the rest of the state held fixed; state: the "
    "whole state's, e.g. an LSTM's (c, h) with its memory path; non-finite entries, where the "
    "forward pass overflowed, are left out of the means and counted)")


def _gains_summary(means: dict) -> list[str]:
    """What the gains table says in two lines: the geometric means of its rms columns, up the
    stack over the layers above the first (whose input is the data) and back in time over all.

    >>> for line in _gains_summary({("vertical", "rms"): np.array([0.5, 0.2, 0.8]),
    ...                             ("temporal", "rms"): np.array([0.5, 0.5, 0.5]),
    ...                             ("state", "rms"): np.array([0.1, 1.0, 10.0])}):
    ...     print(line)
    up the stack: x0.4 per layer (vertical rms, layers 1..2)
    back in time: x0.5 per step (temporal rms), x1 (state rms)
    >>> _gains_summary({("vertical", "rms"): np.array([0.5, np.nan, 0.8]),
    ...                 ("temporal", "rms"): np.array([0.5, 0.5, 0.5]),
    ...                 ("state", "rms"): np.array([0.1, 1.0, 10.0])})[0]
    'up the stack: n/a (layer 1 not finite) per layer (vertical rms, layers 1..2)'
    """
    def geomean(v, first=0):  # "n/a (layer 2 not finite)" where a layer's mean is no number
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            return (f"n/a (layer{'s' * (bad.size > 1)} {', '.join(map(str, bad + first))} "
                    "not finite)")
        with np.errstate(invalid="ignore", divide="ignore"):
            return "x" + _g(float(np.exp(np.mean(np.log(v)))))

    up = means["vertical", "rms"][1:]
    head = ([f"up the stack: {geomean(up, 1)} per layer (vertical rms, layers 1..{up.size})"]
            if up.size else [])
    return head + [f"back in time: {geomean(means['temporal', 'rms'])} per step (temporal "
                   f"rms), {geomean(means['state', 'rms'])} (state rms)"]


def run_gains(args) -> int:
    from gradflow import plot
    from gradflow.jacobian import _per_example, local_gains
    from gradflow.problem import precision

    with precision(args.dtype):
        measured = _measured_problem(args, method="gains")
        if measured is None:  # a dry run
            return 0
        say, (fig_path, data_path), prob = measured
        with user_input():  # a cell that couples the examples has no per-example Jacobians
            _per_example(prob.stack, "gradflow gains")
        say("computing the one-step Jacobians...")
        gains = local_gains(prob.stack, prob.params, prob.xs, spectral=not args.no_spectral,
                            meta=prob.config)
    fig = plot.gains_figure(gains)
    if args.params is not None:
        fig.suptitle(_trained_title(gains.config, plot.subject(gains.config), " \u00b7 "))
    print(f"gradflow gains: {_describe(gains.config, prob.stack.cells[0])}")
    if args.params is not None:
        print(_params_line(args, gains.config))
    stats = [st for st in plot.GAIN_STATS if f"vertical_{st}" in gains.arrays]
    means = {(k, st): finite_row_means(np.asarray(gains[f"{k}_{st}"], np.float64))
             for k in plot.GAIN_KINDS for st in stats}

    def row(head, cell):
        return f"  {head:>5}" + "".join(
            f"{' / '.join(cell(k, st) for st in stats):>{12 * len(stats) + 1}}"
            for k in plot.GAIN_KINDS)

    print(row("layer", lambda k, st: st if st != stats[0] else f"{k} {st}"))
    for l in reversed(range(prob.stack.layers)):  # top first, as the maps are drawn
        print(row(l, lambda k, st: _g(means[k, st][l])))
    for line in _gains_summary(means):
        print("  " + line)
    print(textwrap.fill(_GAINS_FOOTNOTE, 100))
    if gains.total_nonfinite:
        print(f"non-finite: {gains.total_nonfinite} entries")
    for line in _write(fig, gains, fig_path, data_path):
        print(line)
    return 0


# --- cells -----------------------------------------------------------------------------------


def add_cells(sub):
    p = _command(sub, "cells", "list every cell: equation, gates, parameter count", None,
                 "gradflow cells --hidden 256")
    p.add_argument("--hidden", type=width, default=128, metavar="H",
                   help="hidden size for the parameter counts (default: 128)")
    p.add_argument("--input-size", type=width, default=None, metavar="D",
                   help="input size (default: H; refined cells always read H)")
    _finish(p, run_cells)


def run_cells(args) -> int:
    from gradflow import cells as _cells

    D = args.hidden if args.input_size is None else args.input_size
    rows = []
    for name in _cells.names():
        cell = _cells.get(name)
        count = cell.param_count(args.hidden if cell.square else D, args.hidden)
        rows.append((name, f"{count:,}", ", ".join(cell.gate_names) or "-", cell.equation))
    w = [max(len(r[i]) for r in [("cell", "params", "gates"), *rows]) for i in range(3)]
    print(f"{'cell':<{w[0]}}  {'params':>{w[1]}}  {'gates':<{w[2]}}  equation   "
          f"(params of one layer, input {D} -> hidden {args.hidden})")
    for name, count, gates, equation in rows:
        print(f"{name:<{w[0]}}  {count:>{w[1]}}  {gates:<{w[2]}}  {equation}")
    return 0


# --- reproduce -------------------------------------------------------------------------------


def add_reproduce(sub):
    p = _command(sub, "reproduce", "regenerate the committed figures from their configs",
                 "Rebuild figures (PNG and .npz data) from the JSON configs shipped with "
                 "gradflow into an output folder; the committed copies are replaced only with "
                 "--update.", """
            gradflow reproduce --list
            gradflow reproduce --only star_fig2 --out /tmp
        """)
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",")], default=None,
                   metavar="NAME[,NAME]", help="only these figures (see --list)")
    p.add_argument("--figures", default=None, metavar="DIR",
                   help="where the configs are (default: the ones shipped with gradflow)")
    p.add_argument("--out-dir", "--out", default=None, type=out_path, metavar="DIR",
                   help="the folder to write to; must exist")
    p.add_argument("--update", action="store_true",
                   help="write over the committed figures of a source checkout (figures/)")
    p.add_argument("--redraw", action="store_true",
                   help="compute nothing: draw the figures again from their committed data "
                        "(figures/NAME.npz, or --data DIR) and write only the PNGs")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="with --redraw: where the data is (NAME.npz), e.g. an earlier --out "
                        "(default: the committed figures/)")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    _finish(p, run_reproduce)


def run_reproduce(args) -> int:
    from gradflow import reproduce as _reproduce

    with user_input():
        found = _reproduce.configs(args.figures)
    if not found:  # (an internal error, or an empty --list)
        raise _usage(args, f"{args.figures or str(_reproduce.CONFIG_DIR)!r} holds no figure "
                           "configs (*.json with a 'figure' field)" + (
                               f"; the shipped ones are in {str(_reproduce.CONFIG_DIR)!r} "
                               "(their data: figures/)" if args.figures else ""))
    for name in args.only or ():
        if name not in found:
            raise _usage(args, f"unknown figure {name!r}; valid: {', '.join(found) or '(none)'}")
    twice = sorted({n for n in args.only or () if args.only.count(n) > 1})
    if twice:
        raise _usage(args, f"--only names {', '.join(twice)} more than once; give each once")
    if args.list:  # (those --only names)
        for name, path in found.items():
            if args.only and name not in args.only:
                continue
            cfg = _reproduce.load_config(path)
            cells = ", ".join(map(str, cfg.get("cells", [])))
            print(f"{name}: {cfg['figure']}" + (f" ({cells})" if cells else "") + f"  [{path}]")
        return 0
    committed = _reproduce.FIGURES_DIR
    if args.update and args.out_dir is not None and not (
            committed.is_dir() and Path(args.out_dir).resolve() == committed.resolve()):
        raise _usage(args, "--update replaces the committed figures (figures/) and --out "
                           f"{args.out_dir} writes elsewhere; give one of the two")
    if args.update and args.figures is not None and (
            Path(args.figures).resolve() != _reproduce.CONFIG_DIR.resolve()):
        raise _usage(args, "--update replaces the committed figures (figures/), made from the "
                           f"shipped configs, not those in --figures {args.figures}: write "
                           "these to a folder of yours (--out DIR)")
    if args.out_dir is not None:  # (an empty one is refused by its type: out_path)
        _writable_dir(Path(args.out_dir), args.out_dir)
    elif not args.update:
        raise _usage(args, "choose where to write: --out DIR (or --update to replace the "
                           "committed figures)")
    if (args.out_dir is not None and not args.update and committed.is_dir()
            and Path(args.out_dir).resolve() == committed.resolve()):
        raise _usage(args, f"{args.out_dir!r} holds the committed figures; write elsewhere, or "
                           "add --update to replace them")
    if args.data is not None and not args.redraw:
        raise _usage(args, "--data is where --redraw reads the data; add --redraw, or leave "
                           "--data out to compute")
    if args.redraw:  # each figure's data must be there (one line if not)
        for name in args.only or found:
            path = _reproduce.data_path(name, args.data)
            if not path.is_file():
                raise _usage(args, f"--redraw: figure {name!r} has no "
                                   + ("committed " if args.data is None else "")
                                   + f"data ({str(path)!r}); compute it without --redraw")
    _reproduce.reproduce(args.only, out_dir=args.out_dir, update=args.update,
                         config_dir=args.figures, log=lambda line: print(line, flush=True),
                         redraw=args.redraw, data_dir=args.data)
    return 0


# --- atlas -----------------------------------------------------------------------------------


def add_atlas(sub):
    p = _command(sub, "atlas", "where each claim holds, over a grid of conditions",
                 "Evaluate named claims (gradflow.atlas.CLAIMS: rnn_amplified, lstm_collapses, "
                 "star_preserved, ...) on the measurements (gradient maps, local gains, gate "
                 "statistics) of every condition of a grid (from the grid flags, or --grid: a "
                 "JSON object or list of objects with the fields of gradflow.atlas.Grid), each "
                 "seed apart. Writes NAME.png (one panel per condition group, colour = fraction "
                 "of seeds where the claim holds), NAME.npz (per claim, condition and seed) and "
                 "NAME.json (per claim and condition) into --out, caching each condition's "
                 "maps so an interrupted atlas "
                 "resumes.", """
            gradflow atlas --grid figures/atlas_star_fig2_grid.json --out /tmp/atlas
            gradflow atlas --claims rnn_amplified --grid grid.json --out . --rows loss --cols wrt
            gradflow atlas --claims lstm_collapses --cells lstm lstm:forget_bias=1.0 \
                --inits orthogonal torch --input-scales 0.1 1 --sizes 10x10 --out .
        """)
    p.add_argument("--claims", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=None, metavar="NAME[,NAME]",
                   help="claims to evaluate (default: every claim that reads the grid)")
    p.add_argument("--grid", default=None, metavar="FILE.json",
                   help="the grid of conditions (or give them by the grid flags below)")
    g = p.add_argument_group("grid flags (instead of --grid; each defaults to "
                             "gradflow.atlas.Grid's default)")
    for flag, what in GRID_FLAGS.items():  # (space- or comma-separated)
        g.add_argument(flag, nargs="+", default=None, metavar="V",
                       help=what + " (separated by spaces or commas)")
    g.add_argument("--batch", default=None, metavar="B", help="examples per map")
    g.add_argument("--measure", default=None, metavar="KIND",
                   help="what the grid measures: gradient_map, local_gains or gates")
    g.add_argument("--readout-seed", default=None, metavar="N|seed",
                   help="the maps' probe readout: one seed N for every seed, or 'seed': each "
                        "seed draws its own (as the committed atlases; default: 0)")
    p.add_argument("--out", required=True, type=out_path, metavar="DIR",
                   help="the folder to write to")
    p.add_argument("--name", default="atlas", metavar="STEM",
                   help="file names NAME.png/.npz/.json (default: atlas)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="where each condition's maps are cached (default: DIR/NAME_cache)")
    factors = ("input_scale", "init", "size", "hidden", "loss", "wrt")
    p.add_argument("--rows", choices=factors, default="input_scale",
                   help="factor along each panel's rows (default: input_scale)")
    p.add_argument("--cols", choices=factors, default="init",
                   help="factor along each panel's columns (default: init)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _finish(p, run_atlas)


#: The grid flags of ``gradflow atlas``: flag -> help (the Grid field is the flag's name).
GRID_FLAGS = {
    "--cells": "cells, each a name or name:option=value,... (e.g. lstm:forget_bias=1.0)",
    "--inits": "weight schemes (orthogonal, glorot, torch)",
    "--input-scales": "input scales (the inputs are scale * N(0, 1))",
    "--hidden": "hidden sizes",
    "--sizes": "layers x steps, e.g. 10x10 20x20",
    "--losses": "losses of the gradient maps (last, all)",
    "--wrts": "maps (params, hidden)",
    "--seeds": "seeds (every condition is measured for each)",
}


def _grid_from_flags(args) -> dict:
    """The Grid fields given by the grid flags (strings parsed to numbers where they are)."""
    num = {"input_scales": float, "hidden": int, "seeds": int}
    d = {}
    for flag in GRID_FLAGS:
        key = flag[2:].replace("-", "_")
        values = getattr(args, key)
        if values is None:
            continue
        # space- or comma-separated, as the other commands' lists (a cell's options keep theirs)
        values = [p.strip() for v in values
                  for p in (_options_joined(v.split(",")) if key == "cells" else v.split(","))]
        if not all(values):
            raise ValueError(f"{flag} {' '.join(getattr(args, key))}: an empty entry; give "
                             "values separated by spaces or commas")
        if key in num:
            try:
                values = [num[key](v) for v in values]
            except ValueError:
                raise ValueError(f"{flag} {' '.join(values)}: give "
                                 f"{'integers' if num[key] is int else 'numbers'}") from None
        elif key == "sizes":
            bad = [v for v in values if not re.fullmatch(r"\d+x\d+", v)]
            if bad:
                raise ValueError(f"--sizes {bad[0]!r}: give layers x steps, e.g. 10x10")
            values = [tuple(int(x) for x in v.split("x")) for v in values]
        d[key] = values
    if args.batch is not None:
        if not args.batch.isdigit():
            raise ValueError(f"--batch {args.batch!r}: give a positive integer")
        d["batch"] = int(args.batch)
    if args.measure is not None:
        d["measure"] = args.measure
    if args.readout_seed is not None:
        d["readout_seed"] = (args.readout_seed if args.readout_seed == "seed"
                             else int(args.readout_seed) if args.readout_seed.isdigit()
                             else args.readout_seed)  # (the Grid names what is wrong)
    from gradflow.atlas import MEASUREMENTS, unused_map_fields

    maps = [f"--{k.replace('_', '-')}" for k in unused_map_fields(d["measure"], d)] if d.get(
        "measure") in MEASUREMENTS else []  # (an unknown measure: the Grid names it)
    if maps:  # (as typed; the Grid refuses them too, by value and by their API names)
        raise ValueError(f"{', '.join(maps)} set{'s' if len(maps) == 1 else ''} the gradient "
                         f"maps' conditions; --measure {d['measure']} has none: leave "
                         f"{'it' if len(maps) == 1 else 'them'} out")
    return d


def run_atlas(args) -> int:
    from gradflow import atlas as _atlas

    if args.rows == args.cols:
        raise _usage(args, f"--rows and --cols must differ, got {args.rows!r} twice")
    out = Path(args.out)
    if not out.is_dir():
        raise _usage(args, f"--out {args.out!r} is not an existing folder")
    _writable_dir(out, str(out / args.name))  # before anything is measured
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        raise _usage(args, f"--name {args.name!r}: use letters, digits, '.', '_' and '-'")
    for ext in (".npz", ".json", ".png"):  # the files written after the whole grid
        _check_path(str(out / (args.name + ext)), (ext,), "atlas")
    if args.claims == []:  # "--claims ," read as every claim
        raise _usage(args, f"--claims names no claim; valid: {', '.join(_atlas.CLAIMS)}")
    with user_input():
        claims = _atlas.get_claims(args.claims or list(_atlas.CLAIMS))
        flags = _grid_from_flags(args)
    if args.grid is not None and flags:
        raise _usage(args, "give the grid either as --grid FILE.json or by the grid flags "
                           f"({', '.join('--' + k.replace('_', '-') for k in flags)}), not both")
    with user_input():
        grid = _atlas.Grid.load(args.grid) if args.grid is not None else _atlas.Grid(**flags)
    cache = args.cache or str(out / f"{args.name}_cache")
    if Path(cache).exists() and not Path(cache).is_dir():
        raise _usage(args, f"--cache {cache!r} is a file; the cache is a folder (made if "
                           "missing)")
    with user_input():  # a grid no claim reads is the user's to fix
        conditions = [c for g in (grid if isinstance(grid, list) else [grid])
                      for c in g.conditions()]
        if not args.claims:  # all claims: those that read some condition of the grid
            claims = [cl for cl in claims if any(cl.applies(c) for c in conditions)] or claims
        _atlas.plan(claims, grid)  # every check before anything is measured
    _made_dir(args, Path(cache))  # (once the plan holds: a refused one leaves no folder)
    results = _atlas.atlas(claims, grid, cache_dir=cache, progress=not args.no_progress)
    from gradflow import plot as _plot

    stem = str(out / args.name)
    written = list(_atlas.save(results, stem))
    written.append(_plot.save(_plot.draw_atlas(results, args.rows, args.cols), stem + ".png"))
    for name, res in results.items():
        full, some = int(np.sum(res.fraction == 1)), int(np.sum(res.fraction > 0))
        unread = int(np.sum(np.isnan(res.statistic)))
        n_seeds = len(res.config["seeds"])
        seeds = (f"all {n_seeds} seeds" if n_seeds > 1 else
                 "its one seed (a verdict of one draw each: --seeds 0 1 2 3 gives a share)")
        print(f"{name}: holds for {seeds} in {full} of {len(res.fraction)} conditions, "
              f"for at least one seed in {some} ({res.config['description']})"
              + (f"; not readable (NaN: a map not finite, or 0 where it is read) for {unread} "
                 f"of {res.statistic.size} (condition, seed) pairs, counted as not holding"
                 if unread else ""))
        _print_short_of(res, _atlas.varied(results))
    for path in written:
        print(f"wrote {path}")
    return 0


def _print_short_of(res, keys, most: int = 12) -> None:
    """The conditions where a claim does not hold for every seed, one line each (at most
    ``most``), named by the ``keys`` that tell the grid's conditions apart: which widths,
    scales, losses fail is the answer an atlas is run for."""
    from gradflow import atlas as _atlas

    short = [i for i, f in enumerate(res.fraction) if f < 1]
    n = res.statistic.shape[1]
    for i in short[:most]:
        c = res.config["conditions"][i]
        print(f"  {'fails' if res.fraction[i] == 0 else 'split'}: "
              + ", ".join(f"{k} {c.get(k)}" for k in keys)
              + f": median {_atlas.median_text(res.statistic[i])}, holds for "
              f"{round(res.fraction[i] * n)} of {n} seeds")
    if len(short) > most:
        print(f"  ... and {len(short) - most} more (gradflow.atlas.table of the saved atlas "
              "lists every condition)")


# --- train -----------------------------------------------------------------------------------


def add_train(sub):
    p = _command(sub, "train", "train a stack on a task; learning curve and maps",
                 "Train a stack of one cell plus a linear readout on a synthetic task with Adam "
                 "(gradflow.train.train), then write to --out DIR: the learning curve "
                 "(curve.npz, curve.png), at each --record step the gradient map of the stack "
                 "under a fixed probe loss (map_stepNNNNNN.npz, maps.png), and the run itself "
                 "(state.npz: the trained parameters and the stack, for `gradflow heatmap "
                 "--params DIR`). Note: --steps here counts training updates; the sequence "
                 "length is --seq-len.", """
            gradflow train --task adding --cell star --layers 8 --steps 500 --record 0,500
            gradflow train --task copy --cell ur_lstm --task-option lag=20 --lr 3e-3
            gradflow train --task adding --cell g_lstm --budget 0.01 --seq-len 50
        """)
    p.add_argument("--task", choices=TASKS, default="adding",
                   help="the synthetic task (gradflow.tasks: adding, copy, counting, digits; "
                        "default: adding)")
    p.add_argument("--cell", type=cell_name, default="lstm",
                   help="cell name, name:option=value, module:factory, or one registered cell "
                        "per layer, bottom up ('lstm*3,ur_lstm') (default: lstm)")
    p.add_argument("--seq-len", type=positive_int, default=None, metavar="T",
                   help="sequence length (adding, counting: steps; copy: sets the lag; default: "
                        "the task's own)")
    p.add_argument("--task-option", type=option, action="append", metavar="KEY=VALUE",
                   help="a task option, repeatable (e.g. lag=20, symbols=5)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=positive_int, default=4, metavar="L",
                   help="stack depth (default: 4)")
    g.add_argument("--hidden", type=hidden_sizes, default=32, metavar="H",
                   help="hidden size, or one per layer such as 64,32 (default: 32)")
    g.add_argument("--init", type=init_scheme, default=None, help=INIT_HELP)
    g.add_argument("--option", type=option, action="append", metavar="KEY=VALUE",
                   help="another cell option, repeatable")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=500, metavar="N",
                   help="training updates (default: 500)")
    g.add_argument("--batch", type=positive_int, default=32, metavar="B",
                   help="training sequences per update (default: 32)")
    g.add_argument("--lr", type=finite_float, default=1e-3,
                   help="Adam learning rate (default: 1e-3)")
    g.add_argument("--clip", type=float, default=1.0,
                   help="global gradient-norm clip (default: 1)")
    g.add_argument("--budget", type=finite_float, default=0.0, metavar="LAMBDA",
                   help="g-LSTM budget loss LAMBDA * mean(k) (time-gated cells only; default 0)")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="parameters, training and evaluation batches from it (default: 0)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: float32)")
    g.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                   help="evaluate every N steps (default: steps // 10)")
    g.add_argument("--eval-batch", type=positive_int, default=256, metavar="B",
                   help="fixed evaluation batch size (default: 256)")
    g.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    g = p.add_argument_group("recorded gradient maps")
    g.add_argument("--record", type=step_list, default=None, metavar="S[,S]",
                   help="steps (updates done) at which to record the map, e.g. 0,500")
    g.add_argument("--record-batch", type=positive_int, default=32, metavar="B",
                   help="evaluation sequences the maps average over (default: 32, or "
                        "--eval-batch where that is smaller)")
    g.add_argument("--record-loss", choices=LOSSES, default="last",
                   help="probe loss of the maps (default: last)")
    g.add_argument("--wrt", choices=WRTS, default="hidden",
                   help="what the recorded maps differentiate by: hidden h, cell c or params "
                        "(default: hidden)")
    g.add_argument("--readout-seed", type=seed_int, default=0, metavar="SEED",
                   help="seed of the probe readout (default: 0)")
    p.add_argument("--out", default=None, type=out_path, metavar="DIR",
                   help=f"output folder, created (default: {DEFAULT_OUT_DIR}/train_<task>_"
                        "<cell>_L<layers>, plus the settings that differ from the defaults); "
                        "one that holds a run is refused unless --resume or --overwrite")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run saved in --out (an interrupted one, or a longer "
                            "--steps) with the same settings (its recorded maps' settings "
                            "where not given); a new run where none is saved")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run saved in --out")
    _finish(p, run_train)


def _train_task(args):
    from gradflow import tasks as _tasks

    try:
        with user_input():
            return _tasks.for_length(args.task, args.seq_len, **dict(args.task_option or []))
    except ImportError:  # the digits task reads scikit-learn's data set
        raise _usage(args, f"the {args.task} task needs scikit-learn, an optional extra: "
                           "pip install 'gradflow[digits]'") from None


def _made_dir(args, out: Path) -> Path:
    """The folder ``out``, made with its parents where missing, and writable; else one line."""
    if out.exists() and not out.is_dir():
        raise _usage(args, f"{str(out)!r} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _usage(args, f"cannot create {str(out)!r}: {e.strerror or e}") from None
    _writable_dir(out, str(out))
    return out


def _train_dir(args) -> Path:
    """The run's folder: ``--out``, or the default one named by the settings."""
    stem = default_stem(args, "train", args.task, args.cell, f"L{args.layers}",
                        skip=("task", "cell", "layers"), tokens={"steps": "N{}".format})
    return Path(args.out if args.out is not None else os.path.join(DEFAULT_OUT_DIR, stem))


def _saved_run(args, out: Path) -> dict | None:
    """The meta of the run saved in ``out`` that ``--resume`` goes on from (None: a new
    run). A folder holding a run is refused unless ``--resume`` (continue it) or
    ``--overwrite`` (replace it), so that a repeated command does not delete a trained run;
    a ``state.npz`` that is no run's is named."""
    from gradflow import runs

    state = out / runs.STATE
    if not (state.exists() or state.is_symlink()):
        return None
    meta, problem = None, None
    if not state.is_file():
        problem = f"its {runs.STATE} is not a file"
    else:
        try:
            meta = runs.read_run(out)
        except InputError as e:
            problem = f"its {runs.STATE} cannot be read ({_one_line(e)})"
        else:
            if not {"step", "config"} <= set(meta):
                problem = (f"its {runs.STATE} is not a training run's (a params file, "
                           "gradflow.runs.save_params?)")
    if problem is not None:
        if args.overwrite and state.is_file():
            return None
        fix = ("give --overwrite to start a new run there, or another --out" if state.is_file()
               else "remove it, or give another --out")
        raise _usage(args, f"cannot resume from {str(out)!r}: {problem}; {fix}" if args.resume
                     else f"{str(out)!r} holds a {runs.STATE} that is no training run "
                          f"({problem}); {fix}")
    if not (args.resume or args.overwrite):
        raise _usage(args, f"{str(out)!r} holds a training run (saved at step {meta['step']}); "
                           "give --resume to continue it, --overwrite to replace it, or "
                           "another --out")
    return meta if args.resume else None


#: ``gradflow train``'s recorded maps' settings: option -> the key of a map's config.
_RECORD_SETTINGS = {"wrt": "wrt", "record_loss": "loss", "readout_seed": "readout_seed"}


def _resumed_record_settings(args, out: Path, meta: dict, typed) -> bool:
    """Set the recorded maps' settings not ``typed`` (the record options given) to the
    resumed run's (its record files' and ``record_batch``), so that its maps stay comparable;
    a given one that differs is refused, as are ``--record`` steps before the saved step that
    were not recorded. Returns whether the run has recorded maps (the resumed run keeps them,
    recording more at ``--record``)."""
    from gradflow.results import Result

    maps = []
    for name, _, fname in meta.get("records", ()):  # the run's own (its index), not strays
        if name == "gradient_map":
            try:
                maps.append(Result.load(out / fname).config)
            except (ValueError, OSError) as e:
                raise _usage(args, f"cannot resume from {str(out)!r}: its recorded map "
                                   f"{fname} cannot be read ({_one_line(e)})") from None
    maps = [c for c in maps if all(k in c for k in _RECORD_SETTINGS.values())]
    saved = {dest: maps[0][key] for dest, key in _RECORD_SETTINGS.items()} if maps else {}
    for dest, value in saved.items():
        flag = "--" + dest.replace("_", "-")
        if flag in typed and getattr(args, dest) != value:
            raise _usage(args, f"cannot resume from {str(out)!r} with {flag} "
                               f"{getattr(args, dest)}: its maps were recorded with {flag} "
                               f"{value}, and a resumed run records as it did (leave {flag} "
                               f"out, or give --overwrite for a new run)")
        setattr(args, dest, value)
    if "--record-batch" not in typed and meta["config"].get("record_batch") is not None:
        args.record_batch = int(meta["config"]["record_batch"])
    step, done = int(meta["step"]), {int(c["train_step"]) for c in maps if "train_step" in c}
    lost = [s for s in args.record or () if s < step and s not in done]
    if lost:
        raise _usage(args, f"--record asks for step(s) {', '.join(map(str, lost))} before the "
                           f"run's saved step {step}, which it did not record (those "
                           f"parameters are gone); record at steps from {step} on")
    return bool(maps)


#: The options of ``gradflow train`` that set each key of a run's config (others: the cell's).
_RUN_FLAGS = {"lr": "--lr", "clip": "--clip", "seed": "--seed", "batch": "--batch",
              "dtype": "--dtype", "budget": "--budget", "eval_batch": "--eval-batch",
              "record_batch": "--record-batch", "layers": "--layers", "hidden_size": "--hidden",
              "init": "--init", "cell": "--cell", "input_size": "--task",
              **dict.fromkeys(("task", "eval_task", "metric"),
                              "--task, --seq-len, --task-option")}


def _resume_refused(args, out: Path, differences, typed=()) -> UsageError:
    """The one line for a ``--resume`` whose settings are not the saved run's: each option
    that differs, with the run's value and the one given (not what follows from another:
    another cell's options, a ``record_batch`` cut to another ``--eval-batch``; ``typed``:
    the record options given)."""
    keys = {key for key, _, _ in differences}
    follows = {"--cell, --option"} if "cell" in keys else set()
    if "eval_batch" in keys and "--record-batch" not in typed:
        follows.add("--record-batch")
    flags = {}
    for key, saved, given in differences:
        flag = _RUN_FLAGS.get(key, "--cell, --option")
        if flag not in follows:
            flags.setdefault(flag, (key, saved, given))
    from gradflow.train import _brief

    said = "; ".join(f"{flag} ({key}: the run's {_brief(a)}, now {_brief(b)})"
                     for flag, (key, a, b) in flags.items())
    return _usage(args, f"cannot resume from {str(out)!r}: it was made with other settings: "
                        f"{said}; give the run's, or --overwrite for a new run")


def _train_subject(args, stack) -> str:
    """The trained stack's cell as the summaries name it: a registered cell by its label (its
    options of note, ``--option`` ones too: ``lstm:forget_bias=1.0``), a user's as ``--cell``
    wrote it, or a stack of different cells bottom up with runs counted (``gru x3 / star``,
    :func:`gradflow.plot.subject`)."""
    from gradflow import cells as _cells
    from gradflow import plot

    if len(layer_cells(args.cell)) > 1:
        return plot.subject(stack.config)
    cell = stack.cells[0]
    return cell.label if cell.name in _cells.names() else args.cell


def _train_report(args, task, hist, out: Path, what: str) -> list[str]:
    """Write the figures and the maps, then print the evaluation table and each recorded
    map's summary (the files first: they are there whatever becomes of stdout); return the
    written paths."""
    from gradflow import plot

    c = hist.curve
    written = [str(out / "curve.npz"), plot.save(plot.draw_curves({what: c}, title=(
        f"{what}, {args.layers} layers, on {task.name} (T={task.steps})")),
        out / "curve.png")]
    maps = {}
    for s, res in zip(hist.record_steps, hist.records.get("gradient_map", ())):
        written.append(res.save(out / f"map_step{s:06d}.npz"))
        maps[("map", f"step {s}")] = res
    if maps:
        fig = plot.grid(maps, rows=["map"], cols=[k[1] for k in maps], normalize=False,
                        title=f"{what}: gradient maps wrt {args.wrt} during training")
        written.append(plot.save(fig, out / "maps.png"))
    timed = "eval_updates" in c.arrays  # a time-gated cell's share of updates
    print(f"  {'step':>6}  {'eval loss':>10}  {'eval ' + task.metric:>13}"
          + ("  updates" if timed else ""))
    for i, s in enumerate(c["eval_step"]):
        print(f"  {int(s):>6}  {float(c['eval_loss'][i]):>10.4g}  "
              f"{float(c['eval_metric'][i]):>13.4g}"
              + (f"  {float(c['eval_updates'][i]):>7.3f}" if timed else ""))
    bad = {k: n for k, n in c.nonfinite.items() if n and k in ("loss", "eval_loss")}
    if bad:  # a diverged run: the numbers are kept (nan above), and said
        first = int(c["step"][~np.isfinite(c["loss"])][0]) if bad.get("loss") else None
        print("  non-finite losses: " + ", ".join(
            f"{n} of {c[k].size} {'training' if k == 'loss' else 'evaluation'} losses"
            for k, n in bad.items()) + ("" if first is None else f" (first at step {first})")
              + ": the run diverged; a smaller --lr or --clip may hold it")
    for (_, step), res in maps.items():
        print(f"  gradient map wrt {args.wrt} at {step} (probe loss {args.record_loss}, "
              f"value {_g(float(res.loss_value))}):")
        for line in result_summary(res, max_rows=8):
            print("    " + line)
    # the run's own files (train's run_dir): its records, read back by a resumed run
    return written + sorted(str(p) for p in out.glob("record-*.npz")) + [str(out / "state.npz")]


def run_train(args) -> int:
    from gradflow.jacobian import check_wrt, gradient_map
    from gradflow.problem import precision, task_stack
    from gradflow.train import (TrainConfig, check_memory, check_run, resume_differences,
                                resume_files, train)

    task = _train_task(args)
    out = _train_dir(args)
    unread = _given(args, ("record_batch", "record_loss", "wrt", "readout_seed"))  # (typed:
    # before a resume sets them to the run's)
    saved = _saved_run(args, out)  # (refused here: a run there, and neither flag)
    if saved is not None and args.steps < int(saved["step"]):
        raise _usage(args, f"cannot resume from {str(out)!r} with --steps {args.steps}: the "
                           f"run has done {saved['step']}; give --steps {saved['step']} or more")
    recorded = saved is not None and _resumed_record_settings(args, out, saved, unread)
    if unread and not args.record and not recorded:  # they shape the recorded maps only
        raise _usage(args, f"{', '.join(unread)} set{'s' if len(unread) == 1 else ''} the "
                           "maps that --record records; give --record STEPS (e.g. 0,500) or "
                           f"drop {'it' if len(unread) == 1 else 'them'}")
    if args.record and "--record-batch" in unread and args.record_batch > args.eval_batch:
        raise _usage(args, f"--record-batch {args.record_batch} is more than the --eval-batch "
                           f"{args.eval_batch} sequences the maps are recorded on; give at most "
                           f"{args.eval_batch}, or a larger --eval-batch")
    if args.record and max(args.record) > args.steps:
        raise _usage(args, f"--record steps must lie in 0..{args.steps} (--steps), got "
                           f"{max(args.record)}")
    cell = _cell(args, task.steps)  # a registered name, a user's module:factory, one per layer
    with user_input():
        stack = task_stack(cell, task, layers=args.layers, hidden=args.hidden)
    checked_stack(cell, stack.layers, stack.input_size, stack.hidden_size, args.dtype)
    if not args.lr > 0 or not args.clip > 0 or not args.budget >= 0:
        raise _usage(args, f"--lr and --clip must be positive and --budget >= 0, got lr "
                           f"{args.lr:g}, clip {args.clip:g}, budget {args.budget:g}")
    # The recorded maps use the fixed probe loss of `gradflow heatmap` (random readout, random
    # labels): the trained head is zero at step 0, so the task loss sends no gradient to the
    # stack there, and one probe makes maps at different steps comparable.
    record = {"gradient_map": lambda st, p, xs: gradient_map(
        st, p, xs, loss=args.record_loss, wrt=args.wrt, readout_seed=args.readout_seed)}
    run = dict(steps=args.steps, batch=args.batch, lr=args.lr, clip=args.clip, seed=args.seed,
               dtype=args.dtype, eval_every=args.eval_every, eval_batch=args.eval_batch,
               record_at=args.record or (),  # the default's bound; a larger given one is refused
               record_batch=min(args.record_batch, args.eval_batch), budget=args.budget)
    record = record if args.record or recorded else None  # (a resumed run keeps its maps)
    with user_input():  # train's own checks, before the run folder and the header
        config = TrainConfig(**run)
        if saved is not None:  # first: a resume's other settings, as the options typed
            differences = resume_differences(saved["config"],
                                             config.describe(stack, task, task))
            if differences:
                raise _resume_refused(args, out, differences, typed=unread)
            resume_files(out, saved)  # (its curve and records must be its state's)
        check_run(stack, task, task, config, record)
        check_memory(stack, task, task, config)  # (a refusal leaves no empty folder behind)
        if record:  # the recorded maps' wrt, not at the first record step
            check_wrt(stack, args.wrt)
    out = _made_dir(args, out)
    if not args.resume:  # a new run (train clears its own files: state, curve, records): the
        # maps this command wrote for an earlier run in the folder go too, or they would read
        # as this run's
        for old in [*out.glob("map_step*.npz"), out / "maps.png"]:
            if old.is_file():
                old.unlink()
    what = _train_subject(args, stack)
    started = ""
    if saved is not None:
        started = f"; resumed at step {saved['step']}"
    elif args.resume:  # (the default folder is named by --steps among others)
        started = (f"; nothing saved in {str(out)!r} to resume: a new run"
                   + ("" if args.out is not None else " (the default folder is named by the "
                      "settings, --steps among them: give the run's --out)"))
    one = len(layer_cells(args.cell)) == 1  # (a stack of different cells names its layers)
    print(f"gradflow train: {what}{' x' if one else ','} {args.layers} "
          f"layer{'s' * (args.layers != 1)}, "
          f"H={width_text(args.hidden)}, on "
          f"{task.name} (T={task.steps}, {task.metric}); {args.steps} "
          f"step{'s' * (args.steps != 1)} of batch "
          f"{args.batch}, lr {args.lr:g}, seed {args.seed}"
          + (f", budget {args.budget:g}" if args.budget else "") + started, flush=True)
    with precision(args.dtype):
        hist = train(stack, task, **run, record=record, run_dir=out, resume=args.resume,
                     progress=args.progress)
        written = _train_report(args, task, hist, out, what)
    for path in written:
        print(f"wrote {path}")
    maps = [f"--wrt {args.wrt}"] if args.wrt != "hidden" else []  # (as the maps recorded)
    maps += [f"--loss {args.record_loss}"] if args.record_loss != "last" else []
    maps += [f"--readout-seed {args.readout_seed}"] if args.readout_seed else []
    print(f"measure the trained stack: gradflow heatmap --params {shlex.quote(str(out))}"
          + (f" --cell {shlex.quote(args.cell)}" if _user_cell(args.cell) else "")  # (its
          + "".join(" " + m for m in maps))  # options: the run's)
    return 0


# ---------------------------------------------------------------------------------------------
# The parser and main

_COMMON = _Parser(add_help=False)
_COMMON.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="on an internal error, print the traceback")
_COMMON.add_argument("--devices", type=device_count, default=argparse.SUPPRESS, metavar="N",
                     help="split each map's batch over N devices (as gradflow --devices N, "
                          "see gradflow --help)")

COMMANDS = (add_heatmap, add_compare, add_gates, add_gains, add_cells, add_reproduce,
            add_train, add_atlas)


def build_parser() -> argparse.ArgumentParser:
    """The ``gradflow`` argument parser (errors raise :class:`UsageError`)."""
    parser = _Parser(
        prog="gradflow", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para("Measure how gradients flow through deep stacks of recurrent cells."),
        epilog=_examples("""
            gradflow heatmap --cell lstm --layers 16
            gradflow compare --cells rnn,lstm,star --layers 10 --steps 10
            gradflow gates --cell ur_lstm
            gradflow gains --cell lstm --layers 16
            gradflow cells
            gradflow reproduce --only star_fig2 --out /tmp
            gradflow train --task adding --cell star --layers 8 --record 0,500
            gradflow COMMAND --help     # options of one command
        """) + "\n\n" + _para(
            "Compiled programs are kept on disk for later runs, in "
            "$XDG_CACHE_HOME/gradflow/xla (~/.cache/gradflow/xla); GRADFLOW_COMPILE_CACHE=DIR "
            "moves the cache, GRADFLOW_COMPILE_CACHE=off turns it off."))
    parser.add_argument("--version", action="version", version=f"gradflow {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an internal error, print the traceback")
    parser.add_argument("--devices", type=device_count, default=None, metavar="N",
                        help="split each map's batch over N devices (CPU: N simulated devices "
                             "on the cores, at most 8 per core or 64 if more; GPU/TPU: the "
                             "first N), before or after the command (default: one per CPU "
                             "core, used for maps large enough to gain: examples x state "
                             "width >= 1024 per device; every GPU/TPU)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


_DAMAGED = "Error reading persistent compilation cache entry"


def _note_damaged_cache_entries(folder: str) -> None:
    """A cache entry cut short (a run killed while writing it) makes JAX warn, with its source
    line, on every later run that needs that program, and compile it again: say so in one line
    per run instead, with the remedy. Other warnings show as before (the caller's
    ``warnings.catch_warnings`` restores the hook)."""
    show, told = warnings.showwarning, []

    def hook(message, category, filename, lineno, file=None, line=None):
        if not str(message).startswith(_DAMAGED):
            return show(message, category, filename, lineno, file, line)
        if not told:
            told.append(True)
            print(f"gradflow: note: the compile cache {folder} has a damaged entry, compiled "
                  "again; delete that folder to clear it", file=sys.stderr)

    warnings.showwarning = hook


def _warning_lines(command: str) -> None:
    """Show each :class:`~gradflow.results.NonFiniteForwardWarning`, and any other warning
    gradflow's own code gives (an atlas cache entry measured again), as one line on stderr,
    ``gradflow heatmap: warning: ...`` (the caller's ``warnings.catch_warnings`` restores the
    filters and the hook)."""
    warnings.simplefilter("always", NonFiniteForwardWarning)
    show = warnings.showwarning
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def hook(message, category, filename, lineno, file=None, line=None):
        if not (issubclass(category, NonFiniteForwardWarning)
                or os.path.abspath(filename).startswith(package)):
            return show(message, category, filename, lineno, file, line)
        print(f"{command}: warning: {_one_line(message)}", file=sys.stderr)

    warnings.showwarning = hook


def _speed_settings(devices, program: bool):
    """Process settings for speed, made before JAX starts (:mod:`gradflow.parallel`): the CPU
    platform gets one device per core (or ``--devices``) so maps split their batch over the
    cores; as a program, the C allocator keeps freed memory for reuse (``tune_malloc``) and
    compiled programs are kept on disk for the next run (``use_compile_cache``).
    Returns a context manager holding the batch-device setting for the run."""
    from gradflow import parallel
    if program:
        parallel.tune_malloc()
        try:
            folder = parallel.use_compile_cache()
        except ValueError as e:
            raise UsageError(f"gradflow: error: {parallel.COMPILE_CACHE_ENV}: {e}") from None
        if folder:
            _note_damaged_cache_entries(folder)
    try:
        parallel.use_cpu_devices(devices or os.cpu_count() or 1)
    except RuntimeError as e:  # JAX already running (a call from Python) or XLA_FLAGS set
        if devices is not None:
            raise UsageError(f"gradflow: error: --devices {devices}: {e}") from None
    return parallel.batch_devices(devices or "auto")


def _interrupted(command: str):
    """The gradflow program's SIGINT handler: one line and exit status 130 now. Not a
    KeyboardInterrupt: raised inside a callback (XLA's garbage-collection hook) it was
    swallowed and the run went on, and returning through Python's shutdown while XLA's
    compiler threads still ran crashed the process (SIGSEGV)."""
    try:
        sys.stdout.flush()
        sys.stderr.write(f"{command}: interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


def _unrecognized(parser, command: str | None, extra: list) -> str:
    """``gradflow heatmap: error: unrecognized arguments: --layer 3; did you mean --layers?``"""
    import difflib

    prog = "gradflow" + (f" {command}" if command else "")
    if command is not None:
        parser = next(a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = [o[2:] for o in parser._option_string_actions if o.startswith("--")]

    def guess(given: str) -> list:  # a prefix either way (--epsilon: --eps), else a near spelling
        near = [k for k in known if len(k) >= 3 and given.startswith(k)]
        return near[:1] or difflib.get_close_matches(given, known, n=1, cutoff=0.75)

    guesses = ["--" + m for e in extra if e.startswith("--")
               for m in guess(e[2:].split("=", 1)[0])]
    return (f"{prog}: error: unrecognized arguments: {' '.join(extra)}"
            + (f"; did you mean {', '.join(dict.fromkeys(guesses))}?" if guesses else ""))


def _dash_values(parser, argv: list) -> list:
    """``--max-memory -5G`` as ``--max-memory=-5G``: argparse takes a value beginning with
    ``-`` (other than a number) for an option and says "expected one argument"; joined, the
    option's own check names what is wrong with the value."""
    takes_one = {}
    for p in [parser] + [sp for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                         for sp in a.choices.values()]:
        for a in p._actions:
            for o in a.option_strings:
                takes_one[o] = takes_one.get(o, True) and a.nargs is None
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if (takes_one.get(a) and i + 1 < len(argv) and argv[i + 1].startswith("-")
                and argv[i + 1].split("=", 1)[0] not in takes_one):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


#: The exit status when the reader of stdout went away (``gradflow train ... | head -3``): the
#: shell's for a process ended by SIGPIPE (128 + 13). Not Python's own 1 on EPIPE, which here
#: means an internal error.
CLOSED_STDOUT = 141
# errno values of an output the machine would not take: the environment, not a gradflow bug
_ENVIRONMENT_ERRNOS = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO",
                                                   "EACCES", "EPERM", "ENAMETOOLONG")
                       if hasattr(errno, n)}


class _ReaderStdout:
    """The gradflow program's ``sys.stdout``: when its reader goes away (``| head -3``), the
    stream is pointed at ``os.devnull`` (Python's note on SIGPIPE: the flush at exit finds
    somewhere to write) and printing stops quietly while the command runs on, so the files
    it was asked for are still written; :func:`main` then returns :data:`CLOSED_STDOUT`."""

    def __init__(self, stream):
        self._stream = stream
        self.reader_gone = False

    def write(self, text):
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self):
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._gone()

    def _gone(self):
        self.reader_gone = True
        _stdout_to_devnull(self._stream)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _stdout_to_devnull(stream) -> None:
    """Point ``stream``'s file descriptor at ``os.devnull``: what is still buffered for a
    stdout that cannot take it goes nowhere, not into an error at Python's exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # (no file descriptor: a stream of Python's)
        pass


def _unwritable(e: BaseException) -> str | None:
    """The one line for an OSError of the machine (a full disk, a quota, an I/O error, no
    permission) that reached here, e.g. from printing to a full disk, or None. gradflow's
    writers (``Result.save``, ``plot.save``, a run's files) say so themselves, as an
    InputError "cannot write PATH: <strerror>"."""
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
        return (f"{e.filename!r}: " if e.filename else "") + (e.strerror or str(e))
    return None


def main(argv=None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 on success; 2 on bad input, or an output the machine would not take (a full disk: one
    ``gradflow...: error: ...`` line on stderr); 1 on an internal error (one line, or the
    traceback with ``--debug``); 130 on Ctrl-C; 141 (:data:`CLOSED_STDOUT`) when stdout's
    reader went away: the printing stops there, the command's files are still written.
    """
    program = argv is None  # the gradflow program itself, not a call from Python
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = ["gradflow"]
    stdout = reader = sys.stdout
    if program:  # Ctrl-C ends the process at once, wherever Python is (see _interrupted)
        signal.signal(signal.SIGINT, lambda *_: _interrupted(command[0]))
        if stdout is not None:  # (None where the program was started with stdout closed)
            sys.stdout = reader = _ReaderStdout(stdout)
    try:
        status = _main(argv, program, command)
        if program and status == 0 and getattr(reader, "reader_gone", False):
            return CLOSED_STDOUT
        return status
    finally:
        sys.stdout = stdout


def _main(argv: list, program: bool, command: list) -> int:
    # --debug as argparse reads it, abbreviations too (--deb); --de is also --devices'
    debug = any(a.startswith("--deb") and "--debug".startswith(a) for a in argv)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(_dash_values(parser, argv))
        if extra:  # named by the command they were given to, with the closest option
            raise UsageError(_unrecognized(parser, args.command, extra))
        if args.command is None:
            raise UsageError("gradflow: error: choose a command: heatmap, compare, gates, gains, "
                             "cells, reproduce, train, atlas (see gradflow --help)")
        command[0] = f"gradflow {args.command}"
        args.argv = argv
        if getattr(args, "prefix", None) is not None and getattr(args, "params", None) is None:
            raise UsageError(f"{command[0]}: error: --prefix picks a module of a PyTorch "
                             "state dict given with --params; give --params FILE")
        _adopt_run_dtype(args)
        with warnings.catch_warnings(), _speed_settings(args.devices, program):
            # Non-finite entries are data: the summaries count them; no warning lines, but
            # one line where the forward pass itself overflowed (the reason the map is NaN).
            warnings.simplefilter("ignore", NonFiniteWarning)
            _warning_lines(command[0])
            if getattr(args, "dtype", None) != "float64":
                status = args.run(args)
            else:
                from gradflow.problem import precision

                with precision("float64"):  # 64-bit JAX, what the API asks of its caller
                    status = args.run(args)
        if sys.stdout is not None:  # (here: a reader gone, a full disk, is seen, not at exit)
            sys.stdout.flush()
        return status
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:  # named by its command once that is known
        line = _one_line(e)
        if line.startswith("gradflow: error:") and command[0] != "gradflow":
            line = f"{command[0]}: error:" + line[len("gradflow: error:"):]
        print(line, file=sys.stderr)
        return 2
    except InputError as e:  # (where the user's code raised what it says: there)
        where = next(filter(None, map(_raised_in_user_code, _causes(e))), None)
        print(f"{command[0]}: error: {_one_line(e)}" + (f" ({where})" if where else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command[0]}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gradflow cells | head` from Python: stop quietly
        _stdout_to_devnull(sys.stdout)  # (the program's stdout never raises it: _ReaderStdout)
        return CLOSED_STDOUT
    except Exception as e:  # a bug in gradflow, not the user's input; or a full disk
        where = _raised_in_user_code(e)
        if where is not None:  # the user's cell's own code (its init, its step): theirs
            if debug:
                traceback.print_exc()
            print(f"{command[0]}: error: your cell's code raised {type(e).__name__}: "
                  f"{_one_line(e)} ({where})", file=sys.stderr)
            return 2
        unwritable = _unwritable(e)
        if unwritable is not None:  # the machine's, not gradflow's: as an unwritable path
            print(f"{command[0]}: error: {unwritable}", file=sys.stderr)
            try:  # (`gradflow cells > /dev/full`: stdout is what would not take it)
                sys.stdout.flush()
            except OSError:
                _stdout_to_devnull(sys.stdout)
            return 2
        if debug:
            traceback.print_exc()
        else:
            print(f"{command[0]}: internal error: {type(e).__name__}: {_one_line(e)} (a bug in "
                  "gradflow, not in your input; run again with --debug for the traceback)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
