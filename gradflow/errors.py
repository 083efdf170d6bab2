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


class InputError(ValueError):
    """A value the user gave is wrong (out of range, unknown name, wrong shape)."""


class InputTypeError(InputError, TypeError):
    """A value the user gave is of the wrong kind."""


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


__all__ = ["InputError", "InputTypeError", "user_input"]
