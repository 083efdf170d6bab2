"""Registries of named objects of one kind (the atlas's claims and measurement kinds).

This module imports nothing, so registering stays cheap and ``gradflow --help`` fast.
"""
from __future__ import annotations


class Registry(dict):
    """Named objects of one kind (claims, measurement kinds), each with a ``name`` attribute.

    ``add`` refuses a name already taken; ``pick`` turns names, or the objects themselves, into
    a list, naming the valid choices for an unknown one.

    >>> import collections
    >>> Kind = collections.namedtuple("Kind", "name")
    >>> reg = Registry("kind", Kind)
    >>> reg.add(Kind("a")).name, [k.name for k in reg.pick(["a", Kind("b")])]
    ('a', ['a', 'b'])
    """

    def __init__(self, what: str, kind: type):
        super().__init__()
        self.what, self.kind = what, kind

    def add(self, obj):
        """Register ``obj`` under ``obj.name``; returns it."""
        if obj.name in self:
            raise ValueError(f"{self.what} {obj.name!r} is already registered")
        self[obj.name] = obj
        return obj

    def pick(self, names) -> list:
        """``[obj, ...]`` for a name, an object, or a list of them (at least one)."""
        names = [names] if isinstance(names, (str, self.kind)) else list(names)
        valid = ", ".join(self)
        out = []
        for n in names:
            if isinstance(n, self.kind):
                out.append(n)
            elif isinstance(n, str) and n in self:
                out.append(self[n])
            else:
                raise ValueError(f"unknown {self.what} {n!r}; valid: {valid}")
        if not out:
            raise ValueError(f"name at least one {self.what}; valid: {valid}")
        return out
