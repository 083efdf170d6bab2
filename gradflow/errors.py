"""The exception gradflow raises for bad input, apart from its own bugs.

:class:`InputError` is a :class:`ValueError` (and :class:`InputTypeError` also a
:class:`TypeError`), so code that catches those keeps working; what it adds is the
distinction the command line needs: an ``InputError`` is the user's to fix (one line, exit 2),
any other exception from inside gradflow is a bug (exit 1, traceback with ``--debug``).

This module imports nothing (not even JAX), so ``gradflow --help`` stays fast.

>>> from gradflow.errors import InputError, user_input
>>> with user_input():
...     int("x")
Traceback (most recent call last):
...
gradflow.errors.InputError: invalid literal for int() with base 10: 'x'
"""
from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
import traceback


class InputError(ValueError):
    """A value the user gave is wrong (out of range, unknown name, wrong shape)."""


class InputTypeError(InputError, TypeError):
    """A value the user gave is of the wrong kind."""


class InternalError(RuntimeError):
    """gradflow's own code failed where it runs only to check the user's input (e.g. tracing a
    built-in cell's initialisation to learn its parameters' shapes): a bug in gradflow, which
    :func:`user_input` must not report as bad input."""


@contextlib.contextmanager
def user_input():
    """Inside this block every :class:`ValueError`/:class:`TypeError` is about the user's input:
    it is re-raised as :class:`InputError`/:class:`InputTypeError` with the same message
    (the original chained as ``__cause__``).

    Wrap only code that *interprets* input (building a cell, a stack or a task from names and
    options, reading a file the user named), never a computation: a ValueError raised by a
    bug in a measurement must stay a bug.
    """
    try:
        yield
    except InputError:
        raise
    except TypeError as e:
        raise InputTypeError(str(e)) from e
    except ValueError as e:
        raise InputError(str(e)) from e


@contextlib.contextmanager
def own_code(what: str):
    """Run gradflow's own computation that checks the user's input (tracing a stack's
    ``init`` or one cell step abstractly) inside a :func:`user_input` block without letting a
    bug in it pass for bad input.

    A ValueError/TypeError raised there is sorted by its traceback: raised by a library
    (JAX, NumPy, the standard library) while only gradflow's code was running, it is a bug:
    re-raised as :class:`InternalError` (``what`` says what failed); raised by gradflow's own
    check (a ``raise`` in gradflow, e.g. a cell refusing a size) or with the user's code on the
    way (their cell or factory), it is left for :func:`user_input` to report as input.
    JAX may leave its own frames out of a traceback; such an error reads as gradflow's check.
    """
    try:
        yield
    except InputError:
        raise
    except (TypeError, ValueError) as e:
        if _library_raised_in_gradflow(e):
            raise InternalError(f"{what} failed: {type(e).__name__}: {e}") from e
        raise


_GRADFLOW = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_dirs() -> tuple:
    dirs = {sys.prefix, sys.base_prefix, *(sysconfig.get_paths()[k]
                                           for k in ("stdlib", "platstdlib", "purelib",
                                                     "platlib"))}
    return tuple(os.path.abspath(d) + os.sep for d in dirs)


def _library_raised_in_gradflow(error: BaseException) -> bool:
    """Whether ``error`` was raised inside a library (not in gradflow's own frames) with
    nothing but gradflow's and libraries' frames between the handler and the raise."""
    frames = [f.filename for f in traceback.extract_tb(error.__traceback__)]
    if not frames:
        return False
    libraries = _library_dirs()

    def kind(name):
        if name.startswith("<frozen "):  # the standard library's frozen modules
            return "library"
        path = os.path.abspath(name)
        if path.startswith(_GRADFLOW):
            return "gradflow"
        if path.startswith(libraries):
            return "library"
        return "user"  # a file of theirs, <stdin>, a notebook cell

    kinds = [kind(f) for f in frames[1:]] or [kind(frames[0])]  # frames[0]: this block
    return "user" not in kinds and kinds[-1] == "library"


__all__ = ["InputError", "InputTypeError", "InternalError", "own_code", "user_input"]
