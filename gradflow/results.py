"""Small frozen result objects: NumPy arrays plus the full config that produced them.

Every measurement returns a :class:`Result`. It counts the non-finite entries of its arrays
(exploding gradients are data, not crashes) and warns when there are any, and it counts the
entries that underflowed (below the smallest normal float of their dtype where the measurement
expects a positive value: vanishing gradients past the float range); ``save`` writes one
``.npz`` holding the arrays and the config as embedded JSON, ``load`` reads it back.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import warnings
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

from gradflow.errors import InputError

_META = "__gradflow__"
#: Version of the ``.npz`` layout :meth:`Result.save` writes (in the embedded JSON, ``"format"``).
#: Files without it are version 0 (written before the version was recorded); they read the same.
FORMAT_VERSION = 1


class NonFiniteWarning(RuntimeWarning):
    """Some entries of a result are inf or NaN (e.g. an exploding gradient)."""


class NonFiniteForwardWarning(NonFiniteWarning):
    """The forward pass itself left the finite numbers (states overflowed to inf or NaN): the
    measurement is NaN where it depends on them, since a derivative taken at NaN states is
    no derivative (ReLUs and comparisons pass exact zeros back, which would read as
    vanishing gradients)."""


@functools.lru_cache(maxsize=1)
def _versions() -> tuple:
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    return tuple((d, version(d)) for d in ("gradflow", "jax", "jaxlib", "numpy"))


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """A 16-hex-digit hash of gradflow's own code: every ``.py`` file of the installed package,
    by path and contents (its version number stays 0.1.0 while the code changes; a cached
    result is reused only where this is the same, :func:`read_cached`)."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as fh:
                h.update(fh.read() + b"\0")
    return h.hexdigest()[:16]


