"""Gate statistics of a user's own model (``gradflow.gates.model_saturation``): equal to
``gates.saturation`` on a Stack written as such a model, equal to NumPy on the activations of a
model with tanh, time and other gates (non-finite entries included), its figures and edges."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import gates, plot
from gradflow.results import NonFiniteForwardWarning, NonFiniteWarning, load, make_result

from test_gates import reference_of

pytestmark = pytest.mark.child  # in-process work: the child lane runs it (tests/conftest.py)

STACK = gradflow.Stack("lstm", layers=3, input_size=4, hidden_size=6)


def stack_gates(params, xs):
    """gradflow's own LSTM stack as a user's model: its gate activations, (L, B, T, H)."""
    return STACK.apply(params, xs, gates=True).gates


def assert_same(got: dict, want: dict, rtol):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=0, equal_nan=True, err_msg=k)


def test_a_stack_as_a_model_gives_saturation(x64):
    params = STACK.init(jax.random.key(0), jnp.float64)
    xs = 2.0 * jax.random.normal(jax.random.key(1), (5, 7, 4), jnp.float64)
    cell = STACK.cells[0]
    got = gates.model_saturation(stack_gates, params, xs, kinds=cell.kinds,
                                 retain=dict(cell.retain), eps=0.1, bins=8)
    want = gates.saturation(STACK, params, xs, eps=0.1, bins=8)
    assert_same(got.arrays, want.arrays, rtol=1e-12)
    assert got.config["model"] == "stack_gates" and got.config["gate_kinds"] == cell.kinds
    assert (got.config["layers"], got.config["steps"], got.config["batch"]) == (3, 7, 5)


MIXED = gradflow.Stack(["gru", "star", "gru"], layers=3, input_size=4, hidden_size=6)


def mixed_gates(params, xs):
    """A stack of GRU and STAR layers as a user's model: every gate in every layer, NaN in the
    layers whose cell has no such gate."""
    return MIXED.apply(params, xs, gates=True).gates


def test_gates_of_some_layers_only_equal_the_stack_of_different_cells(x64):
    """``layers={gate: [l, ...]}``: a gate read only in the layers that have it, as
    ``gates.saturation`` reads a stack whose layers report different gates."""
    params = MIXED.init(jax.random.key(0), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (5, 7, 4), jnp.float64)
    lay = gates.gate_layout(MIXED)
    with warnings.catch_warnings():  # the NaN of layers without a gate are no overflow
        warnings.simplefilter("error")
        want = gates.saturation(MIXED, params, xs, eps=0.1, bins=8)
        got = gates.model_saturation(mixed_gates, params, xs, kinds=lay.kinds,
                                     retain=lay.retain, bins=8, eps=0.1,
                                     layers={g: list(ls) for g, ls in lay.layers.items()})
    assert_same(got.arrays, want.arrays, rtol=1e-12)
    assert np.isnan(want["mean/k"][[0, 2]]).all() and np.isnan(want["mean/r/unit"][1]).all()
    assert want.nonfinite["mean/k"] == got.nonfinite["mean/k"] == 0
    assert want.total_nonfinite == got.total_nonfinite == 0 and "non-finite" not in repr(want)
    # ... also in a result re-made from its arrays and config (a slice, a mean over seeds)
    assert make_result(want.kind, want.arrays, want.config).total_nonfinite == 0
    # a NaN in a layer that reports the gate is counted, and warned about
    bad = {**want.arrays, "mean/k": np.where([[False], [True], [False]], np.nan,
                                             want["mean/k"])}
    with pytest.warns(NonFiniteWarning, match=r"mean/k: 7"):
        assert make_result(want.kind, bad, want.config).nonfinite["mean/k"] == 7
    assert got.config["gate_layers"] == want.config["gate_layers"] == {
        "r": [0, 2], "z@gru": [0, 2], "n": [0, 2], "k": [1], "z@star": [1]}
    # whatever the model puts in the other layers is read nowhere; negative indices count down
    zeros = lambda p, x: {g: jnp.nan_to_num(a, nan=0.3) for g, a in mixed_gates(p, x).items()}
    again = gates.model_saturation(zeros, params, xs, kinds=lay.kinds, retain=lay.retain,
                                   layers={"r": [0, -1], "z@gru": [0, 2], "n": [0, 2],
                                           "k": [1], "z@star": [-2]}, eps=0.1, bins=8)
    assert_same(again.arrays, want.arrays, rtol=1e-12)
    for bad, match in (({"x": [0]}, "layers names gate 'x'"), ({"k": []}, "non-empty list"),
                       ({"k": [3]}, r"the model has 3 layers \(0..2\)"), ([0], "must be a dict")):
        with pytest.raises((ValueError, TypeError), match=match):
            gates.model_saturation(mixed_gates, params, xs, kinds=lay.kinds, layers=bad)


def odd_gates(p, xs):
    """Gates no built-in cell has: a tanh gate, a time gate (an openness in [0, 1] with exact
    zeros) and an 'other' one, over two layers, with a NaN where an input is large."""
    a = jnp.tanh(xs @ p["A"])  # (B, T, H)
    k = jnp.maximum(jnp.sin(xs @ p["K"]), 0.0)
    o = jax.nn.sigmoid(xs @ p["O"]) ** 2
    o = jnp.where(xs[..., :1] > 1.5, jnp.nan, o)
    stack = lambda v: jnp.stack([v, v[:, ::-1] * 0.9])  # noqa: E731 (L = 2)
    return {"cand": stack(a), "k": stack(k), "keep": stack(o)}


def test_tanh_time_and_other_gates_equal_numpy(x64):
    k = iter(jax.random.split(jax.random.key(2), 4))
    p = {n: jax.random.normal(next(k), (3, 5), jnp.float64) for n in ("A", "K", "O")}
    xs = jax.random.normal(next(k), (6, 9, 3), jnp.float64)
    kinds = {"cand": "tanh", "k": "time", "keep": "other"}
    retain = {"keep": -1}
    with pytest.warns(NonFiniteForwardWarning, match="gate values are not finite"):
        got = gates.model_saturation(odd_gates, p, xs, kinds=kinds, retain=retain, eps=0.05,
                                     bins=10, update_threshold=1e-3)
    acts = {g: np.asarray(a) for g, a in odd_gates(p, xs).items()}
    assert np.isnan(acts["keep"]).any() and (acts["k"] == 0).any()
    assert_same(got.arrays, reference_of(acts, kinds, retain, 0.05, bins=10, thr=1e-3),
                rtol=1e-12)
    assert got.arrays["nonfinite/keep/pooled"] == np.isnan(acts["keep"]).sum()


def test_float32_as_users_run_it():
    params = STACK.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (4, 5, 4))
    cell = STACK.cells[0]
    got = gates.model_saturation(stack_gates, params, xs, kinds=cell.kinds,
                                 retain=dict(cell.retain))
    acts = {g: np.asarray(a, np.float64) for g, a in stack_gates(params, xs).items()}
    want = reference_of(acts, cell.kinds, dict(cell.retain), gates.EPS)
    for k in want:
        np.testing.assert_allclose(got.arrays[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
    assert got.config["dtype"] == "float32"


def test_drawn_saved_and_titled_by_the_model(tmp_path):
    params = STACK.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (4, 5, 4))
    cell = STACK.cells[0]
    res = gates.model_saturation(stack_gates, params, xs, kinds=cell.kinds,
                                 retain=dict(cell.retain), meta={"weights": "step 100"})
    fig = plot.gates_figure(res)
    assert fig._suptitle.get_text().startswith("stack_gates")
    hist = plot.gate_histograms(res, "g")
    assert "stack_gates" in hist.axes[0].get_title()
    back = load(res.save(tmp_path / "g.npz"))
    assert_same(back.arrays, res.arrays, rtol=0)
    assert back.config["weights"] == "step 100" and back.config["retain"] == {"f": 1}


def test_bad_input_gets_one_clear_message():
    params = STACK.init(jax.random.key(0))
    xs = jnp.ones((2, 3, 4))
    kinds = STACK.cells[0].kinds
    with pytest.raises(ValueError, match="kind 'refined' is not one the activations alone give"):
        gates.model_saturation(stack_gates, params, xs, kinds={**kinds, "g": "refined"})
    with pytest.raises(ValueError, match="kinds must name every gate the model returns"):
        gates.model_saturation(stack_gates, params, xs, kinds={"f": "sigmoid"})
    with pytest.raises(TypeError, match="kinds must be a dict"):
        gates.model_saturation(stack_gates, params, xs, kinds=["f"])
    with pytest.raises(ValueError, match=r"retain\['f'\] must be 1 .* or -1 .*, got 2"):
        gates.model_saturation(stack_gates, params, xs, kinds=kinds, retain={"f": 2})
    with pytest.raises(ValueError, match="retain names 'x', which is not a reported gate"):
        gates.model_saturation(stack_gates, params, xs, kinds=kinds, retain={"x": 1})
    for kind in ("tanh", "time"):  # as the adapters refuse it (its "timescale" was returned)
        with pytest.raises(ValueError, match=rf"retain\['g'\]: a '{kind}' gate is no fraction "
                                             "of the state kept"):
            gates.model_saturation(stack_gates, params, xs, kinds={**kinds, "g": kind},
                                   retain={"g": 1})
    with pytest.raises(ValueError, match=r"\{gate: \(L, B, T, H\)\} activations of one shape"):
        gates.model_saturation(lambda p, x: {"f": x}, params, xs, kinds={"f": "sigmoid"})
    with pytest.raises(ValueError, match=r"\{gate: \(L, B, T, H\)\} activations of one shape"):
        gates.model_saturation(lambda p, x: x, params, xs, kinds={"f": "sigmoid"})
    with pytest.raises(ValueError, match="NaN or inf"):
        gates.model_saturation(stack_gates, params, xs.at[0, 0, 0].set(jnp.inf), kinds=kinds)
    with pytest.raises(ValueError, match="model.*failed: .*boom"):
        gates.model_saturation(lambda p, x: (_ for _ in ()).throw(RuntimeError("boom")), params,
                               xs, kinds=kinds)
    with pytest.raises(ValueError, match="eps must lie in"):
        gates.model_saturation(stack_gates, params, xs, kinds=kinds, eps=0.7)
    with pytest.raises(TypeError, match="couples_batch must be True or False"):
        gates.model_saturation(stack_gates, params, xs, kinds=kinds, couples_batch="no")
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda x: gates.model_saturation(stack_gates, params, x, kinds=kinds).arrays)(xs)


def test_a_request_larger_than_the_machine_is_refused(monkeypatch):
    from gradflow import cost
    monkeypatch.setattr(cost, "available_memory", lambda device=None: 1000)
    with pytest.raises(ValueError, match="model_saturation .*needs about .* more than the"):
        gates.model_saturation(stack_gates, STACK.init(jax.random.key(0)),
                               jnp.ones((2, 3, 4)), kinds=STACK.cells[0].kinds)


def test_couples_batch_false_is_checked_for_gates():
    """A model whose gates normalise over the batch, declared independent: refused."""
    def mixing(p, xs):
        a = jax.nn.sigmoid(xs @ p)
        return {"f": (a - a.mean(axis=0))[None]}  # (1, B, T, H)
    xs = jax.random.normal(jax.random.key(0), (4, 3, 2))
    with pytest.raises(ValueError, match="couples_batch=False, but one example's gates depend"):
        gates.model_saturation(mixing, jnp.eye(2), xs, kinds={"f": "sigmoid"},
                               couples_batch=False)
    ok = lambda p, xs: {"f": jax.nn.sigmoid(xs @ p)[None]}  # noqa: E731
    res = gates.model_saturation(ok, jnp.eye(2), xs, kinds={"f": "sigmoid"}, couples_batch=False)
    assert res.kind == "gate_stats"


def test_values_outside_the_declared_kinds_range_are_said():
    """A tanh gate declared "sigmoid" gave a negative mean slope and a negative timescale with
    no word; it is still measured as declared (counted in outside/), with a warning naming it."""
    def model(p, xs):
        a = jnp.tanh(xs[None] @ p)  # (1, B, T, H) in [-1, 1]
        return {"f": a, "ok": jax.nn.sigmoid(xs[None] @ p)}
    p = jax.random.normal(jax.random.key(0), (3, 4))
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    with pytest.warns(UserWarning, match=r"gate 'f' is declared 'sigmoid', but \d+ of its values "
                                         r"lie outside that kind's range \[0, 1\] \(\d+ below, "
                                         r"\d+ above\).*kinds=\{'f': 'tanh'\}") as seen:
        res = gates.model_saturation(model, p, xs, kinds={"f": "sigmoid", "ok": "sigmoid"},
                                     retain={"f": 1})
    assert not any("'ok'" in str(w.message) for w in seen)
    below = int(res.arrays["outside/f/pooled"][0])
    assert below == int((np.asarray(model(p, xs)["f"]) < 0).sum()) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared right: not a word
        gates.model_saturation(model, p, xs, kinds={"f": "tanh", "ok": "sigmoid"})
