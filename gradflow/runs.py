"""Training runs on disk: save and restore, and trained weights back in for measurement.

A run folder (``train(..., run_dir=DIR)``, ``gradflow train --out DIR``) holds:

* ``curve.npz``: the learning curve so far (a :class:`gradflow.results.Result`);
* ``record-NNNNN.npz``: one per recorded measurement;
* ``state.npz``: the parameters and the optimiser state, one array per pytree leaf, each
  named by its path (:func:`jax.tree_util.keystr`: ``"params['stack']['layers'][0]['f']['W']"``,
  ``"opt_state[1].mu"``), plus ``__meta__``: JSON with the step, the run's config, the
  stack's own config (``"stack"``, enough to rebuild it), the index of the records and the
  digest of the curve saved with it (``"curve"``). Written last (to a temporary file, then
  renamed), so a state always describes complete files; a resume restores the curve and the
  records only where they are the state's (:func:`gradflow.train.resume_files`).

Files of the first format (leaves named ``leaf00000``, ``leaf00001``, ... in flattening order,
the parameters as one raveled vector) are still read.

:func:`load_params` turns a run folder (or a file written by :func:`save_params`) into
``(stack, params)`` for any measurement::

    stack, params = gradflow.runs.load_params("gradflow-out/train_adding_lstm_L4")
    gradflow.gradient_map(stack, params, xs)
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

import jax
import numpy as np

from gradflow import cells as _cells
from gradflow.cells import pytorch
from gradflow.cells.base import cast_floating
from gradflow.errors import InputError
from gradflow.results import is_zip, provenance
from gradflow.stack import SETTINGS, Stack, from_torch

STATE = "state.npz"
CURVE = "curve.npz"
META = "__meta__"
FORMAT = 2
#: ``read_run(path)["format"]`` of a PyTorch RNN's state dict saved with ``np.savez``
TORCH = "torch state dict"
_LEGACY_PREFIX = "leaf"
#: The keys of ``Stack.config`` that are stack settings; every other key is a cell option.
STACK_KEYS = ("cell", "layers", "input_size", "hidden_size", *SETTINGS)


# ---------------------------------------------------------------------------------------------
# Leaves named by their path


def named_leaves(tree) -> dict:
    """``{keystr(path): leaf}`` for every leaf of ``tree``, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def unflatten_named(template, arrays: dict, where: str = "the file"):
    """``template`` with each leaf replaced by ``arrays[keystr(path)]`` (cast to the template
    leaf's dtype where it has one).

    Raises:
      InputError: a leaf of ``template`` is missing from ``arrays`` or has another shape.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, t in flat:
        name = jax.tree_util.keystr(path)
        if name not in arrays:
            raise InputError(f"{where} has no array {name!r}: it was saved from another model")
        a = np.asarray(arrays[name])
        if a.shape != tuple(np.shape(t)):
            raise InputError(f"{where}: {name} has shape {a.shape}, expected {np.shape(t)}")
        leaves.append(a.astype(t.dtype) if hasattr(t, "dtype") else a)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _write_npz(path: str, meta: dict, arrays: dict) -> str:
    """Write ``path`` (``.npz`` appended if missing, as NumPy does) whole: a temporary file
    renamed, so a reader never sees half a file; a path that cannot be written is a
    ValueError naming it. Returns the path written."""
    from gradflow.results import check_folder_of

    if not path.endswith(".npz"):  # (np.savez appends it: the rename missed the file)
        path += ".npz"
    check_folder_of(path)
    tmp = os.path.join(os.path.dirname(path) or ".", ".tmp-" + os.path.basename(path))
    try:
        np.savez(tmp, **{META: np.array(json.dumps(meta))},
                 **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):  # (a full disk: no torn file left beside the run)
            os.remove(tmp)
        raise InputError(f"cannot write {path!r}: {e.strerror or e}") from None
    return path


#: How a PyTorch RNN's weights are saved for the command line, in its messages.
_TORCH_SAVEZ = "arrays: np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})"


def _read_npz(path, keep=lambda name: True) -> tuple[dict, dict]:
    """``(meta, {name: array})`` of a state or params file, reading only the arrays whose
    names ``keep`` accepts (an .npz is read member by member: ``read_run`` reads none)."""
    try:
        if not is_zip(os.fspath(path)):
            raise InputError(f"cannot read {os.fspath(path)!r}: it is not an .npz (zip) "
                             "file; a run state or params file is what gradflow train or "
                             "gradflow.runs.save_params wrote, and a PyTorch RNN's weights are "
                             f"read as {_TORCH_SAVEZ}")
        with np.load(os.fspath(path), allow_pickle=False) as f:
            if META not in f.files:
                if any(name.endswith("data.pkl") for name in f.files):
                    raise InputError(f"{os.fspath(path)!r} is a torch.save file, which "
                                     "gradflow does not unpickle (loading a pickle runs code "
                                     f"it holds): save the weights as {_TORCH_SAVEZ}, with "
                                     "state_dict = model.state_dict() (of a checkpoint, its "
                                     "model's)")
                if not pytorch.is_state_dict(f.files):
                    raise InputError(f"{os.fspath(path)!r} is not a gradflow run state or "
                                     "params file, nor a PyTorch RNN's state dict saved as "
                                     f"{_TORCH_SAVEZ}")
                return {"format": TORCH}, {k: f[k] for k in f.files if keep(k)}
            meta = json.loads(str(f[META]))
            arrays = {k: f[k] for k in f.files if k != META and keep(k)}
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # not an .npz of ours
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot read {os.fspath(path)!r} as a gradflow .npz file: "
                         f"{type(e).__name__}: {e}") from e
    return meta, arrays


# ---------------------------------------------------------------------------------------------
# The training state


def save_state(run_dir, step: int, params, opt_state, config: dict, stack: Stack,
               records: list, curve: str | None = None) -> str:
    """Write ``run_dir/state.npz``: ``params`` and ``opt_state`` leaves named by path, and
    ``__meta__ = {"format", "step", "config", "stack": stack.config, "records", "curve",
    "provenance"}`` (``records``: ``[[name, step, file], ...]``; ``curve``: the digest of the
    curve saved with it, :func:`gradflow.train.curve_digest`, or None; ``provenance``:
    versions and backend, :func:`gradflow.results.provenance`)."""
    meta = {"format": FORMAT, "step": int(step), "config": config, "stack": stack.config,
            "records": records, "curve": curve, "provenance": provenance()}
    arrays = named_leaves({"params": params, "opt_state": opt_state})
    return _write_npz(os.path.join(os.fspath(run_dir), STATE), meta, arrays)


def read_state(run_dir) -> tuple[dict, dict]:
    """``(meta, {name: array})`` of ``run_dir/state.npz``."""
    return _read_npz(os.path.join(os.fspath(run_dir), STATE))


def restore_state(arrays: dict, params, opt_state, where: str = "the run"):
    """``(params, opt_state)`` from :func:`read_state`'s arrays, shaped like the templates.

    Reads both formats: leaves named by path, and the first format's ``leafNNNNN`` (the
    parameters raveled into one vector, then the optimiser state's leaves, in order).
    """
    if any(k.startswith(_LEGACY_PREFIX) and k[len(_LEGACY_PREFIX):].isdigit() for k in arrays):
        return _restore_legacy(arrays, params, opt_state, where)
    both = unflatten_named({"params": params, "opt_state": opt_state}, arrays, where)
    return both["params"], both["opt_state"]


def _restore_legacy(arrays, params, opt_state, where):
    leaves = [arrays[k] for k in sorted(arrays)]
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    o_leaves, o_def = jax.tree_util.tree_flatten(opt_state)
    theta = np.asarray(leaves[0]).ravel()
    sizes = [math.prod(np.shape(a)) for a in p_leaves]
    if theta.size != sum(sizes) or len(leaves) != 1 + len(o_leaves) or any(
            np.shape(a) != np.shape(b) for a, b in zip(leaves[1:], o_leaves)):
        raise InputError(f"{where}: its saved state does not match this stack and optimiser")
    parts = np.split(theta, np.cumsum(sizes)[:-1])
    p = [part.reshape(np.shape(t)).astype(t.dtype) for part, t in zip(parts, p_leaves)]
    o = [np.asarray(a).astype(t.dtype) for a, t in zip(leaves[1:], o_leaves)]
    return jax.tree_util.tree_unflatten(p_def, p), jax.tree_util.tree_unflatten(o_def, o)


def made_folder(run_dir) -> str:
    """``run_dir`` as a path, the folder made (with its parents) where missing; an
    :class:`~gradflow.errors.InputError` in one line where it cannot be made or written
    (a file of that name, a read-only place), before anything is computed."""
    run_dir = os.fspath(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"run_dir {run_dir!r} cannot be made: {e.strerror or e}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise InputError(f"run_dir {run_dir!r} is not writable")
    return run_dir


def clear(run_dir) -> None:
    """Create ``run_dir`` if missing (:func:`made_folder`) and delete a previous run's files
    from it (``curve.npz``, ``state.npz``, ``record-*.npz``); other files are left alone."""
    run_dir = made_folder(run_dir)
    for f in os.listdir(run_dir):
        if f in (STATE, CURVE) or (f.startswith("record-") and f.endswith(".npz")):
            try:
                os.remove(os.path.join(run_dir, f))
            except OSError as e:  # (a folder of that name, a read-only one)
                raise InputError(f"cannot remove {os.path.join(run_dir, f)!r}, an earlier "
                                 f"run's file: {e.strerror or e}") from None


def record_file(index: int) -> str:
    """The file name of the ``index``-th record of a run: ``record-NNNNN.npz``."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"a record index is an integer >= 0, got {index!r}")
    return f"record-{index:05d}.npz"


