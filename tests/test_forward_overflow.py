"""A forward pass that overflows: the measurements say so instead of reporting false zeros.

An IndRNN with recurrent weights up to 3 (``u_max=3``) and ReLU grows its states by up to 3x
per step: inf within about 80 steps, then NaN (inf - inf). Backpropagating from the NaN loss
through NaN states gives exact zeros (a ReLU's derivative at NaN is 0), which the maps used to
report as 799 "underflow" entries of 800, a vanishing gradient that was never measured.
Independent checks: the forward pass is located with a brute-force scan of the states; where
a loss or a target does not depend on the overflowed part, the measurement equals the same
one on the truncated sequence (nothing after the read step can matter).
"""
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import jacobian as J
from gradflow.cli import main
from gradflow.results import NonFiniteForwardWarning, NonFiniteWarning

# in-process work (29 s): the child lane runs it, as test_cost.py's (tests/conftest.py)
pytestmark = pytest.mark.child


def counted():
    """The result's own warning that counts its non-finite entries (besides the forward's)."""
    return pytest.warns(NonFiniteWarning, match="non-finite entries")


L, T, H, B, D = 3, 120, 16, 3, 4


@pytest.fixture(scope="module")
def exploding():
    stack = gradflow.Stack("indrnn", L, D, H, cell_options={"u_max": 3.0})
    params = stack.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    return stack, params, xs


def _first_bad(stack, params, xs, layers=L, steps=T):
    """Brute force: the earliest step, then lowest layer, where any state of any example is not
    finite; and the (L, T) finite mask."""
    states = stack.apply(params, xs).states
    finite = np.ones((layers, steps), bool)
    for v in states.values():
        v = np.asarray(v)
        for l in range(layers):
            for t in range(steps):
                finite[l, t] &= bool(np.isfinite(v[l, :, t]).all())
    bad = [(t, l) for l in range(layers) for t in range(steps) if not finite[l, t]]
    t, l = min(bad)
    return l, t, finite


def _where(stack, params, xs, layers=L, steps=T):
    """The words the warnings use, from the brute-force scan: how many positions are not
    finite, the earliest (step, then layer) and, where it differs, the lowest (layer, then
    step)."""
    l, t, finite = _first_bad(stack, params, xs, layers, steps)
    l2, t2 = min((l_, t_) for l_ in range(layers) for t_ in range(steps) if not finite[l_, t_])
    text = (f"the states are not finite at {(~finite).sum()} of {finite.size} (layer, step) "
            f"positions, the earliest at layer {l}, step {t} (h)")
    return text + ("" if (l2, t2) == (l, t) else f", the lowest at layer {l2}, step {t2} (h)")


def test_the_premise_the_raw_map_reports_false_zeros(exploding):
    """Without the check, the gradient of the NaN loss is mostly exact zeros."""
    stack, params, xs = exploding
    l, t, finite = _first_bad(stack, params, xs)
    assert 0 < t < T - 1 and not finite[:, -1].any()
    loss_fn, _ = J._loss("last", stack, xs, 0)
    value, raw = J._state_map(stack, params, xs, loss_fn, "h")
    assert np.isnan(float(value))
    assert (np.asarray(raw) == 0).mean() > 0.9


def test_gradient_map_of_a_nan_loss_is_nan_and_says_where(exploding):
    stack, params, xs = exploding
    text = _where(stack, params, xs)
    # the top layer (larger inputs) overflows first in time; the bottom one later
    assert f"the earliest at layer {L - 1}" in text and "the lowest at layer 0" in text
    where = re.escape(text)
    for wrt in ("hidden", "params"):
        with counted(), pytest.warns(NonFiniteForwardWarning,
                          match=f"the loss is nan \\({where}\\): .*every entry of the map "
                                "is NaN"):
            res = gradflow.gradient_map(stack, params, xs, loss="last", wrt=wrt)
        assert np.isnan(res.values).all()
        assert res.nonfinite["values"] == L * T and res.underflow.get("values", 0) == 0


