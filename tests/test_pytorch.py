"""PyTorch's recurrent layers measured as they are (``gradflow.from_torch``).

The reference is PyTorch itself: ``tests/data/torch_rnns.npz`` holds, for an ``nn.LSTM``, an
``nn.GRU`` (sequence first), ``nn.RNN`` with tanh and with ReLU, an LSTM without biases, a
``ModuleList`` of two ``GRUCell`` of different widths, a bidirectional LSTM and GRU and a
bidirectional LSTM with ``proj_size``, the float32 weights of PyTorch's own init, and
PyTorch's float64 outputs, final states and hidden gradient map by autograd
(``tests/data/make_torch_rnns.py``, run with PyTorch 2.13). The suite does not install PyTorch:
modules are also checked as duck-typed stand-ins (PyTorch's class names and ``state_dict``), and
against PyTorch's real modules where it is installed.
"""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradflow
from gradflow import cli, runs
from gradflow.cells import pytorch

DATA = Path(__file__).with_name("data") / "torch_rnns.npz"
CASES = ("lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_nobias", "cells")
BIDIRECTIONAL = ("bilstm", "bigru", "lstmp")  # lstmp: also projected, proj_size 3


def _case(name):
    """``(weights, data)``: the case's state dict (float32 arrays) and PyTorch's numbers."""
    with np.load(DATA) as f:
        arrays = {k[len(name) + 1:]: f[k] for k in f.files if k.startswith(name + "/")}
    data = {k: arrays.pop(k) for k in ("xs", "v", "out", "G", "h_n", "c_n") if k in arrays}
    return arrays, data


def _model(name, weights):
    """What a user passes: the state dict, or one per layer for the ModuleList of cells."""
    if name == "cells":
        return [{k[2:]: v for k, v in weights.items() if k.startswith(f"{l}.")} for l in (0, 1)]
    return weights


def _act(name):
    return name.split("_")[1] if name.startswith("rnn_") else None


def _loss(v):
    return lambda out: jnp.sum(out[:, -1] @ v)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", CASES)
def test_equals_pytorch_float64(name, x64):
    """States, outputs and the hidden gradient map equal PyTorch's (its autograd) to 1e-12."""
    weights, d = _case(name)
    stack, params = gradflow.from_torch(_model(name, weights), nonlinearity=_act(name),
                                        dtype=jnp.float64)
    expect = {"lstm": "lstm", "gru": "gru", "cells": "gru", "lstm_nobias": "lstm"}
    assert stack.cells[0].name == expect.get(name, "rnn")
    assert dict(stack.cells[0].options).get("nonlinearity") == _act(name)
    out = stack.apply(params, d["xs"])
    assert _rel(out.top, d["out"]) < 1e-12
    if "h_n" in d:
        assert _rel(out.h[:, :, -1], d["h_n"]) < 1e-12
    if "c_n" in d:
        assert _rel(out.states["c"][:, :, -1], d["c_n"]) < 1e-12
    res = gradflow.gradient_map(stack, params, d["xs"], loss=_loss(d["v"]))
    assert res.values.shape == d["G"].shape and _rel(res.values, d["G"]) < 1e-12


@pytest.mark.parametrize("name", ["lstm", "rnn_relu", "cells"])
def test_equals_pytorch_float32(name):
    """With 64-bit JAX off (what users have): float32 params, the map within 1e-5."""
    weights, d = _case(name)
    stack, params = gradflow.from_torch(_model(name, weights), nonlinearity=_act(name))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    xs = d["xs"].astype(np.float32)
    res = gradflow.gradient_map(stack, params, xs, loss=_loss(d["v"].astype(np.float32)))
    assert _rel(res.values, d["G"]) < 1e-5
    assert _rel(stack.apply(params, xs).top, d["out"]) < 1e-5


def test_layout_against_the_equations(x64):
    """Each gate's rows of PyTorch's stacked weights land on gradflow's gate: the LSTM's
    ``i, f, g, o``, the GRU's ``r, z, n`` with ``b_in`` and ``b_hn`` kept apart, the two
    biases kept apart (the cell's ``biases=2``), and a layer without biases has none
    (``biases=0``)."""
    w, _ = _case("gru")
    t = pytorch.torch_layers(w)
    H = 5
    for k, g in enumerate("rzn"):
        np.testing.assert_array_equal(t.layers[1][g]["W"], w["weight_ih_l1"][k * H:(k + 1) * H].T)
        np.testing.assert_array_equal(t.layers[1][g]["U"], w["weight_hh_l1"][k * H:(k + 1) * H].T)
    np.testing.assert_array_equal(t.layers[0]["r"]["b"], w["bias_ih_l0"][:H])
    np.testing.assert_array_equal(t.layers[0]["r"]["b_hh"], w["bias_hh_l0"][:H])
    assert dict(t.cell.options)["biases"] == 2 and t.cell.label == "gru:biases=2"
    np.testing.assert_array_equal(t.layers[0]["n"]["b"], w["bias_ih_l0"][2 * H:])
    np.testing.assert_array_equal(t.layers[0]["n"]["b_hn"], w["bias_hh_l0"][2 * H:])
    assert (t.input_size, t.hidden_size, t.source) == (4, (5, 5, 5), "torch state dict, 3 layers")
    w, _ = _case("lstm_nobias")
    t = pytorch.torch_layers(w)
    assert all(set(p[g]) == {"W", "U"} for p in t.layers for g in "ifgo")
    assert dict(t.cell.options)["biases"] == 0 and t.cell.label == "lstm:biases=0"
    np.testing.assert_array_equal(t.layers[0]["o"]["W"], w["weight_ih_l0"][12:].T)


