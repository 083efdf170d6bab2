"""PyTorch's recurrent layers in: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their ``*Cell`` forms.

PyTorch's three recurrent layers compute exactly gradflow's ``lstm``, ``gru`` (its default
reset placement, ``b_hn`` inside the reset) and ``rnn`` (``tanh`` or ``relu``) cells, with the
gates' rows stacked in one matrix (``i, f, g, o``; ``r, z, n``) and two biases per gate: the
cells are built with ``biases=2`` (``b`` and ``b_hh`` kept apart, added in the step; the GRU's
candidate has ``b`` and ``b_hn``), or ``biases=0`` for ``bias=False``, so that the parameter
map is the mean over PyTorch's own parameters. :func:`torch_layers`
reads the weights by their names (``weight_ih_l0``, ``bias_hh_l3``; a cell's ``weight_ih``)
and lays them out as the cell's params, one dict per layer; :func:`gradflow.stack.from_torch`
builds the stack. Nothing here imports PyTorch: a tensor is read through its ``detach`` and
``numpy``, and a state dict may hold NumPy arrays (an ``np.savez`` of it, for the command line).
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np

from gradflow.cells.base import Cell
from gradflow.cells.gru import gru
from gradflow.cells.lstm import lstm
from gradflow.cells.simple import rnn

#: gates stacked in PyTorch's weights, in its row order -> the gradflow cell that computes it
GATES = {4: ("lstm", ("i", "f", "g", "o")), 3: ("gru", ("r", "z", "n")), 1: ("rnn", ("h",))}
#: each cell's gates, in PyTorch's row order
GATES_OF = {name: gates for name, gates in GATES.values()}
#: a module's class name -> what its ``mode`` or class says it is
MODULES = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn",
           "LSTMCell": "lstm", "GRUCell": "gru", "RNNCell": "rnn"}
NONLINEARITIES = ("tanh", "relu")
_WEIGHT = re.compile(r"^(?P<prefix>.*?)weight_ih(?P<layer>_l\d+)?(?P<reverse>_reverse)?$")


class TorchLayers(NamedTuple):
    """What :func:`torch_layers` read: the ``cell`` (a gradflow :class:`Cell`), the data's
    ``input_size``, one ``hidden_size`` per layer, the per-layer params (NumPy, in the
    weights' dtype) and a one-line ``source`` (``"torch nn.LSTM, 4 layers"``)."""
    cell: Cell
    input_size: int
    hidden_size: tuple
    layers: list
    source: str

    @property
    def dtype(self):
        """The weights' dtype as JAX computes in it (float64 becomes float32 where 64-bit JAX
        is off): the params' default."""
        first = self.layers[0][0] if isinstance(self.layers[0], list) else self.layers[0]
        return jax.dtypes.canonicalize_dtype(next(iter(first.values()))["W"].dtype)


def is_state_dict(keys) -> bool:
    """Whether names ``keys`` hold a PyTorch recurrent layer's weights (``weight_ih_l0``, a
    cell's ``weight_ih``, under any prefix): how a saved ``.npz`` is told from gradflow's."""
    return any(_WEIGHT.match(str(k)) for k in keys)


def _array(who: str, name: str, value) -> np.ndarray:
    """A tensor (via ``detach().cpu().numpy()``) or anything NumPy reads, as a float array."""
    if hasattr(value, "detach"):
        value = value.detach()
        if hasattr(value, "cpu"):
            value = value.cpu()
        dtype = str(getattr(value, "dtype", ""))
        if dtype.endswith(("bfloat16", "float16")):
            raise ValueError(f"{who}: {name} is {dtype.split('.')[-1]}; gradflow measures in "
                             "float32 or float64: give the same weights in float32 "
                             "(model.float())")
        value = value.numpy()
    a = np.asarray(value)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{who}: {name} is not a floating array (dtype {a.dtype})")
    if a.dtype.itemsize < 4:
        raise ValueError(f"{who}: {name} is {a.dtype}; gradflow measures in float32 or float64:"
                         " give the same weights in float32")
    return a


def _module_kind(model) -> tuple[str, str | None, str] | None:
    """``(cell name, nonlinearity, class name)`` of a PyTorch recurrent module, None for any
    other object (found by class name along its MRO: a subclass of ``nn.LSTM`` is one)."""
    for klass in type(model).__mro__:
        if klass.__name__ in MODULES and callable(getattr(model, "state_dict", None)):
            kind = MODULES[klass.__name__]
            act = None
            if kind == "rnn":
                mode = getattr(model, "mode", None)
                act = getattr(model, "nonlinearity", None) or (
                    "relu" if mode == "RNN_RELU" else "tanh" if mode == "RNN_TANH" else None)
            return kind, act, klass.__name__
    return None


_TORCH_MODEL = "measure such a model with gradflow.torch_model, which builds it for model_map"
#: The start of the refusal of a vanilla RNN's weights without their nonlinearity (a reader
#: of files keys on it to say how to save it there: :func:`gradflow.runs.load_params`).
_NO_NONLINEARITY = "a vanilla RNN's state dict does not record its nonlinearity"


def _prefixes(who: str, state: Mapping, projected: bool) -> dict:
    """``{prefix: [layer suffixes]}`` of the recurrent weights in a state dict (``"_l0"``,
    ``"_l0_reverse"``, a cell's ``""``); an LSTM's projections (``weight_hr``) are refused
    unless ``projected``."""
    found = {}
    for key in map(str, state):
        m = _WEIGHT.match(key)
        if m is None:
            continue
        found.setdefault(m["prefix"], []).append((m["layer"] or "") + (m["reverse"] or ""))
    for prefix in found:
        if not projected and any(str(k).startswith(prefix + "weight_hr") for k in state):
            raise ValueError(f"{who}: {prefix}weight_hr_l* are an LSTM's projections "
                             f"(proj_size > 0), which a Stack's lstm does not have: "
                             f"{_TORCH_MODEL}")
    return found


def _layer(who, state, prefix, suffix, layer):
    """``(cell name, input size, hidden size, params)`` of one layer's weights."""
    def get(name, required=True):
        key = f"{prefix}{name}{suffix}"
        if key not in state:
            if required:
                raise ValueError(f"{who}: {key!r} is missing (layer {layer})")
            return None
        return _array(who, key, state[key])

    w_ih, w_hh = get("weight_ih"), get("weight_hh")
    b_ih, b_hh = get("bias_ih", False), get("bias_hh", False)
    w_hr = get("weight_hr", False)  # an LSTM's projection h = W_hr (o * tanh(c)), (P, H)
    H = w_hh.shape[-1] if w_hr is None or w_hr.ndim != 2 else w_hr.shape[1]
    if w_hh.ndim != 2 or w_ih.ndim != 2 or w_hh.shape[0] % H:
        raise ValueError(f"{who}: layer {layer}'s weights have shapes {w_ih.shape} and "
                         f"{w_hh.shape}; PyTorch's are (G*H, in) and (G*H, H)")
    G = w_hh.shape[0] // H
    if w_hr is not None and (G != 4 or w_hr.ndim != 2 or w_hh.shape[1] != w_hr.shape[0]):
        raise ValueError(f"{who}: layer {layer}'s projection has shape {w_hr.shape}; an LSTM "
                         f"with proj_size P has weight_hr (P, H) and weight_hh (4H, P)")
    if G not in GATES or w_ih.shape[0] != G * H:
        raise ValueError(f"{who}: layer {layer}'s weights have shapes {w_ih.shape} and "
                         f"{w_hh.shape}, not an LSTM's (4H rows), a GRU's (3H) or an RNN's (H)")
    name, gates = GATES[G]
    if (b_ih is None) != (b_hh is None):  # PyTorch writes both or neither (bias=False)
        have, lacks = ("bias_ih", "bias_hh") if b_hh is None else ("bias_hh", "bias_ih")
        raise ValueError(f"{who}: layer {layer} has {prefix}{have}{suffix} but not "
                         f"{prefix}{lacks}{suffix}; PyTorch saves both biases or neither "
                         "(bias=False): is the state dict complete?")
    if b_ih is not None and (b_ih.shape != (G * H,) or b_hh.shape != (G * H,)):
        raise ValueError(f"{who}: layer {layer}'s biases have shapes {b_ih.shape} and "
                         f"{b_hh.shape}, expected ({G * H},)")
    rows = lambda a, k: a[k * H:(k + 1) * H]  # noqa: E731
    params = {}
    for k, g in enumerate(gates):  # the cell's biases=2: PyTorch's two biases, kept apart
        params[g] = {"W": rows(w_ih, k).T, "U": rows(w_hh, k).T}
        if b_ih is not None:
            params[g].update(b=rows(b_ih, k), b_hh=rows(b_hh, k))
    if name == "gru" and b_ih is not None:  # n = tanh(W_n x + b_in + r * (U_n h + b_hn))
        params["n"]["b_hn"] = params["n"].pop("b_hh")
    if w_hr is not None:  # the state h and what goes up are P wide, the memory c H
        params["proj"] = w_hr.T
        return name, w_ih.shape[1], w_hr.shape[0], params
    return name, w_ih.shape[1], H, params


def _one(who, model, prefix, nonlinearity, both):
    """``(cell name, nonlinearity, [[(in, H, params) per direction] per layer], what)`` of
    one module or state dict; a reverse direction is refused unless ``both``."""
    kind = _module_kind(model)
    if kind is not None:
        if getattr(model, "bidirectional", False) and not both:
            raise ValueError(f"{who}: a bidirectional {kind[2]} runs back in time too; a "
                             f"Stack runs forward only: {_TORCH_MODEL}")
        if getattr(model, "proj_size", 0) and not both:
            raise ValueError(f"{who}: an LSTM with proj_size={model.proj_size} projects h, "
                             f"which a Stack's lstm does not: {_TORCH_MODEL}")
        if kind[1] is not None:
            if nonlinearity not in (None, kind[1]):
                raise ValueError(f"{who}: nonlinearity={nonlinearity!r}, but the module is "
                                 f"{kind[1]}")
            nonlinearity = kind[1]
        _warn_dropout(who, model, kind[2])
        state, what = model.state_dict(), f"nn.{kind[2]}"
    elif isinstance(model, Mapping):
        state, what = model, "state dict"
    elif callable(getattr(model, "state_dict", None)):  # a whole model holding one
        state, what = model.state_dict(), f"{type(model).__name__}'s state dict"
    else:
        raise TypeError(f"{who}: expected a PyTorch nn.LSTM, nn.GRU or nn.RNN (or their *Cell), "
                        f"its state_dict(), or a list of them, one per layer; got "
                        f"{type(model).__name__}")
    found = _prefixes(who, state, both)
    if prefix is not None:
        if prefix not in found and isinstance(prefix, str) and prefix + "." in found:
            prefix += "."  # the module's name, as PyTorch names it ("encoder.lstm")
        if prefix not in found:
            raise ValueError(f"{who}: no recurrent weights under prefix={prefix!r}; found "
                             f"{_named(found)}")
        found = {prefix: found[prefix]}
    if not found:
        keys = sorted(map(str, state))[:6]
        raise ValueError(f"{who}: no recurrent layer's weights (weight_ih_l0, or a cell's "
                         f"weight_ih) in the {what}; its keys: {keys}")
    if len(found) > 1:
        raise ValueError(f"{who}: the {what} holds several recurrent layers' weights, "
                         f"{_named(found)}: pass prefix= one of them (on the command line "
                         "--prefix), or (from Python) a list of them, one per layer, bottom "
                         "first")
    (pre, suffixes), = found.items()
    reverse = sorted(x for x in suffixes if x.endswith("_reverse"))
    if reverse and not both:
        raise ValueError(f"{who}: {pre}weight_ih{reverse[0]} belongs to a bidirectional layer; "
                         f"a Stack runs forward in time only: {_TORCH_MODEL}")
    suffixes = [x for x in suffixes if not x.endswith("_reverse")]
    if "" in suffixes:  # a cell: weight_ih
        if len(suffixes) > 1:
            raise ValueError(f"{who}: both a cell's and a layer's weights under {pre!r}")
        suffixes = [""]
    else:
        n = len(suffixes)
        if sorted(suffixes) != sorted(f"_l{k}" for k in range(n)):
            raise ValueError(f"{who}: layers {sorted(suffixes)} under {pre!r}: expected _l0 to "
                             f"_l{n - 1}")
        suffixes = [f"_l{k}" for k in range(n)]
    if reverse and set(reverse) != {f"{x}_reverse" for x in suffixes}:
        raise ValueError(f"{who}: reverse directions {reverse} under {pre!r} for layers "
                         f"{suffixes}: a bidirectional model has one for every layer")
    dirs = ("", "_reverse") if reverse else ("",)
    biased = {f"{x[2:] or 0}{' reverse' if d else ''}": any(
        f"{pre}{b}{x}{d}" in state for b in ("bias_ih", "bias_hh"))
        for x in suffixes for d in dirs}
    if len(set(biased.values())) > 1:  # one module has biases in every layer or in none
        have = ", ".join(k for k, b in biased.items() if b)
        lacks = ", ".join(k for k, b in biased.items() if not b)
        where = repr(pre[:-1]) if pre else "the state dict"
        raise ValueError(f"{who}: layer(s) {have} of {where} have biases and {lacks} none; a "
                         "PyTorch module has them in every layer or in none (bias=False): is "
                         "the state dict complete?")
    held = _held(model, pre[:-1]) if pre else None  # a module the model holds: its own
    if held is not None:
        _warn_dropout(who, _held(model, pre[:-1], module=True), held[2])
    if held is not None and held[1] is not None:  # nonlinearity, as a module's is read
        if nonlinearity not in (None, held[1]):
            raise ValueError(f"{who}: nonlinearity={nonlinearity!r}, but the module "
                             f"{pre[:-1]!r} is {held[1]}")
        nonlinearity = held[1]
    layers = [[_layer(who, state, pre, x + d, k) for d in dirs] for k, x in enumerate(suffixes)]
    return layers, nonlinearity, what + (f" {pre[:-1]!r}" if pre else "")


def _held(model, name: str, module: bool = False):
    """:func:`_module_kind` of the submodule ``name`` of a PyTorch model (``"encoder.rnn"``,
    as its state dict's keys name it), or (``module``) the submodule itself; None where there
    is none such (a state dict)."""
    named = getattr(model, "named_modules", None)
    if not callable(named):
        return None
    for key, held in named():
        if key == name:
            return held if module else _module_kind(held)
    return None


def _warn_dropout(who: str, module, class_name: str) -> None:
    """A warning, at the caller's line, where a recurrent module has dropout between its
    layers (what a state dict cannot say): gradflow measures it as it runs in eval mode."""
    if getattr(module, "dropout", 0):
        frame, level = sys._getframe(1), 2  # the first frame outside gradflow: the user's
        ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
        while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(ours):
            frame, level = frame.f_back, level + 1
        warnings.warn(f"{who}: the {class_name}'s dropout={module.dropout} is not applied: "
                      "gradflow measures the model as it runs in eval mode", stacklevel=level)


def _named(found: dict) -> str:
    return ", ".join(repr(p or "(no prefix)") for p in found)


def torch_layers(model, *, prefix: str | None = None,
                 nonlinearity: str | None = None) -> TorchLayers:
    r"""PyTorch's recurrent weights as a gradflow cell and its per-layer params.

    Args:
      model: an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (``num_layers`` layers), an
        ``nn.LSTMCell``/``GRUCell``/``RNNCell`` (one layer), a model holding one (its
        ``state_dict()`` is read: ``{"encoder.lstm.weight_ih_l0": ..., ...}``), a state dict
        of any of these (tensors or NumPy arrays), or a list of them, one per layer, bottom
        first (e.g. the layers of a ``ModuleList``, which may differ in width).
      prefix: which recurrent module of a state dict holding several (``"encoder.lstm."``,
        or the module's name, ``"encoder.lstm"``).
      nonlinearity: ``"tanh"`` or ``"relu"``: a vanilla RNN's, which its state dict does not
        record (a module's is read from it).
    Returns:
      A :class:`TorchLayers`. Not supported, each with its own message: bidirectional layers
      and LSTMs with ``proj_size`` (:func:`gradflow.torch_model` builds them for
      :func:`gradflow.model_map`), 16-bit weights (measure the same weights in float32).

    Example::

      >>> rng = np.random.default_rng(0)
      >>> sd = {"weight_ih_l0": rng.normal(size=(12, 2)), "weight_hh_l0": rng.normal(size=(12, 4)),
      ...       "bias_ih_l0": rng.normal(size=12), "bias_hh_l0": rng.normal(size=12)}
      >>> t = gradflow.cells.pytorch.torch_layers(sd)  # a GRU: 3 x 4 rows
      >>> t.cell.name, t.input_size, t.hidden_size, sorted(t.layers[0]), t.source
      ('gru', 2, (4,), ['n', 'r', 'z'], 'torch state dict, 1 layer')
      >>> bool(np.array_equal(t.layers[0]["z"]["U"], sd["weight_hh_l0"][4:8].T))
      True
    """
    t = read(model, prefix=prefix, nonlinearity=nonlinearity)
    return t._replace(layers=[dirs[0] for dirs in t.layers])


def read(model, *, prefix: str | None = None, nonlinearity: str | None = None,
         both: bool = False, who: str = "from_torch") -> TorchLayers:
    """:func:`torch_layers`, each layer's params a list of one per direction (two where
    ``both`` and the model is bidirectional, the forward one first; else refused), its
    ``hidden_size`` what each direction emits. With ``both``, an LSTM's projections are read
    too (``params["proj"]: (H, P)``, ``hidden_size`` P; else refused): the forms only
    :func:`gradflow.torch_model` runs."""
    if nonlinearity not in (None,) + NONLINEARITIES:
        raise ValueError(f"{who}: nonlinearity={nonlinearity!r}; choose from "
                         f"{', '.join(map(repr, NONLINEARITIES))}")
    if isinstance(model, (list, tuple)) or (  # or an nn.ModuleList, a generator; not a
            hasattr(model, "__iter__") and not isinstance(model, (Mapping, np.ndarray))
            and _module_kind(model) is None and (  # model of modules (nn.Sequential: one
                not callable(getattr(model, "state_dict", None))  # recurrent module and
                or any(k.__name__ == "ModuleList" for k in type(model).__mro__))):  # a head)
        parts = list(model)
    else:
        parts = [model]
    if not parts:
        raise ValueError(f"{who}: an empty list of layers")
    layers, acts, whats = [], set(), []
    for part in parts:
        got, act, what = _one(who, part, prefix, nonlinearity, both)
        layers += got
        acts.add(act)
        whats.append(what)
    if len({len(dirs) for dirs in layers}) > 1:
        raise ValueError(f"{who}: bidirectional and one-directional layers in one model")
    names = {name for dirs in layers for name, *_ in dirs}
    if len(names) > 1:
        raise ValueError(f"{who}: layers of different kinds ({', '.join(sorted(names))}); "
                         "build such a stack with gradflow.Stack([...]) and stack_params")
    name = names.pop()
    acts.discard(None)
    biased = {"b" in params[GATES_OF[name][0]] for dirs in layers for *_, params in dirs}
    if len(biased) > 1:
        raise ValueError(f"{who}: layers with biases and layers without (bias=False) in one "
                         "model; build such a stack with gradflow.Stack([...]) and stack_params")
    biases = 2 if biased.pop() else 0  # PyTorch's two, or bias=False
    if name == "rnn":
        if not acts:
            raise ValueError(f"{who}: {_NO_NONLINEARITY}: pass nonlinearity='tanh' (nn.RNN's "
                             "default) or 'relu', or give the module itself")
        if len(acts) > 1:
            raise ValueError(f"{who}: layers with different nonlinearities {sorted(acts)}")
        cell = rnn(nonlinearity=acts.pop(), biases=biases)
    elif nonlinearity is not None:
        raise ValueError(f"{who}: nonlinearity= is a vanilla RNN's; these weights are "
                         f"{'a' if name == 'gru' else 'an'} {name.upper()}'s")
    else:
        cell = (lstm if name == "lstm" else gru)(biases=biases)
    n = len(layers[0])
    for k in range(1, len(layers)):
        reads, emits = layers[k][0][1], n * layers[k - 1][0][2]
        if reads != emits:
            raise ValueError(f"{who}: layer {k} reads {reads} features but layer {k - 1} "
                             f"emits {emits}")
    L = len(layers)
    source = (f"torch {whats[0] if len(set(whats)) == 1 else 'layers'}, {L} "
              f"layer{'s' if L > 1 else ''}" + (", bidirectional" if n == 2 else "")
              + (f", proj_size {layers[0][0][2]}" if "proj" in layers[0][0][3] else ""))
    return TorchLayers(cell, layers[0][0][1], tuple(dirs[0][2] for dirs in layers),
                       [[p for *_, p in dirs] for dirs in layers], source)


__all__ = ["TorchLayers", "torch_layers", "read", "is_state_dict", "GATES", "MODULES",
           "NONLINEARITIES"]