def test_a_loss_before_the_overflow_is_measured_as_on_the_truncated_sequence(exploding):
    """A callable loss reading step 20 only: its map is finite and equals the map on the first
    21 steps (zero after step 20: nothing there reaches the loss)."""
    stack, params, xs = exploding
    s = 20
    _, t, finite = _first_bad(stack, params, xs)
    assert finite[:, : s + 1].all() and t > s + 1
    w = jax.random.normal(jax.random.key(2), (H,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteForwardWarning)
        full = gradflow.gradient_map(stack, params, xs, loss=lambda top: jnp.mean(top[:, s] @ w))
        short = gradflow.gradient_map(stack, params, xs[:, : s + 1],
                                      loss=lambda top: jnp.mean(top[:, s] @ w))
    assert np.isfinite(full.values).all()
    np.testing.assert_allclose(full.values[:, : s + 1], short.values, rtol=1e-5)
    assert (full.values[:, s + 1:] == 0).all()


def test_jacobian_map_to_a_nan_target_is_nan_where_it_reaches(exploding):
    stack, params, xs = exploding
    where = re.escape(_where(stack, params, xs))
    with counted(), pytest.warns(NonFiniteForwardWarning,
                                 match=f"target state h\\[1, {T - 1}\\] is not finite "
                                       f"\\({where}\\)"):
        res = gradflow.jacobian_map(stack, params, xs, target=(1, -1))
    assert np.isnan(res.values[:2]).all()
    assert (res.values[2] == 0).all()  # the top layer never reaches h[1, T-1]: not NaN
    # a target before the overflow: finite, and the same as on the truncated sequence
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteForwardWarning)
        early = gradflow.jacobian_map(stack, params, xs, target=(-1, 20))
        short = gradflow.jacobian_map(stack, params, xs[:, :21], target=(-1, 20))
    np.testing.assert_allclose(early.values[:, :21], short.values, rtol=1e-5)
    assert (early.values[:, 21:] == 0).all()


def test_jacobian_map_leaves_out_only_the_examples_whose_target_overflowed():
    """Per-example Jacobians are independent: two examples whose inputs are 1e30 overflow in
    the first steps, the third stays finite; the map is the third one's alone (independent:
    the same map of that example by itself), with a warning naming the other two."""
    stack = gradflow.Stack("indrnn", L, D, H, cell_options={"u_max": 3.0})
    params = stack.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (B, 60, D))
    xs = xs.at[0].multiply(1e30).at[2].multiply(1e30)
    alone = gradflow.jacobian_map(stack, params, xs[1:2], target=(1, -1), spectra_at=[(0, 30)])
    assert alone.nonfinite == {"values": 0, "spectra": 0} and (alone.values[:2] > 0).all()
    with counted(), pytest.warns(NonFiniteForwardWarning,
                                 match=r"h\[1, 59\] is not finite in 2 of 3 examples \(0, 2; the "
                                       r"states are not finite .*the mean over the other 1"):
        mixed = gradflow.jacobian_map(stack, params, xs, target=(1, -1), spectra_at=[(0, 30)])
    assert mixed.target_finite.tolist() == [False, True, False]
    np.testing.assert_allclose(mixed.values, alone.values, rtol=1e-6)
    np.testing.assert_allclose(mixed.spectra[:, 1], alone.spectra[:, 0], rtol=1e-6)
    assert np.isnan(mixed.spectra[:, [0, 2]]).all()
    with pytest.warns(NonFiniteForwardWarning, match="not finite in 2 of 3 examples"):
        probe = gradflow.jacobian_map(stack, params, xs, target=(1, -1), method="probe")
    assert probe.nonfinite == {"values": 0, "stderr": 0}
    reach = alone.values > 0
    assert (probe.values[reach] > 0).all() and (probe.values[~reach] == 0).all()
    ratio = probe.values[reach] / alone.values[reach]  # 16 probes of one example's Jacobians
    assert 0.3 < ratio.min() and ratio.max() < 3


