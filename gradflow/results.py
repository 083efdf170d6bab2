"""Small frozen result objects: NumPy arrays plus the full config that produced them.

Every measurement returns a :class:`Result`. It counts the non-finite entries of its arrays
(exploding gradients are data, not crashes) and warns when there are any; ``save`` writes one
``.npz`` holding the arrays and the config as embedded JSON, ``load`` reads it back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Mapping

import numpy as np

_META = "__gradflow__"


class NonFiniteWarning(RuntimeWarning):
    """Some entries of a result are inf or NaN (e.g. an exploding gradient)."""


def _jsonable(v):
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "dtype") and hasattr(v, "shape") and v.shape == ():
        return np.asarray(v).item()
    return str(v)


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
    """Arrays of one measurement and the config that produced them.

    Attributes:
      kind: what was measured (``"gradient_map"``, ``"jacobian_map"``, ``"gate_stats"``, ...).
      arrays: ``{name: np.ndarray}``; also readable as attributes (``result.values``).
      config: JSON-able dict: cell, options, layers, steps, hidden, batch, seed, dtype, ...
      nonfinite: ``{name: count}`` of inf/NaN entries per array.
    """

    kind: str
    arrays: dict
    config: dict
    nonfinite: dict

    def __getattr__(self, name: str):
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(f"{type(self).__name__} of kind {self.__dict__.get('kind')!r} has "
                             f"no attribute or array {name!r}; arrays: {', '.join(arrays)}")

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __repr__(self) -> str:
        items = list(self.arrays.items())
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in items[:8])
        if len(items) > 8:
            shapes += f", ... ({len(items) - 8} more arrays)"
        bad = sum(self.nonfinite.values())
        return (f"Result({self.kind}: {shapes}; cell={self.config.get('cell')!r}"
                + (f"; {bad} non-finite" if bad else "") + ")")

    @property
    def total_nonfinite(self) -> int:
        return int(sum(self.nonfinite.values()))

    def save(self, path) -> str:
        """Write ``path`` (``.npz`` appended if missing): arrays + JSON config. Returns the path."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        meta = json.dumps({"kind": self.kind, "config": self.config, "nonfinite": self.nonfinite})
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ValueError(f"cannot write {path!r}: directory {directory!r} does not exist")
        try:
            np.savez(path, **{_META: np.array(meta)}, **self.arrays)
        except OSError as e:
            raise ValueError(f"cannot write {path!r}: {e.strerror or e}") from None
        return path

    @classmethod
    def load(cls, path) -> "Result":
        """Read a result written by :meth:`save`."""
        with np.load(os.fspath(path), allow_pickle=False) as f:
            if _META not in f.files:
                raise ValueError(f"{path!r} is not a gradflow result (no {_META} entry)")
            meta = json.loads(str(f[_META]))
            arrays = {k: f[k] for k in f.files if k != _META}
        return cls(meta["kind"], arrays, meta["config"], meta["nonfinite"])


def make_result(kind: str, arrays: Mapping[str, Any], config: Mapping[str, Any],
                warn: bool = True) -> Result:
    """Build a :class:`Result`: arrays to NumPy, config to JSON-able, non-finite entries counted.

    Emits a :class:`NonFiniteWarning` (never an exception) when any entry is inf or NaN.
    """
    arrs = {k: np.asarray(v) for k, v in arrays.items()}
    nonfinite = {k: int(np.size(v) - np.count_nonzero(np.isfinite(v)))
                 for k, v in arrs.items() if np.issubdtype(v.dtype, np.inexact)}
    bad = {k: n for k, n in nonfinite.items() if n}
    if warn and bad:
        warnings.warn(f"{kind}: non-finite entries (inf/NaN) in "
                      + ", ".join(f"{k}: {n}" for k, n in bad.items()),
                      NonFiniteWarning, stacklevel=3)
    return Result(kind, arrs, _jsonable(dict(config)), nonfinite)


load = Result.load