# --- modules, as PyTorch's classes present them (stand-ins: the suite has no PyTorch) ---------


class _Tensor:
    """A stand-in for a tensor: what gradflow reads of one (detach, cpu, numpy, dtype)."""

    def __init__(self, a, dtype=None):
        self.a, self.dtype = a, dtype or f"torch.{a.dtype}"

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.a


def _module(cls_name, weights, **attrs):
    cls = type(cls_name, (), {"state_dict": lambda self: {k: _Tensor(v)
                                                         for k, v in weights.items()}})
    m = cls()
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def test_modules_by_their_class(x64):
    """An ``nn.RNN`` says its nonlinearity (a state dict does not), ``mode`` too; a subclass
    of ``nn.LSTM`` is one; a ``ModuleList``-like iterable of cells is a list; tensors are read
    through ``detach().cpu().numpy()``."""
    w, d = _case("rnn_relu")
    for attrs in ({"nonlinearity": "relu"}, {"mode": "RNN_RELU"}):
        stack, params = gradflow.from_torch(_module("RNN", w, bidirectional=False, **attrs),
                                            dtype=jnp.float64)
        assert dict(stack.cells[0].options)["nonlinearity"] == "relu"
        assert _rel(stack.apply(params, d["xs"]).top, d["out"]) < 1e-12
    with pytest.raises(ValueError, match="nonlinearity='tanh', but the module is relu"):
        gradflow.from_torch(_module("RNN", w, nonlinearity="relu"), nonlinearity="tanh")
    w, d = _case("lstm")
    sub = type("MyLSTM", (type("LSTM", (), {"state_dict": lambda self: w}),), {})()
    stack, params = gradflow.from_torch(sub, dtype=jnp.float64)
    assert _rel(stack.apply(params, d["xs"]).top, d["out"]) < 1e-12
    w, d = _case("cells")
    cells = iter([_module("GRUCell", p) for p in _model("cells", w)])  # not a list
    stack, params = gradflow.from_torch(cells, dtype=jnp.float64)
    assert stack.hidden_size == (6, 3) and _rel(stack.apply(params, d["xs"]).top, d["out"]) < 1e-12
    assert pytorch.torch_layers([_module("GRUCell", p) for p in _model("cells", w)]).source == (
        "torch nn.GRUCell, 2 layers")


def test_a_model_state_dict_and_its_prefix(x64):
    """A whole model's state dict: the one recurrent module is found by its prefix; with
    several, ``prefix=`` picks one and the message names them."""
    w, d = _case("lstm")
    model = {**{f"encoder.lstm.{k}": v for k, v in w.items()},
             "encoder.embed.weight": np.ones((3, 4), np.float32), "head.weight": np.ones(2)}
    stack, params = gradflow.from_torch(model, dtype=jnp.float64)
    assert _rel(stack.apply(params, d["xs"]).top, d["out"]) < 1e-12
    whole = type("Seq2Seq", (), {"state_dict": lambda self: model})()  # the model itself
    stack, params = gradflow.from_torch(whole, dtype=jnp.float64)
    assert _rel(stack.apply(params, d["xs"]).top, d["out"]) < 1e-12
    model.update({f"decoder.{k}": v for k, v in _case("gru")[0].items()})
    with pytest.raises(ValueError, match="the Seq2Seq's state dict holds several recurrent"):
        gradflow.from_torch(whole)
    with pytest.raises(ValueError, match="several recurrent layers' weights, 'encoder.lstm.', "
                                         "'decoder.': pass prefix="):
        gradflow.from_torch(model)
    stack, _ = gradflow.from_torch(model, prefix="decoder.")
    assert stack.cells[0].name == "gru" and stack.layers == 3
    named, p = gradflow.from_torch(model, prefix="decoder")  # the module's name, as torch's
    assert named == stack and all(np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(_)))
    with pytest.raises(ValueError, match="no recurrent weights under prefix='dec'; found"):
        gradflow.from_torch(model, prefix="dec")
    w, _ = _case("cells")  # a ModuleList's state dict: two cells, two prefixes
    with pytest.raises(ValueError, match=r"'0.', '1.': pass prefix= one of them \(on the "
                                         r"command line --prefix\), or \(from Python\) a list"):
        gradflow.from_torch(w)


@pytest.mark.parametrize("change,message", [
    (lambda w: {**w, "weight_ih_l0_reverse": w["weight_ih_l0"]}, "bidirectional layer; a Stack "
     "runs forward in time only: measure such a model with gradflow.torch_model"),
    (lambda w: {**w, "weight_hr_l0": np.ones((3, 5), np.float32)}, r"projections \(proj_size > 0"),
    (lambda w: {k: v for k, v in w.items() if k != "weight_hh_l1"}, "'weight_hh_l1' is missing"),
    (lambda w: {k: v for k, v in w.items() if not k.endswith("l1")}, r"layers \['_l0', '_l2'\]"),
    (lambda w: {**w, "weight_hh_l0": w["weight_hh_l0"][:, :4]}, r"not an LSTM's \(4H rows\)"),
    (lambda w: {**w, "bias_ih_l2": w["bias_ih_l2"][:5]}, r"biases have shapes \(5,\) and \(20,\)"),
    (lambda w: {**w, "weight_ih_l1": w["weight_ih_l1"][:, :3]}, "layer 1 reads 3 features but "
     "layer 0 emits 5"),
    (lambda w: {**w, "weight_ih_l0": w["weight_ih_l0"].astype(np.float16)}, "float16; gradflow "
     "measures in float32 or float64"),
    (lambda w: {**w, "weight_ih_l0": _Tensor(w["weight_ih_l0"], "torch.bfloat16")},
     r"bfloat16; .* \(model.float\(\)\)"),
    (lambda w: {"embed.weight": w["weight_ih_l0"]}, r"no recurrent layer's weights .* its keys: "
     r"\['embed.weight'\]"),
])
def test_refusals_name_the_problem(change, message):
    w, _ = _case("lstm")
    with pytest.raises(ValueError, match=message):
        gradflow.from_torch(change(dict(w)))