def test_local_gains_are_nan_exactly_where_a_step_or_its_inputs_overflowed(exploding):
    stack, params, xs = exploding
    _, _, finite = _first_bad(stack, params, xs)
    ok = finite.copy()
    ok[:, 1:] &= finite[:, :-1]
    ok[1:] &= finite[:-1]
    with counted(), pytest.warns(NonFiniteForwardWarning,
                      match="local_gains: " + re.escape(_where(stack, params, xs))):
        res = gradflow.local_gains(stack, params, xs)
    short = gradflow.local_gains(stack, params, xs[:, :20])
    for k in ("vertical_rms", "vertical_spectral", "temporal_rms", "temporal_spectral"):
        v = res.arrays[k]
        assert np.isnan(v[~ok]).all() and np.isfinite(v[ok]).all(), k
        np.testing.assert_allclose(v[:, :20], short.arrays[k], rtol=1e-5)


def test_gate_statistics_of_an_overflowed_forward_say_so():
    """A refined additive MGU at input scale 1 overflows by the top layers (Cheng et al.'s
    grid, README): the non-finite gates are counted (against a count of the raw activations)
    and the warning says where the forward pass first left the finite numbers."""
    pr = gradflow.problem("refined_mgu", layers=8, steps=10, hidden=32, batch=8, seed=0,
                          mode="add")
    gates = gradflow.gates.activations(pr.stack, pr.params, pr.xs)
    bad = {g: int((~np.isfinite(np.asarray(a))).sum()) for g, a in gates.items()}  # f and n
    n_bad = sum(bad.values())
    where = re.escape(_where(pr.stack, pr.params, pr.xs, layers=8, steps=10))
    assert bad["f"] > 0
    with counted(), pytest.warns(NonFiniteForwardWarning,
                                 match=f"gates.saturation: {n_bad} gate values are not finite "
                                       f"\\({where}\\)"):
        stats = gradflow.gates.saturation(pr.stack, pr.params, pr.xs)
    assert {g: int(stats.arrays[f"nonfinite/{g}/pooled"]) for g in gates} == bad
    # the shares and means are over the finite gates (each layer's, then all of them)
    a = np.asarray(gates["f"], np.float64)
    ok = np.isfinite(a)
    sat = ((a < 0.05) | (a > 0.95)) & ok
    np.testing.assert_allclose(stats.arrays["saturated/f/pooled"], sat.sum() / ok.sum(),
                               rtol=1e-6)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(stats.arrays["saturated/f/layer"],
                                   sat.sum(axis=(1, 2, 3)) / ok.sum(axis=(1, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose(stats.arrays["mean/f"], np.where(ok, a, 0).sum(axis=(1, 3))
                                   / ok.sum(axis=(1, 3)), rtol=1e-5, equal_nan=True)
    assert 0 < ok.sum() < ok.size and np.isfinite(stats.arrays["mean/f/pooled"])


def test_a_finite_forward_pass_warns_nothing():
    stack = gradflow.Stack("indrnn", L, D, H)
    params = stack.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (B, 12, D))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(gradflow.gradient_map(stack, params, xs).values).all()
        assert np.isfinite(gradflow.local_gains(stack, params, xs).arrays["temporal_rms"]).all()
        lstm = gradflow.problem("lstm", layers=2, steps=6, hidden=8, batch=2)
        gradflow.gates.saturation(lstm.stack, lstm.params, lstm.xs)


def test_the_cli_says_why_the_map_is_nan(tmp_path, capsys):
    code = main(["heatmap", "--cell", "indrnn", "--option", "u_max=3", "--layers", "3",
                 "--steps", "200", "--hidden", "16", "--batch", "3",
                 "--out", str(tmp_path / "m.png")])
    out, err = capsys.readouterr()
    assert code == 0
    assert err.count("\n") == 1 and err.startswith(
        "gradflow heatmap: warning: gradient_map: the loss is nan (the states are not finite "
        "at "), err
    assert "non-finite entries: 600 of 600" in out and "underflow entries: 0 of 600" in out


def test_a_grid_of_maps_says_which_cell_overflowed_once():
    """gradient_grid (and `gradflow compare`): one warning per overflowing cell, named by its
    label, not one per loss without a name; the finite cell's maps warn nothing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grid = gradflow.experiments.gradient_grid(["lstm", "indrnn:u_max=3"], layers=3,
                                                  steps=120, hidden=16, batch=3, wrt="hidden")
    said = [str(w.message) for w in caught if issubclass(w.category, NonFiniteForwardWarning)]
    assert len(said) == 1 and said[0].startswith("cell indrnn:u_max=3: gradient_map: ")
    for loss in ("last", "all"):
        assert np.isnan(gradflow.experiments.panel(grid, loss, "indrnn:u_max=3").values).all()
        assert np.isfinite(gradflow.experiments.panel(grid, loss, "lstm").values).all()


def test_a_sweep_names_the_seeds_whose_forward_overflowed():
    """At 82 steps some seeds' IndRNN states overflow and others do not: the warning names
    exactly the seeds whose own gradient_map (computed alone) warns of a non-finite loss, and
    only those seeds' maps are NaN; a finite cell in the same sweep warns nothing."""
    seeds, kw = range(6), dict(layers=3, steps=82, hidden=16, batch=3, input_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gradflow.sweep.sweep(["indrnn:u_max=3", "lstm"], seeds, **kw)
    said = [str(w.message) for w in caught if issubclass(w.category, NonFiniteForwardWarning)]
    overflowed = []
    for s in seeds:
        pb = gradflow.problem("indrnn", seed=s, u_max=3.0, **kw)
        with warnings.catch_warnings(record=True) as alone:
            warnings.simplefilter("always")
            gradflow.gradient_map(pb.stack, pb.params, pb.xs)
        if any(issubclass(w.category, NonFiniteForwardWarning) for w in alone):
            overflowed.append(s)
    assert 0 < len(overflowed) < len(seeds)  # the premise: a mixed sweep
    assert said == [f"sweep: indrnn:u_max=3: the loss is not finite for {len(overflowed)} of "
                    f"6 seeds (the forward pass overflowed): every entry of the maps of seeds "
                    f"{', '.join(map(str, overflowed))} is NaN (gradflow.gradient_map on one "
                    "seed's problem says where the states are not finite)"]
    maps = np.asarray(out["indrnn:u_max=3"].values)
    assert all(np.isnan(maps[s]).all() == (s in overflowed) for s in seeds)
    assert np.isfinite(np.asarray(out["lstm"].values)).all()


def test_an_infinite_parameter_is_named_where_the_forward_pass_stays_finite():
    """An infinite forget bias: the sigmoid reads 1, every state and map entry is finite, and
    the map was measured without a word."""
    pr = gradflow.problem("lstm", layers=2, steps=4, hidden=8, batch=2)
    params = jax.tree_util.tree_map(lambda a: a, pr.params)
    params["layers"][0]["f"]["b"] = params["layers"][0]["f"]["b"].at[3].set(jnp.inf)
    with pytest.warns(UserWarning, match=r"the params hold 1 non-finite value \(NaN or inf\), "
                                         r"the first in params\['layers'\]\[0\]\['f'\]\['b'\]"):
        res = gradflow.gradient_map(pr.stack, params, pr.xs)
    assert np.isfinite(res.values).all()


def test_the_warning_names_non_finite_params():
    """A diverged run's parameters (a NaN weight): the warning counts the non-finite values
    and names the first leaf, besides where the states left the finite numbers."""
    pr = gradflow.problem("lstm", layers=2, steps=4, hidden=8, batch=2)
    params = jax.tree_util.tree_map(lambda a: a, pr.params)
    w = params["layers"][1]["f"]["W"]
    params["layers"][1]["f"]["W"] = w.at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    with pytest.warns(Warning) as rec:  # (the map's own count, the params' too)
        res = gradflow.gradient_map(pr.stack, params, pr.xs)
    forward = [w for w in rec if issubclass(w.category, NonFiniteForwardWarning)]
    assert [str(w.message) for w in rec if w.category is UserWarning] == [
        "gradflow: the params hold 2 non-finite values (NaN or inf), the first in params"
        "['layers'][1]['f']['W']; measured as they are (a sigmoid of inf is 1: the forward "
        "pass may stay finite)"]
    assert len(forward) == 1
    text = str(forward[0].message)
    assert "earliest at layer 1, step 0" in text
    assert "the params hold 2 non-finite values, the first in params['layers'][1]['f']['W']" \
        in text
    assert np.isnan(res.values).all()