def fingerprint(*arrays) -> str:
    """``"sha256:"`` and 16 hex digits of the bytes of ``arrays`` (NumPy or JAX), in order:
    what a config records of arrays it cannot hold (the weights and sequences a CLI command
    read from files, a run's starting parameters), so that two results of other arrays under
    one file name are told apart.

    >>> fingerprint(np.zeros(3, np.float32)) == fingerprint(np.zeros(3, np.float32))
    True
    >>> fingerprint(np.zeros(3, np.float32)) == fingerprint(np.ones(3, np.float32))
    False
    """
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return "sha256:" + h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``: the last bits
    of a float32 result move with it (XLA compiles for the machine's vector instructions)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


#: Process-wide settings that change a result's last bits, kept up to date by the module that
#: owns each (``batch_devices``: :func:`gradflow.parallel.set_batch_devices`, which devices a
#: map's batch is split over: ``"auto"``, ``"all"``, None or a count).
SETTINGS: dict = {"batch_devices": "auto"}


def provenance() -> dict:
    """What computes a result here: the installed versions of gradflow, JAX, jaxlib and NumPy,
    gradflow's code (``source``, :func:`source_fingerprint`), JAX's default backend
    (``"cpu"``, ``"gpu"``, ``"tpu"``; the last bits of a float32 sum differ between them and
    between versions), the CPU's model (``cpu``) and ``XLA_FLAGS`` (``xla_flags``; both move
    the last bits, about 2e-7 relative in float32 between instruction sets), the number of
    devices and the setting that splits a map's batch over them (:data:`SETTINGS`; a map
    split over 2 CPU devices differs from one device's in the last bits, about 1e-7 relative
    in float32). Every :class:`Result` carries it.

    >>> sorted(provenance())  # doctest: +NORMALIZE_WHITESPACE
    ['backend', 'batch_devices', 'cpu', 'devices', 'gradflow', 'jax', 'jaxlib', 'numpy',
     'source', 'xla_flags']
    """
    import jax  # a measurement has imported it already
    return {**dict(_versions()), "source": source_fingerprint(),
            "backend": jax.default_backend(), "cpu": cpu_model(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": jax.device_count(),
            **SETTINGS}


#: The entries of :func:`provenance` a cached result must share with this process to be
#: reused (:func:`read_cached`): the code that computed it. The CPU, XLA's flags and the
#: devices move the last bits only.
CODE = ("gradflow", "source", "jax", "jaxlib", "numpy", "backend")


def read_cached(path: str, settings: Mapping) -> tuple:
    """``(result, None)`` where ``path`` holds a result computed by this code (the
    :data:`CODE` entries of its provenance as this process's) with every one of ``settings``
    in its config as given (JSON-equal); else ``(None, why)``: ``why`` None where there is no
    file, else the reason in words (damaged, computed by other code, other settings: a file
    copied in from elsewhere), for the caller to say and compute it again. The caches of the
    atlases (:mod:`gradflow.atlas`, :mod:`gradflow.atlas_training`) read their entries so."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None, None
    try:
        res = _read(path)
    except (ValueError, OSError) as e:
        return None, f"it is damaged ({e})"
    now = provenance()
    other = [k for k in CODE if res.provenance.get(k) != now[k]]
    if other:
        return None, ("it was computed by other code ("
                      + ", ".join(f"{k} {res.provenance.get(k)}, now {now[k]}" for k in other)
                      + ")")
    want = json.loads(json.dumps(_jsonable(dict(settings))))
    wrong = [k for k, v in want.items() if res.config.get(k, _ABSENT) != v]
    if wrong:
        k = wrong[0]
        return None, (f"it holds other settings ({', '.join(wrong)}; {k}: "
                      f"{json.dumps(res.config.get(k))[:60]}, wanted {json.dumps(want[k])[:60]})")
    return res, None


_ABSENT = object()


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


def _read_only(a):
    if not isinstance(a, np.ndarray) or not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
    """Arrays of one measurement and the config that produced them.

    Attributes:
      kind: what was measured (``"gradient_map"``, ``"jacobian_map"``, ``"gate_stats"``, ...).
      arrays: ``{name: np.ndarray}``; also readable as attributes (``result.values``). Read-only
        (``values.copy()`` gives an array to write in), so a result's counts stay true of it.
      config: JSON-able dict: cell, options, layers, steps, hidden_size, batch, seed, dtype, ...
      nonfinite: ``{name: count}`` of inf/NaN entries per array, among those measured: the
        NaN a result holds by design (:func:`not_measured`: a gate's statistics in the layers
        of a stack or model that lack the gate) are not counted.
      underflow: ``{name: count}`` of entries below the smallest normal float of the array's
        dtype (exactly 0, or subnormal) where a positive value is expected, per array the
        measurement declared (e.g. a gradient map's ``values``); distinct from ``nonfinite``.
      provenance: what computed it (:func:`provenance`: versions and backend); ``{}`` for a
        file written before it was recorded.
    """

    kind: str
    arrays: dict
    config: dict
    nonfinite: dict
    underflow: dict = dataclasses.field(default_factory=dict)
    provenance: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.kind, str) or not self.kind:
            raise TypeError(f"Result kind must be a non-empty string, got {self.kind!r}")
        for field in ("arrays", "config", "nonfinite", "underflow", "provenance"):
            if not isinstance(getattr(self, field), dict):
                raise TypeError(f"Result {field} must be a dict, got "
                                f"{type(getattr(self, field)).__name__}")
        # its arrays are read-only views (the caller's own arrays untouched), measured or
        # loaded alike: an entry written in place would no longer match its counts
        object.__setattr__(self, "arrays", {k: _read_only(v) for k, v in self.arrays.items()})

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
        low = self.total_underflow
        return (f"Result({self.kind}: {shapes}; cell={self.config.get('cell')!r}"
                + (f"; {bad} non-finite" if bad else "") + (f"; {low} underflow" if low else "")
                + ")")

    @property
    def total_nonfinite(self) -> int:
        return int(sum(self.nonfinite.values()))

    @property
    def total_underflow(self) -> int:
        return int(sum(self.underflow.values()))

    def with_config(self, config: Mapping[str, Any]) -> "Result":
        """This result with ``config`` (made JSON-able) in place of its own; its arrays and
        their counts (non-finite, underflow) and provenance kept, as they were measured (a
        rebuild by :func:`make_result` cannot count underflow again: which entries are
        expected positive is the measurement's knowledge)."""
        return dataclasses.replace(self, arrays={k: np.asarray(v) for k, v in self.arrays.items()},
                                   config=_jsonable(dict(config)))

    def save(self, path, whole: bool = False) -> str:
        """Write ``path`` (``.npz`` appended if missing): arrays + JSON config. Returns the path.

        ``whole``: write ``<stem>.tmp.npz`` beside it, then rename it to ``path``, so that a
        reader (a resumed run, a cache) never sees half a file; a write that fails (a full
        disk) leaves no temporary file behind."""
        path = os.fsdecode(path)
        if not os.path.basename(path) or os.path.isdir(path):  # ("", "dir/": a hidden ".npz")
            raise InputError(f"cannot write {path!r}: give a file name (e.g. "
                             f"{os.path.join(path, 'result.npz')!r})")
        if not path.endswith(".npz"):
            path += ".npz"
        objects = [k for k, a in self.arrays.items() if np.asarray(a).dtype == object]
        if objects:  # (np.savez pickled them; load then refused the file)
            raise TypeError(f"cannot save {path!r}: array {objects[0]!r} holds Python objects "
                            "(dtype object), which a result file does not hold; give arrays "
                            "of numbers")
        taken = sorted(set(self.arrays) & {_META, "file", "allow_pickle"})
        if taken:  # (np.savez's own arguments: "allow_pickle" was dropped without a word)
            raise ValueError(f"cannot save {path!r}: an array may not be named "
                             f"{', '.join(map(repr, taken))} (the file's own entries)")
        try:
            meta = json.dumps({"format": FORMAT_VERSION, "kind": self.kind,
                               "config": self.config, "nonfinite": self.nonfinite,
                               "underflow": self.underflow, "provenance": self.provenance})
        except TypeError as e:  # a config entry JSON cannot hold (a function, an array)
            raise TypeError(f"cannot save {path!r}: its config must hold JSON values only "
                            f"(numbers, strings, lists, dicts): {e}") from None
        check_folder_of(path)
        written = path[:-4] + ".tmp.npz" if whole else path
        try:
            np.savez(written, **{_META: np.array(meta)}, **self.arrays)
            if whole:
                os.replace(written, path)
        except BaseException as e:
            if whole and os.path.exists(written):
                os.remove(written)
            if isinstance(e, OSError):
                raise InputError(f"cannot write {path!r}: {e.strerror or e}") from None
            raise
        return path

    @classmethod
    def load(cls, path) -> "Result":
        """Read a result written by :meth:`save` (``"x"`` reads ``x.npz`` where ``x`` is not
        there, as ``save("x")`` wrote it).

        Raises:
          FileNotFoundError: no such file.
          ValueError: naming the file and the problem: a directory, an empty, truncated or
            corrupted file, a foreign ``.npz`` (no gradflow metadata), or a file written by a
            newer format version than this gradflow reads (:data:`FORMAT_VERSION`).
        """
        return _read(os.fspath(path), cls)


def make_result(kind: str, arrays: Mapping[str, Any], config: Mapping[str, Any],
                warn: bool = True, positive: Mapping[str, Any] | None = None,
                source: Result | None = None, who: str | None = None) -> Result:
    """Build a :class:`Result`: arrays to NumPy, config to JSON-able, non-finite entries counted.

    Emits a :class:`NonFiniteWarning` (never an exception) when any measured entry is inf or
    NaN (:func:`not_measured` names the entries that are NaN by design).

    Args:
      positive: ``{name: True or a boolean mask broadcastable to arrays[name]}``: the entries
        the measurement expects to be positive; those below ``np.finfo(dtype).tiny`` (0 or
        subnormal) are counted in ``Result.underflow[name]``.
      source: the Result these arrays are read out of (a panel of a saved grid): its
        provenance is kept, instead of this machine's (which would start JAX to ask).
      who: the function the warning names (default: ``kind``).
    """
    arrs = {k: np.asarray(v) for k, v in arrays.items()}
    absent = not_measured(kind, arrs, config)
    nonfinite = {k: int(np.count_nonzero(~np.isfinite(v) & ~absent.get(k, np.False_)))
                 for k, v in arrs.items() if np.issubdtype(v.dtype, np.inexact)}
    underflow = {k: underflow_count(arrs[k], mask) for k, mask in (positive or {}).items()}
    bad = {k: n for k, n in nonfinite.items() if n}
    if warn and bad:
        warnings.warn(f"{who or kind}: non-finite entries (inf/NaN) in "
                      + ", ".join(f"{k}: {n}" for k, n in bad.items()),
                      NonFiniteWarning, stacklevel=3)
    return Result(kind, arrs, _jsonable(dict(config)), nonfinite, underflow,
                  provenance() if source is None else dict(source.provenance))


def not_measured(kind: str, arrays: Mapping[str, np.ndarray], config: Mapping) -> dict:
    """``{name: bool mask}`` of the entries a result holds as NaN by design, not as overflow:
    the statistics ``"{stat}/{gate}..."`` of a ``"gate_stats"`` result (layer axis first) in
    the layers its ``config["gate_layers"]`` (``{gate: [l, ...]}``, written for stacks or
    models whose layers report different gates) does not list for the gate. Any other result:
    ``{}``. :func:`make_result` leaves these out of ``Result.nonfinite`` and its warning, so a
    result re-made from another's arrays and config (a slice, a mean over seeds) counts the same.

    >>> a = {"mean/z": np.array([[0.5, 0.4], [np.nan, np.nan]]), "mean/r": np.ones((2, 2))}
    >>> m = not_measured("gate_stats", a, {"layers": 2, "gate_layers": {"z": [0], "r": [0, 1]}})
    >>> m["mean/z"].ravel().tolist(), m["mean/r"].ravel().tolist()
    ([False, True], [False, False])
    """
    where = config.get("gate_layers") if kind == "gate_stats" else None
    if not where:
        return {}
    L = config.get("layers")
    out = {}
    for name, a in arrays.items():
        stat, _, rest = name.partition("/")
        gate = rest.split("/", 1)[0]
        if stat == "bin_edges" or gate not in where or np.ndim(a) == 0:
            continue
        n = np.shape(a)[0]  # the layer axis
        if L is not None and n != int(L):
            continue
        off = ~np.isin(np.arange(n), [int(l) % n for l in where[gate]])
        out[name] = off.reshape((n,) + (1,) * (np.ndim(a) - 1))
    return out


def check_folder_of(path: str) -> None:
    """A ValueError unless the folder ``path`` is to be written in exists (naming a missing
    folder, or a file where the folder should be)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"cannot write {path!r}: {directory!r} "
                         + ("is a file, not a folder" if os.path.exists(directory)
                            else "does not exist"))


def origin(config: Mapping) -> str:
    """Where a measurement's parameters come from, in words: ``"init orthogonal"`` (the
    stack's own initialisation), or, where the config records ``params`` (the source of
    trained weights, e.g. ``gradflow heatmap --params RUN`` or a ``meta=`` you give),
    ``"trained (step 200 of RUN)"`` (with ``train_step``) or ``"params from FILE"``; a
    record made during training (``train_step``, no ``params``): ``"step 200 of training from
    init orthogonal"``; ``""`` where it records neither. A stack of different cells records
    each layer's options (``cell_options``, a list): their init, one for all layers or each
    layer's.

    >>> origin({"init": "orthogonal"}), origin({"init": "orthogonal", "params": "runs/a",
    ...                                          "train_step": 200})
    ('init orthogonal', 'trained (step 200 of runs/a)')
    >>> origin({"cell_options": [{"init": "chrono"}, {"init": "chrono"}]})
    'init chrono'
    >>> origin({"init": "orthogonal", "train_step": 12})
    'step 12 of training from init orthogonal'
    """
    if config.get("params") is not None:
        if config.get("train_step") is not None:
            return f"trained (step {config['train_step']} of {config['params']})"
        module = (f" ({str(config['prefix']).strip('.')})" if config.get("prefix")
                  else "")  # (one module of a PyTorch file holding several)
        return f"params from {config['params']}{module}"
    init = ""
    per_layer = config.get("cell_options")
    if config.get("init") is not None:
        init = f"init {config['init']}"
    elif isinstance(per_layer, list) and per_layer and all(
            isinstance(o, Mapping) and o.get("init") for o in per_layer):
        inits = [str(o["init"]) for o in per_layer]
        init = "init " + (inits[0] if len(set(inits)) == 1 else " / ".join(inits))
    if config.get("train_step") is not None:
        return f"step {config['train_step']} of training" + (f" from {init}" if init else "")
    return init


def underflow_count(values, positive=True) -> int:
    """The number of entries of ``values`` (a floating array, any shape) below the smallest
    normal float of its dtype, ``np.finfo(dtype).tiny`` (exactly 0, or subnormal), among those
    ``positive`` (True, or a boolean mask broadcastable to ``values``) expects to be positive.

    >>> underflow_count(np.array([1e-30, 0.0, 1e-40, np.nan], np.float32))
    2
    """
    v = np.asarray(values)
    if not np.issubdtype(v.dtype, np.floating):
        raise TypeError(f"underflow is counted in floating arrays, got {v.dtype}")
    low = np.abs(v) < np.finfo(v.dtype).tiny
    return int(np.count_nonzero(low & np.broadcast_to(np.asarray(positive, bool), v.shape)))


def is_zip(path) -> bool:
    """Whether the file at ``path`` begins as a zip archive (an .npz); ``np.load`` tries
    anything else as a pickle, and its refusal says so instead of what the file is."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _read(path: str, cls=Result) -> Result:
    """:meth:`Result.load`, every failure turned into one clear error naming ``path``."""
    def bad(problem):
        return ValueError(f"cannot load {path!r}: {problem}")

    if not os.path.exists(path):
        if not path.endswith(".npz") and os.path.isfile(path + ".npz"):
            path = path + ".npz"  # as save("x") wrote it
        else:
            raise FileNotFoundError(f"cannot load {path!r}: no such file")
    if os.path.isdir(path):
        raise bad("it is a directory, not a result file (.npz)")
    size = os.path.getsize(path)
    if size == 0:
        raise bad("the file is empty (0 bytes)")
    if not is_zip(path):
        raise bad("not a gradflow result: the file is not an .npz (zip) archive")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:  # (closed on a
            # damaged file too: np.load's own handle was left open)
            if _META not in f.files:
                raise bad(f"not a gradflow result: an .npz without gradflow metadata ({_META}); "
                          f"it holds {', '.join(f.files[:8]) or 'no arrays'}")
            raw = f[_META]
            try:
                meta = json.loads(str(raw))
            except ValueError:
                raise bad("its gradflow metadata is not valid JSON (corrupted)") from None
            if not isinstance(meta, dict) or not {"kind", "config", "nonfinite"} <= set(meta):
                raise bad("its gradflow metadata lacks kind/config/nonfinite (corrupted)")
            if not (isinstance(meta["kind"], str) and isinstance(meta["config"], dict)
                    and all(isinstance(meta.get(k, {}), dict)
                            for k in ("nonfinite", "underflow", "provenance"))):
                raise bad("its gradflow metadata has entries of the wrong kind (corrupted)")
            version = meta.get("format", 0)
            if not isinstance(version, int) or version < 0:
                raise bad(f"its format version {version!r} is not a version number (corrupted)")
            if version > FORMAT_VERSION:
                raise bad(f"it was written by a newer gradflow (format version {version}; this "
                          f"gradflow reads up to {FORMAT_VERSION}): upgrade gradflow to read it")
            arrays = {k: f[k] for k in f.files if k != _META}
    except ValueError as e:
        if str(e).startswith("cannot load"):
            raise
        raise bad(f"an entry cannot be read without pickle or is malformed ({e})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
        raise bad(f"the file is truncated or corrupted ({type(e).__name__}: {e})") from None
    return cls(meta["kind"], arrays, meta["config"], meta["nonfinite"],
               meta.get("underflow", {}), meta.get("provenance", {}))


load = Result.load