def test_refusals_of_arguments():
    w, _ = _case("rnn_tanh")
    with pytest.raises(ValueError, match="does not record its nonlinearity: pass "
                                         "nonlinearity='tanh' .* or 'relu'"):
        gradflow.from_torch(w)
    with pytest.raises(ValueError, match="nonlinearity='gelu'; choose from 'tanh', 'relu'"):
        gradflow.from_torch(w, nonlinearity="gelu")
    lstm, _ = _case("lstm")
    with pytest.raises(ValueError, match="nonlinearity= is a vanilla RNN's; these weights are "
                                         "an LSTM's"):
        gradflow.from_torch(lstm, nonlinearity="relu")
    gru_layer = {k.replace("_l0", ""): v for k, v in _case("gru")[0].items() if k.endswith("_l0")}
    with pytest.raises(ValueError, match=r"layers of different kinds \(gru, lstm\)"):
        gradflow.from_torch([lstm, gru_layer])
    with pytest.raises(ValueError, match="no input_projection"):
        gradflow.from_torch(lstm, input_projection=True)
    with pytest.raises(TypeError, match="expected a PyTorch nn.LSTM, nn.GRU or nn.RNN .*got str"):
        gradflow.from_torch("lstm.pt")
    with pytest.raises(ValueError, match="an empty list of layers"):
        gradflow.from_torch([])
    with pytest.warns(UserWarning, match="the LSTM's dropout=0.5 is not applied: gradflow "
                                         "measures the model as it runs in eval mode"):
        gradflow.from_torch(_module("LSTM", lstm, dropout=0.5))
    for attrs, msg in (({"bidirectional": True}, "a bidirectional LSTM runs back in time"),
                       ({"proj_size": 3}, "proj_size=3 projects h")):
        with pytest.raises(ValueError, match=msg):
            gradflow.from_torch(_module("LSTM", lstm, **attrs))


def test_stack_options_apply(x64):
    """A residual, normalised stack of the same layers: the options reach the Stack, the
    norm's params at identity (PyTorch's layers have none)."""
    w, d = _case("rnn_tanh")
    stack, params = gradflow.from_torch(w, nonlinearity="tanh", residual=True, norm="rms",
                                        dtype=jnp.float64)
    assert stack.residual and stack.norm == "rms"
    np.testing.assert_array_equal(params["norm"][1]["scale"], np.ones(5))
    plain, pp = gradflow.from_torch(w, nonlinearity="tanh", dtype=jnp.float64)
    assert _rel(stack.apply(params, d["xs"]).top, plain.apply(pp, d["xs"]).top) > 1e-3


# --- bidirectional models, for model_map (gradflow.torch_model) ------------------------------


@pytest.mark.parametrize("name", BIDIRECTIONAL + ("lstm", "cells"))
def test_torch_model_equals_pytorch_float64(name, x64):
    """A bidirectional LSTM and GRU, a bidirectional LSTM with projections (and
    one-directional models) as model functions: outputs and the hidden map by ``model_map``
    equal PyTorch's (autograd, one row per layer and direction) to 1e-12; the Jacobian map
    runs on the same taps."""
    weights, d = _case(name)
    t = gradflow.torch_model(_model(name, weights), dtype=jnp.float64)
    L = 2 if name in BIDIRECTIONAL else (3 if name == "lstm" else 2)
    assert t.layers == d["G"].shape[0] == (2 * L if name in BIDIRECTIONAL else L)
    taps = jnp.zeros((t.layers, d["xs"].shape[1], d["xs"].shape[0]))
    assert _rel(t.model(t.params, jnp.asarray(d["xs"]), taps), d["out"]) < 1e-12
    res = gradflow.model_map(t.model, t.params, d["xs"], layers=t.layers, loss=_loss(d["v"]))
    assert _rel(res.values, d["G"]) < 1e-12
    jac = gradflow.model_jacobian_map(t.model, t.params, d["xs"], layers=t.layers)
    assert jac.values.shape == d["G"].shape and np.all(np.isfinite(jac.values))
    if name in BIDIRECTIONAL:
        assert t.rows[:2] == ("l0 fwd", "l0 bwd") and t.source.endswith(
            ", bidirectional" + (", proj_size 3" if name == "lstmp" else ""))
        refused = "projections" if name == "lstmp" else "bidirectional layer; a Stack runs"
        with pytest.raises(ValueError, match=refused + ".* gradflow.torch_model"):
            gradflow.from_torch(weights)