# ---------------------------------------------------------------------------------------------
# Trained weights in


#: The fix :func:`stack_from_config` names for a user's cell (a reader of the command line
#: keys on it to name the option that passes the cell instead).
_REBUILD = "rebuild it and pass it (load_params(path, cell=...))"


def stack_from_config(config: dict, cell=None) -> Stack:
    """The :class:`gradflow.Stack` described by ``Stack.config`` (e.g. ``meta["stack"]``), or
    by a result's config (``gradflow.load(path).config``: the stack a map measured; its other
    keys, the sizes and the measurement's settings, are not the stack's).

    The cell is rebuilt from its registered name and options, unless ``cell`` (a
    :class:`gradflow.cells.Cell`) is given: a user's cell cannot be rebuilt from its name.

    Raises:
      InputError: the config names a cell that is not registered (pass ``cell=``).
    """
    if not isinstance(config, dict) or "cell" not in config:
        raise InputError(f"a stack config is a dict with the stack's 'cell', 'layers', "
                         f"'input_size' and 'hidden_size' (Stack.config), got {config!r}"[:300])
    name = config["cell"]
    if cell is not None:  # the cell(s) given must be the saved one(s), layer by layer
        saved = name if isinstance(name, list) else [name]
        cells = list(cell) if isinstance(cell, (list, tuple)) else [cell]
        if len(cells) == 1 or len(saved) == 1:  # one for every layer
            n = max(len(cells), len(saved))
            cells, saved = cells * (n // len(cells)), saved * (n // len(saved))
        given = [getattr(c, "name", None) for c in cells]
        if given != saved:
            def said(names, whose):
                return (f"{whose} cell is {names[0]!r}" if len(set(names)) == 1
                        else f"{whose} cells are " + ", ".join(map(repr, names)))
            raise InputError(said(saved, "the saved stack's") + ", "
                             + said(given, "the given") + ": give the cell it was saved with")
        kept = config["cell_options"] if isinstance(name, list) else [config] * len(saved)
        for c, o in zip(cells, kept):  # a factory's cell: built as it was (its options)
            was, now = built_by(o), built_by(dict(getattr(c, "options", ())))
            if was is not None and now is not None and was != now:
                raise InputError(f"the saved stack's cell was built by {_call(*was)}, the "
                                 f"cell given by {_call(*now)}: give the cell it was saved "
                                 "with")
    if cell is None:
        names = name if isinstance(name, list) else [name]
        unknown = [n for n in names if n not in _cells.names()]
        if unknown:
            raise InputError(f"the saved stack's cell {unknown[0]!r} is not a registered cell: "
                             f"{_REBUILD}")
        if isinstance(name, list):
            cell = [_cells.get(n, **o) for n, o in zip(name, config["cell_options"])]
        elif isinstance(config.get("cell_options"), dict):  # kept apart from a result's keys
            cell = _cells.get(name, **{k: _tuples(v) for k, v in config["cell_options"].items()})
        else:  # the cell's own options among the keys (a result's config has more)
            valid = _cells.options_of(name)
            cell = _cells.get(name, **{k: _tuples(v) for k, v in config.items()
                                       if k not in STACK_KEYS and k in valid})
    # settings a file saved before they existed lacks take their defaults
    return Stack(cell, config["layers"], config["input_size"], config["hidden_size"],
                 **{k: config[k] for k in SETTINGS if k != "cell_options" and k in config})


def built_by(options: dict) -> tuple | None:
    """``(factory, {option: value})`` that built a cell, as a cell's options (or a stack's
    config) record it (``"factory"``, ``"factory_options"``: ``gradflow --cell
    module:factory`` stamps them), JSON's lists as tuples; None where not recorded."""
    if not isinstance(options, dict) or "factory" not in options:
        return None
    return options["factory"], {k: _tuples(v) for k, v in options.get("factory_options", ())}


def _call(factory: str, options: dict) -> str:
    """``module:factory(key=value, ...)``, as a message names how a cell was built."""
    return f"{factory}({', '.join(f'{k}={v!r}' for k, v in sorted(options.items()))})"


def _tuples(v):
    """JSON turned the cells' tuple options into lists; turn them back (options are hashed)."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def save_params(path, stack: Stack, params) -> str:
    """Write ``stack``'s ``params`` to ``path`` (``.npz``, appended if missing) with the
    stack's config, for :func:`load_params` and ``gradflow heatmap --params PATH`` (e.g.
    weights trained elsewhere and converted to gradflow's layout)."""
    from gradflow.checks import check_params

    check_params(stack, params)
    return _write_npz(os.fspath(path), {"format": FORMAT, "stack": stack.config,
                                        "provenance": provenance()}, named_leaves(params))


def _state_path(path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / STATE
    if not p.is_file() and p.suffix != ".npz" and p.with_name(p.name + ".npz").is_file():
        p = p.with_name(p.name + ".npz")  # what save_params(path) wrote
    if not p.is_file():
        raise InputError(f"no trained parameters at {os.fspath(path)!r}: expected a run folder "
                         f"holding {STATE} (gradflow train --out DIR), a .npz file from "
                         "gradflow.runs.save_params or a PyTorch RNN's state dict saved with "
                         "np.savez")
    return p


def read_run(path) -> dict:
    """The ``__meta__`` of a run folder's state (or of a :func:`save_params` file):
    ``{"stack": ..., "config": ... (runs only), "step": ... (runs only), ...}``; ``{"format":
    TORCH}`` for a PyTorch RNN's state dict saved with ``np.savez``."""
    return _read_npz(_state_path(path), keep=lambda name: False)[0]


def load_params(path, cell=None, dtype=None, prefix: str | None = None
                ) -> tuple[Stack, dict]:
    """``(stack, params)`` saved at ``path``: a run folder (or its ``state.npz``), whose
    params are the stack's part of the final (or latest saved) training state, a file
    written by :func:`save_params`, or a PyTorch ``nn.LSTM``/``GRU``/``RNN``'s state dict
    saved with ``np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})``
    (read by :func:`gradflow.stack.from_torch`; a vanilla RNN's ``nonlinearity="relu"`` or
    ``"tanh"`` saved beside it).

    Args:
      path: the folder or file.
      cell: the run's cell, when it is not a registered one (see :func:`stack_from_config`).
      dtype: the params' dtype (default the saved one).
      prefix: which recurrent module of a PyTorch state dict holding several
        (``"decoder"``; :func:`gradflow.stack.from_torch`'s).
    Returns:
      ``(stack, params)`` with ``params`` shaped like ``stack.init(key)``.
    Raises:
      InputError: no such run or file, or arrays that do not fit the saved stack.
    """
    p = _state_path(path)  # (a run's optimiser state and readout are not read)
    meta, arrays = _read_npz(p, keep=lambda name: not name.startswith(
        ("['opt_state']", "['params']['head']")))
    if meta.get("format") == TORCH:
        return _torch_params(p, arrays, dtype, prefix)
    if prefix is not None:
        raise InputError(f"prefix={prefix!r} picks one module of a PyTorch state dict; "
                         f"{os.fspath(p)!r} is gradflow's, of one stack")
    if "stack" not in meta:
        raise InputError(f"{os.fspath(p)!r} does not record its stack (saved by an older "
                         "gradflow); rebuild the stack and read it with restore_state")
    stack = stack_from_config(meta["stack"], cell)
    if "config" in meta:  # a training run: the stack's part of {"stack", "head"}
        prefix = "['params']['stack']"
        arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    floats = [a.dtype for a in arrays.values() if np.issubdtype(a.dtype, np.floating)]
    saved = floats[0] if floats else np.float32
    template = jax.eval_shape(lambda k: stack.init(k, saved), jax.random.key(0))
    params = unflatten_named(template, arrays, os.fspath(p))
    return stack, (params if dtype is None else cast_floating(params, dtype))


def load_torch_model(path, dtype=None, prefix: str | None = None):
    """The :class:`gradflow.models.TorchModel` (:func:`gradflow.torch_model`) of a PyTorch
    RNN's state dict saved as ``.npz`` (as :func:`load_params` reads them) whose layers a
    Stack does not express: bidirectional ones, or an LSTM's with ``proj_size``. None for any
    other file, which :func:`load_params` reads (or refuses); ``prefix`` as its.

    Raises:
      InputError: no such file, or weights that do not make a model (their message).
    """
    from gradflow.models import torch_model

    p = _state_path(path)
    if read_run(p).get("format") != TORCH:  # (reads no array)
        return None
    arrays = _read_npz(p)[1]
    act = _nonlinearity_for(arrays, prefix)
    try:
        read = pytorch.read(arrays, prefix=prefix, nonlinearity=act, both=True,
                            who="torch_model")
        if len(read.layers[0]) == 1 and "proj" not in read.layers[0][0]:
            return None  # one direction, no projection: a Stack (load_params)
        return torch_model(arrays, prefix=prefix, nonlinearity=act, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise _torch_file_error(p, e, "torch_model: ") from e


def _nonlinearity(arrays: dict) -> str | None:
    """A vanilla RNN's ``nonlinearity``, saved beside its weights as a string (a state dict
    does not record it), taken out of ``arrays``; None where not saved."""
    act = arrays.pop("nonlinearity", None)
    return None if act is None else str(act)


def _nonlinearity_for(arrays: dict, prefix) -> str | None:
    """:func:`_nonlinearity`, where the module ``prefix`` picks is a vanilla RNN; None for an
    LSTM or a GRU (a seq2seq's file saves its RNN decoder's beside its GRU encoder's weights)."""
    act = _nonlinearity(arrays)
    if act is None:
        return None
    try:
        kind = pytorch.read(arrays, prefix=prefix, both=True).cell.name
    except (TypeError, ValueError):  # (an RNN's needs it; any other error, read again, says)
        return act
    return act if kind == "rnn" else None


def _torch_params(p: Path, arrays: dict, dtype=None, prefix=None) -> tuple[Stack, dict]:
    """``(stack, params)`` of a PyTorch RNN's state dict saved as ``.npz``
    (:func:`gradflow.stack.from_torch`, at ``dtype``; a vanilla RNN's ``nonlinearity`` may be
    saved beside its weights as a string)."""
    act = _nonlinearity_for(arrays, prefix)
    try:
        return from_torch(arrays, prefix=prefix, nonlinearity=act, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise _torch_file_error(p, e, "from_torch: ") from e


def _torch_file_error(p: Path, e: Exception, who: str) -> InputError:
    """The InputError of a PyTorch state dict file that does not make a model: ``e``'s
    message without the function's name ``who``; where the file lacks a vanilla RNN's
    nonlinearity, how to save it there (a file has no argument to pass)."""
    text = str(e).replace(who, "")
    if pytorch._NO_NONLINEARITY in text:
        text = (f"{pytorch._NO_NONLINEARITY}: save it beside the weights, np.savez(path, "
                "nonlinearity='tanh', **state_dict) ('tanh' is nn.RNN's default; or 'relu')")
    return InputError(f"{os.fspath(p)!r}: {text}")


def load_head(path) -> dict:
    """The trained readout ``{"W": (H, K), "b": (K,)}`` of a training run (its folder or
    ``state.npz``), in the saved dtype: with :func:`gradflow.train.task_loss`, the run's own
    loss for :func:`gradflow.gradient_map`.

    Raises:
      InputError: no such run, or a :func:`save_params` file (parameters only, no readout).
    """
    p = _state_path(path)
    prefix = "['params']['head']"
    meta, arrays = _read_npz(p, keep=lambda name: name.startswith(prefix))
    head = {k[len(prefix):].strip("[]'"): v for k, v in arrays.items() if k.startswith(prefix)}
    if "config" not in meta or set(head) != {"W", "b"}:
        raise InputError(f"{os.fspath(p)!r} holds no trained readout: a training run's "
                         "folder (gradflow train --out DIR) has one, a params file does not")
    return head


__all__ = ["STATE", "CURVE", "named_leaves", "unflatten_named", "save_state", "read_state",
           "restore_state", "clear", "record_file", "stack_from_config", "save_params",
           "read_run", "load_params", "load_torch_model", "load_head"]