def test_torch_model_float32_and_refusals():
    weights, d = _case("bigru")
    t = gradflow.torch_model(weights)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(t.params))
    res = gradflow.model_map(t.model, t.params, d["xs"].astype(np.float32), layers=t.layers,
                             loss=_loss(d["v"].astype(np.float32)))
    assert _rel(res.values, d["G"]) < 1e-5
    missing = {k: v for k, v in weights.items() if k != "weight_ih_l1_reverse"}
    with pytest.raises(ValueError, match=r"torch_model: reverse directions \['_l0_reverse'\] "
                                         "under '' for layers"):
        gradflow.torch_model(missing)
    deep = {f"{w}_l{l}{d}": np.ones((1, 1 if w == "weight_hh" or l == 0 else 2))
            for l in range(11) for d in ("", "_reverse") for w in ("weight_ih", "weight_hh")}
    assert gradflow.torch_model(deep, nonlinearity="relu").rows[-1] == "l10 bwd"  # (_l10 > _l9)
    one = {k: v for k, v in _case("gru")[0].items() if k.endswith("_l0")}
    layer1 = {k.replace("_l1", "_l0"): v for k, v in weights.items() if "_l1" in k}
    with pytest.raises(ValueError, match="bidirectional and one-directional layers"):
        gradflow.torch_model([one, layer1])


# --- the command line: np.savez of a state dict as --params ---------------------------------


def test_incomplete_state_dicts_and_held_modules(x64):
    """Biases in one of a layer's two places, or in some layers only, are a state dict cut
    short (PyTorch writes both in every layer, or none): refused, not read as zeros. A model
    holding an ``nn.RNN`` (an ``nn.Sequential`` too, or an ``nn.ModuleDict`` with ``prefix=``)
    is read as a whole model, the held module's nonlinearity from the module itself."""
    w, d = _case("lstm")
    with pytest.raises(ValueError, match="layer 1 has bias_ih_l1 but not bias_hh_l1; PyTorch "
                                         "saves both biases or neither"):
        gradflow.from_torch({k: v for k, v in w.items() if k != "bias_hh_l1"})
    with pytest.raises(ValueError, match="layer.s. 0, 2 of the state dict have biases and 1 "
                                         "none"):
        gradflow.from_torch({k: v for k, v in w.items() if not k.startswith("bias_")
                             or not k.endswith("l1")})
    relu, dr = _case("rnn_relu")
    rnn = _module("RNN", relu, nonlinearity="relu")

    def holding(cls_name, children):  # a model's state dict and named_modules, as torch's
        state = {f"{name}.{k}": v for name, m in children.items()
                 for k, v in m.state_dict().items()}
        return type(cls_name, (), {
            "state_dict": lambda self: state,
            "named_modules": lambda self: [("", self), *children.items()],
            "__iter__": lambda self: iter(children.values())})()

    for model in (holding("Model", {"rnn": rnn}),  # a model holding it; a user class named
                  holding("RNN", {"inner": rnn}),  # RNN wrapping one; an nn.Sequential
                  holding("Sequential", {"0": rnn, "1": _module("Linear", {"weight": w[
                      "weight_ih_l0"]})})):
        stack, params = gradflow.from_torch(model, dtype=jnp.float64)
        assert dict(stack.cells[0].options)["nonlinearity"] == "relu"
        assert _rel(stack.apply(params, dr["xs"]).top, dr["out"]) < 1e-12
        with pytest.raises(ValueError, match="nonlinearity='tanh', but the module '.*' is relu"):
            gradflow.from_torch(model, nonlinearity="tanh")
    both = holding("ModuleDict", {"enc": _module("LSTM", w), "dec": rnn})
    stack, params = gradflow.from_torch(both, prefix="enc", dtype=jnp.float64)
    assert stack.cells[0].name == "lstm" and _rel(stack.apply(params, d["xs"]).top,
                                                  d["out"]) < 1e-12
    assert dict(gradflow.from_torch(both, prefix="dec")[0].cells[0].options)[
        "nonlinearity"] == "relu"


def test_torch_save_files_and_prefixed_outputs(capsys, tmp_path):
    """A ``torch.save`` file (a zip holding a pickle) is named as such, with the one line that
    saves it as arrays; each module of a file holding several (``--prefix``) writes its own
    files, and the output names it."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "lstm.pt", "w") as z:  # torch.save's layout
        z.writestr("lstm/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("lstm/data/0", b"\x00" * 16)
    assert cli.main(["heatmap", "--params", str(tmp_path / "lstm.pt")]) == 2
    err = capsys.readouterr().err
    assert "is a torch.save file, which gradflow does not unpickle" in err and \
        "np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})" in err
    w, _ = _case("lstm")
    g, _ = _case("gru")
    np.savez(tmp_path / "encdec.npz", **{f"encoder.{k}": v for k, v in w.items()},
             **{f"decoder.{k}": v for k, v in g.items()})
    for module in ("encoder", "decoder"):
        assert cli.main(["heatmap", "--params", str(tmp_path / "encdec.npz"), "--prefix",
                         module, "--steps", "3", "--batch", "2", "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"trained parameters from {tmp_path / 'encdec.npz'}, module {module}" in out
        res = gradflow.load(next(tmp_path.glob(f"heatmap_*_m-{module}.npz")))
        assert res.config["prefix"] == module and f"({module})" in \
            gradflow.results.origin(res.config)
    assert {p.name.split("_")[1] for p in tmp_path.glob("heatmap_*.png")} == {"lstm", "gru"}


def test_heatmap_of_a_saved_state_dict(capsys, tmp_path):
    """``gradflow heatmap --params lstm.npz`` measures the saved state dict on the Gaussian
    inputs a fresh problem of that stack draws from --seed: equal to the API's map."""
    w, _ = _case("lstm")
    np.savez(tmp_path / "lstm.npz", **w)
    with jax.enable_x64(False):
        stack, params = gradflow.from_torch(w)
        xs = gradflow.problem("lstm", layers=3, steps=4, hidden=5, batch=2, input_size=4,
                              seed=1).xs
        expect = gradflow.gradient_map(stack, params, xs).values
    rc = cli.main(["heatmap", "--params", str(tmp_path / "lstm.npz"), "--steps", "4", "--batch",
                   "2", "--seed", "1", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    data = next(tmp_path.glob("heatmap_lstm_L3*.npz"))
    np.testing.assert_array_equal(gradflow.load(data).values, expect)
    relu, _ = _case("rnn_relu")
    np.savez(tmp_path / "relu.npz", **relu)
    assert cli.main(["heatmap", "--params", str(tmp_path / "relu.npz"), "--out",
                     str(tmp_path)]) == 2
    # a file takes no argument: the message says how to save the nonlinearity in it
    assert "save it beside the weights, np.savez(path, nonlinearity='tanh'" in \
        capsys.readouterr().err
    np.savez(tmp_path / "relu.npz", **relu, nonlinearity="relu")
    stack, _ = runs.load_params(tmp_path / "relu.npz")
    assert dict(stack.cells[0].options)["nonlinearity"] == "relu"
    np.savez(tmp_path / "other.npz", a=np.ones(3))
    assert cli.main(["heatmap", "--params", str(tmp_path / "other.npz")]) == 2
    assert "nor a PyTorch RNN's state dict saved as arrays: np.savez(path, **{k: v.numpy()" in \
        capsys.readouterr().err


def test_a_params_file_builds_no_fresh_parameters(capsys, tmp_path, monkeypatch):
    """``--params FILE`` measures the saved parameters: no fresh stack is initialised (a
    16-layer init is seconds of QR decompositions), and with ``--inputs`` no Gaussian inputs
    are drawn; the map equals the API's on the file's parameters and the given sequences."""
    w, _ = _case("lstm")
    np.savez(tmp_path / "lstm.npz", **w)
    xs = np.random.default_rng(3).normal(size=(2, 4, 4)).astype(np.float32)
    np.save(tmp_path / "xs.npy", xs)
    stack, params = gradflow.from_torch(w)
    expect = gradflow.gradient_map(stack, params, xs).values

    def refuse(*_, **__):
        raise AssertionError("drew what --params and --inputs give")

    monkeypatch.setattr(gradflow.Stack, "init", refuse)
    monkeypatch.setattr("gradflow.problem.gaussian_inputs", refuse)
    rc = cli.main(["heatmap", "--params", str(tmp_path / "lstm.npz"), "--inputs",
                   str(tmp_path / "xs.npy"), "--out", str(tmp_path / "m.png")])
    assert rc == 0, capsys.readouterr().err
    np.testing.assert_allclose(gradflow.load(tmp_path / "m.npz").values, expect, rtol=1e-6)


def test_heatmap_and_gates_of_models_a_stack_does_not_express(capsys, tmp_path):
    """``gradflow heatmap --params`` and ``gradflow gates --params`` of a bidirectional GRU's
    and a projected LSTM's state dicts (np.savez): the API's ``model_map`` and
    ``gates.model_saturation`` of ``gradflow.torch_model`` (checked against PyTorch above) on
    the Gaussian inputs of ``--seed``, one labelled row per layer and direction. Under loss
    last the reverse direction's top row is 0 before the last step by construction
    (``TorchModel.reaches``): not counted as underflow, and said in the summary."""
    from gradflow import gates, plot
    from gradflow.problem import gaussian_inputs

    bigru = _case("bigru")[0]
    lstmp = {k: v for k, v in _case("lstmp")[0].items() if k.endswith("_l0")}  # one direction
    with jax.enable_x64(False):
        for name, w, cell in (("bigru", bigru, "gru"), ("lstmp", lstmp, "lstm")):
            path = tmp_path / f"{name}.npz"
            np.savez(path, **w)
            t = gradflow.torch_model(w)
            xs = gaussian_inputs(1, (3, 5, t.input_size))
            for loss in ("last", "all"):
                expect = gradflow.model_map(t.model, t.params, xs, layers=t.layers, loss=loss)
                rc = cli.main(["heatmap", "--params", str(path), "--steps", "5", "--batch", "3",
                               "--seed", "1", "--loss", loss, "--out",
                               str(tmp_path / f"{name}_{loss}.png")])
                out, err = capsys.readouterr()
                assert rc == 0, err
                got = gradflow.load(tmp_path / f"{name}_{loss}.npz")
                np.testing.assert_allclose(got.values, expect.values, rtol=1e-6, atol=0)
                assert (got.config["rows"], got.config["source"]) == (list(t.rows), t.source)
                assert got.config["model"] == f"torch_{cell}" and got.underflow["values"] == 0
                labels = plot.heatmap(got).axes[0].get_yticklabels()
                assert [x.get_text() for x in labels] == list(t.rows)
                bi = name == "bigru"
                assert ("reverse direction (rows l0 bwd, l1 bwd)" in out) == bi
                assert ("none: this direction runs from t 4 back" in out) == (bi and loss == "last")
                # a plain stack's paths are not named where layers read both directions
                assert not (bi and "off the two axes" in out)
                if bi and loss == "last":  # the entries reaches leaves out are exact zeros
                    assert not np.any(got.values[-1, :-1]) and np.all(got.values[:-1] > 0)
                    assert expect.underflow["values"] == 4  # counted without reaches=
            rc = cli.main(["gates", "--params", str(path), "--steps", "5", "--batch", "3",
                           "--seed", "1", "--out", str(tmp_path / f"{name}_gates.png")])
            out, err = capsys.readouterr()
            assert rc == 0, err
            ref = gates.model_saturation(t.gates, t.params, xs, kinds=t.kinds, retain=t.retain)
            got = gradflow.load(tmp_path / f"{name}_gates.npz")
            assert set(got.arrays) == set(ref.arrays) and got.config["rows"] == list(t.rows)
            for k in ref.arrays:
                np.testing.assert_allclose(got.arrays[k], ref.arrays[k], rtol=1e-6, atol=1e-7,
                                           err_msg=k)
        assert t.source == "torch state dict, 1 layer, proj_size 3"
        # your own sequences (--inputs): the same map as the API's on them
        mine = np.random.default_rng(2).normal(size=(2, 4, 4)).astype(np.float32)
        np.save(tmp_path / "xs.npy", mine)
        assert cli.main(["heatmap", "--params", str(path), "--inputs", str(tmp_path / "xs.npy"),
                         "--out", str(tmp_path / "own.png")]) == 0
        got = gradflow.load(tmp_path / "own.npz")
        np.testing.assert_allclose(got.values, gradflow.model_map(
            t.model, t.params, mine, layers=1).values, rtol=1e-6, atol=0)
        assert got.config["inputs_from"] == str(tmp_path / "xs.npy") and "seed" not in got.config
        np.save(tmp_path / "xs.npy", mine[..., :3])
        assert cli.main(["heatmap", "--params", str(path), "--inputs", str(tmp_path / "xs.npy"),
                         "--out", str(tmp_path / "own.png")]) == 2
        assert "the sequences have 3 features; " in capsys.readouterr().err
        with pytest.raises(ValueError, match=r"reaches must be a boolean \(layers, steps\) = "
                                             r"\(1, 5\) mask"):
            gradflow.model_map(t.model, t.params, xs, layers=1, reaches=np.ones((1, 4), bool))
    for argv, said in (
            (["heatmap", "--wrt", "cell"], "--wrt cell: .* is measured as a model"),
            (["heatmap", "--layers", "3"], "--layers cannot be used with --params"),
            (["heatmap", "--dry-run"], "--dry-run: .* cost is known only once compiled"),
            (["heatmap", "--batch", "100000000", "--steps", "10000"],  # before it is drawn
             "100000000 x 10000 inputs of 4 features needs about .* more than the"),
            (["gates", "--gate", "q"], "has no gate 'q'; its gates: r, z, n"),
            (["gains"], "gradflow heatmap and gradflow gates measure it")):
        assert cli.main([*argv, "--params", str(tmp_path / "bigru.npz"), "--out",
                         str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert re.search(said, err) and "Traceback" not in err, err


def test_real_pytorch_modules(x64):
    """Where PyTorch is installed (``gradflow[bench]``): its modules themselves, tensors and
    all, give the same stacks as their state dicts (the reference data above needs none)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    xs = np.random.default_rng(0).normal(size=(2, 5, 3))
    for model in (torch.nn.LSTM(3, 4, num_layers=2, batch_first=True),
                  torch.nn.GRU(3, 4, num_layers=2, batch_first=True),
                  torch.nn.RNN(3, 4, nonlinearity="relu", batch_first=True)):
        stack, params = gradflow.from_torch(model, dtype=jnp.float64)
        with torch.no_grad():
            out, _ = model.double()(torch.from_numpy(xs))
        assert _rel(stack.apply(params, xs).top, out.numpy()) < 1e-12

    class Model(torch.nn.Module):  # a model holding its LSTM beside a readout
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(4, 2)

    model = Model().double()
    stack, params = gradflow.from_torch(model)
    with torch.no_grad():
        out, _ = model.rnn(torch.from_numpy(xs))
    assert _rel(stack.apply(params, xs).top, out.numpy()) < 1e-12
    bi = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    t = gradflow.torch_model(bi)
    with torch.no_grad():
        out, _ = bi(torch.from_numpy(xs))
    assert _rel(t.model(t.params, xs, jnp.zeros((4, 5, 2))), out.numpy()) < 1e-12


def test_torch_model_gates(x64):
    """``t.gates`` for ``gates.model_saturation``: on a one-directional LSTM the statistics of
    ``gates.saturation`` of the same weights as a Stack (every array, 1e-12); a bidirectional
    GRU's forward rows of layer 0 are that direction's alone (its weights as a one-layer GRU)."""
    from gradflow import gates

    w, d = _case("lstm")
    t = gradflow.torch_model(w, dtype=jnp.float64)
    assert t.kinds == {"i": "sigmoid", "f": "sigmoid", "o": "sigmoid", "g": "tanh"}
    assert t.retain == {"f": 1}
    mine = gates.model_saturation(t.gates, t.params, d["xs"], kinds=t.kinds, retain=t.retain)
    stack, params = gradflow.from_torch(w, dtype=jnp.float64)
    ref = gates.saturation(stack, params, d["xs"])
    assert set(mine.arrays) == set(ref.arrays)
    for k in ref.arrays:  # every statistic (NaN where a gate has none, e.g. a timescale of i)
        np.testing.assert_allclose(mine.arrays[k], ref.arrays[k], rtol=1e-12, atol=0, err_msg=k)
    w, d = _case("bigru")
    t = gradflow.torch_model(w, dtype=jnp.float64)
    g = t.gates(t.params, jnp.asarray(d["xs"]))
    assert set(g) == {"r", "z", "n"} and g["z"].shape == (4, 3, 6, 4)
    fwd0 = gradflow.torch_model({k: v for k, v in w.items() if k.endswith("_l0")},
                                dtype=jnp.float64)
    np.testing.assert_allclose(fwd0.gates(fwd0.params, jnp.asarray(d["xs"]))["z"][0], g["z"][0],
                               rtol=1e-13)


# --- any sizes: PyTorch's documented equations in NumPy, layer by layer ----------------------


def _numpy_torch(weights, kind, L, xs, act="tanh"):
    """PyTorch's ``nn.LSTM``/``GRU``/``RNN`` equations (its documentation's, with its stacked
    weights and two biases), a Python loop in float64: the top layer's outputs (B, T, H)."""
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    x = xs
    for l in range(L):
        w_ih, w_hh = weights[f"weight_ih_l{l}"], weights[f"weight_hh_l{l}"]
        H = w_hh.shape[1]
        b_ih = weights.get(f"bias_ih_l{l}", np.zeros(w_hh.shape[0]))
        b_hh = weights.get(f"bias_hh_l{l}", np.zeros(w_hh.shape[0]))
        h, c, out = np.zeros((x.shape[0], H)), np.zeros((x.shape[0], H)), []
        for t in range(x.shape[1]):
            gi, gh = x[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
            if kind == "lstm":
                i, f, g, o = np.split(gi + gh, 4, axis=1)
                c = sig(f) * c + sig(i) * np.tanh(g)
                h = sig(o) * np.tanh(c)
            elif kind == "gru":
                (ir, iz, in_), (hr, hz, hn) = np.split(gi, 3, axis=1), np.split(gh, 3, axis=1)
                r, z = sig(ir + hr), sig(iz + hz)
                h = (1 - z) * np.tanh(in_ + r * hn) + z * h
            else:
                h = np.tanh(gi + gh) if act == "tanh" else np.maximum(gi + gh, 0)
            out.append(h)
        x = np.stack(out, 1)
    return x


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["lstm", "gru", "rnn_tanh", "rnn_relu"]), L=st.integers(1, 3),
       D=st.integers(1, 4), H=st.integers(1, 5), bias=st.booleans(), seed=st.integers(0, 99))
def test_any_sizes_equal_pytorch_equations(kind, L, D, H, bias, seed):
    """Random sizes (H and D down to 1, with and without biases): the stack from the state
    dict computes PyTorch's documented equations (NumPy, float64) to 1e-12."""
    G = {"lstm": 4, "gru": 3}.get(kind, 1)
    rng = np.random.default_rng(seed)
    w = {}
    for l in range(L):
        w[f"weight_ih_l{l}"] = rng.normal(size=(G * H, D if l == 0 else H))
        w[f"weight_hh_l{l}"] = rng.normal(size=(G * H, H))
        if bias:
            w[f"bias_ih_l{l}"], w[f"bias_hh_l{l}"] = rng.normal(size=(2, G * H))
    xs = rng.normal(size=(2, 4, D))
    act = kind.split("_")[1] if "_" in kind else None
    with jax.enable_x64(True):
        stack, params = gradflow.from_torch(w, nonlinearity=act, dtype=jnp.float64)
        top = np.asarray(stack.apply(params, xs).top)
    ref = _numpy_torch(w, kind.split("_")[0], L, xs, act or "tanh")
    np.testing.assert_allclose(top, ref, rtol=1e-12, atol=1e-13)


def test_float64_weights_asked_for_without_64_bit_jax_are_refused():
    """``dtype="float64"`` with 64-bit JAX off was truncated to float32 with one JAX warning per
    leaf; it is the one message every float64 request gets."""
    w, _ = _case("lstm")
    with jax.enable_x64(False), pytest.raises(ValueError, match="dtype float64 needs 64-bit "
                                                                "JAX"):
        gradflow.from_torch(w, dtype="float64")


def _torch_step(kind, p, x, state):
    """One step of PyTorch's documented equations, its weights as its own tensors."""
    z = lambda w, b: x @ p["weight_ih"].T[:, w] + state[-1] @ p["weight_hh"].T[:, w] + (
        0.0 if "bias_ih" not in p else p["bias_ih"][w] + p["bias_hh"][w])  # noqa: E731
    H = p["weight_hh"].shape[1]
    s = [slice(k * H, (k + 1) * H) for k in range(4)]
    if kind == "lstm":
        i, f, g, o = (jax.nn.sigmoid(z(s[0], 0)), jax.nn.sigmoid(z(s[1], 0)),
                      jnp.tanh(z(s[2], 0)), jax.nn.sigmoid(z(s[3], 0)))
        c = f * state[0] + i * g
        return (c, o * jnp.tanh(c))
    r, u = jax.nn.sigmoid(z(s[0], 0)), jax.nn.sigmoid(z(s[1], 0))
    bi, bh = (0.0, 0.0) if "bias_ih" not in p else (p["bias_ih"][s[2]], p["bias_hh"][s[2]])
    n = jnp.tanh(x @ p["weight_ih"].T[:, s[2]] + bi
                 + r * (state[-1] @ p["weight_hh"].T[:, s[2]] + bh))
    return ((1 - u) * n + u * state[-1],)


@pytest.mark.parametrize("name", ["lstm", "lstm_nobias", "gru"])
def test_parameter_map_is_the_mean_over_pytorchs_own_parameters(name, x64):
    """``wrt="params"`` on PyTorch's weights is the mean of |dL/dθ| over every entry of
    PyTorch's tensors
    (``weight_ih, weight_hh, bias_ih, bias_hh`` of each layer, a copy per step): its two
    biases count as two (the cells' ``biases=2``) and a ``bias=False`` layer has none
    (``biases=0``; zero biases counted as parameters made the map 1.01-6.2x too large).
    Brute force: PyTorch's equations written out, every step's own copy of every tensor, in a
    Python loop."""
    w, d = _case(name)
    kind = "gru" if name == "gru" else "lstm"
    stack, params = gradflow.from_torch(w, dtype=jnp.float64)
    xs = jnp.asarray(d["xs"], jnp.float64)[:, :4]
    B, T, _ = xs.shape
    L = stack.layers
    c = jnp.asarray(np.random.default_rng(1).normal(size=stack.widths[-1]))
    loss = lambda out: jnp.sum(out[:, -1] @ c)  # noqa: E731
    layer = lambda l: {k[:-3]: jnp.asarray(v, jnp.float64) for k, v in w.items()  # noqa: E731
                       if k.endswith(f"_l{l}")}
    copies = [[layer(l) for _ in range(T)] for l in range(L)]

    def brute(copies):
        below = [xs[:, t] for t in range(T)]
        for l in range(L):
            H = copies[l][0]["weight_hh"].shape[1]
            state = tuple(jnp.zeros((B, H)) for _ in range(2 if kind == "lstm" else 1))
            outs = []
            for t in range(T):
                state = _torch_step(kind, copies[l][t], below[t], state)
                outs.append(state[-1])
            below = outs
        return loss(jnp.stack(below, axis=1))

    grads = jax.grad(brute)(copies)
    expect = np.array([[np.mean(np.concatenate([np.abs(np.ravel(g)) for g in grads[l][t].values()]))
                        for t in range(T)] for l in range(L)])
    got = gradflow.gradient_map(stack, params, xs, loss=loss, wrt="params").values
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-10)


def test_a_file_with_an_rnn_and_another_module_serves_both(tmp_path):
    """A seq2seq's file saves its vanilla RNN decoder's nonlinearity beside every module's
    weights: --prefix picks either (the GRU encoder was refused: "nonlinearity= is a vanilla
    RNN's"), each as its own state dict reads."""
    g, _ = _case("gru")
    r, _ = _case("rnn_relu")
    np.savez(tmp_path / "s2s.npz", nonlinearity="relu", **{f"encoder.{k}": v for k, v in g.items()},
             **{f"decoder.{k}": v for k, v in r.items()})
    enc, p_enc = runs.load_params(tmp_path / "s2s.npz", prefix="encoder")
    dec, _ = runs.load_params(tmp_path / "s2s.npz", prefix="decoder")
    assert enc.cells[0].name == "gru" and dict(dec.cells[0].options)["nonlinearity"] == "relu"
    alone = gradflow.from_torch(g)[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p_enc),
                                                    jax.tree_util.tree_leaves(alone)))


def test_biases_two_keep_what_a_bias_scheme_sets_and_torch_model_checks_its_dtype():
    """``biases=2`` under ``init="torch"`` draws ``b_hh`` as PyTorch does, but where
    ``forget_bias_init`` or a bias scheme sets ``b``, ``b_hh`` is 0 so that the bias in use is
    what was set (a drawn b_hh was added to it); a held module's dropout is warned about at
    the caller's line; torch_model refuses float64 without 64-bit JAX as from_torch does."""
    from gradflow.cells.base import gate_bias

    drawn = gradflow.cells.get("lstm", init="torch", biases=2).init(jax.random.key(0), 3, 4)
    assert np.all(np.asarray(drawn["i"]["b_hh"]) != 0)
    for kw in (dict(init="torch", forget_bias_init=3.0), dict(init="torch+chrono")):
        p = gradflow.cells.get("lstm", biases=2, **kw).init(jax.random.key(0), 3, 4)
        one = gradflow.cells.get("lstm", **kw).init(jax.random.key(0), 3, 4)
        np.testing.assert_array_equal(gate_bias(p["f"]), one["f"]["b"])
    with pytest.raises(ValueError, match="biases=2 lays out the biases of PyTorch's plain "
                                         "layers; with aux='master' the cell is none of them"):
        gradflow.cells.get("lstm", aux="master", biases=2)
    w, _ = _case("lstm")
    holder = type("Model", (), {"state_dict": lambda self: {f"rnn.{k}": v for k, v in w.items()},
                                "named_modules": lambda self: [
                                    ("", self), ("rnn", _module("LSTM", w, dropout=0.25))]})()
    with pytest.warns(UserWarning, match="dropout=0.25 is not applied") as caught:
        gradflow.from_torch(holder)
    assert caught[0].filename == __file__
    with jax.enable_x64(False), pytest.raises(ValueError, match="float64 needs 64-bit JAX"):
        gradflow.torch_model(w, dtype="float64")
